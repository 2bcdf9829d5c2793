//! The bounded bucket table in shared data.
//!
//! Shared data never forgets a key, so every key name comes from a fixed set:
//! `slots` slot keys, one overflow key per limit, and one counter. A bucket's
//! identity (`<limit id>\0<client key>`) hashes to two candidate slots; the value
//! stores the full identity next to the bucket's TAT, so collisions are detected.
//! A slot whose bucket is full again (TAT <= now) carries no information and is
//! reused. When both candidates hold live buckets of other keys, the request is
//! counted in the limit's single overflow bucket: new keys share it until slots
//! free up, which never lets anyone exceed a limit (it can only limit early).
//!
//! Every update is a compare-and-swap of one value with bounded retries.

use gateway_common::hash::fnv1a64;
use gateway_common::shared::{add_to_counter, read_counter};
pub use gateway_common::shared::{Store, StoreError};

use crate::bucket::{Limit, Verdict};

/// Format version carried by every value: old and new VMs overlap during a
/// listener update and must not misread each other's values.
pub const FORMAT_VERSION: u8 = 1;
pub const TRACKED_KEY: &str = "rl:v1:tracked";
const OVERFLOW_IDENTITY: &[u8] = b"\0*overflow*";

pub fn slot_key(slot: u32) -> String {
    format!("rl:v1:slot:{slot}")
}

pub fn overflow_key(limit: &Limit) -> String {
    format!("rl:v1:overflow:{}", limit.id)
}

/// The identity stored in a limit's overflow bucket (no client key can equal it:
/// client identities are `<limit id>\0<encoded key>`).
fn overflow_identity(limit: &Limit) -> Vec<u8> {
    let mut identity = limit.id.as_bytes().to_vec();
    identity.extend_from_slice(OVERFLOW_IDENTITY);
    identity
}

/// A bucket as stored: its TAT and the full identity it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub tat: u64,
    pub identity: Vec<u8>,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.identity.len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.tat.to_le_bytes());
        out.extend_from_slice(&self.identity);
        out
    }

    /// `None` for an empty placeholder, another format version, or garbage:
    /// all of which the table treats as a free slot.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let (&version, rest) = bytes.split_first()?;
        if version != FORMAT_VERSION {
            return None;
        }
        let tat = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
        Some(Entry { tat, identity: rest.get(8..)?.to_vec() })
    }
}

/// What taking a token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// A token was taken from the bucket stored under `key` for `identity`.
    Taken {
        verdict: Verdict,
        key: String,
        identity: Vec<u8>,
    },
    Denied {
        verdict: Verdict,
    },
    /// Every CAS attempt lost to another worker.
    Contended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub slots: u32,
    pub cas_retries: u32,
}

struct Read {
    key: String,
    entry: Option<Entry>,
    /// The slot was never used (placeholder or unset).
    unused: bool,
    cas: Option<u32>,
}

impl Table {
    /// The two candidate slots for an identity.
    pub fn candidates(&self, identity: &[u8]) -> [u32; 2] {
        let slots = u64::from(self.slots.max(1));
        let hash = fnv1a64(identity);
        let first = hash % slots;
        let mut second = hash.rotate_left(32).wrapping_mul(0x9e37_79b9_7f4a_7c15) % slots;
        if second == first && slots > 1 {
            second = (first + 1) % slots;
        }
        [u32::try_from(first).unwrap_or(0), u32::try_from(second).unwrap_or(0)]
    }

    /// Creates every slot, overflow and counter key as an empty placeholder, so
    /// that every later write is a real compare-and-swap (a first write to an
    /// unset key cannot be one). Existing values are left alone.
    pub fn initialize(&self, store: &impl Store, limits: &[Limit]) -> Result<(), StoreError> {
        let keys = (0..self.slots).map(slot_key).chain(limits.iter().map(overflow_key));
        for key in keys.chain(std::iter::once(TRACKED_KEY.to_string())) {
            store.ensure(&key)?;
        }
        Ok(())
    }

    fn read(&self, store: &impl Store, key: String) -> Result<Read, StoreError> {
        let (value, cas) = store.get(&key)?;
        let unused = value.as_ref().is_none_or(|bytes| bytes.is_empty());
        let entry = value.as_deref().and_then(Entry::decode);
        Ok(Read { key, entry, unused, cas })
    }

