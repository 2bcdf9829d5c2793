//! Host calls that never panic.
//!
//! The SDK's `hostcalls` functions `panic!` on any status they do not expect, and a
//! panic traps the VM (every later request on that worker fails). These wrappers
//! declare the ABI 0.2.1 imports themselves and turn every status into a `Result`.
//! This is the only module in the suite with `unsafe` code.
#![allow(unsafe_code)]

use std::ptr::{null, null_mut};

use crate::field;

pub use proxy_wasm::types::{LogLevel, MapType, MetricType};

/// A proxy-wasm status other than `Ok`, kept as the raw number the host returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub u32);

pub const STATUS_OK: u32 = 0;
pub const STATUS_NOT_FOUND: u32 = 1;
pub const STATUS_CAS_MISMATCH: u32 = 8;

pub type HostResult<T> = Result<T, HostError>;

/// Not a host status: the value was not a valid field value (see `field.rs`), so
/// it was not handed to the host at all.
pub const VALUE_REFUSED: HostError = HostError(u32::MAX);

/// Lets a header or property write through only when `field.rs` accepts it;
/// otherwise counts the skip and refuses.
fn checked_field(name: &str, value: &[u8]) -> HostResult<()> {
    if field::is_writable(name, value) {
        Ok(())
    } else {
        field::skipped();
        Err(VALUE_REFUSED)
    }
}

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, return_map_data: *mut *mut u8, return_map_size: *mut usize) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(path_data: *const u8, path_size: usize, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_call_foreign_function(
        function_name_data: *const u8,
        function_name_size: usize,
        arguments_data: *const u8,
        arguments_size: usize,
        results_data: *mut *mut u8,
        results_size: *mut usize,
    ) -> u32;
}

fn check(status: u32) -> HostResult<()> {
    if status == STATUS_OK {
        Ok(())
    } else {
        Err(HostError(status))
    }
}

/// Takes ownership of a buffer the host allocated through the SDK's exported
/// `proxy_on_memory_allocate` (a `Vec<u8>` with capacity == size).
fn take_host_buffer(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the host filled `size` bytes of a buffer that `proxy_on_memory_allocate`
    // allocated with exactly this capacity; we are its only owner.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Reads an optional byte value through a host call of the "return buffer" shape.
/// `NotFound` is `Ok(None)`.
fn read_optional(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> HostResult<Option<Vec<u8>>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    match call(&mut data, &mut size) {
        STATUS_OK => Ok(take_host_buffer(data, size)),
        STATUS_NOT_FOUND => Ok(None),
        other => Err(HostError(other)),
    }
}

pub fn log(level: LogLevel, message: &str) {
    // SAFETY: pointer and length describe a live &str.
    let _ = unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

/// Host wall-clock time in nanoseconds since the Unix epoch (0 if unavailable).
pub fn now_nanos() -> u64 {
    let mut nanos: u64 = 0;
    // SAFETY: the host writes one u64 through a valid pointer.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    if status == STATUS_OK {
        nanos
    } else {
        0
    }
}

/// Resumes a request paused by `Action::Pause` (e.g. after an HTTP call).
pub fn resume_request() -> HostResult<()> {
    const HTTP_REQUEST: u32 = 0;
    // SAFETY: plain value.
    check(unsafe { proxy_continue_stream(HTTP_REQUEST) })
}

/// Makes the next host calls act on another context (a stream this VM paused).
pub fn set_effective_context(context_id: u32) -> HostResult<()> {
    // SAFETY: plain value.
    check(unsafe { proxy_set_effective_context(context_id) })
}

/// Starts an HTTP call to an Envoy cluster; the answer arrives in the calling
/// context's `on_http_call_response`. This one goes through the SDK, because its
/// dispatcher must register the token to route the answer; the SDK returns
/// unknown clusters (BadArgument) and internal failures as errors.
/// Headers that are not valid field values are left out (and counted).
pub fn dispatch_http_call(
    cluster: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: std::time::Duration,
) -> HostResult<u32> {
    let headers = writable_fields(headers).into_owned();
    let body = (!body.is_empty()).then_some(body);
    proxy_wasm::hostcalls::dispatch_http_call(cluster, headers, body, Vec::new(), timeout)
        .map_err(|status| HostError(status as u32))
}

/// Starts a unary gRPC call to an Envoy cluster; the answer arrives in the
/// calling context's `on_grpc_call_response`. Through the SDK, whose dispatcher
/// must register the token; Envoy reports an unknown cluster as ParseFailure,
/// which the SDK returns as an error.
pub fn dispatch_grpc_call(call: &crate::platform::GrpcCall<'_>) -> HostResult<u32> {
    proxy_wasm::hostcalls::dispatch_grpc_call(
        call.cluster,
        call.service,
        call.method,
        Vec::new(),
        Some(call.message),
        call.timeout,
    )
    .map_err(|status| HostError(status as u32))
}

/// The message of the gRPC call response being delivered (empty if none).
pub fn grpc_call_response_body(size: usize) -> HostResult<Vec<u8>> {
    const GRPC_RECEIVE_BUFFER: u32 = 5;
    read_optional(|data, out_size| {
        // SAFETY: out-pointers are valid for writes.
        unsafe { proxy_get_buffer_bytes(GRPC_RECEIVE_BUFFER, 0, size, data, out_size) }
    })
    .map(Option::unwrap_or_default)
}

/// The body of the HTTP call response being delivered (empty if none).
pub fn http_call_response_body(size: usize) -> HostResult<Vec<u8>> {
    const HTTP_CALL_RESPONSE_BODY: u32 = 4;
    read_optional(|data, out_size| {
        // SAFETY: out-pointers are valid for writes.
        unsafe { proxy_get_buffer_bytes(HTTP_CALL_RESPONSE_BODY, 0, size, data, out_size) }
    })
    .map(Option::unwrap_or_default)
}

/// The response body chunk being delivered to `on_http_response_body`.
pub fn response_body_chunk(size: usize) -> HostResult<Vec<u8>> {
    const HTTP_RESPONSE_BODY: u32 = 1;
    read_optional(|data, out_size| {
        // SAFETY: out-pointers are valid for writes.
        unsafe { proxy_get_buffer_bytes(HTTP_RESPONSE_BODY, 0, size, data, out_size) }
    })
    .map(Option::unwrap_or_default)
}

/// Calls the root context's `on_tick` every `period` (zero stops it).
pub fn set_tick_period(period: std::time::Duration) -> HostResult<()> {
    let millis = u32::try_from(period.as_millis()).unwrap_or(u32::MAX);
    // SAFETY: plain value.
    check(unsafe { proxy_set_tick_period_milliseconds(millis) })
}

/// The plugin configuration bytes (empty when none was given).
pub fn plugin_configuration() -> HostResult<Vec<u8>> {
    const PLUGIN_CONFIGURATION: u32 = 7;
    read_optional(|data, size| {
        // SAFETY: out-pointers are valid for writes.
        unsafe { proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, usize::MAX, data, size) }
    })
    .map(Option::unwrap_or_default)
}

