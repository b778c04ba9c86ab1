// The forwarder's own threads (the spool writer, the sender, the notices thread, the shutdown)
// never write to the log sink themselves: they hand each line to one background thread that
// does. A sink that is slow or hangs (an NLog file target on a share that stopped answering, a
// blocking network target) would otherwise set the pace of spooling (and with a hung sink stop
// it, so every event would be dropped from the full in-memory queue), stop deliveries, and hold
// the process's end. The lines wait in bounded queues; what does not fit is counted, and the
// count is written once the sink takes lines again.

using System;
using System.Collections.Generic;
using System.Threading;

namespace Jobhook.Forwarder
{
    /// <summary>A log whose lines are written by the log thread (<see cref="LogQueue"/>), never by the caller.</summary>
    internal sealed class QueuedLog : IForwarderLog
    {
        internal readonly IForwarderLog Sink;

        internal QueuedLog(IForwarderLog sink)
        {
            Sink = sink;
        }

        public void Debug(string message) { LogQueue.Add(Sink, LogQueue.Level.Debug, message); }
        public void Info(string message) { LogQueue.Add(Sink, LogQueue.Level.Info, message); }
        public void Warn(string message) { LogQueue.Add(Sink, LogQueue.Level.Warn, message); }
        public void Error(string message) { LogQueue.Add(Sink, LogQueue.Level.Error, message); }
    }

    /// <summary>The process-wide queue of log lines and the thread that writes them.</summary>
    internal static class LogQueue
    {
        /// <summary>
        /// Lines (Info, Warn, Error) that may wait for the sink: a healthy sink keeps this near
        /// empty, and what the forwarder logs besides per-event detail is a few lines a minute
        /// (counts are rate-limited by <see cref="Notices"/>), so 1,000 covers a sink stalled for
        /// many minutes; at some 300 bytes a line it is well under a megabyte.
        /// </summary>
        internal const int Capacity = 1000;

        /// <summary>
        /// Per-event detail lines (Debug, with DebugLog on) that may wait, apart from the others
        /// and written after them: a flood of detail behind a slow sink never pushes out, or
        /// holds back, a line an operator needs.
        /// </summary>
        internal const int DetailCapacity = 1000;

        internal enum Level { Debug, Info, Warn, Error }

        struct Line
        {
            public IForwarderLog Sink;
            public Level Level;
            public string Message;
        }

        /// <summary>Guards the queues and the fields below; never held while a line is written.</summary>
        static readonly object gate = new object();
        static readonly Queue<Line> lines = new Queue<Line>();
        static readonly Queue<Line> detail = new Queue<Line>();
        static Thread thread;
        /// <summary>The log thread is writing a line (for <see cref="Drain"/>).</summary>
        static bool writing;
        /// <summary>Lines dropped because their queue was full, since the last line saying so.</summary>
        static long dropped;
        /// <summary>The sink of the last line dropped, which the count is written to.</summary>
        static IForwarderLog droppedSink;

        /// <summary>`sink`, writing through the log thread (itself if it already does).</summary>
        internal static IForwarderLog Wrap(IForwarderLog sink)
        {
            return sink as QueuedLog ?? new QueuedLog(sink);
        }

        /// <summary>Queues one line for `sink`. Never waits for the sink and never throws.</summary>
        internal static void Add(IForwarderLog sink, Level level, string message)
        {
            if (sink == null)
                return;
            try
            {
                lock (gate)
                {
                    var queue = level == Level.Debug ? detail : lines;
                    if (queue.Count >= (level == Level.Debug ? DetailCapacity : Capacity))
                    {
                        dropped++;
                        droppedSink = sink;
                        return;
                    }
                    queue.Enqueue(new Line { Sink = sink, Level = level, Message = message });
                    if (thread == null)
                    {
                        // The shutdown's lines go through it too, and it waits for them (Drain).
                        var starting = ForwarderThreads.Start(Loop, "log", true);
                        // Only once it runs: a thread that could not start is tried again.
                        thread = starting;
                    }
                    Monitor.PulseAll(gate);
                }
            }
            catch
            {
                // A line that cannot be queued is only a line.
            }
        }

        /// <summary>
        /// Waits at most `wait` until every queued line is written (at the process's end);
        /// whether they were. Never throws.
        /// </summary>
        internal static bool Drain(TimeSpan wait)
        {
            var clock = System.Diagnostics.Stopwatch.StartNew();
            try
            {
                if (!Bounded.Enter(gate, wait))
                    return false;
                try
                {
                    while (lines.Count > 0 || detail.Count > 0 || writing || dropped > 0)
                    {
                        var left = wait - clock.Elapsed;
                        if (left <= TimeSpan.Zero || thread == null)
                            return false;
                        Monitor.Wait(gate, left);
                    }
                    return true;
                }
                finally
                {
                    Monitor.Exit(gate);
                }
            }
            catch
            {
                return false;
            }
        }

        static void Loop()
        {
            while (true)
            {
                try
                {
                    Line next;
                    long lost;
                    IForwarderLog lostSink;
                    lock (gate)
                    {
                        writing = false;
                        while (lines.Count == 0 && detail.Count == 0 && dropped == 0)
                        {
                            Monitor.PulseAll(gate); // a Drain waiting for this
                            Monitor.Wait(gate);
                        }
                        next = lines.Count > 0 ? lines.Dequeue() : detail.Count > 0 ? detail.Dequeue() : default(Line);
                        lost = next.Sink == null ? dropped : 0;
                        lostSink = droppedSink;
                        if (lost > 0)
                        {
                            dropped = 0;
                            droppedSink = null;
                        }
                        writing = true;
                    }
                    if (next.Sink != null)
                        Write(next.Sink, next.Level, next.Message);
                    else
                        Write(lostSink, Level.Warn, "the log sink was too slow: " + lost
                                                    + " line(s) of this forwarder's log were dropped");
                }
                catch (ThreadAbortException)
                {
                    throw; // the process or app domain is going away (iisreset): not an error
                }
                catch
                {
                    // Keep writing whatever happens; a line lost here is only a line.
                }
            }
        }

        static void Write(IForwarderLog sink, Level level, string message)
        {
            try
            {
                switch (level)
                {
                    case Level.Debug: sink.Debug(message); break;
                    case Level.Info: sink.Info(message); break;
                    case Level.Warn: sink.Warn(message); break;
                    default: sink.Error(message); break;
                }
            }
            catch
            {
                // IForwarderLog must not throw; a sink that does loses only this line.
            }
        }
    }
}
