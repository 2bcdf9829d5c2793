#!/usr/bin/env python3
"""What each module's own code costs per request, without Envoy: the module runs
in Node's V8 (the engine Envoy embeds) behind the minimal host of `hotpath.mjs`,
whose host calls are close to free. Same configurations and requests as
`make bench` (bench/run.py). Unlike the Envoy bench this is quiet (a few percent
between runs), so it shows what a change to a module's code buys.

    .venv/bin/python bench/hotpath.py [--only TEXT] [--profile DIR] [--wasm-dir DIR]

`--profile` writes a V8 CPU profile per scenario and prints the functions that
take the most time (self time). `--wasm-dir` times the modules of another
build (to compare with `dist/`, in the same run).
"""

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from email.utils import formatdate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the bench's configurations and tokens)

HERE = Path(__file__).resolve().parent

# What Envoy hands a filter for a request from wrk (`x-request-id` generated, the
# scheme as `x-forwarded-proto`).
BASE_HEADERS = [(":authority", "127.0.0.1:10000"), (":path", "/bench"), (":method", "GET"), (":scheme", "http"),
                ("x-forwarded-proto", "http"), ("x-request-id", "2f1e8c3a-5d7b-4e21-9a6f-0c4b8d2e7f13")]
UPSTREAM_RESPONSE = {"headers": [(":status", "200"), ("content-type", "text/plain"), ("content-length", "1024"),
                                 ("cache-control", "public, max-age=600"), ("date", formatdate(usegmt=True)),
                                 ("server", "envoy")],
                     "body": "x" * 1024}


def scenarios(cold_tokens):
    tokens = run.make_tokens("RS256", "rsa-1", run.TOKENS)
    cold = run.make_tokens("RS256", "rsa-1", cold_tokens, cold=True)
    bearer = lambda token: BASE_HEADERS + [("authorization", f"Bearer {token}")]  # noqa: E731
    route = BASE_HEADERS + [("x-route", f"r{run.ROUTES - 1}")]
    floor = lambda calls: "calls:" + ",".join(calls)  # noqa: E731
    # Each module next to the empty filter making the same host calls (its floor):
    # the difference is the module's own code.
    return [
        ("noop", "noop", "", [BASE_HEADERS], None),
        ("auth RS256 warm", "auth", run.ours_auth_config(), [bearer(t) for t in tokens], UPSTREAM_RESPONSE),
        ("auth floor", "noop", floor(run.AUTH_WARM_CALLS), [bearer(t) for t in tokens], UPSTREAM_RESPONSE),
        ("auth RS256 cold", "auth", run.ours_auth_config(), [bearer(t) for t in cold], UPSTREAM_RESPONSE),
        ("ratelimit per-IP", "ratelimit", run.ours_ratelimit_config(), [BASE_HEADERS], UPSTREAM_RESPONSE),
        ("ratelimit floor", "noop", floor(run.RATELIMIT_CALLS), [BASE_HEADERS], UPSTREAM_RESPONSE),
        # make bench's calibration: the same Wasm compute, timed here and inside Envoy.
        (f"floor + spin:{run.SPIN_ROUNDS}", "noop", floor(run.SPIN_CALLS),
         [BASE_HEADERS], UPSTREAM_RESPONSE),
        (f"routing, {run.ROUTES} header routes", "routing", run.ours_routing_config(), [route], UPSTREAM_RESPONSE),
        ("routing floor", "noop", floor(run.ROUTING_CALLS), [route], UPSTREAM_RESPONSE),
        ("cache hit, 1 KiB", "cache", {}, [BASE_HEADERS], UPSTREAM_RESPONSE),
        ("cache floor", "noop", floor(run.CACHE_HIT_CALLS + ["reply:1024"]), [BASE_HEADERS], UPSTREAM_RESPONSE),
    ]


def time_module(wasm, config, requests, response, iterations, profile=None, cold=False):
    scenario = {"config": config, "requests": requests, "response": response,
                "properties": {"source.address": "127.0.0.1:40000"},
                # Cold tokens: each is verified once, so no warm-up may see them first.
                "warmup": 0 if cold else iterations // 20, "iterations": len(requests) if cold else iterations}
    if profile:
        scenario["profile"] = str(profile)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(scenario, file)
        file.flush()
        done = subprocess.run(["node", "--no-warnings", str(HERE / "hotpath.mjs"), str(wasm), file.name],
                              capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{wasm.name}: {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def top_functions(profile_path, count=12):
    profile = json.loads(Path(profile_path).read_text())
    nodes = {node["id"]: node for node in profile["nodes"]}
    self_time = collections.Counter(nodes[sample]["callFrame"]["functionName"] or "(host, JS)"
                                    for sample in profile["samples"])
    total = len(profile["samples"]) or 1
    return [(100 * hits / total, name) for name, hits in self_time.most_common(count)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--wasm-dir", type=Path, action="append", default=[])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="one short round of each (make test)")
    args = parser.parse_args()
    dirs = [run.DIST] + args.wasm_dir
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    iterations, cold_tokens = (2000, 50) if args.smoke else (60000, 3000)
    if args.smoke:
        args.rounds = 1
    for name, module, config, requests, response in scenarios(cold_tokens):
        if args.only and args.only not in name:
            continue
        # The variants alternate, and each reports its fastest round: the machine's
        # noise only ever adds time.
        rounds = {directory: [] for directory in dirs}
        for _ in range(1 if "cold" in name else args.rounds):
            for directory in dirs:
                profile = args.profile / f"{module}-{directory.name}.cpuprofile" if args.profile else None
                result = time_module(directory / f"{module}.wasm", config, requests, response, iterations, profile,
                                     "cold" in name)
                rounds[directory].append(result)
        for directory, results in rounds.items():
            fastest = min(results, key=lambda result: result["us_per_request"])
            # A scenario measures what it says or fails: every cache request a hit
            # (answered locally), every other one forwarded.
            expected_replies = 1.0 if module == "cache" or "reply:" in str(config) else 0.0
            if any(result["local_replies"] != expected_replies for result in results):
                sys.exit(f"{name}: {fastest['local_replies']} local replies per request, expected {expected_replies}")
            label = directory.relative_to(run.ROOT) if directory.is_relative_to(run.ROOT) else directory
            print(f"{name:30} {str(label):20} {fastest['us_per_request']:7.2f} µs/request (fastest of {len(results)})"
                  f"   host calls {fastest['host_calls']:.1f}   local replies {fastest['local_replies']:.2f}",
                  flush=True)
            if args.profile:
                for share, function in top_functions(args.profile / f"{module}-{directory.name}.cpuprofile"):
                    print(f"      {share:5.1f}%  {function[:110]}")

if __name__ == "__main__":
    main()
