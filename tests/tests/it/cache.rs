//! cache.wasm through real Envoy: the echo upstream is told which headers to
//! answer with, and its request counts prove hits and misses.

use std::sync::OnceLock;
use std::time::Duration;

use gateway_tests::client::{send_all, RequestBuilder, Response};
use gateway_tests::envoy::{assert_config_refused, Envoy, EnvoyConfig, WasmFilter};
use gateway_tests::upstream::{EchoUpstream, Reply};
use gateway_tests::wait_until;
use serde_json::{json, Value};

struct Fixture {
    envoy: Envoy,
    upstream: EchoUpstream,
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

fn start(config: Value) -> Fixture {
    let upstream = EchoUpstream::start("backend");
    let envoy = Envoy::start(&EnvoyConfig::new(&upstream).filter(WasmFilter::new("cache", config)));
    Fixture { envoy, upstream }
}

fn shared() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| start(json!({"purge": {"secret_sha256": sha256_hex("purge-secret")}})))
}

/// A GET whose response carries `cache_control` (and any extra `name: value`).
fn get(envoy: &Envoy, path: &str, response_headers: &[&str]) -> RequestBuilder {
    let mut request = envoy.get(path);
    for header in response_headers {
        request = request.header("x-echo-header", header);
    }
    request
}

fn cache_status(response: &Response) -> String {
    response.header("cache-status").unwrap_or_default()
}

#[test]
fn a_fresh_response_is_served_from_the_cache_with_age_and_cache_status() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let first = get(&fx.envoy, "/c/basic", &["cache-control: max-age=60", "etag: \"b1\""]).send();
    assert_eq!(first.status, 200);
    assert!(cache_status(&first).starts_with("wasm-cache; fwd=uri-miss"), "{}", cache_status(&first));
    assert!(cache_status(&first).contains("stored"));
    let second = get(&fx.envoy, "/c/basic", &["cache-control: max-age=60", "etag: \"b1\""]).send();
    assert_eq!(second.status, 200);
    assert!(cache_status(&second).starts_with("wasm-cache; hit; ttl="), "{}", cache_status(&second));
    assert_eq!(second.body, first.body, "the stored body");
    assert!(second.header("age").unwrap().parse::<u64>().unwrap() <= 2);
    assert_eq!(second.header("etag").as_deref(), Some("\"b1\""));
    assert_eq!(fx.upstream.served_path("/c/basic"), 1, "the hit never reached the backend");
    let head = fx.envoy.request("HEAD", "/c/basic").header("x-echo-header", "cache-control: max-age=60").send();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(fx.upstream.served_path("/c/basic"), 1, "HEAD is served from the GET entry");
    // A client conditional on a fresh entry: 304 from the cache.
    let conditional = get(&fx.envoy, "/c/basic", &[]).header("if-none-match", "\"b1\"").send();
    assert_eq!(conditional.status, 304);
    assert_eq!(fx.upstream.served_path("/c/basic"), 1);
}

#[test]
fn responses_a_shared_cache_must_not_store_are_not_stored() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    for (path, headers) in [
        ("/c/no-store", vec!["cache-control: no-store, max-age=60"]),
        ("/c/private", vec!["cache-control: private, max-age=60"]),
        ("/c/no-freshness", vec![]),
        ("/c/vary-star", vec!["cache-control: max-age=60", "vary: *"]),
        ("/c/set-cookie", vec!["cache-control: max-age=60", "set-cookie: s=1"]),
        ("/c/malformed-expires", vec!["expires: 0"]),
    ] {
        for _ in 0..2 {
            assert_eq!(get(&fx.envoy, path, &headers).send().status, 200);
        }
        assert_eq!(fx.upstream.served_path(path), 2, "{path} must not be stored");
    }
}

