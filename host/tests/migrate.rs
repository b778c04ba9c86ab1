//! `jobhook import` and `jobhook forwarder-config` as a user runs them: Keyfactor's documented
//! registrations in, configuration the engine's own parser accepts out; hostile inputs refused
//! with a reason; the forwarder's registration parses as XML and JSON.

use std::path::{Path, PathBuf};
use std::process::Command;

use jobhook::app::config::Config;
use jobhook::app::migrate::MAX_IMPORT_BYTES;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs `jobhook args…`: exit code, stdout, stderr.
fn jobhook(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_jobhook"))
        .args(args)
        .output()
        .expect("run jobhook");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn import(path: &Path) -> (i32, String, String) {
    jobhook(&["import", path.to_str().expect("UTF-8 path")])
}

/// Parses imported stanzas with the engine's parser, after pointing every `component` at a
/// file that exists.
fn parse_imported(toml: &str) -> Result<Config, jobhook::app::config::ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("h.wasm"), b"\0asm").expect("write");
    let text: String = toml
        .lines()
        .map(|line| {
            if line.starts_with("component = ") {
                "component = \"h.wasm\"".to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    Config::parse(&text, &dir.path().join("jobhook.toml"))
}

#[test]
fn web_config_registration_of_the_guide() {
    let (code, toml, stderr) = import(&fixture("web.config"));
    assert_eq!(code, 0, "{stderr}");
    // One registration: the commented-out built-in one and other Unity types are not handlers.
    assert_eq!(toml.matches("[[handlers]]").count(), 1, "{toml}");
    assert!(
        toml.contains("name = \"SendEmail_RepeatedFailureHandler\""),
        "{toml}"
    );
    assert!(
        toml.contains(
            "job_types = [\"7B6BBC1B-D802-4B09-BEC9-F5C221083130\", \"44340A94-9B99-410D-8011-598FB176C3C5\"]"
        ),
        "{toml}"
    );
    assert!(toml.contains("SmtpPort = \"587\""), "{toml}");
    assert!(
        toml.contains("SampleJobCompletionHandlers.SendEmail_RepeatedFailureHandler"),
        "{toml}"
    );
    // The password is a reference, its value is nowhere, and stderr says what to set.
    let var = "JOBHOOK_SENDEMAIL_REPEATEDFAILUREHANDLER_PASSWORD";
    assert!(
        toml.contains(&format!("Password = {{ env = \"{var}\" }}")),
        "{toml}"
    );
    assert!(stderr.contains(var), "{stderr}");
    assert!(!toml.contains("somepassword") && !stderr.contains("somepassword"));
    assert!(
        !toml.contains("JobTypes"),
        "JobTypes is not a property: {toml}"
    );

    // SAFETY: this test binary's only environment write, before anything reads it.
    unsafe { std::env::set_var(var, "from-the-environment") };
    let config = parse_imported(&toml).expect("the engine accepts the imported handler");
    let handler = &config.handlers[0];
    assert_eq!(
        handler.properties.get("Password"),
        Some("from-the-environment")
    );
    assert_eq!(handler.properties.get("RetryThreshold"), Some("2"));
    assert!(handler.secret_properties.contains("Password"));
}

#[test]
fn manifest_json_of_command_11() {
    let (code, toml, stderr) = import(&fixture("manifest.json"));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        toml.contains("name = \"SampleJobCompletionHandler\""),
        "{toml}"
    );
    assert!(
        toml.contains("KFSample.SampleJobCompletionHandler"),
        "{toml}"
    );
    assert!(toml.contains("FavoriteAnimal = \"Hippopotamus\""), "{toml}");
    let config = parse_imported(&toml).expect("the engine accepts the imported handler");
    let ids = format!("{:?}", config.handlers[0].job_types);
    assert!(
        ids.contains("a809ce1f-1eea-4738-a38e-15708c89c981"),
        "{ids}"
    );
    assert!(
        ids.contains("5b9cf048-e95f-4331-a510-0cdfabac1703"),
        "{ids}"
    );
}

#[test]
fn empty_job_types_are_left_for_the_operator() {
    let (code, toml, stderr) = import(&fixture("builtin.config"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("has no JobTypes"), "{stderr}");
    assert!(toml.contains("job_types = []"), "{toml}");
    assert!(toml.contains("# TODO: JobTypes was empty"), "{toml}");
    // Valid TOML, and `check` says what to fill in.
    let e = parse_imported(&toml).expect_err("empty job_types are refused");
    assert!(e.message.contains("job_types"), "{e}");
}

#[test]
fn hostile_and_malformed_inputs_are_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };

    // Entity expansion: the DTD is refused before any entity is defined.
    let (code, _, stderr) = import(&fixture("entities.config"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("DTD"), "{stderr}");
    assert!(stderr.contains("entities.config:"), "{stderr}");

    // Too big to be a web.config.
    let huge = vec![b' '; usize::try_from(MAX_IMPORT_BYTES).expect("fits") + 1];
    let (code, _, stderr) = import(&write("huge.config", &huge));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("bytes"), "{stderr}");

    // Neither XML nor JSON; broken XML with its line; broken JSON with its line.
    let (code, _, stderr) = import(&write("notes.txt", b"just some notes\n"));
    assert_eq!(code, 2);
    assert!(stderr.contains("neither a web.config"), "{stderr}");
    let (code, _, stderr) = import(&write(
        "broken.config",
        b"<unity>\n<container>\n<register type=\"x\"\n",
    ));
    assert_eq!(code, 2);
    assert!(stderr.contains("not well-formed XML"), "{stderr}");
    assert!(stderr.contains("broken.config:"), "{stderr}");
    let (code, _, stderr) = import(&write("broken.json", b"{\n \"extensions\": {\n ,\n}"));
    assert_eq!(code, 2);
    assert!(stderr.contains("broken.json:3"), "{stderr}");

    // No registration at all (only a commented one).
    let (code, _, stderr) = import(&write(
        "empty.config",
        b"<unity><container><!-- <register type=\"IOrchestratorJobCompleteHandler\" name=\"x\"/> --></container></unity>",
    ));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("no Job Complete Handler registration"),
        "{stderr}"
    );
    let (code, _, stderr) = import(&write("empty.json", b"{ \"extensions\": {} }"));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("no Job Complete Handler registration"),
        "{stderr}"
    );

    // A bad GUID is reported, and names and values cannot break out of their TOML strings.
    let (code, toml, stderr) = import(&write(
        "odd.config",
        "<unity><container>\n<register type=\"IOrchestratorJobCompleteHandler\" mapTo=\"A&#10;[evil]\" name=\"bad name&quot;\">\n\
         <property name=\"JobTypes\" value=\"WinCertInventory\"/>\n\
         <property name=\"Note\" value=\"line1&#10;[[handlers]]&quot;\"/>\n\
         </register></container></unity>"
            .as_bytes(),
    ));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("WinCertInventory"), "{stderr}");
    assert!(stderr.contains("\"bad-name-\""), "{stderr}");
    assert_eq!(toml.matches("[[handlers]]\n").count(), 1, "{toml}");
    let parsed: toml::Table = toml::from_str(&toml).expect("valid TOML");
    let handlers = parsed["handlers"].as_array().expect("handlers");
    assert_eq!(handlers.len(), 1);
    assert_eq!(
        handlers[0]["properties"]["Note"].as_str(),
        Some("line1\n[[handlers]]\"")
    );
}

