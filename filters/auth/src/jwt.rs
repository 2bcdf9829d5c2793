//! JWT verification (RFC 7519 / 7515): key sets, header checks, signature, claims.
//! Plain Rust: the time is an input, no host calls.
//!
//! The algorithm a token may use comes from the provider's configuration and the
//! key (JWK `kty`/`crv`/`alg`), never from the token header alone: `alg: none` and
//! algorithm confusion (an RSA public key used as an HMAC secret) cannot verify.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde_json::Value;

/// Tokens longer than this are rejected before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A JWS algorithm this module verifies (RFC 7518 §3.1): jsonwebtoken's, and
/// ES512 (ECDSA P-521 with SHA-512), which jsonwebtoken lacks and the RustCrypto
/// `p521` crate verifies. Every one Envoy's jwt_authn accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwsAlgorithm {
    Jose(Algorithm),
    Es512,
}

impl From<Algorithm> for JwsAlgorithm {
    fn from(alg: Algorithm) -> Self {
        JwsAlgorithm::Jose(alg)
    }
}

pub const ALL_ALGORITHMS: &[JwsAlgorithm] = &[
    JwsAlgorithm::Jose(Algorithm::HS256),
    JwsAlgorithm::Jose(Algorithm::HS384),
    JwsAlgorithm::Jose(Algorithm::HS512),
    JwsAlgorithm::Jose(Algorithm::RS256),
    JwsAlgorithm::Jose(Algorithm::RS384),
    JwsAlgorithm::Jose(Algorithm::RS512),
    JwsAlgorithm::Jose(Algorithm::PS256),
    JwsAlgorithm::Jose(Algorithm::PS384),
    JwsAlgorithm::Jose(Algorithm::PS512),
    JwsAlgorithm::Jose(Algorithm::ES256),
    JwsAlgorithm::Jose(Algorithm::ES384),
    JwsAlgorithm::Es512,
    JwsAlgorithm::Jose(Algorithm::EdDSA),
];

pub fn algorithm_from_name(name: &str) -> Option<JwsAlgorithm> {
    ALL_ALGORITHMS.iter().copied().find(|alg| algorithm_name(*alg) == name)
}

pub fn algorithm_name(alg: JwsAlgorithm) -> &'static str {
    let JwsAlgorithm::Jose(alg) = alg else {
        return "ES512";
    };
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
        _ => "unsupported",
    }
}

const RSA_ALGORITHMS: &[JwsAlgorithm] = &[
    JwsAlgorithm::Jose(Algorithm::RS256),
    JwsAlgorithm::Jose(Algorithm::RS384),
    JwsAlgorithm::Jose(Algorithm::RS512),
    JwsAlgorithm::Jose(Algorithm::PS256),
    JwsAlgorithm::Jose(Algorithm::PS384),
    JwsAlgorithm::Jose(Algorithm::PS512),
];
const HMAC_ALGORITHMS: &[JwsAlgorithm] =
    &[JwsAlgorithm::Jose(Algorithm::HS256), JwsAlgorithm::Jose(Algorithm::HS384), JwsAlgorithm::Jose(Algorithm::HS512)];

/// The key material, decoded once when the key set is loaded. RSA is verified
/// by `rsa.rs`, the rest by the RustCrypto crates; jsonwebtoken only names the
/// algorithms (its verification rebuilt keys per token and pulled in the slow
/// constant-time RSA code).
#[derive(Clone)]
enum KeyMaterial {
    Hmac(Vec<u8>),
    Rsa(crate::rsa::RsaPublicKey),
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    P521(p521::ecdsa::VerifyingKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

/// The hash and padding of an RSA algorithm: `(hash, pss)`.
fn rsa_scheme(alg: JwsAlgorithm) -> Option<(crate::rsa::Hash, bool)> {
    use crate::rsa::Hash;
    match alg {
        JwsAlgorithm::Jose(Algorithm::RS256) => Some((Hash::Sha256, false)),
        JwsAlgorithm::Jose(Algorithm::RS384) => Some((Hash::Sha384, false)),
        JwsAlgorithm::Jose(Algorithm::RS512) => Some((Hash::Sha512, false)),
        JwsAlgorithm::Jose(Algorithm::PS256) => Some((Hash::Sha256, true)),
        JwsAlgorithm::Jose(Algorithm::PS384) => Some((Hash::Sha384, true)),
        JwsAlgorithm::Jose(Algorithm::PS512) => Some((Hash::Sha512, true)),
        _ => None,
    }
}

/// One verification key and the algorithms it may verify.
#[derive(Clone)]
pub struct VerifyingKey {
    pub kid: Option<String>,
    pub algorithms: Vec<JwsAlgorithm>,
    key: KeyMaterial,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey").field("kid", &self.kid).field("algorithms", &self.algorithms).finish()
    }
}

/// The keys of one provider.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    pub keys: Vec<VerifyingKey>,
}

