// The forwarder's log, behind an interface of four methods so that the source builds without
// Keyfactor.Logging (any host) and logs through Keyfactor's NLog set-up when it is there (symbol
// KEYFACTOR_LOGGING, set by Jobhook.Forwarder.csproj with -p:KeyfactorLogging=true; the tests
// compile it against a stand-in of that API, forwarder/shim/Logging.cs).

using System;
using System.Diagnostics;

namespace Jobhook.Forwarder
{
    /// <summary>Where the forwarder writes what it did. Implementations must not throw.</summary>
    public interface IForwarderLog
    {
        /// <summary>Per-event detail (queued, delivered): off in production logs by default.</summary>
        void Debug(string message);
        /// <summary>Start-up, recovery of a spool, return to health.</summary>
        void Info(string message);
        /// <summary>Something an operator should look at: retries, dropped or rejected events.</summary>
        void Warn(string message);
        /// <summary>The forwarder cannot do its job (bad configuration, unwritable spool).</summary>
        void Error(string message);
    }

    /// <summary>Text from outside (an engine's or a proxy's answer, a setting, a path) made safe for one log line.</summary>
    public static class LogText
    {
        /// <summary>
        /// `text` with every character that can break a log line or change how it reads
        /// replaced by a space, and trimmed: control characters (C0, DEL, C1 including U+0085
        /// NEL), U+2028 and U+2029 (line and paragraph separators), and format characters
        /// (Unicode category Cf: the bidirectional controls U+200E-U+200F, U+202A-U+202E,
        /// U+2066-U+2069 and U+061C, zero-width characters, U+FEFF, and the tag characters
        /// U+E0000-U+E007F above U+FFFF), which a log viewer may obey invisibly, e.g. to show a
        /// line reversed or hide text; and a lone surrogate. Null gives "".
        /// </summary>
        public static string Printable(string text)
        {
            if (text == null)
                return "";
            var clean = new System.Text.StringBuilder(text.Length);
            // By code point: a format character above U+FFFF (the tag characters U+E0000–E007F,
            // which hide text) is two UTF-16 units, each of which alone reads as a surrogate.
            for (int i = 0; i < text.Length; i++)
            {
                bool pair = char.IsSurrogatePair(text, i);
                if (Unsafe(System.Globalization.CharUnicodeInfo.GetUnicodeCategory(text, i)) || char.IsSurrogate(text[i]) && !pair)
                    clean.Append(' ');
                else
                {
                    clean.Append(text[i]);
                    if (pair)
                        clean.Append(text[i + 1]);
                }
                if (pair)
                    i++;
            }
            return clean.ToString().Trim();
        }

        /// <summary>
        /// `text` (already <see cref="Printable"/>) cut to at most `max` characters, never
        /// inside a surrogate pair, with how much was left out: for a log line that must stay
        /// one readable line whatever answered (a web page, a long list). Null gives "".
        /// </summary>
        public static string Excerpt(string text, int max)
        {
            if (text == null)
                return "";
            if (text.Length <= max)
                return text;
            int cut = max;
            if (cut > 0 && char.IsHighSurrogate(text[cut - 1]))
                cut--;
            return text.Substring(0, cut) + "... (cut: " + text.Length.ToString(System.Globalization.CultureInfo.InvariantCulture)
                   + " characters in all)";
        }

        /// <summary>Control characters, line and paragraph separators, and format characters (bidi controls, tags); a lone surrogate is replaced by the caller.</summary>
        static bool Unsafe(System.Globalization.UnicodeCategory category)
        {
            switch (category)
            {
                case System.Globalization.UnicodeCategory.Control:
                case System.Globalization.UnicodeCategory.LineSeparator:
                case System.Globalization.UnicodeCategory.ParagraphSeparator:
                case System.Globalization.UnicodeCategory.Format:
                    return true;
                default:
                    return false;
            }
        }
    }

    /// <summary>
    /// A log whose every message goes through <see cref="LogText.Printable"/>: for a part of the
    /// forwarder whose messages are one line each and carry paths, file names and exception
    /// messages (the spool).
    /// </summary>
    internal sealed class PrintableLog : IForwarderLog
    {
        readonly IForwarderLog inner;

        internal PrintableLog(IForwarderLog inner)
        {
            this.inner = inner;
        }

        public void Debug(string message) { inner.Debug(LogText.Printable(message)); }
        public void Info(string message) { inner.Info(LogText.Printable(message)); }
        public void Warn(string message) { inner.Warn(LogText.Printable(message)); }
        public void Error(string message) { inner.Error(LogText.Printable(message)); }
    }

