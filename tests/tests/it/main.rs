//! One integration-test binary, one file per concern: all tests run in parallel
//! threads of one process, and every Envoy they start dies with that process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod aggregate;
mod auth;
mod cache;
mod client_ip;
mod configs;
mod cors;
mod harness;
mod hostile;
mod introspection;
mod modules;
mod mtls;
mod ratelimit;
mod ratelimit_global;
mod routing;
