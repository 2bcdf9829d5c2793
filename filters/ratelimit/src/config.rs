//! ratelimit.wasm configuration: the JSON users write, and its compiled form.

use std::collections::BTreeSet;

use gateway_common::client_ip::ClientIpSpec;
use gateway_common::config::ConfigErrors;
use gateway_common::request_match::{is_lower_case_header_name, Conditions, MatchSpec};
use serde::Deserialize;

use crate::bucket::Limit;
use crate::table::Table;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Ordered rules; every matching rule applies.
    pub rules: Vec<RuleSpec>,
    #[serde(default)]
    pub client_ip: ClientIpSpec,
    /// Size of the bucket table in shared data (bounds memory).
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Compare-and-swap attempts per bucket before `on_contention` applies.
    #[serde(default = "default_cas_retries")]
    pub cas_retries: u32,
    #[serde(default)]
    pub on_contention: OnContention,
    /// Add `RateLimit-Policy` / `RateLimit` to allowed responses too.
    #[serde(default = "default_true")]
    pub response_headers: bool,
    /// The rate-limit service that rules with `global: true` ask.
    pub global: Option<GlobalSpec>,
}

/// A rate-limit service speaking Envoy's RLS protocol, reached through an Envoy
/// cluster (HTTP/2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalSpec {
    pub cluster: String,
    pub domain: String,
    /// Envoy's rate-limit filter waits 20 ms by default.
    #[serde(default = "default_global_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// The status of the answer when the service fails and `failure_mode` is `deny`.
    #[serde(default = "default_status_on_error")]
    pub status_on_error: u16,
}

fn default_global_timeout_ms() -> u64 {
    20
}
fn default_status_on_error() -> u16 {
    500
}

/// What a request gets when the rate-limit service times out, is unreachable
/// or answers something that is not a verdict.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let it through (Envoy's default: the service is an optimization of
    /// availability, not an authorization).
    #[default]
    Allow,
    /// Answer `status_on_error`.
    Deny,
}

fn default_slots() -> u32 {
    10_000
}
fn default_cas_retries() -> u32 {
    32
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnContention {
    #[default]
    Deny,
    Allow,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// Requests without the key share one bucket per limit.
    #[default]
    Shared,
    /// The rule does not apply to them.
    Skip,
    /// They are denied.
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default, rename = "match")]
    pub match_: MatchSpec,
    /// The parts of the bucket key, combined in order.
    pub key: Vec<KeyPartSpec>,
    #[serde(default)]
    pub missing_key: MissingKey,
    /// Local limits; may be empty for a `global` rule.
    #[serde(default)]
    pub limits: Vec<LimitSpec>,
    /// Count and report what would be denied; deny nothing.
    #[serde(default)]
    pub shadow: bool,
    /// Also ask the rate-limit service (`global`), after the local limits allowed.
    #[serde(default)]
    pub global: bool,
    /// What a request costs, when not one token.
    pub cost: Option<CostSpec>,
}

/// A request's cost in tokens: from a request header up front, and/or from a
/// response header charged after the fact (e.g. tokens an LLM backend used).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostSpec {
    pub request_header: Option<String>,
    pub response_header: Option<String>,
    #[serde(default = "default_max_cost")]
    pub max: u64,
}

fn default_max_cost() -> u64 {
    1_000
}

/// Exactly one field per key part.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPartSpec {
    pub client_ip: Option<bool>,
    pub header: Option<String>,
    pub query: Option<String>,
    pub path: Option<bool>,
    pub method: Option<bool>,
    pub constant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    pub name: String,
    /// Requests per `per_seconds`.
    pub requests: u64,
    pub per_seconds: u64,
    /// Bucket capacity; defaults to `requests`.
    pub burst: Option<u64>,
}

// ---- compiled form -------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    ClientIp,
    Header(String),
    Query(String),
    Path,
    Method,
    Constant(String),
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub conditions: Conditions,
    pub key: Vec<KeyPart>,
    pub missing_key: MissingKey,
    pub limits: Vec<Limit>,
    pub shadow: bool,
    /// Whether the rate-limit service is asked too.
    pub global: bool,
    pub cost: Option<Cost>,
}

/// A rule's request cost (compiled [`CostSpec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cost {
    pub request_header: Option<String>,
    pub response_header: Option<String>,
    pub max: u64,
}

