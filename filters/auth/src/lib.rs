//! auth.wasm: authenticates (JWT, API keys, basic) and authorizes (rules, scopes,
//! claims) before anything reaches a backend. This file is the host glue; the
//! decision is in `policy.rs`, token checks in `jwt.rs`, credentials and caches in
//! `credentials.rs`, the shared remote JWKS in `jwks.rs`.

pub mod config;
pub mod credentials;
pub mod jwks;
pub mod jwt;
pub mod policy;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use gateway_common::config::load_plugin_config;
use gateway_common::host::{self, LogLevel, MapType};
use gateway_common::metrics::Metric;
use gateway_common::problem::RequestFacts;
use gateway_common::request::{percent_decode, ReadError, RequestHeaders};
use gateway_common::shared::{HostStore, Store};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use serde_json::Value;

use crate::config::{ArrayFormat, Auth, AuthConfig, Basic, Keys, Provider, RemoteJwksSpec, TokenSource};
use crate::credentials::{sha256, BasicChecker, BasicFailure, TokenCache};
use crate::jwks::RemoteKeys;
use crate::jwt::{JwtError, KeySet};
use crate::policy::{decide, Denial, Identity, JwtCheck, Outcome, Verifier};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(AuthRoot::default()) });
}}

/// Filter-state properties (Envoy: `wasm.auth_identity`, `wasm.auth_decision`).
const IDENTITY_PROPERTY: &str = "auth_identity";
const DECISION_PROPERTY: &str = "auth_decision";

struct Metrics {
    allowed: Metric,
    denied: HashMap<&'static str, Metric>,
    jwks_fetch_ok: Metric,
    jwks_fetch_failed: Metric,
    cache_hits: Metric,
    cache_misses: Metric,
    basic_hashes: Metric,
}

const DENIAL_REASONS: &[&str] = &[
    "missing",
    "malformed",
    "algorithm",
    "unknown_key",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "issuer",
    "audience",
    "missing_claim",
    "lifetime",
    "bad_password",
    "locked",
    "insufficient_scope",
    "claim_mismatch",
    "no_rule",
    "multiple_authorization",
];

impl Metrics {
    fn new() -> Self {
        Self {
            allowed: Metric::counter("auth.allowed"),
            denied: DENIAL_REASONS
                .iter()
                .map(|reason| (*reason, Metric::counter(&format!("auth.denied.{reason}"))))
                .collect(),
            jwks_fetch_ok: Metric::counter("auth.jwks.fetch_ok"),
            jwks_fetch_failed: Metric::counter("auth.jwks.fetch_failed"),
            cache_hits: Metric::counter("auth.token_cache.hits"),
            cache_misses: Metric::counter("auth.token_cache.misses"),
            basic_hashes: Metric::counter("auth.basic.hash_computations"),
        }
    }

    fn denied(&self, denial: &Denial) {
        let reason = match denial {
            Denial::MultipleAuthorization => "multiple_authorization",
            Denial::Missing(_) => "missing",
            Denial::Invalid { code, .. } => code,
            Denial::Locked { .. } => "locked",
            Denial::InsufficientScope { .. } => "insufficient_scope",
            Denial::ClaimMismatch { .. } => "claim_mismatch",
            Denial::NoRule => "no_rule",
        };
        if let Some(metric) = self.denied.get(reason) {
            metric.increment();
        }
    }
}

/// Per-VM mutable state shared by the root and every stream of this worker.
struct VmState {
    token_cache: TokenCache,
    basic: BasicChecker,
    /// Per provider index (only remote providers use theirs).
    remote: Vec<RemoteKeys>,
    /// Whether the missing-cluster problem was logged (once per VM and provider).
    warned: Vec<bool>,
}

struct Shared {
    auth: Auth,
    /// Headers this module sets, removed from every incoming request.
    identity_headers: Vec<String>,
    metrics: Metrics,
    state: RefCell<VmState>,
}

