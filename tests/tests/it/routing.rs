//! routing.wasm through real Envoy: four echo upstreams as clusters, Envoy's
//! route taking the cluster from the header the module writes.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use gateway_tests::client::send_all;
use gateway_tests::envoy::{assert_config_refused, Envoy, EnvoyConfig, Routes, WasmFilter};
use gateway_tests::upstream::EchoUpstream;
use gateway_tests::wait_until;
use serde_json::{json, Value};

const CLUSTER_HEADER: &str = "x-gateway-cluster";

struct Fixture {
    envoy: Envoy,
    upstreams: Vec<EchoUpstream>,
}

fn start(config: Value, concurrency: u32) -> Fixture {
    let upstreams: Vec<EchoUpstream> =
        ["users", "orders", "orders-v2", "products"].iter().map(|name| EchoUpstream::start(name)).collect();
    let mut envoy_config = EnvoyConfig::new(&upstreams[0])
        .routes(Routes::ClusterHeader(CLUSTER_HEADER.into()))
        .concurrency(concurrency)
        .filter(WasmFilter::new("routing", config));
    for upstream in &upstreams[1..] {
        envoy_config = envoy_config.cluster(upstream);
    }
    Fixture { envoy: Envoy::start(&envoy_config), upstreams }
}

fn routes() -> Value {
    json!({
        "route_name_response_header": "x-gateway-route",
        "routes": [
            {"name": "api-v0-retired", "match": {"path": {"prefix": "/v0"}},
             "direct_response": {"status": 410, "detail": "API v0 was retired"}},
            {"name": "old-docs", "match": {"path": {"exact": "/docs"}},
             "redirect": {"status": 301, "location": "https://docs.example.com/"}},
            {"name": "teapot", "match": {"path": {"exact": "/teapot"}},
             "direct_response": {"status": 418, "body": "short and stout", "content_type": "text/plain"}},
            {"name": "users-rewrite", "match": {"path": {"prefix": "/api/users"}}, "cluster": "users",
             "rewrite": {"prefix": "/users"},
             "request_headers": {"set": {"x-routed-by": "gateway"}, "add": {"x-extra": "1"}, "remove": ["x-internal"]},
             "response_headers": {"add": {"x-served-via": "routing"}, "set": {"cache-control": "no-store"},
                                  "remove": ["x-upstream"]}},
            {"name": "items-regex", "match": {"path": {"regex": "/v1/items/[0-9]+"}}, "cluster": "products",
             "rewrite": {"regex": {"pattern": "^/v1/items/([0-9]+)$", "substitution": "/items/$1"}, "host": "items.internal"}},
            {"name": "search-query", "match": {"path": {"prefix": "/search"}}, "cluster": "products",
             "rewrite": {"prefix": "/find"},
             "query": {"remove": ["debug"], "rename": {"q": "query"}, "set": {"version": "2"}, "add": {"via": "gate way"}}},
            {"name": "users", "match": {"path": {"prefix": "/users"}}, "cluster": "users"},
            {"name": "orders-v2-opt-in",
             "match": {"path": {"prefix": "/orders"},
                       "any": [{"headers": {"x-api-version": {"exact": "2"}}}, {"cookies": {"canary": {"present": true}}}]},
             "cluster": "orders-v2"},
            {"name": "orders-beta-query", "match": {"path": {"prefix": "/orders"}, "query": {"beta": {"one_of": ["1", "true"]}}},
             "cluster": "orders-v2"},
            {"name": "orders-split", "match": {"path": {"prefix": "/orders"}},
             "split": {"clusters": [{"cluster": "orders", "weight": 90}, {"cluster": "orders-v2", "weight": 10}],
                       "sticky": {"header": "x-user-id"}}},
            {"name": "by-host", "match": {"hosts": ["*.example.com"], "path": {"prefix": "/host"}}, "cluster": "products"},
            {"name": "admins", "match": {"path": {"prefix": "/admin"}, "methods": ["GET"],
                                          "all": [{"headers": {"x-user-id": {"present": true}}},
                                                  {"headers": {"x-role": {"exact": "ADMIN", "ignore_case": true}}}]},
             "cluster": "users"},
            {"name": "kind-suffix", "match": {"path": {"prefix": "/kinds"}, "headers": {"x-k": {"suffix": ".json"}}}, "cluster": "users"},
            {"name": "kind-contains", "match": {"path": {"prefix": "/kinds"}, "headers": {"x-k": {"contains": "mid"}}}, "cluster": "orders"},
            {"name": "kind-regex", "match": {"path": {"prefix": "/kinds"}, "headers": {"x-k": {"regex": "v[0-9]+"}}}, "cluster": "products"},
            {"name": "kind-prefix", "match": {"path": {"prefix": "/kinds"}, "headers": {"x-k": {"prefix": "pre"}}}, "cluster": "orders-v2"},
            {"name": "kind-invert", "match": {"path": {"prefix": "/invert"}, "headers": {"x-k": {"exact": "keep", "invert": true}}}, "cluster": "orders"},
            {"name": "kind-absent", "match": {"path": {"prefix": "/absent"}, "headers": {"x-k": {"absent": true}}}, "cluster": "products"}
        ]
    })
}

