//! An HTTP filter that does nothing: `make bench` loads it to measure what the
//! Wasm boundary alone costs (VM dispatch of the request and response callbacks).
//!
//! Configured with a number (`"1024"`), it answers every request itself with a
//! `200` of that many bytes, with the header fields of a cache hit: the floor of
//! any module that answers from Wasm (one request callback, one local reply),
//! against which cache hits are compared.
//!
//! Configured with `"trap"`, a request carrying `x-trap` traps the VM (what a
//! panic does): the integration tests measure Envoy's `failure_policy` with it.
//!
//! Configured with `"calls:<call>,<call>,..."`, it makes exactly those host calls on
//! every request and nothing else: the floor of a module whose request costs those
//! calls (`make bench` lists each module's budget-test calls). A call is
//! `header_pairs`, `header:<name>`, `set_header:<name>[=<value>]`, `remove_header:<name>`,
//! `property:<a.b>`, `set_property:<name>`, `now`, `shared_get:<key>[=<bytes>]` (the
//! key holds that many bytes, written at configure time),
//! `shared_set:<key>`, `metric` (a counter increment), or one of the header calls
//! prefixed with `response.` to run on the response headers instead; `reply:<bytes>`
//! answers locally after the calls, as a number alone does. `spin:<rounds>` is no
//! host call but that many rounds of dependent integer arithmetic: a known amount of
//! Wasm compute, to compare what it costs inside Envoy with `make bench-hotpath`.

use std::rc::Rc;

use gateway_common::host::{self, MapType, MetricType};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(NoopRoot { reply: None, trap: false, calls: Rc::default() })
    });
}}

struct NoopRoot {
    reply: Option<Rc<Vec<u8>>>,
    trap: bool,
    calls: Rc<Calls>,
}

/// The host calls made per request, by phase.
#[derive(Default)]
struct Calls {
    request: Vec<HostCall>,
    response: Vec<HostCall>,
}

enum HostCall {
    HeaderPairs(MapType),
    Header(MapType, String),
    /// Name and value (`set_header:<name>=<value>`; value `1` when none is given).
    SetHeader(MapType, String, String),
    RemoveHeader(MapType, String),
    Property(Vec<String>),
    SetProperty(String),
    Now,
    SharedGet(String),
    SharedSet(String),
    Metric(u32),
    Spin(u32),
}

impl HostCall {
    fn parse(spec: &str) -> Option<(bool, HostCall)> {
        let (response, spec) = match spec.strip_prefix("response.") {
            Some(rest) => (true, rest),
            None => (false, spec),
        };
        let map = if response { MapType::HttpResponseHeaders } else { MapType::HttpRequestHeaders };
        let (verb, argument) = spec.split_once(':').unwrap_or((spec, ""));
        let argument = argument.to_string();
        let call = match verb {
            "header_pairs" => HostCall::HeaderPairs(map),
            "header" => HostCall::Header(map, argument),
            "set_header" => {
                let (name, value) = argument.split_once('=').unwrap_or((&argument, "1"));
                HostCall::SetHeader(map, name.to_string(), value.to_string())
            }
            "remove_header" => HostCall::RemoveHeader(map, argument),
            "property" => HostCall::Property(argument.split('.').map(str::to_string).collect()),
            "set_property" => HostCall::SetProperty(argument),
            "now" => HostCall::Now,
            "shared_get" => {
                let (key, bytes) = argument.split_once('=').unwrap_or((&argument, "0"));
                let bytes = bytes.parse::<usize>().ok()?;
                if bytes > 0 {
                    host::set_shared_data(key, &vec![b'v'; bytes], None).ok()?;
                }
                HostCall::SharedGet(key.to_string())
            }
            "shared_set" => HostCall::SharedSet(argument),
            "metric" => HostCall::Metric(host::define_metric(MetricType::Counter, "noop.calls").ok()?),
            "spin" => HostCall::Spin(argument.parse().ok()?),
            _ => return None,
        };
        Some((response, call))
    }

