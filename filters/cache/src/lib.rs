//! cache.wasm: an RFC 9111 shared HTTP cache in shared data, visible to every
//! worker and bounded in memory. This file is the host glue; the rules are in
//! `http.rs` and `policy.rs`, the storage in `store.rs`.

pub mod collapse;
pub mod config;
pub mod http;
pub mod policy;
pub mod store;

#[cfg(test)]
#[global_allocator]
static ALLOCATOR: gateway_common::testing::CountingAllocator = gateway_common::testing::CountingAllocator;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use gateway_common::config::ConfigErrors;
use gateway_common::hash::{digests_equal, IntegerHashing};
use gateway_common::host::{self, LogLevel, MapType};
use gateway_common::metrics::{BatchedCounter, Metric};
use gateway_common::platform::{Ffi, Host, OnRefusedReply, ReplyFailures};
use gateway_common::problem::{Problem, RequestFacts};
use gateway_common::request::{read_request_from, unescape_bytes, RequestHeaders};
use gateway_common::shared::{HostStore, SharedData, Store};
use gateway_common::skeleton::{metric_prefix, Module, RootCalls};
use gateway_common::text::push_i64;
use gateway_common::verdict::{Body, Edit, Reply, Verdict};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use sha2::{Digest, Sha256};

use crate::collapse::{Waiter, Waiting};
use crate::config::{Cache, CacheConfig};
use crate::policy::{Exchange, LookupPlan};
use crate::store::{FillRole, Location, Meta, Table, Variant};

proxy_wasm::main! {{
    gateway_common::skeleton::install::<CacheModule>();
}}

/// How long a re-fetch after a mismatching 304 may take.
const REFETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Decoded metadata values a VM keeps at most (see `Shared::decoded`).
const DECODED_CAPACITY: usize = 4096;

/// Body bytes a VM keeps for its hits (per worker, outside `max_total_bytes`).
const LOCAL_BODY_BYTES: usize = 8 * 1024 * 1024;

/// With collapsing on, the root polls other workers' fills this often (ms).
const COLLAPSE_POLL_MS: u64 = 50;

/// Filter-state property (Envoy: `wasm.cache_status`) for access logs.
const STATUS_PROPERTY: &str = "cache_status";

struct Metrics {
    /// Counted in the VM, handed to the host by the root's tick.
    hits: BatchedCounter,
    misses: BatchedCounter,
    stores: Metric,
    revalidated_304: Metric,
    revalidated_200: Metric,
    stale_if_error: Metric,
    invalidations: Metric,
    purges: Metric,
    reply_failures: ReplyFailures,
    bytes: Metric,
    evictions: Metric,
    /// Waiting requests answered from the entry another request filled.
    collapsed: Metric,
    /// Waiting requests that went to the origin after all (deadline, not storable).
    collapse_forwarded: Metric,
}

struct Shared {
    cache: Cache,
    table: Table,
    metrics: Metrics,
    /// Decoded metadata per way and the version the index names: a hit on an
    /// unchanged entry reads only the index and the body.
    decoded: RefCell<DecodedWays>,
    /// Bodies this VM served recently, per (set, way, position, generation).
    local_bodies: RefCell<LocalBodies>,
    /// stale-while-revalidate refreshes waiting for the root context's next tick
    /// (streams cannot outlive their answer, the root can), and the keys in flight.
    revalidations: RefCell<Vec<Background>>,
    in_flight: RefCell<HashSet<String>>,
    /// Request collapsing: misses filled by this VM's streams, streams waiting.
    waiting: RefCell<Waiting>,
    /// Waiting streams answered from a fill (their own response callbacks then
    /// see that local reply, not an origin response).
    answered_while_waiting: RefCell<HashSet<u32>>,
}

/// Per (set, way): the index version and the metadata decoded at it.
type DecodedWays = HashMap<(u32, usize), (u32, Rc<Meta>), IntegerHashing>;

/// A body's (set, way, position, generation).
type BodyKey = (u32, usize, usize, u64);

/// Bodies kept in this VM, bounded in bytes (at capacity it starts over).
#[derive(Default)]
struct LocalBodies {
    bodies: HashMap<BodyKey, Rc<[u8]>, IntegerHashing>,
    bytes: usize,
}

impl LocalBodies {
    fn get(&self, key: &BodyKey) -> Option<&Rc<[u8]>> {
        self.bodies.get(key)
    }

    fn insert(&mut self, key: BodyKey, body: Rc<[u8]>) {
        self.bytes += body.len();
        if let Some(old) = self.bodies.insert(key, body) {
            self.bytes -= old.len();
        }
    }

    fn clear(&mut self) {
        self.bodies.clear();
        self.bytes = 0;
    }
}

/// An origin response as the response-headers callback sees it.
struct OriginResponse<'h> {
    status: u16,
    headers: &'h [(String, Vec<u8>)],
    end_of_stream: bool,
}

/// A background revalidation of a stale entry served under stale-while-revalidate.
struct Background {
    exchange: Exchange,
    variant: Variant,
    cluster: String,
    headers: Vec<(String, String)>,
}

impl Shared {
    /// The per-VM state; `None` when the shared-data keys cannot be created.
    /// Metrics are named `<prefix>.*` (see `skeleton::metric_prefix`).
    fn new(host: &impl Host, cache: Cache, instance: &str) -> Option<Self> {
        let config = &cache.config;
        let table = Table::open(
            &SharedData(host),
            instance,
            config.slots,
            usize::from(config.max_variants),
            config.max_total_bytes,
        )
        .ok()?;
        let prefix = metric_prefix(CacheModule::NAME, instance);
        let metrics = Metrics {
            hits: BatchedCounter::counter_on(host, &format!("{prefix}.hits")),
            misses: BatchedCounter::counter_on(host, &format!("{prefix}.misses")),
            stores: Metric::counter_on(host, &format!("{prefix}.stores")),
            revalidated_304: Metric::counter_on(host, &format!("{prefix}.revalidations.not_modified")),
            revalidated_200: Metric::counter_on(host, &format!("{prefix}.revalidations.replaced")),
            stale_if_error: Metric::counter_on(host, &format!("{prefix}.stale_if_error")),
            invalidations: Metric::counter_on(host, &format!("{prefix}.invalidations")),
            purges: Metric::counter_on(host, &format!("{prefix}.purges")),
            reply_failures: ReplyFailures::new(host, &prefix),
            bytes: Metric::gauge_on(host, &format!("{prefix}.bytes_stored")),
            evictions: Metric::gauge_on(host, &format!("{prefix}.evictions")),
            collapsed: Metric::counter_on(host, &format!("{prefix}.collapsed")),
            collapse_forwarded: Metric::counter_on(host, &format!("{prefix}.collapse_forwarded")),
        };
        Some(Self {
            cache,
            table,
            metrics,
            decoded: RefCell::new(HashMap::default()),
            local_bodies: RefCell::new(LocalBodies::default()),
            revalidations: RefCell::new(Vec::new()),
            in_flight: RefCell::new(HashSet::new()),
            waiting: RefCell::new(Waiting::default()),
            answered_while_waiting: RefCell::new(HashSet::new()),
        })
    }

