//! CORS (the Fetch standard's CORS protocol) per route: preflights answered by
//! the gateway, the CORS response headers of actual requests set by the policy.
//! Plain Rust over request bytes; the glue turns answers into host calls.
//!
//! The policy is authoritative: for a request a policy applies to, an upstream's
//! own `Access-Control-Allow-*` / `-Expose-Headers` are replaced or removed, so a
//! disallowed origin never gets CORS headers, whoever would have sent them.

use regex_lite::Regex;
use serde::Deserialize;

use gateway_common::config::ConfigErrors;
use gateway_common::matcher::compile_regex;
use gateway_common::request::escape_bytes;

/// Methods a browser sends without listing them (Fetch: CORS-safelisted methods).
const SAFELISTED_METHODS: &[&str] = &["GET", "HEAD", "POST"];
/// A day: browsers cap the preflight cache lower still (Chromium: 2 h).
const MAX_AGE_LIMIT: u32 = 86_400;

pub const ALLOW_ORIGIN: &str = "access-control-allow-origin";
pub const ALLOW_CREDENTIALS: &str = "access-control-allow-credentials";
pub const EXPOSE_HEADERS: &str = "access-control-expose-headers";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSpec {
    /// Exact origins (`https://app.example.com`, `null`), or `*` for any.
    #[serde(default)]
    pub allow_origins: Vec<String>,
    /// Origins whose host ends with one of these (`.example.com`: every subdomain).
    #[serde(default)]
    pub allow_origin_suffixes: Vec<String>,
    /// Origins matching one of these regexes, whole (linear-time engine).
    #[serde(default)]
    pub allow_origin_regexes: Vec<String>,
    /// Methods beyond GET, HEAD and POST (which browsers never preflight).
    #[serde(default)]
    pub allow_methods: Vec<String>,
    /// Request headers a page may send (lower-case), or `*` for any (not with
    /// credentials).
    #[serde(default)]
    pub allow_headers: Vec<String>,
    /// Response headers a page may read beyond the safelisted ones, or `*` for
    /// all (not with credentials).
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may reuse a preflight answer.
    pub max_age_seconds: Option<u32>,
}

/// A compiled CORS policy.
#[derive(Debug, Clone)]
pub struct Cors {
    any_origin: bool,
    origins: Vec<String>,
    suffixes: Vec<String>,
    regexes: Vec<Regex>,
    /// GET, HEAD, POST and the configured methods.
    methods: Vec<String>,
    /// `Access-Control-Allow-Methods` of an allowed preflight.
    methods_field: String,
    any_header: bool,
    headers: Vec<String>,
    expose_field: Option<String>,
    allow_credentials: bool,
    max_age: Option<String>,
}

