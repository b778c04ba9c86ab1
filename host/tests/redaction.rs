//! Credential redaction against hostile bodies at the size a Keyfactor response may have: a
//! server that answers what it likes (or echoes what a handler sends) must not be able to make
//! the scrubbing, which runs inside a host call and outside the handler's time budget, hold a
//! thread for long — and must still not get a credential past it.
//!
//! What the matcher's work is per byte is pinned without timing by the unit tests in
//! `host/src/capabilities/outbound.rs` (`work_per_byte_does_not_grow_with_the_number_of_credentials`,
//! `work_is_bounded_per_byte_for_any_body`). These tests check the result on bodies of 4 MiB
//! with 256 remembered tokens, which took the matcher before up to minutes each; the ignored
//! `timings` prints how long each takes, for measuring by hand:
//!
//! ```text
//! cargo test --release -p jobhook --test redaction -- --ignored --nocapture timings
//! ```

use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use jobhook::capabilities::outbound::{REDACTED, Redactor, RedactorSet};
use jobhook_testkit::tokens::access_token;

/// The largest body the audit measured with (a Keyfactor response may be larger still).
const BODY_BYTES: usize = 4 * 1024 * 1024;

/// Tokens an identity may remember (`auth::MAX_REMEMBERED_TOKENS`).
const TOKENS: u64 = 256;

const USER: &str = r"KFTRAIN\svc";
const PASSWORD: &str = "S3cr3t+Pa55/w<r>d";

/// What the Keyfactor client scrubs with: every form of a Basic credential, and `tokens` OAuth
/// access tokens (each as `Bearer <token>` and alone), each its own part.
fn credentials(tokens: u64) -> RedactorSet {
    let pair = format!("{USER}:{PASSWORD}");
    let encoded = base64::engine::general_purpose::STANDARD.encode(&pair);
    let mut basic = Redactor::new();
    basic.add(&format!("Basic {encoded}"));
    basic.add(&encoded);
    basic.add(PASSWORD);
    basic.add(&pair);
    let mut set = RedactorSet::new();
    set.push(Arc::new(basic));
    for n in 0..tokens {
        let token = access_token(n);
        let mut r = Redactor::new();
        r.add(&format!("Bearer {token}"));
        r.add(&token);
        set.push(Arc::new(r));
    }
    set
}

/// `len` bytes of `unit` over and over.
fn filler(unit: &[u8], len: usize) -> Vec<u8> {
    unit.iter().copied().cycle().take(len).collect()
}

/// Credentials as an echoing .NET server writes them, each to be replaced by one marker.
fn echoes() -> Vec<String> {
    let token = access_token(TOKENS - 1);
    let pair = format!("{USER}:{PASSWORD}");
    let basic = base64::engine::general_purpose::STANDARD.encode(&pair);
    vec![
        format!("Basic {basic}"),
        format!("Bearer {token}"),
        // ASP.NET's JSON escaping.
        PASSWORD
            .replace('+', "\\u002B")
            .replace('<', "\\u003C")
            .replace('>', "\\u003E"),
        // HTML character references.
        PASSWORD
            .chars()
            .map(|c| format!("&#{};", c as u32))
            .collect(),
        // Percent-encoding, every byte.
        access_token(3)
            .bytes()
            .map(|b| format!("%{b:02X}"))
            .collect(),
        // The oldest remembered token, split across JSON escapes.
        access_token(0)
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 3 == 0 {
                    format!("\\u{:04x}", c as u32)
                } else {
                    c.to_string()
                }
            })
            .collect(),
    ]
}

/// A body of `unit` filler with every echo in it (set off by spaces), and what the handler
/// must receive instead.
fn body_with_echoes(unit: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let echoes = echoes();
    let stretch = BODY_BYTES / (echoes.len() + 1);
    let mut body = Vec::with_capacity(BODY_BYTES + 64 * 1024);
    let mut expected = Vec::with_capacity(BODY_BYTES);
    for echo in &echoes {
        let fill = filler(unit, stretch);
        for out in [&mut body, &mut expected] {
            out.extend_from_slice(&fill);
            out.push(b' ');
        }
        body.extend_from_slice(echo.as_bytes());
        expected.extend_from_slice(REDACTED.as_bytes());
        for out in [&mut body, &mut expected] {
            out.push(b' ');
        }
    }
    let fill = filler(unit, stretch);
    body.extend_from_slice(&fill);
    expected.extend_from_slice(&fill);
    (body, expected)
}

/// A 4 MiB body of nothing but `%` — the audit's worst case, where every byte may start an
/// escape — with 256 remembered tokens: returned unchanged, and with every credential echoed
/// in it, exactly those replaced.
#[test]
fn four_mib_of_percent_signs_with_256_tokens() {
    let set = credentials(TOKENS);
    let plain = filler(b"%", BODY_BYTES);
    assert!(set.redact(plain.clone()) == plain);
    let (body, expected) = body_with_echoes(b"%");
    assert!(set.redact(body) == expected);
}

/// The other escape starters a hostile server can fill a body with (truncated percent, JSON
/// and HTML escapes, a `%25` that reads two ways, and the tokens' shared beginning over and
/// over), 4 MiB each, with 256 remembered tokens: every echo replaced, nothing else.
#[test]
fn four_mib_of_escape_starters_with_256_tokens() {
    let set = credentials(TOKENS);
    let prefix = format!("Bearer {}", access_token(0).get(..150).unwrap_or_default());
    for unit in [
        b"%2".as_slice(),
        b"%25",
        br"\u00",
        b"&#1111111111",
        b"&amp",
        prefix.as_bytes(),
    ] {
        let (body, expected) = body_with_echoes(unit);
        let out = set.redact(body);
        assert!(
            out == expected,
            "filler {:?}: {} bytes out, {} expected",
            String::from_utf8_lossy(unit),
            out.len(),
            expected.len()
        );
    }
}

/// For measuring by hand (see the module comment): the audit's three cases and the other
/// hostile fillers, 4 MiB each. Prints, asserts nothing about time.
#[test]
#[ignore = "prints timings; run by hand in release"]
fn timings() {
    let json = br#"{"Id":12345,"Thumbprint":"A1B2C3D4E5F60718293A4B5C6D7E8F9012345678","IssuedDN":"CN=web01.example.com"},"#;
    for (name, unit, tokens) in [
        ("all %, Basic only", b"%".as_slice(), 0),
        ("all %, Basic + 20 tokens", b"%", 20),
        ("JSON, Basic + 256 tokens", json, TOKENS),
        ("all %, Basic + 256 tokens", b"%", TOKENS),
        ("&#1111111111, Basic + 256 tokens", b"&#1111111111", TOKENS),
        ("%25, Basic + 256 tokens", b"%25", TOKENS),
    ] {
        let set = credentials(tokens);
        let body = filler(unit, BODY_BYTES);
        let started = Instant::now();
        let out = set.redact(body);
        println!(
            "{name:<36} {:>9.1} ms ({} bytes out)",
            started.elapsed().as_secs_f64() * 1e3,
            out.len()
        );
    }
}
