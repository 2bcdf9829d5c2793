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
}

#[test]
fn concurrent_identical_misses_reach_the_origin_once() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let path = "/c/stampede";
    fx.upstream.script(
        path,
        Reply::status(200).header("cache-control", "max-age=60").body("filled once").delay(Duration::from_millis(400)),
    );
    // 50 at once over many connections: both workers get some.
    let started = std::time::Instant::now();
    let responses = send_all((0..50).map(|_| fx.envoy.get(path)).collect(), 50);
    let took = started.elapsed();
    assert!(responses.iter().all(|response| (response.status, response.text().as_str()) == (200, "filled once")));
    let statuses: std::collections::BTreeSet<String> = responses.iter().map(cache_status).collect();
    assert_eq!(
        fx.upstream.served_path(path),
        1,
        "one request filled the entry for all: {statuses:?} in {took:?}, forwarded after waiting: {}",
        fx.envoy.stat("wasmcustom.cache.collapse_forwarded")
    );
    let collapsed = responses.iter().filter(|response| cache_status(response).contains("collapsed")).count();
    assert!(collapsed >= 40, "{collapsed} of 50 answered as collapsed");
    assert!(wait_until(Duration::from_secs(5), || fx.envoy.stat("wasmcustom.cache.collapsed") >= 40));

    // Not storable: the waiters are released and each goes to the origin itself.
    let private = "/c/stampede-private";
    fx.upstream.script(
        private,
        Reply::status(200).header("cache-control", "private").body("mine").delay(Duration::from_millis(300)),
    );
    let responses = send_all((0..10).map(|_| fx.envoy.get(private)).collect(), 10);
    assert!(responses.iter().all(|response| (response.status, response.text().as_str()) == (200, "mine")));
    assert_eq!(fx.upstream.served_path(private), 10);
    assert!(responses.iter().any(|response| cache_status(response).contains("collapsed=?0")));
}

/// Fill locks live in a bounded set of shared-data values, so URIs share them:
/// with `slots: 1` there are 16, and 12 URIs stampeded at once all but surely
/// share one. Each URI still reaches the origin once (before, a URI whose lock
/// value held another URI's fill sent every one of its misses to the origin).
#[test]
fn stampedes_of_uris_sharing_a_fill_lock_each_reach_the_origin_once() {
    let fx = start(json!({"slots": 1}));
    let _log = fx.envoy.log_on_failure();
    let paths: Vec<String> = (0..12).map(|n| format!("/c/shared-lock-{n}")).collect();
    for path in &paths {
        fx.upstream.script(
            path,
            Reply::status(200)
                .header("cache-control", "max-age=60")
                .body(path.as_str())
                .delay(Duration::from_millis(300)),
        );
    }
    let requests = paths.iter().flat_map(|path| std::iter::repeat_n(path, 4)).map(|path| fx.envoy.get(path));
    let responses = send_all(requests.collect(), 48);
    assert!(responses.iter().all(|response| response.status == 200));
    let served: Vec<(&str, usize)> = paths.iter().map(|path| (path.as_str(), fx.upstream.served_path(path))).collect();
    assert!(served.iter().all(|(_, count)| *count == 1), "origin requests per URI: {served:?}");
}

#[test]
fn a_waiter_goes_on_by_itself_after_the_collapse_timeout() {
    let fx = start(json!({"collapse_timeout_ms": 200}));
    let _log = fx.envoy.log_on_failure();
    let path = "/c/slow";
    fx.upstream.script(
        path,
        Reply::status(200).header("cache-control", "max-age=60").body("slow").delay(Duration::from_millis(1500)),
    );
    let started = std::time::Instant::now();
    let responses = send_all((0..4).map(|_| fx.envoy.get(path)).collect(), 4);
    assert!(responses.iter().all(|response| response.status == 200));
    assert_eq!(fx.upstream.served_path(path), 4, "after 200 ms each waiter went to the origin");
    assert!(started.elapsed() < Duration::from_millis(2500), "nobody waited for the slow fill");
}

