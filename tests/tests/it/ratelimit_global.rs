//! Global limits (issue 15 part 1): ratelimit.wasm asks a real rate-limit
//! service over Envoy's RLS protocol. The service is the `rls-service` fixture:
//! Kuadrant's Limitador engine counting in a real Redis. Two Envoy processes
//! with two workers each share the limits; slow, unreachable and garbage
//! services get the configured failure mode.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gateway_tests::client::send_all;
use gateway_tests::envoy::{Envoy, EnvoyConfig, WasmFilter};
use gateway_tests::raw;
use gateway_tests::services::{self, Server};
use gateway_tests::upstream::EchoUpstream;
use serde_json::{json, Value};

/// A Limitador limit on the descriptor of one of our rules, keyed by a header.
fn limitador_limit(rule: &str, header: &str, max_value: u64, seconds: u64) -> Value {
    json!({
        "namespace": "gateway",
        "name": "per-minute",
        "max_value": max_value,
        "seconds": seconds,
        "conditions": [format!("descriptors[0][\"rule\"] == \"{rule}\"")],
        "variables": [format!("descriptors[0][\"header.{header}\"]")],
    })
}

struct Fixture {
    redis: Server,
    rls: Server,
}

/// One Redis and one rate-limit service for every test in this file (each test
/// uses its own rules or users, so they never share counters).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let redis = services::redis();
        let limits = json!([
            limitador_limit("per-user", "x-user-id", 20, 60),
            limitador_limit("flood", "x-user-id", 1000, 60),
            limitador_limit("tiny", "x-user-id", 1, 60),
            limitador_limit("failing", "x-user-id", 1000, 60),
            limitador_limit("llm", "x-user-id", 20, 60),
        ]);
        let rls = services::rls(Some(&redis), &limits, &[]);
        Fixture { redis, rls }
    })
}

/// ratelimit.wasm with global rules on `rls` (an address), in front of an echo upstream.
fn gateway(rls: SocketAddr, config: Value, workers: u32) -> (Envoy, EchoUpstream) {
    let upstream = EchoUpstream::start("backend");
    let envoy = Envoy::start(
        &EnvoyConfig::new(&upstream)
            .concurrency(workers)
            .grpc_cluster("rls", rls)
            .filter(WasmFilter::new("ratelimit", config)),
    );
    (envoy, upstream)
}

fn global(timeout_ms: u64, failure_mode: &str) -> Value {
    json!({"cluster": "rls", "domain": "gateway", "timeout_ms": timeout_ms, "failure_mode": failure_mode})
}

fn per_user_rule(name: &str) -> Value {
    json!({"name": name, "key": [{"header": "x-user-id"}], "missing_key": "skip", "global": true, "limits": []})
}

#[test]
fn two_envoys_with_two_workers_each_admit_exactly_the_global_limit() {
    let fixture = fixture();
    let config = json!({"global": global(1000, "deny"), "rules": [per_user_rule("per-user")]});
    let (first, first_upstream) = gateway(fixture.rls.addr, config.clone(), 2);
    let (second, second_upstream) = gateway(fixture.rls.addr, config, 2);
    let _logs = (first.log_on_failure(), second.log_on_failure());
    let requests = (0..80)
        .map(|index| {
            let envoy = if index % 2 == 0 { &first } else { &second };
            envoy.get("/items").header("x-user-id", "exact-user")
        })
        .collect();
    let responses = send_all(requests, 16);
    let allowed = responses.iter().filter(|response| response.status == 200).count();
    let denied: Vec<_> = responses.iter().filter(|response| response.status == 429).collect();
    assert_eq!(allowed, 20, "the service's limit, across both Envoys");
    assert_eq!(denied.len(), 60, "every other request is denied");
    assert_eq!(first_upstream.served() + second_upstream.served(), 20);
    let denial = denied[0];
    assert_eq!(denial.header("content-type").as_deref(), Some("application/problem+json"));
    let retry_after: u64 = denial.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "until the window resets: {retry_after}");
    assert_eq!(denial.header("ratelimit-policy").as_deref(), Some("\"per-minute\";q=20;w=60"));
    let ratelimit = denial.header("ratelimit").unwrap();
    assert!(ratelimit.starts_with("\"per-minute\";r=0;t="), "{ratelimit}");
    // Another user has its own counter.
    assert_eq!(first.get("/items").header("x-user-id", "other-user").send().status, 200);
    let count = |name: &str| first.stat(name) + second.stat(name);
    assert!(gateway_tests::wait_until(Duration::from_secs(5), || count(
        "wasmcustom.ratelimit.ratelimit.global.over_limit"
    ) == 60));
    assert_eq!(count("wasmcustom.ratelimit.ratelimit.global.ok"), 21);
    assert_eq!(count("wasmcustom.ratelimit.ratelimit.rule.per-user.denied"), 60);
    assert_eq!(count("wasmcustom.ratelimit.ratelimit.rule.per-user.allowed"), 21);
}

