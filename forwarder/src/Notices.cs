// Counting instead of logging where waiting is not allowed. RunHandler runs on Keyfactor's
// thread, and the intake thread feeds every registration: neither may wait for a log sink (an
// NLog file target on a hung share, a blocking network target, a full event log), because a
// slow sink would then slow every orchestrator check-in. What happens per event on those paths
// is counted here, and one background thread reports the counts, at most once per
// ReportInterval for each.

using System;
using System.Collections.Generic;
using System.Threading;

namespace Jobhook.Forwarder
{
    /// <summary>
    /// A per-event happening (a dropped or refused event) that is counted where it happens and
    /// logged by the notices thread: the first one promptly, then at most one line per
    /// <see cref="Notices.ReportInterval"/> with the count since the previous line.
    /// </summary>
    public sealed class RateLimitedCount
    {
        readonly string description;
        readonly IForwarderLog log;
        long total;
        long reported;
        /// <summary>What the last counted event was (a job id), for the report; may lag a little.</summary>
        volatile string lastDetail;

        /// <summary>
        /// A count that reports as "`description`: N since the last report, T since start".
        /// `log` null means the process-wide log at the time of the report. Registers itself
        /// with the notices thread for the life of the process; make one per kind (and per
        /// runtime), never one per event.
        /// </summary>
        public RateLimitedCount(string description, IForwarderLog log = null)
        {
            this.description = description;
            this.log = log;
            Notices.Register(this);
        }

        /// <summary>How many were counted since the process started.</summary>
        public long Total
        {
            get { return Interlocked.Read(ref total); }
        }

        /// <summary>
        /// Counts one. Never blocks and never logs: safe on Keyfactor's thread. `detail` (what
        /// the event was, e.g. its job id) goes into the next report.
        /// </summary>
        public long Add(string detail)
        {
            lastDetail = detail;
            var now = Interlocked.Increment(ref total);
            // Wake the reporter only for the first count since its last report: a flood of
            // drops costs one Set, not one per event.
            if (now == Interlocked.Read(ref reported) + 1)
                Notices.Wake();
            return now;
        }

        /// <summary>Logs what was counted since the last report, if anything. Notices thread only.</summary>
        internal void Report()
        {
            var now = Interlocked.Read(ref total);
            var before = Interlocked.Read(ref reported);
            if (now == before)
                return;
            Interlocked.Exchange(ref reported, now);
            var detail = lastDetail;
            (log ?? ForwarderLog.Current).Warn(description + ": " + (now - before) + " since the last report, " + now + " since start"
                                               + (detail != null ? " (the last: " + detail + ")" : ""));
        }
    }

    /// <summary>The process-wide thread that reports every <see cref="RateLimitedCount"/>.</summary>
    public static class Notices
    {
        /// <summary>
        /// Shortest time between two reports: the first count is logged within a second or so,
        /// and a lasting condition (a disk that stays slow, a flood of oversized events) costs
        /// one line a minute, not one per event.
        /// </summary>
        public static readonly TimeSpan ReportInterval = TimeSpan.FromMinutes(1);

        static readonly object gate = new object();
        static readonly List<RateLimitedCount> counts = new List<RateLimitedCount>();
        static readonly AutoResetEvent wake = new AutoResetEvent(false);
        /// <summary>One report at a time (the thread's, or the one at shutdown).</summary>
        static readonly object reportGate = new object();
        static Thread thread;

        internal static void Register(RateLimitedCount count)
        {
            lock (gate)
            {
                counts.Add(count);
                if (thread != null)
                    return;
                thread = new Thread(Loop) { IsBackground = true, Name = "jobhook-forwarder notices" };
                thread.Start();
            }
        }

        /// <summary>Asks for a report soon (still at most one per interval). Never blocks.</summary>
        internal static void Wake()
        {
            wake.Set();
        }

        /// <summary>Reports every count now, ignoring the interval (at shutdown). Never throws.</summary>
        internal static void ReportNow()
        {
            RateLimitedCount[] all;
            lock (gate)
                all = counts.ToArray();
            lock (reportGate)
            {
                foreach (var count in all)
                {
                    try { count.Report(); } catch { }
                }
            }
        }

        static void Loop()
        {
            var last = DateTime.MinValue;
            while (true)
            {
                try
                {
                    wake.WaitOne(ReportInterval);
                    var wait = last + ReportInterval - DateTime.UtcNow;
                    if (wait > TimeSpan.Zero)
                        Thread.Sleep(wait);
                    last = DateTime.UtcNow;
                    ReportNow();
                }
                catch (ThreadAbortException)
                {
                    throw; // the process or app domain is going away (iisreset): not an error
                }
                catch
                {
                    // Keep reporting whatever happens; a line lost here is only a line.
                }
            }
        }
    }
}
