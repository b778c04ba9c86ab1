//! The `keyfactor`, `mail` and `http` capabilities against real servers on 127.0.0.1: the
//! Keyfactor stand-in (`tests/standin`), a real SMTP server (`jobhook_testkit::smtp`) and a
//! local webhook receiver.
//!
//! Two kinds of tests:
//! - end to end: the examples (`repeated-failure-email`, `job-history-lookup`,
//!   `webhook-notify`), built from source, loaded through the load gate and invoked in a
//!   sandbox;
//! - refusals: the host side of each capability called directly with the request a hostile
//!   guest would send (exactly what crosses the component boundary), asserting the answer
//!   *and* that nothing reached the server.
//!
//! Network rule: every server here listens on 127.0.0.1 and every request goes there.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use jobhook::bindings::jobhook::handler::http::{Host as HttpHost, Request as HttpRequest};
use jobhook::bindings::jobhook::handler::keyfactor::{Host as KeyfactorHost, Request};
use jobhook::bindings::jobhook::handler::mail::{Host as MailHost, Message};
use jobhook::bindings::types::{CapabilityError, Method, Response};
use jobhook::capabilities::http::{HttpCapability, HttpClient, HttpConfig, HttpGrant};
use jobhook::capabilities::keyfactor::auth::AuthConfig;
use jobhook::capabilities::keyfactor::{
    GrantMethod, KeyfactorCapability, KeyfactorClient, KeyfactorConfig, KeyfactorGrant,
};
use jobhook::capabilities::mail::{
    MailCapability, MailConfig, MailGrant, MailTransport, SmtpConfig, SmtpTls,
};
use jobhook::capabilities::properties::Properties;
use jobhook::capabilities::{CallBudget, ConfiguredBy, Grants, Services};
use jobhook::limits::LimitExceeded;
use jobhook::secret::SecretRef;
use jobhook::{
    Delivery, Engine, JobContext, LimitKind, LoadError, LoadOptions, Outcome, OutcomeKind,
    SandboxSpec, SandboxedHandler,
};
use jobhook_testkit::smtp::SmtpServer;
use jobhook_testkit::standin::{Standin, StandinConfig};
use jobhook_testkit::{guest_bytes, workspace_root};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::new(16).expect("engine"))
}

/// A secret in a file, as an operator would reference it.
fn secret_file(dir: &Path, name: &str, value: &str) -> SecretRef {
    let path = dir.join(name);
    std::fs::write(&path, format!("{value}\n")).unwrap();
    SecretRef::File(path)
}

fn basic_auth(standin: &Standin, dir: &Path) -> AuthConfig {
    let c = standin.credentials();
    AuthConfig::Basic {
        username: c.username.clone(),
        password: secret_file(dir, "kf-password", &c.password),
    }
}

fn bearer_auth(standin: &Standin, dir: &Path) -> AuthConfig {
    AuthConfig::Bearer {
        token: secret_file(dir, "kf-token", &standin.credentials().bearer_tokens[0]),
    }
}

fn oauth_auth(standin: &Standin, dir: &Path, secret: &str) -> AuthConfig {
    AuthConfig::Oauth2 {
        token_url: standin.token_url(),
        client_id: standin.credentials().client_id.clone(),
        client_secret: secret_file(dir, "kf-client-secret", secret),
        scopes: vec!["keyfactor-api".into()],
        audience: None,
    }
}

fn client(config: &KeyfactorConfig) -> Arc<KeyfactorClient> {
    Arc::new(KeyfactorClient::from_config(config).expect("keyfactor client"))
}

fn kf_capability(grant: KeyfactorGrant, client: &Arc<KeyfactorClient>) -> KeyfactorCapability {
    KeyfactorCapability::new(
        CallBudget::new(LimitKind::Calls("keyfactor-calls"), 100),
        Some(grant),
        Some(Arc::clone(client)),
        ConfiguredBy::default(),
    )
}

fn get(path: &str) -> Request {
    Request {
        method: Method::Get,
        path: path.into(),
        query: vec![],
        headers: vec![],
        body: None,
    }
}

async fn kf_send(
    cap: &mut KeyfactorCapability,
    request: Request,
) -> Result<Response, CapabilityError> {
    KeyfactorHost::send(cap, request).await.expect("no trap")
}

fn json(response: &Response) -> Value {
    serde_json::from_slice(&response.body).expect("JSON body")
}

/// Everything a guest can see of a response or an error, as text.
fn visible(result: &Result<Response, CapabilityError>) -> String {
    match result {
        Ok(r) => format!(
            "{} {:?} {}",
            r.status,
            r.headers,
            String::from_utf8_lossy(&r.body)
        ),
        Err(e) => format!("{e:?}"),
    }
}

fn spec(name: &str, properties: &[(&str, &str)], grants: Grants) -> SandboxSpec {
    let mut spec = SandboxSpec::new(name);
    spec.properties = Properties::new(
        properties
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    );
    spec.grants = grants;
    spec
}

async fn run_example(
    package: &str,
    services: &Services,
    spec: SandboxSpec,
    context_file: &str,
) -> Outcome {
    let handler = SandboxedHandler::load(
        engine(),
        services,
        guest_bytes(package),
        spec,
        &LoadOptions::default(),
    )
    .await
    .expect("load");
    let path = workspace_root()
        .join("examples")
        .join(package)
        .join("contexts")
        .join(context_file);
    let text = std::fs::read_to_string(&path).unwrap();
    let context = JobContext::from_json_bytes(text.as_bytes()).expect("context");
    handler.invoke(&context, Delivery::default()).await
}

fn logs(outcome: &Outcome) -> String {
    outcome
        .logs
        .iter()
        .map(|l| format!("{} {}\n", l.level, l.message))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// keyfactor: what goes out
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn keyfactor_requests_carry_the_engines_headers_and_credentials() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The base without its trailing slash: still a directory.
    let base = standin.base_url().trim_end_matches('/').to_owned();
    let client = client(&KeyfactorConfig::new(
        base,
        basic_auth(&standin, dir.path()),
    ));
    let mut cap = kf_capability(
        KeyfactorGrant::read_only(&["OrchestratorJobs/"]).unwrap(),
        &client,
    );

    let mut request = get("OrchestratorJobs/JobHistory");
    request.query = vec![
        (
            "pq.queryString".into(),
            format!(
                "JobID -eq \"{}\"",
                jobhook_testkit::standin::data::INVENTORY_JOB_ID
            ),
        ),
        ("pq.sortAscending".into(), "1".into()),
    ];
    let response = kf_send(&mut cap, request).await.unwrap();
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let rows = json(&response);
    let ids: Vec<u64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["JobHistoryId"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [2171, 2170, 2169, 2168]);
    assert!(
        response
            .headers
            .iter()
            .any(|(k, _)| k == "x-keyfactor-product-version")
    );

    let requests = standin.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.path, "/KeyfactorAPI/OrchestratorJobs/JobHistory");
    assert_eq!(
        r.query_value("pq.queryString").as_deref(),
        Some("JobID -eq \"0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90\"")
    );
    assert_eq!(r.header("x-keyfactor-requested-with"), Some("APIClient"));
    assert_eq!(r.header("x-keyfactor-api-version"), Some("1"));
    assert_eq!(r.header("accept"), Some("application/json"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("authorization").unwrap().starts_with("Basic "));
    assert!(r.header("cookie").is_none());
}

#[tokio::test]
async fn keyfactor_guest_may_set_only_allow_listed_headers() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client(&KeyfactorConfig::new(
        standin.base_url(),
        bearer_auth(&standin, dir.path()),
    ));
    let mut cap = kf_capability(KeyfactorGrant::permissive(), &client);
    let mut request = get("Certificates/14");
    request.headers = vec![
        ("X-Keyfactor-API-Version".into(), "2.0".into()),
        ("Accept".into(), "application/json; charset=utf-8".into()),
        ("X-CertificateFormat".into(), "pfx".into()),
    ];
    let response = kf_send(&mut cap, request).await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(json(&response)["IssuedCN"], "www.kftrain.lab");
    let r = &standin.requests()[0];
    assert_eq!(r.header("x-keyfactor-api-version"), Some("2.0"));
    assert_eq!(r.header("accept"), Some("application/json; charset=utf-8"));
    assert_eq!(r.header("x-certificateformat"), Some("pfx"));
    assert_eq!(
        r.header("authorization"),
        Some("Bearer standin-static-token")
    );

    // The other seeded endpoints answer too.
    for path in [
        format!("Agents/{}", jobhook_testkit::standin::data::AGENT_ID),
        format!(
            "CertificateStores/{}",
            jobhook_testkit::standin::data::IIS_STORE_ID
        ),
    ] {
        assert_eq!(
            kf_send(&mut cap, get(&path)).await.unwrap().status,
            200,
            "{path}"
        );
    }
    assert_eq!(
        kf_send(&mut cap, get("Certificates/999"))
            .await
            .unwrap()
            .status,
        404
    );
}

