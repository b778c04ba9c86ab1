// Counting instead of logging where waiting is not allowed. RunHandler runs on Keyfactor's
// thread, and the intake thread feeds every registration: neither may wait for a log sink (an
// NLog file target on a hung share, a blocking network target, a full event log), because a
// slow sink would then slow every orchestrator check-in. What happens per event on those paths
// is counted here, and one background thread reports the counts: each one's first count at
// once, then at most once per ReportInterval for each.

using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Threading;

namespace Jobhook.Forwarder
{
    /// <summary>
    /// A per-event happening (a dropped or refused event) that is counted where it happens and
    /// logged by the notices thread: the first one promptly, then at most one line per
    /// <see cref="Notices.ReportInterval"/> with the count since the previous line.
    /// </summary>
    public sealed class RateLimitedCount : INotice
    {
        readonly string description;
        readonly IForwarderLog log;
        readonly NoticeLevel level;
        long total;
        long reported;
        /// <summary>
        /// When this count was last reported, in Stopwatch ticks (monotonic: setting the clock
        /// back must not silence the reports); meaningful once <see cref="everReported"/>.
        /// Notices thread only.
        /// </summary>
        long lastReport;
        /// <summary>Whether this count was ever reported (notices thread only).</summary>
        bool everReported;
        /// <summary>What the last counted event was (a job id), for the report; may lag a little.</summary>
        volatile string lastDetail;

        /// <summary>
        /// A count that reports as "`description`: N since the last report, T since start".
        /// `log` null means the process-wide log at the time of the report; `error` reports at
        /// Error level instead of Warn. Registers itself with the notices thread for the life
        /// of the process; make one per kind (and per runtime), never one per event.
        /// </summary>
        public RateLimitedCount(string description, IForwarderLog log = null, bool error = false)
            : this(description, log, error ? NoticeLevel.Error : NoticeLevel.Warn)
        {
        }

        /// <summary>A count like the other constructor's, reported at `level` (Info for good news counted the same way).</summary>
        public RateLimitedCount(string description, IForwarderLog log, NoticeLevel level)
        {
            this.description = description;
            this.log = log;
            this.level = level;
            Notices.Register(this);
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
            // drops costs one Set, not one per event. A reporter that could not start is tried
            // again on every count (at most once per ForwarderThreads.RetryInterval).
            if (now == Interlocked.Read(ref reported) + 1)
                Notices.Wake();
            else
                Notices.EnsureStarted();
            return now;
        }

        /// <summary>
        /// Logs what was counted since the last report, if anything and if this count's last
        /// report is at least <see cref="Notices.ReportInterval"/> before `clock`, Stopwatch
        /// ticks (always, with `force`). Returns how long until what is left unreported may be
        /// reported, or null if nothing is left. Notices thread (or shutdown) only, under the
        /// report lock.
        /// </summary>
        public TimeSpan? Report(long clock, bool force)
        {
            var now = Interlocked.Read(ref total);
            var before = Interlocked.Read(ref reported);
            if (now == before)
                return null;
            var dueTicks = lastReport + (long)(Notices.ReportInterval.TotalSeconds * Stopwatch.Frequency) - clock;
            if (!force && everReported && dueTicks > 0)
                return TimeSpan.FromSeconds((double)dueTicks / Stopwatch.Frequency);
            everReported = true;
            Interlocked.Exchange(ref reported, now);
            lastReport = clock;
            var detail = lastDetail;
            // Details are outside text (an exception, an engine's message): made printable here,
            // on the reporting thread, so that Add stays cheap on the threads that count.
            var line = description + ": " + (now - before) + " since the last report, " + now + " since start"
                       + (detail != null ? " (the last: " + LogText.Printable(detail) + ")" : "");
            var target = LogQueue.Wrap(log ?? ForwarderLog.Current);
            if (level == NoticeLevel.Info)
                target.Info(line);
            else if (level == NoticeLevel.Error)
                target.Error(line);
            else
                target.Warn(line);
            return null;
        }
    }

