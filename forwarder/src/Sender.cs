// Delivery of spooled events to the engine: one at a time, oldest first, each with its
// idempotency key, retried with exponential backoff and jitter until the engine has it.
// Response codes and what is done with each are in docs/FORWARDER-WIRE.md.

using System;
using System.Collections.Generic;
using System.Diagnostics;
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
        /// Most handlers an engine configuration may have (MAX_HANDLERS, host/src/app/config.rs):
        /// its answer to an event lists every one the event goes to.
        /// </summary>
        internal const int EngineMaxHandlers = 256;

        /// <summary>
        /// Longest handler name, in characters (MAX_HANDLER_NAME, host/src/queue/registration.rs):
        /// ASCII letters, digits, '-', '_' and '.', none of which JSON escapes.
        /// </summary>
        internal const int EngineMaxHandlerName = 64;

        /// <summary>
        /// The engine's largest answer to an event, in bytes: its 202
        /// `{"deliveries":["name",…],"event_id":"…"}` (host/src/sources/api.rs) names every
        /// handler the event goes to, at most <see cref="EngineMaxHandlers"/> of them, each one
        /// <see cref="EngineMaxHandlerName"/> + 3 bytes at most (the name, its quotes, a comma).
        /// The rest, `{"deliveries":[],"event_id":""}` and a 36-character event id (67 bytes),
        /// is one more such entry: 257 × 67 = 17,219 bytes. Its error answers are one short
        /// `{"error":"…"}` each.
        /// </summary>
        internal const int EngineLargestAnswerBytes = (EngineMaxHandlers + 1) * (EngineMaxHandlerName + 3);

        /// <summary>
        /// Most bytes of a response body read (34,438): twice the engine's largest answer
        /// (<see cref="EngineLargestAnswerBytes"/>), room for whitespace or a member a later
        /// engine adds, so that every answer of the engine is read whole and recognised as its
        /// own. Anything longer is not the engine's and is not worth holding: what is read is
        /// bounded whatever the body (one buffer, one request at a time).
        /// </summary>
        public const int MaxResponseBytesRead = 2 * EngineLargestAnswerBytes;

        /// <summary>
        /// Most characters of a response body, or of a redirect's Location, that a log line
        /// carries: enough for any of the engine's error messages and the start of any other
        /// answer (what answered, and why), while a warning stays one readable line instead of
        /// kilobytes of a web page or of the engine's list of deliveries. A rejected event's
        /// reason file keeps the whole body as read.
        /// </summary>
        public const int MaxLoggedAnswerChars = 300;

        /// <summary>
        /// Extra time beyond the request timeout after which the sender stops waiting for an
        /// HTTP call that ignores cancellation (a stuck TLS handshake on an old stack), so one
        /// bad connection can never stop delivery for good.
        /// </summary>
        static readonly TimeSpan HardDeadlineSlack = TimeSpan.FromSeconds(5);

        /// <summary>How long an idle sender sleeps before looking at the spool again on its own.</summary>
        const int IdlePollMilliseconds = 1000;

        /// <summary>
        /// How often the sender lists the spool directory for event files its index does not
        /// hold: files another process wrote after this one opened the spool (during an IIS
        /// overlapped recycle the old worker can spool an event after the new one started, then
        /// exit; nothing else would send that file before the next restart). Such a file waits
        /// at most this long plus one retry. The listing, on the sender's own thread, is skipped
        /// while the directory has not changed (<see cref="Spool.Rescan"/>).
        /// </summary>
        static readonly TimeSpan RescanInterval = TimeSpan.FromSeconds(10);

        /// <summary>The statuses the engine uses to refuse a body (see <see cref="IsEngineRefusal"/>).</summary>
        static readonly int[] RefusalStatuses = { 400, 413, 422 };

        /// <summary>The header that carries the idempotency key.</summary>
        public const string IdempotencyKeyHeader = "Idempotency-Key";

        /// <summary>The header that names this forwarder, so the engine can show when it last delivered.</summary>
        public const string ForwarderNameHeader = "X-Jobhook-Forwarder";

        /// <summary>What the engine's answer to one POST means for the event.</summary>
        internal enum Verdict { Delivered, Conflict, Rejected, Retry }

        readonly ForwarderSettings settings;
        readonly Spool spool;
        readonly ForwarderCounters counters;
        readonly IForwarderLog log;
        readonly AutoResetEvent wake;
        readonly Random jitter = new Random();
        HttpClient client;
        int consecutiveFailures;
        /// <summary>The spool file whose delivery failed last, if the last attempt failed (see the retry in <see cref="Loop"/>).</summary>
        string failedLast;
        /// <summary>Two events failed one after the other since the last delivery: the engine or the way was down.</summary>
        bool outage;
        /// <summary>
        /// The outage and recovery lines, at most one of each a minute with counts (an outage of a
        /// day is not a million lines, and an engine failing every other request is not two lines
        /// per event). The runtime's, so a sender started again after a failed start adds none.
        /// </summary>
        readonly OutageNotice outages;
        /// <summary>The engine's URL as logged (a setting: it may hold a line break).</summary>
        readonly string shownUrl;

        internal Sender(ForwarderSettings settings, Spool spool, ForwarderCounters counters, IForwarderLog log, AutoResetEvent wake,
                        OutageNotice outages)
        {
            this.outages = outages;
            this.settings = settings;
            this.spool = spool;
            this.counters = counters;
            this.log = log;
            this.wake = wake;
            shownUrl = LogText.Printable(settings.JobCompleteUrl == null ? "" : settings.JobCompleteUrl.ToString());
        }

        /// <summary>
        /// A sender whose thread is never started, for <see cref="PostFromMemory"/> alone while
        /// no spool is open. Throws if its HTTP client cannot be made.
        /// </summary>
        internal static Sender ForPostsFromMemory(ForwarderSettings settings, ForwarderCounters counters, IForwarderLog log, OutageNotice outages)
        {
            var sender = new Sender(settings, null, counters, log, null, outages);
            sender.client = sender.CreateClient();
            return sender;
        }

        /// <summary>Starts the sender's thread; throws if it cannot (the caller tries again later).</summary>
        internal void Start()
        {
            client = CreateClient();
            try
            {
                ForwarderThreads.Start(Loop, "sender");
            }
            catch
            {
                // The next try makes a client of its own: this one's connections go now.
                client.Dispose();
                throw;
            }
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
            var sinceRescan = Stopwatch.StartNew();
            while (true)
            {
                try
                {
                    if (sinceRescan.Elapsed >= RescanInterval)
                    {
                        sinceRescan.Restart();
                        spool.Rescan();
                    }
                    spool.RetryRemovals();
                    var next = spool.Oldest();
                    if (next == null)
                    {
                        wake.WaitOne(IdlePollMilliseconds);
                        continue;
                    }
                    string detail = null, reason = null;
                    var verdict = Verdict.Retry;
                    spool.Sending(next.Name);
                    try
                    {
                        verdict = Post(next, out detail, out reason);
                    }
                    finally
                    {
                        // A drop of this event meanwhile (a full spool) counts only if it did not arrive.
                        spool.SendEnded(next.Name, verdict != Verdict.Retry);
                    }
                    if (verdict != Verdict.Retry)
                        failedLast = null;
                    switch (verdict)
                    {
                        case Verdict.Delivered:
                            // Counted before the file goes, so "nothing pending" implies "counted".
                            Interlocked.Increment(ref counters.Delivered);
                            spool.Delete(next.Name);
                            Recovered();
                            if (settings.DebugLog)
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
                            spool.Reject(next.Name, "the engine refused it: " + reason, "the engine refused it: " + detail);
                            Recovered();
                            break;
                        default:
                            Interlocked.Increment(ref counters.Retries);
                            Failed(detail);
                            // This event waits on its own and the next one is tried at once; a
                            // failure right after another one is not one event's but the
                            // engine's or the way's, and then the sender waits too.
                            spool.Defer(next.Name, settings.InitialBackoff, settings.MaxBackoff, jitter);
                            // One event failing again (nothing else to send meanwhile) is paced
                            // by its own deferral, not taken for an outage.
                            if (failedLast != null && failedLast != next.Name)
                            {
                                outage = true;
                                Thread.Sleep(Backoff());
                            }
                            failedLast = next.Name;
                            continue;
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

        /// <summary>
        /// Posts an event the spool could not take, on the caller's thread (the spool writer's):
        /// the same request and the same reading of the answer as for a spooled event, without
        /// this thread's back-off (the writer paces its tries). Its failures and its recovery
        /// are logged through the runtime's one outage notice, as the sender's are: with
        /// nothing spooled, the sender says nothing of an engine that refuses the events.
        /// `detail` is for the log, bounded and printable.
        /// </summary>
        internal Verdict PostFromMemory(string key, string body, out string detail)
        {
            string reason;
            var verdict = Post(new SpooledEvent { Key = key, Body = body }, out detail, out reason);
            if (verdict == Verdict.Retry)
            {
                fromMemoryFailures++;
                var shown = detail;
                outages.Failed(inRow => "cannot deliver to " + shownUrl + " from memory (" + inRow + " failure(s) in a row; the spool "
                                        + "cannot be written, so the event waits in memory): " + shown);
            }
            else if (fromMemoryFailures > 0)
            {
                fromMemoryFailures = 0;
                outages.Recovered(failures => "delivering to " + shownUrl + " again after " + failures + " failure(s)");
            }
            return verdict;
        }

        /// <summary>Posts from memory that failed in a row (<see cref="PostFromMemory"/>: the spool writer's thread only).</summary>
        long fromMemoryFailures;

        /// <summary>
        /// Posts one event: the verdict, `detail` for the log (bounded) and `reason` for a
        /// rejected event's reason file (the answer as read).
        /// </summary>
        Verdict Post(SpooledEvent spooled, out string detail, out string reason)
        {
            reason = null;
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
                detail = answer.Detail;
                reason = answer.Reason;
                return answer.Verdict;
            }
        }

        /// <summary>What one POST came to.</summary>
        sealed class Answer
        {
            public Verdict Verdict;
            /// <summary>For the log: the status and a bounded excerpt of the body, printable.</summary>
            public string Detail;
            /// <summary>For a rejected event's reason file: the status and the body as read, printable.</summary>
            public string Reason;
        }

        async Task<Answer> SendAsync(SpooledEvent spooled, CancellationToken cancel)
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
                    var printable = LogText.Printable(body.Text);
                    var answer = new Answer
                    {
                        Verdict = Verdict.Retry,
                        Detail = "HTTP " + status + Redirection(response)
                                 + (printable.Length > 0 ? " " + LogText.Excerpt(printable, MaxLoggedAnswerChars) : ""),
                        Reason = "HTTP " + status + (printable.Length > 0 ? " " + printable : ""),
                    };
                    var mediaType = response.Content != null && response.Content.Headers.ContentType != null
                        ? response.Content.Headers.ContentType.MediaType
                        : null;
                    var whole = body.Complete ? body.Text : null;
                    // Only the engine's own answers end an event's life in the spool: a web
                    // server, captive portal or proxy at EngineUrl answers 200 or 409 too.
                    if (IsEngineAcceptance(status, mediaType, whole))
                        answer.Verdict = Verdict.Delivered;
                    else if (IsEngineConflict(status, mediaType, whole))
                        answer.Verdict = Verdict.Conflict;
                    // The engine refused the body itself: resending the same bytes cannot help.
                    else if (IsEngineRefusal(status, mediaType, whole))
                        answer.Verdict = Verdict.Rejected;
                    else if ((status >= 200 && status < 300) || status == 409)
                        answer.Detail += " (not the engine's answer: something else answered at EngineUrl)";
                    else if (Array.IndexOf(RefusalStatuses, status) >= 0)
                        answer.Detail += " (not the engine's refusal: something between the forwarder and the engine answered)";
                    // Otherwise 3xx (never followed), 401/403 (token), 404 (URL), 408/429, 5xx,
                    // a proxy's 4xx, a 2xx or 409 that is not the engine's and anything
                    // unexpected: the event is fine, the path to the engine is not; retry.
                    return answer;
                }
            }
        }

        /// <summary>
        /// For a redirect (3xx): where it points, printable and bounded, and that it was not
        /// followed; "" for any other answer. Following one would send the event, and the
        /// bearer token, somewhere nobody configured; an operator who moved the engine learns
        /// from this where the answer points. The header is read as sent, never parsed, so a
        /// malformed one is shown too.
        /// </summary>
        static string Redirection(HttpResponseMessage response)
        {
            var status = (int)response.StatusCode;
            if (status < 300 || status > 399)
                return "";
            string location = null;
            try
            {
                IEnumerable<string> values;
                if (response.Headers.TryGetValues("Location", out values))
                    foreach (var value in values)
                    {
                        location = value;
                        break;
                    }
            }
            catch
            {
                // Unreadable: said as missing.
            }
            var shown = LogText.Excerpt(LogText.Printable(location), MaxLoggedAnswerChars);
            return shown.Length > 0
                ? " redirecting to " + shown + " (redirects are not followed: if that is the engine, set EngineUrl to its base URL)"
                : " (a redirect without a Location; redirects are not followed)";
        }

        /// <summary>A response body as read: its text and whether that is all of it.</summary>
        sealed class BodyText
        {
            public string Text = "";
            /// <summary>False when the body was longer than <see cref="MaxResponseBytesRead"/> or could not be read to its end.</summary>
            public bool Complete;
        }

        /// <summary>Up to <see cref="MaxResponseBytesRead"/> bytes of the body, as text.</summary>
        static async Task<BodyText> ReadBounded(HttpResponseMessage response, CancellationToken cancel)
        {
            if (response.Content == null)
                return new BodyText { Complete = true };
            try
            {
                var stream = await response.Content.ReadAsStreamAsync().ConfigureAwait(false);
                // One byte more than kept, to tell a body of exactly the limit from a longer one.
                var buffer = new byte[MaxResponseBytesRead + 1];
                int read = 0;
                while (read < buffer.Length)
                {
                    int n = await stream.ReadAsync(buffer, read, buffer.Length - read, cancel).ConfigureAwait(false);
                    if (n <= 0)
                        break;
                    read += n;
                }
                var complete = read <= MaxResponseBytesRead;
                return new BodyText
                {
                    Text = Encoding.UTF8.GetString(buffer, 0, Math.Min(read, MaxResponseBytesRead)),
                    Complete = complete,
                };
            }
            catch (Exception e)
            {
                return new BodyText { Text = "(body unreadable: " + e.GetBaseException().Message + ")" };
            }
        }

        /// <summary>
        /// Whether an answer is the engine's acceptance of the event, the only answer that
        /// deletes its spool file as delivered: a 2xx, Content-Type application/json, and a body
        /// that is one JSON object with a string member "event_id" (the engine answers
        /// `202 {"event_id": …, "deliveries": …}`, host/src/sources/api.rs). Anything else at
        /// EngineUrl that answers 2xx — a web server's default page, a captive portal, a load
        /// balancer's maintenance page — has not stored the event, so it is retried.
        /// `body` is null when it was not read whole.
        /// </summary>
        internal static bool IsEngineAcceptance(int status, string mediaType, string body)
        {
            if (status < 200 || status > 299 || body == null || !IsJson(mediaType))
                return false;
            bool found = false;
            int at = 0;
            if (!SkipSpace(body, ref at) || !Expect(body, ref at, '{') || !SkipSpace(body, ref at))
                return false;
            if (Expect(body, ref at, '}'))
                return false; // {} has no event_id
            while (true)
            {
                var name = JsonString(body, ref at);
                if (name == null || !SkipSpace(body, ref at) || !Expect(body, ref at, ':') || !SkipSpace(body, ref at))
                    return false;
                if (name == "event_id")
                {
                    if (JsonString(body, ref at) == null)
                        return false;
                    found = true;
                }
                else if (!SkipValue(body, ref at, 0))
                {
                    return false;
                }
                SkipSpace(body, ref at);
                if (Expect(body, ref at, '}'))
                    break;
                if (!Expect(body, ref at, ',') || !SkipSpace(body, ref at))
                    return false;
            }
            SkipSpace(body, ref at);
            return found && at == body.Length;
        }

        /// <summary>
        /// Whether an answer is the engine's 409: the idempotency key was used before for
        /// another body. Status 409, Content-Type application/json and the engine's
        /// `{"error": "…"}` (see <see cref="IsEngineErrorBody"/>); a proxy's or a WAF's 409
        /// page is retried instead, because the engine may never have seen the event.
        /// </summary>
        internal static bool IsEngineConflict(int status, string mediaType, string body)
        {
            return status == 409 && IsJson(mediaType) && IsEngineErrorBody(body);
        }

        /// <summary>
        /// Whether an answer is the engine's own refusal of the body, the only answer that sets
        /// an event aside for good: status 400, 413 or 422, Content-Type application/json, and a
        /// body that is one JSON object whose only member is a string "error" — what the engine
        /// writes for every refusal (host/src/sources/api.rs, `error`). A proxy, load balancer or
        /// TLS terminator in between answers these statuses too, for reasons that have nothing
        /// to do with the event (nginx: "400 The plain HTTP request was sent to HTTPS port" as
        /// text/html, for every request); such an answer is retried like any other failure. So
        /// is the engine's 400 for a body whose framing broke on its way: it carries a second
        /// member, "resend": true, because the engine never saw the event.
        /// `body` is null when it was not read whole.
        /// </summary>
        internal static bool IsEngineRefusal(int status, string mediaType, string body)
        {
            return Array.IndexOf(RefusalStatuses, status) >= 0 && IsJson(mediaType) && IsEngineErrorBody(body);
        }

        /// <summary>Whether a media type (without parameters) is application/json.</summary>
        static bool IsJson(string mediaType)
        {
            return mediaType != null && string.Equals(mediaType.Trim(), "application/json", StringComparison.OrdinalIgnoreCase);
        }

        /// <summary>
        /// Whether a body is exactly the engine's error shape: one JSON object whose only member
        /// is a string "error". Null (a body not read whole) is not.
        /// </summary>
        static bool IsEngineErrorBody(string body)
        {
            if (body == null)
                return false;
            int at = 0;
            return SkipSpace(body, ref at) && Expect(body, ref at, '{') && SkipSpace(body, ref at)
                   && JsonString(body, ref at) == "error" && SkipSpace(body, ref at) && Expect(body, ref at, ':')
                   && SkipSpace(body, ref at) && JsonString(body, ref at) != null && SkipSpace(body, ref at)
                   && Expect(body, ref at, '}') && SkipSpace(body, ref at) && at == body.Length;
        }

        /// <summary>
        /// Deepest nesting of arrays and objects <see cref="SkipValue"/> follows: the engine's
        /// answers are two levels deep; anything deeper is not the engine's, and the limit keeps
        /// a hostile body from exhausting the stack.
        /// </summary>
        const int MaxJsonDepth = 16;

        /// <summary>
        /// Moves past one JSON value (RFC 8259) of any kind at `at`; false if there is none.
        /// Numbers are checked only loosely (the characters a number may contain): the value is
        /// skipped, never used.
        /// </summary>
        static bool SkipValue(string text, ref int at, int depth)
        {
            if (at >= text.Length || depth > MaxJsonDepth)
                return false;
            char c = text[at];
            if (c == '"')
                return JsonString(text, ref at) != null;
            if (c == '{' || c == '[')
            {
                char close = c == '{' ? '}' : ']';
                at++;
                SkipSpace(text, ref at);
                if (Expect(text, ref at, close))
                    return true;
                while (true)
                {
                    if (c == '{')
                    {
                        if (JsonString(text, ref at) == null || !SkipSpace(text, ref at) || !Expect(text, ref at, ':')
                            || !SkipSpace(text, ref at))
                            return false;
                    }
                    if (!SkipValue(text, ref at, depth + 1))
                        return false;
                    SkipSpace(text, ref at);
                    if (Expect(text, ref at, close))
                        return true;
                    if (!Expect(text, ref at, ',') || !SkipSpace(text, ref at))
                        return false;
                }
            }
            foreach (var literal in new[] { "true", "false", "null" })
            {
                if (string.CompareOrdinal(text, at, literal, 0, literal.Length) == 0)
                {
                    at += literal.Length;
                    return true;
                }
            }
            int start = at;
            while (at < text.Length && ("+-.eE".IndexOf(text[at]) >= 0 || (text[at] >= '0' && text[at] <= '9')))
                at++;
            return at > start;
        }

        /// <summary>Moves past JSON whitespace; always true (for chaining).</summary>
        static bool SkipSpace(string text, ref int at)
        {
            while (at < text.Length && (text[at] == ' ' || text[at] == '\t' || text[at] == '\n' || text[at] == '\r'))
                at++;
            return true;
        }

        static bool Expect(string text, ref int at, char c)
        {
            if (at >= text.Length || text[at] != c)
                return false;
            at++;
            return true;
        }

        /// <summary>Reads one JSON string (RFC 8259 §7) at `at`; its value, or null if there is none.</summary>
        static string JsonString(string text, ref int at)
        {
            if (!Expect(text, ref at, '"'))
                return null;
            var value = new StringBuilder();
            while (at < text.Length)
            {
                char c = text[at++];
                if (c == '"')
                    return value.ToString();
                if (c < 0x20)
                    return null;
                if (c != '\\')
                {
                    value.Append(c);
                    continue;
                }
                if (at >= text.Length)
                    return null;
                char escape = text[at++];
                switch (escape)
                {
                    case '"': value.Append('"'); break;
                    case '\\': value.Append('\\'); break;
                    case '/': value.Append('/'); break;
                    case 'b': value.Append('\b'); break;
                    case 'f': value.Append('\f'); break;
                    case 'n': value.Append('\n'); break;
                    case 'r': value.Append('\r'); break;
                    case 't': value.Append('\t'); break;
                    case 'u':
                        int code;
                        if (at + 4 > text.Length
                            || !int.TryParse(text.Substring(at, 4), System.Globalization.NumberStyles.AllowHexSpecifier,
                                             System.Globalization.CultureInfo.InvariantCulture, out code))
                            return null;
                        value.Append((char)code);
                        at += 4;
                        break;
                    default:
                        return null;
                }
            }
            return null;
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
            return LogText.Printable(message);
        }

        void Failed(string detail)
        {
            consecutiveFailures++;
            outages.Failed(inRow => "cannot deliver to " + shownUrl + " (" + inRow + " failure(s) in a row, "
                                    + spool.Count + " event(s) waiting): " + detail + "; retrying with backoff");
        }

        void Recovered()
        {
            if (consecutiveFailures > 0)
                outages.Recovered(failures => "delivering to " + shownUrl + " again after " + failures + " failure(s)");
            consecutiveFailures = 0;
            if (outage)
            {
                // The events tried during the outage failed for it, not for themselves.
                outage = false;
                spool.ClearDeferrals();
            }
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
