//! `webhook-notify`: posts a JSON summary of a failed orchestrator job to a webhook (a generic
//! receiver, a Slack incoming webhook — which reads the `text` field — or any HTTP endpoint the
//! operator allow-lists), through the engine's `http` capability. Microsoft Teams takes an
//! Adaptive Card through a Workflows webhook instead: see the `teams-notify` example.
//!
//! Properties:
//! - `WebhookUrl` (required): the `https://` URL to post to. It must be under one of the URL
//!   prefixes of the handler's `http` grant. Webhook URLs often carry a secret, so the handler
//!   never logs it.
//! - `NotifyOn` (optional, default `Failure`): comma-separated job results that trigger a post
//!   (`Failure`, `Warning`, `Success`, `Unknown`, `InProcess`).
//! - `MinRetries` (optional, default 0): post only once `CurrentRetryCount` has reached it.
//!
//! Any non-2xx answer fails the delivery with the status and the start of the body, so a
//! rejected or broken webhook shows up in the engine's record instead of disappearing.

use jobhook_sdk::serde_json::{Value, json};
use jobhook_sdk::{
    Context, Error, Handler, JobResult, Result, delivery, export_handler, http, info, properties,
};

/// The handler's settings, read from its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where to post.
    pub url: String,
    /// Which results trigger a post.
    pub notify_on: Vec<JobResult>,
    /// Retries needed before posting.
    pub min_retries: i32,
}

