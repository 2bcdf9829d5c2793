//! auth.wasm: authenticates (JWT, API keys, basic) and authorizes (rules, scopes,
//! claims) before anything reaches a backend. This file is the host glue; the
//! decision is in `policy.rs`, token checks in `jwt.rs`, credentials and caches in
//! `credentials.rs`, the shared remote JWKS in `jwks.rs`.

pub mod config;
pub mod credentials;
pub mod introspection;
pub mod jwks;
pub mod jwt;
pub mod mtls;
pub mod policy;
pub mod rsa;

use crate::mtls::PeerCertificate;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use gateway_common::config::ConfigErrors;
use gateway_common::host::{self, LogLevel, MapType};
use gateway_common::metrics::Metric;
use gateway_common::platform::{Ffi, Host, OnRefusedReply, ReplyFailures};
use gateway_common::problem::RequestFacts;
use gateway_common::request::{ReadError, RequestHeaders};
use gateway_common::shared::{HostStore, SharedData, Store};
use gateway_common::skeleton::{metric_prefix, Module, RootCalls};
use gateway_common::verdict::{Edit, Verdict};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::config::{Auth, AuthConfig, Basic, Keys, Provider, RemoteJwksSpec, TokenSource};
use crate::credentials::{sha256, BasicChecker, BasicFailure, TokenCache};
use crate::introspection::{Answer, Introspection, OnFailure};
use crate::jwks::RemoteKeys;
use crate::jwt::{JwtError, KeySet};
use crate::policy::{decide, AuthResult, Denial, Identity, JwtCheck, Outcome, Verifier};

proxy_wasm::main! {{
    gateway_common::skeleton::install::<AuthModule>();
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
    introspection_calls: Metric,
    introspection_active: Metric,
    introspection_inactive: Metric,
    introspection_failed: Metric,
    introspection_cache_hits: Metric,
    reply_failures: ReplyFailures,
}

const DENIAL_REASONS: &[&str] = &[
    "missing",
    "malformed",
    "algorithm",
    "unknown_key",
    "unknown_certificate",
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
    "consumer_not_allowed",
    "denied_by_rule",
    "unverifiable",
    "inactive",
    "no_rule",
    "multiple_authorization",
];

impl Metrics {
    fn new(host: &impl Host, prefix: &str) -> Self {
        Self {
            allowed: Metric::counter_on(host, &format!("{prefix}.allowed")),
            denied: DENIAL_REASONS
                .iter()
                .map(|reason| (*reason, Metric::counter_on(host, &format!("{prefix}.denied.{reason}"))))
                .collect(),
            jwks_fetch_ok: Metric::counter_on(host, &format!("{prefix}.jwks.fetch_ok")),
            jwks_fetch_failed: Metric::counter_on(host, &format!("{prefix}.jwks.fetch_failed")),
            cache_hits: Metric::counter_on(host, &format!("{prefix}.token_cache.hits")),
            cache_misses: Metric::counter_on(host, &format!("{prefix}.token_cache.misses")),
            basic_hashes: Metric::counter_on(host, &format!("{prefix}.basic.hash_computations")),
            introspection_calls: Metric::counter_on(host, &format!("{prefix}.introspection.calls")),
            introspection_active: Metric::counter_on(host, &format!("{prefix}.introspection.active")),
            introspection_inactive: Metric::counter_on(host, &format!("{prefix}.introspection.inactive")),
            introspection_failed: Metric::counter_on(host, &format!("{prefix}.introspection.failed")),
            introspection_cache_hits: Metric::counter_on(host, &format!("{prefix}.introspection.cache_hits")),
            reply_failures: ReplyFailures::new(host, prefix),
        }
    }

    /// The counter of a denial's reason.
    fn denied_metric(&self, denial: &Denial) -> Metric {
        let reason = match denial {
            Denial::MultipleAuthorization => "multiple_authorization",
            Denial::Missing(_) => "missing",
            Denial::Invalid { code, .. } => code,
            Denial::Locked { .. } => "locked",
            Denial::InsufficientScope { .. } => "insufficient_scope",
            Denial::ClaimMismatch { .. } => "claim_mismatch",
            Denial::ConsumerNotAllowed => "consumer_not_allowed",
            Denial::Unavailable { .. } => "unverifiable",
            Denial::DeniedByRule { .. } => "denied_by_rule",
            Denial::NoRule => "no_rule",
        };
        self.denied.get(reason).copied().unwrap_or_default()
    }
}

/// Per-VM mutable state shared by the root and every stream of this worker.
struct VmState {
    token_cache: TokenCache,
    basic: BasicChecker,
    /// Per provider index (only remote providers use theirs).
    remote: Vec<RemoteKeys>,
    /// Whether a remote-call problem was logged (once per VM and provider).
    warned: Vec<bool>,
}

struct Shared {
    auth: Auth,
    /// Namespace of this instance's shared-data keys (the metric prefix).
    prefix: String,
    /// Headers this module sets, removed from every incoming request.
    identity_headers: Vec<String>,
    metrics: Metrics,
    state: RefCell<VmState>,
}

impl Shared {
    /// The per-VM state; `None` when the shared-data keys cannot be created.
    /// Metrics are named `<prefix>.*` (see `skeleton::metric_prefix`). `secrets`:
    /// the keys of this VM's basic-auth cache and token cache, random per VM.
    fn new(host: &impl Host, auth: Auth, secrets: [[u8; 16]; 2], prefix: &str) -> Option<Self> {
        let [basic_cache_key, token_cache_key] = secrets;
        let store = SharedData(host);
        let remote_names = auth.providers.iter().filter(|p| remote_spec(p).is_some()).map(|p| p.name.as_str());
        let users = auth.basic.as_ref().map_or(0, |basic| basic.users.len());
        (0..users).try_for_each(|index| store.ensure(&credentials::failure_key(index))).ok()?;
        jwks::initialize(&store, remote_names).ok()?;
        let state = VmState {
            token_cache: TokenCache::new(auth.token_cache.entries, auth.token_cache.max_ttl_seconds, token_cache_key),
            basic: BasicChecker::new(basic_cache_key),
            remote: vec![RemoteKeys::default(); auth.providers.len()],
            warned: vec![false; auth.providers.len()],
        };
        let identity_headers = auth.identity_headers();
        Some(Shared {
            auth,
            prefix: prefix.to_string(),
            identity_headers,
            metrics: Metrics::new(host, prefix),
            state: RefCell::new(state),
        })
    }
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
        Keys::Static(_) | Keys::Introspection(_) => None,
    }
}

