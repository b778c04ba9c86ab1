// The only forwarder code that runs on Keyfactor's thread besides RunHandler itself: copy the
// context's fields and queue them. Everything that costs time the first time it runs (settings
// parsing, starting the spool and the sender, JIT compilation of the serialiser, loading culture
// data for number and date formatting) happens on the intake thread, so even the first call after
// an iisreset stays far inside the RunHandler budget.

using System;
using System.Collections.Generic;
using System.Threading;
using Keyfactor.Platform.Extensions;

namespace Jobhook.Forwarder
{
    /// <summary>
    /// The eleven fields of a context, copied when RunHandler is called: Keyfactor owns the
    /// context object and may reuse it once RunHandler has returned. `Client` is not copied.
    /// </summary>
    public sealed class ContextSnapshot
    {
        public readonly Guid AgentId;
        public readonly string Username;
        public readonly string ClientMachine;
        public readonly Guid JobId;
        public readonly string JobType;
        public readonly Guid JobTypeId;
        public readonly int? CertificateId;
        public readonly DateTime? RequestTimestamp;
        public readonly int CurrentRetryCount;

        /// <summary>
        /// Copies the fields. The enums are kept boxed and resolved to number and name later, on
        /// the intake thread, because Enum.ToString is slow the first time.
        /// </summary>
        public ContextSnapshot(OrchestratorJobCompleteHandlerContext context)
        {
            AgentId = context.AgentId;
            Username = context.Username;
            ClientMachine = context.ClientMachine;
            jobResult = context.JobResult;
            JobId = context.JobId;
            JobType = context.JobType;
            JobTypeId = context.JobTypeId;
            operationType = context.OperationType;
            CertificateId = context.CertificateId;
            RequestTimestamp = context.RequestTimestamp;
            CurrentRetryCount = context.CurrentRetryCount;
            Chars = (long)(Username == null ? 0 : Username.Length) + (ClientMachine == null ? 0 : ClientMachine.Length)
                    + (JobType == null ? 0 : JobType.Length);
            Longest("Username", Username, ref LongestField, ref LongestChars);
            Longest("ClientMachine", ClientMachine, ref LongestField, ref LongestChars);
            Longest("JobType", JobType, ref LongestField, ref LongestChars);
        }

        static void Longest(string field, string value, ref string longestField, ref int longestChars)
        {
            if (value != null && value.Length > longestChars)
            {
                longestField = field;
                longestChars = value.Length;
            }
        }

        /// <summary>
        /// The longest string field (its name in the body) and its UTF-16 characters, a lower
        /// bound of its UTF-8 bytes: a field of more characters than the engine takes bytes in
        /// one (<see cref="ContextJson.MaxStringFieldBytes"/>) is known to be too long without
        /// encoding it, cheaply enough for RunHandler. Null and 0 without strings.
        /// </summary>
        public readonly string LongestField;
        public readonly int LongestChars;

        /// <summary>
        /// UTF-16 characters of the strings: what the copy holds in memory, and a lower bound
        /// of its JSON body's bytes (no character is less than one byte of UTF-8, and escaping
        /// only adds), so a context whose strings alone are over the engine's limit is known
        /// to be too large without serialising it.
        /// </summary>
        public readonly long Chars;

        /// <summary>The string fields by their names in the body (Keyfactor's), in the body's order.</summary>
        public KeyValuePair<string, string>[] Strings()
        {
            return new[]
            {
                new KeyValuePair<string, string>("Username", Username),
                new KeyValuePair<string, string>("ClientMachine", ClientMachine),
                new KeyValuePair<string, string>("JobType", JobType),
            };
        }

        /// <summary>JobResult and OperationType, boxed (see the constructor).</summary>
        readonly object jobResult;
        readonly object operationType;

        /// <summary>Keyfactor's number and .NET name of JobResult.</summary>
        public void JobResultValue(out long number, out string name)
        {
            EnumValue(jobResult, out number, out name);
        }

