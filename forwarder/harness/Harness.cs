// TEST-ONLY: plays Keyfactor Command against the forwarder. It builds contexts with awkward
// values, constructs the forwarder the way the platform does (Unity property setters, or with
// KEYFACTOR_11 the IOptions<Options> constructor), calls RunHandler from several threads like
// concurrent orchestrator check-ins, and checks every call: true, no exception, within the budget.
//
// It writes what it handed over to an "expected" file, one line per event, independent of the
// forwarder's own serialiser (strings as base64 of their UTF-8, enums as the number the engine
// must store, the timestamp as UTC ticks), so the test can compare with what the engine stored.
//
// Built with KEYFACTOR_LOGGING (the "log" variant), it does not set the forwarder's log: the
// forwarder must pick Keyfactor's logger by itself (here the stand-in of shim/Logging.cs), and
// every line that reaches that logger is printed as "keyfactor log <logger name> <level>: ...".
//
// Usage:
//   harness.exe run   --url U --spool DIR --count N --expected FILE [options]
//   harness.exe drain --url U --spool DIR [options]
//   harness.exe burst --url U --spool DIR --count N [options] (submit N, then exit normally at
//     once, with events still in the forwarder's memory)
//   harness.exe pending --url U --spool DIR (two registrations, spooling to DIR/a and DIR/b,
//     are started; a third, DIR/c, is handed one event, and the intake thread is held with it
//     (the forwarder's internal test hook, as a slow start-up of c would hold it); meanwhile 5
//     events for a and 7 for b wait in the intake queue. Prints "pending a=N b=M": each
//     registration's PendingEvents, then lets the intake thread go)
//   harness.exe faults --url U --spool DIR --count N [--fail-thread NAME] [--fail-starts K]
//     [--interval-ms MS] (the next K starts of a forwarder thread whose name contains NAME, of
//     any thread without --fail-thread, fail as in a process out of threads; then N contexts
//     are handed over, one every MS ms (default 50), each call checked like `run`, and the
//     harness waits for the spool to drain. Prints "submitted N", then "drained <counters>")
//   harness.exe memory --url U --spool DIR --count N --field-chars C [--escaped 1] [--huge H]
//     [--fail-thread NAME --fail-starts K] (starts the registration, hands over H contexts whose
//     body is over the engine's 64 KiB, then N contexts whose three strings are C characters
//     each (one string shared by all, so the harness itself holds little; with --escaped 1 of
//     quotes, two bytes of JSON each, so that a body is twice as large as its strings, each
//     within the engine's 4 KiB), from one thread; waits 3 s and prints
//     "memory intake=<Intake.Count> accepted=A dropped=D too_large=T managed_mb=M")
//   harness.exe moving --url U --spool DIR --count N [--rounds R] (the spool writer is held, so
//     no event leaves memory; in each round the intake thread is held (the forwarder's test
//     hooks) while N contexts queue behind it, then let go while two threads read
//     PendingEvents until it has moved them all to the runtime; prints "moving events=<N*R>
//     reads=<reads> wrong=<reads that were not every event accepted so far> [first: ...]")
//   harness.exe logjam --url U --spool DIR --count N (the log sink hangs on every line until
//     every one of N contexts is spooled, each with its per-event detail line; prints "spooled
//     N", lets the sink go, waits until it was given the line(s) counting the lines dropped
//     meanwhile, and prints "log detail=<detail lines the sink was given> dropped=<the sum of
//     those counts> reports=<such lines>")
//   harness.exe overflow --url U --spool DIR --count N [--threads K] [--pause-file F] (hands over
//     N contexts from K threads to one registration, --max-queued-events small, so that its
//     in-memory queue overflows while the spool writer writes (or, the spool unwritable, sends
//     from memory); with --pause-file, prints "opened" once the spool is open and waits for F to
//     exist before the first context. Waits until nothing is left in memory and prints "overflow
//     accepted=A spooled=S sent_from_memory=M delivered=V dropped=D files=F": the registration's
//     counters and the event files in its spool)
//   harness.exe settings --url U --spool DIR (parses hostile values of each setting with
//     ForwarderSettings.Parse and prints one line per case: "case NAME: spool=... url=...
//     token=set token_chars=N|none ca=...|none max_backoff_ms=N name=... problems=P1 | P2", or
//     "case NAME: Parse threw ...")
// Options: --token T  --seed S  --threads K  --timeout-ms MS  --initial-backoff-ms MS
//          --max-backoff-ms MS  --wait-seconds S (0: exit without waiting for delivery)
//          --invalid-every K (every K-th context has a body of some 18 KB, each of its strings
//            within the engine's 4 KiB per field: an engine with [server] max_body_bytes = 16384
//            must refuse it (413), which the forwarder, knowing only the 64 KiB the engine may
//            take at most, cannot tell beforehand)
//          --long-field-every K (every K-th context has one string over the engine's 4 KiB per
//            field: in turn a Username of 4097 characters, a ClientMachine of 1366 euro signs
//            (4098 bytes of UTF-8 in fewer characters) and a JobType of 4095 characters and a
//            lone surrogate (sent as U+FFFD, 4098 bytes); the forwarder must refuse it without
//            spooling it, so it needs no key and "spooled" counts the others. The context after
//            each has a field of exactly 4096 bytes, which must arrive)
//          --ca FILE (TrustedCaFile: a CA to trust for an https:// URL)
//          --max-spool-files N (MaxSpoolFiles)  --max-spool-bytes N (MaxSpoolBytes)
//          --max-queued-events N (MaxQueuedEvents)
//          --huge-every K (every K-th context has a string that makes its body larger than the
//            engine accepts (64 KiB): the forwarder must refuse it without spooling it, so it
//            needs no key and "spooled" counts the others)
//          --pause-after N --resume-file F (submit N contexts, wait until they are spooled, print
//            "paused N", wait until F exists, then submit the rest)
//          --hold-oldest-ms MS (once every event is spooled, open the oldest spool file without
//            sharing for MS ms, as an antivirus scan or a backup agent may: prints "holding NAME",
//            then "released NAME")
//          --alias-spool DIR2 (every other handler object is given DIR2 as its SpoolDirectory: the
//            same directory written another way)
//          --slow-log-ms MS (every line the forwarder logs takes MS ms to write: a stalled sink)
//          --budget-ms MS (burst only: the longest a RunHandler call may take; default the
//            forwarder's RunHandlerBudgetMilliseconds. A test that is about something else than
//            the budget, or that must tell a blocked call from a slow machine, sets a bound that
//            still tells them apart)
//          --broken-spool DIR3 (burst only: first, another registration with DIR3 as its
//            SpoolDirectory, which cannot be made, is handed 5 events it never writes)
//          --hold-writers 1 (burst only: the spool writers write nothing before the exit, the
//            forwarder's test hook, so every event is in memory when the process ends)
//          --hold-intake 1 (burst only: the intake thread holds the first event it takes and never
//            passes it on, the forwarder's test hook, so it is still on its way when the process
//            ends)
//          --hang-spool 1 (burst only: once every call has returned, every write to the spool hangs
//            for good, as on a disk that stopped answering; the harness holds the spool's lock)
//          --exit-file F (burst only: once "submitted" is printed, wait until F exists before
//            exiting, so the test can do something to the spool first)
//          --late-handler 1 (burst only: a ProcessExit handler that runs after the forwarder's
//            shutdown lifts any --fail-starts, waits out the retry interval of a failed start,
//            constructs another handler and calls RunHandler with it, then prints "late
//            handler: intake thread T, notices thread T" (T "none" or "started"): what a
//            handler made as the process ends would have started)
// Prints "submitted N max_ms=X" once every RunHandler has returned, "spooled N after X ms" once
// every event is on disk, then "drained" when nothing is pending and no event file is left in
// the spool directory (also files another process wrote there). Exit codes: 0 ok, 1 a
// RunHandler call broke a rule, 3 not drained in time, 2 usage.

using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Globalization;
using System.IO;
using System.Net.Http;
using System.Reflection;
using System.Text;
using System.Threading;
using Jobhook.Forwarder;
using Keyfactor.Orchestrators.Common.Enums;
using Keyfactor.Platform.Extensions;

namespace Jobhook.Forwarder.Harness
{
    /// <summary>Captures the forwarder's log: per-event lines give each event's key.</summary>
    sealed class CapturingLog : IForwarderLog
    {
        readonly object gate = new object();
        readonly Dictionary<Guid, string> keysByJobId = new Dictionary<Guid, string>();

