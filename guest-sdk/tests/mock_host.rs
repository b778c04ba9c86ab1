//! The mock host seen through the public capability API: how installs nest and stay per
//! thread, and what a handler's calls record. (Kept out of the `testing` module's unit tests so
//! that `testing` never depends on the capability modules, not even in test code.)

use jobhook_sdk::log::Level;
use jobhook_sdk::testing::MockHost;
use jobhook_sdk::{CapabilityError, delivery, http, info, keyfactor, properties, warn};

#[test]
fn guards_nest_and_uninstall() {
    assert_eq!(properties::get("P"), None);
    let outer = MockHost::new().property("P", "outer").install();
    {
        let _inner = MockHost::new().property("P", "inner").attempt(3).install();
        assert_eq!(properties::get("P").as_deref(), Some("inner"));
        assert_eq!(delivery::attempt(), 3);
    }
    assert_eq!(properties::get("P").as_deref(), Some("outer"));
    assert_eq!(delivery::attempt(), 1);
    drop(outer);
    assert_eq!(properties::get("P"), None);
}

#[test]
fn installs_are_per_thread() {
    let _host = MockHost::new().property("P", "here").install();
    let other = std::thread::spawn(|| properties::get("P"))
        .join()
        .ok()
        .flatten();
    assert_eq!(other, None);
    assert_eq!(properties::get("P").as_deref(), Some("here"));
}

#[test]
fn delivery_facts() {
    let _host = MockHost::new()
        .attempt(2)
        .event_id("evt-1")
        .handler_name("mailer")
        .install();
    assert_eq!(delivery::attempt(), 2);
    assert_eq!(delivery::event_id().as_deref(), Some("evt-1"));
    assert_eq!(delivery::handler_name(), "mailer");
}

#[test]
fn records_logs_with_levels() {
    let host = MockHost::new().install();
    info!("one {}", 1);
    warn!("two");
    jobhook_sdk::trace!("three");
    jobhook_sdk::debug!("four");
    jobhook_sdk::error!("five");
    let levels: Vec<Level> = host.logs().iter().map(|l| l.level).collect();
    assert_eq!(
        levels,
        [
            Level::Info,
            Level::Warn,
            Level::Trace,
            Level::Debug,
            Level::Error
        ]
    );
    assert_eq!(host.logs_at(Level::Info), ["one 1"]);
    assert!(host.logged("two"));
    assert!(!host.logged("six"));
}

#[test]
fn replies_are_consumed_in_order() {
    let host = MockHost::new()
        .keyfactor_response(200, "first")
        .keyfactor_error(CapabilityError::Timeout("slow".into()))
        .http_json(201, serde_json::json!({"ok": true}))
        .install();
    let http = http::Request::get("https://x.example.com/").send();
    assert_eq!(
        http.map(|r| (r.status, r.body)),
        Ok((201, br#"{"ok":true}"#.to_vec()))
    );
    let first = keyfactor::Request::get("A").send().map(|r| r.body);
    assert_eq!(first, Ok(b"first".to_vec()));
    let second = keyfactor::Request::get("B").send().unwrap_err();
    assert_eq!(
        second.capability_error(),
        Some(&CapabilityError::Timeout("slow".into()))
    );
    let third = keyfactor::Request::get("C").send().unwrap_err();
    assert!(matches!(
        third.capability_error(),
        Some(CapabilityError::NotAvailable(_))
    ));
    let paths: Vec<String> = host
        .keyfactor_requests()
        .into_iter()
        .map(|c| c.path)
        .collect();
    assert_eq!(paths, ["A", "B", "C"]);
}
