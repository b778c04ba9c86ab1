//! Hostile guest: sends mail in a loop forever, ignoring every answer.
//!
//! The engine must stop it at its per-invocation mail budget and record `limit-exceeded` with
//! limit `mail-calls`.

use std::hint::black_box;

use jobhook_sdk::mail::Message;
use jobhook_sdk::{Context, Handler, Result, export_handler};

struct MailFlood;

impl Handler for MailFlood {
    fn run(_ctx: &Context) -> Result<()> {
        loop {
            let _ = black_box(
                Message::new()
                    .to("victim@example.com")
                    .subject("spam")
                    .body("spam")
                    .send(),
            );
        }
    }
}

export_handler!(MailFlood);
