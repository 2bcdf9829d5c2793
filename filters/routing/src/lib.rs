//! routing.wasm: picks the upstream cluster from request metadata, splits canary
//! traffic, rewrites, or answers itself. This file is the host glue; the decision
//! lives in `router.rs`, the configuration in `config.rs`.

pub mod config;
pub mod cors;
pub mod query;
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
use gateway_common::verdict::{Body, Edit, Reply, Verdict};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::config::{Action as RouteAction, Router, RoutingConfig};
use crate::cors::CorsFields;
use crate::router::{Decision, LocalAnswer};

proxy_wasm::main! {{
    gateway_common::skeleton::install::<Routing>();
}}

/// Filter-state property (Envoy: `wasm.routing_route`) naming the chosen route.
const ROUTE_PROPERTY: &str = "routing_route";

struct Metrics {
    per_route: Vec<Metric>,
    default_route: Metric,
    no_route: Metric,
    cors_preflight_allowed: Metric,
    cors_preflight_refused: Metric,
    cors_origin_refused: Metric,
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
            cors_preflight_allowed: Metric::counter_on(host, &format!("{prefix}.cors.preflight_allowed")),
            cors_preflight_refused: Metric::counter_on(host, &format!("{prefix}.cors.preflight_refused")),
            cors_origin_refused: Metric::counter_on(host, &format!("{prefix}.cors.origin_refused")),
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

    fn stream(shared: &Rc<Shared>, _context_id: u32) -> Box<dyn HttpContext> {
        Box::new(RoutingStream { host: Ffi, shared: Rc::clone(shared), response_headers: None, cors_fields: None })
    }
}

struct RoutingStream<H: Host> {
    host: H,
    shared: Rc<Shared>,
    /// Route whose response headers (and name header) go on the response.
    response_headers: Option<usize>,
    /// The CORS fields the response gets (a policy applies to the request).
    cors_fields: Option<CorsFields>,
}

impl<H: Host> Context for RoutingStream<H> {}

gateway_common::stream_callbacks!(request_headers, response_headers);

impl<H: Host> HttpContext for RoutingStream<H> {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let mut request = match read_request_from(&self.host) {
            Ok(request) => request,
            Err(action) => return action,
        };
        if shared.router.needs_client_ip {
            shared.router.client_ip.derive_into(&self.host, &mut request);
        }
        if shared.router.has_cors && request.is_cors_preflight() {
            if let Some(verdict) = preflight_verdict(&shared, &request) {
                return verdict.apply(&self.host, &shared.reply_failures);
            }
        }
        let decision = shared.router.decide(&request, || next_random(&shared.random_state));
        let (mut verdict, response_headers) = request_verdict(&shared, &request, &decision);
        self.response_headers = response_headers;
        if let Some(cors) = shared.router.cors_of(decision.route()) {
            let origin = request.first("origin");
            let fields = cors.response_fields(origin);
            if origin.is_some() && fields.set.is_empty() {
                verdict = verdict.count(shared.metrics.cors_origin_refused);
            }
            match &mut verdict.reply {
                // Routing's own answer: the fields go into it (there is no upstream copy to remove).
                Some((reply, _)) => {
                    reply.headers.extend(fields.set.iter().map(|(name, value)| (name.to_string(), value.clone())));
                    reply.headers.push(("vary".into(), "origin".into()));
                }
                None => self.cors_fields = Some(fields),
            }
        }
        verdict.apply(&self.host, &shared.reply_failures)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.response_headers.is_none() && self.cors_fields.is_none() {
            return Action::Continue;
        }
        let mut verdict = match self.response_headers {
            Some(index) => response_verdict(&self.shared.router, index),
            None => Verdict::forward(),
        };
        if let Some(fields) = self.cors_fields.take() {
            verdict.edits.extend(cors_edits(&fields));
        }
        verdict.apply(&self.host, &self.shared.reply_failures)
    }
}