#[tokio::test]
async fn keyfactor_oauth_tokens_are_cached_and_refreshed_once_on_401() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = standin.credentials().client_secret.clone();
    let client = client(&KeyfactorConfig::new(
        standin.base_url(),
        oauth_auth(&standin, dir.path(), &secret),
    ));
    let mut cap = kf_capability(KeyfactorGrant::permissive(), &client);

    for _ in 0..3 {
        assert_eq!(
            kf_send(&mut cap, get("Certificates/14"))
                .await
                .unwrap()
                .status,
            200
        );
    }
    assert_eq!(standin.tokens_issued(), 1, "one token for three calls");
    let token_request = standin
        .requests()
        .into_iter()
        .find(|r| r.path == "/oauth2/token")
        .unwrap();
    let form = String::from_utf8(token_request.body.clone()).unwrap();
    assert!(
        form.contains("grant_type=client_credentials") && form.contains("scope=keyfactor-api"),
        "{form}"
    );

    // The identity provider revokes the token: the next call is refused once, refreshed, retried.
    standin.revoke_tokens();
    standin.clear_requests();
    assert_eq!(
        kf_send(&mut cap, get("Certificates/14"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(standin.tokens_issued(), 2);
    let paths: Vec<String> = standin.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/KeyfactorAPI/Certificates/14",
            "/oauth2/token",
            "/KeyfactorAPI/Certificates/14"
        ]
    );
    assert_eq!(
        standin.requests()[2].header("authorization"),
        Some("Bearer standin-access-token-2")
    );
}

#[tokio::test]
async fn keyfactor_oauth_tokens_are_refreshed_before_they_expire() {
    let standin = Standin::start_with(StandinConfig {
        token_lifetime: Duration::from_secs(2),
        ..StandinConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = standin.credentials().client_secret.clone();
    let client = client(&KeyfactorConfig::new(
        standin.base_url(),
        oauth_auth(&standin, dir.path(), &secret),
    ));
    let mut cap = kf_capability(KeyfactorGrant::permissive(), &client);
    assert_eq!(
        kf_send(&mut cap, get("Certificates/14"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        kf_send(&mut cap, get("Certificates/14"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(standin.tokens_issued(), 1);
    // A 2 s token is used for half its life, then replaced before Keyfactor would refuse it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        kf_send(&mut cap, get("Certificates/14"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(standin.tokens_issued(), 2);
    assert!(
        standin
            .api_requests()
            .iter()
            .all(|r| r.header("authorization").is_some()),
        "every API call carried a token"
    );
    assert_eq!(
        standin.api_requests().len(),
        3,
        "no call was refused and retried"
    );
}

#[tokio::test]
async fn keyfactor_oauth_failure_tells_the_guest_nothing_secret_and_sends_no_api_call() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client(&KeyfactorConfig::new(
        standin.base_url(),
        oauth_auth(&standin, dir.path(), "wrong-client-secret"),
    ));
    let mut cap = kf_capability(KeyfactorGrant::permissive(), &client);
    let result = kf_send(&mut cap, get("Certificates/14")).await;
    assert!(
        // The whole text CAPABILITIES.md quotes, nothing from the identity provider's answer.
        matches!(&result, Err(CapabilityError::Failed(m))
            if m == "the engine could not obtain a Keyfactor access token (the engine log says why)"),
        "{result:?}"
    );
    let text = visible(&result);
    assert!(
        !text.contains("wrong-client-secret") && !text.contains("127.0.0.1"),
        "{text}"
    );
    assert!(
        standin.api_requests().is_empty(),
        "no API call without a token"
    );
}

#[tokio::test]
async fn keyfactor_wrong_password_is_keyfactors_401_not_an_engine_error() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let auth = AuthConfig::Basic {
        username: standin.credentials().username.clone(),
        password: secret_file(dir.path(), "pw", "not-the-password"),
    };
    let client = client(&KeyfactorConfig::new(standin.base_url(), auth));
    let mut cap = kf_capability(KeyfactorGrant::permissive(), &client);
    let result = kf_send(&mut cap, get("Certificates/14")).await;
    let response = result.as_ref().unwrap();
    assert_eq!(response.status, 401);
    assert!(
        !response
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("www-authenticate")),
        "{:?}",
        response.headers
    );
    assert!(!visible(&result).contains("not-the-password"));
    assert_eq!(
        standin.requests().len(),
        1,
        "a static credential is not retried"
    );
}

// ---------------------------------------------------------------------------------------------
// keyfactor: the guest never sees a credential
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn keyfactor_credentials_never_come_back_through_an_echoing_server() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = standin.credentials().clone();
    let secret = c.client_secret.clone();
    let cases = [
        (
            "basic",
            basic_auth(&standin, dir.path()),
            vec![
                c.password.clone(),
                "S0ZUUkFJTlxzdmMtam9iaG9vazpzdGFuZGluLXBhc3N3b3Jk".to_string(),
            ],
        ),
        (
            "bearer",
            bearer_auth(&standin, dir.path()),
            vec![c.bearer_tokens[0].clone()],
        ),
        (
            "oauth2",
            oauth_auth(&standin, dir.path(), &secret),
            vec!["standin-access-token-".to_string(), secret.clone()],
        ),
    ];
    for (kind, auth, secrets) in cases {
        let client = client(&KeyfactorConfig::new(standin.base_url(), auth));
        let mut cap = kf_capability(KeyfactorGrant::permissive(), &client);
        let mut request = get("_Test/Echo");
        request.method = Method::Post;
        request.body = Some(br#"{"please": "echo my credentials"}"#.to_vec());
        let result = kf_send(&mut cap, request).await;
        let response = result.as_ref().unwrap();
        assert_eq!(response.status, 200, "{kind}");
        let echoed = json(response);
        // The server did receive the credential...
        assert!(
            standin
                .requests()
                .last()
                .unwrap()
                .header("authorization")
                .is_some()
        );
        // ...and the guest sees only the redaction.
        assert_eq!(
            echoed["Headers"]["authorization"], "[redacted]",
            "{kind}: {echoed}"
        );
        let text = visible(&result);
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{kind}: {secret} visible in {text}"
            );
        }
        for header in ["x-echo-authorization", "www-authenticate", "set-cookie"] {
            assert!(
                !response
                    .headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case(header)),
                "{kind}: {header} forwarded"
            );
        }
        // An allow-listed header that carries the credential is scrubbed, not dropped.
        let etag = response
            .headers
            .iter()
            .find(|(k, _)| k == "etag")
            .map(|(_, v)| v.as_str());
        assert_eq!(etag, Some("\"[redacted]\""), "{kind}");
    }
}

#[tokio::test]
async fn keyfactor_credentials_never_come_back_in_another_encoding() {
    use jobhook_testkit::standin::{Credentials, ECHO_ENCODINGS, encode_as};
    // Credentials with every character an encoder treats specially.
    let tricky = |tokens: Vec<String>| StandinConfig {
        credentials: Credentials {
            password: "p+ss/w=rd&<x>'q\"\\%20 \u{e9}\u{20ac}".into(),
            bearer_tokens: tokens,
            client_secret: "cl+ent/secr=t&<'\"%".into(),
            ..Credentials::default()
        },
        ..StandinConfig::default()
    };
    let standin = Standin::start_with(tricky(vec!["tok+en/with=sp<e>cials&'".into()]))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = standin.credentials().clone();
    let cases = [
        ("basic", basic_auth(&standin, dir.path())),
        ("bearer", bearer_auth(&standin, dir.path())),
        ("oauth2", oauth_auth(&standin, dir.path(), &c.client_secret)),
    ];
    for (kind, auth) in cases {
        let client = client(&KeyfactorConfig::new(standin.base_url(), auth));
        let mut cap = kf_capability(KeyfactorGrant::permissive(), &client);
        for encoding in ECHO_ENCODINGS {
            let mut request = get("_Test/EchoAs");
            request.query = vec![("encoding".into(), (*encoding).into())];
            let result = kf_send(&mut cap, request).await;
            let response = result.as_ref().unwrap();
            assert_eq!(response.status, 200, "{kind} {encoding}");
            // What the stand-in was sent, and so could echo.
            let sent = standin.requests().last().unwrap().clone();
            let authorization = sent.header("authorization").unwrap().to_owned();
            let mut secrets = vec![authorization.clone(), c.password.clone()];
            if let Some(token) = authorization.strip_prefix("Bearer ") {
                secrets.push(token.to_owned());
            }
            secrets.push(format!("{}:{}", c.username, c.password));
            let text = visible(&result);
            for secret in &secrets {
                assert!(!text.contains(secret.as_str()), "{kind} {encoding}: {text}");
                let encoded = encode_as(encoding, secret).unwrap();
                assert!(
                    !text.contains(&encoded),
                    "{kind} {encoding}: {encoded} visible in {text}"
                );
            }
            assert!(text.contains("[redacted]"), "{kind} {encoding}: {text}");
            // The length the guest is told is that of what it got, not the server's.
            let length: Vec<&str> = response
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.as_str())
                .collect();
            assert_eq!(
                length,
                [response.body.len().to_string()],
                "{kind} {encoding}"
            );
        }
    }

    // The credential's length cannot be read off the answer: two tokens of different lengths
    // echo to answers of the same length.
    let mut lengths = Vec::new();
    for token in ["short-token-1", "a-much-longer-token-with+some/escapes=&<>"] {
        let standin = Standin::start_with(tricky(vec![token.into()]))
            .await
            .unwrap();
        let client = client(&KeyfactorConfig::new(
            standin.base_url(),
            bearer_auth(&standin, dir.path()),
        ));
        let mut cap = kf_capability(KeyfactorGrant::permissive(), &client);
        let mut request = get("_Test/EchoAs");
        request.query = vec![("encoding".into(), "aspnet-json".into())];
        let response = kf_send(&mut cap, request).await.unwrap();
        lengths.push((response.body.len(), response.headers.clone()));
    }
    assert_eq!(lengths[0].0, lengths[1].0);
    let length_of = |h: &Vec<(String, String)>| {
        h.iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.clone())
    };
    assert_eq!(length_of(&lengths[0].1), length_of(&lengths[1].1));
}