#[derive(Default)]
struct AuthRoot {
    shared: Option<Rc<Shared>>,
    /// Background fetches in flight: token -> provider index.
    fetches: HashMap<u32, usize>,
}

fn now_seconds() -> u64 {
    host::now_nanos() / 1_000_000_000
}

fn random_key() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut key = [0u8; 16];
    let a = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let b = std::collections::hash_map::RandomState::new().build_hasher().finish() ^ host::now_nanos();
    key[..8].copy_from_slice(&a.to_le_bytes());
    key[8..].copy_from_slice(&b.to_le_bytes());
    key
}

fn remote_spec(provider: &Provider) -> Option<&RemoteJwksSpec> {
    match &provider.keys {
        Keys::Remote(spec) => Some(spec),
        Keys::Static(_) => None,
    }
}

/// Starts a JWKS fetch; logs (once) and counts a failure to start.
fn start_fetch(shared: &Shared, index: usize) -> Option<u32> {
    let provider = shared.auth.providers.get(index)?;
    let spec = remote_spec(provider)?;
    let authority = spec.authority.clone().unwrap_or_else(|| spec.cluster.clone());
    let headers = [
        (":method", "GET"),
        (":path", spec.path.as_str()),
        (":authority", authority.as_str()),
        ("accept", "application/json"),
    ];
    match host::dispatch_http_call(&spec.cluster, &headers, Duration::from_millis(spec.timeout_ms)) {
        Ok(token) => Some(token),
        Err(error) => {
            shared.metrics.jwks_fetch_failed.increment();
            let mut state = shared.state.borrow_mut();
            if let Some(warned) = state.warned.get_mut(index) {
                if !*warned {
                    *warned = true;
                    host::log(
                        LogLevel::Error,
                        &format!(
                            "auth: provider {}: cannot fetch the JWKS from cluster `{}` ({error:?}): does the cluster exist?",
                            provider.name, spec.cluster
                        ),
                    );
                }
            }
            None
        }
    }
}

/// Reads the fetch answer being delivered, validates it, and publishes it.
fn finish_fetch(shared: &Shared, index: usize, body_size: usize) {
    let Some(provider) = shared.auth.providers.get(index) else { return };
    let status = host::header(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|status| std::str::from_utf8(&status).ok().and_then(|s| s.parse::<u16>().ok()));
    let body = if body_size > 0 { host::http_call_response_body(body_size).unwrap_or_default() } else { Vec::new() };
    let now = now_seconds();
    match jwks::validate_response(status, &body) {
        Ok(keys) => {
            shared.metrics.jwks_fetch_ok.increment();
            let version = host::now_nanos();
            let _ = jwks::publish(&HostStore, &provider.name, &body, now, version);
            if let Some(remote) = shared.state.borrow_mut().remote.get_mut(index) {
                remote.adopt(keys, now, version);
            }
        }
        Err(reason) => {
            shared.metrics.jwks_fetch_failed.increment();
            host::log(
                LogLevel::Warn,
                &format!("auth: provider {}: JWKS fetch failed: {reason}; keeping the last good keys", provider.name),
            );
        }
    }
}

impl Context for AuthRoot {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        if let (Some(index), Some(shared)) = (self.fetches.remove(&token_id), self.shared.as_ref()) {
            finish_fetch(shared, index, body_size);
        }
    }
}