/// One Envoy shared by the tests below (they only read); it dies with the process.
fn shared() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| start(routes(), 2))
}

fn upstream_of(response: &gateway_tests::client::Response) -> String {
    assert_eq!(response.status, 200, "expected a proxied answer: {}", response.text());
    response.echo().upstream().to_string()
}

#[test]
fn path_method_host_and_header_matchers_pick_the_cluster() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    assert_eq!(upstream_of(&envoy.get("/users/7").send()), "users");
    assert_eq!(upstream_of(&envoy.get("/users").send()), "users");
    assert_eq!(envoy.get("/usersettings").send().status, 404, "prefix is segment-safe");
    assert_eq!(upstream_of(&envoy.get("/orders").header("x-api-version", "2").send()), "orders-v2");
    assert_eq!(upstream_of(&envoy.get("/orders?beta=true").send()), "orders-v2");
    assert!(upstream_of(&envoy.get("/orders?beta=no").header("x-user-id", "u1").send()).starts_with("orders"));
    assert_eq!(upstream_of(&envoy.get("/host/1").authority("api.example.com").send()), "products");
    assert_eq!(envoy.get("/host/1").authority("example.com").send().status, 404, "wildcard needs a subdomain");
    // Each string-matcher kind.
    assert_eq!(upstream_of(&envoy.get("/kinds").header("x-k", "data.json").send()), "users");
    assert_eq!(upstream_of(&envoy.get("/kinds").header("x-k", "a-mid-b").send()), "orders");
    assert_eq!(upstream_of(&envoy.get("/kinds").header("x-k", "v42").send()), "products");
    assert_eq!(envoy.get("/kinds").header("x-k", "xv42").send().status, 404, "regex is anchored");
    assert_eq!(upstream_of(&envoy.get("/kinds").header("x-k", "prefixed").send()), "orders-v2");
    assert_eq!(upstream_of(&envoy.get("/invert").header("x-k", "other").send()), "orders");
    assert_eq!(envoy.get("/invert").header("x-k", "keep").send().status, 404);
    assert_eq!(upstream_of(&envoy.get("/absent").send()), "products");
    assert_eq!(envoy.get("/absent").header("x-k", "1").send().status, 404);
}

#[test]
fn all_and_any_groups_and_methods() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    let admin = |method: &str, user: Option<&str>, role: &str| {
        let mut request = envoy.request(method, "/admin").header("x-role", role);
        if let Some(user) = user {
            request = request.header("x-user-id", user);
        }
        request.send()
    };
    assert_eq!(upstream_of(&admin("GET", Some("alice"), "admin")), "users", "ignore_case");
    assert_eq!(admin("GET", None, "admin").status, 404, "all: x-user-id required");
    assert_eq!(admin("GET", Some("alice"), "user").status, 404, "all: role required");
    assert_eq!(admin("POST", Some("alice"), "admin").status, 404, "method");
    // any: cookie instead of header; HTTP/2 with the cookie in its own crumb.
    let h2 = envoy.get("/orders").http2().header("cookie", "theme=dark").header("cookie", "canary=1").send();
    assert_eq!(upstream_of(&h2), "orders-v2");
}

#[test]
fn first_matching_route_wins() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    // `/api/users` would also match nothing else, but `/users` routes come later:
    // `users-rewrite` must win for /api/users and `orders-v2-opt-in` before the split.
    let response = envoy.get("/orders").header("x-api-version", "2").header("x-user-id", "sticky-v1-user").send();
    assert_eq!(response.header("x-gateway-route").as_deref(), Some("orders-v2-opt-in"));
    let response = envoy.get("/kinds").header("x-k", "v1.json").send();
    assert_eq!(upstream_of(&response), "users", "suffix route precedes the regex route");
    assert_eq!(response.header("x-gateway-route").as_deref(), Some("kind-suffix"));
}

#[test]
fn a_client_cannot_pick_the_cluster() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    let response = envoy.get("/users/1").header(CLUSTER_HEADER, "products").send();
    assert_eq!(upstream_of(&response), "users");
    assert_eq!(response.echo().header(CLUSTER_HEADER), Some("users"), "only the module's value reaches upstream");
    let products_before = fx.upstreams[3].served();
    let response = envoy.get("/nowhere").header(CLUSTER_HEADER, "products").send();
    assert_eq!(response.status, 404, "no route stays no route");
    assert_eq!(fx.upstreams[3].served(), products_before);
}

