// The JSON body the engine's `POST /v1/job-complete` accepts, written by hand: eleven fields do
// not justify a JSON library inside Keyfactor's process (version conflicts with the DLLs already
// in WebAgentServices\bin are the documented way to break the Orchestrator API).
// The format is specified in docs/FORWARDER-WIRE.md.

using System;
using System.Globalization;
using System.Text;
using Keyfactor.Platform.Extensions;

namespace Jobhook.Forwarder
{
    /// <summary>
    /// Serialises an <see cref="OrchestratorJobCompleteHandlerContext"/> to the engine's JSON
    /// format: Keyfactor's field names, enums by name when the engine knows the name and by
    /// number otherwise, GUIDs in the hyphenated form, the timestamp as UTC ISO 8601 with `Z`.
    /// </summary>
    public static class ContextJson
    {
        /// <summary>
        /// The `JobResult` names the engine knows (host/src/context.rs). Keyfactor documents the
        /// member names; its numbers are partly inferred (reference/keyfactor.md §3.1), so a
        /// value is matched by name only, never by number. A name not here (a member a newer
        /// Keyfactor adds) is sent as its number, which the engine maps to Unknown instead of
        /// refusing the event.
        /// </summary>
        static readonly string[] JobResultNames = { "Unknown", "InProcess", "Success", "Warning", "Failure" };

        /// <summary>The `OperationType` names the engine knows (matched by name, like <see cref="JobResultNames"/>).</summary>
        static readonly string[] OperationTypeNames =
        {
            "Unknown", "Inventory", "Add", "Remove", "Create", "CreateAdd",
            "Reenrollment", "Discovery", "SetPassword", "FetchLogs",
        };

        /// <summary>
        /// Largest body the engine accepts, in bytes of UTF-8 (host/src/context.rs,
        /// MAX_CONTEXT_BYTES). A larger one is refused before it is queued or spooled
        /// (Intake): the engine would refuse it anyway, and spooled it could push good events
        /// out of a spool near its byte limit.
        /// </summary>
        public const int MaxBodyBytes = 64 * 1024;

        /// <summary>
        /// Longest string field the engine accepts, in bytes of UTF-8 (host/src/context.rs,
        /// MAX_STRING_FIELD_BYTES): it refuses a context whose Username, ClientMachine or
        /// JobType is longer (400), whatever the rest. Such an event is refused before it is
        /// queued or spooled, like a body over <see cref="MaxBodyBytes"/>: spooled, it would
        /// only be posted, refused and set aside, after taking the room of good events.
        /// </summary>
        public const int MaxStringFieldBytes = 4 * 1024;

        static readonly UTF8Encoding Utf8 = new UTF8Encoding(false);

        /// <summary>
        /// The first string field of `context` that is over <see cref="MaxStringFieldBytes"/>
        /// as the engine counts it: the UTF-8 bytes of the value sent (a lone surrogate, sent
        /// as U+FFFD, is that character's three bytes, as .NET's encoder counts it too), its
        /// escapes undone. Null if none; `bytes` is that field's length.
        /// </summary>
        public static string OverLongField(ContextSnapshot context, out int bytes)
        {
            bytes = 0;
            foreach (var field in context.Strings())
            {
                // Never more than 3 bytes a UTF-16 unit: a short string needs no counting.
                if (field.Value == null || (long)field.Value.Length * 3 <= MaxStringFieldBytes)
                    continue;
                bytes = Utf8.GetByteCount(field.Value);
                if (bytes > MaxStringFieldBytes)
                    return field.Key;
            }
            bytes = 0;
            return null;
        }

        /// <summary>Bytes of `body` in UTF-8, as it is spooled and sent.</summary>
        public static int Utf8Length(string body)
        {
            return Utf8.GetByteCount(body);
        }

        /// <summary>What a lone surrogate becomes (see <see cref="String"/>).</summary>
        const char ReplacementCharacter = '\uFFFD';

        /// <summary>
        /// The format of RequestTimestamp: seven fraction digits keep .NET's full 100 ns tick
        /// precision; the `Z` says UTC so nobody has to guess.
        /// </summary>
        const string TimestampFormat = "yyyy'-'MM'-'dd'T'HH':'mm':'ss'.'fffffff'Z'";

        /// <summary>Serialises a context.</summary>
        public static string Serialize(OrchestratorJobCompleteHandlerContext context)
        {
            return Serialize(new ContextSnapshot(context));
        }

