//! CORS in routing.wasm (issue 17 item 2) behind auth.wasm, through real Envoy:
//! preflights are answered by the gateway (auth lets them pass without
//! credentials, the backend never sees them); actual answers carry the policy's
//! fields, or none for an origin outside it, whatever the backend sent.

use std::sync::OnceLock;

use gateway_tests::client::Response;
use gateway_tests::envoy::{Envoy, EnvoyConfig, Routes, WasmFilter};
use gateway_tests::raw;
use gateway_tests::upstream::EchoUpstream;
use serde_json::json;

const CLUSTER_HEADER: &str = "x-gateway-cluster";
const APP: &str = "https://app.example.com";
/// sha256("test") is the fixture key's digest.
const API_KEY: &str = "test";

struct Gateway {
    envoy: Envoy,
    backend: EchoUpstream,
}

fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        let backend = EchoUpstream::start("backend");
        let auth = json!({
            "api_keys": {"from": [{"header": "x-api-key"}],
                         "keys": [{"consumer": "shop", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}]},
            "rules": [{"name": "public", "match": {"path": {"prefix": "/public"}}, "allow_anonymous": true},
                      {"name": "everything-else", "require": {"any": ["api_key"]}}]});
        let routing = json!({
            "cluster_header": CLUSTER_HEADER,
            "cors": {"allow_origins": [APP], "allow_origin_suffixes": [".example.org"],
                     "allow_methods": ["PUT", "DELETE"], "allow_headers": ["content-type", "x-api-key"],
                     "expose_headers": ["x-upstream"], "allow_credentials": true, "max_age_seconds": 600},
            "routes": [
                {"name": "public", "match": {"path": {"prefix": "/public"}}, "cluster": "backend",
                 "cors": {"allow_origins": ["*"]}},
                {"name": "things-put", "match": {"path": {"prefix": "/things"}, "methods": ["PUT"]}, "cluster": "backend",
                 "cors": {"allow_origins": ["https://things.example.com"], "allow_methods": ["PUT"]}},
                {"name": "orders", "match": {"path": {"prefix": "/orders"}}, "cluster": "backend"}]});
        let config = EnvoyConfig::new(&backend)
            .routes(Routes::ClusterHeader(CLUSTER_HEADER.into()))
            .filter(WasmFilter::new("auth", auth))
            .filter(WasmFilter::new("routing", routing));
        Gateway { envoy: Envoy::start(&config), backend }
    })
}

fn preflight(path: &str, origin: &str, method: &str, headers: Option<&str>) -> Response {
    let mut request = gateway()
        .envoy
        .request("OPTIONS", path)
        .header("origin", origin)
        .header("access-control-request-method", method);
    if let Some(headers) = headers {
        request = request.header("access-control-request-headers", headers);
    }
    request.send()
}

fn cors_fields(response: &Response) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = response
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with("access-control-"))
        .map(|(name, value)| (name.clone(), String::from_utf8_lossy(value).into_owned()))
        .collect();
    fields.sort();
    fields
}

fn varies_on_origin(response: &Response) -> bool {
    response.header_all("vary").iter().any(|value| value.split(',').any(|token| token.trim() == "origin"))
}

#[test]
fn an_allowed_preflight_is_answered_by_the_gateway_without_credentials() {
    let gateway = gateway();
    let before = gateway.backend.served_path("/orders/7");
    let response = preflight("/orders/7", APP, "PUT", Some("Content-Type, X-Api-Key"));
    assert_eq!(response.status, 204, "{}", response.text());
    assert_eq!(
        cors_fields(&response),
        vec![
            ("access-control-allow-credentials".into(), "true".into()),
            ("access-control-allow-headers".into(), "content-type, x-api-key".into()),
            ("access-control-allow-methods".into(), "GET, HEAD, POST, PUT, DELETE".into()),
            ("access-control-allow-origin".into(), APP.into()),
            ("access-control-max-age".into(), "600".into()),
        ]
    );
    assert!(varies_on_origin(&response));
    assert_eq!(gateway.backend.served_path("/orders/7"), before, "a preflight never reaches the backend");
}

#[test]
fn preflights_outside_the_policy_get_403_and_no_cors_fields() {
    let gateway = gateway();
    for (origin, method, headers, reason) in [
        ("https://evil.test", "GET", None, "origin"),
        ("https://app.example.com.evil.test", "GET", None, "origin"),
        (APP, "PATCH", None, "PATCH"),
        (APP, "PUT", Some("content-type, x-admin"), "x-admin"),
    ] {
        let response = preflight("/orders/refused", origin, method, headers);
        assert_eq!(response.status, 403, "{origin} {method}");
        assert_eq!(response.header("content-type").as_deref(), Some("application/problem+json"));
        assert!(response.json()["detail"].as_str().unwrap().contains(reason), "{}", response.text());
        assert!(cors_fields(&response).is_empty(), "{origin}: {:?}", cors_fields(&response));
    }
    assert_eq!(gateway.backend.served_path("/orders/refused"), 0, "a preflight never reaches the backend");
}

