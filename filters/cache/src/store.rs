//! Stored responses in shared data, bounded.
//!
//! A URI's primary key (authority, path, query as configured, key headers) hashes
//! to one of `slots` metadata values (`c:v1:meta:<slot>`, JSON with a format
//! version); collisions are detected by the full key stored inside. Each stored
//! variant (Vary values, upstream) has a body value
//! `c:v1:body:<slot>:<variant>:<generation parity>` that starts with its
//! generation: bodies are written before the metadata that points to them, into
//! the parity the current metadata does not use, so a reader never sees a
//! half-written entry. `c:v1:bytes` counts all stored bytes; storing beyond
//! `max_total_bytes` first evicts the oldest of a sample of slots.

use gateway_common::hash::fnv1a64;
use gateway_common::shared::{add_to_counter, read_counter, reserve_within, Reserve, Store, StoreError};
use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: u8 = 1;
pub const BYTES_KEY: &str = "c:v1:bytes";
pub const EVICTIONS_KEY: &str = "c:v1:evictions";
const EVICTION_SAMPLE: u32 = 8;
const CAS_RETRIES: u32 = 16;

pub fn meta_key(slot: u32) -> String {
    format!("c:v1:meta:{slot}")
}

pub fn body_key(slot: u32, variant: usize, generation: u64) -> String {
    format!("c:v1:body:{slot}:{variant}:{}", generation % 2)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    /// (header, request value at store time) for each Vary header, plus the
    /// upstream (routing header) under the name `:upstream`.
    pub selectors: Vec<(String, Option<String>)>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Response time (s) and the corrected initial age (RFC 9111 4.2.3).
    pub stored_at: u64,
    pub initial_age: u64,
    pub lifetime: u64,
    /// Must be revalidated before every use (`no-cache`).
    pub no_cache: bool,
    /// Must not be served stale (`must-revalidate`, `proxy-revalidate`, `s-maxage`).
    pub no_stale: bool,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    pub generation: u64,
    pub body_len: u64,
    /// Position of the body values (`c:v1:body:<slot>:<position>:*`).
    pub position: usize,
}

impl Variant {
    pub fn current_age(&self, now: u64) -> u64 {
        self.initial_age.saturating_add(now.saturating_sub(self.stored_at))
    }

    /// Seconds of freshness left (negative: stale for that long).
    pub fn ttl(&self, now: u64) -> i64 {
        i64::try_from(self.lifetime).unwrap_or(i64::MAX) - i64::try_from(self.current_age(now)).unwrap_or(i64::MAX)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub version: u8,
    pub key: String,
    pub variants: Vec<Variant>,
    pub next_generation: u64,
}

impl Meta {
    /// Bytes this URI holds in shared data: its metadata and bodies (with their
    /// 8-byte generation prefix).
    fn size(&self) -> u64 {
        let metadata = serde_json::to_vec(self).map_or(4096, |encoded| encoded.len() as u64);
        metadata + self.variants.iter().map(|variant| variant.body_len + 8).sum::<u64>()
    }
}

/// Decodes a metadata value; anything else (placeholder, other version, garbage)
/// is an empty slot.
pub fn decode_meta(bytes: &[u8]) -> Option<Meta> {
    let meta: Meta = serde_json::from_slice(bytes).ok()?;
    (meta.version == FORMAT_VERSION).then_some(meta)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub slots: u32,
    pub max_variants: usize,
    pub max_total_bytes: u64,
}

pub struct Found {
    pub meta: Meta,
    pub cas: Option<u32>,
    pub slot: u32,
}

impl Table {
    pub fn slot(&self, key: &str) -> u32 {
        u32::try_from(fnv1a64(key.as_bytes()) % u64::from(self.slots.max(1))).unwrap_or(0)
    }

    /// Pre-creates the metadata and counter keys (so updates can be CAS).
    pub fn initialize(&self, store: &impl Store) -> Result<(), StoreError> {
        for slot in 0..self.slots {
            store.ensure(&meta_key(slot))?;
        }
        store.ensure(BYTES_KEY)?;
        store.ensure(EVICTIONS_KEY)
    }

    /// The stored metadata for `key`, if this slot holds that key.
    pub fn lookup(&self, store: &impl Store, key: &str) -> Result<Option<Found>, StoreError> {
        let slot = self.slot(key);
        let (value, cas) = store.get(&meta_key(slot))?;
        Ok(value.as_deref().and_then(decode_meta).filter(|meta| meta.key == key).map(|meta| Found { meta, cas, slot }))
    }

