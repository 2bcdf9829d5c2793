//! The bounded bucket table in shared data.
//!
//! Shared data never forgets a key, so every key name comes from a fixed set:
//! one group key per [`WAYS`] buckets of `slots`, one overflow key per limit, one
//! counter, all under the instance's prefix (two instances never share buckets).
//! A bucket's identity (`<limit id>\0<client key>`) hashes, keyed with a secret
//! the workers share (so no client can aim at a group), to two candidate groups;
//! each group value holds up to [`WAYS`] buckets with their full identities, so
//! collisions are detected. A new identity takes a free place in the candidate
//! group with more room: at half the table's capacity practically every new key
//! finds one. A bucket that is full again (TAT <= now) carries no information and
//! its place is reused. When both groups are full of live buckets of other keys,
//! the request is counted in the limit's single overflow bucket: new keys share it
//! until places free up, which never lets anyone exceed a limit (it can only limit
//! early).
//!
//! Every update is a compare-and-swap of one value with bounded retries.

use gateway_common::hash::KeyedHash;
use gateway_common::shared::{add_to_counter, read_counter, shared_secret};
pub use gateway_common::shared::{Store, StoreError};
use gateway_common::text::push_u64;
use gateway_common::wire::{Reader, Writer};

use crate::bucket::{Limit, Verdict};

/// Format version carried by every value: old and new VMs overlap during a
/// listener update and must not misread each other's values.
pub const FORMAT_VERSION: u8 = 2;
/// Buckets per group value.
pub const WAYS: usize = 4;
const OVERFLOW_IDENTITY: &[u8] = b"\0*overflow*";
const SATURATED_IDENTITY: &[u8] = b"\0*saturated*";
/// Identities admitted through a live overflow bucket that it remembers (their
/// history lives there); beyond that it remembers only that there were more.
const OVERFLOW_MEMBERS: usize = 16;

/// The identity stored in a limit's overflow bucket (no client key can equal it:
/// client identities are `<limit id>\0<encoded key>`).
fn overflow_identity(limit: &Limit) -> Vec<u8> {
    let mut identity = limit.id.as_bytes().to_vec();
    identity.extend_from_slice(OVERFLOW_IDENTITY);
    identity
}

/// The overflow value's marker for "more identities than it remembers".
fn saturated_identity(limit: &Limit) -> Vec<u8> {
    let mut identity = limit.id.as_bytes().to_vec();
    identity.extend_from_slice(SATURATED_IDENTITY);
    identity
}

/// A bucket as stored: its TAT and the full identity it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub tat: u64,
    pub identity: Vec<u8>,
}

/// The buckets of one group value, in order.
pub fn encode_group(entries: &[Entry]) -> Vec<u8> {
    let mut out = Writer::with_capacity(2 + entries.iter().map(|e| 12 + e.identity.len()).sum::<usize>());
    out.u8(FORMAT_VERSION).u8(u8::try_from(entries.len()).unwrap_or(u8::MAX));
    for entry in entries.iter().take(usize::from(u8::MAX)) {
        out.u64(entry.tat).bytes(&entry.identity);
    }
    out.finish()
}

/// `None` for an empty placeholder, another format version, or garbage: all of
/// which the table treats as a free group.
pub fn decode_group(bytes: &[u8]) -> Option<Vec<Entry>> {
    let mut entries = Vec::new();
    walk_group(bytes, |_, tat, identity| entries.push(Entry { tat, identity: identity.to_vec() }))?;
    Some(entries)
}

/// Where the TAT of `identity`'s bucket sits in a group value, when the value is
/// well formed (as [`decode_group`] requires) and holds that bucket. A take from
/// a bucket the identity already holds (the hot path) rewrites those 8 bytes in
/// place instead of decoding and re-encoding the group.
fn tat_position(value: &[u8], identity: &[u8]) -> Option<usize> {
    let mut found = None;
    walk_group(value, |at, _, held| {
        if held == identity && found.is_none() {
            found = Some(at);
        }
    })?;
    found
}

/// Reads a group value, giving each bucket's (TAT position, TAT, identity) to
/// `visit`; `None` (after visiting some) unless the whole value is well formed:
/// the one reader of the format, for decoding and for the in-place take.
fn walk_group(bytes: &[u8], mut visit: impl FnMut(usize, u64, &[u8])) -> Option<()> {
    let mut input = Reader::new(bytes);
    if input.u8()? != FORMAT_VERSION {
        return None;
    }
    for _ in 0..input.u8()? {
        let at = bytes.len() - input.remaining();
        let tat = input.u64()?;
        visit(at, tat, input.bytes()?);
    }
    input.is_done().then_some(())
}

