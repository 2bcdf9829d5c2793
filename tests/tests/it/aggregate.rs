//! aggregate.wasm through real Envoy: echo upstreams as the parts (each answers
//! with a JSON description of the call it received), scripted per path.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gateway_tests::envoy::{assert_config_refused, Envoy, EnvoyConfig, WasmFilter};
use gateway_tests::upstream::{EchoUpstream, Reply};
use gateway_tests::wait_until;
use serde_json::{json, Value};

struct Fixture {
    envoy: Envoy,
    users: EchoUpstream,
    orders: EchoUpstream,
    flags: EchoUpstream,
}

fn config() -> Value {
    json!({"endpoints": [
        {"name": "dashboard", "path": "/dashboard/{userId}", "parts": [
            {"name": "user", "cluster": "users", "path": "/users/{userId}", "key": "user",
             "forward_headers": ["x-user-id"], "fields": ["upstream", "path", "headers"]},
            {"name": "orders", "cluster": "orders", "path": "/orders/{userId}?page={query.page}", "key": "orders",
             "required": false, "timeout_ms": 500},
            {"name": "flags", "cluster": "flags", "path": "/flags/{userId}", "required": false, "fields": ["method"]}
        ]},
        {"name": "nulls", "path": "/nulls/{id}", "missing": "null", "parts": [
            {"name": "user", "cluster": "users", "path": "/users/{id}", "key": "user"},
            {"name": "orders", "cluster": "orders", "path": "/orders/{id}", "key": "orders", "required": false}
        ]},
        {"name": "strict", "path": "/strict/{id}", "parts": [
            {"name": "user", "cluster": "users", "path": "/users/{id}", "key": "user", "timeout_ms": 300, "max_bytes": 2048},
            {"name": "ghost", "cluster": "no-such-cluster", "path": "/x", "key": "ghost", "required": false}
        ]},
        {"name": "broken", "path": "/broken", "parts": [
            {"name": "ghost", "cluster": "no-such-cluster", "path": "/x", "key": "ghost"}
        ]}
    ]})
}

fn shared() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let users = EchoUpstream::start("users");
        let orders = EchoUpstream::start("orders");
        let flags = EchoUpstream::start("flags");
        let envoy = Envoy::start(
            &EnvoyConfig::new(&users).cluster(&orders).cluster(&flags).filter(WasmFilter::new("aggregate", config())),
        );
        Fixture { envoy, users, orders, flags }
    })
}

#[test]
fn parts_run_in_parallel_and_merge_into_one_document() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    for (upstream, path) in [(&fx.users, "/users/u7"), (&fx.orders, "/orders/u7"), (&fx.flags, "/flags/u7")] {
        upstream.script(
            path,
            Reply::status(200).header("cache-control", "max-age=60").delay(Duration::from_millis(300)).body(
                json!({"upstream": upstream.name(), "path": path, "method": "GET", "headers": {}, "extra": 1})
                    .to_string(),
            ),
        );
    }
    let started = Instant::now();
    let response = fx.envoy.get("/dashboard/u7?page=2").header("x-user-id", "u7").header("x-secret", "s").send();
    let elapsed = started.elapsed();
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(elapsed < Duration::from_millis(800), "three 300 ms parts took {elapsed:?}: not parallel");
    assert_eq!(response.header("content-type").as_deref(), Some("application/json"));
    assert_eq!(response.header("content-length").unwrap().parse::<usize>().unwrap(), response.body.len());
    let document = response.json();
    assert_eq!(document["user"]["upstream"], "users", "{document}");
    assert!(document["user"].get("extra").is_none(), "field selection keeps only the listed fields");
    assert_eq!(document["orders"]["upstream"], "orders");
    assert_eq!(document["method"], "GET", "a part without key is merged at the root");
    assert!(document.get("_partial").is_none());
    assert_eq!(response.header("cache-control").as_deref(), Some("private, max-age=60"), "x-user-id was forwarded");
}

#[test]
fn headers_are_forwarded_only_as_configured_and_parameters_are_encoded() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let response = fx
        .envoy
        .get("/dashboard/..%2Fadmin%3Fx?page=1%262")
        .header("x-user-id", "alice")
        .header("x-secret", "s")
        .send();
    assert_eq!(response.status, 200, "{}", response.text());
    let user = &response.json()["user"];
    assert_eq!(user["path"], "/users/%2E%2E%2Fadmin%3Fx", "no traversal into other backend routes");
    assert_eq!(user["headers"]["x-user-id"][0], "alice");
    assert!(user["headers"].get("x-secret").is_none(), "unlisted headers are not forwarded");
    assert_eq!(fx.users.served_path("/admin"), 0);
    let orders = &response.json()["orders"];
    assert_eq!(orders["path"], "/orders/%2E%2E%2Fadmin%3Fx");
    assert_eq!(orders["query"], "page=1%262", "query values are encoded too");
}

