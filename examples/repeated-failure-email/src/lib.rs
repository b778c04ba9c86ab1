//! `repeated-failure-email`: a port of Keyfactor's `SendEmail_RepeatedFailureHandler`, the
//! e-mail example in Keyfactor's Job Complete Handler guide.
//!
//! When a job has failed and has already been rescheduled at least `RetryThreshold` times, it
//! e-mails `EmailRecipients` through the engine's mail relay. SMTP server, port and credentials
//! are no longer handler properties: the operator configures the relay once, and the handler
//! never sees a password.
//!
//! Properties:
//! - `RetryThreshold` (required, integer ≥ 0): mail when `CurrentRetryCount >= RetryThreshold`.
//! - `EmailRecipients` (required): comma-separated addresses; blanks around and between commas
//!   are ignored.
//! - `MailFrom` (optional): the sender; when unset the operator's configured From is used.
//!
//! Unlike the .NET original, the properties are checked on every run, not only when a job has
//! failed: a typo in `RetryThreshold` shows up as a failed delivery on the first event instead
//! of as a missing e-mail on the day it matters.

use std::fmt::Write as _;

use jobhook_sdk::text::{self, Lines};
use jobhook_sdk::{
    Context, Error, Handler, JobResult, Result, delivery, export_handler, info, mail, properties,
};

/// The handler's settings, read from its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Mail once `CurrentRetryCount` reaches this.
    pub retry_threshold: i32,
    /// Who gets the mail.
    pub recipients: Vec<String>,
    /// The sender, if the operator set one.
    pub mail_from: Option<String>,
}

impl Settings {
    /// Reads and checks the properties; errors name the property and what is wrong with it.
    pub fn from_properties() -> Result<Settings> {
        let retry_threshold: i32 = properties::parse("RetryThreshold")?;
        if retry_threshold < 0 {
            return Err(Error::new(format!(
                "property 'RetryThreshold' must be 0 or more, got {retry_threshold}"
            )));
        }
        let recipients = properties::list("EmailRecipients")?;
        let mail_from = properties::get("MailFrom")
            .map(|from| from.trim().to_string())
            .filter(|from| !from.is_empty());
        Ok(Settings {
            retry_threshold,
            recipients,
            mail_from,
        })
    }
}

/// Whether this job warrants a mail: it failed, and has been retried at least `threshold` times.
pub fn should_notify(ctx: &Context, threshold: i32) -> bool {
    ctx.job_result == JobResult::Failure && ctx.current_retry_count >= threshold
}

/// The subject line, exactly as Keyfactor's example sends it.
pub fn subject(ctx: &Context) -> String {
    format!("Orchestrator {} Job Failed", ctx.job_type)
}

/// Longest failure message quoted in the mail, in characters: an orchestrator's error text fits;
/// a runaway one does not fill the mailbox.
pub const MAX_MESSAGE_CHARS: usize = 4000;

