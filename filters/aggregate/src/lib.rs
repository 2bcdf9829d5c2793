//! aggregate.wasm: one client request fans out to several backends in parallel
//! and gets one merged JSON answer. This file is the host glue; the composition
//! is in `compose.rs`, the configuration in `config.rs`.

pub mod compose;
pub mod config;

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Duration;

use gateway_common::config::ConfigErrors;
use gateway_common::host::{LogLevel, MapType};
use gateway_common::metrics::Metric;
use gateway_common::platform::{Ffi, Host, OnRefusedReply, ReplyFailures};
use gateway_common::problem::{Problem, RequestFacts};
use gateway_common::request::read_request_from;
use gateway_common::skeleton::{metric_prefix, Module};
use gateway_common::verdict::{Reply, Verdict};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::compose::{Answer, Outcome};
use crate::config::{AggregateConfig, Endpoint};

proxy_wasm::main! {{
    gateway_common::skeleton::install::<Aggregate>();
}}

/// Headers whose forwarding makes the composite personal (at most `private`).
const CREDENTIAL_HEADERS: &[&str] = &["authorization", "cookie", "x-user-id", "x-consumer", "x-api-key"];

struct Metrics {
    composites: Metric,
    ok: Metric,
    error: Metric,
    timeout: Metric,
    partial: Metric,
    reply_failures: ReplyFailures,
}

struct Shared {
    endpoints: Vec<Endpoint>,
    metrics: Metrics,
    /// Parts (by endpoint and part index) whose cluster call failed, logged once.
    unreachable_clusters: RefCell<BTreeSet<(usize, usize)>>,
}

impl Shared {
    /// Metrics are named `<prefix>.*` (see `skeleton::metric_prefix`).
    fn new(host: &impl Host, endpoints: Vec<Endpoint>, prefix: &str) -> Self {
        let metrics = Metrics {
            composites: Metric::counter_on(host, &format!("{prefix}.requests")),
            ok: Metric::counter_on(host, &format!("{prefix}.parts.ok")),
            error: Metric::counter_on(host, &format!("{prefix}.parts.error")),
            timeout: Metric::counter_on(host, &format!("{prefix}.parts.timeout")),
            partial: Metric::counter_on(host, &format!("{prefix}.partial_responses")),
            reply_failures: ReplyFailures::new(host, prefix),
        };
        Self { endpoints, metrics, unreachable_clusters: RefCell::default() }
    }
}

/// aggregate.wasm as a module of the shared root (`gateway_common::skeleton`).
struct Aggregate;

impl Module for Aggregate {
    const NAME: &'static str = "aggregate";
    type Config = AggregateConfig;
    type Compiled = Vec<Endpoint>;
    type Shared = Shared;
    type RootCall = ();

    fn compile(config: &AggregateConfig) -> Result<Vec<Endpoint>, ConfigErrors> {
        config.compile()
    }

    fn start(host: &Ffi, endpoints: Vec<Endpoint>, instance: &str) -> Option<Shared> {
        Some(Shared::new(host, endpoints, &metric_prefix(Self::NAME, instance)))
    }

    fn stream(shared: &Rc<Shared>, _context_id: u32) -> Box<dyn HttpContext> {
        Box::new(AggregateStream { host: Ffi, shared: Rc::clone(shared), composite: None })
    }
}

/// A composite request in progress.
struct Composite {
    endpoint: usize,
    outcomes: Vec<Option<Outcome>>,
    /// Call token -> (part index, start time in ns).
    calls: HashMap<u32, (usize, u64)>,
    credentials_forwarded: bool,
    facts: RequestFacts,
}

struct AggregateStream<H: Host> {
    host: H,
    shared: Rc<Shared>,
    composite: Option<Composite>,
}

