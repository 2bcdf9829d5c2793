//! Opaque tokens: RFC 7662 token introspection at the IdP's endpoint, with the
//! answers (active and inactive) cached in shared data for every worker. Plain
//! Rust: the request to send, the answer's meaning and the cache format; the
//! glue dispatches the call and stores what this returns.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use gateway_common::config::ConfigErrors;
use gateway_common::shared::{Store, StoreError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionSpec {
    /// Envoy cluster of the IdP.
    pub cluster: String,
    /// The introspection endpoint's path (`/oauth2/introspect`).
    pub path: String,
    /// `:authority` of the call; defaults to the cluster name.
    pub authority: Option<String>,
    /// The gateway's client credentials at the IdP (HTTP Basic, RFC 6749 §2.3.1).
    pub client_id: String,
    pub client_secret: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// An active answer is reused at most this long (never past the token's `exp`).
    #[serde(default = "default_max_ttl")]
    pub cache_max_ttl_seconds: u64,
    /// An inactive answer (unknown, expired, revoked token) is reused this long.
    #[serde(default = "default_inactive_ttl")]
    pub cache_inactive_ttl_seconds: u64,
    /// Cache slots in shared data (bounds its memory; a slot holds one token).
    #[serde(default = "default_cache_slots")]
    pub cache_slots: u32,
    #[serde(default)]
    pub on_failure: OnFailure,
}

fn default_timeout_ms() -> u64 {
    500
}
fn default_max_ttl() -> u64 {
    300
}
fn default_inactive_ttl() -> u64 {
    30
}
fn default_cache_slots() -> u32 {
    4096
}

/// What a request gets when the IdP cannot answer (down, slow, not RFC 7662).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// `503` with `Retry-After`: the gateway cannot judge the token now.
    #[default]
    Unavailable,
    /// `401 invalid_token`: clients that refresh tokens on 401 get a new one.
    RejectToken,
}

/// A compiled introspection endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introspection {
    pub cluster: String,
    pub path: String,
    pub authority: String,
    /// `Basic base64(urlencode(id) ":" urlencode(secret))`.
    authorization: String,
    pub timeout_ms: u64,
    pub max_ttl_seconds: u64,
    pub inactive_ttl_seconds: u64,
    pub slots: u32,
    pub on_failure: OnFailure,
}

impl IntrospectionSpec {
    pub fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<Introspection> {
        let errors_before = errors.messages().len();
        if self.cluster.is_empty() {
            errors.add(format!("{field}.cluster"), "must name an Envoy cluster");
        }
        errors.check_path(format!("{field}.path"), &self.path);
        let authority = self.authority.clone().unwrap_or_else(|| self.cluster.clone());
        errors.check_authority(format!("{field}.authority"), &authority);
        for (name, value) in [("client_id", &self.client_id), ("client_secret", &self.client_secret)] {
            if value.is_empty() {
                errors.add(format!("{field}.{name}"), "must not be empty");
            }
        }
        if !(1..=10_000).contains(&self.timeout_ms) {
            errors.add(format!("{field}.timeout_ms"), "must be between 1 and 10000");
        }
        if self.cache_max_ttl_seconds > 3_600 || self.cache_inactive_ttl_seconds > 3_600 {
            errors.add(format!("{field}.cache_max_ttl_seconds"), "cache TTLs must be at most 3600");
        }
        if !(1..=1_000_000).contains(&self.cache_slots) {
            errors.add(format!("{field}.cache_slots"), "must be between 1 and 1000000");
        }
        let credentials = format!("{}:{}", form_encode(&self.client_id), form_encode(&self.client_secret));
        (errors.messages().len() == errors_before).then(|| Introspection {
            cluster: self.cluster.clone(),
            path: self.path.clone(),
            authority,
            authorization: format!("Basic {}", STANDARD.encode(credentials)),
            timeout_ms: self.timeout_ms,
            max_ttl_seconds: self.cache_max_ttl_seconds,
            inactive_ttl_seconds: self.cache_inactive_ttl_seconds,
            slots: self.cache_slots,
            on_failure: self.on_failure,
        })
    }
}

/// `application/x-www-form-urlencoded` of one value: unreserved characters as
/// they are, everything else `%XX` (a space too: unambiguous for every parser).
pub fn form_encode(value: &str) -> String {
    gateway_common::field::percent_escape(value.as_bytes(), |byte| {
        byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)
    })
}

