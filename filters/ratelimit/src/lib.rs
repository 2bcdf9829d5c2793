//! ratelimit.wasm: token buckets (GCRA) in shared data, exact across all Envoy
//! workers and bounded in memory. This file is the host glue; the algorithm is in
//! `bucket.rs`, the shared table in `table.rs`, the decision in `policy.rs`.

pub mod bucket;
pub mod config;
pub mod global;
pub mod policy;
pub mod rls;
pub mod table;

#[cfg(test)]
#[global_allocator]
static ALLOCATOR: gateway_common::testing::CountingAllocator = gateway_common::testing::CountingAllocator;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use gateway_common::config::ConfigErrors;
use gateway_common::host::{LogLevel, MapType};
use gateway_common::metrics::{stat_segment, Metric};
use gateway_common::platform::{Ffi, GrpcCall, Host, OnRefusedReply, ReplyFailures};
use gateway_common::problem::{Problem, RequestFacts};
use gateway_common::request::read_request_from;
use gateway_common::skeleton::{Module, RootCalls};
use gateway_common::verdict::{Edit, Verdict};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::config::{FailureMode, GlobalService, Policy, RateLimitConfig};
use crate::global::GlobalVerdict;
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

/// Outcomes of the calls to the rate-limit service (names as Envoy's filter).
struct GlobalMetrics {
    ok: Metric,
    over_limit: Metric,
    error: Metric,
    failure_mode_allowed: Metric,
    headers_refused: Metric,
    charges_sent: Metric,
    charges_dropped: Metric,
}

impl GlobalMetrics {
    fn new(host: &impl Host, plugin: &str) -> Self {
        let name = |what: &str| format!("ratelimit.{plugin}.global.{what}");
        Self {
            ok: Metric::counter_on(host, &name("ok")),
            over_limit: Metric::counter_on(host, &name("over_limit")),
            error: Metric::counter_on(host, &name("error")),
            failure_mode_allowed: Metric::counter_on(host, &name("failure_mode_allowed")),
            headers_refused: Metric::counter_on(host, &name("headers_refused")),
            charges_sent: Metric::counter_on(host, &name("charges_sent")),
            charges_dropped: Metric::counter_on(host, &name("charges_dropped")),
        }
    }
}

/// Costs reported after the fact by responses, waiting for the root's tick to
/// report them to the rate-limit service (at most this many descriptors).
const MAX_PENDING_CHARGES: usize = 10_000;

struct Shared {
    policy: Policy,
    rules: Vec<RuleMetrics>,
    global: GlobalMetrics,
    /// Descriptors with the hits responses reported, for the next tick.
    pending_charges: RefCell<Vec<rls::Descriptor>>,
    cost_invalid: Metric,
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
            global: GlobalMetrics::new(host, plugin),
            pending_charges: RefCell::new(Vec::new()),
            cost_invalid: Metric::counter_on(host, &format!("ratelimit.{plugin}.cost_invalid")),
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
        Box::new(RateLimitStream::new(Ffi, Rc::clone(shared)))
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
        report_charges(&Ffi, shared);
    }
}

/// Sends the costs responses reported since the last tick to the rate-limit
/// service, one call for all of them (its answer changes nothing: the requests
/// were already served). From the root, which outlives the streams (a call a
/// stream starts is cancelled when the stream ends).
fn report_charges(host: &impl Host, shared: &Shared) {
    let Some(service) = &shared.policy.global else { return };
    let descriptors = std::mem::take(&mut *shared.pending_charges.borrow_mut());
    if descriptors.is_empty() {
        return;
    }
    let message = rls::encode_request(&service.domain, &descriptors, 0);
    let call = rls_call(service, &message, service.timeout.max(Duration::from_secs(1)));
    let count = i64::try_from(descriptors.len()).unwrap_or(i64::MAX);
    match host.dispatch_grpc_call(&call) {
        Ok(_) => shared.global.charges_sent.add_on(host, count),
        Err(_) => shared.global.charges_dropped.add_on(host, count),
    }
}

/// A `ShouldRateLimit` call to the configured service.
fn rls_call<'a>(service: &'a GlobalService, message: &'a [u8], timeout: Duration) -> GrpcCall<'a> {
    GrpcCall { cluster: &service.cluster, service: rls::SERVICE, method: rls::METHOD, message, timeout }
}

/// What an allowed request must still be charged once its response tells its cost.
struct AfterResponse {
    taken: Vec<policy::TakenToken>,
    global: Vec<policy::GlobalCheck>,
}

