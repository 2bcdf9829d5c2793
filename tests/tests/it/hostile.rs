//! Enforcement that cannot be walked around (issue #11), through real Envoy over
//! HTTP/1.1 and HTTP/2: raw request bytes are never replaced by a default, nothing
//! a client, token or config supplies breaks a header, aggregate parameters never
//! become dot segments, the cache key has the scheme.
//!
//! Envoy's HTTP/1.1 codec refuses a non-ASCII `:path` itself; its HTTP/2 codec
//! hands such bytes to the filters, so the hostile requests go out over raw h2c.

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use gateway_tests::client::{Protocol, Response};
use gateway_tests::envoy::{assert_config_refused, Envoy, EnvoyConfig, Routes, WasmFilter};
use gateway_tests::raw;
use gateway_tests::tokens::{fixture, now};
use gateway_tests::upstream::EchoUpstream;
use gateway_tests::wait_until;
use jsonwebtoken::{Algorithm, Header};
use serde_json::{json, Value};

const CLUSTER_HEADER: &str = "x-gateway-cluster";

fn jwks() -> Value {
    serde_json::from_str(&fixture("jwks.json")).unwrap()
}

fn hs256(header: Header, claims: &Value) -> String {
    gateway_tests::tokens::sign_with_header(&header, claims)
}

fn hs_header() -> Header {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("hs-1".into());
    header
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iat": now() - 5, "exp": now() + 600})
}

fn is_problem(response: &Response, status: u16) -> bool {
    response.status == status && response.header("content-type").as_deref() == Some("application/problem+json")
}

/// Every header of a response is a valid field value (no CR/LF/NUL/DEL split).
fn assert_headers_clean(response: &Response) {
    for (name, value) in &response.headers {
        assert!(
            value.iter().all(|b| (0x20..=0x7e).contains(b) || *b == b'\t'),
            "header {name} carries control or non-ASCII bytes: {value:?}"
        );
    }
}

struct Chain {
    envoy: Envoy,
    users: EchoUpstream,
    _orders: EchoUpstream,
}

/// The demo's chain, ratelimit -> auth -> aggregate -> routing -> cache, trusting
/// one proxy hop (so a test can say which scheme a client used).
fn chain() -> &'static Chain {
    static CHAIN: OnceLock<Chain> = OnceLock::new();
    CHAIN.get_or_init(|| {
        let users = EchoUpstream::start("users");
        let orders = EchoUpstream::start("orders");
        let ratelimit = json!({"slots": 256, "rules": [
            {"name": "limited", "match": {"path": {"prefix": "/limited"}}, "key": [{"client_ip": true}],
             "limits": [{"name": "l", "requests": 2, "per_seconds": 600}]}
        ]});
        let auth = json!({
            "providers": [{"name": "idp", "jwks": jwks(),
                           "from": [{"header": "authorization", "prefix": "Bearer "}, {"query": "access_token"}]}],
            "rules": [
                {"name": "ops", "match": {"path": {"prefix": "/ops"}}, "require": {"any": ["idp"]}},
                {"name": "everything-else", "allow_anonymous": true}
            ]
        });
        let aggregate = json!({"endpoints": [
            {"name": "dashboard", "path": "/dashboard/{userId}", "parts": [
                {"name": "user", "cluster": "users", "path": "/users/{userId}", "key": "user"},
                {"name": "orders", "cluster": "orders", "path": "/orders?user={userId}", "key": "orders", "required": false}
            ]},
            {"name": "broken", "path": "/broken", "parts": [
                {"name": "ghost", "cluster": "no-such-cluster", "path": "/x", "key": "ghost", "required": false}
            ]}
        ]});
        let routing = json!({"default_cluster": "users", "routes": [
            {"name": "old", "match": {"path": {"prefix": "/old/"}}, "cluster": "users", "rewrite": {"prefix": "/new/"}}
        ]});
        let config = EnvoyConfig::new(&users)
            .cluster(&orders)
            .routes(Routes::ClusterHeader(CLUSTER_HEADER.into()))
            .xff_trusted_hops(1)
            .filter(WasmFilter::new("ratelimit", ratelimit))
            .filter(WasmFilter::new("auth", auth))
            .filter(WasmFilter::new("aggregate", aggregate))
            .filter(WasmFilter::new("routing", routing))
            .filter(WasmFilter::new("cache", json!({})));
        Chain { envoy: Envoy::start(&config), users, _orders: orders }
    })
}

