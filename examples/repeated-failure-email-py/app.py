"""repeated-failure-email, in Python: a port of Keyfactor's SendEmail_RepeatedFailureHandler
with the same behaviour as the Rust example in examples/repeated-failure-email.

When a job has failed and has already been rescheduled at least `RetryThreshold` times, it
e-mails `EmailRecipients` through the engine's mail relay.

Properties:
- RetryThreshold (required, integer >= 0): mail when CurrentRetryCount >= RetryThreshold.
- EmailRecipients (required): comma-separated addresses; blanks are ignored.
- MailFrom (optional): the sender; when unset the operator's configured From is used.

World: jobhook:handler/with-mail. componentize-py generates the `wit_world` package from the
WIT at build time; `run_handler` returns None for ok and raises `Err(reason)` for err.
"""

import datetime

import wit_world
from componentize_py_types import Err
from wit_world.imports import log, mail, properties
from wit_world.imports.types import (
    CapabilityError_Denied,
    CapabilityError_Failed,
    CapabilityError_LimitExceeded,
    CapabilityError_NotAvailable,
    CapabilityError_NotGranted,
    CapabilityError_Timeout,
    JobContext,
    JobResult,
)

# The .NET names of the job-result enum, as the Rust SDK prints them.
JOB_RESULT_NAMES = {
    JobResult.UNKNOWN: "Unknown",
    JobResult.IN_PROCESS: "InProcess",
    JobResult.SUCCESS: "Success",
    JobResult.WARNING: "Warning",
    JobResult.FAILURE: "Failure",
}

# How the Rust SDK names each capability-error case in a failure reason.
CAPABILITY_ERROR_NAMES = {
    CapabilityError_NotGranted: "not granted",
    CapabilityError_NotAvailable: "not available",
    CapabilityError_Denied: "denied",
    CapabilityError_LimitExceeded: "limit exceeded",
    CapabilityError_Timeout: "timed out",
    CapabilityError_Failed: "failed",
}


class HandlerError(Exception):
    """A failure whose message is the reason the engine records."""


def prop(name):
    """The value of property `name`, or None when absent or blank (blank means "not set")."""
    value = properties.get(name)
    return None if value is None or value.strip() == "" else value


def require(name):
    value = prop(name)
    if value is None:
        raise HandlerError(f"property '{name}' is not set")
    return value


def parse_int32(name):
    value = require(name)
    text = value.strip()
    try:
        number = int(text, 10)
    except ValueError:
        number = None
    if number is None or not -(2**31) <= number < 2**31 or "_" in text:
        raise HandlerError(
            f"property '{name}' has value '{value}', which is not a valid 32-bit integer"
        )
    return number


def parse_list(name):
    items = [item.strip() for item in require(name).split(",") if item.strip()]
    if not items:
        raise HandlerError(f"property '{name}' lists no values")
    return items


def settings():
    threshold = parse_int32("RetryThreshold")
    if threshold < 0:
        raise HandlerError(f"property 'RetryThreshold' must be 0 or more, got {threshold}")
    recipients = parse_list("EmailRecipients")
    mail_from = (properties.get("MailFrom") or "").strip() or None
    return threshold, recipients, mail_from


def should_notify(ctx: JobContext, threshold: int) -> bool:
    return ctx.job_result == JobResult.FAILURE and ctx.current_retry_count >= threshold


def subject(ctx: JobContext) -> str:
    return f"Orchestrator {ctx.job_type} Job Failed"


def body(ctx: JobContext, threshold: int) -> str:
    lines = [
        "Orchestrator Job failed too many times:",
        f"\tType: {ctx.job_type}",
        f"\tJobId: {ctx.job_id}",
        f"\tJobTypeId: {ctx.job_type_id}",
        f"\tOrchestrator: {ctx.client_machine} (agent {ctx.agent_id})",
    ]
    if ctx.username:
        lines.append(f"\tOrchestrator identity: {ctx.username}")
    lines.append(f"\tResult: {JOB_RESULT_NAMES[ctx.job_result]}")
    lines.append(f"\tRetries: {ctx.current_retry_count} (threshold {threshold})")
    if ctx.request_timestamp is not None:
        when = datetime.datetime.fromtimestamp(
            ctx.request_timestamp.seconds, tz=datetime.timezone.utc
        )
        lines.append(f"\tRequested: {when:%Y-%m-%d %H:%M:%S} UTC")
    if ctx.certificate_id is not None:
        lines.append(f"\tCertificateId: {ctx.certificate_id}")
    return "\n".join(lines) + "\n"


def run(ctx: JobContext) -> None:
    threshold, recipients, mail_from = settings()
    result = JOB_RESULT_NAMES[ctx.job_result]
    if not should_notify(ctx, threshold):
        log.log(
            log.Level.INFO,
            f"{ctx.job_type} job {ctx.job_id} ended {result} after "
            f"{ctx.current_retry_count} retries (threshold {threshold}): no mail",
        )
        return
    message = mail.Message(
        from_=mail_from,
        to=recipients,
        cc=[],
        subject=subject(ctx),
        body=body(ctx, threshold),
    )
    try:
        mail.send(message)
    except Err as e:
        kind = CAPABILITY_ERROR_NAMES.get(type(e.value), "failed")
        raise HandlerError(
            f"notifying about failed job {ctx.job_id}: mail: {kind}: {e.value.value}"
        ) from None
    log.log(
        log.Level.INFO,
        f"mailed {len(recipients)} recipient(s) about {ctx.job_type} job {ctx.job_id} "
        f"failing after {ctx.current_retry_count} retries",
    )


class WitWorld(wit_world.WitWorld):
    def run_handler(self, context: JobContext) -> None:
        try:
            run(context)
        except HandlerError as e:
            raise Err(str(e))
