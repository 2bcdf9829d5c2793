//! Query-string edits on forwarded requests (`query`: remove, rename, set, add,
//! in that order). Parameters the edits do not name are kept byte for byte;
//! names are compared percent-decoded, so `%61dmin` is the `admin` parameter a
//! route removes, and every name and value a route writes is percent-encoded.

use gateway_common::field::percent_escape;
use gateway_common::request::percent_decode;

/// A route's query edits (compiled from `query`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueryEdits {
    pub remove: Vec<String>,
    pub rename: Vec<(String, String)>,
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
}

impl QueryEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.rename.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// The request target with the edits applied (`target`: path and query).
    pub fn apply(&self, target: &str) -> String {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut params: Vec<String> =
            if query.is_empty() { Vec::new() } else { query.split('&').map(str::to_string).collect() };
        let named = |param: &str, wanted: &str| percent_decode(name_of(param).as_bytes()) == wanted.as_bytes();
        params.retain(|param| {
            !self.remove.iter().any(|name| named(param, name)) && !self.set.iter().any(|(name, _)| named(param, name))
        });
        for param in &mut params {
            if let Some((_, new)) = self.rename.iter().find(|(old, _)| named(param, old)) {
                let rest = param.get(name_of(param).len()..).unwrap_or_default();
                *param = format!("{}{rest}", encode(new));
            }
        }
        for (name, value) in self.set.iter().chain(&self.add) {
            params.push(format!("{}={}", encode(name), encode(value)));
        }
        if params.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", params.join("&"))
        }
    }
}

/// The name part of `name=value` (all of it without `=`).
fn name_of(param: &str) -> &str {
    param.split_once('=').map_or(param, |(name, _)| name)
}

/// RFC 3986 query text for a literal: unreserved characters and the sub-delims
/// that mean nothing to a query parser stay, everything else (`&`, `=`, `+`, `#`,
/// `%`, spaces, controls, non-ASCII) becomes `%XX`.
fn encode(text: &str) -> String {
    percent_escape(text.as_bytes(), |byte| byte.is_ascii_alphanumeric() || b"-._~!$'()*,;:@/".contains(&byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edits() -> QueryEdits {
        QueryEdits {
            remove: vec!["debug".into()],
            rename: vec![("q".into(), "search".into())],
            set: vec![("version".into(), "2".into())],
            add: vec![("via".into(), "gateway & co".into())],
        }
    }

    #[test]
    fn edits_apply_in_order_and_keep_the_rest_byte_for_byte() {
        assert_eq!(
            edits().apply("/items?q=a%20b&debug=1&keep=%FF%00&version=1&debug"),
            "/items?search=a%20b&keep=%FF%00&version=2&via=gateway%20%26%20co"
        );
        assert_eq!(edits().apply("/items"), "/items?version=2&via=gateway%20%26%20co");
        let remove_only = QueryEdits { remove: vec!["debug".into()], ..QueryEdits::default() };
        assert_eq!(remove_only.apply("/x?debug=1"), "/x", "no empty `?` left behind");
        assert_eq!(remove_only.apply("/x?a=1&&b"), "/x?a=1&&b", "untouched pieces stay as they were");
    }

    #[test]
    fn names_are_compared_decoded_so_re_spellings_are_removed_too() {
        let remove = QueryEdits { remove: vec!["admin".into()], ..QueryEdits::default() };
        assert_eq!(remove.apply("/x?%61dmin=true&ADMIN=1&a=1"), "/x?ADMIN=1&a=1", "names are case-sensitive");
        assert_eq!(remove.apply("/x?admin"), "/x");
    }
}
