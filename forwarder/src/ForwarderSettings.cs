// Parsing of the string options Keyfactor passes. Configuration is hostile input too (a typo in
// web.config is the usual case): every value is checked, and a bad one is logged and replaced by
// its default instead of throwing inside Keyfactor's process.

using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Linq;

namespace Jobhook.Forwarder
{
    /// <summary>The checked settings of one registration.</summary>
    public sealed class ForwarderSettings
    {
        /// <summary>
        /// Default POST timeout. The engine answers after one commit (milliseconds); 10 s only
        /// trips on a real outage, and the event is resent with the same idempotency key.
        /// </summary>
        public const int DefaultRequestTimeoutMs = 10000;
        /// <summary>Default first retry delay: quick recovery from a blip without hammering.</summary>
        public const int DefaultInitialBackoffMs = 1000;
        /// <summary>Default longest retry delay: an engine back from an outage is found within a minute.</summary>
        public const int DefaultMaxBackoffMs = 60000;
        /// <summary>
        /// Default spool size in events: about a day of a very busy Command (one event a second)
        /// at well under 1 KiB each.
        /// </summary>
        public const long DefaultMaxSpoolFiles = 100000;
        /// <summary>Default spool size in bytes (256 MiB): bounded even if events are unusually large.</summary>
        public const long DefaultMaxSpoolBytes = 256L * 1024 * 1024;
        /// <summary>
        /// Default in-memory queue length. Events wait here for the spool writer: milliseconds
        /// normally, seconds for a large burst (about 580 files/s measured on a loaded machine);
        /// 10000 small strings are a few MiB at most.
        /// </summary>
        public const int DefaultMaxQueuedEvents = 10000;
        /// <summary>
        /// Largest accepted MaxSpoolFiles. The spool's index holds every file's name (67
        /// characters) and size in memory, about 220 bytes an event on a 64-bit CLR: a million
        /// events are some 220 MB inside Keyfactor's worker process, and listing them (start-up,
        /// Rescan) takes seconds. Ten times the default, ten days at one event a second.
        /// </summary>
        public const long MaxMaxSpoolFiles = 1000000;
        /// <summary>
        /// Largest accepted MaxQueuedEvents. Each queued event holds its body in memory (about
        /// 1 KiB typically, 64 KiB at most): 100000 are about 100 MB typically. The queue only
        /// fills while the spool disk fails, and a longer one would not save those events anyway.
        /// </summary>
        public const int MaxMaxQueuedEvents = 100000;

        /// <summary>
        /// Most bytes of events waiting in memory, in the intake queue and in each
        /// registration's queue for its spool writer, besides their limits in events: a body
        /// may be up to 64 KiB of UTF-8 (and its fields more before it is refused), held as a
        /// .NET string of twice as many bytes as characters, so the counts alone would let some
        /// 10,000 large events hold over a gigabyte of Keyfactor's worker process. 32 MiB holds
        /// some 250 of the largest events and tens of thousands of ordinary ones (about 1 KiB).
        /// </summary>
        public const long MaxQueuedBytes = 32L * 1024 * 1024;

        /// <summary>
        /// Memory an event of `chars` UTF-16 characters (its body, or a context's strings) is
        /// counted for against <see cref="MaxQueuedBytes"/>: two bytes a character, and the
        /// objects around them (key, list node, snapshot), generously.
        /// </summary>
        public static long MemoryBytes(long chars)
        {
            return 2 * chars + 512;
        }

        /// <summary>Smallest accepted timeout or backoff (ms): below this, retries would spin.</summary>
        public const int MinMilliseconds = 1;
        /// <summary>Largest accepted timeout or backoff (ms): one day.</summary>
        public const int MaxMilliseconds = 24 * 60 * 60 * 1000;
        /// <summary>Longest accepted URL or token, in characters; real ones are far shorter.</summary>
        public const int MaxTextLength = 4096;
        /// <summary>
        /// Longest forwarder name, in characters: the engine shows it per forwarder and refuses
        /// longer names, so it is cut here rather than sent.
        /// </summary>
        public const int MaxNameLength = 64;

