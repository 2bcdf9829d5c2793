//! Stored responses in shared data, bounded in URIs and in bytes.
//!
//! **Index.** `sets` index values (`<ns>i:<set>`), each with [`WAYS`] entries
//! (fingerprint, version, stored-at, bytes). A URI's fingerprint is a keyed hash
//! (SipHash-1-3 under a secret the workers share), so no client can compute where
//! a URI lands. It names two candidate sets; a new URI goes to the one with more
//! free ways ("two choices"). The sets have 25 % more ways than `slots`, which
//! keeps every URI the table has room for (`slots` URIs, see the tests), and a
//! URI is only displaced by another when both its sets are full.
//!
//! **Entries.** Each way has a metadata value `<ns>m:<set>:<way>` in a compact
//! binary format (format byte first): the URI's full key, its variants, and a
//! generation counter that never goes back (removal leaves a tombstone holding
//! it). Each variant's body is `<ns>b:<set>:<way>:<position>:<parity>`: the body
//! bytes followed by the generation they belong to. Bodies are written before the
//! metadata that points to them, into the parity the current metadata does not
//! use, so a reader never sees a half-written entry. A writer first claims its way
//! in the index (compare-and-swap), so two writers never fill one way.
//!
//! **Budget.** `<ns>bytes` counts every stored metadata value and body; a store
//! reserves its growth there before writing anything, so the count never passes
//! `max_total_bytes`. When the budget is full, eviction finds occupied sets
//! through a bitmap (`<ns>occupied`) and evicts the oldest entry of a few of them:
//! it always finds a victim while anything is stored. Index values, tombstones and
//! the bitmap are a fixed overhead outside the budget (about 360 bytes per set).

use gateway_common::hash::KeyedHash;
use gateway_common::shared::{
    add_to_counter, read_counter, reserve_within, shared_secret, Reserve, Store, StoreError, CREATE_ONLY,
};
use gateway_common::text::push_u64;
use gateway_common::wire::{Reader, Writer};

/// The first byte of every index, metadata and bitmap value.
pub const FORMAT: u8 = 2;
/// Ways per set.
pub const WAYS: usize = 16;
/// Physical ways per `slots` (5/4): the spare room two choices need to hold all.
const SPARE_NUMERATOR: u64 = 5;
const SPARE_DENOMINATOR: u64 = 4;
const CAS_RETRIES: u32 = 16;
/// Concurrent fills one fill-lock value holds (see `FillLock`).
const FILLS_PER_LOCK: usize = 8;
/// Occupied sets compared per eviction.
const EVICTION_SAMPLE: usize = 4;
/// Evictions one store may make (many small entries can stand in the way of a
/// large one); it stops earlier when nothing is left to evict.
const EVICTION_ROUNDS: u64 = 4096;

/// The shared-data key names of one cache instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys of the instance named `instance`: two instances of the module in one
    /// VM id (Istio sets none) never share entries. The name is length-prefixed,
    /// so no instance name can reach into another's keys.
    pub fn new(instance: &str) -> Self {
        Self { prefix: format!("c2:{}:{instance}:", instance.len()) }
    }

    /// Built without `format!`: it is read on every lookup.
    fn index(&self, set: u32) -> String {
        let mut key = String::with_capacity(self.prefix.len() + 12);
        key.push_str(&self.prefix);
        key.push_str("i:");
        push_u64(&mut key, u64::from(set));
        key
    }

    fn meta(&self, set: u32, way: usize) -> String {
        format!("{}m:{set}:{way}", self.prefix)
    }

    fn body(&self, set: u32, way: usize, position: usize, generation: u64) -> String {
        format!("{}b:{set}:{way}:{position}:{}", self.prefix, generation % 2)
    }

    fn bytes(&self) -> String {
        format!("{}bytes", self.prefix)
    }

    fn evictions(&self) -> String {
        format!("{}evictions", self.prefix)
    }

    fn occupied(&self) -> String {
        format!("{}occupied", self.prefix)
    }

    fn fill(&self, slot: u64) -> String {
        format!("{}f:{slot}", self.prefix)
    }

    fn secret(&self) -> String {
        format!("{}secret", self.prefix)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    /// (header, request value at store time) for each Vary header, plus the
    /// upstream (routing header) under the name `:upstream`.
    pub selectors: Vec<(String, Option<String>)>,
    pub status: u16,
    /// Shared with the replies that send them (see `policy::stored_reply`).
    pub headers: gateway_common::verdict::SharedFields,
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
    /// Position of the body values (`<ns>b:<set>:<way>:<position>:*`).
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

/// One way's metadata. An empty `key` is a tombstone: nothing stored, only the
/// generation counter kept so a later entry never reuses a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub key: String,
    pub variants: Vec<Variant>,
    pub next_generation: u64,
}

impl Meta {
    /// What the index records of this metadata (changes with every write).
    pub fn version(&self) -> u32 {
        (self.next_generation & u64::from(u32::MAX)) as u32
    }

    fn is_tombstone(&self) -> bool {
        self.key.is_empty()
    }

    /// Budget bytes of this entry: its encoded metadata and its bodies (each with
    /// its 8-byte generation). A tombstone costs nothing.
    fn size(&self, encoded_len: usize) -> u64 {
        if self.is_tombstone() {
            return 0;
        }
        encoded_len as u64 + self.variants.iter().map(|variant| variant.body_len + 8).sum::<u64>()
    }

    fn stored_at(&self) -> u64 {
        self.variants.iter().map(|variant| variant.stored_at).max().unwrap_or(0)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Writer::with_capacity(256);
        out.u8(FORMAT).u64(self.next_generation).bytes(self.key.as_bytes());
        out.u8(u8::try_from(self.variants.len()).unwrap_or(u8::MAX));
        for variant in self.variants.iter().take(usize::from(u8::MAX)) {
            out.u8(u8::try_from(variant.selectors.len()).unwrap_or(u8::MAX));
            for (name, value) in variant.selectors.iter().take(usize::from(u8::MAX)) {
                out.bytes(name.as_bytes()).option_bytes(value.as_deref().map(str::as_bytes));
            }
            out.u16(variant.status).u16(u16::try_from(variant.headers.len()).unwrap_or(u16::MAX));
            for (name, value) in variant.headers.iter().take(usize::from(u16::MAX)) {
                out.bytes(name.as_bytes()).bytes(value.as_bytes());
            }
            out.u64(variant.stored_at).u64(variant.initial_age).u64(variant.lifetime);
            out.u8(u8::from(variant.no_cache) | u8::from(variant.no_stale) << 1);
            out.option_u64(variant.stale_while_revalidate).option_u64(variant.stale_if_error);
            out.option_bytes(variant.etag.as_deref().map(str::as_bytes));
            out.option_bytes(variant.last_modified.as_deref().map(str::as_bytes));
            out.u64(variant.generation).u64(variant.body_len).u8(u8::try_from(variant.position).unwrap_or(u8::MAX));
        }
        out.finish()
    }
}

