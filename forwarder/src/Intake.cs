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
    /// </summary>
    public static class Intake
    {
        /// <summary>
        /// Most events waiting for the intake thread. It keeps up with thousands per second; this
        /// only fills if that thread is starved for a long time, and bounds memory if it is.
        /// </summary>
        public const int Capacity = 10000;

        sealed class Pending
        {
            public JobhookForwarder Handler;
            public ContextSnapshot Context;
        }

        static readonly object gate = new object();
        static readonly Queue<Pending> queue = new Queue<Pending>();
        static readonly AutoResetEvent signal = new AutoResetEvent(false);
        static Thread thread;
        static long dropped;
        /// <summary>1 while the intake thread holds an event it has taken from the queue.</summary>
        static int inFlight;

        /// <summary>Events not yet passed on to a runtime (queued, or being serialised).</summary>
        public static int Count
        {
            get { lock (gate) return queue.Count + inFlight; }
        }

        /// <summary>
        /// Queues one event and returns at once. Never throws for a full queue: the oldest waiting
        /// event is dropped and logged.
        /// </summary>
        public static void Submit(JobhookForwarder handler, ContextSnapshot context)
        {
            var pending = new Pending { Handler = handler, Context = context };
            Pending oldest = null;
            lock (gate)
            {
                StartLocked();
                queue.Enqueue(pending);
                if (queue.Count > Capacity)
                    oldest = queue.Dequeue();
            }
            signal.Set();
            if (oldest != null)
            {
                var count = Interlocked.Increment(ref dropped);
                ForwarderLog.Current.Warn("the intake queue is full (" + Capacity + " events): dropped job "
                                          + oldest.Context.JobId.ToString("D") + " (" + count + " dropped since start)");
            }
        }

        /// <summary>Starts the intake thread if it is not running (once per process).</summary>
        public static void Start()
        {
            lock (gate)
                StartLocked();
        }

        static void StartLocked()
        {
            if (thread != null)
                return;
            thread = new Thread(Loop) { IsBackground = true, Name = "jobhook-forwarder intake" };
            thread.Start();
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
                        if (queue.Count > 0)
                        {
                            next = queue.Dequeue();
                            inFlight = 1;
                        }
                    }
                    if (next == null)
                    {
                        signal.WaitOne();
                        continue;
                    }
                    var runtime = next.Handler.Runtime();
                    if (runtime == null)
                        continue;
                    runtime.Submit(ContextJson.Serialize(next.Context), next.Context.JobId);
                }
                catch (ThreadAbortException)
                {
                    throw; // the process or app domain is going away (iisreset): not an error
                }
                catch (Exception e)
                {
                    // Keep the intake alive whatever happens; only this event is lost.
                    try { ForwarderLog.Current.Error("intake: an event could not be queued: " + e); } catch { }
                }
            }
        }
    }
}
