//! The echo upstream: answers every request with a JSON description of what it
//! received, unless told otherwise, and counts what it served.
//!
//! Per request, the client can steer the answer with headers (the echo strips
//! none of them, so tests also see them echoed):
//! - `x-echo-status: 503` - the status;
//! - `x-echo-delay-ms: 300` - wait before answering;
//! - `x-echo-header: name: value` (repeatable) - extra response headers;
//! - `x-echo-body-size: 65536` - a body of that many `x` bytes instead of JSON.
//!
//! Per path, a test can script the answer with [`EchoUpstream::script`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};

/// A scripted answer for one path.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
    pub delay: Duration,
    /// The answer to a conditional request (`If-None-Match`/`If-Modified-Since`),
    /// if it differs.
    pub when_conditional: Option<Box<Reply>>,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self { status, ..Self::default() }
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
    /// Answers conditional requests with `reply` instead.
    pub fn when_conditional(mut self, reply: Reply) -> Self {
        self.when_conditional = Some(Box::new(reply));
        self
    }
}

#[derive(Default)]
struct State {
    name: String,
    served: AtomicUsize,
    served_by_path: Mutex<HashMap<String, usize>>,
    scripts: Mutex<HashMap<String, Reply>>,
}

/// An echo upstream listening on a free loopback port. Its task ends with the
/// test process (it runs in the harness runtime).
#[derive(Clone)]
pub struct EchoUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl EchoUpstream {
    /// Starts an upstream that reports itself as `name` in every answer.
    pub fn start(name: &str) -> Self {
        crate::runtime().block_on(Self::start_async(name, 0))
    }

    pub async fn start_async(name: &str, port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let state = Arc::new(State { name: name.to_string(), ..State::default() });
        let accept_state = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&accept_state);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| handle(Arc::clone(&state), request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Requests served so far.
    pub fn served(&self) -> usize {
        self.state.served.load(Ordering::SeqCst)
    }

    /// Requests served so far for one path (query string excluded).
    pub fn served_path(&self, path: &str) -> usize {
        self.state.served_by_path.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// From now on, describe requests for `path` again (undo `script`).
    pub fn unscript(&self, path: &str) {
        self.state.scripts.lock().unwrap().remove(path);
    }

    /// From now on, answer requests for `path` (query excluded) with `reply`.
    pub fn script(&self, path: &str, reply: Reply) {
        self.state.scripts.lock().unwrap().insert(path.to_string(), reply);
    }
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|collected| collected.to_bytes()).unwrap_or_default();
    let path = parts.uri.path().to_string();
    state.served.fetch_add(1, Ordering::SeqCst);
    *state.served_by_path.lock().unwrap().entry(path.clone()).or_default() += 1;

    let header_text = |name: &str| parts.headers.get(name).and_then(|value| value.to_str().ok());
    let script = state.scripts.lock().unwrap().get(&path).cloned();
    let mut reply = script.unwrap_or_else(|| Reply::status(200));
    let conditional = parts.headers.contains_key("if-none-match") || parts.headers.contains_key("if-modified-since");
    if let (true, Some(answer)) = (conditional, reply.when_conditional.take()) {
        reply = *answer;
    }
    if let Some(status) = header_text("x-echo-status").and_then(|s| s.parse().ok()) {
        reply.status = status;
    }
    if let Some(ms) = header_text("x-echo-delay-ms").and_then(|s| s.parse().ok()) {
        reply.delay = Duration::from_millis(ms);
    }
    for value in parts.headers.get_all("x-echo-header") {
        if let Some((name, value)) = value.to_str().ok().and_then(|v| v.split_once(':')) {
            reply.headers.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    if let Some(size) = header_text("x-echo-body-size").and_then(|s| s.parse::<usize>().ok()) {
        reply.body = Some(vec![b'x'; size]);
    }
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }

    let (body, is_json) = match reply.body {
        Some(body) => (body, false),
        None => {
            let mut headers = Map::new();
            for (name, value) in &parts.headers {
                let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
                match headers.get_mut(name.as_str()) {
                    Some(Value::Array(values)) => values.push(text.into()),
                    _ => {
                        headers.insert(name.as_str().to_string(), Value::Array(vec![text.into()]));
                    }
                }
            }
            let description = json!({
                "upstream": state.name,
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "query": parts.uri.query(),
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            (serde_json::to_vec(&description).unwrap_or_default(), true)
        }
    };
    let mut response = Response::builder().status(reply.status);
    if is_json {
        response = response.header("content-type", "application/json");
    }
    response = response.header("x-upstream", state.name.as_str());
    for (name, value) in &reply.headers {
        response = response.header(name.as_str(), value.as_str());
    }
    Ok(response.body(Full::new(Bytes::from(body))).unwrap_or_else(|_| {
        let mut fallback = Response::new(Full::new(Bytes::from_static(b"bad scripted reply")));
        *fallback.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
        fallback
    }))
}
