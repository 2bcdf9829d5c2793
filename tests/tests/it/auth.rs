//! auth.wasm through real Envoy: tokens signed here with the committed key
//! fixtures, JWKS served by an echo upstream, the echo showing what reached it.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use gateway_tests::client::Response;
use gateway_tests::envoy::{assert_config_refused, Envoy, EnvoyConfig, WasmFilter};
use gateway_tests::tokens::{fixture, now, sign};
use gateway_tests::upstream::{EchoUpstream, Reply};
use gateway_tests::wait_until;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const ISSUER: &str = "https://idp.test";
fn claims(sub: &str) -> Value {
    json!({"iss": ISSUER, "aud": "orders-api", "sub": sub, "iat": now() - 5, "exp": now() + 600,
           "scope": "orders:read profile", "tenant": "acme", "roles": ["admin", "ops"], "org": {"id": 42}})
}

fn rs256(sub: &str) -> String {
    sign(Algorithm::RS256, "rsa-1", &claims(sub))
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

fn auth_config(provider_keys: Value) -> Value {
    let mut provider = json!({
        "name": "idp", "issuer": ISSUER, "audiences": ["orders-api"], "required_claims": ["sub"],
        "claims_to_headers": [
            {"claim": "sub", "header": "x-user-id"},
            {"claim": "roles", "header": "x-roles"},
            {"claim": "org.id", "header": "x-org-id"}
        ],
        "payload_header": "x-jwt-payload",
        "groups_claim": "roles"
    });
    for (key, value) in provider_keys.as_object().unwrap() {
        provider[key] = value.clone();
    }
    let basic_hash =
        bcrypt::hash_with_salt("open-sesame", 6, [9u8; 16]).unwrap().format_for_version(bcrypt::Version::TwoB);
    json!({
        "providers": [provider],
        "api_keys": {"from": [{"header": "x-api-key"}, {"query": "api_key"}],
                     "keys": [{"consumer": "acme-shop", "sha256": sha256_hex("key-acme-123")}]},
        // `lockout` is locked out by its own test; `ops` stays usable by the tests sharing this Envoy.
        "basic": {"users": [{"username": "ops", "bcrypt": basic_hash, "consumer": "ops-team", "groups": ["night-shift"]},
                            {"username": "lockout", "bcrypt": basic_hash, "consumer": "lockout-test"}],
                  "max_failures": 3},
        "rules": [
            {"name": "health", "match": {"path": {"exact": "/health"}}, "allow_anonymous": true},
            {"name": "orders-write", "match": {"path": {"prefix": "/orders"}, "methods": ["POST"]},
             "require": {"any": ["idp"]}, "scopes": ["orders:write"]},
            {"name": "orders", "match": {"path": {"prefix": "/orders"}}, "require": {"any": ["idp"]},
             "scopes": ["orders:read"], "claims": {"tenant": ["acme"]}},
            {"name": "products", "match": {"path": {"prefix": "/products"}}, "require": {"any": ["api_key"]}},
            {"name": "ops", "match": {"path": {"prefix": "/ops"}}, "require": {"any": ["basic"]}},
            {"name": "acl", "match": {"path": {"prefix": "/acl"}}, "require": {"any": ["api_key", "idp", "basic"]},
             "consumers": ["acme-shop"], "groups": ["ops"]},
            {"name": "feed", "match": {"path": {"prefix": "/feed"}}, "require": {"any": ["idp"]}, "allow_missing": true},
            {"name": "public", "match": {"path": {"prefix": "/public"}}, "require": {"any": ["idp"]},
             "allow_missing_or_failed": true}
        ],
        "result_header": "x-auth-result"
    })
}

struct Fixture {
    envoy: Envoy,
    upstream: EchoUpstream,
}

/// One Envoy with inline JWKS for the read-only tests below.
fn shared() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let upstream = EchoUpstream::start("backend");
        let jwks: Value = serde_json::from_str(&fixture("jwks.json")).unwrap();
        let config = auth_config(json!({"jwks": jwks}));
        let envoy = Envoy::start(&EnvoyConfig::new(&upstream).filter(WasmFilter::new("auth", config)));
        Fixture { envoy, upstream }
    })
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn assert_invalid_token(response: &Response, expected_reason: &str, token: &str) {
    assert_eq!(response.status, 401, "{}", response.text());
    let challenge = response.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer realm=\"gateway\""), "{challenge}");
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    assert_eq!(response.header("content-type").as_deref(), Some("application/problem+json"));
    let detail = response.json()["detail"].as_str().unwrap_or_default().to_string();
    assert!(detail.contains(expected_reason), "detail `{detail}` should say `{expected_reason}`");
    assert!(!response.text().contains(token), "the answer must not echo the token");
}