struct RateLimitStream<H: Host> {
    host: H,
    shared: Rc<Shared>,
    /// `RateLimit-Policy` and `RateLimit` for the response of an allowed request.
    allowed_fields: Option<(String, String)>,
    /// Headers the rate-limit service asked to add to the response.
    service_response_headers: Vec<(String, Vec<u8>)>,
    /// The request waiting for the rate-limit service.
    waiting: Option<Waiting>,
    /// Rules with a `cost.response_header` that let this request through.
    after_response: Option<AfterResponse>,
}

/// What a request paused for the rate-limit service carries until the answer.
struct Waiting {
    token: u32,
    decision: Decision,
    facts: RequestFacts,
}

impl<H: Host> RateLimitStream<H> {
    fn new(host: H, shared: Rc<Shared>) -> Self {
        Self {
            host,
            shared,
            allowed_fields: None,
            service_response_headers: Vec::new(),
            waiting: None,
            after_response: None,
        }
    }

    /// Answers or forwards a request whose decision is final.
    fn conclude(&mut self, decision: &Decision, facts: &RequestFacts, extra: Vec<Edit>) -> Action {
        let shared = Rc::clone(&self.shared);
        if decision.denial.is_none() && shared.policy.response_headers && !decision.statuses.is_empty() {
            self.allowed_fields =
                Some((policy::policy_field(&decision.policy), policy::limit_field(&decision.statuses)));
        }
        if decision.denial.is_none() && shared.policy.has_response_costs {
            self.after_response =
                Some(AfterResponse { taken: decision.taken.clone(), global: decision.global.clone() });
        }
        let mut verdict = decision_verdict(&shared, decision, facts);
        verdict.edits.extend(extra);
        if let Some((reply, _)) = verdict.reply.as_mut() {
            reply.headers.extend(
                self.service_response_headers
                    .drain(..)
                    .map(|(name, value)| (name, String::from_utf8(value).unwrap_or_default())),
            );
        }
        verdict.apply(&self.host, &shared.reply_failures)
    }

    /// Returns the local tokens of a request the service's answer denied.
    fn give_back(&self, decision: &mut Decision) {
        if self.shared.policy.give_back(&SharedData(&self.host), decision, self.host.now_nanos()).is_err() {
            self.shared.store_errors.increment_on(&self.host);
        }
    }

    /// The service failed (unreachable, timed out, no verdict): `failure_mode` says what the request gets.
    fn service_failed(&mut self, mut decision: Decision, facts: &RequestFacts) -> Action {
        let shared = Rc::clone(&self.shared);
        let Some(service) = &shared.policy.global else { return Action::Continue };
        shared.global.error.increment_on(&self.host);
        if service.failure_mode == FailureMode::Allow {
            shared.global.failure_mode_allowed.increment_on(&self.host);
            return self.conclude(&decision, facts, Vec::new());
        }
        decision.deny(Denial::ServiceFailed { status: service.status_on_error });
        self.give_back(&mut decision);
        self.conclude(&decision, facts, Vec::new())
    }

    /// Asks the rate-limit service about the global rules of an allowed request;
    /// `None` when the call could not start.
    fn ask_service(&self, decision: &Decision) -> Option<u32> {
        let service = self.shared.policy.global.as_ref()?;
        let descriptors: Vec<_> = decision.global.iter().map(|check| check.descriptor.clone()).collect();
        let message = rls::encode_request(&service.domain, &descriptors, 1);
        let call = rls_call(service, &message, service.timeout);
        self.host.dispatch_grpc_call(&call).ok()
    }