#[test]
fn forwarder_registration_for_both_generations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = jobhook_testkit::tls::write_test_pki(dir.path()).expect("test PKI");
    std::fs::write(dir.path().join("h.wasm"), b"\0asm").expect("write");
    std::fs::write(dir.path().join("token"), "s3cret-token").expect("write");
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:8443\"\ntokens = [{{ file = \"token\" }}]\n\
             tls = {{ cert = {:?}, key = {:?} }}\n\n\
             [[handlers]]\nname = \"a\"\ncomponent = \"h.wasm\"\n\
             job_types = [\"7B6BBC1B-D802-4B09-BEC9-F5C221083130\", \"44340a94-9b99-410d-8011-598fb176c3c5\"]\n\n\
             [[handlers]]\nname = \"b\"\ncomponent = \"h.wasm\"\n\
             job_types = [\"{{7b6bbc1b-d802-4b09-bec9-f5c221083130}}\", \"a809ce1f-1eea-4738-a38e-15708c89c981\"]\n\n\
             [[handlers]]\nname = \"everything\"\ncomponent = \"h.wasm\"\njob_types = [\"*\"]\n",
            pki.server_cert, pki.server_key
        ),
    )
    .expect("write config");
    let config = config.to_str().expect("UTF-8 path");
    let union = "44340A94-9B99-410D-8011-598FB176C3C5,7B6BBC1B-D802-4B09-BEC9-F5C221083130,A809CE1F-1EEA-4738-A38E-15708C89C981";

    // Command 9-10: a <register> that parses as XML.
    let (code, xml, stderr) =
        jobhook(&["forwarder-config", "--config", config, "--generation", "10"]);
    assert_eq!(code, 0, "{stderr}");
    let doc = roxmltree::Document::parse(&xml).expect("well-formed XML");
    let register = doc.root_element();
    assert_eq!(register.tag_name().name(), "register");
    assert_eq!(
        register.attribute("type"),
        Some("IOrchestratorJobCompleteHandler")
    );
    assert_eq!(
        register.attribute("mapTo"),
        Some("Jobhook.Forwarder.JobhookForwarder, Jobhook.Forwarder")
    );
    let property = |name: &str| {
        register
            .children()
            .find(|n| n.attribute("name") == Some(name))
            .and_then(|n| n.attribute("value"))
            .map(str::to_owned)
    };
    assert_eq!(property("JobTypes").as_deref(), Some(union));
    assert_eq!(
        property("EngineUrl").as_deref(),
        Some("https://127.0.0.1:8443")
    );
    for name in jobhook::app::migrate::FORWARDER_PROPERTIES
        .iter()
        .map(|p| p.name)
    {
        assert!(property(name).is_some(), "{name} missing: {xml}");
    }
    // The wildcard handler is called out; the token is a placeholder, never the secret.
    assert!(stderr.contains("everything"), "{stderr}");
    assert!(xml.contains("no documented JobTypes value"), "{xml}");
    assert!(!xml.contains("s3cret-token") && !stderr.contains("s3cret-token"));

    // Command 11+: a manifest.json that parses as JSON.
    let (code, json, stderr) = jobhook(&[
        "forwarder-config",
        "--config",
        config,
        "--generation",
        "11",
        "--engine-url",
        "https://jobhook.corp.example:8443/",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    let entry = &value["extensions"]["Keyfactor.Platform.Extensions.IOrchestratorJobCompleteHandler"]
        ["JobhookForwarder"];
    assert_eq!(entry["TypeFullName"], "Jobhook.Forwarder.JobhookForwarder");
    assert_eq!(entry["assemblypath"], "Jobhook.Forwarder.dll");
    assert_eq!(entry["Options"]["JobTypes"], union);
    assert_eq!(
        entry["Options"]["EngineUrl"],
        "https://jobhook.corp.example:8443"
    );
    assert!(!json.contains("s3cret-token"));

    // Both, by default: the register first, then the manifest.
    let (code, both, _) = jobhook(&["forwarder-config", "--config", config]);
    assert_eq!(code, 0);
    let split = both.find("\n{").expect("the manifest follows");
    roxmltree::Document::parse(&both[..split]).expect("XML part");
    serde_json::from_str::<serde_json::Value>(&both[split..]).expect("JSON part");
}

/// An engine with only admin tokens takes events without a token (admin tokens guard only
/// administration): the registration's BearerToken is empty, never an admin token or a
/// placeholder for one.
#[test]
fn forwarder_registration_carries_no_admin_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("h.wasm"), b"\0asm").expect("write");
    std::fs::write(dir.path().join("admin"), "adm1n-token").expect("write");
    let config = dir.path().join("jobhook.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:8480\"\nadmin_tokens = [{ file = \"admin\" }]\n\n\
         [[handlers]]\nname = \"a\"\ncomponent = \"h.wasm\"\n\
         job_types = [\"7B6BBC1B-D802-4B09-BEC9-F5C221083130\"]\n",
    )
    .expect("write config");
    let config = config.to_str().expect("UTF-8 path");
    let (code, xml, stderr) =
        jobhook(&["forwarder-config", "--config", config, "--generation", "10"]);
    assert_eq!(code, 0, "{stderr}");
    let doc = roxmltree::Document::parse(&xml).expect("well-formed XML");
    let token = doc
        .root_element()
        .children()
        .find(|n| n.attribute("name") == Some("BearerToken"))
        .and_then(|n| n.attribute("value"))
        .map(str::to_owned);
    assert_eq!(token.as_deref(), Some(""), "{xml}");
    assert!(!stderr.contains("BearerToken"), "{stderr}");
    assert!(!xml.contains("adm1n-token") && !stderr.contains("adm1n-token"));
}

