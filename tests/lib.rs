//! Integration tests live in `tests/tests/`; shared support is the `jobhook-testkit` crate.
