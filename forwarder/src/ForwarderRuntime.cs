// What runs behind the handler: one per process and spool directory (Unity may build a handler
// object per resolution, so nothing heavy lives in the handler). Two background threads (besides
// the process-wide intake thread that feeds them, see Intake.cs):
// - the spool writer turns queued events into spool files, one write and flush at a time (and,
//   while the spool cannot take them, posts them to the engine itself, from memory);
// - the sender posts spooled events to the engine, oldest first, retrying with exponential
//   backoff and jitter, and deletes each file once the engine has it.

using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Threading;

namespace Jobhook.Forwarder
{
    /// <summary>What the forwarder did since the process started (a snapshot).</summary>
    public sealed class ForwarderCounters
    {
        /// <summary>
        /// Events handed over by RunHandler and taken into this registration's queue, or dropped
        /// from the full intake queue on their way to it once it had a runtime (an event over
        /// the engine's limits is counted <see cref="TooLarge"/> instead). Each one is counted
        /// once more, as <see cref="Spooled"/>, as <see cref="SentFromMemory"/> or as
        /// <see cref="Dropped"/> from a queue, once it has left memory.
        /// </summary>
        public long Accepted;
        /// <summary>Events written to the spool (a full spool may drop them later: counted in <see cref="Dropped"/> too).</summary>
        public long Spooled;
        /// <summary>
        /// Events the spool could not take (a full disk) that the engine answered straight from
        /// memory: counted in <see cref="Delivered"/>, <see cref="Conflicts"/> or
        /// <see cref="Rejected"/> too, never in <see cref="Spooled"/>.
        /// </summary>
        public long SentFromMemory;
        /// <summary>Events the engine accepted (2xx).</summary>
        public long Delivered;
        /// <summary>Events the engine answered 409 for (key reused with another body): logged, not resent.</summary>
        public long Conflicts;
        /// <summary>
        /// Events the engine refused as invalid, and spool files found damaged (not the shape
        /// this forwarder writes): moved to rejected/ (with the events it refused that were
        /// sent from memory, which no file holds).
        /// </summary>
        public long Rejected;
        /// <summary>Events dropped because an in-memory queue (its own, or the intake queue once this registration has a runtime) or the spool was full.</summary>
        public long Dropped;
        /// <summary>
        /// Events refused because their body, or one of its string fields, is over the engine's
        /// limit (<see cref="ContextJson.MaxBodyBytes"/>, <see cref="ContextJson.MaxStringFieldBytes"/>):
        /// never spooled.
        /// </summary>
        public long TooLarge;
        /// <summary>Failed POSTs that will be retried.</summary>
        public long Retries;

        internal ForwarderCounters Snapshot()
        {
            return new ForwarderCounters
            {
                Accepted = Interlocked.Read(ref Accepted),
                Spooled = Interlocked.Read(ref Spooled),
                SentFromMemory = Interlocked.Read(ref SentFromMemory),
                Delivered = Interlocked.Read(ref Delivered),
                Conflicts = Interlocked.Read(ref Conflicts),
                Rejected = Interlocked.Read(ref Rejected),
                Dropped = Interlocked.Read(ref Dropped),
                TooLarge = Interlocked.Read(ref TooLarge),
                Retries = Interlocked.Read(ref Retries),
            };
        }

        /// <summary>One line for logs.</summary>
        public override string ToString()
        {
            return "accepted " + Accepted + ", spooled " + Spooled + ", sent from memory " + SentFromMemory + ", delivered " + Delivered + ", conflicts " + Conflicts
                   + ", rejected " + Rejected + ", dropped " + Dropped + ", too large " + TooLarge + ", retries " + Retries;
        }
    }

    /// <summary>The spool, its writer and its sender for one spool directory.</summary>
    public sealed class ForwarderRuntime
    {
        /// <summary>
        /// How often a spool directory that cannot be opened, or a sender that failed to start, is
        /// tried again (and logged): often enough to recover soon after an operator fixes
        /// permissions, rarely enough not to flood the log with one line per job.
        /// </summary>
        static readonly TimeSpan OpenRetryInterval = TimeSpan.FromSeconds(60);

        /// <summary>
        /// How long the spool writer waits after a failed write before trying again (a full disk
        /// or a permission problem does not fix itself in milliseconds).
        /// </summary>
        const int WriteRetryMilliseconds = 1000;

