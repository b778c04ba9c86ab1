//! How a failed invocation is classified: the error wasmtime returned (and the guest's stderr,
//! for a Rust panic message) becomes an [`OutcomeKind`] with a stable code.
//!
//! Most failures are recognised by type (`LimitExceeded`, `I32Exit`, `Trap`, ...). Two are only
//! recognisable by wasmtime's message text; those fragments are the named constants below, and
//! the hostile corpus (`tests/tests/hostile.rs`: the hostcall-bytes and instance-count cases)
//! fails if a wasmtime upgrade changes them.

use wasmtime::{Trap, WasmBacktrace};
use wasmtime_wasi::I32Exit;

use crate::limits::{LimitExceeded, LimitKind, Limits};
use crate::outcome::{MAX_REASON_BYTES, OutcomeKind, truncate};
use crate::runtime::engine::{MAX_BACKTRACE_FRAMES, MAX_WASM_STACK};

/// wasmtime 48's message when a guest passes more bytes to the host in one call than
/// `Store::set_hostcall_fuel` allows.
pub const HOSTCALL_FUEL_EXHAUSTED: &str = "fuel allocated for hostcalls has been exhausted";

/// The start of wasmtime 48's message when a component creates more core instances, memories or
/// tables than the store's `ResourceLimiter` counts allow.
pub const COUNT_LIMIT_EXCEEDED: &str = "resource limit exceeded:";

pub(crate) fn timed_out(
    limits: &Limits,
    waiting: Option<(String, std::time::Duration)>,
) -> OutcomeKind {
    OutcomeKind::TimedOut {
        limit_ms: u64::try_from(limits.timeout.as_millis()).unwrap_or(u64::MAX),
        waiting_for: waiting.map(|(call, waited)| format!("{call} for {} ms", waited.as_millis())),
    }
}

/// Turns the error of a failed instantiation or call into an outcome class.
pub(crate) fn classify(error: &wasmtime::Error, stderr: &str, limits: &Limits) -> OutcomeKind {
    if let Some(hit) = error.downcast_ref::<LimitExceeded>() {
        return OutcomeKind::LimitExceeded {
            limit: hit.kind,
            detail: hit.detail.clone(),
        };
    }
    if let Some(exit) = error.downcast_ref::<I32Exit>() {
        return OutcomeKind::Trapped {
            code: "exit".into(),
            message: format!(
                "the handler called exit({}) instead of returning from run-handler{}",
                exit.0,
                // wasi:cli/exit carries only ok or err: exit(3) arrives as 1.
                if exit.0 == 0 {
                    ""
                } else {
                    " (WASI keeps only success or failure: any failing exit code reads as 1)"
                }
            ),
            backtrace: Vec::new(),
        };
    }
    if error
        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        return OutcomeKind::EngineError {
            message: format!("no sandbox slot is free: {error}"),
        };
    }
    let message = truncate(format!("{error:#}"), MAX_REASON_BYTES);
    if message.contains(HOSTCALL_FUEL_EXHAUSTED) {
        return OutcomeKind::LimitExceeded {
            limit: LimitKind::HostcallBytes,
            detail: format!(
                "the handler passed more than {} bytes to the host in one call",
                limits.hostcall_bytes
            ),
        };
    }
    let root = error.root_cause().to_string();
    if root.starts_with(COUNT_LIMIT_EXCEEDED) {
        // wasmtime's own count check against `SandboxLimiter::{instances,memories,tables}`.
        return OutcomeKind::LimitExceeded {
            limit: LimitKind::Instances,
            detail: format!(
                "{root} (the limits are {} core instances, {} memories, {} tables)",
                limits.instances, limits.memories, limits.tables
            ),
        };
    }
    let backtrace = backtrace_of(error);
    match error.downcast_ref::<Trap>() {
        // Interrupted in guest code: no call was under way.
        Some(Trap::Interrupt) => timed_out(limits, None),
        Some(Trap::StackOverflow) => OutcomeKind::LimitExceeded {
            limit: LimitKind::Stack,
            detail: format!(
                "wasm stack overflow (the stack limit is {MAX_WASM_STACK} bytes): deep or infinite recursion"
            ),
        },
        Some(Trap::UnreachableCodeReached) if panic_message(stderr).is_some() => {
            OutcomeKind::Panicked {
                message: panic_message(stderr).unwrap_or_default(),
            }
        }
        Some(trap) => OutcomeKind::Trapped {
            code: trap_code(*trap),
            message,
            backtrace,
        },
        None if is_invalid_value(&root) => OutcomeKind::Trapped {
            code: "invalid-value".into(),
            message,
            backtrace,
        },
        None => OutcomeKind::Trapped {
            code: "guest-error".into(),
            message,
            backtrace,
        },
    }
}

