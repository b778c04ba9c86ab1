//! `teams-notify`: posts an Adaptive Card about a failed orchestrator job to a Microsoft Teams
//! channel or chat through a Teams **Workflows** webhook (a flow that starts with *When a Teams
//! webhook request is received* and posts the card it receives), using the engine's `http`
//! capability.
//!
//! Office 365 (Microsoft 365) connectors — the `outlook.office.com/webhook/…` and
//! `….webhook.office.com/webhookb2/…` URLs — are being retired by Microsoft, and Workflows accept
//! only Adaptive Cards, not the connectors' message cards. This handler refuses a connector URL
//! with a message saying what to create instead.
//!
//! The request body is the message envelope the Workflows template reads:
//! `{"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive",
//! "contentUrl": null, "content": <AdaptiveCard 1.4>}]}`.
//!
//! Every text that comes from the job context is untrusted (an orchestrator chooses its own
//! name, a custom job type its own name). It is placed only in `TextRun`s of `RichTextBlock`s,
//! where Adaptive Cards do not interpret Markdown (no injected links or formatting), after
//! [`plain_text`] has removed control and bidirectional-override characters, broken up
//! `{{DATE(…)}}`-style functions and cut it to a bounded length.
//!
//! Properties:
//! - `WebhookUrl` (required): the URL of the Workflows trigger (HTTP POST URL shown by the
//!   trigger). It carries a signature (`sig=`), so it is a secret: set it with `{ env = … }` or
//!   `{ file = … }`; the handler never logs it. It must be under one of the handler's `http`
//!   grant prefixes.
//! - `NotifyOn` (optional, default `Failure`): comma-separated job results that post a card.
//! - `MinRetries` (optional, default 0): post only once `CurrentRetryCount` has reached it.
//! - `PortalUrl` (optional): the `https://` address of the Keyfactor Command Management Portal;
//!   adds an *Open Keyfactor Command* button.

use jobhook_sdk::serde_json::{Value, json};
use jobhook_sdk::text::{self, Lines};
use jobhook_sdk::{
    Context, Error, Handler, JobResult, Result, delivery, export_handler, http, info, properties,
};

/// Longest context value shown in the card, in characters. Keyfactor's names and ids are far
/// shorter; this keeps a hostile value from filling the channel.
pub const MAX_FIELD_CHARS: usize = 200;

/// Longest failure message shown, in characters: enough for an orchestrator's error text, and
/// with every other field the card stays far below Teams' 28 KB message limit.
pub const MAX_MESSAGE_CHARS: usize = 2000;

/// The Adaptive Card schema version used: 1.4 is what Teams renders for Workflows posts, and
/// `RichTextBlock`/`TextRun` exist since 1.2.
pub const CARD_VERSION: &str = "1.4";

/// The attachment content type of an Adaptive Card.
pub const ADAPTIVE_CARD: &str = "application/vnd.microsoft.card.adaptive";

/// Host names of the retired Office 365 connectors' incoming webhooks (exact name, or any name
/// ending in `.` + the entry).
const RETIRED_CONNECTOR_HOSTS: &[&str] = &["outlook.office.com", "webhook.office.com"];

/// The handler's settings, read from its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where to post.
    pub url: String,
    /// Which results post a card.
    pub notify_on: Vec<JobResult>,
    /// Retries needed before posting.
    pub min_retries: i32,
    /// The Management Portal, for the card's button.
    pub portal_url: Option<String>,
}

