//! The administrators' example handlers end to end: `jobhook serve` as a real process, with the
//! handler built from `examples/`, configured as `examples/README`s say, and a real HTTP server
//! on 127.0.0.1 on the other side — a Teams Workflows trigger stand-in (`teams-notify`), a
//! ServiceNow Table API stand-in (`servicenow-incident`) and the Keyfactor API stand-in
//! (`acknowledge-failed-job`). Each test posts the example's sample context to
//! `/v1/job-complete`, waits for the delivery's outcome and checks what reached the server.

use std::path::Path;
use std::time::{Duration, Instant};

use jobhook_testkit::engine::EngineProcess;
use jobhook_testkit::servicenow::TableApi;
use jobhook_testkit::standin::Standin;
use jobhook_testkit::standin::data::{FAILING_JOB_ID, INVENTORY_JOB_ID};
use jobhook_testkit::workflows::{TRIGGER_PATH, WorkflowsTrigger};
use jobhook_testkit::{guest, workspace_root};
use serde_json::Value;

/// A `jobhook serve` on 127.0.0.1:0 with `body` after `[server]` and `[store]`, in `dir`.
fn start(dir: &Path, body: &str) -> EngineProcess {
    let config = dir.join("jobhook.toml");
    let text =
        format!("[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\ndata_dir = \"data\"\n\n{body}");
    std::fs::write(&config, text).expect("write config");
    EngineProcess::start(
        Path::new(env!("CARGO_BIN_EXE_jobhook")),
        &config,
        &dir.join("engine.log"),
    )
}

/// Writes a secret file next to the configuration, as an operator would.
fn secret(dir: &Path, name: &str, value: &str) {
    std::fs::write(dir.join(name), format!("{value}\n")).expect("write secret");
}

/// An example's sample context.
fn example_context(package: &str, file: &str) -> Value {
    let path = workspace_root()
        .join("examples")
        .join(package)
        .join("contexts")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("sample context");
    serde_json::from_str(&text).expect("sample context is JSON")
}