        public void Debug(string message)
        {
            // "spooled job <JobId> as event <key>", or "sent job …" for one sent from memory
            var parts = message.Split(' ');
            Guid jobId;
            if (parts.Length != 6 || (parts[0] != "spooled" && parts[0] != "sent") || parts[1] != "job" || parts[3] != "as" || parts[4] != "event"
                || !Guid.TryParse(parts[2], out jobId))
                return;
            lock (gate)
                keysByJobId[jobId] = parts[5];
        }

        public void Info(string message) { Write("info", message); }
        public void Warn(string message) { Write("warn", message); }
        public void Error(string message) { Write("error", message); }

        static void Write(string level, string message)
        {
            Console.Error.WriteLine("forwarder " + level + ": " + message);
        }

        public string KeyOf(Guid jobId)
        {
            lock (gate)
            {
                string key;
                return keysByJobId.TryGetValue(jobId, out key) ? key : null;
            }
        }
    }

    /// <summary>
    /// A log sink that takes `ms` for every line, as NLog's file target on a hung network share
    /// or a blocking network target does; then passes the line on.
    /// </summary>
    sealed class SlowLog : IForwarderLog
    {
        readonly IForwarderLog inner;
        readonly int ms;

        public SlowLog(IForwarderLog inner, int ms)
        {
            this.inner = inner;
            this.ms = ms;
        }

        public void Debug(string message) { Thread.Sleep(ms); inner.Debug(message); }
        public void Info(string message) { Thread.Sleep(ms); inner.Info(message); }
        public void Warn(string message) { Thread.Sleep(ms); inner.Warn(message); }
        public void Error(string message) { Thread.Sleep(ms); inner.Error(message); }
    }

    /// <summary>
    /// A thread that asks to wake every millisecond and records when it woke much later: the
    /// whole process was stalled (garbage collection, or no CPU for it on a loaded machine). A
    /// RunHandler over budget is reported with the stall it overlapped, so a failure says
    /// whether the forwarder or the machine was slow. It never excuses the failure.
    /// </summary>
    sealed class StallDetector
    {
        /// <summary>A wake-up this much later than asked counts as a stall.</summary>
        const double StallMilliseconds = 10;

        readonly object gate = new object();
        readonly List<long[]> gaps = new List<long[]>();

        public static StallDetector Start()
        {
            var detector = new StallDetector();
            var thread = new Thread(detector.Run) { IsBackground = true, Name = "stall detector" };
            thread.Start();
            return detector;
        }

        void Run()
        {
            var last = Stopwatch.GetTimestamp();
            while (true)
            {
                Thread.Sleep(1);
                var now = Stopwatch.GetTimestamp();
                if ((now - last) * 1000.0 / Stopwatch.Frequency > StallMilliseconds + 1)
                    lock (gate)
                        gaps.Add(new[] { last, now });
                last = now;
            }
        }

        /// <summary>The longest stall overlapping [from, to], as text for a failure message.</summary>
        public string Describe(long from, long to)
        {
            double longest = 0;
            lock (gate)
                foreach (var gap in gaps)
                    if (gap[1] > from && gap[0] < to)
                        longest = Math.Max(longest, (gap[1] - gap[0]) * 1000.0 / Stopwatch.Frequency);
            return longest > 0
                ? " (the whole process was stalled for up to " + longest.ToString("F1", CultureInfo.InvariantCulture) + " ms meanwhile)"
                : " (no process stall was seen meanwhile)";
        }
    }

    static class Program
    {
        static readonly Encoding Utf8 = new UTF8Encoding(false);
        static readonly DateTime UnixEpoch = new DateTime(1970, 1, 1, 0, 0, 0, DateTimeKind.Utc);

        /// <summary>Strings chosen to break a hand-written JSON encoder.</summary>
        static readonly string[] Awkward =
        {
            "KFTRAIN\\SVC_Orchestrator",
            "orchestrator.kftrain.lab",
            "WinCertInventory",
            "",
            "quote \" inside",
            "back\\slash\\\\double and trailing\\",
            "\\u0041 is not an escape here",
            "tab\tnew\nline\rreturn",
            "control \u0000\u0001\u0002\u0007\b\f\u000b\u000e\u001b\u001f end",
            "del \u007f and c1 \u0080\u009f",
            "line sep \u2028 para sep \u2029",
            "</script><!-- & ' \" -->",
            "unicode: Grüße, 日本語, עברית, Ελληνικά",
            "emoji \ud83d\ude00 and \ud83c\udff3\ufe0f\u200d\ud83c\udf08",
            "lone high \ud800 surrogate",
            "lone low \udc00 surrogate",
            "bom \ufeff and nonchar \uffff",
            "{\"JobId\":\"not really\"}",
            "null",
            " leading and trailing spaces ",
        };

        /// <summary>
        /// Quotes in each string of an --invalid-every context: 6,000 bytes of JSON each
        /// (`\"`), 18,000 in all, over the 16 KiB the engine is then configured to take, while
        /// each string is 3,000 bytes, within the engine's 4 KiB per field.
        /// </summary>
        const int InvalidQuotes = 3000;

        /// <summary>The engine's limit of a string field, in bytes of UTF-8 (MAX_STRING_FIELD_BYTES).</summary>
        const int FieldBytes = 4096;

        /// <summary>A string that makes a body larger than the engine accepts at all (64 KiB).</summary>
        const int HugeStringLength = 300000;

        static int Main(string[] args)
        {
            try
            {
                return Run(args);
            }
            catch (Exception e)
            {
                Console.Error.WriteLine("harness: " + e);
                return 2;
            }
        }