        static readonly object registryGate = new object();
        static readonly Dictionary<string, ForwarderRuntime> registry = new Dictionary<string, ForwarderRuntime>(StringComparer.OrdinalIgnoreCase);

        readonly ForwarderSettings settings;
        /// <summary>Null until the writer thread has opened the spool directory.</summary>
        volatile Spool spool;
        readonly IForwarderLog log;
        readonly object queueGate = new object();
        readonly LinkedList<QueuedEvent> queue = new LinkedList<QueuedEvent>();
        /// <summary>What the events in <see cref="queue"/> hold in memory (<see cref="ForwarderSettings.MemoryBytes"/>; under <see cref="queueGate"/>).</summary>
        long queuedBytes;
        /// <summary>
        /// The event at the head of <see cref="queue"/> while it is being written to the spool
        /// (under <see cref="queueGate"/>): <see cref="Submit"/> never drops it, because the
        /// write may well succeed, and an event counted dropped must not be counted spooled
        /// too. It stays in the queue meanwhile, so it is still counted in memory and at exit.
        /// </summary>
        QueuedEvent writing;
        readonly AutoResetEvent queued = new AutoResetEvent(false);
        readonly AutoResetEvent spooled = new AutoResetEvent(false);
        /// <summary>Set once <see cref="spool"/> is open (shutdown waits for it).</summary>
        readonly ManualResetEvent spoolOpen = new ManualResetEvent(false);

        /// <summary>
        /// Test hook: while set and not signalled, every spool writer stops once its spool is
        /// open, so that the events given to it stay in memory, as on a machine too busy for
        /// the writer to keep up, until the process ends and the shutdown writes them. Set only
        /// by the test harness, through reflection; no setting reaches it.
        /// </summary>
        static ManualResetEvent holdWritersForTest = null;
        /// <summary>
        /// Held by whoever writes queued events to the spool: the writer thread for one event at
        /// a time, or <see cref="FlushForShutdown"/> for all that are left, so no event is
        /// written twice.
        /// </summary>
        readonly object writeGate = new object();
        /// <summary>Set by <see cref="FlushForShutdown"/>: the writer thread takes no more events.</summary>
        volatile bool stopping;
        /// <summary>Events dropped from the full in-memory queue (counted; reported by Notices).</summary>
        readonly RateLimitedCount queueFull;
        /// <summary>Handler objects met with this spool but other engine settings (reported by Notices).</summary>
        readonly RateLimitedCount sharedSpool;
        /// <summary>The sender's lines about the engine failing and recovering (made once, however often the sender is started).</summary>
        readonly OutageNotice engineOutages;
        /// <summary>The spool directory as logged (a setting: it may hold a line break).</summary>
        readonly string shownSpool;
        /// <summary>Guards the start of the writer thread.</summary>
        readonly object startGate = new object();
        /// <summary>The spool writer thread, once it has started (under <see cref="startGate"/>).</summary>
        volatile Thread writer;
        /// <summary>Whether the writer's last start failed, and when (Stopwatch ticks; under <see cref="startGate"/>).</summary>
        bool writerFailed;
        long lastWriterFailure;
        /// <summary>Failed starts of the writer thread (reported by Notices).</summary>
        readonly RateLimitedCount writerNotStarted;
        /// <summary>
        /// The sender, once the writer has started it: an event the spool cannot take is posted
        /// through it from memory (<see cref="SendFromMemory"/>).
        /// </summary>
        volatile Sender sender;
        /// <summary>
        /// While the spool has not opened: a sender whose thread never runs (there is nothing
        /// spooled to send), for posts from memory only (<see cref="SendWhileUnopened"/>).
        /// Writer thread only.
        /// </summary>
        Sender unopenedSender;
        /// <summary>Events sent from memory because the spool could not take them (reported by Notices).</summary>
        readonly RateLimitedCount sentFromMemory;

        /// <summary>What happened so far.</summary>
        public readonly ForwarderCounters Counters = new ForwarderCounters();

        sealed class QueuedEvent
        {
            public string Key;
            public string Body;
            public Guid JobId;
            /// <summary>What it holds in memory (<see cref="ForwarderSettings.MemoryBytes"/>).</summary>
            public long Size;
        }