#[test]
fn every_algorithm_is_accepted_and_claims_reach_the_upstream() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let signed = [
        (Algorithm::RS256, "rsa-1"),
        (Algorithm::RS384, "rsa-1"),
        (Algorithm::RS512, "rsa-1"),
        (Algorithm::PS256, "rsa-1"),
        (Algorithm::PS384, "rsa-1"),
        (Algorithm::PS512, "rsa-1"),
        (Algorithm::ES256, "ec-256"),
        (Algorithm::ES384, "ec-384"),
        (Algorithm::EdDSA, "ed-1"),
        (Algorithm::HS256, "hs-1"),
    ]
    .into_iter()
    .map(|(alg, kid)| (format!("{alg:?}"), sign(alg, kid, &claims("alice"))))
    // jsonwebtoken cannot sign ES512: openssl does (and is another implementation).
    .chain([("ES512".to_string(), gateway_tests::tokens::sign_es512_with_openssl("ec-521", &claims("alice")))]);
    for (alg, token) in signed {
        let response = fx.envoy.get("/orders/1").header("authorization", bearer(&token)).send();
        assert_eq!(response.status, 200, "{alg}: {}", response.text());
        let echo = response.echo();
        assert_eq!(echo.header("x-user-id"), Some("alice"));
        assert_eq!(echo.header("x-consumer"), Some("alice"));
        assert_eq!(echo.header("x-roles"), Some("admin,ops"), "arrays are joined");
        assert_eq!(echo.header("x-org-id"), Some("42"), "dotted claim paths");
        assert_eq!(echo.header("authorization"), None, "the token is stripped before forwarding");
        let payload: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(echo.header("x-jwt-payload").unwrap()).unwrap()).unwrap();
        assert_eq!(payload["sub"], "alice");
    }
}