    /// A variant's body, if it is the generation the metadata names.
    pub fn body(&self, store: &impl Store, slot: u32, variant: &Variant) -> Result<Option<Vec<u8>>, StoreError> {
        let value = store.get(&body_key(slot, variant.position, variant.generation))?.0.unwrap_or_default();
        let Some(generation) = value.get(..8).and_then(|bytes| bytes.try_into().ok()).map(u64::from_le_bytes) else {
            return Ok(None);
        };
        let body = value.get(8..).unwrap_or_default();
        Ok((generation == variant.generation && body.len() as u64 == variant.body_len).then(|| body.to_vec()))
    }

    /// Stores (or replaces) the variant with the same selectors. Returns false
    /// when it could not be stored (budget, contention).
    pub fn store(
        &self,
        store: &impl Store,
        key: &str,
        mut variant: Variant,
        body: &[u8],
        now: u64,
    ) -> Result<bool, StoreError> {
        let slot = self.slot(key);
        for _ in 0..CAS_RETRIES {
            let (value, cas) = store.get(&meta_key(slot))?;
            let old = value.as_deref().and_then(decode_meta);
            let old_size = old.as_ref().map_or(0, Meta::size);
            let mut dropped: Vec<Variant> = Vec::new();
            let mut meta = match old.clone() {
                Some(meta) if meta.key == key => meta,
                // Another URI held this slot: it is replaced.
                other => {
                    dropped.extend(other.map(|meta| meta.variants).unwrap_or_default());
                    Meta { version: FORMAT_VERSION, key: key.to_string(), variants: Vec::new(), next_generation: 1 }
                }
            };
            let generation = meta.next_generation;
            meta.next_generation += 1;
            let position = match meta.variants.iter().position(|v| v.selectors == variant.selectors) {
                Some(index) => {
                    let position = meta.variants.get(index).map_or(0, |v| v.position);
                    dropped.push(meta.variants.remove(index));
                    position
                }
                None if meta.variants.len() < self.max_variants => {
                    (0..self.max_variants).find(|p| meta.variants.iter().all(|v| v.position != *p)).unwrap_or(0)
                }
                None => {
                    // Full: drop the oldest variant.
                    let oldest = meta.variants.iter().enumerate().min_by_key(|(_, v)| v.stored_at).map(|(i, _)| i);
                    let index = oldest.unwrap_or(0);
                    let position = meta.variants.get(index).map_or(0, |v| v.position);
                    if index < meta.variants.len() {
                        dropped.push(meta.variants.remove(index));
                    }
                    position
                }
            };
            variant.generation = generation;
            variant.position = position;
            variant.body_len = body.len() as u64;
            meta.variants.push(variant.clone());
            let new_size = meta.size();
            // Growth is reserved in the byte counter before anything is written, so
            // the counter (and the gauge) never passes the budget; a lost CAS
            // releases the reservation.
            let growth = new_size.saturating_sub(old_size);
            if growth > 0 && !self.make_room(store, growth, slot, now)? {
                return Ok(false);
            }
            let mut body_value = generation.to_le_bytes().to_vec();
            body_value.extend_from_slice(body);
            store.set(&body_key(slot, position, generation), &body_value, None)?;
            let encoded = serde_json::to_vec(&meta).map_err(|_| StoreError)?;
            if store.set(&meta_key(slot), &encoded, cas)? {
                self.add_bytes(store, -i128::from(old_size.saturating_sub(new_size)))?;
                let kept = body_key(slot, position, generation);
                clear_bodies(store, slot, &dropped, &kept)?;
                return Ok(true);
            }
            self.add_bytes(store, -i128::from(growth))?;
        }
        Ok(false)
    }

