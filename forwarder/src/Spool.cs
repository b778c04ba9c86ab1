// The durable spool: one file per event in a local directory, so that events survive an engine
// outage and a restart of Keyfactor's process (iisreset, app pool recycle).

using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.Globalization;
using System.IO;
using System.Text;
using System.Text.RegularExpressions;
using System.Threading;

namespace Jobhook.Forwarder
{
    /// <summary>One spooled event as read back from its file.</summary>
    public sealed class SpooledEvent
    {
        /// <summary>The file name (not the path).</summary>
        public string Name;
        /// <summary>The idempotency key chosen when Keyfactor handed over the event.</summary>
        public string Key;
        /// <summary>The JSON body to POST.</summary>
        public string Body;
    }

    /// <summary>
    /// The spool directory. A file is `&lt;UTC ticks&gt;-&lt;sequence&gt;-&lt;key&gt;.evt`, so the name
    /// order is the arrival order and names from two processes never collide. The ticks never
    /// go back (<see cref="NameTicks"/>), even when the clock does, so the oldest event is
    /// still the first name. Its content is
    /// three lines: <see cref="Header"/>, the idempotency key, the JSON body. A file is written
    /// as `*.tmp`, flushed to disk and renamed, so a reader never sees half an event; a `*.tmp`
    /// left by a crash is deleted at start-up once it is old enough (<see cref="LeftoverTempAge"/>). All methods are thread-safe and never throw.
    /// The index of the files is built at start-up and kept up to date by this process; files
    /// another process puts in the directory are found by <see cref="Rescan"/>.
    /// </summary>
    public sealed class Spool
    {
        /// <summary>First line of every spool file: the format and its version.</summary>
        public const string Header = "jobhook-forwarder-spool 1";
        /// <summary>Extension of a complete spool file.</summary>
        public const string EventExtension = ".evt";
        /// <summary>Extension of a file being written.</summary>
        public const string TempExtension = ".tmp";
        /// <summary>
        /// The name of a spool file this forwarder writes (see <see cref="Write"/>): UTC ticks (19
        /// digits), a sequence (10 digits), the idempotency key (a GUID's 32 lower-case hex
        /// digits), `.evt`. Only such names (and the same with <see cref="TempExtension"/>) are
        /// indexed, sent, set aside or deleted: a SpoolDirectory that also holds other files
        /// (`C:\Windows\Temp`, a drive's root) loses none of them.
        /// </summary>
        static readonly Regex OwnName = new Regex(
            @"\A[0-9]{19}-[0-9]{10}-[0-9a-f]{32}\.evt\z", RegexOptions.CultureInvariant);

        /// <summary>Whether `name` (a file name, not a path) is one of this forwarder's event files.</summary>
        public static bool IsOwnEventName(string name)
        {
            return name != null && OwnName.IsMatch(name);
        }

        /// <summary>Whether `name` is one of this forwarder's files being written (an event file's name and <see cref="TempExtension"/>).</summary>
        static bool IsOwnTempName(string name)
        {
            return name != null && name.EndsWith(TempExtension, StringComparison.Ordinal)
                   && IsOwnEventName(name.Substring(0, name.Length - TempExtension.Length));
        }
        /// <summary>
        /// How old an own `*.tmp` must be (by its last write) before <see cref="Open"/> takes it
        /// for a crash's leftover and deletes it. A write holds its `*.tmp` for milliseconds
        /// (create, write, flush, rename), seconds on a disk that stalls; a younger one may be
        /// another live process's write under way on the same spool (the old worker of an IIS
        /// overlapped recycle), and deleting it would make that write fail. A younger leftover
        /// is never sent and is deleted at a later start.
        /// </summary>
        public static readonly TimeSpan LeftoverTempAge = TimeSpan.FromMinutes(10);

        /// <summary>Whether the file at `path` was last written at least <see cref="LeftoverTempAge"/> ago.</summary>
        static bool IsLeftover(string path)
        {
            try
            {
                var written = File.GetLastWriteTimeUtc(path);
                // A clock set back makes a file look younger: kept until a later start. One
                // whose time is far in the future (a clock that ran ahead) is no live write.
                var age = DateTime.UtcNow - written;
                return age >= LeftoverTempAge || age < -LeftoverTempAge;
            }
            catch (Exception)
            {
                return false; // gone meanwhile, or unreadable: not ours to delete now
            }
        }