#[test]
fn invalid_tokens_get_401_with_the_reason_and_never_reach_the_backend() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let before = fx.upstream.served_path("/orders/secret");
    let mut expired = claims("a");
    expired["exp"] = json!(now() - 3600);
    let mut early = claims("a");
    early["nbf"] = json!(now() + 3600);
    let mut issuer = claims("a");
    issuer["iss"] = json!("https://evil.test");
    let mut audience = claims("a");
    audience["aud"] = json!("another-api");
    let wrong_key = {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        encode(&header, &claims("a"), &EncodingKey::from_rsa_pem(fixture("rsa2.pem").as_bytes()).unwrap()).unwrap()
    };
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"rsa-1"}"#),
        URL_SAFE_NO_PAD.encode(claims("a").to_string())
    );
    let confusion = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa-1".into());
        encode(&header, &claims("a"), &EncodingKey::from_secret(fixture("rsa.pub.pem").as_bytes()).unwrap()).unwrap()
    };
    for (token, reason) in [
        (sign(Algorithm::RS256, "rsa-1", &expired), "token expired"),
        (sign(Algorithm::RS256, "rsa-1", &early), "not yet valid"),
        (sign(Algorithm::RS256, "rsa-1", &issuer), "wrong issuer"),
        (sign(Algorithm::RS256, "rsa-1", &audience), "wrong audience"),
        (wrong_key, "bad signature"),
        (none.clone(), "algorithm none is not accepted"),
        (confusion, "unknown signing key"),
        ("not.a.jwt".to_string(), "malformed"),
        (format!("{}.e30.sig", URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","crit":["x"]}"#)), "critical"),
    ] {
        let response = fx.envoy.get("/orders/secret").header("authorization", bearer(&token)).send();
        assert_invalid_token(&response, reason, &token);
    }
    assert_eq!(fx.upstream.served_path("/orders/secret"), before);

    let missing = fx.envoy.get("/orders/secret").send();
    assert_eq!(missing.status, 401);
    assert_eq!(missing.header("www-authenticate").as_deref(), Some("Bearer realm=\"gateway\""));
}

/// Issue 17 item 4: consumer ACLs. A rule admits listed consumers or members
/// of listed groups (configured for API-key and basic consumers, a claim for
/// tokens); every other authenticated consumer gets 403.
#[test]
fn consumer_acls_admit_listed_consumers_and_groups_only() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    assert_eq!(envoy.get("/acl").header("x-api-key", "key-acme-123").send().status, 200, "a listed consumer");
    assert_eq!(envoy.get("/acl").header("authorization", bearer(&rs256("dave"))).send().status, 200, "roles has ops");
    let guest = sign(
        Algorithm::RS256,
        "rsa-1",
        &json!({"iss": ISSUER, "aud": "orders-api", "sub": "eve",
        "iat": now() - 5, "exp": now() + 600, "roles": ["guest"]}),
    );
    let denied = envoy.get("/acl").header("authorization", bearer(&guest)).send();
    assert_eq!(denied.status, 403);
    assert_eq!(denied.json()["type"], "urn:wasm-gateway:problem:consumer-not-allowed");
    let basic = format!("Basic {}", STANDARD.encode("ops:open-sesame"));
    assert_eq!(envoy.get("/acl").header("authorization", basic).send().status, 403, "night-shift is not ops");
}

/// Issue 17 item 5: optional tokens (jwt_authn's allow_missing and
/// allow_missing_or_failed); the upstream learns which happened.
#[test]
fn optional_tokens_pass_anonymously_and_the_upstream_is_told() {
    let fx = shared();
    let envoy = &fx.envoy;
    let _log = envoy.log_on_failure();
    let good = rs256("carol");
    let expired =
        sign(Algorithm::RS256, "rsa-1", &json!({"iss": ISSUER, "aud": "orders-api", "sub": "x", "exp": now() - 3600}));
    let anonymous = envoy.get("/feed").header("x-user-id", "spoofed").header("x-auth-result", "authenticated").send();
    assert_eq!(anonymous.status, 200);
    let echo = anonymous.echo();
    assert_eq!(echo.header("x-auth-result"), Some("anonymous"), "the client's own value is replaced");
    assert_eq!(echo.header("x-user-id"), None, "no identity, and the spoofed one is gone");
    let signed = envoy.get("/feed").header("authorization", bearer(&good)).send();
    assert_eq!(signed.echo().header("x-auth-result"), Some("authenticated"));
    assert_eq!(signed.echo().header("x-user-id"), Some("carol"));
    assert_invalid_token(&envoy.get("/feed").header("authorization", bearer(&expired)).send(), "expired", &expired);
    let failed = envoy.get("/public").header("authorization", bearer(&expired)).send();
    assert_eq!(failed.status, 200, "allow_missing_or_failed lets a bad token through");
    assert_eq!(failed.echo().header("x-auth-result"), Some("failed"));
    assert_eq!(failed.echo().header("x-user-id"), None);
    assert_eq!(envoy.get("/public").send().echo().header("x-auth-result"), Some("anonymous"));
}

#[test]
fn scopes_and_claims_are_enforced_with_403() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let token = rs256("bob");
    let write = fx.envoy.request("POST", "/orders").header("authorization", bearer(&token)).send();
    assert_eq!(write.status, 403);
    let challenge = write.header("www-authenticate").unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\"") && challenge.contains("scope=\"orders:write\""),
        "{challenge}"
    );
    let mut other_tenant = claims("carol");
    other_tenant["tenant"] = json!("globex");
    let response = fx
        .envoy
        .get("/orders/1")
        .header("authorization", bearer(&sign(Algorithm::RS256, "rsa-1", &other_tenant)))
        .send();
    assert_eq!(response.status, 403);
    assert_eq!(response.json()["type"], "urn:wasm-gateway:problem:claim-mismatch");
    assert_eq!(fx.envoy.get("/unlisted").header("authorization", bearer(&token)).send().status, 403, "default deny");
}

