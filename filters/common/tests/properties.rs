//! Property tests of the request view and the header writer on random bytes:
//! no panic, nothing with control bytes passes the writer, and two different
//! raw inputs are never treated as the same path, key or selector.

use gateway_common::field::{auth_param_text, is_field_value};
use gateway_common::matcher::StringMatchSpec;
use gateway_common::request::{check_target, escape_bytes, unescape_bytes, RequestHeaders};
use proptest::collection::vec;
use proptest::prelude::*;

/// Header names the modules read, with random bytes as values.
const READ_NAMES: &[&str] = &[
    ":path",
    ":method",
    ":authority",
    "host",
    "cookie",
    "authorization",
    "x-forwarded-for",
    "x-forwarded-proto",
    "content-type",
    "x-request-id",
    "x-user",
    "vary",
];

fn header_map() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    vec((prop::sample::select(READ_NAMES), vec(any::<u8>(), 0..40)), 0..12)
        .prop_map(|pairs| pairs.into_iter().map(|(name, value)| (name.as_bytes().to_vec(), value)).collect())
}

proptest! {
    #[test]
    fn the_request_view_never_panics_and_keeps_only_ascii_targets(pairs in header_map()) {
        if let Ok(request) = RequestHeaders::from_pairs(pairs.clone()) {
            let raw_path = pairs.iter().find(|(name, _)| name == b":path").map(|(_, value)| value.clone()).unwrap();
            prop_assert_eq!(request.target().as_bytes(), raw_path.as_slice());
            prop_assert!(request.path().bytes().all(|b| (0x21..=0x7e).contains(&b)));
            let _ = request.query_values("x");
            let _ = request.cookie_values("session");
            let _ = request.authority();
        }
    }

    #[test]
    fn distinct_raw_paths_are_distinct_paths_or_refused(a in vec(any::<u8>(), 1..24), b in vec(any::<u8>(), 1..24)) {
        let view = |path: &[u8]| RequestHeaders::from_pairs(vec![(b":path".to_vec(), path.to_vec())]).ok();
        if let (Some(first), Some(second)) = (view(&a), view(&b)) {
            prop_assert_eq!(first.target() == second.target(), a == b);
        }
        // A target that is refused is never turned into another one.
        if check_target(&a).is_err() {
            prop_assert!(view(&a).is_none());
        }
    }

    #[test]
    fn nothing_with_control_bytes_passes_the_writer(value in vec(any::<u8>(), 0..64)) {
        if is_field_value(&value) {
            prop_assert!(value.iter().all(|b| (0x20..=0x7e).contains(b) || *b == b'\t'));
            prop_assert!(!value.contains(&b'\r') && !value.contains(&b'\n') && !value.contains(&0));
        }
    }

    #[test]
    fn escaped_text_is_always_a_safe_quoted_value(text in ".*") {
        let escaped = auth_param_text(&text);
        prop_assert!(escaped.bytes().all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5b | 0x5d..=0x7e)));
    }

    #[test]
    fn escape_bytes_is_injective(a in vec(any::<u8>(), 0..32), b in vec(any::<u8>(), 0..32)) {
        prop_assert_eq!(unescape_bytes(&escape_bytes(&a)), a.clone());
        prop_assert_eq!(escape_bytes(&a) == escape_bytes(&b), a == b);
    }

    #[test]
    fn string_conditions_never_merge_distinct_bytes(a in vec(any::<u8>(), 0..16), b in vec(any::<u8>(), 0..16)) {
        // An exact condition on `a` (when it is text) matches `b` only if b == a,
        // and a regex never matches bytes that are not UTF-8.
        if let Ok(text) = std::str::from_utf8(&a) {
            let spec = StringMatchSpec { exact: Some(text.to_string()), ..Default::default() };
            let matcher = spec.compile("x", &mut Default::default()).unwrap();
            prop_assert_eq!(matcher.matches([b.as_slice()]), a == b);
        }
        let any_text = StringMatchSpec { regex: Some("(?s).*".into()), ..Default::default() };
        let matcher = any_text.compile("x", &mut Default::default()).unwrap();
        prop_assert_eq!(matcher.matches([b.as_slice()]), std::str::from_utf8(&b).is_ok());
    }
}
