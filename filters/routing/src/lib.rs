//! routing.wasm: picks the upstream cluster from request metadata, splits canary
//! traffic, rewrites, or answers itself. This file is the host glue; the decision
//! lives in `router.rs`, the configuration in `config.rs`.

pub mod config;
pub mod router;

use std::cell::Cell;
use std::rc::Rc;

use gateway_common::config::ConfigErrors;
use gateway_common::host::MapType;
use gateway_common::metrics::{stat_segment, Metric};
use gateway_common::platform::{Ffi, Host, OnRefusedReply, ReplyFailures};
use gateway_common::problem::{Problem, RequestFacts};
use gateway_common::request::{escape_bytes, read_request_from, RequestHeaders};
use gateway_common::skeleton::{metric_prefix, Module};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::config::{Action as RouteAction, Router, RoutingConfig};
use crate::router::{Decision, Forward, LocalAnswer};

proxy_wasm::main! {{
    gateway_common::skeleton::install::<Routing>();
}}

/// Filter-state property (Envoy: `wasm.routing_route`) naming the chosen route.
const ROUTE_PROPERTY: &str = "routing_route";

struct Metrics {
    per_route: Vec<Metric>,
    default_route: Metric,
    no_route: Metric,
}

struct Shared {
    router: Router,
    metrics: Metrics,
    /// SplitMix64 state for non-sticky splits (per VM; no cryptographic needs).
    random_state: Cell<u64>,
    reply_failures: ReplyFailures,
}

impl Shared {
    /// Metrics are named `<prefix>.*` (see `skeleton::metric_prefix`).
    fn new(host: &impl Host, router: Router, seed: u64, prefix: &str) -> Self {
        let metrics = Metrics {
            per_route: router
                .routes
                .iter()
                .map(|route| {
                    Metric::counter_on(host, &format!("{prefix}.route.{}.requests", stat_segment(&route.name)))
                })
                .collect(),
            default_route: Metric::counter_on(host, &format!("{prefix}.default_route.requests")),
            no_route: Metric::counter_on(host, &format!("{prefix}.no_route.requests")),
        };
        let reply_failures = ReplyFailures::new(host, prefix);
        Self { router, metrics, random_state: Cell::new(seed), reply_failures }
    }
}

/// routing.wasm as a module of the shared root (`gateway_common::skeleton`).
struct Routing;

impl Module for Routing {
    const NAME: &'static str = "routing";
    type Config = RoutingConfig;
    type Compiled = Router;
    type Shared = Shared;
    type RootCall = ();

    fn compile(config: &RoutingConfig) -> Result<Router, ConfigErrors> {
        config.compile()
    }

    fn start(host: &Ffi, router: Router, instance: &str) -> Option<Shared> {
        // std::process::id() panics on wasi; RandomState is seeded by the host's
        // random_get.
        let seed = host.now_nanos() ^ random_seed();
        Some(Shared::new(host, router, seed, &metric_prefix(Self::NAME, instance)))
    }

    fn stream(shared: &Rc<Shared>) -> Box<dyn HttpContext> {
        Box::new(RoutingStream { host: Ffi, shared: Rc::clone(shared), response_headers: None })
    }
}

struct RoutingStream<H: Host> {
    host: H,
    shared: Rc<Shared>,
    /// Route whose response headers (and name header) go on the response.
    response_headers: Option<usize>,
}

impl<H: Host> Context for RoutingStream<H> {}