        ForwarderRuntime(ForwarderSettings settings, IForwarderLog log)
        {
            this.settings = settings;
            this.log = log;
            shownSpool = LogText.Printable(settings.SpoolDirectory);
            engineOutages = new OutageNotice(this.log, false);
            sharedSpool = new RateLimitedCount(
                "two registrations share the spool directory " + shownSpool
                + " with different engine settings; the first one's are in effect. Give each registration its own SpoolDirectory", log);
            queueFull = new RateLimitedCount(
                "the in-memory queue of " + shownSpool + " was full (" + settings.MaxQueuedEvents + " events or "
                + ForwarderSettings.MaxQueuedBytes / (1024 * 1024) + " MiB: the spool disk is too slow or failing); dropped the oldest event(s)", log);
            sentFromMemory = new RateLimitedCount(
                "the spool " + shownSpool + " could not be opened or written, so event(s) were sent to the engine straight from memory", log,
                NoticeLevel.Info);
            writerNotStarted = new RateLimitedCount(
                "the spool writer thread of " + shownSpool + " could not start; events wait in memory (tried again at the next event,"
                + " at most once every " + ForwarderThreads.RetryInterval.TotalSeconds + " s)", log, true);
        }

        /// <summary>
        /// The runtime for these options' spool directory, started on first use. Cheap: the
        /// spool directory is opened and indexed on the writer thread, never on Keyfactor's.
        /// Never throws.
        /// </summary>
        public static ForwarderRuntime Obtain(JobhookForwarder.Options options)
        {
            var settings = ForwarderSettings.Parse(options);
            var log = ForwarderLog.Current;
            var trace = log as TraceForwarderLog;
            if (trace != null && settings.DebugLog)
                trace.DebugEnabled = true;
            ForwarderRuntime runtime;
            lock (registryGate)
            {
                if (registry.TryGetValue(settings.SpoolDirectory, out runtime))
                {
                    // This runs on the intake thread, for every new handler object (Unity may
                    // make one per event): counted, never logged here.
                    if (!runtime.SameDestination(settings))
                        runtime.sharedSpool.Add(null);
                }
                else
                {
                    // Nothing is logged here either: the writer thread says what it starts
                    // with, so a slow log sink never holds the intake thread. Its threads log
                    // through the log thread: a slow sink never sets their pace. Registered
                    // before its writer starts: a writer that cannot start is tried again by
                    // this runtime, never by building another (each one's counts stay
                    // registered with Notices for the life of the process).
                    runtime = new ForwarderRuntime(settings, LogQueue.Wrap(log));
                    registry[settings.SpoolDirectory] = runtime;
                }
            }
            runtime.EnsureWriter();
            return runtime;
        }

        /// <summary>
        /// Starts the spool writer thread unless it runs or its last start failed less than
        /// <see cref="ForwarderThreads.RetryInterval"/> ago; a failed start is counted. Never throws.
        /// </summary>
        void EnsureWriter()
        {
            if (writer != null)
                return;
            string failure = null;
            try
            {
                lock (startGate)
                {
                    if (writer != null || (writerFailed && !ForwarderThreads.RetryDue(lastWriterFailure)))
                        return;
                    try
                    {
                        // The shutdown's flush waits for the writer to open the spool.
                        writer = ForwarderThreads.Start(WriteLoop, "spool writer", true);
                        writerFailed = false;
                    }
                    catch (Exception e)
                    {
                        writerFailed = true;
                        lastWriterFailure = Stopwatch.GetTimestamp();
                        failure = e.GetType().Name + ": " + e.Message;
                    }
                }
                if (failure != null)
                    writerNotStarted.Add(failure);
            }
            catch
            {
                // Tried again at the next event.
            }
        }

        /// <summary>Whether `directory` (a parsed SpoolDirectory) is `runtime`'s, as the registry compares them.</summary>
        internal static bool SameSpool(string directory, ForwarderRuntime runtime)
        {
            return registry.Comparer.Equals(directory, runtime.settings.SpoolDirectory);
        }

        bool SameDestination(ForwarderSettings other)
        {
            return Equals(settings.JobCompleteUrl, other.JobCompleteUrl) && settings.BearerToken == other.BearerToken
                   && settings.TrustedCaFile == other.TrustedCaFile;
        }

        /// <summary>Events in memory plus events in the spool; -1 while the spool is not open yet.</summary>
        public long PendingEvents
        {
            get
            {
                var current = spool;
                if (current == null)
                    return -1;
                int inMemory;
                lock (queueGate) inMemory = queue.Count;
                return inMemory + current.Count;
            }
        }

