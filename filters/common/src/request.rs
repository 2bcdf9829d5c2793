//! A per-request view of the request headers, read from the host once
//! (every host call copies into the VM), plus query and cookie parsing.
//!
//! Request data is bytes. The request target (`:path`) and `:authority` are
//! checked once, when the view is built: a target that is not printable ASCII
//! starting with `/` (or `*`) is refused, never replaced by a default. Envoy's
//! HTTP/1.1 codec refuses such targets itself; its HTTP/2 codec hands bytes
//! 0x80-0xFF through, so every module judges them here and answers `400`.

use crate::host::{HostError, MapType};
use crate::platform::Host;

/// Why a request cannot be judged: its target or authority is not what a URI allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    MissingPath,
    /// `:path` holds a byte outside printable ASCII (0x21-0x7E) or does not start with `/`.
    InvalidPath,
    /// `:authority` / `host` holds a byte no URI authority may hold.
    InvalidAuthority,
}

impl BadRequest {
    pub fn detail(&self) -> &'static str {
        match self {
            BadRequest::MissingPath => "the request has no :path",
            BadRequest::InvalidPath => {
                "the request target must be printable ASCII starting with '/' (percent-encode other bytes)"
            }
            BadRequest::InvalidAuthority => "the request authority holds bytes a URI authority cannot hold",
        }
    }
}

/// Reading the request failed: the host refused, or the request is malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    Host(HostError),
    /// The request cannot be judged; `facts` let the caller answer it.
    Bad {
        reason: BadRequest,
        facts: crate::problem::RequestFacts,
    },
}

/// Header (name, value) pairs as the host serialized them: the one buffer the
/// host handed over and the spans of each name and value in it, so reading a map
/// costs two allocations, not two per header. Names are as the host gives them
/// (lower-case), values raw bytes; a repeated header appears once per occurrence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderPairs {
    bytes: Vec<u8>,
    /// (name start, name length, value start, value length, name key) per pair.
    spans: Vec<[u32; 5]>,
}

/// A cheap fingerprint of a header name (its length and three of its bytes): a
/// lookup compares it before the bytes, so looking a name up among pairs costs a
/// full comparison only where the fingerprint agrees. Conditions look names up
/// per route and per rule; in Wasm every byte comparison is a call to a plain
/// byte loop, so this is most of what a lookup saves.
fn name_key(name: &[u8]) -> u32 {
    match name {
        [] => 0,
        [first, ..] => {
            let len = name.len();
            let middle = name.get(len / 2).copied().unwrap_or_default();
            let last = name.get(len - 1).copied().unwrap_or_default();
            (len as u32 & 0xff) | u32::from(*first) << 8 | u32::from(middle) << 16 | u32::from(last) << 24
        }
    }
}

impl HeaderPairs {
    /// Decodes the ABI's serialized map: a u32 count, then a (name length, value
    /// length) u32 pair per entry, then each name and value NUL-terminated.
    /// Malformed input keeps the entries decoded so far, never panics.
    pub fn decode(bytes: Vec<u8>) -> Self {
        let read_u32 = |at: usize| -> Option<usize> {
            let array: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
            usize::try_from(u32::from_le_bytes(array)).ok()
        };
        let mut spans = Vec::new();
        if let Some(count) = read_u32(0) {
            let mut cursor = count.checked_mul(8).and_then(|n| n.checked_add(4)).unwrap_or(usize::MAX);
            for index in 0..count.min(bytes.len() / 8) {
                let lengths_at = 4 + index * 8;
                let (Some(name_len), Some(value_len)) = (read_u32(lengths_at), read_u32(lengths_at + 4)) else {
                    break;
                };
                let name_at = cursor;
                let Some(value_at) = name_at.checked_add(name_len).and_then(|end| end.checked_add(1)) else { break };
                let Some(next) = value_at.checked_add(value_len).and_then(|end| end.checked_add(1)) else { break };
                if value_at.saturating_add(value_len) > bytes.len() {
                    break;
                }
                let [name_at, name_len, value_at, value_len] =
                    [name_at, name_len, value_at, value_len].map(|n| u32::try_from(n).unwrap_or(u32::MAX));
                let key = name_key(bytes.get(name_at as usize..name_at as usize + name_len as usize).unwrap_or(&[]));
                spans.push([name_at, name_len, value_at, value_len, key]);
                cursor = next;
            }
        }
        Self { bytes, spans }
    }