#[test]
fn api_keys_basic_auth_and_the_failed_login_lock() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let good = fx.envoy.get("/products/1").header("x-api-key", "key-acme-123").send();
    assert_eq!(good.status, 200);
    assert_eq!(good.echo().header("x-consumer"), Some("acme-shop"));
    assert_eq!(good.echo().header("x-api-key"), None, "the key is stripped");
    let query = fx.envoy.get("/products/1?api_key=key-acme-123&color=red").send();
    assert_eq!(query.status, 200);
    assert_eq!(query.echo().query(), Some("color=red"), "the key is removed from the query");
    assert_eq!(fx.envoy.get("/products/1").header("x-api-key", "key-acme-124").send().status, 401);

    let basic = |user: &str, password: &str| {
        fx.envoy
            .get("/ops/status")
            .header("authorization", format!("Basic {}", STANDARD.encode(format!("{user}:{password}"))))
            .send()
    };
    let ok = basic("ops", "open-sesame");
    assert_eq!(ok.status, 200);
    assert_eq!(ok.echo().header("x-consumer"), Some("ops-team"));
    for _ in 0..5 {
        assert_eq!(basic("ops", "open-sesame").status, 200);
    }
    let hashes = "wasmcustom.auth.basic.hash_computations";
    assert!(fx.envoy.stat(hashes) <= 2, "successful checks are cached per worker: {} hashes", fx.envoy.stat(hashes));
    let denied = basic("lockout", "wrong");
    assert_eq!(denied.status, 401);
    assert!(denied.header_all("www-authenticate").iter().any(|c| c.starts_with("Basic realm=\"gateway\"")));
    // max_failures is 3, counted across all workers (shared data): the 4th wrong attempt is refused.
    assert_eq!(basic("lockout", "wrong").status, 401);
    assert_eq!(basic("lockout", "wrong").status, 401);
    let locked = basic("lockout", "wrong");
    assert_eq!(locked.status, 429, "{}", locked.text());
    assert!(locked.header("retry-after").is_some());
    let hashes_when_locked = fx.envoy.stat(hashes);
    for _ in 0..6 {
        assert_eq!(basic("lockout", "wrong").status, 429, "locked on every worker");
    }
    assert_eq!(fx.envoy.stat(hashes), hashes_when_locked, "locked attempts cost no bcrypt work");
    assert_eq!(basic("ops", "open-sesame").status, 200, "the lock is per user");
}

#[test]
fn spoofed_identity_headers_and_bad_input_are_handled() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let spoofed = fx.envoy.get("/health").header("x-user-id", "admin").header("x-consumer", "root").send();
    assert_eq!(spoofed.status, 200);
    assert_eq!(spoofed.echo().header("x-user-id"), None, "client-supplied identity headers never pass");
    assert_eq!(spoofed.echo().header("x-consumer"), None);

    let token = rs256("dave");
    let twice = fx
        .envoy
        .get("/orders/1")
        .header("authorization", bearer(&token))
        .header("authorization", bearer(&token))
        .send();
    assert_eq!(twice.status, 400, "several Authorization headers are never resolved by picking one");

    let grpc = fx.envoy.request("POST", "/orders/Get").header("content-type", "application/grpc").send();
    assert_eq!(grpc.header("grpc-status").as_deref(), Some("16"), "UNAUTHENTICATED: {:?}", grpc.headers);

    for value in [&b"Bearer \xff\xfe\xfd"[..], b"Bearer", b"Basic \x80"] {
        let response = fx.envoy.get("/orders/1").header("authorization", value).send();
        assert_eq!(response.status, 401);
    }
    let huge = format!("{}.{}.{}", "a".repeat(7000), "b".repeat(7000), "c".repeat(6000));
    assert_eq!(fx.envoy.get("/orders/1").header("authorization", bearer(&huge)).send().status, 401);
    // The VM still serves.
    assert_eq!(fx.envoy.get("/orders/1").header("authorization", bearer(&token)).send().status, 200);
}