    /// Releases waiting streams: each is answered from the stored entry if it
    /// now has a usable one for it, else sent on to the origin. Host calls act
    /// on each waiter's context, then on `back_to` (the caller's) again.
    fn wake(&self, host: &impl Host, key: &str, waiters: Vec<Waiter>, back_to: u32) {
        if waiters.is_empty() {
            return;
        }
        for waiter in waiters {
            if host.set_effective_context(waiter.context_id).is_err() {
                continue; // the stream is gone
            }
            if self.answer_waiter(host, key, &waiter) {
                self.answered_while_waiting.borrow_mut().insert(waiter.context_id);
                self.metrics.collapsed.increment_on(host);
            } else {
                let _ = host.resume_request();
                self.metrics.collapse_forwarded.increment_on(host);
            }
        }
        let _ = host.set_effective_context(back_to);
    }

    /// Answers a waiter from the entry, if it holds a fresh variant for it.
    fn answer_waiter(&self, host: &impl Host, key: &str, waiter: &Waiter) -> bool {
        let config = &self.cache.config;
        let now = host.now_nanos() / 1_000_000_000;
        let Some((location, meta)) = self.lookup(&SharedData(host), key) else { return false };
        let Some(variant) = policy::select(&meta, &waiter.request, &config.upstream_header) else { return false };
        let request_cc = policy::request_cache_control(config, &waiter.request);
        let LookupPlan::Serve { .. } = policy::plan_lookup(&request_cc, true, Some(variant), now) else { return false };
        let Some(body) = self.body(&SharedData(host), &location, variant) else { return false };
        let status_value = format!("{}; {}; collapsed", config.cache_status_name, waiter.forward);
        let property = status_value.as_bytes().to_vec();
        let reply = policy::stored_reply(variant, body, &waiter.request, waiter.head, status_value, now);
        // `Continue` on a refused reply: the caller then sends the waiter on.
        let action = Verdict::answer(reply, OnRefusedReply::Continue)
            .property(STATUS_PROPERTY, property)
            .apply(host, &self.metrics.reply_failures);
        action == Action::Pause
    }

    /// A variant's body: from this VM's copy when it holds that generation (a
    /// generation's body never changes, and the caller just read the index, so
    /// the variant is current), else from shared data (then kept, within
    /// `LOCAL_BODY_BYTES`). Shared, not copied: a hit answers with these bytes.
    fn body(&self, data: &impl Store, location: &Location, variant: &Variant) -> Option<Rc<[u8]>> {
        let key = (location.set, location.way, variant.position, variant.generation);
        if let Some(body) = self.local_bodies.borrow().get(&key) {
            return Some(Rc::clone(body));
        }
        let body: Rc<[u8]> = Rc::from(self.table.body(data, location, variant).ok().flatten()?);
        let mut local = self.local_bodies.borrow_mut();
        if local.bytes + body.len() > LOCAL_BODY_BYTES {
            local.clear();
        }
        if body.len() <= LOCAL_BODY_BYTES {
            local.insert(key, Rc::clone(&body));
        }
        Some(body)
    }

    /// Keeps an entry this VM just stored decoded, for its next hits.
    fn remember(&self, found: store::Found) {
        let location = found.location;
        self.keep_decoded((location.set, location.way), location.version, Rc::new(found.meta));
    }

    /// The map is bounded: at capacity it starts over.
    fn keep_decoded(&self, way: (u32, usize), version: u32, meta: Rc<Meta>) {
        let mut decoded = self.decoded.borrow_mut();
        if decoded.len() >= DECODED_CAPACITY {
            decoded.clear();
        }
        decoded.insert(way, (version, meta));
    }

    /// The metadata stored for `key` (with its location), decoded at most once
    /// per version in this VM.
    fn lookup(&self, data: &impl Store, key: &str) -> Option<(Location, Rc<Meta>)> {
        let location = self.table.locate(data, key).ok()??;
        let way = (location.set, location.way);
        let cached = self.decoded.borrow().get(&way).cloned();
        let meta = match cached {
            Some((version, meta)) if version == location.version => meta,
            _ => {
                let meta = Rc::new(self.table.read_meta(data, location.set, location.way).ok()??);
                // Committed and current: later hits skip reading it.
                if meta.version() == location.version {
                    self.keep_decoded(way, location.version, Rc::clone(&meta));
                }
                meta
            }
        };
        (meta.key == key).then_some((location, meta))
    }
}

/// cache.wasm as a module of the shared root (`gateway_common::skeleton`). The
/// root publishes the gauges and runs stale-while-revalidate refreshes.
struct CacheModule;

impl Module for CacheModule {
    const NAME: &'static str = "cache";
    type Config = CacheConfig;
    type Compiled = Cache;
    type Shared = Shared;
    /// A background revalidation in flight.
    type RootCall = Background;

    fn compile(config: &CacheConfig) -> Result<Cache, ConfigErrors> {
        config.compile()
    }

    fn start(host: &Ffi, cache: Cache, instance: &str) -> Option<Shared> {
        let shared = Shared::new(host, cache, instance);
        if shared.is_none() {
            host.log(LogLevel::Error, "cache: cannot initialize shared data");
        }
        shared
    }

    fn stream(shared: &Rc<Shared>, context_id: u32) -> Box<dyn HttpContext> {
        Box::new(CacheStream::new(Ffi, Rc::clone(shared), context_id))
    }