impl RootContext for AuthRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(auth) = load_plugin_config("auth", AuthConfig::compile) else {
            return false;
        };
        let remote_names = auth.providers.iter().filter(|p| remote_spec(p).is_some()).map(|p| p.name.as_str());
        let users = auth.basic.as_ref().map_or(0, |basic| basic.users.len());
        let failure_keys = (0..users).try_for_each(|index| HostStore.ensure(&credentials::failure_key(index)));
        if jwks::initialize(&HostStore, remote_names).is_err() || failure_keys.is_err() {
            host::log(LogLevel::Error, "auth: cannot initialize shared data for remote JWKS");
            return false;
        }
        let has_remote = auth.providers.iter().any(|provider| remote_spec(provider).is_some());
        let state = VmState {
            token_cache: TokenCache::new(auth.token_cache.entries, auth.token_cache.max_ttl_seconds),
            basic: BasicChecker::new(random_key()),
            remote: vec![RemoteKeys::default(); auth.providers.len()],
            warned: vec![false; auth.providers.len()],
        };
        let identity_headers = auth.identity_headers();
        self.shared =
            Some(Rc::new(Shared { auth, identity_headers, metrics: Metrics::new(), state: RefCell::new(state) }));
        if has_remote {
            let _ = host::set_tick_period(Duration::from_secs(1));
        }
        true
    }

    /// Background refresh: every VM checks, one wins each provider's lease.
    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else { return };
        let now = now_seconds();
        for (index, provider) in shared.auth.providers.iter().enumerate() {
            let Some(spec) = remote_spec(provider) else { continue };
            let due = {
                let mut state = shared.state.borrow_mut();
                let Some(remote) = state.remote.get_mut(index) else { continue };
                let _ = remote.sync(&HostStore, &provider.name, now);
                remote.refresh_due(now, spec.refresh_seconds)
            };
            if due && self.fetches.values().all(|in_flight| *in_flight != index) {
                let claimed = jwks::try_claim(&HostStore, &jwks::attempt_key(&provider.name), now, jwks::RETRY_SECONDS);
                if claimed == Ok(true) {
                    if let Some(token) = start_fetch(&shared, index) {
                        self.fetches.insert(token, index);
                    }
                }
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        let providers = shared.auth.providers.len();
        Some(Box::new(AuthStream { shared, request: None, fetched: vec![false; providers], pending: None }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AuthStream {
    shared: Rc<Shared>,
    request: Option<RequestHeaders>,
    /// Providers whose keys this request already fetched (never twice).
    fetched: Vec<bool>,
    /// The JWKS fetch this request waits for: (token, provider).
    pending: Option<(u32, usize)>,
}

/// Credential checks backed by this worker's state and the shared JWKS.
struct StateVerifier<'a> {
    state: &'a mut VmState,
    metrics: &'a Metrics,
    fetched: &'a [bool],
    now: u64,
}

impl Verifier for StateVerifier<'_> {
    fn verify_jwt(&mut self, index: usize, provider: &Provider, token: &str) -> JwtCheck {
        let digest = sha256(token.as_bytes());
        if let Some(claims) = self.state.token_cache.get(&digest, index, self.now) {
            self.metrics.cache_hits.increment();
            return JwtCheck::Valid(claims);
        }
        self.metrics.cache_misses.increment();
        let already_fetched = self.fetched.get(index).copied().unwrap_or(true);
        let remote_keys: Rc<KeySet>;
        let keys: &KeySet = match &provider.keys {
            Keys::Static(keys) => keys,
            Keys::Remote(_) => {
                let Some(remote) = self.state.remote.get_mut(index) else {
                    return JwtCheck::Invalid(JwtError::UnknownKey(None));
                };
                let _ = remote.sync(&HostStore, &provider.name, self.now);
                match &remote.keys {
                    Some(keys) => remote_keys = Rc::clone(keys),
                    // No key set yet: this request waits for its own fetch.
                    None if !already_fetched => return JwtCheck::NeedKeys,
                    None => return JwtCheck::Invalid(unknown_key(token)),
                }
                &remote_keys
            }
        };
        match jwt::verify(token, keys, &provider.algorithms, &provider.rules, self.now) {
            Ok(claims) => {
                let exp = jwt::expiry(&claims);
                let claims = Rc::new(claims);
                self.state.token_cache.insert(digest, index, Rc::clone(&claims), exp, self.now);
                JwtCheck::Valid(claims)
            }
            Err(JwtError::UnknownKey(kid)) => {
                // A rotated key another worker already fetched?
                if let Some(remote) = self.state.remote.get_mut(index).filter(|_| remote_spec(provider).is_some()) {
                    let known = remote.version;
                    let _ = remote.sync_now(&HostStore, &provider.name, self.now);
                    if let (Some(keys), true) = (remote.keys.clone(), remote.version != known) {
                        if let Ok(claims) = jwt::verify(token, &keys, &provider.algorithms, &provider.rules, self.now) {
                            return JwtCheck::Valid(Rc::new(claims));
                        }
                    }
                }
                // Otherwise refetch once, rate limited across all workers.
                if let (Some(spec), false) = (remote_spec(provider), already_fetched) {
                    let key = jwks::refetch_key(&provider.name);
                    if jwks::try_claim(&HostStore, &key, self.now, spec.refetch_cooldown_seconds) == Ok(true) {
                        return JwtCheck::NeedKeys;
                    }
                }
                JwtCheck::Invalid(JwtError::UnknownKey(kid))
            }
            Err(error) => JwtCheck::Invalid(error),
        }
    }

    fn check_basic(&mut self, basic: &Basic, user: &str, password: &str) -> Result<String, BasicFailure> {
        let before = self.state.basic.hashes_computed;
        let result = self.state.basic.check(&HostStore, basic, user, password, self.now);
        let computed = self.state.basic.hashes_computed.saturating_sub(before);
        if computed > 0 {
            self.metrics.basic_hashes.add(i64::try_from(computed).unwrap_or(i64::MAX));
        }
        result
    }
}

fn unknown_key(token: &str) -> JwtError {
    JwtError::UnknownKey(jwt::parse_header(token).ok().and_then(|header| header.kid))
}

impl Context for AuthStream {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Some((token, index)) = self.pending.take() else { return };
        if token != token_id {
            return;
        }
        finish_fetch(&self.shared, index, body_size);
        if let Some(fetched) = self.fetched.get_mut(index) {
            *fetched = true;
        }
        if let Action::Continue = self.evaluate() {
            let _ = host::resume_request();
        }
    }
}

impl HttpContext for AuthStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let request = match RequestHeaders::read() {
            Ok(request) => request,
            Err(ReadError::Bad { reason, facts }) => {
                // A target no rule can judge is never matched against a default.
                let _ = gateway_common::problem::bad_request(reason).send(&facts);
                return Action::Pause;
            }
            Err(ReadError::Host(_)) => {
                // Without the headers nothing can be checked: fail closed.
                let problem = policy::problem(&Denial::NoRule, &self.shared.auth.realm);
                let _ = problem.send(&RequestFacts::default());
                return Action::Pause;
            }
        };
        // Anti-spoofing: identity headers only ever come from this module.
        for name in &self.shared.identity_headers {
            if request.count(name) > 0 {
                let _ = host::remove_header(MapType::HttpRequestHeaders, name);
            }
        }
        self.request = Some(request);
        self.evaluate()
    }
}