impl Settings {
    /// Reads and checks the properties; errors name the property and what to fix.
    pub fn from_properties() -> Result<Settings> {
        let url = properties::require("WebhookUrl")?.trim().to_string();
        check_webhook_url(&url)?;
        let notify_on = match properties::get("NotifyOn") {
            Some(v) if !v.trim().is_empty() => properties::list("NotifyOn")?
                .iter()
                .map(|name| {
                    name.parse::<JobResult>()
                        .map_err(|e| Error::new(format!("property 'NotifyOn': {}", e.message())))
                })
                .collect::<Result<Vec<_>>>()?,
            _ => vec![JobResult::Failure],
        };
        let min_retries: i32 = properties::parse_or("MinRetries", 0)?;
        if min_retries < 0 {
            return Err(Error::new(format!(
                "property 'MinRetries' must be 0 or more, got {min_retries}"
            )));
        }
        let portal_url = match properties::get("PortalUrl") {
            Some(v) if !v.trim().is_empty() => {
                let v = v.trim().to_string();
                if !v.starts_with("https://") || v.len() <= "https://".len() {
                    return Err(Error::new(
                        "property 'PortalUrl' must be an https:// address of the Keyfactor Command \
                         Management Portal",
                    ));
                }
                if v.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(Error::new(
                        "property 'PortalUrl' must not contain spaces or control characters",
                    ));
                }
                Some(v)
            }
            _ => None,
        };
        Ok(Settings {
            url,
            notify_on,
            min_retries,
            portal_url,
        })
    }

    /// Whether this job warrants a card.
    pub fn should_notify(&self, ctx: &Context) -> bool {
        self.notify_on.contains(&ctx.job_result) && ctx.current_retry_count >= self.min_retries
    }
}

/// Refuses what cannot be a Workflows trigger URL, without quoting it (it holds a signature).
fn check_webhook_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            Error::new(
                "property 'WebhookUrl' must be the https:// URL of a Teams Workflows webhook trigger",
            )
        })?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .split(':')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let host = host.trim_end_matches('.');
    if host.is_empty() {
        return Err(Error::new("property 'WebhookUrl' has no host name"));
    }
    if RETIRED_CONNECTOR_HOSTS
        .iter()
        .any(|retired| host == *retired || host.ends_with(&format!(".{retired}")))
    {
        return Err(Error::new(
            "property 'WebhookUrl' is an Office 365 connector URL; Microsoft is retiring those \
             connectors and they do not accept Adaptive Cards. Use a Teams Workflows webhook: \
             in Teams, create a workflow from the template \"Post to a channel when a webhook \
             request is received\" (trigger: When a Teams webhook request is received) and use \
             the HTTP POST URL it shows",
        ));
    }
    Ok(())
}

/// `text` made safe to show as plain text in a card: plain ([`text::plain`]: control
/// characters, line breaks included, become spaces; bidirectional-override and other invisible
/// format characters are dropped; cut to `max_chars` characters with `…`), and `{{` broken up
/// so no Adaptive Card date/time function is evaluated.
pub fn plain_text(text: &str, max_chars: usize) -> String {
    let plain = text::plain(text, max_chars, Lines::Join);
    let mut out = String::with_capacity(plain.len());
    let mut last = None;
    for c in plain.chars() {
        if c == '{' && last == Some('{') {
            // `{ {` is shown as text, never as a template function.
            out.push(' ');
        }
        out.push(c);
        last = Some(c);
    }
    out
}

/// One line of the card: a bold label and a plain value, both as `TextRun`s (no Markdown).
fn fact(label: &str, value: &str) -> Value {
    json!({
        "type": "RichTextBlock",
        "inlines": [
            {"type": "TextRun", "text": format!("{label}: "), "weight": "Bolder"},
            {"type": "TextRun", "text": value}
        ]
    })
}

/// The card's accent for a result.
fn color(result: JobResult) -> &'static str {
    match result {
        JobResult::Failure => "Attention",
        JobResult::Warning => "Warning",
        JobResult::Success => "Good",
        _ => "Default",
    }
}

/// The headline, e.g. `PEMInventory job ended Failure on orchestrator.kftrain.lab`, from
/// cleaned values.
pub fn headline(ctx: &Context) -> String {
    format!(
        "{} job ended {} on {}",
        plain_text(&ctx.job_type, MAX_FIELD_CHARS),
        ctx.job_result,
        plain_text(&ctx.client_machine, MAX_FIELD_CHARS)
    )
}

