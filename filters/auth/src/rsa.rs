//! RSA signature verification for JWS RS256/384/512 (RSASSA-PKCS1-v1_5) and
//! PS256/384/512 (RSASSA-PSS, salt as long as the hash), RFC 8017.
//!
//! Why our own: verifying needs `s^e mod n` with a public `s`, `e` and `n`, so
//! none of the constant-time machinery a private-key operation needs. The `rsa`
//! crate's constant-time arithmetic (behind jsonwebtoken) cost 112 µs per RS256
//! verification natively and far more in Wasm; Montgomery multiplication with
//! the usual e = 65537 is 17 multiplications. Every input is checked: the
//! signature must be exactly as long as the modulus and below it, and the whole
//! encoded message is compared, never parsed leniently.
//!
//! **Arithmetic.** Wasm has no 64x64->128 product, and a 32-bit-limb Montgomery
//! product spends its time in the carry chain of every step. Limbs here hold 27
//! or 28 bits (see [`radix_bits`]), so a product of two limbs has room to be summed
//! with all the others of its column in a u64 without carrying: a Montgomery
//! product is one pass of independent multiply-adds per limb, the product's row
//! and the reduction's row fused ([`add_fused_rows`]), and one carry per limb.
//! Measured per 2048-bit public operation (17 products) in V8 (Node's, the
//! `make unit-wasm` build): 56-58 µs, against 64.5 µs with the two rows in
//! separate passes; 32-bit limbs measured 6.5 µs per product (about 110 µs).
//! (Rows on 128-bit SIMD measured slower in V8: not used, and no host needs SIMD.)

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
    /// The modulus, little-endian limbs of `radix` bits (an even number of them).
    n: Vec<u32>,
    /// Bits per limb.
    radix: u32,
    /// Bytes of the modulus (k in RFC 8017).
    size: usize,
    /// Bits of the modulus.
    bits: usize,
    e: u64,
    /// -n^-1 mod 2^radix.
    n_prime: u64,
    /// R^(k + 1) mod n, R = 2^(radix * limbs), where R^-k is what the
    /// exponentiation of a plain (not Montgomery) `s` leaves on `s^e`: one
    /// product with it gives `s^e` (see [`RsaPublicKey::public_operation`]).
    correction: Vec<u32>,
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

/// Limbs (rounded up to an even count) for a modulus of
/// `bits` bits at `radix` bits per limb.
fn limb_count(bits: usize, radix: u32) -> usize {
    bits.div_ceil(radix as usize).next_multiple_of(2)
}

/// The widest radix (at most 28 bits) whose columns cannot overflow a u64: a
/// column of a Montgomery product sums at most `2 * limbs` products of two limbs
/// plus the carry of the column before it (below 2^(64 - radix)).
fn radix_bits(bits: usize) -> u32 {
    (20..=28u32)
        .rev()
        .find(|&radix| {
            let limbs = limb_count(bits, radix) as u128;
            let largest = (1u128 << radix) - 1;
            2 * limbs * largest * largest + (1u128 << (64 - radix)) < 1u128 << 64
        })
        .unwrap_or(20)
}

/// Big-endian bytes to `limbs` little-endian limbs of `radix` bits; `None` when
/// the value needs more limbs.
fn to_limbs(bytes: &[u8], radix: u32, limbs: usize) -> Option<Vec<u32>> {
    let mask = (1u64 << radix) - 1;
    let mut out = Vec::with_capacity(limbs + 1);
    let (mut pending, mut pending_bits) = (0u64, 0u32);
    for byte in bytes.iter().rev() {
        pending |= u64::from(*byte) << pending_bits;
        pending_bits += 8;
        if pending_bits >= radix {
            out.push((pending & mask) as u32);
            pending >>= radix;
            pending_bits -= radix;
        }
    }
    if pending_bits > 0 {
        out.push(pending as u32);
    }
    if out.iter().skip(limbs).any(|limb| *limb != 0) {
        return None;
    }
    out.resize(limbs, 0);
    Some(out)
}