        /// <summary>Keyfactor's number and .NET name of OperationType.</summary>
        public void OperationTypeValue(out long number, out string name)
        {
            EnumValue(operationType, out number, out name);
        }

        static void EnumValue(object value, out long number, out string name)
        {
            number = Convert.ToInt64(value, System.Globalization.CultureInfo.InvariantCulture);
            name = value.ToString();
        }
    }

    /// <summary>
    /// The hand-over from Keyfactor's threads to the forwarder's: a bounded queue and one
    /// process-wide thread that serialises each event and gives it to its registration's runtime.
    /// Neither <see cref="Submit"/> nor that thread logs per event: drops are counted
    /// (<see cref="RateLimitedCount"/>) and reported by a background thread.
    /// </summary>
    public static class Intake
    {
        /// <summary>
        /// Most events waiting for the intake thread. It keeps up with thousands per second; this
        /// only fills if that thread is starved for a long time, and bounds memory if it is.
        /// </summary>
        public const int Capacity = 10000;

        /// <summary>
        /// Longest the process or app domain is kept from ending while events accepted by
        /// RunHandler but not yet on disk are written to the spool (<see cref="Shutdown"/>).
        /// Writing without a flush per file takes well under a millisecond an event, so 5 s
        /// covers full in-memory queues on a healthy disk; it is far inside IIS's
        /// shutdownTimeLimit (90 s by default), so the flush never gets a recycling worker
        /// killed, and a failing disk delays a recycle by 5 s at most. (.NET Framework may end
        /// ProcessExit handlers after about 2 s on its own; whatever is renamed into place by
        /// then is kept, and a cut never leaves half an event.)
        /// </summary>
        public static readonly TimeSpan ShutdownDeadline = TimeSpan.FromSeconds(5);

        /// <summary>
        /// How long the last report of the counts may wait for its locks past the deadline: a
        /// moment, for the notices thread to finish a line it is writing.
        /// </summary>
        static readonly TimeSpan NoticeGrace = TimeSpan.FromMilliseconds(500);

        /// <summary>
        /// Longest a ProcessExit or DomainUnload handler waits for <see cref="Shutdown"/>, which
        /// runs on a thread of its own: the deadline and the grace of the last report. The
        /// locks on that path are bounded, but a log line or a file write is not: a log sink or
        /// a spool disk that hangs (a file target or the spool on a share that stopped
        /// answering) would otherwise hold the process's end until IIS kills the worker
        /// (shutdownTimeLimit, 90 s by default), and with it an app pool recycle. What that
        /// thread has not done by then is abandoned with the process; a cut write leaves no
        /// half event (temporary file, then rename).
        /// </summary>
        public static readonly TimeSpan ShutdownWait = ShutdownDeadline + NoticeGrace;

        /// <summary>
        /// Longest the shutdown waits for the event the intake thread holds (it is passing it to
        /// a runtime, which takes microseconds unless that thread is held elsewhere); past it
        /// the event is counted as lost.
        /// </summary>
        static readonly TimeSpan InFlightWait = TimeSpan.FromSeconds(1);

        sealed class Pending
        {
            public JobhookForwarder Handler;
            public ContextSnapshot Context;
            /// <summary>What it holds in memory (<see cref="ForwarderSettings.MemoryBytes"/>).</summary>
            public long Size;
        }