    /// Every pair, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.spans.iter().filter_map(|span| self.pair(span))
    }

    fn pair(&self, [name_at, name_len, value_at, value_len, _]: &[u32; 5]) -> Option<(&[u8], &[u8])> {
        let slice = |at: u32, len: u32| self.bytes.get(at as usize..(at as usize).checked_add(len as usize)?);
        Some((slice(*name_at, *name_len)?, slice(*value_at, *value_len)?))
    }

    /// Every value of `name`, in order.
    pub fn values<'s, 'n>(&'s self, name: &'n str) -> impl Iterator<Item = &'s [u8]> + use<'s, 'n> {
        let key = name_key(name.as_bytes());
        self.spans
            .iter()
            .filter(move |span| span[4] == key)
            .filter_map(|span| self.pair(span))
            .filter(move |(pair_name, _)| *pair_name == name.as_bytes())
            .map(|(_, value)| value)
    }

    /// The first value of `name`.
    pub fn first(&self, name: &str) -> Option<&[u8]> {
        self.values(name).next()
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

impl<N: AsRef<[u8]>, V: AsRef<[u8]>> FromIterator<(N, V)> for HeaderPairs {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(pairs: I) -> Self {
        let mut built = HeaderPairs::default();
        for (name, value) in pairs {
            let (name, value) = (name.as_ref(), value.as_ref());
            let at = |bytes: &Vec<u8>| u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            let name_at = at(&built.bytes);
            built.bytes.extend_from_slice(name);
            let value_at = at(&built.bytes);
            built.bytes.extend_from_slice(value);
            let len = |bytes: &[u8]| u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            built.spans.push([name_at, len(name), value_at, len(value), name_key(name)]);
        }
        built
    }
}

impl From<Vec<(Vec<u8>, Vec<u8>)>> for HeaderPairs {
    fn from(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        pairs.into_iter().collect()
    }
}

/// The request headers as the host handed them over (names lower-case), with
/// a request target that passed [`check_target`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHeaders {
    pairs: HeaderPairs,
    /// The whole `:path` (printable ASCII, checked).
    target: String,
    /// Where the query starts (`?`), if there is one.
    query_at: Option<usize>,
    /// The client's address, when the module derived it (only its `client_ip`
    /// conditions read it).
    client_ip: Option<std::net::IpAddr>,
}

/// Printable ASCII starting with `/`, or the asterisk form `*`.
pub fn check_target(target: &[u8]) -> Result<&str, BadRequest> {
    let printable = target.iter().all(|byte| (0x21..=0x7e).contains(byte));
    let form_ok = target.first() == Some(&b'/') || target == b"*";
    if !printable || !form_ok {
        return Err(BadRequest::InvalidPath);
    }
    std::str::from_utf8(target).map_err(|_| BadRequest::InvalidPath)
}

