// Trusting one extra CA for an https:// engine (a private CA that the Keyfactor server's system
// store does not hold), for this forwarder's connections only: the process-wide
// ServicePointManager callback is never touched, as it would change TLS for all of Keyfactor.

using System;
using System.IO;
using System.Net.Http;
using System.Net.Security;
using System.Security.Cryptography.X509Certificates;
using System.Text;

namespace Jobhook.Forwarder
{
    /// <summary>
    /// Server certificate validation: the system's verdict when it has no complaint; otherwise
    /// the certificate must chain to the configured CA, for the right host name, with no other
    /// chain error.
    /// </summary>
    public sealed class TlsTrust
    {
        /// <summary>Largest CA file read: a certificate is a few KiB.</summary>
        public const int MaxCaFileBytes = 64 * 1024;

        readonly X509Certificate2 ca;

        TlsTrust(X509Certificate2 ca)
        {
            this.ca = ca;
        }

        /// <summary>Reads a PEM or DER certificate; null (logged) if it cannot be used.</summary>
        public static TlsTrust Load(string path, IForwarderLog log)
        {
            try
            {
                var info = new FileInfo(path);
                if (info.Length > MaxCaFileBytes)
                {
                    log.Error("TrustedCaFile " + path + " is " + info.Length + " bytes; a certificate is at most " + MaxCaFileBytes);
                    return null;
                }
                var bytes = File.ReadAllBytes(path);
                var text = Encoding.ASCII.GetString(bytes);
                const string begin = "-----BEGIN CERTIFICATE-----";
                const string end = "-----END CERTIFICATE-----";
                var start = text.IndexOf(begin, StringComparison.Ordinal);
                if (start >= 0)
                {
                    var stop = text.IndexOf(end, start, StringComparison.Ordinal);
                    if (stop < 0)
                        throw new FormatException("PEM certificate without its END line");
                    bytes = Convert.FromBase64String(text.Substring(start + begin.Length, stop - start - begin.Length));
                }
                return new TlsTrust(new X509Certificate2(bytes));
            }
            catch (Exception e)
            {
                log.Error("TrustedCaFile " + path + " is not a usable PEM or DER certificate (" + e.Message
                          + "); only the system trust store is used");
                return null;
            }
        }

        /// <summary>The HttpClientHandler callback.</summary>
        public bool Validate(HttpRequestMessage request, X509Certificate2 certificate, X509Chain systemChain, SslPolicyErrors errors)
        {
            if (errors == SslPolicyErrors.None)
                return true;
            // A wrong host name or a missing certificate is never excused by a trusted CA.
            if ((errors & ~SslPolicyErrors.RemoteCertificateChainErrors) != 0 || certificate == null)
                return false;
            try
            {
                using (var chain = new X509Chain())
                {
                    chain.ChainPolicy.ExtraStore.Add(ca);
                    chain.ChainPolicy.VerificationFlags = X509VerificationFlags.AllowUnknownCertificateAuthority;
                    // A private CA usually publishes no CRL; validity, signature and the path to
                    // this exact CA are still checked.
                    chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
                    if (!chain.Build(certificate))
                        return false;
                    var root = chain.ChainElements[chain.ChainElements.Count - 1].Certificate;
                    if (!string.Equals(root.Thumbprint, ca.Thumbprint, StringComparison.OrdinalIgnoreCase))
                        return false;
                    foreach (var status in chain.ChainStatus)
                        if (status.Status != X509ChainStatusFlags.NoError && status.Status != X509ChainStatusFlags.UntrustedRoot)
                            return false;
                    return true;
                }
            }
            catch
            {
                return false;
            }
        }
    }
}