        static readonly object gate = new object();
        static readonly Queue<Pending> queue = new Queue<Pending>();
        /// <summary>What the events in <see cref="queue"/> hold in memory (under <see cref="gate"/>).</summary>
        static long queuedBytes;
        static readonly AutoResetEvent signal = new AutoResetEvent(false);
        /// <summary>The intake thread, once it has started (under <see cref="gate"/>).</summary>
        static Thread thread;
        /// <summary>Whether the last start of the intake thread failed, and when (Stopwatch ticks).</summary>
        static bool startFailed;
        static long lastFailedStart;
        /// <summary>Whether the shutdown handlers are in place (under <see cref="gate"/>).</summary>
        static bool shutdownHooked;
        /// <summary>1 while the intake thread holds an event it has taken from the queue.</summary>
        static int inFlight;
        /// <summary>The handler of that event (under <see cref="gate"/>).</summary>
        static JobhookForwarder inFlightHandler;
        /// <summary>
        /// Test hook: while set and not signalled, the intake thread holds the event it has just
        /// taken, as a registration's slow start-up would (a spool on a slow share), so that a
        /// test can look at the queue behind it. Set only by the test harness, through
        /// reflection; no setting reaches it.
        /// </summary>
        static ManualResetEvent holdForTest = null;
        /// <summary>
        /// Held by the intake thread while it puts an event into its runtime's queue and lets go
        /// of it, and by <see cref="JobhookForwarder.PendingEvents"/> while it counts both: a
        /// count sees each event either here or in the runtime, never in both or in neither.
        /// Never taken on RunHandler's path, nor at shutdown.
        /// </summary>
        internal static readonly object HandOver = new object();
        /// <summary>Set once shutdown began: RunHandler takes no more events.</summary>
        static volatile bool stopping;
        /// <summary>1 once a shutdown handler ran (ProcessExit and DomainUnload may both come).</summary>
        static int shutDown;

        /// <summary>Events dropped because this queue was full.</summary>
        internal static readonly RateLimitedCount QueueFull = new RateLimitedCount(
            "the intake queue was full (" + Capacity + " events or " + ForwarderSettings.MaxQueuedBytes / (1024 * 1024)
            + " MiB: the forwarder's intake thread is starved or not running); dropped the oldest waiting event(s)");
        /// <summary>Events handed to RunHandler after shutdown began.</summary>
        internal static readonly RateLimitedCount AfterShutdown = new RateLimitedCount(
            "RunHandler was called after the process began to shut down; the event(s) were not taken");
        /// <summary>RunHandler calls without a context.</summary>
        internal static readonly RateLimitedCount NoContext = new RateLimitedCount(
            "RunHandler was called without a context; nothing to forward");
        /// <summary>Failed starts of the intake thread: its events wait in its queue meanwhile.</summary>
        internal static readonly RateLimitedCount NotStarted = new RateLimitedCount(
            "the intake thread could not start; events wait in its queue (tried again at the next event, at most once every "
            + ForwarderThreads.RetryInterval.TotalSeconds + " s)", null, true);
        /// <summary>Events the intake thread could not pass on (an exception caught).</summary>
        internal static readonly RateLimitedCount IntakeFailed = new RateLimitedCount(
            "intake: event(s) could not be queued and are lost");
        /// <summary>Events whose body is over the engine's limit (<see cref="ContextJson.MaxBodyBytes"/>).</summary>
        internal static readonly RateLimitedCount TooLarge = new RateLimitedCount(
            "event(s) refused because their JSON body is over the engine's limit of " + ContextJson.MaxBodyBytes
            + " bytes (the engine would refuse them; not spooled)");

        /// <summary>
        /// Events with a string field over the engine's limit (<see cref="ContextJson.MaxStringFieldBytes"/>),
        /// counted as too large too.
        /// </summary>
        internal static readonly RateLimitedCount FieldTooLong = new RateLimitedCount(
            "event(s) refused because a string field (Username, ClientMachine or JobType, as Keyfactor gave it) is over the engine's limit of "
            + ContextJson.MaxStringFieldBytes + " bytes of UTF-8 (the engine would refuse them; not spooled)");

        /// <summary>Events not yet passed on to a runtime (queued, or being serialised), for every registration.</summary>
        public static int Count
        {
            get { lock (gate) return queue.Count + inFlight; }
        }

