// Delivery of spooled events to the engine: one at a time, oldest first, each with its
// idempotency key, retried with exponential backoff and jitter until the engine has it.
// Response codes and what is done with each are in docs/FORWARDER-WIRE.md.

using System;
using System.IO;
using System.Net;
using System.Net.Http;
using System.Net.Http.Headers;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace Jobhook.Forwarder
{
    /// <summary>The background thread that posts spooled events.</summary>
    public sealed class Sender
    {
        /// <summary>
        /// Most bytes of a response body read, for the log: the engine's error bodies are one
        /// short JSON object; anything longer is not worth holding.
        /// </summary>
        public const int MaxResponseBytesRead = 4096;

        /// <summary>
        /// Extra time beyond the request timeout after which the sender stops waiting for an
        /// HTTP call that ignores cancellation (a stuck TLS handshake on an old stack), so one
        /// bad connection can never stop delivery for good.
        /// </summary>
        static readonly TimeSpan HardDeadlineSlack = TimeSpan.FromSeconds(5);

        /// <summary>
        /// How often a continuing outage is logged again: the first failure is logged at once,
        /// then one line per interval with the count, so an outage of a day is not a million lines.
        /// </summary>
        static readonly TimeSpan RepeatLogInterval = TimeSpan.FromMinutes(1);

        /// <summary>How long an idle sender sleeps before looking at the spool again on its own.</summary>
        const int IdlePollMilliseconds = 1000;

        /// <summary>The header that carries the idempotency key.</summary>
        public const string IdempotencyKeyHeader = "Idempotency-Key";

        /// <summary>The header that names this forwarder, so the engine can show when it last delivered.</summary>
        public const string ForwarderNameHeader = "X-Jobhook-Forwarder";

        enum Verdict { Delivered, Conflict, Rejected, Retry }

        readonly ForwarderSettings settings;
        readonly Spool spool;
        readonly ForwarderCounters counters;
        readonly IForwarderLog log;
        readonly AutoResetEvent wake;
        readonly Random jitter = new Random();
        HttpClient client;
        int consecutiveFailures;
        DateTime lastFailureLog = DateTime.MinValue;

        internal Sender(ForwarderSettings settings, Spool spool, ForwarderCounters counters, IForwarderLog log, AutoResetEvent wake)
        {
            this.settings = settings;
            this.spool = spool;
            this.counters = counters;
            this.log = log;
            this.wake = wake;
        }

        internal void Start()
        {
            client = CreateClient();
            var thread = new Thread(Loop) { IsBackground = true, Name = "jobhook-forwarder sender" };
            thread.Start();
        }

        HttpClient CreateClient()
        {
            var handler = new HttpClientHandler
            {
                AllowAutoRedirect = false,   // a redirect would resend the body somewhere unconfigured
                UseCookies = false,
                UseProxy = settings.UseProxy,
                UseDefaultCredentials = false, // never hand the App Pool's Windows identity to the engine
            };
            if (settings.TrustedCaFile != null)
            {
                var trust = TlsTrust.Load(settings.TrustedCaFile, log);
                if (trust != null)
                    handler.ServerCertificateCustomValidationCallback = trust.Validate;
            }
            return new HttpClient(handler) { Timeout = settings.RequestTimeout + HardDeadlineSlack };
        }

        void Loop()
        {
            while (true)
            {
                try
                {
                    var next = spool.Oldest();
                    if (next == null)
                    {
                        wake.WaitOne(IdlePollMilliseconds);
                        continue;
                    }
                    string detail;
                    var verdict = Post(next, out detail);
                    switch (verdict)
                    {
                        case Verdict.Delivered:
                            // Counted before the file goes, so "nothing pending" implies "counted".
                            Interlocked.Increment(ref counters.Delivered);
                            spool.Delete(next.Name);
                            Recovered();
                            log.Debug("delivered event " + next.Key + ": " + detail);
                            break;
                        case Verdict.Conflict:
                            Interlocked.Increment(ref counters.Conflicts);
                            spool.Delete(next.Name);
                            Recovered();
                            log.Warn("the engine already holds a different event with key " + next.Key
                                     + " (409); this one is not resent: " + detail);
                            break;
                        case Verdict.Rejected:
                            Interlocked.Increment(ref counters.Rejected);
                            spool.Reject(next.Name, "the engine refused it: " + detail);
                            Recovered();
                            break;
                        default:
                            Interlocked.Increment(ref counters.Retries);
                            Failed(detail);
                            Thread.Sleep(Backoff());
                            break;
                    }
                }
                catch (ThreadAbortException)
                {
                    throw; // the process or app domain is going away (iisreset): not an error
                }
                catch (Exception e)
                {
                    // Keep the sender alive whatever happens.
                    try { log.Error("sender: " + e); } catch { }
                    Thread.Sleep(Backoff());
                }
            }
        }

        Verdict Post(SpooledEvent spooled, out string detail)
        {
            using (var cancel = new CancellationTokenSource(settings.RequestTimeout))
            {
                var call = SendAsync(spooled, cancel.Token);
                try
                {
                    if (!call.Wait(settings.RequestTimeout + HardDeadlineSlack))
                    {
                        cancel.Cancel();
                        detail = "no answer within " + settings.RequestTimeout.TotalMilliseconds + " ms";
                        return Verdict.Retry;
                    }
                }
                catch (AggregateException e)
                {
                    detail = cancel.IsCancellationRequested
                        ? "no answer within " + settings.RequestTimeout.TotalMilliseconds + " ms"
                        : Describe(e.GetBaseException());
                    return Verdict.Retry;
                }
                var answer = call.Result;
                detail = answer.Item2;
                return answer.Item1;
            }
        }

        async Task<Tuple<Verdict, string>> SendAsync(SpooledEvent spooled, CancellationToken cancel)
        {
            using (var request = new HttpRequestMessage(HttpMethod.Post, settings.JobCompleteUrl))
            {
                var content = new ByteArrayContent(new UTF8Encoding(false).GetBytes(spooled.Body));
                content.Headers.ContentType = new MediaTypeHeaderValue("application/json") { CharSet = "utf-8" };
                request.Content = content;
                request.Headers.ExpectContinue = false; // one round trip, not two
                request.Headers.TryAddWithoutValidation(IdempotencyKeyHeader, spooled.Key);
                request.Headers.TryAddWithoutValidation(ForwarderNameHeader, settings.ForwarderName);
                if (settings.BearerToken != null)
                    request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", settings.BearerToken);
                using (var response = await client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, cancel).ConfigureAwait(false))
                {
                    var status = (int)response.StatusCode;
                    var body = await ReadBounded(response, cancel).ConfigureAwait(false);
                    var detail = "HTTP " + status + (body.Length > 0 ? " " + body : "");
                    if (status >= 200 && status < 300)
                        return Tuple.Create(Verdict.Delivered, detail);
                    if (status == 409)
                        return Tuple.Create(Verdict.Conflict, detail);
                    // The engine refused the body itself: resending the same bytes cannot help.
                    if (status == 400 || status == 413 || status == 422)
                        return Tuple.Create(Verdict.Rejected, detail);
                    // 401/403 (token), 404 (URL), 408/429, 5xx and anything unexpected: the
                    // event is fine, the path to the engine is not; retry.
                    return Tuple.Create(Verdict.Retry, detail);
                }
            }
        }

        /// <summary>Up to <see cref="MaxResponseBytesRead"/> bytes of the body, as printable text.</summary>
        static async Task<string> ReadBounded(HttpResponseMessage response, CancellationToken cancel)
        {
            if (response.Content == null)
                return "";
            try
            {
                var stream = await response.Content.ReadAsStreamAsync().ConfigureAwait(false);
                var buffer = new byte[MaxResponseBytesRead];
                int read = 0;
                while (read < buffer.Length)
                {
                    int n = await stream.ReadAsync(buffer, read, buffer.Length - read, cancel).ConfigureAwait(false);
                    if (n <= 0)
                        break;
                    read += n;
                }
                return Printable(Encoding.UTF8.GetString(buffer, 0, read));
            }
            catch (Exception e)
            {
                return "(body unreadable: " + e.GetBaseException().Message + ")";
            }
        }

        /// <summary>Text from the network made safe for a log line: no control characters.</summary>
        static string Printable(string text)
        {
            var clean = new StringBuilder(text.Length);
            foreach (char c in text)
                clean.Append(char.IsControl(c) ? ' ' : c);
            return clean.ToString().Trim();
        }

        static string Describe(Exception e)
        {
            var message = e.Message;
            var inner = e.InnerException;
            while (inner != null)
            {
                message += " (" + inner.Message + ")";
                inner = inner.InnerException;
            }
            return Printable(message);
        }

        void Failed(string detail)
        {
            consecutiveFailures++;
            var now = DateTime.UtcNow;
            if (consecutiveFailures == 1 || now - lastFailureLog >= RepeatLogInterval)
            {
                lastFailureLog = now;
                log.Warn("cannot deliver to " + settings.JobCompleteUrl + " (" + consecutiveFailures + " failure(s) in a row, "
                         + spool.Count + " event(s) waiting): " + detail + "; retrying with backoff");
            }
        }

        void Recovered()
        {
            if (consecutiveFailures > 0)
                log.Info("delivering to " + settings.JobCompleteUrl + " again after " + consecutiveFailures + " failure(s)");
            consecutiveFailures = 0;
        }

        /// <summary>
        /// Exponential backoff with jitter: the n-th consecutive failure waits a random time
        /// between half and all of min(MaxBackoff, InitialBackoff * 2^(n-1)), so many forwarders
        /// coming back from the same outage do not all knock at once.
        /// </summary>
        TimeSpan Backoff()
        {
            var exponent = Math.Min(Math.Max(consecutiveFailures - 1, 0), 30);
            var full = Math.Min(settings.MaxBackoff.TotalMilliseconds, settings.InitialBackoff.TotalMilliseconds * Math.Pow(2, exponent));
            var wait = full / 2 + jitter.NextDouble() * full / 2;
            return TimeSpan.FromMilliseconds(Math.Max(1, wait));
        }
    }
}
