// Trusting one extra CA for an https:// engine (a private CA that the Keyfactor server's system
// store does not hold), for this forwarder's connections only: the process-wide
// ServicePointManager callback is never touched, as it would change TLS for all of Keyfactor.

using System;
using System.Collections.Generic;
using System.IO;
using System.Net.Http;
using System.Net.Security;
using System.Security.Cryptography.X509Certificates;
using System.Text;

namespace Jobhook.Forwarder
{
    /// <summary>
    /// Server certificate validation: the system's verdict when it has no complaint; otherwise
    /// the certificate must chain to a CA of the configured file, for the right host name, with no other
    /// chain error, and be usable by a TLS server (serverAuth, when it lists extended key
    /// usages at all). Revocation is not checked (see README.md, TrustedCaFile).
    /// </summary>
    public sealed class TlsTrust
    {
        /// <summary>Largest CA file read: a certificate is a few KiB, a bundle of a few CAs some more.</summary>
        public const int MaxCaFileBytes = 64 * 1024;

        /// <summary>The certificates a chain may end at: the file's self-signed ones (its roots), or all of them if it has none.</summary>
        readonly X509Certificate2[] anchors;
        /// <summary>Every certificate of the file, for building the chain (intermediates among them).</summary>
        readonly X509Certificate2[] all;

        TlsTrust(X509Certificate2[] anchors, X509Certificate2[] all)
        {
            this.anchors = anchors;
            this.all = all;
        }

        /// <summary>
        /// Reads a DER certificate or every certificate of a PEM file; null (logged) if it cannot
        /// be used. The chain of an engine certificate may end at any self-signed certificate of
        /// the file (a root CA); the others (intermediate CAs) only help build it. A file without
        /// a self-signed certificate names the CA(s) to trust as they are, as a file of one
        /// intermediate CA always did. Logs how many certificates were found and which are trusted.
        /// </summary>
        public static TlsTrust Load(string path, IForwarderLog log)
        {
            var shown = LogText.Printable(path);
            try
            {
                var info = new FileInfo(path);
                if (info.Length > MaxCaFileBytes)
                {
                    log.Error("TrustedCaFile " + shown + " is " + info.Length + " bytes; a certificate file is at most " + MaxCaFileBytes);
                    return null;
                }
                var bytes = File.ReadAllBytes(path);
                var text = Encoding.ASCII.GetString(bytes);
                const string begin = "-----BEGIN CERTIFICATE-----";
                const string end = "-----END CERTIFICATE-----";
                var certificates = new List<X509Certificate2>();
                int at = 0, start;
                while ((start = text.IndexOf(begin, at, StringComparison.Ordinal)) >= 0)
                {
                    var stop = text.IndexOf(end, start, StringComparison.Ordinal);
                    if (stop < 0)
                        throw new FormatException("PEM certificate without its END line");
                    certificates.Add(new X509Certificate2(Convert.FromBase64String(text.Substring(start + begin.Length, stop - start - begin.Length))));
                    at = stop + end.Length;
                }
                if (certificates.Count == 0)
                    certificates.Add(new X509Certificate2(bytes));
                var anchors = certificates.FindAll(SelfSigned);
                if (anchors.Count == 0)
                    anchors = new List<X509Certificate2>(certificates);
                var intermediates = certificates.FindAll(c => !anchors.Contains(c));
                log.Info("TrustedCaFile " + shown + ": " + certificates.Count + " certificate(s); trusting " + Subjects(anchors)
                         + (intermediates.Count > 0 ? "; as intermediate CA(s) only: " + Subjects(intermediates) : ""));
                return new TlsTrust(anchors.ToArray(), certificates.ToArray());
            }
            catch (Exception e)
            {
                log.Error("TrustedCaFile " + shown + " is not a usable PEM or DER certificate file (" + LogText.Printable(e.Message)
                          + "); only the system trust store is used");
                return null;
            }
        }

        /// <summary>Whether a certificate names itself as its issuer (a root CA).</summary>
        static bool SelfSigned(X509Certificate2 certificate)
        {
            var subject = certificate.SubjectName.RawData;
            var issuer = certificate.IssuerName.RawData;
            if (subject == null || issuer == null || subject.Length != issuer.Length)
                return false;
            for (int i = 0; i < subject.Length; i++)
                if (subject[i] != issuer[i])
                    return false;
            return true;
        }

        static string Subjects(List<X509Certificate2> certificates)
        {
            return string.Join(", ", certificates.ConvertAll(c => "\"" + LogText.Printable(c.Subject) + "\"").ToArray());
        }

        /// <summary>The HttpClientHandler callback.</summary>
        public bool Validate(HttpRequestMessage request, X509Certificate2 certificate, X509Chain systemChain, SslPolicyErrors errors)
        {
            if (errors == SslPolicyErrors.None)
                return true;
            // A wrong host name or a missing certificate is never excused by a trusted CA.
            if ((errors & ~SslPolicyErrors.RemoteCertificateChainErrors) != 0 || certificate == null || request == null || request.RequestUri == null)
                return false;
            // Checked here too: not every TLS stack reports a name mismatch once the chain has
            // failed (Mono's does not), and the chain is only excused for the right name.
            if (!HostNames.Matches(certificate, request.RequestUri.IdnHost))
                return false;
            try
            {
                using (var chain = new X509Chain())
                {
                    chain.ChainPolicy.ExtraStore.AddRange(all);
                    chain.ChainPolicy.VerificationFlags = X509VerificationFlags.AllowUnknownCertificateAuthority;
                    // A private CA usually publishes no CRL; validity, signature and the path to
                    // this exact CA are still checked.
                    chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
                    if (!chain.Build(certificate))
                        return false;
                    var root = chain.ChainElements[chain.ChainElements.Count - 1].Certificate;
                    if (!Array.Exists(anchors, a => string.Equals(root.Thumbprint, a.Thumbprint, StringComparison.OrdinalIgnoreCase)))
                        return false;
                    foreach (var status in chain.ChainStatus)
                        if (status.Status != X509ChainStatusFlags.NoError && status.Status != X509ChainStatusFlags.UntrustedRoot)
                            return false;
                    // The chain says who issued it, not what for: a client-authentication or
                    // code-signing certificate from the same CA must not pass for the engine.
                    return AllowsServerAuth(certificate);
                }
            }
            catch
            {
                return false;
            }
        }