/// Decodes a metadata value; anything else (never set, placeholder, another
/// format, garbage) is `None`. The format byte is checked before anything else.
pub fn decode_meta(bytes: &[u8]) -> Option<Meta> {
    let mut input = Reader::new(bytes);
    if input.u8()? != FORMAT {
        return None;
    }
    let next_generation = input.u64()?;
    let key = input.text()?;
    let count = input.u8()?;
    let mut variants = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let selector_count = input.u8()?;
        let mut selectors = Vec::with_capacity(usize::from(selector_count));
        for _ in 0..selector_count {
            selectors.push((input.text()?, input.option_text()?));
        }
        let status = input.u16()?;
        let header_count = input.u16()?;
        let mut headers = Vec::with_capacity(usize::from(header_count));
        for _ in 0..header_count {
            headers.push((input.text()?, input.text()?));
        }
        let (stored_at, initial_age, lifetime) = (input.u64()?, input.u64()?, input.u64()?);
        let flags = input.u8()?;
        variants.push(Variant {
            selectors,
            status,
            headers: headers.into(),
            stored_at,
            initial_age,
            lifetime,
            no_cache: flags & 1 != 0,
            no_stale: flags & 2 != 0,
            stale_while_revalidate: input.option_u64()?,
            stale_if_error: input.option_u64()?,
            etag: input.option_text()?,
            last_modified: input.option_text()?,
            generation: input.u64()?,
            body_len: input.u64()?,
            position: usize::from(input.u8()?),
        });
    }
    input.is_done().then_some(Meta { key, variants, next_generation })
}

/// The fills running under one lock value: each filling fingerprint and its
/// deadline (ms). Several URIs share a lock value (the key space is bounded), so
/// it holds up to `FILLS_PER_LOCK` of them: a fill of one URI never keeps another
/// that hashes to the same value from collapsing.
#[derive(Debug, Default, PartialEq, Eq)]
struct FillLock {
    fills: Vec<(u64, u64)>,
}

impl FillLock {
    /// An empty value, or one of this format, is a lock; anything else is not.
    fn decode(bytes: Option<&[u8]>) -> Option<Self> {
        let Some(bytes) = bytes.filter(|bytes| !bytes.is_empty()) else { return Some(Self::default()) };
        let mut input = Reader::new(bytes);
        (input.u8()? == FORMAT).then_some(())?;
        let mut fills = Vec::new();
        while !input.is_done() && fills.len() < FILLS_PER_LOCK {
            fills.push((input.u64()?, input.u64()?));
        }
        input.is_done().then_some(Self { fills })
    }

    fn encode(&self) -> Vec<u8> {
        let mut lock = Writer::with_capacity(1 + 16 * self.fills.len());
        lock.u8(FORMAT);
        for (fingerprint, deadline) in &self.fills {
            lock.u64(*fingerprint).u64(*deadline);
        }
        lock.finish()
    }

    fn running(&self, fingerprint: u64, now_ms: u64) -> bool {
        self.fills.iter().any(|&(holder, deadline)| holder == fingerprint && deadline > now_ms)
    }

    /// Drops the fills past their deadline, and `fingerprint`'s own.
    fn without(&self, fingerprint: u64, now_ms: u64) -> Self {
        let fills = self.fills.iter().copied().filter(|&(holder, deadline)| holder != fingerprint && deadline > now_ms);
        Self { fills: fills.collect() }
    }
}

/// One way of an index set. Fingerprint 0 is a free way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entry {
    pub fingerprint: u64,
    /// The metadata's [`Meta::version`] when last committed.
    pub version: u32,
    pub stored_at: u32,
    pub bytes: u32,
}

impl Entry {
    fn is_free(&self) -> bool {
        self.fingerprint == 0
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Index {
    entries: [Entry; WAYS],
}

impl Index {
    const ENCODED_LEN: usize = 1 + WAYS * 20;

    fn decode(bytes: &[u8]) -> Self {
        let mut index = Index::default();
        if bytes.len() != Self::ENCODED_LEN || bytes.first() != Some(&FORMAT) {
            return index;
        }
        let mut input = Reader::new(bytes.get(1..).unwrap_or_default());
        for entry in &mut index.entries {
            let read = (|| {
                Some(Entry {
                    fingerprint: input.u64()?,
                    version: input.u32()?,
                    stored_at: input.u32()?,
                    bytes: input.u32()?,
                })
            })();
            *entry = read.unwrap_or_default();
        }
        index
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Writer::with_capacity(Self::ENCODED_LEN);
        out.u8(FORMAT);
        for entry in &self.entries {
            out.u64(entry.fingerprint).u32(entry.version).u32(entry.stored_at).u32(entry.bytes);
        }
        out.finish()
    }

    /// The way and committed version of `fingerprint` in an encoded set, read in
    /// place: a lookup compares 16 fingerprints instead of decoding 16 entries.
    /// The same answer as `decode(bytes)` then `find` (a value of another length
    /// or format holds nothing).
    fn find_encoded(bytes: &[u8], fingerprint: u64) -> Option<(usize, u32)> {
        if bytes.len() != Self::ENCODED_LEN || bytes.first() != Some(&FORMAT) {
            return None;
        }
        let (entries, _) = bytes.get(1..)?.as_chunks::<20>();
        entries.iter().enumerate().find_map(|(way, entry)| {
            let (stored, rest) = entry.split_first_chunk::<8>()?;
            let version = rest.first_chunk::<4>()?;
            (u64::from_le_bytes(*stored) == fingerprint).then(|| (way, u32::from_le_bytes(*version)))
        })
    }

    fn find(&self, fingerprint: u64) -> Option<usize> {
        self.entries.iter().position(|entry| entry.fingerprint == fingerprint)
    }

    fn free_ways(&self) -> usize {
        self.entries.iter().filter(|entry| entry.is_free()).count()
    }

    fn is_empty(&self) -> bool {
        self.free_ways() == WAYS
    }
}

/// A request's part in filling a missing entry (request collapsing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillRole {
    /// It goes to the origin; identical misses wait for its response.
    Lead,
    /// Another request is filling this URI: wait for it.
    Follow,
    /// Its fill lock value already holds `FILLS_PER_LOCK` other URIs' fills (or
    /// cannot be read or written): go alone.
    Alone,
}

/// Where a URI's entry is, and the version the index last saw committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub set: u32,
    pub way: usize,
    pub version: u32,
}

