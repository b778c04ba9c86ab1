// TEST-ONLY stand-in for the public API of Keyfactor's NuGet package Keyfactor.Logging
// (LogHandler.GetReflectedClassLogger) and of Microsoft.Extensions.Logging.Abstractions (ILogger,
// LogLevel, EventId and the LoggerExtensions the forwarder calls), so that the forwarder's
// KEYFACTOR_LOGGING variant can be compiled and exercised under Mono, where those packages cannot
// be restored. Shapes follow the public API; behaviour does not: instead of NLog, every line goes
// to LogHandler.Sink, which the harness sets. Never ship this assembly.

using System;
using System.Text;
using Microsoft.Extensions.Logging;

namespace Microsoft.Extensions.Logging
{
    /// <summary>Severity of a log line, with the real enum's numbers.</summary>
    public enum LogLevel
    {
        Trace = 0,
        Debug = 1,
        Information = 2,
        Warning = 3,
        Error = 4,
        Critical = 5,
        None = 6,
    }

    /// <summary>Identifies a logging event.</summary>
    public struct EventId
    {
        public EventId(int id, string name)
        {
            Id = id;
            Name = name;
        }

        public int Id { get; private set; }
        public string Name { get; private set; }

        public static implicit operator EventId(int id)
        {
            return new EventId(id, null);
        }
    }

    /// <summary>The logger interface, as in Microsoft.Extensions.Logging.Abstractions.</summary>
    public interface ILogger
    {
        void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception exception, Func<TState, Exception, string> formatter);
        bool IsEnabled(LogLevel logLevel);
        IDisposable BeginScope<TState>(TState state);
    }

    /// <summary>The extension methods the forwarder calls, with the real signatures.</summary>
    public static class LoggerExtensions
    {
        public static void LogDebug(this ILogger logger, string message, params object[] args) { Write(logger, LogLevel.Debug, message, args); }
        public static void LogInformation(this ILogger logger, string message, params object[] args) { Write(logger, LogLevel.Information, message, args); }
        public static void LogWarning(this ILogger logger, string message, params object[] args) { Write(logger, LogLevel.Warning, message, args); }
        public static void LogError(this ILogger logger, string message, params object[] args) { Write(logger, LogLevel.Error, message, args); }

        static void Write(ILogger logger, LogLevel level, string template, object[] args)
        {
            if (logger == null)
                throw new ArgumentNullException("logger");
            logger.Log(level, 0, Format(template, args), null, (state, exception) => state);
        }

        /// <summary>A message template's placeholders ("{Message}") filled with the arguments in order.</summary>
        static string Format(string template, object[] args)
        {
            var text = new StringBuilder();
            int next = 0;
            for (int i = 0; i < template.Length; i++)
            {
                char c = template[i];
                if ((c == '{' || c == '}') && i + 1 < template.Length && template[i + 1] == c)
                {
                    text.Append(c);
                    i++;
                    continue;
                }
                int close = c == '{' ? template.IndexOf('}', i) : -1;
                if (close < 0)
                {
                    text.Append(c);
                    continue;
                }
                text.Append(args != null && next < args.Length ? Convert.ToString(args[next]) : template.Substring(i, close - i + 1));
                next++;
                i = close;
            }
            return text.ToString();
        }
    }
}

namespace Keyfactor.Logging
{
    /// <summary>Keyfactor's entry point for loggers; here they all write to <see cref="Sink"/>.</summary>
    public static class LogHandler
    {
        /// <summary>
        /// TEST-ONLY (not in the real package): where every line goes, as (logger name, level,
        /// message). Lines are discarded while it is null.
        /// </summary>
        public static Action<string, LogLevel, string> Sink;

        /// <summary>A logger named after the object's class, as the real one (NLog's logger name).</summary>
        public static ILogger GetReflectedClassLogger(object obj)
        {
            if (obj == null)
                throw new ArgumentNullException("obj");
            return new SinkLogger(obj.GetType().FullName);
        }

        sealed class SinkLogger : ILogger
        {
            readonly string name;

            public SinkLogger(string name)
            {
                this.name = name;
            }

            public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception exception, Func<TState, Exception, string> formatter)
            {
                var sink = Sink;
                if (sink != null)
                    sink(name, logLevel, formatter(state, exception));
            }

            public bool IsEnabled(LogLevel logLevel)
            {
                return true;
            }

            public IDisposable BeginScope<TState>(TState state)
            {
                return null;
            }
        }
    }
}
