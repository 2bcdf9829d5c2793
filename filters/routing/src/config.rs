//! routing.wasm configuration: the JSON users write, and its compiled form.

use std::collections::BTreeMap;

use gateway_common::client_ip::ClientIpSpec;

use crate::cors::{Cors, CorsSpec};
use gateway_common::config::ConfigErrors;
use gateway_common::request_match::{is_lower_case_header_name, Conditions, MatchSpec};
use regex_lite::Regex;
use serde::Deserialize;

use crate::query::QueryEdits;

pub const DEFAULT_CLUSTER_HEADER: &str = "x-gateway-cluster";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Request header Envoy's route reads with `cluster_header`.
    #[serde(default = "default_cluster_header")]
    pub cluster_header: String,
    /// When set, responses carry this header with the matched route's name.
    #[serde(default)]
    pub route_name_response_header: Option<String>,
    /// Ordered; the first route that matches wins.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Cluster for requests no route matched; absent: answer 404.
    #[serde(default)]
    pub default_cluster: Option<String>,
    /// Also call the host's `clear_route_cache` after changing headers. Envoy
    /// re-selects the route by itself for ABI 0.2.1 modules, so this only costs
    /// time there; turn it on for hosts that do not.
    #[serde(default)]
    pub clear_route_cache: bool,
    /// Where `client_ip` conditions take the client's address from.
    #[serde(default)]
    pub client_ip: ClientIpSpec,
    /// The CORS policy of every route without its own `cors` (and of requests no
    /// route matches).
    pub cors: Option<CorsSpec>,
}

fn default_cluster_header() -> String {
    DEFAULT_CLUSTER_HEADER.to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    #[serde(default, rename = "match")]
    pub match_: MatchSpec,
    // Exactly one action:
    pub cluster: Option<String>,
    pub split: Option<SplitSpec>,
    pub redirect: Option<RedirectSpec>,
    pub direct_response: Option<DirectResponseSpec>,
    // Modifiers for forwarded requests:
    pub rewrite: Option<RewriteSpec>,
    #[serde(default)]
    pub request_headers: RequestHeadersSpec,
    #[serde(default)]
    pub response_headers: ResponseHeadersSpec,
    #[serde(default)]
    pub query: QuerySpec,
    /// This route's CORS policy (replaces the top-level one).
    pub cors: Option<CorsSpec>,
}