impl KeySet {
    /// Parses a JWKS document. Keys of unknown types or with unusable material
    /// are skipped and reported (a remote JWKS may hold keys for other uses);
    /// a document with no usable key is an error.
    pub fn from_jwks(document: &[u8]) -> Result<(KeySet, Vec<String>), String> {
        let value: Value = serde_json::from_slice(document).map_err(|error| format!("not JSON: {error}"))?;
        let entries = value.get("keys").and_then(Value::as_array).ok_or("no `keys` array")?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            match verifying_key_from_jwk(entry) {
                Ok(key) => keys.push(key),
                Err(reason) => skipped.push(format!("keys[{index}]: {reason}")),
            }
        }
        if keys.is_empty() {
            return Err(format!("no usable key ({})", skipped.join("; ")));
        }
        Ok((KeySet { keys }, skipped))
    }

    /// One PEM public key (RSA, EC P-256/P-384/P-521 or Ed25519) for `algorithm`.
    pub fn pem_key(pem: &str, algorithm: JwsAlgorithm, kid: Option<String>) -> Result<VerifyingKey, String> {
        use p256::pkcs8::DecodePublicKey as _;
        let invalid = |error: &dyn std::fmt::Display| format!("invalid PEM key: {error}");
        let key = match algorithm {
            JwsAlgorithm::Es512 => {
                KeyMaterial::P521(p521::ecdsa::VerifyingKey::from_public_key_pem(pem).map_err(|error| invalid(&error))?)
            }
            alg if RSA_ALGORITHMS.contains(&alg) => {
                let (modulus, exponent) = crate::rsa::components_from_pem(pem).map_err(|error| invalid(&error))?;
                KeyMaterial::Rsa(crate::rsa::RsaPublicKey::new(&modulus, &exponent).map_err(|error| invalid(&error))?)
            }
            JwsAlgorithm::Jose(Algorithm::ES256) => {
                KeyMaterial::P256(p256::ecdsa::VerifyingKey::from_public_key_pem(pem).map_err(|error| invalid(&error))?)
            }
            JwsAlgorithm::Jose(Algorithm::ES384) => {
                KeyMaterial::P384(p384::ecdsa::VerifyingKey::from_public_key_pem(pem).map_err(|error| invalid(&error))?)
            }
            JwsAlgorithm::Jose(Algorithm::EdDSA) => KeyMaterial::Ed25519(
                ed25519_dalek::VerifyingKey::from_public_key_pem(pem).map_err(|error| invalid(&error))?,
            ),
            _ => return Err("PEM keys are public keys: use RS*, PS*, ES* or EdDSA".into()),
        };
        Ok(VerifyingKey { kid, algorithms: vec![algorithm], key })
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|key| key.kid.as_deref() == Some(kid))
    }

    /// Algorithms any key of this set may verify.
    pub fn algorithms(&self) -> Vec<JwsAlgorithm> {
        let mut all: Vec<JwsAlgorithm> = self.keys.iter().flat_map(|key| key.algorithms.iter().copied()).collect();
        all.sort_by_key(|alg| algorithm_name(*alg));
        all.dedup();
        all
    }
}