#[test]
fn optional_failures_are_reported_and_required_failures_fail_the_request() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    fx.orders.script("/orders/o1", Reply::status(500).body("boom"));
    fx.users.script("/users/o1", Reply::status(200).header("cache-control", "max-age=60").body(r#"{"id":"o1"}"#));
    let partial = fx.envoy.get("/nulls/o1").send();
    assert_eq!(partial.status, 200, "{}", partial.text());
    assert_eq!(partial.header("x-aggregate-partial").as_deref(), Some("orders"));
    let document = partial.json();
    assert_eq!(document["orders"], Value::Null, "missing: null");
    assert_eq!(document["_partial"], json!(["orders"]));
    assert_eq!(partial.header("cache-control").as_deref(), Some("no-store"), "partial answers are not cacheable");

    // Optional timeout: omitted (default), named in the header.
    fx.orders.script("/orders/t1", Reply::status(200).body("{}").delay(Duration::from_millis(900)));
    let slow = fx.envoy.get("/dashboard/t1").send();
    assert_eq!(slow.status, 200);
    assert!(slow.json().get("orders").is_none());
    assert_eq!(slow.header("x-aggregate-partial").as_deref(), Some("orders"));
    fx.orders.unscript("/orders/t1");

    // Required part: error -> 502, timeout -> 504, non-JSON and oversized -> 502.
    fx.users.script("/users/e1", Reply::status(503));
    let error = fx.envoy.get("/strict/e1").send();
    assert_eq!(error.status, 502);
    assert_eq!(error.header("content-type").as_deref(), Some("application/problem+json"));
    assert!(error.json()["detail"].as_str().unwrap().contains("`user`"));
    fx.users.script("/users/t1", Reply::status(200).body("{}").delay(Duration::from_millis(800)));
    assert_eq!(fx.envoy.get("/strict/t1").send().status, 504);
    fx.users.script("/users/h1", Reply::status(200).body("<html>not json</html>"));
    assert_eq!(fx.envoy.get("/strict/h1").send().status, 502);
    fx.users.script("/users/b1", Reply::status(200).body(format!("{{\"pad\":\"{}\"}}", "x".repeat(5000))));
    let big = fx.envoy.get("/strict/b1").send();
    assert_eq!(big.status, 502);
    assert!(big.json()["detail"].as_str().unwrap().contains("larger than 2048"));
    assert!(wait_until(Duration::from_secs(5), || fx.envoy.stat("wasmcustom.aggregate.parts.timeout") >= 2));
    assert!(fx.envoy.stat("wasmcustom.aggregate.partial_responses") >= 2);
}

#[test]
fn a_missing_cluster_fails_like_a_failed_part() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    fx.users.script("/users/m1", Reply::status(200).header("cache-control", "max-age=5").body(r#"{"id":1}"#));
    let optional = fx.envoy.get("/strict/m1").send();
    assert_eq!(optional.status, 200);
    assert_eq!(optional.header("x-aggregate-partial").as_deref(), Some("ghost"));
    let required = fx.envoy.get("/broken").send();
    assert_eq!(required.status, 502);
    assert!(wait_until(Duration::from_secs(5), || fx.envoy.log().contains("cannot call cluster `no-such-cluster`")));
}

#[test]
fn other_requests_pass_through_untouched() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let response = fx.envoy.get("/users/plain").send();
    assert_eq!(response.echo().upstream(), "users");
    assert_eq!(response.echo().path(), "/users/plain");
    assert_eq!(fx.envoy.request("POST", "/dashboard/u1").send().echo().method(), "POST", "other methods pass through");
    assert_eq!(fx.envoy.get("/dashboard/u1/extra").send().echo().path(), "/dashboard/u1/extra");
}

#[test]
fn invalid_configuration_is_refused_with_the_field_named() {
    let upstream = EchoUpstream::start("users");
    for (config, field) in [
        (
            json!({"endpoints": [{"name": "d", "path": "/d/{id}", "parts": [{"name": "p", "cluster": "users", "path": "/u/{userId}"}]}]}),
            "endpoints[0].parts[0].path",
        ),
        (
            json!({"endpoints": [{"name": "d", "path": "/d", "parts": [
            {"name": "a", "cluster": "users", "path": "/a", "key": "k"}, {"name": "b", "cluster": "users", "path": "/b", "key": "k"}]}]}),
            "endpoints[0].parts[1].key",
        ),
        (
            json!({"endpoints": [{"name": "d", "path": "/d", "parts": [{"name": "a", "cluster": "users", "path": "/a", "timeout": 1}]}]}),
            "unknown field `timeout`",
        ),
    ] {
        assert_config_refused(&upstream, "aggregate", &config.to_string(), field);
    }
}
