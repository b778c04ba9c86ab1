// Every thread the forwarder starts is made here: background, named, and started or not at
// all. A process that has run out of threads or memory (Keyfactor's worker after a leak
// elsewhere) makes Thread.Start throw; each caller keeps no half-started thread and tries
// again later, so one failed start never stops forwarding for the life of the process.

using System;
using System.Diagnostics;
using System.Threading;

namespace Jobhook.Forwarder
{
    /// <summary>Starts the forwarder's threads.</summary>
    internal static class ForwarderThreads
    {
        /// <summary>Every thread's name starts so: a thread dump shows whose threads they are.</summary>
        internal const string NamePrefix = "jobhook-forwarder ";

        /// <summary>
        /// How often a thread that could not start is tried again, at most (each at the next
        /// occasion: an event, a count): often enough that nothing waits long once the process
        /// has threads again, rarely enough that a process out of threads does not pay for a
        /// failed start on every event.
        /// </summary>
        internal static readonly TimeSpan RetryInterval = TimeSpan.FromSeconds(1);

        /// <summary>Whether <see cref="RetryInterval"/> has passed since `failedAt` (Stopwatch ticks; monotonic).</summary>
        internal static bool RetryDue(long failedAt)
        {
            return Stopwatch.GetTimestamp() - failedAt >= (long)(RetryInterval.TotalSeconds * Stopwatch.Frequency);
        }

        /// <summary>
        /// Test hook: this many of the next starts of a thread whose name contains
        /// <see cref="failStartsOf"/> (any thread when null) throw, as in a process out of
        /// threads. Set only by the test harness, through reflection; no setting reaches it.
        /// </summary>
        static int failStarts = 0;
        /// <summary>Test hook: see <see cref="failStarts"/>.</summary>
        static string failStartsOf = null;

        /// <summary>
        /// Starts a background thread named "jobhook-forwarder `name`" running `body`, and
        /// returns it; throws if it could not be started (the caller tries again later).
        /// </summary>
        internal static Thread Start(ThreadStart body, string name)
        {
            var thread = new Thread(body) { IsBackground = true, Name = NamePrefix + name };
            if (Volatile.Read(ref failStarts) > 0)
            {
                var of = failStartsOf;
                if ((of == null || name.IndexOf(of, StringComparison.Ordinal) >= 0) && Interlocked.Decrement(ref failStarts) >= 0)
                    throw new OutOfMemoryException("the thread \"" + thread.Name + "\" could not be started (a start failure the test harness asked for)");
            }
            thread.Start();
            return thread;
        }
    }
}
