//! The host as the filters see it: one trait, [`Host`], implemented once over the
//! FFI ([`Ffi`], through `host.rs`) and once in memory ([`FakeHost`]) so that a
//! filter's glue runs natively in unit tests, with every host call recorded.
//!
//! Glue written against `Host` is tested on `FakeHost`: what it reads, writes and
//! answers, and how many host calls a typical request costs (each call copies
//! data across the VM boundary; budget tests pin the numbers).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Duration;

use crate::field;
use crate::host::{self, CasWrite, HostError, HostResult, LogLevel, MapType, MetricType, VALUE_REFUSED};
use crate::request::HeaderPairs;
use crate::verdict::SharedFields;

/// Every host effect the filters use.
pub trait Host {
    fn header_pairs(&self, map: MapType) -> HostResult<HeaderPairs>;
    fn header(&self, map: MapType, name: &str) -> HostResult<Option<Vec<u8>>>;
    fn set_header(&self, map: MapType, name: &str, value: &[u8]) -> HostResult<()>;
    fn add_header(&self, map: MapType, name: &str, value: &[u8]) -> HostResult<()>;
    fn remove_header(&self, map: MapType, name: &str) -> HostResult<()>;
    fn property(&self, path: &[&str]) -> HostResult<Option<Vec<u8>>>;
    fn set_property(&self, path: &[&str], value: &[u8]) -> HostResult<()>;
    fn shared_data(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)>;
    fn set_shared_data(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<CasWrite>;
    fn now_nanos(&self) -> u64;
    fn send_local_response(
        &self,
        status: u32,
        kept: Option<&SharedFields>,
        headers: &[(&str, &str)],
        body: &[u8],
        grpc_status: Option<u32>,
    ) -> HostResult<()>;
    fn define_metric(&self, kind: MetricType, name: &str) -> HostResult<u32>;
    fn increment_metric(&self, id: u32, by: i64) -> HostResult<()>;
    fn record_metric(&self, id: u32, value: u64) -> HostResult<()>;
    fn call_foreign_function(&self, name: &str, arguments: &[u8]) -> HostResult<Option<Vec<u8>>>;
    fn log(&self, level: LogLevel, message: &str);
    /// Starts an HTTP call; the answer arrives in the calling context's
    /// `on_http_call_response` with this token.
    /// Starts an HTTP call (`body` empty: none); the answer arrives in the calling
    /// context's `on_http_call_response` with this token.
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> HostResult<u32>;
    /// The body of the HTTP call response being delivered (at most `size` bytes).
    fn http_call_response_body(&self, size: usize) -> HostResult<Vec<u8>>;
    /// Starts a unary gRPC call (`message`: the serialized request); the answer
    /// arrives in the calling context's `on_grpc_call_response` with this token.
    fn dispatch_grpc_call(&self, call: &GrpcCall<'_>) -> HostResult<u32>;
    /// The message of the gRPC call response being delivered (at most `size` bytes).
    fn grpc_call_response_body(&self, size: usize) -> HostResult<Vec<u8>>;
    /// Resumes a request paused by `Action::Pause`.
    fn resume_request(&self) -> HostResult<()>;
    /// Makes the next calls act on another context of this VM (a paused stream),
    /// until it is set back.
    fn set_effective_context(&self, context_id: u32) -> HostResult<()>;
    /// The response body chunk being delivered to `on_http_response_body`.
    fn response_body_chunk(&self, size: usize) -> HostResult<Vec<u8>>;
}

/// A borrowed host is a host: several streams of a test can share one `FakeHost`.
impl<H: Host + ?Sized> Host for &H {
    fn header_pairs(&self, map: MapType) -> HostResult<HeaderPairs> {
        (**self).header_pairs(map)
    }
    fn header(&self, map: MapType, name: &str) -> HostResult<Option<Vec<u8>>> {
        (**self).header(map, name)
    }
    fn set_header(&self, map: MapType, name: &str, value: &[u8]) -> HostResult<()> {
        (**self).set_header(map, name, value)
    }
    fn add_header(&self, map: MapType, name: &str, value: &[u8]) -> HostResult<()> {
        (**self).add_header(map, name, value)
    }
    fn remove_header(&self, map: MapType, name: &str) -> HostResult<()> {
        (**self).remove_header(map, name)
    }
    fn property(&self, path: &[&str]) -> HostResult<Option<Vec<u8>>> {
        (**self).property(path)
    }
    fn set_property(&self, path: &[&str], value: &[u8]) -> HostResult<()> {
        (**self).set_property(path, value)
    }
    fn shared_data(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
        (**self).shared_data(key)
    }
    fn set_shared_data(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<CasWrite> {
        (**self).set_shared_data(key, value, cas)
    }
    fn now_nanos(&self) -> u64 {
        (**self).now_nanos()
    }
    fn send_local_response(
        &self,
        status: u32,
        kept: Option<&SharedFields>,
        headers: &[(&str, &str)],
        body: &[u8],
        grpc_status: Option<u32>,
    ) -> HostResult<()> {
        (**self).send_local_response(status, kept, headers, body, grpc_status)
    }
    fn define_metric(&self, kind: MetricType, name: &str) -> HostResult<u32> {
        (**self).define_metric(kind, name)
    }
    fn increment_metric(&self, id: u32, by: i64) -> HostResult<()> {
        (**self).increment_metric(id, by)
    }
    fn record_metric(&self, id: u32, value: u64) -> HostResult<()> {
        (**self).record_metric(id, value)
    }
    fn call_foreign_function(&self, name: &str, arguments: &[u8]) -> HostResult<Option<Vec<u8>>> {
        (**self).call_foreign_function(name, arguments)
    }
    fn log(&self, level: LogLevel, message: &str) {
        (**self).log(level, message)
    }
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> HostResult<u32> {
        (**self).dispatch_http_call(cluster, headers, body, timeout)
    }
    fn http_call_response_body(&self, size: usize) -> HostResult<Vec<u8>> {
        (**self).http_call_response_body(size)
    }
    fn dispatch_grpc_call(&self, call: &GrpcCall<'_>) -> HostResult<u32> {
        (**self).dispatch_grpc_call(call)
    }
    fn grpc_call_response_body(&self, size: usize) -> HostResult<Vec<u8>> {
        (**self).grpc_call_response_body(size)
    }
    fn resume_request(&self) -> HostResult<()> {
        (**self).resume_request()
    }
    fn set_effective_context(&self, context_id: u32) -> HostResult<()> {
        (**self).set_effective_context(context_id)
    }
    fn response_body_chunk(&self, size: usize) -> HostResult<Vec<u8>> {
        (**self).response_body_chunk(size)
    }
}

/// The real host: proxy-wasm ABI 0.2.1 through `host.rs` (which checks every
/// value written, see `field.rs`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ffi;

impl Host for Ffi {
    fn header_pairs(&self, map: MapType) -> HostResult<HeaderPairs> {
        host::headers(map)
    }
    fn header(&self, map: MapType, name: &str) -> HostResult<Option<Vec<u8>>> {
        host::header(map, name)
    }
    fn set_header(&self, map: MapType, name: &str, value: &[u8]) -> HostResult<()> {
        host::set_header(map, name, value)
    }
    fn add_header(&self, map: MapType, name: &str, value: &[u8]) -> HostResult<()> {
        host::add_header(map, name, value)
    }
    fn remove_header(&self, map: MapType, name: &str) -> HostResult<()> {
        host::remove_header(map, name)
    }
    fn property(&self, path: &[&str]) -> HostResult<Option<Vec<u8>>> {
        host::property(path)
    }
    fn set_property(&self, path: &[&str], value: &[u8]) -> HostResult<()> {
        host::set_property(path, value)
    }
    fn shared_data(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
        host::shared_data(key)
    }
    fn set_shared_data(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<CasWrite> {
        host::set_shared_data(key, value, cas)
    }
    fn now_nanos(&self) -> u64 {
        host::now_nanos()
    }
    fn send_local_response(
        &self,
        status: u32,
        kept: Option<&SharedFields>,
        headers: &[(&str, &str)],
        body: &[u8],
        grpc_status: Option<u32>,
    ) -> HostResult<()> {
        host::send_local_response(status, kept.map(SharedFields::prepared), headers, body, grpc_status)
    }
    fn define_metric(&self, kind: MetricType, name: &str) -> HostResult<u32> {
        host::define_metric(kind, name)
    }
    fn increment_metric(&self, id: u32, by: i64) -> HostResult<()> {
        host::increment_metric(id, by)
    }
    fn record_metric(&self, id: u32, value: u64) -> HostResult<()> {
        host::record_metric(id, value)
    }
    fn call_foreign_function(&self, name: &str, arguments: &[u8]) -> HostResult<Option<Vec<u8>>> {
        host::call_foreign_function(name, arguments)
    }
    fn log(&self, level: LogLevel, message: &str) {
        host::log(level, message)
    }
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> HostResult<u32> {
        host::dispatch_http_call(cluster, headers, body, timeout)
    }
    fn http_call_response_body(&self, size: usize) -> HostResult<Vec<u8>> {
        host::http_call_response_body(size)
    }
    fn dispatch_grpc_call(&self, call: &GrpcCall<'_>) -> HostResult<u32> {
        host::dispatch_grpc_call(call)
    }
    fn grpc_call_response_body(&self, size: usize) -> HostResult<Vec<u8>> {
        host::grpc_call_response_body(size)
    }
    fn resume_request(&self) -> HostResult<()> {
        host::resume_request()
    }
    fn set_effective_context(&self, context_id: u32) -> HostResult<()> {
        host::set_effective_context(context_id)
    }
    fn response_body_chunk(&self, size: usize) -> HostResult<Vec<u8>> {
        host::response_body_chunk(size)
    }
}

/// An HTTP call as `FakeHost` received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchedCall {
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

/// A unary gRPC call to start: the Envoy cluster, the service and method, and
/// the serialized request message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcCall<'a> {
    pub cluster: &'a str,
    pub service: &'a str,
    pub method: &'a str,
    pub message: &'a [u8],
    pub timeout: Duration,
}

/// A gRPC call as `FakeHost` received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchedGrpcCall {
    pub token: u32,
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub message: Vec<u8>,
    pub timeout: Duration,
}

/// A local reply as `FakeHost` received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub grpc_status: Option<u32>,
    /// The effective context it was sent on (0 unless a test set one).
    pub context: u32,
}

/// A header map as `FakeHost` keeps it (editable pairs).
type FakeMap = Vec<(Vec<u8>, Vec<u8>)>;

/// An in-memory host for native tests: scripted header maps, properties, shared
/// data with Envoy's CAS semantics and a clock; every call is recorded by name
/// (`calls()`), writes are applied (and refused by the same `field.rs` rules the
/// FFI layer applies), a local reply is captured.
#[derive(Debug, Default)]
pub struct FakeHost {
    calls: RefCell<Vec<String>>,
    maps: RefCell<BTreeMap<u32, FakeMap>>,
    properties: RefCell<BTreeMap<String, Vec<u8>>>,
    shared: RefCell<BTreeMap<String, (Vec<u8>, u32)>>,
    next_cas: Cell<u32>,
    now: Cell<u64>,
    metric_names: RefCell<Vec<String>>,
    metrics: RefCell<Vec<(String, i64)>>,
    replies: RefCell<Vec<LocalReply>>,
    logs: RefCell<Vec<String>>,
    dispatched: RefCell<Vec<DispatchedCall>>,
    grpc_dispatched: RefCell<Vec<DispatchedGrpcCall>>,
    call_body: RefCell<Vec<u8>>,
    response_body: RefCell<Vec<u8>>,
    resumed: Cell<u32>,
    effective_context: Cell<u32>,
    /// Contexts resumed, in order (the effective context of each resume).
    resumed_contexts: RefCell<Vec<u32>>,
    /// Makes local replies fail (a host that refuses them).
    pub refuse_local_reply: Cell<bool>,
    /// Makes header and property writes fail (a host in trouble).
    pub fail_writes: Cell<bool>,
    /// Clusters whose calls fail to start (as Envoy refuses an unknown cluster).
    pub unknown_clusters: RefCell<Vec<String>>,
}

impl FakeHost {
    pub fn new() -> Self {
        let host = Self::default();
        host.next_cas.set(1);
        host.now.set(1_700_000_000_000_000_000);
        host
    }

