//! Real servers the modules talk to, started from packages: Redis (Debian's
//! `redis-server`), the rate-limit service fixture (`rls-service`: Envoy's RLS
//! protocol over Kuadrant's Limitador engine, counting in that Redis) and an
//! OAuth 2.0 server (`tests/idp`: panva's oidc-provider from npm). They run from a
//! directory under `target/itest/` and die with the test process.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{paths, process, wait_until};

/// A child process killed when dropped (and when the test process dies).
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on right now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()).map(|addr| addr.port()).expect("port")
}

/// `redis-server` on a free port, nothing persisted.
pub fn redis() -> Server {
    let dir = paths::run_dir("redis");
    let port = free_port();
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = process::spawn(command).expect("redis-server (Debian package redis-server, `make redis`)");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()), "redis-server did not start");
    Server { addr, child }
}

/// The RLS fixture binary, built by `make integration`.
fn rls_binary() -> PathBuf {
    let path = paths::workspace_root().join("target/debug/rls-service");
    assert!(path.exists(), "{} is missing: run `cargo build -p rls-service`", path.display());
    path
}

/// The rate-limit service fixture with these Limitador `limits` over `redis`;
/// `extra` arguments: `--delay-ms N`, `--answer garbage`.
pub fn rls(redis: Option<&Server>, limits: &serde_json::Value, extra: &[&str]) -> Server {
    let dir = paths::run_dir("rls");
    let limits_path = dir.join("limits.json");
    std::fs::write(&limits_path, limits.to_string()).expect("write limits");
    let mut command = Command::new(rls_binary());
    command.arg("--limits").arg(&limits_path).args(extra).stdout(Stdio::piped()).stderr(Stdio::inherit());
    if let Some(redis) = redis {
        command.args(["--redis", &format!("redis://{}", redis.addr)]);
    }
    let mut child = process::spawn(command).expect("start rls-service");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("rls-service output");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("rls-service did not start: {line:?}"));
    Server { addr, child }
}

/// The OAuth 2.0 server of the introspection tests (`make idp`): issuer
/// `https://idp.test`, client `gateway` / `gateway-secret` may introspect,
/// `shop-app` / `shop-secret` and `reporting` / `reporting-secret` get tokens by
/// client credentials ([`idp_token`]).
pub fn idp() -> Server {
    let dir = paths::run_dir("idp");
    let script = paths::workspace_root().join("tests/idp/server.mjs");
    assert!(
        paths::workspace_root().join("tests/idp/node_modules/oidc-provider").exists(),
        "oidc-provider is missing: run `make idp`"
    );
    let mut command = Command::new("node");
    let log = std::fs::File::create(dir.join("idp.log")).expect("IdP log");
    command.arg(&script).arg(&dir).stdout(Stdio::piped()).stderr(log);
    let mut child = process::spawn(command).expect("node (Node.js, for tests/idp)");
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    while line.is_empty() || !line.starts_with("listening on ") {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("the IdP did not start");
        }
    }
    let addr = line.trim().strip_prefix("listening on ").and_then(|addr| addr.parse().ok()).expect("IdP address");
    // Node dies of EPIPE if it logs into a closed pipe later: keep reading.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Server { addr, child }
}

/// An access token for `client` with `scope`, by the client-credentials grant.
pub fn idp_token(idp: &Server, client: &str, secret: &str, scope: &str) -> String {
    let body = format!("grant_type=client_credentials&scope={}", scope.replace(' ', "%20"));
    let response = idp_post(idp, client, secret, "/token", body);
    assert_eq!(response.status, 200, "token: {}", response.text());
    response.json()["access_token"].as_str().expect("access_token").to_string()
}

/// Revokes a token at the IdP (RFC 7009).
pub fn idp_revoke(idp: &Server, client: &str, secret: &str, token: &str) {
    let response = idp_post(idp, client, secret, "/token/revocation", format!("token={token}"));
    assert_eq!(response.status, 200, "revocation: {}", response.text());
}

/// A form POST to the IdP, authenticated as `client` (HTTP Basic).
fn idp_post(idp: &Server, client: &str, secret: &str, path: &str, form: String) -> crate::client::Response {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{client}:{secret}"));
    crate::client::RequestBuilder::new(idp.addr, "POST", path)
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
}
