//! ratelimit.wasm: token buckets (GCRA) in shared data, exact across all Envoy
//! workers and bounded in memory. This file is the host glue; the algorithm is in
//! `bucket.rs`, the shared table in `table.rs`, the decision in `policy.rs`.

pub mod bucket;
pub mod config;
pub mod policy;
pub mod table;

use std::rc::Rc;
use std::time::Duration;

use gateway_common::config::load_plugin_config;
use gateway_common::host::{self, LogLevel, MapType};
use gateway_common::metrics::{stat_segment, Metric};
use gateway_common::problem::{Problem, RequestFacts};
use gateway_common::request::read_request;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::config::{Policy, RateLimitConfig};
use crate::policy::{Decision, Denial, LimitStatus, RequestView, RuleOutcome};
use gateway_common::shared::{HostStore, StoreError};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(RateLimitRoot::default()) });
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
}

#[derive(Default)]
struct RateLimitRoot {
    shared: Option<Rc<Shared>>,
}

impl Context for RateLimitRoot {}

impl RootContext for RateLimitRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(policy) = load_plugin_config("ratelimit", RateLimitConfig::compile) else {
            return false;
        };
        let limits: Vec<_> = policy.limits().cloned().collect();
        if policy.table.initialize(&HostStore, &limits).is_err() {
            host::log(LogLevel::Error, "ratelimit: cannot initialize the bucket table in shared data");
            return false;
        }
        // Two instances in one chain (per IP, per user) must not share stat names.
        let plugin = host::property(&["plugin_name"])
            .ok()
            .flatten()
            .map(|name| stat_segment(&String::from_utf8_lossy(&name)))
            .unwrap_or_else(|| "ratelimit".to_string());
        let rules = policy
            .rules
            .iter()
            .map(|rule| {
                let prefix = format!("ratelimit.{plugin}.rule.{}", stat_segment(&rule.name));
                RuleMetrics {
                    allowed: Metric::counter(&format!("{prefix}.allowed")),
                    denied: Metric::counter(&format!("{prefix}.denied")),
                    shadow_denied: Metric::counter(&format!("{prefix}.shadow_denied")),
                }
            })
            .collect();
        self.shared = Some(Rc::new(Shared {
            rules,
            cas_exhausted: Metric::counter(&format!("ratelimit.{plugin}.cas_retries_exhausted")),
            store_errors: Metric::counter(&format!("ratelimit.{plugin}.shared_data_errors")),
            tracked_keys: Metric::gauge(&format!("ratelimit.{plugin}.tracked_keys")),
            policy,
        }));
        let _ = host::set_tick_period(Duration::from_secs(1));
        true
    }

    /// Every VM publishes the same gauge, read from the shared table (not from its
    /// own view of it).
    fn on_tick(&mut self) {
        if let Some(shared) = &self.shared {
            if let Ok(tracked) = shared.policy.table.tracked(&HostStore) {
                shared.tracked_keys.record(tracked);
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(RateLimitStream { shared: self.shared.clone()?, allowed_status: None }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct RateLimitStream {
    shared: Rc<Shared>,
    /// RateLimit headers for the response of an allowed request.
    allowed_status: Option<LimitStatus>,
}

impl Context for RateLimitStream {}

impl HttpContext for RateLimitStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let policy = &shared.policy;
        let headers = match read_request() {
            Ok(headers) => headers,
            Err(action) => return action,
        };
        let client_ip = if policy.needs_client_ip() {
            let peer = host::property(&["source", "address"]).ok().flatten();
            policy::client_ip(peer.as_deref(), headers.first("x-forwarded-for"), policy.trusted_hops)
        } else {
            None
        };
        let view = RequestView { headers: &headers, client_ip: client_ip.as_deref() };
        let decision = match policy.decide(&HostStore, &view, host::now_nanos()) {
            Ok(decision) => decision,
            Err(StoreError) => {
                // Shared data itself failed: nothing can be counted. Fail open and
                // say so in a metric (the host is broken, not the client).
                shared.store_errors.increment();
                return Action::Continue;
            }
        };
        self.count(&decision);
        match &decision.denial {
            None => {
                let _ = host::set_property(&[OUTCOME_PROPERTY], b"allowed");
                if policy.response_headers {
                    self.allowed_status = decision.tightest;
                }
                Action::Continue
            }
            Some(denial) => {
                let _ = host::set_property(&[OUTCOME_PROPERTY], b"denied");
                let facts = RequestFacts::of(&headers);
                let _ = denial_problem(policy, denial).send(&facts);
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(status) = &self.allowed_status {
            let _ =
                host::set_header(MapType::HttpResponseHeaders, "ratelimit-policy", status.policy_header().as_bytes());
            let _ = host::set_header(MapType::HttpResponseHeaders, "ratelimit", status.limit_header().as_bytes());
        }
        Action::Continue
    }
}

impl RateLimitStream {
    fn count(&self, decision: &Decision) {
        for (rule, outcome) in &decision.outcomes {
            let Some(metrics) = self.shared.rules.get(*rule) else { continue };
            match outcome {
                RuleOutcome::Allowed => metrics.allowed.increment(),
                RuleOutcome::Denied => metrics.denied.increment(),
                RuleOutcome::ShadowDenied => metrics.shadow_denied.increment(),
                RuleOutcome::Skipped => {}
            }
        }
        if decision.contended > 0 {
            self.shared.cas_exhausted.add(i64::from(decision.contended));
        }
    }
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