impl CorsSpec {
    pub fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<Cors> {
        let errors_before = errors.messages().len();
        if self.allow_origins.is_empty()
            && self.allow_origin_suffixes.is_empty()
            && self.allow_origin_regexes.is_empty()
        {
            errors.add(field, "needs allow_origins, allow_origin_suffixes or allow_origin_regexes");
        }
        let any_origin = self.allow_origins.iter().any(|origin| origin == "*");
        for (index, origin) in self.allow_origins.iter().enumerate() {
            if origin != "*" && !is_serialized_origin(origin.as_bytes()) {
                let reason = "must be `*`, `null` or scheme://host[:port] in lower case, nothing after it";
                errors.add(format!("{field}.allow_origins[{index}]"), reason);
            }
        }
        if any_origin && self.allow_credentials {
            let reason = "`*` with allow_credentials would let every site read answers sent with the user's cookies";
            errors.add(format!("{field}.allow_credentials"), reason);
        }
        for (index, suffix) in self.allow_origin_suffixes.iter().enumerate() {
            let host_characters =
                suffix.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"-.".contains(&byte));
            if !suffix.starts_with('.') || suffix.len() < 3 || !host_characters {
                let reason = "must be a lower-case domain suffix starting with `.` (e.g. `.example.com`)";
                errors.add(format!("{field}.allow_origin_suffixes[{index}]"), reason);
            }
        }
        let mut regexes = Vec::new();
        for (index, pattern) in self.allow_origin_regexes.iter().enumerate() {
            match compile_regex(pattern, false) {
                Ok(regex) => regexes.push(regex),
                Err(reason) => errors.add(format!("{field}.allow_origin_regexes[{index}]"), &reason),
            }
        }
        let mut methods: Vec<String> = SAFELISTED_METHODS.iter().map(|method| method.to_string()).collect();
        for (index, method) in self.allow_methods.iter().enumerate() {
            if errors.check_method(format!("{field}.allow_methods[{index}]"), method) && !methods.contains(method) {
                methods.push(method.clone());
            }
        }
        let any_header = self.allow_headers.iter().any(|name| name == "*");
        for (kind, names) in [("allow_headers", &self.allow_headers), ("expose_headers", &self.expose_headers)] {
            if self.allow_credentials && names.iter().any(|name| name == "*") {
                // Fetch: with credentials, `*` is a header literally named `*`.
                let reason = "`*` is no wildcard for requests with credentials: list the headers";
                errors.add(format!("{field}.{kind}"), reason);
            }
            for (index, name) in names.iter().enumerate().filter(|(_, name)| *name != "*") {
                errors.check_header_name(format!("{field}.{kind}[{index}]"), name);
            }
        }
        if self.max_age_seconds.is_some_and(|seconds| seconds > MAX_AGE_LIMIT) {
            errors.add(format!("{field}.max_age_seconds"), "must be at most 86400");
        }
        (errors.messages().len() == errors_before).then(|| Cors {
            any_origin,
            origins: self.allow_origins.iter().filter(|origin| *origin != "*").cloned().collect(),
            suffixes: self.allow_origin_suffixes.clone(),
            regexes,
            methods_field: methods.join(", "),
            methods,
            any_header,
            headers: self.allow_headers.iter().filter(|name| *name != "*").cloned().collect(),
            expose_field: (!self.expose_headers.is_empty()).then(|| self.expose_headers.join(", ")),
            allow_credentials: self.allow_credentials,
            max_age: self.max_age_seconds.map(|seconds| seconds.to_string()),
        })
    }
}

/// Why a preflight is refused (the answer is 403, without CORS headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Origin,
    Method(String),
    Header(String),
}

impl Refusal {
    pub fn detail(&self) -> String {
        match self {
            Refusal::Origin => "this origin may not call this API from a browser".into(),
            Refusal::Method(method) => format!("method {method} is not allowed for cross-origin requests"),
            Refusal::Header(name) => format!("request header {name} is not allowed for cross-origin requests"),
        }
    }
}

/// The CORS response fields of one answer: set these, remove the others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsFields {
    pub set: Vec<(&'static str, String)>,
    pub remove: Vec<&'static str>,
}

impl Cors {
    /// Whether `origin` (the request's `Origin`, bytes as sent) may read answers.
    /// Text that is no serialized origin never is, so nothing odd is echoed.
    pub fn allows_origin(&self, origin: &[u8]) -> bool {
        if !is_serialized_origin(origin) {
            return false;
        }
        let Ok(origin) = std::str::from_utf8(origin) else { return false };
        self.any_origin
            || self.origins.iter().any(|allowed| allowed == origin)
            || self.suffixes.iter().any(|suffix| host_of(origin).is_some_and(|host| host.ends_with(suffix.as_str())))
            || self.regexes.iter().any(|regex| regex.is_match(origin))
    }

    /// `Access-Control-Allow-Origin` for an allowed origin: `*` only when any
    /// origin may read and no credentials are involved.
    fn allow_origin_value(&self, origin: &[u8]) -> String {
        if self.any_origin && !self.allow_credentials {
            "*".into()
        } else {
            String::from_utf8_lossy(origin).into_owned()
        }
    }

