//! The per-request decision: which rules apply, which buckets to take from, and
//! what to answer. Plain Rust over plain inputs and a `Store`.

use std::borrow::Cow;

use gateway_common::request::RequestHeaders;
use gateway_common::text::push_u64;

use crate::bucket::{Limit, Verdict};
use crate::config::{KeyPart, MissingKey, OnContention, Policy, Rule};
use crate::rls::{self, Descriptor};
use crate::table::{Store, StoreError, Take};

/// What one limit said, for the RateLimit header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitStatus {
    pub name: String,
    pub quota: u64,
    pub window_seconds: u64,
    pub remaining: u64,
    /// RateLimit `t`: seconds until additional quota is made available.
    pub reset_seconds: u64,
    pub retry_after_seconds: u64,
}

impl LimitStatus {
    /// A token bucket as draft-11 fields: the quota is the bucket's capacity
    /// (`burst`) over the time it takes to refill it, so `r` never exceeds `q`
    /// and `q / w` is the refill rate (the window rounded up: a client pacing
    /// itself by `q / w` is never faster than the bucket refills).
    fn new(limit: &Limit, verdict: &Verdict) -> Self {
        Self {
            remaining: verdict.remaining,
            reset_seconds: verdict.next_quota_seconds,
            retry_after_seconds: verdict.retry_after_seconds,
            ..Self::quota_of(limit)
        }
    }

    /// The limit's quota policy alone (`q`, `w`), for `RateLimit-Policy`.
    fn quota_of(limit: &Limit) -> Self {
        let window_seconds = if limit.burst == limit.requests {
            limit.period_seconds
        } else {
            let refill = u128::from(limit.burst) * u128::from(limit.period_seconds);
            u64::try_from(refill.div_ceil(u128::from(limit.requests.max(1)))).unwrap_or(u64::MAX).max(1)
        };
        Self {
            name: limit.name.clone(),
            quota: limit.burst,
            window_seconds,
            remaining: limit.burst,
            reset_seconds: 0,
            retry_after_seconds: 0,
        }
    }

    /// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-11).
    pub fn policy_header(&self) -> String {
        policy_field(std::slice::from_ref(self))
    }

    /// `RateLimit` (draft-ietf-httpapi-ratelimit-headers-11): `t` is the time
    /// until more quota is available, never earlier than Retry-After.
    pub fn limit_header(&self) -> String {
        limit_field(std::slice::from_ref(self))
    }
}

/// `RateLimit-Policy` for several limits: one List, one item per limit.
pub fn policy_field(limits: &[LimitStatus]) -> String {
    list_field(limits, [";q=", ";w="], |limit| [limit.quota, limit.window_seconds])
}

/// `RateLimit` for several limits: one List, one item per limit.
pub fn limit_field(limits: &[LimitStatus]) -> String {
    list_field(limits, [";r=", ";t="], |limit| [limit.remaining, limit.reset_seconds])
}

