//! Decisions as data. A filter's glue turns what its logic decided into a
//! [`Verdict`]: the header edits, filter-state properties, counter increments,
//! host extension calls and the local reply, if any. `Verdict::apply` is the one
//! place that performs them on a [`Host`], in a fixed order, and handles a refused
//! reply as the module chose ([`OnRefusedReply`]). Unit tests assert on verdicts
//! directly; glue tests on `FakeHost` pin what applying them costs.

use std::rc::Rc;

use proxy_wasm::types::Action;

use crate::host::{MapType, PreparedFields};
use crate::metrics::Metric;
use crate::platform::{Host, OnRefusedReply, ReplyFailures};

/// One header change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    Remove(MapType, String),
    Set(MapType, String, Vec<u8>),
    Add(MapType, String, Vec<u8>),
}

/// A local reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    /// Fields kept ready for many replies (a cache's stored response headers),
    /// sent before `headers`: shared, not copied into every reply.
    pub shared_headers: Option<SharedFields>,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    pub grpc_status: Option<u32>,
}

/// Header fields shared by whoever keeps them and the replies sending them,
/// checked and encoded for the host once, when they are kept (see
/// [`PreparedFields`]). Reads as the slice of fields.
#[derive(Clone, Default)]
pub struct SharedFields(Rc<KeptFields>);

#[derive(Default)]
struct KeptFields {
    fields: Box<[(String, String)]>,
    prepared: PreparedFields,
}

impl SharedFields {
    /// The fields as the host takes them.
    pub fn prepared(&self) -> &PreparedFields {
        &self.0.prepared
    }

    /// Whether both are the same kept fields (not merely equal ones).
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        Rc::ptr_eq(&a.0, &b.0)
    }
}

impl From<Vec<(String, String)>> for SharedFields {
    fn from(fields: Vec<(String, String)>) -> Self {
        let prepared = PreparedFields::new(fields.iter().map(|(name, value)| (name.as_str(), value.as_str())));
        Self(Rc::new(KeptFields { fields: fields.into_boxed_slice(), prepared }))
    }
}

impl std::ops::Deref for SharedFields {
    type Target = [(String, String)];

    fn deref(&self) -> &[(String, String)] {
        &self.0.fields
    }
}

impl PartialEq for SharedFields {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for SharedFields {}

impl std::fmt::Debug for SharedFields {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(formatter)
    }
}

impl Reply {
    pub fn new(status: u32, headers: Vec<(String, String)>, body: impl Into<Body>) -> Self {
        Self { status, shared_headers: None, headers, body: body.into(), grpc_status: None }
    }

    /// Every header field of the reply, in the order they are sent.
    pub fn all_headers(&self) -> impl Iterator<Item = &(String, String)> {
        self.shared_headers.iter().flat_map(|shared| shared.iter()).chain(&self.headers)
    }

    /// The first value of a header field (for tests and for callers that check
    /// what a reply says).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.all_headers().find(|(field, _)| field == name).map(|(_, value)| value.as_str())
    }
}

/// A local reply's body: bytes of its own, or bytes shared with whoever keeps
/// them (a cache hit answers with the stored body itself: a copy per hit cost
/// an allocation and a copy of the whole body, 64 KiB and more).
#[derive(Debug, Clone)]
pub enum Body {
    Owned(Vec<u8>),
    Shared(Rc<[u8]>),
}

impl Default for Body {
    fn default() -> Self {
        Body::Owned(Vec::new())
    }
}

impl std::ops::Deref for Body {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Body::Owned(bytes) => bytes,
            Body::Shared(bytes) => bytes,
        }
    }
}

/// Bodies are equal when their bytes are, however they are held.
impl PartialEq for Body {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Body {}

impl<T: AsRef<[u8]> + ?Sized> PartialEq<T> for Body {
    fn eq(&self, other: &T) -> bool {
        **self == *other.as_ref()
    }
}

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Self {
        Body::Owned(bytes)
    }
}

impl From<Rc<[u8]>> for Body {
    fn from(bytes: Rc<[u8]>) -> Self {
        Body::Shared(bytes)
    }
}

/// What a callback decided, applied by [`Verdict::apply`].
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub counters: Vec<(Metric, i64)>,
    pub properties: Vec<(&'static str, Vec<u8>)>,
    pub edits: Vec<Edit>,
    /// Host extensions to call (e.g. Envoy's `clear_route_cache`); absence is fine.
    pub foreign_calls: Vec<&'static str>,
    /// Answer locally instead of continuing.
    pub reply: Option<(Reply, OnRefusedReply)>,
}

impl Verdict {
    /// Continue the request (after the effects).
    pub fn forward() -> Self {
        Self::default()
    }

