// The Job Complete Handler that Keyfactor Command loads. It does as little as possible on
// Keyfactor's thread: copy the context's fields, queue them (Intake), return true. It does not
// even wait for the disk: a thread that blocks must be scheduled again, and on a busy server that
// alone can cost more than the budget. Delivery to the engine happens on a background thread
// (ForwarderRuntime), so a slow, down or misbehaving engine never slows an orchestrator check-in.
//
// One source, two registrations, chosen at compile time:
// - default (Command 9.x-10.x, .NET Framework 4.7.2): Unity creates the class with its
//   parameterless constructor and sets the public string properties from the `<property>`
//   elements of the `<register>` block in WebAgentServices\web.config;
// - KEYFACTOR_11 (Command 11+, net6.0/net8.0): the Extension Loader passes the "Options" object
//   of manifest.json through the IOptions<Options> constructor; the Options type must be the
//   nested class <namespace>.<type>.Options.

using System;
using System.Reflection;
using System.Runtime.CompilerServices;
using System.Threading;
using Keyfactor.Platform.Extensions;
#if KEYFACTOR_11
using Microsoft.Extensions.Options;
#endif

namespace Jobhook.Forwarder
{
    /// <summary>
    /// Forwards every job completion context to jobhook's <c>POST /v1/job-complete</c>, through a
    /// durable spool on local disk. <see cref="RunHandler"/> always returns true within
    /// <see cref="RunHandlerBudget"/> and never throws.
    /// </summary>
    public class JobhookForwarder : IOrchestratorJobCompleteHandler
    {
        /// <summary>
        /// The longest <see cref="RunHandler"/> may take, in milliseconds. Keyfactor runs handlers
        /// on the orchestrator's check-in request; 50 ms is invisible next to that request's own
        /// database work. RunHandler itself only copies 11 fields into a queue (about 1 ms at
        /// worst, measured); the rest of the budget is room for a busy server's scheduler.
        /// </summary>
        public const int RunHandlerBudgetMilliseconds = 50;

        /// <summary><see cref="RunHandlerBudgetMilliseconds"/> as a TimeSpan.</summary>
        public static readonly TimeSpan RunHandlerBudget = TimeSpan.FromMilliseconds(RunHandlerBudgetMilliseconds);

        /// <summary>
        /// Prepares the hot path once per process, when Keyfactor first constructs a handler:
        /// JIT-compiles RunHandler and what it calls, and starts the intake thread. Measured under
        /// Mono on a loaded machine, a first RunHandler that paid for this took 40-90 ms.
        /// Best effort: a failure here only means the first call pays instead.
        /// </summary>
        static JobhookForwarder()
        {
            try
            {
                RuntimeHelpers.PrepareMethod(typeof(JobhookForwarder).GetMethod("RunHandler").MethodHandle);
                RuntimeHelpers.PrepareMethod(typeof(JobhookForwarder).GetMethod("Handle", BindingFlags.NonPublic | BindingFlags.Instance).MethodHandle);
                RuntimeHelpers.PrepareMethod(typeof(ContextSnapshot).GetConstructors()[0].MethodHandle);
                RuntimeHelpers.PrepareMethod(typeof(Intake).GetMethod("Submit").MethodHandle);
                Intake.Start();
            }
            catch
            {
            }
        }

        readonly Options options;

#if KEYFACTOR_11
        /// <summary>
        /// Command 11+: the Extension Loader passes the manifest's "Options". Never throws: a
        /// configuration error is logged and the handler still spools (when it can) so nothing is
        /// lost while the configuration is fixed.
        /// </summary>
        public JobhookForwarder(IOptions<Options> options)
        {
            // Before anything is logged (this runs at the loader's start-up, not in RunHandler).
            ForwarderLog.UseKeyfactorLogger(this);
            Options value = null;
            try
            {
                value = options == null ? null : options.Value;
            }
            catch (Exception e)
            {
                LogQueue.Wrap(ForwarderLog.Current).Error("reading the Options of manifest.json failed: " + e.Message);
            }
            this.options = value ?? new Options();
            // The loader builds the handler at start-up: start the sender now so that a spool
            // left by the previous process is delivered without waiting for the next job.
            Start();
        }

        /// <summary>The job type GUIDs this registration runs for (from the manifest's Options).</summary>
        public string JobTypes
        {
            get { return options.JobTypes; }
        }
#else
        /// <summary>Command 9-10: Unity constructs the handler, then sets the properties.</summary>
        public JobhookForwarder()
        {
            options = new Options();
        }