fn h2_get(envoy: &Envoy, path: &[u8], extra: &[(&[u8], &[u8])]) -> Response {
    raw::get(envoy.listener, path, extra).response()
}

#[test]
fn every_module_answers_400_to_a_target_that_is_not_ascii() {
    let users = EchoUpstream::start("users");
    let modules = [
        ("routing", json!({"default_cluster": "users"})),
        (
            "ratelimit",
            json!({"rules": [{"name": "r", "key": [{"path": true}], "limits": [{"name": "l", "requests": 1000, "per_seconds": 1}]}]}),
        ),
        ("auth", json!({"rules": [{"name": "all", "allow_anonymous": true}]})),
        ("cache", json!({})),
        (
            "aggregate",
            json!({"endpoints": [{"name": "d", "path": "/d/{id}", "parts": [{"name": "p", "cluster": "users", "path": "/users/{id}"}]}]}),
        ),
    ];
    for (module, config) in modules {
        let envoy = Envoy::start(&EnvoyConfig::new(&users).filter(WasmFilter::new(module, config)));
        let served = users.served();
        for path in [&b"/x/\xff"[..], b"/\xfe\xff", b"/d/\xff", b"/?q=\xff"] {
            let response = h2_get(&envoy, path, &[]);
            assert!(is_problem(&response, 400), "{module} {path:?}: {} {}", response.status, response.text());
            assert_eq!(response.json()["type"], "urn:wasm-gateway:problem:bad-request", "{module}");
        }
        assert_eq!(users.served(), served, "{module}: a request it cannot judge reached the backend");
        // Envoy's HTTP/1.1 codec refuses the same bytes before any module runs.
        let status = raw::http1_status(envoy.listener, b"GET /x/\xff HTTP/1.1\r\nhost: a\r\n\r\n");
        assert_eq!(status, 400, "{module} over HTTP/1.1");
        // Percent-encoded bytes are ASCII: judged, and forwarded.
        assert_eq!(h2_get(&envoy, b"/x/%FF", &[]).status, 200, "{module}");
        assert_eq!(envoy.get("/x/%FF").send().status, 200, "{module}");
    }
}

#[test]
fn a_path_that_is_not_utf8_never_poisons_the_cache() {
    let fx = chain();
    let _log = fx.envoy.log_on_failure();
    let cacheable: (&[u8], &[u8]) = (b"x-echo-header", b"cache-control: max-age=600");
    let home = h2_get(&fx.envoy, b"/home", &[cacheable]);
    assert_eq!(home.status, 200);
    assert_eq!(home.echo().path(), "/home");
    // The attack: a no-cache request for a non-UTF-8 path that used to be keyed as `/`-like.
    let attack = h2_get(&fx.envoy, b"/home\xffPOISON", &[cacheable, (b"cache-control", b"no-cache")]);
    assert!(is_problem(&attack, 400), "{} {}", attack.status, attack.text());
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let mut request = fx.envoy.get("/home");
        if protocol == Protocol::Http2 {
            request = request.http2();
        }
        let visitor = request.send();
        assert_eq!(visitor.status, 200);
        assert_eq!(visitor.echo().path(), "/home", "{protocol:?}: the stored page is the real one");
    }
}