        const string ExtendedKeyUsageOid = "2.5.29.37";
        const string ServerAuthOid = "1.3.6.1.5.5.7.3.1";

        /// <summary>
        /// Whether the certificate may serve TLS: it has no extended key usage extension (no
        /// restriction), or that extension lists serverAuth. anyExtendedKeyUsage alone is not
        /// enough, as with OpenSSL's TLS server purpose. A malformed extension fails closed.
        /// </summary>
        internal static bool AllowsServerAuth(X509Certificate2 certificate)
        {
            foreach (var extension in certificate.Extensions)
            {
                if (extension.Oid == null || extension.Oid.Value != ExtendedKeyUsageOid)
                    continue;
                var usage = extension as X509EnhancedKeyUsageExtension ?? new X509EnhancedKeyUsageExtension(extension, extension.Critical);
                foreach (var oid in usage.EnhancedKeyUsages)
                    if (oid.Value == ServerAuthOid)
                        return true;
                return false;
            }
            return true;
        }
    }

    /// <summary>
    /// Server identity per RFC 6125: the host must match a DNS name (one leading `*.` wildcard
    /// label allowed) or an IP address of the certificate's subjectAltName; the subject CN is used
    /// only when the certificate has no subjectAltName at all.
    /// </summary>
    public static class HostNames
    {
        const string SubjectAltNameOid = "2.5.29.17";

        /// <summary>Whether `certificate` names `host` (a DNS name or an IP literal).</summary>
        public static bool Matches(X509Certificate2 certificate, string host)
        {
            if (string.IsNullOrEmpty(host))
                return false;
            host = host.TrimEnd('.').Trim('[', ']');
            System.Net.IPAddress ip;
            bool isIp = System.Net.IPAddress.TryParse(host, out ip);
            foreach (var extension in certificate.Extensions)
            {
                if (extension.Oid == null || extension.Oid.Value != SubjectAltNameOid)
                    continue;
                foreach (var name in GeneralNames(extension.RawData))
                {
                    if (isIp && name.Key == 7 && BytesEqual(name.Value, ip.GetAddressBytes()))
                        return true;
                    if (!isIp && name.Key == 2 && DnsMatches(Encoding.ASCII.GetString(name.Value), host))
                        return true;
                }
                return false;
            }
            var cn = certificate.GetNameInfo(X509NameType.SimpleName, false);
            return !isIp && cn != null && DnsMatches(cn, host);
        }

        static bool DnsMatches(string pattern, string host)
        {
            pattern = pattern.TrimEnd('.');
            if (pattern.StartsWith("*.", StringComparison.Ordinal))
            {
                var dot = host.IndexOf('.');
                return dot > 0 && string.Equals(pattern.Substring(1), host.Substring(dot), StringComparison.OrdinalIgnoreCase)
                       && pattern.IndexOf('.', 2) > 0; // never "*.com"-like single-label wildcards
            }
            return string.Equals(pattern, host, StringComparison.OrdinalIgnoreCase);
        }

        static bool BytesEqual(byte[] a, byte[] b)
        {
            if (a.Length != b.Length)
                return false;
            for (int i = 0; i < a.Length; i++)
                if (a[i] != b[i])
                    return false;
            return true;
        }

        /// <summary>
        /// The (context tag, value) pairs of a DER GeneralNames SEQUENCE. Anything malformed
        /// ends the list (and so fails closed).
        /// </summary>
        static System.Collections.Generic.List<System.Collections.Generic.KeyValuePair<int, byte[]>> GeneralNames(byte[] der)
        {
            var names = new System.Collections.Generic.List<System.Collections.Generic.KeyValuePair<int, byte[]>>();
            int offset = 0;
            int tag, length;
            if (der == null || !ReadHeader(der, ref offset, out tag, out length) || tag != 0x30 || offset + length > der.Length)
                return names;
            int end = offset + length;
            while (offset < end)
            {
                if (!ReadHeader(der, ref offset, out tag, out length) || offset + length > end)
                    break;
                var value = new byte[length];
                Array.Copy(der, offset, value, 0, length);
                offset += length;
                // Context-specific primitive tags: [2] dNSName, [7] iPAddress.
                if ((tag & 0xE0) == 0x80)
                    names.Add(new System.Collections.Generic.KeyValuePair<int, byte[]>(tag & 0x1F, value));
            }
            return names;
        }

        static bool ReadHeader(byte[] der, ref int offset, out int tag, out int length)
        {
            tag = 0;
            length = 0;
            if (offset + 2 > der.Length)
                return false;
            tag = der[offset++];
            int first = der[offset++];
            if (first < 0x80)
            {
                length = first;
                return true;
            }
            int count = first & 0x7F;
            if (count == 0 || count > 3 || offset + count > der.Length)
                return false;
            for (int i = 0; i < count; i++)
                length = (length << 8) | der[offset++];
            return true;
        }
    }
}
