//! A small HTTP client over real sockets: HTTP/1.1 or HTTP/2 with prior knowledge
//! (h2c), one connection per request so every request is independent.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

#[derive(Debug, Clone)]
pub struct RequestBuilder {
    addr: SocketAddr,
    method: String,
    path: String,
    authority: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    protocol: Protocol,
    timeout: Duration,
}

impl RequestBuilder {
    pub fn new(addr: SocketAddr, method: &str, path: &str) -> Self {
        Self {
            addr,
            method: method.to_string(),
            path: path.to_string(),
            authority: None,
            headers: Vec::new(),
            body: Vec::new(),
            protocol: Protocol::Http1,
            timeout: Duration::from_secs(10),
        }
    }

    /// Adds a header; call again with the same name to repeat it.
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.to_string(), value.as_ref().to_vec()));
        self
    }

    /// `Host` (HTTP/1.1) or `:authority` (HTTP/2).
    pub fn authority(mut self, authority: &str) -> Self {
        self.authority = Some(authority.to_string());
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn http2(mut self) -> Self {
        self.protocol = Protocol::Http2;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends the request and waits for the whole response.
    pub fn send(self) -> Response {
        crate::runtime().block_on(self.send_async())
    }

    pub async fn send_async(self) -> Response {
        let timeout = self.timeout;
        let description = format!("{} {} ({:?})", self.method, self.path, self.protocol);
        match tokio::time::timeout(timeout, self.exchange()).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => panic!("{description}: {error}"),
            Err(_) => panic!("{description}: no response within {timeout:?}"),
        }
    }

    async fn exchange(self) -> Result<Response, Box<dyn std::error::Error + Send + Sync>> {
        let stream = tokio::net::TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let io = TokioIo::new(stream);
        let authority = self.authority.clone().unwrap_or_else(|| format!("gateway.test:{}", self.addr.port()));
        let uri = match self.protocol {
            Protocol::Http1 => self.path.clone(),
            Protocol::Http2 => format!("http://{authority}{}", self.path),
        };
        let mut request = hyper::Request::builder().method(self.method.as_str()).uri(uri);
        if self.protocol == Protocol::Http1 {
            request = request.header("host", authority.as_str());
        }
        for (name, value) in &self.headers {
            request = request.header(HeaderName::from_bytes(name.as_bytes())?, HeaderValue::from_bytes(value)?);
        }
        let request = request.body(Full::new(Bytes::from(self.body)))?;
        let response = match self.protocol {
            Protocol::Http1 => {
                let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(connection);
                sender.send_request(request).await?
            }
            Protocol::Http2 => {
                let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(connection);
                sender.send_request(request).await?
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes().to_vec();
        let headers =
            parts.headers.iter().map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec())).collect();
        Ok(Response { status: parts.status.as_u16(), headers, body })
    }
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A whole HTTP/1.1 response as read from a connection until it closed
    /// (header names lower-cased, a chunked body decoded).
    pub fn from_http1(raw: &[u8]) -> Option<Response> {
        let end = raw.windows(4).position(|window| window == b"\r\n\r\n")?;
        let head = std::str::from_utf8(raw.get(..end)?).ok()?;
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers: Vec<(String, Vec<u8>)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().as_bytes().to_vec()))
            .collect();
        let mut body = raw.get(end + 4..)?.to_vec();
        if headers.iter().any(|(name, value)| name == "transfer-encoding" && value.eq_ignore_ascii_case(b"chunked")) {
            body = dechunk(&body)?;
        }
        Some(Response { status, headers, body })
    }

    /// The first value of a header, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_all(name).into_iter().next()
    }

    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): status {} {}", self.status, self.text()))
    }

    /// The request as the echo upstream saw it.
    pub fn echo(&self) -> Echo {
        Echo(self.json())
    }
}

/// The echo upstream's description of the request it received.
#[derive(Debug, Clone)]
pub struct Echo(pub Value);

impl Echo {
    pub fn upstream(&self) -> &str {
        self.0["upstream"].as_str().unwrap_or_default()
    }
    pub fn path(&self) -> &str {
        self.0["path"].as_str().unwrap_or_default()
    }
    pub fn query(&self) -> Option<&str> {
        self.0["query"].as_str()
    }
    pub fn method(&self) -> &str {
        self.0["method"].as_str().unwrap_or_default()
    }
    /// First value of a request header as the upstream received it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.0["headers"][name][0].as_str()
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.0["headers"][name]
            .as_array()
            .map(|values| values.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    }
}

/// Sends every request with at most `concurrency` in flight; responses in order.
pub fn send_all(requests: Vec<RequestBuilder>, concurrency: usize) -> Vec<Response> {
    crate::runtime().block_on(async {
        let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let handles: Vec<_> = requests
            .into_iter()
            .map(|request| {
                let limit = std::sync::Arc::clone(&limit);
                tokio::spawn(async move {
                    let _permit = limit.acquire_owned().await.expect("semaphore open");
                    request.send_async().await
                })
            })
            .collect();
        let mut responses = Vec::with_capacity(handles.len());
        for handle in handles {
            responses.push(handle.await.expect("request task"));
        }
        responses
    })
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|window| window == b"\r\n")?;
        let size_line = std::str::from_utf8(rest.get(..line_end)?).ok()?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(body);
        }
        let after = rest.get(line_end + 2..)?;
        body.extend_from_slice(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}
