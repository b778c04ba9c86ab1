//! Where events come from.
//!
//! - [`api`]: the HTTP API — `POST /v1/job-complete` (the forwarder's way in) and the read and
//!   admin endpoints;
//! - [`idempotency`]: the `Idempotency-Key` of ingest requests — one event per key, however
//!   often the forwarder resends it; [`forwarders`]: which forwarders deliver, and when each
//!   last did; [`store_health`]: whether the store took the latest event, for `/healthz`;
//!   [`failed_deliveries`]: the deliveries that failed for good, listed and run again;
//! - [`poller`]: Keyfactor's JobHistory turned into events where nothing can be installed in
//!   Keyfactor.
//!
//! Both validate their input and hand a [`crate::queue::store::NewEvent`] to the queue, which
//! commits it before anything is answered.

pub mod api;
pub mod failed_deliveries;
pub mod forwarders;
pub mod idempotency;
pub mod poller;
pub mod store_health;