/// A structured-field List of `"<name>";<a>=<n>;<b>=<m>` items, written by hand
/// into one string (this runs on every allowed request; `format!` costs more
/// than the string in a Wasm module).
fn list_field(limits: &[LimitStatus], parameters: [&str; 2], values: impl Fn(&LimitStatus) -> [u64; 2]) -> String {
    let mut out = String::with_capacity(limits.iter().map(|limit| limit.name.len() + 40).sum());
    for (index, limit) in limits.iter().enumerate() {
        if index > 0 {
            out.push_str(", ");
        }
        out.push('"');
        out.push_str(&limit.name);
        out.push('"');
        for (parameter, value) in parameters.iter().zip(values(limit)) {
            out.push_str(parameter);
            push_u64(&mut out, value);
        }
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A limit is exhausted.
    Exhausted { rule: usize, status: LimitStatus },
    /// The request lacks the rule's key and the rule says deny.
    MissingKey { rule: usize },
    /// Compare-and-swap retries ran out (`on_contention: deny`).
    Contended { rule: usize },
    /// The request's cost header is not an integer from 1 to the rule's `max`.
    InvalidCost { rule: usize },
    /// The rate-limit service said the rule is over its limit.
    Global { rule: usize, status: Option<LimitStatus>, retry_after_seconds: Option<u64> },
    /// The rate-limit service failed and `failure_mode` is `deny`.
    ServiceFailed { status: u16 },
}

/// Per-rule outcomes, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleOutcome {
    /// The rule's limits let the request through, and so did every other rule.
    Allowed,
    /// The rule let the request through but a later rule denied it: its tokens
    /// were given back, and it counts neither as allowed nor as denied.
    GivenBack,
    Denied,
    ShadowDenied,
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub denial: Option<Denial>,
    /// Every enforced limit that allowed the request, in rule order (`RateLimit`).
    pub statuses: Vec<LimitStatus>,
    /// The quota policy of every enforced limit of every rule that applies to
    /// the request, in rule order (`RateLimit-Policy`): the same for every
    /// request of a client to one resource, allowed or denied (draft-11: the
    /// field SHOULD remain consistent).
    pub policy: Vec<LimitStatus>,
    pub outcomes: Vec<(usize, RuleOutcome)>,
    pub contended: u32,
    /// Local tokens this request holds.
    pub taken: Vec<TakenToken>,
    /// Rules the rate-limit service must still agree to (when nothing denied).
    pub global: Vec<GlobalCheck>,
}

impl Decision {
    /// Marks the request denied: rules that had let it through now count as
    /// given back (their tokens are returned by [`Policy::give_back`]).
    pub fn deny(&mut self, denial: Denial) {
        self.denial = Some(denial);
        self.statuses.clear();
        for (_, outcome) in &mut self.outcomes {
            if *outcome == RuleOutcome::Allowed {
                *outcome = RuleOutcome::GivenBack;
            }
        }
    }
}

/// Everything the decision needs to know about the request.
pub struct RequestView<'a> {
    pub headers: &'a RequestHeaders,
    /// The client address (no port); `None` when unknown.
    pub client_ip: Option<&'a [u8]>,
}

/// The bytes of one key part of the request; `None` when the request lacks it.
fn key_part_value<'a>(part: &'a KeyPart, request: &RequestView<'a>) -> Option<Cow<'a, [u8]>> {
    Some(match part {
        KeyPart::ClientIp => Cow::Borrowed(request.client_ip?),
        KeyPart::Header(name) => Cow::Borrowed(request.headers.first(name)?),
        KeyPart::Query(name) => Cow::Owned(request.headers.query_values(name).into_iter().next()?),
        // One bucket per resource, however the client spells its path.
        KeyPart::Path => Cow::Owned(gateway_common::request::normalized_path(request.headers.path().as_bytes())),
        KeyPart::Method => Cow::Borrowed(request.headers.method()),
        KeyPart::Constant(value) => Cow::Borrowed(value.as_bytes()),
    })
}

/// Builds the bucket key of a rule; `None` when the request lacks a part.
/// Each part is the raw bytes the client sent, prefixed with a marker and its
/// length: two different requests can never share a key, whatever bytes their
/// parts hold (no separator a value could contain, no lossy decoding).
pub fn bucket_key(rule: &Rule, request: &RequestView<'_>) -> Option<Vec<u8>> {
    let mut key = Vec::new();
    for part in &rule.key {
        let bytes = key_part_value(part, request)?;
        key.push(PRESENT_PART);
        key.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
        key.extend_from_slice(&bytes);
    }
    Some(key)
}

