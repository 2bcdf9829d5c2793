//! The composition logic: matching a composite endpoint, rendering part paths,
//! judging part answers, merging them and their Cache-Control. Plain Rust.

use gateway_common::request::RequestHeaders;
use serde_json::{Map, Value};

use crate::config::{Endpoint, Missing, Part, Piece};

/// A path parameter: its name and the bytes it stands for (percent-decoded as a
/// path segment: `+` stays a `+`).
pub type Params = Vec<(String, Vec<u8>)>;

/// The index of the matching endpoint and its path parameters.
pub fn match_endpoint(endpoints: &[Endpoint], request: &RequestHeaders) -> Option<(usize, Params)> {
    let method = request.method();
    let segments: Vec<&str> = request.path().split('/').skip(1).collect();
    endpoints.iter().enumerate().find_map(|(index, endpoint)| {
        if endpoint.method.as_bytes() != method || endpoint.segments.len() != segments.len() {
            return None;
        }
        let mut params = Vec::new();
        for (pattern, segment) in endpoint.segments.iter().zip(&segments) {
            match pattern {
                Ok(literal) if literal == segment => {}
                Ok(_) => return None,
                Err(name) if !segment.is_empty() => {
                    let decoded = gateway_common::request::percent_decode_path(segment.as_bytes());
                    params.push((name.clone(), decoded));
                }
                Err(_) => return None,
            }
        }
        Some((index, params))
    })
}

/// Percent-encodes everything but ASCII letters, digits, `-`, `_` and `~`: a value
/// can never add a path segment (`/`) or start a query (`?`). Dot segments are
/// refused by [`render_path`]: RFC 3986 normalizers decode `%2E` and then remove
/// dot segments, so encoding the dot alone would not stop a climb.
pub fn encode_component(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &byte in value {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A request value that would become a dot segment of a part's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DotSegment {
    /// The template placeholder (`userId`, `query.page`, `header.x-tenant`).
    pub placeholder: String,
}

/// The part's request path with parameters, query values and headers encoded in.
/// A missing query parameter or header renders empty. A value of `.` or `..` in
/// the path (before the template's `?`) is refused: it would climb to another
/// backend route at the first normalizing hop.
pub fn render_path(part: &Part, params: &Params, request: &RequestHeaders) -> Result<String, DotSegment> {
    let mut path = String::new();
    for piece in &part.template {
        let (placeholder, value): (String, Vec<u8>) = match piece {
            Piece::Literal(text) => {
                path.push_str(text);
                continue;
            }
            Piece::PathParam(name) => {
                let value = params.iter().find(|(param, _)| param == name).map(|(_, value)| value.clone());
                (name.clone(), value.unwrap_or_default())
            }
            Piece::Query(name) => {
                (format!("query.{name}"), request.query_values(name).into_iter().next().unwrap_or_default())
            }
            Piece::Header(name) => (format!("header.{name}"), request.first(name).unwrap_or_default().to_vec()),
        };
        let in_path = !path.contains('?');
        if in_path && matches!(value.as_slice(), b"." | b"..") {
            return Err(DotSegment { placeholder });
        }
        path.push_str(&encode_component(&value));
    }
    // Values next to each other or to literal dots (`{a}{b}`, `.{a}`) can still
    // form a dot segment: judge the rendered path as a normalizer would.
    let path_only = path.split('?').next().unwrap_or_default();
    let dot_segment = path_only.split('/').any(|segment| {
        matches!(gateway_common::request::percent_decode_path(segment.as_bytes()).as_slice(), b"." | b"..")
    });
    if dot_segment {
        return Err(DotSegment { placeholder: "(path)".to_string() });
    }
    Ok(path)
}

/// How one part ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok { json: Value, cache_control: Option<String> },
    Error(String),
    Timeout,
}

/// Whether a failed call is the deadline's doing. Envoy answers a timed-out call with no headers
/// or its own 504, and its timer can fire up to one event-loop iteration early by the wall clock
/// (libevent measures from the time it cached when the iteration began), so a failure that comes
/// within a fifth of the deadline's end (5 to 100 ms) counts as a timeout; an earlier one is an error.
pub fn ran_into_deadline(status: Option<u16>, elapsed_ms: u64, timeout_ms: u64) -> bool {
    let early_timer_slack = (timeout_ms / 5).clamp(5, 100);
    matches!(status, None | Some(504)) && elapsed_ms + early_timer_slack >= timeout_ms
}