#[test]
fn the_table_keeps_nine_tenths_of_its_capacity_and_a_full_budget_still_stores() {
    let fx = start(json!({"slots": 256, "max_entry_bytes": 65536, "max_total_bytes": 1048576}));
    let _log = fx.envoy.log_on_failure();
    // 0.9 x 256 distinct URIs, sequential names: every one is served from the cache.
    let uris: Vec<String> = (0..230).map(|n| format!("/c/keep/{n:04}")).collect();
    let store = |uris: &[String], extra: &[&str]| {
        let requests = uris.iter().map(|uri| get(&fx.envoy, uri, &["cache-control: max-age=600"])).collect();
        let requests: Vec<RequestBuilder> = requests;
        let requests = requests.into_iter().map(|mut request| {
            for header in extra {
                let (name, value) = header.split_once(": ").unwrap();
                request = request.header(name, value);
            }
            request
        });
        send_all(requests.collect(), 8)
    };
    assert!(store(&uris, &[]).iter().all(|response| response.status == 200));
    let hits = store(&uris, &[]);
    let missed: Vec<&String> = uris
        .iter()
        .zip(&hits)
        .filter(|(_, response)| !cache_status(response).contains("hit"))
        .map(|(u, _)| u)
        .collect();
    assert!(missed.is_empty(), "{} of 230 not kept: {missed:?}", missed.len());

    // The budget is full of 60 KiB bodies: each new one is still stored (the
    // oldest give way), and the counted bytes never pass the budget.
    for n in 0..40 {
        let uri = format!("/c/full/{n}");
        let fill = get(&fx.envoy, &uri, &["cache-control: max-age=600"]).header("x-echo-body-size", "61440").send();
        assert_eq!(fill.status, 200);
        let again = get(&fx.envoy, &uri, &["cache-control: max-age=600"]).send();
        assert!(cache_status(&again).contains("hit"), "entry {n} was not stored: {}", cache_status(&again));
        assert_eq!(again.body.len(), 61440);
    }
    assert!(wait_until(Duration::from_secs(5), || fx.envoy.stat("wasmcustom.cache.bytes_stored") > 900_000));
    assert!(fx.envoy.stat("wasmcustom.cache.bytes_stored") <= 1_048_576);
}

/// RFC 9111 3 and 4: a response without content is stored like any other.
#[test]
fn responses_without_a_body_are_stored() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    for (path, reply) in [
        ("/c/no-content", Reply::status(204).header("cache-control", "max-age=60")),
        ("/c/empty", Reply::status(200).header("cache-control", "max-age=60").body("")),
    ] {
        fx.upstream.script(path, reply);
        let first = fx.envoy.get(path).send();
        assert!(cache_status(&first).contains("stored"), "{path}: {}", cache_status(&first));
        let second = fx.envoy.get(path).send();
        assert!(cache_status(&second).contains("hit"), "{path}: {}", cache_status(&second));
        assert_eq!(second.body.len(), 0);
        assert_eq!(fx.upstream.served_path(path), 1, "{path}");
    }
}

/// RFC 9111 4.3.4: a 304 whose strong validator is not the stored one updates
/// nothing; the client gets the current representation.
#[test]
fn a_304_for_another_representation_updates_nothing_and_is_fetched_again() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let path = "/c/validator-mismatch";
    fx.upstream.script(
        path,
        Reply::status(200).header("cache-control", "max-age=0").header("etag", "\"v1\"").body("version one"),
    );
    fx.envoy.get(path).send();
    fx.upstream.script(
        path,
        Reply::status(200)
            .header("cache-control", "max-age=60")
            .header("etag", "\"v2\"")
            .body("version two")
            .when_conditional(Reply::status(304).header("etag", "\"v2\"").header("cache-control", "max-age=60")),
    );
    let response = fx.envoy.get(path).send();
    assert_eq!((response.status, response.text().as_str()), (200, "version two"));
    assert_eq!(response.header("etag").as_deref(), Some("\"v2\""));
    assert!(cache_status(&response).contains("validator-mismatch"), "{}", cache_status(&response));
    let hit = fx.envoy.get(path).send();
    assert_eq!((hit.text().as_str(), cache_status(&hit).contains("hit")), ("version two", true));
    assert_eq!(fx.upstream.served_path(path), 3, "store, 304, re-fetch; then a hit");
}

