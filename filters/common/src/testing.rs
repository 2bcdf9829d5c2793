//! Test support for the filter crates' unit tests (feature `testing`, enabled
//! only by their dev-dependencies; never part of a module).

use crate::request::RequestHeaders;

/// A request view from header pairs; `:path` defaults to `/`. Panics when the
/// target is refused: tests of refused targets build the view themselves.
pub fn request(pairs: &[(&str, &[u8])]) -> RequestHeaders {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = pairs.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())).collect();
    if !pairs.iter().any(|(name, _)| name == b":path") {
        pairs.push((b":path".to_vec(), b"/".to_vec()));
    }
    match RequestHeaders::from_pairs(pairs) {
        Ok(request) => request,
        Err((reason, _)) => panic!("test request refused: {reason:?}"),
    }
}

/// [`request`] from text values.
pub fn request_text(pairs: &[(&str, &str)]) -> RequestHeaders {
    request(&pairs.iter().map(|(name, value)| (*name, value.as_bytes())).collect::<Vec<_>>())
}