        /// <summary>The endpoint events are posted to: EngineUrl + /v1/job-complete. Null if unusable.</summary>
        public Uri JobCompleteUrl { get; private set; }
        /// <summary>The bearer token, or null.</summary>
        public string BearerToken { get; private set; }
        /// <summary>The spool directory, as a full path.</summary>
        public string SpoolDirectory { get; private set; }
        /// <summary>POST timeout.</summary>
        public TimeSpan RequestTimeout { get; private set; }
        /// <summary>First retry delay.</summary>
        public TimeSpan InitialBackoff { get; private set; }
        /// <summary>Longest retry delay.</summary>
        public TimeSpan MaxBackoff { get; private set; }
        /// <summary>Spool limit in events.</summary>
        public long MaxSpoolFiles { get; private set; }
        /// <summary>Spool limit in bytes.</summary>
        public long MaxSpoolBytes { get; private set; }
        /// <summary>In-memory queue limit.</summary>
        public int MaxQueuedEvents { get; private set; }
        /// <summary>A CA certificate file to trust, or null.</summary>
        public string TrustedCaFile { get; private set; }
        /// <summary>Whether to use the system proxy.</summary>
        public bool UseProxy { get; private set; }
        /// <summary>Whether to log per-event lines.</summary>
        public bool DebugLog { get; private set; }
        /// <summary>
        /// The name the engine shows for this forwarder (GET /v1/forwarders): the option
        /// ForwarderName, or the machine name; visible ASCII only.
        /// </summary>
        public string ForwarderName { get; private set; }
        /// <summary>Every problem found, for the log (nothing here is secret).</summary>
        public IList<string> Problems { get; private set; }

        /// <summary>The default spool directory: under ProgramData, outside the web root.</summary>
        public static string DefaultSpoolDirectory()
        {
            var common = Environment.GetFolderPath(Environment.SpecialFolder.CommonApplicationData);
            if (string.IsNullOrEmpty(common))
                common = Path.GetTempPath();
            return Path.Combine(Path.Combine(Path.Combine(common, "Jobhook"), "Forwarder"), "spool");
        }

        /// <summary>
        /// Checks every option; never throws, whatever the values: it runs on the intake thread
        /// for every new handler object, so an exception here would lose every event.
        /// </summary>
        public static ForwarderSettings Parse(JobhookForwarder.Options options)
        {
            try
            {
                return ParseChecked(options);
            }
            catch (Exception e)
            {
                // Every check below is written not to throw; should one still, the registration
                // runs on the defaults (events are spooled, not sent) rather than lose events.
                var s = new ForwarderSettings { Problems = new List<string>() };
                s.SpoolDirectory = DefaultSpoolDirectory();
                s.RequestTimeout = TimeSpan.FromMilliseconds(DefaultRequestTimeoutMs);
                s.InitialBackoff = TimeSpan.FromMilliseconds(DefaultInitialBackoffMs);
                s.MaxBackoff = TimeSpan.FromMilliseconds(DefaultMaxBackoffMs);
                s.MaxSpoolFiles = DefaultMaxSpoolFiles;
                s.MaxSpoolBytes = DefaultMaxSpoolBytes;
                s.MaxQueuedEvents = DefaultMaxQueuedEvents;
                s.ForwarderName = "forwarder";
                s.Problems.Add("the settings could not be checked (" + e.GetType().Name + ": " + e.Message
                               + "); using the defaults, without EngineUrl: events are spooled in " + s.SpoolDirectory + " but not sent");
                return s;
            }
        }