        /// <summary>Subdirectory for events the engine refused as invalid (HTTP 400).</summary>
        public const string RejectedDirectoryName = "rejected";
        /// <summary>
        /// Extension of the file beside a rejected event that says why it was set aside
        /// (`&lt;name&gt;.evt.reason`, one line of UTF-8).
        /// </summary>
        public const string ReasonExtension = ".reason";
        /// <summary>
        /// Most events kept in rejected/ (each with its reason file): enough to diagnose a
        /// systematic problem, bounded so a long-running misconfiguration cannot fill the disk.
        /// The oldest go first.
        /// </summary>
        public const int MaxRejectedFiles = 1000;
        /// <summary>
        /// Most bytes kept in rejected/ (events and reason files): 1000 of the largest events the
        /// engine accepts (64 KiB) fit, while a few damaged spool files of any size (set aside
        /// unread because they are bigger than <see cref="MaxFileBytes"/>) cannot fill the disk.
        /// The oldest go first. Only the forwarder's own files there are counted or deleted.
        /// </summary>
        public const long MaxRejectedBytes = 64L * 1024 * 1024;
        /// <summary>
        /// First wait before a delivered (or rejected) event file that could not be deleted is
        /// tried again; doubled per failure up to <see cref="MaxRemovalRetry"/>. An antivirus
        /// scan lets go within seconds; an ACL without Delete needs an operator.
        /// </summary>
        public static readonly TimeSpan FirstRemovalRetry = TimeSpan.FromSeconds(1);
        /// <summary>Longest wait between two tries to delete such a file.</summary>
        public static readonly TimeSpan MaxRemovalRetry = TimeSpan.FromMinutes(5);
        /// <summary>
        /// Most such files remembered. Beyond it the oldest is forgotten, and may then be sent
        /// again (harmless: the engine deduplicates by key); it only bounds memory if deleting
        /// fails for every file.
        /// </summary>
        public const int MaxAwaitingRemoval = 10000;
        /// <summary>
        /// How long a spool file that could not be read (held open without sharing by another
        /// program such as an antivirus scan or a backup agent, access denied, a disk error) is
        /// skipped before it is read again. Such a cause is usually gone within seconds; one failed
        /// open per interval costs nothing, and meanwhile the files after it are sent. The file
        /// stays in the spool, so the spool's limits still bound how long it can be kept.
        /// </summary>
        public static readonly TimeSpan UnreadableRetryInterval = TimeSpan.FromSeconds(10);
        /// <summary>
        /// Largest spool file read back. An event is a few hundred bytes (the engine refuses
        /// bodies over 64 KiB); anything bigger was not written by this forwarder.
        /// </summary>
        public const int MaxFileBytes = 256 * 1024;

        static readonly Encoding Utf8 = new UTF8Encoding(false);

        readonly string directory;
        readonly string rejectedDirectory;
        readonly long maxFiles;
        readonly long maxBytes;
        readonly IForwarderLog log;
        /// <summary>
        /// The log as given (the log thread's), for the counts: their descriptions are made
        /// printable once, and the notices thread writes through it directly.
        /// </summary>
        readonly IForwarderLog countLog;
        readonly object gate = new object();
        /// <summary>Serialises the recreation of a deleted spool directory (writer and sender may both find it gone).</summary>
        readonly object recreateGate = new object();
        /// <summary>Every complete spool file, by name (= age), with its size.</summary>
        readonly SortedDictionary<string, long> files = new SortedDictionary<string, long>(StringComparer.Ordinal);
        /// <summary>
        /// Indexed files whose last read failed with an I/O error, with the time before which
        /// they are not read again (Stopwatch ticks: monotonic, so setting the clock back does
        /// not prolong it). Usually empty; an entry goes when the file is read or forgotten.
        /// </summary>
        readonly Dictionary<string, long> unreadable = new Dictionary<string, long>(StringComparer.Ordinal);
        /// <summary>
        /// Indexed files whose last delivery failed (<see cref="Defer"/>): when each may be sent
        /// again and how often it failed. An entry goes when the file is delivered, refused or
        /// forgotten; a few at most unless every delivery fails.
        /// </summary>
        readonly Dictionary<string, Deferral> deferred = new Dictionary<string, Deferral>(StringComparer.Ordinal);

        struct Deferral
        {
            /// <summary>Stopwatch ticks (monotonic: setting the clock back does not prolong it).</summary>
            public long NotBefore;
            public int Failures;
        }
        /// <summary>
        /// Files this process is done with (delivered, or refused by the engine) that could not
        /// be deleted (an antivirus or backup agent holding them without FILE_SHARE_DELETE, an
        /// ACL without Delete), by name, with when to try again. <see cref="Rescan"/> passes
        /// them over, so such a file is never sent again; <see cref="RetryRemovals"/> deletes
        /// them with back-off. Usually empty.
        /// </summary>
        readonly SortedDictionary<string, Removal> awaitingRemoval = new SortedDictionary<string, Removal>(StringComparer.Ordinal);

        sealed class Removal
        {
            /// <summary>Stopwatch ticks (monotonic).</summary>
            public long NotBefore;
            public TimeSpan Delay;
        }
        long totalBytes;
        long sequence;
        /// <summary>
        /// The writer's file that is in the directory but not (or no longer) in the index: the
        /// event <see cref="MakeRoom"/> is deleting, or the one <see cref="Write"/> has renamed
        /// into place and not yet indexed; null when none. <see cref="Rescan"/> passes it over,
        /// so that it neither indexes a dropped file again nor reports the writer's own file as
        /// another process's.
        /// </summary>
        string writerOwns;
        /// <summary>
        /// The file the sender is posting (<see cref="Sending"/>), and whether <see cref="MakeRoom"/>
        /// dropped it meanwhile (under <see cref="gate"/>). Such a drop is counted once the post
        /// has ended, and only if the event did not reach the engine: counted at once, an event
        /// the engine then accepted would be counted both delivered and dropped.
        /// </summary>
        string sending;
        bool sendingDropped;
        /// <summary>
        /// The directory's last-write time at the previous listing by <see cref="Rescan"/>, when
        /// that listing is known to have seen every file named up to then; null otherwise.
        /// </summary>
        DateTime? listedStamp;
        /// <summary>
        /// How long the directory must have been unchanged before a listing for
        /// <see cref="listedStamp"/> to be trusted: the coarsest time stamp of a local file system
        /// (FAT: 2 s), so that a file named during the listing changes the stamp.
        /// </summary>
        static readonly TimeSpan StampGranularity = TimeSpan.FromSeconds(2);
        /// <summary>
        /// Longest the listing is skipped on the strength of an unchanged time stamp: a file
        /// system whose directory times lag or are not kept (a network share) costs at most this
        /// delay for another process's files, never their loss.
        /// </summary>
        static readonly TimeSpan MaxListingSkip = TimeSpan.FromMinutes(5);
        /// <summary>When <see cref="Rescan"/> last listed the directory (Stopwatch ticks), once it has.</summary>
        long lastListing;
        bool listedOnce;
        /// <summary>
        /// The UTC ticks of the newest file name made or seen (under <see cref="gate"/>): the
        /// next name's are later, whatever the clock says (<see cref="NameTicks"/>).
        /// </summary>
        long lastNameTicks;