impl Settings {
    /// Reads and checks the properties; errors name the property and what is wrong.
    pub fn from_properties() -> Result<Settings> {
        let url = properties::require("WebhookUrl")?.trim().to_string();
        if !url.starts_with("https://") && !url.starts_with("http://") {
            return Err(Error::new("property 'WebhookUrl' must be an https:// URL"));
        }
        let notify_on = match properties::get("NotifyOn") {
            None => vec![JobResult::Failure],
            Some(_) => properties::list("NotifyOn")?
                .iter()
                .map(|name| {
                    name.parse::<JobResult>()
                        .map_err(|e| Error::new(format!("property 'NotifyOn': {}", e.message())))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let min_retries: i32 = properties::parse_or("MinRetries", 0)?;
        if min_retries < 0 {
            return Err(Error::new(format!(
                "property 'MinRetries' must be 0 or more, got {min_retries}"
            )));
        }
        Ok(Settings {
            url,
            notify_on,
            min_retries,
        })
    }

    /// Whether this job warrants a post.
    pub fn should_notify(&self, ctx: &Context) -> bool {
        self.notify_on.contains(&ctx.job_result) && ctx.current_retry_count >= self.min_retries
    }
}

/// The one-line summary, also the `text` field chat webhooks display.
pub fn summary(ctx: &Context) -> String {
    let mut text = format!(
        "Orchestrator {} job {} ended {} on {}",
        ctx.job_type, ctx.job_id, ctx.job_result, ctx.client_machine
    );
    if ctx.current_retry_count > 0 {
        text.push_str(&format!(" after {} retries", ctx.current_retry_count));
    }
    text
}

/// The JSON document posted: `text` for chat webhooks, plus every context field under `job`
/// with Keyfactor's .NET names, and the delivery facts.
pub fn payload(ctx: &Context, handler: &str, attempt: u32) -> Value {
    json!({
        "text": summary(ctx),
        "event": "job-complete",
        "handler": handler,
        "attempt": attempt,
        "job": {
            "AgentId": ctx.agent_id.to_string(),
            "Username": ctx.username,
            "ClientMachine": ctx.client_machine,
            "JobResult": ctx.job_result.name(),
            "JobId": ctx.job_id.to_string(),
            "JobType": ctx.job_type,
            "JobTypeId": ctx.job_type_id.to_string(),
            "OperationType": ctx.operation_type.name(),
            "CertificateId": ctx.certificate_id,
            "RequestTimestamp": ctx.request_timestamp.map(|t| t.to_rfc3339()),
            "CurrentRetryCount": ctx.current_retry_count,
        }
    })
}

/// Posts a failure summary to a webhook.
pub struct WebhookNotify;

impl Handler for WebhookNotify {
    fn run(ctx: &Context) -> Result<()> {
        let settings = Settings::from_properties()?;
        if !settings.should_notify(ctx) {
            info!(
                "{} job {} ended {} (retry {}): no notification",
                ctx.job_type, ctx.job_id, ctx.job_result, ctx.current_retry_count
            );
            return Ok(());
        }
        let mut body = payload(ctx, &delivery::handler_name(), delivery::attempt());
        // How the event arrived, and Keyfactor's text about the job when the engine has it
        // (events the poller made): what a receiver needs to say why the job failed.
        body["source"] = delivery::source().to_string().into();
        body["message"] = delivery::message().into();
        let posting = || format!("posting the summary of job {} to the webhook", ctx.job_id);
        let response = http::Request::post(settings.url)
            .json(&body)?
            .send()
            .and_then(|r| r.error_for_status())
            .map_err(|e| e.context(posting()))?;
        info!(
            "notified the webhook about {} job {} (HTTP {})",
            ctx.job_type, ctx.job_id, response.status
        );
        Ok(())
    }
}

export_handler!(WebhookNotify);

#[cfg(test)]
mod tests {
    use super::*;
    use jobhook_sdk::CapabilityError;
    use jobhook_sdk::testing::{self, MockHost};

    fn failed() -> Context {
        testing::context_from_json(include_str!("../contexts/failed.json"))
            .expect("failed.json parses")
    }

    fn succeeded() -> Context {
        testing::context_from_json(include_str!("../contexts/succeeded.json"))
            .expect("succeeded.json parses")
    }

    const URL: &str = "https://hooks.example.com/services/T0/B0/secret-token";

    #[test]
    fn failure_posts_the_summary() {
        let host = MockHost::new()
            .property("WebhookUrl", URL)
            .handler_name("pki-webhook")
            .http_response(200, "ok")
            .install();
        assert_eq!(testing::run_handler::<WebhookNotify>(&failed()), Ok(()));
        let calls = host.http_requests();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].url, URL);
        assert_eq!(calls[0].method, jobhook_sdk::Method::Post);
        let body = calls[0].body_json().expect("JSON body");
        assert_eq!(body["handler"], "pki-webhook");
        assert_eq!(body["job"]["JobResult"], "Failure");
        assert_eq!(body["job"]["JobId"], "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90");
        assert_eq!(body["job"]["CurrentRetryCount"], 5);
        assert_eq!(
            body["text"],
            "Orchestrator PEMInventory job 0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90 ended Failure on orchestrator.kftrain.lab after 5 retries"
        );
        assert!(
            !host
                .logs()
                .iter()
                .any(|l| l.message.contains("secret-token")),
            "the URL is never logged"
        );
    }

    #[test]
    fn success_posts_nothing_by_default() {
        let host = MockHost::new().property("WebhookUrl", URL).install();
        assert_eq!(testing::run_handler::<WebhookNotify>(&succeeded()), Ok(()));
        assert!(host.http_requests().is_empty());
        assert!(host.logged("no notification"));
    }

    #[test]
    fn notify_on_and_min_retries_select_jobs() {
        let host = MockHost::new()
            .property("WebhookUrl", URL)
            .property("NotifyOn", "Failure, Success")
            .http_response(204, "")
            .install();
        assert_eq!(testing::run_handler::<WebhookNotify>(&succeeded()), Ok(()));
        assert_eq!(host.http_requests().len(), 1);
        drop(host);

        let host = MockHost::new()
            .property("WebhookUrl", URL)
            .property("MinRetries", "6")
            .install();
        assert_eq!(testing::run_handler::<WebhookNotify>(&failed()), Ok(()));
        assert!(host.http_requests().is_empty());
    }

    #[test]
    fn bad_properties_fail_with_the_property_name() {
        let _host = MockHost::new().install();
        assert_eq!(
            testing::run_handler::<WebhookNotify>(&failed()),
            Err("property 'WebhookUrl' is not set".to_string())
        );
        let _host = MockHost::new().property("WebhookUrl", "ftp://x").install();
        assert!(
            testing::run_handler::<WebhookNotify>(&failed())
                .unwrap_err()
                .contains("'WebhookUrl'")
        );
        let _host = MockHost::new()
            .property("WebhookUrl", URL)
            .property("NotifyOn", "Broken")
            .install();
        assert!(
            testing::run_handler::<WebhookNotify>(&failed())
                .unwrap_err()
                .contains("'NotifyOn'")
        );
        let _host = MockHost::new()
            .property("WebhookUrl", URL)
            .property("MinRetries", "-2")
            .install();
        assert!(
            testing::run_handler::<WebhookNotify>(&failed())
                .unwrap_err()
                .contains("'MinRetries'")
        );
    }

    #[test]
    fn webhook_errors_fail_the_delivery() {
        let _host = MockHost::new()
            .property("WebhookUrl", URL)
            .http_response(500, "upstream broke")
            .install();
        let reason = testing::run_handler::<WebhookNotify>(&failed()).unwrap_err();
        assert!(
            reason.contains("HTTP status 500") && reason.contains("upstream broke"),
            "{reason}"
        );
        assert!(!reason.contains("secret-token"), "{reason}");

        let _host = MockHost::new()
            .property("WebhookUrl", URL)
            .http_error(CapabilityError::NotGranted(
                "the URL is not under any granted prefix".into(),
            ))
            .install();
        let reason = testing::run_handler::<WebhookNotify>(&failed()).unwrap_err();
        assert!(reason.contains("not granted"), "{reason}");
        assert!(!reason.contains("secret-token"), "{reason}");
    }
}