/// The Adaptive Card for `ctx`. `message` is Keyfactor's failure message for the run, when the
/// engine has one; it becomes the card's *Message* line (cleaned and cut to
/// [`MAX_MESSAGE_CHARS`]). `portal_url` adds a button; it comes from the operator, not the job.
pub fn card(ctx: &Context, message: Option<&str>, portal_url: Option<&str>) -> Value {
    let field = |s: &str| plain_text(s, MAX_FIELD_CHARS);
    let mut body = vec![json!({
        "type": "RichTextBlock",
        "inlines": [{
            "type": "TextRun",
            "text": headline(ctx),
            "size": "Medium",
            "weight": "Bolder",
            "color": color(ctx.job_result)
        }]
    })];
    body.push(fact("Job type", &field(&ctx.job_type)));
    body.push(fact("Job id", &ctx.job_id.hyphenated().to_string()));
    body.push(fact("Result", ctx.job_result.name()));
    body.push(fact(
        "Orchestrator",
        &format!(
            "{} ({})",
            field(&ctx.client_machine),
            ctx.agent_id.hyphenated()
        ),
    ));
    if !ctx.username.trim().is_empty() {
        body.push(fact("Orchestrator identity", &field(&ctx.username)));
    }
    body.push(fact("Retries", &ctx.current_retry_count.to_string()));
    if let Some(requested) = ctx.request_timestamp {
        body.push(fact(
            "Requested",
            &requested.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        ));
    }
    if let Some(id) = ctx.certificate_id {
        body.push(fact("Certificate id", &id.to_string()));
    }
    if let Some(message) = message.filter(|m| !m.trim().is_empty()) {
        body.push(fact("Message", &plain_text(message, MAX_MESSAGE_CHARS)));
    }
    let mut content = json!({
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": CARD_VERSION,
        "fallbackText": headline(ctx),
        "msteams": {"width": "Full"},
        "body": body,
    });
    if let Some(url) = portal_url {
        content["actions"] = json!([{
            "type": "Action.OpenUrl",
            "title": "Open Keyfactor Command",
            "url": url
        }]);
    }
    json!({
        "type": "message",
        "attachments": [{
            "contentType": ADAPTIVE_CARD,
            "contentUrl": null,
            "content": content
        }]
    })
}

/// Posts an Adaptive Card about a failed job to a Teams Workflows webhook.
pub struct TeamsNotify;

impl Handler for TeamsNotify {
    fn run(ctx: &Context) -> Result<()> {
        let settings = Settings::from_properties()?;
        if !settings.should_notify(ctx) {
            info!(
                "{} job {} ended {} (retry {}): no card posted",
                ctx.job_type, ctx.job_id, ctx.job_result, ctx.current_retry_count
            );
            return Ok(());
        }
        // Keyfactor's text about the job: only events the engine's poller made carry it.
        let message = delivery::message();
        let body = card(ctx, message.as_deref(), settings.portal_url.as_deref());
        let posting = || format!("posting the card for job {} to Teams", ctx.job_id);
        let response = http::Request::post(settings.url)
            .json(&body)?
            .send()
            .and_then(|r| r.error_for_status())
            .map_err(|e| e.context(posting()))?;
        info!(
            "posted a card about {} job {} to Teams (HTTP {})",
            ctx.job_type, ctx.job_id, response.status
        );
        Ok(())
    }
}

export_handler!(TeamsNotify);

#[cfg(test)]
mod tests {
    use super::*;
    use jobhook_sdk::testing::{self, MockHost};
    use jobhook_sdk::{CapabilityError, Method};

    fn sample(json: &str) -> Context {
        testing::context_from_json(json).expect("sample context parses")
    }

    fn failed() -> Context {
        sample(include_str!("../contexts/failed.json"))
    }

    const URL: &str = "https://prod-12.westeurope.logic.azure.com:443/workflows/0f1e2d3c/triggers/manual/paths/invoke?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig=secret-signature";