        /// <summary>Events dropped because the spool was full.</summary>
        public long Dropped;

        /// <summary>
        /// Files of this forwarder's name that hold no event it can send (not UTF-8, another
        /// header or layout, too big: damaged on disk, or not its own), set aside to rejected/.
        /// </summary>
        public long Damaged;

        /// <summary>
        /// Failed writes (a full disk, a permission problem), reported at once and then at most
        /// once a minute: the writer tries again every second. Made at the first failure, so a
        /// spool that is only being opened registers nothing.
        /// </summary>
        RateLimitedCount writeFailures;
        /// <summary>Likewise for a deleted spool directory that cannot be made again.</summary>
        RateLimitedCount recreateFailures;
        /// <summary>Events dropped to make room for newer ones (a warning, made at the first).</summary>
        RateLimitedCount spoolFull;
        /// <summary>Delivered or rejected files that could not be deleted (a warning, made at the first).</summary>
        RateLimitedCount notDeleted;
        /// <summary>Such files deleted at a later try (an info line, made at the first).</summary>
        RateLimitedCount deletedAtLast;
        /// <summary>Events too large for any spool file (a warning, made at the first).</summary>
        RateLimitedCount tooLarge;
        /// <summary>
        /// The writer's failed writes since the last successful one, and the line saying it
        /// writes again: at most one a minute, with how often it failed and recovered meanwhile
        /// (a disk at the edge of full fails and recovers every second). Made at the first failure.
        /// </summary>
        volatile OutageNotice writeOutages;

        Spool(string directory, long maxFiles, long maxBytes, IForwarderLog log)
        {
            this.directory = directory;
            rejectedDirectory = Path.Combine(directory, RejectedDirectoryName);
            this.maxFiles = maxFiles;
            this.maxBytes = maxBytes;
            // Every message here is one line with a path, a file name or an exception message
            // in it; any of them may hold a line break or a bidirectional control.
            this.log = new PrintableLog(log);
            countLog = log;
        }

        /// <summary>
        /// Opens (creating it if needed) the spool directory and indexes the events left in it.
        /// Returns null, with the reason logged, if the directory cannot be used; `canSend` says
        /// whether the events meanwhile go to an engine from memory (an EngineUrl is set), so
        /// that line says what becomes of them.
        /// </summary>
        public static Spool Open(string directory, long maxFiles, long maxBytes, IForwarderLog log, bool canSend = true)
        {
            var spool = new Spool(directory, maxFiles, maxBytes, log);
            try
            {
                Directory.CreateDirectory(directory);
                Directory.CreateDirectory(spool.rejectedDirectory);
                int foreign = 0;
                foreach (var path in Directory.GetFiles(directory))
                {
                    var name = Path.GetFileName(path);
                    if (IsOwnTempName(name))
                    {
                        // Only a crash's leftover: another live process on this spool (the old
                        // worker of an overlapped recycle) may be writing this one right now.
                        if (IsLeftover(path))
                            TryDelete(path);
                    }
                    else if (!IsOwnEventName(name))
                        foreign++;
                }
                if (foreign > 0)
                    spool.log.Warn(foreign + " file(s) in the spool directory " + directory
                                   + " are not the forwarder's; they are left alone, but give SpoolDirectory a directory of its own");
                foreach (var path in Directory.GetFiles(directory, "*" + EventExtension))
                {
                    if (!IsOwnEventName(Path.GetFileName(path)))
                        continue;
                    long size;
                    try
                    {
                        size = new FileInfo(path).Length;
                    }
                    catch (Exception)
                    {
                        // Gone since the listing (another process on this directory delivered
                        // it), or unreadable: skip this file, not the whole spool. A file still
                        // there is found by the next Rescan.
                        continue;
                    }
                    spool.files[Path.GetFileName(path)] = size;
                    spool.totalBytes += size;
                    spool.Seen(Path.GetFileName(path));
                }
            }
            catch (Exception e)
            {
                spool.log.Error("cannot use the spool directory " + directory + ": " + e.Message
                                + "; until it is writable by the app pool identity (tried again every minute), "
                                + (canSend
                                    ? "events are sent to the engine straight from memory, and those the engine has not taken are lost when the process ends"
                                    : "events are held in memory only (no usable EngineUrl to send them to), up to the queue's bound, and are lost when the process ends"));
                return null;
            }
            if (spool.files.Count > 0)
                spool.log.Info("found " + spool.files.Count + " undelivered event(s) in " + directory + "; sending them");
            return spool;
        }