impl<H: Host> HttpContext for RoutingStream<H> {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let router = &shared.router;
        let request = match read_request_from(&self.host) {
            Ok(request) => request,
            Err(action) => return action,
        };
        // No client may pick a cluster: drop its copy before anything else.
        if request.count(&router.cluster_header) > 0 {
            let _ = self.host.remove_header(MapType::HttpRequestHeaders, &router.cluster_header);
        }
        let decision = router.decide(&request, || next_random(&shared.random_state));
        match decision {
            Decision::Forward(forward) => {
                self.forward(&forward);
                Action::Continue
            }
            Decision::Respond(answer) => {
                let sent = self.answer(&request, &answer);
                self.after_local_reply(sent)
            }
            Decision::NoRoute => {
                shared.metrics.no_route.increment_on(&self.host);
                let problem = Problem::new(
                    404,
                    "no-route",
                    "No route",
                    format!("no route matches {} {}", escape_bytes(request.method()), request.path()),
                );
                let _ = self.host.set_property(&[ROUTE_PROPERTY], b"-");
                let sent = problem.send_on(&self.host, &facts(&request));
                self.after_local_reply(sent)
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(index) = self.response_headers else {
            return Action::Continue;
        };
        let router = &self.shared.router;
        if let Some(route) = router.routes.get(index) {
            for (name, value) in &route.response_headers {
                let _ = self.host.add_header(MapType::HttpResponseHeaders, name, value.as_bytes());
            }
            if let Some(name) = &router.route_name_response_header {
                let _ = self.host.set_header(MapType::HttpResponseHeaders, name, route.name.as_bytes());
            }
        }
        Action::Continue
    }
}

impl<H: Host> RoutingStream<H> {
    fn forward(&mut self, forward: &Forward) {
        let router = &self.shared.router;
        let route = forward.route.and_then(|index| router.routes.get(index));
        match (forward.route, route) {
            (Some(index), Some(route)) => {
                self.shared.metrics.per_route.get(index).copied().unwrap_or_default().increment_on(&self.host);
                let _ = self.host.set_property(&[ROUTE_PROPERTY], route.name.as_bytes());
                let edits = &route.request_headers;
                for name in &edits.remove {
                    let _ = self.host.remove_header(MapType::HttpRequestHeaders, name);
                }
                for (name, value) in &edits.set {
                    let _ = self.host.set_header(MapType::HttpRequestHeaders, name, value.as_bytes());
                }
                for (name, value) in &edits.add {
                    let _ = self.host.add_header(MapType::HttpRequestHeaders, name, value.as_bytes());
                }
                if !route.response_headers.is_empty() || router.route_name_response_header.is_some() {
                    self.response_headers = Some(index);
                }
            }
            _ => {
                self.shared.metrics.default_route.increment_on(&self.host);
                let _ = self.host.set_property(&[ROUTE_PROPERTY], b"default");
            }
        }
        if let Some(path) = &forward.path {
            let _ = self.host.set_header(MapType::HttpRequestHeaders, ":path", path.as_bytes());
        }
        if let Some(authority) = &forward.authority {
            let _ = self.host.set_header(MapType::HttpRequestHeaders, ":authority", authority.as_bytes());
        }
        let _ = self.host.set_header(MapType::HttpRequestHeaders, &router.cluster_header, forward.cluster.as_bytes());
        if router.clear_route_cache {
            // Envoy does this by itself for modules of ABI 0.2.1 (ours), so it is
            // opt-in; hosts without the function answer NotFound, which is fine.
            let _ = self.host.call_foreign_function("clear_route_cache", b"");
        }
    }

    /// After a local reply. If the host refused it, the request continues instead
    /// of hanging until Envoy's timeout: routing set no cluster header for it, so
    /// Envoy's `cluster_header` route cannot forward it and answers it itself.
    fn after_local_reply(&self, sent: gateway_common::host::HostResult<()>) -> Action {
        self.shared.reply_failures.after(&self.host, sent, OnRefusedReply::Continue)
    }