    /// Replaces a header map (e.g. the request headers of the next callback).
    pub fn with_headers(self, map: MapType, pairs: &[(&str, &[u8])]) -> Self {
        let pairs = pairs.iter().map(|(name, value)| (name.as_bytes().to_vec(), value.to_vec())).collect();
        self.maps.borrow_mut().insert(map as u32, pairs);
        self
    }

    /// Replaces a header map in place (for a host shared by several streams).
    pub fn replace_headers(&self, map: MapType, pairs: &[(&str, &[u8])]) {
        let pairs = pairs.iter().map(|(name, value)| (name.as_bytes().to_vec(), value.to_vec())).collect();
        self.maps.borrow_mut().insert(map as u32, pairs);
    }

    pub fn with_property(self, path: &[&str], value: &[u8]) -> Self {
        self.properties.borrow_mut().insert(path.join("."), value.to_vec());
        self
    }

    pub fn set_now(&self, nanos: u64) {
        self.now.set(nanos);
    }

    /// The host calls made so far, by name (`set_header`, `shared_data`...).
    pub fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }

    /// Forgets the recorded calls (e.g. after configuration).
    pub fn reset_calls(&self) {
        self.calls.borrow_mut().clear();
    }

    /// Values of a header in a map, as the filter left it.
    pub fn header_values(&self, map: MapType, name: &str) -> Vec<Vec<u8>> {
        let maps = self.maps.borrow();
        let pairs = maps.get(&(map as u32)).map(Vec::as_slice).unwrap_or_default();
        pairs.iter().filter(|(key, _)| key.as_slice() == name.as_bytes()).map(|(_, value)| value.clone()).collect()
    }