fn verifying_key_from_jwk(entry: &Value) -> Result<VerifyingKey, String> {
    let text = |name: &str| entry.get(name).and_then(Value::as_str);
    let kid = text("kid").map(str::to_owned);
    if text("use").is_some_and(|usage| usage != "sig") {
        return Err("not a signing key (`use` is not `sig`)".into());
    }
    let declared = match text("alg") {
        Some(name) => Some(algorithm_from_name(name).ok_or_else(|| format!("unsupported alg `{name}`"))?),
        None => None,
    };
    let family: Vec<JwsAlgorithm> = match (text("kty"), text("crv")) {
        (Some("RSA"), _) => RSA_ALGORITHMS.to_vec(),
        (Some("EC"), Some("P-256")) => vec![Algorithm::ES256.into()],
        (Some("EC"), Some("P-384")) => vec![Algorithm::ES384.into()],
        (Some("EC"), Some("P-521")) => vec![JwsAlgorithm::Es512],
        (Some("OKP"), Some("Ed25519")) => vec![Algorithm::EdDSA.into()],
        (Some("oct"), _) => HMAC_ALGORITHMS.to_vec(),
        (kty, crv) => return Err(format!("unsupported key type {kty:?} / curve {crv:?}")),
    };
    let algorithms = match declared {
        Some(alg) if family.contains(&alg) => vec![alg],
        Some(alg) => return Err(format!("alg {} does not fit kty {:?}", algorithm_name(alg), text("kty"))),
        None => family,
    };
    let member = |name: &str| -> Result<Vec<u8>, String> {
        let text = text(name).ok_or_else(|| format!("no `{name}`"))?;
        URL_SAFE_NO_PAD.decode(text).map_err(|_| format!("`{name}` is not base64url"))
    };
    let not_on_curve = |curve: &str| format!("invalid key material: not a {curve} point");
    let key = match (text("kty"), text("crv")) {
        (Some("RSA"), _) => KeyMaterial::Rsa(
            crate::rsa::RsaPublicKey::new(&member("n")?, &member("e")?)
                .map_err(|error| format!("invalid key material: {error}"))?,
        ),
        (Some("EC"), Some("P-256")) => KeyMaterial::P256(
            p256::ecdsa::VerifyingKey::from_sec1_bytes(&ec_point(&member, 32)?).map_err(|_| not_on_curve("P-256"))?,
        ),
        (Some("EC"), Some("P-384")) => KeyMaterial::P384(
            p384::ecdsa::VerifyingKey::from_sec1_bytes(&ec_point(&member, 48)?).map_err(|_| not_on_curve("P-384"))?,
        ),
        (Some("EC"), _) => KeyMaterial::P521(
            p521::ecdsa::VerifyingKey::from_sec1_bytes(&ec_point(&member, P521_FIELD_BYTES)?)
                .map_err(|_| not_on_curve("P-521"))?,
        ),
        (Some("OKP"), _) => {
            let x: [u8; 32] = member("x")?.try_into().map_err(|_| "`x` must be 32 bytes".to_string())?;
            KeyMaterial::Ed25519(ed25519_dalek::VerifyingKey::from_bytes(&x).map_err(|_| not_on_curve("Ed25519"))?)
        }
        _ => {
            let secret = member("k")?;
            if secret.is_empty() {
                return Err("`k` must not be empty".into());
            }
            KeyMaterial::Hmac(secret)
        }
    };
    Ok(VerifyingKey { kid, algorithms, key })
}

/// The SEC1 uncompressed point of an EC JWK: `x` and `y`, `size` bytes each
/// (RFC 7518 §6.2.1.2); the caller refuses a point not on its curve.
fn ec_point(member: &impl Fn(&str) -> Result<Vec<u8>, String>, size: usize) -> Result<Vec<u8>, String> {
    let coordinate = |name: &str| -> Result<Vec<u8>, String> {
        let bytes = member(name)?;
        if bytes.len() != size {
            return Err(format!("`{name}` must be {size} bytes, not {}", bytes.len()));
        }
        Ok(bytes)
    };
    Ok([&[0x04][..], &coordinate("x")?, &coordinate("y")?].concat())
}

/// Bytes of a P-521 field element, and of each half of an ES512 signature.
const P521_FIELD_BYTES: usize = 66;

/// Checks the signature of `token` with one key and returns the payload.
fn signature_and_payload(token: &str, key: &VerifyingKey, alg: JwsAlgorithm) -> Result<Value, JwtError> {
    match (&key.key, alg, rsa_scheme(alg)) {
        (KeyMaterial::Rsa(rsa), _, Some((hash, pss))) => verify_signed(token, |input, signature| match pss {
            true => rsa.verify_pss(hash, input, signature),
            false => rsa.verify_pkcs1v15(hash, input, signature),
        }),
        (KeyMaterial::P521(p521), JwsAlgorithm::Es512, _) => {
            verify_signed(token, |input, signature| es512_signs(p521, input, signature))
        }
        (KeyMaterial::P256(key), JwsAlgorithm::Jose(Algorithm::ES256), _) => {
            verify_signed(token, |input, signature| {
                use p256::ecdsa::signature::Verifier as _;
                // R || S, 32 bytes each (RFC 7518 §3.4), not DER.
                signature.len() == 64
                    && p256::ecdsa::Signature::from_slice(signature).is_ok_and(|sig| key.verify(input, &sig).is_ok())
            })
        }
        (KeyMaterial::P384(key), JwsAlgorithm::Jose(Algorithm::ES384), _) => {
            verify_signed(token, |input, signature| {
                use p384::ecdsa::signature::Verifier as _;
                signature.len() == 96
                    && p384::ecdsa::Signature::from_slice(signature).is_ok_and(|sig| key.verify(input, &sig).is_ok())
            })
        }
        (KeyMaterial::Ed25519(key), JwsAlgorithm::Jose(Algorithm::EdDSA), _) => {
            verify_signed(token, |input, signature| {
                ed25519_dalek::Signature::from_slice(signature).is_ok_and(|sig| key.verify_strict(input, &sig).is_ok())
            })
        }
        (KeyMaterial::Hmac(secret), JwsAlgorithm::Jose(jose_alg), _) => {
            verify_signed(token, |input, signature| hmac_signs(jose_alg, secret, input, signature))
        }
        // A key of another family never verifies (the candidates are filtered by algorithm).
        _ => Err(JwtError::BadSignature),
    }
}