        static int Run(string[] args)
        {
            if (args.Length < 1)
                return Usage("missing mode");
            var mode = args[0];
            var opts = new Dictionary<string, string>();
            for (int i = 1; i + 1 < args.Length; i += 2)
            {
                if (!args[i].StartsWith("--", StringComparison.Ordinal))
                    return Usage("unexpected " + args[i]);
                opts[args[i].Substring(2)] = args[i + 1];
            }
            if (!opts.ContainsKey("url") || !opts.ContainsKey("spool"))
                return Usage("--url and --spool are required");

            // Before the forwarder does anything: its first thread may be the one that fails.
            if (opts.ContainsKey("fail-starts"))
                FailThreadStarts(Get(opts, "fail-thread", null), int.Parse(opts["fail-starts"], CultureInfo.InvariantCulture));
            var log = new CapturingLog();
            int slowLogMs = int.Parse(Get(opts, "slow-log-ms", "0"), CultureInfo.InvariantCulture);
#if KEYFACTOR_LOGGING
            // Only where Keyfactor's logger writes is set; the forwarder must choose that logger.
            Keyfactor.Logging.LogHandler.Sink = (name, level, message) =>
            {
                if (slowLogMs > 0)
                    Thread.Sleep(slowLogMs);
                if (level == Microsoft.Extensions.Logging.LogLevel.Debug)
                    log.Debug(message);
                Console.Error.WriteLine("keyfactor log " + name + " " + level + ": " + message);
            };
#else
            ForwarderLog.Current = slowLogMs > 0 ? (IForwarderLog)new SlowLog(log, slowLogMs) : log;
#endif
            var options = new JobhookForwarder.Options
            {
                JobTypes = "49b3a17d-7a3c-4d8e-9d0e-1c2b3a4d5e6f",
                EngineUrl = opts["url"],
                BearerToken = Get(opts, "token", null),
                SpoolDirectory = opts["spool"],
                RequestTimeoutMs = Get(opts, "timeout-ms", null),
                InitialBackoffMs = Get(opts, "initial-backoff-ms", null),
                MaxBackoffMs = Get(opts, "max-backoff-ms", null),
                TrustedCaFile = Get(opts, "ca", null),
                MaxSpoolFiles = Get(opts, "max-spool-files", null),
                MaxSpoolBytes = Get(opts, "max-spool-bytes", null),
                MaxQueuedEvents = Get(opts, "max-queued-events", null),
                DebugLog = "true",
            };
            int waitSeconds = int.Parse(Get(opts, "wait-seconds", "120"), CultureInfo.InvariantCulture);
            var spoolDirectory = opts["spool"];
            var aliasSpool = Get(opts, "alias-spool", null);

            if (mode == "drain")
            {
                var forwarder = Construct(options, null);
                if (!forwarder.Start())
                {
                    Console.Error.WriteLine("harness: the forwarder did not start");
                    return 1;
                }
                return WaitForDrain(forwarder, spoolDirectory, waitSeconds);
            }
            if (mode == "burst")
                return Burst(options, opts);
            if (mode == "faults")
                return Faults(options, opts, spoolDirectory, waitSeconds);
            if (mode == "memory")
                return Memory(options, opts);
            if (mode == "moving")
                return Moving(options, opts);
            if (mode == "logjam")
                return LogJam(options, opts, log);
            if (mode == "settings")
                return Settings(options);
            if (mode == "overflow")
                return Overflow(options, opts, spoolDirectory);
            if (mode == "pending")
                return PendingPerRegistration(options, spoolDirectory, log);
            if (mode != "run")
                return Usage("unknown mode " + mode);
            if (!opts.ContainsKey("count") || !opts.ContainsKey("expected"))
                return Usage("run needs --count and --expected");
            int count = int.Parse(opts["count"], CultureInfo.InvariantCulture);
            int seed = int.Parse(Get(opts, "seed", "1"), CultureInfo.InvariantCulture);
            int threads = int.Parse(Get(opts, "threads", "4"), CultureInfo.InvariantCulture);
            int invalidEvery = int.Parse(Get(opts, "invalid-every", "0"), CultureInfo.InvariantCulture);
            int hugeEvery = int.Parse(Get(opts, "huge-every", "0"), CultureInfo.InvariantCulture);
            int longFieldEvery = int.Parse(Get(opts, "long-field-every", "0"), CultureInfo.InvariantCulture);
            int pauseAfter = int.Parse(Get(opts, "pause-after", "0"), CultureInfo.InvariantCulture);
            var resumeFile = Get(opts, "resume-file", null);
            int holdOldestMs = int.Parse(Get(opts, "hold-oldest-ms", "0"), CultureInfo.InvariantCulture);
            if (pauseAfter > 0 && (resumeFile == null || pauseAfter >= count))
                return Usage("--pause-after needs --resume-file and fewer than --count contexts");

            var contexts = new OrchestratorJobCompleteHandlerContext[count];
            var random = new Random(seed);
            var keyfactorClient = new HttpClient(); // what Keyfactor hands every handler; unused by the forwarder
            var invalid = new bool[count];
            // Refused by the forwarder itself, before it is spooled: no key, never sent.
            var refused = new bool[count];
            int refusedCount = 0;
            int longFields = 0;
            for (int i = 0; i < count; i++)
            {
                contexts[i] = MakeContext(i, random, keyfactorClient);
                if (hugeEvery > 0 && i % hugeEvery == hugeEvery - 1)
                {
                    // A body of some 300 KB: over the engine's 64 KiB, and bigger than most of
                    // a small spool's byte limit.
                    contexts[i].Username = new string('h', HugeStringLength);
                    invalid[i] = refused[i] = true;
                    refusedCount++;
                    continue;
                }
                if (longFieldEvery > 0 && i % longFieldEvery == longFieldEvery - 1)
                {
                    // One string over the engine's 4 KiB per field, each way it can be.
                    switch (longFields++ % 3)
                    {
                        case 0: contexts[i].Username = new string('y', FieldBytes + 1); break;
                        case 1: contexts[i].ClientMachine = new string('\u20ac', FieldBytes / 3 + 1); break;
                        default: contexts[i].JobType = new string('j', FieldBytes - 1) + "\ud800"; break;
                    }
                    invalid[i] = refused[i] = true;
                    refusedCount++;
                    continue;
                }
                if (longFieldEvery > 0 && i % longFieldEvery == 0 && i > 0)
                {
                    // Exactly the engine's limit: taken.
                    contexts[i].ClientMachine = new string('\u20ac', FieldBytes / 3) + "x";
                    continue;
                }
                if (invalidEvery > 0 && i % invalidEvery == invalidEvery - 1)
                {
                    // A body over what the engine is configured to take, made of strings it
                    // takes: it must answer 413, and the forwarder must set the event aside
                    // instead of retrying it for ever.
                    contexts[i].Username = contexts[i].ClientMachine = contexts[i].JobType = new string('"', InvalidQuotes);
                    invalid[i] = true;
                }
            }

            var stalls = StallDetector.Start();
            var failures = new List<string>();
            var overruns = new List<long[]>(); // context index, start, end (Stopwatch timestamps)
            var durations = new double[count];
            long maxTicks = 0;
            int next = -1;
            var expected = new string[count];
            // Calls RunHandler for contexts [next + 1, end) from `threads` threads, like
            // concurrent orchestrator check-ins.
            Action<int> submitUpTo = end =>
            {
                var workers = new Thread[threads];
                for (int t = 0; t < threads; t++)
                {
                    workers[t] = new Thread(() =>
                    {
                        JobhookForwarder forwarder = null;
                        while (true)
                        {
                            int i = Interlocked.Increment(ref next);
                            if (i >= end)
                            {
                                Interlocked.Decrement(ref next);
                                break;
                            }
                            // Unity may build a handler per resolution: a new object now and then.
                            if (forwarder == null || i % 10 == 0)
                                forwarder = Construct(options, aliasSpool != null && (i / 10) % 2 == 1 ? aliasSpool : null);
                            var startedAt = Stopwatch.GetTimestamp();
                            var clock = Stopwatch.StartNew();
                            var failure = Call(forwarder, contexts[i]);
                            clock.Stop();
                            durations[i] = clock.Elapsed.TotalMilliseconds;
                            lock (failures)
                            {
                                if (clock.ElapsedTicks > maxTicks)
                                    maxTicks = clock.ElapsedTicks;
                                if (failure != null)
                                    failures.Add("context " + i + ": " + failure);
                                if (clock.Elapsed > JobhookForwarder.RunHandlerBudget)
                                    overruns.Add(new long[] { i, startedAt, Stopwatch.GetTimestamp() });
                            }
                        }
                    });
                    workers[t].Start();
                }
                foreach (var worker in workers)
                    worker.Join();
            };
            if (pauseAfter > 0)
            {
                submitUpTo(pauseAfter);
                var watcher = Construct(options, null);
                var pauseDeadline = DateTime.UtcNow.AddSeconds(60);
                while (watcher.Counters.Spooled < pauseAfter && DateTime.UtcNow < pauseDeadline)
                    Thread.Sleep(5);
                Console.WriteLine("paused " + watcher.Counters.Spooled);
                Console.Out.Flush();
                while (!File.Exists(resumeFile))
                    Thread.Sleep(10);
            }
            submitUpTo(count);
            // Described after the fact, once the stall detector has seen every stall.
            Thread.Sleep(50);
            foreach (var overrun in overruns)
                failures.Add("context " + overrun[0] + ": RunHandler took "
                             + Ms((overrun[2] - overrun[1]) * 1000.0 / Stopwatch.Frequency) + " ms; the budget is "
                             + JobhookForwarder.RunHandlerBudgetMilliseconds + " ms" + stalls.Describe(overrun[1], overrun[2]));

            // The key is logged by the forwarder's spool writer once the event is on disk, which
            // may take a moment for the last few events.
            var keysDeadline = DateTime.UtcNow.AddSeconds(30);
            for (int i = 0; i < count; i++)
                while (!refused[i] && log.KeyOf(contexts[i].JobId) == null && DateTime.UtcNow < keysDeadline)
                    Thread.Sleep(10);
            for (int i = 0; i < count; i++)
            {
                var key = log.KeyOf(contexts[i].JobId);
                if (key == null && !refused[i])
                    failures.Add("context " + i + ": the forwarder logged no idempotency key for it");
                expected[i] = ExpectedLine(key ?? "-", contexts[i]) + (invalid[i] ? "\tinvalid" : "\tvalid");
            }
            File.WriteAllLines(opts["expected"], expected, Utf8);
            var submittedAt = Stopwatch.GetTimestamp();
            double maxMs = maxTicks * 1000.0 / Stopwatch.Frequency;
            var sorted = (double[])durations.Clone();
            Array.Sort(sorted);
            if (count > 0)
                Console.Error.WriteLine("harness: RunHandler ms: median " + Ms(sorted[count / 2]) + ", p99 " + Ms(sorted[count * 99 / 100])
                                        + ", max " + Ms(sorted[count - 1]) + "; first calls " + Ms(durations[0]) + " " + (count > 1 ? Ms(durations[1]) : ""));
            Console.WriteLine("submitted " + count + " max_ms=" + maxMs.ToString("F2", CultureInfo.InvariantCulture));
            Console.Out.Flush();
            foreach (var failure in failures)
                Console.Error.WriteLine("harness: " + failure);
            if (failures.Count > 0)
                return 1;
            if (waitSeconds == 0)
                return 0;
            // RunHandler returns before the event is on disk; say when all of them are, so a
            // test can tell "spooled" (must survive a kill) from "handed over" (may not).
            var observer = Construct(options, null);
            var spoolDeadline = DateTime.UtcNow.AddSeconds(waitSeconds);
            // Every event was written (a full spool drops older files as newer ones are written,
            // so this counts writes, not files), or sent from memory while the spool could not
            // be written; the harness never fills the in-memory queues.
            while (observer.Counters.Spooled + observer.Counters.SentFromMemory < count - refusedCount && DateTime.UtcNow < spoolDeadline)
                Thread.Sleep(5);
            Console.WriteLine("spooled " + observer.Counters.Spooled + " after "
                              + Ms((Stopwatch.GetTimestamp() - submittedAt) * 1000.0 / Stopwatch.Frequency) + " ms"
                              + " (sent from memory " + observer.Counters.SentFromMemory + ")");
            Console.Out.Flush();
            if (holdOldestMs > 0)
                HoldOldest(spoolDirectory, holdOldestMs);
            return WaitForDrain(observer, spoolDirectory, waitSeconds);
        }