/// Judges a part's answer: 2xx with a JSON body within the size limit.
pub fn judge(part: &Part, status: Option<u16>, cache_control: Option<String>, body: &[u8], timed_out: bool) -> Outcome {
    let Some(status) = status else {
        return if timed_out { Outcome::Timeout } else { Outcome::Error("no response".into()) };
    };
    if !(200..300).contains(&status) {
        return Outcome::Error(format!("HTTP {status}"));
    }
    if body.len() > part.spec.max_bytes {
        return Outcome::Error(format!("body larger than {} bytes", part.spec.max_bytes));
    }
    let Ok(mut json) = serde_json::from_slice::<Value>(body) else {
        return Outcome::Error("body is not JSON".into());
    };
    if let (Some(fields), Value::Object(object)) = (&part.spec.fields, &mut json) {
        object.retain(|key, _| fields.contains(key));
    }
    if part.spec.key.is_none() && !json.is_object() {
        return Outcome::Error("merged at the root but not a JSON object".into());
    }
    Outcome::Ok { json, cache_control }
}

/// The composite answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// 200 with the merged document.
    Merged { body: Vec<u8>, cache_control: String, partial: Vec<String> },
    /// A required part failed: 502 (error) or 504 (timeout), naming it.
    Failed { status: u32, part: String, reason: String },
}

/// Merges the outcomes (in part order) into the composite answer.
pub fn compose(endpoint: &Endpoint, outcomes: &[Outcome], credentials_forwarded: bool) -> Answer {
    let mut document = Map::new();
    let mut partial = Vec::new();
    let mut cache_controls: Vec<Option<String>> = Vec::new();
    let mut total = 0usize;
    for (part, outcome) in endpoint.parts.iter().zip(outcomes) {
        let name = part.spec.name.clone();
        let failure = match outcome {
            Outcome::Ok { json, cache_control } => {
                total += json.to_string().len();
                if total > endpoint.max_total_bytes {
                    Some((502, format!("composite larger than {} bytes", endpoint.max_total_bytes)))
                } else {
                    match (&part.spec.key, json) {
                        (Some(key), value) => {
                            document.insert(key.clone(), value.clone());
                        }
                        (None, Value::Object(members)) => {
                            for (key, value) in members {
                                document.insert(key.clone(), value.clone());
                            }
                        }
                        (None, _) => {}
                    }
                    cache_controls.push(cache_control.clone());
                    None
                }
            }
            Outcome::Error(reason) => Some((502, reason.clone())),
            Outcome::Timeout => Some((504, format!("no answer within {} ms", part.spec.timeout_ms))),
        };
        if let Some((status, reason)) = failure {
            if part.spec.required {
                return Answer::Failed { status, part: name, reason };
            }
            if let (Missing::Null, Some(key)) = (endpoint.missing, &part.spec.key) {
                document.insert(key.clone(), Value::Null);
            }
            partial.push(name);
        }
    }
    if !partial.is_empty() {
        document.insert("_partial".into(), Value::Array(partial.iter().cloned().map(Value::String).collect()));
        // A partial answer must not be reused as if it were whole.
        cache_controls.push(None);
    }
    let body = serde_json::to_vec(&Value::Object(document)).unwrap_or_default();
    Answer::Merged { body, cache_control: merge_cache_control(&cache_controls, credentials_forwarded), partial }
}

