//! Remote JWKS shared by all workers through shared data.
//!
//! One VM fetches, every VM reads: the last good document of each provider is
//! published under `auth:v1:jwks:<provider>`, with a small version value (the
//! fetch time) that workers check at most once a second to notice rotations
//! without copying the document. Leases (compare-and-swap on a timestamp) make
//! one VM do each background refresh and rate-limit refetches on unknown `kid`s.
//! A failed fetch never replaces the last good document.

use std::rc::Rc;

use gateway_common::shared::{Store, StoreError};

use crate::jwt::KeySet;

const FORMAT_VERSION: u8 = 1;
/// Minimum seconds between background fetch attempts of one provider after a
/// failure (successful documents are refreshed every `refresh_seconds`).
pub const RETRY_SECONDS: u64 = 5;

pub fn document_key(provider: &str) -> String {
    format!("auth:v1:jwks:{provider}")
}
pub fn version_key(provider: &str) -> String {
    format!("auth:v1:jwks-version:{provider}")
}
pub fn attempt_key(provider: &str) -> String {
    format!("auth:v1:jwks-attempt:{provider}")
}
pub fn refetch_key(provider: &str) -> String {
    format!("auth:v1:jwks-refetch:{provider}")
}

/// Creates every key of these providers as a placeholder (see `Store::ensure`).
pub fn initialize<'a>(store: &impl Store, providers: impl IntoIterator<Item = &'a str>) -> Result<(), StoreError> {
    for name in providers {
        for key in [document_key(name), version_key(name), attempt_key(name), refetch_key(name)] {
            store.ensure(&key)?;
        }
    }
    Ok(())
}

fn encode_time(seconds: u64) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.extend_from_slice(&seconds.to_le_bytes());
    out
}

fn decode_time(bytes: &[u8]) -> Option<u64> {
    let (&version, rest) = bytes.split_first()?;
    if version != FORMAT_VERSION {
        return None;
    }
    Some(u64::from_le_bytes(rest.get(..8)?.try_into().ok()?))
}

/// A published document: when it was fetched (seconds), its version (unique per
/// publication: the publisher's clock in nanoseconds) and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub fetched_at: u64,
    pub version: u64,
    pub document: Vec<u8>,
}

/// Publishes a validated document fetched at `now` (seconds) as `version`.
pub fn publish(store: &impl Store, provider: &str, document: &[u8], now: u64, version: u64) -> Result<(), StoreError> {
    let mut value = encode_time(now);
    value.extend_from_slice(&version.to_le_bytes());
    value.extend_from_slice(document);
    store.set(&document_key(provider), &value, None)?;
    store.set(&version_key(provider), &encode_time(version), None)?;
    Ok(())
}

/// The version of the published document (`None`: never published).
pub fn published_version(store: &impl Store, provider: &str) -> Result<Option<u64>, StoreError> {
    Ok(store.get(&version_key(provider))?.0.as_deref().and_then(decode_time))
}

/// The published document.
pub fn load(store: &impl Store, provider: &str) -> Result<Option<Published>, StoreError> {
    let value = store.get(&document_key(provider))?.0.unwrap_or_default();
    let Some(fetched_at) = decode_time(&value) else {
        return Ok(None);
    };
    let Some(version) = value.get(9..17).and_then(|bytes| bytes.try_into().ok()).map(u64::from_le_bytes) else {
        return Ok(None);
    };
    Ok(Some(Published { fetched_at, version, document: value.get(17..).unwrap_or_default().to_vec() }))
}

/// Claims the right to act now if the last claim of `key` is at least `gap`
/// seconds old: exactly one VM wins each claim.
pub fn try_claim(store: &impl Store, key: &str, now: u64, gap: u64) -> Result<bool, StoreError> {
    let (value, cas) = store.get(key)?;
    let last = value.as_deref().and_then(decode_time);
    if last.is_some_and(|last| now < last.saturating_add(gap)) {
        return Ok(false);
    }
    store.set(key, &encode_time(now), cas)
}

/// One worker's view of a remote provider's keys.
#[derive(Debug, Clone, Default)]
pub struct RemoteKeys {
    pub keys: Option<Rc<KeySet>>,
    pub fetched_at: Option<u64>,
    pub version: Option<u64>,
    checked_at: Option<u64>,
}