/// The re-fetch after a mismatching 304 forwards the client's headers: over
/// HTTP/2 a value may be bytes that are not text (Envoy's h2 codec passes
/// 0x80-0xFF). Such a request gets a clear 502, never a broken call or a hang;
/// and identical misses carrying such bytes still collapse and are answered.
#[test]
fn raw_bytes_over_http2_reach_the_refetch_and_collapsing_safely() {
    use gateway_tests::raw;
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let path = "/c/raw-refetch";
    fx.upstream
        .script(path, Reply::status(200).header("cache-control", "max-age=0").header("etag", "\"v1\"").body("one"));
    let token: (&[u8], &[u8]) = (b"x-token", b"\xff\xfe");
    assert_eq!(raw::get(fx.envoy.listener, path.as_bytes(), &[token]).response().status, 200);
    fx.upstream.script(
        path,
        Reply::status(200)
            .header("cache-control", "max-age=60")
            .header("etag", "\"v2\"")
            .body("two")
            .when_conditional(Reply::status(304).header("etag", "\"v2\"")),
    );
    let refetched = raw::get(fx.envoy.listener, path.as_bytes(), &[token]).response();
    assert_eq!(refetched.status, 502, "{:?}", String::from_utf8_lossy(&refetched.body));
    assert!(String::from_utf8_lossy(&refetched.body).contains("refetch-failed"));
    // A text request afterwards gets the current representation.
    assert_eq!(fx.envoy.get(path).send().text(), "two");

    let stampede = "/c/raw-stampede";
    fx.upstream.script(
        stampede,
        Reply::status(200).header("cache-control", "max-age=60").body("once").delay(Duration::from_millis(300)),
    );
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let listener = fx.envoy.listener;
            std::thread::spawn(move || raw::get(listener, stampede.as_bytes(), &[(b"x-token", b"\xff")]).response())
        })
        .collect();
    for handle in handles {
        let response = handle.join().unwrap();
        assert_eq!((response.status, response.body.as_slice()), (200, &b"once"[..]));
    }
    assert_eq!(fx.upstream.served_path(stampede), 1);
}

/// RFC 9111 4.3.4: a 304 updates Content-Type but never the fields that
/// describe the stored content.
#[test]
fn a_304_updates_headers_except_those_describing_the_content() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let path = "/c/304-headers";
    fx.upstream.script(
        path,
        Reply::status(200)
            .header("cache-control", "max-age=0")
            .header("etag", "\"e\"")
            .header("content-type", "text/plain")
            .header("content-encoding", "identity")
            .body("body"),
    );
    fx.envoy.get(path).send();
    fx.upstream.script(
        path,
        Reply::status(304)
            .header("etag", "\"e\"")
            .header("cache-control", "max-age=60")
            .header("content-type", "text/html")
            .header("content-encoding", "gzip")
            .body(""),
    );
    let response = fx.envoy.get(path).send();
    assert_eq!((response.status, response.text().as_str()), (200, "body"));
    assert_eq!(response.header("content-type").as_deref(), Some("text/html"));
    assert_eq!(response.header("content-encoding").as_deref(), Some("identity"));
}

/// RFC 9111 5.1 (list-valued Age), 5.2.2.3 (must-understand), 4.4 (any unsafe method).
#[test]
fn age_lists_must_understand_and_every_unsafe_method() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    // Age 7200 (first member) against max-age 3600: stale on arrival, not reused.
    let aged = "/c/age-list";
    fx.upstream.script(aged, Reply::status(200).header("cache-control", "max-age=3600").header("age", "7200, 0"));
    fx.envoy.get(aged).send();
    fx.envoy.get(aged).send();
    assert_eq!(fx.upstream.served_path(aged), 2);

    let odd = "/c/must-understand-599";
    fx.upstream.script(odd, Reply::status(599).header("cache-control", "must-understand, max-age=60"));
    fx.envoy.get(odd).send();
    fx.envoy.get(odd).send();
    assert_eq!(fx.upstream.served_path(odd), 2, "599 is not understood: never stored");
    let known = "/c/must-understand-200";
    fx.upstream.script(known, Reply::status(200).header("cache-control", "must-understand, no-store, max-age=60"));
    fx.envoy.get(known).send();
    assert!(cache_status(&fx.envoy.get(known).send()).contains("hit"), "must-understand overrides no-store");

    for method in ["PROPPATCH", "LINK", "MKCOL"] {
        let path = format!("/c/unsafe-{}", method.to_ascii_lowercase());
        let stored = ["cache-control: max-age=60"];
        get(&fx.envoy, &path, &stored).send();
        assert!(cache_status(&get(&fx.envoy, &path, &stored).send()).contains("hit"));
        let unsafe_request = fx.envoy.request(method, &path).send();
        assert_eq!(unsafe_request.status, 200, "{method}");
        let after = get(&fx.envoy, &path, &stored).send();
        assert!(!cache_status(&after).contains("hit"), "{method} invalidated: {}", cache_status(&after));
    }
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
