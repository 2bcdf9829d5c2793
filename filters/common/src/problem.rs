//! Denials as users see them: an RFC 9457 `application/problem+json` body carrying
//! the request id, or a gRPC status for gRPC requests.

use crate::field;
use crate::host::{self, HostResult};
use crate::platform::Host;
use crate::request::{BadRequest, RequestHeaders};
use crate::verdict::Reply;

/// gRPC status codes used by the filters.
pub mod grpc {
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const NOT_FOUND: u32 = 5;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// A denial the filter answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: u32,
    /// Short, stable slug, used in the problem `type` URN (e.g. `no-route`).
    pub kind: &'static str,
    /// Human summary of the problem type.
    pub title: &'static str,
    /// What exactly was wrong with this request. Never echo credentials here.
    pub detail: String,
    /// gRPC status for `application/grpc*` requests.
    pub grpc_status: u32,
    /// Extra response headers such as `WWW-Authenticate` or `Retry-After`.
    pub headers: Vec<(String, String)>,
}

impl Problem {
    pub fn new(status: u32, kind: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            title,
            detail: detail.into(),
            grpc_status: grpc_status_for_http(status),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The problem+json document (RFC 9457), with `request_id` when known.
    pub fn body(&self, request_id: Option<&str>) -> Vec<u8> {
        let mut document = serde_json::Map::new();
        document.insert("type".into(), format!("urn:wasm-gateway:problem:{}", self.kind).into());
        document.insert("title".into(), self.title.into());
        document.insert("status".into(), self.status.into());
        document.insert("detail".into(), self.detail.clone().into());
        if let Some(id) = request_id {
            document.insert("request_id".into(), id.into());
        }
        serde_json::to_vec(&document).unwrap_or_default()
    }

    /// Sends the denial as the local response to the current request.
    pub fn send_on(&self, host: &impl Host, request: &RequestFacts) -> HostResult<()> {
        let reply = self.reply(request);
        let headers: Vec<(&str, &str)> =
            reply.headers.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
        host.send_local_response(reply.status, None, &headers, &reply.body, reply.grpc_status)
    }

    /// The local reply for this request: problem+json, or for gRPC requests a
    /// status whose detail Envoy sends as grpc-message (it percent-encodes it as
    /// gRPC specifies; encoding here too would show gRPC clients `%250D`).
    pub fn reply(&self, request: &RequestFacts) -> Reply {
        let mut headers = self.headers.clone();
        if request.is_grpc {
            return Reply {
                grpc_status: Some(self.grpc_status),
                ..Reply::new(self.status, headers, self.detail.as_bytes().to_vec())
            };
        }
        headers.push(("content-type".to_string(), "application/problem+json".to_string()));
        Reply::new(self.status, headers, self.body(request.request_id.as_deref()))
    }
}

/// The answer to a request no module can judge (see `request.rs`).
pub fn bad_request(reason: BadRequest) -> Problem {
    Problem::new(400, "bad-request", "Bad Request", reason.detail())
}

/// The gRPC status that best matches an HTTP denial status.
pub fn grpc_status_for_http(status: u32) -> u32 {
    match status {
        400 => grpc::INVALID_ARGUMENT,
        401 => grpc::UNAUTHENTICATED,
        403 => grpc::PERMISSION_DENIED,
        404 | 410 => grpc::NOT_FOUND,
        429 => grpc::RESOURCE_EXHAUSTED,
        _ => grpc::UNAVAILABLE,
    }
}

/// What every denial needs to know about the request, read once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    pub is_grpc: bool,
    pub request_id: Option<String>,
}

impl RequestFacts {
    pub fn from_values(content_type: Option<&[u8]>, request_id: Option<&[u8]>) -> Self {
        Self {
            is_grpc: content_type.is_some_and(is_grpc_content_type),
            request_id: request_id
                .filter(|id| id.len() <= 128 && field::is_field_value(id))
                .and_then(|id| std::str::from_utf8(id).ok())
                .map(str::to_owned),
        }
    }

    /// The facts of a checked request.
    pub fn of(request: &RequestHeaders) -> Self {
        Self::from_values(request.first("content-type"), request.first("x-request-id"))
    }

    /// The facts of raw header pairs (a request that failed its checks).
    pub fn from_pairs(pairs: &crate::request::HeaderPairs) -> Self {
        Self::from_values(pairs.first("content-type"), pairs.first("x-request-id"))
    }

    /// Reads `content-type` and `x-request-id` of the current request.
    pub fn read() -> Self {
        let content_type = host::header(host::MapType::HttpRequestHeaders, "content-type").ok().flatten();
        let request_id = host::header(host::MapType::HttpRequestHeaders, "x-request-id").ok().flatten();
        Self::from_values(content_type.as_deref(), request_id.as_deref())
    }
}

pub fn is_grpc_content_type(value: &[u8]) -> bool {
    value.len() >= 16 && value.get(..16).is_some_and(|start| start.eq_ignore_ascii_case(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_problem_json_with_request_id() {
        let problem = Problem::new(404, "no-route", "No route", "no route matched GET /x");
        let body: serde_json::Value = serde_json::from_slice(&problem.body(Some("abc"))).unwrap();
        assert_eq!(body["status"], 404);
        assert_eq!(body["type"], "urn:wasm-gateway:problem:no-route");
        assert_eq!(body["request_id"], "abc");
    }

    #[test]
    fn grpc_is_detected_by_content_type_prefix() {
        assert!(is_grpc_content_type(b"application/grpc"));
        assert!(is_grpc_content_type(b"application/grpc+proto"));
        assert!(is_grpc_content_type(b"Application/GRPC-web"));
        assert!(!is_grpc_content_type(b"application/json"));
        assert!(!is_grpc_content_type(b"\xff\xfe"));
    }
}