#[test]
fn verified_tokens_are_cached_and_metrics_move() {
    let fx = shared();
    let _log = fx.envoy.log_on_failure();
    let token = sign(Algorithm::ES256, "ec-256", &claims("erin"));
    let hits = "wasmcustom.auth.token_cache.hits";
    let before = fx.envoy.stat(hits);
    let allowed_before = fx.envoy.stat("wasmcustom.auth.allowed");
    for _ in 0..6 {
        assert_eq!(fx.envoy.get("/orders/1").header("authorization", bearer(&token)).send().status, 200);
    }
    // Two workers: at most two misses, the rest hits.
    assert!(wait_until(Duration::from_secs(5), || fx.envoy.stat(hits) >= before + 4));
    assert!(fx.envoy.stat("wasmcustom.auth.allowed") >= allowed_before + 6);
    let mut expired = claims("a");
    expired["exp"] = json!(now() - 3600);
    let denied_before = fx.envoy.stat("wasmcustom.auth.denied.expired");
    fx.envoy.get("/orders/1").header("authorization", bearer(&sign(Algorithm::RS256, "rsa-1", &expired))).send();
    assert!(wait_until(Duration::from_secs(5), || fx.envoy.stat("wasmcustom.auth.denied.expired") > denied_before));
    assert!(fx.envoy.prometheus().contains("auth_denied"));
}

fn remote_config(cluster: &str) -> Value {
    auth_config(json!({"remote_jwks": {"cluster": cluster, "path": "/jwks", "timeout_ms": 1500,
                                        "refresh_seconds": 300, "refetch_cooldown_seconds": 1}}))
}

fn start_remote(jwks_reply: Reply) -> (Envoy, EchoUpstream, EchoUpstream) {
    let backend = EchoUpstream::start("backend");
    let idp = EchoUpstream::start("idp");
    idp.script("/jwks", jwks_reply);
    let envoy =
        Envoy::start(&EnvoyConfig::new(&backend).cluster(&idp).filter(WasmFilter::new("auth", remote_config("idp"))));
    (envoy, backend, idp)
}

fn jwks_reply(documents: &[&str]) -> Reply {
    let mut keys = Vec::new();
    for document in documents {
        let parsed: Value = serde_json::from_str(&fixture(document)).unwrap();
        keys.extend(parsed["keys"].as_array().unwrap().iter().cloned());
    }
    Reply::status(200).header("content-type", "application/json").body(json!({"keys": keys}).to_string())
}

#[test]
fn remote_jwks_rotation_and_outage() {
    let (envoy, _backend, idp) = start_remote(jwks_reply(&["jwks.json"]));
    let _log = envoy.log_on_failure();
    // The first request waits for the fetch instead of failing.
    let first = envoy.get("/orders/1").header("authorization", bearer(&rs256("frank"))).send();
    assert_eq!(first.status, 200, "{}", first.text());
    assert!(idp.served_path("/jwks") >= 1);

    // Rotation: a token signed by a new key is accepted without a restart.
    idp.script("/jwks", jwks_reply(&["jwks.json", "jwks-rotated.json"]));
    let rotated = sign(Algorithm::RS256, "rsa-2", &claims("grace"));
    let accepted = wait_until(Duration::from_secs(5), || {
        envoy.get("/orders/1").header("authorization", bearer(&rotated)).send().status == 200
    });
    assert!(accepted, "the rotated key was never fetched");

    // Outage: the IdP fails; the last good keys keep working (fresh tokens, not cached).
    idp.script("/jwks", Reply::status(503).body("down"));
    let fetches = idp.served_path("/jwks");
    let unknown = sign(Algorithm::RS256, "rsa-9", &claims("mallory"));
    // Once the 1 s refetch cooldown has passed, an unknown kid triggers a (failing) refetch.
    let refetched = wait_until(Duration::from_secs(5), || {
        assert_eq!(envoy.get("/orders/1").header("authorization", bearer(&unknown)).send().status, 401);
        idp.served_path("/jwks") > fetches
    });
    assert!(refetched, "the unknown kid never triggered a refetch");
    for user in ["heidi", "ivan", "judy"] {
        let response = envoy.get("/orders/1").header("authorization", bearer(&rs256(user))).send();
        assert_eq!(response.status, 200, "{}", response.text());
        let rotated_user = sign(Algorithm::RS256, "rsa-2", &claims(user));
        assert_eq!(envoy.get("/orders/1").header("authorization", bearer(&rotated_user)).send().status, 200);
    }
    assert!(wait_until(Duration::from_secs(5), || envoy.stat("wasmcustom.auth.jwks.fetch_failed") >= 1));
    assert!(envoy.stat("wasmcustom.auth.jwks.fetch_ok") >= 2);
}