        /// <summary>
        /// Events not yet passed on (queued, or being serialised) whose registration feeds
        /// `runtime`: the share of <see cref="Count"/> that is that runtime's, so that summing
        /// over registrations counts each event once. The queue is copied under the lock and
        /// looked at outside it; no runtime is started here. Not for RunHandler's path.
        /// </summary>
        internal static int CountFor(ForwarderRuntime runtime)
        {
            Pending[] waiting;
            JobhookForwarder held;
            lock (gate)
            {
                waiting = queue.ToArray();
                held = inFlight != 0 ? inFlightHandler : null;
            }
            // Unity may make a handler object per event; each is looked at once.
            var decided = new Dictionary<JobhookForwarder, bool>();
            int count = 0;
            foreach (var pending in waiting)
                if (Feeds(pending.Handler, runtime, decided))
                    count++;
            if (held != null && Feeds(held, runtime, decided))
                count++;
            return count;
        }

        static bool Feeds(JobhookForwarder handler, ForwarderRuntime runtime, Dictionary<JobhookForwarder, bool> decided)
        {
            bool feeds;
            if (!decided.TryGetValue(handler, out feeds))
            {
                feeds = handler.Feeds(runtime);
                decided[handler] = feeds;
            }
            return feeds;
        }

        /// <summary>
        /// Queues one event and returns at once. Never throws and never logs: for a full queue
        /// (in events or bytes) the oldest waiting events are dropped and counted; an event
        /// whose strings alone are over the engine's body limit is counted as too large and
        /// not queued.
        /// </summary>
        public static void Submit(JobhookForwarder handler, ContextSnapshot context)
        {
            if (context.Chars > ContextJson.MaxBodyBytes || context.LongestChars > ContextJson.MaxStringFieldBytes)
            {
                // Known to be refused without serialising it (see ContextSnapshot.Chars and
                // LongestChars): it would only take the room of events that can be delivered.
                var known = handler.StartedRuntime;
                if (known != null)
                    Interlocked.Increment(ref known.Counters.TooLarge);
                if (context.Chars > ContextJson.MaxBodyBytes)
                    TooLarge.Add("job " + context.JobId.ToString("D"));
                else
                    FieldTooLong.Add("job " + context.JobId.ToString("D") + ": " + context.LongestField + " is " + context.LongestChars
                                     + " characters, so over " + ContextJson.MaxStringFieldBytes + " bytes");
                return;
            }
            var pending = new Pending { Handler = handler, Context = context, Size = ForwarderSettings.MemoryBytes(context.Chars) };
            Pending oldest = null;
            int drops = 0;
            string failure = null;
            lock (gate)
            {
                // Under the lock the shutdown collects the queue with: an event is either taken
                // before it, and so written by it, or counted as refused.
                if (stopping)
                {
                    AfterShutdown.Add("job " + context.JobId.ToString("D"));
                    return;
                }
                failure = StartLocked();
                queue.Enqueue(pending);
                queuedBytes += pending.Size;
                // Bounded in events and in bytes; the event just queued always stays.
                while (queue.Count > 1 && (queue.Count > Capacity || queuedBytes > ForwarderSettings.MaxQueuedBytes))
                {
                    oldest = queue.Dequeue();
                    queuedBytes -= oldest.Size;
                    drops++;
                    // In its registration's counters too, if it has a runtime yet: accepted
                    // and dropped there, as if it had reached the runtime's own queue, so that
                    // every event those counters know of is spooled or dropped, once.
                    var known = oldest.Handler.StartedRuntime;
                    if (known != null)
                    {
                        Interlocked.Increment(ref known.Counters.Accepted);
                        Interlocked.Increment(ref known.Counters.Dropped);
                    }
                }
            }
            signal.Set();
            if (failure != null)
                NotStarted.Add(failure);
            for (int i = 0; i < drops; i++)
                QueueFull.Add("job " + oldest.Context.JobId.ToString("D"));
        }

        /// <summary>
        /// Starts the intake thread if it is not running (once per process; a start that failed
        /// is tried again here and by the next event) and the notices thread. Never throws.
        /// </summary>
        public static void Start()
        {
            string failure;
            lock (gate)
                failure = StartLocked();
            if (failure != null)
                NotStarted.Add(failure);
            Notices.EnsureStarted();
        }