        static ForwarderSettings ParseChecked(JobhookForwarder.Options options)
        {
            var s = new ForwarderSettings { Problems = new List<string>() };
            options = options ?? new JobhookForwarder.Options();
            s.JobCompleteUrl = ParseUrl(options.EngineUrl, s.Problems);
            s.BearerToken = ParseToken(options.BearerToken, s.Problems);
            s.SpoolDirectory = ParseDirectory(options.SpoolDirectory, s.Problems);
            s.RequestTimeout = TimeSpan.FromMilliseconds(ParseInt("RequestTimeoutMs", options.RequestTimeoutMs, DefaultRequestTimeoutMs, MinMilliseconds, MaxMilliseconds, s.Problems));
            s.InitialBackoff = TimeSpan.FromMilliseconds(ParseInt("InitialBackoffMs", options.InitialBackoffMs, DefaultInitialBackoffMs, MinMilliseconds, MaxMilliseconds, s.Problems));
            s.MaxBackoff = TimeSpan.FromMilliseconds(ParseInt("MaxBackoffMs", options.MaxBackoffMs, DefaultMaxBackoffMs, MinMilliseconds, MaxMilliseconds, s.Problems));
            if (s.MaxBackoff < s.InitialBackoff)
            {
                var initial = ((long)s.InitialBackoff.TotalMilliseconds).ToString(CultureInfo.InvariantCulture);
                s.Problems.Add("MaxBackoffMs (" + ((long)s.MaxBackoff.TotalMilliseconds).ToString(CultureInfo.InvariantCulture)
                               + ") is less than InitialBackoffMs (" + initial + "); using " + initial + " for both");
                s.MaxBackoff = s.InitialBackoff;
            }
            s.MaxSpoolFiles = ParseLong("MaxSpoolFiles", options.MaxSpoolFiles, DefaultMaxSpoolFiles, 1, MaxMaxSpoolFiles, s.Problems);
            s.MaxSpoolBytes = ParseLong("MaxSpoolBytes", options.MaxSpoolBytes, DefaultMaxSpoolBytes, 1024, long.MaxValue / 2, s.Problems);
            s.MaxQueuedEvents = ParseInt("MaxQueuedEvents", options.MaxQueuedEvents, DefaultMaxQueuedEvents, 1, MaxMaxQueuedEvents, s.Problems);
            s.TrustedCaFile = ParseCaFile(options.TrustedCaFile, s.Problems);
            s.UseProxy = ParseBool("UseProxy", options.UseProxy, s.Problems);
            s.DebugLog = ParseBool("DebugLog", options.DebugLog, s.Problems);
            s.ForwarderName = ParseName(options.ForwarderName, s.Problems);
            // Sent all the same (the engine would answer 401 without it, and events would only
            // pile up), but an operator must know.
            if (s.BearerToken != null && s.JobCompleteUrl != null && s.JobCompleteUrl.Scheme == Uri.UriSchemeHttp)
                s.Problems.Add("BearerToken is configured with an http:// EngineUrl: the token crosses the network in clear text, readable by anyone on the path; use https://");
            // Nothing to verify on plain HTTP: whoever set a CA meant TLS.
            if (s.TrustedCaFile != null && s.JobCompleteUrl != null && s.JobCompleteUrl.Scheme == Uri.UriSchemeHttp)
                s.Problems.Add("TrustedCaFile is set but EngineUrl is http://: the CA is not used and nothing is encrypted; use an https:// EngineUrl");
            return s;
        }

        /// <summary>The spool directory these options name, as <see cref="Parse"/> makes it (problems not reported).</summary>
        internal static string SpoolDirectoryOf(JobhookForwarder.Options options)
        {
            return ParseDirectory(options == null ? null : options.SpoolDirectory, new List<string>());
        }

        static string ParseName(string text, IList<string> problems)
        {
            // Blank is unset, as for every other option: the machine name, silently. Only a
            // name that was configured can have been changed here, and is reported if it was.
            bool configured = !string.IsNullOrWhiteSpace(text);
            string name;
            if (configured)
                name = text.Trim();
            else
            {
                try { name = Environment.MachineName; } catch { name = null; }
            }
            name = name ?? "";
            var clean = new System.Text.StringBuilder();
            bool replaced = false;
            foreach (var c in name.Trim())
            {
                if (clean.Length >= MaxNameLength) break;
                bool visible = c > ' ' && c < 0x7f;
                replaced |= !visible;
                clean.Append(visible ? c : '_');
            }
            if (clean.Length == 0)
            {
                problems.Add("ForwarderName is not set and the machine name is unknown; using \"forwarder\" (set ForwarderName to name this forwarder)");
                return "forwarder";
            }
            if (configured && clean.ToString() != name)
                problems.Add("ForwarderName must be at most " + MaxNameLength + " visible ASCII characters without spaces; "
                             + (name.Length > MaxNameLength ? "it was cut" : "")
                             + (name.Length > MaxNameLength && replaced ? " and " : "")
                             + (replaced ? "characters that are not visible ASCII (spaces among them) were replaced by '_'" : "")
                             + ": using " + clean);
            return clean.ToString();
        }

