//! Proxy-wasm shared data behind a small trait, so logic that keeps state there
//! (rate-limit buckets, JWKS documents) is unit-tested natively against an
//! in-memory map with the same compare-and-swap semantics.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

use crate::host::CasWrite;
use crate::platform::{Ffi, Host};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreError;

/// Shared data as the logic sees it.
pub trait Store {
    /// The value and its CAS token; `(None, None)` when never set.
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    /// Writes if `cas` still matches (`None`: unconditionally); `Ok(false)` on a
    /// CAS conflict.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError>;

    /// Creates `key` as an empty placeholder if it was never set. Later writes
    /// can then always be real compare-and-swaps: a write to a never-set key
    /// cannot be one (Envoy treats CAS 0 as "no check").
    fn ensure(&self, key: &str) -> Result<(), StoreError> {
        if self.get(key)?.0.is_none() {
            self.set(key, b"", None)?;
        }
        Ok(())
    }
}

/// A CAS token no write ever produced: Envoy (and proxy-wasm hosts generally)
/// creates a missing key whatever the CAS, and refuses a mismatching one on an
/// existing key, so a write with this token means "create unless present".
pub const CREATE_ONLY: Option<u32> = Some(u32::MAX);

/// A 16-byte secret shared by every VM of this `vm_id`: the first VM to ask
/// creates it (create-unless-present, so two workers starting together agree).
pub fn shared_secret(store: &impl Store, key: &str) -> Result<[u8; 16], StoreError> {
    const SECRET_FORMAT: u8 = 1;
    let decode = |value: Option<Vec<u8>>| -> Option<[u8; 16]> {
        match value?.split_first() {
            Some((&SECRET_FORMAT, rest)) => rest.try_into().ok(),
            _ => None,
        }
    };
    for _ in 0..4 {
        let (value, cas) = store.get(key)?;
        if let Some(secret) = decode(value.clone()) {
            return Ok(secret);
        }
        let mut encoded = vec![SECRET_FORMAT];
        encoded.extend_from_slice(&crate::hash::random_secret().ok_or(StoreError)?);
        // Never set: create it; set to something else (a foreign format): replace it.
        let _ = store.set(key, &encoded, if value.is_some() { cas } else { CREATE_ONLY })?;
    }
    decode(store.get(key)?.0).ok_or(StoreError)
}

/// A counter in one shared-data value: a format-version byte and a u64 LE.
/// Unset, placeholder or foreign values read as 0.
pub fn read_counter(store: &impl Store, key: &str) -> Result<u64, StoreError> {
    Ok(decode_counter(&store.get(key)?.0.unwrap_or_default()))
}

/// Adds `delta` (saturating at 0 and u64::MAX) with compare-and-swap; `Ok(false)`
/// when `retries` attempts all lost to other writers.
pub fn add_to_counter(store: &impl Store, key: &str, delta: i128, retries: u32) -> Result<bool, StoreError> {
    for _ in 0..=retries {
        let (value, cas) = store.get(key)?;
        let current = i128::from(decode_counter(&value.unwrap_or_default()));
        let next = u64::try_from((current + delta).clamp(0, i128::from(u64::MAX))).unwrap_or(u64::MAX);
        let mut encoded = vec![COUNTER_FORMAT];
        encoded.extend_from_slice(&next.to_le_bytes());
        if store.set(key, &encoded, cas)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What [`reserve_within`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// The amount was added; the counter stays within the limit.
    Reserved,
    /// Adding it would pass the limit; nothing was added.
    Full,
    /// Every attempt lost to another writer; nothing was added.
    Contended,
}

/// Adds `amount` to a counter only if the sum stays within `limit`, in one
/// compare-and-swap: check and add cannot be split by another worker, so two
/// workers can never both fit into the last free bytes.
pub fn reserve_within(
    store: &impl Store,
    key: &str,
    amount: u64,
    limit: u64,
    retries: u32,
) -> Result<Reserve, StoreError> {
    for _ in 0..=retries {
        let (value, cas) = store.get(key)?;
        let current = decode_counter(&value.unwrap_or_default());
        let Some(next) = current.checked_add(amount).filter(|next| *next <= limit) else {
            return Ok(Reserve::Full);
        };
        let mut encoded = vec![COUNTER_FORMAT];
        encoded.extend_from_slice(&next.to_le_bytes());
        if store.set(key, &encoded, cas)? {
            return Ok(Reserve::Reserved);
        }
    }
    Ok(Reserve::Contended)
}

const COUNTER_FORMAT: u8 = 1;

fn decode_counter(bytes: &[u8]) -> u64 {
    match bytes.split_first() {
        Some((&COUNTER_FORMAT, rest)) => rest.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes),
        _ => 0,
    }
}

/// The host's shared data (one map per `vm_id`, per Envoy process).
pub struct HostStore;

impl Store for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        SharedData(&Ffi).get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        SharedData(&Ffi).set(key, value, cas)
    }
}

/// Shared data of any [`Host`] as a [`Store`].
pub struct SharedData<'h, H: Host>(pub &'h H);

impl<H: Host> Store for SharedData<'_, H> {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        self.0.shared_data(key).map_err(|_| StoreError)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        match self.0.set_shared_data(key, value, cas) {
            Ok(CasWrite::Written) => Ok(true),
            Ok(CasWrite::Conflict) => Ok(false),
            Err(_) => Err(StoreError),
        }
    }
}

/// Shared data as Envoy implements it, in memory: CAS tokens change on every
/// write, keys are never removed. Records every key name it was asked about.
#[derive(Default)]
pub struct MemoryStore {
    values: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: RefCell<u32>,
    pub key_names: RefCell<BTreeSet<String>>,
}

impl MemoryStore {
    pub fn len(&self) -> usize {
        self.values.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.borrow().is_empty()
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        self.key_names.borrow_mut().insert(key.to_string());
        Ok(match self.values.borrow().get(key) {
            Some((value, cas)) => (Some(value.clone()), Some(*cas)),
            None => (None, None),
        })
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        self.key_names.borrow_mut().insert(key.to_string());
        let mut values = self.values.borrow_mut();
        if let (Some(expected), Some((_, current))) = (cas, values.get(key)) {
            if expected != *current {
                return Ok(false);
            }
        }
        let mut next = self.next_cas.borrow_mut();
        *next = next.wrapping_add(1).max(1);
        values.insert(key.to_string(), (value.to_vec(), *next));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_gets_the_secret_the_first_one_created() {
        let store = MemoryStore::default();
        let first = shared_secret(&store, "s").unwrap();
        assert_eq!(shared_secret(&store, "s").unwrap(), first);
        // A key another writer created in the meantime is never overwritten.
        store.set("t", b"\x01aaaaaaaaaaaaaaaa", None).unwrap();
        assert_eq!(shared_secret(&store, "t").unwrap(), *b"aaaaaaaaaaaaaaaa");
        store.set("u", b"garbage", None).unwrap();
        assert_ne!(shared_secret(&store, "u").unwrap(), first, "a foreign value is replaced");
    }

    #[test]
    fn a_create_only_write_never_replaces_a_value() {
        let store = MemoryStore::default();
        assert!(store.set("k", b"one", CREATE_ONLY).unwrap());
        assert!(!store.set("k", b"two", CREATE_ONLY).unwrap());
        assert_eq!(store.get("k").unwrap().0.unwrap(), b"one");
    }
}