        /// <summary>
        /// Queues one serialised event for the spool writer. Makes the idempotency key: a fresh random GUID, fixed from here
        /// on, so every resend of this event carries the same key and no other event ever does.
        /// Runs on the intake thread, so it never logs: a full queue's drop is counted.
        /// </summary>
        public void Submit(string body, Guid jobId)
        {
            var item = new QueuedEvent
            {
                Key = Guid.NewGuid().ToString("N"), Body = body, JobId = jobId, Size = ForwarderSettings.MemoryBytes(body.Length),
            };
            Interlocked.Increment(ref Counters.Accepted);
            QueuedEvent dropped = null;
            int drops = 0;
            lock (queueGate)
            {
                queue.AddLast(item);
                queuedBytes += item.Size;
                // Bounded in events and in bytes; the event just queued always stays, and so
                // does the one being written (it is on its way to the spool, where it is
                // counted): the oldest other event goes. While one is written the queue may
                // so hold one event more than its limit.
                while (queue.Count > 1 && (queue.Count > settings.MaxQueuedEvents || queuedBytes > ForwarderSettings.MaxQueuedBytes))
                {
                    var oldest = queue.First;
                    if (ReferenceEquals(oldest.Value, writing))
                        oldest = oldest.Next;
                    if (oldest == null || oldest == queue.Last)
                        break;
                    dropped = oldest.Value;
                    queue.Remove(oldest);
                    queuedBytes -= dropped.Size;
                    drops++;
                }
            }
            queued.Set();
            EnsureWriter();
            for (int i = 0; i < drops; i++)
            {
                Interlocked.Increment(ref Counters.Dropped);
                queueFull.Add("event " + dropped.Key + " of job " + dropped.JobId.ToString("D"));
            }
        }