    /// <summary>The level a <see cref="RateLimitedCount"/> reports at.</summary>
    public enum NoticeLevel { Info, Warn, Error }

    /// <summary>Something the notices thread reports when it is due (<see cref="RateLimitedCount"/>, <see cref="OutageNotice"/>).</summary>
    public interface INotice
    {
        /// <summary>
        /// Logs what is due at `clock` (Stopwatch ticks), everything left with `force`; returns
        /// how long until what is left may be logged, or null if nothing is left. Notices
        /// thread (or shutdown) only, under the report lock.
        /// </summary>
        TimeSpan? Report(long clock, bool force);
    }

    /// <summary>
    /// The lines about something that fails and recovers (the engine for the sender, the spool
    /// for the writer), at most one of each kind per <see cref="Notices.ReportInterval"/>
    /// however often it flaps: the first failure of an outage is logged at once unless another
    /// outage's first failure was logged less than an interval ago; a failure that goes on is
    /// logged again once per interval with its count; a recovery is logged at once unless
    /// another was logged less than an interval ago, else the notices thread logs it when the
    /// interval is over, with how many outages came and went meanwhile. Thread-safe; logs
    /// through the given log (the log thread's: never waits for the sink).
    /// </summary>
    public sealed class OutageNotice : INotice
    {
        readonly IForwarderLog log;
        /// <summary>Failure lines at Error level, else Warn (recoveries are Info).</summary>
        readonly bool error;
        readonly object gate = new object();
        /// <summary>Failures since the last success (0: healthy).</summary>
        long inRow;
        /// <summary>When a failure line was last logged (Stopwatch ticks), once one was.</summary>
        long lastFailureLine;
        bool failureLogged;
        /// <summary>Outages whose first failure was not logged since the last failure line, and whether the current one is among them.</summary>
        long quietStarts;
        bool currentQuiet;
        /// <summary>When a recovery line was last logged (Stopwatch ticks), once one was.</summary>
        long lastRecoveryLine;
        bool recoveryLogged;
        /// <summary>The latest recovery not logged yet (null: none), and the outages and failures that ended without a line before it.</summary>
        string pendingRecovery;
        /// <summary>The failures of <see cref="pendingRecovery"/>'s outage.</summary>
        long pendingFailures;
        long quietEnds;
        long quietEndFailures;

        public OutageNotice(IForwarderLog log, bool error)
        {
            this.log = log;
            this.error = error;
            Notices.Register(this);
        }

        static long IntervalTicks
        {
            get { return (long)(Notices.ReportInterval.TotalSeconds * Stopwatch.Frequency); }
        }

        /// <summary>
        /// One more failure. `line` makes the failure line from the failures in a row; it is
        /// called only when a line is due. Null counts the failure without a line, for failures
        /// another count reports with their details. Returns the failures in a row.
        /// </summary>
        public long Failed(Func<long, string> line)
        {
            string text = null;
            long count;
            lock (gate)
            {
                var now = Stopwatch.GetTimestamp();
                count = ++inRow;
                if (count == 1)
                {
                    currentQuiet = failureLogged && now - lastFailureLine < IntervalTicks;
                    if (currentQuiet)
                        quietStarts++;
                }
                if (line != null && (!failureLogged || now - lastFailureLine >= IntervalTicks))
                {
                    // The outage under way, when its start was not logged, is not another one.
                    var others = quietStarts - (currentQuiet ? 1 : 0);
                    text = line(count) + (others > 0 ? " (" + others + " other outage(s) began since the previous such line)" : "");
                    failureLogged = true;
                    lastFailureLine = now;
                    quietStarts = 0;
                    currentQuiet = false;
                }
            }
            if (text != null)
            {
                if (error)
                    log.Error(text);
                else
                    log.Warn(text);
            }
            return count;
        }