#[test]
fn authenticated_responses_are_shared_only_when_the_response_allows_it() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let alice = get(&fx.envoy, "/c/me", &["cache-control: max-age=60"]).header("authorization", "Bearer alice").send();
    let bob = get(&fx.envoy, "/c/me", &["cache-control: max-age=60"]).header("authorization", "Bearer bob").send();
    assert_eq!(fx.upstream.served_path("/c/me"), 2, "an Authorization response without public is not stored");
    assert!(bob.text().contains("Bearer bob") && alice.text().contains("Bearer alice"));
    // auth.wasm strips Authorization but leaves identity headers: still authenticated.
    get(&fx.envoy, "/c/me2", &["cache-control: max-age=60"]).header("x-user-id", "alice").send();
    let other = get(&fx.envoy, "/c/me2", &["cache-control: max-age=60"]).header("x-user-id", "bob").send();
    assert_eq!(fx.upstream.served_path("/c/me2"), 2);
    assert_eq!(other.echo().header("x-user-id"), Some("bob"), "bob never sees alice's answer");
    get(&fx.envoy, "/c/public", &["cache-control: public, max-age=60"]).header("authorization", "Bearer a").send();
    get(&fx.envoy, "/c/public", &["cache-control: public, max-age=60"]).header("authorization", "Bearer b").send();
    assert_eq!(fx.upstream.served_path("/c/public"), 1, "public responses are shared");
}

#[test]
fn vary_and_the_routing_header_select_variants() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let headers = ["cache-control: max-age=60", "vary: Accept-Encoding"];
    let gzip = || get(&fx.envoy, "/c/vary", &headers).header("accept-encoding", "gzip").send();
    let brotli = || get(&fx.envoy, "/c/vary", &headers).header("accept-encoding", "br").send();
    assert!(cache_status(&gzip()).contains("fwd=uri-miss"));
    assert!(cache_status(&brotli()).contains("fwd=vary-miss"));
    assert!(cache_status(&gzip()).contains("hit"));
    assert!(cache_status(&brotli()).contains("hit"));
    assert_eq!(fx.upstream.served_path("/c/vary"), 2);
    // The upstream chosen by routing.wasm is part of the key.
    let v1 = get(&fx.envoy, "/c/canary", &["cache-control: max-age=60"]).header("x-gateway-cluster", "orders").send();
    let v2 =
        get(&fx.envoy, "/c/canary", &["cache-control: max-age=60"]).header("x-gateway-cluster", "orders-v2").send();
    assert_eq!(v2.echo().header("x-gateway-cluster"), Some("orders-v2"), "never the other version's body");
    assert_eq!(v1.echo().header("x-gateway-cluster"), Some("orders"));
    assert_eq!(fx.upstream.served_path("/c/canary"), 2);
}

#[test]
fn request_directives_are_honoured() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let stored = ["cache-control: max-age=60"];
    get(&fx.envoy, "/c/directives", &stored).send();
    assert!(cache_status(&get(&fx.envoy, "/c/directives", &stored).send()).contains("hit"));
    for directive in ["no-cache", "min-fresh=3600"] {
        let before = fx.upstream.served_path("/c/directives");
        get(&fx.envoy, "/c/directives", &stored).header("cache-control", directive).send();
        assert_eq!(fx.upstream.served_path("/c/directives"), before + 1, "{directive} goes to the origin");
    }
    // max-age=0 refuses a stored response as soon as it is a second old.
    assert!(wait_until(Duration::from_secs(5), || {
        let hit = get(&fx.envoy, "/c/directives", &stored).send();
        hit.header("age").is_some_and(|age| age != "0")
    }));
    let before = fx.upstream.served_path("/c/directives");
    get(&fx.envoy, "/c/directives", &stored).header("cache-control", "max-age=0").send();
    assert_eq!(fx.upstream.served_path("/c/directives"), before + 1, "max-age=0 goes to the origin");
    let before = fx.upstream.served_path("/c/directives");
    let cached = get(&fx.envoy, "/c/directives", &[]).header("cache-control", "only-if-cached").send();
    assert_eq!(cached.status, 200);
    assert_eq!(fx.upstream.served_path("/c/directives"), before);
    let nothing = fx.envoy.get("/c/never-stored").header("cache-control", "only-if-cached").send();
    assert_eq!(nothing.status, 504);
    assert_eq!(fx.upstream.served_path("/c/never-stored"), 0);
    get(&fx.envoy, "/c/request-no-store", &stored).header("cache-control", "no-store").send();
    get(&fx.envoy, "/c/request-no-store", &stored).send();
    assert_eq!(fx.upstream.served_path("/c/request-no-store"), 2, "request no-store: not stored");
}