#[test]
fn rewrites_and_header_edits_reach_the_upstream() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    let response = envoy
        .get("/api/users/7?full=1")
        .header("x-internal", "secret")
        .header("x-routed-by", "client")
        .header("x-echo-header", "cache-control: max-age=60")
        .send();
    let echo = response.echo();
    assert_eq!(echo.upstream(), "users");
    assert_eq!(echo.path(), "/users/7");
    assert_eq!(echo.query(), Some("full=1"));
    assert_eq!(echo.header("x-routed-by"), Some("gateway"));
    assert_eq!(echo.header("x-extra"), Some("1"));
    assert_eq!(echo.header("x-internal"), None);
    assert_eq!(response.header("x-served-via").as_deref(), Some("routing"));
    // Issue 17: `set` replaces the upstream's value, `remove` drops its header.
    assert_eq!(response.header_all("cache-control"), vec!["no-store".to_string()]);
    assert_eq!(response.header("x-upstream"), None, "removed from the upstream's response");
    assert_eq!(response.header("x-gateway-route").as_deref(), Some("users-rewrite"));

    let response = envoy.get("/v1/items/42").send();
    let echo = response.echo();
    assert_eq!((echo.upstream(), echo.path()), ("products", "/items/42"));
    assert_eq!(echo.header("host"), Some("items.internal"));
}

#[test]
fn direct_answers_redirects_and_404() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    let gone = envoy.get("/v0/users").send();
    assert_eq!(gone.status, 410);
    assert_eq!(gone.header("content-type").as_deref(), Some("application/problem+json"));
    let problem = gone.json();
    assert_eq!(problem["status"], 410);
    assert_eq!(problem["detail"], "API v0 was retired");
    // Envoy replaces an external client's x-request-id with its own (use_remote_address).
    let request_id = problem["request_id"].as_str().unwrap_or_default();
    assert!(request_id.len() >= 16, "problem carries Envoy's request id: {problem}");

    let redirect = envoy.get("/docs").send();
    assert_eq!(redirect.status, 301);
    assert_eq!(redirect.header("location").as_deref(), Some("https://docs.example.com/"));

    let teapot = envoy.get("/teapot").send();
    assert_eq!((teapot.status, teapot.text().as_str()), (418, "short and stout"));
    assert_eq!(teapot.header("content-type").as_deref(), Some("text/plain"));

    let missing = envoy.get("/nothing/here").send();
    assert_eq!(missing.status, 404);
    let problem = missing.json();
    assert_eq!(problem["type"], "urn:wasm-gateway:problem:no-route");
    assert!(problem["detail"].as_str().unwrap().contains("/nothing/here"));

    for path in ["/v0/users", "/docs", "/teapot", "/nothing/here"] {
        let reached: usize = fx.upstreams.iter().map(|upstream| upstream.served_path(path)).sum();
        assert_eq!(reached, 0, "{path} is answered by the gateway, never a backend");
    }
}

#[test]
fn sticky_split_keeps_each_user_on_one_version_with_the_configured_share() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    let users = 2000;
    let requests = (0..users).map(|user| envoy.get("/orders").header("x-user-id", format!("user-{user}"))).collect();
    let clusters: Vec<String> =
        send_all(requests, 32).iter().map(|response| response.echo().upstream().to_string()).collect();
    let v2 = clusters.iter().filter(|cluster| *cluster == "orders-v2").count();
    // 10% of 2,000 = 200; the hash is not random, so allow +-3 standard deviations (~40).
    assert!((160..=240).contains(&v2), "orders-v2 got {v2} of {users} users");
    for user in (0..users).step_by(97) {
        for _ in 0..3 {
            let again = envoy.get("/orders").header("x-user-id", format!("user-{user}")).send();
            assert_eq!(again.echo().upstream(), clusters[user], "user-{user} moved");
        }
    }
}

#[test]
fn bad_header_bytes_never_trap_the_vm() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    for value in [&b"\xff\xfe"[..], b"v1\x80", b"\xc3\x28.json"] {
        let response = envoy.get("/kinds").header("x-k", value).header("cookie", b"canary=\xff").send();
        assert!(matches!(response.status, 200 | 404), "status {}", response.status);
    }
    let long = "v".repeat(20_000);
    assert_eq!(envoy.get("/kinds").header("x-k", long).send().status, 404);
    // The VM still serves.
    assert_eq!(upstream_of(&envoy.get("/users/1").send()), "users");
    assert_eq!(upstream_of(&envoy.get("/kinds").header("x-k", b"x\xff.json").send()), "users");
}

