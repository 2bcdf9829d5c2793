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
