//! Credentials: finding them in the request, checking API keys and basic-auth
//! passwords, and the per-worker caches that keep the hot path cheap.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use gateway_common::hash::{digests_equal, IntegerHashing, KeyedHash};
use gateway_common::request::{percent_decode, RequestHeaders};
use gateway_common::shared::{Store, StoreError};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{ApiKeys, ArrayFormat, Basic, TokenSource};

/// A credential found in the request, and where (for stripping it later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub value: String,
    pub source: TokenSource,
}

/// The first credential present in `sources`, in order. Values that are not
/// UTF-8 are reported as `Err(source)` (malformed) rather than skipped.
pub fn find_credential(request: &RequestHeaders, sources: &[TokenSource]) -> Option<Result<Found, TokenSource>> {
    for source in sources {
        let raw: Option<Vec<u8>> = match source {
            TokenSource::Header { name, prefix } => match request.first(name) {
                None => None,
                Some(value) => match prefix {
                    None => Some(value.to_vec()),
                    Some(prefix) => {
                        let head = value.get(..prefix.len());
                        match head {
                            Some(head) if head.eq_ignore_ascii_case(prefix.as_bytes()) => {
                                value.get(prefix.len()..).map(|rest| rest.trim_ascii().to_vec())
                            }
                            // Another scheme in this header (e.g. Basic): not our credential.
                            _ => None,
                        }
                    }
                },
            },
            TokenSource::Query(name) => request.query_values(name).into_iter().next(),
            TokenSource::Cookie(name) => request.cookie_values(name).first().map(|value| value.to_vec()),
        };
        if let Some(raw) = raw {
            return Some(match String::from_utf8(raw) {
                Ok(value) if !value.is_empty() => Ok(Found { value, source: source.clone() }),
                _ => Err(source.clone()),
            });
        }
    }
    None
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The consumer an API key belongs to. Every configured digest is compared (in
/// constant time), so timing does not reveal which key nearly matched.
pub fn check_api_key(api_keys: &ApiKeys, key: &str) -> Option<String> {
    let digest = sha256(key.as_bytes());
    let mut found = None;
    for (expected, consumer) in &api_keys.keys {
        if digests_equal(expected, &digest) && found.is_none() {
            found = Some(consumer.clone());
        }
    }
    found
}

/// `Authorization: Basic base64(user:password)` (RFC 7617).
pub fn parse_basic(header: &[u8]) -> Option<(String, String)> {
    let scheme = header.get(..6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let decoded = STANDARD.decode(header.get(6..)?.trim_ascii()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Why a basic-auth check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasicFailure {
    /// Unknown user or wrong password (not distinguished in answers).
    Invalid,
    /// Too many recent failures for this user; no hash was computed.
    Locked { retry_after_seconds: u64 },
}

/// Shared-data key of a configured user's failure window (bounded by the
/// number of configured users; unknown usernames are never counted).
pub fn failure_key(user_index: usize) -> String {
    format!("auth:v1:basic-failures:{user_index}")
}

const FAILURE_FORMAT: u8 = 1;

/// (failures, window start) of a user, from shared data.
fn read_failures(store: &impl Store, key: &str) -> Result<((u32, u64), Option<u32>), StoreError> {
    let (value, cas) = store.get(key)?;
    let value = value.unwrap_or_default();
    let decoded = match value.split_first() {
        Some((&FAILURE_FORMAT, rest)) => {
            let count = rest.get(..4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes);
            let since = rest.get(4..12).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
            (count, since)
        }
        _ => (0, 0),
    };
    Ok((decoded, cas))
}

fn write_failures(store: &impl Store, key: &str, count: u32, since: u64, cas: Option<u32>) -> Result<bool, StoreError> {
    let mut value = vec![FAILURE_FORMAT];
    value.extend_from_slice(&count.to_le_bytes());
    value.extend_from_slice(&since.to_le_bytes());
    store.set(key, &value, cas)
}

/// Verifies basic credentials with bcrypt, caching successes per worker (keyed
/// by a keyed hash of the credential, bounded, short-lived) and limiting failures
/// per user across all workers (shared data), so neither repeated logins nor
/// wrong passwords keep the gateway hashing.
pub struct BasicChecker {
    cache_key: [u8; 16],
    successes: HashMap<[u8; 32], (String, u64)>,
    pub hashes_computed: u64,
}

impl BasicChecker {
    pub fn new(cache_key: [u8; 16]) -> Self {
        Self { cache_key, successes: HashMap::new(), hashes_computed: 0 }
    }

    pub fn check(
        &mut self,
        store: &impl Store,
        basic: &Basic,
        user: &str,
        password: &str,
        now: u64,
    ) -> Result<String, BasicFailure> {
        let Some((index, account)) = basic.users.iter().enumerate().find(|(_, account)| account.username == user)
        else {
            return Err(BasicFailure::Invalid);
        };
        let failures_key = failure_key(index);
        let mut keyed = Vec::with_capacity(16 + user.len() + 1 + password.len());
        keyed.extend_from_slice(&self.cache_key);
        keyed.extend_from_slice(user.as_bytes());
        keyed.push(0);
        keyed.extend_from_slice(password.as_bytes());
        let cache_key = sha256(&keyed);
        if let Some((consumer, until)) = self.successes.get(&cache_key) {
            if *until > now {
                return Ok(consumer.clone());
            }
        }
        // Shared data failing must not lock anyone out: count nothing then.
        let ((count, since), _) = read_failures(store, &failures_key).unwrap_or(((0, 0), None));
        let window_end = since.saturating_add(basic.failure_window_seconds);
        if count >= basic.max_failures && now < window_end {
            return Err(BasicFailure::Locked { retry_after_seconds: (window_end - now).max(1) });
        }
        self.hashes_computed += 1;
        if bcrypt::verify(password, &account.hash).unwrap_or(false) {
            if count > 0 {
                let _ = write_failures(store, &failures_key, 0, 0, None);
            }
            if basic.cache_entries > 0 && basic.cache_seconds > 0 {
                if self.successes.len() >= basic.cache_entries {
                    self.successes.retain(|_, (_, until)| *until > now);
                    if self.successes.len() >= basic.cache_entries {
                        self.successes.clear();
                    }
                }
                self.successes.insert(cache_key, (account.consumer.clone(), now.saturating_add(basic.cache_seconds)));
            }
            Ok(account.consumer.clone())
        } else {
            for _ in 0..16 {
                let Ok(((count, since), cas)) = read_failures(store, &failures_key) else { break };
                let (count, since) = if now >= since.saturating_add(basic.failure_window_seconds) {
                    (1, now)
                } else {
                    (count + 1, since)
                };
                if write_failures(store, &failures_key, count, since, cas).unwrap_or(true) {
                    break;
                }
            }
            Err(BasicFailure::Invalid)
        }
    }
}

/// Verified tokens per worker, keyed by the token itself, never kept past the
/// token's `exp` nor `max_ttl` (so a revoked key stops working within it).
///
/// A hit is the same token, compared in whole: never one whose hash collides.
/// Entries are bucketed by a SipHash, under a secret random per VM, of the
/// token's length and its last [`TokenCache::HASHED_TAIL`] bytes: for a JWT that
/// is signature, different for every token an issuer signs, so hashing the rest
/// buys nothing; and since only verified tokens are inserted, nobody can fill one
/// bucket. Hashing and comparing the whole token byte by byte (std's map, with
/// wasi-libc's byte-wise `memcmp`) was the largest part of a warm check's own
/// code. Tokens longer than [`TokenCache::MAX_TOKEN_BYTES`] are verified every
/// time, which bounds the memory at `capacity` times that.
pub struct TokenCache {
    capacity: usize,
    max_ttl: u64,
    hash: KeyedHash,
    /// Tokens by [`TokenCache::bucket_of`]; a bucket holds more than one only
    /// when two tokens' hashes are equal.
    buckets: HashMap<u64, Vec<KeptToken>, IntegerHashing>,
    /// Every kept token once, in insertion order, with its bucket (so its length
    /// is the cache's): at capacity the oldest goes, in O(1) (a scan for the
    /// entry closest to expiry cost two passes over every entry per insert,
    /// which is every request when each token is new).
    order: VecDeque<(u64, Rc<[u8]>)>,
}

/// A token as kept, with what its verification found.
type KeptToken = (Rc<[u8]>, CachedToken);

#[derive(Debug, Clone)]
pub struct CachedToken {
    pub provider: usize,
    pub claims: Rc<Value>,
    until: u64,
}

impl TokenCache {
    /// The longest token kept (real JWTs are well under 2 KiB).
    pub const MAX_TOKEN_BYTES: usize = 4096;
    /// How many of a token's last bytes its bucket is chosen by.
    pub const HASHED_TAIL: usize = 64;

    pub fn new(capacity: usize, max_ttl: u64, secret: [u8; 16]) -> Self {
        Self { capacity, max_ttl, hash: KeyedHash::new(secret), buckets: HashMap::default(), order: VecDeque::new() }
    }

    fn bucket_of(&self, token: &[u8]) -> u64 {
        let tail = token.get(token.len().saturating_sub(Self::HASHED_TAIL)..).unwrap_or(token);
        self.hash.hash(tail) ^ (token.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    pub fn get(&self, token: &[u8], provider: usize, now: u64) -> Option<Rc<Value>> {
        let bucket = self.buckets.get(&self.bucket_of(token))?;
        let (_, entry) = bucket.iter().find(|(kept, _)| same_bytes(kept, token))?;
        (entry.provider == provider && now < entry.until).then(|| Rc::clone(&entry.claims))
    }

    pub fn insert(&mut self, token: &[u8], provider: usize, claims: Rc<Value>, exp: Option<u64>, now: u64) {
        if self.capacity == 0 || token.len() > Self::MAX_TOKEN_BYTES {
            return;
        }
        let until = exp.map_or(now + self.max_ttl, |exp| exp.min(now + self.max_ttl));
        if until <= now {
            return;
        }
        let entry = CachedToken { provider, claims, until };
        let bucket_key = self.bucket_of(token);
        if let Some(bucket) = self.buckets.get_mut(&bucket_key) {
            if let Some((_, existing)) = bucket.iter_mut().find(|(kept, _)| same_bytes(kept, token)) {
                *existing = entry;
                return;
            }
        }
        // Entries live at most max_ttl, so the oldest inserted is about the first
        // to expire anyway.
        while self.order.len() >= self.capacity {
            let Some((oldest_bucket, oldest)) = self.order.pop_front() else { break };
            self.remove(oldest_bucket, &oldest);
        }
        let key: Rc<[u8]> = Rc::from(token);
        self.buckets.entry(bucket_key).or_default().push((Rc::clone(&key), entry));
        self.order.push_back((bucket_key, key));
    }

    fn remove(&mut self, bucket_key: u64, token: &[u8]) {
        let Some(bucket) = self.buckets.get_mut(&bucket_key) else { return };
        bucket.retain(|(kept, _)| !same_bytes(kept, token));
        if bucket.is_empty() {
            self.buckets.remove(&bucket_key);
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Byte equality eight bytes at a time (wasi-libc's `memcmp`, which `==` on
/// slices calls, compares one byte per step).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (words_a, words_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tails_equal = words_a.remainder() == words_b.remainder();
    tails_equal
        && words_a.zip(words_b).all(|(x, y)| match (<[u8; 8]>::try_from(x), <[u8; 8]>::try_from(y)) {
            (Ok(x), Ok(y)) => u64::from_ne_bytes(x) == u64::from_ne_bytes(y),
            _ => false,
        })
}

/// A header value for a claim; `None` for values a header cannot carry.
pub fn claim_header_value(value: &Value, arrays: ArrayFormat) -> Option<String> {
    let text = match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        Value::Array(items) if arrays == ArrayFormat::Join => items
            .iter()
            .map(|item| item.as_str().map_or_else(|| item.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(","),
        Value::Null => return None,
        other => other.to_string(),
    };
    (!text.bytes().any(|b| b.is_ascii_control() && b != b'\t')).then_some(text)
}

/// The request target without the query parameter `name` (the credential is not
/// forwarded); `None` when the target has no query.
pub fn target_without_query_parameter(target: &str, name: &str) -> Option<String> {
    let (base, query) = target.split_once('?')?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            percent_decode(key.as_bytes()) != name.as_bytes()
        })
        .collect();
    Some(if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) })
}

/// One `cookie` header with every cookie but `name`; `None` when none is left.
pub fn cookies_without<'h>(headers: impl Iterator<Item = &'h [u8]>, name: &str) -> Option<Vec<u8>> {
    let crumbs: Vec<&[u8]> = headers
        .flat_map(|header| header.split(|byte| *byte == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|crumb| !crumb.is_empty() && crumb.split(|byte| *byte == b'=').next() != Some(name.as_bytes()))
        .collect();
    (!crumbs.is_empty()).then(|| crumbs.join(&b"; "[..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BasicUser;
    use gateway_common::shared::MemoryStore;

    fn headers(pairs: &[(&str, &[u8])]) -> RequestHeaders {
        gateway_common::testing::request(pairs)
    }

    #[test]
    fn credentials_are_found_in_order() {
        let sources = vec![
            TokenSource::Header { name: "authorization".into(), prefix: Some("Bearer ".into()) },
            TokenSource::Query("access_token".into()),
            TokenSource::Cookie("session".into()),
        ];
        let request =
            headers(&[(":path", b"/?access_token=q"), ("authorization", b"bearer  abc "), ("cookie", b"session=c")]);
        assert_eq!(find_credential(&request, &sources).unwrap().unwrap().value, "abc");
        let request = headers(&[(":path", b"/?access_token=q"), ("authorization", b"Basic Zm9vOmJhcg==")]);
        assert_eq!(find_credential(&request, &sources).unwrap().unwrap().value, "q", "Basic is not a bearer token");
        let request = headers(&[(":path", b"/"), ("cookie", b"a=1; session=c")]);
        assert_eq!(find_credential(&request, &sources).unwrap().unwrap().value, "c");
        let request = headers(&[(":path", b"/"), ("authorization", b"Bearer \xff\xfe")]);
        assert!(find_credential(&request, &sources).unwrap().is_err());
        assert!(find_credential(&headers(&[(":path", b"/")]), &sources).is_none());
    }

    #[test]
    fn api_keys_match_by_digest() {
        let api_keys = ApiKeys {
            sources: vec![],
            keys: vec![(sha256(b"key-one"), "acme".into()), (sha256(b"key-two"), "globex".into())],
            forward_key: false,
        };
        assert_eq!(check_api_key(&api_keys, "key-two").as_deref(), Some("globex"));
        assert_eq!(check_api_key(&api_keys, "key-three"), None);
    }

    #[test]
    fn basic_header_parsing() {
        assert_eq!(
            parse_basic(b"Basic YWxpY2U6czNjcmV0OndpdGg6Y29sb25z"),
            Some(("alice".into(), "s3cret:with:colons".into()))
        );
        assert_eq!(parse_basic(b"Bearer abc"), None);
        assert_eq!(parse_basic(b"Basic !!!"), None);
        assert_eq!(parse_basic(b"Basic bm9jb2xvbg=="), None);
        assert_eq!(parse_basic(b"Basic"), None);
    }

    #[test]
    fn basic_checks_cache_successes_and_lock_after_failures() {
        // Cost 4: fast enough for a unit test.
        let hash = bcrypt::hash_with_salt("s3cret", 4, [7u8; 16]).unwrap().format_for_version(bcrypt::Version::TwoB);
        let basic = Basic {
            users: vec![BasicUser { username: "alice".into(), hash, consumer: "alice-co".into() }],
            cache_seconds: 60,
            cache_entries: 10,
            max_failures: 3,
            failure_window_seconds: 60,
            forward_credentials: false,
        };
        let store = MemoryStore::default();
        store.ensure(&failure_key(0)).unwrap();
        let mut checker = BasicChecker::new([1; 16]);
        assert_eq!(checker.check(&store, &basic, "alice", "s3cret", 100), Ok("alice-co".into()));
        assert_eq!(checker.check(&store, &basic, "alice", "s3cret", 101), Ok("alice-co".into()));
        assert_eq!(checker.hashes_computed, 1, "the second check hit the cache");
        assert_eq!(checker.check(&store, &basic, "bob", "x", 101), Err(BasicFailure::Invalid));
        // Failures on another worker count too: they share the store.
        let mut other_worker = BasicChecker::new([2; 16]);
        assert_eq!(other_worker.check(&store, &basic, "alice", "wrong", 102), Err(BasicFailure::Invalid));
        for _ in 0..2 {
            assert_eq!(checker.check(&store, &basic, "alice", "wrong", 102), Err(BasicFailure::Invalid));
        }
        let hashed = checker.hashes_computed;
        let locked = Err(BasicFailure::Locked { retry_after_seconds: 59 });
        assert_eq!(checker.check(&store, &basic, "alice", "wrong", 103), locked);
        assert_eq!(checker.hashes_computed, hashed, "a locked user costs no hash");
        assert_eq!(other_worker.check(&store, &basic, "alice", "wrong", 103), locked, "locked on every worker");
        // The cached success still works; after the window, checks resume.
        assert_eq!(checker.check(&store, &basic, "alice", "s3cret", 104), Ok("alice-co".into()));
        assert_eq!(checker.check(&store, &basic, "alice", "wrong", 200), Err(BasicFailure::Invalid));
    }

    #[test]
    fn token_cache_is_bounded_and_respects_expiry() {
        let mut cache = TokenCache::new(2, 300, [7; 16]);
        let claims = Rc::new(Value::Null);
        cache.insert(b"t1", 0, Rc::clone(&claims), Some(150), 100);
        assert!(cache.get(b"t1", 0, 149).is_some());
        assert!(cache.get(b"t1", 0, 150).is_none(), "never past exp");
        assert!(cache.get(b"t1", 1, 120).is_none(), "another provider");
        assert!(cache.get(b"t1x", 0, 120).is_none() && cache.get(b"t", 0, 120).is_none(), "only the same token");
        cache.insert(b"t2", 0, Rc::clone(&claims), None, 100);
        cache.insert(b"t2", 0, Rc::clone(&claims), None, 110);
        cache.insert(b"t3", 0, Rc::clone(&claims), None, 100);
        assert_eq!(cache.len(), 2);
        assert!(cache.get(b"t1", 0, 120).is_none(), "the oldest entry was evicted");
        assert!(cache.get(b"t2", 0, 120).is_some() && cache.get(b"t3", 0, 120).is_some());
        for n in 4..100u8 {
            cache.insert(&[n; 8], 0, Rc::clone(&claims), None, 100);
        }
        let long = vec![b'a'; TokenCache::MAX_TOKEN_BYTES + 1];
        cache.insert(&long, 0, Rc::clone(&claims), None, 100);
        assert!(cache.get(&long, 0, 120).is_none(), "longer tokens are not kept");
        assert_eq!((cache.len(), cache.order.len()), (2, 2), "bounded, and the order with it");
    }

    #[test]
    fn tokens_in_one_bucket_stay_apart() {
        // Same length and same last 64 bytes: one bucket, three different tokens.
        let tail = [b's'; TokenCache::HASHED_TAIL];
        let token = |head: &[u8]| [head, &tail[..]].concat();
        let (a, b, c) = (token(b"header.payload-a."), token(b"header.payload-b."), token(b"header.payload-c."));
        let mut cache = TokenCache::new(2, 300, [7; 16]);
        assert_eq!(cache.bucket_of(&a), cache.bucket_of(&b));
        cache.insert(&a, 0, Rc::new(Value::from("a")), None, 100);
        cache.insert(&b, 1, Rc::new(Value::from("b")), None, 100);
        assert_eq!(cache.get(&a, 0, 101).as_deref(), Some(&Value::from("a")));
        assert_eq!(cache.get(&b, 1, 101).as_deref(), Some(&Value::from("b")));
        assert!(cache.get(&c, 0, 101).is_none(), "a token sharing the bucket is not a hit");
        cache.insert(&c, 0, Rc::new(Value::from("c")), None, 100);
        assert!(cache.get(&a, 0, 101).is_none(), "the oldest of the bucket was evicted, and only it");
        assert!(cache.get(&b, 1, 101).is_some() && cache.get(&c, 0, 101).is_some());
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn word_wise_equality_is_byte_equality() {
        let text: Vec<u8> = (0..40u8).collect();
        for len in 0..text.len() {
            assert!(same_bytes(&text[..len], &text[..len]));
            for at in 0..len {
                let mut other = text[..len].to_vec();
                other[at] ^= 1;
                assert!(!same_bytes(&text[..len], &other), "length {len}, byte {at} differs");
            }
            assert!(!same_bytes(&text[..len], &text[..len + 1]));
        }
    }

    #[test]
    fn forwarded_credentials_are_removed_and_nothing_else() {
        assert_eq!(
            target_without_query_parameter("/a?x=1&access_token=t&y=%41", "access_token").as_deref(),
            Some("/a?x=1&y=%41")
        );
        assert_eq!(target_without_query_parameter("/a?access%5Ftoken=t", "access_token").as_deref(), Some("/a"));
        assert_eq!(target_without_query_parameter("/a", "access_token"), None);
        let headers: [&[u8]; 2] = [b"a=1; session=s", b"session=t;b=2"];
        assert_eq!(cookies_without(headers.into_iter(), "session"), Some(b"a=1; b=2".to_vec()));
        assert_eq!(cookies_without([&b"session=s"[..]].into_iter(), "session"), None);
    }

    #[test]
    fn claims_render_as_header_text_or_not_at_all() {
        use serde_json::json;
        assert_eq!(claim_header_value(&json!("alice"), ArrayFormat::Join).as_deref(), Some("alice"));
        assert_eq!(claim_header_value(&json!(["a", 1]), ArrayFormat::Join).as_deref(), Some("a,1"));
        assert_eq!(claim_header_value(&json!(["a"]), ArrayFormat::Json).as_deref(), Some("[\"a\"]"));
        assert_eq!(claim_header_value(&json!({"id": 4}), ArrayFormat::Join).as_deref(), Some("{\"id\":4}"));
        assert_eq!(claim_header_value(&json!(null), ArrayFormat::Join), None);
        assert_eq!(claim_header_value(&json!("a\r\nb"), ArrayFormat::Join), None);
    }
}