        static Uri ParseUrl(string text, IList<string> problems)
        {
            if (string.IsNullOrWhiteSpace(text))
            {
                problems.Add("EngineUrl is not set; events are spooled but not sent until it is");
                return null;
            }
            text = text.Trim();
            Uri url;
            if (text.Length > MaxTextLength || !Uri.TryCreate(text, UriKind.Absolute, out url)
                || (url.Scheme != Uri.UriSchemeHttp && url.Scheme != Uri.UriSchemeHttps)
                || !string.IsNullOrEmpty(url.UserInfo) || !string.IsNullOrEmpty(url.Query) || !string.IsNullOrEmpty(url.Fragment))
            {
                problems.Add("EngineUrl must be an http:// or https:// base URL without user, query or fragment (e.g. https://jobhook.example.com:8443); events are spooled but not sent until it is fixed");
                return null;
            }
            var path = url.AbsolutePath.TrimEnd('/');
            var authority = url.GetLeftPart(UriPartial.Authority);
            if (path.EndsWith(EndpointPath, StringComparison.OrdinalIgnoreCase))
            {
                // The endpoint's URL pasted whole: posting to <it>/v1/job-complete would only
                // ever be answered 404. What was meant is plain, so it is used, and said.
                path = path.Substring(0, path.Length - EndpointPath.Length);
                problems.Add("EngineUrl ends with the endpoint path " + EndpointPath + ", which the forwarder adds itself: remove "
                             + EndpointPath + " from EngineUrl (events are sent to " + authority + path + EndpointPath + " meanwhile)");
            }
            return new Uri(authority + path + EndpointPath);
        }

        /// <summary>The engine's endpoint for events, below EngineUrl.</summary>
        const string EndpointPath = "/v1/job-complete";

        /// <summary>What an Authorization header value starts with, and a BearerToken must not.</summary>
        const string BearerPrefix = "Bearer ";

        static string ParseToken(string text, IList<string> problems)
        {
            // Blank is unset, as for every other option.
            if (string.IsNullOrWhiteSpace(text))
                return null;
            // The prefix is looked for before the end is trimmed: "Bearer " alone, trimmed
            // first, would be the word "Bearer", and sent as the token.
            text = text.TrimStart();
            if (HasBearerPrefix(text))
            {
                // The header value pasted whole: the token is what follows, and is sent.
                text = text.Substring(BearerPrefix.TrimEnd().Length).Trim();
                if (text.Length == 0)
                {
                    problems.Add("BearerToken is only the \"Bearer \" prefix, without a token: set BearerToken to the token alone"
                                 + " (one of the engine's server.tokens, without \"Bearer \"); no token is sent (the engine will answer 401)");
                    return null;
                }
                problems.Add("BearerToken starts with \"Bearer \", which the forwarder adds itself: remove the \"Bearer \" prefix"
                             + " from BearerToken (the token after it is sent meanwhile)");
            }
            text = text.Trim();
            if (text.Length > MaxTextLength)
            {
                problems.Add("BearerToken is too long (" + text.Length + " characters, at most " + MaxTextLength
                             + "); it is not sent (the engine will answer 401)");
                return null;
            }
            // RFC 6750 b64token characters only: anything else (a newline above all) could
            // inject a header. The token itself is never logged.
            foreach (char c in text)
            {
                bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
                          || c == '-' || c == '.' || c == '_' || c == '~' || c == '+' || c == '/' || c == '=';
                if (!ok)
                {
                    problems.Add("BearerToken contains characters a bearer token cannot have (only letters, digits and - . _ ~ + / = are allowed);"
                                 + " it is not sent (the engine will answer 401)");
                    return null;
                }
            }
            return text;
        }