    /// Takes one token for `identity` under `limit` at time `now` (nanoseconds).
    pub fn take(&self, store: &impl Store, limit: &Limit, identity: &[u8], now: u64) -> Result<Take, StoreError> {
        let [first, second] = self.candidates(identity);
        let owns = |read: &Read| read.entry.as_ref().is_some_and(|entry| entry.identity == identity);
        let free = |read: &Read| read.entry.as_ref().is_none_or(|entry| entry.tat <= now);
        for _ in 0..=self.cas_retries {
            let a = self.read(store, slot_key(first))?;
            let outcome = if owns(&a) {
                self.take_owned(store, limit, a, now)?
            } else {
                let b = self.read(store, slot_key(second))?;
                if owns(&b) {
                    self.take_owned(store, limit, b, now)?
                } else if free(&a) {
                    self.claim(store, limit, a, identity, now)?
                } else if free(&b) {
                    self.claim(store, limit, b, identity, now)?
                } else {
                    let overflow = self.read(store, overflow_key(limit))?;
                    self.take_owned_as(store, limit, overflow, overflow_identity(limit), now)?
                }
            };
            if let Some(take) = outcome {
                return Ok(take);
            }
        }
        Ok(Take::Contended)
    }

    /// Takes from a bucket this identity already holds. `None`: lost a CAS race.
    fn take_owned(
        &self,
        store: &impl Store,
        limit: &Limit,
        target: Read,
        now: u64,
    ) -> Result<Option<Take>, StoreError> {
        let identity = target.entry.as_ref().map(|entry| entry.identity.clone()).unwrap_or_default();
        self.take_owned_as(store, limit, target, identity, now)
    }

    fn take_owned_as(
        &self,
        store: &impl Store,
        limit: &Limit,
        target: Read,
        identity: Vec<u8>,
        now: u64,
    ) -> Result<Option<Take>, StoreError> {
        let tat = target.entry.as_ref().filter(|entry| entry.identity == identity).map_or(0, |entry| entry.tat);
        let verdict = limit.take(tat, now);
        if !verdict.allowed {
            return Ok(Some(Take::Denied { verdict }));
        }
        let entry = Entry { tat: verdict.new_tat, identity };
        if !store.set(&target.key, &entry.encode(), target.cas)? {
            return Ok(None);
        }
        Ok(Some(Take::Taken { verdict, key: target.key, identity: entry.identity }))
    }

    /// Gives a free slot to an identity that holds none. The identity may have been
    /// counted in the overflow bucket while the table was full, and that history is
    /// not in any slot: while the overflow bucket is not full again, the new bucket
    /// starts from the overflow's TAT (a conservative start, never a full bucket)
    /// and the request is also charged to the overflow, so a concurrent overflow
    /// admission of the same identity on another worker is serialized by that
    /// bucket's compare-and-swap instead of counting twice from the same state.
    fn claim(
        &self,
        store: &impl Store,
        limit: &Limit,
        target: Read,
        identity: &[u8],
        now: u64,
    ) -> Result<Option<Take>, StoreError> {
        let overflow = self.read(store, overflow_key(limit))?;
        let overflow_identity = overflow_identity(limit);
        let overflow_tat = overflow
            .entry
            .as_ref()
            .filter(|entry| entry.identity == overflow_identity && entry.tat > now)
            .map(|entry| entry.tat);
        let verdict = limit.take(overflow_tat.unwrap_or(0), now);
        if !verdict.allowed {
            return Ok(Some(Take::Denied { verdict }));
        }
        if overflow_tat.is_some() {
            let charged = Entry { tat: verdict.new_tat, identity: overflow_identity.clone() };
            if !store.set(&overflow.key, &charged.encode(), overflow.cas)? {
                return Ok(None);
            }
        }
        let entry = Entry { tat: verdict.new_tat, identity: identity.to_vec() };
        if !store.set(&target.key, &entry.encode(), target.cas)? {
            if overflow_tat.is_some() {
                self.give_back(store, limit, &overflow.key, &overflow_identity, now)?;
            }
            return Ok(None);
        }
        if target.unused {
            self.add_tracked(store)?;
        }
        Ok(Some(Take::Taken { verdict, key: target.key, identity: entry.identity }))
    }