        /// <summary>
        /// Opens the spool (retrying until it can), starts the sender, then writes queued events
        /// to the spool for as long as the process lives. Nothing escapes this method: an
        /// unhandled exception on a thread ends the process, which here is Keyfactor's.
        /// </summary>
        void WriteLoop()
        {
            try
            {
                foreach (var problem in settings.Problems)
                    log.Error("configuration: " + LogText.Printable(problem));
                log.Info("forwarding to " + (settings.JobCompleteUrl == null ? "(no EngineUrl)" : LogText.Printable(settings.JobCompleteUrl.ToString()))
                         + " through the spool " + shownSpool);
            }
            catch (ThreadAbortException)
            {
                throw; // the process or app domain is going away (iisreset): not an error
            }
            catch
            {
                // A log sink that fails costs these lines, never the writer.
            }
            Spool opened = null;
            while (opened == null)
            {
                try
                {
                    opened = Spool.Open(settings.SpoolDirectory, settings.MaxSpoolFiles, settings.MaxSpoolBytes, log, settings.JobCompleteUrl != null);
                }
                catch (ThreadAbortException)
                {
                    throw; // the process or app domain is going away (iisreset): not an error
                }
                catch (Exception e)
                {
                    // Spool.Open does not throw by contract; an exception on this thread would
                    // end Keyfactor's process, so it is caught all the same.
                    try { log.Error("opening the spool " + shownSpool + " failed: " + e); } catch { }
                }
                if (opened != null)
                    break;
                var retryOpen = Stopwatch.GetTimestamp() + (long)(OpenRetryInterval.TotalSeconds * Stopwatch.Frequency);
                try
                {
                    SendWhileUnopened(retryOpen);
                }
                catch (ThreadAbortException)
                {
                    throw; // the process or app domain is going away (iisreset): not an error
                }
                catch (Exception e)
                {
                    // Keep the writer alive whatever happens; the event stays queued.
                    NotWritten();
                    try { log.Error("spool writer: " + e); } catch { }
                    var left = retryOpen - Stopwatch.GetTimestamp();
                    if (left > 0)
                        Thread.Sleep((int)Math.Min(int.MaxValue, left * 1000 / Stopwatch.Frequency + 1));
                }
            }
            spool = opened;
            spoolOpen.Set();
            var hold = holdWritersForTest;
            if (hold != null)
                hold.WaitOne();
            var senderStarted = settings.JobCompleteUrl == null; // nothing to start without an engine URL
            // Stopwatch ticks (monotonic: setting the clock back does not hold the sender back).
            long nextSenderStart = 0;
            while (true)
            {
                if (!senderStarted && Stopwatch.GetTimestamp() >= nextSenderStart)
                {
                    try
                    {
                        // Under the write gate, as a write: a shutdown under way waits for it
                        // (FlushForShutdown), and none begins once the process is ending. A
                        // sender started during the runtime's teardown did its first-time work
                        // (its HTTP client, its first send) as the runtime tore down, and Mono
                        // aborted the whole process for it.
                        lock (writeGate)
                        {
                            if (stopping)
                                return; // shutdown writes what is left (FlushForShutdown)
                            // Ending, its flush not begun yet: no sender now (nor a failure).
                            if (!ForwarderThreads.ProcessEnding)
                            {
                                var started = new Sender(settings, opened, Counters, log, spooled, engineOutages);
                                started.Start();
                                sender = started;
                            }
                        }
                        senderStarted = true;
                    }
                    catch (ThreadAbortException)
                    {
                        throw;
                    }
                    catch (Exception e)
                    {
                        // Events are still spooled meanwhile; starting the sender is tried again.
                        nextSenderStart = Stopwatch.GetTimestamp() + (long)(OpenRetryInterval.TotalSeconds * Stopwatch.Frequency);
                        try { log.Error("starting the sender failed (tried again in " + OpenRetryInterval.TotalSeconds + " s): " + e); } catch { }
                    }
                }
                try
                {
                    bool idle = false, written = false;
                    QueuedEvent next = null;
                    // Set from here until it has been sent from memory or put back (NotWritten).
                    QueuedEvent unwritten = null;
                    lock (writeGate)
                    {
                        if (stopping)
                            return; // shutdown writes what is left (FlushForShutdown)
                        next = TakeHead();
                        if (next == null)
                            idle = true;
                        else if (opened.Write(next.Key, next.Body, true))
                        {
                            written = true;
                            Written(next);
                        }
                        else
                        {
                            // Still marked as being written: a full queue must not drop it
                            // while it is sent from memory.
                            unwritten = next;
                        }
                    }
                    if (idle)
                    {
                        queued.WaitOne(senderStarted ? Timeout.Infinite : (int)OpenRetryInterval.TotalMilliseconds);
                        continue;
                    }
                    if (written)
                    {
                        spooled.Set();
                        // Opt-in (DebugLog), and on this thread, never the intake thread's: a
                        // slow sink only slows spooling, which the bounded queue absorbs.
                        if (settings.DebugLog)
                            log.Debug("spooled job " + next.JobId.ToString("D") + " as event " + next.Key);
                    }
                    else if (!SendFromMemory(unwritten, sender))
                    {
                        Thread.Sleep(WriteRetryMilliseconds);
                    }
                }
                catch (ThreadAbortException)
                {
                    throw; // the process or app domain is going away (iisreset): not an error
                }
                catch (Exception e)
                {
                    // Keep the writer alive whatever happens; the event stays queued (and may
                    // be dropped from a full queue again).
                    NotWritten();
                    try { log.Error("spool writer: " + e); } catch { }
                    Thread.Sleep(WriteRetryMilliseconds);
                }
            }
        }

        /// <summary>
        /// The oldest queued event, marked as being written (<see cref="writing"/>) so that a
        /// full queue does not drop it meanwhile; null if none. Under <see cref="writeGate"/>;
        /// the caller ends with <see cref="Written"/> or <see cref="NotWritten"/>.
        /// </summary>
        QueuedEvent TakeHead()
        {
            lock (queueGate)
            {
                writing = queue.Count > 0 ? queue.First.Value : null;
                return writing;
            }
        }

        /// <summary>Takes a written event off the queue and counts it. Under <see cref="writeGate"/>.</summary>
        void Written(QueuedEvent written)
        {
            lock (queueGate)
            {
                // Still the head: nothing drops the event being written (see Submit).
                if (queue.First != null && ReferenceEquals(queue.First.Value, written))
                {
                    queue.RemoveFirst();
                    queuedBytes -= written.Size;
                }
                writing = null;
            }
            Interlocked.Increment(ref Counters.Spooled);
        }

        /// <summary>
        /// How long past its deadline a flush is waited for, so that one that used the whole
        /// deadline (a spool that never opened) has queued its line about what it lost before
        /// the process ends. Within the shutdown's own grace (<see cref="Intake.ShutdownWait"/>).
        /// </summary>
        static readonly TimeSpan LostLineGrace = TimeSpan.FromMilliseconds(250);

