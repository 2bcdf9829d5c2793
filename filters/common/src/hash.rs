//! Hash functions. Fixed, documented ones where a decision must agree across
//! workers, restarts and releases (FNV-1a for canary splits); a keyed one where a
//! client must not be able to aim at a slot (table placement): its secret is
//! shared by the workers through shared data (`shared::shared_secret`).

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

/// 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// SipHash-1-3 under a 128-bit secret: without the secret, nobody can compute
/// which table slot a key lands in, so no crafted key can aim at another's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyedHash {
    secret: [u8; 16],
}

impl KeyedHash {
    pub fn new(secret: [u8; 16]) -> Self {
        Self { secret }
    }

    pub fn hash(&self, bytes: &[u8]) -> u64 {
        let mut hasher = SipHasher13::new_with_key(&self.secret);
        hasher.write(bytes);
        hasher.finish()
    }
}

/// A cheap hasher for this VM's maps keyed by integers it derived itself (table
/// positions, generations), where SipHash's protection buys nothing: no client
/// chooses these keys. Never key it by request bytes. A multiply-rotate step per
/// integer (as rustc's FxHasher), rotated at the end so the low bits a hash
/// table indexes by depend on every input bit.
#[derive(Debug, Clone, Copy, Default)]
pub struct IntegerHasher(u64);

/// `HashMap<K, V, IntegerHashing>`: a map keyed by this VM's own integers.
pub type IntegerHashing = std::hash::BuildHasherDefault<IntegerHasher>;

impl IntegerHasher {
    fn add(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }
}

impl Hasher for IntegerHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.add(u64::from(*byte));
        }
    }

    fn write_u32(&mut self, value: u32) {
        self.add(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }

    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
}

/// 16 bytes from the host's random source (WASI `random_get` in Wasm).
pub fn random_secret() -> Option<[u8; 16]> {
    let mut secret = [0u8; 16];
    getrandom::fill(&mut secret).ok()?;
    Some(secret)
}

/// A lower-case or upper-case hex SHA-256 digest (64 characters) as bytes.
pub fn decode_sha256_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (index, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(digest)
}

/// Constant-time equality of two digests (secrets are compared with this).
pub fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_decode_and_compare() {
        let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let digest = decode_sha256_hex(hex);
        assert!(digest.is_some_and(|d| digests_equal(&d, &d)));
        assert_eq!(decode_sha256_hex("plaintext"), None);
        assert_eq!(decode_sha256_hex(&"zz".repeat(32)), None);
        assert!(!digests_equal(&[0; 32], &[1; 32]));
    }

    #[test]
    fn keyed_hashes_depend_on_the_secret() {
        let one = KeyedHash::new([1; 16]);
        assert_eq!(one.hash(b"/a"), KeyedHash::new([1; 16]).hash(b"/a"), "same secret, same placement");
        assert_ne!(one.hash(b"/a"), KeyedHash::new([2; 16]).hash(b"/a"));
        assert_ne!(random_secret(), random_secret());
    }

    #[test]
    fn integer_keys_spread_over_the_low_bits_a_table_indexes_by() {
        use std::hash::BuildHasher as _;
        let hashing = IntegerHashing::default();
        let mut buckets = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for set in 0..256u32 {
            for way in 0..16usize {
                let hash = hashing.hash_one((set, way));
                hashes.insert(hash);
                buckets.insert(hash & 0xfff);
            }
        }
        assert_eq!(hashes.len(), 4096, "every key its own hash");
        assert!(buckets.len() > 2500, "4096 keys over 4096 buckets fill {} of them", buckets.len());
    }

    #[test]
    fn matches_published_fnv1a_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