#[test]
fn allowed_responses_carry_the_service_numbers() {
    let fixture = fixture();
    let config = json!({"global": global(1000, "deny"), "rules": [per_user_rule("per-user")]});
    let (envoy, _upstream) = gateway(fixture.rls.addr, config, 1);
    let _log = envoy.log_on_failure();
    let first = envoy.get("/").header("x-user-id", "numbers-user").send();
    assert_eq!(first.status, 200);
    assert_eq!(first.header("ratelimit-policy").as_deref(), Some("\"per-minute\";q=20;w=60"));
    assert!(first.header("ratelimit").unwrap().starts_with("\"per-minute\";r=19;t="), "{first:?}");
    let second = envoy.get("/").header("x-user-id", "numbers-user").send();
    assert!(second.header("ratelimit").unwrap().starts_with("\"per-minute\";r=18;t="));
}

#[test]
fn a_local_limit_in_front_sheds_a_flood_without_asking_the_service() {
    let fixture = fixture();
    let rule = json!({"name": "flood", "key": [{"header": "x-user-id"}], "global": true,
        "limits": [{"name": "local", "requests": 5, "per_seconds": 3600}]});
    let (envoy, upstream) = gateway(fixture.rls.addr, json!({"global": global(1000, "deny"), "rules": [rule]}), 2);
    let _log = envoy.log_on_failure();
    let responses = send_all((0..30).map(|_| envoy.get("/").header("x-user-id", "flooder")).collect(), 8);
    assert_eq!(responses.iter().filter(|response| response.status == 200).count(), 5);
    assert_eq!(upstream.served(), 5);
    assert!(gateway_tests::wait_until(Duration::from_secs(5), || envoy
        .stat("wasmcustom.ratelimit.ratelimit.rule.flood.denied")
        == 25));
    assert_eq!(envoy.stat("wasmcustom.ratelimit.ratelimit.global.ok"), 5, "only the locally admitted were asked");
}

#[test]
fn non_utf8_and_escaped_key_values_are_different_clients_over_http2() {
    let fixture = fixture();
    let (envoy, _upstream) =
        gateway(fixture.rls.addr, json!({"global": global(1000, "deny"), "rules": [per_user_rule("tiny")]}), 1);
    let _log = envoy.log_on_failure();
    let get = |user: &[u8]| raw::get(envoy.listener, b"/", &[(b"x-user-id", user)]).response().status;
    assert_eq!(get(b"\xff"), 200, "a raw 0xff byte is a client of its own");
    assert_eq!(get(b"\xff"), 429);
    assert_eq!(get(b"%FF"), 200, "the text %FF is another client");
    assert_eq!(get(b"%FF"), 429);
    assert_eq!(get(b"%25FF"), 200, "and so is %25FF");
    assert_eq!(envoy.stat("wasmcustom.ratelimit.ratelimit.global.error"), 0, "the service accepted every descriptor");
}

#[test]
fn an_unreachable_service_gets_the_failure_mode() {
    let down = SocketAddr::from(([127, 0, 0, 1], services::free_port()));
    let rules = json!([per_user_rule("failing")]);
    let (deny, _a) = gateway(down, json!({"global": global(200, "deny"), "rules": rules}), 1);
    let (allow, _b) = gateway(down, json!({"global": global(200, "allow"), "rules": rules}), 1);
    let _logs = (deny.log_on_failure(), allow.log_on_failure());
    let denied = deny.get("/").header("x-user-id", "u").send();
    assert_eq!(denied.status, 500);
    assert_eq!(denied.json()["type"], "urn:wasm-gateway:problem:rate-limit-service-failed");
    assert_eq!(allow.get("/").header("x-user-id", "u").send().status, 200);
    assert_eq!(allow.get("/").send().status, 200, "requests without the key never ask");
    assert!(gateway_tests::wait_until(Duration::from_secs(5), || allow
        .stat("wasmcustom.ratelimit.ratelimit.global.failure_mode_allowed")
        == 1));
    assert_eq!(deny.stat("wasmcustom.ratelimit.ratelimit.global.error"), 1);
}

