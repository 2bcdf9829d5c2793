//! Matchers on request attributes, written once for every filter: string
//! conditions (headers, query parameters, cookies), paths and hosts.
//! Regexes use `regex-lite`, a linear-time engine: no request can make a match slow.

use regex_lite::{Regex, RegexBuilder};
use serde::Deserialize;

use crate::config::ConfigErrors;

/// A string condition as users write it: exactly one of the kinds, plus modifiers.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StringMatchSpec {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub suffix: Option<String>,
    pub contains: Option<String>,
    pub regex: Option<String>,
    pub one_of: Option<Vec<String>>,
    /// `true`: the value must be present (any value).
    pub present: Option<bool>,
    /// `true`: the value must be absent.
    pub absent: Option<bool>,
    /// ASCII case-insensitive comparison (and `(?i)` for regex).
    #[serde(default)]
    pub ignore_case: bool,
    /// Negates the whole condition.
    #[serde(default)]
    pub invert: bool,
}

#[derive(Debug, Clone)]
enum StringKind {
    Exact(Vec<u8>),
    Prefix(Vec<u8>),
    Suffix(Vec<u8>),
    Contains(Vec<u8>),
    Regex(Regex),
    OneOf(Vec<Vec<u8>>),
    Present,
    Absent,
}

/// A compiled string condition.
#[derive(Debug, Clone)]
pub struct StringMatcher {
    kind: StringKind,
    ignore_case: bool,
    invert: bool,
}

impl StringMatchSpec {
    /// Compiles the condition; problems are recorded under `field`.
    pub fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<StringMatcher> {
        let fold = |text: &str| -> Vec<u8> {
            if self.ignore_case {
                text.to_ascii_lowercase().into_bytes()
            } else {
                text.as_bytes().to_vec()
            }
        };
        let mut kinds = Vec::new();
        if let Some(value) = &self.exact {
            kinds.push(StringKind::Exact(fold(value)));
        }
        if let Some(value) = &self.prefix {
            kinds.push(StringKind::Prefix(fold(value)));
        }
        if let Some(value) = &self.suffix {
            kinds.push(StringKind::Suffix(fold(value)));
        }
        if let Some(value) = &self.contains {
            kinds.push(StringKind::Contains(fold(value)));
        }
        if let Some(pattern) = &self.regex {
            match compile_regex(pattern, self.ignore_case) {
                Ok(regex) => kinds.push(StringKind::Regex(regex)),
                Err(reason) => {
                    errors.add(format!("{field}.regex"), reason);
                    return None;
                }
            }
        }
        if let Some(values) = &self.one_of {
            if values.is_empty() {
                errors.add(format!("{field}.one_of"), "must list at least one value");
                return None;
            }
            kinds.push(StringKind::OneOf(values.iter().map(|value| fold(value)).collect()));
        }
        match self.present {
            Some(true) => kinds.push(StringKind::Present),
            Some(false) => {
                errors.add(format!("{field}.present"), "only `true` is meaningful; use `absent: true`");
                return None;
            }
            None => {}
        }
        match self.absent {
            Some(true) => kinds.push(StringKind::Absent),
            Some(false) => {
                errors.add(format!("{field}.absent"), "only `true` is meaningful; use `present: true`");
                return None;
            }
            None => {}
        }
        if kinds.len() != 1 {
            errors.add(field, "needs exactly one of exact, prefix, suffix, contains, regex, one_of, present, absent");
            return None;
        }
        let kind = kinds.pop()?;
        Some(StringMatcher { kind, ignore_case: self.ignore_case, invert: self.invert })
    }
}

/// Compiles a regex that must match the whole value (anchored).
pub fn compile_regex(pattern: &str, ignore_case: bool) -> Result<Regex, String> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .case_insensitive(ignore_case)
        .size_limit(1 << 20)
        .build()
        .map_err(|error| format!("invalid regex: {error}"))
}

impl StringMatcher {
    /// Matches the values of one attribute (several for a repeated header; none
    /// when absent). A value condition holds when any value satisfies it.
    pub fn matches<'a>(&self, values: impl IntoIterator<Item = &'a [u8]>) -> bool {
        let mut values = values.into_iter().peekable();
        let result = match &self.kind {
            StringKind::Present => values.peek().is_some(),
            StringKind::Absent => values.peek().is_none(),
            _ => values.any(|value| self.matches_value(value)),
        };
        result != self.invert
    }

    /// The one value this condition requires, when it is a plain exact match
    /// (case-sensitive, not inverted): a route table can index routes by it.
    pub fn required_exact_value(&self) -> Option<&[u8]> {
        match &self.kind {
            StringKind::Exact(expected) if !self.ignore_case && !self.invert => Some(expected),
            _ => None,
        }
    }

    fn matches_value(&self, value: &[u8]) -> bool {
        // Expected texts were lower-cased at compile time when ignoring case; the
        // value is compared folded, without a folded copy per request.
        let same = |a: &[u8], b: &[u8]| if self.ignore_case { a.eq_ignore_ascii_case(b) } else { a == b };
        match &self.kind {
            StringKind::Exact(expected) => same(value, expected),
            StringKind::Prefix(prefix) => value.get(..prefix.len()).is_some_and(|head| same(head, prefix)),
            StringKind::Suffix(suffix) => {
                value.len() >= suffix.len() && value.get(value.len() - suffix.len()..).is_some_and(|t| same(t, suffix))
            }
            StringKind::Contains(needle) => {
                needle.is_empty() || value.windows(needle.len()).any(|window| same(window, needle))
            }
            // A regex describes text: a value that is not UTF-8 is not text and
            // matches no regex (never a lossy copy, where \xff and \xfe look alike).
            StringKind::Regex(regex) => std::str::from_utf8(value).is_ok_and(|text| regex.is_match(text)),
            StringKind::OneOf(options) => options.iter().any(|option| same(option, value)),
            StringKind::Present => true,
            StringKind::Absent => false,
        }
    }
}