    /// With collapsing on, waiters of other workers' fills are polled this often.
    fn tick_period(shared: &Shared) -> Option<Duration> {
        Some(if shared.cache.config.collapse_timeout_ms > 0 {
            Duration::from_millis(COLLAPSE_POLL_MS)
        } else {
            Duration::from_secs(1)
        })
    }

    /// Publishes the bytes gauge (every VM writes the same value, read from the
    /// shared counter) and starts queued stale-while-revalidate refreshes.
    fn on_tick(shared: &Rc<Shared>, calls: &mut RootCalls<Background>) {
        if let Ok(bytes) = shared.table.bytes(&HostStore) {
            shared.metrics.bytes.record(bytes);
        }
        if let Ok(evictions) = shared.table.evictions(&HostStore) {
            shared.metrics.evictions.record(evictions);
        }
        shared.metrics.hits.flush_on(&Ffi);
        shared.metrics.misses.flush_on(&Ffi);
        release_finished_waits(shared, &Ffi, calls.root_context_id());
        let jobs: Vec<Background> = shared.revalidations.borrow_mut().drain(..).collect();
        for job in jobs {
            let headers: Vec<(&str, &str)> = job.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            match host::dispatch_http_call(&job.cluster, &headers, &[], Duration::from_secs(10)) {
                Ok(token) => calls.insert(token, job),
                Err(_) => {
                    shared.in_flight.borrow_mut().remove(&job.exchange.key);
                }
            }
        }
    }

    fn on_call_response(shared: &Rc<Shared>, job: Background, body_size: usize) {
        shared.in_flight.borrow_mut().remove(&job.exchange.key);
        let headers = lower_case_names(host::headers(MapType::HttpCallResponseHeaders).unwrap_or_default());
        let status = status_of(&headers);
        let now = host::now_nanos() / 1_000_000_000;
        let config = &shared.cache.config;
        if status == 304 && !policy::selected_for_update(&job.variant, &headers) {
            // Not the representation we hold: it must not be updated (RFC 9111
            // 4.3.4), and it is outdated; the next request fetches it afresh.
            let _ = shared.table.remove(&HostStore, &job.exchange.key);
        } else if status == 304 {
            let updated = policy::refreshed(config, &job.variant, &headers, job.exchange.request_time, now);
            if shared.table.refresh(&HostStore, &job.exchange.key, &updated) == Ok(true) {
                shared.metrics.revalidated_304.increment();
            }
        } else if let Ok(variant) = policy::storable(config, &job.exchange, status, &headers, now) {
            let body = host::http_call_response_body(body_size).unwrap_or_default();
            if body.len() as u64 <= config.max_entry_bytes
                && shared.table.store(&HostStore, &job.exchange.key, variant, &body, now) == Ok(true)
            {
                shared.metrics.revalidated_200.increment();
                shared.metrics.stores.increment();
            }
        }
    }
}

/// Root tick: waiters past their deadline, and waiters whose fill (on this worker
/// or another) ended, are released: answered from the cache or sent on. Only the
/// root answers waiters: a local reply sent on a waiting stream from another
/// stream's callback never reached an HTTP/2 client (measured: the stream hung),
/// while one sent from the root's tick does, over HTTP/1.1 and HTTP/2.
fn release_finished_waits(shared: &Shared, host: &impl Host, root_context_id: u32) {
    if shared.waiting.borrow().is_empty() {
        return;
    }
    let now_ms = host.now_nanos() / 1_000_000;
    let expired = shared.waiting.borrow_mut().take_expired(now_ms);
    for (key, waiter) in expired {
        shared.wake(host, &key, vec![waiter], root_context_id);
    }
    let unled = shared.waiting.borrow().not_led_here();
    for key in unled {
        if shared.table.fill_running(&SharedData(host), &key, now_ms) != Ok(true) {
            let waiters = shared.waiting.borrow_mut().take(&key);
            shared.wake(host, &key, waiters, root_context_id);
        }
    }
}

fn status_of(headers: &[(String, Vec<u8>)]) -> u16 {
    headers
        .iter()
        .find(|(name, _)| name == ":status")
        .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse::<u16>().ok())
        .unwrap_or(0)
}

/// What the request side decided, for the response side.
enum Pending {
    None,
    /// Forwarded; the response may be stored.
    Miss {
        exchange: Exchange,
        head: bool,
        forward: &'static str,
    },
    /// Forwarded with our validators for a stored variant.
    Revalidate {
        exchange: Exchange,
        /// Boxed: the largest variant by far.
        variant: Box<Variant>,
        client: RequestHeaders,
        head: bool,
    },
    /// An unsafe method: on success, invalidate these keys (plus Location).
    Invalidate {
        request: RequestHeaders,
    },
    /// Paused while another request fills this entry (collapsing); resumed, it
    /// was sent to the origin itself and its response may be stored.
    Collapsed {
        exchange: Exchange,
        head: bool,
        forward: &'static str,
    },
    /// The origin's 304 named a representation we do not hold: the response is
    /// held while the request is sent again without our validators.
    Refetch {
        exchange: Exchange,
        head: bool,
    },
}

struct Collecting {
    key: String,
    variant: Variant,
    body: Vec<u8>,
}

struct CacheStream<H: Host> {
    host: H,
    shared: Rc<Shared>,
    context_id: u32,
    pending: Pending,
    collecting: Option<Collecting>,
    /// The key whose fill this stream leads (collapsing).
    leading: Option<String>,
}

impl<H: Host> Context for CacheStream<H> {
    /// A stream that ends while leading a fill hands its waiters on; one that
    /// ends while waiting is forgotten.
    fn on_done(&mut self) -> bool {
        self.finish_fill();
        self.shared.waiting.borrow_mut().forget(self.context_id);
        self.shared.answered_while_waiting.borrow_mut().remove(&self.context_id);
        true
    }