#[test]
fn a_path_that_is_not_utf8_walks_around_no_auth_rule_and_no_rate_limit() {
    let fx = chain();
    let _log = fx.envoy.log_on_failure();
    for path in [&b"/ops/\xfe\xff"[..], b"/ops/\xff", b"/limited/\xfe", b"/limited/\xff"] {
        for _ in 0..3 {
            let response = h2_get(&fx.envoy, path, &[]);
            assert!(is_problem(&response, 400), "{path:?}: {} {}", response.status, response.text());
        }
    }
    // The same rules still apply to ASCII paths.
    assert_eq!(fx.envoy.get("/ops/%FE%FF").send().status, 401);
    assert_eq!(fx.envoy.get("/ops/").http2().send().status, 401);
    let statuses: Vec<u16> = (0..3).map(|_| fx.envoy.get("/limited/x").send().status).collect();
    assert_eq!(statuses, vec![200, 200, 429]);
}

#[test]
fn vary_selectors_keep_bytes_that_are_not_utf8_apart() {
    let fx = chain();
    let _log = fx.envoy.log_on_failure();
    for (protocol, path) in [(Protocol::Http1, "/vary-h1"), (Protocol::Http2, "/vary-h2")] {
        let send = |token: &[u8]| {
            let mut request = fx
                .envoy
                .get(path)
                .header("x-echo-header", "cache-control: max-age=600")
                .header("x-echo-header", "vary: x-token")
                .header("x-token", token);
            if protocol == Protocol::Http2 {
                request = request.http2();
            }
            request.send()
        };
        let ff = send(b"\xff");
        assert_eq!(ff.status, 200);
        assert!(send(b"\xff").header("cache-status").unwrap_or_default().contains("hit"), "{protocol:?}");
        let fe = send(b"\xfe");
        let status = fe.header("cache-status").unwrap_or_default();
        assert!(!status.contains("hit"), "{protocol:?}: x-token \\xfe got the \\xff variant: {status}");
        assert_eq!(fx.users.served_path(path), 2, "{protocol:?}");
    }
}

#[test]
fn the_cache_key_has_the_scheme() {
    let fx = chain();
    let _log = fx.envoy.log_on_failure();
    let send = |proto: &str| {
        fx.envoy
            .get("/scheme-page")
            .header("x-forwarded-proto", proto)
            .header("x-echo-header", "cache-control: max-age=600")
            .send()
    };
    assert_eq!(send("http").status, 200);
    assert!(send("http").header("cache-status").unwrap_or_default().contains("hit"));
    let https = send("https");
    assert!(!https.header("cache-status").unwrap_or_default().contains("hit"), "an http entry served to https");
    assert_eq!(fx.users.served_path("/scheme-page"), 2);
}

#[test]
fn token_text_never_splits_the_401() {
    let fx = chain();
    let _log = fx.envoy.log_on_failure();
    let mut kid_header = hs_header();
    kid_header.kid = Some("x\"\r\nset-cookie: pwned=1\r\n\r\nHTTP/1.1 200 OK\u{0}\u{7f}é".into());
    let by_kid = hs256(kid_header, &claims("mallory"));
    let by_alg = format!(
        "{}.{}.c2ln",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256\r\nset-cookie: pwned=2","kid":"hs-1"}"#),
        URL_SAFE_NO_PAD.encode(claims("mallory").to_string())
    );
    for token in [by_kid.clone(), by_alg] {
        for protocol in [Protocol::Http1, Protocol::Http2] {
            let path = format!("/ops/x?access_token={token}");
            let mut request = fx.envoy.get("/ops/x").header("authorization", format!("Bearer {token}"));
            if protocol == Protocol::Http2 {
                request = request.http2();
            }
            for response in [request.send(), fx.envoy.get(&path).send()] {
                assert!(is_problem(&response, 401), "{protocol:?}: {} {}", response.status, response.text());
                assert!(response.header("set-cookie").is_none(), "{protocol:?}: the token set a cookie");
                assert_headers_clean(&response);
                let challenge = response.header("www-authenticate").unwrap_or_default();
                assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
            }
        }
    }
}