#[test]
fn a_preflight_is_judged_as_the_request_it_announces() {
    // Only the PUT route's own policy admits things.example.com.
    let put = preflight("/things/1", "https://things.example.com", "PUT", None);
    assert_eq!(put.status, 204, "{}", put.text());
    assert_eq!(put.header("access-control-allow-methods").as_deref(), Some("GET, HEAD, POST, PUT"));
    assert_eq!(put.header("access-control-allow-credentials"), None);
    let delete = preflight("/things/1", "https://things.example.com", "DELETE", None);
    assert_eq!(delete.status, 403, "a DELETE is judged by the top-level policy");
}

#[test]
fn actual_answers_carry_the_policy_and_only_for_allowed_origins() {
    let gateway = gateway();
    let allowed =
        gateway.envoy.get("/orders").header("x-api-key", API_KEY).header("origin", "https://shop.example.org").send();
    assert_eq!(allowed.status, 200);
    assert_eq!(
        cors_fields(&allowed),
        vec![
            ("access-control-allow-credentials".into(), "true".into()),
            ("access-control-allow-origin".into(), "https://shop.example.org".into()),
            ("access-control-expose-headers".into(), "x-upstream".into()),
        ]
    );
    assert!(varies_on_origin(&allowed));
    // The backend's own wildcard never reaches an origin outside the policy.
    for origin in [Some("https://evil.test"), None] {
        let mut request = gateway
            .envoy
            .get("/orders")
            .header("x-api-key", API_KEY)
            .header("x-echo-header", "access-control-allow-origin: *")
            .header("x-echo-header", "access-control-allow-credentials: true");
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let response = request.send();
        assert_eq!(response.status, 200);
        assert!(cors_fields(&response).is_empty(), "{origin:?}: {:?}", cors_fields(&response));
        assert!(varies_on_origin(&response), "{origin:?}");
    }
    // A public route: any origin, no credentials.
    let public = gateway.envoy.get("/public/catalogue").header("origin", "https://anyone.test").send();
    assert_eq!(cors_fields(&public), vec![("access-control-allow-origin".into(), "*".into())]);
    // Routing's own answers carry them too (a page can read its 404).
    let missing = gateway.envoy.get("/nowhere").header("x-api-key", API_KEY).header("origin", APP).send();
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("access-control-allow-origin").as_deref(), Some(APP));
    let metrics = gateway.envoy.stats();
    assert!(metrics.get("wasmcustom.routing.cors.origin_refused").copied().unwrap_or_default() >= 1, "{metrics:?}");
}

#[test]
fn origins_that_are_no_origin_are_never_echoed_over_http2() {
    let gateway = gateway();
    for origin in [&b"https://\xff.example.org"[..], b"https://shop.example.org/path", b"HTTPS://shop.example.org"] {
        let response =
            raw::get(gateway.envoy.listener, b"/orders", &[(b"x-api-key", b"test"), (b"origin", origin)]).response();
        assert_eq!(response.status, 200, "{}", response.text());
        assert!(cors_fields(&response).is_empty(), "{origin:?}: {:?}", cors_fields(&response));
    }
}

#[test]
fn preflights_with_bytes_no_method_or_header_name_holds_are_refused_over_http2() {
    let gateway = gateway();
    for (method, requested) in [(&b"PU\xffT"[..], &b"content-type"[..]), (b"PUT", b"content-type, x-\xff\xfe")] {
        let headers: [(&[u8], &[u8]); 7] = [
            (b":method", b"OPTIONS"),
            (b":scheme", b"http"),
            (b":authority", b"gateway.test"),
            (b":path", b"/orders/raw-preflight"),
            (b"origin", APP.as_bytes()),
            (b"access-control-request-method", method),
            (b"access-control-request-headers", requested),
        ];
        let response = raw::send(gateway.envoy.listener, &headers, b"").response();
        assert_eq!(response.status, 403, "{}", response.text());
        assert!(cors_fields(&response).is_empty(), "{:?}", cors_fields(&response));
        // The refused name is named escaped, never as raw bytes.
        let detail = response.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains("%FF"), "{detail}");
    }
    assert_eq!(gateway.backend.served_path("/orders/raw-preflight"), 0);
}