    /// The answer to a preflight: the fields of a `204`, or why it is refused.
    pub fn preflight(
        &self,
        origin: &[u8],
        method: &[u8],
        requested_headers: Option<&[u8]>,
    ) -> Result<Vec<(&'static str, String)>, Refusal> {
        if !self.allows_origin(origin) {
            return Err(Refusal::Origin);
        }
        if !self.methods.iter().any(|allowed| allowed.as_bytes() == method) {
            return Err(Refusal::Method(escape_bytes(method)));
        }
        let mut names = Vec::new();
        for name in requested_headers.unwrap_or_default().split(|byte| *byte == b',').map(<[u8]>::trim_ascii) {
            if name.is_empty() {
                continue;
            }
            let lower = name.to_ascii_lowercase();
            let token = gateway_common::field::is_header_name(&String::from_utf8_lossy(&lower))
                && std::str::from_utf8(&lower).is_ok();
            let listed = self.headers.iter().any(|allowed| allowed.as_bytes() == lower.as_slice());
            if !token || !(self.any_header || listed) {
                return Err(Refusal::Header(escape_bytes(name)));
            }
            names.push(String::from_utf8_lossy(&lower).into_owned());
        }
        let mut fields = vec![
            (ALLOW_ORIGIN, self.allow_origin_value(origin)),
            ("access-control-allow-methods", self.methods_field.clone()),
        ];
        if !names.is_empty() {
            fields.push(("access-control-allow-headers", names.join(", ")));
        }
        if self.allow_credentials {
            fields.push((ALLOW_CREDENTIALS, "true".into()));
        }
        if let Some(max_age) = &self.max_age {
            fields.push(("access-control-max-age", max_age.clone()));
        }
        fields.push(("vary", "origin".into()));
        Ok(fields)
    }

    /// The CORS fields of an answer to an actual request with this `Origin`
    /// (or none). `Vary: Origin` always: the answer depends on it.
    pub fn response_fields(&self, origin: Option<&[u8]>) -> CorsFields {
        let mut fields = CorsFields::default();
        match origin.filter(|origin| self.allows_origin(origin)) {
            Some(origin) => {
                fields.set.push((ALLOW_ORIGIN, self.allow_origin_value(origin)));
                match self.allow_credentials {
                    true => fields.set.push((ALLOW_CREDENTIALS, "true".into())),
                    false => fields.remove.push(ALLOW_CREDENTIALS),
                }
                match &self.expose_field {
                    Some(expose) => fields.set.push((EXPOSE_HEADERS, expose.clone())),
                    None => fields.remove.push(EXPOSE_HEADERS),
                }
            }
            None => fields.remove.extend([ALLOW_ORIGIN, ALLOW_CREDENTIALS, EXPOSE_HEADERS]),
        }
        fields
    }
}

/// `null`, or `scheme "://" host [ ":" port ]` as browsers serialize an origin
/// (RFC 6454 §6.2): lower-case scheme and host, an IPv6 literal in brackets,
/// nothing after the port.
pub fn is_serialized_origin(origin: &[u8]) -> bool {
    if origin == b"null" {
        return true;
    }
    let Some(separator) = origin.windows(3).position(|window| window == b"://") else { return false };
    let (scheme, rest) = (origin.get(..separator).unwrap_or_default(), origin.get(separator + 3..).unwrap_or_default());
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_lowercase)
        && scheme.iter().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"+.-".contains(byte));
    let (host, port) = match rest.strip_prefix(b"[") {
        Some(literal) => {
            let Some(end) = literal.iter().position(|byte| *byte == b']') else { return false };
            let inside = literal.get(..end).unwrap_or_default();
            let after = literal.get(end + 1..).unwrap_or_default();
            if inside.is_empty()
                || !inside.iter().all(|byte| byte.is_ascii_hexdigit() || *byte == b':' || *byte == b'.')
            {
                return false;
            }
            (&b"[]"[..], after)
        }
        None => match rest.iter().position(|byte| *byte == b':') {
            Some(colon) => (rest.get(..colon).unwrap_or_default(), rest.get(colon..).unwrap_or_default()),
            None => (rest, &b""[..]),
        },
    };
    let host_ok = host == b"[]"
        || (!host.is_empty()
            && host.iter().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"-.".contains(byte)));
    let port_ok = port.is_empty()
        || port
            .strip_prefix(b":")
            .is_some_and(|digits| (1..=5).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit));
    scheme_ok && host_ok && port_ok
}