/// Posts `context` and returns the settled delivery of `handler` once it is terminal.
async fn deliver(engine: &EngineProcess, context: &Value, handler: &str) -> Value {
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/v1/job-complete", engine.url))
        .header("content-type", "application/json")
        .body(context.to_string())
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status().as_u16(), 202);
    let accepted: Value =
        serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON");
    let id = accepted["event_id"].as_str().expect("event id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = client
            .get(format!("{}/v1/events/{id}", engine.url))
            .send()
            .await
            .expect("GET")
            .bytes()
            .await
            .expect("body");
        let event: Value = serde_json::from_slice(&body).expect("event JSON");
        let delivery = event["deliveries"]
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["handler"] == handler))
            .cloned()
            .unwrap_or_else(|| panic!("no delivery for {handler}: {event:#}"));
        if matches!(
            delivery["state"].as_str(),
            Some("succeeded" | "failed" | "skipped")
        ) {
            return delivery;
        }
        assert!(
            Instant::now() < deadline,
            "{handler} did not settle: {event:#}\n{}",
            engine.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The handler's log lines of a delivery, one per line.
fn log_lines(delivery: &Value) -> String {
    let mut out = String::new();
    let attempts = delivery["attempts"].as_array().cloned().unwrap_or_default();
    for source in std::iter::once(delivery).chain(attempts.iter()) {
        for line in source["logs"].as_array().into_iter().flatten() {
            out.push_str(line["message"].as_str().unwrap_or_default());
            out.push('\n');
        }
    }
    out
}

fn handler(name: &str, package: &str, rest: &str) -> String {
    format!(
        "[[handlers]]\nname = \"{name}\"\ncomponent = \"{}\"\njob_types = [\"*\"]\n{rest}\n",
        guest(package).display()
    )
}

// ---------------------------------------------------------------------------------------------
// teams-notify → a Workflows trigger
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn teams_notify_posts_an_adaptive_card_to_a_workflows_trigger() {
    let trigger = WorkflowsTrigger::start("s1gnature-e2e").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    secret(dir.path(), "teams-webhook-url", &trigger.url());
    let engine = start(
        dir.path(),
        &handler(
            "teams",
            "teams-notify",
            &format!(
                "properties = {{ WebhookUrl = {{ file = \"teams-webhook-url\" }}, PortalUrl = \"https://command.kftrain.lab/KeyfactorPortal/\" }}\n\
                 [handlers.grants.http]\nurls = [\"{}/workflows/\"]\nmethods = [\"POST\"]\nallow_private = true\n",
                trigger.origin()
            ),
        ),
    );

    let delivery = deliver(
        &engine,
        &example_context("teams-notify", "failed.json"),
        "teams",
    )
    .await;
    assert_eq!(delivery["state"], "succeeded", "{delivery:#}");
    let received = trigger.received();
    assert_eq!(received.len(), 1, "{received:?}");
    let request = &received[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("POST", TRIGGER_PATH)
    );
    assert!(
        request
            .query
            .as_deref()
            .unwrap_or_default()
            .contains("sig=s1gnature-e2e")
    );
    assert_eq!(request.content_type.as_deref(), Some("application/json"));
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(body["type"], "message");
    let attachment = &body["attachments"][0];
    assert_eq!(
        attachment["contentType"],
        "application/vnd.microsoft.card.adaptive"
    );
    let card = &attachment["content"];
    assert_eq!(card["type"], "AdaptiveCard");
    assert_eq!(card["version"], "1.4");
    assert_eq!(
        card["body"][0]["inlines"][0]["text"],
        "PEMInventory job ended Failure on orchestrator.kftrain.lab"
    );
    let text = card.to_string();
    assert!(
        text.contains("0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90"),
        "{text}"
    );
    assert_eq!(
        card["actions"][0]["url"],
        "https://command.kftrain.lab/KeyfactorPortal/"
    );
    assert!(
        !engine.log_text().contains("s1gnature-e2e"),
        "the URL is a secret"
    );
    assert!(!log_lines(&delivery).contains("s1gnature-e2e"));

    // Hostile context text arrives as plain, bounded TextRuns.
    let delivery = deliver(
        &engine,
        &example_context("teams-notify", "hostile-text.json"),
        "teams",
    )
    .await;
    assert_eq!(delivery["state"], "succeeded", "{delivery:#}");
    let received = trigger.received();
    assert_eq!(received.len(), 2);
    let body: Value = serde_json::from_slice(&received[1].body).unwrap();
    let card = &body["attachments"][0]["content"];
    for item in card["body"].as_array().unwrap() {
        assert_eq!(item["type"], "RichTextBlock", "{item}");
        for inline in item["inlines"].as_array().unwrap() {
            assert_eq!(inline["type"], "TextRun", "{inline}");
        }
    }
    let text = card.to_string();
    assert!(
        !text.contains("{{") && !text.contains('\u{202e}') && !text.contains("\\r"),
        "{text}"
    );

    // A success posts nothing.
    let delivery = deliver(
        &engine,
        &example_context("teams-notify", "succeeded.json"),
        "teams",
    )
    .await;
    assert_eq!(delivery["state"], "succeeded");
    assert_eq!(trigger.received().len(), 2);
}

#[tokio::test]
async fn teams_notify_refuses_a_retired_connector_url_and_sends_nothing() {
    let trigger = WorkflowsTrigger::start("unused").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = start(
        dir.path(),
        &handler(
            "teams",
            "teams-notify",
            "properties = { WebhookUrl = \"https://contoso.webhook.office.com/webhookb2/abc/IncomingWebhook/def/ghi\" }\n\
             [handlers.grants.http]\nurls = [\"https://contoso.webhook.office.com/webhookb2/\"]\n",
        ),
    );
    let delivery = deliver(
        &engine,
        &example_context("teams-notify", "failed.json"),
        "teams",
    )
    .await;
    assert_eq!(delivery["state"], "failed", "{delivery:#}");
    let reason = delivery["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("Office 365 connector") && reason.contains("Workflows"),
        "{reason}"
    );
    assert!(trigger.received().is_empty());
}

// ---------------------------------------------------------------------------------------------
// servicenow-incident → a Table API
// ---------------------------------------------------------------------------------------------

const GROUP: &str = "287ebd7da9fe198100f92cc8d1d2154e";

#[tokio::test]
async fn servicenow_incident_opens_one_incident_per_job() {
    let table = TableApi::start("svc_keyfactor", "sn-e2e-password", "unused-token")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    secret(dir.path(), "servicenow-password", "sn-e2e-password");
    let engine = start(
        dir.path(),
        &handler(
            "servicenow",
            "servicenow-incident",
            &format!(
                "properties = {{ InstanceUrl = \"{url}\", Username = \"svc_keyfactor\", Password = {{ file = \"servicenow-password\" }}, AssignmentGroup = \"{GROUP}\", Urgency = \"1\" }}\n\
                 [handlers.grants.http]\nurls = [\"{url}/api/now/table/incident\"]\nmethods = [\"GET\", \"POST\"]\nallow_private = true\n",
                url = table.url()
            ),
        ),
    );

    let failed = example_context("servicenow-incident", "failed.json");
    let delivery = deliver(&engine, &failed, "servicenow").await;
    assert_eq!(delivery["state"], "succeeded", "{delivery:#}");
    let records = table.records();
    assert_eq!(records.len(), 1, "{:?}", table.requests());
    let incident = &records[0];
    assert_eq!(
        incident["correlation_id"],
        "0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90"
    );
    assert_eq!(
        incident["short_description"],
        "Keyfactor orchestrator job failed: PEMInventory on orchestrator.kftrain.lab"
    );
    assert_eq!(incident["assignment_group"], GROUP);
    assert_eq!(incident["urgency"], "1");
    assert_eq!(incident["impact"], "2");
    let description = incident["description"].as_str().unwrap();
    assert!(
        description.contains("Orchestrator: orchestrator.kftrain.lab"),
        "{description}"
    );
    assert!(
        log_lines(&delivery)
            .contains("opened INC0010001 (sys_id 00000000000000000000000000000001)"),
        "{delivery:#}"
    );
    let requests = table.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].method, "GET");
    assert_eq!(
        requests[0].query_value("sysparm_query").as_deref(),
        Some("correlation_id=0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90^active=true")
    );
    assert_eq!(requests[1].method, "POST");
    assert!(
        requests[1]
            .header("authorization")
            .unwrap()
            .starts_with("Basic ")
    );

    // The same job fails again: the open incident is found, no second one.
    let delivery = deliver(&engine, &failed, "servicenow").await;
    assert_eq!(delivery["state"], "succeeded", "{delivery:#}");
    assert_eq!(table.records().len(), 1);
    assert!(
        log_lines(&delivery)
            .contains("INC0010001 (sys_id 00000000000000000000000000000001) is already open")
    );

    // Once it is resolved, the next failure opens a new one.
    table.set_all("active", "false");
    let delivery = deliver(&engine, &failed, "servicenow").await;
    assert_eq!(delivery["state"], "succeeded", "{delivery:#}");
    assert_eq!(table.records().len(), 2);
    assert!(!engine.log_text().contains("sn-e2e-password"));
}