    /// Makes the call through the modules' own host functions (same copies).
    fn make(&self) {
        let _ = match self {
            HostCall::HeaderPairs(map) => host::headers(*map).map(drop),
            HostCall::Header(map, name) => host::header(*map, name).map(drop),
            HostCall::SetHeader(map, name, value) => host::set_header(*map, name, value.as_bytes()),
            HostCall::RemoveHeader(map, name) => host::remove_header(*map, name),
            HostCall::Property(path) => host::property(&path.iter().map(String::as_str).collect::<Vec<_>>()).map(drop),
            HostCall::SetProperty(name) => host::set_property(&[name.as_str()], b"1"),
            HostCall::Now => {
                std::hint::black_box(host::now_nanos());
                Ok(())
            }
            HostCall::SharedGet(key) => host::shared_data(key).map(drop),
            HostCall::SharedSet(key) => host::set_shared_data(key, b"0123456789abcdef", None).map(drop),
            HostCall::Metric(id) => host::increment_metric(*id, 1),
            HostCall::Spin(rounds) => {
                std::hint::black_box(spin(*rounds));
                Ok(())
            }
        };
    }
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let configured = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&configured);
        let text = text.trim().trim_matches('"');
        self.reply = text.parse::<usize>().ok().map(|bytes| Rc::new(vec![b'x'; bytes]));
        self.trap = text == "trap";
        if let Some(list) = text.strip_prefix("calls:") {
            let mut calls = Calls::default();
            for spec in list.split(',').filter(|spec| !spec.is_empty()) {
                if let Some(bytes) = spec.strip_prefix("reply:").and_then(|bytes| bytes.parse::<usize>().ok()) {
                    self.reply = Some(Rc::new(vec![b'x'; bytes]));
                    continue;
                }
                match HostCall::parse(spec) {
                    Some((true, call)) => calls.response.push(call),
                    Some((false, call)) => calls.request.push(call),
                    None => {
                        host::log(host::LogLevel::Error, &format!("noop: bad call {spec}"));
                        return false;
                    }
                }
            }
            self.calls = Rc::new(calls);
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopStream { reply: self.reply.clone(), trap: self.trap, calls: Rc::clone(&self.calls) }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct NoopStream {
    reply: Option<Rc<Vec<u8>>>,
    trap: bool,
    calls: Rc<Calls>,
}

impl Context for NoopStream {}

// A floor has the stream callbacks of the module it stands for (the host calls each
// one exported): noop.wasm those of most modules, noop-cache.wasm cache.wasm's.
#[cfg(not(feature = "cache-callbacks"))]
gateway_common::stream_callbacks!(request_headers, response_headers);
#[cfg(feature = "cache-callbacks")]
gateway_common::stream_callbacks!(request_headers, response_headers, response_body, done);

impl HttpContext for NoopStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.trap && self.get_http_request_header_bytes("x-trap").is_some() {
            trap();
        }
        self.calls.request.iter().for_each(HostCall::make);
        let Some(body) = &self.reply else { return Action::Continue };
        // The fields a cache hit on the bench's upstream answers with: what it
        // stored (all but `content-length`, which Envoy sets), `Age`, `Cache-Status`.
        let headers = [
            ("content-type", "text/plain"),
            ("cache-control", "public, max-age=600"),
            ("date", "Tue, 01 Dec 2026 22:00:00 GMT"),
            ("server", "envoy"),
            ("age", "0"),
            ("cache-status", "wasm-cache; hit; ttl=600"),
        ];
        match proxy_wasm::hostcalls::send_http_response(200, headers.to_vec(), Some(body)) {
            Ok(()) => Action::Pause,
            Err(_) => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.calls.response.iter().for_each(HostCall::make);
        Action::Continue
    }
}

/// xorshift64 rounds, each depending on the one before (no vectorizing, no
/// skipping): 2-3 ns each on the bench machine, in V8 and in Envoy alike.
fn spin(rounds: u32) -> u64 {
    let mut state = std::hint::black_box(0x9e37_79b9_7f4a_7c15_u64);
    for _ in 0..rounds {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
    }
    state
}

/// Traps the VM, as a panic in a module does.
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort()
}