/// Who takes how many tokens, when.
#[derive(Debug, Clone, Copy)]
struct Demand<'a> {
    identity: &'a [u8],
    now: u64,
    cost: u64,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub slots: u32,
    pub cas_retries: u32,
    /// Set by [`Table::initialize`]: the key prefix and the shared hash secret.
    prefix: String,
    hash: KeyedHash,
}

struct Group {
    key: String,
    entries: Vec<Entry>,
    cas: Option<u32>,
}

impl Group {
    fn position(&self, identity: &[u8]) -> Option<usize> {
        self.entries.iter().position(|entry| entry.identity == identity)
    }

    /// A place for a new bucket: a bucket that is full again, or room to grow.
    fn free_place(&self, now: u64) -> Option<usize> {
        self.entries
            .iter()
            .position(|entry| entry.tat <= now)
            .or((self.entries.len() < WAYS).then_some(self.entries.len()))
    }

    fn free_places(&self, now: u64) -> usize {
        self.entries.iter().filter(|entry| entry.tat <= now).count() + WAYS.saturating_sub(self.entries.len())
    }
}

impl Table {
    pub fn new(slots: u32, cas_retries: u32) -> Self {
        Self { slots, cas_retries, prefix: "rl:v2:".into(), hash: KeyedHash::new([0; 16]) }
    }

    fn groups(&self) -> u32 {
        self.slots.max(1).div_ceil(WAYS as u32)
    }