/// Query-string edits of a forwarded request: remove, rename, set, add.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySpec {
    #[serde(default)]
    pub remove: Vec<String>,
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    pub clusters: Vec<WeightedClusterSpec>,
    /// Hash this request attribute to pick the cluster, so a user keeps landing on
    /// the same one; requests without it are split at random.
    pub sticky: Option<StickySpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedClusterSpec {
    pub cluster: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickySpec {
    pub header: Option<String>,
    pub cookie: Option<String>,
    pub query: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectSpec {
    #[serde(default = "default_redirect_status")]
    pub status: u32,
    pub location: String,
}

fn default_redirect_status() -> u32 {
    302
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseSpec {
    pub status: u32,
    /// A literal body; without it the answer is a problem+json document.
    pub body: Option<String>,
    #[serde(default = "default_content_type")]
    pub content_type: String,
    /// problem+json `detail` when no `body` is given.
    pub detail: Option<String>,
}

fn default_content_type() -> String {
    "text/plain".to_string()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteSpec {
    /// Replaces the path prefix the route matched (needs `match.path.prefix`).
    pub prefix: Option<String>,
    pub regex: Option<RegexRewriteSpec>,
    /// New `:authority`.
    pub host: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewriteSpec {
    pub pattern: String,
    /// `$1` / `${name}` refer to captures.
    pub substitution: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestHeadersSpec {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseHeadersSpec {
    /// Replace every value of the header (or add it).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Add a value, keeping the upstream's.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Remove the header from the upstream's response.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A route's response header edits, applied in this order: remove, set, add.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseEdits {
    pub remove: Vec<String>,
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
}

impl QuerySpec {
    /// Names must be non-empty; a name is removed, replaced (`set`) or renamed,
    /// never two of those (the result would depend on the order).
    fn compile(&self, field: &str, errors: &mut ConfigErrors) -> QueryEdits {
        let names = self.remove.iter().map(|name| ("remove", name)).chain(
            [("rename", &self.rename), ("set", &self.set), ("add", &self.add)]
                .into_iter()
                .flat_map(|(kind, map)| map.keys().map(move |name| (kind, name))),
        );
        for (kind, name) in names.clone() {
            if name.is_empty() {
                errors.add(format!("{field}.{kind}"), "parameter names must not be empty");
            }
        }
        for new in self.rename.values().filter(|new| new.is_empty()) {
            errors.add(format!("{field}.rename"), format!("renames to an empty name ({new:?})"));
        }
        let exclusive = names.filter(|(kind, _)| *kind != "add");
        let mut seen = std::collections::BTreeMap::new();
        for (kind, name) in exclusive {
            if let Some(first) = seen.insert(name.as_str(), kind) {
                errors.add(format!("{field}.{kind}.{name}"), format!("is also in {first}: use one edit per parameter"));
            }
        }
        QueryEdits {
            remove: self.remove.clone(),
            rename: self.rename.iter().map(|(old, new)| (old.clone(), new.clone())).collect(),
            set: self.set.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            add: self.add.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }
}

impl ResponseEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

// ---- compiled form -------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Router {
    pub cluster_header: String,
    pub route_name_response_header: Option<String>,
    pub routes: Vec<Route>,
    pub default_cluster: Option<String>,
    pub clear_route_cache: bool,
    pub client_ip: ClientIpSpec,
    /// Some route matches on the client's address (derive it per request).
    pub needs_client_ip: bool,
    pub cors: Option<Cors>,
    /// Some route (or the top level) has a CORS policy.
    pub has_cors: bool,
    /// The routes by the header value most of them require, when enough do.
    pub index: Option<crate::router::RouteIndex>,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub conditions: Conditions,
    pub action: Action,
    pub rewrite: Rewrite,
    pub request_headers: RequestHeadersSpec,
    pub response_headers: ResponseEdits,
    pub query: QueryEdits,
    pub cors: Option<Cors>,
}

#[derive(Debug, Clone)]
pub enum Action {
    Cluster(String),
    Split(Split),
    Redirect { status: u32, location: String },
    Respond { status: u32, body: Option<String>, content_type: String, detail: String },
}

#[derive(Debug, Clone)]
pub struct Split {
    /// (cluster, cumulative upper bound of its weight range).
    pub ranges: Vec<(String, u64)>,
    pub total: u64,
    pub sticky: Option<StickyKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    Header(String),
    Cookie(String),
    Query(String),
}

#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    /// (matched prefix, replacement).
    pub prefix: Option<(String, String)>,
    pub regex: Option<(Regex, String)>,
    pub host: Option<String>,
}

impl RoutingConfig {
    /// Validates everything and compiles the hot-path form. Every problem is
    /// reported, each naming its field.
    pub fn compile(&self) -> Result<Router, ConfigErrors> {
        let mut errors = ConfigErrors::new();
        if !is_header_name(&self.cluster_header) {
            errors.add("cluster_header", "must be a lower-case header name");
        }
        if let Some(name) = &self.route_name_response_header {
            if !is_header_name(name) {
                errors.add("route_name_response_header", "must be a lower-case header name");
            }
        }
        if let Some(cluster) = &self.default_cluster {
            check_cluster_name(cluster, "default_cluster", &mut errors);
        }
        self.client_ip.check("client_ip", &mut errors);
        let mut seen_names = std::collections::BTreeSet::new();
        let mut routes = Vec::with_capacity(self.routes.len());
        for (index, spec) in self.routes.iter().enumerate() {
            let field = format!("routes[{index}]");
            if errors.check_unique_name(format!("{field}.name"), &spec.name, "route name", &mut seen_names) {
                // The name goes into `route_name_response_header` and the access log.
                errors.check_header_value(format!("{field}.name"), &spec.name);
            }
            if let Some(route) = spec.compile(&field, &mut errors) {
                routes.push(route);
            }
        }
        let needs_client_ip = routes.iter().any(|route| route.conditions.needs_client_ip());
        let cors = self.cors.as_ref().and_then(|spec| spec.compile("cors", &mut errors));
        let has_cors = cors.is_some() || routes.iter().any(|route| route.cors.is_some());
        let index = crate::router::RouteIndex::build(&routes);
        errors.into_result(Router {
            index,
            cluster_header: self.cluster_header.clone(),
            route_name_response_header: self.route_name_response_header.clone(),
            routes,
            default_cluster: self.default_cluster.clone(),
            clear_route_cache: self.clear_route_cache,
            client_ip: self.client_ip,
            needs_client_ip,
            cors,
            has_cors,
        })
    }
}

impl RouteSpec {
    fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<Route> {
        let conditions = self.match_.compile(&format!("{field}.match"), errors);
        let action = self.compile_action(field, errors);
        let rewrite = self.compile_rewrite(field, errors);
        for (kind, map) in [("set", &self.request_headers.set), ("add", &self.request_headers.add)] {
            for (name, value) in map {
                check_mutable_header(name, &format!("{field}.request_headers"), errors);
                errors.check_header_value(format!("{field}.request_headers.{kind}.{name}"), value);
            }
        }
        let edits = &self.request_headers;
        let forwards = self.cluster.is_some() || self.split.is_some();
        let edits_request = !edits.set.is_empty() || !edits.add.is_empty() || !edits.remove.is_empty();
        let query = self.query.compile(&format!("{field}.query"), errors);
        if !forwards && !query.is_empty() {
            errors.add(format!("{field}.query"), "only routes that forward (cluster or split) edit requests");
        }
        if !forwards && edits_request {
            errors.add(format!("{field}.request_headers"), "only routes that forward (cluster or split) edit requests");
        }
        for name in &self.request_headers.remove {
            check_mutable_header(name, &format!("{field}.request_headers.remove"), errors);
        }
        let responses = &self.response_headers;
        for (kind, map) in [("set", &responses.set), ("add", &responses.add)] {
            for (name, value) in map {
                check_mutable_header(name, &format!("{field}.response_headers.{kind}"), errors);
                errors.check_header_value(format!("{field}.response_headers.{kind}.{name}"), value);
            }
        }
        for name in &responses.remove {
            check_mutable_header(name, &format!("{field}.response_headers.remove"), errors);
        }
        for name in
            responses.set.keys().filter(|name| responses.add.contains_key(*name) || responses.remove.contains(name))
        {
            errors.add(
                format!("{field}.response_headers.set.{name}"),
                "is also added or removed: use one edit per header",
            );
        }
        let cors = match &self.cors {
            Some(spec) => Some(spec.compile(&format!("{field}.cors"), errors)?),
            None => None,
        };
        Some(Route {
            name: self.name.clone(),
            conditions: conditions?,
            action: action?,
            rewrite: rewrite?,
            request_headers: self.request_headers.clone(),
            response_headers: ResponseEdits {
                remove: responses.remove.clone(),
                set: responses.set.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                add: responses.add.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            },
            query,
            cors,
        })
    }

    fn compile_action(&self, field: &str, errors: &mut ConfigErrors) -> Option<Action> {
        let count =
            [self.cluster.is_some(), self.split.is_some(), self.redirect.is_some(), self.direct_response.is_some()]
                .iter()
                .filter(|given| **given)
                .count();
        if count != 1 {
            errors.add(field, "needs exactly one action: cluster, split, redirect or direct_response");
            return None;
        }
        if let Some(cluster) = &self.cluster {
            check_cluster_name(cluster, &format!("{field}.cluster"), errors);
            return Some(Action::Cluster(cluster.clone()));
        }
        if let Some(split) = &self.split {
            return split.compile(&format!("{field}.split"), errors).map(Action::Split);
        }
        if let Some(redirect) = &self.redirect {
            if !matches!(redirect.status, 301 | 302 | 303 | 307 | 308) {
                errors.add(format!("{field}.redirect.status"), "must be 301, 302, 303, 307 or 308");
            }
            if redirect.location.is_empty() || !is_header_value(&redirect.location) {
                errors.add(format!("{field}.redirect.location"), "must be a non-empty header value");
            }
            return Some(Action::Redirect { status: redirect.status, location: redirect.location.clone() });
        }
        let response = self.direct_response.as_ref()?;
        if !(200..=599).contains(&response.status) {
            errors.add(format!("{field}.direct_response.status"), "must be between 200 and 599");
        }
        if response.body.is_some() && response.detail.is_some() {
            errors.add(format!("{field}.direct_response"), "give either `body` or `detail`, not both");
        }
        if !is_header_value(&response.content_type) {
            errors.add(format!("{field}.direct_response.content_type"), "must be a header value");
        }
        Some(Action::Respond {
            status: response.status,
            body: response.body.clone(),
            content_type: response.content_type.clone(),
            detail: response
                .detail
                .clone()
                .unwrap_or_else(|| format!("route `{}` answers this request itself", self.name)),
        })
    }

    fn compile_rewrite(&self, field: &str, errors: &mut ConfigErrors) -> Option<Rewrite> {
        let Some(spec) = &self.rewrite else {
            return Some(Rewrite::default());
        };
        let field = format!("{field}.rewrite");
        if !matches!((&self.cluster, &self.split), (Some(_), _) | (_, Some(_))) {
            errors.add(&field, "only routes that forward (cluster or split) can rewrite");
        }
        if spec.prefix.is_some() && spec.regex.is_some() {
            errors.add(&field, "give either `prefix` or `regex`, not both");
        }
        let mut rewrite = Rewrite::default();
        if let Some(replacement) = &spec.prefix {
            let matched_prefix = self.match_.path.as_ref().and_then(|path| path.prefix.clone());
            match matched_prefix {
                Some(matched) => rewrite.prefix = Some((matched, replacement.clone())),
                None => errors.add(format!("{field}.prefix"), "needs the route to match `path.prefix`"),
            }
            errors.check_path(format!("{field}.prefix"), replacement);
        }
        if let Some(regex) = &spec.regex {
            if !regex.substitution.bytes().all(|byte| (0x21..=0x7e).contains(&byte)) {
                errors.add(format!("{field}.regex.substitution"), "must be printable ASCII without spaces");
            }
            match regex_lite::Regex::new(&regex.pattern) {
                Ok(compiled) => rewrite.regex = Some((compiled, regex.substitution.clone())),
                Err(error) => errors.add(format!("{field}.regex.pattern"), format!("invalid regex: {error}")),
            }
        }
        if let Some(host) = &spec.host {
            errors.check_authority(format!("{field}.host"), host);
            rewrite.host = Some(host.clone());
        }
        Some(rewrite)
    }
}

impl SplitSpec {
    fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<Split> {
        if self.clusters.is_empty() {
            errors.add(format!("{field}.clusters"), "must list at least one cluster");
            return None;
        }
        let mut ranges = Vec::with_capacity(self.clusters.len());
        let mut total: u64 = 0;
        for (index, weighted) in self.clusters.iter().enumerate() {
            check_cluster_name(&weighted.cluster, &format!("{field}.clusters[{index}].cluster"), errors);
            total += u64::from(weighted.weight);
            ranges.push((weighted.cluster.clone(), total));
        }
        if total == 0 {
            errors.add(format!("{field}.clusters"), "at least one weight must be above zero");
            return None;
        }
        let sticky = match &self.sticky {
            None => None,
            Some(spec) => {
                let keys: Vec<StickyKey> = [
                    spec.header.clone().map(StickyKey::Header),
                    spec.cookie.clone().map(StickyKey::Cookie),
                    spec.query.clone().map(StickyKey::Query),
                ]
                .into_iter()
                .flatten()
                .collect();
                let given = [
                    ("header", spec.header.is_some()),
                    ("cookie", spec.cookie.is_some()),
                    ("query", spec.query.is_some()),
                ];
                if !errors.check_exactly_one(format!("{field}.sticky"), &given) {
                    return None;
                }
                if let Some(StickyKey::Header(name)) = keys.first() {
                    if !is_header_name(name) {
                        errors.add(format!("{field}.sticky.header"), "must be a lower-case header name");
                    }
                }
                keys.into_iter().next()
            }
        };
        Some(Split { ranges, total, sticky })
    }
}

fn check_cluster_name(name: &str, field: &str, errors: &mut ConfigErrors) {
    if name.is_empty() || !is_header_value(name) {
        errors.add(field, "must be a non-empty Envoy cluster name");
    }
}

fn check_mutable_header(name: &str, field: &str, errors: &mut ConfigErrors) {
    if !is_header_name(name) {
        errors.add(format!("{field}.{name}"), "must be a lower-case header name");
    } else if name.starts_with(':') || name == "host" {
        errors.add(format!("{field}.{name}"), "pseudo-headers and host are changed with `rewrite`");
    }
}

fn is_header_name(name: &str) -> bool {
    is_lower_case_header_name(name)
}

/// The value rule `field.rs` enforces when the module writes a header.
fn is_header_value(value: &str) -> bool {
    gateway_common::field::is_field_value(value.as_bytes())
}