    fn answer(&mut self, request: &RequestHeaders, answer: &LocalAnswer) -> gateway_common::host::HostResult<()> {
        let router = &self.shared.router;
        let Some(route) = router.routes.get(answer.route) else {
            return Ok(());
        };
        self.shared.metrics.per_route.get(answer.route).copied().unwrap_or_default().increment_on(&self.host);
        let _ = self.host.set_property(&[ROUTE_PROPERTY], route.name.as_bytes());
        let mut headers: Vec<(&str, &str)> =
            route.response_headers.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
        if let Some(name) = &router.route_name_response_header {
            headers.push((name.as_str(), route.name.as_str()));
        }
        match &route.action {
            RouteAction::Redirect { location, .. } => {
                headers.push(("location", location.as_str()));
                self.host.send_local_response(answer.status, &headers, b"", None)
            }
            RouteAction::Respond { body: Some(body), content_type, .. } => {
                headers.push(("content-type", content_type.as_str()));
                self.host.send_local_response(answer.status, &headers, body.as_bytes(), None)
            }
            RouteAction::Respond { body: None, detail, .. } => {
                let mut problem =
                    Problem::new(answer.status, "direct-response", "Answered by the gateway", detail.clone());
                problem.headers = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
                problem.send_on(&self.host, &facts(request))
            }
            RouteAction::Cluster(_) | RouteAction::Split(_) => Ok(()),
        }
    }
}

fn facts(request: &RequestHeaders) -> RequestFacts {
    RequestFacts::of(request)
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

fn next_random(state: &Cell<u64>) -> u64 {
    let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
    state.set(next);
    let mut z = next;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The glue on `FakeHost`: what a request makes the module do, and the host calls
/// it costs (each copies across the VM boundary; a new one must fail a budget).
#[cfg(test)]
mod glue_tests {
    use super::*;
    use gateway_common::platform::FakeHost;

    const CONFIG: &str = r#"{"routes": [
        {"name": "users", "match": {"path": {"prefix": "/users"}}, "cluster": "users"},
        {"name": "gone", "match": {"path": {"prefix": "/v0"}}, "direct_response": {"status": 410}}
    ]}"#;

    fn stream(request: &[(&str, &[u8])]) -> RoutingStream<FakeHost> {
        let config: RoutingConfig = gateway_common::config::parse_json(CONFIG.as_bytes()).unwrap();
        let host = FakeHost::new().with_headers(MapType::HttpRequestHeaders, request);
        let shared = Rc::new(Shared::new(&host, config.compile().unwrap(), 7, "routing"));
        host.reset_calls();
        RoutingStream { host, shared, response_headers: None }
    }

    #[test]
    fn budget_a_forwarded_request_costs_four_host_calls() {
        let mut stream = stream(&[(":method", b"GET"), (":path", b"/users/7")]);
        assert_eq!(stream.on_http_request_headers(0, true), Action::Continue);
        assert_eq!(
            stream.host.header_values(MapType::HttpRequestHeaders, "x-gateway-cluster"),
            vec![b"users".to_vec()]
        );
        assert_eq!(stream.host.property_value(&[ROUTE_PROPERTY]), Some(b"users".to_vec()));
        // read headers, count the route, record it for access logs, set the cluster.
        assert_eq!(stream.host.calls(), ["header_pairs", "increment_metric", "set_property", "set_header"]);
    }

    #[test]
    fn a_client_supplied_cluster_header_is_removed_first() {
        let mut stream = stream(&[(":method", b"GET"), (":path", b"/users/7"), ("x-gateway-cluster", b"admin")]);
        assert_eq!(stream.on_http_request_headers(0, true), Action::Continue);
        assert_eq!(
            stream.host.header_values(MapType::HttpRequestHeaders, "x-gateway-cluster"),
            vec![b"users".to_vec()]
        );
        assert_eq!(stream.host.calls()[1], "remove_header");
    }

    #[test]
    fn no_route_is_answered_with_a_problem_and_counted() {
        let mut stream = stream(&[(":method", b"GET"), (":path", b"/nowhere")]);
        assert_eq!(stream.on_http_request_headers(0, true), Action::Pause);
        let replies = stream.host.replies();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].status, 404);
        assert_eq!(stream.host.metric("routing.no_route.requests"), 1);
    }

    #[test]
    fn a_target_that_is_not_ascii_gets_400_from_the_glue() {
        let mut stream = stream(&[(":method", b"GET"), (":path", b"/users/\xff")]);
        assert_eq!(stream.on_http_request_headers(0, true), Action::Pause);
        assert_eq!(stream.host.replies()[0].status, 400);
        assert!(stream.host.header_values(MapType::HttpRequestHeaders, "x-gateway-cluster").is_empty());
    }

    #[test]
    fn a_refused_local_reply_never_leaves_the_stream_paused() {
        for path in [&b"/v0/x"[..], b"/nowhere"] {
            let mut stream = stream(&[(":method", b"GET"), (":path", path)]);
            stream.host.refuse_local_reply.set(true);
            assert_eq!(stream.on_http_request_headers(0, true), Action::Continue);
            assert!(stream.host.header_values(MapType::HttpRequestHeaders, "x-gateway-cluster").is_empty());
            assert_eq!(stream.host.metric("routing.local_reply_failed"), 1);
            assert_eq!(stream.host.logs().len(), 1);
            // Logged once per VM, counted every time.
            assert_eq!(stream.on_http_request_headers(0, true), Action::Continue);
            assert_eq!(stream.host.logs().len(), 1);
            assert_eq!(stream.host.metric("routing.local_reply_failed"), 2);
        }
    }

    #[test]
    fn response_headers_of_the_route_are_added() {
        let config: RoutingConfig = gateway_common::config::parse_json(
            br#"{"route_name_response_header": "x-route", "routes": [{"name": "users", "cluster": "users",
                 "response_headers": {"add": {"x-served-via": "gw"}}}]}"#,
        )
        .unwrap();
        let host = FakeHost::new().with_headers(MapType::HttpRequestHeaders, &[(":path", b"/")]);
        let shared = Rc::new(Shared::new(&host, config.compile().unwrap(), 7, "routing"));
        let mut stream = RoutingStream { host, shared, response_headers: None };
        assert_eq!(stream.on_http_request_headers(0, true), Action::Continue);
        stream.host.reset_calls();
        assert_eq!(stream.on_http_response_headers(0, true), Action::Continue);
        assert_eq!(stream.host.header_values(MapType::HttpResponseHeaders, "x-served-via"), vec![b"gw".to_vec()]);
        assert_eq!(stream.host.header_values(MapType::HttpResponseHeaders, "x-route"), vec![b"users".to_vec()]);
        assert_eq!(stream.host.calls(), ["add_header", "set_header"]);
    }
}