impl Cost {
    /// A request's cost header: a decimal integer up to `max` (no sign, no
    /// spaces, no leading `+`); `None` for anything else.
    pub fn parse(&self, value: &[u8]) -> Option<u64> {
        decimal(value).filter(|parsed| *parsed <= self.max)
    }

    /// A response's cost header: a decimal integer, above `max` counted as `max`
    /// (the backend reported it; the charge stays bounded); `None` for anything else.
    pub fn parse_capped(&self, value: &[u8]) -> Option<u64> {
        decimal(value).map(|parsed| parsed.min(self.max))
    }
}

/// ASCII digits only, saturating at `u64::MAX`.
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(value.iter().fold(0u64, |total, digit| total.saturating_mul(10).saturating_add(u64::from(digit - b'0'))))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalService {
    pub cluster: String,
    pub domain: String,
    pub timeout: std::time::Duration,
    pub failure_mode: FailureMode,
    pub status_on_error: u16,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub global: Option<GlobalService>,
    pub client_ip: ClientIpSpec,
    pub table: Table,
    pub on_contention: OnContention,
    pub response_headers: bool,
    /// Some rule keys on the client address or matches on it (derived once at
    /// load: the request path only reads the flag).
    pub needs_client_ip: bool,
    /// Some rule charges a cost its response reports.
    pub has_response_costs: bool,
}

impl Policy {
    pub fn limits(&self) -> impl Iterator<Item = &Limit> {
        self.rules.iter().flat_map(|rule| rule.limits.iter())
    }
}

impl RateLimitConfig {
    pub fn compile(&self) -> Result<Policy, ConfigErrors> {
        let mut errors = ConfigErrors::new();
        if self.rules.is_empty() {
            errors.add("rules", "must list at least one rule");
        }
        if !(1..=1_000_000).contains(&self.slots) {
            errors.add("slots", "must be between 1 and 1000000");
        }
        if self.cas_retries > 1_000 {
            errors.add("cas_retries", "must be at most 1000");
        }
        self.client_ip.check("client_ip", &mut errors);
        let global = self.global.as_ref().and_then(|spec| spec.compile(&mut errors));
        let mut names = BTreeSet::new();
        let mut rules = Vec::new();
        for (index, spec) in self.rules.iter().enumerate() {
            let field = format!("rules[{index}]");
            if !is_name(&spec.name) {
                errors.add(format!("{field}.name"), "must be non-empty letters, digits, '-' or '_'");
            } else if !names.insert(spec.name.as_str()) {
                errors.add(format!("{field}.name"), format!("duplicate rule name `{}`", spec.name));
            }
            if spec.global && self.global.is_none() {
                errors.add(format!("{field}.global"), "needs the top-level `global` service");
            }
            if let Some(rule) = spec.compile(&field, &mut errors) {
                rules.push(rule);
            }
        }
        let needs_client_ip =
            rules.iter().any(|rule| rule.key.contains(&KeyPart::ClientIp) || rule.conditions.needs_client_ip());
        let has_response_costs =
            rules.iter().any(|rule| rule.cost.as_ref().is_some_and(|cost| cost.response_header.is_some()));
        errors.into_result(Policy {
            needs_client_ip,
            has_response_costs,
            rules,
            global,
            client_ip: self.client_ip,
            table: Table::new(self.slots, self.cas_retries),
            on_contention: self.on_contention,
            response_headers: self.response_headers,
        })
    }
}