/// A path condition as users write it: exactly one of exact, prefix, regex.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PathMatchSpec {
    pub exact: Option<String>,
    /// Segment-safe: `/users` matches `/users` and `/users/7`, never `/usersettings`.
    pub prefix: Option<String>,
    pub regex: Option<String>,
    #[serde(default)]
    pub ignore_case: bool,
}

#[derive(Debug, Clone)]
pub enum PathMatcher {
    Exact(String, bool),
    Prefix(String, bool),
    Regex(Regex),
}

impl PathMatchSpec {
    pub fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<PathMatcher> {
        let given =
            [("exact", self.exact.is_some()), ("prefix", self.prefix.is_some()), ("regex", self.regex.is_some())];
        if !errors.check_exactly_one(field, &given) {
            return None;
        }
        let must_be_absolute = |value: &str, errors: &mut ConfigErrors, which: &str| {
            if !value.starts_with('/') {
                errors.add(format!("{field}.{which}"), "must start with '/'");
            }
        };
        if let Some(exact) = &self.exact {
            must_be_absolute(exact, errors, "exact");
            return Some(PathMatcher::Exact(exact.clone(), self.ignore_case));
        }
        if let Some(prefix) = &self.prefix {
            must_be_absolute(prefix, errors, "prefix");
            return Some(PathMatcher::Prefix(prefix.clone(), self.ignore_case));
        }
        let pattern = self.regex.as_deref().unwrap_or_default();
        match compile_regex(pattern, self.ignore_case) {
            Ok(regex) => Some(PathMatcher::Regex(regex)),
            Err(reason) => {
                errors.add(format!("{field}.regex"), reason);
                None
            }
        }
    }
}

impl PathMatcher {
    /// Matches a path without its query string.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(expected, ignore_case) => eq(path, expected, *ignore_case),
            PathMatcher::Prefix(prefix, ignore_case) => segment_prefix(path, prefix, *ignore_case),
            PathMatcher::Regex(regex) => regex.is_match(path),
        }
    }
}

fn eq(a: &str, b: &str, ignore_case: bool) -> bool {
    if ignore_case {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// Prefix match on whole path segments: `/users` matches `/users`, `/users/` and
/// `/users/7`, not `/usersettings`. A prefix ending in `/` is a plain prefix.
pub fn segment_prefix(path: &str, prefix: &str, ignore_case: bool) -> bool {
    let Some(head) = path.get(..prefix.len()) else {
        return false;
    };
    if !eq(head, prefix, ignore_case) {
        return false;
    }
    prefix.ends_with('/') || matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

/// Host (authority) condition: exact name, or `*.example.com` for any subdomain.
/// Case-insensitive; the port is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatcher {
    Exact(String),
    AnySubdomainOf(String),
}

impl HostMatcher {
    pub fn compile(pattern: &str, field: &str, errors: &mut ConfigErrors) -> Option<Self> {
        let pattern = pattern.to_ascii_lowercase();
        if pattern.is_empty() {
            errors.add(field, "must not be empty");
            return None;
        }
        if let Some(domain) = pattern.strip_prefix("*.") {
            if domain.is_empty() || domain.contains('*') {
                errors.add(field, "a wildcard host looks like `*.example.com`");
                return None;
            }
            return Some(HostMatcher::AnySubdomainOf(format!(".{domain}")));
        }
        if pattern.contains('*') {
            errors.add(field, "`*` is only allowed as the leading label (`*.example.com`)");
            return None;
        }
        Some(HostMatcher::Exact(pattern))
    }

    pub fn matches(&self, authority: &[u8]) -> bool {
        let host = strip_port(authority);
        match self {
            HostMatcher::Exact(name) => host.eq_ignore_ascii_case(name.as_bytes()),
            HostMatcher::AnySubdomainOf(suffix) => {
                host.len() > suffix.len()
                    && host
                        .get(host.len() - suffix.len()..)
                        .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix.as_bytes()))
            }
        }
    }
}

