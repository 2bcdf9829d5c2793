//! The routing decision: plain Rust over the request headers, no host calls.

use std::collections::{BTreeMap, HashMap};

use gateway_common::hash::fnv1a64;
use gateway_common::request::RequestHeaders;

use crate::config::{Action, Route, Router, Split, StickyKey};
use crate::cors::Cors;

/// What the filter must do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward to `cluster` after applying the edits.
    Forward(Forward),
    /// Answer locally (redirect or direct response).
    Respond(LocalAnswer),
    /// No route matched and there is no default cluster.
    NoRoute,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// `None` for the default cluster.
    pub route: Option<usize>,
    pub cluster: String,
    /// New `:path` (with the original query string) when rewritten.
    pub path: Option<String>,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalAnswer {
    pub route: usize,
    pub status: u32,
    pub location: Option<String>,
}

impl Decision {
    /// The route that decided (`None`: the default cluster, or no route).
    pub fn route(&self) -> Option<usize> {
        match self {
            Decision::Forward(forward) => forward.route,
            Decision::Respond(answer) => Some(answer.route),
            Decision::NoRoute => None,
        }
    }
}

/// Routes that each require one exact value of the same header (`x-route: r7`,
/// `x-version: v2`, ...) are looked up by the request's values of that header
/// instead of tested one by one: a table of 50 such routes costs one lookup
/// and one full check, not 50 checks. Only routes that cannot match are left
/// out, so the first matching route in configuration order still wins.
#[derive(Debug, Clone)]
pub struct RouteIndex {
    header: String,
    /// Value -> the routes (ascending) that require exactly it.
    by_value: HashMap<Vec<u8>, Vec<usize>>,
    /// Routes that do not require a value of `header` (ascending): always tried.
    others: Vec<usize>,
}

/// Below this many indexable routes the plain scan is as fast.
const INDEXED_ROUTES_MIN: usize = 8;

impl RouteIndex {
    /// The index over the header most routes require an exact value of, if
    /// enough do.
    pub fn build(routes: &[Route]) -> Option<Self> {
        let required = |route: &Route, header: &str| -> Option<Vec<u8>> {
            route
                .conditions
                .headers
                .iter()
                .find(|(name, _)| name == header)?
                .1
                .required_exact_value()
                .map(<[u8]>::to_vec)
        };
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for route in routes {
            for (name, matcher) in &route.conditions.headers {
                if matcher.required_exact_value().is_some() {
                    *counts.entry(name.as_str()).or_default() += 1;
                }
            }
        }
        let (header, count) = counts.into_iter().max_by_key(|(_, count)| *count)?;
        if count < INDEXED_ROUTES_MIN {
            return None;
        }
        let mut index = RouteIndex { header: header.to_string(), by_value: HashMap::new(), others: Vec::new() };
        for (position, route) in routes.iter().enumerate() {
            match required(route, header) {
                Some(value) => index.by_value.entry(value).or_default().push(position),
                None => index.others.push(position),
            }
        }
        Some(index)
    }

    /// The routes that can match this request, ascending.
    fn candidates(&self, request: &RequestHeaders) -> Vec<usize> {
        let mut candidates = self.others.clone();
        for value in request.values(&self.header) {
            candidates.extend(self.by_value.get(value).into_iter().flatten());
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates
    }
}

impl Router {
    /// The first route whose conditions hold.
    pub fn matching_route(&self, request: &RequestHeaders) -> Option<(usize, &Route)> {
        let Some(index) = &self.index else {
            return self.routes.iter().enumerate().find(|(_, route)| route.conditions.matches(request));
        };
        index
            .candidates(request)
            .into_iter()
            .filter_map(|position| Some((position, self.routes.get(position)?)))
            .find(|(_, route)| route.conditions.matches(request))
    }

    /// The CORS policy of an answer: its route's own, else the top-level one
    /// (also for the default cluster and for requests no route matches).
    pub fn cors_of(&self, route: Option<usize>) -> Option<&Cors> {
        route.and_then(|index| self.routes.get(index)).and_then(|route| route.cors.as_ref()).or(self.cors.as_ref())
    }

