//! Decisions as data. A filter's glue turns what its logic decided into a
//! [`Verdict`]: the header edits, filter-state properties, counter increments,
//! host extension calls and the local reply, if any. `Verdict::apply` is the one
//! place that performs them on a [`Host`], in a fixed order, and handles a refused
//! reply as the module chose ([`OnRefusedReply`]). Unit tests assert on verdicts
//! directly; glue tests on `FakeHost` pin what applying them costs.

use proxy_wasm::types::Action;

use crate::host::MapType;
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
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub grpc_status: Option<u32>,
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
    /// then the reply. Writes the host refuses (see `field.rs`) are skipped; a
    /// refused reply goes to `failures` with the verdict's policy.
    pub fn apply(self, host: &impl Host, failures: &ReplyFailures) -> Action {
        for (metric, by) in &self.counters {
            metric.add_on(host, *by);
        }
        for (name, value) in &self.properties {
            let _ = host.set_property(&[name], value);
        }
        for edit in &self.edits {
            let _ = match edit {
                Edit::Remove(map, name) => host.remove_header(*map, name),
                Edit::Set(map, name, value) => host.set_header(*map, name, value),
                Edit::Add(map, name, value) => host.add_header(*map, name, value),
            };
        }
        for function in &self.foreign_calls {
            let _ = host.call_foreign_function(function, b"");
        }
        match self.reply {
            None => Action::Continue,
            Some((reply, on_refused)) => {
                let headers: Vec<(&str, &str)> =
                    reply.headers.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
                let sent = host.send_local_response(reply.status, &headers, &reply.body, reply.grpc_status);
                failures.after(host, sent, on_refused)
            }
        }
    }
}