/// A JWS verified outside jsonwebtoken: `signs(signing input, signature)` over
/// the ASCII of `header.payload`, then the payload.
fn verify_signed(token: &str, signs: impl Fn(&[u8], &[u8]) -> bool) -> Result<Value, JwtError> {
    let (signing_input, signature) = token.rsplit_once('.').ok_or(JwtError::Malformed("not three parts"))?;
    let (_, payload) = signing_input.split_once('.').ok_or(JwtError::Malformed("not three parts"))?;
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| JwtError::Malformed("bad base64url"))?;
    if !signs(signing_input.as_bytes(), &signature) {
        return Err(JwtError::BadSignature);
    }
    decode_json_part(payload).map_err(|_| JwtError::Malformed("bad payload"))
}

/// HS256/384/512 (RFC 7518 §3.2), compared in constant time.
fn hmac_signs(alg: Algorithm, secret: &[u8], input: &[u8], signature: &[u8]) -> bool {
    fn check<M: hmac::Mac + hmac::KeyInit>(secret: &[u8], input: &[u8], signature: &[u8]) -> bool {
        <M as hmac::KeyInit>::new_from_slice(secret).is_ok_and(|mut mac| {
            mac.update(input);
            mac.verify_slice(signature).is_ok()
        })
    }
    match alg {
        Algorithm::HS256 => check::<hmac::Hmac<sha2::Sha256>>(secret, input, signature),
        Algorithm::HS384 => check::<hmac::Hmac<sha2::Sha384>>(secret, input, signature),
        Algorithm::HS512 => check::<hmac::Hmac<sha2::Sha512>>(secret, input, signature),
        _ => false,
    }
}

/// ES512 (RFC 7518 §3.4): the signature is R || S, 66 bytes each, SHA-512.
fn es512_signs(key: &p521::ecdsa::VerifyingKey, signing_input: &[u8], signature: &[u8]) -> bool {
    use p521::ecdsa::signature::Verifier as _;
    signature.len() == 2 * P521_FIELD_BYTES
        && p521::ecdsa::Signature::from_slice(signature)
            .is_ok_and(|signature| key.verify(signing_input, &signature).is_ok())
}

/// Why a token was rejected. The descriptions never contain the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtError {
    Malformed(&'static str),
    TooLarge,
    /// The header names an algorithm the provider does not accept (or `none`).
    AlgorithmNotAllowed(String),
    /// A `crit` header: extensions we cannot honour (RFC 7515 4.1.11).
    CriticalHeader,
    /// No key with this `kid` (or none for the algorithm).
    UnknownKey(Option<String>),
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    MissingClaim(String),
    LifetimeTooLong,
    /// The IdP says the (opaque) token is not active: unknown, expired or revoked.
    Inactive,
    /// The IdP could not be asked (down, slow, not answering RFC 7662).
    Unverifiable,
}

impl JwtError {
    pub fn description(&self) -> String {
        match self {
            JwtError::Malformed(what) => format!("malformed token: {what}"),
            JwtError::TooLarge => format!("token larger than {MAX_TOKEN_BYTES} bytes"),
            JwtError::AlgorithmNotAllowed(alg) => format!("algorithm {alg} is not accepted"),
            JwtError::CriticalHeader => "token has critical header extensions".into(),
            JwtError::UnknownKey(Some(kid)) => format!("unknown signing key (kid {kid})"),
            JwtError::UnknownKey(None) => "no signing key for this token".into(),
            JwtError::BadSignature => "bad signature".into(),
            JwtError::Expired => "token expired".into(),
            JwtError::NotYetValid => "token not yet valid".into(),
            JwtError::WrongIssuer => "wrong issuer".into(),
            JwtError::WrongAudience => "wrong audience".into(),
            JwtError::MissingClaim(claim) => format!("required claim {claim} missing"),
            JwtError::LifetimeTooLong => "token lifetime exceeds the maximum".into(),
            JwtError::Inactive => "token is not active".into(),
            JwtError::Unverifiable => "the identity provider could not check the token".into(),
        }
    }