impl<H: Host> Context for AggregateStream<H> {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let shared = Rc::clone(&self.shared);
        let Some(composite) = self.composite.as_mut() else { return };
        let Some((index, started)) = composite.calls.remove(&token_id) else { return };
        let Some(part) = shared.endpoints.get(composite.endpoint).and_then(|endpoint| endpoint.parts.get(index)) else {
            return;
        };
        // A failed call (reset, timeout, no cluster) arrives with no headers.
        let status = (num_headers > 0)
            .then(|| self.host.header(MapType::HttpCallResponseHeaders, ":status").ok().flatten())
            .flatten()
            .and_then(|status| std::str::from_utf8(&status).ok()?.parse::<u16>().ok());
        let cache_control = self
            .host
            .header(MapType::HttpCallResponseHeaders, "cache-control")
            .ok()
            .flatten()
            .map(|value| String::from_utf8_lossy(&value).into_owned());
        let too_large = body_size > part.spec.max_bytes;
        // An oversized body is never copied into the VM.
        let body = if body_size > 0 && !too_large {
            self.host.http_call_response_body(body_size).unwrap_or_default()
        } else {
            Vec::new()
        };
        let elapsed_ms = self.host.now_nanos().saturating_sub(started) / 1_000_000;
        let timed_out = compose::ran_into_deadline(status, elapsed_ms, part.spec.timeout_ms);
        let outcome = match status {
            _ if timed_out => Outcome::Timeout,
            Some(200..=299) if too_large => Outcome::Error(format!("body larger than {} bytes", part.spec.max_bytes)),
            _ => compose::judge(part, status, cache_control, &body, false),
        };
        match &outcome {
            Outcome::Ok { .. } => shared.metrics.ok.increment_on(&self.host),
            Outcome::Error(_) => shared.metrics.error.increment_on(&self.host),
            Outcome::Timeout => shared.metrics.timeout.increment_on(&self.host),
        }
        if let Some(slot) = composite.outcomes.get_mut(index) {
            *slot = Some(outcome);
        }
        if composite.calls.is_empty() {
            self.answer();
        }
    }
}

gateway_common::stream_callbacks!(request_headers);

impl<H: Host> HttpContext for AggregateStream<H> {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let request = match read_request_from(&self.host) {
            Ok(request) => request,
            Err(action) => return action,
        };
        let Some((index, params)) = compose::match_endpoint(&shared.endpoints, &request) else {
            return Action::Continue;
        };
        let Some(endpoint) = shared.endpoints.get(index) else { return Action::Continue };
        shared.metrics.composites.increment_on(&self.host);
        let mut composite = Composite {
            endpoint: index,
            outcomes: vec![None; endpoint.parts.len()],
            calls: HashMap::new(),
            credentials_forwarded: false,
            facts: RequestFacts::of(&request),
        };
        let mut paths = Vec::with_capacity(endpoint.parts.len());
        for part in &endpoint.parts {
            match compose::render_path(part, &params, &request) {
                Ok(path) => paths.push(path),
                Err(refused) => {
                    let problem = Problem::new(
                        400,
                        "bad-path-parameter",
                        "Bad Request",
                        format!("`{}` must not be `.` or `..` (a dot segment)", refused.placeholder),
                    );
                    // A refused answer lets the request go on through the chain:
                    // aggregate enforces nothing the modules behind it do not check.
                    let verdict = Verdict::answer(problem.reply(&composite.facts), OnRefusedReply::Continue);
                    return verdict.apply(&self.host, &shared.metrics.reply_failures);
                }
            }
        }
        for ((part_index, part), path) in endpoint.parts.iter().enumerate().zip(paths) {
            let authority = part.spec.authority.clone().unwrap_or_else(|| part.spec.cluster.clone());
            let mut headers: Vec<(String, String)> = vec![
                (":method".into(), part.spec.method.clone()),
                (":path".into(), path),
                (":authority".into(), authority),
                ("accept".into(), "application/json".into()),
            ];
            for name in &part.spec.forward_headers {
                if let Some(value) = request.first(name) {
                    composite.credentials_forwarded |= CREDENTIAL_HEADERS.contains(&name.as_str());
                    // Forwarded as sent or not at all (`field.rs` counts the skip).
                    match std::str::from_utf8(value) {
                        Ok(text) => headers.push((name.clone(), text.to_string())),
                        Err(_) => gateway_common::field::skipped_on(&self.host),
                    }
                }
            }
            let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let timeout = Duration::from_millis(part.spec.timeout_ms);
            match self.host.dispatch_http_call(&part.spec.cluster, &pairs, &[], timeout) {
                Ok(token) => {
                    composite.calls.insert(token, (part_index, self.host.now_nanos()));
                }
                Err(error) => {
                    // Once per cluster and worker: under traffic a log line per request floods.
                    let first_time = shared
                        .unreachable_clusters
                        .try_borrow_mut()
                        .is_ok_and(|mut set| set.insert((index, part_index)));
                    if first_time {
                        self.host.log(
                            LogLevel::Error,
                            &format!(
                                "aggregate: endpoint {} part {}: cannot call cluster `{}` ({error:?}): does it exist? \
                                 (logged once per worker; see aggregate.parts.error)",
                                endpoint.name, part.spec.name, part.spec.cluster
                            ),
                        );
                    }
                    shared.metrics.error.increment_on(&self.host);
                    if let Some(slot) = composite.outcomes.get_mut(part_index) {
                        *slot = Some(Outcome::Error(format!("cannot call cluster {}", part.spec.cluster)));
                    }
                }
            }
        }
        let waiting = !composite.calls.is_empty();
        self.composite = Some(composite);
        if !waiting {
            self.answer();
        }
        Action::Pause
    }
}