    /// Every `text` in the card, in order.
    fn texts(card: &Value) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(t)) = map.get("text") {
                        out.push(t.clone());
                    }
                    map.values().for_each(|v| walk(v, out));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
                _ => {}
            }
        }
        walk(card, &mut out);
        out
    }

    #[test]
    fn failure_posts_an_adaptive_card_in_the_workflows_envelope() {
        let host = MockHost::new()
            .property("WebhookUrl", URL)
            .http_response(202, "")
            .install();
        assert_eq!(testing::run_handler::<TeamsNotify>(&failed()), Ok(()));
        let calls = host.http_requests();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].method, Method::Post);
        assert_eq!(calls[0].url, URL);
        assert!(
            calls[0]
                .headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v == "application/json")
        );
        let body = calls[0].body_json().expect("JSON body");
        assert_eq!(body["type"], "message");
        let attachments = body["attachments"].as_array().expect("attachments");
        assert_eq!(attachments.len(), 1);
        assert_eq!(attachments[0]["contentType"], ADAPTIVE_CARD);
        let content = &attachments[0]["content"];
        assert_eq!(content["type"], "AdaptiveCard");
        assert_eq!(content["version"], "1.4");
        assert!(content.get("actions").is_none(), "no PortalUrl, no button");
        let body_items = content["body"].as_array().expect("card body");
        assert!(
            body_items
                .iter()
                .all(|item| item["type"] == "RichTextBlock"),
            "context text only ever in TextRuns: {content:#}"
        );
        let t = texts(content);
        assert_eq!(
            t[0],
            "PEMInventory job ended Failure on orchestrator.kftrain.lab"
        );
        assert!(t.contains(&"0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90".to_string()));
        assert!(t.contains(&"5".to_string()), "{t:?}");
        assert!(host.logged("posted a card about PEMInventory job"));
        assert!(!host.logs().iter().any(|l| l.message.contains("secret")));
    }

    #[test]
    fn hostile_context_text_is_plain_bounded_and_never_markdown() {
        let ctx = sample(include_str!("../contexts/hostile-text.json"));
        let content = card(&ctx, None, None)["attachments"][0]["content"].clone();
        let all = texts(&content).join(" | ");
        assert!(!all.contains('\u{202e}'), "{all:?}");
        assert!(!all.contains('\u{7}') && !all.contains('\r') && !all.contains('\n'));
        assert!(!all.contains("{{"), "no template function survives: {all}");
        // Markdown stays literal text inside a TextRun, which Adaptive Cards do not parse.
        assert!(all.contains("[Click here to renew](https://evil.example/login)"));
        for item in content["body"].as_array().unwrap() {
            assert_eq!(item["type"], "RichTextBlock", "{item}");
            for inline in item["inlines"].as_array().unwrap() {
                assert_eq!(inline["type"], "TextRun");
            }
        }

        let long = Context {
            client_machine: "x".repeat(10_000),
            ..failed()
        };
        let t = texts(&card(&long, Some(&"m".repeat(50_000)), None));
        assert!(t.iter().all(|s| s.chars().count() <= MAX_MESSAGE_CHARS + 1));
        assert!(t.iter().any(|s| s.ends_with('…')));
        let size = card(&long, Some(&"m".repeat(50_000)), None)
            .to_string()
            .len();
        assert!(size < 28 * 1024, "card is {size} bytes");
    }

    #[test]
    fn the_failure_message_has_one_place_in_the_card() {
        let with = card(&failed(), Some("Unable to open\nthe store file"), None);
        let t = texts(&with);
        assert!(t.contains(&"Message: ".to_string()));
        assert!(
            t.contains(&"Unable to open the store file".to_string()),
            "{t:?}"
        );
        let without = texts(&card(&failed(), Some("  "), None));
        assert!(!without.contains(&"Message: ".to_string()));
    }

    #[test]
    fn plain_text_rules() {
        assert_eq!(plain_text("a\tb\u{0}c", 10), "a b c");
        assert_eq!(plain_text("ab\u{202e}cd\u{2066}", 10), "abcd");
        // The whole class: line/paragraph separators end no line, tag and zero-width
        // characters hide nothing.
        assert_eq!(plain_text("a\u{2028}b\u{2029}c\u{85}d", 10), "a b c d");
        assert_eq!(plain_text("a\u{e0041}\u{200b}\u{ad}b", 10), "ab");
        assert_eq!(plain_text("{\u{202e}{x", 10), "{ {x");
        assert_eq!(plain_text("{{DATE(x)}}", 20), "{ {DATE(x)}}");
        assert_eq!(plain_text("{{{", 20), "{ { {");
        assert_eq!(plain_text("abcdef", 3), "abc…");
        assert_eq!(plain_text("abc", 3), "abc");
        assert_eq!(plain_text("", 3), "");
    }

    #[test]
    fn portal_url_adds_a_button_and_is_checked() {
        let host = MockHost::new()
            .property("WebhookUrl", URL)
            .property("PortalUrl", "https://command.kftrain.lab/KeyfactorPortal/")
            .http_response(202, "")
            .install();
        assert_eq!(testing::run_handler::<TeamsNotify>(&failed()), Ok(()));
        let body = host.http_requests()[0].body_json().unwrap();
        let action = &body["attachments"][0]["content"]["actions"][0];
        assert_eq!(action["type"], "Action.OpenUrl");
        assert_eq!(
            action["url"],
            "https://command.kftrain.lab/KeyfactorPortal/"
        );
        drop(host);

        for bad in [
            "http://command.kftrain.lab/",
            "javascript:alert(1)",
            "https://a b/",
        ] {
            let _host = MockHost::new()
                .property("WebhookUrl", URL)
                .property("PortalUrl", bad)
                .install();
            let reason = testing::run_handler::<TeamsNotify>(&failed()).unwrap_err();
            assert!(reason.contains("'PortalUrl'"), "{bad}: {reason}");
        }
    }

    #[test]
    fn retired_connector_urls_are_refused_with_what_to_do() {
        for retired in [
            "https://outlook.office.com/webhook/abc@def/IncomingWebhook/123/456",
            "https://contoso.webhook.office.com/webhookb2/abc@def/IncomingWebhook/123/456",
            "https://CONTOSO.Webhook.Office.com./webhookb2/x",
        ] {
            let host = MockHost::new().property("WebhookUrl", retired).install();
            let reason = testing::run_handler::<TeamsNotify>(&failed()).unwrap_err();
            assert!(
                reason.contains("Office 365 connector") && reason.contains("Workflows"),
                "{reason}"
            );
            assert!(!reason.contains("IncomingWebhook"), "the URL is not quoted");
            assert!(host.http_requests().is_empty());
        }
    }

    #[test]
    fn results_and_retries_select_jobs() {
        let host = MockHost::new().property("WebhookUrl", URL).install();
        let ok = sample(include_str!("../contexts/succeeded.json"));
        assert_eq!(testing::run_handler::<TeamsNotify>(&ok), Ok(()));
        assert!(host.http_requests().is_empty());
        assert!(host.logged("no card posted"));
        drop(host);

        let host = MockHost::new()
            .property("WebhookUrl", URL)
            .property("NotifyOn", "Warning, Failure")
            .property("MinRetries", "6")
            .install();
        assert_eq!(testing::run_handler::<TeamsNotify>(&failed()), Ok(()));
        assert!(host.http_requests().is_empty());
    }

    #[test]
    fn bad_properties_fail_with_the_property_name() {
        let _host = MockHost::new().install();
        assert_eq!(
            testing::run_handler::<TeamsNotify>(&failed()),
            Err("property 'WebhookUrl' is not set".to_string())
        );
        for (name, value) in [
            ("WebhookUrl", "ftp://x/"),
            ("WebhookUrl", "https:///path"),
            ("NotifyOn", "Broken"),
            ("MinRetries", "-1"),
            ("MinRetries", "many"),
        ] {
            let mut host = MockHost::new().property("WebhookUrl", URL);
            host = host.property(name, value);
            let _host = host.install();
            let reason = testing::run_handler::<TeamsNotify>(&failed()).unwrap_err();
            assert!(
                reason.contains(&format!("'{name}'")),
                "{name}={value}: {reason}"
            );
        }
    }

    #[test]
    fn refusals_and_errors_fail_the_delivery_without_the_url() {
        let _host = MockHost::new()
            .property("WebhookUrl", URL)
            .http_response(400, r#"{"error":{"code":"InvalidRequestContent"}}"#)
            .install();
        let reason = testing::run_handler::<TeamsNotify>(&failed()).unwrap_err();
        assert!(
            reason.contains("HTTP status 400") && reason.contains("InvalidRequestContent"),
            "{reason}"
        );
        assert!(!reason.contains("secret-signature"), "{reason}");

        let _host = MockHost::new()
            .property("WebhookUrl", URL)
            .http_error(CapabilityError::NotGranted(
                "the URL is not under any of the prefixes granted to this handler".into(),
            ))
            .install();
        let reason = testing::run_handler::<TeamsNotify>(&failed()).unwrap_err();
        assert!(reason.contains("not granted"), "{reason}");
        assert!(!reason.contains("secret-signature"), "{reason}");
    }
}