        /// <summary>
        /// `burst`: calls RunHandler for --count contexts from --threads threads, checks every
        /// call like `run`, prints "submitted N max_ms=X", and returns from Main at once: a
        /// normal process exit (an iisreset, an app pool recycle) while events are still in the
        /// forwarder's memory. Exit code 0, or 1 if a call broke a rule.
        /// </summary>
        static int Burst(JobhookForwarder.Options options, Dictionary<string, string> opts)
        {
            int count = int.Parse(opts["count"], CultureInfo.InvariantCulture);
            int threads = int.Parse(Get(opts, "threads", "4"), CultureInfo.InvariantCulture);
            double budgetMs = double.Parse(
                Get(opts, "budget-ms", JobhookForwarder.RunHandlerBudgetMilliseconds.ToString(CultureInfo.InvariantCulture)),
                CultureInfo.InvariantCulture);
            var random = new Random(int.Parse(Get(opts, "seed", "1"), CultureInfo.InvariantCulture));
            var contexts = new OrchestratorJobCompleteHandlerContext[count];
            for (int i = 0; i < count; i++)
                contexts[i] = MakeContext(i, random, null);
            // --broken-spool DIR: first, another registration whose spool directory cannot be
            // made, with a few events in its memory (it never writes them).
            // --hold-writers 1: the spool writers write nothing until the exit (the forwarder's
            // test hook), so that every event is in memory when it comes.
            if (Get(opts, "hold-writers", "0") == "1")
                typeof(JobhookForwarder).Assembly.GetType("Jobhook.Forwarder.ForwarderRuntime", true)
                    .GetField("holdWritersForTest", BindingFlags.NonPublic | BindingFlags.Static)
                    .SetValue(null, new ManualResetEvent(false));
            // --hold-intake 1: the intake thread holds the first event it takes for good (the
            // forwarder's test hook, as a registration's start-up that hangs would hold it), so
            // that event is still on its way to a runtime when the process ends.
            if (Get(opts, "hold-intake", "0") == "1")
                typeof(JobhookForwarder).Assembly.GetType("Jobhook.Forwarder.Intake", true)
                    .GetField("holdForTest", BindingFlags.NonPublic | BindingFlags.Static)
                    .SetValue(null, new ManualResetEvent(false));
            var brokenSpool = Get(opts, "broken-spool", null);
            if (brokenSpool != null)
            {
                var broken = Construct(options, brokenSpool);
                for (int i = 0; i < 5; i++)
                    broken.RunHandler(MakeContext(count + i, random, null));
            }
            var forwarder = Construct(options, null);
            var stalls = StallDetector.Start();
            var failures = new List<string>();
            long maxTicks = 0;
            int next = -1;
            var workers = new Thread[threads];
            for (int t = 0; t < threads; t++)
            {
                workers[t] = new Thread(() =>
                {
                    int i;
                    while ((i = Interlocked.Increment(ref next)) < count)
                    {
                        var startedAt = Stopwatch.GetTimestamp();
                        var failure = Call(forwarder, contexts[i]);
                        var endedAt = Stopwatch.GetTimestamp();
                        lock (failures)
                        {
                            maxTicks = Math.Max(maxTicks, endedAt - startedAt);
                            if (failure != null)
                                failures.Add("context " + i + ": " + failure);
                            else if ((endedAt - startedAt) * 1000.0 / Stopwatch.Frequency > budgetMs)
                                failures.Add("context " + i + ": RunHandler took " + Ms((endedAt - startedAt) * 1000.0 / Stopwatch.Frequency)
                                             + " ms; the bound is " + Ms(budgetMs) + " ms"
                                             + stalls.Describe(startedAt, endedAt));
                        }
                    }
                });
                workers[t].Start();
            }
            foreach (var worker in workers)
                worker.Join();
            // --hang-spool 1: once every call has returned, every write to the spool hangs, as on
            // a disk that stopped answering: a harness thread takes the spool's own lock (its
            // private field, through reflection) and never lets it go.
            if (Get(opts, "hang-spool", "0") == "1" && !HangSpool(forwarder))
                failures.Add("the spool did not open, so it could not be hung");
            Console.WriteLine("submitted " + count + " max_ms=" + Ms(maxTicks * 1000.0 / Stopwatch.Frequency));
            Console.Out.Flush();
            if (Get(opts, "late-handler", "0") == "1")
                AppDomain.CurrentDomain.ProcessExit += (sender, e) => LateHandler(options, MakeContext(count, random, null));
            // --exit-file F: the exit waits until F exists (the test changes the spool first).
            var exitFile = Get(opts, "exit-file", null);
            while (exitFile != null && !File.Exists(exitFile))
                Thread.Sleep(10);
            foreach (var failure in failures)
                Console.Error.WriteLine("harness: " + failure);
            return failures.Count > 0 ? 1 : 0;
        }

        /// <summary>
        /// `--late-handler` (see the top of this file): runs after the forwarder's own shutdown
        /// handler, registered before it by the first handler made. Never throws.
        /// </summary>
        static void LateHandler(JobhookForwarder.Options options, OrchestratorJobCompleteHandlerContext context)
        {
            try
            {
                FailThreadStarts(null, 0);
                // Past ForwarderThreads.RetryInterval (1 s): a start that failed is due again.
                Thread.Sleep(1500);
                var late = Construct(options, null);
                late.RunHandler(context);
                Func<string, string> started = type =>
                    typeof(JobhookForwarder).Assembly.GetType("Jobhook.Forwarder." + type, true)
                        .GetField("thread", BindingFlags.NonPublic | BindingFlags.Static).GetValue(null) == null ? "none" : "started";
                Console.WriteLine("late handler: intake thread " + started("Intake") + ", notices thread " + started("Notices"));
            }
            catch (Exception e)
            {
                Console.WriteLine("late handler: " + e);
            }
            Console.Out.Flush();
        }

        /// <summary>
        /// `--hang-spool` (see <see cref="Burst"/>): waits for the handler's spool to open, then
        /// holds the spool's lock on a background thread for good, so that every write (which
        /// names its file under that lock) hangs. False if the spool did not open within 30 s.
        /// </summary>
        static bool HangSpool(JobhookForwarder forwarder)
        {
            const BindingFlags Private = BindingFlags.NonPublic | BindingFlags.Instance;
            var runtime = typeof(JobhookForwarder).GetMethod("Runtime", Private).Invoke(forwarder, null);
            var spoolField = runtime.GetType().GetField("spool", Private);
            var deadline = DateTime.UtcNow.AddSeconds(30);
            object spool;
            while ((spool = spoolField.GetValue(runtime)) == null && DateTime.UtcNow < deadline)
                Thread.Sleep(10);
            if (spool == null)
                return false;
            var gate = spool.GetType().GetField("gate", Private).GetValue(spool);
            var held = new ManualResetEvent(false);
            new Thread(() =>
            {
                // Entered and never exited, not even when the runtime aborts this thread at the
                // process's end: a `lock` block would let go in its finally, and a flush still
                // waiting past its deadline would then write one event after it was reported
                // lost (a disk that hangs does not recover because the process is ending).
                Monitor.Enter(gate);
                held.Set();
                Thread.Sleep(Timeout.Infinite);
            }) { IsBackground = true, Name = "hung spool disk" }.Start();
            return held.WaitOne(TimeSpan.FromSeconds(30));
        }