/// The plain-text body: the original's lines (type, job id, retries) plus what an administrator
/// needs to find the job: the orchestrator, the job type id, the threshold, the request time.
/// `message` is Keyfactor's failure message for the run, when the engine has one: it is added
/// as the last lines, with control characters other than line breaks replaced and cut to
/// [`MAX_MESSAGE_CHARS`].
pub fn body(ctx: &Context, threshold: i32, message: Option<&str>) -> String {
    let mut b = String::new();
    // Writing to a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(b, "Orchestrator Job failed too many times:");
    let _ = writeln!(b, "\tType: {}", ctx.job_type);
    let _ = writeln!(b, "\tJobId: {}", ctx.job_id);
    let _ = writeln!(b, "\tJobTypeId: {}", ctx.job_type_id);
    let _ = writeln!(
        b,
        "\tOrchestrator: {} (agent {})",
        ctx.client_machine, ctx.agent_id
    );
    if !ctx.username.is_empty() {
        let _ = writeln!(b, "\tOrchestrator identity: {}", ctx.username);
    }
    let _ = writeln!(b, "\tResult: {}", ctx.job_result);
    let _ = writeln!(
        b,
        "\tRetries: {} (threshold {threshold})",
        ctx.current_retry_count
    );
    if let Some(requested) = ctx.request_timestamp {
        let _ = writeln!(
            b,
            "\tRequested: {}",
            requested.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    if let Some(id) = ctx.certificate_id {
        let _ = writeln!(b, "\tCertificateId: {id}");
    }
    if let Some(message) = message.filter(|m| !m.trim().is_empty()) {
        let _ = writeln!(b, "Message:");
        let _ = writeln!(b, "{}", message_text(message));
    }
    b
}

/// `message` as mail text ([`text::plain`]): line breaks kept (CR LF and a bare CR become LF),
/// other control characters become spaces, invisible format characters are dropped, cut to
/// [`MAX_MESSAGE_CHARS`] characters with `…`.
fn message_text(message: &str) -> String {
    text::plain(message, MAX_MESSAGE_CHARS, Lines::Keep)
}

/// Sends one e-mail per repeatedly failing job.
pub struct RepeatedFailureEmail;

impl Handler for RepeatedFailureEmail {
    fn run(ctx: &Context) -> Result<()> {
        let settings = Settings::from_properties()?;
        if !should_notify(ctx, settings.retry_threshold) {
            info!(
                "{} job {} ended {} after {} retries (threshold {}): no mail",
                ctx.job_type,
                ctx.job_id,
                ctx.job_result,
                ctx.current_retry_count,
                settings.retry_threshold
            );
            return Ok(());
        }

        // Keyfactor's text about the job: only events the engine's poller made carry it.
        let failure_message = delivery::message();
        let failure_message = failure_message.as_deref();
        let mut message = mail::Message::new()
            .to_all(settings.recipients.iter().cloned())
            .subject(subject(ctx))
            .body(body(ctx, settings.retry_threshold, failure_message));
        if let Some(from) = settings.mail_from {
            message = message.from(from);
        }
        message
            .send()
            .map_err(|e| e.context(format!("notifying about failed job {}", ctx.job_id)))?;

        info!(
            "mailed {} recipient(s) about {} job {} failing after {} retries",
            settings.recipients.len(),
            ctx.job_type,
            ctx.job_id,
            ctx.current_retry_count
        );
        Ok(())
    }
}

export_handler!(RepeatedFailureEmail);

#[cfg(test)]
mod tests {
    use super::*;
    use jobhook_sdk::CapabilityError;
    use jobhook_sdk::testing::{self, MockHost, MockHostGuard};

    fn sample(json: &str) -> Context {
        testing::context_from_json(json).expect("sample context parses")
    }

    fn failed_after_retries() -> Context {
        sample(include_str!("../contexts/failed-after-retries.json"))
    }

    fn configured() -> MockHost {
        MockHost::new()
            .property("RetryThreshold", "3")
            .property(
                "EmailRecipients",
                "pki-team@example.com, oncall@example.com ,",
            )
            .accept_mail()
    }

    fn run(host: MockHost, ctx: &Context) -> (MockHostGuard, std::result::Result<(), String>) {
        let guard = host.install();
        let outcome = testing::run_handler::<RepeatedFailureEmail>(ctx);
        (guard, outcome)
    }

    #[test]
    fn keyfactors_message_about_the_job_is_in_the_mail() {
        let ctx = failed_after_retries();
        let host = configured().message("Unable to open the store file: access denied");
        let (host, outcome) = run(host, &ctx);
        assert_eq!(outcome, Ok(()));
        let mails = host.mails();
        assert!(
            mails[0]
                .body
                .contains("Message:\nUnable to open the store file: access denied"),
            "{}",
            mails[0].body
        );
    }

    #[test]
    fn keyfactors_message_is_plain_text_in_the_mail() {
        let ctx = failed_after_retries();
        let host = configured().message("line 1\r\nline 2\u{202e}\u{200b} \u{1b}[31mred");
        let (host, outcome) = run(host, &ctx);
        assert_eq!(outcome, Ok(()));
        let body = &host.mails()[0].body;
        assert!(
            body.contains("Message:\nline 1\nline 2  [31mred"),
            "{body:?}"
        );
    }

    #[test]
    fn over_threshold_sends_exactly_one_mail() {
        let ctx = failed_after_retries();
        let (host, outcome) = run(configured(), &ctx);
        assert_eq!(outcome, Ok(()));

        let mails = host.mails();
        assert_eq!(mails.len(), 1);
        let mail = &mails[0];
        assert_eq!(mail.subject, "Orchestrator WinCertInventory Job Failed");
        assert_eq!(mail.to, ["pki-team@example.com", "oncall@example.com"]);
        assert!(mail.cc.is_empty());
        assert_eq!(mail.from, None, "no MailFrom: the host's From is used");
        for needle in [
            "Orchestrator Job failed too many times:",
            "\tType: WinCertInventory",
            "\tJobId: 0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90",
            "\tOrchestrator: orchestrator.kftrain.lab (agent fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11)",
            "\tRetries: 5 (threshold 3)",
            "\tRequested: 2023-05-03 23:18:48 UTC",
        ] {
            assert!(
                mail.body.contains(needle),
                "body lacks {needle:?}:\n{}",
                mail.body
            );
        }
        assert!(host.logged("mailed 2 recipient(s)"));
    }

    #[test]
    fn exactly_at_threshold_sends() {
        let ctx = Context {
            current_retry_count: 3,
            ..failed_after_retries()
        };
        let (host, outcome) = run(configured(), &ctx);
        assert_eq!(outcome, Ok(()));
        assert_eq!(host.mails().len(), 1);
    }

    #[test]
    fn below_threshold_sends_nothing() {
        let ctx = sample(include_str!("../contexts/failed-first-try.json"));
        assert_eq!(ctx.job_result, JobResult::Failure);
        let (host, outcome) = run(configured(), &ctx);
        assert_eq!(outcome, Ok(()));
        assert!(host.mails().is_empty());
        assert!(host.logged("no mail"));

        let ctx = Context {
            current_retry_count: 2,
            ..failed_after_retries()
        };
        let (host, outcome) = run(configured(), &ctx);
        assert_eq!(outcome, Ok(()));
        assert!(host.mails().is_empty());
    }

    #[test]
    fn success_and_warning_send_nothing() {
        let ctx = sample(include_str!("../contexts/succeeded.json"));
        assert_eq!(ctx.job_result, JobResult::Success);
        let (host, outcome) = run(configured(), &ctx);
        assert_eq!(outcome, Ok(()));
        assert!(host.mails().is_empty());

        // Even with many retries, only Failure counts.
        let ctx = Context {
            job_result: JobResult::Warning,
            ..failed_after_retries()
        };
        let (host, outcome) = run(configured(), &ctx);
        assert_eq!(outcome, Ok(()));
        assert!(host.mails().is_empty());
    }

    #[test]
    fn mail_from_is_used_when_set() {
        let host = configured().property("MailFrom", " keyfactor@example.com ");
        let (host, outcome) = run(host, &failed_after_retries());
        assert_eq!(outcome, Ok(()));
        assert_eq!(
            host.mails()[0].from.as_deref(),
            Some("keyfactor@example.com")
        );

        let host = configured().property("MailFrom", "");
        let (host, _) = run(host, &failed_after_retries());
        assert_eq!(
            host.mails()[0].from,
            None,
            "blank MailFrom means the host's From"
        );
    }

    #[test]
    fn bad_threshold_fails_naming_property_and_value() {
        for ctx in [
            failed_after_retries(),
            sample(include_str!("../contexts/succeeded.json")),
        ] {
            let (host, outcome) = run(configured().property("RetryThreshold", "abc"), &ctx);
            let reason = outcome.unwrap_err();
            assert!(
                reason.contains("'RetryThreshold'") && reason.contains("'abc'"),
                "{reason}"
            );
            assert!(host.mails().is_empty());
        }

        let (_, outcome) = run(
            configured().property("RetryThreshold", "-1"),
            &failed_after_retries(),
        );
        assert_eq!(
            outcome,
            Err("property 'RetryThreshold' must be 0 or more, got -1".to_string())
        );

        let host = MockHost::new()
            .property("EmailRecipients", "a@example.com")
            .accept_mail();
        let (_, outcome) = run(host, &failed_after_retries());
        assert_eq!(
            outcome,
            Err("property 'RetryThreshold' is not set".to_string())
        );
    }

    #[test]
    fn missing_or_empty_recipients_fail() {
        let host = MockHost::new()
            .property("RetryThreshold", "3")
            .accept_mail();
        let (host, outcome) = run(host, &failed_after_retries());
        assert_eq!(
            outcome,
            Err("property 'EmailRecipients' is not set".to_string())
        );
        assert!(host.mails().is_empty());

        let host = MockHost::new()
            .property("RetryThreshold", "3")
            .property("EmailRecipients", " , ")
            .accept_mail();
        let (_, outcome) = run(host, &failed_after_retries());
        assert_eq!(
            outcome,
            Err("property 'EmailRecipients' lists no values".to_string())
        );
    }

    #[test]
    fn refused_mail_is_a_handler_failure_with_the_reason() {
        let host = MockHost::new()
            .property("RetryThreshold", "3")
            .property("EmailRecipients", "pki-team@example.com")
            .mail_error(CapabilityError::Denied(
                "pki-team@example.com is not an allowed recipient".into(),
            ));
        let (host, outcome) = run(host, &failed_after_retries());
        assert_eq!(
            outcome,
            Err(
                "notifying about failed job 0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90: mail: denied: \
                 pki-team@example.com is not an allowed recipient"
                    .to_string()
            )
        );
        assert_eq!(host.mails().len(), 1);
    }

    #[test]
    fn body_mentions_certificate_when_known() {
        let ctx = Context {
            certificate_id: Some(14),
            request_timestamp: None,
            ..failed_after_retries()
        };
        let text = body(&ctx, 2, None);
        assert!(text.contains("\tCertificateId: 14"));
        assert!(!text.contains("Requested"));
        assert!(!text.contains("Message:"));
    }

    #[test]
    fn the_failure_message_has_one_place_in_the_body() {
        let text = body(
            &failed_after_retries(),
            3,
            Some("Unable to open the store\r\nAccess denied\u{7}"),
        );
        assert!(
            text.ends_with("\tRequested: 2023-05-03 23:18:48 UTC\nMessage:\nUnable to open the store\nAccess denied \n"),
            "{text:?}"
        );
        assert!(!body(&failed_after_retries(), 3, Some(" \n ")).contains("Message:"));
        let long = body(&failed_after_retries(), 3, Some(&"x".repeat(10_000)));
        assert!(long.len() < MAX_MESSAGE_CHARS + 1000);
        assert!(long.ends_with("…\n"));
    }
}
