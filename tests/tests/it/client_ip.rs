//! The shared `client_ip` match condition (issue 17 item 1) in every module that
//! matches requests, through one real Envoy: ratelimit -> auth -> routing, one
//! trusted proxy in front (Envoy `xff_num_trusted_hops: 1`, each module
//! `client_ip.trusted_hops: 1`), so `x-forwarded-for` stands for the proxy's view.

use std::sync::OnceLock;

use gateway_tests::client::Response;
use gateway_tests::envoy::{assert_config_refused, Envoy, EnvoyConfig, Routes, WasmFilter};
use gateway_tests::raw;
use gateway_tests::upstream::EchoUpstream;
use serde_json::json;

const CLUSTER_HEADER: &str = "x-gateway-cluster";

struct Chain {
    envoy: Envoy,
    _backend: EchoUpstream,
}

fn chain() -> &'static Chain {
    static CHAIN: OnceLock<Chain> = OnceLock::new();
    CHAIN.get_or_init(|| {
        let backend = EchoUpstream::start("backend");
        let trusted = json!({"trusted_hops": 1});
        // A limit for one partner network only.
        let ratelimit = json!({"client_ip": trusted, "rules": [
            {"name": "partners", "match": {"client_ip": ["198.51.100.0/24"]}, "key": [{"client_ip": true}],
             "limits": [{"name": "per-minute", "requests": 2, "per_seconds": 60}]}]});
        // An IP allow list on /admin.
        let auth = json!({"client_ip": trusted, "rules": [
            {"name": "admin-internal", "match": {"path": {"prefix": "/admin"},
                                                 "client_ip": ["10.0.0.0/8", "2001:db8:10::/48"]},
             "allow_anonymous": true},
            {"name": "admin-elsewhere", "match": {"path": {"prefix": "/admin"}}, "deny": true},
            {"name": "everything-else", "allow_anonymous": true}]});
        // A deny list answered by routing.
        let routing = json!({"client_ip": trusted, "cluster_header": CLUSTER_HEADER, "routes": [
            {"name": "blocked-network", "match": {"client_ip": ["203.0.113.0/24", "2001:db8:bad::/48"]},
             "direct_response": {"status": 403, "detail": "this network is blocked"}},
            {"name": "backend", "cluster": "backend"}]});
        let config = EnvoyConfig::new(&backend)
            .routes(Routes::ClusterHeader(CLUSTER_HEADER.into()))
            .xff_trusted_hops(1)
            .filter(WasmFilter::new("ratelimit", ratelimit))
            .filter(WasmFilter::new("auth", auth))
            .filter(WasmFilter::new("routing", routing));
        Chain { envoy: Envoy::start(&config), _backend: backend }
    })
}

/// A request as the trusted proxy forwards it: `forwarded_for` is the
/// `x-forwarded-for` it sends (Envoy appends the proxy's own address).
fn from(path: &str, forwarded_for: &str) -> Response {
    chain().envoy.get(path).header("x-forwarded-for", forwarded_for).send()
}

#[test]
fn routing_answers_a_deny_list_and_only_the_trusted_hop_counts() {
    let blocked = from("/anything", "203.0.113.7");
    assert_eq!(blocked.status, 403, "{}", blocked.text());
    assert_eq!(blocked.json()["detail"], "this network is blocked");
    assert_eq!(from("/anything", "2001:db8:bad::1").status, 403);
    assert_eq!(from("/anything", "[2001:db8:bad::1]:443").status, 403, "a port is not part of the address");
    assert_eq!(from("/anything", "192.0.2.1").status, 200);
    // A blocked client cannot hide behind an entry of its own: the proxy appended its address.
    assert_eq!(from("/anything", "192.0.2.50, 203.0.113.7").status, 403);
    // Nor does claiming a blocked address matter when the proxy saw another one.
    assert_eq!(from("/anything", "203.0.113.7, 192.0.2.1").status, 200);
}

#[test]
fn auth_admits_an_allow_list_and_refuses_everyone_else() {
    for allowed in ["10.1.2.3", "2001:db8:10::5", "[2001:db8:10::5]:8443"] {
        let response = from("/admin/users", allowed);
        assert_eq!(response.status, 200, "{allowed}: {}", response.text());
    }
    for refused in ["192.0.2.1", "11.0.0.1", "2001:db8:11::1", "not-an-address", "10.0.0.1.5"] {
        let response = from("/admin/users", refused);
        assert_eq!(response.status, 403, "{refused}");
        assert_eq!(response.header("content-type").as_deref(), Some("application/problem+json"));
        assert!(response.json()["detail"].as_str().unwrap().contains("admin-elsewhere"), "{}", response.text());
    }
    assert_eq!(from("/public", "192.0.2.1").status, 200, "the allow list is only on /admin");
}

#[test]
fn bytes_no_address_holds_are_in_no_range_over_http2() {
    // Envoy's HTTP/2 codec hands 0x80-0xFF through in header values.
    let admin = raw::get(chain().envoy.listener, b"/admin", &[(b"x-forwarded-for", b"10.0.0.\xff")]).response();
    assert_eq!(admin.status, 403, "{}", admin.text());
    let plain = raw::get(chain().envoy.listener, b"/admin", &[(b"x-forwarded-for", b"10.0.0.7")]).response();
    assert_eq!(plain.status, 200, "{}", plain.text());
}

#[test]
fn a_rate_limit_rule_applies_to_one_network_only() {
    let statuses: Vec<u16> = (0..3).map(|_| from("/catalogue", "198.51.100.9").status).collect();
    assert_eq!(statuses, vec![200, 200, 429]);
    // Another address of the network has its own bucket (the rule keys on the client).
    assert_eq!(from("/catalogue", "198.51.100.10").status, 200);
    let elsewhere: Vec<u16> = (0..4).map(|_| from("/catalogue", "192.0.2.9").status).collect();
    assert_eq!(elsewhere, vec![200; 4], "no rule applies outside the network");
}

#[test]
fn a_bad_range_is_refused_naming_its_field() {
    let upstream = EchoUpstream::start("backend");
    assert_config_refused(
        &upstream,
        "routing",
        r#"{"routes": [{"name": "r", "match": {"client_ip": ["10.0.0.1/8"]}, "cluster": "backend"}]}"#,
        "routes[0].match.client_ip[0]: '10.0.0.1/8' has host bits set",
    );
    assert_config_refused(
        &upstream,
        "auth",
        r#"{"rules": [{"name": "r", "match": {"not": {"client_ip": ["bad"]}}, "deny": true}]}"#,
        "rules[0].match.not.client_ip[0]",
    );
    assert_config_refused(
        &upstream,
        "ratelimit",
        r#"{"client_ip": {"trusted_hops": 17}, "rules": [{"name": "r", "match": {"client_ip": []},
            "key": [{"constant": "x"}], "limits": [{"name": "l", "requests": 1, "per_seconds": 1}]}]}"#,
        "rules[0].match.client_ip: must list at least one",
    );
}