    /// The answer of a re-fetch (see `Pending::Refetch`): it replaces the held 304.
    fn on_http_call_response(&mut self, _token_id: u32, num_headers: usize, body_size: usize, _num_trailers: usize) {
        let Pending::Refetch { exchange, head } = std::mem::replace(&mut self.pending, Pending::None) else { return };
        let headers = lower_case_names(if num_headers > 0 {
            self.host.header_pairs(MapType::HttpCallResponseHeaders).unwrap_or_default()
        } else {
            Default::default()
        });
        let status = status_of(&headers);
        let body =
            if body_size > 0 { self.host.http_call_response_body(body_size).unwrap_or_default() } else { Vec::new() };
        let shared = Rc::clone(&self.shared);
        let now = self.now_seconds();
        let detail = if status == 0 {
            "fwd=stale; detail=refetch-failed".to_string()
        } else {
            let stored = policy::storable(&shared.cache.config, &exchange, status, &headers, now)
                .ok()
                .filter(|_| body.len() as u64 <= shared.cache.config.max_entry_bytes)
                .and_then(|variant| {
                    shared.table.store_found(&SharedData(&self.host), &exchange.key, variant, &body, now).ok().flatten()
                });
            let stored_detail = if let Some(found) = stored {
                shared.metrics.stores.increment_on(&self.host);
                shared.remember(found);
                "; stored"
            } else {
                ""
            };
            format!("fwd=stale; fwd-status={status}; detail=validator-mismatch{stored_detail}")
        };
        let reply = if status == 0 {
            Problem::new(
                502,
                "refetch-failed",
                "Bad Gateway",
                "the origin's 304 did not match the stored response, and fetching it again failed",
            )
            .reply(&RequestFacts::of(&exchange.selectors_request))
        } else {
            let headers = policy::replayed_headers(&headers);
            let body = if head { Body::default() } else { body.into() };
            Reply::new(u32::from(status), headers, body)
        };
        let status_value = self.status_header(&detail);
        let mut reply = reply;
        reply.headers.push(("cache-status".into(), status_value.clone()));
        // Refused (never seen), the held response stays held until Envoy times it out.
        let _ = Verdict::answer(reply, OnRefusedReply::Hold)
            .property(STATUS_PROPERTY, status_value.into_bytes())
            .apply(&self.host, &shared.metrics.reply_failures);
    }
}

fn lower_case_names(pairs: gateway_common::request::HeaderPairs) -> Vec<(String, Vec<u8>)> {
    pairs.iter().map(|(name, value)| (String::from_utf8_lossy(name).to_ascii_lowercase(), value.to_vec())).collect()
}

gateway_common::stream_callbacks!(request_headers, response_headers, response_body, done);