impl RuleSpec {
    fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<Rule> {
        let conditions = self.match_.compile(&format!("{field}.match"), errors);
        if self.key.is_empty() {
            errors.add(
                format!("{field}.key"),
                "must list at least one part (use {\"constant\": \"all\"} for a global limit)",
            );
        }
        let key: Vec<KeyPart> = self
            .key
            .iter()
            .enumerate()
            .filter_map(|(index, part)| part.compile(&format!("{field}.key[{index}]"), errors))
            .collect();
        if self.limits.is_empty() && !self.global {
            errors.add(format!("{field}.limits"), "must list at least one limit (or set global: true)");
        }
        let mut limit_names = BTreeSet::new();
        let mut limits = Vec::new();
        for (index, spec) in self.limits.iter().enumerate() {
            let limit_field = format!("{field}.limits[{index}]");
            if !is_name(&spec.name) {
                errors.add(format!("{limit_field}.name"), "must be non-empty letters, digits, '-' or '_'");
            } else if !limit_names.insert(spec.name.as_str()) {
                errors.add(format!("{limit_field}.name"), format!("duplicate limit name `{}`", spec.name));
            }
            if spec.requests == 0 {
                errors.add(format!("{limit_field}.requests"), "must be above zero");
            }
            if spec.per_seconds == 0 || spec.per_seconds > 366 * 86_400 {
                errors.add(format!("{limit_field}.per_seconds"), "must be between 1 and 31622400 (a year)");
            }
            let burst = spec.burst.unwrap_or(spec.requests);
            if burst == 0 {
                errors.add(format!("{limit_field}.burst"), "must be above zero");
            }
            limits.push(Limit::new(
                format!("{}/{}", self.name, spec.name),
                spec.name.clone(),
                spec.requests,
                spec.per_seconds,
                burst,
            ));
        }
        Some(Rule {
            name: self.name.clone(),
            conditions: conditions?,
            key,
            missing_key: self.missing_key,
            limits,
            shadow: self.shadow,
            global: self.global,
            cost: self.cost.as_ref().and_then(|cost| cost.compile(&format!("{field}.cost"), errors)),
        })
    }
}

impl CostSpec {
    fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<Cost> {
        let before = errors.messages().len();
        for (name, header) in [("request_header", &self.request_header), ("response_header", &self.response_header)] {
            if header.as_ref().is_some_and(|header| !is_lower_case_header_name(header)) {
                errors.add(format!("{field}.{name}"), "must be a lower-case header name");
            }
        }
        if self.request_header.is_none() && self.response_header.is_none() {
            errors.add(field, "needs request_header, response_header or both");
        }
        if !(1..=1_000_000).contains(&self.max) {
            errors.add(format!("{field}.max"), "must be between 1 and 1000000");
        }
        (errors.messages().len() == before).then(|| Cost {
            request_header: self.request_header.clone(),
            response_header: self.response_header.clone(),
            max: self.max,
        })
    }
}

impl GlobalSpec {
    fn compile(&self, errors: &mut ConfigErrors) -> Option<GlobalService> {
        let before = errors.messages().len();
        if self.cluster.is_empty() {
            errors.add("global.cluster", "must name an Envoy cluster");
        }
        if self.domain.is_empty() || !self.domain.bytes().all(|byte| (0x21..=0x7e).contains(&byte)) {
            errors.add("global.domain", "must be non-empty printable ASCII without spaces");
        }
        if !(1..=60_000).contains(&self.timeout_ms) {
            errors.add("global.timeout_ms", "must be between 1 and 60000");
        }
        if !(400..=599).contains(&self.status_on_error) {
            errors.add("global.status_on_error", "must be a 4xx or 5xx status");
        }
        (errors.messages().len() == before).then(|| GlobalService {
            cluster: self.cluster.clone(),
            domain: self.domain.clone(),
            timeout: std::time::Duration::from_millis(self.timeout_ms),
            failure_mode: self.failure_mode,
            status_on_error: self.status_on_error,
        })
    }
}

impl KeyPartSpec {
    fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<KeyPart> {
        let mut parts = Vec::new();
        if self.client_ip == Some(true) {
            parts.push(KeyPart::ClientIp);
        }
        if let Some(name) = &self.header {
            if !is_lower_case_header_name(name) {
                errors.add(format!("{field}.header"), "must be a lower-case header name");
            }
            parts.push(KeyPart::Header(name.clone()));
        }
        if let Some(name) = &self.query {
            if name.is_empty() {
                errors.add(format!("{field}.query"), "must not be empty");
            }
            parts.push(KeyPart::Query(name.clone()));
        }
        if self.path == Some(true) {
            parts.push(KeyPart::Path);
        }
        if self.method == Some(true) {
            parts.push(KeyPart::Method);
        }
        if let Some(value) = &self.constant {
            parts.push(KeyPart::Constant(value.clone()));
        }
        let falses = [self.client_ip, self.path, self.method].contains(&Some(false));
        if parts.len() != 1 || falses {
            errors
                .add(field, "needs exactly one of client_ip: true, header, query, path: true, method: true, constant");
            return None;
        }
        parts.pop()
    }
}

fn is_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
