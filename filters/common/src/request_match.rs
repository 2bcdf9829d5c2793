//! Request conditions shared by the filters (routing routes, rate-limit rules,
//! auth rules): path, methods, hosts, headers, query parameters, cookies, and
//! nested any/all groups. Written as JSON by users, compiled once.

use std::collections::BTreeMap;

use serde::Deserialize;

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
    /// At least one of these groups must match.
    pub any: Option<Vec<MatchSpec>>,
    /// Every one of these groups must match.
    pub all: Option<Vec<MatchSpec>>,
}

#[derive(Debug, Clone, Default)]
pub struct Conditions {
    pub path: Option<PathMatcher>,
    pub methods: Vec<String>,
    pub hosts: Vec<HostMatcher>,
    pub headers: Vec<(String, StringMatcher)>,
    pub query: Vec<(String, StringMatcher)>,
    pub cookies: Vec<(String, StringMatcher)>,
    pub any: Vec<Conditions>,
    pub all: Vec<Conditions>,
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
        if !self.any.is_empty() && !self.any.iter().any(|group| group.matches(request)) {
            return false;
        }
        self.all.iter().all(|group| group.matches(request))
    }
}

/// Lower-case token characters (RFC 9110), or a pseudo-header.
pub fn is_lower_case_header_name(name: &str) -> bool {
    crate::field::is_header_name(name)
}