/// Logs a provider's remote-call problem once per VM: a failure that repeats
/// with every request (a missing cluster, an IdP down) is counted in the
/// metrics, not written to the log per request.
fn warn_once(host: &impl Host, shared: &Shared, index: usize, level: LogLevel, text: &str) {
    let Ok(mut state) = shared.state.try_borrow_mut() else { return };
    if let Some(warned) = state.warned.get_mut(index).filter(|warned| !**warned) {
        *warned = true;
        host.log(level, text);
    }
}

/// Starts the introspection call for `token`; `None` when it cannot start.
fn start_introspection(host: &impl Host, shared: &Shared, index: usize, token: &str) -> Option<u32> {
    let provider = shared.auth.providers.get(index)?;
    let Keys::Introspection(introspection) = &provider.keys else { return None };
    let (headers, body) = introspection.request(token);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
    let timeout = Duration::from_millis(introspection.timeout_ms);
    shared.metrics.introspection_calls.increment_on(host);
    match host.dispatch_http_call(&introspection.cluster, &headers, &body, timeout) {
        Ok(call) => Some(call),
        Err(error) => {
            let text = format!(
                "auth: provider {}: cannot call the introspection endpoint on cluster `{}` ({error:?}): does the cluster exist?",
                provider.name, introspection.cluster
            );
            warn_once(host, shared, index, LogLevel::Error, &text);
            None
        }
    }
}

/// Reads the introspection answer being delivered and caches it for every worker.
fn finish_introspection(
    host: &impl Host,
    shared: &Shared,
    index: usize,
    digest: &[u8; 32],
    body_size: usize,
) -> Result<Answer, String> {
    let provider = shared.auth.providers.get(index).ok_or("no provider")?;
    let Keys::Introspection(introspection) = &provider.keys else { return Err("not introspected".into()) };
    let (status, body) = call_answer(host, body_size);
    let answer = introspection::parse_answer(status, &body);
    match &answer {
        Ok(answer) => {
            let metric = match answer {
                Answer::Active(_) => shared.metrics.introspection_active,
                Answer::Inactive => shared.metrics.introspection_inactive,
            };
            metric.increment_on(host);
            let key = introspection::slot_key(&shared.prefix, &provider.name, digest, introspection.slots);
            let now = host.now_nanos() / 1_000_000_000;
            let _ = introspection::store_answer(&SharedData(host), &key, introspection, digest, answer, now);
        }
        Err(reason) => {
            shared.metrics.introspection_failed.increment_on(host);
            let text =
                format!("auth: provider {}: introspection failed: {reason} (counted from now on)", provider.name);
            warn_once(host, shared, index, LogLevel::Warn, &text);
        }
    }
    answer
}

/// Starts a JWKS fetch; logs (once) and counts a failure to start.
fn start_fetch(host: &impl Host, shared: &Shared, index: usize) -> Option<u32> {
    let provider = shared.auth.providers.get(index)?;
    let spec = remote_spec(provider)?;
    let authority = spec.authority.clone().unwrap_or_else(|| spec.cluster.clone());
    let headers = [
        (":method", "GET"),
        (":path", spec.path.as_str()),
        (":authority", authority.as_str()),
        ("accept", "application/json"),
    ];
    match host.dispatch_http_call(&spec.cluster, &headers, &[], Duration::from_millis(spec.timeout_ms)) {
        Ok(token) => Some(token),
        Err(error) => {
            shared.metrics.jwks_fetch_failed.increment_on(host);
            warn_once(
                host,
                shared,
                index,
                LogLevel::Error,
                &format!(
                    "auth: provider {}: cannot fetch the JWKS from cluster `{}` ({error:?}): does the cluster exist?",
                    provider.name, spec.cluster
                ),
            );
            None
        }
    }
}

/// The status and body of the HTTP call answer being delivered.
fn call_answer(host: &impl Host, body_size: usize) -> (Option<u16>, Vec<u8>) {
    let status = host
        .header(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|status| std::str::from_utf8(&status).ok().and_then(|s| s.parse::<u16>().ok()));
    let body = if body_size > 0 { host.http_call_response_body(body_size).unwrap_or_default() } else { Vec::new() };
    (status, body)
}