    /// <summary>The default log: <see cref="Trace"/>, which IIS and any host can route.</summary>
    public sealed class TraceForwarderLog : IForwarderLog
    {
        /// <summary>Writes debug lines only when asked, as they come once per event.</summary>
        public bool DebugEnabled { get; set; }

        public void Debug(string message) { if (DebugEnabled) Write("Debug", message); }
        public void Info(string message) { Write("Info", message); }
        public void Warn(string message) { Write("Warn", message); }
        public void Error(string message) { Write("Error", message); }

        static void Write(string level, string message)
        {
            try
            {
                Trace.WriteLine("jobhook-forwarder [" + level + "] " + message);
            }
            catch
            {
                // A log that fails must not fail the handler.
            }
        }
    }

#if KEYFACTOR_LOGGING
    /// <summary>
    /// Keyfactor's own logger (NLog_Orchestrators.config decides where it goes); the logger name
    /// ends in JobhookForwarder, so `*.JobhookForwarder` selects it in that file.
    /// </summary>
    public sealed class KeyfactorForwarderLog : IForwarderLog
    {
        readonly Microsoft.Extensions.Logging.ILogger logger;

        /// <summary>The logger of `owner`'s class (the handler). Throws if Keyfactor's logging cannot give one.</summary>
        public KeyfactorForwarderLog(object owner)
        {
            logger = Keyfactor.Logging.LogHandler.GetReflectedClassLogger(owner);
            if (logger == null)
                throw new InvalidOperationException("Keyfactor.Logging returned no logger");
        }

        public void Debug(string message) { Guard(() => Microsoft.Extensions.Logging.LoggerExtensions.LogDebug(logger, "{Message}", message)); }
        public void Info(string message) { Guard(() => Microsoft.Extensions.Logging.LoggerExtensions.LogInformation(logger, "{Message}", message)); }
        public void Warn(string message) { Guard(() => Microsoft.Extensions.Logging.LoggerExtensions.LogWarning(logger, "{Message}", message)); }
        public void Error(string message) { Guard(() => Microsoft.Extensions.Logging.LoggerExtensions.LogError(logger, "{Message}", message)); }

        static void Guard(Action write)
        {
            try { write(); } catch { }
        }
    }
#endif

    /// <summary>The process-wide log the forwarder writes to.</summary>
    public static class ForwarderLog
    {
        static readonly object gate = new object();
        static volatile IForwarderLog current = new TraceForwarderLog();
#if KEYFACTOR_LOGGING
        /// <summary>A host (or a test) set <see cref="Current"/>: what it chose stays.</summary>
        static volatile bool chosen;
        /// <summary>Keyfactor's logger was tried, so it is not tried again.</summary>
        static volatile bool keyfactorTried;
#endif

        /// <summary>
        /// The log in use. A host (or a test) may replace it before the first event, and then
        /// the forwarder keeps it; null puts the default back (Trace, or with KEYFACTOR_LOGGING
        /// Keyfactor's logger once a handler starts).
        /// </summary>
        public static IForwarderLog Current
        {
            get { return current; }
            set
            {
                lock (gate)
                {
                    current = value ?? new TraceForwarderLog();
#if KEYFACTOR_LOGGING
                    chosen = value != null;
                    keyfactorTried = false;
#endif
                }
            }
        }

        /// <summary>
        /// With KEYFACTOR_LOGGING, makes Keyfactor's logger for `owner`'s class (the handler, so
        /// the logger's name ends in JobhookForwarder) the log, once per process, unless a host
        /// set <see cref="Current"/>; if Keyfactor's logging cannot give a logger, the Trace log
        /// stays and says why. Called where a handler first obtains its runtime, never on
        /// RunHandler's path: creating the logger may load NLog's configuration. Without
        /// KEYFACTOR_LOGGING it does nothing. Never throws.
        /// </summary>
        internal static void UseKeyfactorLogger(object owner)
        {
#if KEYFACTOR_LOGGING
            if (chosen || keyfactorTried)
                return;
            lock (gate)
            {
                if (chosen || keyfactorTried)
                    return;
                keyfactorTried = true;
                try
                {
                    current = new KeyfactorForwarderLog(owner);
                }
                catch (Exception e)
                {
                    LogQueue.Wrap(current).Error("Keyfactor's logger is not available (" + e.Message + "); logging to System.Diagnostics.Trace");
                }
            }
#endif
        }
    }
}