        /// <summary>
        /// Starts the intake thread unless it runs or its last start failed less than
        /// <see cref="ForwarderThreads.RetryInterval"/> ago. The thread is kept only once it has
        /// started, so a failed start is tried again. Returns why it could not start (for the
        /// caller to count, outside the lock), or null. Never throws.
        /// </summary>
        static string StartLocked()
        {
            // Once the process is ending, the shutdown passes on what is queued itself.
            if (thread != null || ForwarderThreads.ProcessEnding || (startFailed && !ForwarderThreads.RetryDue(lastFailedStart)))
                return null;
            if (!shutdownHooked)
            {
                shutdownHooked = true;
                // Events in memory are written to the spool when the process or app domain
                // ends normally (iisreset, app pool recycle, service stop); only a crash loses
                // them. Also the events of an intake thread that never started.
                try
                {
                    AppDomain.CurrentDomain.ProcessExit += OnShutdown;
                    AppDomain.CurrentDomain.DomainUnload += OnShutdown;
                }
                catch
                {
                    // A host that forbids it: events in memory are lost at exit, as before.
                }
            }
            try
            {
                thread = ForwarderThreads.Start(Loop, "intake");
                startFailed = false;
                return null;
            }
            catch (Exception e)
            {
                startFailed = true;
                lastFailedStart = System.Diagnostics.Stopwatch.GetTimestamp();
                return e.GetType().Name + ": " + e.Message;
            }
        }

        static void OnShutdown(object sender, EventArgs e)
        {
            try
            {
                var done = new ManualResetEvent(false);
                ForwarderThreads.BeginProcessEnd();
                ForwarderThreads.Start(() =>
                {
                    try { Shutdown(ShutdownDeadline); }
                    catch { }
                    // Never disposed: a thread abandoned past the wait may still set it.
                    finally { try { done.Set(); } catch { } }
                }, "shutdown", true);
                done.WaitOne(ShutdownWait);
            }
            catch
            {
                // A host that lets no thread start here: shut down on this one (a no-op if the
                // thread did start); its locks are still bounded. Nothing may escape into the
                // runtime's shutdown.
                try { Shutdown(ShutdownDeadline); } catch { }
            }
        }

        /// <summary>
        /// Stops taking events and writes every event accepted so far to the spool, within
        /// `deadline`: the intake queue is serialised here, then each runtime writes its
        /// in-memory queue (<see cref="ForwarderRuntime.FlushForShutdown"/>). Runs once; later
        /// calls return at once. Never throws.
        /// </summary>
        public static void Shutdown(TimeSpan deadline)
        {
            if (Interlocked.Exchange(ref shutDown, 1) != 0)
                return;
            ForwarderThreads.BeginProcessEnd();
            var clock = System.Diagnostics.Stopwatch.StartNew();
            stopping = true;
            // Every lock on this path is taken within the deadline (Bounded): a thread holding
            // one may never run again once the process is ending.
            var left = new List<Pending>();
            // Events that never reach a runtime's queue: said in one line, not lost unsaid.
            long lost = 0;
            if (Bounded.Enter(gate, deadline - clock.Elapsed))
            {
                try
                {
                    left.AddRange(queue);
                    queue.Clear();
                    queuedBytes = 0;
                }
                finally
                {
                    Monitor.Exit(gate);
                }
            }
            else
            {
                // Read without the lock: its holder may never release it.
                lost += queue.Count;
            }
            // The event the intake thread holds is passed on by it; wait for that, but not for
            // long: a thread held in a runtime's start (a log configuration on a share that
            // hangs) must not take the flush's time from every registration.
            while (clock.Elapsed < deadline && clock.Elapsed < InFlightWait && Volatile.Read(ref inFlight) != 0)
                Thread.Sleep(1);
            if (Volatile.Read(ref inFlight) != 0)
                lost++;
            int passed = 0;
            foreach (var pending in left)
            {
                if (clock.Elapsed >= deadline)
                    break;
                passed++;
                try
                {
                    PassOn(pending);
                }
                catch (Exception e)
                {
                    lost++;
                    IntakeFailed.Add(e.GetType().Name + ": " + e.Message);
                }
            }
            lost += left.Count - passed;
            if (lost > 0)
                LogQueue.Wrap(ForwarderLog.Current).Error(
                    "shutting down: " + lost + " accepted event(s) could not be handed to a spool writer within "
                    + deadline.TotalSeconds.ToString("F1", System.Globalization.CultureInfo.InvariantCulture)
                    + " s and are lost (the intake thread was held, or passing them on failed)");
            ForwarderRuntime.FlushAllForShutdown(deadline - clock.Elapsed);
            Notices.ReportNow(deadline - clock.Elapsed + NoticeGrace);
            // The lines above are written by the log thread, which ends with the process.
            LogQueue.Drain(deadline - clock.Elapsed + NoticeGrace);
        }

