//! auth.wasm configuration: the JSON users write, and its compiled form.

use std::collections::{BTreeMap, BTreeSet};

use gateway_common::client_ip::ClientIpSpec;
use gateway_common::config::ConfigErrors;
use gateway_common::hash::decode_sha256_hex;
use gateway_common::request_match::{is_lower_case_header_name, Conditions, MatchSpec};
use serde::Deserialize;
use serde_json::Value;

use crate::introspection::{Introspection, IntrospectionSpec};
use crate::jwt::{algorithm_from_name, ClaimRules, JwsAlgorithm, KeySet, ALL_ALGORITHMS};
use crate::mtls::{Mtls, MtlsSpec, MTLS_METHOD};

/// Method names that are not JWT providers.
pub const API_KEY_METHOD: &str = "api_key";
pub const BASIC_METHOD: &str = "basic";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub providers: Vec<ProviderSpec>,
    pub api_keys: Option<ApiKeysSpec>,
    pub basic: Option<BasicSpec>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// What happens to requests no rule matches.
    #[serde(default)]
    pub default: DefaultAction,
    /// `OPTIONS` with `Origin` and `Access-Control-Request-Method` passes unauthenticated.
    #[serde(default = "default_true")]
    pub cors_preflight_bypass: bool,
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Header carrying the authenticated consumer (or subject) to the upstream.
    #[serde(default = "default_consumer_header")]
    pub consumer_header: Option<String>,
    #[serde(default)]
    pub token_cache: TokenCacheSpec,
    /// Header telling the upstream how the request passed: `authenticated`,
    /// `anonymous` (no credential, allowed) or `failed` (bad credential, allowed).
    pub result_header: Option<String>,
    /// Where rules' `client_ip` conditions take the client's address from.
    #[serde(default)]
    pub client_ip: ClientIpSpec,
    /// Consumers by the client certificate Envoy verified; referred to as `mtls`.
    pub mtls: Option<MtlsSpec>,
}