#[tokio::test]
async fn servicenow_incident_reports_refused_credentials() {
    let table = TableApi::start("svc_keyfactor", "right-password", "unused-token")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    secret(dir.path(), "servicenow-password", "wrong-password");
    let engine = start(
        dir.path(),
        &handler(
            "servicenow",
            "servicenow-incident",
            &format!(
                "properties = {{ InstanceUrl = \"{url}\", Username = \"svc_keyfactor\", Password = {{ file = \"servicenow-password\" }} }}\n\
                 [handlers.grants.http]\nurls = [\"{url}/api/now/table/incident\"]\nmethods = [\"GET\", \"POST\"]\nallow_private = true\n",
                url = table.url()
            ),
        ),
    );
    let delivery = deliver(
        &engine,
        &example_context("servicenow-incident", "failed.json"),
        "servicenow",
    )
    .await;
    assert_eq!(delivery["state"], "failed", "{delivery:#}");
    let reason = delivery["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("401") && reason.contains("'Username'/'Password'"),
        "{reason}"
    );
    assert!(!reason.contains("wrong-password"), "{reason}");
    assert!(table.records().is_empty());
}

// ---------------------------------------------------------------------------------------------
// acknowledge-failed-job → the Keyfactor API
// ---------------------------------------------------------------------------------------------

fn keyfactor_section(standin: &Standin, dir: &Path) -> String {
    let c = standin.credentials();
    secret(dir, "kf-password", &c.password);
    format!(
        "[keyfactor]\nbase_url = \"{}\"\n\n[keyfactor.auth]\nkind = \"basic\"\nusername = '{}'\npassword = {{ file = \"kf-password\" }}\n\n",
        standin.base_url(),
        c.username
    )
}

const ACK_GRANT: &str = "[handlers.grants.keyfactor]\nmethods = [\"GET\", \"POST\"]\npaths = [\"OrchestratorJobs/JobHistory\", \"OrchestratorJobs/Acknowledge\"]\n";

