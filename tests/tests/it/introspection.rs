//! Opaque tokens (issue 17 item 6): auth.wasm introspects them (RFC 7662) at a
//! real OAuth 2.0 server, panva's oidc-provider from npm, which issues the tokens
//! by client credentials and revokes them (RFC 7009). Answers are cached in shared
//! data for every worker; a slow or dead IdP fails safe.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gateway_tests::client::Response;
use gateway_tests::envoy::{assert_config_refused, Envoy, EnvoyConfig, WasmFilter};
use gateway_tests::services::{free_port, idp, idp_revoke, idp_token, Server};
use gateway_tests::upstream::{EchoUpstream, Reply};
use serde_json::{json, Value};

struct Gateway {
    envoy: Envoy,
    idp: Server,
    backend: EchoUpstream,
    _slow_idp: EchoUpstream,
}

fn provider(name: &str, cluster: &str, token_header: &str, extra: Value) -> Value {
    let mut introspection = json!({"cluster": cluster, "authority": "idp.test", "path": "/token/introspection",
                                   "client_id": "gateway", "client_secret": "gateway-secret", "timeout_ms": 2000});
    for (key, value) in extra.as_object().unwrap() {
        introspection[key] = value.clone();
    }
    json!({"name": name, "issuer": "https://idp.test", "introspection": introspection,
           "from": [{"header": token_header, "prefix": "Bearer "}],
           "claims_to_headers": [{"claim": "client_id", "header": "x-client-id"}, {"claim": "scope", "header": "x-scopes"}]})
}

fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        let idp = idp();
        let backend = EchoUpstream::start("backend");
        let slow_idp = EchoUpstream::start("slow-idp");
        slow_idp.script(
            "/token/introspection",
            Reply::status(200).body(r#"{"active": true}"#).delay(Duration::from_secs(3)),
        );
        let auth = json!({
            "providers": [
                provider("corp", "idp", "authorization", json!({})),
                provider("corp-uncached", "idp", "x-uncached", json!({"cache_max_ttl_seconds": 0,
                                                                       "cache_inactive_ttl_seconds": 0})),
                provider("slow", "slow-idp", "x-slow", json!({"timeout_ms": 200})),
                provider("dead", "dead-idp", "x-dead", json!({"timeout_ms": 500, "on_failure": "reject_token"}))],
            "rules": [
                {"name": "orders", "match": {"path": {"prefix": "/orders"}}, "require": {"any": ["corp"]},
                 "scopes": ["orders:read"]},
                {"name": "uncached", "match": {"path": {"prefix": "/uncached"}}, "require": {"any": ["corp-uncached"]}},
                {"name": "slow", "match": {"path": {"prefix": "/slow"}}, "require": {"any": ["slow"]}},
                {"name": "dead", "match": {"path": {"prefix": "/dead"}}, "require": {"any": ["dead"]}}]});
        let config = EnvoyConfig::new(&backend)
            .http_cluster("idp", idp.addr)
            .cluster(&slow_idp)
            .http_cluster("dead-idp", std::net::SocketAddr::from(([127, 0, 0, 1], free_port())))
            .filter(WasmFilter::new("auth", auth));
        Gateway { envoy: Envoy::start(&config), idp, backend, _slow_idp: slow_idp }
    })
}

fn shop_token() -> String {
    idp_token(&gateway().idp, "shop-app", "shop-secret", "orders:read orders:write")
}

/// The tests count IdP calls in one Envoy-wide metric: they run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn calls() -> u64 {
    gateway().envoy.stat("wasmcustom.auth.introspection.calls")
}

fn get(path: &str, header: &str, token: &str) -> Response {
    gateway().envoy.get(path).header(header, format!("Bearer {token}")).send()
}

#[test]
fn an_active_token_passes_with_its_claims_and_is_introspected_once_for_every_worker() {
    let _serial = serial();
    let token = shop_token();
    let response = get("/orders/1", "authorization", &token);
    assert_eq!(response.status, 200, "{}", response.text());
    let echo = response.echo();
    // A client-credentials token has no `sub`: the consumer is its client.
    assert_eq!(echo.header("x-consumer"), Some("shop-app"));
    assert_eq!(echo.header("x-client-id"), Some("shop-app"));
    assert_eq!(echo.header("x-scopes"), Some("orders:read orders:write"));
    assert_eq!(echo.header("authorization"), None, "the token is not forwarded");
    let after_first = calls();
    // Each request on its own connection: both workers answer some of them.
    for _ in 0..10 {
        assert_eq!(get("/orders/1", "authorization", &token).status, 200);
    }
    assert_eq!(calls(), after_first, "the cached answer serves every worker");
}

