//! routing.wasm: picks the upstream cluster from request metadata, splits canary
//! traffic, rewrites, or answers itself. This file is the host glue; the decision
//! lives in `router.rs`, the configuration in `config.rs`.

pub mod config;
pub mod router;

use std::cell::Cell;
use std::rc::Rc;

use gateway_common::config::load_plugin_config;
use gateway_common::host::{self, MapType};
use gateway_common::metrics::{stat_segment, Metric};
use gateway_common::problem::{Problem, RequestFacts};
use gateway_common::request::{escape_bytes, read_request, RequestHeaders};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::config::{Action as RouteAction, Router, RoutingConfig};
use crate::router::{Decision, Forward, LocalAnswer};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(RoutingRoot::default()) });
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
}

#[derive(Default)]
struct RoutingRoot {
    shared: Option<Rc<Shared>>,
}

impl Context for RoutingRoot {}

impl RootContext for RoutingRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(router) = load_plugin_config("routing", RoutingConfig::compile) else {
            return false;
        };
        let metrics = Metrics {
            per_route: router
                .routes
                .iter()
                .map(|route| Metric::counter(&format!("routing.route.{}.requests", stat_segment(&route.name))))
                .collect(),
            default_route: Metric::counter("routing.default_route.requests"),
            no_route: Metric::counter("routing.no_route.requests"),
        };
        // std::process::id() panics on wasi; RandomState is seeded by the host's
        // random_get.
        let seed = host::now_nanos() ^ random_seed();
        self.shared = Some(Rc::new(Shared { router, metrics, random_state: Cell::new(seed) }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(RoutingStream { shared, response_headers: None }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct RoutingStream {
    shared: Rc<Shared>,
    /// Route whose response headers (and name header) go on the response.
    response_headers: Option<usize>,
}

impl Context for RoutingStream {}

impl HttpContext for RoutingStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let router = &shared.router;
        let request = match read_request() {
            Ok(request) => request,
            Err(action) => return action,
        };
        // No client may pick a cluster: drop its copy before anything else.
        if request.count(&router.cluster_header) > 0 {
            let _ = host::remove_header(MapType::HttpRequestHeaders, &router.cluster_header);
        }
        let decision = router.decide(&request, || next_random(&shared.random_state));
        match decision {
            Decision::Forward(forward) => {
                self.forward(&forward);
                Action::Continue
            }
            Decision::Respond(answer) => {
                self.answer(&request, &answer);
                Action::Pause
            }
            Decision::NoRoute => {
                shared.metrics.no_route.increment();
                let problem = Problem::new(
                    404,
                    "no-route",
                    "No route",
                    format!("no route matches {} {}", escape_bytes(request.method()), request.path()),
                );
                let _ = host::set_property(&[ROUTE_PROPERTY], b"-");
                let _ = problem.send(&facts(&request));
                Action::Pause
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
                let _ = host::add_header(MapType::HttpResponseHeaders, name, value.as_bytes());
            }
            if let Some(name) = &router.route_name_response_header {
                let _ = host::set_header(MapType::HttpResponseHeaders, name, route.name.as_bytes());
            }
        }
        Action::Continue
    }
}

impl RoutingStream {
    fn forward(&mut self, forward: &Forward) {
        let router = &self.shared.router;
        let route = forward.route.and_then(|index| router.routes.get(index));
        match (forward.route, route) {
            (Some(index), Some(route)) => {
                self.shared.metrics.per_route.get(index).copied().unwrap_or_default().increment();
                let _ = host::set_property(&[ROUTE_PROPERTY], route.name.as_bytes());
                let edits = &route.request_headers;
                for name in &edits.remove {
                    let _ = host::remove_header(MapType::HttpRequestHeaders, name);
                }
                for (name, value) in &edits.set {
                    let _ = host::set_header(MapType::HttpRequestHeaders, name, value.as_bytes());
                }
                for (name, value) in &edits.add {
                    let _ = host::add_header(MapType::HttpRequestHeaders, name, value.as_bytes());
                }
                if !route.response_headers.is_empty() || router.route_name_response_header.is_some() {
                    self.response_headers = Some(index);
                }
            }
            _ => {
                self.shared.metrics.default_route.increment();
                let _ = host::set_property(&[ROUTE_PROPERTY], b"default");
            }
        }
        if let Some(path) = &forward.path {
            let _ = host::set_header(MapType::HttpRequestHeaders, ":path", path.as_bytes());
        }
        if let Some(authority) = &forward.authority {
            let _ = host::set_header(MapType::HttpRequestHeaders, ":authority", authority.as_bytes());
        }
        let _ = host::set_header(MapType::HttpRequestHeaders, &router.cluster_header, forward.cluster.as_bytes());
        if router.clear_route_cache {
            clear_route_cache();
        }
    }

    fn answer(&mut self, request: &RequestHeaders, answer: &LocalAnswer) {
        let router = &self.shared.router;
        let Some(route) = router.routes.get(answer.route) else {
            return;
        };
        self.shared.metrics.per_route.get(answer.route).copied().unwrap_or_default().increment();
        let _ = host::set_property(&[ROUTE_PROPERTY], route.name.as_bytes());
        let mut headers: Vec<(&str, &str)> =
            route.response_headers.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
        if let Some(name) = &router.route_name_response_header {
            headers.push((name.as_str(), route.name.as_str()));
        }
        match &route.action {
            RouteAction::Redirect { location, .. } => {
                headers.push(("location", location.as_str()));
                let _ = host::send_local_response(answer.status, &headers, b"", None);
            }
            RouteAction::Respond { body: Some(body), content_type, .. } => {
                headers.push(("content-type", content_type.as_str()));
                let _ = host::send_local_response(answer.status, &headers, body.as_bytes(), None);
            }
            RouteAction::Respond { body: None, detail, .. } => {
                let mut problem =
                    Problem::new(answer.status, "direct-response", "Answered by the gateway", detail.clone());
                problem.headers = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
                let _ = problem.send(&facts(request));
            }
            RouteAction::Cluster(_) | RouteAction::Split(_) => {}
        }
    }
}

fn facts(request: &RequestHeaders) -> RequestFacts {
    RequestFacts::of(request)
}

/// Asks the host to re-select the route after the routing header or path changed.
/// Envoy does this by itself for modules of ABI 0.2.1 (ours), so it is opt-in;
/// hosts without the function answer NotFound, which is fine.
fn clear_route_cache() {
    let _ = host::call_foreign_function("clear_route_cache", b"");
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