fn default_true() -> bool {
    true
}
fn default_realm() -> String {
    "gateway".into()
}
fn default_consumer_header() -> Option<String> {
    Some("x-consumer".into())
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    #[default]
    Deny,
    Allow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCacheSpec {
    /// Verified tokens kept per worker (0 disables the cache).
    #[serde(default = "default_cache_entries")]
    pub entries: usize,
    /// A cached verification is reused at most this long (and never past `exp`).
    #[serde(default = "default_cache_ttl")]
    pub max_ttl_seconds: u64,
}

impl Default for TokenCacheSpec {
    fn default() -> Self {
        Self { entries: default_cache_entries(), max_ttl_seconds: default_cache_ttl() }
    }
}

fn default_cache_entries() -> usize {
    1024
}
fn default_cache_ttl() -> u64 {
    300
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    pub name: String,
    pub issuer: Option<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Claims (dotted paths) every token must carry.
    #[serde(default)]
    pub required_claims: Vec<String>,
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
    pub max_lifetime_seconds: Option<u64>,
    /// Accepted algorithms; default: whatever the keys allow.
    pub algorithms: Option<Vec<String>>,
    // Exactly one key source:
    pub jwks: Option<Value>,
    pub pem_keys: Option<Vec<PemKeySpec>>,
    pub remote_jwks: Option<RemoteJwksSpec>,
    /// Opaque tokens, judged by the IdP (RFC 7662) instead of a signature.
    pub introspection: Option<IntrospectionSpec>,
    /// Where the token is looked for, in order; default `Authorization: Bearer`.
    pub from: Option<Vec<TokenSourceSpec>>,
    #[serde(default)]
    pub claims_to_headers: Vec<ClaimHeaderSpec>,
    /// Header receiving the verified payload (base64url JSON).
    pub payload_header: Option<String>,
    /// Keep the token on the forwarded request (default: strip it).
    #[serde(default)]
    pub forward_token: bool,
    /// Claim (dotted path) holding the token's groups, for rules' `groups`.
    pub groups_claim: Option<String>,
}

fn default_leeway() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PemKeySpec {
    pub pem: String,
    pub algorithm: String,
    pub kid: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteJwksSpec {
    /// Envoy cluster serving the JWKS.
    pub cluster: String,
    pub path: String,
    /// `:authority` of the fetch; defaults to the cluster name.
    pub authority: Option<String>,
    #[serde(default = "default_fetch_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_refresh")]
    pub refresh_seconds: u64,
    /// Minimum time between fetches triggered by unknown `kid`s.
    #[serde(default = "default_cooldown")]
    pub refetch_cooldown_seconds: u64,
}

fn default_fetch_timeout() -> u64 {
    2_000
}
fn default_refresh() -> u64 {
    300
}
fn default_cooldown() -> u64 {
    10
}

/// Exactly one of `header` (with optional `prefix`), `query`, `cookie`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSourceSpec {
    pub header: Option<String>,
    pub prefix: Option<String>,
    pub query: Option<String>,
    pub cookie: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimHeaderSpec {
    pub claim: String,
    pub header: String,
    /// How arrays become a header value: `join` (comma-separated) or `json`.
    #[serde(default)]
    pub array: ArrayFormat,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ArrayFormat {
    #[default]
    Join,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeysSpec {
    /// Where the key is looked for; default the `x-api-key` header.
    pub from: Option<Vec<TokenSourceSpec>>,
    pub keys: Vec<ApiKeySpec>,
    #[serde(default)]
    pub forward_key: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySpec {
    pub consumer: String,
    /// Groups of this consumer, for rules' `groups`.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Lower-case hex SHA-256 of the key; plaintext keys are refused.
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicSpec {
    pub users: Vec<BasicUserSpec>,
    /// Highest bcrypt cost accepted (each verification costs 2^cost rounds).
    #[serde(default = "default_max_cost")]
    pub max_cost: u32,
    #[serde(default = "default_basic_cache_seconds")]
    pub cache_seconds: u64,
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
    /// Failed attempts per user within `failure_window_seconds` before further
    /// attempts are refused without hashing.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    #[serde(default = "default_failure_window")]
    pub failure_window_seconds: u64,
    #[serde(default)]
    pub forward_credentials: bool,
}

fn default_max_cost() -> u32 {
    10
}
fn default_basic_cache_seconds() -> u64 {
    60
}
fn default_max_failures() -> u32 {
    5
}
fn default_failure_window() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicUserSpec {
    pub username: String,
    /// A bcrypt hash (`$2a$`, `$2b$` or `$2y$`).
    pub bcrypt: String,
    /// Consumer name; defaults to the username.
    pub consumer: Option<String>,
    /// Groups of this consumer, for rules' `groups`.
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default, rename = "match")]
    pub match_: MatchSpec,
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Refuse every request the rule matches (403), e.g. with a `client_ip`
    /// condition, a network that may not reach the path at all.
    #[serde(default)]
    pub deny: bool,
    /// No credential: let the request through anonymously (a bad one is still a 401).
    #[serde(default)]
    pub allow_missing: bool,
    /// No credential or a bad one: let the request through anonymously.
    #[serde(default)]
    pub allow_missing_or_failed: bool,
    /// `{"any": [...]}` or `{"all": [...]}` of provider names, `api_key`, `basic`.
    pub require: Option<RequireSpec>,
    /// Scopes the identity must hold (from `scope` or `scp`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Claim (dotted path) -> accepted values; the claim must equal one (or, for
    /// an array claim, contain one).
    #[serde(default)]
    pub claims: std::collections::BTreeMap<String, Vec<String>>,
    /// Only these consumers (API-key and basic consumers, a token's `sub`) pass.
    #[serde(default)]
    pub consumers: Vec<String>,
    /// Only members of these groups pass (with `consumers`: either suffices).
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequireSpec {
    pub any: Option<Vec<String>>,
    pub all: Option<Vec<String>>,
}

// ---- compiled form -------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Header { name: String, prefix: Option<String> },
    Query(String),
    Cookie(String),
}

#[derive(Debug, Clone)]
pub enum Keys {
    Static(KeySet),
    Remote(RemoteJwksSpec),
    /// No keys: the IdP judges each token (RFC 7662).
    Introspection(Introspection),
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub rules: ClaimRules,
    /// Accepted algorithms (configuration; intersected with each key's own).
    pub algorithms: Vec<JwsAlgorithm>,
    pub keys: Keys,
    pub sources: Vec<TokenSource>,
    pub claims_to_headers: Vec<ClaimHeaderSpec>,
    pub payload_header: Option<String>,
    pub forward_token: bool,
    pub groups_claim: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ApiKeys {
    pub sources: Vec<TokenSource>,
    /// (SHA-256 digest, consumer).
    pub keys: Vec<([u8; 32], String)>,
    pub forward_key: bool,
}

#[derive(Debug, Clone)]
pub struct BasicUser {
    pub username: String,
    pub hash: String,
    pub consumer: String,
}

#[derive(Debug, Clone)]
pub struct Basic {
    pub users: Vec<BasicUser>,
    pub cache_seconds: u64,
    pub cache_entries: usize,
    pub max_failures: u32,
    pub failure_window_seconds: u64,
    pub forward_credentials: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Anonymous,
    /// `deny: true`: every request the rule matches is refused.
    Deny,
    Any(Vec<AuthMethod>),
    All(Vec<AuthMethod>),
}

/// A credential method a rule names, resolved at configuration time (the request
/// path never looks a provider up by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthMethod {
    pub kind: MethodKind,
    /// As written in the rule: used in answers and logs.
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    /// A JWT provider, by index into `Auth::providers`.
    Provider(usize),
    ApiKey,
    Basic,
    /// The client certificate of the connection.
    Mtls,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub conditions: Conditions,
    pub requirement: Requirement,
    pub optional: Optional,
    pub scopes: Vec<String>,
    pub claims: Vec<(String, Vec<String>)>,
    /// The consumer ACL: empty lists admit everyone the requirement admits.
    pub consumers: Vec<String>,
    pub groups: Vec<String>,
}

/// Whether a rule's `require` may be passed without a (good) credential, as
/// Envoy's jwt_authn `allow_missing` / `allow_missing_or_failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optional {
    Required,
    AllowMissing,
    AllowMissingOrFailed,
}

#[derive(Debug, Clone)]
pub struct Auth {
    pub providers: Vec<Provider>,
    pub api_keys: Option<ApiKeys>,
    pub basic: Option<Basic>,
    pub rules: Vec<Rule>,
    pub default: DefaultAction,
    pub cors_preflight_bypass: bool,
    pub realm: String,
    pub consumer_header: Option<String>,
    pub token_cache: TokenCacheSpec,
    pub result_header: Option<String>,
    /// Groups of API-key and basic consumers, by consumer name.
    pub consumer_groups: BTreeMap<String, Vec<String>>,
    pub client_ip: ClientIpSpec,
    /// Some rule matches on the client's address (derive it per request).
    pub needs_client_ip: bool,
    pub mtls: Option<Mtls>,
}

impl Auth {
    /// Every header this module sets on requests: removed from every incoming
    /// request first, so a client can never inject them.
    pub fn identity_headers(&self) -> Vec<String> {
        let mut headers: BTreeSet<String> = BTreeSet::new();
        headers.extend(self.consumer_header.clone());
        headers.extend(self.result_header.clone());
        for provider in &self.providers {
            headers.extend(provider.claims_to_headers.iter().map(|spec| spec.header.clone()));
            headers.extend(provider.payload_header.clone());
        }
        headers.into_iter().collect()
    }

    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().find(|provider| provider.name == name)
    }
}

impl AuthConfig {
    pub fn compile(&self) -> Result<Auth, ConfigErrors> {
        let mut errors = ConfigErrors::new();
        let mut method_names: BTreeMap<String, MethodKind> = BTreeMap::new();
        let mut providers = Vec::new();
        for (index, spec) in self.providers.iter().enumerate() {
            let field = format!("providers[{index}]");
            if spec.name.is_empty() || [API_KEY_METHOD, BASIC_METHOD, MTLS_METHOD].contains(&spec.name.as_str()) {
                errors.add(format!("{field}.name"), "must be non-empty and not `api_key`, `basic` or `mtls`");
            } else if method_names.insert(spec.name.clone(), MethodKind::Provider(index)).is_some() {
                errors.add(format!("{field}.name"), format!("duplicate provider `{}`", spec.name));
            }
            if let Some(provider) = spec.compile(&field, &mut errors) {
                providers.push(provider);
            }
        }
        let api_keys = self.api_keys.as_ref().and_then(|spec| {
            method_names.insert(API_KEY_METHOD.into(), MethodKind::ApiKey);
            spec.compile("api_keys", &mut errors)
        });
        let basic = self.basic.as_ref().and_then(|spec| {
            method_names.insert(BASIC_METHOD.into(), MethodKind::Basic);
            spec.compile("basic", &mut errors)
        });
        let mtls = self.mtls.as_ref().and_then(|spec| {
            method_names.insert(MTLS_METHOD.into(), MethodKind::Mtls);
            spec.compile("mtls", &mut errors)
        });
        if let Some(header) = &self.consumer_header {
            check_header(header, "consumer_header", &mut errors);
        }
        if let Some(header) = &self.result_header {
            check_header(header, "result_header", &mut errors);
        }
        // The realm is a quoted auth-param of every challenge (RFC 6750 §3 charset).
        let realm_ok = !self.realm.is_empty() && gateway_common::field::auth_param_text(&self.realm) == self.realm;
        if !realm_ok {
            errors.add(
                "realm",
                "must be non-empty printable ASCII without quotes, backslashes, '%' or control characters",
            );
        }
        let mut rules = Vec::new();
        let mut rule_names = BTreeSet::new();
        for (index, spec) in self.rules.iter().enumerate() {
            let field = format!("rules[{index}]");
            if spec.name.is_empty() || !rule_names.insert(spec.name.as_str()) {
                errors.add(format!("{field}.name"), "must be non-empty and unique");
            }
            if let Some(rule) = spec.compile(&field, &method_names, &mut errors) {
                rules.push(rule);
            }
        }
        if self.token_cache.entries > 1_000_000 {
            errors.add("token_cache.entries", "must be at most 1000000");
        }
        self.client_ip.check("client_ip", &mut errors);
        let needs_client_ip = rules.iter().any(|rule| rule.conditions.needs_client_ip());
        errors.into_result(Auth {
            providers,
            api_keys,
            basic,
            rules,
            default: self.default,
            cors_preflight_bypass: self.cors_preflight_bypass,
            realm: self.realm.clone(),
            consumer_header: self.consumer_header.clone(),
            token_cache: self.token_cache.clone(),
            result_header: self.result_header.clone(),
            consumer_groups: self.consumer_groups(),
            client_ip: self.client_ip,
            needs_client_ip,
            mtls,
        })
    }
}

impl AuthConfig {
    /// Every configured consumer's groups (a consumer with several keys or
    /// users gets the union).
    fn consumer_groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let keys = self.api_keys.iter().flat_map(|spec| spec.keys.iter().map(|key| (&key.consumer, &key.groups)));
        let users = self.basic.iter().flat_map(|spec| {
            spec.users.iter().map(|user| (user.consumer.as_ref().unwrap_or(&user.username), &user.groups))
        });
        let certificates =
            self.mtls.iter().flat_map(|spec| spec.consumers.iter().map(|entry| (&entry.consumer, &entry.groups)));
        for (consumer, own) in keys.chain(users).chain(certificates) {
            groups.entry(consumer.clone()).or_default().extend(own.iter().cloned());
        }
        groups.into_iter().map(|(consumer, set)| (consumer, set.into_iter().collect())).collect()
    }
}

impl ProviderSpec {
    fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<Provider> {
        let sources_given =
            [self.jwks.is_some(), self.pem_keys.is_some(), self.remote_jwks.is_some(), self.introspection.is_some()];
        if sources_given.iter().filter(|given| **given).count() != 1 {
            errors.add(field, "needs exactly one key source: jwks, pem_keys, remote_jwks or introspection");
            return None;
        }
        let configured: Vec<JwsAlgorithm> = match &self.algorithms {
            None => ALL_ALGORITHMS.to_vec(),
            Some(names) => {
                if names.is_empty() {
                    errors.add(format!("{field}.algorithms"), "must list at least one algorithm");
                }
                names
                    .iter()
                    .enumerate()
                    .filter_map(|(index, name)| {
                        let alg = algorithm_from_name(name);
                        if alg.is_none() {
                            errors.add(
                                format!("{field}.algorithms[{index}]"),
                                format!("unknown algorithm `{name}` (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384/512, EdDSA)"),
                            );
                        }
                        alg
                    })
                    .collect()
            }
        };
        let keys = if let Some(jwks) = &self.jwks {
            match KeySet::from_jwks(jwks.to_string().as_bytes()) {
                Ok((set, skipped)) if skipped.is_empty() => Keys::Static(set),
                Ok((_, skipped)) => {
                    for reason in skipped {
                        errors.add(format!("{field}.jwks.{reason}"), "unusable key");
                    }
                    return None;
                }
                Err(reason) => {
                    errors.add(format!("{field}.jwks"), reason);
                    return None;
                }
            }
        } else if let Some(pems) = &self.pem_keys {
            if pems.is_empty() {
                errors.add(format!("{field}.pem_keys"), "must list at least one key");
            }
            let mut set = KeySet::default();
            for (index, pem) in pems.iter().enumerate() {
                let Some(alg) = algorithm_from_name(&pem.algorithm) else {
                    errors.add(
                        format!("{field}.pem_keys[{index}].algorithm"),
                        format!("unknown algorithm `{}`", pem.algorithm),
                    );
                    continue;
                };
                match KeySet::pem_key(&pem.pem, alg, pem.kid.clone()) {
                    Ok(key) => set.keys.push(key),
                    Err(reason) => errors.add(format!("{field}.pem_keys[{index}]"), reason),
                }
            }
            Keys::Static(set)
        } else if let Some(spec) = &self.introspection {
            Keys::Introspection(spec.compile(&format!("{field}.introspection"), errors)?)
        } else {
            let remote = self.remote_jwks.clone()?;
            if remote.cluster.is_empty() {
                errors.add(format!("{field}.remote_jwks.cluster"), "must name an Envoy cluster");
            }
            errors.check_path(format!("{field}.remote_jwks.path"), &remote.path);
            match &remote.authority {
                Some(authority) => {
                    errors.check_authority(format!("{field}.remote_jwks.authority"), authority);
                }
                None if !remote.cluster.is_empty()
                    && !gateway_common::request::is_authority(remote.cluster.as_bytes()) =>
                {
                    errors.add(
                        format!("{field}.remote_jwks.authority"),
                        "needed: the cluster name is not a valid authority (RFC 3986 characters only)",
                    );
                }
                None => {}
            }
            if !(1..=60_000).contains(&remote.timeout_ms) {
                errors.add(format!("{field}.remote_jwks.timeout_ms"), "must be between 1 and 60000");
            }
            if remote.refresh_seconds == 0 {
                errors.add(format!("{field}.remote_jwks.refresh_seconds"), "must be above zero");
            }
            Keys::Remote(remote)
        };
        if let Keys::Static(set) = &keys {
            if !set.algorithms().iter().any(|alg| configured.contains(alg)) {
                errors.add(format!("{field}.algorithms"), "no key can verify any of the accepted algorithms");
            }
        }
        let sources = match &self.from {
            None => vec![TokenSource::Header { name: "authorization".into(), prefix: Some("Bearer ".into()) }],
            Some(specs) => compile_sources(specs, &format!("{field}.from"), errors),
        };
        for (index, spec) in self.claims_to_headers.iter().enumerate() {
            check_header(&spec.header, &format!("{field}.claims_to_headers[{index}].header"), errors);
            if spec.claim.is_empty() {
                errors.add(format!("{field}.claims_to_headers[{index}].claim"), "must not be empty");
            }
        }
        if let Some(header) = &self.payload_header {
            check_header(header, &format!("{field}.payload_header"), errors);
        }
        Some(Provider {
            name: self.name.clone(),
            rules: ClaimRules {
                issuer: self.issuer.clone(),
                audiences: self.audiences.clone(),
                required: self.required_claims.clone(),
                leeway_seconds: self.leeway_seconds,
                max_lifetime_seconds: self.max_lifetime_seconds,
            },
            algorithms: configured,
            keys,
            sources,
            claims_to_headers: self.claims_to_headers.clone(),
            payload_header: self.payload_header.clone(),
            forward_token: self.forward_token,
            groups_claim: self.groups_claim.clone(),
        })
    }
}

fn compile_sources(specs: &[TokenSourceSpec], field: &str, errors: &mut ConfigErrors) -> Vec<TokenSource> {
    if specs.is_empty() {
        errors.add(field, "must list at least one source");
    }
    let mut sources = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let field = format!("{field}[{index}]");
        let source = match (&spec.header, &spec.query, &spec.cookie) {
            (Some(name), None, None) => {
                check_header(name, &format!("{field}.header"), errors);
                TokenSource::Header { name: name.clone(), prefix: spec.prefix.clone() }
            }
            (None, Some(name), None) if spec.prefix.is_none() && !name.is_empty() => TokenSource::Query(name.clone()),
            (None, None, Some(name)) if spec.prefix.is_none() && !name.is_empty() => TokenSource::Cookie(name.clone()),
            _ => {
                errors.add(&field, "needs exactly one of header (with optional prefix), query, cookie");
                continue;
            }
        };
        sources.push(source);
    }
    sources
}

