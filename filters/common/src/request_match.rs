//! Request conditions shared by the filters (routing routes, rate-limit rules,
//! auth rules): path, methods, hosts, headers, query parameters, cookies, the
//! client's address, and nested any/all/not groups. Written as JSON by users,
//! compiled once.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::client_ip::CidrList;
use crate::config::ConfigErrors;
use crate::matcher::{HostMatcher, PathMatchSpec, PathMatcher, StringMatchSpec, StringMatcher};
use crate::request::RequestHeaders;

/// Conditions, all of which must hold. An empty match matches every request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    pub path: Option<PathMatchSpec>,
    /// Any of these methods (upper-case, e.g. `GET`).
    pub methods: Option<Vec<String>>,
    /// Any of these hosts: exact names or `*.example.com`.
    pub hosts: Option<Vec<String>>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    pub query: BTreeMap<String, StringMatchSpec>,
    #[serde(default)]
    pub cookies: BTreeMap<String, StringMatchSpec>,
    /// The client's address (as the module's `client_ip` derives it) is in one of
    /// these IPv4 / IPv6 ranges (`10.0.0.0/8`, `2001:db8::/32`, `192.0.2.7`).
    pub client_ip: Option<Vec<String>>,
    /// At least one of these groups must match.
    pub any: Option<Vec<MatchSpec>>,
    /// Every one of these groups must match.
    pub all: Option<Vec<MatchSpec>>,
    /// This group must not match (e.g. `{"not": {"client_ip": [...]}}` for every
    /// client outside a list).
    pub not: Option<Box<MatchSpec>>,
}

#[derive(Debug, Clone, Default)]
pub struct Conditions {
    pub path: Option<PathMatcher>,
    pub methods: Vec<String>,
    pub hosts: Vec<HostMatcher>,
    pub headers: Vec<(String, StringMatcher)>,
    pub query: Vec<(String, StringMatcher)>,
    pub cookies: Vec<(String, StringMatcher)>,
    pub client_ip: Option<CidrList>,
    pub any: Vec<Conditions>,
    pub all: Vec<Conditions>,
    pub not: Option<Box<Conditions>>,
}

impl MatchSpec {
    pub fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<Conditions> {
        let mut conditions = Conditions::default();
        let mut ok = true;
        if let Some(path) = &self.path {
            conditions.path = path.compile(&format!("{field}.path"), errors);
            ok &= conditions.path.is_some();
        }
        if let Some(methods) = &self.methods {
            if methods.is_empty() {
                errors.add(format!("{field}.methods"), "must list at least one method");
            }
            for (index, method) in methods.iter().enumerate() {
                errors.check_method(format!("{field}.methods[{index}]"), method);
            }
            conditions.methods = methods.clone();
        }
        if let Some(hosts) = &self.hosts {
            if hosts.is_empty() {
                errors.add(format!("{field}.hosts"), "must list at least one host");
            }
            for (index, host) in hosts.iter().enumerate() {
                match HostMatcher::compile(host, &format!("{field}.hosts[{index}]"), errors) {
                    Some(matcher) => conditions.hosts.push(matcher),
                    None => ok = false,
                }
            }
        }
        let mut compile_map = |map: &BTreeMap<String, StringMatchSpec>, kind: &str, lower: bool| {
            let mut compiled = Vec::new();
            for (name, spec) in map {
                let key_field = format!("{field}.{kind}.{name}");
                if lower && !is_lower_case_header_name(name) {
                    errors.add(&key_field, "header names must be lower-case");
                }
                match spec.compile(&key_field, errors) {
                    Some(matcher) => compiled.push((name.clone(), matcher)),
                    None => ok = false,
                }
            }
            compiled
        };
        conditions.headers = compile_map(&self.headers, "headers", true);
        conditions.query = compile_map(&self.query, "query", false);
        conditions.cookies = compile_map(&self.cookies, "cookies", false);
        if let Some(ranges) = &self.client_ip {
            conditions.client_ip = CidrList::compile(ranges, &format!("{field}.client_ip"), errors);
            ok &= conditions.client_ip.is_some();
        }
        if let Some(group) = &self.not {
            conditions.not = group.compile(&format!("{field}.not"), errors).map(Box::new);
            ok &= conditions.not.is_some();
        }
        for (kind, groups, target) in [("any", &self.any, &mut conditions.any), ("all", &self.all, &mut conditions.all)]
        {
            if let Some(groups) = groups {
                if groups.is_empty() {
                    errors.add(format!("{field}.{kind}"), "must list at least one group");
                }
                for (index, group) in groups.iter().enumerate() {
                    match group.compile(&format!("{field}.{kind}[{index}]"), errors) {
                        Some(compiled) => target.push(compiled),
                        None => ok = false,
                    }
                }
            }
        }
        ok.then_some(conditions)
    }
}