    pub fn property_value(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.properties.borrow().get(&path.join(".")).cloned()
    }

    /// The local replies sent, in order.
    pub fn replies(&self) -> Vec<LocalReply> {
        self.replies.borrow().clone()
    }

    /// Sum of increments per metric name.
    pub fn metric(&self, name: &str) -> i64 {
        self.metrics.borrow().iter().filter(|(metric, _)| metric == name).map(|(_, by)| by).sum()
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.borrow().clone()
    }

    /// The HTTP calls started so far.
    pub fn dispatched(&self) -> Vec<DispatchedCall> {
        self.dispatched.borrow().clone()
    }

    /// The gRPC calls started so far.
    pub fn grpc_dispatched(&self) -> Vec<DispatchedGrpcCall> {
        self.grpc_dispatched.borrow().clone()
    }

    /// Scripts the message the next `on_grpc_call_response` will read.
    pub fn answer_grpc_call(&self, message: &[u8]) {
        *self.call_body.borrow_mut() = message.to_vec();
    }

    /// Scripts the answer the next `on_http_call_response` will read.
    pub fn answer_call(&self, headers: &[(&str, &[u8])], body: &[u8]) {
        let pairs = headers.iter().map(|(name, value)| (name.as_bytes().to_vec(), value.to_vec())).collect();
        self.maps.borrow_mut().insert(MapType::HttpCallResponseHeaders as u32, pairs);
        *self.call_body.borrow_mut() = body.to_vec();
    }

