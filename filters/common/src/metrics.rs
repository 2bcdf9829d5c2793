//! Counters and gauges exposed through the host's stats (Envoy: `wasmcustom.*`).
//! A metric that could not be defined is silently a no-op: metrics must never
//! break request handling.

use crate::host::{self, MetricType};

#[derive(Debug, Clone, Copy, Default)]
pub struct Metric(Option<u32>);

impl Metric {
    pub fn counter(name: &str) -> Self {
        Self(host::define_metric(MetricType::Counter, name).ok())
    }

    pub fn gauge(name: &str) -> Self {
        Self(host::define_metric(MetricType::Gauge, name).ok())
    }

    pub fn increment(&self) {
        self.add(1);
    }

    pub fn add(&self, by: i64) {
        if let Some(id) = self.0 {
            let _ = host::increment_metric(id, by);
        }
    }

    pub fn record(&self, value: u64) {
        if let Some(id) = self.0 {
            let _ = host::record_metric(id, value);
        }
    }
}

/// Envoy stat name segment: letters, digits, `_` and `-` kept, anything else `_`.
pub fn stat_segment(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}