/// The most restrictive Cache-Control of the parts: `no-store` if any part has
/// none, has `no-store`, or gives no lifetime; otherwise the shortest lifetime,
/// `private` if any part is private or credentials/identity were forwarded.
pub fn merge_cache_control(parts: &[Option<String>], credentials_forwarded: bool) -> String {
    let mut lifetime = u64::MAX;
    let mut private = credentials_forwarded;
    let mut no_cache = false;
    for value in parts {
        let Some(value) = value else { return "no-store".into() };
        let mut part_lifetime = None;
        let mut s_maxage = None;
        for directive in value.split(',') {
            let (name, argument) = match directive.split_once('=') {
                Some((name, argument)) => (name.trim().to_ascii_lowercase(), Some(argument.trim().trim_matches('"'))),
                None => (directive.trim().to_ascii_lowercase(), None),
            };
            match name.as_str() {
                "no-store" => return "no-store".into(),
                "private" => private = true,
                "no-cache" => no_cache = true,
                "max-age" => part_lifetime = argument.and_then(|a| a.parse::<u64>().ok()).or(Some(0)),
                "s-maxage" => s_maxage = argument.and_then(|a| a.parse::<u64>().ok()).or(Some(0)),
                _ => {}
            }
        }
        let Some(part_lifetime) = s_maxage.or(part_lifetime) else { return "no-store".into() };
        lifetime = lifetime.min(part_lifetime);
    }
    if parts.is_empty() {
        return "no-store".into();
    }
    let mut directives = vec![if private { "private".to_string() } else { "public".to_string() }];
    if no_cache {
        directives.push("no-cache".into());
    }
    directives.push(format!("max-age={lifetime}"));
    directives.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AggregateConfig;
    use serde_json::json;

    fn endpoints(value: Value) -> Vec<Endpoint> {
        let config: AggregateConfig = gateway_common::config::parse_json(value.to_string().as_bytes()).unwrap();
        config.compile().unwrap()
    }

    fn dashboard() -> Vec<Endpoint> {
        endpoints(json!({"endpoints": [{"name": "dashboard", "path": "/dashboard/{userId}", "parts": [
            {"name": "user", "cluster": "users", "path": "/users/{userId}?tenant={header.x-tenant}", "key": "user", "fields": ["id"]},
            {"name": "orders", "cluster": "orders", "path": "/orders?user={userId}&page={query.page}", "key": "orders", "required": false},
            {"name": "flags", "cluster": "flags", "path": "/flags", "required": false}
        ]}]}))
    }

    fn request(pairs: &[(&str, &str)]) -> RequestHeaders {
        gateway_common::testing::request_text(pairs)
    }

    #[test]
    fn a_failure_near_the_deadline_is_a_timeout_even_when_envoys_timer_fires_early() {
        // CI once counted an optional part's 500 ms deadline as an error: the old slack was 5 ms.
        assert!(ran_into_deadline(None, 490, 500));
        assert!(ran_into_deadline(Some(504), 420, 500));
        assert!(ran_into_deadline(None, 900, 500));
        assert!(!ran_into_deadline(None, 300, 500), "a reset well before the deadline is an error");
        assert!(!ran_into_deadline(Some(504), 10, 500), "an upstream's quick 504 is an error");
        assert!(!ran_into_deadline(Some(503), 500, 500), "only no answer or a 504 can be the deadline");
        assert!(ran_into_deadline(None, 0, 4), "tiny deadlines keep a 5 ms slack");
    }

    #[test]
    fn matching_and_safe_rendering() {
        let endpoints = dashboard();
        let r = request(&[(":method", "GET"), (":path", "/dashboard/..%2Fadmin?page=2"), ("x-tenant", "a b")]);
        let (index, params) = match_endpoint(&endpoints, &r).unwrap();
        let endpoint = &endpoints[index];
        assert_eq!(params, vec![("userId".to_string(), b"../admin".to_vec())]);
        assert_eq!(render_path(&endpoint.parts[0], &params, &r).unwrap(), "/users/%2E%2E%2Fadmin?tenant=a%20b");
        assert_eq!(render_path(&endpoint.parts[1], &params, &r).unwrap(), "/orders?user=%2E%2E%2Fadmin&page=2");
        assert!(match_endpoint(&endpoints, &request(&[(":method", "POST"), (":path", "/dashboard/1")])).is_none());
        assert!(match_endpoint(&endpoints, &request(&[(":method", "GET"), (":path", "/dashboard/1/x")])).is_none());
        assert!(match_endpoint(&endpoints, &request(&[(":method", "GET"), (":path", "/dashboard/")])).is_none());
    }

    #[test]
    fn dot_segments_are_refused_and_plus_is_literal() {
        let endpoints = dashboard();
        for dots in ["..", ".", "%2e%2e", "%2E", ".%2e", "%2e"] {
            let r = request(&[(":method", "GET"), (":path", &format!("/dashboard/{dots}"))]);
            let (index, params) = match_endpoint(&endpoints, &r).unwrap();
            let refused = render_path(&endpoints[index].parts[0], &params, &r).unwrap_err();
            assert_eq!(refused.placeholder, "userId", "{dots}");
        }
        // After the `?` a dot is only a query value.
        let r = request(&[(":method", "GET"), (":path", "/dashboard/7?page=..")]);
        let (index, params) = match_endpoint(&endpoints, &r).unwrap();
        assert_eq!(render_path(&endpoints[index].parts[1], &params, &r).unwrap(), "/orders?user=7&page=%2E%2E");
        let r = request(&[(":method", "GET"), (":path", "/dashboard/john+tag@x.com")]);
        let (index, params) = match_endpoint(&endpoints, &r).unwrap();
        assert_eq!(params[0].1, b"john+tag@x.com");
        assert_eq!(
            render_path(&endpoints[index].parts[0], &params, &r).unwrap(),
            "/users/john%2Btag%40x%2Ecom?tenant="
        );
        // Bytes that are not UTF-8 keep their identity.
        let r = request(&[(":method", "GET"), (":path", "/dashboard/%FF")]);
        let (index, params) = match_endpoint(&endpoints, &r).unwrap();
        assert_eq!(render_path(&endpoints[index].parts[0], &params, &r).unwrap(), "/users/%FF?tenant=");
    }

    #[test]
    fn merging_partial_answers_and_failures() {
        let endpoints = dashboard();
        let endpoint = &endpoints[0];
        let user = judge(&endpoint.parts[0], Some(200), Some("max-age=60".into()), br#"{"id":7,"secret":"x"}"#, false);
        let orders = judge(&endpoint.parts[1], Some(503), None, b"", false);
        let flags = judge(&endpoint.parts[2], Some(200), Some("public, max-age=30".into()), br#"{"beta":true}"#, false);
        let Answer::Merged { body, cache_control, partial } = compose(endpoint, &[user.clone(), orders, flags], false)
        else {
            panic!()
        };
        let document: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(document, json!({"user": {"id": 7}, "beta": true, "_partial": ["orders"]}));
        assert_eq!(partial, vec!["orders".to_string()]);
        assert_eq!(cache_control, "no-store", "a partial answer is never cached");
        let failed = compose(endpoint, &[Outcome::Timeout, user.clone(), user], false);
        assert_eq!(
            failed,
            Answer::Failed { status: 504, part: "user".into(), reason: "no answer within 2000 ms".into() }
        );
        assert!(matches!(judge(&endpoint.parts[0], Some(200), None, b"<html>", false), Outcome::Error(_)));
        assert_eq!(judge(&endpoint.parts[0], None, None, b"", true), Outcome::Timeout);
    }

    #[test]
    fn cache_control_is_the_most_restrictive() {
        let cc = |values: &[Option<&str>], credentials: bool| {
            merge_cache_control(&values.iter().map(|v| v.map(str::to_owned)).collect::<Vec<_>>(), credentials)
        };
        assert_eq!(cc(&[Some("max-age=60"), Some("public, max-age=30")], false), "public, max-age=30");
        assert_eq!(cc(&[Some("max-age=60"), None], false), "no-store");
        assert_eq!(cc(&[Some("max-age=60"), Some("no-store")], false), "no-store");
        assert_eq!(cc(&[Some("private, max-age=60")], false), "private, max-age=60");
        assert_eq!(cc(&[Some("max-age=60")], true), "private, max-age=60");
        assert_eq!(cc(&[Some("public")], false), "no-store", "no lifetime");
        assert_eq!(cc(&[Some("s-maxage=10, max-age=60")], false), "public, max-age=10");
    }

    #[test]
    fn config_errors_name_fields() {
        let cases = [
            (
                json!({"endpoints": [{"name": "d", "path": "/d/{id}", "parts": [{"name": "p", "cluster": "c", "path": "/x/{nope}"}]}]}),
                "endpoints[0].parts[0].path",
            ),
            (
                json!({"endpoints": [{"name": "d", "path": "/d", "parts": [{"name": "a", "cluster": "c", "path": "/a", "key": "k"}, {"name": "b", "cluster": "c", "path": "/b", "key": "k"}]}]}),
                "endpoints[0].parts[1].key",
            ),
            (
                json!({"endpoints": [{"name": "d", "path": "/d", "parts": [{"name": "a", "cluster": "c", "path": "/a", "timeout": 5}]}]}),
                "endpoints[0].parts[0]",
            ),
            (
                json!({"endpoints": [{"name": "d", "path": "/d", "parts": [{"name": "a", "cluster": "c", "path": "/a", "authority": "h\r\nx: y"}]}]}),
                "endpoints[0].parts[0].authority",
            ),
            (
                json!({"endpoints": [{"name": "d", "path": "/d", "parts": [{"name": "a", "cluster": "c\n", "path": "/a"}]}]}),
                "endpoints[0].parts[0].cluster",
            ),
            (
                json!({"endpoints": [{"name": "d", "path": "/d", "parts": [{"name": "a", "cluster": "c", "path": "/a b"}]}]}),
                "endpoints[0].parts[0].path",
            ),
            (
                json!({"endpoints": [{"name": "d", "path": "/d", "parts": [{"name": "a\r\nset-cookie: x=1", "cluster": "c", "path": "/a"}]}]}),
                "endpoints[0].parts[0].name",
            ),
            (
                json!({"endpoints": [{"name": "d", "path": "/d", "parts": [{"name": "a", "cluster": "c", "path": "/a\u{0}"}]}]}),
                "endpoints[0].parts[0].path",
            ),
        ];
        for (value, field) in cases {
            let errors = match gateway_common::config::parse_json::<AggregateConfig>(value.to_string().as_bytes()) {
                Ok(config) => config.compile().unwrap_err(),
                Err(errors) => errors,
            };
            assert!(errors.messages().iter().any(|m| m.starts_with(field)), "{value}: {errors:?}");
        }
    }
}