#[test]
fn an_unknown_token_is_401_and_its_inactive_answer_is_cached_too() {
    let _serial = serial();
    let before = calls();
    let response = get("/orders/1", "authorization", "not-a-token-the-idp-issued");
    assert_eq!(response.status, 401, "{}", response.text());
    let challenge = response.header("www-authenticate").unwrap();
    assert!(challenge.contains("error=\"invalid_token\"") && challenge.contains("not active"), "{challenge}");
    assert_eq!(get("/orders/1", "authorization", "not-a-token-the-idp-issued").status, 401);
    assert_eq!(calls(), before + 1);
    assert!(gateway().envoy.stat("wasmcustom.auth.denied.inactive") >= 2);
}

#[test]
fn scopes_from_the_answer_are_enforced() {
    let _serial = serial();
    let reporting = idp_token(&gateway().idp, "reporting", "reporting-secret", "reports:read");
    let response = get("/orders/1", "authorization", &reporting);
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(response.json()["type"], "urn:wasm-gateway:problem:insufficient-scope");
}

#[test]
fn a_revoked_token_is_refused_once_no_answer_is_cached() {
    let _serial = serial();
    let token = shop_token();
    assert_eq!(get("/uncached/report", "x-uncached", &token).status, 200);
    idp_revoke(&gateway().idp, "shop-app", "shop-secret", &token);
    let response = get("/uncached/report", "x-uncached", &token);
    assert_eq!(response.status, 401, "{}", response.text());
}

#[test]
fn a_slow_or_dead_idp_fails_safe() {
    let _serial = serial();
    let gateway = gateway();
    let before = gateway.backend.served_path("/slow/x");
    let started = Instant::now();
    let slow = get("/slow/x", "x-slow", &shop_token());
    assert_eq!(slow.status, 503, "{}", slow.text());
    assert_eq!(slow.json()["type"], "urn:wasm-gateway:problem:credentials-unverifiable");
    assert_eq!(slow.header("retry-after").as_deref(), Some("1"));
    assert!(started.elapsed() < Duration::from_millis(2500), "timed out at 200 ms, not at the IdP's 3 s");
    assert_eq!(gateway.backend.served_path("/slow/x"), before, "nothing passes unjudged");
    // on_failure: reject_token answers 401, so clients fetch a new token.
    let dead = get("/dead/x", "x-dead", "some-token");
    assert_eq!(dead.status, 401, "{}", dead.text());
    assert!(dead.header("www-authenticate").unwrap().contains("could not check the token"));
    assert!(gateway.envoy.stat("wasmcustom.auth.introspection.failed") >= 2);
}

#[test]
fn an_introspection_provider_with_a_second_key_source_is_refused() {
    let upstream = EchoUpstream::start("backend");
    let config = json!({"providers": [{"name": "p", "jwks": {"keys": []},
        "introspection": {"cluster": "idp", "path": "/introspect", "client_id": "a", "client_secret": "b"}}]});
    assert_config_refused(&upstream, "auth", &config.to_string(), "providers[0]: needs exactly one key source");
    let config = json!({"providers": [{"name": "p",
        "introspection": {"cluster": "idp", "path": "introspect", "client_id": "", "client_secret": "b"}}]});
    assert_config_refused(&upstream, "auth", &config.to_string(), "providers[0].introspection.path");
}

#[test]
fn a_token_no_header_value_may_hold_never_reaches_the_idp_over_http2() {
    let _serial = serial();
    let before = calls();
    let response = gateway_tests::raw::get(
        gateway().envoy.listener,
        b"/orders/1",
        &[(b"authorization", b"Bearer opaque-\xff\xfe-token")],
    )
    .response();
    assert_eq!(response.status, 401, "{}", response.text());
    assert!(response.header("www-authenticate").unwrap().contains("malformed"), "{:?}", response.headers);
    assert_eq!(calls(), before, "nothing was sent to the IdP");
}
