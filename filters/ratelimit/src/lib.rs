//! ratelimit.wasm: token buckets (GCRA) in shared data, exact across all Envoy
//! workers and bounded in memory. This file is the host glue; the algorithm is in
//! `bucket.rs`, the shared table in `table.rs`, the decision in `policy.rs`.

pub mod bucket;
pub mod config;
pub mod policy;
pub mod table;

use std::rc::Rc;
use std::time::Duration;

use gateway_common::config::ConfigErrors;
use gateway_common::host::{LogLevel, MapType};
use gateway_common::metrics::{stat_segment, Metric};
use gateway_common::platform::{Ffi, Host, OnRefusedReply, ReplyFailures};
use gateway_common::problem::{Problem, RequestFacts};
use gateway_common::request::read_request_from;
use gateway_common::skeleton::{Module, RootCalls};
use gateway_common::verdict::{Edit, Verdict};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::config::{Policy, RateLimitConfig};
use crate::policy::{Decision, Denial, LimitStatus, RequestView, RuleOutcome};
use gateway_common::shared::{HostStore, SharedData, StoreError};

proxy_wasm::main! {{
    gateway_common::skeleton::install::<RateLimit>();
}}

/// Filter-state property (Envoy: `wasm.ratelimit_outcome`) for access logs.
const OUTCOME_PROPERTY: &str = "ratelimit_outcome";

struct RuleMetrics {
    allowed: Metric,
    denied: Metric,
    shadow_denied: Metric,
}

struct Shared {
    policy: Policy,
    rules: Vec<RuleMetrics>,
    cas_exhausted: Metric,
    store_errors: Metric,
    tracked_keys: Metric,
    reply_failures: ReplyFailures,
}

impl Shared {
    /// Metrics are named after the filter instance (`plugin`): two instances in one
    /// chain (per IP, per user) must not share stat names.
    fn new(host: &impl Host, policy: Policy, plugin: &str) -> Self {
        let rules = policy
            .rules
            .iter()
            .map(|rule| {
                let prefix = format!("ratelimit.{plugin}.rule.{}", stat_segment(&rule.name));
                RuleMetrics {
                    allowed: Metric::counter_on(host, &format!("{prefix}.allowed")),
                    denied: Metric::counter_on(host, &format!("{prefix}.denied")),
                    shadow_denied: Metric::counter_on(host, &format!("{prefix}.shadow_denied")),
                }
            })
            .collect();
        Self {
            rules,
            cas_exhausted: Metric::counter_on(host, &format!("ratelimit.{plugin}.cas_retries_exhausted")),
            store_errors: Metric::counter_on(host, &format!("ratelimit.{plugin}.shared_data_errors")),
            tracked_keys: Metric::gauge_on(host, &format!("ratelimit.{plugin}.tracked_keys")),
            reply_failures: ReplyFailures::new(host, &format!("ratelimit.{plugin}")),
            policy,
        }
    }
}

/// ratelimit.wasm as a module of the shared root (`gateway_common::skeleton`).
struct RateLimit;

impl Module for RateLimit {
    const NAME: &'static str = "ratelimit";
    type Config = RateLimitConfig;
    type Compiled = Policy;
    type Shared = Shared;
    type RootCall = ();

    fn compile(config: &RateLimitConfig) -> Result<Policy, ConfigErrors> {
        config.compile()
    }

    /// Creates every bucket key before traffic; metrics are named after the
    /// instance (two instances in one chain must not share stat names).
    fn start(host: &Ffi, mut policy: Policy, instance: &str) -> Option<Shared> {
        let limits: Vec<_> = policy.limits().cloned().collect();
        if policy.table.initialize(&SharedData(host), &limits, instance).is_err() {
            host.log(LogLevel::Error, "ratelimit: cannot initialize the bucket table in shared data");
            return None;
        }
        Some(Shared::new(host, policy, instance))
    }

    fn stream(shared: &Rc<Shared>, _context_id: u32) -> Box<dyn HttpContext> {
        Box::new(RateLimitStream { host: Ffi, shared: Rc::clone(shared), allowed_status: None })
    }

    fn tick_period(_shared: &Shared) -> Option<Duration> {
        Some(Duration::from_secs(1))
    }