    /// Built without `format!`: it is read on every request.
    pub fn group_key(&self, group: u32) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 12);
        key.push_str(&self.prefix);
        key.push_str("g:");
        push_u64(&mut key, u64::from(group));
        key
    }

    pub fn overflow_key(&self, limit: &Limit) -> String {
        format!("{}o:{}", self.prefix, limit.id)
    }

    pub fn tracked_key(&self) -> String {
        format!("{}tracked", self.prefix)
    }

    /// The two candidate groups for an identity.
    fn candidates(&self, identity: &[u8]) -> [u32; 2] {
        let groups = u64::from(self.groups());
        let hash = self.hash.hash(identity);
        let first = ((hash & 0xffff_ffff) * groups) >> 32;
        let mut second = ((hash >> 32) * groups) >> 32;
        if second == first && groups > 1 {
            second = (first + 1) % groups;
        }
        [u32::try_from(first).unwrap_or(0), u32::try_from(second).unwrap_or(0)]
    }

    /// Names the keys after `instance`, reads (or, first VM, creates) the hash
    /// secret, and creates every group, overflow and counter key as an empty
    /// placeholder, so that every later write is a real compare-and-swap (a first
    /// write to an unset key cannot be one). Existing values are left alone.
    pub fn initialize(&mut self, store: &impl Store, limits: &[Limit], instance: &str) -> Result<(), StoreError> {
        self.prefix = format!("rl:v2:{}:{instance}:", instance.len());
        self.hash = KeyedHash::new(shared_secret(store, &format!("{}secret", self.prefix))?);
        let keys =
            (0..self.groups()).map(|group| self.group_key(group)).chain(limits.iter().map(|l| self.overflow_key(l)));
        for key in keys.chain(std::iter::once(self.tracked_key())) {
            store.ensure(&key)?;
        }
        Ok(())
    }

    fn read(&self, store: &impl Store, key: String) -> Result<Group, StoreError> {
        let (value, cas) = store.get(&key)?;
        let entries = value.as_deref().and_then(decode_group).unwrap_or_default();
        Ok(Group { key, entries, cas })
    }

    /// Takes one token for `identity` under `limit` at time `now` (nanoseconds).
    pub fn take(&self, store: &impl Store, limit: &Limit, identity: &[u8], now: u64) -> Result<Take, StoreError> {
        self.take_cost(store, limit, identity, now, 1)
    }

    /// Takes `cost` tokens for `identity` (all or none).
    pub fn take_cost(
        &self,
        store: &impl Store,
        limit: &Limit,
        identity: &[u8],
        now: u64,
        cost: u64,
    ) -> Result<Take, StoreError> {
        let [first, second] = self.candidates(identity);
        for _ in 0..=self.cas_retries {
            let first_key = self.group_key(first);
            let (value, cas) = store.get(&first_key)?;
            let mut value = value.unwrap_or_default();
            if let Some(at) = tat_position(&value, identity) {
                let demand = Demand { identity, now, cost };
                match self.take_in_place(store, limit, (first_key, &mut value, cas), at, demand)? {
                    Some(take) => return Ok(take),
                    None => continue,
                }
            }
            // Not in the first group (a malformed value reads as empty).
            let a = Group { key: first_key, entries: decode_group(&value).unwrap_or_default(), cas };
            let b = if second != first { Some(self.read(store, self.group_key(second))?) } else { None };
            let outcome = match (b.as_ref().and_then(|b| b.position(identity)), b) {
                (Some(place), Some(b)) => self.take_owned(store, limit, b, place, now, cost)?,
                (_, b) => {
                    // The candidate with more room; the first on a tie.
                    let roomier = match b {
                        Some(b) if b.free_places(now) > a.free_places(now) => b,
                        _ => a,
                    };
                    match roomier.free_place(now) {
                        Some(place) => self.claim(store, limit, roomier, place, Demand { identity, now, cost })?,
                        None => {
                            let overflow = self.read(store, self.overflow_key(limit))?;
                            self.take_overflow(store, limit, overflow, identity, now, cost)?
                        }
                    }
                }
            };
            if let Some(take) = outcome {
                return Ok(take);
            }
        }
        Ok(Take::Contended)
    }

    /// [`Table::take_owned`] on the group value as read, its bucket's TAT at
    /// byte `at` ([`tat_position`]). `None`: lost a CAS race.
    fn take_in_place(
        &self,
        store: &impl Store,
        limit: &Limit,
        (key, value, cas): (String, &mut [u8], Option<u32>),
        at: usize,
        demand: Demand<'_>,
    ) -> Result<Option<Take>, StoreError> {
        let Demand { identity, now, cost } = demand;
        let Some(tat_bytes) = value.get_mut(at..at + 8) else { return Ok(None) };
        let tat = tat_bytes.try_into().map(u64::from_le_bytes).unwrap_or_default();
        let verdict = limit.take_cost(tat, now, cost);
        if !verdict.allowed {
            return Ok(Some(Take::Denied { verdict }));
        }
        tat_bytes.copy_from_slice(&verdict.new_tat.to_le_bytes());
        if !store.set(&key, value, cas)? {
            return Ok(None);
        }
        Ok(Some(Take::Taken { verdict, key, identity: identity.to_vec() }))
    }

    /// Takes from a bucket this identity already holds. `None`: lost a CAS race.
    fn take_owned(
        &self,
        store: &impl Store,
        limit: &Limit,
        mut group: Group,
        place: usize,
        now: u64,
        cost: u64,
    ) -> Result<Option<Take>, StoreError> {
        let Some(entry) = group.entries.get_mut(place) else { return Ok(None) };
        let verdict = limit.take_cost(entry.tat, now, cost);
        if !verdict.allowed {
            return Ok(Some(Take::Denied { verdict }));
        }
        entry.tat = verdict.new_tat;
        let identity = entry.identity.clone();
        if !store.set(&group.key, &encode_group(&group.entries), group.cas)? {
            return Ok(None);
        }
        Ok(Some(Take::Taken { verdict, key: group.key, identity }))
    }

    /// Takes from the limit's overflow bucket. Its value holds the bucket, then
    /// the identities admitted through it while it is live (up to
    /// [`OVERFLOW_MEMBERS`], each until the bucket's TAT at its last admission),
    /// then, if there were more, a "saturated" marker.
    fn take_overflow(
        &self,
        store: &impl Store,
        limit: &Limit,
        overflow: Group,
        identity: &[u8],
        now: u64,
        cost: u64,
    ) -> Result<Option<Take>, StoreError> {
        let bucket = overflow_identity(limit);
        let saturated = saturated_identity(limit);
        let tat = overflow.entries.iter().find(|entry| entry.identity == bucket).map_or(0, |entry| entry.tat);
        let verdict = limit.take_cost(tat, now, cost);
        if !verdict.allowed {
            return Ok(Some(Take::Denied { verdict }));
        }
        let mut entries: Vec<Entry> =
            overflow.entries.into_iter().filter(|entry| entry.identity != bucket && entry.tat > now).collect();
        let members = entries.iter().filter(|entry| entry.identity != saturated).count();
        match entries.iter_mut().find(|entry| entry.identity == identity) {
            Some(member) => member.tat = verdict.new_tat,
            None if members < OVERFLOW_MEMBERS => {
                entries.push(Entry { tat: verdict.new_tat, identity: identity.to_vec() })
            }
            None => match entries.iter_mut().find(|entry| entry.identity == saturated) {
                Some(marker) => marker.tat = verdict.new_tat,
                None => entries.push(Entry { tat: verdict.new_tat, identity: saturated }),
            },
        }
        entries.insert(0, Entry { tat: verdict.new_tat, identity: bucket.clone() });
        if !store.set(&overflow.key, &encode_group(&entries), overflow.cas)? {
            return Ok(None);
        }
        Ok(Some(Take::Taken { verdict, key: overflow.key, identity: bucket }))
    }

    /// Gives a free place to an identity that holds none. If the identity was
    /// admitted through the limit's overflow bucket while it is still live (or the
    /// bucket lost count of who was), its history is there: the new bucket starts
    /// from the overflow's TAT (a conservative start, never a full bucket) and the
    /// request is also charged to the overflow. Any other identity starts fresh,
    /// but still writes the live overflow value back with a compare-and-swap, so a
    /// concurrent overflow admission of the same identity on another worker is
    /// serialized with this claim instead of counting twice from the same state.
    fn claim(
        &self,
        store: &impl Store,
        limit: &Limit,
        mut group: Group,
        place: usize,
        demand: Demand<'_>,
    ) -> Result<Option<Take>, StoreError> {
        let Demand { identity, now, cost } = demand;
        let mut overflow = self.read(store, self.overflow_key(limit))?;
        let bucket = overflow_identity(limit);
        let saturated = saturated_identity(limit);
        let live = |wanted: &[u8]| overflow.entries.iter().any(|entry| entry.identity == wanted && entry.tat > now);
        let overflow_tat =
            overflow.entries.iter().find(|entry| entry.identity == bucket && entry.tat > now).map(|entry| entry.tat);
        let has_history = overflow_tat.is_some() && (live(identity) || live(&saturated));
        let verdict = limit.take_cost(if has_history { overflow_tat.unwrap_or(0) } else { 0 }, now, cost);
        if !verdict.allowed {
            return Ok(Some(Take::Denied { verdict }));
        }
        if overflow_tat.is_some() {
            if has_history {
                if let Some(entry) = overflow.entries.iter_mut().find(|entry| entry.identity == bucket) {
                    entry.tat = verdict.new_tat;
                }
            }
            if !store.set(&overflow.key, &encode_group(&overflow.entries), overflow.cas)? {
                return Ok(None);
            }
        }
        let entry = Entry { tat: verdict.new_tat, identity: identity.to_vec() };
        let first_use = place >= group.entries.len();
        if first_use {
            group.entries.push(entry);
        } else if let Some(reused) = group.entries.get_mut(place) {
            *reused = entry;
        }
        if !store.set(&group.key, &encode_group(&group.entries), group.cas)? {
            if has_history {
                self.give_back_cost(store, limit, &overflow.key, &bucket, now, cost)?;
            }
            return Ok(None);
        }
        if first_use {
            self.add_tracked(store)?;
        }
        Ok(Some(Take::Taken { verdict, key: group.key, identity: identity.to_vec() }))
    }

    /// Gives back a token taken earlier (the request was denied by another limit).
    /// Best effort: if the bucket changed hands meanwhile, there is nothing to undo.
    pub fn give_back(
        &self,
        store: &impl Store,
        limit: &Limit,
        key: &str,
        identity: &[u8],
        now: u64,
    ) -> Result<(), StoreError> {
        self.give_back_cost(store, limit, key, identity, now, 1)
    }

    /// Gives back `cost` tokens taken earlier.
    pub fn give_back_cost(
        &self,
        store: &impl Store,
        limit: &Limit,
        key: &str,
        identity: &[u8],
        now: u64,
        cost: u64,
    ) -> Result<(), StoreError> {
        self.update(store, key, identity, |tat| limit.give_back_cost(tat, now, cost))
    }

    /// Charges `cost` more tokens to a bucket after the fact (from the response).
    /// Best effort like a give-back: a bucket that changed hands is left alone.
    pub fn charge(
        &self,
        store: &impl Store,
        limit: &Limit,
        key: &str,
        identity: &[u8],
        now: u64,
        cost: u64,
    ) -> Result<(), StoreError> {
        self.update(store, key, identity, |tat| limit.charge(tat, now, cost))
    }

    /// Rewrites the TAT of `identity`'s bucket under `key` with CAS retries.
    fn update(
        &self,
        store: &impl Store,
        key: &str,
        identity: &[u8],
        change: impl Fn(u64) -> u64,
    ) -> Result<(), StoreError> {
        for _ in 0..=self.cas_retries {
            let mut group = self.read(store, key.to_string())?;
            let Some(entry) = group.entries.iter_mut().find(|entry| entry.identity == identity) else {
                return Ok(());
            };
            entry.tat = change(entry.tat);
            if store.set(key, &encode_group(&group.entries), group.cas)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Places that have ever held a bucket (bounded by the groups' capacity).
    pub fn tracked(&self, store: &impl Store) -> Result<u64, StoreError> {
        read_counter(store, &self.tracked_key())
    }

    fn add_tracked(&self, store: &impl Store) -> Result<(), StoreError> {
        add_to_counter(store, &self.tracked_key(), 1, self.cas_retries).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::shared::MemoryStore;
    use std::collections::BTreeSet;

    /// New clients throttled by the table itself (both groups full of live
    /// buckets of others) on their very first request, out of `clients`.
    fn throttled_newcomers(slots: u32, clients: u32, sequential: bool) -> usize {
        let mut table = Table::new(slots, 4);
        let store = MemoryStore::default();
        let l = limit(1, 3600, 1); // one request per hour: every bucket stays live
        table.initialize(&store, std::slice::from_ref(&l), "rl").unwrap();
        (0..clients)
            .filter(|n| {
                let id = if sequential {
                    format!("rule/limit\0client-{n:05}")
                } else {
                    format!("rule/limit\0{:x}", n.wrapping_mul(2_654_435_761) ^ 0x5bd1e995)
                };
                matches!(table.take(&store, &l, id.as_bytes(), 100 * SECOND).unwrap(), Take::Denied { .. })
            })
            .count()
    }

    /// One key admitted through the overflow bucket must not make every later
    /// newcomer start from the overflow's history: only the keys that were counted
    /// there do (seen once in CI: one overflow event throttled 450 newcomers).
    #[test]
    fn only_keys_counted_in_the_overflow_start_from_its_history() {
        let mut table = Table::new(4, 4); // one group of 4 places
        let store = MemoryStore::default();
        let hour = limit(1, 3600, 1);
        table.initialize(&store, std::slice::from_ref(&hour), "rl").unwrap();
        let start = 10_000 * SECOND;
        let take = |id: &str, at: u64| table.take(&store, &hour, format!("rule/limit\0{id}").as_bytes(), at).unwrap();
        for hog in 0..4 {
            assert!(matches!(take(&format!("hog-{hog}"), start), Take::Taken { .. }));
        }
        // The table is full: `late` is admitted through the overflow bucket.
        let almost_an_hour = start + 3599 * SECOND;
        assert!(matches!(take("late", almost_an_hour), Take::Taken { .. }));
        // An hour on, the hogs' buckets are full again and their places free; the
        // overflow bucket is still live (until almost two hours).
        let later = start + 3601 * SECOND;
        assert!(matches!(take("newcomer", later), Take::Taken { .. }), "a newcomer starts fresh");
        assert!(matches!(take("late", later), Take::Denied { .. }), "late's history is in the overflow");
        assert!(matches!(take("another", later), Take::Taken { .. }));
    }

    /// Issue 15: at most 0.1 % of new clients throttled by the table at up to 50 %
    /// load, sequential ids or random.
    #[test]
    fn the_table_holds_its_clients_up_to_half_its_capacity() {
        for sequential in [true, false] {
            let at_20 = throttled_newcomers(10_000, 2_000, sequential);
            let at_50 = throttled_newcomers(10_000, 5_000, sequential);
            assert!(at_20 <= 2, "20 % load, sequential {sequential}: {at_20} of 2000 throttled");
            assert!(at_50 <= 5, "50 % load, sequential {sequential}: {at_50} of 5000 throttled");
        }
    }

    const SECOND: u64 = 1_000_000_000;

    fn limit(requests: u64, period: u64, burst: u64) -> Limit {
        Limit::new("rule/limit".into(), "limit".into(), requests, period, burst)
    }

    #[test]
    fn one_million_keys_stay_in_the_slot_set() {
        let mut table = Table::new(1_000, 4);
        let store = MemoryStore::default();
        let limits = [limit(10, 60, 10)];
        table.initialize(&store, &limits, "rl").unwrap();
        let allowed_names: BTreeSet<String> = (0..table.groups())
            .map(|group| table.group_key(group))
            .chain(limits.iter().map(|l| table.overflow_key(l)))
            .chain(std::iter::once(table.tracked_key()))
            .chain(std::iter::once("rl:v2:2:rl:secret".to_string()))
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
        let mut table = Table::new(64, 4);
        let store = MemoryStore::default();
        let hot = limit(5, 3600, 5);
        table.initialize(&store, std::slice::from_ref(&hot), "rl").unwrap();
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
        let mut table = Table::new(4, 4);
        let store = MemoryStore::default();
        let one_per_hour = limit(1, 3600, 1);
        table.initialize(&store, std::slice::from_ref(&one_per_hour), "rl").unwrap();
        let now = 10_000 * SECOND;
        let allowed = (0..100)
            .filter(|n| {
                let identity = format!("rule/limit\0k{n}");
                matches!(table.take(&store, &one_per_hour, identity.as_bytes(), now).unwrap(), Take::Taken { .. })
            })
            .count();
        // At most one per place plus one for the shared overflow bucket.
        assert!(allowed <= 5, "{allowed}");
        assert!(allowed >= 2);
    }

    /// Issue #11: a key served from the overflow bucket that later moves into a
    /// freed slot must not start with a full bucket. Per key, admissions never
    /// exceed burst + elapsed x rate.
    #[test]
    fn a_key_moving_from_overflow_into_a_slot_keeps_its_history() {
        for (slots, requests, period, hogs) in [(1u32, 3u64, 6u64, 1usize), (4, 5, 10, 4), (16, 2, 4, 16)] {
            let mut table = Table::new(slots, 4);
            let store = MemoryStore::default();
            let l = limit(requests, period, requests);
            table.initialize(&store, std::slice::from_ref(&l), "rl").unwrap();
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
        let mut table = Table::new(1, 4);
        let store = MemoryStore::default();
        let l = limit(1, 1, 1);
        table.initialize(&store, std::slice::from_ref(&l), "rl").unwrap();
        let start = 100 * SECOND;
        assert!(matches!(table.take(&store, &l, b"a", start).unwrap(), Take::Taken { .. }));
        // Two seconds later a's bucket is full again: b takes over its place.
        let Take::Taken { key, .. } = table.take(&store, &l, b"b", start + 2 * SECOND).unwrap() else { panic!() };
        assert_eq!(key, table.group_key(0));
        assert_eq!(table.tracked(&store).unwrap(), 1);
    }

    #[test]
    fn other_format_versions_and_garbage_are_free_groups() {
        assert_eq!(decode_group(b""), None);
        assert_eq!(decode_group(&[1, 0, 0, 0, 0, 0, 0, 0, 0, b'k']), None, "version 1 slots");
        assert_eq!(decode_group(&[2, 1, 2]), None);
        let entries = vec![Entry { tat: 42, identity: b"id".to_vec() }, Entry { tat: 7, identity: b"\0x".to_vec() }];
        assert_eq!(decode_group(&encode_group(&entries)), Some(entries.clone()));
        let encoded = encode_group(&entries);
        assert_eq!(decode_group(&encoded[..encoded.len() - 1]), None);
    }

    #[test]
    fn give_back_undoes_a_take() {
        let mut table = Table::new(8, 4);
        let store = MemoryStore::default();
        let l = limit(1, 60, 1);
        table.initialize(&store, std::slice::from_ref(&l), "rl").unwrap();
        let now = 100 * SECOND;
        let Take::Taken { key, identity, .. } = table.take(&store, &l, b"x", now).unwrap() else { panic!() };
        assert!(matches!(table.take(&store, &l, b"x", now).unwrap(), Take::Denied { .. }));
        table.give_back(&store, &l, &key, &identity, now).unwrap();
        assert!(matches!(table.take(&store, &l, b"x", now).unwrap(), Take::Taken { .. }));
    }
}