        /// <summary>Events in the spool.</summary>
        public int Count
        {
            get { lock (gate) return files.Count; }
        }

        /// <summary>
        /// Writes one event; with `durable`, flushed to disk before it is renamed into place
        /// (without, at shutdown, the operating system's cache writes it after the process has
        /// ended; only a power cut in those seconds loses it). Drops the oldest events first if
        /// the spool would exceed its limits. Returns false (the caller keeps the event and
        /// retries) if writing failed; true when the event is written, or refused because it is
        /// larger than any event (<see cref="MaxFileBytes"/>: it would be set aside unsent, after
        /// pushing good events out of the spool).
        /// </summary>
        public bool Write(string key, string body, bool durable = true)
        {
            var bytes = Utf8.GetBytes(Header + "\n" + key + "\n" + body + "\n");
            if (bytes.Length > MaxFileBytes || bytes.Length > maxBytes)
            {
                Interlocked.Increment(ref Dropped);
                Notice(ref tooLarge, "an event was larger than a spool file may hold (" + Math.Min(MaxFileBytes, maxBytes)
                                     + " bytes); it was not spooled", NoticeLevel.Warn)
                    .Add("event " + key + ", " + bytes.Length + " bytes");
                return true;
            }
            var name = NameTicks().ToString("D19", CultureInfo.InvariantCulture) + "-"
                       + Interlocked.Increment(ref sequence).ToString("D10", CultureInfo.InvariantCulture) + "-"
                       + key + EventExtension;
            var path = Path.Combine(directory, name);
            var temp = path + TempExtension;
            bool recreated = false;
            while (true)
            {
                try
                {
                    MakeRoom(bytes.Length);
                    lock (gate)
                        writerOwns = name;
                    WriteFile(temp, path, bytes, durable);
                    break;
                }
                catch (Exception e)
                {
                    lock (gate)
                        writerOwns = null; // a file that got into place all the same is found by Rescan
                    TryDelete(temp);
                    // The directory was deleted while the process runs (by hand, a cleanup
                    // script): make it again and write once more.
                    if (!recreated && e is DirectoryNotFoundException && EnsureDirectories())
                    {
                        recreated = true;
                        continue;
                    }
                    WriteFailed(e);
                    return false;
                }
            }
            Add(name, bytes.Length);
            var outages = writeOutages;
            if (outages != null)
                outages.Recovered(failed => "writing to the spool " + directory + " again after " + failed + " failed attempt(s)");
            return true;
        }

        /// <summary>
        /// The time part of the next file name: the clock's UTC ticks, but always after every
        /// name made or seen so far. When the clock is set back (by hand, or by a time sync
        /// after it ran ahead), names taken from it would sort before the events spooled
        /// earlier: those would be sent after them, and a full spool would drop the newest
        /// events first. The names keep counting from the latest instead until the clock
        /// catches up.
        /// </summary>
        long NameTicks()
        {
            lock (gate)
            {
                lastNameTicks = Math.Max(lastNameTicks + 1, DateTime.UtcNow.Ticks);
                return lastNameTicks;
            }
        }

        /// <summary>Takes note of the time part of an indexed file's name (<see cref="NameTicks"/>). Under <see cref="gate"/>, or before the spool is shared.</summary>
        void Seen(string name)
        {
            long ticks;
            if (name.Length > 19 && name[19] == '-'
                && long.TryParse(name.Substring(0, 19), NumberStyles.None, CultureInfo.InvariantCulture, out ticks)
                && ticks > lastNameTicks && ticks <= DateTime.MaxValue.Ticks)
                lastNameTicks = ticks;
        }

        /// <summary>Counts a failed write; the notices thread reports it.</summary>
        void WriteFailed(Exception e)
        {
            lock (gate)
            {
                if (writeOutages == null)
                    writeOutages = new OutageNotice(log, true);
            }
            // Counted only: the count below reports the failures, with their exception.
            writeOutages.Failed(null);
            Notice(ref writeFailures, "cannot write to the spool " + directory + " (the event waits in memory, sent to the engine from there meanwhile; the write is tried again every second)")
                .Add(e.GetType().Name + ": " + e.Message);
        }

        /// <summary>The count in `field`, made on first use.</summary>
        RateLimitedCount Notice(ref RateLimitedCount field, string description, NoticeLevel level = NoticeLevel.Error)
        {
            lock (gate)
            {
                if (field == null)
                    field = new RateLimitedCount(LogText.Printable(description), countLog, level);
                return field;
            }
        }

