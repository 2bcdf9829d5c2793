#!/usr/bin/env bash
# `make run`: the demo backends and Envoy with envoy/gateway.yaml, from the
# repository root. Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${ENVOY_BIN:?set by make run}"

BACKENDS=(users:9101 orders:9102 orders-v2:9103 products:9104)
pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped the gateway and its backends"
}
trap cleanup INT TERM EXIT

target/release/echo-upstream "${BACKENDS[@]}" &
pids+=($!)
"$ENVOY_BIN" -c envoy/gateway.yaml --concurrency 2 --log-level warn --disable-hot-restart &
pids+=($!)

for _ in $(seq 1 200); do
  if curl -fsS http://127.0.0.1:9901/ready >/dev/null 2>&1; then break; fi
  sleep 0.1
done
curl -fsS http://127.0.0.1:9901/ready >/dev/null || { echo "Envoy did not become ready" >&2; exit 1; }

cat <<'TEXT'

The demo gateway is up (JSON access log below; Ctrl-C stops everything).
  HTTP   http://127.0.0.1:8080
  HTTPS  https://localhost:8443   (self-signed: curl -k)
  admin  http://127.0.0.1:9901    (stats: /stats/prometheus)

Try:
  curl -s http://127.0.0.1:8080/users/42                           # -> users
  curl -s http://127.0.0.1:8080/orders -H 'x-api-version: 2'       # -> orders-v2
  curl -s http://127.0.0.1:8080/orders -H 'cookie: canary=1'       # -> orders-v2
  curl -s http://127.0.0.1:8080/orders -H 'x-user-id: alice' -i    # 90/10 split, sticky per user
  curl -s http://127.0.0.1:8080/v0/anything -i                     # 410 problem+json
  curl -s http://127.0.0.1:8080/nowhere -i                         # 404 problem+json
  curl -sk https://localhost:8443/products/1 --http2               # TLS terminated at the gateway
  curl -s http://127.0.0.1:9901/stats/prometheus | grep wasmcustom

TEXT
wait -n "${pids[@]}"