    /// Routes one request. `random` is consulted only for non-sticky splits.
    pub fn decide(&self, request: &RequestHeaders, random: impl FnOnce() -> u64) -> Decision {
        let Some((index, route)) = self.matching_route(request) else {
            return match &self.default_cluster {
                Some(cluster) => {
                    Decision::Forward(Forward { route: None, cluster: cluster.clone(), path: None, authority: None })
                }
                None => Decision::NoRoute,
            };
        };
        let cluster = match &route.action {
            Action::Cluster(cluster) => cluster.clone(),
            Action::Split(split) => split.pick(&route.name, request, random).to_string(),
            Action::Redirect { status, location } => {
                return Decision::Respond(LocalAnswer {
                    route: index,
                    status: *status,
                    location: Some(location.clone()),
                })
            }
            Action::Respond { status, .. } => {
                return Decision::Respond(LocalAnswer { route: index, status: *status, location: None })
            }
        };
        Decision::Forward(Forward {
            route: Some(index),
            cluster,
            path: rewrite_path(route, request),
            authority: route.rewrite.host.clone(),
        })
    }
}

impl Split {
    /// Picks a cluster: by the sticky key's hash when the request has the key,
    /// otherwise at random.
    pub fn pick(&self, route_name: &str, request: &RequestHeaders, random: impl FnOnce() -> u64) -> &str {
        let key: Option<Vec<u8>> = match &self.sticky {
            Some(StickyKey::Header(name)) => request.first(name).map(<[u8]>::to_vec),
            Some(StickyKey::Cookie(name)) => request.cookie_values(name).first().map(|value| value.to_vec()),
            Some(StickyKey::Query(name)) => request.query_values(name).into_iter().next(),
            None => None,
        };
        let draw = match key {
            Some(key) => sticky_hash(route_name, &key),
            None => random(),
        };
        self.cluster_for(draw % self.total)
    }