/// One header value as raw bytes; `None` when absent. Never assumes UTF-8.
pub fn header(map: MapType, name: &str) -> HostResult<Option<Vec<u8>>> {
    read_optional(|data, size| {
        // SAFETY: name is a live &str, out-pointers are valid for writes.
        unsafe { proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), data, size) }
    })
}

/// All header pairs (names lower-case as the host gives them, values raw bytes),
/// in the buffer the host filled. Repeated headers appear once per occurrence.
pub fn headers(map: MapType) -> HostResult<crate::request::HeaderPairs> {
    let raw = read_optional(|data, size| {
        // SAFETY: out-pointers are valid for writes.
        unsafe { proxy_get_header_map_pairs(map as u32, data, size) }
    })?;
    Ok(raw.map(crate::request::HeaderPairs::decode).unwrap_or_default())
}

/// Serializes headers in the ABI's map format (for local responses).
pub fn encode_header_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    NO_PREPARED_FIELDS.encode_with(pairs)
}

/// The header-pairs encoding is a size table (name and value length per field)
/// followed by the text (each name and value followed by a NUL).
fn push_sizes(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
}

fn push_text(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// No prepared fields.
static NO_PREPARED_FIELDS: PreparedFields =
    PreparedFields { count: 0, sizes: Vec::new(), text: Vec::new(), refused: 0 };

/// Header fields checked and encoded once for many local replies (a cache's
/// stored response headers): each reply then copies two byte blocks instead of
/// checking and encoding every field again (in a cache hit's profile that work
/// was the largest of our own functions). Refused fields are left out and
/// counted on every reply, as they would be unprepared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreparedFields {
    count: u32,
    /// The pairs encoding's size table (name and value length per field)...
    sizes: Vec<u8>,
    /// ...and its text (each name and value followed by a NUL).
    text: Vec<u8>,
    refused: u32,
}