/// RFC 3986 authority characters: reg-name / IP literal, port, userinfo.
/// No `/`, `?`, `#`, spaces, controls or non-ASCII: nothing that could move
/// bytes between the authority and the path of a key built from both.
pub fn is_authority(value: &[u8]) -> bool {
    value.iter().all(|byte| byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%@".contains(byte))
}

impl RequestHeaders {
    /// Reads all request headers in one host call and checks the target.
    pub fn read_from(host: &impl Host) -> Result<Self, ReadError> {
        let pairs = host.header_pairs(MapType::HttpRequestHeaders).map_err(ReadError::Host)?;
        Self::from_pairs(pairs).map_err(|(reason, pairs)| ReadError::Bad {
            reason,
            facts: crate::problem::RequestFacts::from_pairs(&pairs),
        })
    }

    /// Builds the view; a malformed target gives the pairs back with the reason.
    pub fn from_pairs(pairs: impl Into<HeaderPairs>) -> Result<Self, (BadRequest, HeaderPairs)> {
        let pairs = pairs.into();
        let checked = (|| {
            let path = pairs.first(":path").ok_or(BadRequest::MissingPath)?;
            let target = check_target(path)?.to_string();
            let authority = pairs.first(":authority").or_else(|| pairs.first("host"));
            if authority.is_some_and(|value| !is_authority(value)) {
                return Err(BadRequest::InvalidAuthority);
            }
            Ok(target)
        })();
        match checked {
            Ok(target) => {
                let query_at = target.find('?');
                Ok(Self { pairs, target, query_at, client_ip: None })
            }
            Err(reason) => Err((reason, pairs)),
        }
    }

    /// Every value of a header, in order (a repeated header yields several).
    pub fn values<'s, 'n>(&'s self, name: &'n str) -> impl Iterator<Item = &'s [u8]> + use<'s, 'n> {
        self.pairs.values(name)
    }

    pub fn first(&self, name: &str) -> Option<&[u8]> {
        self.values(name).next()
    }

    /// The client's address as the module derived it; `None` when it was not
    /// derived or is no IP address.
    pub fn client_ip(&self) -> Option<std::net::IpAddr> {
        self.client_ip
    }

    pub fn set_client_ip(&mut self, ip: Option<std::net::IpAddr>) {
        self.client_ip = ip;
    }

    /// Every header as read, pseudo-headers included.
    pub fn pairs(&self) -> &HeaderPairs {
        &self.pairs
    }

    pub fn count(&self, name: &str) -> usize {
        self.values(name).count()
    }

    /// The whole request target (`:path` with its query), as the client sent it.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// `:path` without its query string.
    pub fn path(&self) -> &str {
        match self.query_at {
            Some(at) => self.target.get(..at).unwrap_or(&self.target),
            None => &self.target,
        }
    }

    /// The raw query string after `?`, if any.
    pub fn query(&self) -> Option<&[u8]> {
        let at = self.query_at?;
        self.target.as_bytes().get(at + 1..)
    }

    pub fn method(&self) -> &[u8] {
        self.first(":method").unwrap_or_default()
    }

    /// A CORS preflight (Fetch): `OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`. One definition for routing, which answers
    /// preflights, and auth, which lets them pass unauthenticated.
    pub fn is_cors_preflight(&self) -> bool {
        self.method() == b"OPTIONS"
            && self.first("origin").is_some()
            && self.first("access-control-request-method").is_some()
    }

    /// `:authority` (or `host`); empty when the request has none.
    pub fn authority(&self) -> &[u8] {
        self.first(":authority").or_else(|| self.first("host")).unwrap_or_default()
    }

    /// The same headers with another target (e.g. a `Location` path); `None`
    /// when that target would not pass the check.
    pub fn with_target(&self, target: &[u8]) -> Option<RequestHeaders> {
        let others = self.pairs.iter().filter(|(name, _)| *name != b":path");
        let pairs: HeaderPairs = others.chain(std::iter::once((&b":path"[..], target))).collect();
        let mut moved = RequestHeaders::from_pairs(pairs).ok()?;
        moved.client_ip = self.client_ip;
        Some(moved)
    }

    /// The same request with another `:method` (a preflight judged as the request
    /// it announces).
    pub fn with_method(&self, method: &[u8]) -> RequestHeaders {
        let others = self.pairs.iter().filter(|(name, _)| *name != b":method");
        let pairs: HeaderPairs = others.chain(std::iter::once((&b":method"[..], method))).collect();
        RequestHeaders { pairs, target: self.target.clone(), query_at: self.query_at, client_ip: self.client_ip }
    }

    /// Percent-decoded values of a query parameter.
    pub fn query_values(&self, name: &str) -> Vec<Vec<u8>> {
        self.query().map(|query| query_values(query, name)).unwrap_or_default()
    }

    /// Values of a cookie across every `cookie` header.
    pub fn cookie_values(&self, name: &str) -> Vec<&[u8]> {
        self.values("cookie").flat_map(|header| cookie_values(header, name)).collect()
    }
}

