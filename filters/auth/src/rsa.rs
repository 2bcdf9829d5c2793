//! RSA signature verification for JWS RS256/384/512 (RSASSA-PKCS1-v1_5) and
//! PS256/384/512 (RSASSA-PSS, salt as long as the hash), RFC 8017.
//!
//! Why our own: verifying needs `s^e mod n` with a public `s`, `e` and `n`, so
//! none of the constant-time machinery a private-key operation needs. The `rsa`
//! crate's constant-time arithmetic (behind jsonwebtoken) cost 112 µs per RS256
//! verification natively and far more in Wasm; Montgomery multiplication with
//! the usual e = 65537 is 17 multiplications. Limbs are 32-bit: Wasm multiplies
//! 64-bit integers natively but has no 64x64->128 product to build on. Every input is
//! checked: the signature must be exactly as long as the modulus and below it,
//! and the whole encoded message is compared, never parsed leniently.

use sha2::{Digest, Sha256, Sha384, Sha512};

/// Hash of a JWS algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest(self, message: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha256 => Sha256::digest(message).to_vec(),
            Hash::Sha384 => Sha384::digest(message).to_vec(),
            Hash::Sha512 => Sha512::digest(message).to_vec(),
        }
    }

    fn len(self) -> usize {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    /// DER of `DigestInfo` up to the digest (RFC 8017 §9.2, note 1).
    fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            Hash::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00,
                0x04, 0x20,
            ],
            Hash::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00,
                0x04, 0x30,
            ],
            Hash::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00,
                0x04, 0x40,
            ],
        }
    }
}

/// Moduli outside this range are refused (below 2048 bits is breakable; above
/// 8192 is no key anyone issues, and costs time).
const MIN_MODULUS_BITS: usize = 2048;
const MAX_MODULUS_BITS: usize = 8192;

/// An RSA public key with its Montgomery constants, computed once.
#[derive(Clone, PartialEq, Eq)]
pub struct RsaPublicKey {
    /// The modulus, little-endian 32-bit limbs.
    n: Vec<u32>,
    /// Bytes of the modulus (k in RFC 8017).
    size: usize,
    /// Bits of the modulus.
    bits: usize,
    e: u64,
    /// -n^-1 mod 2^32.
    n_prime: u32,
    /// R^2 mod n, R = 2^(32 * limbs).
    r_squared: Vec<u32>,
}

impl std::fmt::Debug for RsaPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RsaPublicKey({} bits, e = {})", self.bits, self.e)
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let zeros = bytes.iter().take_while(|byte| **byte == 0).count();
    bytes.get(zeros..).unwrap_or_default()
}

/// Big-endian bytes to little-endian limbs (`limbs` of them; the value must fit).
fn to_limbs(bytes: &[u8], limbs: usize) -> Vec<u32> {
    let mut out = vec![0u32; limbs];
    for (index, byte) in bytes.iter().rev().enumerate() {
        if let Some(limb) = out.get_mut(index / 4) {
            *limb |= u32::from(*byte) << (8 * (index % 4));
        }
    }
    out
}

/// `a >= b` for equal-length limb vectors.
fn greater_or_equal(a: &[u32], b: &[u32]) -> bool {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        if x != y {
            return x > y;
        }
    }
    true
}

/// `a -= b` (mod 2^(32 * len)); returns the borrow.
fn subtract_in_place(a: &mut [u32], b: &[u32]) -> bool {
    let mut borrow = false;
    for (x, y) in a.iter_mut().zip(b) {
        let (difference, first) = x.overflowing_sub(*y);
        let (difference, second) = difference.overflowing_sub(u32::from(borrow));
        *x = difference;
        borrow = first || second;
    }
    borrow
}

