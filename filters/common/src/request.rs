//! A per-request view of the request headers, read from the host once
//! (every host call copies into the VM), plus query and cookie parsing.

use crate::host::{self, HostResult, MapType};

/// The request headers as the host handed them over (names lower-case).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHeaders {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RequestHeaders {
    /// Reads all request headers in one host call.
    pub fn read() -> HostResult<Self> {
        Ok(Self { pairs: host::headers(MapType::HttpRequestHeaders)? })
    }

    pub fn from_pairs(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        Self { pairs }
    }

    /// Every value of a header, in order (a repeated header yields several).
    pub fn values<'s, 'n>(&'s self, name: &'n str) -> impl Iterator<Item = &'s [u8]> + use<'s, 'n> {
        self.pairs.iter().filter(move |(key, _)| key.as_slice() == name.as_bytes()).map(|(_, value)| value.as_slice())
    }

    pub fn first(&self, name: &str) -> Option<&[u8]> {
        self.values(name).next()
    }

    pub fn count(&self, name: &str) -> usize {
        self.values(name).count()
    }

    /// `:path` without its query string (`/` when missing or not UTF-8 safe).
    pub fn path(&self) -> &str {
        let full = self.first(":path").and_then(|path| std::str::from_utf8(path).ok()).unwrap_or("/");
        full.split_once('?').map_or(full, |(path, _)| path)
    }

    /// The raw query string after `?`, if any.
    pub fn query(&self) -> Option<&[u8]> {
        let path = self.first(":path")?;
        let at = path.iter().position(|byte| *byte == b'?')?;
        path.get(at + 1..)
    }

    pub fn method(&self) -> &[u8] {
        self.first(":method").unwrap_or_default()
    }

    pub fn authority(&self) -> &[u8] {
        self.first(":authority").or_else(|| self.first("host")).unwrap_or_default()
    }

    /// The same headers with another `:path` (e.g. a `Location` target).
    pub fn with_path(&self, path: &[u8]) -> RequestHeaders {
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> =
            self.pairs.iter().filter(|(name, _)| name.as_slice() != b":path").cloned().collect();
        pairs.push((b":path".to_vec(), path.to_vec()));
        RequestHeaders { pairs }
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

pub fn percent_decode(input: &[u8]) -> Vec<u8> {
    fn hex(byte: u8) -> Option<u8> {
        match byte {
            b'0'..=b'9' => Some(byte - b'0'),
            b'a'..=b'f' => Some(byte - b'a' + 10),
            b'A'..=b'F' => Some(byte - b'A' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(input.len());
    let mut index = 0;
    while let Some(&byte) = input.get(index) {
        match byte {
            b'+' => out.push(b' '),
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
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> RequestHeaders {
        RequestHeaders::from_pairs(pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())).collect())
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
        let request = headers(&[(":path", b"\xff/?\xff=\xfe")]);
        assert_eq!(request.path(), "/");
        assert_eq!(request.query_values("a").len(), 0);
    }
}
