//! auth.wasm's `mtls` method (issue 17 item 3) through real Envoy: a TLS
//! listener that verifies client certificates with a CA made by openssl at test
//! time; the consumer comes from the certificate Envoy verified (URI SAN / SPIFFE
//! ID, SAN prefix, fingerprint or subject), combinable with other methods.

use std::sync::OnceLock;

use gateway_tests::client::Response;
use gateway_tests::envoy::{DownstreamTls, Envoy, EnvoyConfig, WasmFilter};
use gateway_tests::tls::{https_get, Authority, CertifiedKey};
use gateway_tests::upstream::EchoUpstream;
use serde_json::json;

struct Clients {
    billing: CertifiedKey,
    web: CertifiedKey,
    ops: CertifiedKey,
    partner: CertifiedKey,
    stranger: CertifiedKey,
    untrusted: CertifiedKey,
}

struct Gateway {
    envoy: Envoy,
    ca: std::path::PathBuf,
    clients: Clients,
    _backend: EchoUpstream,
}

fn gateway() -> &'static Gateway {
    static GATEWAY: OnceLock<Gateway> = OnceLock::new();
    GATEWAY.get_or_init(|| {
        let authority = Authority::new("gateway");
        let clients = Clients {
            billing: authority.client("billing", "/O=Example/CN=billing", &["URI:spiffe://example.org/ns/billing/sa/api"]),
            web: authority.client("web", "/O=Example/CN=web", &["URI:spiffe://example.org/ns/prod/sa/web"]),
            ops: authority.client("ops", "/CN=ops", &[]),
            partner: authority.client("partner", "/C=DE/O=Partner Inc/CN=partner", &[]),
            stranger: authority.client("stranger", "/CN=stranger", &["URI:spiffe://example.org/ns/dev/sa/x"]),
            untrusted: Authority::new("elsewhere").client("billing", "/O=Example/CN=billing",
                &["URI:spiffe://example.org/ns/billing/sa/api"]),
        };
        let backend = EchoUpstream::start("backend");
        let auth = json!({
            "mtls": {"consumers": [
                {"consumer": "billing", "uri_san": "spiffe://example.org/ns/billing/sa/api", "groups": ["internal"]},
                {"consumer": "prod-workload", "uri_san_prefix": "spiffe://example.org/ns/prod/"},
                {"consumer": "ops", "sha256": clients.ops.sha256()},
                {"consumer": "partner", "subject": "CN=partner,O=Partner Inc,C=DE"}]},
            "api_keys": {"from": [{"header": "x-api-key"}],
                         "keys": [{"consumer": "shop", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}]},
            "rules": [
                {"name": "internal", "match": {"path": {"prefix": "/internal"}}, "require": {"any": ["mtls"]},
                 "groups": ["internal"]},
                {"name": "mixed", "match": {"path": {"prefix": "/mixed"}}, "require": {"any": ["mtls", "api_key"]}},
                {"name": "services", "require": {"any": ["mtls"]}}]});
        let tls = DownstreamTls {
            server: authority.server(),
            client_ca: authority.root.cert.clone(),
            require_client_certificate: false,
        };
        let config = EnvoyConfig::new(&backend).tls(tls).filter(WasmFilter::new("auth", auth));
        let envoy = Envoy::start(&config);
        Gateway { envoy, ca: authority.root.cert.clone(), clients, _backend: backend }
    })
}

fn get(path: &str, client: Option<&CertifiedKey>, headers: &[(&str, &str)]) -> Result<Response, String> {
    let gateway = gateway();
    https_get(gateway.envoy.listener, path, headers, &gateway.ca, client)
}

fn consumer_of(response: &Response) -> Option<String> {
    response.echo().header("x-consumer").map(str::to_string)
}

#[test]
fn the_verified_certificate_names_the_consumer() {
    let clients = &gateway().clients;
    for (client, consumer) in [
        (&clients.billing, "billing"),
        (&clients.web, "prod-workload"),
        (&clients.ops, "ops"),
        (&clients.partner, "partner"),
    ] {
        // A client cannot claim another consumer with a header of its own.
        let response = get("/orders", Some(client), &[("x-consumer", "admin")]).unwrap();
        assert_eq!(response.status, 200, "{consumer}: {}", response.text());
        assert_eq!(consumer_of(&response).as_deref(), Some(consumer));
    }
}

#[test]
fn no_certificate_an_unmapped_one_or_an_untrusted_one_gets_nowhere() {
    let clients = &gateway().clients;
    let missing = get("/orders", None, &[]).unwrap();
    assert_eq!(missing.status, 403, "{}", missing.text());
    assert_eq!(missing.json()["type"], "urn:wasm-gateway:problem:client-certificate-required");
    assert!(missing.header("www-authenticate").is_none(), "no HTTP challenge for a certificate");
    let stranger = get("/orders", Some(&clients.stranger), &[]).unwrap();
    assert_eq!(stranger.status, 403, "{}", stranger.text());
    assert_eq!(stranger.json()["type"], "urn:wasm-gateway:problem:client-certificate-refused");
    // Envoy refuses a certificate its CA did not sign before any filter runs.
    let untrusted = get("/orders", Some(&clients.untrusted), &[]);
    assert!(untrusted.is_err(), "{:?}", untrusted.map(|response| response.status));
    let metrics = gateway().envoy.stats();
    assert!(metrics.get("wasmcustom.auth.denied.unknown_certificate").copied().unwrap_or_default() >= 1, "{metrics:?}");
}

#[test]
fn certificates_combine_with_other_methods_and_acls() {
    let clients = &gateway().clients;
    let by_key = get("/mixed", None, &[("x-api-key", "test")]).unwrap();
    assert_eq!((by_key.status, consumer_of(&by_key).as_deref()), (200, Some("shop")));
    let by_certificate = get("/mixed", Some(&clients.ops), &[]).unwrap();
    assert_eq!((by_certificate.status, consumer_of(&by_certificate).as_deref()), (200, Some("ops")));
    let neither = get("/mixed", None, &[]).unwrap();
    assert_eq!(neither.status, 401, "an API key would do: challenge for it");
    assert!(neither.header("www-authenticate").is_some_and(|challenge| challenge.starts_with("ApiKey")));
    // The group comes with the certificate's consumer.
    assert_eq!(get("/internal/jobs", Some(&clients.billing), &[]).unwrap().status, 200);
    let outsider = get("/internal/jobs", Some(&clients.web), &[]).unwrap();
    assert_eq!(outsider.status, 403);
    assert_eq!(outsider.json()["type"], "urn:wasm-gateway:problem:consumer-not-allowed");
}