#[test]
fn a_slow_jwks_delays_the_first_request_instead_of_failing_it() {
    let (envoy, _backend, _idp) = start_remote(jwks_reply(&["jwks.json"]).delay(Duration::from_millis(600)));
    let _log = envoy.log_on_failure();
    let started = Instant::now();
    let response = envoy.get("/orders/1").header("authorization", bearer(&rs256("kim"))).send();
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(started.elapsed() < Duration::from_millis(1500), "bounded by the fetch, not the timeout");
}

#[test]
fn a_missing_jwks_cluster_is_reported_and_answered_401() {
    let backend = EchoUpstream::start("backend");
    let envoy =
        Envoy::start(&EnvoyConfig::new(&backend).filter(WasmFilter::new("auth", remote_config("no-such-cluster"))));
    let _log = envoy.log_on_failure();
    let token = rs256("leo");
    let response = envoy.get("/orders/1").header("authorization", bearer(&token)).send();
    assert_invalid_token(&response, "unknown signing key", &token);
    assert!(wait_until(Duration::from_secs(5), || envoy
        .log()
        .contains("cannot fetch the JWKS from cluster `no-such-cluster`")));
    assert!(envoy.stat("wasmcustom.auth.jwks.fetch_failed") >= 1);
}

#[test]
fn invalid_configuration_is_refused_with_the_field_named() {
    let upstream = EchoUpstream::start("backend");
    let jwks: Value = serde_json::from_str(&fixture("jwks.json")).unwrap();
    for (config, field) in [
        (json!({"providers": [{"name": "idp", "audiance": ["x"], "jwks": jwks}]}), "unknown field `audiance`"),
        (json!({"api_keys": {"keys": [{"consumer": "a", "sha256": "key-acme-123"}]}}), "api_keys.keys[0].sha256"),
        (json!({"rules": [{"name": "r", "require": {"any": ["ghost"]}}]}), "rules[0].require[0]"),
        (
            json!({"providers": [{"name": "idp", "jwks": {"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}}]}),
            "providers[0].jwks",
        ),
        (json!({"providers": [{"name": "idp", "algorithms": ["none"], "jwks": jwks}]}), "providers[0].algorithms[0]"),
    ] {
        assert_config_refused(&upstream, "auth", &config.to_string(), field);
    }
}

#[test]
fn two_instances_keep_their_own_counters() {
    let upstream = EchoUpstream::start("backend");
    let open = json!({"rules": [{"name": "all", "allow_anonymous": true}]});
    let config = EnvoyConfig::new(&upstream)
        .filter(WasmFilter::new("auth", open.clone()).vm_id("edge"))
        .filter(WasmFilter::new("auth", open).vm_id("internal"));
    let envoy = Envoy::start(&config);
    let _log = envoy.log_on_failure();
    assert_eq!(envoy.get("/x").send().status, 200);
    assert!(wait_until(Duration::from_secs(5), || envoy.stat("wasmcustom.auth.edge.allowed") == 1));
    assert_eq!(envoy.stat("wasmcustom.auth.internal.allowed"), 1);
    assert_eq!(envoy.stat("wasmcustom.auth.allowed"), 0, "no merged counter");
}
