//! Checks on the built `.wasm` files: what keeps them loadable in any
//! proxy-wasm host (ABI 0.2.1, only `env.proxy_*` and the WASI calls hosts give).

use gateway_tests::paths;
use wasmparser::{Parser, Payload, TypeRef};

/// The modules this release ships; each must exist in `dist/`.
pub const MODULES: &[&str] = &["routing", "ratelimit", "auth", "cache", "aggregate"];

/// WASI functions proxy-wasm hosts (Envoy's proxy-wasm-cpp-host) provide.
const HOST_WASI: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "environ_get",
    "environ_sizes_get",
    "fd_close",
    "fd_fdstat_get",
    "fd_prestat_dir_name",
    "fd_prestat_get",
    "fd_read",
    "fd_seek",
    "fd_write",
    "poll_oneoff",
    "proc_exit",
    "random_get",
    "sched_yield",
];

struct Surface {
    imports: Vec<(String, String)>,
    exports: Vec<String>,
}

fn surface(module: &str) -> Surface {
    let bytes = std::fs::read(paths::module(module)).unwrap();
    wasmparser::validate(&bytes).unwrap_or_else(|error| panic!("{module}.wasm is not valid Wasm: {error}"));
    let mut surface = Surface { imports: Vec::new(), exports: Vec::new() };
    for payload in Parser::new(0).parse_all(&bytes) {
        match payload.unwrap() {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.unwrap();
                    assert!(
                        matches!(import.ty, TypeRef::Func(_)),
                        "{module}.wasm imports a non-function {}.{}",
                        import.module,
                        import.name
                    );
                    surface.imports.push((import.module.to_string(), import.name.to_string()));
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    surface.exports.push(export.unwrap().name.to_string());
                }
            }
            _ => {}
        }
    }
    surface
}

#[test]
fn modules_import_only_what_proxy_wasm_hosts_provide() {
    for module in MODULES {
        let surface = surface(module);
        for (namespace, name) in &surface.imports {
            let allowed = match namespace.as_str() {
                "env" => name.starts_with("proxy_"),
                "wasi_snapshot_preview1" => HOST_WASI.contains(&name.as_str()),
                _ => false,
            };
            assert!(allowed, "{module}.wasm imports {namespace}.{name}, which proxy-wasm hosts do not provide");
        }
        assert!(surface.imports.iter().any(|(ns, _)| ns == "env"), "{module}.wasm imports no proxy-wasm call");
    }
}

#[test]
fn modules_export_the_abi_0_2_1_entry_points() {
    for module in MODULES {
        let exports = surface(module).exports;
        for required in ["proxy_abi_version_0_2_1", "proxy_on_memory_allocate", "proxy_on_context_create", "memory"] {
            assert!(exports.iter().any(|name| name == required), "{module}.wasm lacks export {required}");
        }
        assert!(
            exports.iter().any(|name| name == "_initialize" || name == "_start"),
            "{module}.wasm has no WASI entry point"
        );
    }
}

/// The per-request callbacks a module may leave unexported (as `scripts/trim_callbacks.py`
/// names them), with the method of the SDK's traits that handles each.
const STREAM_CALLBACKS: &[(&str, &str)] = &[
    ("request_headers", "fn on_http_request_headers("),
    ("request_body", "fn on_http_request_body("),
    ("request_trailers", "fn on_http_request_trailers("),
    ("response_headers", "fn on_http_response_headers("),
    ("response_body", "fn on_http_response_body("),
    ("response_trailers", "fn on_http_response_trailers("),
    ("log", "fn on_log("),
    ("done", "fn on_done("),
];

/// A host calls every callback a module exports: each module exports exactly the
/// stream callbacks its code implements (one it implements but does not export would
/// never run; one it exports but does not implement is a VM call for nothing). A build
/// with `ALL_CALLBACKS=1` (for hosts that call every callback unchecked) exports them all.
#[test]
fn modules_export_exactly_the_stream_callbacks_they_implement() {
    let all_callbacks = std::env::var("ALL_CALLBACKS").is_ok_and(|value| !value.is_empty());
    let root = paths::workspace_root();
    for module in MODULES {
        let exports = surface(module).exports;
        let source: String = std::fs::read_dir(root.join(format!("filters/{module}/src")))
            .unwrap()
            .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default())
            .collect();
        for (callback, method) in STREAM_CALLBACKS {
            let exported = exports.iter().any(|name| name.strip_prefix("proxy_on_") == Some(callback));
            let implemented = source.contains(method);
            assert_eq!(
                exported,
                implemented || all_callbacks,
                "{module}.wasm: proxy_on_{callback} exported {exported}, `{method}` implemented {implemented} \
                 (declare it in the module's `stream_callbacks!`)"
            );
        }
    }
}

/// The "adding a filter" checklist of ARCHITECTURE.md, kept true: every crate
/// under `filters/` (except `common`) is a shipped module, built by the Makefile,
/// checked here, loaded by the demo gateway, documented in the README and in
/// `docs/<module>.md`, mapped in ARCHITECTURE.md, and its stream glue is tested
/// on `FakeHost`.
#[test]
fn every_filter_crate_is_built_checked_wired_and_documented() {
    let root = paths::workspace_root();
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let makefile = read("Makefile");
    let gateway = read("envoy/gateway.yaml");
    let readme = read("README.md");
    let architecture = read("ARCHITECTURE.md");
    let workspace = read("Cargo.toml");
    let mut crates: Vec<String> = std::fs::read_dir(root.join("filters"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "common")
        .collect();
    crates.sort();
    let mut shipped: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
    shipped.sort();
    assert_eq!(crates, shipped, "every filter crate is in MODULES (modules.rs) and nothing else");
    let make_modules = makefile.lines().find(|line| line.starts_with("MODULES :=")).unwrap();
    for module in MODULES {
        assert!(make_modules.split_whitespace().any(|word| word == *module), "{module} missing from Makefile MODULES");
        assert!(workspace.contains(&format!("\"filters/{module}\"")), "{module} missing from the workspace members");
        assert!(gateway.contains(&format!("{module}.wasm")), "{module} is not loaded by envoy/gateway.yaml");
        assert!(readme.contains(&format!("(`{module}.wasm`)")), "README has no section for {module}.wasm");
        let reference = std::fs::read_to_string(root.join(format!("docs/{module}.md"))).unwrap_or_default();
        assert!(reference.contains("## Fields"), "docs/{module}.md is missing or has no field reference");
        assert!(readme.contains(&format!("(docs/{module}.md)")), "README does not link docs/{module}.md");
        assert!(architecture.contains(&format!("filters/{module}/")), "ARCHITECTURE.md does not map filters/{module}/");
        let glue = read(&format!("filters/{module}/src/lib.rs"));
        assert!(glue.contains("mod glue_tests") && glue.contains("FakeHost"), "{module}: no glue tests on FakeHost");
        assert!(glue.contains("skeleton::install::<"), "{module}: its root is not the shared skeleton::ModuleRoot");
    }
}
