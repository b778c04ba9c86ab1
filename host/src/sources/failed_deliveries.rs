//! The failed deliveries, for an operator: the deliveries whose last attempt failed with no
//! retry left (a mail relay down for a day, a handler with a bug since mended), listed and run
//! again.
//!
//! - `GET /v1/deliveries/failed[?handler=NAME][&event_id=UUID][&before=ID][&limit=N]`: the newest
//!   first, `limit` (1–[`MAX_FAILED_PAGE`], default [`DEFAULT_PAGE`]) at a time; the answer's
//!   `next_before` asks for the next page.
//! - `POST /v1/admin/retry-failed` with `{"handler": NAME, "event_id": UUID}` (either or both):
//!   every failed delivery they select is made pending again, due at once, in batches of
//!   [`MAX_RETRY_BATCH`]; answered with how many. Each runs with its next attempt number, and
//!   only once more if it was past its last retry (its retry policy counts attempts).
//!
//! Both are administrators' endpoints (`server.admin_tokens` when configured). Every input is
//! checked and a bad one is answered `400` saying what to fix; the store's own words go to the
//! log, never to the client.

use std::sync::Arc;

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::log_limit::LogLimit;
use crate::queue::dispatch::Dispatcher;
use crate::queue::registration::{MAX_HANDLER_NAME, is_handler_name};
use crate::queue::store::{
    EventStore, FailedFilter, MAX_FAILED_PAGE, MAX_RETRY_BATCH, STORE_FAILURE_LOG_INTERVAL,
    STORE_READ_TIMEOUT, StoreError, call_within,
};

/// Where the list is read.
pub const LIST_PATH: &str = "/v1/deliveries/failed";

/// Where failed deliveries are run again.
pub const RETRY_PATH: &str = "/v1/admin/retry-failed";

/// A page of the list when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;

/// Largest body of a retry request: two fields fit many times over.
pub const MAX_RETRY_BODY: usize = 4096;

/// Failed list reads and retries, told through [`STORE_FAILURE_LOG_INTERVAL`]. A batch of a
/// retry is a bounded transaction, given as long as a read ([`STORE_READ_TIMEOUT`]).
static FAILURES: LogLimit = LogLimit::new(STORE_FAILURE_LOG_INTERVAL);

/// An answer: its status and its JSON body.
pub type Answer = (StatusCode, Value);

/// The list's query string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    handler: Option<String>,
    event_id: Option<String>,
    before: Option<i64>,
    limit: Option<usize>,
}

/// The body of a retry request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryRequest {
    handler: Option<String>,
    event_id: Option<String>,
}

/// `GET /v1/deliveries/failed`: `query` as decoded, or why it could not be.
pub async fn list(store: &Arc<dyn EventStore>, query: Result<ListQuery, String>) -> Answer {
    let query = match query {
        Ok(query) => query,
        Err(why) => {
            return bad(format!(
                "{}; the list takes handler, event_id, before (a delivery id) and limit \
                 (1-{MAX_FAILED_PAGE})",
                crate::escape::escape(&why)
            ));
        }
    };
    let filter = match filter(query.handler, query.event_id.as_deref()) {
        Ok(filter) => FailedFilter {
            before: query.before,
            ..filter
        },
        Err(bad) => return bad,
    };
    if query.before.is_some_and(|before| before < 1) {
        return bad(
            "before must be a delivery id (1 or more): the next_before of the page before".into(),
        );
    }
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_FAILED_PAGE).contains(&limit) {
        return bad(format!("limit must be 1-{MAX_FAILED_PAGE}"));
    }
    let read = call_within(store, STORE_READ_TIMEOUT, move |store| {
        store.failed_deliveries(&filter, limit)
    });
    match read.await {
        Ok(page) => {
            // A full page may have more below it; a short one is the last.
            let next_before = (page.len() == limit)
                .then(|| page.last().map(|d| d.id))
                .flatten();
            (
                StatusCode::OK,
                json!({ "deliveries": page, "next_before": next_before }),
            )
        }
        Err(e) => store_failed("the failed deliveries could not be read".into(), &e),
    }
}