impl<H: Host> HttpContext for CacheStream<H> {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let request = match read_request_from(&self.host) {
            Ok(request) => request,
            Err(action) => return action,
        };
        match request.method() {
            b"GET" | b"HEAD" => self.lookup(request),
            b"PURGE" if self.shared.cache.purge.is_some() => self.purge(&request),
            method if policy::is_safe_method(method) => Action::Continue,
            // Every unsafe method, known or not (RFC 9111 4.4).
            _ => {
                self.pending = Pending::Invalidate { request };
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        if matches!(pending, Pending::None) {
            return Action::Continue;
        }
        let headers = lower_case_names(self.host.header_pairs(MapType::HttpResponseHeaders).unwrap_or_default());
        let status = status_of(&headers);
        match pending {
            Pending::None => Action::Continue,
            Pending::Invalidate { request } => {
                if (200..400).contains(&status) {
                    self.invalidate(&request, &headers);
                }
                Action::Continue
            }
            Pending::Revalidate { exchange, variant, client, head } => {
                let response = OriginResponse { status, headers: &headers, end_of_stream };
                self.revalidated(exchange, *variant, client, head, &response)
            }
            Pending::Miss { exchange, head, forward } => {
                self.consider_storing(exchange, head, status, &headers, forward, end_of_stream);
                if self.collecting.is_none() {
                    // Stored already (no body) or not storable: the waiters can go.
                    self.finish_fill();
                }
                Action::Continue
            }
            Pending::Collapsed { exchange, head, forward } => {
                if !self.shared.answered_while_waiting.borrow_mut().remove(&self.context_id) {
                    let forward = if forward == "fwd=vary-miss" {
                        "fwd=vary-miss; collapsed=?0"
                    } else {
                        "fwd=uri-miss; collapsed=?0"
                    };
                    self.consider_storing(exchange, head, status, &headers, forward, end_of_stream);
                }
                Action::Continue
            }
            // Only set while the response is held for the re-fetch.
            Pending::Refetch { .. } => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(collecting) = self.collecting.as_mut() else { return Action::Continue };
        if body_size > 0 {
            let chunk = self.host.response_body_chunk(body_size).unwrap_or_default();
            collecting.body.extend_from_slice(&chunk);
        }
        if collecting.body.len() as u64 > self.shared.cache.config.max_entry_bytes {
            // Larger than an entry may be: passes through uncached.
            self.collecting = None;
            self.finish_fill();
            return Action::Continue;
        }
        if end_of_stream {
            if let Some(collecting) = self.collecting.take() {
                let shared = &self.shared;
                let stored = shared.table.store_found(
                    &SharedData(&self.host),
                    &collecting.key,
                    collecting.variant,
                    &collecting.body,
                    self.now_seconds(),
                );
                // The bytes gauge is published by the root's tick.
                if let Ok(Some(found)) = stored {
                    shared.metrics.stores.increment_on(&self.host);
                    shared.remember(found);
                }
            }
            self.finish_fill();
        }
        Action::Continue
    }
}

impl<H: Host> CacheStream<H> {
    fn new(host: H, shared: Rc<Shared>, context_id: u32) -> Self {
        Self { host, shared, context_id, pending: Pending::None, collecting: None, leading: None }
    }

    /// A miss: forwarded, unless an identical miss is already being filled (here
    /// or on another worker): then this stream waits for that fill, at most
    /// `collapse_timeout_ms`.
    fn miss(
        &mut self,
        exchange: Exchange,
        request: &RequestHeaders,
        head: bool,
        forward: &'static str,
        now_ms: u64,
    ) -> Action {
        let shared = Rc::clone(&self.shared);
        shared.metrics.misses.increment();
        let timeout_ms = shared.cache.config.collapse_timeout_ms;
        let key = exchange.key.clone();
        if timeout_ms > 0 && !exchange.request_no_store {
            let role = if shared.waiting.borrow().is_led_here(&key) {
                FillRole::Follow
            } else {
                shared
                    .table
                    .lead_or_follow(&SharedData(&self.host), &key, now_ms, timeout_ms)
                    .unwrap_or(FillRole::Alone)
            };
            match role {
                FillRole::Lead => {
                    shared.waiting.borrow_mut().lead(&key);
                    self.leading = Some(key);
                }
                FillRole::Follow => {
                    let waiter = Waiter {
                        context_id: self.context_id,
                        request: request.clone(),
                        head,
                        forward,
                        deadline_ms: now_ms.saturating_add(timeout_ms),
                    };
                    shared.waiting.borrow_mut().follow(&key, waiter);
                    self.pending = Pending::Collapsed { exchange, head, forward };
                    return Action::Pause;
                }
                FillRole::Alone => {}
            }
        }
        self.pending = Pending::Miss { exchange, head, forward };
        Action::Continue
    }

    /// Ends the fill this stream leads: the lock goes back; the root's next tick
    /// answers the waiters (see `release_finished_waits`).
    fn finish_fill(&mut self) {
        let Some(key) = self.leading.take() else { return };
        let _ = self.shared.table.end_fill(&SharedData(&self.host), &key);
        self.shared.waiting.borrow_mut().release_lead(&key);
    }

    fn now_seconds(&self) -> u64 {
        self.host.now_nanos() / 1_000_000_000
    }

    fn status_header(&self, detail: &str) -> String {
        let name = &self.shared.cache.config.cache_status_name;
        let mut value = String::with_capacity(name.len() + 2 + detail.len());
        value.push_str(name);
        value.push_str("; ");
        value.push_str(detail);
        value
    }

    /// `Cache-Status` of a hit (built by hand: this runs on every hit).
    fn hit_status(&self, ttl: i64, stale_while_revalidate: bool) -> String {
        let mut value = self.status_header("hit; ttl=");
        push_i64(&mut value, ttl);
        if stale_while_revalidate {
            value.push_str("; detail=stale-while-revalidate");
        }
        value
    }

    fn lookup(&mut self, request: RequestHeaders) -> Action {
        let shared = Rc::clone(&self.shared);
        let config = &shared.cache.config;
        let now_ms = self.host.now_nanos() / 1_000_000;
        let now = now_ms / 1000;
        let head = request.method() == b"HEAD";
        let request_cc = policy::request_cache_control(config, &request);
        let key = policy::primary_key(config, &request);
        let authenticated = request.first("authorization").is_some()
            || config.identity_headers.iter().any(|name| request.first(name).is_some());
        let exchange = |request: &RequestHeaders| Exchange {
            key: key.clone(),
            selectors_request: request.clone(),
            authenticated,
            request_no_store: request_cc.no_store,
            request_time: now,
        };
        let found = if request_cc.no_store { None } else { shared.lookup(&SharedData(&self.host), &key) };
        let variant = found.as_ref().and_then(|(_, meta)| policy::select(meta, &request, &config.upstream_header));
        let plan = policy::plan_lookup(&request_cc, found.is_some(), variant, now);
        let location = found.as_ref().map(|(location, _)| *location);
        let stored_body = |variant: &Variant| shared.body(&SharedData(&self.host), location.as_ref()?, variant);
        match (plan, variant) {
            (LookupPlan::GatewayTimeout, _) => self.gateway_timeout(&request),
            (LookupPlan::Serve { ttl }, Some(variant)) => {
                let Some(body) = stored_body(variant) else {
                    // The body is being replaced: treat as a miss.
                    return self.miss(exchange(&request), &request, head, "fwd=miss", now_ms);
                };
                shared.metrics.hits.increment();
                self.serve(variant, body, &request, head, self.hit_status(ttl, false), now)
            }
            (LookupPlan::ServeStaleAndRevalidate { ttl }, Some(variant)) => {
                let Some(body) = stored_body(variant) else {
                    return self.miss(exchange(&request), &request, head, "fwd=miss", now_ms);
                };
                shared.metrics.hits.increment();
                self.queue_background_revalidation(exchange(&request), variant, &request);
                self.serve(variant, body, &request, head, self.hit_status(ttl, true), now)
            }
            (LookupPlan::Revalidate, Some(variant)) => {
                let verdict = Verdict { edits: policy::revalidation_edits(variant), ..Verdict::forward() };
                let _ = verdict.apply(&self.host, &shared.metrics.reply_failures);
                self.pending = Pending::Revalidate {
                    exchange: exchange(&request),
                    variant: Box::new(variant.clone()),
                    client: request.clone(),
                    head,
                };
                Action::Continue
            }
            (LookupPlan::Forward(forward), _) => self.miss(exchange(&request), &request, head, forward, now_ms),
            // A plan to answer always comes with the variant it answers from.
            (_, None) => self.miss(exchange(&request), &request, head, "fwd=miss", now_ms),
        }
    }

    /// Queues one background revalidation per key for the root's next tick. The
    /// cluster is the routing header's (routing.wasm) or Envoy's selected one.
    fn queue_background_revalidation(&self, exchange: Exchange, variant: &Variant, request: &RequestHeaders) {
        let shared = &self.shared;
        if !shared.in_flight.borrow_mut().insert(exchange.key.clone()) {
            return;
        }
        let Some(cluster) = self.upstream_cluster(request) else {
            shared.in_flight.borrow_mut().remove(&exchange.key);
            return;
        };
        let mut headers = vec![
            (":method".to_string(), "GET".to_string()),
            (":path".to_string(), request.target().to_string()),
            // Checked to be ASCII when the request was read.
            (":authority".to_string(), String::from_utf8_lossy(request.authority()).into_owned()),
        ];
        // The headers the stored variant was selected by, so the answer matches it.
        // Selectors keep raw bytes escaped; a value that is not text cannot be
        // sent by this call, and then there is no background revalidation.
        for (name, value) in &variant.selectors {
            if let (false, Some(value)) = (name.starts_with(':'), value) {
                let Ok(raw) = String::from_utf8(unescape_bytes(value)) else {
                    shared.in_flight.borrow_mut().remove(&exchange.key);
                    return;
                };
                headers.push((name.clone(), raw));
            }
        }
        if let Some(etag) = &variant.etag {
            headers.push(("if-none-match".into(), etag.clone()));
        }
        if let Some(modified) = &variant.last_modified {
            headers.push(("if-modified-since".into(), modified.clone()));
        }
        shared.revalidations.borrow_mut().push(Background { exchange, variant: variant.clone(), cluster, headers });
    }

    /// Answers from the stored variant. If the host refuses the answer, the request
    /// goes to the origin (or the origin's response passes through) instead of
    /// hanging until Envoy's timeout: the cache enforces nothing, so forwarding is
    /// always safe.
    fn serve(
        &self,
        variant: &Variant,
        body: Rc<[u8]>,
        client: &RequestHeaders,
        head: bool,
        status_value: String,
        now: u64,
    ) -> Action {
        let property = status_value.as_bytes().to_vec();
        let reply = policy::stored_reply(variant, body, client, head, status_value, now);
        Verdict::answer(reply, OnRefusedReply::Continue)
            .property(STATUS_PROPERTY, property)
            .apply(&self.host, &self.shared.metrics.reply_failures)
    }

    fn gateway_timeout(&self, request: &RequestHeaders) -> Action {
        let status_value = self.status_header("fwd=miss; detail=only-if-cached");
        let problem =
            Problem::new(504, "not-cached", "Gateway Timeout", "only-if-cached: no stored response is usable")
                .with_header("cache-status", status_value);
        self.answer(problem.reply(&RequestFacts::of(request)))
    }

    /// A local answer; refused, the request goes on to the origin (see `serve`).
    fn answer(&self, reply: Reply) -> Action {
        Verdict::answer(reply, OnRefusedReply::Continue).apply(&self.host, &self.shared.metrics.reply_failures)
    }

    fn revalidated(
        &mut self,
        exchange: Exchange,
        variant: Variant,
        client: RequestHeaders,
        head: bool,
        response: &OriginResponse,
    ) -> Action {
        let OriginResponse { status, headers, end_of_stream } = *response;
        let shared = Rc::clone(&self.shared);
        let now = self.now_seconds();
        if status == 304 && !policy::selected_for_update(&variant, headers) {
            // RFC 9111 4.3.4: the 304 names another representation; the stored one
            // must not be updated or used. It is outdated: removed; the client gets
            // the current representation, fetched again without our validators.
            let _ = shared.table.remove(&SharedData(&self.host), &exchange.key);
            return self.refetch(exchange, &client, head);
        }
        if status == 304 {
            let updated = policy::refreshed(&shared.cache.config, &variant, headers, exchange.request_time, now);
            let _ = shared.table.refresh(&SharedData(&self.host), &exchange.key, &updated);
            let stored = shared.lookup(&SharedData(&self.host), &exchange.key);
            if let Some(body) =
                stored.and_then(|(location, _)| shared.body(&SharedData(&self.host), &location, &updated))
            {
                shared.metrics.revalidated_304.increment_on(&self.host);
                return self.serve(&updated, body, &client, head, self.status_header("fwd=stale; fwd-status=304"), now);
            }
            // The stored body went away meanwhile (evicted, replaced): our 304
            // answers nothing the client asked; fetch the representation.
            return self.refetch(exchange, &client, head);
        }
        if status >= 500 {
            let staleness = u64::try_from(-variant.ttl(now)).unwrap_or(0);
            if variant.stale_if_error.is_some_and(|window| staleness <= window) {
                let stored = shared.lookup(&SharedData(&self.host), &exchange.key);
                if let Some(body) =
                    stored.and_then(|(location, _)| shared.body(&SharedData(&self.host), &location, &variant))
                {
                    shared.metrics.stale_if_error.increment_on(&self.host);
                    let detail = format!("hit; fwd=stale; fwd-status={status}");
                    return self.serve(&variant, body, &client, head, self.status_header(&detail), now);
                }
            }
        }
        if status != 304 {
            shared.metrics.revalidated_200.increment_on(&self.host);
        }
        // A new response: store it like a miss.
        self.consider_storing(exchange, head, status, headers, "fwd=stale", end_of_stream);
        Action::Continue
    }

    /// Holds the response and sends the client's request again, without
    /// conditions, to the same upstream (see `Pending::Refetch`).
    fn refetch(&mut self, exchange: Exchange, client: &RequestHeaders, head: bool) -> Action {
        let shared = Rc::clone(&self.shared);
        let cluster = self.upstream_cluster(client);
        let headers = policy::refetch_headers(client);
        let dispatched = cluster.zip(headers).and_then(|(cluster, headers)| {
            let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            self.host.dispatch_http_call(&cluster, &pairs, &[], REFETCH_TIMEOUT).ok()
        });
        if dispatched.is_none() {
            let problem = Problem::new(
                502,
                "refetch-failed",
                "Bad Gateway",
                "the origin's 304 did not match the stored response, and it cannot be fetched again",
            );
            return Verdict::answer(problem.reply(&RequestFacts::of(client)), OnRefusedReply::Continue)
                .apply(&self.host, &shared.metrics.reply_failures);
        }
        self.pending = Pending::Refetch { exchange, head };
        Action::Pause
    }

    /// The cluster a request goes to: the routing header's (routing.wasm) or
    /// the one Envoy selected.
    fn upstream_cluster(&self, request: &RequestHeaders) -> Option<String> {
        request
            .first(&self.shared.cache.config.upstream_header)
            .map(|value| String::from_utf8_lossy(value).into_owned())
            .or_else(|| {
                self.host
                    .property(&["xds", "cluster_name"])
                    .ok()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
            })
    }

    fn consider_storing(
        &mut self,
        exchange: Exchange,
        head: bool,
        status: u16,
        headers: &[(String, Vec<u8>)],
        forward: &'static str,
        end_of_stream: bool,
    ) {
        let shared = Rc::clone(&self.shared);
        let config = &shared.cache.config;
        let content_length = headers
            .iter()
            .find(|(name, _)| name == "content-length")
            .and_then(|(_, value)| std::str::from_utf8(value).ok()?.trim().parse::<u64>().ok());
        let mut detail = format!("{forward}; fwd-status={status}");
        // A response without content (204, `Content-Length: 0`, nothing after the
        // headers) gets no body callback: it is stored now.
        let bodiless = end_of_stream || status == 204 || content_length == Some(0);
        // HEAD responses have no body to store.
        if !head && content_length.is_none_or(|length| length <= config.max_entry_bytes) {
            let now = self.now_seconds();
            if let Ok(variant) = policy::storable(config, &exchange, status, headers, now) {
                if bodiless {
                    if let Ok(Some(found)) =
                        shared.table.store_found(&SharedData(&self.host), &exchange.key, variant, &[], now)
                    {
                        shared.metrics.stores.increment_on(&self.host);
                        shared.remember(found);
                        detail.push_str("; stored");
                    }
                } else {
                    if content_length.is_some() {
                        detail.push_str("; stored");
                    }
                    self.collecting = Some(Collecting { key: exchange.key, variant, body: Vec::new() });
                }
            }
        }
        let value = self.status_header(&detail);
        let _ = Verdict::forward()
            .property(STATUS_PROPERTY, value.as_bytes())
            .edit(Edit::Set(MapType::HttpResponseHeaders, "cache-status".into(), value.into_bytes()))
            .apply(&self.host, &shared.metrics.reply_failures);
    }

    /// RFC 9111 4.4: a successful unsafe request invalidates its URI and the
    /// same-origin URIs in `Location` and `Content-Location`.
    fn invalidate(&self, request: &RequestHeaders, headers: &[(String, Vec<u8>)]) {
        let shared = &self.shared;
        for key in policy::invalidated_keys(&shared.cache.config, request, headers) {
            if shared.table.remove(&SharedData(&self.host), &key) == Ok(true) {
                shared.metrics.invalidations.increment_on(&self.host);
            }
        }
    }

    fn purge(&mut self, request: &RequestHeaders) -> Action {
        let shared = Rc::clone(&self.shared);
        let facts = RequestFacts::of(request);
        let Some(purge) = &shared.cache.purge else { return Action::Continue };
        let presented = request.first(&purge.header).map(|secret| {
            let digest: [u8; 32] = Sha256::digest(secret).into();
            digests_equal(&digest, &purge.secret_sha256)
        });
        if presented != Some(true) {
            let problem = Problem::new(403, "purge-forbidden", "Forbidden", "PURGE needs the configured secret header");
            return self.answer(problem.reply(&facts));
        }
        let key = policy::primary_key(&shared.cache.config, request);
        let removed = shared.table.remove(&SharedData(&self.host), &key) == Ok(true);
        if removed {
            shared.metrics.purges.increment_on(&self.host);
        }
        let body = format!("{{\"purged\":{removed}}}").into_bytes();
        let headers = vec![("content-type".to_string(), "application/json".to_string())];
        self.answer(Reply::new(200, headers, body))
    }
}

/// The glue on `FakeHost`: a miss that stores, a hit served from shared data, and
/// the host calls each costs.
#[cfg(test)]
mod glue_tests {
    use super::*;
    use gateway_common::platform::FakeHost;

    fn shared(host: &FakeHost) -> Rc<Shared> {
        let config: CacheConfig = gateway_common::config::parse_json(br#"{"slots": 64}"#).unwrap();
        Rc::new(Shared::new(host, config.compile().unwrap(), "cache").unwrap())
    }

    fn get(host: &FakeHost, path: &[u8]) {
        host.replace_headers(
            MapType::HttpRequestHeaders,
            &[(":method", b"GET"), (":path", path), (":authority", b"api.test"), ("x-forwarded-proto", b"https")],
        );
    }

    fn stream<'h>(host: &'h FakeHost, shared: &Rc<Shared>) -> CacheStream<&'h FakeHost> {
        CacheStream::new(host, Rc::clone(shared), 1)
    }

    fn store_once(host: &FakeHost, shared: &Rc<Shared>, path: &[u8]) {
        get(host, path);
        let mut miss = stream(host, shared);
        assert_eq!(miss.on_http_request_headers(0, true), Action::Continue);
        host.replace_headers(
            MapType::HttpResponseHeaders,
            &[(":status", b"200"), ("cache-control", b"max-age=60"), ("content-length", b"5")],
        );
        assert_eq!(miss.on_http_response_headers(0, false), Action::Continue);
        host.set_response_body(b"hello");
        assert_eq!(miss.on_http_response_body(5, true), Action::Continue);
    }

    #[test]
    fn budget_a_store_and_a_hit() {
        let host = FakeHost::new();
        let shared = shared(&host);
        host.reset_calls();
        store_once(&host, &shared, b"/a");
        let store_calls = host.calls().len();
        assert_eq!(host.metric("cache.stores"), 1);
        // Request side (read, clock, both candidate index sets, fill lock read
        // and CAS; the misses counter goes to the host on the root's tick) + response side (headers, clock, Cache-Status as header and
        // property) + body (chunk, clock; table: both index sets, the way's
        // metadata, the index CAS that claims the way, the occupancy bit (first
        // entry of its set), byte reservation, body, metadata CAS; metric; the
        // fill lock given back: read and write).
        assert_eq!(store_calls, 25, "{:?}", host.calls());

        host.reset_calls();
        get(&host, b"/a");
        let mut hit = stream(&host, &shared);
        assert_eq!(hit.on_http_request_headers(0, true), Action::Pause);
        let reply = &host.replies()[0];
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, b"hello");
        assert!(reply.headers.iter().any(|(n, v)| n == "cache-status" && v.contains("hit")));
        assert_eq!(
            host.calls(),
            [
                "header_pairs",
                "now_nanos",
                "shared_data",  // index set (the metadata decoded at the store is reused)
                "shared_data",  // body
                "set_property", // (the hits counter goes to the host on the root's tick)
                "send_local_response",
            ]
        );

        // The next hit on this worker uses its copy of that body generation.
        host.reset_calls();
        let mut again = stream(&host, &shared);
        assert_eq!(again.on_http_request_headers(0, true), Action::Pause);
        assert_eq!(host.replies()[1].body, b"hello");
        assert_eq!(host.calls(), ["header_pairs", "now_nanos", "shared_data", "set_property", "send_local_response"]);

        // Replaced by another worker: the index names a new version, the new body is read.
        let other_worker = self::shared(&host); // its own VM state, the same shared data

        store_replacement(&host, &other_worker, b"/a", b"world");
        host.reset_calls();
        let mut after = stream(&host, &shared);
        assert_eq!(after.on_http_request_headers(0, true), Action::Pause);
        assert_eq!(host.replies().last().unwrap().body, b"world");
    }