        /// <summary>
        /// A log sink that hangs on every line until it is opened, as NLog on a share that stopped
        /// answering, and then writes through; counts the per-event detail lines it was given and
        /// sums the counts of the lines saying how many lines were dropped.
        /// </summary>
        sealed class GatedLog : IForwarderLog
        {
            readonly IForwarderLog inner;
            readonly ManualResetEvent open = new ManualResetEvent(false);
            const string DroppedPrefix = "the log sink was too slow: ";
            long detail;
            long dropped;
            int droppedLines;

            public GatedLog(IForwarderLog inner)
            {
                this.inner = inner;
            }

            public void Open() { open.Set(); }
            public long Detail { get { return Interlocked.Read(ref detail); } }
            public long Dropped { get { return Interlocked.Read(ref dropped); } }
            public int DroppedLines { get { return Volatile.Read(ref droppedLines); } }

            public void Debug(string message)
            {
                open.WaitOne();
                Interlocked.Increment(ref detail);
                inner.Debug(message);
            }

            public void Info(string message) { open.WaitOne(); inner.Info(message); }

            public void Warn(string message)
            {
                open.WaitOne();
                if (message.StartsWith(DroppedPrefix, StringComparison.Ordinal))
                {
                    var number = message.Substring(DroppedPrefix.Length).Split(' ')[0];
                    Interlocked.Add(ref dropped, long.Parse(number, CultureInfo.InvariantCulture));
                    Interlocked.Increment(ref droppedLines);
                }
                inner.Warn(message);
            }

            public void Error(string message) { open.WaitOne(); inner.Error(message); }
        }

        /// <summary>`moving` (see the top of this file). Exit code 0, 1 if a call broke a rule or the spool did not open.</summary>
        static int Moving(JobhookForwarder.Options options, Dictionary<string, string> opts)
        {
            int count = int.Parse(opts["count"], CultureInfo.InvariantCulture);
            int rounds = int.Parse(Get(opts, "rounds", "1"), CultureInfo.InvariantCulture);
            var assembly = typeof(JobhookForwarder).Assembly;
            // The spool writers keep every event in memory (nothing leaves: no event is on disk).
            assembly.GetType("Jobhook.Forwarder.ForwarderRuntime", true)
                .GetField("holdWritersForTest", BindingFlags.NonPublic | BindingFlags.Static)
                .SetValue(null, new ManualResetEvent(false));
            var holdIntake = assembly.GetType("Jobhook.Forwarder.Intake", true)
                .GetField("holdForTest", BindingFlags.NonPublic | BindingFlags.Static);
            var forwarder = Construct(options, null);
            forwarder.Start();
            var deadline = DateTime.UtcNow.AddSeconds(30);
            while (forwarder.PendingEvents < 0 && DateTime.UtcNow < deadline)
                Thread.Sleep(10);
            if (forwarder.PendingEvents < 0)
            {
                Console.Error.WriteLine("harness: the spool did not open");
                return 1;
            }
            var random = new Random(1);
            var failures = new List<string>();
            long reads = 0, wrong = 0;
            string first = null;
            for (int round = 1; round <= rounds; round++)
            {
                // The intake thread holds the first event of the round until all are queued.
                var hold = new ManualResetEvent(false);
                holdIntake.SetValue(null, hold);
                for (int i = 0; i < count; i++)
                {
                    var failure = Call(forwarder, MakeContext(i, random, null));
                    if (failure != null)
                        failures.Add("context " + i + ": " + failure);
                }
                long expected = (long)round * count;
                // Every event accepted so far is in memory and none can leave: PendingEvents must
                // say so at every moment while the intake thread moves them to the runtime's queue.
                // Two threads read, so that one reads while the other is preempted.
                holdIntake.SetValue(null, null);
                var start = new ManualResetEvent(false);
                int thisRound = round;
                bool late = false;
                ThreadStart read = () =>
                {
                    start.WaitOne();
                    var until = DateTime.UtcNow.AddSeconds(60);
                    bool moved = false;
                    while (!moved)
                    {
                        if (DateTime.UtcNow > until)
                        {
                            late = true;
                            return;
                        }
                        moved = Intake.Count == 0;
                        var pending = forwarder.PendingEvents;
                        Interlocked.Increment(ref reads);
                        if (pending != expected && Interlocked.Increment(ref wrong) == 1)
                            first = "round " + thisRound + ": " + pending + " instead of " + expected;
                    }
                };
                var readers = new[] { new Thread(read), new Thread(read) };
                foreach (var reader in readers)
                    reader.Start();
                start.Set();
                hold.Set();
                foreach (var reader in readers)
                    reader.Join();
                if (late)
                {
                    Console.Error.WriteLine("harness: round " + round + ": the events were not moved within 60 s");
                    return 1;
                }
            }
            Console.WriteLine("moving events=" + (long)rounds * count + " reads=" + reads + " wrong=" + wrong
                              + (first != null ? " first: " + first : ""));
            Console.Out.Flush();
            foreach (var failure in failures)
                Console.Error.WriteLine("harness: " + failure);
            return failures.Count > 0 ? 1 : 0;
        }

        /// <summary>`logjam` (see the top of this file). Exit code 0, 1 if a call broke a rule or the spool did not take every event.</summary>
        static int LogJam(JobhookForwarder.Options options, Dictionary<string, string> opts, IForwarderLog log)
        {
            int count = int.Parse(opts["count"], CultureInfo.InvariantCulture);
            var gated = new GatedLog(log);
            ForwarderLog.Current = gated;
            var random = new Random(1);
            var forwarder = Construct(options, null);
            var failures = new List<string>();
            for (int i = 0; i < count; i++)
            {
                var failure = Call(forwarder, MakeContext(i, random, null));
                if (failure != null)
                    failures.Add("context " + i + ": " + failure);
            }
            // Every event is spooled (one detail line each) while the sink hangs on its first line.
            var deadline = DateTime.UtcNow.AddSeconds(60);
            while (forwarder.Counters.Spooled < count && DateTime.UtcNow < deadline)
                Thread.Sleep(10);
            Console.WriteLine("spooled " + forwarder.Counters.Spooled);
            Console.Out.Flush();
            gated.Open();
            // The count of the dropped lines is written once the queued lines are.
            deadline = DateTime.UtcNow.AddSeconds(60);
            while ((gated.DroppedLines == 0 || gated.Detail + gated.Dropped < count) && DateTime.UtcNow < deadline)
                Thread.Sleep(10);
            Console.WriteLine("log detail=" + gated.Detail + " dropped=" + gated.Dropped + " reports=" + gated.DroppedLines);
            Console.Out.Flush();
            foreach (var failure in failures)
                Console.Error.WriteLine("harness: " + failure);
            return failures.Count > 0 ? 1 : 0;
        }

        /// <summary>
        /// Makes the next `count` starts of a forwarder thread whose name contains `of` (any,
        /// if null) fail, through the forwarder's internal test hook (ForwarderThreads).
        /// </summary>
        static void FailThreadStarts(string of, int count)
        {
            var type = typeof(JobhookForwarder).Assembly.GetType("Jobhook.Forwarder.ForwarderThreads", true);
            type.GetField("failStartsOf", BindingFlags.NonPublic | BindingFlags.Static).SetValue(null, of);
            type.GetField("failStarts", BindingFlags.NonPublic | BindingFlags.Static).SetValue(null, count);
        }

