//! `jobhook-dev`: the handler author's and the benchmarks' tool, kept apart from the operator's
//! `jobhook` binary so that the product does not link test tooling.
//!
//! - [`standin`]: `jobhook-dev standin`, the Keyfactor API stand-in on loopback;
//! - [`cli`]: `jobhook-dev run` (`jobhook run` plus `--keyfactor-standin`, an in-process
//!   stand-in for the run), `jobhook-dev standin`, `jobhook-dev load`;
//! - [`loadgen`]: `jobhook-dev load`, the event driver of the crash, two-node and bench tests.

#![deny(missing_docs)]

pub mod cli;
pub mod loadgen;
pub mod standin;