    /// The allocation budget of a warm hit (metadata and body already in this
    /// VM). Of the 42, 26 are `FakeHost`'s own bookkeeping (call log, copies of
    /// what it returns and records); the glue's are the target, the key, the
    /// index's key, the `Cache-Status` value and its property copy, `Age` and the
    /// reply's own fields, the verdict's property list and the header list sent.
    /// The stored fields and body are shared, not copied.
    #[test]
    fn budget_allocations_of_a_warm_hit() {
        let host = FakeHost::new();
        let shared = shared(&host);
        store_once(&host, &shared, b"/a");
        get(&host, b"/a");
        let mut warm = stream(&host, &shared);
        assert_eq!(warm.on_http_request_headers(0, true), Action::Pause);
        let mut hit = stream(&host, &shared);
        let (action, allocations) =
            gateway_common::testing::allocations_during(|| hit.on_http_request_headers(0, true));
        assert_eq!(action, Action::Pause);
        assert!(allocations <= 42, "{allocations} allocations (was 52 with the stored fields copied per hit)");
    }

    fn store_replacement(host: &FakeHost, other: &Rc<Shared>, path: &[u8], body: &[u8]) {
        get(host, path);
        let mut miss = CacheStream::new(host, Rc::clone(other), 99);
        // Fresh in the cache: force a replacement with a no-cache request.
        host.replace_headers(
            MapType::HttpRequestHeaders,
            &[
                (":method", b"GET"),
                (":path", path),
                (":authority", b"api.test"),
                ("x-forwarded-proto", b"https"),
                ("cache-control", b"no-cache"),
            ],
        );
        assert_eq!(miss.on_http_request_headers(0, true), Action::Continue);
        let length = body.len().to_string();
        host.replace_headers(
            MapType::HttpResponseHeaders,
            &[(":status", b"200"), ("cache-control", b"max-age=60"), ("content-length", length.as_bytes())],
        );
        miss.on_http_response_headers(0, false);
        host.set_response_body(body);
        miss.on_http_response_body(body.len(), true);
        get(host, path);
    }