        /// <summary>Serialises the copy of a context taken by RunHandler.</summary>
        public static string Serialize(ContextSnapshot context)
        {
            long number;
            string name;
            var json = new StringBuilder(512);
            json.Append('{');
            Field(json, "AgentId", true); Guid(json, context.AgentId);
            Field(json, "Username"); String(json, context.Username);
            Field(json, "ClientMachine"); String(json, context.ClientMachine);
            Field(json, "JobResult"); context.JobResultValue(out number, out name); Enum(json, number, name, JobResultNames);
            Field(json, "JobId"); Guid(json, context.JobId);
            Field(json, "JobType"); String(json, context.JobType);
            Field(json, "JobTypeId"); Guid(json, context.JobTypeId);
            Field(json, "OperationType"); context.OperationTypeValue(out number, out name); Enum(json, number, name, OperationTypeNames);
            Field(json, "CertificateId");
            if (context.CertificateId.HasValue)
                json.Append(context.CertificateId.Value.ToString(CultureInfo.InvariantCulture));
            else
                json.Append("null");
            Field(json, "RequestTimestamp");
            if (context.RequestTimestamp.HasValue)
                json.Append('"').Append(FormatTimestamp(context.RequestTimestamp.Value)).Append('"');
            else
                json.Append("null");
            Field(json, "CurrentRetryCount");
            json.Append(context.CurrentRetryCount.ToString(CultureInfo.InvariantCulture));
            json.Append('}');
            return json.ToString();
        }

        /// <summary>
        /// UTC ISO 8601 with `Z`. A `DateTime` of kind Local is converted; kind Unspecified (what
        /// values read from a database usually carry) is taken to be UTC already, which is also
        /// what the engine does with a timestamp that has no offset.
        /// </summary>
        public static string FormatTimestamp(DateTime value)
        {
            DateTime utc;
            if (value.Kind == DateTimeKind.Local)
                utc = value.ToUniversalTime();
            else
                utc = DateTime.SpecifyKind(value, DateTimeKind.Utc);
            return utc.ToString(TimestampFormat, CultureInfo.InvariantCulture);
        }

        static void Field(StringBuilder json, string name, bool first = false)
        {
            if (!first)
                json.Append(',');
            json.Append('"').Append(name).Append("\":");
        }

        static void Guid(StringBuilder json, Guid value)
        {
            json.Append('"').Append(value.ToString("D", CultureInfo.InvariantCulture)).Append('"');
        }

        /// <summary>
        /// An enum by name when its .NET name (ToString()) is one the engine knows, whatever its
        /// number; otherwise by number (an undefined value's ToString() is its number anyway).
        /// </summary>
        static void Enum(StringBuilder json, long number, string name, string[] known)
        {
            if (name != null && Array.IndexOf(known, name) >= 0)
                json.Append('"').Append(name).Append('"');
            else
                json.Append(number.ToString(CultureInfo.InvariantCulture));
        }

        /// <summary>
        /// A JSON string per RFC 8259 §7: quote, backslash and U+0000..U+001F escaped, everything
        /// else verbatim (the body is sent as UTF-8). A lone UTF-16 surrogate is not Unicode and
        /// cannot be encoded in UTF-8 (nor as a `\uXXXX` escape the engine would accept): it is
        /// written as U+FFFD, so one broken character never costs the whole event. `null` stays
        /// null.
        /// </summary>
        public static void String(StringBuilder json, string value)
        {
            if (value == null)
            {
                json.Append("null");
                return;
            }
            json.Append('"');
            for (int i = 0; i < value.Length; i++)
            {
                char c = value[i];
                switch (c)
                {
                    case '"': json.Append("\\\""); break;
                    case '\\': json.Append("\\\\"); break;
                    case '\n': json.Append("\\n"); break;
                    case '\r': json.Append("\\r"); break;
                    case '\t': json.Append("\\t"); break;
                    case '\b': json.Append("\\b"); break;
                    case '\f': json.Append("\\f"); break;
                    default:
                        if (c < 0x20)
                        {
                            AppendEscape(json, c);
                        }
                        else if (char.IsHighSurrogate(c) && i + 1 < value.Length && char.IsLowSurrogate(value[i + 1]))
                        {
                            json.Append(c).Append(value[i + 1]);
                            i++;
                        }
                        else if (char.IsSurrogate(c))
                        {
                            json.Append(ReplacementCharacter);
                        }
                        else
                        {
                            json.Append(c);
                        }
                        break;
                }
            }
            json.Append('"');
        }

        static void AppendEscape(StringBuilder json, char c)
        {
            json.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
        }
    }
}