#[test]
fn stale_entries_are_revalidated_both_ways() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let path = "/c/revalidate";
    fx.upstream.script(
        path,
        Reply::status(200).header("cache-control", "max-age=0").header("etag", "\"v1\"").body("original"),
    );
    assert_eq!(fx.envoy.get(path).send().text(), "original");
    // The origin says 304: the stored body is served with the refreshed headers.
    fx.upstream.script(path, Reply::status(304).header("cache-control", "max-age=60").header("etag", "\"v1\""));
    let revalidated = fx.envoy.get(path).send();
    assert_eq!((revalidated.status, revalidated.text().as_str()), (200, "original"));
    assert!(cache_status(&revalidated).contains("fwd=stale; fwd-status=304"), "{}", cache_status(&revalidated));
    assert_eq!(revalidated.header("cache-control").as_deref(), Some("max-age=60"));
    let hit = fx.envoy.get(path).send();
    assert!(cache_status(&hit).contains("hit"));
    assert_eq!(fx.upstream.served_path(path), 2);

    // The origin sends a new representation: it replaces the stored one.
    let other = "/c/replace";
    fx.upstream
        .script(other, Reply::status(200).header("cache-control", "max-age=0").header("etag", "\"a\"").body("old"));
    fx.envoy.get(other).send();
    fx.upstream
        .script(other, Reply::status(200).header("cache-control", "max-age=60").header("etag", "\"b\"").body("new"));
    assert_eq!(fx.envoy.get(other).send().text(), "new");
    let hit = fx.envoy.get(other).send();
    assert_eq!((hit.text().as_str(), cache_status(&hit).contains("hit")), ("new", true));
}

#[test]
fn stale_if_error_serves_the_stored_response_when_the_origin_fails() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let path = "/c/sie";
    fx.upstream.script(path, Reply::status(200).header("cache-control", "max-age=0, stale-if-error=600").body("kept"));
    fx.envoy.get(path).send();
    fx.upstream.script(path, Reply::status(503).body("down"));
    let response = fx.envoy.get(path).send();
    assert_eq!((response.status, response.text().as_str()), (200, "kept"));
    assert!(cache_status(&response).contains("fwd-status=503"));
    // Without stale-if-error the error passes through.
    let strict = "/c/no-sie";
    fx.upstream.script(strict, Reply::status(200).header("cache-control", "max-age=0").body("kept"));
    fx.envoy.get(strict).send();
    fx.upstream.script(strict, Reply::status(503).body("down"));
    assert_eq!(fx.envoy.get(strict).send().status, 503);
}

#[test]
fn stale_while_revalidate_answers_at_once_and_refreshes_in_the_background() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let path = "/c/swr";
    fx.upstream
        .script(path, Reply::status(200).header("cache-control", "max-age=0, stale-while-revalidate=600").body("v1"));
    assert_eq!(fx.envoy.get(path).send().text(), "v1");
    fx.upstream.script(
        path,
        Reply::status(200).header("cache-control", "max-age=600").body("v2").delay(Duration::from_millis(300)),
    );
    let stale = fx.envoy.get(path).send();
    assert_eq!(stale.text(), "v1", "the stale response is served without waiting for the origin");
    assert!(cache_status(&stale).contains("stale-while-revalidate"), "{}", cache_status(&stale));
    // The background revalidation replaces the entry.
    assert!(wait_until(Duration::from_secs(5), || fx.envoy.get(path).send().text() == "v2"), "never refreshed");
    let fresh = fx.envoy.get(path).send();
    assert!(cache_status(&fresh).contains("hit; ttl="));
    let served = fx.upstream.served_path(path);
    // One foreground miss, then at most one background revalidation per worker (two).
    assert!((2..=3).contains(&served), "origin saw {served} requests");
}

#[test]
fn unsafe_requests_invalidate_and_purge_needs_the_secret() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let stored = ["cache-control: max-age=60"];
    get(&fx.envoy, "/c/inv", &stored).send();
    get(&fx.envoy, "/c/inv", &stored).send();
    assert_eq!(fx.upstream.served_path("/c/inv"), 1);
    assert_eq!(fx.envoy.request("POST", "/c/inv").body("x").send().status, 200);
    get(&fx.envoy, "/c/inv", &stored).send();
    assert_eq!(fx.upstream.served_path("/c/inv"), 3, "POST invalidated the stored response (POST counted too)");

    get(&fx.envoy, "/c/target", &stored).send();
    fx.envoy.request("PUT", "/c/elsewhere").header("x-echo-header", "location: /c/target").send();
    get(&fx.envoy, "/c/target", &stored).send();
    assert_eq!(fx.upstream.served_path("/c/target"), 2, "the Location target was invalidated");

    get(&fx.envoy, "/c/purge-me", &stored).send();
    assert_eq!(fx.envoy.request("PURGE", "/c/purge-me").send().status, 403);
    assert_eq!(fx.envoy.request("PURGE", "/c/purge-me").header("x-purge-key", "wrong").send().status, 403);
    let purged = fx.envoy.request("PURGE", "/c/purge-me").header("x-purge-key", "purge-secret").send();
    assert_eq!((purged.status, purged.json()["purged"].clone()), (200, json!(true)));
    get(&fx.envoy, "/c/purge-me", &stored).send();
    assert_eq!(fx.upstream.served_path("/c/purge-me"), 2);
    assert!(wait_until(Duration::from_secs(5), || fx.envoy.stat("wasmcustom.cache.purges") >= 1));
}