/// Limbs of `radix` bits to exactly `size` big-endian bytes; `None` when the
/// value does not fit.
fn to_bytes(limbs: &[u32], radix: u32, size: usize) -> Option<Vec<u8>> {
    let mut little_endian = Vec::with_capacity(size + 8);
    let (mut pending, mut pending_bits) = (0u64, 0u32);
    for limb in limbs {
        pending |= u64::from(*limb) << pending_bits;
        pending_bits += radix;
        while pending_bits >= 8 {
            little_endian.push(pending as u8);
            pending >>= 8;
            pending_bits -= 8;
        }
    }
    little_endian.push(pending as u8);
    if little_endian.iter().skip(size).any(|byte| *byte != 0) {
        return None;
    }
    little_endian.resize(size, 0);
    little_endian.reverse();
    Some(little_endian)
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

/// `a -= b` modulo 2^(radix * len), limbs of `radix` bits.
fn subtract_in_place(a: &mut [u32], b: &[u32], radix: u32) {
    let mask = (1u64 << radix) - 1;
    let mut borrow = 0u64;
    for (x, y) in a.iter_mut().zip(b) {
        // Below zero wraps to a u64 with the top bit set; the low bits are the
        // difference modulo 2^radix either way.
        let difference = u64::from(*x).wrapping_sub(u64::from(*y)).wrapping_sub(borrow);
        *x = (difference & mask) as u32;
        borrow = difference >> 63;
    }
}

/// `row[j] += factor * limbs[j]` for every j the two share: no carries (see
/// [`radix_bits`] for why none can overflow), so every step is independent of
/// the one before. Four columns per loop step: V8 does not unroll loops (four
/// per step measured 6-15 % less time for the whole public operation).
fn add_row_product(row: &mut [u64], limbs: &[u32], factor: u64) {
    let length = row.len().min(limbs.len());
    let (Some(row), Some(limbs)) = (row.get_mut(..length), limbs.get(..length)) else { return };
    let (row_chunks, row_rest) = row.as_chunks_mut::<4>();
    let (limb_chunks, limb_rest) = limbs.as_chunks::<4>();
    for (sums, x) in row_chunks.iter_mut().zip(limb_chunks) {
        sums[0] += factor * u64::from(x[0]);
        sums[1] += factor * u64::from(x[1]);
        sums[2] += factor * u64::from(x[2]);
        sums[3] += factor * u64::from(x[3]);
    }
    for (sum, limb) in row_rest.iter_mut().zip(limb_rest) {
        *sum += factor * u64::from(*limb);
    }
}

/// `row[j] += factor * limbs[j] + m * n[j]` for every j the three share: a row
/// of the product and of the reduction in one pass, so each column is loaded and
/// stored once for both.
fn add_fused_rows(row: &mut [u64], limbs: &[u32], factor: u64, n: &[u32], m: u64) {
    let length = row.len().min(limbs.len()).min(n.len());
    let (Some(row), Some(limbs), Some(n)) = (row.get_mut(..length), limbs.get(..length), n.get(..length)) else {
        return;
    };
    let (row_chunks, row_rest) = row.as_chunks_mut::<4>();
    let (limb_chunks, limb_rest) = limbs.as_chunks::<4>();
    let (n_chunks, n_rest) = n.as_chunks::<4>();
    for ((sums, x), y) in row_chunks.iter_mut().zip(limb_chunks).zip(n_chunks) {
        sums[0] += factor * u64::from(x[0]) + m * u64::from(y[0]);
        sums[1] += factor * u64::from(x[1]) + m * u64::from(y[1]);
        sums[2] += factor * u64::from(x[2]) + m * u64::from(y[2]);
        sums[3] += factor * u64::from(x[3]) + m * u64::from(y[3]);
    }
    for ((sum, x), y) in row_rest.iter_mut().zip(limb_rest).zip(n_rest) {
        *sum += factor * u64::from(*x) + m * u64::from(*y);
    }
}

/// The k of `s^e * R^-k`, what square-and-multiply over a plain `s` leaves:
/// a square turns `x R^-k` into `x^2 R^-(2k+1)`, a product with `s` into
/// `x s R^-(k+1)`. At most about 2^65 for a 64-bit `e`.
fn excess_montgomery_factors(e: u64) -> u128 {
    let top = 63 - e.leading_zeros();
    let mut k: u128 = 0;
    for bit in (0..top).rev() {
        k = 2 * k + 1;
        if e >> bit & 1 == 1 {
            k += 1;
        }
    }
    k
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
        let radix = radix_bits(bits);
        let limbs = limb_count(bits, radix);
        let n = to_limbs(modulus, radix, limbs).ok_or("an RSA modulus that does not fit its limbs")?;
        let mask = (1u64 << radix) - 1;
        // Newton's iteration for n^-1 mod 2^64 (n is odd): each step doubles the bits.
        let low = n.first().map_or(1, |limb| u64::from(*limb));
        let mut inverse: u64 = 1;
        for _ in 0..6 {
            inverse = inverse.wrapping_mul(2u64.wrapping_sub(low.wrapping_mul(inverse)));
        }
        // R^2 mod n by doubling 1 (2 * radix * limbs) times, reducing each time.
        let mut r_squared = vec![0u32; limbs];
        if let Some(first) = r_squared.first_mut() {
            *first = 1;
        }
        for _ in 0..2 * radix as usize * limbs {
            let mut carry = 0u64;
            for limb in r_squared.iter_mut() {
                let doubled = (u64::from(*limb) << 1) | carry;
                *limb = (doubled & mask) as u32;
                carry = doubled >> radix;
            }
            if carry != 0 || greater_or_equal(&r_squared, &n) {
                subtract_in_place(&mut r_squared, &n, radix);
            }
        }
        let mut key = Self {
            n,
            radix,
            size: modulus.len(),
            bits,
            e,
            n_prime: inverse.wrapping_neg() & mask,
            correction: Vec::new(),
        };
        // R^(k+1) mod n: its Montgomery form R^(k+2) is r_squared (R's Montgomery
        // form) to the power k + 1, then one product with 1 leaves Montgomery form.
        let power = excess_montgomery_factors(e) + 1;
        let mut montgomery = r_squared.clone();
        for bit in (0..127 - power.leading_zeros()).rev() {
            montgomery = key.square(&montgomery);
            if power >> bit & 1 == 1 {
                montgomery = key.multiply(&montgomery, &r_squared);
            }
        }
        let mut one = vec![0u32; limbs];
        if let Some(low) = one.first_mut() {
            *low = 1;
        }
        key.correction = key.multiply(&montgomery, &one);
        Ok(key)
    }

    /// Montgomery product a * b * R^-1 mod n of two values below n: per limb a_i,
    /// m makes column i divisible by 2^radix once a_i * b_0 is in it, then a_i * b
    /// and m * n are added in one pass.
    fn multiply(&self, a: &[u32], b: &[u32]) -> Vec<u32> {
        let b_low = u64::from(b.first().copied().unwrap_or_default());
        self.montgomery(a, |row, _, a_i| {
            let m = self.reduction_factor(row.first().copied().unwrap_or_default() + a_i * b_low);
            add_fused_rows(row, b, a_i, &self.n, m);
        })
    }

    /// Montgomery square a * a * R^-1 mod n: each cross product a_i * a_j is
    /// added once, doubled (row i adds 2 a_i a_j for j > i and a_i^2), so the
    /// product half costs half the multiply-adds. Column i still has all its
    /// products when row i reduces it (they come from rows up to i / 2), and every
    /// column sums to what `multiply(a, a)` sums, so the same bound holds. Row i's
    /// cross products land on columns 2i + 1 and up, where the reduction's
    /// m * n_j (column i + j) has j > i: both rows are indexed by j there.
    fn square(&self, a: &[u32]) -> Vec<u32> {
        self.montgomery(a, |row, i, a_i| {
            // Column 2i is row[i].
            if let Some(square) = row.get_mut(i) {
                *square += a_i * a_i;
            }
            let m = self.reduction_factor(row.first().copied().unwrap_or_default());
            let (Some((reduction_only, both)), Some((n_low, n_high))) =
                (row.split_at_mut_checked(i + 1), self.n.split_at_checked(i + 1))
            else {
                return;
            };
            add_row_product(reduction_only, n_low, m);
            add_fused_rows(both, a.get(i + 1..).unwrap_or_default(), a_i << 1, n_high, m);
        })
    }

    /// The Montgomery loop (FIOS with deferred carries): per limb a_i,
    /// `add_limb(row, i, a_i)` adds that limb's products and its m * n to the
    /// columns i.. (`row`), leaving column i divisible by 2^radix; column i is then
    /// carried into the next, and the upper half is the result.
    fn montgomery(&self, a: &[u32], add_limb: impl Fn(&mut [u64], usize, u64)) -> Vec<u32> {
        let limbs = self.n.len();
        let mut columns = vec![0u64; 2 * limbs + 1];
        for (i, a_i) in a.iter().enumerate() {
            let Some(row) = columns.get_mut(i..i + limbs) else { break };
            add_limb(row, i, u64::from(*a_i));
            let carry = columns.get(i).copied().unwrap_or_default() >> self.radix;
            if let Some(next) = columns.get_mut(i + 1) {
                *next += carry;
            }
        }
        self.upper_half_reduced(&columns)
    }

    /// m = -column * n^-1 mod 2^radix: adding m * n makes the column divisible by 2^radix.
    fn reduction_factor(&self, column: u64) -> u64 {
        let mask = (1u64 << self.radix) - 1;
        ((column & mask) * self.n_prime) & mask
    }

    /// The upper half of the columns, carried into limbs: a value below 2n,
    /// reduced once.
    fn upper_half_reduced(&self, columns: &[u64]) -> Vec<u32> {
        let limbs = self.n.len();
        let mask = (1u64 << self.radix) - 1;
        let mut result = Vec::with_capacity(limbs);
        let mut carry = 0u64;
        for column in columns.iter().skip(limbs).take(limbs) {
            let value = column + carry;
            result.push((value & mask) as u32);
            carry = value >> self.radix;
        }
        // The product is below 2n < 2R: at most one n too many.
        if carry != 0 || greater_or_equal(&result, &self.n) {
            subtract_in_place(&mut result, &self.n, self.radix);
        }
        result
    }

    /// `s^e mod n`, big-endian, `size` bytes; `None` unless `signature` is
    /// exactly `size` bytes and below the modulus (RFC 8017 §5.2.2 step 1).
    ///
    /// `s` stays a plain value: every Montgomery product leaves one more R^-1 on
    /// the result, `s^e * R^-k` in the end (k from [`excess_montgomery_factors`]),
    /// and one product with the key's `R^(k+1)` gives `s^e`. That is one product
    /// instead of the two that converting `s` in and the result out would cost.
    fn public_operation(&self, signature: &[u8]) -> Option<Vec<u8>> {
        if signature.len() != self.size {
            return None;
        }
        let s = to_limbs(signature, self.radix, self.n.len())?;
        if greater_or_equal(&s, &self.n) {
            return None;
        }
        let mut result = s.clone();
        let top = 63 - self.e.leading_zeros();
        for bit in (0..top).rev() {
            result = self.square(&result);
            if self.e >> bit & 1 == 1 {
                result = self.multiply(&result, &s);
            }
        }
        to_bytes(&self.multiply(&result, &self.correction), self.radix, self.size)
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

    /// `s^e mod n` against num-bigint for random odd moduli of every size class
    /// (each picks its own radix and limb count), random signatures below them,
    /// and the edge values 0, 1 and n - 1. (Any odd n will do: the arithmetic does
    /// not need n to be a product of two primes.)
    #[test]
    fn the_public_operation_agrees_with_an_independent_bigint() {
        use num_bigint::BigUint;
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut random_bytes = |count: usize| -> Vec<u8> {
            (0..count)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect()
        };
        for bits in [2048usize, 2049, 2055, 3071, 3072, 3584, 4095, 4096, 6000, 8192] {
            let size = bits.div_ceil(8);
            let mut modulus = random_bytes(size);
            let top_bits = bits - 8 * (size - 1);
            modulus[0] = (modulus[0] & (0xff >> (8 - top_bits))) | (1 << (top_bits - 1));
            modulus[size - 1] |= 1;
            let n = BigUint::from_bytes_be(&modulus);
            for e in [3u64, 65537, 0xffff_ffff_ffff_fffd] {
                let key = RsaPublicKey::new(&modulus, &e.to_be_bytes()).unwrap();
                assert_eq!(key.bits, bits);
                let n_minus_one = (&n - 1u32).to_bytes_be();
                let mut samples = vec![vec![0u8; size], [vec![0u8; size - 1], vec![1]].concat(), n_minus_one];
                samples.push(random_bytes(size));
                samples.push(random_bytes(size));
                for signature in samples {
                    let signature = [vec![0u8; size - signature.len()], signature].concat();
                    let s = BigUint::from_bytes_be(&signature);
                    let ours = key.public_operation(&signature);
                    if s >= n {
                        assert_eq!(ours, None, "{bits} bits: a signature above the modulus");
                        continue;
                    }
                    let expected = s.modpow(&BigUint::from(e), &n).to_bytes_be();
                    let expected = [vec![0u8; size - expected.len()], expected].concat();
                    assert_eq!(ours, Some(expected), "{bits} bits, e = {e}");
                }
            }
        }
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