        /// <summary>`faults` (see the top of this file). Exit code 0, 1 if a call broke a rule, 3 if not drained.</summary>
        static int Faults(JobhookForwarder.Options options, Dictionary<string, string> opts, string spoolDirectory, int waitSeconds)
        {
            int count = int.Parse(opts["count"], CultureInfo.InvariantCulture);
            int intervalMs = int.Parse(Get(opts, "interval-ms", "50"), CultureInfo.InvariantCulture);
            var random = new Random(1);
            var forwarder = Construct(options, null);
            var failures = new List<string>();
            for (int i = 0; i < count; i++)
            {
                var context = MakeContext(i, random, null);
                var clock = Stopwatch.StartNew();
                var failure = Call(forwarder, context);
                clock.Stop();
                if (failure != null)
                    failures.Add("context " + i + ": " + failure);
                else if (clock.Elapsed > JobhookForwarder.RunHandlerBudget)
                    failures.Add("context " + i + ": RunHandler took " + Ms(clock.Elapsed.TotalMilliseconds) + " ms; the budget is "
                                 + JobhookForwarder.RunHandlerBudgetMilliseconds + " ms");
                Thread.Sleep(intervalMs);
            }
            Console.WriteLine("submitted " + count);
            Console.Out.Flush();
            foreach (var failure in failures)
                Console.Error.WriteLine("harness: " + failure);
            if (failures.Count > 0)
                return 1;
            return WaitForDrain(forwarder, spoolDirectory, waitSeconds);
        }

        /// <summary>`memory` (see the top of this file). Exit code 0, or 1 if a call broke a rule.</summary>
        static int Memory(JobhookForwarder.Options options, Dictionary<string, string> opts)
        {
            int count = int.Parse(opts["count"], CultureInfo.InvariantCulture);
            int chars = int.Parse(opts["field-chars"], CultureInfo.InvariantCulture);
            int hugeCount = int.Parse(Get(opts, "huge", "0"), CultureInfo.InvariantCulture);
            var random = new Random(1);
            var forwarder = Construct(options, null);
            forwarder.Start();
            var failures = new List<string>();
            var big = new string(Get(opts, "escaped", "0") == "1" ? '"' : 'm', chars);
            var huge = new string('h', HugeStringLength);
            for (int i = 0; i < hugeCount + count; i++)
            {
                var context = MakeContext(i, random, null);
                if (i < hugeCount)
                    context.Username = huge;
                else
                    context.Username = context.ClientMachine = context.JobType = big;
                var failure = Call(forwarder, context);
                if (failure != null)
                    failures.Add("context " + i + ": " + failure);
            }
            Thread.Sleep(3000);
            GC.Collect();
            GC.WaitForPendingFinalizers();
            GC.Collect();
            var counters = forwarder.Counters;
            Console.WriteLine("memory intake=" + Intake.Count + " accepted=" + counters.Accepted + " dropped=" + counters.Dropped
                              + " too_large=" + counters.TooLarge + " managed_mb=" + GC.GetTotalMemory(true) / (1024 * 1024));
            Console.Out.Flush();
            foreach (var failure in failures)
                Console.Error.WriteLine("harness: " + failure);
            return failures.Count > 0 ? 1 : 0;
        }

        /// <summary>`overflow` (see the top of this file). Exit code 0, 1 if a call broke a rule or memory did not empty.</summary>
        static int Overflow(JobhookForwarder.Options options, Dictionary<string, string> opts, string spoolDirectory)
        {
            int count = int.Parse(opts["count"], CultureInfo.InvariantCulture);
            int threads = int.Parse(Get(opts, "threads", "1"), CultureInfo.InvariantCulture);
            var random = new Random(1);
            var contexts = new OrchestratorJobCompleteHandlerContext[count];
            for (int i = 0; i < count; i++)
                contexts[i] = MakeContext(i, random, null);
            var forwarder = Construct(options, null);
            forwarder.Start();
            var deadline = DateTime.UtcNow.AddSeconds(30);
            while (forwarder.PendingEvents < 0 && DateTime.UtcNow < deadline)
                Thread.Sleep(10);
            var pauseFile = Get(opts, "pause-file", null);
            if (pauseFile != null)
            {
                Console.WriteLine("opened");
                Console.Out.Flush();
                while (!File.Exists(pauseFile))
                    Thread.Sleep(10);
            }
            var failures = new List<string>();
            int next = -1;
            var workers = new Thread[threads];
            for (int t = 0; t < threads; t++)
            {
                workers[t] = new Thread(() =>
                {
                    int i;
                    while ((i = Interlocked.Increment(ref next)) < count)
                    {
                        var failure = Call(forwarder, contexts[i]);
                        if (failure != null)
                            lock (failures)
                                failures.Add("context " + i + ": " + failure);
                    }
                });
                workers[t].Start();
            }
            foreach (var worker in workers)
                worker.Join();
            // Once every event has left memory, what is pending is what the spool holds (nothing
            // is delivered from it: no engine, or a spool that takes no file).
            deadline = DateTime.UtcNow.AddSeconds(60);
            bool settled = false;
            while (!settled && DateTime.UtcNow < deadline)
            {
                Thread.Sleep(100);
                settled = Intake.Count == 0 && forwarder.PendingEvents == EventFiles(spoolDirectory).Length;
            }
            if (!settled)
                failures.Add("events were still in memory after 60 s: " + forwarder.PendingEvents + " pending, "
                             + EventFiles(spoolDirectory).Length + " event file(s)");
            var counters = forwarder.Counters;
            Console.WriteLine("overflow accepted=" + counters.Accepted + " spooled=" + counters.Spooled
                              + " sent_from_memory=" + counters.SentFromMemory + " delivered=" + counters.Delivered
                              + " dropped=" + counters.Dropped + " files=" + EventFiles(spoolDirectory).Length);
            Console.Out.Flush();
            foreach (var failure in failures)
                Console.Error.WriteLine("harness: " + failure);
            return failures.Count > 0 ? 1 : 0;
        }

        /// <summary>`settings` (see the top of this file). Exit code 0.</summary>
        static int Settings(JobhookForwarder.Options good)
        {
            var spool = good.SpoolDirectory;
            var cases = new List<KeyValuePair<string, Action<JobhookForwarder.Options>>>
            {
                Case("spool-nul", o => o.SpoolDirectory = spool + "\0x"),
                Case("spool-quoted", o => o.SpoolDirectory = "\"" + spool + "\""),
                Case("spool-pipe", o => o.SpoolDirectory = spool + "|x"),
                Case("spool-zero-width", o => o.SpoolDirectory = spool + "\u200Bx"),
                Case("spool-nul-and-unseen", o => o.SpoolDirectory = spool + "\0\uFEFFx"),
                Case("ca-bidi", o => o.TrustedCaFile = spool + "/\u202Eca.pem"),
                Case("spool-root", o => o.SpoolDirectory = Path.GetPathRoot(spool)),
                Case("spool-root-dots", o => o.SpoolDirectory = Path.Combine(spool, "..", "..", "..", "..", "..", "..", "..", "..", "..", "..")),
                Case("ca-nul", o => o.TrustedCaFile = spool + "\0ca.pem"),
                Case("ca-quoted", o => o.TrustedCaFile = "\"" + spool + "/ca.pem\""),
                Case("ca-http", o => o.TrustedCaFile = spool + "/ca.pem"),
                Case("ca-relative", o => o.TrustedCaFile = "ca.pem"),
                Case("url-endpoint", o => o.EngineUrl = good.EngineUrl.TrimEnd('/') + "/v1/job-complete"),
                Case("url-endpoint-slash", o => o.EngineUrl = good.EngineUrl.TrimEnd('/') + "/prefix/v1/job-complete/"),
                Case("token-bearer", o => o.BearerToken = "Bearer abc.def"),
                Case("token-long", o => o.BearerToken = new string('a', ForwarderSettings.MaxTextLength + 1)),
                Case("token-space", o => o.BearerToken = "abc def"),
                Case("token-bearer-only", o => o.BearerToken = "Bearer "),
                Case("token-bearer-padded", o => o.BearerToken = "  bearer \t "),
                Case("token-bearer-word", o => o.BearerToken = "Bearer"),
                Case("token-bearer-tab", o => o.BearerToken = " Bearer\tabc.def "),
                Case("backoff", o => { o.InitialBackoffMs = "5000"; o.MaxBackoffMs = "1000"; }),
                Case("name-empty", o => o.ForwarderName = ""),
                Case("name-blank", o => o.ForwarderName = " \r\n\t "),
                Case("name-padded", o => o.ForwarderName = "  kf-node-1  "),
                Case("name-long", o => o.ForwarderName = new string('n', ForwarderSettings.MaxNameLength + 10)),
                Case("name-spaced", o => o.ForwarderName = "kf node 1"),
                // Every option but the two required here blank: each is unset, none a problem.
                Case("all-blank", o =>
                {
                    const string blank = " \r\n\t ";
                    o.BearerToken = o.RequestTimeoutMs = o.InitialBackoffMs = o.MaxBackoffMs = blank;
                    o.MaxSpoolFiles = o.MaxSpoolBytes = o.MaxQueuedEvents = o.TrustedCaFile = blank;
                    o.UseProxy = o.DebugLog = o.ForwarderName = blank;
                }),
            };
            foreach (var c in cases)
            {
                var options = new JobhookForwarder.Options
                {
                    JobTypes = good.JobTypes, EngineUrl = good.EngineUrl, SpoolDirectory = good.SpoolDirectory,
                };
                c.Value(options);
                string line;
                try
                {
                    var s = ForwarderSettings.Parse(options);
                    // The token itself is never printed, only its length.
                    line = "spool=" + s.SpoolDirectory + " url=" + s.JobCompleteUrl
                           + " token=" + (s.BearerToken != null ? "set token_chars=" + s.BearerToken.Length : "none")
                           + " ca=" + (s.TrustedCaFile ?? "none") + " max_backoff_ms=" + s.MaxBackoff.TotalMilliseconds
                           + " name=" + s.ForwarderName + " problems=" + string.Join(" | ", s.Problems);
                }
                catch (Exception e)
                {
                    line = "Parse threw " + e.GetType().Name + ": " + e.Message;
                }
                Console.WriteLine("case " + c.Key + ": " + LogText.Printable(line));
            }
            Console.Out.Flush();
            return 0;
        }