    /// The service's answer to a waiting request: a verdict, or a failure.
    fn on_service_answer(&mut self, waiting: Waiting, status_code: u32, size: usize) -> Action {
        let Waiting { mut decision, facts, .. } = waiting;
        let shared = Rc::clone(&self.shared);
        let body = if status_code == 0 { self.host.grpc_call_response_body(size).ok() } else { None };
        let Some(response) = body.and_then(|body| rls::decode_response(&body).ok()) else {
            return self.service_failed(decision, &facts);
        };
        let (response_headers, refused_response) = global::checked_headers(&response.response_headers_to_add);
        let (request_headers, refused_request) = global::checked_headers(&response.request_headers_to_add);
        let refused = refused_response + refused_request;
        if refused > 0 {
            shared.global.headers_refused.add_on(&self.host, i64::try_from(refused).unwrap_or(i64::MAX));
        }
        match global::interpret(&decision.global, &response) {
            GlobalVerdict::Invalid => self.service_failed(decision, &facts),
            GlobalVerdict::Allowed { statuses, shadow_denied } => {
                shared.global.ok.increment_on(&self.host);
                mark(&mut decision, &shadow_denied, RuleOutcome::ShadowDenied);
                decision.policy.extend(statuses.iter().cloned());
                decision.statuses.extend(statuses);
                self.service_response_headers = response_headers;
                let map = MapType::HttpRequestHeaders;
                let edits = request_headers.into_iter().map(|(name, value)| Edit::Set(map, name, value)).collect();
                self.conclude(&decision, &facts, edits)
            }
            GlobalVerdict::Denied { rules, status, retry_after_seconds } => {
                shared.global.over_limit.increment_on(&self.host);
                let rule = rules.first().copied().unwrap_or_default();
                decision.policy.extend(status.iter().cloned());
                decision.deny(Denial::Global { rule, status, retry_after_seconds });
                mark(&mut decision, &rules, RuleOutcome::Denied);
                self.give_back(&mut decision);
                self.service_response_headers = response_headers;
                self.conclude(&decision, &facts, Vec::new())
            }
        }
    }
}

impl<H: Host> RateLimitStream<H> {
    /// Charges what the response says this request cost (`cost.response_header`)
    /// to the local buckets it took and, for global rules, to the service (at the
    /// root's next tick). A value above `max` counts as `max`; one that is not a
    /// number is counted in `cost_invalid` and charges nothing.
    fn charge_response_cost(&self, after: &AfterResponse) {
        let shared = &self.shared;
        let policy = &shared.policy;
        for (index, rule) in policy.rules.iter().enumerate() {
            let Some(cost) = &rule.cost else { continue };
            let Some(header) = &cost.response_header else { continue };
            let applied = after.taken.iter().any(|token| token.rule == index)
                || after.global.iter().any(|check| check.rule == index);
            if !applied {
                continue;
            }
            let Ok(Some(value)) = self.host.header(MapType::HttpResponseHeaders, header) else { continue };
            let Some(charged) = cost.parse_capped(&value) else {
                shared.cost_invalid.increment_on(&self.host);
                continue;
            };
            if charged == 0 {
                continue;
            }
            if policy.charge(&SharedData(&self.host), &after.taken, index, charged, self.host.now_nanos()).is_err() {
                shared.store_errors.increment_on(&self.host);
            }
            for check in after.global.iter().filter(|check| check.rule == index) {
                let mut pending = shared.pending_charges.borrow_mut();
                if pending.len() < MAX_PENDING_CHARGES {
                    let mut descriptor = check.descriptor.clone();
                    descriptor.hits_addend = Some(charged);
                    pending.push(descriptor);
                } else {
                    shared.global.charges_dropped.increment_on(&self.host);
                }
            }
        }
    }
}

/// Sets the outcome of `rules` in a decision.
fn mark(decision: &mut Decision, rules: &[usize], outcome: RuleOutcome) {
    for (rule, current) in &mut decision.outcomes {
        if rules.contains(rule) {
            *current = outcome;
        }
    }
}

impl<H: Host> Context for RateLimitStream<H> {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(waiting) = self.waiting.take_if(|waiting| waiting.token == token_id) else { return };
        if let Action::Continue = self.on_service_answer(waiting, status_code, response_size) {
            let resumed = self.host.resume_request();
            self.shared.reply_failures.host_call(&self.host, "resume_request", resumed);
        }
    }
}

gateway_common::stream_callbacks!(request_headers, response_headers);