/// The descriptor a global rule sends: `("rule", <name>)`, then one entry per
/// key part (`remote_address`, `header.<name>`, `query.<name>`, `path`,
/// `method`, `generic_key`), each value escaped by [`rls::entry_value`]. A
/// request that lacks a part (`missing_key: shared`) sends the rule entry alone.
pub fn descriptor(rule: &Rule, request: &RequestView<'_>) -> Descriptor {
    let mut entries = vec![("rule".to_string(), rule.name.clone())];
    let parts: Option<Vec<(String, String)>> = rule
        .key
        .iter()
        .map(|part| {
            let name = match part {
                KeyPart::ClientIp => "remote_address".to_string(),
                KeyPart::Header(header) => format!("header.{header}"),
                KeyPart::Query(query) => format!("query.{}", rls::entry_value(query.as_bytes())),
                KeyPart::Path => "path".to_string(),
                KeyPart::Method => "method".to_string(),
                KeyPart::Constant(_) => "generic_key".to_string(),
            };
            Some((name, rls::entry_value(&key_part_value(part, request)?)))
        })
        .collect();
    entries.extend(parts.unwrap_or_default());
    Descriptor { entries, hits_addend: None }
}

/// Marks a key part in [`bucket_key`]; the key of requests that lack a part
/// (`missing_key: shared`) is [`MISSING_KEY`], which no present part starts with.
const PRESENT_PART: u8 = 1;
const MISSING_KEY: &[u8] = &[0];

/// A token taken from a local bucket, to give back if the request is denied later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenToken {
    pub rule: usize,
    limit: usize,
    key: String,
    identity: Vec<u8>,
    cost: u64,
}

/// The tokens a request costs under a rule: its `cost.request_header` (absent:
/// 1), `None` when that header holds anything but an integer from 1 to `max`
/// (a client must not pass for free by claiming a cost of 0).
fn request_cost(rule: &Rule, request: &RequestView<'_>) -> Option<u64> {
    let Some(cost) = &rule.cost else { return Some(1) };
    let Some(header) = &cost.request_header else { return Some(1) };
    match request.headers.first(header) {
        None => Some(1),
        Some(value) => cost.parse(value).filter(|cost| *cost >= 1),
    }
}

/// A rule whose verdict the rate-limit service gives (`global: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalCheck {
    pub rule: usize,
    pub descriptor: Descriptor,
    pub shadow: bool,
}

