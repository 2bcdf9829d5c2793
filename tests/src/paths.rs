//! Where things are: the workspace, the built modules, the Envoy binary.

use std::path::{Path, PathBuf};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `dist/<name>.wasm`, built by `make build`.
pub fn module(name: &str) -> PathBuf {
    let path = workspace_root().join("dist").join(format!("{name}.wasm"));
    assert!(path.exists(), "{} is missing: run `make build` first", path.display());
    path
}

/// The Envoy binary: `ENVOY_BIN`, else the one `make` installed into `.venv`.
pub fn envoy_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("ENVOY_BIN").filter(|bin| !bin.is_empty()) {
        return PathBuf::from(bin);
    }
    let lib = workspace_root().join(".venv").join("lib");
    let found = std::fs::read_dir(&lib).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|entry| entry.path().join("site-packages/envoy/_bin/envoy"))
            .find(|candidate| candidate.exists())
    });
    found.unwrap_or_else(|| panic!("no Envoy under {}: run `make envoy` or set ENVOY_BIN", lib.display()))
}

/// A fresh directory for one Envoy run, under `target/itest/` so that `make test`
/// can check afterwards that no process it started still runs.
pub fn run_dir(label: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = workspace_root().join("target").join("itest").join(format!("{}-{}-{label}", std::process::id(), n));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create run dir");
    dir
}

/// `envoy.wasm.runtime.<WASM_RUNTIME>` (v8 by default; wasmtime and wamr too).
pub fn wasm_runtime() -> String {
    let name = std::env::var("WASM_RUNTIME").ok().filter(|name| !name.is_empty());
    let name = name.unwrap_or_else(|| "v8".to_string());
    assert!(matches!(name.as_str(), "v8" | "wasmtime" | "wamr"), "WASM_RUNTIME must be v8, wasmtime or wamr");
    format!("envoy.wasm.runtime.{name}")
}