        /// <summary>A success: if it ends an outage, `line` (given the failures it had) is logged now or later.</summary>
        public void Recovered(Func<long, string> line)
        {
            string text = null;
            bool wake = false;
            lock (gate)
            {
                if (inRow == 0)
                    return;
                var failures = inRow;
                inRow = 0;
                currentQuiet = false;
                var now = Stopwatch.GetTimestamp();
                // A recovery still waiting for the notices thread is one of those that came and
                // went, whether this one is logged now or waits in its place.
                bool waiting = pendingRecovery != null;
                if (waiting)
                {
                    quietEnds++;
                    quietEndFailures += pendingFailures;
                }
                if (!recoveryLogged || now - lastRecoveryLine >= IntervalTicks)
                {
                    text = line(failures) + Meanwhile();
                    Logged(now);
                }
                else
                {
                    wake = !waiting; // the notices thread already waits for the one before
                    pendingRecovery = line(failures);
                    pendingFailures = failures;
                }
            }
            if (text != null)
                log.Info(text);
            if (wake)
                Notices.Wake();
        }

        /// <summary>What ended without a line since the previous recovery line, for the next one. Under <see cref="gate"/>.</summary>
        string Meanwhile()
        {
            if (quietEnds == 0)
                return "";
            return " (" + quietEnds + " other outage(s) with " + quietEndFailures + " failure(s) came and went since the previous such line)";
        }

        /// <summary>A recovery line was logged at `now`. Under <see cref="gate"/>.</summary>
        void Logged(long now)
        {
            recoveryLogged = true;
            lastRecoveryLine = now;
            quietEnds = 0;
            quietEndFailures = 0;
            pendingRecovery = null;
            pendingFailures = 0;
        }

        public TimeSpan? Report(long clock, bool force)
        {
            string text;
            lock (gate)
            {
                if (pendingRecovery == null)
                    return null;
                var due = lastRecoveryLine + IntervalTicks - clock;
                if (!force && due > 0)
                    return TimeSpan.FromSeconds((double)due / Stopwatch.Frequency);
                text = pendingRecovery + Meanwhile() + (inRow > 0 ? "; failing again now (" + inRow + " failure(s) in a row)" : "");
                Logged(clock);
            }
            log.Info(text);
            return null;
        }
    }

    /// <summary>The process-wide thread that reports every <see cref="RateLimitedCount"/> and <see cref="OutageNotice"/>.</summary>
    public static class Notices
    {
        /// <summary>
        /// Shortest time between two reports of one count: its first count is logged at once,
        /// and a lasting condition (a disk that stays slow, a flood of oversized events) costs
        /// one line a minute, not one per event.
        /// </summary>
        public static readonly TimeSpan ReportInterval = TimeSpan.FromMinutes(1);

        static readonly object gate = new object();
        static readonly List<INotice> counts = new List<INotice>();
        static readonly AutoResetEvent wake = new AutoResetEvent(false);
        /// <summary>One report at a time (the thread's, or the one at shutdown).</summary>
        static readonly object reportGate = new object();
        /// <summary>The notices thread, once it has started (under <see cref="gate"/>).</summary>
        static volatile Thread thread;
        /// <summary>Failed starts since the last one that succeeded (under <see cref="gate"/>).</summary>
        static int failedStarts;
        /// <summary>When the last start failed, in Stopwatch ticks (under <see cref="gate"/>).</summary>
        static long lastFailedStart;

        /// <summary>
        /// Adds a count to those reported. Starts no thread: counts are made in type
        /// initialisers (Intake's), and a thread that failed to start there would break that
        /// type, and so RunHandler, for the life of the process.
        /// </summary>
        internal static void Register(INotice count)
        {
            lock (gate)
                counts.Add(count);
        }

        /// <summary>Asks for a report now (still at most one per interval and count). Never blocks.</summary>
        internal static void Wake()
        {
            EnsureStarted();
            wake.Set();
        }