        /// <summary>
        /// How long the shutdown flush waits after a failed write before trying the same event
        /// again: far shorter than the writer thread's <see cref="WriteRetryMilliseconds"/>,
        /// because the whole flush has only its deadline (5 s), yet long enough that a spool
        /// that keeps failing costs a few dozen tries, not a busy loop.
        /// </summary>
        static readonly TimeSpan ShutdownWriteRetry = TimeSpan.FromMilliseconds(100);

        /// <summary>The write of the head failed: it stays queued, and may be dropped again. Under <see cref="writeGate"/>.</summary>
        void NotWritten()
        {
            lock (queueGate)
                writing = null;
        }

        /// <summary>
        /// Until `until` (Stopwatch ticks), while the spool cannot be opened (a SpoolDirectory
        /// the App Pool identity may not write, a path on a missing drive): the events given
        /// meanwhile are posted to the engine straight from memory, oldest first, as those a
        /// failed write leaves (<see cref="SendFromMemory"/>), so an engine that is up has them
        /// while the directory is fixed. One the engine does not take goes behind the others and
        /// the next is tried a second later; the shutdown reports what is still in memory as
        /// lost, as before.
        /// </summary>
        void SendWhileUnopened(long until)
        {
            while (true)
            {
                long left = until - Stopwatch.GetTimestamp();
                if (left <= 0)
                    return;
                int leftMs = (int)Math.Min(int.MaxValue, left * 1000 / Stopwatch.Frequency + 1);
                // Once the shutdown has begun, only the next open attempt is of use (the flush
                // waits for it): the wait until then stays whole.
                var through = stopping ? null : UnopenedSender();
                if (through == null)
                {
                    Thread.Sleep(leftMs);
                    return;
                }
                QueuedEvent next;
                lock (writeGate)
                    next = stopping ? null : TakeHead();
                if (next == null)
                    queued.WaitOne(leftMs);
                else if (!SendFromMemory(next, through))
                    Thread.Sleep(Math.Min(WriteRetryMilliseconds, leftMs));
            }
        }

        /// <summary>
        /// <see cref="unopenedSender"/>, made at the first need; null without an EngineUrl, once
        /// the process is ending (a first HTTP client made during the runtime's teardown can take
        /// the process with it), or if it cannot be made (tried again at the next open attempt).
        /// </summary>
        Sender UnopenedSender()
        {
            if (unopenedSender != null || settings.JobCompleteUrl == null || ForwarderThreads.ProcessEnding)
                return unopenedSender;
            try
            {
                unopenedSender = Sender.ForPostsFromMemory(settings, Counters, log, engineOutages);
            }
            catch (Exception e)
            {
                try { log.Error("preparing to send events from memory failed: " + e); } catch { }
            }
            return unopenedSender;
        }

