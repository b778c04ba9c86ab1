// The forwarder's log, behind an interface of four methods so that the source builds without
// Keyfactor.Logging (tests under Mono, any host) and logs through Keyfactor's NLog set-up when it
// is there (symbol KEYFACTOR_LOGGING, set by Jobhook.Forwarder.csproj).

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

        public KeyfactorForwarderLog(object owner)
        {
            logger = Keyfactor.Logging.LogHandler.GetReflectedClassLogger(owner);
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
        static IForwarderLog current = new TraceForwarderLog();

        /// <summary>
        /// The log in use. A host (or a test) may replace it before the first event; null puts
        /// the default back.
        /// </summary>
        public static IForwarderLog Current
        {
            get { return current; }
            set { current = value ?? new TraceForwarderLog(); }
        }
    }
}