    /// Updates a variant's headers and freshness after a 304 (RFC 9111 4.3.4).
    pub fn refresh(&self, store: &impl Store, key: &str, updated: &Variant) -> Result<bool, StoreError> {
        for _ in 0..CAS_RETRIES {
            let Some(mut found) = self.lookup(store, key)? else { return Ok(false) };
            let Some(variant) = found.meta.variants.iter_mut().find(|v| v.generation == updated.generation) else {
                return Ok(false);
            };
            *variant = updated.clone();
            let encoded = serde_json::to_vec(&found.meta).map_err(|_| StoreError)?;
            if store.set(&meta_key(found.slot), &encoded, found.cas)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Removes every variant of `key` (invalidation, purge). Returns whether
    /// anything was removed.
    pub fn remove(&self, store: &impl Store, key: &str) -> Result<bool, StoreError> {
        for _ in 0..CAS_RETRIES {
            let Some(found) = self.lookup(store, key)? else { return Ok(false) };
            if store.set(&meta_key(found.slot), b"", found.cas)? {
                self.add_bytes(store, -i128::from(found.meta.size()))?;
                clear_bodies(store, found.slot, &found.meta.variants, "")?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn bytes(&self, store: &impl Store) -> Result<u64, StoreError> {
        read_counter(store, BYTES_KEY)
    }

    /// URIs evicted to stay within the budget, since the process started.
    pub fn evictions(&self, store: &impl Store) -> Result<u64, StoreError> {
        read_counter(store, EVICTIONS_KEY)
    }

    fn add_bytes(&self, store: &impl Store, delta: i128) -> Result<(), StoreError> {
        if delta != 0 {
            add_to_counter(store, BYTES_KEY, delta, CAS_RETRIES)?;
        }
        Ok(())
    }

    /// Reserves `needed` bytes of the budget, evicting sampled entries while it is
    /// full. `true`: the bytes are reserved (counted) for the caller.
    fn make_room(&self, store: &impl Store, needed: u64, keep_slot: u32, now: u64) -> Result<bool, StoreError> {
        for round in 0..8u64 {
            match reserve_within(store, BYTES_KEY, needed, self.max_total_bytes, CAS_RETRIES)? {
                Reserve::Reserved => return Ok(true),
                Reserve::Contended => continue,
                Reserve::Full => {}
            }
            let start = fnv1a64(&(now ^ round.wrapping_mul(0x9e37_79b9) ^ u64::from(keep_slot)).to_le_bytes());
            let mut oldest: Option<(u32, u64, Meta, Option<u32>)> = None;
            for step in 0..EVICTION_SAMPLE {
                let slot = u32::try_from((start.wrapping_add(u64::from(step) * 7919)) % u64::from(self.slots.max(1)))
                    .unwrap_or(0);
                if slot == keep_slot {
                    continue;
                }
                let (value, cas) = store.get(&meta_key(slot))?;
                if let Some(meta) = value.as_deref().and_then(decode_meta) {
                    let stored = meta.variants.iter().map(|v| v.stored_at).max().unwrap_or(0);
                    if oldest.as_ref().is_none_or(|(_, at, _, _)| stored < *at) {
                        oldest = Some((slot, stored, meta, cas));
                    }
                }
            }
            let Some((slot, _, meta, cas)) = oldest else { continue };
            if store.set(&meta_key(slot), b"", cas)? {
                self.add_bytes(store, -i128::from(meta.size()))?;
                clear_bodies(store, slot, &meta.variants, "")?;
                add_to_counter(store, EVICTIONS_KEY, 1, CAS_RETRIES)?;
            }
        }
        Ok(false)
    }
}

/// Empties the body values of variants no longer referenced (shared data keeps
/// every key, so memory is only returned by emptying values).
fn clear_bodies(store: &impl Store, slot: u32, variants: &[Variant], except: &str) -> Result<(), StoreError> {
    for variant in variants {
        let key = body_key(slot, variant.position, variant.generation);
        if key != except {
            store.set(&key, b"", None)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::shared::MemoryStore;

    fn variant(selector: &str, stored_at: u64) -> Variant {
        Variant {
            selectors: vec![("accept-encoding".into(), Some(selector.into()))],
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())],
            stored_at,
            initial_age: 0,
            lifetime: 60,
            no_cache: false,
            no_stale: false,
            stale_while_revalidate: None,
            stale_if_error: None,
            etag: None,
            last_modified: None,
            generation: 0,
            body_len: 0,
            position: 0,
        }
    }

    /// Another worker's whole store lands between this worker's budget check and
    /// its write (shared data interleaves workers at any host call).
    type OtherWorker<'a> = Box<dyn FnOnce(&MemoryStore) + 'a>;

    struct Interleaved<'a> {
        inner: &'a MemoryStore,
        other_worker: std::cell::RefCell<Option<OtherWorker<'a>>>,
    }

    impl Store for Interleaved<'_> {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
            if key.starts_with("c:v1:body:") {
                if let Some(other) = self.other_worker.borrow_mut().take() {
                    other(self.inner);
                }
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn two_workers_never_both_fit_into_the_last_free_bytes() {
        let body = vec![b'x'; 40_000];
        let table = Table { slots: 64, max_variants: 1, max_total_bytes: 60_000 };
        let store = MemoryStore::default();
        table.initialize(&store).unwrap();
        let racing = Interleaved {
            inner: &store,
            other_worker: std::cell::RefCell::new(Some(Box::new(|inner: &MemoryStore| {
                let _ = table.store(inner, "b.example/other", variant("gzip", 10), &body, 10).unwrap();
            }))),
        };
        let _ = table.store(&racing, "a.example/one", variant("gzip", 10), &body, 10).unwrap();
        let counted = table.bytes(&store).unwrap();
        assert!(counted <= table.max_total_bytes, "counted {counted} of {}", table.max_total_bytes);
        let stored = ["a.example/one", "b.example/other"]
            .iter()
            .filter(|key| table.lookup(&store, key).unwrap().is_some())
            .count();
        assert_eq!(stored, 1, "only one of two 40 kB entries fits a 60 kB budget");
    }

    #[test]
    fn store_lookup_variants_and_remove() {
        let table = Table { slots: 16, max_variants: 2, max_total_bytes: 1 << 20 };
        let store = MemoryStore::default();
        table.initialize(&store).unwrap();
        assert!(table.store(&store, "k", variant("gzip", 1), b"zipped", 1).unwrap());
        assert!(table.store(&store, "k", variant("br", 2), b"brotli", 2).unwrap());
        assert!(table.store(&store, "k", variant("id", 3), b"plain", 3).unwrap(), "oldest variant replaced");
        let found = table.lookup(&store, "k").unwrap().unwrap();
        assert_eq!(found.meta.variants.len(), 2);
        let plain = found.meta.variants.iter().find(|v| v.selectors[0].1.as_deref() == Some("id")).unwrap();
        assert_eq!(table.body(&store, found.slot, plain).unwrap().unwrap(), b"plain");
        assert!(table.remove(&store, "k").unwrap());
        assert!(table.lookup(&store, "k").unwrap().is_none());
        assert_eq!(table.bytes(&store).unwrap(), 0);
    }

    #[test]
    fn the_budget_is_never_exceeded_and_keys_stay_bounded() {
        let table = Table { slots: 64, max_variants: 4, max_total_bytes: 64 * 1024 };
        let store = MemoryStore::default();
        table.initialize(&store).unwrap();
        let body = vec![b'x'; 4096];
        for n in 0..2_000u64 {
            table.store(&store, &format!("/item?x={n}"), variant("a", n), &body, n).unwrap();
            assert!(table.bytes(&store).unwrap() <= table.max_total_bytes, "after {n}");
        }
        assert!(table.evictions(&store).unwrap() > 1_000, "older entries were evicted");
        // Metadata keys, counter, and at most slots x variants x 2 bodies.
        assert!(store.len() <= 64 + 2 + 64 * 4 * 2, "{} keys", store.len());
        let held: usize = (0..64u32)
            .flat_map(|slot| {
                (0..4).flat_map(move |position| (0..2u64).map(move |parity| body_key(slot, position, parity)))
            })
            .map(|key| store.get(&key).unwrap().0.map_or(0, |value| value.len()))
            .sum();
        assert!(held as u64 <= table.max_total_bytes, "bodies actually held: {held}");
    }

    #[test]
    fn a_body_of_another_generation_is_a_miss() {
        let table = Table { slots: 4, max_variants: 1, max_total_bytes: 1 << 20 };
        let store = MemoryStore::default();
        table.initialize(&store).unwrap();
        table.store(&store, "k", variant("a", 1), b"one", 1).unwrap();
        let old = table.lookup(&store, "k").unwrap().unwrap();
        table.store(&store, "k", variant("a", 2), b"two!", 2).unwrap();
        table.store(&store, "k", variant("a", 3), b"six", 3).unwrap();
        // The old metadata's parity was overwritten by generation 3: detected.
        assert_eq!(table.body(&store, old.slot, &old.meta.variants[0]).unwrap(), None);
        assert_eq!(decode_meta(b"garbage"), None);
        assert_eq!(decode_meta(b""), None);
    }
}