impl RsaPublicKey {
    /// From the big-endian modulus and exponent (a JWK's `n` and `e`).
    pub fn new(modulus: &[u8], exponent: &[u8]) -> Result<Self, String> {
        let modulus = strip_leading_zeros(modulus);
        let exponent = strip_leading_zeros(exponent);
        let bits = modulus.len() * 8 - modulus.first().map_or(8, |top| top.leading_zeros() as usize);
        if !(MIN_MODULUS_BITS..=MAX_MODULUS_BITS).contains(&bits) {
            return Err(format!("an RSA modulus of {bits} bits (accepted: {MIN_MODULUS_BITS} to {MAX_MODULUS_BITS})"));
        }
        if modulus.last().is_none_or(|low| low & 1 == 0) {
            return Err("an even RSA modulus".into());
        }
        if exponent.len() > 8 {
            return Err("an RSA exponent above 2^64".into());
        }
        let e = exponent.iter().fold(0u64, |value, byte| (value << 8) | u64::from(*byte));
        if e < 3 || e & 1 == 0 {
            return Err("an RSA exponent that is not odd and at least 3".into());
        }
        let limbs = modulus.len().div_ceil(4);
        let n = to_limbs(modulus, limbs);
        // Newton's iteration for n^-1 mod 2^32 (n is odd): each step doubles the bits.
        let low = n.first().copied().unwrap_or(1);
        let mut inverse: u32 = 1;
        for _ in 0..5 {
            inverse = inverse.wrapping_mul(2u32.wrapping_sub(low.wrapping_mul(inverse)));
        }
        // R^2 mod n by doubling 1 (2 * 32 * limbs) times, reducing each time.
        let mut r_squared = vec![0u32; limbs];
        if let Some(first) = r_squared.first_mut() {
            *first = 1;
        }
        for _ in 0..2 * 32 * limbs {
            let carry = r_squared.last().is_some_and(|top| top >> 31 == 1);
            let mut previous = 0u32;
            for limb in r_squared.iter_mut() {
                let next = *limb >> 31;
                *limb = (*limb << 1) | previous;
                previous = next;
            }
            if carry || greater_or_equal(&r_squared, &n) {
                subtract_in_place(&mut r_squared, &n);
            }
        }
        Ok(Self { n, size: modulus.len(), bits, e, n_prime: inverse.wrapping_neg(), r_squared })
    }

    /// Montgomery product a * b * R^-1 mod n (CIOS). Every index is below
    /// `limbs + 2`, the length of `t`, and `a`, `b`, `n` have `limbs` limbs (at
    /// least 64: the modulus has 2048 bits or more), so no index can be out of
    /// bounds.
    #[allow(clippy::indexing_slicing)]
    fn multiply(&self, a: &[u32], b: &[u32]) -> Vec<u32> {
        let limbs = self.n.len();
        let mut t = vec![0u32; limbs + 2];
        for &a_i in a {
            let mut carry: u64 = 0;
            for (t_j, &b_j) in t.iter_mut().zip(b) {
                let sum = u64::from(*t_j) + u64::from(a_i) * u64::from(b_j) + carry;
                *t_j = sum as u32;
                carry = sum >> 32;
            }
            let sum = u64::from(t[limbs]) + carry;
            t[limbs] = sum as u32;
            t[limbs + 1] = (sum >> 32) as u32;
            let m = t[0].wrapping_mul(self.n_prime);
            let mut carry = (u64::from(t[0]) + u64::from(m) * u64::from(self.n[0])) >> 32;
            for j in 1..limbs {
                let sum = u64::from(t[j]) + u64::from(m) * u64::from(self.n[j]) + carry;
                t[j - 1] = sum as u32;
                carry = sum >> 32;
            }
            let sum = u64::from(t[limbs]) + carry;
            t[limbs - 1] = sum as u32;
            let sum = u64::from(t[limbs + 1]) + (sum >> 32);
            t[limbs] = sum as u32;
            t[limbs + 1] = 0;
        }
        let overflow = t[limbs] != 0;
        t.truncate(limbs);
        if overflow || greater_or_equal(&t, &self.n) {
            subtract_in_place(&mut t, &self.n);
        }
        t
    }

    /// `s^e mod n`, big-endian, `size` bytes; `None` unless `signature` is
    /// exactly `size` bytes and below the modulus (RFC 8017 §5.2.2 step 1).
    #[allow(clippy::indexing_slicing)] // `one` has `limbs` >= 64 limbs
    fn public_operation(&self, signature: &[u8]) -> Option<Vec<u8>> {
        if signature.len() != self.size {
            return None;
        }
        let limbs = self.n.len();
        let s = to_limbs(signature, limbs);
        if greater_or_equal(&s, &self.n) {
            return None;
        }
        let s_montgomery = self.multiply(&s, &self.r_squared);
        let mut result = s_montgomery.clone();
        let top = 63 - self.e.leading_zeros();
        for bit in (0..top).rev() {
            result = self.multiply(&result, &result);
            if self.e >> bit & 1 == 1 {
                result = self.multiply(&result, &s_montgomery);
            }
        }
        let mut one = vec![0u32; limbs];
        one[0] = 1;
        let plain = self.multiply(&result, &one);
        let mut bytes: Vec<u8> = plain.iter().rev().flat_map(|limb| limb.to_be_bytes()).collect();
        let excess = bytes.len() - self.size;
        if bytes.get(..excess)?.iter().any(|byte| *byte != 0) {
            return None;
        }
        bytes.drain(..excess);
        Some(bytes)
    }