    /// The cluster whose weight range holds `point` (0 <= point < total).
    pub fn cluster_for(&self, point: u64) -> &str {
        self.ranges
            .iter()
            .find(|(_, upper)| point < *upper)
            .or(self.ranges.last())
            .map_or("", |(cluster, _)| cluster.as_str())
    }
}

/// The documented sticky hash: 64-bit FNV-1a over `route name`, a 0x00 byte, and
/// the key value. The route name keeps different splits independent.
pub fn sticky_hash(route_name: &str, key: &[u8]) -> u64 {
    let mut input = Vec::with_capacity(route_name.len() + 1 + key.len());
    input.extend_from_slice(route_name.as_bytes());
    input.push(0);
    input.extend_from_slice(key);
    fnv1a64(&input)
}

/// The new `:path` of a forwarded request: the rewritten path, then the query
/// edits; `None` when the route changes neither.
fn rewrite_path(route: &Route, request: &RequestHeaders) -> Option<String> {
    let rewritten = rewrite_target(route, request);
    if route.query.is_empty() {
        return rewritten;
    }
    Some(route.query.apply(rewritten.as_deref().unwrap_or(request.target())))
}

fn rewrite_target(route: &Route, request: &RequestHeaders) -> Option<String> {
    let path = request.path();
    let rewritten = if let Some((matched, replacement)) = &route.rewrite.prefix {
        // The route matched `matched` as a (segment-safe) prefix of this path.
        // The rest of the path is kept byte for byte, as Envoy's prefix_rewrite does.
        let rest = path.get(matched.len()..)?;
        format!("{replacement}{rest}")
    } else if let Some((regex, substitution)) = &route.rewrite.regex {
        regex.replace(path, substitution.as_str()).into_owned()
    } else {
        return None;
    };
    // The target was checked to be ASCII, so the query is the client's bytes.
    let query = request.target().get(request.path().len()..).unwrap_or_default();
    Some(format!("{rewritten}{query}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoutingConfig;

    const STICKY_ORDERS_ALICE: u64 = 18_036_259_379_357_001_588;

    fn router(json: &str) -> Router {
        let config: RoutingConfig = gateway_common::config::parse_json(json.as_bytes()).unwrap();
        config.compile().unwrap()
    }

    fn request(pairs: &[(&str, &str)]) -> RequestHeaders {
        gateway_common::testing::request_text(pairs)
    }

    fn cluster_of(decision: Decision) -> String {
        match decision {
            Decision::Forward(forward) => forward.cluster,
            other => panic!("expected forward, got {other:?}"),
        }
    }

    /// The index leaves out only routes that cannot match: over a table that
    /// mixes indexed routes, routes on other conditions, a repeated value,
    /// case-insensitive and inverted conditions, every request gets the route
    /// the plain first-match scan gives.
    #[test]
    fn the_route_index_gives_the_first_match_of_a_scan() {
        let mut routes: Vec<String> = (0..12)
            .map(|n| {
                format!(r#"{{"name":"r{n}","match":{{"headers":{{"x-route":{{"exact":"r{n}"}}}}}},"cluster":"c{n}"}}"#)
            })
            .collect();
        routes.insert(3, r#"{"name":"api","match":{"path":{"prefix":"/api"}},"cluster":"api"}"#.into());
        routes.insert(
            6,
            r#"{"name":"again","match":{"headers":{"x-route":{"exact":"r9"},"x-v":{"exact":"2"}}},"cluster":"again"}"#
                .into(),
        );
        routes.push(
            r#"{"name":"folded","match":{"headers":{"x-route":{"exact":"R1","ignore_case":true}}},"cluster":"folded"}"#
                .into(),
        );
        routes.push(
            r#"{"name":"not-r2","match":{"headers":{"x-route":{"exact":"r2","invert":true}}},"cluster":"not-r2"}"#
                .into(),
        );
        let indexed = router(&format!(r#"{{"routes":[{}]}}"#, routes.join(",")));
        assert!(indexed.index.is_some(), "12 routes on x-route are indexed");
        let mut scan = indexed.clone();
        scan.index = None;
        let requests: Vec<Vec<(&str, &str)>> = vec![
            vec![("x-route", "r9")],
            vec![("x-route", "r9"), ("x-v", "2")],
            vec![("x-route", "r11"), (":path", "/api/x")],
            vec![(":path", "/api")],
            vec![("x-route", "R1")],
            vec![("x-route", "r2")],
            vec![("x-route", "nothing")],
            vec![("x-route", "r7"), ("x-route", "r4")],
            vec![],
        ];
        for pairs in requests {
            let request = request(&pairs);
            let name = |router: &Router| router.matching_route(&request).map(|(_, route)| route.name.clone());
            assert_eq!(name(&indexed), name(&scan), "{pairs:?}");
        }
        assert_eq!(
            indexed.matching_route(&request(&[("x-route", "r7"), ("x-route", "r4")])).map(|(_, r)| r.name.as_str()),
            Some("r4"),
            "the earlier route of a repeated header's values"
        );
        // Raw bytes (as HTTP/2 lets through) are looked up as bytes: no lossy
        // text, no near miss, and the same answer as the scan.
        for value in [&b"r9\xff"[..], b"r\xff9", b"r9\0", b"r9\r\n"] {
            let request = gateway_common::testing::request(&[("x-route", value)]);
            let name = |router: &Router| router.matching_route(&request).map(|(_, route)| route.name.clone());
            assert_eq!(name(&indexed), name(&scan), "{value:?}");
            assert_ne!(name(&indexed).as_deref(), Some("r9"), "{value:?}");
        }
    }

    #[test]
    fn first_match_wins_and_prefix_is_segment_safe() {
        let r = router(
            r#"{"routes":[
                {"name":"v2","match":{"path":{"prefix":"/orders"},"headers":{"x-api-version":{"exact":"2"}}},"cluster":"orders-v2"},
                {"name":"orders","match":{"path":{"prefix":"/orders"}},"cluster":"orders"}
            ]}"#,
        );
        let never = || unreachable!();
        assert_eq!(
            cluster_of(r.decide(&request(&[(":path", "/orders/1"), ("x-api-version", "2")]), never)),
            "orders-v2"
        );
        assert_eq!(cluster_of(r.decide(&request(&[(":path", "/orders/1")]), never)), "orders");
        assert_eq!(r.decide(&request(&[(":path", "/ordersx")]), never), Decision::NoRoute);
    }

    #[test]
    fn any_and_all_groups() {
        let r = router(
            r#"{"routes":[{"name":"canary","match":{"any":[
                {"headers":{"x-api-version":{"exact":"2"}}},
                {"cookies":{"canary":{"present":true}}}
            ],"all":[{"methods":["GET"]}]},"cluster":"b"}],"default_cluster":"a"}"#,
        );
        let never = || unreachable!();
        let get_cookie = request(&[(":method", "GET"), (":path", "/"), ("cookie", "x=1; canary=yes")]);
        assert_eq!(cluster_of(r.decide(&get_cookie, never)), "b");
        let post_cookie = request(&[(":method", "POST"), (":path", "/"), ("cookie", "canary=yes")]);
        assert_eq!(cluster_of(r.decide(&post_cookie, never)), "a");
        assert_eq!(cluster_of(r.decide(&request(&[(":method", "GET"), (":path", "/")]), never)), "a");
    }