    /// Every VM publishes the same gauge, read from the shared table (not from its
    /// own view of it).
    fn on_tick(shared: &Rc<Shared>, _calls: &mut RootCalls<()>) {
        if let Ok(tracked) = shared.policy.table.tracked(&HostStore) {
            shared.tracked_keys.record(tracked);
        }
    }
}

struct RateLimitStream<H: Host> {
    host: H,
    shared: Rc<Shared>,
    /// RateLimit headers for the response of an allowed request.
    allowed_status: Option<LimitStatus>,
}

impl<H: Host> Context for RateLimitStream<H> {}

impl<H: Host> HttpContext for RateLimitStream<H> {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let policy = &shared.policy;
        let headers = match read_request_from(&self.host) {
            Ok(headers) => headers,
            Err(action) => return action,
        };
        let client_ip = if policy.needs_client_ip() {
            let peer = self.host.property(&["source", "address"]).ok().flatten();
            policy::client_ip(peer.as_deref(), headers.first("x-forwarded-for"), policy.trusted_hops)
        } else {
            None
        };
        let view = RequestView { headers: &headers, client_ip: client_ip.as_deref() };
        let decision = match policy.decide(&SharedData(&self.host), &view, self.host.now_nanos()) {
            Ok(decision) => decision,
            Err(StoreError) => {
                // Shared data itself failed: nothing can be counted. Fail open and
                // say so in a metric (the host is broken, not the client).
                shared.store_errors.increment_on(&self.host);
                return Action::Continue;
            }
        };
        if decision.denial.is_none() && policy.response_headers {
            self.allowed_status = decision.tightest.clone();
        }
        decision_verdict(&shared, &decision, &RequestFacts::of(&headers)).apply(&self.host, &shared.reply_failures)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match &self.allowed_status {
            Some(status) => response_verdict(status).apply(&self.host, &self.shared.reply_failures),
            None => Action::Continue,
        }
    }
}

/// What a decision makes the module do: count per rule, record the outcome for
/// access logs, and answer a denial. A refused 429 keeps the request held
/// (`OnRefusedReply::Hold`): letting a denied request through would break the
/// limit, so it fails closed and ends at Envoy's stream timeout.
fn decision_verdict(shared: &Shared, decision: &Decision, facts: &RequestFacts) -> Verdict {
    let mut verdict = match &decision.denial {
        None => Verdict::forward().property(OUTCOME_PROPERTY, b"allowed".to_vec()),
        Some(denial) => {
            let reply = denial_problem(&shared.policy, denial).reply(facts);
            Verdict::answer(reply, OnRefusedReply::Hold).property(OUTCOME_PROPERTY, b"denied".to_vec())
        }
    };
    for (rule, outcome) in &decision.outcomes {
        let Some(metrics) = shared.rules.get(*rule) else { continue };
        match outcome {
            RuleOutcome::Allowed => verdict = verdict.count(metrics.allowed),
            RuleOutcome::Denied => verdict = verdict.count(metrics.denied),
            RuleOutcome::ShadowDenied => verdict = verdict.count(metrics.shadow_denied),
            RuleOutcome::Skipped | RuleOutcome::GivenBack => {}
        }
    }
    if decision.contended > 0 {
        verdict = verdict.count_by(shared.cas_exhausted, i64::from(decision.contended));
    }
    verdict
}

/// The RateLimit fields of the tightest limit on an allowed response.
fn response_verdict(status: &LimitStatus) -> Verdict {
    let map = MapType::HttpResponseHeaders;
    Verdict::forward()
        .edit(Edit::Set(map, "ratelimit-policy".into(), status.policy_header().into_bytes()))
        .edit(Edit::Set(map, "ratelimit".into(), status.limit_header().into_bytes()))
}

fn denial_problem(policy: &Policy, denial: &Denial) -> Problem {
    let rule_name = |index: usize| policy.rules.get(index).map_or("?", |rule| rule.name.as_str());
    match denial {
        Denial::Exhausted { rule, status } => Problem::new(
            429,
            "rate-limited",
            "Too Many Requests",
            format!(
                "rate limit {}/{} exceeded ({} requests per {} s); retry in {} s",
                rule_name(*rule),
                status.name,
                status.quota,
                status.window_seconds,
                status.retry_after_seconds
            ),
        )
        .with_header("retry-after", status.retry_after_seconds.to_string())
        .with_header("ratelimit-policy", status.policy_header())
        .with_header("ratelimit", status.limit_header()),
        Denial::MissingKey { rule } => Problem::new(
            400,
            "rate-limit-key-missing",
            "Missing rate-limit key",
            format!("rule {} requires a request attribute this request lacks", rule_name(*rule)),
        ),
        Denial::Contended { rule } => Problem::new(
            429,
            "rate-limit-contended",
            "Too Many Requests",
            format!("rule {}: too many concurrent updates of one bucket; retry", rule_name(*rule)),
        )
        .with_header("retry-after", "1"),
    }
}