impl AuthStream {
    /// Runs the decision and applies it. `Pause` while a JWKS fetch is pending or
    /// after answering; `Continue` when the request may go on.
    fn evaluate(&mut self) -> Action {
        let shared = Rc::clone(&self.shared);
        let Some(request) = self.request.take() else { return Action::Continue };
        let outcome = {
            let mut state = shared.state.borrow_mut();
            let mut verifier = StateVerifier {
                state: &mut state,
                metrics: &shared.metrics,
                fetched: &self.fetched,
                now: now_seconds(),
            };
            decide(&shared.auth, &request, &mut verifier)
        };
        let action = match outcome {
            Outcome::NeedKeys(index) => match start_fetch(&shared, index) {
                Some(token) => {
                    self.pending = Some((token, index));
                    self.request = Some(request);
                    return Action::Pause;
                }
                None => {
                    // Unreachable JWKS: judge with the keys we have (maybe none).
                    if let Some(fetched) = self.fetched.get_mut(index) {
                        *fetched = true;
                    }
                    self.request = Some(request);
                    return self.evaluate();
                }
            },
            Outcome::Allow { identities, .. } => {
                shared.metrics.allowed.increment();
                apply_identities(&shared.auth, &request, &identities);
                Action::Continue
            }
            Outcome::Deny(denial) => {
                shared.metrics.denied(&denial);
                let _ = host::set_property(&[DECISION_PROPERTY], b"denied");
                let facts = RequestFacts::of(&request);
                let _ = policy::problem(&denial, &shared.auth.realm).send(&facts);
                Action::Pause
            }
        };
        self.request = Some(request);
        action
    }
}