        /// <summary>
        /// Whether `text` (its start trimmed) begins with the scheme of an Authorization header:
        /// "Bearer" in any case, then white space (a space, or a tab pasted with it) or nothing
        /// (the space trimmed away by whatever stored the value; the bare word is no real token:
        /// the engine warns about any token under 24 characters as guessable).
        /// </summary>
        static bool HasBearerPrefix(string text)
        {
            var scheme = BearerPrefix.TrimEnd();
            return text.StartsWith(scheme, StringComparison.OrdinalIgnoreCase)
                   && (text.Length == scheme.Length || char.IsWhiteSpace(text[scheme.Length]));
        }

        static string ParseDirectory(string text, IList<string> problems)
        {
            if (string.IsNullOrWhiteSpace(text))
                return DefaultSpoolDirectory();
            text = text.Trim();
            var fallback = DefaultSpoolDirectory();
            // Every check in the try: the path functions throw for characters a path cannot
            // have, and which those are differs between frameworks.
            try
            {
                var problem = PathProblem("SpoolDirectory", text);
                if (problem != null)
                {
                    problems.Add(problem + "; using " + fallback);
                    return fallback;
                }
                if (!IsAbsolute(text))
                {
                    // Relative to the worker process's current directory (for IIS,
                    // C:\Windows\System32\inetsrv): never what was meant, and it may change.
                    problems.Add("SpoolDirectory must be an absolute path (" + text + " is relative to the process's current directory); using " + fallback);
                    return fallback;
                }
                var normalised = NormalisePath(text);
                if (string.Equals(normalised, NormalisePath(Path.GetPathRoot(normalised) ?? ""), StringComparison.OrdinalIgnoreCase))
                {
                    // The spool lists its whole directory at start and every few seconds, and
                    // takes every file under its names there for its own: a volume's root is
                    // every program's directory.
                    problems.Add("SpoolDirectory is the root of a volume (" + normalised + "); give a directory of the forwarder's own; using " + fallback);
                    return fallback;
                }
                return normalised;
            }
            catch (Exception e)
            {
                problems.Add("SpoolDirectory is not a usable path (" + e.Message + "); using " + fallback);
                return fallback;
            }
        }

        static string ParseCaFile(string text, IList<string> problems)
        {
            if (string.IsNullOrWhiteSpace(text))
                return null;
            text = text.Trim();
            var problem = PathProblem("TrustedCaFile", text);
            if (problem != null)
            {
                problems.Add(problem + "; only the system trust store is used");
                return null;
            }
            try
            {
                if (!IsAbsolute(text))
                {
                    // As for SpoolDirectory: relative to the worker process's current directory
                    // (for IIS, C:\Windows\System32\inetsrv), never what was meant.
                    problems.Add("TrustedCaFile must be an absolute path (" + text + " is relative to the process's current directory); only the system trust store is used");
                    return null;
                }
            }
            catch (Exception e)
            {
                problems.Add("TrustedCaFile is not a usable path (" + e.Message + "); only the system trust store is used");
                return null;
            }
            return text;
        }

        /// <summary>
        /// Characters no Windows path can hold besides control characters: the quote (Explorer's
        /// "Copy as path" puts a pair around the path), the angle brackets and the pipe. Checked
        /// on every platform, so that a value is judged the same under Mono in the tests as on
        /// the Keyfactor server. Not the wildcards: `?` begins the long-path prefix `\\?\`
        /// (a wildcard elsewhere makes the path functions throw, which is reported too).
        /// </summary>
        static readonly char[] NotInPaths = { '"', '<', '>', '|' };