/// `POST /v1/admin/retry-failed` with `body` (read within [`MAX_RETRY_BODY`]); wakes
/// `dispatcher` when deliveries are due again.
pub async fn retry(store: &Arc<dyn EventStore>, dispatcher: &Dispatcher, body: &[u8]) -> Answer {
    // Read straight into the request, not through a `Value`, which keeps only the last of a
    // field given twice (`{"handler": "a", "handler": "b"}` would have run b's again): the
    // derive refuses a duplicate field. An object only: the derive would also take a
    // two-element array as the two fields.
    let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let asked: RetryRequest = match serde_json::from_slice(body) {
        Ok(asked) if object => asked,
        Err(e) if object || serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() => {
            return bad(format!(
                "the body is not {RETRY_SHAPE}: {}",
                crate::escape::escape(&e.to_string())
            ));
        }
        Ok(_) | Err(_) => return bad(format!("the body is not {RETRY_SHAPE}")),
    };
    if asked.handler.is_none() && asked.event_id.is_none() {
        return bad(
            "name a handler, an event_id or both: to run every failed delivery again, \
                    send one request per handler (GET /v1/handlers lists them)"
                .into(),
        );
    }
    let filter = match filter(asked.handler, asked.event_id.as_deref()) {
        Ok(filter) => filter,
        Err(bad) => return bad,
    };
    let mut requeued = 0usize;
    let mut below = None;
    // Newest first, each batch below the last: a delivery run again that fails again is above
    // the mark and is not taken a second time, so the loop ends.
    loop {
        let batch = FailedFilter {
            before: below,
            ..filter.clone()
        };
        let done = call_within(store, STORE_READ_TIMEOUT, move |store| {
            store.retry_failed(&batch, store.now(), MAX_RETRY_BATCH)
        })
        .await;
        match done {
            Ok(ids) => {
                requeued += ids.len();
                if !ids.is_empty() {
                    dispatcher.due_may_have_moved();
                }
                match ids.iter().min() {
                    Some(lowest) if ids.len() >= MAX_RETRY_BATCH => below = Some(*lowest),
                    _ => break,
                }
            }
            Err(e) => {
                let what = if requeued == 0 {
                    "no failed delivery was made pending again".to_owned()
                } else {
                    format!(
                        "{requeued} failed deliveries were made pending again, then the store \
                         failed; ask again for the rest"
                    )
                };
                return store_failed(what, &e);
            }
        }
    }
    tracing::info!(
        handler = filter
            .handler
            .as_deref()
            .map(crate::escape::escape)
            .as_deref(),
        event_id = filter.event.map(|e| e.to_string()).as_deref(),
        requeued,
        "failed deliveries made pending again by an operator"
    );
    (StatusCode::OK, json!({ "requeued": requeued }))
}

/// What a retry request's body looks like, for the errors that ask for it.
const RETRY_SHAPE: &str =
    r#"a JSON object {"handler": "<name>", "event_id": "<uuid>"} (either or both)"#;

/// The filter of a handler name and an event id as given; `400` saying what to fix when
/// either is not usable.
fn filter(handler: Option<String>, event_id: Option<&str>) -> Result<FailedFilter, Answer> {
    // Any name a configuration may give, this one's or an earlier one's (a handler no longer
    // configured keeps its deliveries); nothing else could match.
    if handler
        .as_deref()
        .is_some_and(|name| !is_handler_name(name))
    {
        return Err(bad(format!(
            "handler must be a handler's name: 1 to {MAX_HANDLER_NAME} letters, digits, '-', '_' \
             or '.'"
        )));
    }
    let event = match event_id.map(Uuid::try_parse).transpose() {
        Ok(event) => event,
        Err(_) => {
            return Err(bad(
                "event_id must be an event's id (a UUID, as POST /v1/job-complete answered it)"
                    .into(),
            ));
        }
    };
    Ok(FailedFilter {
        handler,
        event,
        before: None,
    })
}

/// `400` saying what to fix.
fn bad(message: String) -> Answer {
    (StatusCode::BAD_REQUEST, json!({ "error": message }))
}

/// The answer when the store failed: why goes to the log (rate-limited), the client is told
/// `what`, the cause in plain words and to retry unless the data is damaged
/// ([`StoreError::retry_helps`]) — `503` while the store's condition lasts (a full disk, a read-only
/// or unreachable store, no answer), `500` for anything else.
fn store_failed(what: String, why: &StoreError) -> Answer {
    FAILURES.tell(|untold| {
        tracing::error!(more_since_last_error = untold, "{what}: {why}");
    });
    let status = if why.is_transient() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    let cause = why.plain_cause();
    let retry = if why.retry_helps() {
        "; retry later (the log has more)"
    } else {
        ""
    };
    (
        status,
        json!({ "error": format!("{what}: {cause}{retry}") }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store's conditions that pass by themselves answer 503 naming the cause, without the
    /// database's own words; anything else 500.
    #[test]
    fn a_store_failure_is_answered_by_its_cause() {
        for (why, status, cause) in [
            (
                StoreError::DiskFull("/var/lib/jobhook: no space".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                "the store is out of disk space",
            ),
            (
                StoreError::ReadOnly("attempt to write a readonly database".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                "the store takes no writes (read-only)",
            ),
            (
                StoreError::Unreachable("db.internal:5432 refused".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                "the store's database cannot be reached",
            ),
            (
                StoreError::NoAnswer("5s".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                "the store did not answer in time",
            ),
            (
                StoreError::Database("syntax error at db.internal".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "the store failed",
            ),
        ] {
            let (got, body) =
                store_failed("no failed delivery was made pending again".into(), &why);
            assert_eq!(got, status, "{why}");
            let error = body["error"].as_str().unwrap_or_default();
            assert!(
                error.starts_with("no failed delivery was made pending again: ")
                    && error.contains(cause),
                "{error}"
            );
            assert!(
                !error.contains("db.internal") && !error.contains("/var"),
                "{error}"
            );
            assert!(
                error.ends_with("; retry later (the log has more)"),
                "{error}"
            );
        }
        // Damaged data: no retry reads it until an operator has restored the store.
        let (got, body) = store_failed(
            "the failed deliveries could not be read".into(),
            &StoreError::Corrupt("database disk image is malformed".into()),
        );
        assert_eq!(got, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            body["error"],
            "the failed deliveries could not be read: the store's data is damaged (the engine's \
             log says what to do)"
        );
    }
}