/// Sets the identity headers, strips forwarded credentials, records filter state.
fn apply_identities(auth: &Auth, request: &RequestHeaders, identities: &[Identity]) {
    let _ = host::set_property(&[DECISION_PROPERTY], b"allowed");
    let name = identities.iter().find_map(|identity| identity.name.clone());
    if let Some(name) = &name {
        let _ = host::set_property(&[IDENTITY_PROPERTY], name.as_bytes());
        if let Some(header) = &auth.consumer_header {
            set_request_header(header, name);
        }
    }
    for identity in identities {
        if let (Some(index), Some(claims)) = (identity.provider, identity.claims.as_deref()) {
            if let Some(provider) = auth.providers.get(index) {
                for mapping in &provider.claims_to_headers {
                    if let Some(value) =
                        jwt::claim_at(claims, &mapping.claim).and_then(|v| claim_header_value(v, mapping.array))
                    {
                        set_request_header(&mapping.header, &value);
                    }
                }
                if let Some(header) = &provider.payload_header {
                    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
                    set_request_header(header, &payload);
                }
            }
        }
        if let Some(source) = &identity.strip {
            strip_credential(request, source);
        }
    }
}

/// A header value for a claim; `None` for values a header cannot carry.
fn claim_header_value(value: &Value, arrays: ArrayFormat) -> Option<String> {
    let text = match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        Value::Array(items) if arrays == ArrayFormat::Join => items
            .iter()
            .map(|item| item.as_str().map_or_else(|| item.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        Value::Null => return None,
        other => other.to_string(),
    };
    (!text.bytes().any(|b| b.is_ascii_control() && b != b'\t')).then_some(text)
}

fn set_request_header(name: &str, value: &str) {
    let _ = host::set_header(MapType::HttpRequestHeaders, name, value.as_bytes());
}

fn strip_credential(request: &RequestHeaders, source: &TokenSource) {
    match source {
        TokenSource::Header { name, .. } => {
            let _ = host::remove_header(MapType::HttpRequestHeaders, name);
        }
        TokenSource::Query(name) => {
            let Some(path) = request.first(":path") else { return };
            let Some(at) = path.iter().position(|byte| *byte == b'?') else { return };
            let (base, query) = (path.get(..at).unwrap_or_default(), path.get(at + 1..).unwrap_or_default());
            let kept: Vec<&[u8]> = query
                .split(|byte| *byte == b'&')
                .filter(|pair| {
                    let key = pair.split(|byte| *byte == b'=').next().unwrap_or_default();
                    percent_decode(key) != name.as_bytes()
                })
                .collect();
            let mut new_path = base.to_vec();
            if !kept.is_empty() {
                new_path.push(b'?');
                new_path.extend_from_slice(&kept.join(&b'&'));
            }
            let _ = host::set_header(MapType::HttpRequestHeaders, ":path", &new_path);
        }
        TokenSource::Cookie(name) => {
            let crumbs: Vec<Vec<u8>> = request
                .values("cookie")
                .flat_map(|header| header.split(|byte| *byte == b';'))
                .map(|crumb| crumb.trim_ascii().to_vec())
                .filter(|crumb| !crumb.is_empty() && crumb.split(|byte| *byte == b'=').next() != Some(name.as_bytes()))
                .collect();
            let _ = host::remove_header(MapType::HttpRequestHeaders, "cookie");
            if !crumbs.is_empty() {
                let _ = host::set_header(MapType::HttpRequestHeaders, "cookie", &crumbs.join(&b"; "[..]));
            }
        }
    }
}