    #[test]
    fn sticky_split_is_stable_and_weighted() {
        let r = router(
            r#"{"routes":[{"name":"orders","split":{"clusters":[
                {"cluster":"v1","weight":90},{"cluster":"v2","weight":10},{"cluster":"off","weight":0}
            ],"sticky":{"header":"x-user-id"}}}]}"#,
        );
        let mut v2 = 0;
        for user in 0..10_000 {
            let req = request(&[(":path", "/"), ("x-user-id", &format!("user-{user}"))]);
            let first = cluster_of(r.decide(&req, || unreachable!()));
            assert_eq!(first, cluster_of(r.decide(&req, || unreachable!())), "sticky");
            assert_ne!(first, "off", "zero weight is never chosen");
            v2 += usize::from(first == "v2");
        }
        assert!((800..1200).contains(&v2), "about 10% on v2, got {v2}");
        // Without the key the split is random.
        assert_eq!(cluster_of(r.decide(&request(&[(":path", "/")]), || 95)), "v2");
        assert_eq!(cluster_of(r.decide(&request(&[(":path", "/")]), || 5)), "v1");
    }

    #[test]
    fn sticky_hash_is_the_documented_function() {
        // FNV-1a 64 of "orders\0alice": fixed forever (README documents it).
        assert_eq!(sticky_hash("orders", b"alice"), fnv1a64(b"orders\0alice"));
        assert_eq!(sticky_hash("orders", b"alice"), STICKY_ORDERS_ALICE);
    }

    #[test]
    fn rewrites_keep_the_query() {
        let r = router(
            r#"{"routes":[
                {"name":"p","match":{"path":{"prefix":"/api/users"}},"cluster":"u","rewrite":{"prefix":"/users","host":"users.internal"}},
                {"name":"r","match":{"path":{"prefix":"/v1"}},"cluster":"x","rewrite":{"regex":{"pattern":"^/v1/([a-z]+)/(\\d+)$","substitution":"/$1?id=$2"}}}
            ]}"#,
        );
        let Decision::Forward(forward) = r.decide(&request(&[(":path", "/api/users/7?a=1")]), || 0) else { panic!() };
        assert_eq!(forward.path.as_deref(), Some("/users/7?a=1"));
        assert_eq!(forward.authority.as_deref(), Some("users.internal"));
        let Decision::Forward(forward) = r.decide(&request(&[(":path", "/v1/items/42")]), || 0) else { panic!() };
        assert_eq!(forward.path.as_deref(), Some("/items?id=42"));
    }

    #[test]
    fn prefix_rewrite_keeps_the_rest_byte_for_byte() {
        let r = router(
            r#"{"routes":[{"name":"p","match":{"path":{"prefix":"/old/"}},"cluster":"u","rewrite":{"prefix":"/new/"}}]}"#,
        );
        for (path, expected) in [("/old//x", "/new//x"), ("/old/x?q=%FF", "/new/x?q=%FF"), ("/old/", "/new/")] {
            let Decision::Forward(forward) = r.decide(&request(&[(":path", path)]), || 0) else { panic!() };
            assert_eq!(forward.path.as_deref(), Some(expected), "{path}");
        }
    }

    #[test]
    fn header_values_that_are_not_utf8_stay_distinct() {
        let r = router(
            r#"{"routes":[
                {"name":"ff","match":{"headers":{"x-k":{"exact":"\u00ff"}}},"cluster":"a"},
                {"name":"rx","match":{"headers":{"x-k":{"regex":".*\ufffd.*"}}},"cluster":"b"}
            ],"default_cluster":"d"}"#,
        );
        let pairs = |value: &[u8]| {
            RequestHeaders::from_pairs(vec![(b":path".to_vec(), b"/".to_vec()), (b"x-k".to_vec(), value.to_vec())])
                .unwrap()
        };
        // Raw 0xff is not the UTF-8 text "ÿ", and a lossy U+FFFD never appears.
        assert_eq!(cluster_of(r.decide(&pairs(b"\xff"), || 0)), "d");
        assert_eq!(cluster_of(r.decide(&pairs("\u{ff}".as_bytes()), || 0)), "a");
        assert_eq!(cluster_of(r.decide(&pairs("\u{fffd}".as_bytes()), || 0)), "b");
    }

    #[test]
    fn config_errors_name_fields() {
        let bad = [
            (r#"{"routes":[{"name":"a","match":{"path":{"regex":"("}},"cluster":"c"}]}"#, "routes[0].match.path.regex"),
            (r#"{"routes":[{"name":"a"}]}"#, "routes[0]: needs exactly one action"),
            (
                r#"{"routes":[{"name":"a","split":{"clusters":[{"cluster":"c","weight":0}]}}]}"#,
                "routes[0].split.clusters",
            ),
            (r#"{"routes":[{"name":"a","cluster":"c","rewrite":{"prefix":"/x"}}]}"#, "routes[0].rewrite.prefix"),
            (r#"{"routes":[{"name":"a","cluster":"c"},{"name":"a","cluster":"d"}]}"#, "routes[1].name"),
            (
                r#"{"routes":[{"name":"a","match":{"headers":{"X-Up":{"exact":"1"}}},"cluster":"c"}]}"#,
                "routes[0].match.headers.X-Up",
            ),
            (
                r#"{"routes":[{"name":"a","cluster":"c","request_headers":{"set":{"x-a":"1\r\nx-b: 2"}}}]}"#,
                "routes[0].request_headers.set.x-a",
            ),
            (
                r#"{"routes":[{"name":"a","cluster":"c","response_headers":{"add":{"x-a":"v\u0000"}}}]}"#,
                "routes[0].response_headers.add.x-a",
            ),
            (r#"{"routes":[{"name":"a\nb","cluster":"c"}]}"#, "routes[0].name"),
            (r#"{"routes":[{"name":"a","cluster":"c\r"}]}"#, "routes[0].cluster"),
            (
                r#"{"routes":[{"name":"a","match":{"path":{"prefix":"/a"}},"cluster":"c","rewrite":{"host":"h/x"}}]}"#,
                "routes[0].rewrite.host",
            ),
            (
                r#"{"routes":[{"name":"a","match":{"path":{"prefix":"/a"}},"cluster":"c","rewrite":{"prefix":"/b c"}}]}"#,
                "routes[0].rewrite.prefix",
            ),
        ];
        for (json, expected) in bad {
            let config: RoutingConfig = gateway_common::config::parse_json(json.as_bytes()).unwrap();
            let errors = config.compile().unwrap_err();
            assert!(errors.messages().iter().any(|m| m.starts_with(expected)), "{json}: {errors:?}");
        }
        let typo = gateway_common::config::parse_json::<RoutingConfig>(br#"{"routes":[{"name":"a","clustr":"c"}]}"#);
        assert!(typo.unwrap_err().messages()[0].contains("clustr"));
    }
}