/// The request of the current stream, for a filter's `on_http_request_headers`:
/// `Err(action)` tells the filter what to return instead. A request whose target
/// cannot be judged is answered `400` problem+json here (the stream stays paused);
/// when the host cannot hand over the headers at all the filter lets the request
/// continue (a host failure, not client input: nothing a client sends causes it).
pub fn read_request_from(host: &impl Host) -> Result<RequestHeaders, proxy_wasm::types::Action> {
    match RequestHeaders::read_from(host) {
        Ok(request) => Ok(request),
        Err(ReadError::Bad { reason, facts }) => {
            let _ = crate::problem::bad_request(reason).send_on(host, &facts);
            Err(proxy_wasm::types::Action::Pause)
        }
        Err(ReadError::Host(_)) => Err(proxy_wasm::types::Action::Continue),
    }
}

/// Text that stands for bytes without losing any: printable ASCII other than `%`
/// as is, every other byte as `%XX`. Two different byte strings never give the
/// same text, so it is safe inside keys and selectors ([`unescape_bytes`] inverts it).
pub fn escape_bytes(bytes: &[u8]) -> String {
    crate::field::percent_escape(bytes, is_kept_unescaped)
}

/// [`escape_bytes`] appended to `out`.
pub fn escape_bytes_into(out: &mut String, bytes: &[u8]) {
    crate::field::percent_escape_into(out, bytes, is_kept_unescaped)
}

fn is_kept_unescaped(byte: u8) -> bool {
    (0x20..=0x7e).contains(&byte)
}

/// The bytes an [`escape_bytes`] text stands for.
pub fn unescape_bytes(text: &str) -> Vec<u8> {
    percent_decode_path(text.as_bytes())
}

/// Percent-decoded values of parameter `name` in a raw query string
/// (`+` is a space, as in HTML forms). Invalid escapes are kept as written.
pub fn query_values(query: &[u8], name: &str) -> Vec<Vec<u8>> {
    query
        .split(|byte| *byte == b'&')
        .filter_map(|pair| {
            let (key, value) = match pair.iter().position(|byte| *byte == b'=') {
                Some(eq) => (pair.get(..eq)?, pair.get(eq + 1..)?),
                None => (pair, &b""[..]),
            };
            (percent_decode(key) == name.as_bytes()).then(|| percent_decode(value))
        })
        .collect()
}

/// Decodes a query-string component: `%XX` escapes, and `+` as a space (HTML forms).
pub fn percent_decode(input: &[u8]) -> Vec<u8> {
    decode(input, true)
}

/// Decodes a path segment: `%XX` escapes only; `+` is a literal in a path (RFC 3986).
pub fn percent_decode_path(input: &[u8]) -> Vec<u8> {
    decode(input, false)
}

/// A path in the normal form RFC 3986 §6.2.2 defines, with repeated slashes
/// merged: percent-encoded unreserved characters decoded (`%69` is `i`), other
/// escapes with upper-case hex, dot segments removed (§5.2.4, after decoding, so
/// `%2e%2E` is `..` too), `//` as `/`. Letters keep their case: paths are
/// case-sensitive. Two spellings of one resource give the same bytes.
pub fn normalized_path(path: &[u8]) -> Vec<u8> {
    let mut decoded = Vec::with_capacity(path.len());
    let mut index = 0;
    while let Some(&byte) = path.get(index) {
        let escape = (byte == b'%').then(|| Some((hex(*path.get(index + 1)?)?, hex(*path.get(index + 2)?)?))).flatten();
        match escape {
            Some((high, low)) => {
                let value = high << 4 | low;
                if value.is_ascii_alphanumeric() || b"-._~".contains(&value) {
                    decoded.push(value);
                } else {
                    decoded.extend_from_slice(format!("%{value:02X}").as_bytes());
                }
                index += 3;
            }
            None => {
                if !(byte == b'/' && decoded.last() == Some(&b'/')) {
                    decoded.push(byte);
                }
                index += 1;
            }
        }
    }
    remove_dot_segments(&decoded)
}