/// Whether `root` (the innermost error message) is wasmtime refusing a value the guest handed
/// across the component boundary: a string, list or pointer outside its memory, a misaligned
/// pointer, an invalid discriminant, invalid UTF-8, or a bad `cabi_realloc` result.
fn is_invalid_value(root: &str) -> bool {
    const SIGNS: &[&str] = &[
        "out of bounds",
        "not aligned",
        "realloc return:",
        "discriminant",
        // std's `Utf8Error`: "invalid utf-8 sequence ..." or "incomplete utf-8 byte sequence ...".
        "utf-8",
        "utf-16",
        "latin1",
        "invalid char",
        "size overflow",
        "length overflow",
    ];
    SIGNS.iter().any(|sign| root.contains(sign))
}

/// A stable, kebab-case code for a trap.
fn trap_code(trap: Trap) -> String {
    match trap {
        Trap::UnreachableCodeReached => "unreachable".into(),
        Trap::MemoryOutOfBounds => "memory-out-of-bounds".into(),
        Trap::TableOutOfBounds => "table-out-of-bounds".into(),
        Trap::IndirectCallToNull => "indirect-call-to-null".into(),
        Trap::BadSignature => "bad-signature".into(),
        Trap::IntegerOverflow => "integer-overflow".into(),
        Trap::IntegerDivisionByZero => "integer-division-by-zero".into(),
        Trap::BadConversionToInteger => "bad-conversion-to-integer".into(),
        Trap::CannotEnterComponent => "cannot-enter-component".into(),
        other => {
            let mut code = String::new();
            for (i, c) in format!("{other:?}").chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    code.push('-');
                }
                code.push(c.to_ascii_lowercase());
            }
            code
        }
    }
}

/// The panic message a Rust guest printed to stderr before trapping, if any.
fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.find("panicked at ")?;
    let text = stderr.get(start + "panicked at ".len()..)?;
    let text = text.split("\nnote: ").next().unwrap_or(text);
    // "src/lib.rs:5:5:\nmessage" -> "message (at src/lib.rs:5:5)"
    let (location, message) = match text.split_once(":\n") {
        Some((location, message)) => (location.trim(), message.trim()),
        None => ("", text.trim()),
    };
    let message = if location.is_empty() {
        message.to_owned()
    } else {
        format!("{message} (at {location})")
    };
    Some(truncate(message, MAX_REASON_BYTES))
}

fn backtrace_of(error: &wasmtime::Error) -> Vec<String> {
    let Some(bt) = error.downcast_ref::<WasmBacktrace>() else {
        return Vec::new();
    };
    bt.frames()
        .iter()
        .take(MAX_BACKTRACE_FRAMES)
        .map(|frame| {
            let name = frame.func_name().unwrap_or("<unnamed>");
            format!("{name} (function {})", frame.func_index())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_extracted_from_rust_stderr() {
        let stderr = "\nthread '<unnamed>' panicked at src/lib.rs:12:9:\nboom: 42\n\
                      note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(stderr).unwrap(),
            "boom: 42 (at src/lib.rs:12:9)"
        );
        assert_eq!(panic_message("plain output"), None);
    }

    #[test]
    fn trap_codes_are_kebab_case() {
        // Every code docs/SECURITY.md lists for a wasmtime trap, as it lists it.
        for (trap, code) in [
            (Trap::UnreachableCodeReached, "unreachable"),
            (Trap::MemoryOutOfBounds, "memory-out-of-bounds"),
            (Trap::TableOutOfBounds, "table-out-of-bounds"),
            (Trap::IndirectCallToNull, "indirect-call-to-null"),
            (Trap::BadSignature, "bad-signature"),
            (Trap::IntegerOverflow, "integer-overflow"),
            (Trap::IntegerDivisionByZero, "integer-division-by-zero"),
            (Trap::BadConversionToInteger, "bad-conversion-to-integer"),
            (Trap::CannotEnterComponent, "cannot-enter-component"),
        ] {
            assert_eq!(trap_code(trap), code);
        }
        // Any other trap under its own name.
        assert_eq!(trap_code(Trap::NullReference), "null-reference");
    }

    #[test]
    fn boundary_errors_are_invalid_values() {
        for root in [
            "invalid utf-8 sequence of 1 bytes from index 0",
            "incomplete utf-8 byte sequence from index 0",
            "string pointer/length out of bounds of memory",
            "return pointer not aligned",
            "realloc return: beyond end of memory",
            "invalid expected discriminant",
            "unexpected discriminant: 99",
        ] {
            assert!(is_invalid_value(root), "{root}");
        }
        assert!(!is_invalid_value("resource table has no free keys"));
    }
}