#[test]
fn token_text_never_breaks_grpc_message() {
    let fx = chain();
    let _log = fx.envoy.log_on_failure();
    let mut kid_header = hs_header();
    kid_header.kid = Some("x\r\nset-cookie: pwned=1\u{0}é%".into());
    let token = hs256(kid_header, &claims("mallory"));
    let response = fx
        .envoy
        .request("POST", "/ops/svc.Method")
        .http2()
        .header("content-type", "application/grpc")
        .header("authorization", format!("Bearer {token}"))
        .send();
    assert_eq!(response.header("grpc-status").as_deref(), Some("16"), "{:?}", response.headers);
    assert_headers_clean(&response);
    let message = response.header("grpc-message").unwrap_or_default();
    assert!(message.contains("%0D%0Aset-cookie"), "grpc-message is percent-encoded: {message}");
    assert!(response.header("set-cookie").is_none());
}

#[test]
fn a_signed_sub_with_control_bytes_is_skipped_never_a_503() {
    let fx = chain();
    let _log = fx.envoy.log_on_failure();
    let skipped_before = fx.envoy.stat("wasmcustom.auth.header_values_skipped");
    let token = hs256(hs_header(), &claims("bob\u{1}x\r\ny"));
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let mut request = fx.envoy.get("/ops/sub").header("authorization", format!("Bearer {token}"));
        if protocol == Protocol::Http2 {
            request = request.http2();
        }
        let response = request.send();
        assert_eq!(response.status, 200, "{protocol:?}: {}", response.text());
        assert!(response.echo().header("x-consumer").is_none(), "a consumer that is no header value is left out");
    }
    assert!(wait_until(std::time::Duration::from_secs(5), || {
        fx.envoy.stat("wasmcustom.auth.header_values_skipped") >= skipped_before + 2
    }));
    // A clean subject still arrives.
    let token = hs256(hs_header(), &claims("bob"));
    let response = fx.envoy.get("/ops/sub").header("authorization", format!("Bearer {token}")).send();
    assert_eq!(response.echo().header("x-consumer"), Some("bob"));
}

#[test]
fn aggregate_parameters_never_become_dot_segments_and_keep_their_plus() {
    let fx = chain();
    let _log = fx.envoy.log_on_failure();
    for dots in ["..", ".", "%2e%2e", "%2E%2E", "%2E", ".%2e"] {
        let path = format!("/dashboard/{dots}");
        for protocol in [Protocol::Http1, Protocol::Http2] {
            let mut request = fx.envoy.get(&path);
            if protocol == Protocol::Http2 {
                request = request.http2();
            }
            let response = request.send();
            assert!(is_problem(&response, 400), "{path} {protocol:?}: {} {}", response.status, response.text());
            assert_eq!(response.json()["type"], "urn:wasm-gateway:problem:bad-path-parameter");
        }
    }
    for climbed in ["/users/%2E%2E", "/users/%2E", "/users/..", "/users/.", "/users", "/users/"] {
        assert_eq!(fx.users.served_path(climbed), 0, "a dot segment reached a part as {climbed}");
    }
    let response = fx.envoy.get("/dashboard/john+tag@x.com").send();
    assert_eq!(response.status, 200, "{}", response.text());
    let user_path = response.json()["user"]["path"].as_str().unwrap_or_default().to_string();
    let decoded = gateway_common::request::percent_decode_path(user_path.as_bytes());
    assert_eq!(String::from_utf8_lossy(&decoded), "/users/john+tag@x.com", "{user_path}");
}

#[test]
fn a_missing_aggregate_cluster_is_logged_once_per_worker() {
    let fx = chain();
    let _log = fx.envoy.log_on_failure();
    for _ in 0..8 {
        assert_eq!(fx.envoy.get("/broken").send().status, 200);
    }
    let count = || fx.envoy.log().matches("cannot call cluster `no-such-cluster`").count();
    assert!(wait_until(std::time::Duration::from_secs(5), || count() >= 1));
    assert!(count() <= 2, "logged {} times for 8 requests over 2 workers", count());
}

#[test]
fn a_prefix_rewrite_keeps_the_rest_of_the_path_byte_for_byte() {
    let fx = chain();
    for (path, expected) in [("/old//x", "/new//x"), ("/old/a%2Fb?q=1", "/new/a%2Fb")] {
        let response = fx.envoy.get(path).send();
        assert_eq!(response.status, 200);
        assert_eq!(response.echo().path(), expected, "{path}");
    }
}