impl ApiKeysSpec {
    fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<ApiKeys> {
        let sources = match &self.from {
            None => vec![TokenSource::Header { name: "x-api-key".into(), prefix: None }],
            Some(specs) => compile_sources(specs, &format!("{field}.from"), errors),
        };
        if self.keys.is_empty() {
            errors.add(format!("{field}.keys"), "must list at least one key");
        }
        let mut keys = Vec::new();
        for (index, key) in self.keys.iter().enumerate() {
            match decode_sha256_hex(&key.sha256) {
                Some(digest) => keys.push((digest, key.consumer.clone())),
                None => errors.add(
                    format!("{field}.keys[{index}].sha256"),
                    "must be the 64-character hex SHA-256 of the key (plaintext keys are not accepted)",
                ),
            }
            if key.consumer.is_empty() {
                errors.add(format!("{field}.keys[{index}].consumer"), "must not be empty");
            } else {
                // It becomes the consumer header and the access log's identity.
                errors.check_header_value(format!("{field}.keys[{index}].consumer"), &key.consumer);
            }
        }
        Some(ApiKeys { sources, keys, forward_key: self.forward_key })
    }
}

impl BasicSpec {
    fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<Basic> {
        if self.max_cost > 14 {
            errors.add(format!("{field}.max_cost"), "must be at most 14 (each step doubles the work per check)");
        }
        let mut users = Vec::new();
        let mut names = BTreeSet::new();
        for (index, user) in self.users.iter().enumerate() {
            let user_field = format!("{field}.users[{index}]");
            if user.username.is_empty() || user.username.contains(':') || !names.insert(user.username.as_str()) {
                errors.add(format!("{user_field}.username"), "must be non-empty, unique and without ':'");
            }
            if let Some(consumer) = &user.consumer {
                errors.check_header_value(format!("{user_field}.consumer"), consumer);
            } else if !user.username.is_empty() {
                errors.check_header_value(format!("{user_field}.username"), &user.username);
            }
            match bcrypt_cost(&user.bcrypt) {
                Some(cost) if cost <= self.max_cost => {}
                Some(cost) => errors
                    .add(format!("{user_field}.bcrypt"), format!("cost {cost} exceeds max_cost {}", self.max_cost)),
                None => errors.add(format!("{user_field}.bcrypt"), "must be a bcrypt hash ($2a$, $2b$ or $2y$)"),
            }
            users.push(BasicUser {
                username: user.username.clone(),
                hash: user.bcrypt.clone(),
                consumer: user.consumer.clone().unwrap_or_else(|| user.username.clone()),
            });
        }
        if self.max_failures == 0 {
            errors.add(format!("{field}.max_failures"), "must be above zero");
        }
        Some(Basic {
            users,
            cache_seconds: self.cache_seconds,
            cache_entries: self.cache_entries,
            max_failures: self.max_failures,
            failure_window_seconds: self.failure_window_seconds,
            forward_credentials: self.forward_credentials,
        })
    }
}