    /// A short stable code for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::Malformed(_) | JwtError::TooLarge | JwtError::CriticalHeader => "malformed",
            JwtError::AlgorithmNotAllowed(_) => "algorithm",
            JwtError::UnknownKey(_) => "unknown_key",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::WrongIssuer => "issuer",
            JwtError::WrongAudience => "audience",
            JwtError::MissingClaim(_) => "missing_claim",
            JwtError::LifetimeTooLong => "lifetime",
            JwtError::Inactive => "inactive",
            JwtError::Unverifiable => "unverifiable",
        }
    }
}

/// What the header says, parsed by us (not trusted for the algorithm choice).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHeader {
    pub alg: String,
    pub kid: Option<String>,
}

fn decode_json_part(part: &str) -> Result<Value, JwtError> {
    let bytes = URL_SAFE_NO_PAD.decode(part.trim_end_matches('=')).map_err(|_| JwtError::Malformed("bad base64url"))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed("bad JSON"))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(JwtError::Malformed("not a JSON object"))
    }
}

/// Splits and checks the shape; returns the header.
pub fn parse_header(token: &str) -> Result<TokenHeader, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("not three dot-separated parts"));
    };
    let header = decode_json_part(header)?;
    if header.get("crit").is_some() {
        return Err(JwtError::CriticalHeader);
    }
    let alg = header.get("alg").and_then(Value::as_str).ok_or(JwtError::Malformed("no alg"))?.to_string();
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(JwtError::Malformed("kid is not a string")),
    };
    Ok(TokenHeader { alg, kid })
}

/// The claim checks of a provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimRules {
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    /// Dotted paths that must be present.
    pub required: Vec<String>,
    pub leeway_seconds: u64,
    pub max_lifetime_seconds: Option<u64>,
}

/// Verifies `token` against `keys`, accepting only `allowed` algorithms, and
/// checks its claims at `now` (Unix seconds). Returns the claims.
pub fn verify(
    token: &str,
    keys: &KeySet,
    allowed: &[JwsAlgorithm],
    rules: &ClaimRules,
    now: u64,
) -> Result<Value, JwtError> {
    let header = parse_header(token)?;
    let alg = algorithm_from_name(&header.alg)
        .filter(|alg| allowed.contains(alg))
        .ok_or_else(|| JwtError::AlgorithmNotAllowed(header.alg.chars().take(16).collect()))?;
    let candidates: Vec<&VerifyingKey> = keys
        .keys
        .iter()
        .filter(|key| header.kid.is_none() || key.kid == header.kid)
        .filter(|key| key.algorithms.contains(&alg))
        .collect();
    if candidates.is_empty() {
        return Err(JwtError::UnknownKey(header.kid.map(|kid| kid.chars().take(64).collect())));
    }
    for key in candidates {
        match signature_and_payload(token, key, alg) {
            Ok(claims) => {
                check_claims(&claims, rules, now)?;
                return Ok(claims);
            }
            // Another candidate (same kid, or no kid) may have signed it.
            Err(JwtError::BadSignature) => continue,
            Err(other) => return Err(other),
        }
    }
    Err(JwtError::BadSignature)
}

fn numeric(claims: &Value, name: &str) -> Result<Option<u64>, JwtError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(number)) => number
            .as_u64()
            .or_else(|| number.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(JwtError::Malformed("numeric date out of range")),
        Some(_) => Err(JwtError::Malformed("numeric date is not a number")),
    }
}

pub fn check_claims(claims: &Value, rules: &ClaimRules, now: u64) -> Result<(), JwtError> {
    let leeway = rules.leeway_seconds;
    let exp = numeric(claims, "exp")?;
    let nbf = numeric(claims, "nbf")?;
    let iat = numeric(claims, "iat")?;
    if exp.is_some_and(|exp| now > exp.saturating_add(leeway)) {
        return Err(JwtError::Expired);
    }
    if nbf.is_some_and(|nbf| now.saturating_add(leeway) < nbf)
        || iat.is_some_and(|iat| now.saturating_add(leeway) < iat)
    {
        return Err(JwtError::NotYetValid);
    }
    if let Some(max) = rules.max_lifetime_seconds {
        let exp = exp.ok_or_else(|| JwtError::MissingClaim("exp".into()))?;
        let start = iat.or(nbf).unwrap_or(now);
        if exp.saturating_sub(start) > max {
            return Err(JwtError::LifetimeTooLong);
        }
    }
    if let Some(issuer) = &rules.issuer {
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
            return Err(JwtError::WrongIssuer);
        }
    }
    if !rules.audiences.is_empty() {
        let matches = |aud: &str| rules.audiences.iter().any(|expected| expected == aud);
        let ok = match claims.get("aud") {
            Some(Value::String(aud)) => matches(aud),
            Some(Value::Array(values)) => values.iter().filter_map(Value::as_str).any(matches),
            _ => false,
        };
        if !ok {
            return Err(JwtError::WrongAudience);
        }
    }
    for path in &rules.required {
        if claim_at(claims, path).is_none_or(Value::is_null) {
            return Err(JwtError::MissingClaim(path.clone()));
        }
    }
    Ok(())
}