impl RemoteKeys {
    /// Picks up a newer published document (checked at most once per second).
    pub fn sync(&mut self, store: &impl Store, provider: &str, now: u64) -> Result<(), StoreError> {
        if self.checked_at == Some(now) {
            return Ok(());
        }
        self.sync_now(store, provider, now)
    }

    /// Picks up a newer published document now (e.g. before calling a `kid`
    /// unknown: another worker may have fetched it this very second).
    pub fn sync_now(&mut self, store: &impl Store, provider: &str, now: u64) -> Result<(), StoreError> {
        self.checked_at = Some(now);
        let published = published_version(store, provider)?;
        if published.is_none() || published == self.version {
            return Ok(());
        }
        if let Some(published) = load(store, provider)? {
            // Published documents were validated before publishing.
            if let Ok((keys, _)) = KeySet::from_jwks(&published.document) {
                self.keys = Some(Rc::new(keys));
                self.fetched_at = Some(published.fetched_at);
                self.version = Some(published.version);
            }
        }
        Ok(())
    }

    /// Adopts a document this worker fetched, validated and published itself.
    pub fn adopt(&mut self, keys: KeySet, now: u64, version: u64) {
        self.keys = Some(Rc::new(keys));
        self.fetched_at = Some(now);
        self.version = Some(version);
        self.checked_at = Some(now);
    }

    /// Whether a background refresh is due.
    pub fn refresh_due(&self, now: u64, refresh_seconds: u64) -> bool {
        self.fetched_at.is_none_or(|fetched| now >= fetched.saturating_add(refresh_seconds))
    }
}

/// What a fetched JWKS response means.
pub fn validate_response(status: Option<u16>, body: &[u8]) -> Result<KeySet, String> {
    match status {
        Some(200) => KeySet::from_jwks(body).map(|(keys, _)| keys),
        Some(other) => Err(format!("HTTP {other}")),
        None => Err("no response (unreachable cluster, reset or timeout)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::shared::MemoryStore;

    fn document() -> Vec<u8> {
        br#"{"keys":[{"kty":"oct","kid":"k1","alg":"HS256","k":"c2VjcmV0"}]}"#.to_vec()
    }

    #[test]
    fn published_documents_reach_other_workers() {
        let store = MemoryStore::default();
        initialize(&store, ["idp"]).unwrap();
        let mut worker = RemoteKeys::default();
        worker.sync(&store, "idp", 100).unwrap();
        assert!(worker.keys.is_none());
        assert!(worker.refresh_due(100, 300));
        publish(&store, "idp", &document(), 101, 101_000_000_001).unwrap();
        worker.sync(&store, "idp", 101).unwrap();
        assert!(worker.keys.as_ref().unwrap().has_kid("k1"));
        assert!(!worker.refresh_due(200, 300));
        assert!(worker.refresh_due(401, 300));
        // A second publication within the same second is still noticed.
        publish(
            &store,
            "idp",
            br#"{"keys":[{"kty":"oct","kid":"k2","alg":"HS256","k":"c2VjcmV0"}]}"#,
            101,
            101_000_000_002,
        )
        .unwrap();
        worker.sync_now(&store, "idp", 101).unwrap();
        assert!(worker.keys.as_ref().unwrap().has_kid("k2"));
    }

    #[test]
    fn claims_are_exclusive_and_spaced() {
        let store = MemoryStore::default();
        initialize(&store, ["idp"]).unwrap();
        let key = refetch_key("idp");
        assert!(try_claim(&store, &key, 100, 10).unwrap());
        assert!(!try_claim(&store, &key, 105, 10).unwrap(), "within the cooldown");
        assert!(try_claim(&store, &key, 110, 10).unwrap());
    }

    #[test]
    fn failed_fetches_are_errors_not_documents() {
        assert!(validate_response(Some(503), b"").is_err());
        assert!(validate_response(None, b"").is_err());
        assert!(validate_response(Some(200), b"<html>").is_err());
        assert!(validate_response(Some(200), &document()).is_ok());
    }
}