        /// <summary>Required by Keyfactor: comma-separated job type GUIDs this registration runs for.</summary>
        public string JobTypes { get { return options.JobTypes; } set { options.JobTypes = value; } }
        /// <summary>See <see cref="Options.EngineUrl"/>.</summary>
        public string EngineUrl { get { return options.EngineUrl; } set { options.EngineUrl = value; } }
        /// <summary>See <see cref="Options.BearerToken"/>.</summary>
        public string BearerToken { get { return options.BearerToken; } set { options.BearerToken = value; } }
        /// <summary>See <see cref="Options.SpoolDirectory"/>.</summary>
        public string SpoolDirectory { get { return options.SpoolDirectory; } set { options.SpoolDirectory = value; } }
        /// <summary>See <see cref="Options.RequestTimeoutMs"/>.</summary>
        public string RequestTimeoutMs { get { return options.RequestTimeoutMs; } set { options.RequestTimeoutMs = value; } }
        /// <summary>See <see cref="Options.InitialBackoffMs"/>.</summary>
        public string InitialBackoffMs { get { return options.InitialBackoffMs; } set { options.InitialBackoffMs = value; } }
        /// <summary>See <see cref="Options.MaxBackoffMs"/>.</summary>
        public string MaxBackoffMs { get { return options.MaxBackoffMs; } set { options.MaxBackoffMs = value; } }
        /// <summary>See <see cref="Options.MaxSpoolFiles"/>.</summary>
        public string MaxSpoolFiles { get { return options.MaxSpoolFiles; } set { options.MaxSpoolFiles = value; } }
        /// <summary>See <see cref="Options.MaxSpoolBytes"/>.</summary>
        public string MaxSpoolBytes { get { return options.MaxSpoolBytes; } set { options.MaxSpoolBytes = value; } }
        /// <summary>See <see cref="Options.MaxQueuedEvents"/>.</summary>
        public string MaxQueuedEvents { get { return options.MaxQueuedEvents; } set { options.MaxQueuedEvents = value; } }
        /// <summary>See <see cref="Options.TrustedCaFile"/>.</summary>
        public string TrustedCaFile { get { return options.TrustedCaFile; } set { options.TrustedCaFile = value; } }
        /// <summary>See <see cref="Options.UseProxy"/>.</summary>
        public string UseProxy { get { return options.UseProxy; } set { options.UseProxy = value; } }
        /// <summary>See <see cref="Options.DebugLog"/>.</summary>
        public string DebugLog { get { return options.DebugLog; } set { options.DebugLog = value; } }
        /// <summary>The name the engine shows for this forwarder (default: the machine name).</summary>
        public string ForwarderName { get { return options.ForwarderName; } set { options.ForwarderName = value; } }
#endif

        /// <summary>
        /// Called by Keyfactor after an orchestrator job completes. Returns true (the event is in
        /// the forwarder's hands; delivery is the forwarder's business, not the orchestrator's)
        /// within <see cref="RunHandlerBudget"/>, and never throws.
        /// </summary>
        public bool RunHandler(OrchestratorJobCompleteHandlerContext context)
        {
            try
            {
                Handle(context);
            }
            catch (Exception e)
            {
                // Whatever happened, Keyfactor's check-in must go on. Counted on this class,
                // never on Intake: the failure may be that Intake's type cannot be initialised.
                Interlocked.Increment(ref failedCalls);
                try { CountFailure(e); } catch { }
            }
            return true;
        }

        /// <summary>
        /// RunHandler's work, in a method of its own that is never inlined: the runtime loads
        /// and initialises the types a method uses when it compiles that method (Mono does so
        /// for Intake's static fields), so a type that cannot be initialised throws at the call
        /// of this method, inside RunHandler's try, never from RunHandler itself into Keyfactor.
        /// </summary>
        [MethodImpl(MethodImplOptions.NoInlining)]
        void Handle(OrchestratorJobCompleteHandlerContext context)
        {
            // Nothing here logs: a slow log sink must not slow Keyfactor's thread. What goes
            // wrong is counted and reported by a background thread (Notices).
            if (context == null)
            {
                Intake.NoContext.Add(null);
                return;
            }
            // Copy the fields and hand them over; the intake thread does the rest.
            var snapshot = new ContextSnapshot(context);
            Intake.Submit(this, snapshot);
        }

        /// <summary>RunHandler calls that failed (an exception caught) since the process started.</summary>
        static long failedCalls;

        /// <summary>RunHandler calls that failed since the process started (each one's event is lost).</summary>
        internal static long FailedCalls
        {
            get { return Interlocked.Read(ref failedCalls); }
        }

        /// <summary>The report of <see cref="failedCalls"/>, made at the first failure.</summary>
        static RateLimitedCount handlerFailed;

        /// <summary>Counts a failed RunHandler call for the notices thread's report. Not inlined, like <see cref="Handle"/>.</summary>
        [MethodImpl(MethodImplOptions.NoInlining)]
        static void CountFailure(Exception e)
        {
            if (handlerFailed == null)
                Interlocked.CompareExchange(ref handlerFailed, new RateLimitedCount("RunHandler failed; the event(s) are lost", null, true), null);
            handlerFailed.Add(e.GetType().Name + ": " + e.Message);
        }

        /// <summary>
        /// Starts the spool writer and the sender for this registration's spool directory if they
        /// are not running yet (RunHandler does this itself). Command 9-10 loads handlers lazily,
        /// so a host that wants a left-over spool delivered at once may call this. Never throws.
        /// </summary>
        public bool Start()
        {
            try
            {
                return Runtime() != null;
            }
            catch (Exception e)
            {
                try { LogQueue.Wrap(ForwarderLog.Current).Error("starting the forwarder failed: " + e); } catch { }
                return false;
            }
        }