    /// RSASSA-PKCS1-v1_5 (RFC 8017 §8.2.2): the whole encoded message is rebuilt
    /// and compared.
    pub fn verify_pkcs1v15(&self, hash: Hash, message: &[u8], signature: &[u8]) -> bool {
        let Some(encoded) = self.public_operation(signature) else { return false };
        let prefix = hash.digest_info_prefix();
        let t_len = prefix.len() + hash.len();
        let Some(padding) = self.size.checked_sub(t_len + 3) else { return false };
        if padding < 8 {
            return false;
        }
        let mut expected = Vec::with_capacity(self.size);
        expected.extend_from_slice(&[0x00, 0x01]);
        expected.extend(std::iter::repeat_n(0xff, padding));
        expected.push(0x00);
        expected.extend_from_slice(prefix);
        expected.extend_from_slice(&hash.digest(message));
        encoded == expected
    }

    /// RSASSA-PSS with MGF1 of the same hash and a salt as long as the hash
    /// (RFC 7518 §3.5; RFC 8017 §9.1.2).
    pub fn verify_pss(&self, hash: Hash, message: &[u8], signature: &[u8]) -> bool {
        let Some(encoded) = self.public_operation(signature) else { return false };
        let em_bits = self.bits - 1;
        let em_len = em_bits.div_ceil(8);
        // EM is the low em_len bytes; a byte above them must be zero.
        let Some(excess) = encoded.len().checked_sub(em_len) else { return false };
        if encoded.get(..excess).is_none_or(|high| high.iter().any(|byte| *byte != 0)) {
            return false;
        }
        let em = encoded.get(excess..).unwrap_or_default();
        let (h_len, s_len) = (hash.len(), hash.len());
        if em_len < h_len + s_len + 2 || em.last() != Some(&0xbc) {
            return false;
        }
        let db_len = em_len - h_len - 1;
        let (masked_db, h) = (em.get(..db_len).unwrap_or_default(), em.get(db_len..em_len - 1).unwrap_or_default());
        let unused_bits = 8 * em_len - em_bits;
        let top_mask = 0xffu8.checked_shr(unused_bits as u32).unwrap_or(0);
        if masked_db.first().is_some_and(|first| first & !top_mask != 0) {
            return false;
        }
        let mask = mgf1(hash, h, db_len);
        let mut db: Vec<u8> = masked_db.iter().zip(&mask).map(|(a, b)| a ^ b).collect();
        if let Some(first) = db.first_mut() {
            *first &= top_mask;
        }
        let zeros = db_len - s_len - 1;
        if db.get(..zeros).is_none_or(|padding| padding.iter().any(|byte| *byte != 0)) || db.get(zeros) != Some(&0x01) {
            return false;
        }
        let salt = db.get(zeros + 1..).unwrap_or_default();
        let mut m_prime = vec![0u8; 8];
        m_prime.extend_from_slice(&hash.digest(message));
        m_prime.extend_from_slice(salt);
        hash.digest(&m_prime) == h
    }
}

/// MGF1 (RFC 8017 §B.2.1): `length` bytes from `seed`.
fn mgf1(hash: Hash, seed: &[u8], length: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(length + hash.len());
    let mut counter: u32 = 0;
    while out.len() < length {
        let mut input = seed.to_vec();
        input.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(&hash.digest(&input));
        counter += 1;
    }
    out.truncate(length);
    out
}

/// The modulus and exponent of a PEM public key: `PUBLIC KEY` (SubjectPublicKeyInfo
/// with rsaEncryption) or `RSA PUBLIC KEY` (PKCS#1).
pub fn components_from_pem(pem: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|line| !line.starts_with("-----")).map(str::trim).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body).map_err(|_| "invalid PEM base64".to_string())?;
    let mut reader = Der(&der);
    let mut outer = reader.element(0x30)?;
    let mut pkcs1 = if pem.contains("BEGIN RSA PUBLIC KEY") {
        outer
    } else {
        let mut algorithm = outer.element(0x30)?;
        // 1.2.840.113549.1.1.1 rsaEncryption
        if algorithm.element(0x06)?.0 != [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01] {
            return Err("not an RSA public key".into());
        }
        let bits = outer.element(0x03)?;
        let (unused, key) = bits.0.split_first().ok_or("empty BIT STRING")?;
        if *unused != 0 {
            return Err("a BIT STRING with unused bits".into());
        }
        Der(key).element(0x30)?
    };
    let modulus = pkcs1.element(0x02)?.0.to_vec();
    let exponent = pkcs1.element(0x02)?.0.to_vec();
    Ok((modulus, exponent))
}

