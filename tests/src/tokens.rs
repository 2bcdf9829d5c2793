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

/// An ES512 token (kid `ec-521`) signed by the `openssl` command line, an ECDSA
/// implementation independent of the module's (RustCrypto `p521`): interop, not
/// a round trip through one library.
pub fn sign_es512_with_openssl(kid: &str, claims: &Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let header = serde_json::json!({"alg": "ES512", "typ": "JWT", "kid": kid});
    let signing_input =
        format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
    let key = workspace_root().join("tests/fixtures/keys/ec521.pem");
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha512", "-sign"])
        .arg(&key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(signing_input.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "openssl dgst -sign failed");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(ecdsa_der_to_jose(&output.stdout, 66)))
}

/// An ECDSA signature from DER (`SEQUENCE { INTEGER r, INTEGER s }`, as openssl
/// writes it) to JOSE's fixed-width `R || S` (RFC 7518 §3.4).
fn ecdsa_der_to_jose(der: &[u8], width: usize) -> Vec<u8> {
    let mut at = 1; // SEQUENCE tag
    let length_byte = der[at];
    at += 1 + if length_byte & 0x80 != 0 { usize::from(length_byte & 0x7f) } else { 0 };
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[at], 0x02, "INTEGER expected");
        let length = usize::from(der[at + 1]);
        let integer = &der[at + 2..at + 2 + length];
        let integer = &integer[integer.iter().take_while(|byte| **byte == 0).count()..];
        out.extend(std::iter::repeat_n(0u8, width - integer.len()));
        out.extend_from_slice(integer);
        at += 2 + length;
    }
    out
}