    /// Gives back a token taken earlier (the request was denied by another limit).
    /// Best effort: if the slot changed hands meanwhile, there is nothing to undo.
    pub fn give_back(
        &self,
        store: &impl Store,
        limit: &Limit,
        key: &str,
        identity: &[u8],
        now: u64,
    ) -> Result<(), StoreError> {
        for _ in 0..=self.cas_retries {
            let read = self.read(store, key.to_string())?;
            let Some(entry) = read.entry.filter(|entry| entry.identity == identity) else {
                return Ok(());
            };
            let restored = Entry { tat: limit.give_back(entry.tat, now), identity: entry.identity };
            if store.set(key, &restored.encode(), read.cas)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Slots that have ever held a bucket (bounded by `slots`).
    pub fn tracked(&self, store: &impl Store) -> Result<u64, StoreError> {
        read_counter(store, TRACKED_KEY)
    }

    fn add_tracked(&self, store: &impl Store) -> Result<(), StoreError> {
        add_to_counter(store, TRACKED_KEY, 1, self.cas_retries).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::shared::MemoryStore;
    use std::collections::BTreeSet;

    const SECOND: u64 = 1_000_000_000;

    fn limit(requests: u64, period: u64, burst: u64) -> Limit {
        Limit::new("rule/limit".into(), "limit".into(), requests, period, burst)
    }

    #[test]
    fn one_million_keys_stay_in_the_slot_set() {
        let table = Table { slots: 1_000, cas_retries: 4 };
        let store = MemoryStore::default();
        let limits = [limit(10, 60, 10)];
        table.initialize(&store, &limits).unwrap();
        let allowed_names: BTreeSet<String> = (0..table.slots)
            .map(slot_key)
            .chain(limits.iter().map(overflow_key))
            .chain(std::iter::once(TRACKED_KEY.to_string()))
            .collect();
        let mut now = 1_000 * SECOND;
        for key in 0..1_000_000u64 {
            now += 1_000; // 1 µs apart: buckets stay live for 6 s, far longer than the run.
            let identity = format!("rule/limit\0client-{key}");
            let take = table.take(&store, &limits[0], identity.as_bytes(), now).unwrap();
            assert!(!matches!(take, Take::Contended));
        }
        assert!(store.len() <= allowed_names.len(), "{} values", store.len());
        assert!(table.tracked(&store).unwrap() <= u64::from(table.slots));
        let used = store.key_names.borrow();
        let strays: Vec<_> = used.difference(&allowed_names).collect();
        assert!(strays.is_empty(), "key names outside the slot set: {strays:?}");
    }

    #[test]
    fn a_live_key_keeps_its_bucket_while_other_keys_churn() {
        let table = Table { slots: 64, cas_retries: 4 };
        let store = MemoryStore::default();
        let hot = limit(5, 3600, 5);
        table.initialize(&store, std::slice::from_ref(&hot)).unwrap();
        let now = 10_000 * SECOND;
        let mut hot_allowed = 0;
        for round in 0..10_000u64 {
            let other = format!("rule/limit\0other-{round}");
            table.take(&store, &hot, other.as_bytes(), now).unwrap();
            if let Take::Taken { .. } = table.take(&store, &hot, b"rule/limit\0hot", now).unwrap() {
                hot_allowed += 1;
            }
        }
        assert_eq!(hot_allowed, 5, "the hot key's bucket was never reset by churn");
    }

    #[test]
    fn a_full_table_shares_the_overflow_bucket_and_never_overadmits() {
        let table = Table { slots: 4, cas_retries: 4 };
        let store = MemoryStore::default();
        let one_per_hour = limit(1, 3600, 1);
        table.initialize(&store, std::slice::from_ref(&one_per_hour)).unwrap();
        let now = 10_000 * SECOND;
        let allowed = (0..100)
            .filter(|n| {
                let identity = format!("rule/limit\0k{n}");
                matches!(table.take(&store, &one_per_hour, identity.as_bytes(), now).unwrap(), Take::Taken { .. })
            })
            .count();
        // At most one per slot plus one for the shared overflow bucket.
        assert!(allowed <= 5, "{allowed}");
        assert!(allowed >= 2);
    }

    /// Issue #11: a key served from the overflow bucket that later moves into a
    /// freed slot must not start with a full bucket. Per key, admissions never
    /// exceed burst + elapsed x rate.
    #[test]
    fn a_key_moving_from_overflow_into_a_slot_keeps_its_history() {
        for (slots, requests, period, hogs) in [(1u32, 3u64, 6u64, 1usize), (4, 5, 10, 4), (16, 2, 4, 16)] {
            let table = Table { slots, cas_retries: 4 };
            let store = MemoryStore::default();
            let l = limit(requests, period, requests);
            table.initialize(&store, std::slice::from_ref(&l)).unwrap();
            let start = 1_000 * SECOND;
            let interval = period * SECOND / requests;
            // Hog keys fill every slot, each bucket emptied at a staggered time
            // so that slots free up one after another while the target key runs.
            for hog in 0..hogs * 4 {
                let identity = format!("rule/limit\0hog-{hog}");
                let at = start + (hog as u64) * interval / 3;
                for _ in 0..requests {
                    table.take(&store, &l, identity.as_bytes(), at).unwrap();
                }
            }
            let mut admitted: Vec<u64> = Vec::new();
            let mut now = start;
            while now < start + 3 * period * SECOND {
                if let Take::Taken { .. } = table.take(&store, &l, b"rule/limit\0target", now).unwrap() {
                    admitted.push(now);
                }
                now += SECOND / 20;
            }
            // For every window starting at an admission: at most burst + elapsed x rate.
            for (i, first) in admitted.iter().enumerate() {
                for (j, last) in admitted.iter().enumerate().skip(i) {
                    let count = (j - i + 1) as u64;
                    let allowed = requests + (last - first) / interval;
                    assert!(
                        count <= allowed,
                        "slots {slots}: {count} admissions in {} ns, at most {allowed}",
                        last - first
                    );
                }
            }
            if slots == 1 {
                assert!(admitted.len() >= 3, "slots 1: the key was admitted {} times", admitted.len());
            }
        }
    }

    #[test]
    fn idle_slots_are_reused() {
        let table = Table { slots: 1, cas_retries: 4 };
        let store = MemoryStore::default();
        let l = limit(1, 1, 1);
        table.initialize(&store, std::slice::from_ref(&l)).unwrap();
        let start = 100 * SECOND;
        assert!(matches!(table.take(&store, &l, b"a", start).unwrap(), Take::Taken { .. }));
        // Two seconds later a's bucket is full again: b takes over the slot.
        let Take::Taken { key, .. } = table.take(&store, &l, b"b", start + 2 * SECOND).unwrap() else { panic!() };
        assert_eq!(key, slot_key(0));
        assert_eq!(table.tracked(&store).unwrap(), 1);
    }

    #[test]
    fn other_format_versions_and_garbage_are_free_slots() {
        assert_eq!(Entry::decode(b""), None);
        assert_eq!(Entry::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0, b'k']), None);
        assert_eq!(Entry::decode(&[1, 1, 2]), None);
        let entry = Entry { tat: 42, identity: b"id".to_vec() };
        assert_eq!(Entry::decode(&entry.encode()), Some(entry));
    }

    #[test]
    fn give_back_undoes_a_take() {
        let table = Table { slots: 8, cas_retries: 4 };
        let store = MemoryStore::default();
        let l = limit(1, 60, 1);
        table.initialize(&store, std::slice::from_ref(&l)).unwrap();
        let now = 100 * SECOND;
        let Take::Taken { key, identity, .. } = table.take(&store, &l, b"x", now).unwrap() else { panic!() };
        assert!(matches!(table.take(&store, &l, b"x", now).unwrap(), Take::Denied { .. }));
        table.give_back(&store, &l, &key, &identity, now).unwrap();
        assert!(matches!(table.take(&store, &l, b"x", now).unwrap(), Take::Taken { .. }));
    }
}