fn status_of(standin: &Standin, id: i64) -> i64 {
    standin
        .job_history()
        .iter()
        .find(|r| r["JobHistoryId"].as_i64() == Some(id))
        .and_then(|r| r["Status"].as_i64())
        .unwrap_or(-1)
}

#[tokio::test]
async fn acknowledge_failed_job_acknowledges_the_jobs_failed_runs_in_command() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = start(
        dir.path(),
        &format!(
            "{}{}",
            keyfactor_section(&standin, dir.path()),
            handler("acknowledge", "acknowledge-failed-job", ACK_GRANT)
        ),
    );
    let delivery = deliver(
        &engine,
        &example_context("acknowledge-failed-job", "failed-inventory.json"),
        "acknowledge",
    )
    .await;
    assert_eq!(delivery["state"], "succeeded", "{delivery:#}");

    let acks: Vec<_> = standin
        .requests()
        .into_iter()
        .filter(|r| r.path == "/KeyfactorAPI/OrchestratorJobs/Acknowledge")
        .collect();
    assert_eq!(acks.len(), 1);
    let ack = &acks[0];
    assert_eq!(ack.method, "POST");
    assert_eq!(ack.header("content-type"), Some("application/json"));
    assert_eq!(ack.header("x-keyfactor-requested-with"), Some("APIClient"));
    let body: Value = serde_json::from_slice(&ack.body).unwrap();
    assert_eq!(body, serde_json::json!({"JobAuditIds": [2175, 2164, 2160]}));
    for id in [2175, 2164, 2160] {
        assert_eq!(
            status_of(&standin, id),
            4,
            "run {id} is acknowledged in Command"
        );
    }
    let history_query = standin
        .requests()
        .into_iter()
        .find(|r| r.path == "/KeyfactorAPI/OrchestratorJobs/JobHistory")
        .and_then(|r| r.query_value("pq.queryString"));
    assert_eq!(
        history_query,
        Some(format!("JobID -eq \"{FAILING_JOB_ID}\""))
    );
    assert!(
        log_lines(&delivery).contains("JobHistoryId 2175, 2164, 2160"),
        "{delivery:#}"
    );

    // The same event again: everything is acknowledged already, nothing is posted.
    let delivery = deliver(
        &engine,
        &example_context("acknowledge-failed-job", "failed-inventory.json"),
        "acknowledge",
    )
    .await;
    assert_eq!(delivery["state"], "succeeded", "{delivery:#}");
    assert!(log_lines(&delivery).contains("no run waits for acknowledgment"));
    assert_eq!(
        standin
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/Acknowledge"))
            .count(),
        1
    );
}

#[tokio::test]
async fn acknowledge_failed_job_waits_for_an_unfinished_run_and_needs_its_grant() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = start(
        dir.path(),
        &format!(
            "{}{}{}",
            keyfactor_section(&standin, dir.path()),
            handler(
                "acknowledge-warnings",
                "acknowledge-failed-job",
                &format!("properties = {{ AcknowledgeOn = \"Warning\" }}\n{ACK_GRANT}")
            ),
            handler(
                "read-only",
                "acknowledge-failed-job",
                "[handlers.grants.keyfactor]\nmethods = [\"GET\"]\npaths = [\"OrchestratorJobs/\"]\n"
            ),
        ),
    );
    // The inventory job: run 2170 ended with a warning, run 2171 is still InProcess.
    let context = example_context("acknowledge-failed-job", "warning-in-process.json");
    assert_eq!(context["JobId"], INVENTORY_JOB_ID);
    let delivery = deliver(&engine, &context, "acknowledge-warnings").await;
    assert_eq!(delivery["state"], "failed", "{delivery:#}");
    let reason = delivery["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("(JobHistoryId 2171) is not finished in JobHistory yet"),
        "{reason}"
    );
    assert_eq!(
        status_of(&standin, 2170),
        4,
        "the warning run is acknowledged"
    );
    assert_eq!(status_of(&standin, 2171), 2);

    // Without POST in its grant, the acknowledgment is refused inside the engine.
    let before = standin
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/Acknowledge"))
        .count();
    let delivery = deliver(
        &engine,
        &example_context("acknowledge-failed-job", "failed-inventory.json"),
        "read-only",
    )
    .await;
    assert_eq!(delivery["state"], "failed", "{delivery:#}");
    let reason = delivery["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("not granted"), "{reason}");
    assert_eq!(
        standin
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/Acknowledge"))
            .count(),
        before
    );
    assert_eq!(status_of(&standin, 2175), 5);
}
