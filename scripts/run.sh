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

# A demo JWT (HS256, 1 hour) signed with the test fixture secret of kid hs-1.
b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
now=$(date +%s)
header=$(printf '{"alg":"HS256","typ":"JWT","kid":"hs-1"}' | b64url)
payload=$(printf '{"iss":"https://idp.demo","aud":"gateway-demo","sub":"alice","scope":"orders:read","iat":%d,"exp":%d}' "$now" "$((now + 3600))" | b64url)
signature=$(printf '%s.%s' "$header" "$payload" | openssl dgst -sha256 -mac HMAC -macopt key:a-shared-secret-of-32-bytes-long! -binary | b64url)
TOKEN="$header.$payload.$signature"

cat <<TEXT

The demo gateway is up (JSON access log below; Ctrl-C stops everything).
Chain: ratelimit (per IP) -> auth -> ratelimit (per user, /orders) -> aggregate -> routing -> cache -> backends.
  HTTP   http://127.0.0.1:8080
  HTTPS  https://localhost:8443   (self-signed: curl -k)
  mTLS   https://localhost:8444   (client certificate envoy/tls/client.pem)
  admin  http://127.0.0.1:9901    (stats: /stats/prometheus)

Try (a demo token for user alice, valid one hour):
  TOKEN=$TOKEN

  curl -s http://127.0.0.1:8080/users/42 -H "authorization: Bearer \$TOKEN"                 # -> users, x-user-id: alice
  curl -s http://127.0.0.1:8080/users/42 -i                                                 # 401 problem+json
  curl -s http://127.0.0.1:8080/orders -H "authorization: Bearer \$TOKEN" -H 'x-api-version: 2'   # -> orders-v2
  curl -s http://127.0.0.1:8080/orders -H "authorization: Bearer \$TOKEN" -i              # 90/10 split, sticky per user; RateLimit headers
  curl -s http://127.0.0.1:8080/products/1 -H 'x-api-key: demo-key-123'                    # API key -> products
  curl -s http://127.0.0.1:8080/dashboard/alice -H "authorization: Bearer \$TOKEN"         # users + orders in one JSON
  curl -s http://127.0.0.1:8080/products/2 -H 'x-api-key: demo-key-123' -H 'x-echo-header: cache-control: public, max-age=30' -i
                                                     # run it twice: the second answer is a cache hit (Cache-Status, Age)
  curl -s http://127.0.0.1:8080/v0/anything -i                                              # 410 problem+json
  curl -s -X OPTIONS http://127.0.0.1:8080/orders -i -H 'origin: http://localhost:3000' -H 'access-control-request-method: PUT'
                                                     # CORS preflight answered by the gateway (204)
  curl -sk https://localhost:8443/products/1 --http2 -H 'x-api-key: demo-key-123'          # TLS terminated at the gateway
  curl -sk https://localhost:8444/products/1 --cert envoy/tls/client.pem --key envoy/tls/client.key
                                                     # mTLS: the client certificate is consumer checkout-service
  curl -s http://127.0.0.1:9901/stats/prometheus | grep wasmcustom

TEXT
wait -n "${pids[@]}"
