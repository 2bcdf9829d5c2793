//! The integration harness: real Envoy processes running our `.wasm` modules,
//! real upstream servers and real clients over loopback sockets.
//!
//! - [`upstream::EchoUpstream`]: an HTTP/1.1 server that describes each request it
//!   received as JSON, can be scripted per path, and counts what it served.
//! - [`envoy::Envoy`]: renders a config, starts Envoy (dies with the test process),
//!   waits for `/ready`, reads stats, prints its log when a test fails.
//! - [`client`]: HTTP/1.1 and HTTP/2 (h2c) requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

pub mod client;
pub mod envoy;
pub mod paths;
pub mod process;
pub mod raw;
pub mod services;
pub mod tls;
pub mod tokens;
pub mod upstream;

use std::sync::OnceLock;

/// One multi-threaded runtime for every upstream and client in the process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
    })
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