        /// <summary>
        /// Events accepted by RunHandler and not yet delivered or given up: in memory and in the
        /// spool directory. -1 while the spool directory is not open (yet).
        /// </summary>
        public long PendingEvents
        {
            get
            {
                var runtime = Runtime();
                if (runtime == null)
                    return -1;
                // Both counts in one step with the intake thread's hand-over: an event on its
                // way from the intake to the runtime is counted once, not twice or not at all.
                lock (Intake.HandOver)
                {
                    var spooled = runtime.PendingEvents;
                    // Only the intake's events for this spool: another registration's are its own.
                    return spooled < 0 ? -1 : spooled + Intake.CountFor(runtime);
                }
            }
        }

        /// <summary>Counters of what the forwarder did since the process started.</summary>
        public ForwarderCounters Counters
        {
            get
            {
                var runtime = Runtime();
                return runtime == null ? new ForwarderCounters() : runtime.Snapshot();
            }
        }

        /// <summary>
        /// The shared runtime for this registration's spool directory, looked up once per
        /// handler instance (Unity may create an instance per resolution; the runtime, its
        /// threads and its HttpClient are per process and spool directory).
        /// </summary>
        internal ForwarderRuntime Runtime()
        {
            var current = runtime;
            if (current != null)
                return current;
            // The runtime keeps the log it starts with: Keyfactor's logger, when built with it,
            // must be in place first. Here the handler object is at hand, and this runs on the
            // intake thread or at start-up, not on Keyfactor's RunHandler call.
            ForwarderLog.UseKeyfactorLogger(this);
            current = ForwarderRuntime.Obtain(options);
            runtime = current;
            return current;
        }

        volatile ForwarderRuntime runtime;

        /// <summary>This handler's runtime if it has one already, else null. Starts nothing: for RunHandler's path.</summary>
        internal ForwarderRuntime StartedRuntime
        {
            get { return runtime; }
        }

        /// <summary>
        /// Whether this handler's events go to `runtime`: the runtime it has, or, before it has
        /// one, the runtime of its spool directory. Starts nothing. Not for RunHandler's path.
        /// </summary>
        internal bool Feeds(ForwarderRuntime other)
        {
            var current = runtime;
            if (current != null)
                return ReferenceEquals(current, other);
            var directory = spoolDirectory;
            if (directory == null)
                spoolDirectory = directory = ForwarderSettings.SpoolDirectoryOf(options);
            return ForwarderRuntime.SameSpool(directory, other);
        }

        /// <summary>This handler's spool directory as the runtimes are keyed, once <see cref="Feeds"/> needed it.</summary>
        volatile string spoolDirectory;

        /// <summary>
        /// The settings of one registration, all strings as Keyfactor passes them (web.config
        /// `&lt;property value="..."&gt;` or manifest.json "Options"). They are parsed and checked
        /// by <see cref="ForwarderSettings.Parse"/>; a bad value is logged and replaced by its
        /// default, never thrown.
        /// </summary>
        public class Options
        {
            /// <summary>Required by Keyfactor: comma-separated job type GUIDs. Not used by the forwarder itself.</summary>
            public string JobTypes { get; set; }
            /// <summary>Required: the engine's base URL, e.g. <c>https://jobhook.example.com:8443</c>.</summary>
            public string EngineUrl { get; set; }
            /// <summary>A token the engine accepts (<c>server.tokens</c>); sent as <c>Authorization: Bearer</c>.</summary>
            public string BearerToken { get; set; }
            /// <summary>Where events wait for delivery; one directory per registration.</summary>
            public string SpoolDirectory { get; set; }
            /// <summary>Timeout of one POST, in ms (default 10000).</summary>
            public string RequestTimeoutMs { get; set; }
            /// <summary>First retry delay after a failed POST, in ms (default 1000); doubled per failure.</summary>
            public string InitialBackoffMs { get; set; }
            /// <summary>Longest retry delay, in ms (default 60000).</summary>
            public string MaxBackoffMs { get; set; }
            /// <summary>Most events kept in the spool (default 100000); the oldest are dropped beyond it.</summary>
            public string MaxSpoolFiles { get; set; }
            /// <summary>Most bytes kept in the spool (default 268435456); the oldest are dropped beyond it.</summary>
            public string MaxSpoolBytes { get; set; }
            /// <summary>Most events waiting in memory for their spool file (default 10000).</summary>
            public string MaxQueuedEvents { get; set; }
            /// <summary>A CA certificate (PEM or DER) to trust for an <c>https://</c> engine, besides the system store.</summary>
            public string TrustedCaFile { get; set; }
            /// <summary>"true" to reach the engine through the system proxy (default: direct).</summary>
            public string UseProxy { get; set; }
            /// <summary>"true" to log one line per event spooled and delivered.</summary>
            public string DebugLog { get; set; }
            /// <summary>
            /// The name the engine shows for this forwarder in GET /v1/forwarders (default: the
            /// machine name), sent as X-Jobhook-Forwarder.
            /// </summary>
            public string ForwarderName { get; set; }
        }
    }
}