/// Runs `jobhook import` on `path` and says how long it took.
fn timed_import(path: &Path) -> ((i32, String, String), std::time::Duration) {
    let started = std::time::Instant::now();
    let result = import(path);
    (result, started.elapsed())
}

/// The longest a generated input near [`MAX_IMPORT_BYTES`] may take to import. Reading it is
/// linear, a second or two of a debug build on a loaded machine; work that grows with the
/// square of the registrations (a line looked up from the start of the text for each, a
/// handler name or a variable tried with every suffix before the next free one) took a minute
/// and more for these files.
const IMPORT_TIME_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

/// Inputs just under the size limit, shaped to make each per-registration cost count —
/// tens of thousands of registrations of one name (each needs a suffix) with a JobTypes that
/// is no GUID (each warns), a one-line manifest of tens of thousands of entries (each entry's
/// line is looked up), one registration with tens of thousands of JobTypes GUIDs and of secret
/// properties whose names all map to one environment variable — are imported in time, with
/// the right lines, and with at most [`jobhook::app::migrate::MAX_WARNINGS_SHOWN`] warnings
/// printed and the number of those left out.
#[test]
fn large_inputs_are_imported_in_linear_time_with_bounded_warnings() {
    use jobhook::app::migrate::MAX_WARNINGS_SHOWN;
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = usize::try_from(MAX_IMPORT_BYTES).expect("fits");
    let shown_lines = |stderr: &str| stderr.lines().count();

    // web.config: one name, a JobTypes that is no GUID.
    let registrations = 30_000;
    let mut xml = String::from("<configuration><unity><container>\n");
    for _ in 0..registrations {
        xml.push_str(
            "<register type=\"IOrchestratorJobCompleteHandler\" mapTo=\"A\" name=\"h\">\
             <property name=\"JobTypes\" value=\"*\"/></register>\n",
        );
    }
    xml.push_str("</container></unity></configuration>\n");
    assert!(xml.len() < limit, "{}", xml.len());
    let path = dir.path().join("web.config");
    std::fs::write(&path, &xml).expect("write");
    let ((code, toml, stderr), took) = timed_import(&path);
    assert_eq!(code, 0, "{}", &stderr[..stderr.len().min(2000)]);
    assert!(took < IMPORT_TIME_BOUND, "web.config took {took:?}");
    assert_eq!(toml.matches("[[handlers]]\n").count(), registrations);
    assert!(
        toml.contains(&format!("name = \"h-{registrations}\"")),
        "the last suffix"
    );
    assert!(
        toml.contains(&format!("(line {}), was: A", registrations + 1)),
        "the last registration's line"
    );
    assert_eq!(shown_lines(&stderr), MAX_WARNINGS_SHOWN + 1, "{stderr}");
    // Two warnings per registration but the first (renamed, JobTypes unreadable).
    let left_out = 2 * registrations - 1 - MAX_WARNINGS_SHOWN;
    assert!(
        stderr.ends_with(&format!(
            "warning: {left_out} more warnings left out (only the first {MAX_WARNINGS_SHOWN} are \
             shown); every environment variable to set is named in the printed configuration\n"
        )),
        "{}",
        &stderr[stderr.len().saturating_sub(500)..]
    );

    // manifest.json on one line: every entry's line is looked up.
    let entries = 30_000;
    let mut json = String::from(
        "{\"extensions\":{\"Keyfactor.Platform.Extensions.IOrchestratorJobCompleteHandler\":{",
    );
    for i in 0..entries {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            "\"h{i}\":{{\"TypeFullName\":\"T\",\"Options\":{{\"JobTypes\":\
             \"7B6BBC1B-D802-4B09-BEC9-F5C221083130\"}}}}"
        ));
    }
    json.push_str("}}}\n");
    assert!(json.len() < limit, "{}", json.len());
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, &json).expect("write");
    let ((code, toml, stderr), took) = timed_import(&path);
    assert_eq!(code, 0, "{stderr}");
    assert!(took < IMPORT_TIME_BOUND, "manifest.json took {took:?}");
    assert_eq!(toml.matches("[[handlers]]\n").count(), entries);
    assert_eq!(toml.matches("(line 1), was: T").count(), entries);
    assert!(stderr.is_empty(), "{stderr}");

    // One registration: tens of thousands of GUIDs, and of secret properties that all map to
    // JOBHOOK_H_PASSWORD_ (their names differ in a character that is not an ASCII letter or
    // digit).
    let guids = 40_000;
    let secrets = 20_000;
    let job_types: Vec<String> = (0..guids)
        .map(|i| format!("7B6BBC1B-D802-4B09-BEC9-{i:012X}"))
        .collect();
    let mut xml = format!(
        "<configuration><unity><container>\n\
         <register type=\"IOrchestratorJobCompleteHandler\" mapTo=\"A\" name=\"h\">\n\
         <property name=\"JobTypes\" value=\"{}\"/>\n",
        job_types.join(",")
    );
    // Letters outside ASCII: not white space (names are trimmed), not control characters.
    let odd = (0x00c0u32..)
        .filter_map(char::from_u32)
        .filter(|c| c.is_alphabetic())
        .take(secrets);
    for c in odd {
        xml.push_str(&format!("<property name=\"Password{c}\" value=\"x\"/>\n"));
    }
    xml.push_str("</register></container></unity></configuration>\n");
    assert!(xml.len() < limit, "{}", xml.len());
    let path = dir.path().join("one.config");
    std::fs::write(&path, &xml).expect("write");
    let ((code, toml, stderr), took) = timed_import(&path);
    assert_eq!(code, 0, "{}", &stderr[..stderr.len().min(2000)]);
    assert!(took < IMPORT_TIME_BOUND, "one registration took {took:?}");
    assert_eq!(toml.matches("\"7B6BBC1B-D802-4B09-BEC9-").count(), guids);
    assert!(
        toml.contains(&format!("{{ env = \"JOBHOOK_H_PASSWORD__{secrets}\" }}")),
        "the last variable's suffix"
    );
    assert_eq!(shown_lines(&stderr), MAX_WARNINGS_SHOWN + 1);
    assert!(stderr.contains("more warnings left out"), "{stderr}");
}