    /// Answer locally; `on_refused` says what happens if the host refuses.
    pub fn answer(reply: Reply, on_refused: OnRefusedReply) -> Self {
        Self { reply: Some((reply, on_refused)), ..Self::default() }
    }

    pub fn count(mut self, metric: Metric) -> Self {
        self.counters.push((metric, 1));
        self
    }

    pub fn count_by(mut self, metric: Metric, by: i64) -> Self {
        self.counters.push((metric, by));
        self
    }

    pub fn property(mut self, name: &'static str, value: impl Into<Vec<u8>>) -> Self {
        self.properties.push((name, value.into()));
        self
    }

    pub fn edit(mut self, edit: Edit) -> Self {
        self.edits.push(edit);
        self
    }

    pub fn call(mut self, foreign_function: &'static str) -> Self {
        self.foreign_calls.push(foreign_function);
        self
    }

    /// The header edits on one map, in order (for tests and for callers that
    /// need to know what a verdict changes).
    pub fn edits_of(&self, map: MapType) -> impl Iterator<Item = &Edit> {
        self.edits.iter().filter(move |edit| {
            let (Edit::Remove(m, _) | Edit::Set(m, _, _) | Edit::Add(m, _, _)) = edit;
            *m as u32 == map as u32
        })
    }

    /// Performs the verdict: counters, properties, header edits, extension calls,
    /// then the reply. Values `field.rs` refuses are skipped (and counted there);
    /// any other failed host call is counted and logged once by `failures`; a
    /// refused reply goes to `failures` with the verdict's policy.
    pub fn apply(self, host: &impl Host, failures: &ReplyFailures) -> Action {
        for (metric, by) in &self.counters {
            metric.add_on(host, *by);
        }
        for (name, value) in &self.properties {
            failures.host_call(host, "set_property", host.set_property(&[name], value));
        }
        for edit in &self.edits {
            let (what, result) = match edit {
                Edit::Remove(map, name) => ("remove_header", host.remove_header(*map, name)),
                Edit::Set(map, name, value) => ("set_header", host.set_header(*map, name, value)),
                Edit::Add(map, name, value) => ("add_header", host.add_header(*map, name, value)),
            };
            failures.host_call(host, what, result);
        }
        for function in &self.foreign_calls {
            // Optional host extensions: their absence is not a failure.
            let _ = host.call_foreign_function(function, b"");
        }
        match self.reply {
            None => Action::Continue,
            Some((reply, on_refused)) => {
                let headers: Vec<(&str, &str)> =
                    reply.headers.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
                let sent = host.send_local_response(
                    reply.status,
                    reply.shared_headers.as_ref(),
                    &headers,
                    &reply.body,
                    reply.grpc_status,
                );
                failures.after(host, sent, on_refused)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::FakeHost;

    #[test]
    fn apply_performs_effects_in_order_and_counts_failed_host_calls() {
        let host = FakeHost::new();
        let failures = ReplyFailures::new(&host, "m");
        let metric = Metric::counter_on(&host, "m.requests");
        host.reset_calls();
        let verdict = Verdict::forward()
            .count(metric)
            .property("p", b"v".to_vec())
            .edit(Edit::Set(MapType::HttpRequestHeaders, "x-a".into(), b"1".to_vec()))
            .edit(Edit::Set(MapType::HttpRequestHeaders, "x-b".into(), b"bad\r\n".to_vec()));
        assert_eq!(verdict.clone().apply(&host, &failures), Action::Continue);
        assert_eq!(host.calls(), ["increment_metric", "set_property", "set_header", "set_header"]);
        assert_eq!(host.metric("m.host_errors"), 0, "a refused value is no host failure");
        host.fail_writes.set(true);
        assert_eq!(verdict.apply(&host, &failures), Action::Continue);
        assert_eq!(host.metric("m.host_errors"), 2, "the property and the valid header");
        assert_eq!(host.logs().len(), 1, "logged once");
    }

    #[test]
    fn a_refused_reply_follows_the_policy() {
        let host = FakeHost::new();
        let failures = ReplyFailures::new(&host, "m");
        host.refuse_local_reply.set(true);
        let reply = Reply::new(403, vec![], Body::default());
        for (policy, action) in [
            (OnRefusedReply::Continue, Action::Continue),
            (OnRefusedReply::Resume, Action::Continue),
            (OnRefusedReply::Hold, Action::Pause),
        ] {
            assert_eq!(Verdict::answer(reply.clone(), policy).apply(&host, &failures), action, "{policy:?}");
        }
        assert_eq!(host.resumed(), 1);
        assert_eq!(host.metric("m.local_reply_failed"), 3);
    }
}
