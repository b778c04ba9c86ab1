// repeated-failure-email, in JavaScript: a port of Keyfactor's
// SendEmail_RepeatedFailureHandler with the same behaviour as the Rust example in
// examples/repeated-failure-email.
//
// When a job has failed and has already been rescheduled at least `RetryThreshold` times, it
// e-mails `EmailRecipients` through the engine's mail relay.
//
// Properties:
// - RetryThreshold (required, integer >= 0): mail when CurrentRetryCount >= RetryThreshold.
// - EmailRecipients (required): comma-separated addresses; blanks are ignored.
// - MailFrom (optional): the sender; when unset the operator's configured From is used.
//
// World: jobhook:handler/with-mail (properties, log, delivery, mail). The same source builds
// with componentize-qjs (QuickJS, what build.sh uses) and with componentize-js (StarlingMonkey):
// interfaces are imported as namespaces, which both accept. WIT mapping: records are objects
// with camelCase keys, enums are their case names ("failure"), option<T> is the value or
// null/undefined, s64 may be a BigInt, and for the export `result<_, string>` returning means ok
// and throwing a string means err. An import returning `result` throws its error: a
// capability-error variant `{ tag: "denied", val: "why" }`, which componentize-qjs and
// componentize-js both hand over inside a thrown object's `payload` (its message reads
// "[object Object] (see error.payload)"); `describeCapabilityError` reads either form.

import * as properties from "jobhook:handler/properties@0.2.0";
import * as log from "jobhook:handler/log@0.2.0";
import * as mail from "jobhook:handler/mail@0.2.0";

// The .NET names of the job-result enum, as the Rust SDK prints them.
const JOB_RESULT_NAMES = {
    "unknown": "Unknown",
    "in-process": "InProcess",
    "success": "Success",
    "warning": "Warning",
    "failure": "Failure",
};

// How the Rust SDK names each capability-error case in a failure reason.
const CAPABILITY_ERROR_NAMES = {
    "not-granted": "not granted",
    "not-available": "not available",
    "denied": "denied",
    "limit-exceeded": "limit exceeded",
    "timeout": "timed out",
    "failed": "failed",
};

class HandlerError extends Error {}

function fail(message) {
    throw new HandlerError(message);
}

// The value of a property, or null when absent or blank (a blank value means "not set").
function property(name) {
    const value = properties.get(name);
    return value === null || value === undefined || value.trim() === "" ? null : value;
}

function requireProperty(name) {
    const value = property(name);
    if (value === null) fail(`property '${name}' is not set`);
    return value;
}

function parseInt32(name) {
    const value = requireProperty(name);
    const text = value.trim();
    const number = /^[+-]?\d+$/.test(text) ? Number(text) : NaN;
    if (!Number.isInteger(number) || number < -2147483648 || number > 2147483647) {
        fail(`property '${name}' has value '${value}', which is not a valid 32-bit integer`);
    }
    return number;
}

function list(name) {
    const items = requireProperty(name).split(",").map((s) => s.trim()).filter((s) => s !== "");
    if (items.length === 0) fail(`property '${name}' lists no values`);
    return items;
}

function settings() {
    const retryThreshold = parseInt32("RetryThreshold");
    if (retryThreshold < 0) {
        fail(`property 'RetryThreshold' must be 0 or more, got ${retryThreshold}`);
    }
    const recipients = list("EmailRecipients");
    const from = (properties.get("MailFrom") ?? "").trim();
    return { retryThreshold, recipients, mailFrom: from === "" ? null : from };
}

function resultName(result) {
    return JOB_RESULT_NAMES[result] ?? String(result);
}

function pad(n) {
    return String(n).padStart(2, "0");
}

// "2023-05-03 23:18:48 UTC"
function formatTimestamp(ts) {
    const d = new Date(Number(ts.seconds) * 1000);
    // Four digits as in the other ports: .NET's DateTime.MinValue is year 0001.
    return `${String(d.getUTCFullYear()).padStart(4, "0")}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ` +
        `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())} UTC`;
}

function shouldNotify(ctx, threshold) {
    return ctx.jobResult === "failure" && ctx.currentRetryCount >= threshold;
}

function subject(ctx) {
    return `Orchestrator ${ctx.jobType} Job Failed`;
}

function body(ctx, threshold) {
    const lines = [
        "Orchestrator Job failed too many times:",
        `\tType: ${ctx.jobType}`,
        `\tJobId: ${ctx.jobId}`,
        `\tJobTypeId: ${ctx.jobTypeId}`,
        `\tOrchestrator: ${ctx.clientMachine} (agent ${ctx.agentId})`,
    ];
    if (ctx.username !== "") lines.push(`\tOrchestrator identity: ${ctx.username}`);
    lines.push(`\tResult: ${resultName(ctx.jobResult)}`);
    lines.push(`\tRetries: ${ctx.currentRetryCount} (threshold ${threshold})`);
    if (ctx.requestTimestamp !== null && ctx.requestTimestamp !== undefined) {
        lines.push(`\tRequested: ${formatTimestamp(ctx.requestTimestamp)}`);
    }
    if (ctx.certificateId !== null && ctx.certificateId !== undefined) {
        lines.push(`\tCertificateId: ${ctx.certificateId}`);
    }
    return lines.join("\n") + "\n";
}

function describeCapabilityError(e) {
    if (e !== null && typeof e === "object" && typeof e.tag === "string") {
        return `${CAPABILITY_ERROR_NAMES[e.tag] ?? e.tag}: ${e.val}`;
    }
    return String(e && e.payload !== undefined ? describeCapabilityError(e.payload) : e);
}

function run(ctx) {
    const s = settings();
    if (!shouldNotify(ctx, s.retryThreshold)) {
        log.log("info", `${ctx.jobType} job ${ctx.jobId} ended ${resultName(ctx.jobResult)} ` +
            `after ${ctx.currentRetryCount} retries (threshold ${s.retryThreshold}): no mail`);
        return;
    }
    try {
        mail.send({
            from: s.mailFrom,
            to: s.recipients,
            cc: [],
            subject: subject(ctx),
            body: body(ctx, s.retryThreshold),
        });
    } catch (e) {
        fail(`notifying about failed job ${ctx.jobId}: mail: ${describeCapabilityError(e)}`);
    }
    log.log("info", `mailed ${s.recipients.length} recipient(s) about ${ctx.jobType} job ` +
        `${ctx.jobId} failing after ${ctx.currentRetryCount} retries`);
}

// The export `run-handler: func(context: job-context) -> result<_, string>`.
export function runHandler(ctx) {
    try {
        run(ctx);
    } catch (e) {
        // err(reason): a handler failure with its reason. Anything unexpected is reported the
        // same way, with its message, rather than as a trap.
        throw e instanceof Error ? e.message : String(e);
    }
}