pub struct Found {
    pub meta: Meta,
    pub location: Location,
}

/// The way a store writes to, and the index set as read.
#[derive(Debug, Clone, Copy)]
struct ChosenWay {
    set: u32,
    way: usize,
    index: Index,
    index_cas: Option<u32>,
}

/// A store's new metadata and body, ready to be written.
struct PreparedWrite {
    meta: Meta,
    encoded: Vec<u8>,
    meta_cas: Option<u32>,
    old_size: u64,
    new_size: u64,
    /// Variants whose bodies are emptied once the metadata is swapped in.
    dropped: Vec<Variant>,
    body_key: String,
    body_value: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub max_variants: usize,
    pub max_total_bytes: u64,
    sets: u32,
    keys: Keys,
    hash: KeyedHash,
}

impl Table {
    /// The table of instance `instance`, with room for `slots` URIs. Creates the
    /// shared hash secret (first VM) or reads it, and the keys updated by CAS.
    pub fn open(
        store: &impl Store,
        instance: &str,
        slots: u32,
        max_variants: usize,
        max_total_bytes: u64,
    ) -> Result<Self, StoreError> {
        let keys = Keys::new(instance);
        let ways = (u64::from(slots.max(1)) * SPARE_NUMERATOR).div_ceil(SPARE_DENOMINATOR);
        let sets = u32::try_from(ways.div_ceil(WAYS as u64)).unwrap_or(u32::MAX).max(1);
        let hash = KeyedHash::new(shared_secret(store, &keys.secret())?);
        let table = Self { max_variants, max_total_bytes, sets, keys, hash };
        for set in 0..sets {
            store.ensure(&table.keys.index(set))?;
        }
        store.ensure(&table.keys.bytes())?;
        store.ensure(&table.keys.evictions())?;
        store.ensure(&table.keys.occupied())?;
        Ok(table)
    }

    /// URIs the index holds at most (sets x ways, spare room included).
    pub fn ways(&self) -> u64 {
        u64::from(self.sets) * WAYS as u64
    }

    fn fingerprint(&self, key: &str) -> u64 {
        self.hash.hash(key.as_bytes()).max(1)
    }

    /// The two candidate sets of a fingerprint (distinct when there are two).
    fn candidates(&self, fingerprint: u64) -> (u32, u32) {
        let sets = u64::from(self.sets);
        let first = ((fingerprint & 0xffff_ffff) * sets) >> 32;
        let mut second = ((fingerprint >> 32) * sets) >> 32;
        if second == first && sets > 1 {
            second = (first + 1) % sets;
        }
        (u32::try_from(first).unwrap_or(0), u32::try_from(second).unwrap_or(0))
    }

    fn read_index(&self, store: &impl Store, set: u32) -> Result<(Index, Option<u32>), StoreError> {
        let (value, cas) = store.get(&self.keys.index(set))?;
        Ok((Index::decode(&value.unwrap_or_default()), cas))
    }

    /// Where `key` is stored, if the index holds it: one index read when it is in
    /// its first set, two otherwise (and for a miss).
    pub fn locate(&self, store: &impl Store, key: &str) -> Result<Option<Location>, StoreError> {
        let fingerprint = self.fingerprint(key);
        let (first, second) = self.candidates(fingerprint);
        let sets = if first == second { &[first][..] } else { &[first, second][..] };
        for &set in sets {
            let (value, _) = store.get(&self.keys.index(set))?;
            if let Some((way, version)) = Index::find_encoded(value.as_deref().unwrap_or_default(), fingerprint) {
                return Ok(Some(Location { set, way, version }));
            }
        }
        Ok(None)
    }

    /// The metadata of a way and its CAS token.
    pub fn read_meta(&self, store: &impl Store, set: u32, way: usize) -> Result<Option<Meta>, StoreError> {
        Ok(store.get(&self.keys.meta(set, way))?.0.as_deref().and_then(decode_meta))
    }

    /// The stored metadata for `key`.
    pub fn lookup(&self, store: &impl Store, key: &str) -> Result<Option<Found>, StoreError> {
        let Some(location) = self.locate(store, key)? else { return Ok(None) };
        let meta = self.read_meta(store, location.set, location.way)?;
        Ok(meta.filter(|meta| meta.key == key).map(|meta| Found { meta, location }))
    }

    /// A variant's body, if it is the generation the metadata names: the value
    /// read from the host is the only copy (the generation trailer is cut off).
    pub fn body(
        &self,
        store: &impl Store,
        location: &Location,
        variant: &Variant,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.keys.body(location.set, location.way, variant.position, variant.generation);
        let mut value = store.get(&key)?.0.unwrap_or_default();
        let Some(split) = value.len().checked_sub(8) else { return Ok(None) };
        let generation = value.get(split..).and_then(|bytes| bytes.try_into().ok()).map(u64::from_le_bytes);
        if generation != Some(variant.generation) || split as u64 != variant.body_len {
            return Ok(None);
        }
        value.truncate(split);
        Ok(Some(value))
    }

    /// Stores (or replaces) the variant with the same selectors. Returns false
    /// when it could not be stored (budget, contention).
    ///
    /// The way is claimed first, with a compare-and-swap of its index set that
    /// already records the new entry, so two writers never pick one way; then the
    /// growth is reserved, the body written, and the metadata swapped in.
    pub fn store(
        &self,
        store: &impl Store,
        key: &str,
        variant: Variant,
        body: &[u8],
        now: u64,
    ) -> Result<bool, StoreError> {
        Ok(self.store_found(store, key, variant, body, now)?.is_some())
    }

    /// [`Table::store`], returning the entry as stored (so the writer's VM can
    /// keep it decoded).
    pub fn store_found(
        &self,
        store: &impl Store,
        key: &str,
        variant: Variant,
        body: &[u8],
        now: u64,
    ) -> Result<Option<Found>, StoreError> {
        let fingerprint = self.fingerprint(key);
        for _ in 0..CAS_RETRIES {
            let Some(way) = self.choose_way(store, fingerprint)? else { return Ok(None) };
            let write = self.prepare(store, key, &way, variant.clone(), body)?;
            let mut index = way.index;
            let Some(entry) = index.entries.get_mut(way.way) else { return Ok(None) };
            let replaced = !entry.is_free() && entry.fingerprint != fingerprint;
            let was_free = entry.is_free();
            *entry = Entry {
                fingerprint,
                version: write.meta.version(),
                stored_at: u32::try_from(now).unwrap_or(u32::MAX),
                bytes: u32::try_from(write.new_size).unwrap_or(u32::MAX),
            };
            if !store.set(&self.keys.index(way.set), &index.encode(), way.index_cas)? {
                continue;
            }
            if was_free {
                self.mark_occupied(store, way.set, true)?;
            }
            if replaced {
                add_to_counter(store, &self.keys.evictions(), 1, CAS_RETRIES)?;
            }
            let location = Location { set: way.set, way: way.way, version: write.meta.version() };
            let meta = write.meta.clone();
            let written = self.write(store, &way, write, now);
            if written != Ok(true) {
                self.resync_entry(store, way.set, way.way, fingerprint)?;
            }
            return Ok(written?.then_some(Found { meta, location }));
        }
        Ok(None)
    }