impl Conditions {
    /// Whether matching needs the client's address (the caller then derives it
    /// once and sets it on the request: [`RequestHeaders::set_client_ip`]).
    pub fn needs_client_ip(&self) -> bool {
        self.client_ip.is_some()
            || self.not.as_ref().is_some_and(|group| group.needs_client_ip())
            || self.any.iter().chain(&self.all).any(Conditions::needs_client_ip)
    }

    pub fn matches(&self, request: &RequestHeaders) -> bool {
        if let Some(path) = &self.path {
            if !path.matches(request.path()) {
                return false;
            }
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|method| method.as_bytes() == request.method()) {
            return false;
        }
        if !self.hosts.is_empty() && !self.hosts.iter().any(|host| host.matches(request.authority())) {
            return false;
        }
        if !self.headers.iter().all(|(name, matcher)| matcher.matches(request.values(name))) {
            return false;
        }
        if !self.query.iter().all(|(name, matcher)| {
            let values = request.query_values(name);
            matcher.matches(values.iter().map(Vec::as_slice))
        }) {
            return false;
        }
        if !self.cookies.iter().all(|(name, matcher)| matcher.matches(request.cookie_values(name))) {
            return false;
        }
        // A client whose address is unknown is in no range.
        if let Some(ranges) = &self.client_ip {
            if !request.client_ip().is_some_and(|ip| ranges.contains(ip)) {
                return false;
            }
        }
        if !self.any.is_empty() && !self.any.iter().any(|group| group.matches(request)) {
            return false;
        }
        if self.not.as_ref().is_some_and(|group| group.matches(request)) {
            return false;
        }
        self.all.iter().all(|group| group.matches(request))
    }
}

/// Lower-case token characters (RFC 9110), or a pseudo-header.
pub fn is_lower_case_header_name(name: &str) -> bool {
    crate::field::is_header_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conditions(json: &str) -> Conditions {
        let spec: MatchSpec = serde_json::from_str(json).unwrap();
        let mut errors = ConfigErrors::new();
        spec.compile("match", &mut errors).unwrap_or_else(|| panic!("{:?}", errors.messages()))
    }

    fn request_from(ip: Option<&str>) -> RequestHeaders {
        let mut request = RequestHeaders::from_pairs(vec![(b":path".to_vec(), b"/".to_vec())]).unwrap();
        request.set_client_ip(ip.and_then(|ip| crate::client_ip::parse_ip(ip.as_bytes())));
        request
    }

    #[test]
    fn client_ip_ranges_and_their_negation() {
        let inside = conditions(r#"{"client_ip": ["10.0.0.0/8", "2001:db8::/32"]}"#);
        let outside = conditions(r#"{"not": {"client_ip": ["10.0.0.0/8", "2001:db8::/32"]}}"#);
        for (ip, expected) in [(Some("10.2.3.4"), true), (Some("2001:db8::5"), true), (Some("192.0.2.1"), false)] {
            assert_eq!(inside.matches(&request_from(ip)), expected, "{ip:?}");
            assert_eq!(outside.matches(&request_from(ip)), !expected, "{ip:?}");
        }
        // Unknown: in no range.
        assert!(!inside.matches(&request_from(None)));
        assert!(inside.needs_client_ip() && outside.needs_client_ip());
        assert!(
            conditions(r#"{"any": [{"path": {"prefix": "/"}}, {"all": [{"client_ip": ["::1"]}]}]}"#).needs_client_ip()
        );
        assert!(!conditions(r#"{"path": {"prefix": "/"}}"#).needs_client_ip());
    }

    #[test]
    fn a_bad_range_names_its_field() {
        let spec: MatchSpec = serde_json::from_str(r#"{"not": {"client_ip": ["10.0.0.1/8"]}}"#).unwrap();
        let mut errors = ConfigErrors::new();
        assert!(spec.compile("routes[0].match", &mut errors).is_none());
        assert!(errors.messages()[0].starts_with("routes[0].match.not.client_ip[0]: "), "{:?}", errors.messages());
    }
}