/// The glue on `FakeHost`: decisions, answers and the host calls they cost.
#[cfg(test)]
mod glue_tests {
    use super::*;
    use gateway_common::platform::FakeHost;

    const PER_IP: &str = r#"{"slots": 64, "rules": [{"name": "per-ip", "key": [{"client_ip": true}],
        "limits": [{"name": "l", "requests": 2, "per_seconds": 60}]}]}"#;

    fn stream(host: FakeHost) -> RateLimitStream<FakeHost> {
        let config: RateLimitConfig = gateway_common::config::parse_json(PER_IP.as_bytes()).unwrap();
        let mut policy = config.compile().unwrap();
        let limits: Vec<_> = policy.limits().cloned().collect();
        policy.table.initialize(&SharedData(&host), &limits, "ratelimit").unwrap();
        let shared = Rc::new(Shared::new(&host, policy, "rl"));
        host.reset_calls();
        RateLimitStream { host, shared, allowed_status: None }
    }

    fn request(peer: &[u8]) -> FakeHost {
        FakeHost::new()
            .with_headers(MapType::HttpRequestHeaders, &[(":method", b"GET"), (":path", b"/")])
            .with_property(&["source", "address"], peer)
    }

    #[test]
    fn budget_an_allowed_request_of_a_known_client_costs_seven_host_calls() {
        let mut stream = stream(request(b"10.0.0.1:5000"));
        assert_eq!(stream.on_http_request_headers(0, true), Action::Continue);
        stream.host.reset_calls();
        stream.allowed_status = None;
        assert_eq!(stream.on_http_request_headers(0, true), Action::Continue);
        assert_eq!(
            stream.host.calls(),
            [
                "header_pairs",
                "property", // source.address
                "now_nanos",
                "shared_data",     // the client's slot
                "set_shared_data", // its bucket, by CAS
                "increment_metric",
                "set_property", // wasm.ratelimit_outcome
            ]
        );
        stream.host.reset_calls();
        assert_eq!(stream.on_http_response_headers(0, true), Action::Continue);
        assert_eq!(stream.host.calls(), ["set_header", "set_header"]);
        assert_eq!(
            stream.host.header_values(MapType::HttpResponseHeaders, "ratelimit"),
            vec![b"\"l\";r=0;t=60".to_vec()]
        );
    }

    #[test]
    fn the_third_request_is_answered_429_with_the_standard_headers() {
        let mut stream = stream(request(b"10.0.0.2:5000"));
        for _ in 0..2 {
            assert_eq!(stream.on_http_request_headers(0, true), Action::Continue);
        }
        assert_eq!(stream.on_http_request_headers(0, true), Action::Pause);
        let reply = &stream.host.replies()[0];
        assert_eq!(reply.status, 429);
        let header = |name: &str| reply.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        assert_eq!(header("retry-after").as_deref(), Some("30"));
        assert_eq!(header("content-type").as_deref(), Some("application/problem+json"));
        assert_eq!(stream.host.metric("ratelimit.rl.rule.per-ip.denied"), 1);
        assert_eq!(stream.host.property_value(&[OUTCOME_PROPERTY]), Some(b"denied".to_vec()));
    }

    #[test]
    fn a_refused_429_keeps_the_request_held_and_is_logged_once() {
        let mut stream = stream(request(b"10.0.0.3:5000"));
        for _ in 0..2 {
            stream.on_http_request_headers(0, true);
        }
        stream.host.refuse_local_reply.set(true);
        assert_eq!(stream.on_http_request_headers(0, true), Action::Pause, "a denied request never continues");
        assert_eq!(stream.on_http_request_headers(0, true), Action::Pause);
        assert_eq!(stream.host.metric("ratelimit.rl.local_reply_failed"), 2);
        assert_eq!(stream.host.logs().len(), 1);
    }
}