        /// <summary>
        /// What is wrong with `text`, the value of the path setting `name`, if it holds a
        /// character no path can (<see cref="NotInPaths"/>, a control character, or one the
        /// framework refuses) or one that cannot be seen (Unicode format characters); null if
        /// none. Names the characters and what to do. Never throws.
        /// </summary>
        static string PathProblem(string name, string text)
        {
            char[] refused;
            try { refused = Path.GetInvalidPathChars(); }
            catch { refused = new char[0]; }
            var found = new List<string>();
            var unseen = new List<string>();
            foreach (char c in text)
            {
                // An invisible character (a zero-width space, a direction mark: Unicode's format
                // characters) pasted with a path makes it another path that looks the same.
                bool invisible = CharUnicodeInfo.GetUnicodeCategory(c) == UnicodeCategory.Format;
                if (c >= ' ' && c != '\x7f' && !invisible && Array.IndexOf(NotInPaths, c) < 0 && Array.IndexOf(refused, c) < 0)
                    continue;
                var shown = c < ' ' || c == '\x7f' || invisible || char.IsWhiteSpace(c)
                    ? "U+" + ((int)c).ToString("X4", CultureInfo.InvariantCulture)
                    : "'" + c + "'";
                var list = invisible ? unseen : found;
                if (!list.Contains(shown))
                    list.Add(shown);
            }
            if (found.Count == 0 && unseen.Count == 0)
                return null;
            if (found.Count == 0)
                return name + " contains characters that cannot be seen (" + string.Join(", ", unseen)
                       + "), which make it another path than the one it shows; type it again";
            bool quoted = text.Length >= 2 && text[0] == '"' && text[text.Length - 1] == '"';
            return name + " contains characters a path cannot have (" + string.Join(", ", found.Concat(unseen)) + "); "
                   + (quoted ? "remove the quotes around it" : "remove them");
        }

        /// <summary>
        /// Whether a path names one directory whatever the current directory is: rooted, and
        /// not drive-relative (`C:spool` is relative to drive C's current directory).
        /// </summary>
        internal static bool IsAbsolute(string path)
        {
            if (!Path.IsPathRooted(path))
                return false;
            // On Windows `\spool` is relative to the current drive; `\\server\share` is not.
            bool windows = Path.DirectorySeparatorChar == '\\';
            if (windows && IsSeparator(path[0]) && !(path.Length >= 2 && IsSeparator(path[1])))
                return false;
            if (path.Length >= 2 && path[1] == ':')
                return path.Length >= 3 && IsSeparator(path[2]);
            return true;
        }

        static bool IsSeparator(char c)
        {
            return c == '\\' || c == '/';
        }

        /// <summary>
        /// The full path without trailing separators (a root keeps its own), so that every way of
        /// writing one directory (`C:\spool`, `C:\spool\`, `C:\x\..\spool`) names one spool
        /// and therefore one runtime: two runtimes on one directory would each send every file.
        /// </summary>
        internal static string NormalisePath(string path)
        {
            var full = Path.GetFullPath(path);
            var root = Path.GetPathRoot(full) ?? "";
            var end = full.Length;
            while (end > root.Length && (full[end - 1] == Path.DirectorySeparatorChar || full[end - 1] == Path.AltDirectorySeparatorChar))
                end--;
            return full.Substring(0, end);
        }

        static int ParseInt(string name, string text, int fallback, int min, int max, IList<string> problems)
        {
            return (int)ParseLong(name, text, fallback, min, max, problems);
        }

        static long ParseLong(string name, string text, long fallback, long min, long max, IList<string> problems)
        {
            if (string.IsNullOrWhiteSpace(text))
                return fallback;
            long value;
            if (!long.TryParse(text.Trim(), NumberStyles.Integer, CultureInfo.InvariantCulture, out value) || value < min || value > max)
            {
                problems.Add(name + " must be a whole number from " + min + " to " + max + "; using " + fallback);
                return fallback;
            }
            return value;
        }

        static bool ParseBool(string name, string text, IList<string> problems)
        {
            if (string.IsNullOrWhiteSpace(text))
                return false;
            bool value;
            if (!bool.TryParse(text.Trim(), out value))
            {
                problems.Add(name + " must be true or false; using false");
                return false;
            }
            return value;
        }
    }
}