    /// The way a fingerprint is written to: its own if the index has it, else a
    /// free way of the candidate set with more room, else (both sets full) the
    /// way of the oldest entry of both sets, which the write replaces.
    fn choose_way(&self, store: &impl Store, fingerprint: u64) -> Result<Option<ChosenWay>, StoreError> {
        let (first, second) = self.candidates(fingerprint);
        let mut candidates = vec![(first, self.read_index(store, first)?)];
        if second != first {
            candidates.push((second, self.read_index(store, second)?));
        }
        let own = candidates.iter().enumerate().find_map(|(i, (_, (index, _)))| Some((i, index.find(fingerprint)?)));
        let free = || {
            let roomiest =
                candidates.iter().enumerate().max_by_key(|(i, (_, (index, _)))| (index.free_ways(), *i == 0));
            roomiest.and_then(|(i, (_, (index, _)))| Some((i, index.entries.iter().position(Entry::is_free)?)))
        };
        let oldest = || {
            candidates
                .iter()
                .enumerate()
                .flat_map(|(i, (_, (index, _)))| index.entries.iter().enumerate().map(move |(way, e)| (i, way, *e)))
                .min_by_key(|(_, _, entry)| entry.stored_at)
                .map(|(i, way, _)| (i, way))
        };
        let Some((which, way)) = own.or_else(free).or_else(oldest) else { return Ok(None) };
        Ok(candidates.get(which).map(|(set, (index, index_cas))| ChosenWay {
            set: *set,
            way,
            index: *index,
            index_cas: *index_cas,
        }))
    }

    /// The new metadata of a way: the URI's other variants kept (up to
    /// `max_variants`, the oldest giving way), another URI's dropped.
    fn prepare(
        &self,
        store: &impl Store,
        key: &str,
        way: &ChosenWay,
        mut variant: Variant,
        body: &[u8],
    ) -> Result<PreparedWrite, StoreError> {
        let (value, meta_cas) = store.get(&self.keys.meta(way.set, way.way))?;
        let old = value.as_deref().and_then(decode_meta);
        let old_size = old.as_ref().map_or(0, |meta| meta.size(value.as_ref().map_or(0, Vec::len)));
        let mut dropped: Vec<Variant> = Vec::new();
        let mut meta = match old {
            Some(meta) if meta.key == key => meta,
            // A tombstone, another URI (replaced), or nothing yet.
            other => {
                let next_generation = other.as_ref().map_or(1, |meta| meta.next_generation);
                dropped.extend(other.map(|meta| meta.variants).unwrap_or_default());
                Meta { key: key.to_string(), variants: Vec::new(), next_generation }
            }
        };
        let generation = meta.next_generation;
        meta.next_generation += 1;
        let same_selectors = meta.variants.iter().position(|v| v.selectors == variant.selectors);
        let replaced = same_selectors.or_else(|| {
            (meta.variants.len() >= self.max_variants)
                .then(|| meta.variants.iter().enumerate().min_by_key(|(_, v)| v.stored_at).map(|(i, _)| i))
                .flatten()
        });
        let position = match replaced {
            Some(index) => {
                let old_variant = meta.variants.remove(index);
                let position = old_variant.position;
                dropped.push(old_variant);
                position
            }
            None => (0..self.max_variants).find(|p| meta.variants.iter().all(|v| v.position != *p)).unwrap_or(0),
        };
        variant.generation = generation;
        variant.position = position;
        variant.body_len = body.len() as u64;
        meta.variants.push(variant);
        let encoded = meta.encode();
        let new_size = meta.size(encoded.len());
        let mut body_value = Vec::with_capacity(body.len() + 8);
        body_value.extend_from_slice(body);
        body_value.extend_from_slice(&generation.to_le_bytes());
        let body_key = self.keys.body(way.set, way.way, position, generation);
        Ok(PreparedWrite { meta, encoded, meta_cas, old_size, new_size, dropped, body_key, body_value })
    }

    /// Reserves the growth, writes the body, then swaps the metadata in.
    fn write(&self, store: &impl Store, way: &ChosenWay, write: PreparedWrite, now: u64) -> Result<bool, StoreError> {
        // Reserved before anything is written, so the counter never passes the
        // budget; a failed write releases it.
        let growth = write.new_size.saturating_sub(write.old_size);
        if growth > 0 && !self.make_room(store, growth, (way.set, way.way), now)? {
            return Ok(false);
        }
        store.set(&write.body_key, &write.body_value, None)?;
        // `meta_cas` is None only for a way never written: the claim makes us its only writer.
        if !store.set(&self.keys.meta(way.set, way.way), &write.encoded, write.meta_cas)? {
            self.add_bytes(store, -i128::from(growth))?;
            // Someone else wrote this way (an invalidation, an eviction): empty our
            // body unless their metadata uses that value.
            let current = self.read_meta(store, way.set, way.way)?;
            let used = current.is_some_and(|meta| {
                meta.variants
                    .iter()
                    .any(|v| self.keys.body(way.set, way.way, v.position, v.generation) == write.body_key)
            });
            if !used {
                store.set(&write.body_key, b"", None)?;
            }
            return Ok(false);
        }
        // Old bodies go before the counter shrinks, so it never counts less than is held.
        self.clear_bodies(store, way.set, way.way, &write.dropped, &write.body_key)?;
        self.add_bytes(store, -i128::from(write.old_size.saturating_sub(write.new_size)))?;
        Ok(true)
    }

    /// Makes a way's index entry describe what its metadata holds (after a failed
    /// write: the claim is given back, and a URI it was to replace stays findable).
    fn resync_entry(&self, store: &impl Store, set: u32, way: usize, fingerprint: u64) -> Result<(), StoreError> {
        let (value, _) = store.get(&self.keys.meta(set, way))?;
        let meta = value.as_deref().and_then(decode_meta).filter(|meta| !meta.is_tombstone());
        let entry = meta.map_or(Entry::default(), |meta| Entry {
            fingerprint: self.fingerprint(&meta.key),
            version: meta.version(),
            stored_at: u32::try_from(meta.stored_at()).unwrap_or(u32::MAX),
            bytes: u32::try_from(meta.size(value.as_ref().map_or(0, Vec::len))).unwrap_or(u32::MAX),
        });
        self.update_entry(store, set, way, fingerprint, |current| *current = entry)
    }