        /// <summary>
        /// Serialises one event and hands it to its registration's runtime, unless it is too
        /// large. With `held` (the intake thread's event), the event stops being this queue's in
        /// the same step as it becomes the runtime's (<see cref="HandOver"/>).
        /// </summary>
        static void PassOn(Pending next, bool held = false)
        {
            var runtime = next.Handler.Runtime();
            if (runtime == null)
                return;
            int fieldBytes;
            var field = ContextJson.OverLongField(next.Context, out fieldBytes);
            if (field != null)
            {
                // The engine would refuse it (400) whatever the rest of the body.
                Interlocked.Increment(ref runtime.Counters.TooLarge);
                FieldTooLong.Add("job " + next.Context.JobId.ToString("D") + ": " + field + " is " + fieldBytes + " bytes");
                return;
            }
            var body = ContextJson.Serialize(next.Context);
            if (ContextJson.Utf8Length(body) > ContextJson.MaxBodyBytes)
            {
                // Spooled, it would only be refused by the engine, after evicting good events
                // from a spool near its byte limit.
                Interlocked.Increment(ref runtime.Counters.TooLarge);
                TooLarge.Add("job " + next.Context.JobId.ToString("D"));
                return;
            }
            if (!held)
            {
                runtime.Submit(body, next.Context.JobId);
                return;
            }
            lock (HandOver)
            {
                runtime.Submit(body, next.Context.JobId);
                ReleaseInFlight();
            }
        }

        /// <summary>The intake thread no longer holds an event.</summary>
        static void ReleaseInFlight()
        {
            lock (gate)
            {
                inFlight = 0;
                inFlightHandler = null;
            }
        }

        static void Loop()
        {
            while (true)
            {
                Pending next = null;
                try
                {
                    lock (gate)
                    {
                        inFlight = 0;
                        inFlightHandler = null;
                        if (queue.Count > 0)
                        {
                            next = queue.Dequeue();
                            queuedBytes -= next.Size;
                            inFlight = 1;
                            inFlightHandler = next.Handler;
                        }
                    }
                    if (next == null)
                    {
                        signal.WaitOne();
                        continue;
                    }
                    var hold = holdForTest;
                    if (hold != null)
                        hold.WaitOne();
                    // Once in the runtime's queue, counted there and no longer here.
                    PassOn(next, true);
                    // Also when it went nowhere (too large, no runtime).
                    ReleaseInFlight();
                }
                catch (ThreadAbortException)
                {
                    throw; // the process or app domain is going away (iisreset): not an error
                }
                catch (Exception e)
                {
                    // Keep the intake alive whatever happens; only this event is lost. Even
                    // the count may fail (no memory left for the text): nothing may escape
                    // this thread, which would end Keyfactor's process.
                    try { IntakeFailed.Add((next != null ? "job " + next.Context.JobId.ToString("D") + ", " : "") + e); }
                    catch { }
                }
            }
        }
    }
}