/// What a request makes routing do, and the route whose response headers apply
/// to its response. A refused local reply lets the request continue instead of
/// hanging until Envoy's timeout: no cluster header was set for it, so Envoy's
/// `cluster_header` route cannot forward it and answers it itself.
fn request_verdict(shared: &Shared, request: &RequestHeaders, decision: &Decision) -> (Verdict, Option<usize>) {
    let router = &shared.router;
    let metrics = &shared.metrics;
    let route_metric = |index: usize| metrics.per_route.get(index).copied().unwrap_or_default();
    let (mut verdict, response_headers) = match decision {
        Decision::Forward(forward) => {
            let route = forward.route.and_then(|index| router.routes.get(index).map(|route| (index, route)));
            let mut verdict = match route {
                Some((index, route)) => {
                    let edits = &route.request_headers;
                    let mut verdict =
                        Verdict::forward().count(route_metric(index)).property(ROUTE_PROPERTY, route.name.as_bytes());
                    for name in &edits.remove {
                        verdict = verdict.edit(Edit::Remove(MapType::HttpRequestHeaders, name.clone()));
                    }
                    for (name, value) in &edits.set {
                        verdict = verdict.edit(Edit::Set(
                            MapType::HttpRequestHeaders,
                            name.clone(),
                            value.clone().into_bytes(),
                        ));
                    }
                    for (name, value) in &edits.add {
                        verdict = verdict.edit(Edit::Add(
                            MapType::HttpRequestHeaders,
                            name.clone(),
                            value.clone().into_bytes(),
                        ));
                    }
                    verdict
                }
                None => Verdict::forward().count(metrics.default_route).property(ROUTE_PROPERTY, b"default".to_vec()),
            };
            if let Some(path) = &forward.path {
                verdict =
                    verdict.edit(Edit::Set(MapType::HttpRequestHeaders, ":path".into(), path.clone().into_bytes()));
            }
            if let Some(authority) = &forward.authority {
                verdict = verdict.edit(Edit::Set(
                    MapType::HttpRequestHeaders,
                    ":authority".into(),
                    authority.clone().into_bytes(),
                ));
            }
            verdict = verdict.edit(Edit::Set(
                MapType::HttpRequestHeaders,
                router.cluster_header.clone(),
                forward.cluster.clone().into_bytes(),
            ));
            if router.clear_route_cache {
                // Envoy does this by itself for modules of ABI 0.2.1 (ours), so it is
                // opt-in; hosts without the function answer NotFound, which is fine.
                verdict = verdict.call("clear_route_cache");
            }
            let with_response_headers = route
                .filter(|(_, route)| !route.response_headers.is_empty() || router.route_name_response_header.is_some())
                .map(|(index, _)| index);
            (verdict, with_response_headers)
        }
        Decision::Respond(answer) => (local_answer(router, request, answer, route_metric(answer.route)), None),
        Decision::NoRoute => {
            let problem = Problem::new(
                404,
                "no-route",
                "No route",
                format!("no route matches {} {}", escape_bytes(request.method()), request.path()),
            );
            let verdict = Verdict::answer(problem.reply(&facts(request)), OnRefusedReply::Continue)
                .count(metrics.no_route)
                .property(ROUTE_PROPERTY, b"-".to_vec());
            (verdict, None)
        }
    };
    // No client may pick a cluster: its copy goes first, whatever the decision.
    if request.count(&router.cluster_header) > 0 {
        verdict.edits.insert(0, Edit::Remove(MapType::HttpRequestHeaders, router.cluster_header.clone()));
    }
    (verdict, response_headers)
}

/// The answer to a CORS preflight whose announced request has a CORS policy:
/// `204` with the policy's fields, or `403` problem+json without any. `None`:
/// no policy applies, the preflight is routed like any request.
fn preflight_verdict(shared: &Shared, request: &RequestHeaders) -> Option<Verdict> {
    let method = request.first("access-control-request-method")?;
    // Judged as the request it announces: a route for `PUT /orders` answers it.
    let route = shared.router.matching_route(&request.with_method(method)).map(|(index, _)| index);
    let cors = shared.router.cors_of(route)?;
    let requested_headers: Vec<&[u8]> = request.values("access-control-request-headers").collect();
    let requested_headers = requested_headers.join(&b","[..]);
    let origin = request.first("origin").unwrap_or_default();
    let route_name = route.and_then(|index| shared.router.routes.get(index)).map_or("default", |route| &route.name);
    let verdict = match cors.preflight(origin, method, Some(&requested_headers)) {
        Ok(fields) => {
            let headers = fields.into_iter().map(|(name, value)| (name.to_string(), value)).collect();
            let reply = Reply::new(204, headers, Body::default());
            Verdict::answer(reply, OnRefusedReply::Continue).count(shared.metrics.cors_preflight_allowed)
        }
        Err(refusal) => {
            let problem = Problem::new(403, "cors-preflight-refused", "CORS preflight refused", refusal.detail());
            Verdict::answer(problem.reply(&facts(request)), OnRefusedReply::Continue)
                .count(shared.metrics.cors_preflight_refused)
        }
    };
    Some(verdict.property(ROUTE_PROPERTY, route_name.as_bytes()))
}

/// Response-header edits for the CORS fields of an upstream's answer: the
/// policy's fields replace the upstream's, which are otherwise removed.
fn cors_edits(fields: &CorsFields) -> Vec<Edit> {
    let map = MapType::HttpResponseHeaders;
    let removes = fields.remove.iter().map(|name| Edit::Remove(map, name.to_string()));
    let sets = fields.set.iter().map(|(name, value)| Edit::Set(map, name.to_string(), value.clone().into_bytes()));
    removes.chain(sets).chain(std::iter::once(Edit::Add(map, "vary".into(), b"origin".to_vec()))).collect()
}