impl PreparedFields {
    pub fn new<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut prepared = Self::default();
        for (name, value) in fields {
            if !field::is_writable(name, value.as_bytes()) {
                prepared.refused += 1;
                continue;
            }
            prepared.count += 1;
            push_sizes(&mut prepared.sizes, name, value);
            push_text(&mut prepared.text, name, value);
        }
        prepared
    }

    /// The ABI's header-pairs encoding of these fields followed by `pairs`.
    pub fn encode_with(&self, pairs: &[(&str, &str)]) -> Vec<u8> {
        // Sized up front: one allocation, not one per doubling.
        let text: usize =
            self.text.len() + pairs.iter().map(|(name, value)| name.len() + value.len() + 2).sum::<usize>();
        let mut out = Vec::with_capacity(4 + self.sizes.len() + 8 * pairs.len() + text);
        out.extend_from_slice(&(self.count + pairs.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.sizes);
        for (name, value) in pairs {
            push_sizes(&mut out, name, value);
        }
        out.extend_from_slice(&self.text);
        for (name, value) in pairs {
            push_text(&mut out, name, value);
        }
        out
    }
}

/// Replaces a header; a value `field.rs` refuses is not written (`VALUE_REFUSED`).
pub fn set_header(map: MapType, name: &str, value: &[u8]) -> HostResult<()> {
    checked_field(name, value)?;
    // SAFETY: both slices are live for the call.
    check(unsafe { proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Adds a header; a value `field.rs` refuses is not written (`VALUE_REFUSED`).
pub fn add_header(map: MapType, name: &str, value: &[u8]) -> HostResult<()> {
    checked_field(name, value)?;
    // SAFETY: both slices are live for the call.
    check(unsafe { proxy_add_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Removes every occurrence of the header. Absent is not an error.
pub fn remove_header(map: MapType, name: &str) -> HostResult<()> {
    // SAFETY: name is a live &str.
    match unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) } {
        STATUS_OK | STATUS_NOT_FOUND => Ok(()),
        other => Err(HostError(other)),
    }
}

fn property_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

/// A host property such as `["source", "address"]`; `None` when the host has none.
pub fn property(path: &[&str]) -> HostResult<Option<Vec<u8>>> {
    let encoded = property_path(path);
    read_optional(|data, size| {
        // SAFETY: the encoded path is live, out-pointers are valid.
        unsafe { proxy_get_property(encoded.as_ptr(), encoded.len(), data, size) }
    })
}

/// Sets a property; in Envoy this becomes filter state `wasm.<path>`, readable from
/// access logs as `%FILTER_STATE(wasm.<path>:PLAIN)%`.
/// Access logs print these values: one that is not a valid field value (a CR/LF
/// could forge a log line) is not written.
pub fn set_property(path: &[&str], value: &[u8]) -> HostResult<()> {
    if !field::is_field_value(value) {
        field::skipped();
        return Err(VALUE_REFUSED);
    }
    let encoded = property_path(path);
    // SAFETY: both buffers are live for the call.
    check(unsafe { proxy_set_property(encoded.as_ptr(), encoded.len(), value.as_ptr(), value.len()) })
}

/// The fields `field.rs` accepts, in order; the refused ones are counted. No copy
/// when every field is writable (the usual case).
fn writable_fields<'a, 'f>(fields: &'a [(&'f str, &'f str)]) -> std::borrow::Cow<'a, [(&'f str, &'f str)]> {
    if fields.iter().all(|(name, value)| field::is_writable(name, value.as_bytes())) {
        return std::borrow::Cow::Borrowed(fields);
    }
    fields.iter().copied().filter(|(name, value)| checked_field(name, value.as_bytes()).is_ok()).collect()
}

/// Answers the request locally. Returns an error (instead of panicking) when the
/// host refuses, e.g. because a response was already sent. Headers whose name or
/// value `field.rs` refuses are left out (and counted); the answer still goes out.
/// `prepared` fields (checked and encoded before) go first, then `headers`.
pub fn send_local_response(
    status: u32,
    prepared: Option<&PreparedFields>,
    headers: &[(&str, &str)],
    body: &[u8],
    grpc_status: Option<u32>,
) -> HostResult<()> {
    let prepared = prepared.unwrap_or(&NO_PREPARED_FIELDS);
    for _ in 0..prepared.refused {
        field::skipped();
    }
    let encoded = prepared.encode_with(&writable_fields(headers));
    let grpc = grpc_status.and_then(|code| i32::try_from(code).ok()).unwrap_or(-1);
    // SAFETY: all buffers are live for the call.
    check(unsafe {
        proxy_send_local_response(status, null(), 0, body.as_ptr(), body.len(), encoded.as_ptr(), encoded.len(), grpc)
    })
}

/// A shared-data value and its CAS token; `(None, None)` when the key was never set.
pub fn shared_data(key: &str) -> HostResult<(Option<Vec<u8>>, Option<u32>)> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: key is live, out-pointers are valid for writes.
    match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) } {
        STATUS_OK => Ok((take_host_buffer(data, size), (cas != 0).then_some(cas))),
        STATUS_NOT_FOUND => Ok((None, None)),
        other => Err(HostError(other)),
    }
}

/// Outcome of a compare-and-swap write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasWrite {
    Written,
    Conflict,
}

/// Writes a shared-data value; with `cas`, only if nobody wrote since that read.
pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> HostResult<CasWrite> {
    // SAFETY: key and value are live for the call.
    match unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0)) } {
        STATUS_OK => Ok(CasWrite::Written),
        STATUS_CAS_MISMATCH => Ok(CasWrite::Conflict),
        other => Err(HostError(other)),
    }
}

