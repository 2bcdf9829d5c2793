//! Shared building blocks of the gateway filters. Nothing here may panic on input:
//! a panic traps the Wasm VM and fails every later request on that worker.

pub mod client_ip;
pub mod config;
pub mod field;
pub mod hash;
pub mod host;
pub mod matcher;
pub mod metrics;
pub mod platform;
pub mod problem;
pub mod request;
pub mod request_match;
pub mod shared;
pub mod skeleton;
#[cfg(any(test, feature = "testing"))]
#[allow(clippy::panic)]
pub mod testing;
pub mod text;
pub mod verdict;
pub mod wire;