impl Introspection {
    /// The headers and body of the introspection call for `token` (RFC 7662 §2.1).
    pub fn request(&self, token: &str) -> (Vec<(&'static str, String)>, Vec<u8>) {
        let headers = vec![
            (":method", "POST".to_string()),
            (":path", self.path.clone()),
            (":authority", self.authority.clone()),
            ("content-type", "application/x-www-form-urlencoded".to_string()),
            ("accept", "application/json".to_string()),
            ("authorization", self.authorization.clone()),
        ];
        let body = format!("token={}&token_type_hint=access_token", form_encode(token)).into_bytes();
        (headers, body)
    }

    /// When an answer given at `now` stops being reused.
    fn expiry_of(&self, answer: &Answer, now: u64) -> u64 {
        match answer {
            Answer::Active(claims) => {
                let cap = now.saturating_add(self.max_ttl_seconds);
                claims.get("exp").and_then(Value::as_u64).map_or(cap, |exp| exp.min(cap))
            }
            Answer::Inactive => now.saturating_add(self.inactive_ttl_seconds),
        }
    }
}

/// What the IdP said about a token.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `active: true`, with the response's members as claims (`sub`, `scope`, ...).
    Active(Value),
    Inactive,
}

/// Reads an introspection response: `200` with a JSON object whose `active` is a
/// boolean (RFC 7662 §2.2). Anything else is the IdP failing, not the token.
pub fn parse_answer(status: Option<u16>, body: &[u8]) -> Result<Answer, String> {
    if status != Some(200) {
        return Err(format!("status {}", status.map_or("none".to_string(), |status| status.to_string())));
    }
    let value: Value = serde_json::from_slice(body).map_err(|_| "the answer is not JSON".to_string())?;
    match value.get("active") {
        Some(Value::Bool(true)) if value.is_object() => Ok(Answer::Active(value)),
        Some(Value::Bool(false)) => Ok(Answer::Inactive),
        _ => Err("the answer has no boolean `active`".into()),
    }
}

/// Shared-data key of the cache slot for a token digest.
pub fn slot_key(prefix: &str, provider: &str, digest: &[u8; 32], slots: u32) -> String {
    let mut first = [0u8; 8];
    first.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    let slot = u64::from_le_bytes(first) % u64::from(slots.max(1));
    format!("{prefix}.introspection.{provider}.{slot}")
}

/// Cache entry: format version, the token's SHA-256, expiry (Unix seconds, u64
/// LE), active flag, then the claims as JSON (active answers only).
const ENTRY_VERSION: u8 = 1;
const HEADER_BYTES: usize = 1 + 32 + 8 + 1;

/// The cached answer for this token, if one is fresh (`now` < expiry).
pub fn cached(store: &impl Store, key: &str, digest: &[u8; 32], now: u64) -> Result<Option<Answer>, StoreError> {
    let (Some(entry), _) = store.get(key)? else { return Ok(None) };
    Ok(decode_entry(&entry, digest, now))
}

fn decode_entry(entry: &[u8], digest: &[u8; 32], now: u64) -> Option<Answer> {
    if entry.first() != Some(&ENTRY_VERSION) || entry.get(1..33)? != digest.as_slice() {
        return None;
    }
    let expires = u64::from_le_bytes(entry.get(33..41)?.try_into().ok()?);
    if now >= expires {
        return None;
    }
    match entry.get(41)? {
        0 => Some(Answer::Inactive),
        _ => serde_json::from_slice(entry.get(HEADER_BYTES..)?).ok().map(Answer::Active),
    }
}