    #[test]
    fn identical_misses_wait_for_the_first_and_are_answered_from_its_store() {
        let host = FakeHost::new();
        let shared = shared(&host);
        get(&host, b"/collapse");
        let mut leader = CacheStream::new(&host, Rc::clone(&shared), 7);
        assert_eq!(leader.on_http_request_headers(0, true), Action::Continue, "the first miss goes on");
        let mut waiters: Vec<_> = (8..10).map(|id| CacheStream::new(&host, Rc::clone(&shared), id)).collect();
        for waiter in &mut waiters {
            assert_eq!(waiter.on_http_request_headers(0, true), Action::Pause, "identical misses wait");
        }
        host.replace_headers(
            MapType::HttpResponseHeaders,
            &[(":status", b"200"), ("cache-control", b"max-age=60"), ("content-length", b"5")],
        );
        leader.on_http_response_headers(0, false);
        host.set_response_body(b"hello");
        leader.on_http_response_body(5, true);
        assert!(host.replies().is_empty(), "waiters are answered by the root, not in the leader's callback");
        release_finished_waits(&shared, &host, 1);
        let replies = host.replies();
        assert_eq!(replies.iter().map(|reply| reply.context).collect::<Vec<_>>(), [8, 9], "each on its own stream");
        assert!(replies.iter().all(|reply| reply.body == b"hello"));
        let status = |reply: &gateway_common::platform::LocalReply| {
            reply.headers.iter().find(|(name, _)| name == "cache-status").map(|(_, value)| value.clone())
        };
        assert_eq!(status(&replies[0]).as_deref(), Some("wasm-cache; fwd=uri-miss; collapsed"));
        assert_eq!(host.effective_context(), 1, "host calls act on the root again");
        assert_eq!(host.metric("cache.collapsed"), 2);
        assert_eq!(host.resumed(), 0);
    }