/// RFC 3986 §5.2.4 on a path of segments separated by `/`.
fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
    let absolute = path.first() == Some(&b'/');
    let segments: Vec<&[u8]> = path.split(|byte| *byte == b'/').skip(usize::from(absolute)).collect();
    let mut kept: Vec<&[u8]> = Vec::new();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (position, segment) in segments.iter().enumerate() {
        match *segment {
            b"." => trailing_slash = position == last,
            b".." => {
                kept.pop();
                trailing_slash = position == last;
            }
            other => {
                kept.push(other);
                trailing_slash = false;
            }
        }
    }
    let mut out = Vec::with_capacity(path.len());
    for segment in &kept {
        if absolute || !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(segment);
    }
    if trailing_slash || (absolute && out.is_empty()) {
        out.push(b'/');
    }
    out
}

/// The value of one hex digit of a percent escape.
fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn decode(input: &[u8], plus_is_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut index = 0;
    while let Some(&byte) = input.get(index) {
        match byte {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => {
                let decoded = input
                    .get(index + 1)
                    .and_then(|high| hex(*high))
                    .zip(input.get(index + 2).and_then(|low| hex(*low)));
                if let Some((high, low)) = decoded {
                    out.push(high << 4 | low);
                    index += 3;
                    continue;
                }
                out.push(b'%');
            }
            other => out.push(other),
        }
        index += 1;
    }
    out
}

