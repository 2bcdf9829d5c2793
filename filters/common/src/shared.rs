//! Proxy-wasm shared data behind a small trait, so logic that keeps state there
//! (rate-limit buckets, JWKS documents) is unit-tested natively against an
//! in-memory map with the same compare-and-swap semantics.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

use crate::host::{self, CasWrite};

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

/// The host's shared data (one map per `vm_id`, per Envoy process).
pub struct HostStore;

impl Store for HostStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
        host::shared_data(key).map_err(|_| StoreError)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        match host::set_shared_data(key, value, cas) {
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