pub fn define_metric(kind: MetricType, name: &str) -> HostResult<u32> {
    let mut id: u32 = 0;
    // SAFETY: name is live, id is valid for writes.
    check(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, by: i64) -> HostResult<()> {
    // SAFETY: plain values.
    check(unsafe { proxy_increment_metric(id, by) })
}

pub fn record_metric(id: u32, value: u64) -> HostResult<()> {
    // SAFETY: plain values.
    check(unsafe { proxy_record_metric(id, value) })
}

/// Calls a host extension such as Envoy's `clear_route_cache`. Hosts without the
/// function answer `NotFound`, which callers may treat as "not needed here".
pub fn call_foreign_function(name: &str, arguments: &[u8]) -> HostResult<Option<Vec<u8>>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: name and arguments are live, out-pointers are valid.
    let status = unsafe {
        proxy_call_foreign_function(
            name.as_ptr(),
            name.len(),
            arguments.as_ptr(),
            arguments.len(),
            &mut data,
            &mut size,
        )
    };
    match status {
        STATUS_OK => Ok(take_host_buffer(data, size)),
        other => Err(HostError(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_pairs_round_trip() {
        let encoded = encode_header_pairs(&[(":path", "/a"), ("cookie", "a=1"), ("cookie", "b=2")]);
        let decoded = crate::request::HeaderPairs::decode(encoded);
        let pairs: Vec<(&[u8], &[u8])> = decoded.iter().collect();
        assert_eq!(pairs, [(&b":path"[..], &b"/a"[..]), (b"cookie", b"a=1"), (b"cookie", b"b=2")]);
    }

    /// The prepared fields as the host reads them.
    fn decoded(prepared: &PreparedFields) -> Vec<(Vec<u8>, Vec<u8>)> {
        let pairs = crate::request::HeaderPairs::decode(prepared.encode_with(&[]));
        pairs.iter().map(|(name, value)| (name.to_vec(), value.to_vec())).collect()
    }

    fn as_bytes(fields: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        fields.iter().map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec())).collect()
    }

    #[test]
    fn prepared_fields_encode_as_the_fields_sent_one_by_one() {
        let kept = [("content-type", "text/plain"), ("etag", "\"v1\""), ("x-empty", "")];
        let prepared = PreparedFields::new(kept);
        let computed = [("age", "3"), ("cache-status", "wasm-cache; hit")];
        let all: Vec<(&str, &str)> = kept.iter().chain(&computed).copied().collect();
        assert_eq!(prepared.encode_with(&computed), encode_header_pairs(&all));
        assert_eq!(prepared.encode_with(&[]), encode_header_pairs(&kept));
        assert_eq!(decoded(&prepared), as_bytes(&kept));
    }

    #[test]
    fn prepared_fields_leave_out_and_count_what_no_reply_may_carry() {
        let prepared = PreparedFields::new([("x-ok", "1"), ("x-bad", "a\r\nset-cookie: s=1"), ("Bad Name", "2")]);
        assert_eq!(decoded(&prepared), as_bytes(&[("x-ok", "1")]));
        assert_eq!(prepared.refused, 2, "counted on every reply that would have carried them");
        assert_eq!(prepared.encode_with(&[]), encode_header_pairs(&[("x-ok", "1")]));
    }

    #[test]
    fn malformed_header_pairs_never_panic() {
        let encoded = encode_header_pairs(&[("x", "yz")]);
        for cut in 0..encoded.len() {
            let cut = crate::request::HeaderPairs::decode(encoded[..cut].to_vec());
            assert!(cut.iter().count() <= 1);
        }
        // A count that claims far more entries than the buffer holds.
        assert!(crate::request::HeaderPairs::decode(vec![255, 255, 255, 255, 1, 0]).is_empty());
        assert!(crate::request::HeaderPairs::decode(Vec::new()).is_empty());
    }
}