    #[test]
    fn waiters_go_on_themselves_when_the_response_is_not_storable() {
        let host = FakeHost::new();
        let shared = shared(&host);
        get(&host, b"/private");
        let mut leader = CacheStream::new(&host, Rc::clone(&shared), 7);
        leader.on_http_request_headers(0, true);
        let mut waiter = CacheStream::new(&host, Rc::clone(&shared), 8);
        assert_eq!(waiter.on_http_request_headers(0, true), Action::Pause);
        host.replace_headers(MapType::HttpResponseHeaders, &[(":status", b"200"), ("cache-control", b"private")]);
        leader.on_http_response_headers(0, false);
        release_finished_waits(&shared, &host, 1);
        assert_eq!(host.resumed_contexts(), [8], "sent on to the origin");
        assert_eq!(host.metric("cache.collapse_forwarded"), 1);
        // Its own response then passes through as a miss that says it waited.
        waiter.on_http_response_headers(0, false);
        let status = host.header_values(MapType::HttpResponseHeaders, "cache-status");
        assert_eq!(status, [b"wasm-cache; fwd=uri-miss; collapsed=?0; fwd-status=200".to_vec()]);
        // A later miss leads a new fill: the lock was given back.
        get(&host, b"/private");
        let mut next = CacheStream::new(&host, Rc::clone(&shared), 9);
        assert_eq!(next.on_http_request_headers(0, true), Action::Continue);
    }

    #[test]
    fn the_scheme_separates_entries() {
        let host = FakeHost::new();
        let shared = shared(&host);
        store_once(&host, &shared, b"/s");
        host.replace_headers(
            MapType::HttpRequestHeaders,
            &[(":method", b"GET"), (":path", b"/s"), (":authority", b"api.test"), ("x-forwarded-proto", b"http")],
        );
        let mut plain = stream(&host, &shared);
        assert_eq!(plain.on_http_request_headers(0, true), Action::Continue, "an https entry is no http hit");
    }

    #[test]
    fn a_refused_hit_reply_forwards_the_request_instead_of_hanging() {
        let host = FakeHost::new();
        let shared = shared(&host);
        store_once(&host, &shared, b"/r");
        get(&host, b"/r");
        host.refuse_local_reply.set(true);
        let mut hit = stream(&host, &shared);
        assert_eq!(hit.on_http_request_headers(0, true), Action::Continue);
        assert_eq!(host.metric("cache.local_reply_failed"), 1);
    }
}