        /// <summary>
        /// Starts the notices thread unless it runs, or its last start failed less than
        /// <see cref="ForwarderThreads.RetryInterval"/> ago. A failed start is logged (through
        /// the log thread, never waiting for the sink) the first time, and the start that
        /// follows it once. Never throws.
        /// </summary>
        internal static void EnsureStarted()
        {
            // At the process's end the shutdown reports every count itself (ReportNow).
            if (thread != null || ForwarderThreads.ProcessEnding)
                return;
            string failure = null;
            int failed = 0;
            try
            {
                lock (gate)
                {
                    if (thread != null || (failedStarts > 0 && !ForwarderThreads.RetryDue(lastFailedStart)))
                        return;
                    try
                    {
                        thread = ForwarderThreads.Start(Loop, "notices");
                        failed = failedStarts;
                        failedStarts = 0;
                    }
                    catch (Exception e)
                    {
                        failed = ++failedStarts;
                        lastFailedStart = Stopwatch.GetTimestamp();
                        failure = e.GetType().Name + ": " + e.Message;
                    }
                }
                var log = LogQueue.Wrap(ForwarderLog.Current);
                if (failure != null && failed == 1)
                    log.Error("the notices thread could not start (" + LogText.Printable(failure) + "); dropped and refused events are counted"
                              + " and reported once it runs (tried again at the next count, at most once every "
                              + ForwarderThreads.RetryInterval.TotalSeconds + " s)");
                else if (failure == null && failed > 0)
                    log.Info("the notices thread started after " + failed + " failed attempt(s)");
            }
            catch
            {
                // Tried again at the next count.
            }
        }

        /// <summary>
        /// Reports every count now, ignoring the interval, for the process's end (never throws):
        /// waits at most `wait` for the locks another thread may hold, and reports nothing
        /// rather than wait longer. At exit that
        /// thread may be stopped in the middle of its own report (holding the lock, its log
        /// sink slow or the runtime suspending it), and an exit that waits for it never ends.
        /// </summary>
        internal static void ReportNow(TimeSpan wait)
        {
            var clock = System.Diagnostics.Stopwatch.StartNew();
            INotice[] all;
            if (!Bounded.Enter(gate, wait - clock.Elapsed))
                return;
            try { all = counts.ToArray(); }
            finally { Monitor.Exit(gate); }
            if (!Bounded.Enter(reportGate, wait - clock.Elapsed))
                return;
            try
            {
                var now = Stopwatch.GetTimestamp();
                foreach (var count in all)
                {
                    try { count.Report(now, true); } catch { }
                }
            }
            finally { Monitor.Exit(reportGate); }
        }

        /// <summary>
        /// Reports every count that is due; returns how long until the next one that waits is
        /// due, or <see cref="ReportInterval"/> if none waits.
        /// </summary>
        static TimeSpan ReportDue()
        {
            INotice[] all;
            lock (gate)
                all = counts.ToArray();
            var next = ReportInterval;
            lock (reportGate)
            {
                var clock = Stopwatch.GetTimestamp();
                foreach (var count in all)
                {
                    try
                    {
                        var due = count.Report(clock, false);
                        if (due.HasValue && due.Value < next)
                            next = due.Value;
                    }
                    catch
                    {
                    }
                }
            }
            return next;
        }

        static void Loop()
        {
            var next = ReportInterval;
            while (true)
            {
                try
                {
                    wake.WaitOne(next);
                    next = ReportDue();
                    // Never spin: a count due in under a few milliseconds waits that long.
                    if (next < TimeSpan.FromMilliseconds(10))
                        next = TimeSpan.FromMilliseconds(10);
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

    /// <summary>
    /// Locks taken on the way out of the process: none may wait longer than the shutdown's
    /// deadline, whatever holds it.
    /// </summary>
    internal static class Bounded
    {
        /// <summary>Takes `gate` within `wait` (none if it is not positive); whether it did.</summary>
        internal static bool Enter(object gate, TimeSpan wait)
        {
            bool taken = false;
            Monitor.TryEnter(gate, wait > TimeSpan.Zero ? wait : TimeSpan.Zero, ref taken);
            return taken;
        }
    }
}