impl Policy {
    /// Decides one request. Tokens taken for a request that ends up denied are
    /// given back (a compensating CAS per bucket).
    pub fn decide(&self, store: &impl Store, request: &RequestView<'_>, now: u64) -> Result<Decision, StoreError> {
        let mut decision = Decision::default();
        'rules: for (index, rule) in self.rules.iter().enumerate() {
            if !rule.conditions.matches(request.headers) {
                continue;
            }
            let built = bucket_key(rule, request);
            let key_is_missing = built.is_none();
            let key = match (built, rule.missing_key) {
                (Some(key), _) => key,
                (None, MissingKey::Shared) => MISSING_KEY.to_vec(),
                (None, MissingKey::Skip) => {
                    decision.outcomes.push((index, RuleOutcome::Skipped));
                    continue;
                }
                (None, MissingKey::Deny) => {
                    decision.outcomes.push((index, RuleOutcome::Denied));
                    decision.denial = Some(Denial::MissingKey { rule: index });
                    break;
                }
            };
            let Some(cost) = request_cost(rule, request) else {
                decision.outcomes.push((index, RuleOutcome::Denied));
                decision.denial = Some(Denial::InvalidCost { rule: index });
                break;
            };
            if !rule.shadow {
                decision.policy.extend(rule.limits.iter().map(LimitStatus::quota_of));
            }
            let mut outcome = RuleOutcome::Allowed;
            for (limit_index, limit) in rule.limits.iter().enumerate() {
                let mut identity = limit.id.as_bytes().to_vec();
                identity.push(0);
                identity.extend_from_slice(&key);
                match self.table.take_cost(store, limit, &identity, now, cost)? {
                    Take::Taken { verdict, key, identity } => {
                        if !rule.shadow {
                            decision.statuses.push(LimitStatus::new(limit, &verdict));
                        }
                        decision.taken.push(TakenToken { rule: index, limit: limit_index, key, identity, cost });
                    }
                    Take::Denied { verdict } if rule.shadow => {
                        let _ = verdict;
                        outcome = RuleOutcome::ShadowDenied;
                    }
                    Take::Denied { verdict } => {
                        decision.outcomes.push((index, RuleOutcome::Denied));
                        decision.denial =
                            Some(Denial::Exhausted { rule: index, status: LimitStatus::new(limit, &verdict) });
                        self.add_later_policies(&mut decision, index, request);
                        break 'rules;
                    }
                    Take::Contended => {
                        decision.contended += 1;
                        if self.on_contention == OnContention::Deny && !rule.shadow {
                            decision.outcomes.push((index, RuleOutcome::Denied));
                            decision.denial = Some(Denial::Contended { rule: index });
                            self.add_later_policies(&mut decision, index, request);
                            break 'rules;
                        }
                    }
                }
            }
            if rule.global {
                let mut descriptor = if key_is_missing {
                    Descriptor { entries: vec![("rule".to_string(), rule.name.clone())], hits_addend: None }
                } else {
                    descriptor(rule, request)
                };
                descriptor.hits_addend = (cost != 1).then_some(cost);
                decision.global.push(GlobalCheck { rule: index, descriptor, shadow: rule.shadow });
            }
            decision.outcomes.push((index, outcome));
        }
        if let Some(denial) = decision.denial.take() {
            decision.deny(denial);
            decision.global.clear();
            self.give_back(store, &mut decision, now)?;
        }
        Ok(decision)
    }

    /// The quota policies of the rules after `stopped` that apply to the request
    /// (a denial stops the evaluation; the policy field still lists them all).
    fn add_later_policies(&self, decision: &mut Decision, stopped: usize, request: &RequestView<'_>) {
        for rule in self.rules.iter().skip(stopped + 1) {
            let applies = !rule.shadow
                && rule.conditions.matches(request.headers)
                && (rule.missing_key != MissingKey::Skip || bucket_key(rule, request).is_some());
            if applies {
                decision.policy.extend(rule.limits.iter().map(LimitStatus::quota_of));
            }
        }
    }

    /// Charges the cost a response reported to the buckets `taken` holds for `rule`.
    pub fn charge(
        &self,
        store: &impl Store,
        taken: &[TakenToken],
        rule: usize,
        cost: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        for token in taken.iter().filter(|token| token.rule == rule) {
            if let Some(limit) = self.rules.get(rule).and_then(|rule| rule.limits.get(token.limit)) {
                self.table.charge(store, limit, &token.key, &token.identity, now, cost)?;
            }
        }
        Ok(())
    }

    /// Returns the local tokens a denied request took.
    pub fn give_back(&self, store: &impl Store, decision: &mut Decision, now: u64) -> Result<(), StoreError> {
        for taken in std::mem::take(&mut decision.taken) {
            let limit = self.rules.get(taken.rule).and_then(|rule| rule.limits.get(taken.limit));
            if let Some(limit) = limit {
                self.table.give_back_cost(store, limit, &taken.key, &taken.identity, now, taken.cost)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimitConfig;
    use gateway_common::shared::MemoryStore;

    const SECOND: u64 = 1_000_000_000;

    fn policy(json: &str) -> Policy {
        let config: RateLimitConfig = gateway_common::config::parse_json(json.as_bytes()).unwrap();
        config.compile().unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> RequestHeaders {
        gateway_common::testing::request_text(pairs)
    }

    fn raw_headers(pairs: &[(&str, &[u8])]) -> RequestHeaders {
        gateway_common::testing::request(pairs)
    }

    proptest::proptest! {
        #[test]
        fn distinct_header_bytes_never_share_a_bucket(
            a1 in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12),
            a2 in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12),
            b1 in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12),
            b2 in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12),
        ) {
            let policy = policy(
                r#"{"slots": 8, "rules": [{"name": "r", "key": [{"header": "x-a"}, {"header": "x-b"}],
                    "limits": [{"name": "l", "requests": 1, "per_seconds": 60}]}]}"#,
            );
            let key = |a: &[u8], b: &[u8]| {
                let request = raw_headers(&[(":path", b"/"), ("x-a", a), ("x-b", b)]);
                bucket_key(&policy.rules[0], &RequestView { headers: &request, client_ip: None }).unwrap()
            };
            proptest::prop_assert_eq!(key(&a1, &b1) == key(&a2, &b2), a1 == a2 && b1 == b2);
        }
    }

    #[test]
    fn distinct_raw_keys_never_share_a_bucket() {
        let policy = policy(
            r#"{"slots": 64, "rules": [{"name": "r", "key": [{"header": "x-a"}, {"header": "x-b"}, {"path": true}],
                "limits": [{"name": "l", "requests": 1, "per_seconds": 60}]}]}"#,
        );
        let rule = &policy.rules[0];
        let cases: [(&[u8], &[u8], &[u8]); 5] = [
            (b"\xff", b"x", b"/p"),
            (b"\xfe", b"x", b"/p"),
            (b"\xff\x1fx", b"", b"/p"),
            (b"\xff", b"\x1fx", b"/p"),
            (b"\xff", b"x", b"/p%FF"),
        ];
        let keys: Vec<Vec<u8>> = cases
            .iter()
            .map(|(a, b, path)| {
                let request = raw_headers(&[(":path", path), ("x-a", a), ("x-b", b)]);
                bucket_key(rule, &RequestView { headers: &request, client_ip: None }).unwrap()
            })
            .collect();
        for (i, key) in keys.iter().enumerate() {
            assert!(keys[i + 1..].iter().all(|other| other != key), "case {i} collides");
            assert_ne!(key.as_slice(), MISSING_KEY);
        }
    }

    #[test]
    fn a_denial_by_one_limit_gives_back_the_others() {
        let mut policy = policy(
            r#"{"slots": 64, "rules": [
                {"name": "roomy", "key": [{"constant": "all"}], "limits": [{"name": "l", "requests": 100, "per_seconds": 60}]},
                {"name": "tight", "key": [{"header": "x-user"}], "limits": [{"name": "l", "requests": 1, "per_seconds": 60}]}
            ]}"#,
        );
        let store = MemoryStore::default();
        {
            let limits = policy.limits().cloned().collect::<Vec<_>>();
            policy.table.initialize(&store, &limits, "rl").unwrap();
        }
        let request = headers(&[(":path", "/"), ("x-user", "a")]);
        let view = RequestView { headers: &request, client_ip: None };
        let now = 100 * SECOND;
        let first = policy.decide(&store, &view, now).unwrap();
        assert!(first.denial.is_none());
        let remaining: Vec<u64> = first.statuses.iter().map(|status| status.remaining).collect();
        assert_eq!(remaining, [99, 0], "both limits, in rule order");
        assert_eq!(policy_field(&first.policy), "\"l\";q=100;w=60, \"l\";q=1;w=60");
        assert_eq!(first.outcomes, [(0, RuleOutcome::Allowed), (1, RuleOutcome::Allowed)]);
        for _ in 0..5 {
            let denied = policy.decide(&store, &view, now).unwrap();
            assert!(matches!(denied.denial, Some(Denial::Exhausted { rule: 1, .. })));
            // The roomy rule let it through, but the request did not go on.
            assert_eq!(denied.outcomes, [(0, RuleOutcome::GivenBack), (1, RuleOutcome::Denied)]);
        }
        // The global bucket only paid for the one allowed request.
        let other = headers(&[(":path", "/"), ("x-user", "b")]);
        let decision = policy.decide(&store, &RequestView { headers: &other, client_ip: None }, now).unwrap();
        assert!(decision.denial.is_none());
        let roomy = &policy.rules[0].limits[0];
        let mut identity = roomy.id.as_bytes().to_vec();
        identity.push(0);
        identity.extend_from_slice(&bucket_key(&policy.rules[0], &view).unwrap());
        let Take::Taken { verdict, .. } = policy.table.take(&store, roomy, &identity, now).unwrap() else { panic!() };
        assert_eq!(verdict.remaining, 97, "100 - (a, b, this one)");
    }

    #[test]
    fn missing_key_policies_and_shadow_mode() {
        let mut policy = policy(
            r#"{"slots": 64, "rules": [
                {"name": "skip", "key": [{"header": "x-a"}], "missing_key": "skip", "limits": [{"name": "l", "requests": 1, "per_seconds": 60}]},
                {"name": "shadow", "key": [{"constant": "c"}], "shadow": true, "limits": [{"name": "l", "requests": 1, "per_seconds": 60}]},
                {"name": "deny", "match": {"path": {"prefix": "/strict"}}, "key": [{"header": "x-b"}], "missing_key": "deny", "limits": [{"name": "l", "requests": 5, "per_seconds": 60}]}
            ]}"#,
        );
        let store = MemoryStore::default();
        {
            let limits = policy.limits().cloned().collect::<Vec<_>>();
            policy.table.initialize(&store, &limits, "rl").unwrap();
        }
        let now = 100 * SECOND;
        let plain = headers(&[(":path", "/")]);
        let view = RequestView { headers: &plain, client_ip: None };
        let first = policy.decide(&store, &view, now).unwrap();
        assert_eq!(first.outcomes, vec![(0, RuleOutcome::Skipped), (1, RuleOutcome::Allowed)]);
        let second = policy.decide(&store, &view, now).unwrap();
        assert!(second.denial.is_none(), "shadow rules never deny");
        assert_eq!(second.outcomes[1], (1, RuleOutcome::ShadowDenied));
        let strict = headers(&[(":path", "/strict")]);
        let denied = policy.decide(&store, &RequestView { headers: &strict, client_ip: None }, now).unwrap();
        assert_eq!(denied.denial, Some(Denial::MissingKey { rule: 2 }));
    }

    #[test]
    fn headers_use_the_draft_11_syntax() {
        let status = LimitStatus {
            name: "burst".into(),
            quota: 100,
            window_seconds: 60,
            remaining: 0,
            reset_seconds: 12,
            retry_after_seconds: 1,
        };
        assert_eq!(status.policy_header(), "\"burst\";q=100;w=60");
        assert_eq!(status.limit_header(), "\"burst\";r=0;t=12");
    }

    #[test]
    fn config_errors_name_fields() {
        let cases = [
            (
                r#"{"rules":[{"name":"a","key":[{"constant":"x"}],"limits":[{"name":"l","requests":0,"per_seconds":1}]}]}"#,
                "rules[0].limits[0].requests",
            ),
            (r#"{"rules":[{"name":"a","key":[{"ip":true}],"limits":[]}]}"#, "rules[0].key[0]"),
            (
                r#"{"rules":[{"name":"a","key":[{"header":"x","query":"y"}],"limits":[{"name":"l","requests":1,"per_seconds":1}]}]}"#,
                "rules[0].key[0]",
            ),
            (
                r#"{"rules":[{"name":"a","match":{"path":{"regex":"("}},"key":[{"path":true}],"limits":[{"name":"l","requests":1,"per_seconds":1}]}]}"#,
                "rules[0].match.path.regex",
            ),
            (
                r#"{"slots":0,"rules":[{"name":"a","key":[{"path":true}],"limits":[{"name":"l","requests":1,"per_seconds":1}]}]}"#,
                "slots",
            ),
            (
                r#"{"rules":[{"name":"a","key":[{"path":true}],"cost":{"request_header":"X-Cost"},"limits":[{"name":"l","requests":1,"per_seconds":1}]}]}"#,
                "rules[0].cost.request_header",
            ),
            (
                r#"{"rules":[{"name":"a","key":[{"path":true}],"cost":{"max":5},"limits":[{"name":"l","requests":1,"per_seconds":1}]}]}"#,
                "rules[0].cost",
            ),
        ];
        for (json, field) in cases {
            let errors = match gateway_common::config::parse_json::<RateLimitConfig>(json.as_bytes()) {
                Ok(config) => config.compile().unwrap_err(),
                Err(errors) => errors,
            };
            assert!(errors.messages().iter().any(|message| message.starts_with(field)), "{json}: {errors:?}");
        }
    }
}
