//! Signed test tokens with the keys in `tests/fixtures/keys` (the same keys the
//! fixture JWKS publishes): one signer for every integration test.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::Value;

use crate::paths::workspace_root;

/// The secret of the fixture JWKS key `hs-1`.
pub const HMAC_SECRET: &[u8] = b"a-shared-secret-of-32-bytes-long!";

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(workspace_root().join("tests/fixtures/keys").join(name)).unwrap()
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// The fixture key for `alg` (kid `rsa-2` selects the second RSA key).
pub fn key(alg: Algorithm, kid: &str) -> EncodingKey {
    match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(HMAC_SECRET).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(fixture("ec256.pem").as_bytes()).unwrap(),
        Algorithm::ES384 => EncodingKey::from_ec_pem(fixture("ec384.pem").as_bytes()).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(fixture("ed25519.pem").as_bytes()).unwrap(),
        _ if kid == "rsa-2" => EncodingKey::from_rsa_pem(fixture("rsa2.pem").as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(fixture("rsa.pem").as_bytes()).unwrap(),
    }
}

/// A token signed with the fixture key for `alg`, header `kid` set.
pub fn sign(alg: Algorithm, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    sign_with_header(&header, claims)
}

/// A token with a hand-made header (e.g. a hostile `kid`), signed with the fixture
/// key for the header's algorithm.
pub fn sign_with_header(header: &Header, claims: &Value) -> String {
    let kid = header.kid.clone().unwrap_or_default();
    encode(header, claims, &key(header.alg, &kid)).unwrap()
}