        /// <summary>
        /// Posts an event the spool could not take (a full disk, a directory that refuses new
        /// files) to the engine straight from memory, where the writer would otherwise only wait
        /// to try the write again: with the engine up, a spool disk that stays full costs no
        /// event, where the bounded queue would drop the oldest. The event stays at the head of
        /// the queue, marked as being written, until the engine has answered: a full queue does
        /// not drop it, and a shutdown meanwhile writes it to the spool as every other event.
        /// Runs on the writer thread outside <see cref="writeGate"/>, since a post may take the
        /// whole request timeout and the shutdown's flush must not wait for it. True when the
        /// engine took the event (or refused it for good) and it has left memory; false when it
        /// is back in the queue for the next write.
        /// </summary>
        bool SendFromMemory(QueuedEvent unsent, Sender through)
        {
            var verdict = Sender.Verdict.Retry;
            string detail = null;
            try
            {
                // Never once the process is ending: the shutdown writes the queue to the spool,
                // and what it writes is sent at the next start.
                if (through != null && !stopping && !ForwarderThreads.ProcessEnding)
                    verdict = through.PostFromMemory(unsent.Key, unsent.Body, out detail);
            }
            finally
            {
                if (verdict == Sender.Verdict.Retry)
                    lock (queueGate)
                    {
                        if (ReferenceEquals(writing, unsent))
                            writing = null;
                        // Posted and not taken: behind the others, so one event that something
                        // keeps refusing (a proxy's limit) holds none of them in memory, as the
                        // sender lets the next spooled event go first. Its write to the spool
                        // comes after theirs too.
                        if (detail != null && queue.Count > 1 && ReferenceEquals(queue.First.Value, unsent) && !stopping)
                        {
                            queue.RemoveFirst();
                            queue.AddLast(unsent);
                        }
                    }
            }
            if (verdict == Sender.Verdict.Retry)
            {
                if (detail != null)
                    Interlocked.Increment(ref Counters.Retries);
                return false;
            }
            bool ours;
            lock (queueGate)
            {
                // Still the head unless the shutdown's flush wrote it to the spool meanwhile
                // (counted spooled, sent again at the next start: the key makes that harmless).
                ours = queue.First != null && ReferenceEquals(queue.First.Value, unsent);
                if (ours)
                {
                    queue.RemoveFirst();
                    queuedBytes -= unsent.Size;
                }
                if (ReferenceEquals(writing, unsent))
                    writing = null;
            }
            if (ours)
            {
                Interlocked.Increment(ref Counters.SentFromMemory);
                sentFromMemory.Add("event " + unsent.Key + " of job " + unsent.JobId.ToString("D"));
            }
            // Whatever the engine's answer, as a spooled event's line is written whatever follows.
            if (settings.DebugLog)
                log.Debug("sent job " + unsent.JobId.ToString("D") + " as event " + unsent.Key);
            switch (verdict)
            {
                case Sender.Verdict.Delivered:
                    Interlocked.Increment(ref Counters.Delivered);
                    break;
                case Sender.Verdict.Conflict:
                    Interlocked.Increment(ref Counters.Conflicts);
                    log.Warn("the engine already holds a different event with key " + unsent.Key
                             + " (409); this one, sent from memory, is not resent: " + detail);
                    break;
                default:
                    // No rejected/ file: the spool takes no file now.
                    Interlocked.Increment(ref Counters.Rejected);
                    log.Warn("the engine refused event " + unsent.Key + " of job " + unsent.JobId.ToString("D")
                             + ", sent from memory because the spool could not be written; it is not kept in rejected/: " + detail);
                    break;
            }
            return true;
        }

        /// <summary>
        /// At shutdown: every runtime writes its in-memory queue to its spool, all within
        /// `deadline` together, side by side. Never throws.
        /// </summary>
        internal static void FlushAllForShutdown(TimeSpan deadline)
        {
            var clock = System.Diagnostics.Stopwatch.StartNew();
            ForwarderRuntime[] runtimes;
            if (!Bounded.Enter(registryGate, deadline))
            {
                LogQueue.Wrap(ForwarderLog.Current).Error(
                    "shutting down: the registrations could not be listed within the deadline; the events they held in memory are lost");
                return;
            }
            try
            {
                runtimes = new ForwarderRuntime[registry.Count];
                registry.Values.CopyTo(runtimes, 0);
            }
            finally
            {
                Monitor.Exit(registryGate);
            }
            // Side by side, each on a thread of its own: a registration whose spool cannot be
            // opened, or whose disk hangs, must not use up the others' time.
            var done = new List<KeyValuePair<ForwarderRuntime, ManualResetEvent>>();
            foreach (var runtime in runtimes)
            {
                var finished = new ManualResetEvent(false);
                var flushing = runtime;
                try
                {
                    ForwarderThreads.Start(() =>
                    {
                        try { flushing.FlushForShutdown(deadline - clock.Elapsed); }
                        catch { }
                        // Never disposed: a thread abandoned past the deadline may still set it.
                        finally { try { finished.Set(); } catch { } }
                    }, "flush", true);
                    done.Add(new KeyValuePair<ForwarderRuntime, ManualResetEvent>(flushing, finished));
                }
                catch
                {
                    // No thread to be had: this one flushes here.
                    try { flushing.FlushForShutdown(deadline - clock.Elapsed); } catch { }
                }
            }
            foreach (var flush in done)
            {
                // A flush that used its whole deadline still says what it lost.
                var left = deadline + LostLineGrace - clock.Elapsed;
                bool ended = false;
                try { ended = flush.Value.WaitOne(left > TimeSpan.Zero ? left : TimeSpan.Zero); } catch { }
                if (!ended)
                    flush.Key.ReportLost(0, deadline, "its flush did not end (a spool disk that does not answer?)");
            }
        }