#[test]
fn a_slow_service_times_out_into_the_failure_mode() {
    let fixture = fixture();
    let slow = services::rls(Some(&fixture.redis), &json!([]), &["--delay-ms", "2000"]);
    let (envoy, upstream) =
        gateway(slow.addr, json!({"global": global(100, "deny"), "rules": [per_user_rule("failing")]}), 1);
    let _log = envoy.log_on_failure();
    let started = Instant::now();
    let response = envoy.get("/").header("x-user-id", "slow-user").send();
    let waited = started.elapsed();
    assert_eq!(response.status, 500);
    assert!(waited < Duration::from_millis(1500), "the 100 ms timeout applies, not the service's 2 s: {waited:?}");
    assert_eq!(upstream.served(), 0);
}

#[test]
fn a_garbage_answer_is_no_verdict() {
    let garbage = services::rls(None, &json!([]), &["--answer", "garbage"]);
    let rules = json!([per_user_rule("failing")]);
    let (deny, upstream) = gateway(garbage.addr, json!({"global": global(1000, "deny"), "rules": rules}), 1);
    let (allow, _b) = gateway(garbage.addr, json!({"global": global(1000, "allow"), "rules": rules}), 1);
    let _logs = (deny.log_on_failure(), allow.log_on_failure());
    assert_eq!(deny.get("/").header("x-user-id", "g").send().status, 500);
    assert_eq!(upstream.served(), 0);
    assert_eq!(allow.get("/").header("x-user-id", "g").send().status, 200);
    assert_eq!(deny.stat("wasmcustom.ratelimit.ratelimit.global.error"), 1);
}

#[test]
fn global_rules_need_the_service_section() {
    let upstream = EchoUpstream::start("backend");
    gateway_tests::envoy::assert_config_refused(
        &upstream,
        "ratelimit",
        r#"{"rules": [{"name": "r", "key": [{"constant": "all"}], "global": true, "limits": []}]}"#,
        "rules[0].global",
    );
    gateway_tests::envoy::assert_config_refused(
        &upstream,
        "ratelimit",
        r#"{"global": {"cluster": "rls", "domain": "d", "timeout_ms": 0}, "rules": [{"name": "r", "key": [{"constant": "all"}], "global": true}]}"#,
        "global.timeout_ms",
    );
}

/// Issue 15 part 4: a cost reported by the response reaches the service as a
/// descriptor `hits_addend` (sent from the root's next tick), and a request cost
/// from a request header is sent with the check itself.
#[test]
fn costs_reach_the_service_as_hits_addend() {
    let fixture = fixture();
    let rule = json!({"name": "llm", "key": [{"header": "x-user-id"}], "global": true,
        "cost": {"request_header": "x-cost", "response_header": "x-tokens-used", "max": 100}});
    let (envoy, upstream) = gateway(fixture.rls.addr, json!({"global": global(1000, "deny"), "rules": [rule]}), 1);
    let _log = envoy.log_on_failure();
    upstream.script("/complete", gateway_tests::upstream::Reply::status(200).header("x-tokens-used", "10"));
    let remaining = |response: &gateway_tests::client::Response| {
        let field = response.header("ratelimit").unwrap();
        field.split(";r=").nth(1).and_then(|rest| rest.split(';').next()).unwrap().parse::<u64>().unwrap()
    };
    let first = envoy.get("/complete").header("x-user-id", "cost-user").send();
    assert_eq!((first.status, remaining(&first)), (200, 19));
    assert!(gateway_tests::wait_until(Duration::from_secs(5), || envoy
        .stat("wasmcustom.ratelimit.ratelimit.global.charges_sent")
        == 1));
    let second = envoy.get("/").header("x-user-id", "cost-user").header("x-cost", "3").send();
    assert_eq!((second.status, remaining(&second)), (200, 6), "20 - 1 - 10 reported - 3");
}