        static KeyValuePair<string, Action<JobhookForwarder.Options>> Case(string name, Action<JobhookForwarder.Options> change)
        {
            return new KeyValuePair<string, Action<JobhookForwarder.Options>>(name, change);
        }

        /// <summary>`pending` (see the top of this file). Exit code 0, or 1 if a spool did not open.</summary>
        static int PendingPerRegistration(JobhookForwarder.Options options, string spoolDirectory, IForwarderLog log)
        {
            // Set up with a prompt log (each runtime keeps the log it started with).
            ForwarderLog.Current = log;
            var a = Construct(options, Path.Combine(spoolDirectory, "a"));
            var b = Construct(options, Path.Combine(spoolDirectory, "b"));
            a.Start();
            b.Start();
            var deadline = DateTime.UtcNow.AddSeconds(30);
            while ((a.PendingEvents < 0 || b.PendingEvents < 0) && DateTime.UtcNow < deadline)
                Thread.Sleep(10);
            if (a.PendingEvents < 0 || b.PendingEvents < 0)
            {
                Console.Error.WriteLine("harness: the spools did not open");
                return 1;
            }
            // The intake thread is held with the third registration's event, through the
            // forwarder's internal test hook, until the counts are taken.
            var hold = new ManualResetEvent(false);
            var intake = typeof(JobhookForwarder).Assembly.GetType("Jobhook.Forwarder.Intake", true);
            var holdField = intake.GetField("holdForTest", BindingFlags.NonPublic | BindingFlags.Static);
            var inFlight = intake.GetField("inFlight", BindingFlags.NonPublic | BindingFlags.Static);
            holdField.SetValue(null, hold);
            var random = new Random(1);
            var c = Construct(options, Path.Combine(spoolDirectory, "c"));
            c.RunHandler(MakeContext(0, random, null));
            // The intake thread has taken it before the others come.
            var taken = DateTime.UtcNow.AddSeconds(30);
            while ((int)inFlight.GetValue(null) != 1 && DateTime.UtcNow < taken)
                Thread.Sleep(10);
            if ((int)inFlight.GetValue(null) != 1)
            {
                Console.Error.WriteLine("harness: the intake thread did not take the first event");
                return 1;
            }
            for (int i = 0; i < 5; i++)
                a.RunHandler(MakeContext(i, random, null));
            for (int i = 0; i < 7; i++)
                b.RunHandler(MakeContext(i, random, null));
            Console.WriteLine("pending a=" + a.PendingEvents + " b=" + b.PendingEvents);
            Console.Out.Flush();
            holdField.SetValue(null, null);
            hold.Set();
            return 0;
        }

        /// <summary>
        /// Holds the oldest spool file open without sharing for `ms`, as an antivirus scan or a
        /// backup agent may (Mono enforces FileShare between the streams of one process).
        /// </summary>
        static void HoldOldest(string spoolDirectory, int ms)
        {
            var names = EventFiles(spoolDirectory);
            if (names.Length == 0)
            {
                Console.WriteLine("nothing to hold");
                return;
            }
            Array.Sort(names, StringComparer.Ordinal);
            var name = Path.GetFileName(names[0]);
            using (new FileStream(names[0], FileMode.Open, FileAccess.ReadWrite, FileShare.None))
            {
                Console.WriteLine("holding " + name);
                Console.Out.Flush();
                Thread.Sleep(ms);
            }
            Console.WriteLine("released " + name);
            Console.Out.Flush();
        }

        /// <summary>The complete event files in the spool directory (none if it is gone).</summary>
        static string[] EventFiles(string spoolDirectory)
        {
            try
            {
                return Array.FindAll(Directory.GetFiles(spoolDirectory, "*" + Spool.EventExtension),
                                     path => Spool.IsOwnEventName(Path.GetFileName(path)));
            }
            catch (DirectoryNotFoundException)
            {
                return new string[0];
            }
        }

        /// <summary>A handler as Keyfactor builds one; `spoolDirectory` replaces the options' when given.</summary>
        static JobhookForwarder Construct(JobhookForwarder.Options options, string spoolDirectory)
        {
#if KEYFACTOR_11
            // The Extension Loader: manifest.json "Options" through IOptions<Options>.
            var copy = new JobhookForwarder.Options
            {
                JobTypes = options.JobTypes, EngineUrl = options.EngineUrl, BearerToken = options.BearerToken,
                SpoolDirectory = spoolDirectory ?? options.SpoolDirectory, RequestTimeoutMs = options.RequestTimeoutMs,
                InitialBackoffMs = options.InitialBackoffMs, MaxBackoffMs = options.MaxBackoffMs,
                TrustedCaFile = options.TrustedCaFile, MaxSpoolFiles = options.MaxSpoolFiles, MaxSpoolBytes = options.MaxSpoolBytes,
                MaxQueuedEvents = options.MaxQueuedEvents, DebugLog = options.DebugLog,
            };
            return new JobhookForwarder(Microsoft.Extensions.Options.Options.Create(copy));
#else
            // Unity: parameterless constructor, then one setter per <property> element.
            return new JobhookForwarder
            {
                JobTypes = options.JobTypes,
                EngineUrl = options.EngineUrl,
                BearerToken = options.BearerToken,
                SpoolDirectory = spoolDirectory ?? options.SpoolDirectory,
                RequestTimeoutMs = options.RequestTimeoutMs,
                InitialBackoffMs = options.InitialBackoffMs,
                MaxBackoffMs = options.MaxBackoffMs,
                TrustedCaFile = options.TrustedCaFile,
                MaxSpoolFiles = options.MaxSpoolFiles,
                MaxSpoolBytes = options.MaxSpoolBytes,
                MaxQueuedEvents = options.MaxQueuedEvents,
                DebugLog = options.DebugLog,
            };
#endif
        }

        /// <summary>
        /// Waits until nothing is pending in this process and no event file is left in the spool
        /// directory: PendingEvents counts only what this process knows of, not files another
        /// process put there.
        /// </summary>
        static int WaitForDrain(JobhookForwarder forwarder, string spoolDirectory, int waitSeconds)
        {
            var deadline = DateTime.UtcNow.AddSeconds(waitSeconds);
            while (DateTime.UtcNow < deadline)
            {
                if (forwarder.PendingEvents == 0 && EventFiles(spoolDirectory).Length == 0)
                {
                    Console.WriteLine("drained " + forwarder.Counters);
                    Console.Out.Flush();
                    return 0;
                }
                Thread.Sleep(50);
            }
            Console.WriteLine("not drained: " + forwarder.PendingEvents + " pending, " + EventFiles(spoolDirectory).Length
                              + " event file(s) in the spool; " + forwarder.Counters);
            return 3;
        }