    /// Scripts the response body chunk the next `on_http_response_body` reads.
    pub fn set_response_body(&self, body: &[u8]) {
        *self.response_body.borrow_mut() = body.to_vec();
    }

    /// How often the filter resumed the request.
    pub fn resumed(&self) -> u32 {
        self.resumed.get()
    }

    /// The effective context of every resume so far.
    pub fn resumed_contexts(&self) -> Vec<u32> {
        self.resumed_contexts.borrow().clone()
    }

    /// The context host calls act on now.
    pub fn effective_context(&self) -> u32 {
        self.effective_context.get()
    }

    fn record(&self, call: &str) {
        self.calls.borrow_mut().push(call.to_string());
    }

    fn metric_name(&self, id: u32) -> String {
        self.metric_names.borrow().get(id as usize).cloned().unwrap_or_default()
    }

    fn edit(&self, map: MapType, edit: impl FnOnce(&mut FakeMap)) {
        edit(self.maps.borrow_mut().entry(map as u32).or_default());
    }
}

/// The rule `host.rs` applies before a header write reaches the host.
fn writable(name: &str, value: &[u8]) -> HostResult<()> {
    if field::is_writable(name, value) {
        Ok(())
    } else {
        Err(VALUE_REFUSED)
    }
}

impl Host for FakeHost {
    fn header_pairs(&self, map: MapType) -> HostResult<HeaderPairs> {
        self.record("header_pairs");
        Ok(self.maps.borrow().get(&(map as u32)).map(|pairs| pairs.iter().cloned().collect()).unwrap_or_default())
    }
    fn header(&self, map: MapType, name: &str) -> HostResult<Option<Vec<u8>>> {
        self.record("header");
        Ok(self.header_values(map, name).into_iter().next())
    }
    fn set_header(&self, map: MapType, name: &str, value: &[u8]) -> HostResult<()> {
        self.record("set_header");
        writable(name, value)?;
        if self.fail_writes.get() {
            return Err(HostError(2));
        }
        self.edit(map, |pairs| {
            pairs.retain(|(key, _)| key.as_slice() != name.as_bytes());
            pairs.push((name.as_bytes().to_vec(), value.to_vec()));
        });
        Ok(())
    }
    fn add_header(&self, map: MapType, name: &str, value: &[u8]) -> HostResult<()> {
        self.record("add_header");
        writable(name, value)?;
        if self.fail_writes.get() {
            return Err(HostError(2));
        }
        self.edit(map, |pairs| pairs.push((name.as_bytes().to_vec(), value.to_vec())));
        Ok(())
    }
    fn remove_header(&self, map: MapType, name: &str) -> HostResult<()> {
        self.record("remove_header");
        if self.fail_writes.get() {
            return Err(HostError(2));
        }
        self.edit(map, |pairs| pairs.retain(|(key, _)| key.as_slice() != name.as_bytes()));
        Ok(())
    }
    fn property(&self, path: &[&str]) -> HostResult<Option<Vec<u8>>> {
        self.record("property");
        Ok(self.property_value(path))
    }
    fn set_property(&self, path: &[&str], value: &[u8]) -> HostResult<()> {
        self.record("set_property");
        if !field::is_field_value(value) {
            return Err(VALUE_REFUSED);
        }
        if self.fail_writes.get() {
            return Err(HostError(2));
        }
        self.properties.borrow_mut().insert(path.join("."), value.to_vec());
        Ok(())
    }
    fn shared_data(&self, key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
        self.record("shared_data");
        Ok(match self.shared.borrow().get(key) {
            Some((value, cas)) => (Some(value.clone()), Some(*cas)),
            None => (None, None),
        })
    }
    fn set_shared_data(&self, key: &str, value: &[u8], cas: Option<u32>) -> HostResult<CasWrite> {
        self.record("set_shared_data");
        let mut shared = self.shared.borrow_mut();
        if let (Some(expected), Some((_, current))) = (cas, shared.get(key)) {
            if expected != *current {
                return Ok(CasWrite::Conflict);
            }
        }
        let next = self.next_cas.get();
        self.next_cas.set(next.wrapping_add(1).max(1));
        shared.insert(key.to_string(), (value.to_vec(), next));
        Ok(CasWrite::Written)
    }
    fn now_nanos(&self) -> u64 {
        self.record("now_nanos");
        self.now.get()
    }
    fn send_local_response(
        &self,
        status: u32,
        kept: Option<&SharedFields>,
        headers: &[(&str, &str)],
        body: &[u8],
        grpc_status: Option<u32>,
    ) -> HostResult<()> {
        self.record("send_local_response");
        if self.refuse_local_reply.get() {
            return Err(HostError(2));
        }
        let headers = kept
            .into_iter()
            .flat_map(|kept| kept.iter().map(|(name, value)| (name.as_str(), value.as_str())))
            .chain(headers.iter().copied())
            .filter(|(name, value)| writable(name, value.as_bytes()).is_ok())
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let context = self.effective_context.get();
        self.replies.borrow_mut().push(LocalReply { status, headers, body: body.to_vec(), grpc_status, context });
        Ok(())
    }
    fn define_metric(&self, _kind: MetricType, name: &str) -> HostResult<u32> {
        self.record("define_metric");
        let mut names = self.metric_names.borrow_mut();
        names.push(name.to_string());
        u32::try_from(names.len() - 1).map_err(|_| HostError(1))
    }
    fn increment_metric(&self, id: u32, by: i64) -> HostResult<()> {
        self.record("increment_metric");
        let name = self.metric_name(id);
        self.metrics.borrow_mut().push((name, by));
        Ok(())
    }
    fn record_metric(&self, id: u32, _value: u64) -> HostResult<()> {
        self.record("record_metric");
        let _ = self.metric_name(id);
        Ok(())
    }
    fn call_foreign_function(&self, name: &str, _arguments: &[u8]) -> HostResult<Option<Vec<u8>>> {
        self.record(&format!("call_foreign_function {name}"));
        Err(HostError(host::STATUS_NOT_FOUND))
    }
    fn log(&self, _level: LogLevel, message: &str) {
        self.record("log");
        self.logs.borrow_mut().push(message.to_string());
    }
    fn dispatch_http_call(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> HostResult<u32> {
        self.record("dispatch_http_call");
        if self.unknown_clusters.borrow().iter().any(|unknown| unknown == cluster) {
            return Err(HostError(2));
        }
        let mut dispatched = self.dispatched.borrow_mut();
        let token = u32::try_from(dispatched.len() + 1).map_err(|_| HostError(1))?;
        let headers = headers
            .iter()
            .filter(|(name, value)| writable(name, value.as_bytes()).is_ok())
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        dispatched.push(DispatchedCall { token, cluster: cluster.to_string(), headers, body: body.to_vec(), timeout });
        Ok(token)
    }
    fn http_call_response_body(&self, size: usize) -> HostResult<Vec<u8>> {
        self.record("http_call_response_body");
        let body = self.call_body.borrow();
        Ok(body.get(..size.min(body.len())).unwrap_or_default().to_vec())
    }
    fn dispatch_grpc_call(&self, call: &GrpcCall<'_>) -> HostResult<u32> {
        self.record("dispatch_grpc_call");
        if self.unknown_clusters.borrow().iter().any(|unknown| unknown == call.cluster) {
            return Err(HostError(2));
        }
        let mut dispatched = self.grpc_dispatched.borrow_mut();
        let token = u32::try_from(dispatched.len() + 1).map_err(|_| HostError(1))?;
        dispatched.push(DispatchedGrpcCall {
            token,
            cluster: call.cluster.to_string(),
            service: call.service.to_string(),
            method: call.method.to_string(),
            message: call.message.to_vec(),
            timeout: call.timeout,
        });
        Ok(token)
    }
    fn grpc_call_response_body(&self, size: usize) -> HostResult<Vec<u8>> {
        self.record("grpc_call_response_body");
        let body = self.call_body.borrow();
        Ok(body.get(..size.min(body.len())).unwrap_or_default().to_vec())
    }
    fn resume_request(&self) -> HostResult<()> {
        self.record("resume_request");
        self.resumed.set(self.resumed.get() + 1);
        self.resumed_contexts.borrow_mut().push(self.effective_context.get());
        Ok(())
    }
    fn set_effective_context(&self, context_id: u32) -> HostResult<()> {
        self.record("set_effective_context");
        self.effective_context.set(context_id);
        Ok(())
    }
    fn response_body_chunk(&self, size: usize) -> HostResult<Vec<u8>> {
        self.record("response_body_chunk");
        let body = self.response_body.borrow();
        Ok(body.get(..size.min(body.len())).unwrap_or_default().to_vec())
    }
}

/// What a stream does when the host refuses its local reply (each module chooses
/// and documents it; none may leave the stream paused without saying so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRefusedReply {
    /// Let the request go on (the reply was sent from the request headers callback).
    Continue,
    /// Resume a request paused earlier (the reply was sent from a later callback).
    Resume,
    /// Keep the request held until Envoy's stream timeout: enforcement modules
    /// never let a denied request through.
    Hold,
}