        static void WriteFile(string temp, string path, byte[] bytes, bool durable)
        {
            using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 4096, FileOptions.None))
            {
                stream.Write(bytes, 0, bytes.Length);
                // Flush(true) reaches the disk (FlushFileBuffers / fsync) before the rename
                // publishes the file. The directory entry itself cannot be fsynced portably
                // from .NET; NTFS journals the rename.
                stream.Flush(durable);
            }
            File.Move(temp, path);
        }

        /// <summary>Indexes the file just written and ends the writer's hold on it.</summary>
        void Add(string name, long size)
        {
            lock (gate)
            {
                writerOwns = null;
                if (files.ContainsKey(name))
                    return;
                files[name] = size;
                totalBytes += size;
            }
        }

        /// <summary>
        /// Creates the spool directory and rejected/ if either is gone (deleted while the process
        /// runs). When the spool directory itself was gone, every indexed event went with it: they
        /// are forgotten, with one warning that counts them. Logs once per recreation. True when
        /// both directories exist afterwards.
        /// </summary>
        bool EnsureDirectories()
        {
            lock (recreateGate)
            {
                try
                {
                    bool spoolGone = !Directory.Exists(directory);
                    bool rejectedGone = !Directory.Exists(rejectedDirectory);
                    if (!spoolGone && !rejectedGone)
                        return true;
                    int lost = 0;
                    if (spoolGone)
                    {
                        lock (gate)
                        {
                            lost = files.Count;
                            files.Clear();
                            unreadable.Clear();
                            deferred.Clear();
                            totalBytes = 0;
                        }
                    }
                    Directory.CreateDirectory(directory);
                    Directory.CreateDirectory(rejectedDirectory);
                    if (spoolGone)
                        log.Warn("the spool directory " + directory + " was deleted while in use; recreated it"
                                 + (lost > 0 ? " (" + lost + " spooled event(s) were lost with it)" : ""));
                    else
                        log.Warn("recreated " + rejectedDirectory + ", which was deleted while in use");
                    return true;
                }
                catch (Exception e)
                {
                    // The writer and the sender come back here every second or so while it lasts.
                    Notice(ref recreateFailures, "the spool directory " + directory + " is gone and cannot be recreated")
                        .Add(e.GetType().Name + ": " + e.Message);
                    return false;
                }
            }
        }

        /// <summary>
        /// Indexes `.evt` files in the directory that the index does not hold: written by another
        /// process on the same directory after this one opened it (during an IIS overlapped
        /// recycle the old worker can still spool an event, then exit). Counted against the
        /// limits like the others. Called now and then by the sender.
        /// </summary>
        public void Rescan()
        {
            // Listing even a full spool (100,000 files) is not free: it is skipped while the
            // directory's last-write time (changed by every file created, renamed or deleted in
            // it) is the one of the previous complete listing.
            DateTime stamp;
            try
            {
                stamp = Directory.GetLastWriteTimeUtc(directory);
            }
            catch (Exception)
            {
                stamp = DateTime.MinValue;
            }
            var started = DateTime.UtcNow;
            var clock = Stopwatch.GetTimestamp();
            if (listedStamp == stamp && listedOnce && clock - lastListing < (long)(MaxListingSkip.TotalSeconds * Stopwatch.Frequency))
                return;
            listedStamp = null;
            lastListing = clock;
            listedOnce = true;
            int found = 0;
            try
            {
                foreach (var path in Directory.EnumerateFiles(directory, "*" + EventExtension))
                {
                    var name = Path.GetFileName(path);
                    if (!IsOwnEventName(name))
                        continue; // not a complete spool file of this forwarder's (*.tmp is still being written)
                    lock (gate)
                    {
                        if (files.ContainsKey(name) || name == writerOwns || awaitingRemoval.ContainsKey(name))
                            continue;
                    }
                    long size;
                    try
                    {
                        size = new FileInfo(path).Length;
                    }
                    catch (Exception)
                    {
                        continue; // gone meanwhile (sent by the other process)
                    }
                    lock (gate)
                    {
                        if (files.ContainsKey(name) || name == writerOwns || awaitingRemoval.ContainsKey(name))
                            continue;
                        files[name] = size;
                        totalBytes += size;
                        Seen(name);
                    }
                    found++;
                }
            }
            catch (DirectoryNotFoundException)
            {
                EnsureDirectories();
                return;
            }
            catch (Exception e)
            {
                log.Warn("cannot list the spool directory " + directory + ": " + e.Message);
                return;
            }
            if (stamp != DateTime.MinValue && started - stamp > StampGranularity)
                listedStamp = stamp;
            if (found > 0)
                log.Info("found " + found + " event(s) in " + directory + " that another process spooled; sending them");
        }

        /// <summary>Drops the oldest events until one of `incoming` bytes fits in both limits.</summary>
        void MakeRoom(long incoming)
        {
            while (true)
            {
                string oldest = null;
                bool beingSent;
                lock (gate)
                {
                    if (files.Count == 0 || (files.Count + 1 <= maxFiles && totalBytes + incoming <= maxBytes))
                        return;
                    foreach (var name in files.Keys)
                    {
                        oldest = name;
                        break;
                    }
                    totalBytes -= files[oldest];
                    files.Remove(oldest);
                    if (unreadable.Count > 0)
                        unreadable.Remove(oldest);
                    if (deferred.Count > 0)
                        deferred.Remove(oldest);
                    writerOwns = oldest;
                    beingSent = oldest == sending;
                    if (beingSent)
                        sendingDropped = true;
                }
                TryDelete(Path.Combine(directory, oldest));
                lock (gate)
                    writerOwns = null;
                // The event the sender is posting is counted when its post ends (SendEnded).
                if (!beingSent)
                    CountDropped(oldest);
            }
        }

        /// <summary>Counts an event dropped to make room; the notices thread reports it.</summary>
        void CountDropped(string name)
        {
            Interlocked.Increment(ref Dropped);
            // Counted, not logged per event: a slow log sink must not set the pace of the
            // writer, nor of the flush at shutdown.
            Notice(ref spoolFull, "the spool " + directory + " is full (" + maxFiles + " events or " + maxBytes
                                  + " bytes); dropped the oldest event(s)", NoticeLevel.Warn)
                .Add(name);
        }

        /// <summary>The sender is about to post `name` (read by <see cref="Oldest"/>). Sender's thread only.</summary>
        public void Sending(string name)
        {
            lock (gate)
            {
                sending = name;
                sendingDropped = false;
            }
        }

        /// <summary>
        /// The post of `name` has ended; `arrived`: the engine answered it for good (accepted,
        /// a conflict, or refused). If the spool dropped it meanwhile to make room, that drop is
        /// counted now, unless the event arrived: then it is not lost, and counting it dropped
        /// would count it twice. Sender's thread only.
        /// </summary>
        public void SendEnded(string name, bool arrived)
        {
            bool dropped;
            lock (gate)
            {
                dropped = sending == name && sendingDropped;
                sending = null;
                sendingDropped = false;
            }
            if (dropped && !arrived)
                CountDropped(name);
        }

        /// <summary>What reading a spool file back came to.</summary>
        enum ReadOutcome
        {
            /// <summary>An event.</summary>
            Event,
            /// <summary>The file is gone (delivered or dropped by another process, or its directory deleted).</summary>
            Gone,
            /// <summary>The file is there but could not be read now (locked, access denied, I/O error): try later.</summary>
            Unreadable,
            /// <summary>The content is not a spool file of this forwarder: it never will be.</summary>
            NotASpoolFile,
        }

        /// <summary>
        /// The oldest event that can be read now, or null when there is none. A file that is not
        /// a spool file of this forwarder is moved to rejected/; one that cannot be read now is
        /// skipped for <see cref="UnreadableRetryInterval"/> and left in the spool.
        /// </summary>
        public SpooledEvent Oldest()
        {
            while (true)
            {
                string name = null;
                var now = Stopwatch.GetTimestamp();
                lock (gate)
                {
                    // In name order; a skipped file is passed over in place, so this walks only
                    // past the (few) unreadable files, never copies the index.
                    foreach (var n in files.Keys)
                    {
                        long notBefore;
                        if (unreadable.Count > 0 && unreadable.TryGetValue(n, out notBefore) && now < notBefore)
                            continue;
                        Deferral deferral;
                        if (deferred.Count > 0 && deferred.TryGetValue(n, out deferral) && Stopwatch.GetTimestamp() < deferral.NotBefore)
                            continue;
                        name = n;
                        break;
                    }
                }
                if (name == null)
                    return null;
                string reason;
                ReadOutcome outcome;
                var read = Read(name, out outcome, out reason);
                switch (outcome)
                {
                    case ReadOutcome.Event:
                        Readable(name);
                        return read;
                    case ReadOutcome.Gone:
                        if (!Directory.Exists(directory))
                            EnsureDirectories(); // forgets the whole index, with one warning
                        else
                            Forget(name); // deleted behind our back (dropped, or sent by another process)
                        continue;
                    case ReadOutcome.Unreadable:
                        Unreadable(name, reason);
                        continue;
                    default:
                        Interlocked.Increment(ref Damaged);
                        Reject(name, reason);
                        continue;
                }
            }
        }

        /// <summary>Skips a file for a while; warns the first time it cannot be read.</summary>
        void Unreadable(string name, string reason)
        {
            bool first;
            lock (gate)
            {
                if (!files.ContainsKey(name))
                    return;
                first = !unreadable.ContainsKey(name);
                unreadable[name] = Stopwatch.GetTimestamp() + Ticks(UnreadableRetryInterval);
            }
            if (first)
                log.Warn("cannot read spool file " + name + " now (" + reason + "); it stays in the spool and is tried again every "
                         + UnreadableRetryInterval.TotalSeconds + " s, the other events are sent meanwhile");
        }

        /// <summary>A file that could not be read was read: say so once.</summary>
        void Readable(string name)
        {
            bool was;
            lock (gate)
                was = unreadable.Count > 0 && unreadable.Remove(name);
            if (was)
                log.Info("spool file " + name + " can be read again; sending it");
        }

        SpooledEvent Read(string name, out ReadOutcome outcome, out string reason)
        {
            reason = null;
            outcome = ReadOutcome.NotASpoolFile;
            var path = Path.Combine(directory, name);
            byte[] bytes;
            try
            {
                using (var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete))
                {
                    if (stream.Length > MaxFileBytes)
                    {
                        reason = "the file is " + stream.Length + " bytes; no event is bigger than " + MaxFileBytes;
                        return null;
                    }
                    bytes = new byte[stream.Length];
                    int read = 0;
                    while (read < bytes.Length)
                    {
                        int n = stream.Read(bytes, read, bytes.Length - read);
                        if (n <= 0)
                            break;
                        read += n;
                    }
                    if (read < bytes.Length)
                    {
                        outcome = ReadOutcome.Unreadable;
                        reason = "it got shorter while it was read";
                        return null;
                    }
                }
            }
            catch (FileNotFoundException)
            {
                outcome = ReadOutcome.Gone;
                return null;
            }
            catch (DirectoryNotFoundException)
            {
                outcome = ReadOutcome.Gone;
                return null;
            }
            catch (Exception e)
            {
                // Sharing violation, access denied, a disk error: nothing says the content is
                // wrong, so the event is kept and read again later.
                outcome = ReadOutcome.Unreadable;
                reason = e.GetType().Name + ": " + e.Message;
                return null;
            }
            string text;
            try
            {
                text = new UTF8Encoding(false, true).GetString(bytes);
            }
            catch (Exception)
            {
                reason = "it is not UTF-8";
                return null;
            }
            var lines = text.Split('\n');
            if (lines.Length != 4 || lines[0] != Header || !IsKey(lines[1]) || lines[2].Length == 0 || lines[3].Length != 0)
            {
                reason = "it is not a spool file of this forwarder (expected \"" + Header + "\", a key and a body)";
                return null;
            }
            outcome = ReadOutcome.Event;
            return new SpooledEvent { Name = name, Key = lines[1], Body = lines[2] };
        }

        /// <summary>An idempotency key as this forwarder makes them: 32 lowercase hex digits.</summary>
        public static bool IsKey(string key)
        {
            if (key == null || key.Length != 32)
                return false;
            foreach (char c in key)
                if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
                    return false;
            return true;
        }

        /// <summary>
        /// Removes a delivered event. If its file cannot be deleted, it is remembered as done
        /// (never sent again) and deleting it is retried with back-off (<see cref="RetryRemovals"/>).
        /// </summary>
        public void Delete(string name)
        {
            Forget(name);
            string problem;
            if (!TryDelete(Path.Combine(directory, name), out problem))
                AwaitRemoval(name, "delivered", problem);
        }

        /// <summary>Remembers a file this process is done with but could not delete; warns once for it.</summary>
        void AwaitRemoval(string name, string what, string problem)
        {
            string forgotten = null;
            lock (gate)
            {
                if (awaitingRemoval.ContainsKey(name))
                    return;
                awaitingRemoval[name] = new Removal { NotBefore = Stopwatch.GetTimestamp() + Ticks(FirstRemovalRetry), Delay = FirstRemovalRetry };
                if (awaitingRemoval.Count > MaxAwaitingRemoval)
                {
                    foreach (var oldest in awaitingRemoval.Keys)
                    {
                        forgotten = oldest;
                        break;
                    }
                    awaitingRemoval.Remove(forgotten);
                }
            }
            // Counted, not one line per file: a spool volume gone read-only would otherwise log
            // a line per delivered event, and another once each is deleted.
            Notice(ref notDeleted, "event file(s) this process is done with (delivered or rejected) could not be deleted; they are not sent"
                                   + " again, and deleting them is retried with back-off up to every " + MaxRemovalRetry.TotalMinutes + " min", NoticeLevel.Warn)
                .Add("the " + what + " file " + name + ": " + problem
                     + (forgotten != null ? "; " + MaxAwaitingRemoval + " such files: forgot " + forgotten + ", which may be sent again" : ""));
        }

        /// <summary>
        /// Tries again to delete the files <see cref="AwaitRemoval"/> remembers whose time has
        /// come, doubling each one's wait after a failure. Called by the sender; cheap when
        /// there are none.
        /// </summary>
        public void RetryRemovals()
        {
            var now = Stopwatch.GetTimestamp();
            List<string> due = null;
            lock (gate)
            {
                if (awaitingRemoval.Count == 0)
                    return;
                foreach (var entry in awaitingRemoval)
                {
                    if (entry.Value.NotBefore > now)
                        continue;
                    if (due == null)
                        due = new List<string>();
                    due.Add(entry.Key);
                }
            }
            if (due == null)
                return;
            foreach (var name in due)
            {
                string problem;
                bool gone = TryDelete(Path.Combine(directory, name), out problem);
                lock (gate)
                {
                    Removal removal;
                    if (!awaitingRemoval.TryGetValue(name, out removal))
                        continue;
                    if (gone)
                    {
                        awaitingRemoval.Remove(name);
                    }
                    else
                    {
                        var doubled = removal.Delay.Ticks * 2;
                        removal.Delay = TimeSpan.FromTicks(Math.Min(doubled, MaxRemovalRetry.Ticks));
                        removal.NotBefore = Stopwatch.GetTimestamp() + Ticks(removal.Delay);
                    }
                }
                if (gone)
                {
                    Notice(ref deletedAtLast, "event file(s) this process was done with but could not delete are deleted at last",
                           NoticeLevel.Info).Add(name);
                }
            }
        }

        /// <summary>
        /// Moves an event the engine will never accept to rejected/, with its reason in a
        /// `.reason` file beside it, keeping rejected/ bounded; logs what really happened to it,
        /// with `logged` (a shorter form of the reason, for one log line) if given.
        /// </summary>
        public void Reject(string name, string reason, string logged = null)
        {
            var full = reason;
            reason = logged ?? reason;
            Forget(name);
            var source = Path.Combine(directory, name);
            var target = Path.Combine(rejectedDirectory, name);
            bool recreated = false;
            while (true)
            {
                try
                {
                    TryDelete(target);
                    TryDelete(target + ReasonExtension);
                    File.Move(source, target);
                    break;
                }
                catch (Exception e)
                {
                    if (!File.Exists(source))
                    {
                        if (!Directory.Exists(directory))
                            EnsureDirectories();
                        log.Warn("event " + name + " was to be set aside (" + reason + ") but its file is gone");
                        return;
                    }
                    if (!recreated && e is DirectoryNotFoundException && EnsureDirectories())
                    {
                        recreated = true; // rejected/ had been deleted
                        continue;
                    }
                    string problem;
                    var deleted = TryDelete(source, out problem);
                    log.Warn("event " + name + " was rejected (" + reason + "); it could not be moved to " + rejectedDirectory
                             + " (" + e.Message + ")" + (deleted ? ", so it was deleted" : ""));
                    if (!deleted)
                        AwaitRemoval(name, "rejected", problem);
                    return;
                }
            }
            string kept = "";
            try
            {
                File.WriteAllText(target + ReasonExtension, full + "\n", Utf8);
            }
            catch (Exception e)
            {
                kept = " (its reason file could not be written: " + e.Message + ")";
            }
            PruneRejected();
            // Set aside and deleted at once when it alone is over what rejected/ keeps: said so.
            var where = File.Exists(target)
                ? "moved to " + rejectedDirectory + kept
                : "set aside and deleted at once (larger than the " + MaxRejectedBytes + " bytes " + rejectedDirectory + " keeps)";
            log.Warn("event " + name + " was rejected and " + where + ": " + reason);
        }

        /// <summary>Deletes the oldest events in rejected/, with their reason files, beyond <see cref="MaxRejectedFiles"/>.</summary>
        void PruneRejected()
        {
            try
            {
                var paths = Directory.GetFiles(rejectedDirectory);
                // One entry per event: an event's file and its reason file share the event's name.
                var byEvent = new SortedDictionary<string, List<string>>(StringComparer.Ordinal);
                long bytes = 0;
                foreach (var path in paths)
                {
                    var eventName = Path.GetFileName(path);
                    if (eventName.EndsWith(ReasonExtension, StringComparison.Ordinal))
                        eventName = eventName.Substring(0, eventName.Length - ReasonExtension.Length);
                    // Another program's file in a rejected folder that was there before: not ours.
                    if (!IsOwnEventName(eventName))
                        continue;
                    try { bytes += new FileInfo(path).Length; } catch (Exception) { }
                    List<string> group;
                    if (!byEvent.TryGetValue(eventName, out group))
                        byEvent[eventName] = group = new List<string>(2);
                    group.Add(path);
                }
                int excess = byEvent.Count - MaxRejectedFiles;
                foreach (var group in byEvent.Values)
                {
                    if (excess-- <= 0 && bytes <= MaxRejectedBytes)
                        break;
                    foreach (var path in group)
                    {
                        long size = 0;
                        try { size = new FileInfo(path).Length; } catch (Exception) { }
                        if (TryDelete(path))
                            bytes -= size;
                    }
                }
            }
            catch (Exception e)
            {
                log.Warn("cannot tidy " + rejectedDirectory + ": " + e.Message);
            }
        }

        void Forget(string name)
        {
            lock (gate)
            {
                long size;
                if (files.TryGetValue(name, out size))
                {
                    files.Remove(name);
                    totalBytes -= size;
                }
                if (unreadable.Count > 0)
                    unreadable.Remove(name);
                if (deferred.Count > 0)
                    deferred.Remove(name);
            }
        }

        /// <summary>
        /// Holds back `name`, whose delivery just failed in a way that may be its own (an answer
        /// that is not the engine's, such as a proxy's 413 to this one body, or the engine's
        /// 5xx): <see cref="Oldest"/> passes it over for a backoff that doubles with each of its
        /// own failures (a random time between half and all of min(`max`, `initial` ×
        /// 2^(n-1))), and the events after it are sent meanwhile, so one event that keeps
        /// failing holds none behind it. Returns the wait. Sender's thread only (`jitter`).
        /// </summary>
        public TimeSpan Defer(string name, TimeSpan initial, TimeSpan max, Random jitter)
        {
            lock (gate)
            {
                if (!files.ContainsKey(name))
                    return TimeSpan.Zero;
                Deferral deferral;
                deferred.TryGetValue(name, out deferral);
                deferral.Failures = Math.Min(deferral.Failures + 1, 31);
                var full = Math.Min(max.TotalMilliseconds, initial.TotalMilliseconds * Math.Pow(2, deferral.Failures - 1));
                var wait = TimeSpan.FromMilliseconds(Math.Max(1, full / 2 + jitter.NextDouble() * full / 2));
                deferral.NotBefore = Stopwatch.GetTimestamp() + (long)(wait.TotalSeconds * Stopwatch.Frequency);
                deferred[name] = deferral;
                return wait;
            }
        }

        /// <summary>
        /// Forgets every deferral (<see cref="Defer"/>): after an outage every event tried during
        /// it was charged failures that were not its own, and the oldest go first again.
        /// </summary>
        public void ClearDeferrals()
        {
            lock (gate)
                deferred.Clear();
        }

        /// <summary>`span` in Stopwatch ticks.</summary>
        static long Ticks(TimeSpan span)
        {
            return (long)(span.TotalSeconds * Stopwatch.Frequency);
        }

        /// <summary>Deletes a file if it can; true when it is gone afterwards.</summary>
        static bool TryDelete(string path)
        {
            string problem;
            return TryDelete(path, out problem);
        }

        /// <summary>Deletes a file if it can; true when it is gone afterwards, else why not.</summary>
        static bool TryDelete(string path, out string problem)
        {
            problem = null;
            try
            {
                File.Delete(path);
                return true;
            }
            catch (Exception e)
            {
                // Locked by an antivirus scan, or no permission.
                problem = e.GetType().Name + ": " + e.Message;
                return !File.Exists(path);
            }
        }
    }
}
