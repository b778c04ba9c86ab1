// Every thread the forwarder starts is made here: background, named, and started or not at
// all. A process that has run out of threads or memory (Keyfactor's worker after a leak
// elsewhere) makes Thread.Start throw; each caller keeps no half-started thread and tries
// again later, so one failed start never stops forwarding for the life of the process.
//
// Once the process has begun to end, only the threads the shutdown itself needs and waits for
// start. Any other thread starting then may still be running its first code as the runtime
// tears down, and Mono aborts the whole process (SIGABRT) when a type initialiser is cut short
// there: a process that ends must end cleanly, whatever it was doing.

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

        /// <summary>Set once the process or app domain has begun to end (<see cref="ProcessEnding"/>).</summary>
        static volatile bool ending;

        /// <summary>
        /// Whether the process or app domain has begun to end: a thread that is not the
        /// shutdown's own is then not started (callers look first and count no failure).
        /// </summary>
        internal static bool ProcessEnding { get { return ending; } }

        /// <summary>From now on, only threads started with `forShutdown` start. Never throws.</summary>
        internal static void BeginProcessEnd()
        {
            ending = true;
        }

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
        /// returns it; throws if it could not be started (the caller tries again later), or if
        /// the process has begun to end and `forShutdown` is not set: only a thread the
        /// shutdown needs, and waits for within its deadline, may start then.
        /// </summary>
        internal static Thread Start(ThreadStart body, string name, bool forShutdown = false)
        {
            if (ending && !forShutdown)
                throw new InvalidOperationException("the thread \"" + NamePrefix + name + "\" was not started: the process is ending");
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