/// Reads the fetch answer being delivered, validates it, and publishes it.
fn finish_fetch(host: &impl Host, shared: &Shared, index: usize, body_size: usize) {
    let Some(provider) = shared.auth.providers.get(index) else { return };
    let (status, body) = call_answer(host, body_size);
    let version = host.now_nanos();
    let now = version / 1_000_000_000;
    match jwks::validate_response(status, &body) {
        Ok(keys) => {
            shared.metrics.jwks_fetch_ok.increment_on(host);
            let _ = jwks::publish(&SharedData(host), &provider.name, &body, now, version);
            if let Ok(mut state) = shared.state.try_borrow_mut() {
                if let Some(remote) = state.remote.get_mut(index) {
                    remote.adopt(keys, now, version);
                }
            }
        }
        Err(reason) => {
            shared.metrics.jwks_fetch_failed.increment_on(host);
            host.log(
                LogLevel::Warn,
                &format!("auth: provider {}: JWKS fetch failed: {reason}; keeping the last good keys", provider.name),
            );
        }
    }
}

/// auth.wasm as a module of the shared root (`gateway_common::skeleton`). The
/// root refreshes remote JWKS in the background.
struct AuthModule;

impl Module for AuthModule {
    const NAME: &'static str = "auth";
    type Config = AuthConfig;
    type Compiled = Auth;
    type Shared = Shared;
    /// A background JWKS fetch in flight: the provider's index.
    type RootCall = usize;

    fn compile(config: &AuthConfig) -> Result<Auth, ConfigErrors> {
        config.compile()
    }

    fn start(host: &Ffi, auth: Auth, instance: &str) -> Option<Shared> {
        let shared = Shared::new(host, auth, [random_key(), random_key()], &metric_prefix(Self::NAME, instance));
        if shared.is_none() {
            host.log(LogLevel::Error, "auth: cannot initialize shared data for remote JWKS");
        }
        shared
    }

    fn stream(shared: &Rc<Shared>, _context_id: u32) -> Box<dyn HttpContext> {
        let providers = shared.auth.providers.len();
        Box::new(AuthStream {
            host: Ffi,
            shared: Rc::clone(shared),
            request: None,
            fetched: vec![false; providers],
            pending: None,
            introspected: Vec::new(),
        })
    }

    fn tick_period(shared: &Shared) -> Option<Duration> {
        let has_remote = shared.auth.providers.iter().any(|provider| remote_spec(provider).is_some());
        has_remote.then_some(Duration::from_secs(1))
    }

    /// Background refresh: every VM checks, one wins each provider's lease.
    fn on_tick(shared: &Rc<Shared>, calls: &mut RootCalls<usize>) {
        let now = now_seconds();
        for (index, provider) in shared.auth.providers.iter().enumerate() {
            let Some(spec) = remote_spec(provider) else { continue };
            let due = {
                let Ok(mut state) = shared.state.try_borrow_mut() else { continue };
                let Some(remote) = state.remote.get_mut(index) else { continue };
                let _ = remote.sync(&HostStore, &provider.name, now);
                remote.refresh_due(now, spec.refresh_seconds)
            };
            if due && calls.pending().all(|in_flight| *in_flight != index) {
                let claimed = jwks::try_claim(&HostStore, &jwks::attempt_key(&provider.name), now, jwks::RETRY_SECONDS);
                if claimed == Ok(true) {
                    if let Some(token) = start_fetch(&Ffi, shared, index) {
                        calls.insert(token, index);
                    }
                }
            }
        }
    }

    fn on_call_response(shared: &Rc<Shared>, index: usize, body_size: usize) {
        finish_fetch(&Ffi, shared, index, body_size);
    }
}

struct AuthStream<H: Host> {
    host: H,
    shared: Rc<Shared>,
    request: Option<RequestHeaders>,
    /// Providers whose keys this request already fetched (never twice).
    fetched: Vec<bool>,
    /// The call this request waits for.
    pending: Option<PendingCall>,
    /// The introspection answer it got: (provider, answer).
    /// (One per provider: a rule may require several introspected tokens.)
    introspected: Vec<(usize, Result<Answer, String>)>,
}

/// Credential checks backed by this worker's state and the shared JWKS.
struct StateVerifier<'a, H: Host> {
    host: &'a H,
    state: &'a mut VmState,
    metrics: &'a Metrics,
    fetched: &'a [bool],
    /// The introspection answer this request waited for: (provider, answer).
    introspected: &'a [(usize, Result<Answer, String>)],
    prefix: &'a str,
    now: u64,
}