impl<H: Host> AggregateStream<H> {
    /// All parts are done: send the composite (or the failure) to the client.
    fn answer(&mut self) {
        let Some(composite) = self.composite.take() else { return };
        let Some(endpoint) = self.shared.endpoints.get(composite.endpoint) else { return };
        let outcomes: Vec<Outcome> = composite
            .outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or_else(|| Outcome::Error("no answer".into())))
            .collect();
        let answer = compose::compose(endpoint, &outcomes, composite.credentials_forwarded);
        let _ = answer_verdict(&self.shared, endpoint, answer, &composite.facts)
            .apply(&self.host, &self.shared.metrics.reply_failures);
    }
}

/// The single answer of a composite. It is sent from an HTTP call callback, so a
/// refused answer resumes the paused request (it goes on through the chain instead
/// of hanging until Envoy's timeout).
fn answer_verdict(shared: &Shared, endpoint: &Endpoint, answer: Answer, facts: &RequestFacts) -> Verdict {
    match answer {
        Answer::Merged { body, cache_control, partial } => {
            let mut headers = vec![
                ("content-type".to_string(), "application/json".to_string()),
                ("cache-control".into(), cache_control),
            ];
            if !partial.is_empty() {
                headers.push(("x-aggregate-partial".into(), partial.join(",")));
            }
            let reply = Reply::new(200, headers, body);
            let verdict = Verdict::answer(reply, OnRefusedReply::Resume);
            if partial.is_empty() {
                verdict
            } else {
                verdict.count(shared.metrics.partial)
            }
        }
        Answer::Failed { status, part, reason } => {
            let title = if status == 504 { "Gateway Timeout" } else { "Bad Gateway" };
            let problem = Problem::new(
                status,
                "aggregate-part-failed",
                title,
                format!("required part `{part}` of `{}` failed: {reason}", endpoint.name),
            )
            .with_header("cache-control", "no-store");
            Verdict::answer(problem.reply(facts), OnRefusedReply::Resume)
        }
    }
}

/// The glue on `FakeHost`: the fan-out, the single answer, and their host calls.
#[cfg(test)]
mod glue_tests {
    use super::*;
    use gateway_common::platform::FakeHost;