/// The cost of a `$2x$NN$...` bcrypt hash (60 characters).
pub fn bcrypt_cost(hash: &str) -> Option<u32> {
    let rest = hash.strip_prefix("$2a$").or_else(|| hash.strip_prefix("$2b$")).or_else(|| hash.strip_prefix("$2y$"))?;
    if hash.len() != 60 || rest.get(2..3) != Some("$") {
        return None;
    }
    rest.get(..2)?.parse().ok()
}

impl RuleSpec {
    fn compile(&self, field: &str, methods: &BTreeMap<String, MethodKind>, errors: &mut ConfigErrors) -> Option<Rule> {
        let conditions = self.match_.compile(&format!("{field}.match"), errors);
        let requirement = match (&self.require, self.allow_anonymous, self.deny) {
            (None, true, false) => Requirement::Anonymous,
            (None, false, true) => Requirement::Deny,
            (None, false, false) => {
                errors.add(field, "needs one of require, allow_anonymous: true, deny: true");
                return None;
            }
            (Some(_), true, _) | (Some(_), _, true) | (None, true, true) => {
                errors.add(field, "give only one of require, allow_anonymous: true, deny: true");
                return None;
            }
            (Some(require), false, false) => {
                let resolve = |names: &[String], errors: &mut ConfigErrors| -> Vec<AuthMethod> {
                    if names.is_empty() {
                        errors.add(format!("{field}.require"), "must name at least one provider");
                    }
                    names
                        .iter()
                        .enumerate()
                        .filter_map(|(index, name)| match methods.get(name) {
                            Some(kind) => Some(AuthMethod { kind: *kind, name: name.clone() }),
                            None => {
                                errors.add(
                                    format!("{field}.require[{index}]"),
                                    format!("`{name}` is not a configured provider (nor api_key / basic / mtls)"),
                                );
                                None
                            }
                        })
                        .collect()
                };
                match (&require.any, &require.all) {
                    (Some(names), None) => Requirement::Any(resolve(names, errors)),
                    (None, Some(names)) => Requirement::All(resolve(names, errors)),
                    _ => {
                        errors.add(format!("{field}.require"), "needs exactly one of any, all");
                        return None;
                    }
                }
            }
        };
        let acl = !self.consumers.is_empty() || !self.groups.is_empty();
        let no_credential = matches!(requirement, Requirement::Anonymous | Requirement::Deny);
        if no_credential && (!self.scopes.is_empty() || !self.claims.is_empty() || acl) {
            errors.add(field, "anonymous and deny rules cannot require scopes, claims, consumers or groups");
        }
        for (name, list) in [("consumers", &self.consumers), ("groups", &self.groups)] {
            if list.iter().any(String::is_empty) {
                errors.add(format!("{field}.{name}"), "names must not be empty");
            }
        }
        let optional = match (self.allow_missing, self.allow_missing_or_failed) {
            (false, false) => Optional::Required,
            (true, false) => Optional::AllowMissing,
            (false, true) => Optional::AllowMissingOrFailed,
            (true, true) => {
                errors.add(field, "give allow_missing or allow_missing_or_failed, not both");
                Optional::Required
            }
        };
        if optional != Optional::Required && no_credential {
            errors.add(field, "allow_missing and allow_missing_or_failed need require");
        }
        Some(Rule {
            name: self.name.clone(),
            conditions: conditions?,
            requirement,
            optional,
            consumers: self.consumers.clone(),
            groups: self.groups.clone(),
            scopes: self.scopes.clone(),
            claims: self.claims.iter().map(|(claim, values)| (claim.clone(), values.clone())).collect(),
        })
    }
}

fn check_header(name: &str, field: &str, errors: &mut ConfigErrors) {
    if !is_lower_case_header_name(name) || name.starts_with(':') {
        errors.add(field, "must be a lower-case header name");
    }
}