/// `example.com:8080` -> `example.com`; `[::1]:80` -> `[::1]`.
pub fn strip_port(authority: &[u8]) -> &[u8] {
    if authority.first() == Some(&b'[') {
        return match authority.iter().position(|byte| *byte == b']') {
            Some(end) => authority.get(..=end).unwrap_or(authority),
            None => authority,
        };
    }
    match authority.iter().rposition(|byte| *byte == b':') {
        Some(colon) => authority.get(..colon).unwrap_or(authority),
        None => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string_matcher(json: &str) -> StringMatcher {
        let spec: StringMatchSpec = serde_json::from_str(json).unwrap();
        let mut errors = ConfigErrors::new();
        let matcher = spec.compile("m", &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        matcher.unwrap()
    }

    fn one(value: &str) -> Vec<&[u8]> {
        vec![value.as_bytes()]
    }

    #[test]
    fn string_kinds() {
        assert!(string_matcher(r#"{"exact":"2"}"#).matches(one("2")));
        assert!(!string_matcher(r#"{"exact":"2"}"#).matches(one("20")));
        assert!(string_matcher(r#"{"prefix":"ab"}"#).matches(one("abc")));
        assert!(string_matcher(r#"{"suffix":"bc"}"#).matches(one("abc")));
        assert!(string_matcher(r#"{"contains":"b"}"#).matches(one("abc")));
        assert!(string_matcher(r#"{"regex":"v[0-9]+"}"#).matches(one("v12")));
        assert!(!string_matcher(r#"{"regex":"v[0-9]+"}"#).matches(one("xv12")), "regex is anchored");
        assert!(string_matcher(r#"{"one_of":["a","b"]}"#).matches(one("b")));
        assert!(string_matcher(r#"{"present":true}"#).matches(one("")));
        assert!(!string_matcher(r#"{"present":true}"#).matches(Vec::<&[u8]>::new()));
        assert!(string_matcher(r#"{"absent":true}"#).matches(Vec::<&[u8]>::new()));
        assert!(string_matcher(r#"{"exact":"AbC","ignore_case":true}"#).matches(one("aBc")));
        for spec in [r#""prefix":"AB""#, r#""suffix":"yZ""#, r#""contains":"Cx""#, r#""one_of":["q","ABCXYZ"]"#] {
            let matcher = string_matcher(&format!(r#"{{{spec},"ignore_case":true}}"#));
            assert!(matcher.matches(one("abcxyz")) && matcher.matches(one("ABCXYZ")), "{spec}");
            assert!(!matcher.matches(one("bcdefgh")), "{spec}");
            let matcher = string_matcher(&format!("{{{spec}}}"));
            assert!(!matcher.matches(one("abcxyz")), "{spec}: case counts without ignore_case");
        }
        assert!(string_matcher(r#"{"exact":"a","invert":true}"#).matches(one("b")));
        assert!(string_matcher(r#"{"exact":"a","invert":true}"#).matches(Vec::<&[u8]>::new()));
    }

    #[test]
    fn non_utf8_values_never_panic() {
        let bytes: &[u8] = b"\xff\xfe\x00abc";
        assert!(string_matcher(r#"{"suffix":"abc"}"#).matches(vec![bytes]));
        assert!(!string_matcher(r#"{"regex":"abc"}"#).matches(vec![bytes]));
        assert!(string_matcher(r#"{"exact":"x","ignore_case":true}"#).matches(vec![bytes, b"X".as_slice()]));
    }

    #[test]
    fn string_spec_errors_name_the_field() {
        let mut errors = ConfigErrors::new();
        let spec: StringMatchSpec = serde_json::from_str(r#"{"regex":"("}"#).unwrap();
        assert!(spec.compile("routes[0].headers[1]", &mut errors).is_none());
        assert!(errors.messages()[0].starts_with("routes[0].headers[1].regex"));
        let spec: StringMatchSpec = serde_json::from_str(r#"{"exact":"a","prefix":"b"}"#).unwrap();
        assert!(spec.compile("f", &mut errors).is_none());
        assert_eq!(errors.messages().len(), 2);
    }

    #[test]
    fn segment_safe_prefix() {
        assert!(segment_prefix("/users", "/users", false));
        assert!(segment_prefix("/users/7", "/users", false));
        assert!(!segment_prefix("/usersettings", "/users", false));
        assert!(segment_prefix("/api/v1x", "/api/", false));
        assert!(!segment_prefix("/u", "/users", false));
        assert!(segment_prefix("/USERS/1", "/users", true));
    }

    #[test]
    fn hosts() {
        let mut errors = ConfigErrors::new();
        let wildcard = HostMatcher::compile("*.example.com", "h", &mut errors).unwrap();
        assert!(wildcard.matches(b"api.example.com"));
        assert!(wildcard.matches(b"API.Example.com:8443"));
        assert!(!wildcard.matches(b"example.com"));
        assert!(!wildcard.matches(b"badexample.com"));
        let exact = HostMatcher::compile("Example.com", "h", &mut errors).unwrap();
        assert!(exact.matches(b"example.com:80"));
        assert!(HostMatcher::compile("a.*.com", "h", &mut errors).is_none());
        assert_eq!(strip_port(b"[::1]:80"), b"[::1]");
    }
}