    const CONFIG: &str = r#"{"endpoints": [{"name": "dashboard", "path": "/dashboard/{id}", "parts": [
        {"name": "user", "cluster": "users", "path": "/users/{id}", "key": "user", "forward_headers": ["x-user-id"]},
        {"name": "orders", "cluster": "orders", "path": "/orders?user={id}", "key": "orders", "required": false}
    ]}]}"#;

    fn stream(request: &[(&str, &[u8])]) -> AggregateStream<FakeHost> {
        let config: AggregateConfig = gateway_common::config::parse_json(CONFIG.as_bytes()).unwrap();
        let host = FakeHost::new().with_headers(MapType::HttpRequestHeaders, request);
        let shared = Rc::new(Shared::new(&host, config.compile().unwrap(), "aggregate"));
        host.reset_calls();
        AggregateStream { host, shared, composite: None }
    }

    fn dashboard() -> AggregateStream<FakeHost> {
        stream(&[(":method", b"GET"), (":path", b"/dashboard/7"), ("x-user-id", b"alice")])
    }

    #[test]
    fn budget_a_composite_request_costs_two_host_calls_per_part_plus_two() {
        let mut stream = dashboard();
        assert_eq!(stream.on_http_request_headers(0, true), Action::Pause);
        assert_eq!(
            stream.host.calls(),
            ["header_pairs", "increment_metric", "dispatch_http_call", "now_nanos", "dispatch_http_call", "now_nanos"]
        );
        let calls = stream.host.dispatched();
        assert_eq!(calls[0].cluster, "users");
        let header = |call: &gateway_common::platform::DispatchedCall, name: &str| {
            call.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
        };
        assert_eq!(header(&calls[0], ":path").as_deref(), Some("/users/7"));
        assert_eq!(header(&calls[0], "x-user-id").as_deref(), Some("alice"));
        assert_eq!(header(&calls[1], ":path").as_deref(), Some("/orders?user=7"));
        assert_eq!(header(&calls[1], "x-user-id"), None, "only the configured headers are forwarded");
    }

    #[test]
    fn both_answers_make_one_merged_reply() {
        let mut stream = dashboard();
        stream.on_http_request_headers(0, true);
        stream.host.answer_call(&[(":status", b"200"), ("cache-control", b"max-age=60")], br#"{"id":"7"}"#);
        stream.on_http_call_response(1, 2, 10, 0);
        assert!(stream.host.replies().is_empty(), "waits for every part");
        stream.host.reset_calls();
        stream.host.answer_call(&[(":status", b"200"), ("cache-control", b"max-age=30")], br#"[1,2]"#);
        stream.on_http_call_response(2, 2, 5, 0);
        // status, cache-control, body, clock, metric, the reply.
        assert_eq!(
            stream.host.calls(),
            ["header", "header", "http_call_response_body", "now_nanos", "increment_metric", "send_local_response"]
        );
        let reply = &stream.host.replies()[0];
        assert_eq!(reply.status, 200);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["user"]["id"], "7");
        assert_eq!(body["orders"], serde_json::json!([1, 2]));
    }

    #[test]
    fn a_refused_reply_resumes_the_request_instead_of_hanging_it() {
        let mut stream = dashboard();
        stream.on_http_request_headers(0, true);
        stream.host.refuse_local_reply.set(true);
        stream.host.answer_call(&[(":status", b"200")], br#"{"id":"7"}"#);
        stream.on_http_call_response(1, 1, 10, 0);
        stream.on_http_call_response(2, 1, 10, 0);
        assert_eq!(stream.host.resumed(), 1);
        assert_eq!(stream.host.metric("aggregate.local_reply_failed"), 1);
    }

    #[test]
    fn a_missing_cluster_fails_its_part_and_is_logged_once() {
        let mut first = dashboard();
        first.host.unknown_clusters.borrow_mut().push("orders".into());
        assert_eq!(first.on_http_request_headers(0, true), Action::Pause);
        assert_eq!(first.host.logs().len(), 1);
        let mut second = AggregateStream { host: first.host, shared: Rc::clone(&first.shared), composite: None };
        second.on_http_request_headers(0, true);
        assert_eq!(second.host.logs().len(), 1, "logged once per VM");
        assert_eq!(second.host.metric("aggregate.parts.error"), 2);
    }
}