        static OrchestratorJobCompleteHandlerContext MakeContext(int i, Random random, HttpClient client)
        {
            int[] results = { 0, 1, 2, 3, 4, 5, 99, -1, int.MaxValue, int.MinValue };
            int[] operations = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, -5, int.MaxValue, int.MinValue };
            int?[] certificateIds = { null, 0, 1, -1, int.MaxValue, int.MinValue, 14 };
            int[] retries = { 0, 1, 5, int.MaxValue, int.MinValue, -1 };
            return new OrchestratorJobCompleteHandlerContext
            {
                AgentId = i % 17 == 0 ? Guid.Empty : Guid.NewGuid(),
                Username = PickString(i, random, 0),
                ClientMachine = PickString(i, random, 7),
                JobResult = (OrchestratorJobStatusJobResult)results[i % results.Length],
                JobId = Guid.NewGuid(), // unique: how the test tells events apart
                JobType = PickString(i, random, 13),
                JobTypeId = Guid.NewGuid(),
                OperationType = (CertStoreOperationType)operations[i % operations.Length],
                CertificateId = i % 3 == 0 ? certificateIds[(i / 3) % certificateIds.Length] : random.Next(int.MinValue, int.MaxValue),
                RequestTimestamp = PickTimestamp(i, random),
                CurrentRetryCount = i % 2 == 0 ? retries[(i / 2) % retries.Length] : random.Next(0, 1000),
                Client = i % 2 == 0 ? client : null,
            };
        }

        static string PickString(int i, Random random, int shift)
        {
            int choice = (i + shift) % (Awkward.Length + 4);
            if (choice < Awkward.Length)
                return Awkward[choice];
            switch (choice - Awkward.Length)
            {
                case 0: return null; // .NET allows it; the engine stores ""
                case 1: return new string('x', 3000); // long, under the engine's 4 KiB per field
                case 2: return RandomString(random, 1 + random.Next(60));
                default: return new string('\u20ac', 1000); // 3000 UTF-8 bytes
            }
        }

        /// <summary>Random characters from every part of the BMP and beyond, surrogates paired.</summary>
        static string RandomString(Random random, int length)
        {
            var text = new StringBuilder();
            for (int k = 0; k < length; k++)
            {
                switch (random.Next(4))
                {
                    case 0: text.Append((char)random.Next(0, 0x80)); break;
                    case 1: text.Append((char)random.Next(0x80, 0xD800)); break;
                    case 2: text.Append((char)random.Next(0xE000, 0x10000)); break;
                    default: text.Append(char.ConvertFromUtf32(random.Next(0x10000, 0x110000))); break;
                }
            }
            return text.ToString();
        }

        static DateTime? PickTimestamp(int i, Random random)
        {
            // Ticks anywhere from 1900 to 2100, with sub-second digits down to 100 ns.
            long ticks = new DateTime(1900, 1, 1).Ticks + (long)(random.NextDouble() * (new DateTime(2100, 1, 1).Ticks - new DateTime(1900, 1, 1).Ticks));
            switch (i % 7)
            {
                case 0: return null;
                case 1: return new DateTime(ticks, DateTimeKind.Utc);
                case 2: return new DateTime(ticks, DateTimeKind.Local);
                case 3: return new DateTime(ticks, DateTimeKind.Unspecified);
                case 4: return DateTime.SpecifyKind(DateTime.MinValue, DateTimeKind.Unspecified);
                case 5: return DateTime.SpecifyKind(DateTime.MaxValue, DateTimeKind.Utc);
                default: return new DateTime(2023, 5, 3, 23, 18, 48, DateTimeKind.Unspecified); // Keyfactor's sample
            }
        }

        /// <summary>
        /// key, AgentId, Username, ClientMachine, JobResult, JobId, JobType, JobTypeId,
        /// OperationType, CertificateId, RequestTimestamp, CurrentRetryCount — tab-separated
        /// (the caller appends "valid" or "invalid");
        /// strings as base64 of UTF-8 (a lone surrogate becomes U+FFFD, as .NET encodes it),
        /// null strings as "" (the engine stores them so), enums as the number the engine keeps
        /// (see <see cref="EngineNumber"/>), the timestamp as UTC 100 ns ticks since
        /// the Unix epoch, or "null".
        /// </summary>
        static string ExpectedLine(string key, OrchestratorJobCompleteHandlerContext c)
        {
            int result = EngineNumber(c.JobResult.ToString(), (int)c.JobResult, EngineJobResults);
            int operation = EngineNumber(c.OperationType.ToString(), (int)c.OperationType, EngineOperationTypes);
            string timestamp = "null";
            if (c.RequestTimestamp.HasValue)
            {
                var t = c.RequestTimestamp.Value;
                var utc = t.Kind == DateTimeKind.Local ? t.ToUniversalTime() : DateTime.SpecifyKind(t, DateTimeKind.Utc);
                timestamp = (utc.Ticks - UnixEpoch.Ticks).ToString(CultureInfo.InvariantCulture);
            }
            return string.Join("\t", new[]
            {
                key,
                c.AgentId.ToString("D"),
                B64(c.Username),
                B64(c.ClientMachine),
                result.ToString(CultureInfo.InvariantCulture),
                c.JobId.ToString("D"),
                B64(c.JobType),
                c.JobTypeId.ToString("D"),
                operation.ToString(CultureInfo.InvariantCulture),
                c.CertificateId.HasValue ? c.CertificateId.Value.ToString(CultureInfo.InvariantCulture) : "null",
                timestamp,
                c.CurrentRetryCount.ToString(CultureInfo.InvariantCulture),
            });
        }

        /// <summary>The engine's JobResult names, by the engine's number (host/src/context.rs).</summary>
        static readonly string[] EngineJobResults = { "Unknown", "InProcess", "Success", "Warning", "Failure" };
        /// <summary>The engine's OperationType names, by the engine's number.</summary>
        static readonly string[] EngineOperationTypes =
        {
            "Unknown", "Inventory", "Add", "Remove", "Create", "CreateAdd", "Reenrollment", "Discovery", "SetPassword", "FetchLogs",
        };

        /// <summary>
        /// The number the engine stores for an enum value, written independently of the
        /// forwarder: a name the engine knows is stored as that name whatever .NET's number for
        /// it (the shim's numbers may differ, see the "renum" build); any other value is sent
        /// as its number, which the engine keeps when it is one of its own and maps to 0
        /// (Unknown) otherwise.
        /// </summary>
        static int EngineNumber(string name, int number, string[] engineNames)
        {
            int byName = Array.IndexOf(engineNames, name);
            if (byName >= 0)
                return byName;
            return number >= 0 && number < engineNames.Length ? number : 0;
        }

        /// <summary>Calls RunHandler once: what broke a rule (it threw, or returned false), or null.</summary>
        static string Call(JobhookForwarder forwarder, OrchestratorJobCompleteHandlerContext context)
        {
            try
            {
                return forwarder.RunHandler(context) ? null : "RunHandler returned false";
            }
            catch (Exception e)
            {
                return "RunHandler threw " + e;
            }
        }

        static string Ms(double value)
        {
            return value.ToString("F2", CultureInfo.InvariantCulture);
        }

        static string B64(string text)
        {
            return Convert.ToBase64String(Utf8.GetBytes(text ?? ""));
        }

        static string Get(Dictionary<string, string> opts, string name, string fallback)
        {
            string value;
            return opts.TryGetValue(name, out value) ? value : fallback;
        }

        static int Usage(string problem)
        {
            Console.Error.WriteLine("harness: " + problem);
            Console.Error.WriteLine("usage: harness.exe run|drain|burst|pending|faults|memory|moving|logjam|overflow|settings --url U --spool DIR [--count N --expected FILE] [--token T] [--seed S] [--threads K]"
                                    + " [--timeout-ms MS] [--initial-backoff-ms MS] [--max-backoff-ms MS] [--wait-seconds S] [--invalid-every K] [--huge-every K] [--long-field-every K] [--ca FILE] [--max-spool-files N] [--max-spool-bytes N] [--max-queued-events N]"
                                    + " [--pause-after N --resume-file F] [--hold-oldest-ms MS] [--alias-spool DIR2] [--slow-log-ms MS]");
            return 2;
        }
    }
}
