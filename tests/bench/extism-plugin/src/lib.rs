//! The Extism peer of `guest-bench-noop`: receives a job context and succeeds without doing
//! anything else.
//!
//! A jobhook handler receives the context as a typed WIT record that the SDK decodes into its
//! `Context`; an Extism plugin receives bytes. The equivalent of "decode the context, do
//! nothing, succeed" is therefore `run_handler`: JSON in the .NET field names, decoded with
//! serde into a struct of the same eleven fields. `run_handler_raw` ignores its input and is the
//! cheapest call Extism can make, reported beside it so that the comparison does not depend on
//! that choice.

use extism_pdk::{FnResult, Json, plugin_fn};
use serde::Deserialize;

/// The job context as `jobhook` serialises it (`JobContext::to_json`): GUIDs and enum names as
/// strings, optional fields as `null`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
#[allow(dead_code)] // decoded to measure the decoding; the handler does nothing with it
struct JobContext {
    agent_id: String,
    username: String,
    client_machine: String,
    job_result: String,
    job_id: String,
    job_type: String,
    job_type_id: String,
    operation_type: String,
    certificate_id: Option<i64>,
    request_timestamp: Option<String>,
    current_retry_count: i64,
}

/// Decodes the context and succeeds.
#[plugin_fn]
pub fn run_handler(Json(context): Json<JobContext>) -> FnResult<()> {
    std::hint::black_box(&context);
    Ok(())
}

/// Succeeds without looking at its input.
#[plugin_fn]
pub fn run_handler_raw(input: Vec<u8>) -> FnResult<()> {
    std::hint::black_box(&input);
    Ok(())
}