/// A claim by dotted path (`realm_access.roles`); a key containing a dot is
/// also found when written whole.
pub fn claim_at<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    path.split('.').try_fold(claims, |value, segment| value.get(segment))
}

/// Expiry (`exp`, Unix seconds) of verified claims, if any.
pub fn expiry(claims: &Value) -> Option<u64> {
    numeric(claims, "exp").ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const NOW: u64 = 1_800_000_000;
    const SECRET: &[u8] = b"a-shared-secret-of-32-bytes-long!";

    fn fixture(name: &str) -> String {
        let path = format!("{}/../../tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(path).unwrap()
    }

    fn jwks() -> KeySet {
        KeySet::from_jwks(fixture("jwks.json").as_bytes()).unwrap().0
    }

    fn sign(alg: Algorithm, kid: &str, claims: &Value) -> String {
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => EncodingKey::from_secret(SECRET).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(fixture("ec256.pem").as_bytes()).unwrap(),
            Algorithm::ES384 => EncodingKey::from_ec_pem(fixture("ec384.pem").as_bytes()).unwrap(),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(fixture("ed25519.pem").as_bytes()).unwrap(),
            _ => EncodingKey::from_rsa_pem(fixture("rsa.pem").as_bytes()).unwrap(),
        };
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        encode(&header, claims, &key).unwrap()
    }

    fn claims() -> Value {
        json!({"iss": "https://idp.test", "aud": ["api"], "sub": "alice", "iat": NOW - 10, "exp": NOW + 600})
    }

    fn rules() -> ClaimRules {
        ClaimRules {
            issuer: Some("https://idp.test".into()),
            audiences: vec!["api".into()],
            required: vec!["sub".into()],
            leeway_seconds: 60,
            max_lifetime_seconds: None,
        }
    }

    #[test]
    fn every_algorithm_verifies_with_its_jwk() {
        let keys = jwks();
        for (alg, kid) in [
            (Algorithm::RS256, "rsa-1"),
            (Algorithm::RS384, "rsa-1"),
            (Algorithm::RS512, "rsa-1"),
            (Algorithm::PS256, "rsa-1"),
            (Algorithm::PS384, "rsa-1"),
            (Algorithm::PS512, "rsa-1"),
            (Algorithm::ES256, "ec-256"),
            (Algorithm::ES384, "ec-384"),
            (Algorithm::EdDSA, "ed-1"),
            (Algorithm::HS256, "hs-1"),
        ] {
            let token = sign(alg, kid, &claims());
            let verified = verify(&token, &keys, ALL_ALGORITHMS, &rules(), NOW);
            assert_eq!(verified.map(|c| c["sub"].clone()), Ok(json!("alice")), "{alg:?}");
        }
    }

    #[test]
    fn claim_failures() {
        let keys = jwks();
        let check =
            |claims: Value| verify(&sign(Algorithm::RS256, "rsa-1", &claims), &keys, ALL_ALGORITHMS, &rules(), NOW);
        let mut expired = claims();
        expired["exp"] = json!(NOW - 61);
        assert_eq!(check(expired), Err(JwtError::Expired));
        let mut within_leeway = claims();
        within_leeway["exp"] = json!(NOW - 30);
        assert!(check(within_leeway).is_ok());
        let mut future = claims();
        future["nbf"] = json!(NOW + 120);
        assert_eq!(check(future), Err(JwtError::NotYetValid));
        let mut issuer = claims();
        issuer["iss"] = json!("https://evil.test");
        assert_eq!(check(issuer), Err(JwtError::WrongIssuer));
        let mut audience = claims();
        audience["aud"] = json!("other");
        assert_eq!(check(audience), Err(JwtError::WrongAudience));
        let mut no_sub = claims();
        no_sub.as_object_mut().unwrap().remove("sub");
        assert_eq!(check(no_sub), Err(JwtError::MissingClaim("sub".into())));
        let mut lifetime = rules();
        lifetime.max_lifetime_seconds = Some(300);
        let token = sign(Algorithm::RS256, "rsa-1", &claims());
        assert_eq!(verify(&token, &keys, ALL_ALGORITHMS, &lifetime, NOW), Err(JwtError::LifetimeTooLong));
    }

    #[test]
    fn none_confusion_and_wrong_keys_are_rejected() {
        let keys = jwks();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"rsa-1"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims().to_string());
        let unsigned = format!("{header}.{payload}.");
        assert!(matches!(
            verify(&unsigned, &keys, ALL_ALGORITHMS, &rules(), NOW),
            Err(JwtError::AlgorithmNotAllowed(_))
        ));

        // Confusion: HS256 "signed" with the RSA public key's PEM as the secret.
        let confused = encode(
            &{
                let mut h = Header::new(Algorithm::HS256);
                h.kid = Some("rsa-1".into());
                h
            },
            &claims(),
            &EncodingKey::from_secret(fixture("rsa.pub.pem").as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(
            verify(&confused, &keys, ALL_ALGORITHMS, &rules(), NOW),
            Err(JwtError::UnknownKey(Some("rsa-1".into()))),
            "an RSA key never verifies HMAC"
        );

        // Signed by a key the set does not hold, under a known kid.
        let other = encode(
            &{
                let mut h = Header::new(Algorithm::RS256);
                h.kid = Some("rsa-1".into());
                h
            },
            &claims(),
            &EncodingKey::from_rsa_pem(fixture("rsa2.pem").as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(verify(&other, &keys, ALL_ALGORITHMS, &rules(), NOW), Err(JwtError::BadSignature));
        let unknown = sign(Algorithm::RS256, "rsa-9", &claims());
        assert_eq!(
            verify(&unknown, &keys, ALL_ALGORITHMS, &rules(), NOW),
            Err(JwtError::UnknownKey(Some("rsa-9".into())))
        );
        // The provider allows only RS256: ES256 tokens are refused even with a valid key.
        let es = sign(Algorithm::ES256, "ec-256", &claims());
        assert!(matches!(
            verify(&es, &keys, &[Algorithm::RS256.into()], &rules(), NOW),
            Err(JwtError::AlgorithmNotAllowed(_))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let keys = jwks();
        let crit = format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","crit":["exp"]}"#),
            URL_SAFE_NO_PAD.encode(b"{}")
        );
        for token in [
            "",
            "a.b",
            "a.b.c.d",
            "!!!.***.???",
            "e30.e30.e30",
            "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",
            &"a".repeat(20_000),
            &crit,
        ] {
            assert!(verify(token, &keys, ALL_ALGORITHMS, &rules(), NOW).is_err(), "{token:.40}");
        }
        assert_eq!(verify(&crit, &keys, ALL_ALGORITHMS, &rules(), NOW), Err(JwtError::CriticalHeader));
    }

    #[test]
    fn pem_keys_and_jwks_errors() {
        let key = KeySet::pem_key(&fixture("rsa.pub.pem"), Algorithm::RS256.into(), None).unwrap();
        let keys = KeySet { keys: vec![key] };
        let token = sign(Algorithm::RS256, "whatever", &claims());
        // No kid match needed? The token names kid "whatever"; a PEM key without kid only verifies kid-less tokens.
        assert!(verify(&token, &keys, ALL_ALGORITHMS, &rules(), NOW).is_err());
        let mut header = Header::new(Algorithm::RS256);
        header.kid = None;
        let kidless =
            encode(&header, &claims(), &EncodingKey::from_rsa_pem(fixture("rsa.pem").as_bytes()).unwrap()).unwrap();
        assert!(verify(&kidless, &keys, ALL_ALGORITHMS, &rules(), NOW).is_ok());
        assert!(KeySet::pem_key("not a pem", Algorithm::RS256.into(), None).is_err());
        assert!(KeySet::pem_key(&fixture("rsa.pub.pem"), Algorithm::HS256.into(), None).is_err());
        assert!(KeySet::from_jwks(b"{}").is_err());
        assert!(KeySet::from_jwks(br#"{"keys":[{"kty":"XYZ"}]}"#).is_err());
        let (partial, skipped) =
            KeySet::from_jwks(br#"{"keys":[{"kty":"XYZ"},{"kty":"oct","k":"c2VjcmV0","alg":"HS256"}]}"#).unwrap();
        assert_eq!((partial.keys.len(), skipped.len()), (1, 1));
    }

    /// ES512 interop: a token the `openssl` command line signed (committed; its
    /// claims are `claims()` at `NOW`), verified by the module's P-521 code.
    fn openssl_es512_token() -> String {
        fixture("es512-openssl.jwt").trim().to_string()
    }

    #[test]
    fn es512_tokens_from_openssl_verify_with_a_jwk_or_a_pem_key() {
        let token = openssl_es512_token();
        let verified = verify(&token, &jwks(), ALL_ALGORITHMS, &rules(), NOW).unwrap();
        assert_eq!(verified["sub"], "alice");
        let pem = KeySet::pem_key(&fixture("ec521.pub.pem"), JwsAlgorithm::Es512, Some("ec-521".into())).unwrap();
        let keys = KeySet { keys: vec![pem] };
        assert_eq!(verify(&token, &keys, ALL_ALGORITHMS, &rules(), NOW).unwrap()["sub"], "alice");
        assert_eq!(keys.algorithms(), vec![JwsAlgorithm::Es512]);
        assert_eq!(algorithm_from_name("ES512"), Some(JwsAlgorithm::Es512));
        // Claims are checked as for every algorithm.
        assert_eq!(verify(&token, &jwks(), ALL_ALGORITHMS, &rules(), NOW + 700), Err(JwtError::Expired));
    }

    #[test]
    fn es512_refuses_tampering_other_algorithms_and_other_keys() {
        let token = openssl_es512_token();
        let keys = jwks();
        let (signing_input, signature) = token.rsplit_once('.').unwrap();
        let (header, _) = signing_input.split_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(claims().to_string().replace("alice", "mallory"));
        let forged = format!("{header}.{forged_payload}.{signature}");
        assert_eq!(verify(&forged, &keys, ALL_ALGORITHMS, &rules(), NOW), Err(JwtError::BadSignature));
        let mut raw = URL_SAFE_NO_PAD.decode(signature).unwrap();
        raw[70] ^= 1;
        let flipped = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(&raw));
        assert_eq!(verify(&flipped, &keys, ALL_ALGORITHMS, &rules(), NOW), Err(JwtError::BadSignature));
        let short = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(&raw[..131]));
        assert_eq!(verify(&short, &keys, ALL_ALGORITHMS, &rules(), NOW), Err(JwtError::BadSignature));
        let zeros = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode([0u8; 132]));
        assert_eq!(verify(&zeros, &keys, ALL_ALGORITHMS, &rules(), NOW), Err(JwtError::BadSignature));
        // A provider that does not accept ES512.
        let es384_only = [JwsAlgorithm::from(Algorithm::ES384)];
        assert!(matches!(verify(&token, &keys, &es384_only, &rules(), NOW), Err(JwtError::AlgorithmNotAllowed(_))));
        // The P-384 key cannot verify ES512 even when the token names it.
        let renamed = token.replacen(header, &URL_SAFE_NO_PAD.encode(r#"{"alg":"ES512","kid":"ec-384"}"#), 1);
        assert_eq!(
            verify(&renamed, &keys, ALL_ALGORITHMS, &rules(), NOW),
            Err(JwtError::UnknownKey(Some("ec-384".into())))
        );
    }

    #[test]
    fn p521_jwks_with_bad_coordinates_are_refused() {
        let jwk = |x: &str, y: &str| format!(r#"{{"keys":[{{"kty":"EC","crv":"P-521","x":"{x}","y":"{y}"}}]}}"#);
        let good: Value = serde_json::from_str(&fixture("jwks.json")).unwrap();
        let ec521 = good["keys"].as_array().unwrap().iter().find(|key| key["kid"] == "ec-521").unwrap();
        let (x, y) = (ec521["x"].as_str().unwrap(), ec521["y"].as_str().unwrap());
        assert!(KeySet::from_jwks(jwk(x, y).as_bytes()).is_ok());
        let error = KeySet::from_jwks(jwk(&x[..40], y).as_bytes()).unwrap_err();
        assert!(error.contains("`x` must be 66 bytes"), "{error}");
        let error = KeySet::from_jwks(jwk(y, x).as_bytes()).unwrap_err();
        assert!(error.contains("not a P-521 point"), "{error}");
        let error = KeySet::from_jwks(jwk("!!", y).as_bytes()).unwrap_err();
        assert!(error.contains("not base64url"), "{error}");
    }

    #[test]
    fn dotted_claim_paths() {
        let claims = json!({"realm_access": {"roles": ["a", "b"]}, "x.y": 1});
        assert_eq!(claim_at(&claims, "realm_access.roles"), Some(&json!(["a", "b"])));
        assert_eq!(claim_at(&claims, "x.y"), Some(&json!(1)));
        assert_eq!(claim_at(&claims, "missing.path"), None);
    }
}