#[test]
fn large_bodies_bad_headers_and_concurrent_misses() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    for _ in 0..2 {
        let big = get(&fx.envoy, "/c/big", &["cache-control: max-age=60"]).header("x-echo-body-size", "2000000").send();
        assert_eq!(big.body.len(), 2_000_000);
    }
    assert_eq!(fx.upstream.served_path("/c/big"), 2, "bodies over max_entry_bytes pass through uncached");
    for value in [&b"max-age=\xff\xfe"[..], b"max-age=-1, s-maxage=abc", b",,,=,"] {
        let response = fx
            .envoy
            .get("/c/bad")
            .header("x-echo-header", "cache-control: max-age=60")
            .header("cache-control", value)
            .send();
        assert_eq!(response.status, 200);
    }
    let weird =
        fx.envoy.get("/c/bad-vary").header("x-echo-header", "vary: , ,accept,").header("accept", b"\xff").send();
    assert_eq!(weird.status, 200);
    let responses =
        send_all((0..32).map(|_| get(&fx.envoy, "/c/stampede", &["cache-control: max-age=60"])).collect(), 32);
    assert!(responses.iter().all(|response| response.status == 200 && response.echo().path() == "/c/stampede"));
    let hit = get(&fx.envoy, "/c/stampede", &["cache-control: max-age=60"]).send();
    assert!(cache_status(&hit).contains("hit"));
    assert_eq!(hit.echo().path(), "/c/stampede");
}

#[test]
fn memory_stays_within_the_budget() {
    let budget = 512 * 1024;
    let fx = start(json!({"max_total_bytes": budget, "max_entry_bytes": 65536, "slots": 256}));
    let _log = fx.envoy.log_on_failure();
    let allocated = || -> u64 {
        let (_, body) = fx.envoy.admin("/memory");
        serde_json::from_str::<Value>(&body).unwrap()["allocated"].as_str().unwrap().parse().unwrap()
    };
    let write = |range: std::ops::Range<u32>| {
        let requests = range
            .map(|n| {
                get(&fx.envoy, &format!("/c/fill?x={n}"), &["cache-control: max-age=600"])
                    .header("x-echo-body-size", "16384")
            })
            .collect();
        assert!(send_all(requests, 16).iter().all(|response| response.status == 200));
    };
    write(0..300);
    let at_300 = allocated();
    write(300..1500);
    let at_1500 = allocated();
    assert!(wait_until(Duration::from_secs(5), || fx.envoy.stat("wasmcustom.cache.bytes_stored") > 0));
    let stored = fx.envoy.stat("wasmcustom.cache.bytes_stored");
    assert!(stored <= budget, "stored bytes {stored} exceed the budget {budget}");
    // 1,200 more entries of 16 KiB would be ~19 MB if kept.
    let growth = at_1500.saturating_sub(at_300);
    assert!(growth < 4_000_000, "allocated grew by {growth} bytes ({at_300} -> {at_1500})");
    assert!(fx.envoy.stat("wasmcustom.cache.stores") >= 1000);
    assert!(wait_until(Duration::from_secs(5), || fx.envoy.stat("wasmcustom.cache.evictions") > 500));
}

#[test]
fn invalid_configuration_is_refused_with_the_field_named() {
    let upstream = EchoUpstream::start("backend");
    for (config, field) in [
        (json!({"max_entry_bytes": 0}), "max_entry_bytes"),
        (json!({"cacheable_statuses": [206]}), "cacheable_statuses[0]"),
        (json!({"purge": {"secret_sha256": "plain-secret"}}), "purge.secret_sha256"),
        (json!({"ignore_query": true, "query_include": ["a"]}), "ignore_query"),
        (json!({"max_entry": 10}), "unknown field `max_entry`"),
    ] {
        assert_config_refused(&upstream, "cache", &config.to_string(), field);
    }
}