impl<H: Host> HttpContext for RateLimitStream<H> {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let policy = &shared.policy;
        let mut headers = match read_request_from(&self.host) {
            Ok(headers) => headers,
            Err(action) => return action,
        };
        let client_ip =
            if policy.needs_client_ip { policy.client_ip.derive_into(&self.host, &mut headers) } else { None };
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
        // What a denial's answer needs from the request; an allowed request that
        // waits for nobody answers nothing, and does not pay for the copy.
        let answers = decision.denial.is_some() || !decision.global.is_empty();
        let facts = if answers { RequestFacts::of(&headers) } else { RequestFacts::default() };
        // The local limits allowed; global rules wait for the service.
        if decision.denial.is_none() && !decision.global.is_empty() {
            return match self.ask_service(&decision) {
                Some(token) => {
                    self.waiting = Some(Waiting { token, decision, facts });
                    Action::Pause
                }
                None => self.service_failed(decision, &facts),
            };
        }
        self.conclude(&decision, &facts, Vec::new())
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(after) = self.after_response.take() {
            self.charge_response_cost(&after);
        }
        let mut verdict = match self.allowed_fields.take() {
            Some((policy, limit)) => response_verdict(policy, limit),
            None => Verdict::forward(),
        };
        let map = MapType::HttpResponseHeaders;
        verdict.edits.extend(self.service_response_headers.drain(..).map(|(name, value)| Edit::Add(map, name, value)));
        verdict.apply(&self.host, &self.shared.reply_failures)
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
            let reply = denial_problem(&shared.policy, denial, &decision.policy).reply(facts);
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

/// The RateLimit fields of an allowed response (every applying limit).
fn response_verdict(policy: String, limit: String) -> Verdict {
    let map = MapType::HttpResponseHeaders;
    Verdict::forward().edit(Edit::Set(map, "ratelimit-policy".into(), policy.into_bytes())).edit(Edit::Set(
        map,
        "ratelimit".into(),
        limit.into_bytes(),
    ))
}

/// The answer to a denied request; `quotas` are the policies that applied to it.
fn denial_problem(policy: &Policy, denial: &Denial, quotas: &[LimitStatus]) -> Problem {
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
        .with_header("ratelimit-policy", policy::policy_field(quotas))
        .with_header("ratelimit", status.limit_header()),
        Denial::MissingKey { rule } => Problem::new(
            400,
            "rate-limit-key-missing",
            "Missing rate-limit key",
            format!("rule {} requires a request attribute this request lacks", rule_name(*rule)),
        ),
        Denial::Global { rule, status, retry_after_seconds } => {
            let mut problem = Problem::new(
                429,
                "rate-limited",
                "Too Many Requests",
                format!("rate limit {} exceeded (global)", rule_name(*rule)),
            );
            if let Some(seconds) = retry_after_seconds {
                problem = problem.with_header("retry-after", seconds.to_string());
            }
            if let Some(status) = status {
                problem = problem
                    .with_header("ratelimit-policy", policy::policy_field(quotas))
                    .with_header("ratelimit", status.limit_header());
            }
            problem
        }
        Denial::InvalidCost { rule } => Problem::new(
            400,
            "rate-limit-cost-invalid",
            "Invalid request cost",
            format!("rule {}: the cost header must be an integer from 1 to the rule's maximum", rule_name(*rule)),
        ),
        Denial::ServiceFailed { status } => Problem::new(
            u32::from(*status),
            "rate-limit-service-failed",
            "Rate limit service unavailable",
            "the rate-limit service did not answer in time or answered no verdict".to_string(),
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
        stream_with(PER_IP, host)
    }

    /// A stream of a VM configured with `json`, host calls reset.
    fn stream_with(json: &str, host: FakeHost) -> RateLimitStream<FakeHost> {
        let config: RateLimitConfig = gateway_common::config::parse_json(json.as_bytes()).unwrap();
        let mut policy = config.compile().unwrap();
        let limits: Vec<_> = policy.limits().cloned().collect();
        policy.table.initialize(&SharedData(&host), &limits, "ratelimit").unwrap();
        let shared = Rc::new(Shared::new(&host, policy, "rl"));
        host.reset_calls();
        RateLimitStream::new(host, shared)
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
        stream.allowed_fields = None;
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
            vec![b"\"l\";r=0;t=30".to_vec()]
        );
    }

    /// The allocation budget of an allowed request of a known client, request
    /// and response side. Of the 51, about 30 are `FakeHost`'s own bookkeeping
    /// (call log, copies of what it returns and records); the module's are the
    /// target, the client address, the bucket key and identity, the group key,
    /// the decision's lists, the two RateLimit fields and the verdicts' lists.
    /// The known client's bucket is updated in the group value as read.
    #[test]
    fn budget_allocations_of_an_allowed_request() {
        let mut stream = stream(request(b"10.0.0.1:5000"));
        assert_eq!(stream.on_http_request_headers(0, true), Action::Continue);
        assert_eq!(stream.on_http_response_headers(0, true), Action::Continue);
        let (actions, allocations) = gateway_common::testing::allocations_during(|| {
            (stream.on_http_request_headers(0, true), stream.on_http_response_headers(0, true))
        });
        assert_eq!(actions, (Action::Continue, Action::Continue));
        assert!(allocations <= 51, "{allocations} allocations (61 when each take decoded and re-encoded the group)");
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

    const GLOBAL: &str = r#"{"slots": 64, "global": {"cluster": "rls", "domain": "gw", "failure_mode": "deny"},
        "rules": [{"name": "per-user", "key": [{"header": "x-user"}], "global": true,
                   "limits": [{"name": "local", "requests": 1, "per_seconds": 60}]}]}"#;

