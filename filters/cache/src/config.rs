//! cache.wasm configuration: the JSON users write, and its checked form.

use gateway_common::config::ConfigErrors;
use gateway_common::hash::decode_sha256_hex;
use gateway_common::request_match::is_lower_case_header_name;
use serde::Deserialize;

use crate::http::HEURISTICALLY_CACHEABLE;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Responses with larger bodies pass through uncached.
    #[serde(default = "default_max_entry")]
    pub max_entry_bytes: u64,
    /// Budget for all stored entries (metadata and bodies) of this VM id.
    #[serde(default = "default_max_total")]
    pub max_total_bytes: u64,
    /// Number of slots (URIs that can be stored at once); bounds the key space.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Variants (Vary / upstream) kept per URI.
    #[serde(default = "default_variants")]
    pub max_variants: u8,
    /// Freshness for responses without explicit freshness; off by default.
    pub default_ttl_seconds: Option<u64>,
    /// Status codes stored without explicit freshness information (others need
    /// `max-age`, `s-maxage` or `Expires`).
    #[serde(default = "default_statuses")]
    pub cacheable_statuses: Vec<u16>,
    /// Leave the query string out of the key.
    #[serde(default)]
    pub ignore_query: bool,
    /// Only these query parameters are part of the key.
    pub query_include: Option<Vec<String>>,
    /// These query parameters are left out of the key.
    pub query_exclude: Option<Vec<String>>,
    /// Request headers that are part of the key.
    #[serde(default)]
    pub key_headers: Vec<String>,
    /// The routing header routing.wasm writes: responses from different upstreams
    /// are different variants.
    #[serde(default = "default_upstream_header")]
    pub upstream_header: String,
    /// Headers that mark a request as authenticated (as `Authorization` does).
    #[serde(default = "default_identity_headers")]
    pub identity_headers: Vec<String>,
    /// Ignore request Cache-Control (some operators want clients unable to bypass).
    #[serde(default)]
    pub ignore_request_cache_control: bool,
    pub purge: Option<PurgeSpec>,
    /// Request collapsing: identical misses wait this long (ms) for the one
    /// request that went to the origin, then go themselves; 0 turns it off.
    #[serde(default = "default_collapse_timeout")]
    pub collapse_timeout_ms: u64,
    /// Cache name in the `Cache-Status` header (RFC 9211).
    #[serde(default = "default_status_name")]
    pub cache_status_name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeSpec {
    /// Request header carrying the purge secret.
    #[serde(default = "default_purge_header")]
    pub header: String,
    /// Lower-case hex SHA-256 of the secret.
    pub secret_sha256: String,
}

fn default_max_entry() -> u64 {
    1024 * 1024
}
fn default_max_total() -> u64 {
    64 * 1024 * 1024
}
fn default_slots() -> u32 {
    1024
}
fn default_variants() -> u8 {
    4
}
fn default_statuses() -> Vec<u16> {
    HEURISTICALLY_CACHEABLE.to_vec()
}
fn default_upstream_header() -> String {
    "x-gateway-cluster".into()
}
fn default_identity_headers() -> Vec<String> {
    vec!["x-consumer".into(), "x-user-id".into()]
}
fn default_collapse_timeout() -> u64 {
    5000
}
fn default_status_name() -> String {
    "wasm-cache".into()
}
fn default_purge_header() -> String {
    "x-purge-key".into()
}

#[derive(Debug, Clone)]
pub struct Purge {
    pub header: String,
    pub secret_sha256: [u8; 32],
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Cache {
    pub config: CacheConfig,
    pub purge: Option<Purge>,
}

impl CacheConfig {
    pub fn compile(&self) -> Result<Cache, ConfigErrors> {
        let mut errors = ConfigErrors::new();
        if self.max_entry_bytes == 0 || self.max_entry_bytes > 64 * 1024 * 1024 {
            errors.add("max_entry_bytes", "must be between 1 and 67108864");
        }
        if self.max_total_bytes < self.max_entry_bytes {
            errors.add("max_total_bytes", "must be at least max_entry_bytes");
        }
        if !(1..=100_000).contains(&self.slots) {
            errors.add("slots", "must be between 1 and 100000");
        }
        if self.collapse_timeout_ms > 60_000 {
            errors.add("collapse_timeout_ms", "must be at most 60000 (0 turns collapsing off)");
        }
        if !(1..=16).contains(&self.max_variants) {
            errors.add("max_variants", "must be between 1 and 16");
        }
        for (index, status) in self.cacheable_statuses.iter().enumerate() {
            if !(200..=599).contains(status) || *status == 206 {
                errors.add(format!("cacheable_statuses[{index}]"), "must be a final status 200-599 other than 206");
            }
        }
        let query_modes = [self.ignore_query, self.query_include.is_some(), self.query_exclude.is_some()];
        if query_modes.iter().filter(|mode| **mode).count() > 1 {
            errors.add("ignore_query", "use at most one of ignore_query, query_include, query_exclude");
        }
        for (index, name) in self.key_headers.iter().enumerate() {
            if !is_lower_case_header_name(name) {
                errors.add(format!("key_headers[{index}]"), "must be a lower-case header name");
            }
        }
        for (index, name) in self.identity_headers.iter().enumerate() {
            if !is_lower_case_header_name(name) {
                errors.add(format!("identity_headers[{index}]"), "must be a lower-case header name");
            }
        }
        if !is_lower_case_header_name(&self.upstream_header) {
            errors.add("upstream_header", "must be a lower-case header name");
        }
        if self.cache_status_name.is_empty()
            || !self.cache_status_name.bytes().all(|b| b.is_ascii_graphic() && b != b';')
        {
            errors.add("cache_status_name", "must be a token");
        }
        let purge = self.purge.as_ref().and_then(|spec| {
            if !is_lower_case_header_name(&spec.header) {
                errors.add("purge.header", "must be a lower-case header name");
            }
            match decode_sha256_hex(&spec.secret_sha256) {
                Some(secret_sha256) => Some(Purge { header: spec.header.clone(), secret_sha256 }),
                None => {
                    errors.add("purge.secret_sha256", "must be the 64-character hex SHA-256 of the secret");
                    None
                }
            }
        });
        errors.into_result(Cache { config: self.clone(), purge })
    }
}