impl<H: Host> Verifier for StateVerifier<'_, H> {
    fn verify_jwt(&mut self, index: usize, provider: &Provider, token: &str) -> JwtCheck {
        if let Keys::Introspection(introspection) = &provider.keys {
            return self.introspected_token(index, provider, introspection, token);
        }
        if let Some(claims) = self.state.token_cache.get(token.as_bytes(), index, self.now) {
            self.metrics.cache_hits.increment_on(self.host);
            return JwtCheck::Valid(claims);
        }
        self.metrics.cache_misses.increment_on(self.host);
        let already_fetched = self.fetched.get(index).copied().unwrap_or(true);
        let remote_keys: Rc<KeySet>;
        let keys: &KeySet = match &provider.keys {
            Keys::Static(keys) => keys,
            Keys::Introspection(_) => return JwtCheck::Invalid(JwtError::UnknownKey(None)),
            Keys::Remote(_) => {
                let Some(remote) = self.state.remote.get_mut(index) else {
                    return JwtCheck::Invalid(JwtError::UnknownKey(None));
                };
                let _ = remote.sync(&SharedData(self.host), &provider.name, self.now);
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
                self.state.token_cache.insert(token.as_bytes(), index, Rc::clone(&claims), exp, self.now);
                JwtCheck::Valid(claims)
            }
            Err(JwtError::UnknownKey(kid)) => {
                // A rotated key another worker already fetched?
                if let Some(remote) = self.state.remote.get_mut(index).filter(|_| remote_spec(provider).is_some()) {
                    let known = remote.version;
                    let _ = remote.sync_now(&SharedData(self.host), &provider.name, self.now);
                    if let (Some(keys), true) = (remote.keys.clone(), remote.version != known) {
                        if let Ok(claims) = jwt::verify(token, &keys, &provider.algorithms, &provider.rules, self.now) {
                            return JwtCheck::Valid(Rc::new(claims));
                        }
                    }
                }
                // Otherwise refetch once, rate limited across all workers.
                if let (Some(spec), false) = (remote_spec(provider), already_fetched) {
                    let key = jwks::refetch_key(&provider.name);
                    let store = SharedData(self.host);
                    if jwks::try_claim(&store, &key, self.now, spec.refetch_cooldown_seconds) == Ok(true) {
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
        let result = self.state.basic.check(&SharedData(self.host), basic, user, password, self.now);
        let computed = self.state.basic.hashes_computed.saturating_sub(before);
        if computed > 0 {
            self.metrics.basic_hashes.add_on(self.host, i64::try_from(computed).unwrap_or(i64::MAX));
        }
        result
    }

    fn peer_certificate(&mut self) -> Option<PeerCertificate> {
        let property = |name: &str| self.host.property(&["connection", name]).ok().flatten();
        if !property("mtls").is_some_and(|flag| mtls::is_true(&flag)) {
            return None;
        }
        Some(PeerCertificate {
            subject: property("subject_peer_certificate"),
            uri_san: property("uri_san_peer_certificate"),
            dns_san: property("dns_san_peer_certificate"),
            sha256: property("sha256_peer_certificate_digest"),
        })
    }
}

impl<H: Host> StateVerifier<'_, H> {
    /// An opaque token: this request's own introspection answer, else a cached
    /// one, else the IdP must be asked.
    fn introspected_token(
        &mut self,
        index: usize,
        provider: &Provider,
        introspection: &Introspection,
        token: &str,
    ) -> JwtCheck {
        let answer = match self.introspected.iter().find(|(provider, _)| *provider == index) {
            Some((_, Ok(answer))) => answer.clone(),
            Some((_, Err(_))) => {
                return match introspection.on_failure {
                    OnFailure::Unavailable => JwtCheck::Unavailable,
                    OnFailure::RejectToken => JwtCheck::Invalid(JwtError::Unverifiable),
                }
            }
            None => {
                let digest = sha256(token.as_bytes());
                let key = introspection::slot_key(self.prefix, &provider.name, &digest, introspection.slots);
                match introspection::cached(&SharedData(self.host), &key, &digest, self.now) {
                    Ok(Some(answer)) => {
                        self.metrics.introspection_cache_hits.increment_on(self.host);
                        answer
                    }
                    _ => return JwtCheck::NeedIntrospection,
                }
            }
        };
        match answer {
            Answer::Inactive => JwtCheck::Invalid(JwtError::Inactive),
            Answer::Active(claims) => match jwt::check_claims(&claims, &provider.rules, self.now) {
                Ok(()) => JwtCheck::Valid(Rc::new(claims)),
                Err(error) => JwtCheck::Invalid(error),
            },
        }
    }
}

fn unknown_key(token: &str) -> JwtError {
    JwtError::UnknownKey(jwt::parse_header(token).ok().and_then(|header| header.kid))
}

/// An HTTP call a paused request waits for, by the host's token.
enum PendingCall {
    Jwks { call: u32, provider: usize },
    Introspection { call: u32, provider: usize, digest: [u8; 32] },
}

impl<H: Host> Context for AuthStream<H> {
    fn on_http_call_response(&mut self, token_id: u32, _num_headers: usize, body_size: usize, _num_trailers: usize) {
        match self.pending.take() {
            Some(PendingCall::Jwks { call, provider }) if call == token_id => {
                finish_fetch(&self.host, &self.shared, provider, body_size);
                if let Some(fetched) = self.fetched.get_mut(provider) {
                    *fetched = true;
                }
            }
            Some(PendingCall::Introspection { call, provider, digest }) if call == token_id => {
                let answer = finish_introspection(&self.host, &self.shared, provider, &digest, body_size);
                self.introspected.push((provider, answer));
            }
            other => {
                self.pending = other;
                return;
            }
        }
        if let Action::Continue = self.evaluate() {
            let resumed = self.host.resume_request();
            self.shared.metrics.reply_failures.host_call(&self.host, "resume_request", resumed);
        }
    }
}

gateway_common::stream_callbacks!(request_headers);

impl<H: Host> HttpContext for AuthStream<H> {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let mut request = match RequestHeaders::read_from(&self.host) {
            Ok(request) => request,
            Err(ReadError::Bad { reason, facts }) => {
                // A target no rule can judge is never matched against a default.
                let sent = gateway_common::problem::bad_request(reason).send_on(&self.host, &facts);
                return self.after_local_reply(sent);
            }
            Err(ReadError::Host(_)) => {
                // Without the headers nothing can be checked: fail closed.
                let problem = policy::problem(&Denial::NoRule, &self.shared.auth.realm);
                let sent = problem.send_on(&self.host, &RequestFacts::default());
                return self.after_local_reply(sent);
            }
        };
        // Anti-spoofing: identity headers only ever come from this module. If the
        // host cannot remove a client's copy, the request is refused (it would reach
        // the backend with an identity nobody verified).
        for name in &self.shared.identity_headers {
            if request.count(name) > 0 {
                let removed = self.host.remove_header(MapType::HttpRequestHeaders, name);
                if removed.is_err() {
                    self.shared.metrics.reply_failures.host_call(&self.host, "remove_header", removed);
                    let problem = policy::problem(&Denial::NoRule, &self.shared.auth.realm);
                    let sent = problem.send_on(&self.host, &RequestFacts::of(&request));
                    return self.after_local_reply(sent);
                }
            }
        }
        if self.shared.auth.needs_client_ip {
            self.shared.auth.client_ip.derive_into(&self.host, &mut request);
        }
        self.request = Some(request);
        self.evaluate()
    }
}

impl<H: Host> AuthStream<H> {
    /// After a denial: pause (the reply ends the stream). If the host refused the
    /// reply, the request stays held anyway: letting an unauthenticated request
    /// through is the one thing auth must never do, so it fails closed and ends at
    /// Envoy's stream timeout; counted in `auth.local_reply_failed`.
    fn after_local_reply(&self, sent: gateway_common::host::HostResult<()>) -> Action {
        self.shared.metrics.reply_failures.after(&self.host, sent, OnRefusedReply::Hold)
    }

    /// Runs the decision and applies it. `Pause` while a JWKS fetch is pending or
    /// after answering; `Continue` when the request may go on.
    fn evaluate(&mut self) -> Action {
        let shared = Rc::clone(&self.shared);
        let Some(request) = self.request.take() else { return Action::Continue };
        let outcome = {
            // One VM runs one callback at a time, so the state is never borrowed
            // here already; if it were, deny rather than panic.
            let Ok(mut state) = shared.state.try_borrow_mut() else {
                let sent = policy::problem(&Denial::NoRule, &shared.auth.realm)
                    .send_on(&self.host, &RequestFacts::of(&request));
                return self.after_local_reply(sent);
            };
            let mut verifier = StateVerifier {
                host: &self.host,
                state: &mut state,
                metrics: &shared.metrics,
                fetched: &self.fetched,
                introspected: &self.introspected,
                prefix: &shared.prefix,
                now: self.host.now_nanos() / 1_000_000_000,
            };
            decide(&shared.auth, &request, &mut verifier)
        };
        let action = match outcome {
            Outcome::NeedIntrospection(index, token) => match start_introspection(&self.host, &shared, index, &token) {
                Some(call) => {
                    let digest = sha256(token.as_bytes());
                    self.pending = Some(PendingCall::Introspection { call, provider: index, digest });
                    self.request = Some(request);
                    return Action::Pause;
                }
                None => {
                    shared.metrics.introspection_failed.increment_on(&self.host);
                    self.introspected.push((index, Err("the call could not start".into())));
                    self.request = Some(request);
                    return self.evaluate();
                }
            },
            Outcome::NeedKeys(index) => match start_fetch(&self.host, &shared, index) {
                Some(token) => {
                    self.pending = Some(PendingCall::Jwks { call: token, provider: index });
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
            Outcome::Allow { identities, result, .. } => {
                allow_verdict(&shared, &request, &identities, result).apply(&self.host, &shared.metrics.reply_failures)
            }
            Outcome::Deny(denial) => {
                deny_verdict(&shared, &request, &denial).apply(&self.host, &shared.metrics.reply_failures)
            }
        };
        self.request = Some(request);
        action
    }
}

/// An allowed request: its identity headers, the credentials it must not forward,
/// and filter state for access logs.
fn allow_verdict(shared: &Shared, request: &RequestHeaders, identities: &[Identity], result: AuthResult) -> Verdict {
    let auth = &shared.auth;
    let set =
        |name: &str, value: &str| Edit::Set(MapType::HttpRequestHeaders, name.to_string(), value.as_bytes().to_vec());
    let mut verdict = Verdict::forward().count(shared.metrics.allowed).property(DECISION_PROPERTY, b"allowed".to_vec());
    if let Some(header) = &auth.result_header {
        verdict = verdict.edit(set(header, result.as_str()));
    }
    if let Some(name) = identities.iter().find_map(|identity| identity.name.as_deref()) {
        verdict = verdict.property(IDENTITY_PROPERTY, name.as_bytes());
        if let Some(header) = &auth.consumer_header {
            verdict = verdict.edit(set(header, name));
        }
    }
    for identity in identities {
        if let (Some(index), Some(claims)) = (identity.provider, identity.claims.as_deref()) {
            if let Some(provider) = auth.providers.get(index) {
                for mapping in &provider.claims_to_headers {
                    if let Some(value) = jwt::claim_at(claims, &mapping.claim)
                        .and_then(|v| credentials::claim_header_value(v, mapping.array))
                    {
                        verdict = verdict.edit(set(&mapping.header, &value));
                    }
                }
                if let Some(header) = &provider.payload_header {
                    verdict = verdict.edit(set(header, &URL_SAFE_NO_PAD.encode(claims.to_string())));
                }
            }
        }
        if let Some(source) = &identity.strip {
            for edit in stripped_credential(request, source) {
                verdict = verdict.edit(edit);
            }
        }
    }
    verdict
}

/// A denied request: counted by reason and answered; a refused answer keeps the
/// request held (auth never lets a denied request through).
fn deny_verdict(shared: &Shared, request: &RequestHeaders, denial: &Denial) -> Verdict {
    let reply = policy::problem(denial, &shared.auth.realm).reply(&RequestFacts::of(request));
    Verdict::answer(reply, OnRefusedReply::Hold)
        .count(shared.metrics.denied_metric(denial))
        .property(DECISION_PROPERTY, b"denied".to_vec())
}

/// The edits that keep a credential from reaching the upstream.
fn stripped_credential(request: &RequestHeaders, source: &TokenSource) -> Vec<Edit> {
    let map = MapType::HttpRequestHeaders;
    match source {
        TokenSource::Header { name, .. } => vec![Edit::Remove(map, name.clone())],
        TokenSource::Query(name) => credentials::target_without_query_parameter(request.target(), name)
            .map(|target| vec![Edit::Set(map, ":path".into(), target.into_bytes())])
            .unwrap_or_default(),
        TokenSource::Cookie(name) => {
            let mut edits = vec![Edit::Remove(map, "cookie".into())];
            if let Some(cookies) = credentials::cookies_without(request.values("cookie"), name) {
                edits.push(Edit::Set(map, "cookie".into(), cookies));
            }
            edits
        }
    }
}

#[cfg(test)]
mod glue_tests {
    use super::*;
    use gateway_common::platform::FakeHost;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const NOW: u64 = 1_700_000_000;
    const CONFIG: &str = r#"{
        "providers": [{"name": "idp", "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}]},
                       "claims_to_headers": [{"claim": "sub", "header": "x-user-id"}]}],
        "rules": [{"name": "api", "require": {"any": ["idp"]}}]
    }"#;

    fn token(sub: &str) -> String {
        let claims = serde_json::json!({"sub": sub, "iat": NOW - 5, "exp": NOW + 600});
        encode(&Header::default(), &claims, &EncodingKey::from_secret(b"secret").unwrap()).unwrap()
    }

    fn shared(host: &FakeHost) -> Rc<Shared> {
        let config: AuthConfig = gateway_common::config::parse_json(CONFIG.as_bytes()).unwrap();
        Rc::new(Shared::new(host, config.compile().unwrap(), [[7; 16], [8; 16]], "auth").unwrap())
    }

    fn stream<'h>(host: &'h FakeHost, shared: &Rc<Shared>) -> AuthStream<&'h FakeHost> {
        let providers = shared.auth.providers.len();
        AuthStream {
            host,
            shared: Rc::clone(shared),
            request: None,
            fetched: vec![false; providers],
            pending: None,
            introspected: Vec::new(),
        }
    }

    fn request(host: &FakeHost, authorization: &[u8]) {
        host.replace_headers(
            MapType::HttpRequestHeaders,
            &[(":method", b"GET"), (":path", b"/orders"), ("authorization", authorization), ("x-user-id", b"spoof")],
        );
    }

    #[test]
    fn budget_a_warm_jwt_costs_ten_host_calls() {
        let host = FakeHost::new();
        host.set_now(NOW * 1_000_000_000);
        let shared = shared(&host);
        let bearer = format!("Bearer {}", token("alice"));
        request(&host, bearer.as_bytes());
        assert_eq!(stream(&host, &shared).on_http_request_headers(0, true), Action::Continue);
        assert_eq!(host.metric("auth.token_cache.misses"), 1);
        request(&host, bearer.as_bytes());
        host.reset_calls();
        assert_eq!(stream(&host, &shared).on_http_request_headers(0, true), Action::Continue);
        assert_eq!(host.metric("auth.token_cache.hits"), 1);
        assert_eq!(
            host.calls(),
            [
                "header_pairs",
                "remove_header", // the client's x-user-id (anti-spoofing)
                "now_nanos",
                "increment_metric", // token cache hit
                "increment_metric", // allowed
                "set_property",     // wasm.auth_decision
                "set_property",     // wasm.auth_identity
                "set_header",       // x-consumer
                "set_header",       // x-user-id from the claim
                "remove_header",    // the credential is not forwarded
            ]
        );
        assert_eq!(host.header_values(MapType::HttpRequestHeaders, "x-user-id"), vec![b"alice".to_vec()]);
        assert!(host.header_values(MapType::HttpRequestHeaders, "authorization").is_empty());
    }

    /// Introspection: the first request waits for one POST to the IdP; the next
    /// (any worker: the answer is in shared data) reads it with one host call.
    #[test]
    fn an_introspected_token_is_asked_once_then_read_from_shared_data() {
        let host = FakeHost::new();
        host.set_now(NOW * 1_000_000_000);
        let config = r#"{"providers": [{"name": "idp", "introspection": {"cluster": "idp", "path": "/introspect",
                             "client_id": "gw", "client_secret": "pw"}}],
                         "rules": [{"name": "api", "require": {"any": ["idp"]}}]}"#;
        let config: AuthConfig = gateway_common::config::parse_json(config.as_bytes()).unwrap();
        let shared = Rc::new(Shared::new(&host, config.compile().unwrap(), [[7; 16], [8; 16]], "auth").unwrap());
        request(&host, b"Bearer opaque-1");
        let mut first = stream(&host, &shared);
        assert_eq!(first.on_http_request_headers(0, true), Action::Pause);
        let call = host.dispatched().pop().unwrap();
        assert_eq!(call.cluster, "idp");
        assert!(call.headers.contains(&(":method".into(), "POST".into())), "{:?}", call.headers);
        assert_eq!(call.body, b"token=opaque-1&token_type_hint=access_token");
        let answer = format!(r#"{{"active": true, "sub": "svc", "exp": {}}}"#, NOW + 60);
        host.answer_call(&[(":status", b"200")], answer.as_bytes());
        first.on_http_call_response(call.token, 1, answer.len(), 0);
        assert_eq!(host.resumed(), 1);
        assert_eq!(host.metric("auth.introspection.active"), 1);

        request(&host, b"Bearer opaque-1");
        host.reset_calls();
        assert_eq!(stream(&host, &shared).on_http_request_headers(0, true), Action::Continue);
        assert_eq!(host.dispatched().len(), 1, "no second call");
        assert_eq!(host.metric("auth.introspection.cache_hits"), 1);
        let calls = host.calls();
        assert_eq!(calls.iter().filter(|call| *call == "shared_data").count(), 1, "{calls:?}");
        assert_eq!(calls.len(), 9, "{calls:?}");
        assert_eq!(host.header_values(MapType::HttpRequestHeaders, "x-consumer"), vec![b"svc".to_vec()]);
    }

    /// A rule that needs two introspected tokens keeps both answers: with nothing
    /// cached (TTL 0) it makes exactly two calls, never asks the first IdP again.
    #[test]
    fn two_introspected_tokens_are_asked_once_each() {
        let host = FakeHost::new();
        host.set_now(NOW * 1_000_000_000);
        let provider = |name: &str, header: &str| {
            serde_json::json!({"name": name, "from": [{"header": header}], "introspection": {"cluster": name,
                "path": "/introspect", "client_id": "gw", "client_secret": "pw", "cache_max_ttl_seconds": 0}})
        };
        let config = serde_json::json!({"providers": [provider("one", "x-one"), provider("two", "x-two")],
                                        "rules": [{"name": "api", "require": {"all": ["one", "two"]}}]});
        let config: AuthConfig = gateway_common::config::parse_json(config.to_string().as_bytes()).unwrap();
        let shared = Rc::new(Shared::new(&host, config.compile().unwrap(), [[7; 16], [8; 16]], "auth").unwrap());
        host.replace_headers(
            MapType::HttpRequestHeaders,
            &[(":method", b"GET"), (":path", b"/"), ("x-one", b"t1"), ("x-two", b"t2")],
        );
        let mut stream = stream(&host, &shared);
        assert_eq!(stream.on_http_request_headers(0, true), Action::Pause);
        let answer = br#"{"active": true, "sub": "svc"}"#;
        for expected_cluster in ["one", "two"] {
            let call = host.dispatched().pop().unwrap();
            assert_eq!(call.cluster, expected_cluster);
            host.answer_call(&[(":status", b"200")], answer);
            stream.on_http_call_response(call.token, 1, answer.len(), 0);
        }
        assert_eq!(host.dispatched().len(), 2, "no third call");
        assert_eq!(host.resumed(), 1);
        assert_eq!(host.metric("auth.allowed"), 1);
    }

    #[test]
    fn a_bad_token_is_answered_401_with_a_clean_challenge() {
        let host = FakeHost::new();
        host.set_now(NOW * 1_000_000_000);
        let shared = shared(&host);
        request(&host, b"Bearer not.a.token");
        assert_eq!(stream(&host, &shared).on_http_request_headers(0, true), Action::Pause);
        let reply = &host.replies()[0];
        assert_eq!(reply.status, 401);
        let challenge = reply.headers.iter().find(|(n, _)| n == "www-authenticate").map(|(_, v)| v.clone()).unwrap();
        assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
        assert_eq!(host.metric("auth.denied.malformed"), 1);
        assert!(host.header_values(MapType::HttpRequestHeaders, "x-user-id").is_empty(), "the spoofed copy is gone");
    }

    #[test]
    fn a_subject_that_is_no_header_value_is_left_out_not_a_failure() {
        let host = FakeHost::new();
        host.set_now(NOW * 1_000_000_000);
        let shared = shared(&host);
        let bearer = format!("Bearer {}", token("bob\r\nx-admin: 1"));
        request(&host, bearer.as_bytes());
        assert_eq!(stream(&host, &shared).on_http_request_headers(0, true), Action::Continue);
        assert!(host.header_values(MapType::HttpRequestHeaders, "x-consumer").is_empty());
        assert!(host.header_values(MapType::HttpRequestHeaders, "x-user-id").is_empty());
        assert_eq!(host.property_value(&[IDENTITY_PROPERTY]), None);
    }

    /// A denial whose reason is not in DENIAL_REASONS would be counted nowhere.
    #[test]
    fn every_denial_reason_has_its_counter() {
        let jwt_errors = [
            JwtError::Malformed("x"),
            JwtError::TooLarge,
            JwtError::AlgorithmNotAllowed("x".into()),
            JwtError::CriticalHeader,
            JwtError::UnknownKey(None),
            JwtError::BadSignature,
            JwtError::Expired,
            JwtError::NotYetValid,
            JwtError::WrongIssuer,
            JwtError::WrongAudience,
            JwtError::MissingClaim("x".into()),
            JwtError::LifetimeTooLong,
            JwtError::Inactive,
            JwtError::Unverifiable,
        ];
        // Exhaustive on purpose: a new variant must be added above (and counted).
        for error in &jwt_errors {
            match error {
                JwtError::Malformed(_)
                | JwtError::TooLarge
                | JwtError::AlgorithmNotAllowed(_)
                | JwtError::CriticalHeader
                | JwtError::UnknownKey(_)
                | JwtError::BadSignature
                | JwtError::Expired
                | JwtError::NotYetValid
                | JwtError::WrongIssuer
                | JwtError::WrongAudience
                | JwtError::MissingClaim(_)
                | JwtError::LifetimeTooLong
                | JwtError::Inactive
                | JwtError::Unverifiable => {}
            }
        }
        let credential_codes = ["malformed", "unknown_key", "bad_password", "unknown_certificate"];
        for code in jwt_errors.iter().map(JwtError::code).chain(credential_codes) {
            assert!(DENIAL_REASONS.contains(&code), "`{code}` has no auth.denied.* counter");
        }
        let host = FakeHost::new();
        let metrics = Metrics::new(&host, "auth");
        let schemes = policy::Schemes { bearer: true, basic: false, api_key: false, mtls: false };
        for denial in [
            Denial::MultipleAuthorization,
            Denial::Missing(schemes),
            Denial::Locked { retry_after_seconds: 1 },
            Denial::InsufficientScope { required: vec![] },
            Denial::ClaimMismatch { claim: "x".into() },
            Denial::DeniedByRule { rule: "r".into() },
            Denial::Unavailable { method: "idp".into() },
            Denial::NoRule,
        ] {
            let before = host.calls().len();
            metrics.denied_metric(&denial).increment_on(&host);
            assert_eq!(host.calls().len(), before + 1, "{denial:?} was counted nowhere");
        }
    }

    #[test]
    fn an_allowed_request_becomes_identity_edits_and_a_credential_strip() {
        let host = FakeHost::new();
        let shared = shared(&host);
        let claims = std::rc::Rc::new(serde_json::json!({"sub": "alice"}));
        let identity = Identity {
            method: "idp".into(),
            name: Some("alice".into()),
            claims: Some(claims),
            provider: Some(0),
            strip: Some(TokenSource::Query("access_token".into())),
        };
        let request = gateway_common::testing::request(&[(":path", b"/a?access_token=t&x=1")]);
        let verdict = allow_verdict(&shared, &request, &[identity], AuthResult::Authenticated);
        let map = MapType::HttpRequestHeaders;
        assert_eq!(
            verdict.edits,
            vec![
                Edit::Set(map, "x-consumer".into(), b"alice".to_vec()),
                Edit::Set(map, "x-user-id".into(), b"alice".to_vec()),
                Edit::Set(map, ":path".into(), b"/a?x=1".to_vec()),
            ]
        );
        assert_eq!(
            verdict.properties,
            vec![(DECISION_PROPERTY, b"allowed".to_vec()), (IDENTITY_PROPERTY, b"alice".to_vec())]
        );
        let denied = deny_verdict(&shared, &request, &Denial::NoRule);
        let (reply, on_refused) = denied.reply.unwrap();
        assert_eq!((reply.status, on_refused), (403, OnRefusedReply::Hold));
    }

    #[test]
    fn a_spoofed_identity_that_cannot_be_removed_is_refused() {
        let host = FakeHost::new();
        host.set_now(NOW * 1_000_000_000);
        let shared = shared(&host);
        let bearer = format!("Bearer {}", token("alice"));
        request(&host, bearer.as_bytes());
        host.fail_writes.set(true);
        assert_eq!(stream(&host, &shared).on_http_request_headers(0, true), Action::Pause);
        assert_eq!(host.replies()[0].status, 403);
        assert_eq!(host.metric("auth.host_errors"), 1);
    }

    #[test]
    fn a_refused_denial_keeps_the_request_held() {
        let host = FakeHost::new();
        let shared = shared(&host);
        request(&host, b"Bearer x");
        host.refuse_local_reply.set(true);
        assert_eq!(stream(&host, &shared).on_http_request_headers(0, true), Action::Pause);
        assert_eq!(host.metric("auth.local_reply_failed"), 1);
    }
}