#[tokio::test]
async fn keyfactor_handlers_act_as_their_own_identities() {
    let tokens = [
        "engine-token-0000",
        "reader-token-1111",
        "writer-token-2222",
    ];
    let standin = Standin::start_with(StandinConfig {
        credentials: jobhook_testkit::standin::Credentials {
            bearer_tokens: tokens.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        },
        ..StandinConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bearer = |name: &str, token: &str| AuthConfig::Bearer {
        token: secret_file(dir.path(), name, token),
    };
    let mut config = KeyfactorConfig::new(standin.base_url(), bearer("engine", tokens[0]));
    config
        .identities
        .insert("reader".into(), bearer("reader", tokens[1]));
    config
        .identities
        .insert("writer".into(), bearer("writer", tokens[2]));
    let grant = |identity: Option<&str>| KeyfactorGrant {
        identity: identity.map(str::to_owned),
        ..KeyfactorGrant::permissive()
    };
    let client = client(&config);
    for (identity, own) in [
        (None, tokens[0]),
        (Some("reader"), tokens[1]),
        (Some("writer"), tokens[2]),
    ] {
        let mut cap = kf_capability(grant(identity), &client);
        let result = kf_send(&mut cap, get("_Test/Echo")).await;
        assert_eq!(result.as_ref().unwrap().status, 200, "{identity:?}");
        // The stand-in saw this handler's own identity...
        let sent = standin.requests().last().unwrap().clone();
        assert_eq!(
            sent.header("authorization"),
            Some(format!("Bearer {own}").as_str()),
            "{identity:?}"
        );
        // ...and the handler sees no identity's credential, its own or another's.
        let text = visible(&result);
        for token in tokens {
            assert!(!text.contains(token), "{identity:?}: {token} in {text}");
        }
    }
    // A handler never sees another identity's credential even when the server echoes it.
    let mut cap = kf_capability(grant(Some("reader")), &client);
    let mut request = get("_Test/Echo");
    request.method = Method::Post;
    request.body = Some(format!("{{\"leak\": \"{}\"}}", tokens[2]).into_bytes());
    let text = visible(&kf_send(&mut cap, request).await);
    assert!(!text.contains(tokens[2]), "{text}");

    // Revoking one identity: the configuration check refuses only the handler that uses it,
    // and a client built without it refuses only that handler's calls.
    let mut revoked = config.clone();
    revoked.identities.remove("writer");
    let services = jobhook::capabilities::ServicesConfig {
        keyfactor: Some(revoked.clone()),
        ..Default::default()
    };
    let grants = |identity: Option<&str>| Grants {
        keyfactor: Some(grant(identity)),
        ..Grants::default()
    };
    assert!(services.check_grants(&grants(Some("reader"))).is_ok());
    assert!(services.check_grants(&grants(None)).is_ok());
    let why = services
        .check_grants(&grants(Some("writer")))
        .unwrap_err()
        .to_string();
    assert!(why.starts_with("keyfactor.identity"), "{why}");
    let client = self::client(&revoked);
    standin.clear_requests();
    let mut writer = kf_capability(grant(Some("writer")), &client);
    let refused = kf_send(&mut writer, get("Status/Endpoints")).await;
    assert!(
        matches!(&refused, Err(CapabilityError::NotAvailable(m)) if m.contains("writer")),
        "{refused:?}"
    );
    assert!(standin.requests().is_empty(), "the refused call went out");
    let mut reader = kf_capability(grant(Some("reader")), &client);
    assert_eq!(
        kf_send(&mut reader, get("Status/Endpoints"))
            .await
            .unwrap()
            .status,
        200
    );
}

/// Waits (at most 10 s) until the stand-in has received a request to a path ending in `tail`.
async fn received(standin: &Standin, tail: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !standin.requests().iter().any(|r| r.path.ends_with(tail)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the stand-in never received {tail}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyfactor_a_slow_token_fetch_of_one_identity_does_not_delay_another_identity() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = standin.credentials().client_secret.clone();
    let mut config = KeyfactorConfig::new(standin.base_url(), bearer_auth(&standin, dir.path()));
    config
        .identities
        .insert("slow-idp".into(), oauth_auth(&standin, dir.path(), &secret));
    // Longer than the stand-in holds a token request, so A's fetch is not cut short.
    config.timeout_ms = 60_000;
    let client = client(&config);
    let slow = KeyfactorGrant {
        identity: Some("slow-idp".into()),
        ..KeyfactorGrant::permissive()
    };

    // Handler A's identity provider hangs: its call is stuck fetching a token.
    standin.hold_token_endpoint();
    let a_client = Arc::clone(&client);
    let a = tokio::spawn(async move {
        let mut cap = kf_capability(slow, &a_client);
        kf_send(&mut cap, get("Status/Endpoints")).await
    });
    received(&standin, jobhook_testkit::standin::TOKEN_PATH).await;

    // Handler B, on another identity, is answered meanwhile.
    let mut b = kf_capability(KeyfactorGrant::permissive(), &client);
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        kf_send(&mut b, get("Status/Endpoints")),
    )
    .await
    .expect("B's call waited for A's token fetch");
    assert_eq!(answer.unwrap().status, 200);
    assert!(!a.is_finished(), "A's token fetch was not held");
    assert!(
        standin
            .api_requests()
            .iter()
            .all(|r| r.header("authorization") != Some("Bearer standin-access-token-1")),
        "A sent a token before its fetch was released"
    );

    // Released, A gets its token and its answer.
    standin.release_token_endpoint();
    let a = tokio::time::timeout(Duration::from_secs(10), a)
        .await
        .expect("A finishes once the identity provider answers")
        .unwrap();
    assert_eq!(a.unwrap().status, 200);
    assert_eq!(standin.tokens_issued(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyfactor_a_token_fetched_during_a_call_is_redacted_from_its_answer() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = standin.credentials().client_secret.clone();
    let mut config = KeyfactorConfig::new(standin.base_url(), bearer_auth(&standin, dir.path()));
    config
        .identities
        .insert("oauth".into(), oauth_auth(&standin, dir.path(), &secret));
    let client = client(&config);

    // B asks a server that answers late with the credentials of whoever called meanwhile.
    let b_client = Arc::clone(&client);
    let b = tokio::spawn(async move {
        let mut cap = kf_capability(KeyfactorGrant::permissive(), &b_client);
        let mut request = get("_Test/EchoOthers");
        request.query = vec![("ms".into(), "1500".into())];
        kf_send(&mut cap, request).await
    });
    received(&standin, "_Test/EchoOthers").await;

    // Meanwhile A's identity fetches its first token and uses it.
    let oauth = KeyfactorGrant {
        identity: Some("oauth".into()),
        ..KeyfactorGrant::permissive()
    };
    let mut a = kf_capability(oauth, &client);
    assert_eq!(
        kf_send(&mut a, get("Status/Endpoints"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(standin.tokens_issued(), 1);
    assert!(
        standin
            .api_requests()
            .iter()
            .any(|r| r.header("authorization") == Some("Bearer standin-access-token-1")),
        "A's token reached the server"
    );

    // B's answer carries A's token, fetched after B's request went out: it is scrubbed.
    let b = tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .expect("B is answered")
        .unwrap();
    let text = visible(&b);
    assert!(!text.contains("standin-access-token"), "{text}");
    assert_eq!(
        json(b.as_ref().unwrap())["Authorizations"],
        serde_json::json!(["[redacted]"]),
        "{text}"
    );
}

#[tokio::test]
async fn keyfactor_error_messages_name_no_host_and_no_credential() {
    // A base nobody listens on: the connection fails.
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let auth = AuthConfig::Basic {
        username: "u".into(),
        password: secret_file(dir.path(), "pw", "hunter2-secret"),
    };
    let client = client(&KeyfactorConfig::new(
        format!("http://127.0.0.1:{port}/KeyfactorAPI/"),
        auth,
    ));
    let mut cap = kf_capability(KeyfactorGrant::permissive(), &client);
    let result = kf_send(&mut cap, get("Certificates/14")).await;
    assert!(
        matches!(&result, Err(CapabilityError::Failed(_))),
        "{result:?}"
    );
    let text = visible(&result);
    assert!(
        !text.contains("127.0.0.1")
            && !text.contains(&port.to_string())
            && !text.contains("hunter2"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// keyfactor: refusals, each before anything leaves the engine
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn keyfactor_refusals_send_nothing() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = KeyfactorConfig::new(standin.base_url(), basic_auth(&standin, dir.path()));
    config.max_request_bytes = 1024;
    let client = client(&config);
    let grant = KeyfactorGrant::read_only(&["OrchestratorJobs/", "Certificates/"]).unwrap();

    let with_path = |p: &str| get(p);
    let with_query = |k: &str, v: &str| Request {
        query: vec![(k.into(), v.into())],
        ..get("Certificates/14")
    };
    let with_header = |k: &str, v: &str| Request {
        headers: vec![(k.into(), v.into())],
        ..get("Certificates/14")
    };

    let cases: Vec<(&str, Request, &str)> = vec![
        (
            "absolute URL",
            with_path("https://evil.example/KeyfactorAPI/Certificates/14"),
            "denied",
        ),
        (
            "absolute URL to the stand-in itself",
            with_path(&format!("{}Certificates/14", standin.base_url())),
            "denied",
        ),
        (
            "scheme-relative",
            with_path("//evil.example/Certificates/14"),
            "denied",
        ),
        (
            "userinfo",
            with_path("//svc:pw@evil.example/Certificates"),
            "denied",
        ),
        ("backslash", with_path("Certificates\\..\\Agents"), "denied"),
        ("dot-dot", with_path("Certificates/../Agents/1"), "denied"),
        ("dot", with_path("Certificates/./14"), "denied"),
        (
            "encoded dot-dot",
            with_path("Certificates/%2e%2e/Agents/1"),
            "denied",
        ),
        (
            "mixed encoded dot-dot",
            with_path("Certificates/%2E./Agents/1"),
            "denied",
        ),
        (
            "encoded slash",
            with_path("Certificates/..%2fAgents"),
            "denied",
        ),
        (
            "double encoding",
            with_path("Certificates/%252e%252e/Agents"),
            "denied",
        ),
        (
            "CRLF in path",
            with_path("Certificates/14 HTTP/1.1\r\nHost: evil"),
            "denied",
        ),
        (
            "encoded CRLF in path",
            with_path("Certificates/%0d%0aX-Injected:%201"),
            "denied",
        ),
        ("NUL in path", with_path("Certificates/14\0"), "denied"),
        ("query in path", with_path("Certificates/14?x=1"), "denied"),
        ("fragment in path", with_path("Certificates/14#x"), "denied"),
        (
            "encoded backslash",
            with_path("Certificates/..%5cAgents"),
            "denied",
        ),
        ("encoded percent", with_path("Certificates/%25"), "denied"),
        (
            "non-ASCII path",
            with_path("Certificates/\u{ff0e}\u{ff0e}/Agents"),
            "denied",
        ),
        (
            "too many query parameters",
            Request {
                query: vec![("a".into(), "b".into()); 65],
                ..get("Certificates/14")
            },
            "denied",
        ),
        (
            "query over 8 KiB",
            with_query("pq.queryString", &"x".repeat(8 * 1024 + 1)),
            "denied",
        ),
        (
            "CRLF in query",
            with_query("pq.queryString", "x\r\nHost: evil"),
            "denied",
        ),
        (
            "Authorization header",
            with_header("Authorization", "Basic ZXZpbDpldmls"),
            "denied",
        ),
        (
            "Cookie header",
            with_header("Cookie", "ASP.NET_SessionId=x"),
            "denied",
        ),
        ("Host header", with_header("Host", "evil.example"), "denied"),
        (
            "requested-with header",
            with_header("x-keyfactor-requested-with", "XMLHttpRequest"),
            "denied",
        ),
        (
            "forwarded header",
            with_header("X-Forwarded-For", "10.0.0.1"),
            "denied",
        ),
        (
            "CRLF in header value",
            with_header("Accept", "application/json\r\nAuthorization: x"),
            "denied",
        ),
        (
            "bad api version",
            with_header("x-keyfactor-api-version", "1; drop"),
            "denied",
        ),
        (
            "certificate format not documented",
            with_header("x-certificateformat", "P12"),
            "denied",
        ),
        (
            "certificate format with more after it",
            with_header("x-certificateformat", "PEM, PFX"),
            "denied",
        ),
        (
            "certificate format empty",
            with_header("x-certificateformat", ""),
            "denied",
        ),
        (
            "certificate format padded",
            with_header("x-certificateformat", " PFX\t"),
            "denied",
        ),
        (
            "certificate format as a prefix",
            with_header("X-CertificateFormat", "PFXX"),
            "denied",
        ),
        (
            "path not granted",
            with_path("Agents/fa406103-0b3e-4f0b-8d3b-0c1f8e6c0a11"),
            "not-granted",
        ),
        (
            "prefix is per segment",
            with_path("CertificatesX/14"),
            "not-granted",
        ),
        (
            "method not granted",
            Request {
                method: Method::Delete,
                ..get("Certificates/14")
            },
            "not-granted",
        ),
        (
            "body over the limit",
            Request {
                method: Method::Get,
                body: Some(vec![b'x'; 1025]),
                ..get("Certificates/14")
            },
            "limit-exceeded",
        ),
    ];
    for (what, request, expected) in cases {
        let mut cap = kf_capability(grant.clone(), &client);
        let result = kf_send(&mut cap, request).await;
        let kind = match &result {
            Err(CapabilityError::Denied(_)) => "denied",
            Err(CapabilityError::NotGranted(_)) => "not-granted",
            Err(CapabilityError::LimitExceeded(_)) => "limit-exceeded",
            other => panic!("{what}: expected a refusal, got {other:?}"),
        };
        assert_eq!(kind, expected, "{what}: {result:?}");
        assert!(
            standin.requests().is_empty(),
            "{what}: the stand-in was reached: {:?}",
            standin.requests()
        );
    }
}

#[tokio::test]
async fn keyfactor_responses_are_bounded_and_redirects_not_followed() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = KeyfactorConfig::new(standin.base_url(), basic_auth(&standin, dir.path()));
    config.max_response_bytes = 64 * 1024;
    // Long enough for 64 KiB of a chunked body on a busy machine, well short of the slow call.
    config.timeout_ms = 1000;
    let client = client(&config);
    let mut cap = kf_capability(KeyfactorGrant::read_only(&["_Test/"]).unwrap(), &client);

    let large = |bytes: usize, chunked: bool| {
        let mut r = get("_Test/Large");
        r.query = vec![("bytes".into(), bytes.to_string())];
        if chunked {
            r.query.push(("chunked".into(), "1".into()));
        }
        r
    };
    assert_eq!(
        kf_send(&mut cap, large(64 * 1024, false))
            .await
            .unwrap()
            .body
            .len(),
        64 * 1024
    );
    assert_eq!(
        kf_send(&mut cap, large(64 * 1024, true))
            .await
            .unwrap()
            .body
            .len(),
        64 * 1024
    );
    for chunked in [false, true] {
        let result = kf_send(&mut cap, large(8 * 1024 * 1024, chunked)).await;
        assert!(
            matches!(result, Err(CapabilityError::LimitExceeded(_))),
            "chunked={chunked}: {result:?}"
        );
    }

    let response = kf_send(&mut cap, get("_Test/Redirect")).await.unwrap();
    assert_eq!(response.status, 302);
    assert!(
        response
            .headers
            .iter()
            .any(|(k, v)| k == "location" && v == "/stolen")
    );
    assert!(
        !standin.requests().iter().any(|r| r.path == "/stolen"),
        "the redirect was followed"
    );

    let mut slow = get("_Test/Slow");
    slow.query = vec![("ms".into(), "3000".into())];
    let started = std::time::Instant::now();
    let result = kf_send(&mut cap, slow).await;
    assert!(
        matches!(result, Err(CapabilityError::Timeout(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn keyfactor_budget_grant_and_configuration_are_enforced_first() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = client(&KeyfactorConfig::new(
        standin.base_url(),
        basic_auth(&standin, dir.path()),
    ));

    let mut not_granted = KeyfactorCapability::new(
        CallBudget::new(LimitKind::Calls("keyfactor-calls"), 5),
        None,
        Some(Arc::clone(&client)),
        ConfiguredBy::default(),
    );
    assert!(matches!(
        kf_send(&mut not_granted, get("Certificates/14")).await,
        Err(CapabilityError::NotGranted(_))
    ));
    let mut not_configured = KeyfactorCapability::new(
        CallBudget::new(LimitKind::Calls("keyfactor-calls"), 5),
        Some(KeyfactorGrant::permissive()),
        None,
        ConfiguredBy::default(),
    );
    assert!(matches!(
        kf_send(&mut not_configured, get("Certificates/14")).await,
        Err(CapabilityError::NotAvailable(_))
    ));

    let mut budget = KeyfactorCapability::new(
        CallBudget::new(LimitKind::Calls("keyfactor-calls"), 2),
        Some(KeyfactorGrant::permissive()),
        Some(client),
        ConfiguredBy::default(),
    );
    for _ in 0..2 {
        assert_eq!(
            kf_send(&mut budget, get("Certificates/14"))
                .await
                .unwrap()
                .status,
            200
        );
    }
    let trap = KeyfactorHost::send(&mut budget, get("Certificates/14"))
        .await
        .unwrap_err();
    assert_eq!(
        trap.downcast_ref::<LimitExceeded>().unwrap().kind,
        LimitKind::Calls("keyfactor-calls")
    );
    assert_eq!(
        standin.requests().len(),
        2,
        "the third call never left the engine"
    );
}

#[tokio::test]
async fn the_standin_answers_401_and_400_like_keyfactor() {
    let standin = Standin::start().await.unwrap();
    let http = reqwest_free_get(&format!("{}Certificates/14", standin.base_url()), &[]).await;
    assert!(http.starts_with("HTTP/1.1 401"), "{http}");
    let auth = format!("Bearer {}", standin.credentials().bearer_tokens[0]);
    let http = reqwest_free_get(
        &format!("{}Certificates/14", standin.base_url()),
        &[("Authorization", &auth)],
    )
    .await;
    assert!(
        http.starts_with("HTTP/1.1 400") && http.contains("x-keyfactor-requested-with"),
        "{http}"
    );
    let http = reqwest_free_get(
        &format!("{}Certificates/14", standin.base_url()),
        &[
            ("Authorization", &auth),
            ("x-keyfactor-requested-with", "APIClient"),
        ],
    )
    .await;
    assert!(http.starts_with("HTTP/1.1 200"), "{http}");
    assert_eq!(
        standin.requests().len(),
        3,
        "refused requests are recorded too"
    );
}

/// A minimal HTTP/1.1 GET over a raw socket (so this test does not depend on the engine's
/// client): returns the whole response as text.
async fn reqwest_free_get(url: &str, headers: &[(&str, &str)]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    let mut request = format!("GET /{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Examples end to end
// ---------------------------------------------------------------------------------------------

/// A handler whose time runs out while the Keyfactor API holds its call (a server that takes
/// the request and never answers) ends `timed-out` saying what it was waiting for: a hung
/// API, not a looping handler (both read `timed out after N ms` before). A loop says nothing
/// of the kind (`tests/tests/hostile.rs`).
#[tokio::test]
async fn a_handler_out_of_time_in_a_keyfactor_call_is_told_as_waiting_for_it() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let services = Services {
        keyfactor: Some(client(&KeyfactorConfig::new(
            format!("http://127.0.0.1:{port}/KeyfactorAPI/"),
            AuthConfig::Bearer {
                token: secret_file(dir.path(), "token", "t0ken"),
            },
        ))),
        ..Services::default()
    };
    let grants = Grants {
        keyfactor: Some(KeyfactorGrant::read_only(&["OrchestratorJobs/JobHistory"]).unwrap()),
        ..Grants::default()
    };
    let mut spec = spec("history", &[], grants);
    spec.limits.timeout = Duration::from_millis(600);
    let outcome = run_example("job-history-lookup", &services, spec, "inventory.json").await;
    match &outcome.kind {
        OutcomeKind::TimedOut {
            limit_ms: 600,
            waiting_for: Some(call),
        } => assert!(
            call.starts_with("the Keyfactor API (GET OrchestratorJobs/JobHistory) for "),
            "{call}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(
        outcome
            .kind
            .to_string()
            .contains("timed out after 600 ms, waiting for the Keyfactor API"),
        "{}",
        outcome.kind
    );
}

#[tokio::test]
async fn job_history_lookup_calls_the_standin_and_succeeds() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let services = Services {
        keyfactor: Some(client(&KeyfactorConfig::new(
            standin.base_url(),
            basic_auth(&standin, dir.path()),
        ))),
        ..Services::default()
    };
    let grants = Grants {
        keyfactor: Some(KeyfactorGrant::read_only(&["OrchestratorJobs/JobHistory"]).unwrap()),
        ..Grants::default()
    };
    let outcome = run_example(
        "job-history-lookup",
        &services,
        spec("history", &[], grants),
        "inventory.json",
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
    let text = logs(&outcome);
    assert!(text.contains("JobHistory for WinCertInventory job 0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90 on orchestrator.kftrain.lab: 4 row(s)"), "{text}");
    assert!(text.contains("JobHistoryId 2171: Result Unknown, Status InProcess, OperationStart 2023-05-06T00:30:00"), "{text}");
    let requests = standin.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].path,
        "/KeyfactorAPI/OrchestratorJobs/JobHistory"
    );

    // The same handler without the grant is refused at load.
    let refused = SandboxedHandler::load(
        engine(),
        &services,
        guest_bytes("job-history-lookup"),
        spec("h", &[], Grants::default()),
        &LoadOptions::default(),
    )
    .await;
    assert!(
        matches!(refused, Err(LoadError::NotGranted { .. })),
        "{refused:?}"
    );
}

#[tokio::test]
async fn job_history_lookup_outside_its_grant_fails_cleanly() {
    let standin = Standin::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let services = Services {
        keyfactor: Some(client(&KeyfactorConfig::new(
            standin.base_url(),
            basic_auth(&standin, dir.path()),
        ))),
        ..Services::default()
    };
    let grants = Grants {
        keyfactor: Some(KeyfactorGrant::read_only(&["Certificates/"]).unwrap()),
        ..Grants::default()
    };
    let outcome = run_example(
        "job-history-lookup",
        &services,
        spec("history", &[], grants),
        "inventory.json",
    )
    .await;
    match &outcome.kind {
        OutcomeKind::HandlerFailed { reason } => {
            assert!(
                reason.contains("not granted") && reason.contains("Certificates/"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(standin.requests().is_empty());
}

fn mail_grant(recipients: &[&str]) -> Grants {
    Grants {
        mail: Some(MailGrant::to(recipients).unwrap()),
        ..Grants::default()
    }
}

const MAIL_PROPERTIES: &[(&str, &str)] = &[
    ("RetryThreshold", "3"),
    (
        "EmailRecipients",
        "pki-team@example.com, oncall@example.com",
    ),
];

#[tokio::test]
async fn repeated_failure_email_delivers_to_a_real_smtp_server() {
    let smtp = SmtpServer::start_with_auth("jobhook-relay", "relay-password")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut relay = SmtpConfig::new(smtp.host(), smtp.port(), SmtpTls::None);
    relay.username = Some("jobhook-relay".into());
    relay.password = Some(secret_file(dir.path(), "smtp-password", "relay-password"));
    let config = MailConfig::smtp("jobhook@example.com", relay).unwrap();
    let services = Services {
        mail: Some(Arc::new(
            MailTransport::from_config(&config, dir.path()).unwrap(),
        )),
        ..Services::default()
    };
    let outcome = run_example(
        "repeated-failure-email",
        &services,
        spec("mailer", MAIL_PROPERTIES, mail_grant(&["@example.com"])),
        "failed-after-retries.json",
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");

    let received = smtp.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(received.len(), 1);
    let mail = &received[0];
    assert_eq!(mail.mail_from, "jobhook@example.com");
    assert_eq!(mail.rcpt_to, ["pki-team@example.com", "oncall@example.com"]);
    assert_eq!(
        mail.auth,
        Some(("jobhook-relay".into(), "relay-password".into()))
    );
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("Orchestrator WinCertInventory Job Failed")
    );
    assert_eq!(mail.header("From").as_deref(), Some("jobhook@example.com"));
    let body = mail.body();
    for needle in [
        "Orchestrator Job failed too many times:",
        "JobId: 0b4b411a-7c2e-4d6f-9a51-3e8f2b7c1d90",
        "Retries: 5 (threshold 3)",
    ] {
        assert!(body.contains(needle), "body lacks {needle:?}:\n{body}");
    }

    // Below the threshold: nothing is sent.
    let outcome = run_example(
        "repeated-failure-email",
        &services,
        spec("mailer", MAIL_PROPERTIES, mail_grant(&["@example.com"])),
        "failed-first-try.json",
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
    assert_eq!(smtp.received().len(), 1);
}

#[tokio::test]
async fn repeated_failure_email_writes_to_the_file_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox");
    let config = MailConfig::outbox("jobhook@example.com", &outbox).unwrap();
    let services = Services {
        mail: Some(Arc::new(
            MailTransport::from_config(&config, dir.path()).unwrap(),
        )),
        ..Services::default()
    };
    let outcome = run_example(
        "repeated-failure-email",
        &services,
        spec("mailer", MAIL_PROPERTIES, mail_grant(&["*"])),
        "failed-after-retries.json",
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
    let files: Vec<_> = std::fs::read_dir(&outbox)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    assert!(
        text.contains("Subject: Orchestrator WinCertInventory Job Failed"),
        "{text}"
    );
    assert!(
        text.contains("To: pki-team@example.com, oncall@example.com"),
        "{text}"
    );
}

#[tokio::test]
async fn mail_outside_the_grant_reaches_no_server() {
    let smtp = SmtpServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = MailConfig::smtp(
        "jobhook@example.com",
        SmtpConfig::new(smtp.host(), smtp.port(), SmtpTls::None),
    )
    .unwrap();
    let transport = Arc::new(MailTransport::from_config(&config, dir.path()).unwrap());
    let services = Services {
        mail: Some(Arc::clone(&transport)),
        ..Services::default()
    };

    // The example, with one recipient outside the grant: the handler fails with the reason.
    let outcome = run_example(
        "repeated-failure-email",
        &services,
        spec(
            "mailer",
            MAIL_PROPERTIES,
            mail_grant(&["pki-team@example.com"]),
        ),
        "failed-after-retries.json",
    )
    .await;
    match &outcome.kind {
        OutcomeKind::HandlerFailed { reason } => assert!(
            reason.contains("oncall@example.com") && reason.contains("not an allowed recipient"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }

    // Header injection, a From outside the grant, too many recipients, over budget.
    let message = |to: &str, subject: &str, from: Option<&str>| Message {
        from: from.map(str::to_owned),
        to: vec![to.into()],
        cc: vec![],
        subject: subject.into(),
        body: "body".into(),
    };
    let mut cap = MailCapability::new(
        CallBudget::new(LimitKind::Calls("mail-calls"), 4),
        Some(MailGrant::to(&["@example.com"]).unwrap()),
        Some(transport),
        ConfiguredBy::default(),
    );
    let refusals = [
        message("a@example.com", "Hi\r\nBcc: victim@evil.example", None),
        message("a@example.com\r\nBcc: victim@evil.example", "Hi", None),
        message("a@example.com", "Hi", Some("ceo@example.com")),
        message("Victim <victim@evil.example>", "Hi", None),
    ];
    for m in refusals {
        let result = MailHost::send(&mut cap, m.clone()).await.expect("no trap");
        assert!(
            matches!(result, Err(CapabilityError::Denied(_))),
            "{m:?}: {result:?}"
        );
    }
    let trap = MailHost::send(&mut cap, message("a@example.com", "Hi", None))
        .await
        .unwrap_err();
    assert_eq!(
        trap.downcast_ref::<LimitExceeded>().unwrap().kind,
        LimitKind::Calls("mail-calls")
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(smtp.received().is_empty(), "{:?}", smtp.received());
}

// ---------------------------------------------------------------------------------------------
// http: webhook-notify and refusals
// ---------------------------------------------------------------------------------------------

/// What a receiver recorded: `(method, path, body)` per request.
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A webhook receiver on 127.0.0.1 recording `(method, path, body)`.
struct Receiver {
    url: String,
    received: Received,
}

async fn receiver() -> Receiver {
    use axum::response::IntoResponse;
    let received: Received = Arc::default();
    let store = Arc::clone(&received);
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let store = Arc::clone(&store);
        async move {
            let method = req.method().to_string();
            let path = req.uri().path().to_owned();
            let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                .await
                .unwrap_or_default()
                .to_vec();
            store.lock().unwrap().push((method, path.clone(), body));
            match path.as_str() {
                "/hooks/redirect" => {
                    (axum::http::StatusCode::FOUND, [("location", "/stolen")]).into_response()
                }
                "/hooks/big" => vec![b'x'; 2 * 1024 * 1024].into_response(),
                _ => (axum::http::StatusCode::OK, "ok").into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Receiver { url, received }
}

impl Receiver {
    fn received(&self) -> Vec<(String, String, Vec<u8>)> {
        self.received.lock().unwrap().clone()
    }
}

fn http_services() -> Services {
    Services {
        http: Some(Arc::new(
            HttpClient::from_config(&HttpConfig::default()).unwrap(),
        )),
        ..Services::default()
    }
}

#[tokio::test]
async fn webhook_notify_posts_a_json_summary_to_an_allow_listed_url() {
    let hook = receiver().await;
    let services = http_services();
    let url = format!("{}/hooks/pki/T0/B0/secret-token", hook.url);
    let grants = Grants {
        http: Some(HttpGrant::post_to(&[&format!("{}/hooks/pki/", hook.url)], true).unwrap()),
        ..Grants::default()
    };
    let outcome = run_example(
        "webhook-notify",
        &services,
        spec("pki-webhook", &[("WebhookUrl", &url)], grants),
        "failed.json",
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
    let received = hook.received();
    assert_eq!(received.len(), 1);
    let (method, path, body) = &received[0];
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("POST", "/hooks/pki/T0/B0/secret-token")
    );
    let body: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(body["handler"], "pki-webhook");
    assert_eq!(body["job"]["JobResult"], "Failure");
    assert_eq!(body["job"]["CurrentRetryCount"], 5);
    assert_eq!(body["source"], "direct");
    assert_eq!(body["message"], Value::Null);
    assert!(!logs(&outcome).contains("secret-token"));

    // A success sends nothing.
    let grants = Grants {
        http: Some(HttpGrant::post_to(&[&format!("{}/hooks/pki/", hook.url)], true).unwrap()),
        ..Grants::default()
    };
    let outcome = run_example(
        "webhook-notify",
        &services,
        spec("pki-webhook", &[("WebhookUrl", &url)], grants),
        "succeeded.json",
    )
    .await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
    assert_eq!(hook.received().len(), 1);
}

#[tokio::test]
async fn webhook_notify_outside_its_grant_reaches_nothing() {
    let hook = receiver().await;
    let services = http_services();
    let url = format!("{}/hooks/pki/x", hook.url);
    // Private destinations not allowed: loopback (and plain http) refused.
    let grants = Grants {
        http: Some(HttpGrant::post_to(&[&format!("{}/hooks/pki/", hook.url)], false).unwrap()),
        ..Grants::default()
    };
    let outcome = run_example(
        "webhook-notify",
        &services,
        spec("w", &[("WebhookUrl", &url)], grants),
        "failed.json",
    )
    .await;
    assert!(
        matches!(&outcome.kind, OutcomeKind::HandlerFailed { reason } if reason.contains("denied")),
        "{outcome:?}"
    );
    // A URL under no granted prefix.
    let grants = Grants {
        http: Some(HttpGrant::post_to(&[&format!("{}/hooks/other/", hook.url)], true).unwrap()),
        ..Grants::default()
    };
    let outcome = run_example(
        "webhook-notify",
        &services,
        spec("w", &[("WebhookUrl", &url)], grants),
        "failed.json",
    )
    .await;
    assert!(
        matches!(&outcome.kind, OutcomeKind::HandlerFailed { reason } if reason.contains("not granted")),
        "{outcome:?}"
    );
    assert!(hook.received().is_empty(), "{:?}", hook.received());
}

#[tokio::test]
async fn http_refusals_send_nothing() {
    let hook = receiver().await;
    let port = hook.url.rsplit(':').next().unwrap().to_owned();
    let client = Arc::new(
        HttpClient::from_config(&HttpConfig {
            max_request_bytes: 1024,
            ..HttpConfig::default()
        })
        .unwrap(),
    );
    let loopback_grant = HttpGrant::post_to(
        &[
            &format!("{}/hooks/", hook.url),
            &format!("http://localhost:{port}/hooks/"),
            &format!("https://localhost:{port}/hooks/"),
            &format!("https://127.0.0.1:{port}/hooks/"),
            &format!("https://[::ffff:127.0.0.1]:{port}/hooks/"),
        ],
        true,
    )
    .unwrap();
    let public_grant = HttpGrant {
        allow_private: false,
        ..loopback_grant.clone()
    };
    let post = |url: String| HttpRequest {
        method: Method::Post,
        url,
        headers: vec![],
        body: Some(b"{}".to_vec()),
    };
    let hooks = |rest: &str| format!("{}/hooks/{rest}", hook.url);

    let cases: Vec<(&str, &HttpGrant, HttpRequest, &str)> = vec![
        (
            "plain http without allow_private",
            &public_grant,
            post(hooks("a")),
            "denied",
        ),
        (
            "loopback IP without allow_private",
            &public_grant,
            post(format!("https://127.0.0.1:{port}/hooks/a")),
            "denied",
        ),
        (
            "localhost name without allow_private (resolved, then refused)",
            &public_grant,
            post(format!("https://localhost:{port}/hooks/a")),
            "denied",
        ),
        (
            "IPv4-mapped loopback",
            &public_grant,
            post(format!("https://[::ffff:127.0.0.1]:{port}/hooks/a")),
            "denied",
        ),
        (
            "userinfo",
            &loopback_grant,
            post(format!("http://user:pw@127.0.0.1:{port}/hooks/a")),
            "denied",
        ),
        (
            "outside the prefix",
            &loopback_grant,
            post(format!("{}/admin", hook.url)),
            "not-granted",
        ),
        (
            "dot-dot out of the prefix",
            &loopback_grant,
            post(hooks("../admin")),
            "not-granted",
        ),
        (
            "encoded dot-dot out of the prefix",
            &loopback_grant,
            post(hooks("%2e%2e/admin")),
            "not-granted",
        ),
        (
            "encoded slash",
            &loopback_grant,
            post(hooks("a%2f..%2f..%2fadmin")),
            "denied",
        ),
        (
            "dots and a space, which IIS trims to dot-dot",
            &loopback_grant,
            post(hooks("..%20/admin")),
            "denied",
        ),
        (
            "three dots",
            &loopback_grant,
            post(hooks(".../admin")),
            "denied",
        ),
        (
            "another port",
            &loopback_grant,
            post("http://127.0.0.1:1/hooks/a".into()),
            "not-granted",
        ),
        (
            "method not granted",
            &loopback_grant,
            HttpRequest {
                method: Method::Delete,
                ..post(hooks("a"))
            },
            "not-granted",
        ),
        (
            "Host header",
            &loopback_grant,
            HttpRequest {
                headers: vec![("Host".into(), "evil.example".into())],
                ..post(hooks("a"))
            },
            "denied",
        ),
        (
            "CRLF in header",
            &loopback_grant,
            HttpRequest {
                headers: vec![("X-A".into(), "1\r\nX-B: 2".into())],
                ..post(hooks("a"))
            },
            "denied",
        ),
        (
            "body over the limit",
            &loopback_grant,
            HttpRequest {
                body: Some(vec![b'x'; 1025]),
                ..post(hooks("a"))
            },
            "limit-exceeded",
        ),
        (
            "not a URL",
            &loopback_grant,
            post("/hooks/a".into()),
            "denied",
        ),
    ];
    // Every IPv6 range that embeds an IPv4 address is judged by it: loopback in each form.
    let embedded_loopback = [
        ("SIIT IPv4-translated", "[::ffff:0:127.0.0.1]"),
        ("IPv4-compatible", "[::127.0.0.1]"),
        ("NAT64 well-known", "[64:ff9b::7f00:1]"),
        ("NAT64 local-use /96", "[64:ff9b:1::7f00:1]"),
        ("NAT64 local-use /48", "[64:ff9b:1:7f00:1::]"),
        ("6to4", "[2002:7f00:1::1]"),
        ("Teredo", "[2001:0:7f00:1:0:0:80ff:fffe]"),
    ];
    // Any https URL, public destinations only: the address rule alone decides.
    let any_public = HttpGrant::permissive();
    let mut cases = cases;
    for (what, host) in embedded_loopback {
        cases.push((
            what,
            &any_public,
            post(format!("https://{host}:{port}/hooks/a")),
            "denied",
        ));
    }
    // Path forms some servers treat as traversal, by class.
    for (what, rest) in [
        ("Tomcat ..;", "..;/admin"),
        ("path parameter", "a;x=1"),
        ("encoded ;", "%3B/admin"),
        ("encoded slash (upper hex)", "a%2F..%2Fadmin"),
        ("encoded backslash", "a%5C..%5Cadmin"),
        ("double encoding", "%252e%252e/admin"),
        ("overlong UTF-8 dot", "%c0%ae%c0%ae/admin"),
        ("fullwidth dots", "%ef%bc%8e%ef%bc%8e/admin"),
        ("encoded NUL", "a%00"),
    ] {
        cases.push((what, &loopback_grant, post(hooks(rest)), "denied"));
    }
    // Header families, not a list: every member is refused.
    for name in [
        "X-Forwarded-Port",
        "X-Forwarded-Prefix",
        "x-forwarded-server",
        "X-Client-IP",
        "X-Originating-IP",
        "True-Client-IP",
        "CF-Connecting-IP",
        "X-Cluster-Client-IP",
        "Keep-Alive",
        "TE",
        "Trailer",
        "Upgrade",
        "Proxy-Anything",
        "X-Original-URL",
    ] {
        cases.push((
            name,
            &loopback_grant,
            HttpRequest {
                headers: vec![(name.into(), "127.0.0.1".into())],
                ..post(hooks("a"))
            },
            "denied",
        ));
    }
    for (what, grant, request, expected) in cases {
        let mut cap = HttpCapability::new(
            CallBudget::new(LimitKind::Calls("http-calls"), 5),
            Some(grant.clone()),
            Some(Arc::clone(&client)),
            ConfiguredBy::default(),
        );
        let result = HttpHost::send(&mut cap, request).await.expect("no trap");
        let kind = match &result {
            Err(CapabilityError::Denied(_)) => "denied",
            Err(CapabilityError::NotGranted(_)) => "not-granted",
            Err(CapabilityError::LimitExceeded(_)) => "limit-exceeded",
            other => panic!("{what}: expected a refusal, got {other:?}"),
        };
        assert_eq!(kind, expected, "{what}: {result:?}");
        assert!(
            hook.received().is_empty(),
            "{what}: the receiver was reached"
        );
    }

    // Allowed: plain http to a loopback *name* goes through the checking resolver and arrives.
    let mut cap = HttpCapability::new(
        CallBudget::new(LimitKind::Calls("http-calls"), 5),
        Some(loopback_grant.clone()),
        Some(Arc::clone(&client)),
        ConfiguredBy::default(),
    );
    let ok = HttpHost::send(&mut cap, post(format!("http://localhost:{port}/hooks/a")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ok.status, 200);
    // Redirects are returned, not followed; big answers are cut off.
    let redirect = HttpHost::send(&mut cap, post(hooks("redirect")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(redirect.status, 302);
    let big = HttpHost::send(&mut cap, post(hooks("big"))).await.unwrap();
    assert!(
        matches!(big, Err(CapabilityError::LimitExceeded(_))),
        "{big:?}"
    );
    let paths: Vec<String> = hook.received().into_iter().map(|(_, p, _)| p).collect();
    assert_eq!(paths, ["/hooks/a", "/hooks/redirect", "/hooks/big"]);
}

#[tokio::test]
async fn services_build_from_configuration() {
    let standin = Standin::start_with(StandinConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("pw");
    std::fs::write(&password, "standin-password\n").unwrap();
    let text = format!(
        r#"{{
            "keyfactor": {{
                "base_url": "{}",
                "auth": {{"kind": "basic", "username": "KFTRAIN\\svc-jobhook", "password": {{"file": "{}"}}}}
            }},
            "mail": {{"from": "jobhook@example.com"}},
            "http": {{"timeout_ms": 2000}}
        }}"#,
        standin.base_url(),
        password.display()
    );
    let config: jobhook::capabilities::ServicesConfig = serde_json::from_str(&text).unwrap();
    let env = jobhook::capabilities::ServiceEnv {
        default_outbox: dir.path().join("outbox"),
        configured_by: jobhook::capabilities::ConfiguredBy::ConfigFile,
    };
    let services = Services::from_config(&config, &env).unwrap();
    // The outbox is checked, not made, until mail is written to it.
    assert!(!dir.path().join("outbox").exists());
    let mut cap = kf_capability(
        KeyfactorGrant {
            methods: vec![GrantMethod::Get],
            paths: vec![
                jobhook::capabilities::keyfactor::path::PathPrefix::parse("Certificates").unwrap(),
            ],
            identity: None,
        },
        services.keyfactor.as_ref().unwrap(),
    );
    assert_eq!(
        kf_send(&mut cap, get("certificates/14"))
            .await
            .unwrap()
            .status,
        200
    );
    let debug = format!("{services:?} {config:?}");
    assert!(!debug.contains("standin-password"), "{debug}");

    // A literal secret or an insecure base is refused with a message saying what to do.
    let bad = text.replace(
        &format!("{{\"file\": \"{}\"}}", password.display()),
        "\"hunter2\"",
    );
    let e = serde_json::from_str::<jobhook::capabilities::ServicesConfig>(&bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("by reference"), "{e}");
    let insecure = text.replace(
        &standin.base_url(),
        "http://command.example.com/KeyfactorAPI/",
    );
    let config: jobhook::capabilities::ServicesConfig = serde_json::from_str(&insecure).unwrap();
    let e = Services::from_config(&config, &env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("https"), "{e}");
}

/// SMTP smuggling, from a real guest against a relay that accepts the lax end-of-data forms:
/// the guest's body carries every form followed by a second transaction to a victim, and it
/// tries every address form relays route elsewhere. Exactly one transaction reaches the
/// relay, to the granted recipient, with the body intact after decoding.
#[tokio::test]
async fn smuggled_transactions_and_routed_addresses_deliver_nothing_outside_the_grant() {
    let smtp = SmtpServer::start_lax().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = MailConfig::smtp(
        "jobhook@example.com",
        SmtpConfig::new(smtp.host(), smtp.port(), SmtpTls::None),
    )
    .unwrap();
    let services = Services {
        mail: Some(Arc::new(
            MailTransport::from_config(&config, dir.path()).unwrap(),
        )),
        ..Services::default()
    };
    let mut spec = spec("smuggler", &[], mail_grant(&["pki-team@example.com"]));
    spec.limits.calls.insert("mail".into(), 20);
    let handler = SandboxedHandler::load(
        engine(),
        &services,
        guest_bytes("guest-mail-smuggle"),
        spec,
        &LoadOptions::default(),
    )
    .await
    .expect("load");
    let context = JobContext::from_json_bytes(
        std::fs::read(
            workspace_root()
                .join("examples/repeated-failure-email/contexts/failed-after-retries.json"),
        )
        .unwrap()
        .as_slice(),
    )
    .unwrap();
    let outcome = handler.invoke(&context, Delivery::default()).await;
    assert_eq!(outcome.kind, OutcomeKind::Succeeded, "{outcome:?}");
    let log = logs(&outcome);
    assert!(log.contains("smuggling body: sent"), "{log}");
    assert_eq!(
        log.matches(": refused: ").count(),
        8,
        "every routed address form is refused:\n{log}"
    );

    // Give a smuggled transaction time to arrive, then check there is exactly one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = smtp.received();
    assert_eq!(received.len(), 1, "{received:#?}");
    let mail = &received[0];
    assert_eq!(mail.mail_from, "jobhook@example.com");
    assert_eq!(mail.rcpt_to, ["pki-team@example.com"]);
    let body = mail.body();
    assert!(body.contains("MAIL FROM:<cr@evil.example>"), "{body}");
    assert!(!mail.data.contains("\r\n.\r\n"), "{}", mail.data);
}

// ---------------------------------------------------------------------------------------------
// A component built against contract 0.1.0
// ---------------------------------------------------------------------------------------------

/// `guest-contract-0-1` is built with plain wit-bindgen from the frozen `wit/released/0.1.0`: its
/// calls to every 0.1.0 interface must reach the current implementations, under the same grants,
/// and their answers must come back.
#[tokio::test]
async fn a_component_built_against_contract_0_1_runs_unchanged() {
    let standin = Standin::start().await.unwrap();
    let smtp = SmtpServer::start().await.unwrap();
    let hook = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let mail = MailConfig::smtp(
        "jobhook@example.com",
        SmtpConfig::new(smtp.host(), smtp.port(), SmtpTls::None),
    )
    .unwrap();
    let services = Services {
        keyfactor: Some(client(&KeyfactorConfig::new(
            standin.base_url(),
            basic_auth(&standin, dir.path()),
        ))),
        mail: Some(Arc::new(
            MailTransport::from_config(&mail, dir.path()).unwrap(),
        )),
        http: http_services().http,
        configured_by: jobhook::capabilities::ConfiguredBy::ConfigFile,
    };
    let grants = Grants {
        keyfactor: Some(KeyfactorGrant::read_only(&["OrchestratorJobs/JobHistory"]).unwrap()),
        mail: Some(MailGrant::to(&["@example.com"]).unwrap()),
        http: Some(HttpGrant::post_to(&[&format!("{}/hooks/", hook.url)], true).unwrap()),
    };
    let url = format!("{}/hooks/old-contract", hook.url);
    let properties = [
        ("To", "pki-team@example.com"),
        ("Url", url.as_str()),
        ("FailOnFailure", "true"),
    ];
    let handler = SandboxedHandler::load(
        engine(),
        &services,
        guest_bytes("guest-contract-0-1"),
        spec("old-contract", &properties, grants.clone()),
        &LoadOptions::default(),
    )
    .await
    .expect("a 0.1.0 component loads");
    assert_eq!(
        handler.component().imports().contract.as_deref(),
        Some("0.1.0")
    );

    let mut context = jobhook_testkit::sample_context_json();
    context["JobResult"] = "Failure".into();
    context["CurrentRetryCount"] = 2.into();
    let context = JobContext::from_json_value(&context).unwrap();
    let delivery = Delivery {
        attempt: 3,
        event_id: Some("e-0-1".into()),
        ..Delivery::default()
    };
    let outcome = handler.invoke(&context, delivery).await;
    let text = logs(&outcome);
    assert_eq!(
        outcome.kind,
        OutcomeKind::HandlerFailed {
            reason: "job 0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01 failed".into()
        },
        "{text}"
    );
    for needle in [
        "info 0.1.0 handler old-contract attempt 3 event e-0-1 job 0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01 JobResult::Failure retries 2",
        "info properties FailOnFailure,To,Url",
        "info keyfactor 200 ",
        "info mail Ok(())",
        "info http 200",
    ] {
        assert!(text.contains(needle), "logs lack {needle:?}:\n{text}");
    }
    // Each call reached its real server.
    assert_eq!(
        standin
            .requests()
            .iter()
            .map(|r| r.path.as_str())
            .collect::<Vec<_>>(),
        ["/KeyfactorAPI/OrchestratorJobs/JobHistory"]
    );
    let mails = smtp.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(mails[0].rcpt_to, ["pki-team@example.com"]);
    assert_eq!(
        mails[0].header("Subject").as_deref(),
        Some("job 0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01")
    );
    let posted = hook.received();
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0].1, "/hooks/old-contract");
    assert_eq!(posted[0].2, b"0b4b411a-2a4c-4c55-9d0e-4f4c8e0f5a01");

    // The same grants decide: outside them, each 0.1.0 call is refused as a current one is.
    let narrow = Grants {
        keyfactor: Some(KeyfactorGrant::read_only(&["Certificates"]).unwrap()),
        mail: Some(MailGrant::to(&["@other.example"]).unwrap()),
        http: Some(HttpGrant::post_to(&[&format!("{}/elsewhere/", hook.url)], true).unwrap()),
    };
    let handler = SandboxedHandler::load(
        engine(),
        &services,
        guest_bytes("guest-contract-0-1"),
        spec("old-contract", &properties, narrow),
        &LoadOptions::default(),
    )
    .await
    .expect("load");
    let outcome = handler.invoke(&context, Delivery::default()).await;
    let text = logs(&outcome);
    for needle in [
        "info keyfactor refused CapabilityError::NotGranted(",
        "info mail Err(CapabilityError::Denied(",
        "info http refused CapabilityError::NotGranted(",
    ] {
        assert!(text.contains(needle), "logs lack {needle:?}:\n{text}");
    }
    assert_eq!(standin.requests().len(), 1, "nothing more reached Command");
    assert_eq!(smtp.received().len(), 1, "nothing more reached the relay");
    assert_eq!(hook.received().len(), 1, "nothing more reached the webhook");

    // And a 0.1.0 import that is not granted is refused at load, by its capability.
    let refused = SandboxedHandler::load(
        engine(),
        &services,
        guest_bytes("guest-contract-0-1"),
        spec(
            "old-contract",
            &properties,
            Grants {
                mail: None,
                ..grants
            },
        ),
        &LoadOptions::default(),
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(LoadError::NotGranted {
                capability: jobhook::capabilities::Capability::Mail
            })
        ),
        "{:?}",
        refused.err()
    );
}