/// A redirect or direct response of a route.
fn local_answer(router: &Router, request: &RequestHeaders, answer: &LocalAnswer, metric: Metric) -> Verdict {
    let Some(route) = router.routes.get(answer.route) else {
        return Verdict::forward();
    };
    // A local answer has no upstream headers to remove or replace: set and add both apply.
    let edits = &route.response_headers;
    let mut headers: Vec<(String, String)> = edits.set.iter().chain(&edits.add).cloned().collect();
    if let Some(name) = &router.route_name_response_header {
        headers.push((name.clone(), route.name.clone()));
    }
    let reply = match &route.action {
        RouteAction::Redirect { location, .. } => {
            headers.push(("location".into(), location.clone()));
            Reply::new(answer.status, headers, Body::default())
        }
        RouteAction::Respond { body: Some(body), content_type, .. } => {
            headers.push(("content-type".into(), content_type.clone()));
            Reply::new(answer.status, headers, body.clone().into_bytes())
        }
        RouteAction::Respond { body: None, detail, .. } => {
            let mut problem = Problem::new(answer.status, "direct-response", "Answered by the gateway", detail.clone());
            problem.headers = headers;
            problem.reply(&facts(request))
        }
        RouteAction::Cluster(_) | RouteAction::Split(_) => return Verdict::forward(),
    };
    Verdict::answer(reply, OnRefusedReply::Continue).count(metric).property(ROUTE_PROPERTY, route.name.as_bytes())
}

/// The route's response headers and the route-name header.
fn response_verdict(router: &Router, index: usize) -> Verdict {
    let mut verdict = Verdict::forward();
    if let Some(route) = router.routes.get(index) {
        let map = MapType::HttpResponseHeaders;
        let edits = &route.response_headers;
        for name in &edits.remove {
            verdict = verdict.edit(Edit::Remove(map, name.clone()));
        }
        for (name, value) in &edits.set {
            verdict = verdict.edit(Edit::Set(map, name.clone(), value.clone().into_bytes()));
        }
        for (name, value) in &edits.add {
            verdict = verdict.edit(Edit::Add(map, name.clone(), value.clone().into_bytes()));
        }
        if let Some(name) = &router.route_name_response_header {
            verdict =
                verdict.edit(Edit::Set(MapType::HttpResponseHeaders, name.clone(), route.name.clone().into_bytes()));
        }
    }
    verdict
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
        RoutingStream { host, shared, response_headers: None, cors_fields: None }
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
        let calls = stream.host.calls();
        let position = |call: &str| calls.iter().position(|c| c == call).unwrap();
        assert!(position("remove_header") < position("set_header"), "{calls:?}");
    }

    #[test]
    fn decisions_come_back_as_verdicts() {
        let config: RoutingConfig = gateway_common::config::parse_json(
            br#"{"routes": [{"name": "api", "match": {"path": {"prefix": "/api"}}, "cluster": "users",
                 "rewrite": {"prefix": "/v2"}, "request_headers": {"set": {"x-routed": "1"}, "remove": ["x-debug"]}}]}"#,
        )
        .unwrap();
        let host = FakeHost::new();
        let shared = Shared::new(&host, config.compile().unwrap(), 7, "routing");
        let request = gateway_common::testing::request(&[(":path", b"/api/x?q=1"), ("x-gateway-cluster", b"evil")]);
        let decision = shared.router.decide(&request, || 0);
        let (verdict, response_headers) = request_verdict(&shared, &request, &decision);
        let request_map = MapType::HttpRequestHeaders;
        let edit = |name: &str, value: &str| Edit::Set(request_map, name.into(), value.as_bytes().to_vec());
        assert_eq!(
            verdict.edits,
            vec![
                Edit::Remove(request_map, "x-gateway-cluster".into()),
                Edit::Remove(request_map, "x-debug".into()),
                edit("x-routed", "1"),
                edit(":path", "/v2/x?q=1"),
                edit("x-gateway-cluster", "users"),
            ]
        );
        assert_eq!(verdict.properties, vec![(ROUTE_PROPERTY, b"api".to_vec())]);
        assert!(verdict.reply.is_none() && response_headers.is_none());
        let request = gateway_common::testing::request(&[(":path", b"/other")]);
        let (verdict, _) = request_verdict(&shared, &request, &shared.router.decide(&request, || 0));
        let (reply, on_refused) = verdict.reply.unwrap();
        assert_eq!((reply.status, on_refused), (404, OnRefusedReply::Continue));
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
        let mut stream = RoutingStream { host, shared, response_headers: None, cors_fields: None };
        assert_eq!(stream.on_http_request_headers(0, true), Action::Continue);
        stream.host.reset_calls();
        assert_eq!(stream.on_http_response_headers(0, true), Action::Continue);
        assert_eq!(stream.host.header_values(MapType::HttpResponseHeaders, "x-served-via"), vec![b"gw".to_vec()]);
        assert_eq!(stream.host.header_values(MapType::HttpResponseHeaders, "x-route"), vec![b"users".to_vec()]);
        assert_eq!(stream.host.calls(), ["add_header", "set_header"]);
    }
}