    fn global_stream(host: FakeHost) -> RateLimitStream<FakeHost> {
        stream_with(GLOBAL, host)
    }

    fn user_request(user: &[u8]) -> FakeHost {
        FakeHost::new()
            .with_headers(MapType::HttpRequestHeaders, &[(":method", b"GET"), (":path", b"/"), ("x-user", user)])
    }

    #[test]
    fn a_global_rule_asks_the_service_and_its_over_limit_gives_the_local_token_back() {
        let mut stream = global_stream(user_request(b"\xffalice"));
        assert_eq!(stream.on_http_request_headers(0, true), Action::Pause);
        let calls = stream.host.grpc_dispatched();
        assert_eq!(calls.len(), 1);
        assert_eq!((calls[0].cluster.as_str(), calls[0].service.as_str()), ("rls", rls::SERVICE));
        let descriptor = rls::Descriptor {
            entries: vec![("rule".into(), "per-user".into()), ("header.x-user".into(), "%FFalice".into())],
            hits_addend: None,
        };
        assert_eq!(calls[0].message, rls::encode_request("gw", &[descriptor], 1));
        // OVER_LIMIT with one status: 10 per minute, 0 left, reset in 42 s.
        let over: &[u8] = &[0x08, 2, 0x12, 14, 0x08, 2, 0x12, 4, 0x08, 10, 0x10, 2, 0x18, 0, 0x22, 2, 0x08, 42];
        stream.host.answer_grpc_call(over);
        stream.on_grpc_call_response(calls[0].token, 0, over.len());
        let reply = &stream.host.replies()[0];
        assert_eq!(reply.status, 429);
        let header = |name: &str| reply.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
        assert_eq!(header("retry-after").as_deref(), Some("42"));
        // The local limit and the service's: the policies that apply to this client, allowed or denied.
        assert_eq!(header("ratelimit-policy").as_deref(), Some("\"local\";q=1;w=60, \"per-user\";q=10;w=60"));
        assert_eq!(header("ratelimit").as_deref(), Some("\"per-user\";r=0;t=42"));
        assert_eq!(stream.host.metric("ratelimit.rl.global.over_limit"), 1);
        assert_eq!(stream.host.metric("ratelimit.rl.rule.per-user.denied"), 1);
        // The local token was given back: the same user is asked again, not denied locally.
        stream.waiting = None;
        assert_eq!(stream.on_http_request_headers(0, true), Action::Pause);
        assert_eq!(stream.host.grpc_dispatched().len(), 2);
    }

    #[test]
    fn a_failed_call_gets_the_failure_mode_and_ok_resumes_with_checked_headers() {
        let mut stream = global_stream(user_request(b"bob"));
        assert_eq!(stream.on_http_request_headers(0, true), Action::Pause);
        stream.on_grpc_call_response(1, 14, 0); // UNAVAILABLE
        assert_eq!(stream.host.replies()[0].status, 500);
        assert_eq!(stream.host.metric("ratelimit.rl.global.error"), 1);

        let mut stream = global_stream(user_request(b"carol"));
        assert_eq!(stream.on_http_request_headers(0, true), Action::Pause);
        // OK, with a request header to add and one with a CR/LF value.
        let mut ok = vec![0x08, 1];
        for (name, value) in [(&b"x-quota"[..], &b"gold"[..]), (b"x-evil", b"a\r\nb")] {
            let mut header = vec![0x0a, name.len() as u8];
            header.extend_from_slice(name);
            header.extend_from_slice(&[0x12, value.len() as u8]);
            header.extend_from_slice(value);
            ok.push(0x22);
            ok.push(header.len() as u8);
            ok.extend_from_slice(&header);
        }
        stream.host.answer_grpc_call(&ok);
        stream.on_grpc_call_response(1, 0, ok.len());
        assert_eq!(stream.host.resumed(), 1);
        assert_eq!(stream.host.header_values(MapType::HttpRequestHeaders, "x-quota"), vec![b"gold".to_vec()]);
        assert!(stream.host.header_values(MapType::HttpRequestHeaders, "x-evil").is_empty());
        assert_eq!(stream.host.metric("ratelimit.rl.global.headers_refused"), 1);
        assert_eq!(stream.host.metric("ratelimit.rl.rule.per-user.allowed"), 1);
    }
}