    /// Changes a way's index entry if it still belongs to `fingerprint`.
    fn update_entry(
        &self,
        store: &impl Store,
        set: u32,
        way: usize,
        fingerprint: u64,
        change: impl Fn(&mut Entry),
    ) -> Result<(), StoreError> {
        for _ in 0..CAS_RETRIES {
            let (mut index, cas) = self.read_index(store, set)?;
            let Some(entry) = index.entries.get_mut(way).filter(|entry| entry.fingerprint == fingerprint) else {
                return Ok(());
            };
            change(entry);
            if store.set(&self.keys.index(set), &index.encode(), cas)? {
                if index.is_empty() {
                    self.mark_occupied(store, set, false)?;
                }
                return Ok(());
            }
        }
        Ok(())
    }

    /// Updates a variant's headers and freshness after a 304 (RFC 9111 4.3.4).
    pub fn refresh(&self, store: &impl Store, key: &str, updated: &Variant) -> Result<bool, StoreError> {
        for _ in 0..CAS_RETRIES {
            let Some(location) = self.locate(store, key)? else { return Ok(false) };
            let meta_key = self.keys.meta(location.set, location.way);
            let (value, cas) = store.get(&meta_key)?;
            let old_len = value.as_ref().map_or(0, Vec::len);
            let Some(mut meta) = value.as_deref().and_then(decode_meta).filter(|meta| meta.key == key) else {
                return Ok(false);
            };
            let old_size = meta.size(old_len);
            let Some(variant) = meta.variants.iter_mut().find(|v| v.generation == updated.generation) else {
                return Ok(false);
            };
            *variant = updated.clone();
            meta.next_generation += 1;
            let encoded = meta.encode();
            let new_size = meta.size(encoded.len());
            let growth = new_size.saturating_sub(old_size);
            if growth > 0
                && reserve_within(store, &self.keys.bytes(), growth, self.max_total_bytes, CAS_RETRIES)?
                    != Reserve::Reserved
            {
                return Ok(false);
            }
            if store.set(&meta_key, &encoded, cas)? {
                self.add_bytes(store, -i128::from(old_size.saturating_sub(new_size)))?;
                let fingerprint = self.fingerprint(key);
                let (version, bytes) = (meta.version(), u32::try_from(new_size).unwrap_or(u32::MAX));
                self.update_entry(store, location.set, location.way, fingerprint, |entry| {
                    entry.version = version;
                    entry.bytes = bytes;
                })?;
                return Ok(true);
            }
            self.add_bytes(store, -i128::from(growth))?;
        }
        Ok(false)
    }

    /// Removes every variant of `key` (invalidation, purge). Returns whether
    /// anything was removed.
    pub fn remove(&self, store: &impl Store, key: &str) -> Result<bool, StoreError> {
        let Some(location) = self.locate(store, key)? else { return Ok(false) };
        self.evict(store, location.set, location.way, Some(key))
    }

