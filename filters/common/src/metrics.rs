//! Counters and gauges exposed through the host's stats (Envoy: `wasmcustom.*`).
//! A metric that could not be defined is silently a no-op: metrics must never
//! break request handling.

use crate::host::MetricType;
use crate::platform::{Ffi, Host};

#[derive(Debug, Clone, Copy, Default)]
pub struct Metric(Option<u32>);

impl Metric {
    pub fn counter_on(host: &impl Host, name: &str) -> Self {
        Self(host.define_metric(MetricType::Counter, name).ok())
    }

    pub fn gauge_on(host: &impl Host, name: &str) -> Self {
        Self(host.define_metric(MetricType::Gauge, name).ok())
    }

    pub fn add_on(&self, host: &impl Host, by: i64) {
        if let Some(id) = self.0 {
            let _ = host.increment_metric(id, by);
        }
    }

    pub fn increment_on(&self, host: &impl Host) {
        self.add_on(host, 1);
    }

    pub fn record_on(&self, host: &impl Host, value: u64) {
        if let Some(id) = self.0 {
            let _ = host.record_metric(id, value);
        }
    }

    // The same on the real host, for the roots' periodic work.
    pub fn increment(&self) {
        self.add_on(&Ffi, 1);
    }

    pub fn record(&self, value: u64) {
        self.record_on(&Ffi, value);
    }
}

/// A counter for the hot path: increments are summed in the VM and handed to the
/// host in one call per flush (the root's tick), so a request makes no host call
/// for it. The stat lags by at most one tick period.
#[derive(Debug, Default)]
pub struct BatchedCounter {
    metric: Metric,
    pending: std::cell::Cell<i64>,
}

impl BatchedCounter {
    pub fn counter_on(host: &impl Host, name: &str) -> Self {
        Self { metric: Metric::counter_on(host, name), pending: std::cell::Cell::new(0) }
    }

    pub fn increment(&self) {
        self.pending.set(self.pending.get().saturating_add(1));
    }

    /// Hands the sum since the last flush to the host.
    pub fn flush_on(&self, host: &impl Host) {
        let pending = self.pending.replace(0);
        if pending > 0 {
            self.metric.add_on(host, pending);
        }
    }
}

/// Envoy stat name segment: letters, digits, `_` and `-` kept, anything else `_`.
pub fn stat_segment(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}