        /// <summary>
        /// Stops the writer thread (and keeps it from starting the sender), and writes the events
        /// still in memory to the spool, oldest first, until none is left or `deadline` has
        /// passed (waiting for the spool to open and for the writer's current write counts
        /// against it). A failed write is tried again every <see cref="ShutdownWriteRetry"/>
        /// until the deadline. Files are not flushed one by one here: the process ends
        /// normally, so the operating system still writes its cache to disk, and skipping the
        /// flush makes this many times faster. Logs one line.
        /// </summary>
        internal void FlushForShutdown(TimeSpan deadline)
        {
            var clock = System.Diagnostics.Stopwatch.StartNew();
            stopping = true;
            queued.Set(); // an idle writer sees `stopping` and ends
            // Nothing in memory (the event the writer is writing is still in the queue): no
            // reason to wait for the spool, only for a sender the writer may be starting
            // (briefly: a write would have left an event in the queue). Read without the lock,
            // as at the end.
            if (queue.Count == 0)
            {
                if (Bounded.Enter(writeGate, deadline - clock.Elapsed))
                    Monitor.Exit(writeGate);
                return;
            }
            int written = 0;
            bool entered = false;
            try
            {
                var left = deadline - clock.Elapsed;
                if (left > TimeSpan.Zero && spoolOpen.WaitOne(left))
                {
                    left = deadline - clock.Elapsed;
                    if (left > TimeSpan.Zero)
                        entered = Bounded.Enter(writeGate, left);
                }
                var opened = spool;
                while (entered && opened != null && clock.Elapsed < deadline)
                {
                    QueuedEvent next = null;
                    if (!Bounded.Enter(queueGate, deadline - clock.Elapsed))
                        break;
                    try
                    {
                        // Marked as in TakeHead: an event the intake thread still passes on
                        // meanwhile must not have this one counted dropped as well as written.
                        writing = next = queue.Count > 0 ? queue.First.Value : null;
                    }
                    finally
                    {
                        Monitor.Exit(queueGate);
                    }
                    if (next == null)
                        break;
                    if (!opened.Write(next.Key, next.Body, false))
                    {
                        // A failed write is often over in a moment (an antivirus scan holding
                        // the new file, a disk that was full for a moment): the event stays at
                        // the head and is tried again while the deadline allows, as the writer
                        // thread would. Only what is still in memory at the deadline is lost.
                        NotWritten();
                        var pause = deadline - clock.Elapsed;
                        if (pause > ShutdownWriteRetry)
                            pause = ShutdownWriteRetry;
                        if (pause > TimeSpan.Zero)
                            Thread.Sleep(pause);
                        continue;
                    }
                    Written(next);
                    written++;
                }
            }
            finally
            {
                if (entered)
                    Monitor.Exit(writeGate);
            }
            if (queue.Count > 0)
                ReportLost(written, deadline, null);
            else if (written > 0 && Interlocked.Exchange(ref shutdownReported, 1) == 0)
                log.Info("shutting down: wrote the " + written + " event(s) still in memory to the spool " + shownSpool);
        }

        /// <summary>1 once the shutdown's line about this runtime was written (by its flush or by the one waiting for it).</summary>
        int shutdownReported;

        /// <summary>
        /// Says, once, how many accepted events are still in memory and so lost at exit. Read
        /// without the lock: at exit its holder may never release it, and a count a moment old
        /// is good enough for this line.
        /// </summary>
        void ReportLost(int written, TimeSpan deadline, string why)
        {
            int lost = queue.Count;
            if (lost == 0 || Interlocked.Exchange(ref shutdownReported, 1) != 0)
                return;
            log.Error("shutting down: " + lost + " accepted event(s) could not be written to the spool " + shownSpool
                      + " within " + deadline.TotalSeconds.ToString("F1", System.Globalization.CultureInfo.InvariantCulture)
                      + " s and are lost (" + written + " written" + (why != null ? "; " + why : "") + ")");
        }

        /// <summary>The counters, with the spool's drops added to the queue's and its damaged files to the rejected.</summary>
        public ForwarderCounters Snapshot()
        {
            var snapshot = Counters.Snapshot();
            var current = spool;
            if (current != null)
            {
                snapshot.Dropped += Interlocked.Read(ref current.Dropped);
                snapshot.Rejected += Interlocked.Read(ref current.Damaged);
            }
            return snapshot;
        }
    }
}