    /// Replaces a way's metadata by a tombstone, empties its bodies, gives its
    /// bytes back and frees its index entry. `only`: evict only this URI.
    fn evict(&self, store: &impl Store, set: u32, way: usize, only: Option<&str>) -> Result<bool, StoreError> {
        let meta_key = self.keys.meta(set, way);
        for _ in 0..CAS_RETRIES {
            let (value, cas) = store.get(&meta_key)?;
            let Some(meta) = value.as_deref().and_then(decode_meta).filter(|meta| !meta.is_tombstone()) else {
                return Ok(false);
            };
            if only.is_some_and(|key| key != meta.key) {
                return Ok(false);
            }
            let tombstone =
                Meta { key: String::new(), variants: Vec::new(), next_generation: meta.next_generation + 1 };
            if store.set(&meta_key, &tombstone.encode(), cas)? {
                self.clear_bodies(store, set, way, &meta.variants, "")?;
                self.add_bytes(store, -i128::from(meta.size(value.as_ref().map_or(0, Vec::len))))?;
                self.update_entry(store, set, way, self.fingerprint(&meta.key), |entry| *entry = Entry::default())?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Takes the fill lock of `key` for `timeout_ms`, or finds that a fill of it
    /// runs. One lock value per way (bounded key space), shared by the URIs that
    /// hash to it; a fill past its deadline is over.
    pub fn lead_or_follow(
        &self,
        store: &impl Store,
        key: &str,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Result<FillRole, StoreError> {
        let fingerprint = self.fingerprint(key);
        let lock_key = self.fill_lock_key(fingerprint);
        for _ in 0..CAS_RETRIES {
            let (value, cas) = store.get(&lock_key)?;
            let Some(lock) = FillLock::decode(value.as_deref()) else { return Ok(FillRole::Alone) };
            if lock.running(fingerprint, now_ms) {
                return Ok(FillRole::Follow);
            }
            let mut taken = lock.without(fingerprint, now_ms);
            if taken.fills.len() >= FILLS_PER_LOCK {
                return Ok(FillRole::Alone);
            }
            taken.fills.push((fingerprint, now_ms.saturating_add(timeout_ms)));
            if store.set(&lock_key, &taken.encode(), if value.is_some() { cas } else { CREATE_ONLY })? {
                return Ok(FillRole::Lead);
            }
            // Another worker wrote the value first: read it again.
        }
        Ok(FillRole::Alone)
    }

    /// Gives the fill lock of `key` back (if it still holds it); the other URIs'
    /// fills in the same value stay.
    pub fn end_fill(&self, store: &impl Store, key: &str) -> Result<(), StoreError> {
        let fingerprint = self.fingerprint(key);
        let lock_key = self.fill_lock_key(fingerprint);
        for _ in 0..CAS_RETRIES {
            let (value, cas) = store.get(&lock_key)?;
            let Some(lock) = FillLock::decode(value.as_deref()) else { return Ok(()) };
            if !lock.fills.iter().any(|&(holder, _)| holder == fingerprint) {
                return Ok(());
            }
            // Deadlines are judged by readers; the others are kept as they are.
            let rest = lock.without(fingerprint, 0);
            if store.set(&lock_key, &rest.encode(), cas)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Whether a fill of `key` is still running (on any worker).
    pub fn fill_running(&self, store: &impl Store, key: &str, now_ms: u64) -> Result<bool, StoreError> {
        let fingerprint = self.fingerprint(key);
        let (value, _) = store.get(&self.fill_lock_key(fingerprint))?;
        Ok(FillLock::decode(value.as_deref()).is_some_and(|lock| lock.running(fingerprint, now_ms)))
    }

    fn fill_lock_key(&self, fingerprint: u64) -> String {
        self.keys.fill(fingerprint % self.ways())
    }

    pub fn bytes(&self, store: &impl Store) -> Result<u64, StoreError> {
        read_counter(store, &self.keys.bytes())
    }

    /// URIs evicted (budget, or a full pair of sets), since the process started.
    pub fn evictions(&self, store: &impl Store) -> Result<u64, StoreError> {
        read_counter(store, &self.keys.evictions())
    }

    fn add_bytes(&self, store: &impl Store, delta: i128) -> Result<(), StoreError> {
        if delta != 0 {
            add_to_counter(store, &self.keys.bytes(), delta, CAS_RETRIES)?;
        }
        Ok(())
    }

    /// Reserves `needed` bytes of the budget, evicting the oldest entries while it
    /// is full. `true`: the bytes are reserved (counted) for the caller.
    fn make_room(&self, store: &impl Store, needed: u64, keep: (u32, usize), now: u64) -> Result<bool, StoreError> {
        for round in 0..EVICTION_ROUNDS {
            match reserve_within(store, &self.keys.bytes(), needed, self.max_total_bytes, CAS_RETRIES)? {
                Reserve::Reserved => return Ok(true),
                Reserve::Contended => continue,
                Reserve::Full => {}
            }
            let start = self.hash.hash(&[now.to_le_bytes(), round.to_le_bytes()].concat());
            let Some((set, way)) = self.oldest_of_some_occupied_sets(store, start, keep)? else {
                return Ok(false);
            };
            if self.evict(store, set, way, None)? {
                add_to_counter(store, &self.keys.evictions(), 1, CAS_RETRIES)?;
            }
        }
        Ok(false)
    }

    /// The oldest evictable entry of the first [`EVICTION_SAMPLE`] occupied sets
    /// from a pseudo-random start (the occupancy bitmap finds them however few).
    fn oldest_of_some_occupied_sets(
        &self,
        store: &impl Store,
        start: u64,
        keep: (u32, usize),
    ) -> Result<Option<(u32, usize)>, StoreError> {
        let occupied = store.get(&self.keys.occupied())?.0.unwrap_or_default();
        let is_occupied = |set: u32| {
            occupied.first() == Some(&FORMAT)
                && occupied.get(1 + set as usize / 8).is_some_and(|byte| byte & (1 << (set % 8)) != 0)
        };
        let first = u32::try_from(start % u64::from(self.sets)).unwrap_or(0);
        let mut oldest: Option<(u32, usize, u32)> = None;
        let mut sampled = 0;
        for step in 0..self.sets {
            let set = (first + step) % self.sets;
            if !is_occupied(set) {
                continue;
            }
            let (index, _) = self.read_index(store, set)?;
            for (way, entry) in index.entries.iter().enumerate() {
                if !entry.is_free()
                    && entry.bytes > 0
                    && (set, way) != keep
                    && oldest.is_none_or(|(_, _, at)| entry.stored_at < at)
                {
                    oldest = Some((set, way, entry.stored_at));
                }
            }
            if index.is_empty() {
                self.mark_occupied(store, set, false)?;
            }
            sampled += 1;
            if sampled >= EVICTION_SAMPLE && oldest.is_some() {
                break;
            }
        }
        Ok(oldest.map(|(set, way, _)| (set, way)))
    }

    /// Sets or clears a set's bit in the occupancy bitmap. A cleared bit is
    /// checked against the index once more, so a concurrent claim is not hidden.
    fn mark_occupied(&self, store: &impl Store, set: u32, occupied: bool) -> Result<(), StoreError> {
        let key = self.keys.occupied();
        let (byte, bit) = (1 + set as usize / 8, 1u8 << (set % 8));
        for _ in 0..CAS_RETRIES {
            let (value, cas) = store.get(&key)?;
            let mut bitmap = value.filter(|value| value.first() == Some(&FORMAT)).unwrap_or_else(|| vec![FORMAT]);
            if bitmap.len() <= byte {
                bitmap.resize(byte + 1, 0);
            }
            let Some(slot) = bitmap.get_mut(byte) else { return Ok(()) };
            if (*slot & bit != 0) == occupied {
                return Ok(());
            }
            *slot ^= bit;
            if store.set(&key, &bitmap, cas)? {
                if !occupied && !self.read_index(store, set)?.0.is_empty() {
                    return self.mark_occupied(store, set, true);
                }
                return Ok(());
            }
        }
        Ok(())
    }

    /// Empties the body values of variants no longer referenced (shared data keeps
    /// every key, so memory is only returned by emptying values).
    fn clear_bodies(
        &self,
        store: &impl Store,
        set: u32,
        way: usize,
        variants: &[Variant],
        except: &str,
    ) -> Result<(), StoreError> {
        for variant in variants {
            let key = self.keys.body(set, way, variant.position, variant.generation);
            if key != except {
                store.set(&key, b"", None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::shared::MemoryStore;

    fn variant(selector: &str, stored_at: u64) -> Variant {
        Variant {
            selectors: vec![("accept-encoding".into(), Some(selector.into()))],
            status: 200,
            headers: vec![("content-type".into(), "text/plain".into())].into(),
            stored_at,
            initial_age: 0,
            lifetime: 60,
            no_cache: false,
            no_stale: false,
            stale_while_revalidate: Some(5),
            stale_if_error: None,
            etag: Some("\"v1\"".into()),
            last_modified: None,
            generation: 0,
            body_len: 0,
            position: 0,
        }
    }

    fn table(store: &MemoryStore, slots: u32, max_variants: usize, max_total_bytes: u64) -> Table {
        Table::open(store, "cache", slots, max_variants, max_total_bytes).unwrap()
    }

    fn stored(table: &Table, store: &MemoryStore, key: &str) -> Option<Vec<u8>> {
        let found = table.lookup(store, key).unwrap()?;
        let variant = found.meta.variants.first()?;
        table.body(store, &found.location, variant).unwrap()
    }

    /// What shared data actually holds for the budget: metadata and body values
    /// of every way.
    fn held_bytes(table: &Table, store: &MemoryStore) -> u64 {
        let mut held = 0;
        for set in 0..table.sets {
            for way in 0..WAYS {
                let meta = store.get(&table.keys.meta(set, way)).unwrap().0.unwrap_or_default();
                if decode_meta(&meta).is_some_and(|meta| !meta.is_tombstone()) {
                    held += meta.len() as u64;
                }
                for position in 0..table.max_variants {
                    for parity in 0..2 {
                        let body = store.get(&table.keys.body(set, way, position, parity)).unwrap().0;
                        held += body.map_or(0, |body| body.len() as u64);
                    }
                }
            }
        }
        held
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
            if key.contains(":b:") {
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
        let store = MemoryStore::default();
        let table = table(&store, 64, 1, 60_000);
        let racing = Interleaved {
            inner: &store,
            other_worker: std::cell::RefCell::new(Some(Box::new(|inner: &MemoryStore| {
                let _ = table.store(inner, "b.example/other", variant("gzip", 10), &body, 10).unwrap();
            }))),
        };
        let _ = table.store(&racing, "a.example/one", variant("gzip", 10), &body, 10).unwrap();
        let counted = table.bytes(&store).unwrap();
        assert!(counted <= table.max_total_bytes, "counted {counted} of {}", table.max_total_bytes);
        let kept =
            ["a.example/one", "b.example/other"].iter().filter(|key| stored(&table, &store, key).is_some()).count();
        assert_eq!(kept, 1, "only one of two 40 kB entries fits a 60 kB budget");
        assert_eq!(held_bytes(&table, &store), counted);
    }

    #[test]
    fn store_lookup_variants_and_remove() {
        let store = MemoryStore::default();
        let table = table(&store, 16, 2, 1 << 20);
        assert!(table.store(&store, "k", variant("gzip", 1), b"zipped", 1).unwrap());
        assert!(table.store(&store, "k", variant("br", 2), b"brotli", 2).unwrap());
        assert!(table.store(&store, "k", variant("id", 3), b"plain", 3).unwrap(), "oldest variant replaced");
        let found = table.lookup(&store, "k").unwrap().unwrap();
        assert_eq!(found.meta.variants.len(), 2);
        let plain = found.meta.variants.iter().find(|v| v.selectors[0].1.as_deref() == Some("id")).unwrap();
        assert_eq!(table.body(&store, &found.location, plain).unwrap().unwrap(), b"plain");
        assert_eq!(held_bytes(&table, &store), table.bytes(&store).unwrap());
        assert!(table.remove(&store, "k").unwrap());
        assert!(table.lookup(&store, "k").unwrap().is_none());
        assert_eq!(table.bytes(&store).unwrap(), 0);
        assert_eq!(held_bytes(&table, &store), 0);
        assert!(table.store(&store, "k", variant("gzip", 4), b"again", 4).unwrap(), "a removed URI can come back");
        assert_eq!(stored(&table, &store, "k").unwrap(), b"again");
    }

    #[test]
    fn the_metadata_round_trips_and_foreign_values_are_empty() {
        let meta = Meta { key: "https://a/x".into(), variants: vec![variant("gzip", 7)], next_generation: 9 };
        assert_eq!(decode_meta(&meta.encode()), Some(meta.clone()));
        let mut other_format = meta.encode();
        other_format[0] = 1;
        assert_eq!(decode_meta(&other_format), None);
        assert_eq!(decode_meta(b"garbage"), None);
        assert_eq!(decode_meta(b""), None);
        let encoded = meta.encode();
        assert_eq!(decode_meta(&encoded[..encoded.len() - 1]), None, "a cut value");
        assert_eq!(decode_meta(&[encoded.as_slice(), b"x"].concat()), None, "trailing bytes");
    }

    #[test]
    fn an_index_set_is_searched_in_place_as_its_decoded_form_is() {
        let mut index = Index::default();
        for (way, entry) in index.entries.iter_mut().enumerate().filter(|(way, _)| way % 3 != 1) {
            let way = way as u32;
            *entry = Entry {
                fingerprint: 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(u64::from(way + 1)),
                version: way * 7,
                stored_at: way,
                bytes: 1,
            };
        }
        let encoded = index.encode();
        for way in 0..WAYS {
            let fingerprint = index.entries[way].fingerprint.max(0x5555);
            let decoded = index.find(fingerprint).map(|way| (way, index.entries[way].version));
            assert_eq!(Index::find_encoded(&encoded, fingerprint), decoded, "way {way}");
        }
        assert_eq!(Index::find_encoded(&encoded, index.entries[2].fingerprint), Some((2, 14)));
        let mut other_format = encoded.clone();
        other_format[0] = FORMAT + 1;
        assert_eq!(Index::find_encoded(&other_format, index.entries[2].fingerprint), None);
        assert_eq!(Index::find_encoded(&encoded[..encoded.len() - 1], index.entries[2].fingerprint), None);
        assert_eq!(Index::find_encoded(b"", 1), None);
    }

    #[test]
    fn nine_tenths_of_the_capacity_are_all_kept() {
        // Sequential URIs (the worst case for an unkeyed hash) and random ones.
        for slots in [64u32, 1024, 10_000] {
            for sequential in [true, false] {
                let store = MemoryStore::default();
                let table = table(&store, slots, 1, u64::MAX / 2);
                let uris: Vec<String> = (0..slots * 9 / 10)
                    .map(|n| {
                        if sequential {
                            format!("https://a/item/{n:05}")
                        } else {
                            format!("https://a/{:x}", n.wrapping_mul(2_654_435_761))
                        }
                    })
                    .collect();
                for (n, uri) in uris.iter().enumerate() {
                    assert!(table.store(&store, uri, variant("a", n as u64), b"x", n as u64).unwrap(), "{uri}");
                }
                let lost = uris.iter().filter(|uri| stored(&table, &store, uri).is_none()).count();
                assert_eq!(lost, 0, "slots {slots}, sequential {sequential}");
                assert_eq!(table.evictions(&store).unwrap(), 0);
            }
        }
    }

    #[test]
    fn with_the_budget_full_every_new_entry_that_fits_is_stored() {
        // 1 MiB budget, 64 KiB bodies: about 15 fit; 40 more must each find a victim.
        let store = MemoryStore::default();
        let table = table(&store, 1024, 1, 1 << 20);
        let body = vec![b'x'; 64 * 1024];
        for n in 0..60u64 {
            let uri = format!("https://a/big/{n}");
            assert!(table.store(&store, &uri, variant("a", n), &body, n).unwrap(), "entry {n} not stored");
            assert!(stored(&table, &store, &uri).is_some());
            let counted = table.bytes(&store).unwrap();
            assert!(counted <= table.max_total_bytes);
            assert_eq!(held_bytes(&table, &store), counted, "after {n}");
        }
        assert!(table.evictions(&store).unwrap() >= 40);
        assert!(stored(&table, &store, "https://a/big/0").is_none(), "the oldest went first");
    }

    #[test]
    fn the_budget_is_never_exceeded_and_keys_stay_bounded() {
        let store = MemoryStore::default();
        let table = table(&store, 64, 4, 64 * 1024);
        let body = vec![b'x'; 4096];
        for n in 0..2_000u64 {
            table.store(&store, &format!("/item?x={n}"), variant("a", n), &body, n).unwrap();
            assert!(table.bytes(&store).unwrap() <= table.max_total_bytes, "after {n}");
        }
        assert!(table.evictions(&store).unwrap() > 1_000, "older entries were evicted");
        // Index, counters, bitmap, secret; metadata and 2 bodies per variant per way.
        let ways = table.ways() as usize;
        assert!(store.len() <= table.sets as usize + 4 + ways + ways * 4 * 2, "{} keys", store.len());
        assert_eq!(held_bytes(&table, &store), table.bytes(&store).unwrap());
    }

    #[test]
    fn a_body_of_another_generation_is_a_miss() {
        let store = MemoryStore::default();
        let table = table(&store, 4, 1, 1 << 20);
        table.store(&store, "k", variant("a", 1), b"one", 1).unwrap();
        let old = table.lookup(&store, "k").unwrap().unwrap();
        table.store(&store, "k", variant("a", 2), b"two!", 2).unwrap();
        table.store(&store, "k", variant("a", 3), b"six", 3).unwrap();
        // The old metadata's parity was overwritten by generation 3: detected.
        assert_eq!(table.body(&store, &old.location, &old.meta.variants[0]).unwrap(), None);
        // Removal keeps the generation going: a new entry never reuses an old one.
        table.remove(&store, "k").unwrap();
        table.store(&store, "k", variant("a", 4), b"one", 4).unwrap();
        assert_eq!(table.body(&store, &old.location, &old.meta.variants[0]).unwrap(), None);
    }

    #[test]
    fn placement_depends_on_a_secret_the_workers_share() {
        let store = MemoryStore::default();
        let one = table(&store, 1024, 1, 1 << 20);
        let same_process = table(&store, 1024, 1, 1 << 20);
        let other_process = table(&MemoryStore::default(), 1024, 1, 1 << 20);
        let key = "https://a/target";
        assert_eq!(one.candidates(one.fingerprint(key)), same_process.candidates(same_process.fingerprint(key)));
        let differs = (0..32).any(|n| {
            let key = format!("https://a/{n}");
            one.candidates(one.fingerprint(&key)) != other_process.candidates(other_process.fingerprint(&key))
        });
        assert!(differs, "another secret places URIs elsewhere");
        let instance = Table::open(&store, "cache-2", 1024, 1, 1 << 20).unwrap();
        assert!(one.store(&store, key, variant("a", 1), b"x", 1).unwrap());
        assert!(instance.lookup(&store, key).unwrap().is_none(), "instances never share entries");
    }

    #[test]
    fn one_request_leads_a_fill_until_it_ends_or_its_deadline_passes() {
        let store = MemoryStore::default();
        let table = table(&store, 64, 1, 1 << 20);
        assert_eq!(table.lead_or_follow(&store, "k", 1_000, 500).unwrap(), FillRole::Lead);
        assert_eq!(table.lead_or_follow(&store, "k", 1_100, 500).unwrap(), FillRole::Follow);
        assert!(table.fill_running(&store, "k", 1_100).unwrap());
        assert!(!table.fill_running(&store, "k", 1_600).unwrap(), "past its deadline");
        assert_eq!(
            table.lead_or_follow(&store, "k", 1_600, 500).unwrap(),
            FillRole::Lead,
            "a stale lock is taken over"
        );
        table.end_fill(&store, "k").unwrap();
        assert!(!table.fill_running(&store, "k", 1_700).unwrap());
        assert_eq!(table.lead_or_follow(&store, "k", 1_700, 500).unwrap(), FillRole::Lead);
    }

    /// URIs that share a fill-lock value each collapse on their own fill: before,
    /// one URI's fill sent every identical miss of the other to the origin.
    #[test]
    fn uris_sharing_a_fill_lock_value_each_lead_their_own_fill() {
        let store = MemoryStore::default();
        let table = table(&store, 1, 1, 1 << 20);
        let slot = |key: &str| table.fingerprint(key) % table.ways();
        let sharing: Vec<String> = (0..10_000)
            .map(|n| format!("https://a/{n}"))
            .filter(|key| slot(key) == slot("https://a/0"))
            .take(FILLS_PER_LOCK + 1)
            .collect();
        assert_eq!(sharing.len(), FILLS_PER_LOCK + 1);
        let (first, second) = (&sharing[0], &sharing[1]);
        assert_eq!(table.lead_or_follow(&store, first, 1_000, 500).unwrap(), FillRole::Lead);
        assert_eq!(table.lead_or_follow(&store, second, 1_010, 500).unwrap(), FillRole::Lead);
        assert_eq!(table.lead_or_follow(&store, first, 1_020, 500).unwrap(), FillRole::Follow);
        assert_eq!(table.lead_or_follow(&store, second, 1_020, 500).unwrap(), FillRole::Follow);
        table.end_fill(&store, first).unwrap();
        assert!(!table.fill_running(&store, first, 1_030).unwrap());
        assert!(table.fill_running(&store, second, 1_030).unwrap(), "the other URI's fill goes on");
        // The value is bounded: past FILLS_PER_LOCK running fills a URI goes alone.
        for key in &sharing[2..FILLS_PER_LOCK + 1] {
            assert_eq!(table.lead_or_follow(&store, key, 1_040, 500).unwrap(), FillRole::Lead, "{key}");
        }
        assert_eq!(table.lead_or_follow(&store, first, 1_050, 500).unwrap(), FillRole::Alone);
        // Fills past their deadline make room.
        assert_eq!(table.lead_or_follow(&store, first, 1_520, 500).unwrap(), FillRole::Lead);
        assert!(table.fill_running(&store, &sharing[2], 1_520).unwrap(), "taken at 1 040, due at 1 540");
    }

    #[test]
    fn a_failed_write_gives_its_claim_back_and_keeps_what_it_would_replace() {
        let store = MemoryStore::default();
        let table = table(&store, 16, 1, 10_000);
        assert!(table.store(&store, "small", variant("a", 1), b"x", 1).unwrap());
        let huge = vec![b'x'; 20_000];
        assert!(!table.store(&store, "small", variant("a", 2), &huge, 2).unwrap(), "larger than the budget");
        assert_eq!(stored(&table, &store, "small").unwrap(), b"x");
    }
}
