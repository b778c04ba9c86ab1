// The durable spool: one file per event in a local directory, so that events survive an engine
// outage and a restart of Keyfactor's process (iisreset, app pool recycle).

using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Text;
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
    /// order is the arrival order and names from two processes never collide. Its content is
    /// three lines: <see cref="Header"/>, the idempotency key, the JSON body. A file is written
    /// as `*.tmp`, flushed to disk and renamed, so a reader never sees half an event; a `*.tmp`
    /// left by a crash is deleted at start-up. All methods are thread-safe and never throw.
    /// </summary>
    public sealed class Spool
    {
        /// <summary>First line of every spool file: the format and its version.</summary>
        public const string Header = "jobhook-forwarder-spool 1";
        /// <summary>Extension of a complete spool file.</summary>
        public const string EventExtension = ".evt";
        /// <summary>Extension of a file being written.</summary>
        public const string TempExtension = ".tmp";
        /// <summary>Subdirectory for events the engine refused as invalid (HTTP 400).</summary>
        public const string RejectedDirectoryName = "rejected";
        /// <summary>
        /// Most files kept in rejected/: enough to diagnose a systematic problem, bounded so a
        /// long-running misconfiguration cannot fill the disk. The oldest go first.
        /// </summary>
        public const int MaxRejectedFiles = 1000;
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
        readonly object gate = new object();
        /// <summary>Every complete spool file, by name (= age), with its size.</summary>
        readonly SortedDictionary<string, long> files = new SortedDictionary<string, long>(StringComparer.Ordinal);
        long totalBytes;
        long sequence;

        /// <summary>Events dropped because the spool was full.</summary>
        public long Dropped;

        Spool(string directory, long maxFiles, long maxBytes, IForwarderLog log)
        {
            this.directory = directory;
            rejectedDirectory = Path.Combine(directory, RejectedDirectoryName);
            this.maxFiles = maxFiles;
            this.maxBytes = maxBytes;
            this.log = log;
        }

        /// <summary>
        /// Opens (creating it if needed) the spool directory and indexes the events left in it.
        /// Returns null, with the reason logged, if the directory cannot be used.
        /// </summary>
        public static Spool Open(string directory, long maxFiles, long maxBytes, IForwarderLog log)
        {
            var spool = new Spool(directory, maxFiles, maxBytes, log);
            try
            {
                Directory.CreateDirectory(directory);
                Directory.CreateDirectory(spool.rejectedDirectory);
                foreach (var path in Directory.GetFiles(directory, "*" + TempExtension))
                    TryDelete(path);
                foreach (var path in Directory.GetFiles(directory, "*" + EventExtension))
                {
                    var info = new FileInfo(path);
                    spool.files[info.Name] = info.Length;
                    spool.totalBytes += info.Length;
                }
            }
            catch (Exception e)
            {
                log.Error("cannot use the spool directory " + directory + ": " + e.Message
                          + "; events cannot be forwarded until it is writable by the app pool identity");
                return null;
            }
            if (spool.files.Count > 0)
                log.Info("found " + spool.files.Count + " undelivered event(s) in " + directory + "; sending them");
            return spool;
        }

        /// <summary>Events in the spool.</summary>
        public int Count
        {
            get { lock (gate) return files.Count; }
        }

        /// <summary>
        /// Writes one event durably. Drops the oldest events first if the spool would exceed its
        /// limits. Returns false (the caller keeps the event and retries) if writing failed.
        /// </summary>
        public bool Write(string key, string body)
        {
            var bytes = Utf8.GetBytes(Header + "\n" + key + "\n" + body + "\n");
            var name = DateTime.UtcNow.Ticks.ToString("D19", CultureInfo.InvariantCulture) + "-"
                       + Interlocked.Increment(ref sequence).ToString("D10", CultureInfo.InvariantCulture) + "-"
                       + key + EventExtension;
            var path = Path.Combine(directory, name);
            var temp = path + TempExtension;
            try
            {
                MakeRoom(bytes.Length);
                using (var stream = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 4096, FileOptions.None))
                {
                    stream.Write(bytes, 0, bytes.Length);
                    // Flush(true) reaches the disk (FlushFileBuffers / fsync) before the rename
                    // publishes the file. The directory entry itself cannot be fsynced portably
                    // from .NET; NTFS journals the rename.
                    stream.Flush(true);
                }
                File.Move(temp, path);
            }
            catch (Exception e)
            {
                TryDelete(temp);
                log.Error("cannot write to the spool " + directory + ": " + e.Message);
                return false;
            }
            lock (gate)
            {
                files[name] = bytes.Length;
                totalBytes += bytes.Length;
            }
            return true;
        }

        /// <summary>Drops the oldest events until one of `incoming` bytes fits in both limits.</summary>
        void MakeRoom(long incoming)
        {
            while (true)
            {
                string oldest = null;
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
                }
                TryDelete(Path.Combine(directory, oldest));
                var dropped = Interlocked.Increment(ref Dropped);
                log.Warn("the spool is full (" + maxFiles + " events or " + maxBytes + " bytes); dropped the oldest event "
                         + oldest + " (" + dropped + " dropped since start)");
            }
        }

        /// <summary>The oldest event, or null when the spool is empty. A file that cannot be read
        /// back as an event is moved to rejected/ and skipped.</summary>
        public SpooledEvent Oldest()
        {
            while (true)
            {
                string name = null;
                lock (gate)
                {
                    foreach (var n in files.Keys)
                    {
                        name = n;
                        break;
                    }
                }
                if (name == null)
                    return null;
                string reason;
                var read = Read(name, out reason);
                if (read != null)
                    return read;
                if (reason == null)
                {
                    Forget(name); // deleted behind our back (dropped, or sent by another process)
                    continue;
                }
                Reject(name, reason);
            }
        }

        SpooledEvent Read(string name, out string reason)
        {
            reason = null;
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
                }
            }
            catch (FileNotFoundException)
            {
                return null;
            }
            catch (Exception e)
            {
                reason = "cannot read it: " + e.Message;
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

        /// <summary>Removes a delivered event.</summary>
        public void Delete(string name)
        {
            Forget(name);
            TryDelete(Path.Combine(directory, name));
        }

        /// <summary>Moves an event the engine will never accept to rejected/, keeping that bounded.</summary>
        public void Reject(string name, string reason)
        {
            Forget(name);
            try
            {
                var target = Path.Combine(rejectedDirectory, name);
                TryDelete(target);
                File.Move(Path.Combine(directory, name), target);
                var rejected = Directory.GetFiles(rejectedDirectory);
                if (rejected.Length > MaxRejectedFiles)
                {
                    Array.Sort(rejected, StringComparer.Ordinal);
                    for (int i = 0; i < rejected.Length - MaxRejectedFiles; i++)
                        TryDelete(rejected[i]);
                }
            }
            catch (Exception e)
            {
                TryDelete(Path.Combine(directory, name));
                log.Warn("could not keep rejected event " + name + " (" + e.Message + "); deleted it");
            }
            log.Warn("event " + name + " was rejected and moved to " + rejectedDirectory + ": " + reason);
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
            }
        }

        static void TryDelete(string path)
        {
            try
            {
                File.Delete(path);
            }
            catch
            {
                // Gone already, or locked by an antivirus scan: the next start-up retries.
            }
        }
    }
}