#[test]
fn metrics_count_routes_default_and_no_route() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    let before = envoy.stat("wasmcustom.routing.route.teapot.requests");
    let no_route_before = envoy.stat("wasmcustom.routing.no_route.requests");
    envoy.get("/teapot").send();
    envoy.get("/teapot").send();
    envoy.get("/no-such-route").send();
    assert!(wait_until(Duration::from_secs(5), || envoy.stat("wasmcustom.routing.route.teapot.requests") >= before + 2));
    assert!(envoy.stat("wasmcustom.routing.no_route.requests") > no_route_before);
    assert!(envoy.prometheus().contains("routing"), "custom metrics appear in /stats/prometheus");
}

#[test]
fn default_cluster_and_random_split_weights() {
    let fx = start(
        json!({
            "default_cluster": "products",
            "routes": [{"name": "canary", "match": {"path": {"prefix": "/orders"}},
                        "split": {"clusters": [{"cluster": "orders", "weight": 3}, {"cluster": "orders-v2", "weight": 1}]}}]
        }),
        2,
    );
    let envoy = &fx.envoy;
    assert_eq!(upstream_of(&envoy.get("/anything").send()), "products");
    assert!(wait_until(Duration::from_secs(5), || envoy.stat("wasmcustom.routing.default_route.requests") == 1));
    let requests = 2000;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for response in send_all((0..requests).map(|_| envoy.get("/orders")).collect(), 32) {
        *counts.entry(upstream_of(&response)).or_insert(0) += 1;
    }
    let v2 = counts.get("orders-v2").copied().unwrap_or(0);
    // Expected 500 (25%); binomial sd ~19: +-100 is over 5 sd.
    assert!((400..=600).contains(&v2), "orders-v2 got {v2} of {requests}: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), requests);
}

/// Issue 17 item 8: query edits on forwarded requests, after the path rewrite.
/// Names are compared decoded (`%64ebug` is `debug`), what the route writes is
/// encoded, and the parameters it does not name arrive byte for byte.
#[test]
fn query_parameters_are_removed_renamed_set_and_added() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    let response = envoy.get("/search/all?q=shoes&debug=1&%64ebug=2&version=1&keep=%FF%26").send();
    assert_eq!(upstream_of(&response), "products");
    let echo = response.echo();
    assert_eq!(echo.path(), "/find/all");
    assert_eq!(echo.query(), Some("query=shoes&keep=%FF%26&version=2&via=gate%20way"));
    let bare = envoy.get("/search").send().echo();
    assert_eq!(bare.query(), Some("version=2&via=gate%20way"), "set and add need no query to start from");
}

#[test]
fn invalid_configuration_is_refused_with_the_field_named() {
    let upstream = EchoUpstream::start("users");
    for (config, field) in [
        (
            r#"{"routes":[{"name":"a","match":{"path":{"regex":"(unclosed"}},"cluster":"users"}]}"#,
            "routes[0].match.path.regex",
        ),
        (
            r#"{"routes":[{"name":"a","split":{"clusters":[{"cluster":"users","weight":0}]}}]}"#,
            "routes[0].split.clusters",
        ),
        (r#"{"routes":[{"name":"a","match":{"path":{"prefix":"/"}}}]}"#, "routes[0]: needs exactly one action"),
        (r#"{"routes":[{"name":"a","clustr":"users"}]}"#, "unknown field `clustr`"),
        (
            r#"{"routes":[{"name":"a","cluster":"users","response_headers":{"set":{"x-a":"1"},"remove":["x-a"]}}]}"#,
            "routes[0].response_headers.set.x-a: is also added or removed",
        ),
        (
            r#"{"routes":[{"name":"a","cluster":"users","response_headers":{"remove":["Bad Name"]}}]}"#,
            "routes[0].response_headers.remove.Bad Name",
        ),
        (
            r#"{"routes":[{"name":"a","cluster":"users","query":{"remove":["x"],"set":{"x":"1"}}}]}"#,
            "routes[0].query.set.x: is also in remove",
        ),
        (
            r#"{"routes":[{"name":"a","direct_response":{"status":200},"query":{"add":{"x":"1"}}}]}"#,
            "routes[0].query: only routes that forward",
        ),
    ] {
        assert_config_refused(&upstream, "routing", config, field);
    }
}

#[test]
fn the_optional_clear_route_cache_call_keeps_routing_correct() {
    let mut config = routes();
    config["clear_route_cache"] = json!(true);
    let fx = start(config, 1);
    let _log = fx.envoy.log_on_failure();
    assert_eq!(upstream_of(&fx.envoy.get("/users/1").header(CLUSTER_HEADER, "products").send()), "users");
    let rewritten = fx.envoy.get("/v1/items/7").send();
    assert_eq!((rewritten.echo().upstream(), rewritten.echo().path()), ("products", "/items/7"));
}