/// The host of a serialized origin (without the port).
fn host_of(origin: &str) -> Option<&str> {
    let rest = origin.split_once("://")?.1;
    if rest.starts_with('[') {
        return rest.split_inclusive(']').next();
    }
    rest.split(':').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(json: &str) -> Result<Cors, Vec<String>> {
        let spec: CorsSpec = serde_json::from_str(json).unwrap();
        let mut errors = ConfigErrors::new();
        spec.compile("cors", &mut errors).ok_or_else(|| errors.messages().to_vec())
    }

    fn policy() -> Cors {
        compiled(
            r#"{"allow_origins": ["https://app.example.com", "null"], "allow_origin_suffixes": [".example.org"],
                 "allow_origin_regexes": ["https://pr-[0-9]+\\.preview\\.example\\.net"],
                 "allow_methods": ["PUT", "DELETE"], "allow_headers": ["authorization", "content-type"],
                 "expose_headers": ["ratelimit", "x-request-id"], "allow_credentials": true, "max_age_seconds": 600}"#,
        )
        .unwrap()
    }

    #[test]
    fn origins_match_exactly_by_host_suffix_or_whole_regex() {
        let cors = policy();
        for allowed in [
            "https://app.example.com",
            "null",
            "https://a.example.org",
            "http://b.c.example.org:8080",
            "https://pr-42.preview.example.net",
        ] {
            assert!(cors.allows_origin(allowed.as_bytes()), "{allowed}");
        }
        for refused in [
            "https://app.example.com.evil.test",
            "https://evil-example.org",
            "https://example.org",
            "https://APP.example.com",
            "https://app.example.com/",
            "https://app.example.com:",
            "https://pr-42.preview.example.net.evil.test",
            "https://evil.test#.example.org",
            "https://a.example.org\r\nx: y",
            "",
            "*",
            "app.example.com",
        ] {
            assert!(!cors.allows_origin(refused.as_bytes()), "{refused:?}");
        }
        assert!(!cors.allows_origin(b"https://a.example.org\xff"));
        assert!(!cors.allows_origin(b"https://\xffa.example.org"));
    }

    #[test]
    fn an_allowed_preflight_lists_the_policy_and_echoes_the_requested_headers() {
        let fields =
            policy().preflight(b"https://app.example.com", b"PUT", Some(b"Content-Type, authorization")).unwrap();
        assert_eq!(
            fields,
            vec![
                (ALLOW_ORIGIN, "https://app.example.com".to_string()),
                ("access-control-allow-methods", "GET, HEAD, POST, PUT, DELETE".to_string()),
                ("access-control-allow-headers", "content-type, authorization".to_string()),
                (ALLOW_CREDENTIALS, "true".to_string()),
                ("access-control-max-age", "600".to_string()),
                ("vary", "origin".to_string()),
            ]
        );
    }

    #[test]
    fn preflights_outside_the_policy_are_refused_with_the_reason() {
        let cors = policy();
        assert_eq!(cors.preflight(b"https://evil.test", b"GET", None), Err(Refusal::Origin));
        assert_eq!(cors.preflight(b"https://app.example.com", b"PATCH", None), Err(Refusal::Method("PATCH".into())));
        assert_eq!(
            cors.preflight(b"https://app.example.com", b"GET", Some(b"content-type, x-admin")),
            Err(Refusal::Header("x-admin".into()))
        );
        assert_eq!(
            cors.preflight(b"https://app.example.com", b"GET", Some(b"bad header")),
            Err(Refusal::Header("bad header".into()))
        );
        assert!(cors.preflight(b"https://app.example.com", b"GET", Some(b"")).is_ok());
    }

    #[test]
    fn actual_answers_carry_the_policy_or_no_cors_fields_at_all() {
        let cors = policy();
        let allowed = cors.response_fields(Some(b"https://a.example.org"));
        assert_eq!(
            allowed.set,
            vec![
                (ALLOW_ORIGIN, "https://a.example.org".to_string()),
                (ALLOW_CREDENTIALS, "true".to_string()),
                (EXPOSE_HEADERS, "ratelimit, x-request-id".to_string()),
            ]
        );
        assert!(allowed.remove.is_empty());
        for origin in [None, Some(&b"https://evil.test"[..])] {
            let refused = cors.response_fields(origin);
            assert!(refused.set.is_empty());
            assert_eq!(refused.remove, vec![ALLOW_ORIGIN, ALLOW_CREDENTIALS, EXPOSE_HEADERS]);
        }
        let public = compiled(r#"{"allow_origins": ["*"], "allow_headers": ["*"]}"#).unwrap();
        assert_eq!(public.response_fields(Some(b"https://any.test")).set, vec![(ALLOW_ORIGIN, "*".to_string())]);
        let preflight = public.preflight(b"https://any.test", b"GET", Some(b"x-anything")).unwrap();
        assert!(preflight.contains(&("access-control-allow-headers", "x-anything".to_string())));
    }

    #[test]
    fn unsafe_or_malformed_policies_are_refused_naming_the_field() {
        for (json, field) in [
            (r#"{}"#, "cors: needs allow_origins"),
            (r#"{"allow_origins": ["*"], "allow_credentials": true}"#, "cors.allow_credentials"),
            (
                r#"{"allow_origins": ["https://a.test"], "allow_headers": ["*"], "allow_credentials": true}"#,
                "cors.allow_headers",
            ),
            (r#"{"allow_origins": ["https://a.test/"]}"#, "cors.allow_origins[0]"),
            (r#"{"allow_origins": ["https://A.test"]}"#, "cors.allow_origins[0]"),
            (r#"{"allow_origin_suffixes": ["example.com"]}"#, "cors.allow_origin_suffixes[0]"),
            (r#"{"allow_origin_regexes": ["("]}"#, "cors.allow_origin_regexes[0]"),
            (r#"{"allow_origins": ["null"], "allow_methods": ["get"]}"#, "cors.allow_methods[0]"),
            (
                r#"{"allow_origins": ["null"], "expose_headers": ["*"], "allow_credentials": true}"#,
                "cors.expose_headers",
            ),
            (r#"{"allow_origins": ["null"], "expose_headers": ["X-Upper"]}"#, "cors.expose_headers[0]"),
            (r#"{"allow_origins": ["null"], "max_age_seconds": 86401}"#, "cors.max_age_seconds"),
        ] {
            let errors = compiled(json).unwrap_err();
            assert!(errors.iter().any(|error| error.starts_with(field)), "{json}: {errors:?}");
        }
    }

    #[test]
    fn serialized_origins() {
        for good in ["https://a.test", "http://127.0.0.1:8080", "https://[2001:db8::1]:443", "null", "app+x://h"] {
            assert!(is_serialized_origin(good.as_bytes()), "{good}");
        }
        for bad in [
            "https://a.test/",
            "https://a.test:99999x",
            "https://",
            "://a",
            "HTTPS://a.test",
            "https://[::1",
            "https://a b",
            "https://a.test?x",
            "https://user@a.test",
        ] {
            assert!(!is_serialized_origin(bad.as_bytes()), "{bad}");
        }
    }
}