#[test]
fn config_values_that_would_break_a_header_are_refused_at_load() {
    let upstream = EchoUpstream::start("users");
    let cases = [
        ("routing", r#"[]"#, "(configuration)"),
        (
            "routing",
            r#"{"routes":[{"name":"a","cluster":"c","request_headers":{"set":{"x-a":"1\r\nx-b: 2"}}}]}"#,
            "routes[0].request_headers.set.x-a",
        ),
        (
            "routing",
            r#"{"routes":[{"name":"a","cluster":"c","response_headers":{"add":{"x-a":"v\r\nset-cookie: a=b"}}}]}"#,
            "routes[0].response_headers.add.x-a",
        ),
        ("auth", r#"{"realm":"gw\r\nx: y"}"#, "realm"),
        (
            "auth",
            r#"{"api_keys":{"keys":[{"consumer":"acme\r\n","sha256":"0000000000000000000000000000000000000000000000000000000000000000"}]}}"#,
            "api_keys.keys[0].consumer",
        ),
        (
            "auth",
            r#"{"providers":[{"name":"idp","remote_jwks":{"cluster":"c","path":"/jwks\r\nx: y"}}]}"#,
            "providers[0].remote_jwks.path",
        ),
        (
            "auth",
            r#"{"providers":[{"name":"idp","remote_jwks":{"cluster":"c","path":"/jwks","authority":"a\u0000b"}}]}"#,
            "providers[0].remote_jwks.authority",
        ),
        (
            "aggregate",
            r#"{"endpoints":[{"name":"d","path":"/d","parts":[{"name":"p","cluster":"users","authority":"a\r\nb","path":"/x"}]}]}"#,
            "endpoints[0].parts[0].authority",
        ),
        (
            "aggregate",
            r#"{"endpoints":[{"name":"d","path":"/d","parts":[{"name":"p","cluster":"users","path":"/x y"}]}]}"#,
            "endpoints[0].parts[0].path",
        ),
        ("ratelimit", r#"[]"#, "(configuration)"),
        ("cache", r#"[1]"#, "(configuration)"),
    ];
    for (module, config, field) in cases {
        assert_config_refused(&upstream, module, config, field);
    }
}

#[test]
fn a_key_leaving_the_overflow_bucket_never_starts_full() {
    // One slot: key A holds it, key B is counted in the overflow bucket; when A's
    // bucket is full again B moves into the slot and must keep its history.
    let users = EchoUpstream::start("users");
    let config = json!({"slots": 1, "rules": [{"name": "r", "key": [{"header": "x-k"}],
        "limits": [{"name": "l", "requests": 3, "per_seconds": 3}]}]});
    let envoy = Envoy::start(&EnvoyConfig::new(&users).filter(WasmFilter::new("ratelimit", config)));
    let _log = envoy.log_on_failure();
    let send = |key: &str| envoy.get("/").header("x-k", key).send().status;
    let start = std::time::Instant::now();
    assert_eq!(send("a"), 200);
    let mut admitted_b = (0..3).filter(|_| send("b") == 200).count();
    assert_eq!(admitted_b, 3, "b's burst from the overflow bucket");
    // A's slot is idle one interval (1 s) after its single request.
    std::thread::sleep(std::time::Duration::from_millis(1_150).saturating_sub(start.elapsed()));
    admitted_b += (0..3).filter(|_| send("b") == 200).count();
    let elapsed = start.elapsed().as_secs_f64();
    // At most burst + elapsed x rate (1 per second).
    let allowed = 3 + elapsed.floor() as usize;
    // Past 3 s the old bug (a full bucket: 6 in total) would fit the allowance too.
    assert!(elapsed < 3.0, "the test ran too slowly to judge ({elapsed:.2} s)");
    assert!(admitted_b <= allowed, "b got {admitted_b} requests through in {elapsed:.2} s, at most {allowed}");
}
