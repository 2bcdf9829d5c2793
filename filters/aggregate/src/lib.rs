//! aggregate.wasm: one client request fans out to several backends in parallel
//! and gets one merged JSON answer. This file is the host glue; the composition
//! is in `compose.rs`, the configuration in `config.rs`.

pub mod compose;
pub mod config;

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;
use std::time::Duration;

use gateway_common::config::load_plugin_config;
use gateway_common::host::{self, LogLevel, MapType};
use gateway_common::metrics::Metric;
use gateway_common::problem::{Problem, RequestFacts};
use gateway_common::request::read_request;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::compose::{Answer, Outcome};
use crate::config::{AggregateConfig, Endpoint};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(AggregateRoot::default()) });
}}

/// Headers whose forwarding makes the composite personal (at most `private`).
const CREDENTIAL_HEADERS: &[&str] = &["authorization", "cookie", "x-user-id", "x-consumer", "x-api-key"];

struct Metrics {
    composites: Metric,
    ok: Metric,
    error: Metric,
    timeout: Metric,
    partial: Metric,
}

struct Shared {
    endpoints: Vec<Endpoint>,
    metrics: Metrics,
    /// Parts (by endpoint and part index) whose cluster call failed, logged once.
    unreachable_clusters: RefCell<BTreeSet<(usize, usize)>>,
}

#[derive(Default)]
struct AggregateRoot {
    shared: Option<Rc<Shared>>,
}

impl Context for AggregateRoot {}

impl RootContext for AggregateRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(endpoints) = load_plugin_config("aggregate", AggregateConfig::compile) else {
            return false;
        };
        let metrics = Metrics {
            composites: Metric::counter("aggregate.requests"),
            ok: Metric::counter("aggregate.parts.ok"),
            error: Metric::counter("aggregate.parts.error"),
            timeout: Metric::counter("aggregate.parts.timeout"),
            partial: Metric::counter("aggregate.partial_responses"),
        };
        self.shared = Some(Rc::new(Shared { endpoints, metrics, unreachable_clusters: RefCell::default() }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AggregateStream { shared: self.shared.clone()?, composite: None }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
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

struct AggregateStream {
    shared: Rc<Shared>,
    composite: Option<Composite>,
}

impl Context for AggregateStream {
    fn on_http_call_response(&mut self, token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let shared = Rc::clone(&self.shared);
        let Some(composite) = self.composite.as_mut() else { return };
        let Some((index, started)) = composite.calls.remove(&token_id) else { return };
        let Some(part) = shared.endpoints.get(composite.endpoint).and_then(|endpoint| endpoint.parts.get(index)) else {
            return;
        };
        // A failed call (reset, timeout, no cluster) arrives with no headers.
        let status = (num_headers > 0)
            .then(|| host::header(MapType::HttpCallResponseHeaders, ":status").ok().flatten())
            .flatten()
            .and_then(|status| std::str::from_utf8(&status).ok()?.parse::<u16>().ok());
        let cache_control = host::header(MapType::HttpCallResponseHeaders, "cache-control")
            .ok()
            .flatten()
            .map(|value| String::from_utf8_lossy(&value).into_owned());
        let too_large = body_size > part.spec.max_bytes;
        // An oversized body is never copied into the VM.
        let body = if body_size > 0 && !too_large {
            host::http_call_response_body(body_size).unwrap_or_default()
        } else {
            Vec::new()
        };
        let elapsed_ms = host::now_nanos().saturating_sub(started) / 1_000_000;
        // Envoy answers a timed-out call with no headers or its own 504.
        let timed_out = matches!(status, None | Some(504)) && elapsed_ms + 5 >= part.spec.timeout_ms;
        let outcome = match status {
            _ if timed_out => Outcome::Timeout,
            Some(200..=299) if too_large => Outcome::Error(format!("body larger than {} bytes", part.spec.max_bytes)),
            _ => compose::judge(part, status, cache_control, &body, false),
        };
        match &outcome {
            Outcome::Ok { .. } => shared.metrics.ok.increment(),
            Outcome::Error(_) => shared.metrics.error.increment(),
            Outcome::Timeout => shared.metrics.timeout.increment(),
        }
        if let Some(slot) = composite.outcomes.get_mut(index) {
            *slot = Some(outcome);
        }
        if composite.calls.is_empty() {
            self.answer();
        }
    }
}

impl HttpContext for AggregateStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let request = match read_request() {
            Ok(request) => request,
            Err(action) => return action,
        };
        let Some((index, params)) = compose::match_endpoint(&shared.endpoints, &request) else {
            return Action::Continue;
        };
        let Some(endpoint) = shared.endpoints.get(index) else { return Action::Continue };
        shared.metrics.composites.increment();
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
                    let _ = problem.send(&composite.facts);
                    return Action::Pause;
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
                        Err(_) => gateway_common::field::skipped(),
                    }
                }
            }
            let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            let timeout = Duration::from_millis(part.spec.timeout_ms);
            match host::dispatch_http_call(&part.spec.cluster, &pairs, timeout) {
                Ok(token) => {
                    composite.calls.insert(token, (part_index, host::now_nanos()));
                }
                Err(error) => {
                    // Once per cluster and worker: under traffic a log line per request floods.
                    let first_time = shared
                        .unreachable_clusters
                        .try_borrow_mut()
                        .is_ok_and(|mut set| set.insert((index, part_index)));
                    if first_time {
                        host::log(
                            LogLevel::Error,
                            &format!(
                                "aggregate: endpoint {} part {}: cannot call cluster `{}` ({error:?}): does it exist? \
                                 (logged once per worker; see aggregate.parts.error)",
                                endpoint.name, part.spec.name, part.spec.cluster
                            ),
                        );
                    }
                    shared.metrics.error.increment();
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

impl AggregateStream {
    /// All parts are done: send the composite (or the failure) to the client.
    fn answer(&mut self) {
        let Some(composite) = self.composite.take() else { return };
        let Some(endpoint) = self.shared.endpoints.get(composite.endpoint) else { return };
        let outcomes: Vec<Outcome> = composite
            .outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or_else(|| Outcome::Error("no answer".into())))
            .collect();
        match compose::compose(endpoint, &outcomes, composite.credentials_forwarded) {
            Answer::Merged { body, cache_control, partial } => {
                let partial_header = partial.join(",");
                let mut headers = vec![("content-type", "application/json"), ("cache-control", cache_control.as_str())];
                if !partial.is_empty() {
                    self.shared.metrics.partial.increment();
                    headers.push(("x-aggregate-partial", partial_header.as_str()));
                }
                let _ = host::send_local_response(200, &headers, &body, None);
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
                let _ = problem.send(&composite.facts);
            }
        }
    }
}