/// A minimal DER reader: definite lengths, the elements RSA keys use.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn element(&mut self, tag: u8) -> Result<Der<'a>, String> {
        let bytes = self.0;
        if bytes.first() != Some(&tag) {
            return Err(format!("DER: expected tag {tag:#04x}"));
        }
        let first = *bytes.get(1).ok_or("DER: truncated")?;
        let (length, header) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 {
                return Err("DER: bad length".into());
            }
            let length_bytes = bytes.get(2..2 + count).ok_or("DER: truncated")?;
            (length_bytes.iter().fold(0usize, |value, byte| (value << 8) | usize::from(*byte)), 2 + count)
        };
        let content = bytes.get(header..header + length).ok_or("DER: truncated")?;
        self.0 = bytes.get(header + length..).unwrap_or_default();
        Ok(Der(content))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{}/../../tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn key() -> RsaPublicKey {
        let (n, e) = components_from_pem(&fixture("rsa.pub.pem")).unwrap();
        RsaPublicKey::new(&n, &e).unwrap()
    }

    /// Signatures by jsonwebtoken's signer (the `rsa` crate), an independent implementation.
    fn signed(alg: jsonwebtoken::Algorithm, message: &str) -> Vec<u8> {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(fixture("rsa.pem").as_bytes()).unwrap();
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, alg).unwrap();
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(signature).unwrap()
    }

    #[test]
    fn signatures_of_every_rsa_algorithm_verify_and_nothing_else_does() {
        use jsonwebtoken::Algorithm::*;
        let key = key();
        for (alg, hash, pss) in [
            (RS256, Hash::Sha256, false),
            (RS384, Hash::Sha384, false),
            (RS512, Hash::Sha512, false),
            (PS256, Hash::Sha256, true),
            (PS384, Hash::Sha384, true),
            (PS512, Hash::Sha512, true),
        ] {
            let verify = |message: &[u8], signature: &[u8]| match pss {
                true => key.verify_pss(hash, message, signature),
                false => key.verify_pkcs1v15(hash, message, signature),
            };
            let signature = signed(alg, "header.payload");
            assert!(verify(b"header.payload", &signature), "{alg:?}");
            assert!(!verify(b"header.payloaD", &signature), "{alg:?}: another message");
            for index in [0, 1, 100, signature.len() - 1] {
                let mut flipped = signature.clone();
                flipped[index] ^= 0x01;
                assert!(!verify(b"header.payload", &flipped), "{alg:?}: bit flipped at {index}");
            }
            assert!(!verify(b"header.payload", &signature[1..]), "{alg:?}: short");
            assert!(!verify(b"header.payload", &[signature.as_slice(), &[0]].concat()), "{alg:?}: long");
            assert!(!verify(b"header.payload", &vec![0xff; signature.len()]), "{alg:?}: above the modulus");
            assert!(!verify(b"header.payload", &vec![0; signature.len()]), "{alg:?}: zero");
            // The other padding scheme with the same hash never verifies.
            let other = match pss {
                true => key.verify_pkcs1v15(hash, b"header.payload", &signature),
                false => key.verify_pss(hash, b"header.payload", &signature),
            };
            assert!(!other, "{alg:?}: wrong padding accepted");
        }
        // A signature of another hash.
        assert!(!key.verify_pkcs1v15(Hash::Sha256, b"m", &signed(RS512, "m")));
    }

    #[test]
    fn weak_or_malformed_keys_are_refused() {
        let (n, e) = components_from_pem(&fixture("rsa.pub.pem")).unwrap();
        assert!(RsaPublicKey::new(&n[..128], &e).unwrap_err().contains("bits (accepted: 2048 to 8192)"));
        let mut even = n.clone();
        *even.last_mut().unwrap() &= 0xfe;
        assert!(RsaPublicKey::new(&even, &e).unwrap_err().contains("even"));
        assert!(RsaPublicKey::new(&n, &[1]).is_err());
        assert!(RsaPublicKey::new(&n, &[4]).is_err());
        assert!(RsaPublicKey::new(&n, &[1; 9]).is_err());
        assert!(RsaPublicKey::new(&[&[0, 0][..], &n].concat(), &[0, 1, 0, 1]).is_ok(), "leading zeros are fine");
        assert!(components_from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_err());
        assert!(components_from_pem(&fixture("ec256.pub.pem")).unwrap_err().contains("not an RSA"));
    }
}