/// Stores an answer for every worker (the slot's previous token is evicted).
pub fn store_answer(
    store: &impl Store,
    key: &str,
    introspection: &Introspection,
    digest: &[u8; 32],
    answer: &Answer,
    now: u64,
) -> Result<(), StoreError> {
    let expires = introspection.expiry_of(answer, now);
    if expires <= now {
        return Ok(());
    }
    let mut entry = Vec::with_capacity(HEADER_BYTES + 256);
    entry.push(ENTRY_VERSION);
    entry.extend_from_slice(digest);
    entry.extend_from_slice(&expires.to_le_bytes());
    match answer {
        Answer::Active(claims) => {
            entry.push(1);
            entry.extend_from_slice(claims.to_string().as_bytes());
        }
        Answer::Inactive => entry.push(0),
    }
    store.set(key, &entry, None).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::shared::MemoryStore;
    use serde_json::json;

    fn introspection() -> Introspection {
        let spec: IntrospectionSpec = serde_json::from_value(json!({
            "cluster": "idp", "path": "/token/introspection", "client_id": "gate way", "client_secret": "s3cr:t&",
            "cache_max_ttl_seconds": 300, "cache_inactive_ttl_seconds": 30}))
        .unwrap();
        let mut errors = ConfigErrors::new();
        spec.compile("providers[0].introspection", &mut errors).unwrap()
    }

    #[test]
    fn the_call_is_a_form_post_with_the_gateways_client_credentials() {
        let (headers, body) = introspection().request("a+b/c=d&e");
        assert!(
            headers.contains(&(":method", "POST".into()))
                && headers.contains(&(":path", "/token/introspection".into()))
        );
        assert!(headers.contains(&("content-type", "application/x-www-form-urlencoded".into())));
        // RFC 6749 §2.3.1: id and secret form-encoded before Basic.
        let expected = format!("Basic {}", STANDARD.encode("gate%20way:s3cr%3At%26"));
        assert!(headers.contains(&("authorization", expected)), "{headers:?}");
        assert_eq!(body, b"token=a%2Bb%2Fc%3Dd%26e&token_type_hint=access_token");
    }

    #[test]
    fn answers_are_active_inactive_or_a_failure_of_the_idp() {
        let active = parse_answer(Some(200), br#"{"active": true, "sub": "alice", "scope": "a b"}"#).unwrap();
        assert_eq!(active, Answer::Active(json!({"active": true, "sub": "alice", "scope": "a b"})));
        assert_eq!(parse_answer(Some(200), br#"{"active": false}"#), Ok(Answer::Inactive));
        for (status, body) in [
            (Some(200), &br#"{"active": "true"}"#[..]),
            (Some(200), b"{}"),
            (Some(200), b"not json"),
            (Some(200), b"[true]"),
            (Some(401), br#"{"active": true}"#),
            (None, b""),
        ] {
            assert!(parse_answer(status, body).is_err(), "{status:?} {:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn cached_answers_live_until_exp_capped_by_the_ttls() {
        let store = MemoryStore::default();
        let introspection = introspection();
        let digest = [7u8; 32];
        let key = slot_key("auth", "idp", &digest, introspection.slots);
        let now = 1_000;
        let active = Answer::Active(json!({"active": true, "sub": "alice", "exp": now + 60}));
        store_answer(&store, &key, &introspection, &digest, &active, now).unwrap();
        assert_eq!(cached(&store, &key, &digest, now + 59).unwrap(), Some(active.clone()));
        assert_eq!(cached(&store, &key, &digest, now + 60).unwrap(), None, "never past exp");
        assert_eq!(cached(&store, &key, &[8u8; 32], now).unwrap(), None, "another token in the slot");
        let long = Answer::Active(json!({"active": true, "exp": now + 100_000}));
        store_answer(&store, &key, &introspection, &digest, &long, now).unwrap();
        assert!(cached(&store, &key, &digest, now + 299).unwrap().is_some());
        assert_eq!(cached(&store, &key, &digest, now + 300).unwrap(), None, "capped by the max TTL");
        store_answer(&store, &key, &introspection, &digest, &Answer::Inactive, now).unwrap();
        assert_eq!(cached(&store, &key, &digest, now + 29).unwrap(), Some(Answer::Inactive));
        assert_eq!(cached(&store, &key, &digest, now + 30).unwrap(), None);
        // An already expired token is not stored at all.
        let expired = Answer::Active(json!({"active": true, "exp": now - 1}));
        let other = [9u8; 32];
        store_answer(&store, &key, &introspection, &other, &expired, now).unwrap();
        assert_eq!(cached(&store, &key, &other, now).unwrap(), None);
    }

    #[test]
    fn garbage_in_a_slot_is_a_miss() {
        let digest = [1u8; 32];
        for entry in
            [&b""[..], b"\x02", &[1u8; 10], &[[1u8].as_slice(), &[1u8; 32], &[0xff; 8], &[1], b"{bad"].concat()]
        {
            assert_eq!(decode_entry(entry, &digest, 0), None, "{entry:?}");
        }
    }

    #[test]
    fn bad_settings_are_refused_naming_the_field() {
        let spec: IntrospectionSpec = serde_json::from_value(json!({
            "cluster": "", "path": "introspect", "client_id": "", "client_secret": "x", "timeout_ms": 0,
            "cache_slots": 0}))
        .unwrap();
        let mut errors = ConfigErrors::new();
        assert!(spec.compile("p", &mut errors).is_none());
        let text = errors.messages().join("\n");
        for field in ["p.cluster", "p.path", "p.client_id", "p.timeout_ms", "p.cache_slots"] {
            assert!(text.contains(field), "{field}: {text}");
        }
    }
}