/// Values of cookie `name` in one `cookie` header (`a=1; b=2`).
pub fn cookie_values<'h, 'n>(header: &'h [u8], name: &'n str) -> impl Iterator<Item = &'h [u8]> + use<'h, 'n> {
    header.split(|byte| *byte == b';').filter_map(move |crumb| {
        let crumb = crumb.trim_ascii();
        let eq = crumb.iter().position(|byte| *byte == b'=')?;
        let key = crumb.get(..eq)?;
        (key == name.as_bytes()).then(|| crumb.get(eq + 1..)).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_the_same_fingerprint_are_still_told_apart() {
        // Same length, first, middle and last byte: one fingerprint.
        assert_eq!(name_key(b"xaab"), name_key(b"xcab"));
        let pairs: HeaderPairs =
            [("xcab", "other"), ("xaab", "mine"), ("XAAB", "upper"), ("xaab", "again")].into_iter().collect();
        assert_eq!(pairs.first("xaab"), Some(&b"mine"[..]));
        assert_eq!(pairs.values("xaab").collect::<Vec<_>>(), [&b"mine"[..], b"again"]);
        assert_eq!(pairs.first("xcab"), Some(&b"other"[..]));
        assert_eq!(pairs.first("xbab"), None);
        assert_eq!(pairs.first(""), None);
        let decoded = HeaderPairs::decode(crate::host::encode_header_pairs(&[("", "empty"), ("xaab", "v")]));
        assert_eq!((decoded.first(""), decoded.first("xaab")), (Some(&b"empty"[..]), Some(&b"v"[..])));
    }

    #[test]
    fn rfc3986_6_2_2_spellings_of_one_path_normalize_alike() {
        for spelling in [
            &b"/p/items"[..],
            b"/p/%69tems",
            b"/p//items",
            b"/p/./items",
            b"/p/x/../items",
            b"/p/%2e/items",
            b"/q/%2E%2e/p/items",
        ] {
            assert_eq!(normalized_path(spelling), b"/p/items", "{}", String::from_utf8_lossy(spelling));
        }
        assert_eq!(normalized_path(b"/p/ITEMS"), b"/p/ITEMS", "case is significant in a path");
        assert_eq!(normalized_path(b"/a%2fb"), b"/a%2Fb", "a reserved escape stays one, hex upper-cased");
        assert_eq!(normalized_path(b"/a/.."), b"/");
        assert_eq!(normalized_path(b"/a/b/."), b"/a/b/");
        assert_eq!(normalized_path(b"/../../x"), b"/x");
        assert_eq!(normalized_path(b"/a/%zz"), b"/a/%zz", "an invalid escape is kept as written");
        assert_eq!(normalized_path(b"/"), b"/");
    }

    fn headers(pairs: &[(&str, &[u8])]) -> RequestHeaders {
        try_headers(pairs).unwrap()
    }

    fn try_headers(pairs: &[(&str, &[u8])]) -> Result<RequestHeaders, BadRequest> {
        RequestHeaders::from_pairs(pairs.iter().map(|(k, v)| (k.as_bytes(), *v)).collect::<HeaderPairs>())
            .map_err(|(reason, _)| reason)
    }

    #[test]
    fn path_query_and_cookies() {
        let request = headers(&[
            (":path", b"/orders/7?user=a%20b&x&user=c+d"),
            ("cookie", b"canary=1; session=abc"),
            ("cookie", b"theme=dark"),
        ]);
        assert_eq!(request.path(), "/orders/7");
        assert_eq!(request.query_values("user"), vec![b"a b".to_vec(), b"c d".to_vec()]);
        assert_eq!(request.query_values("x"), vec![Vec::<u8>::new()]);
        assert_eq!(request.cookie_values("canary"), vec![b"1".as_slice()]);
        assert_eq!(request.cookie_values("theme"), vec![b"dark".as_slice()]);
        assert!(request.cookie_values("missing").is_empty());
    }

    #[test]
    fn bad_input_never_panics() {
        assert_eq!(percent_decode(b"%"), b"%");
        assert_eq!(percent_decode(b"%4"), b"%4");
        assert_eq!(percent_decode(b"%zz%41"), b"%zzA");
        assert_eq!(percent_decode(b"a+b"), b"a b");
        assert_eq!(percent_decode_path(b"a+b%2B"), b"a+b+");
    }

    #[test]
    fn a_target_that_is_not_printable_ascii_is_refused_never_defaulted() {
        for bad in [&b"\xff/"[..], b"/ops/\xfe\xff", b"/a b", b"/a\x00", b"/\x7f", b"x", b"", b"/?q=\xff"] {
            assert_eq!(try_headers(&[(":path", bad)]), Err(BadRequest::InvalidPath), "{bad:?}");
        }
        assert_eq!(try_headers(&[(":method", b"GET")]), Err(BadRequest::MissingPath));
        assert_eq!(try_headers(&[(":path", b"/"), (":authority", b"a/b")]), Err(BadRequest::InvalidAuthority));
        assert_eq!(try_headers(&[(":path", b"/"), ("host", b"a\xff")]), Err(BadRequest::InvalidAuthority));
        let request = headers(&[(":path", b"/ops/%FF?a=%fe"), (":authority", b"api.example.com:8443")]);
        assert_eq!(request.path(), "/ops/%FF");
        assert_eq!(request.query_values("a"), vec![vec![0xfe]]);
        assert!(headers(&[(":path", b"*")]).path() == "*");
    }

    #[test]
    fn escaped_bytes_are_injective_and_invertible() {
        let samples: [&[u8]; 6] = [b"\xff", b"\xfe", b"%FF", b"%25FF", b"a b", b""];
        let escaped: Vec<String> = samples.iter().map(|s| escape_bytes(s)).collect();
        for (i, a) in escaped.iter().enumerate() {
            assert_eq!(unescape_bytes(a), samples[i]);
            for b in &escaped[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