/// Host failures of one module instance: refused local replies
/// (`<prefix>.local_reply_failed`) and other host calls that failed while applying
/// a verdict (`<prefix>.host_errors`); the first of each kind is logged per VM.
#[derive(Debug, Default)]
pub struct ReplyFailures {
    module: String,
    metric: crate::metrics::Metric,
    logged: Cell<bool>,
    host_errors: crate::metrics::Metric,
    host_error_logged: Cell<bool>,
}

impl ReplyFailures {
    /// `prefix` names the metrics (`routing`, `ratelimit.<plugin>`).
    pub fn new(host: &impl Host, prefix: &str) -> Self {
        Self {
            module: prefix.to_string(),
            metric: crate::metrics::Metric::counter_on(host, &format!("{prefix}.local_reply_failed")),
            logged: Cell::new(false),
            host_errors: crate::metrics::Metric::counter_on(host, &format!("{prefix}.host_errors")),
            host_error_logged: Cell::new(false),
        }
    }

    /// Records a host call that failed (`what` names it). A value `field.rs`
    /// refused is not a host failure: it is counted in `header_values_skipped`.
    pub fn host_call(&self, host: &impl Host, what: &str, result: HostResult<()>) {
        let Err(error) = result else { return };
        if error == crate::host::VALUE_REFUSED {
            return;
        }
        self.host_errors.increment_on(host);
        if !self.host_error_logged.replace(true) {
            host.log(
                LogLevel::Error,
                &format!("{}: host call {what} failed ({error:?}) (logged once per VM)", self.module),
            );
        }
    }

    /// The action after a local reply: `Pause` when it was sent, else what
    /// `policy` says (resuming the request for `Resume`).
    pub fn after(&self, host: &impl Host, sent: HostResult<()>, policy: OnRefusedReply) -> proxy_wasm::types::Action {
        use proxy_wasm::types::Action;
        let Err(error) = sent else { return Action::Pause };
        self.metric.increment_on(host);
        if !self.logged.replace(true) {
            host.log(
                LogLevel::Error,
                &format!(
                    "{}: the host refused a local reply ({error:?}); {policy:?} (logged once per VM)",
                    self.module
                ),
            );
        }
        match policy {
            OnRefusedReply::Continue => Action::Continue,
            OnRefusedReply::Resume => {
                let _ = host.resume_request();
                Action::Continue
            }
            OnRefusedReply::Hold => Action::Pause,
        }
    }
}
