//! What may be written into a header, a local reply or a property.
//!
//! Every header value, local-reply header and property value the modules write
//! passes through `host.rs`, which checks it here first: a value that is not a
//! valid field value is not written (the header is skipped, the property left
//! unset), and counted in `<module>.header_values_skipped`. Envoy does not
//! sanitize what a Wasm module writes: a CR/LF in a local-reply header reaches an
//! HTTP/1.1 client as a separate header line, and control bytes in a forwarded
//! header make Envoy answer 503.

use std::cell::Cell;

/// RFC 9110 §5.5 `field-value` as we send it: visible ASCII, with spaces and tabs
/// only between visible characters. No CTL (CR, LF, NUL...), no DEL, and no
/// obs-text (0x80-0xFF): RFC 9110 lets recipients treat that as opaque, and a
/// sender should not generate it.
pub fn is_field_value(value: &[u8]) -> bool {
    let visible = |byte: &u8| (0x21..=0x7e).contains(byte);
    value.iter().all(|byte| visible(byte) || *byte == b' ' || *byte == b'\t')
        && value.first().is_none_or(visible)
        && value.last().is_none_or(visible)
}

/// Whether a header may be written: a valid name and a valid value. `host.rs`
/// and `FakeHost` both apply exactly this.
pub fn is_writable(name: &str, value: &[u8]) -> bool {
    is_header_name(name) && is_field_value(value)
}

/// RFC 9110 `token` (header names), lower-case as HTTP/2 requires; or a
/// pseudo-header (`:path`).
pub fn is_header_name(name: &str) -> bool {
    let body = name.strip_prefix(':').unwrap_or(name);
    !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Text for a quoted auth-param such as `error_description` (RFC 6750 §3:
/// `%x20-21 / %x23-5B / %x5D-7E`). Every other byte, and `%` itself, becomes
/// `%XX`, so text from a token (attacker-controlled before its signature is
/// checked) can never end the quoted string or the header.
pub fn auth_param_text(text: &str) -> String {
    percent_escape(text.as_bytes(), |byte| matches!(byte, 0x20..=0x21 | 0x23..=0x5b | 0x5d..=0x7e))
}

/// Keeps the bytes `keep` allows (never `%`), writes every other byte as `%XX`:
/// reversible, so two different inputs never give the same text.
pub fn percent_escape(bytes: &[u8], keep: impl Fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    percent_escape_into(&mut out, bytes, keep);
    out
}

/// [`percent_escape`] appended to `out` (no allocation of its own).
pub fn percent_escape_into(out: &mut String, bytes: &[u8], keep: impl Fn(u8) -> bool) {
    for &byte in bytes {
        if keep(byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(hex_digit(byte >> 4));
            out.push(hex_digit(byte & 0xf));
        }
    }
}

/// The upper-case hex digit of a nibble (0..=15).
fn hex_digit(nibble: u8) -> char {
    char::from(if nibble < 10 { b'0' + nibble } else { b'A' + nibble - 10 })
}

thread_local! {
    /// The `<module>.header_values_skipped` counter of this VM (set at configure time).
    static SKIPPED_METRIC: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Names the counter that skipped values are added to (one per module and VM).
pub fn count_skipped_in(metric_id: Option<u32>) {
    SKIPPED_METRIC.with(|cell| cell.set(metric_id));
}

/// Counts one value that was not written (by `host.rs`).
pub fn skipped() {
    skipped_on(&crate::platform::Ffi);
}

/// Counts one value that was not written, on any host.
pub fn skipped_on(host: &impl crate::platform::Host) {
    if let Some(id) = SKIPPED_METRIC.with(Cell::get) {
        let _ = host.increment_metric(id, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_values_exclude_controls_del_and_non_ascii() {
        assert!(is_field_value(b"Bearer realm=\"x\""));
        assert!(is_field_value(b""));
        assert!(is_field_value(b"a\tb c"));
        for bad in [&b"a\r\nb"[..], b"a\nb", b"a\0b", b"a\x7fb", b"caf\xc3\xa9", b" a", b"a ", b"\x01"] {
            assert!(!is_field_value(bad), "{bad:?}");
        }
    }

    #[test]
    fn auth_param_text_keeps_only_the_rfc_6750_charset() {
        assert_eq!(auth_param_text("token expired"), "token expired");
        let hostile = "kid \"x\"\r\nSet-Cookie: a=b\\\u{0}\u{7f}é%";
        let escaped = auth_param_text(hostile);
        assert_eq!(escaped, "kid %22x%22%0D%0ASet-Cookie: a=b%5C%00%7F%C3%A9%25");
        assert!(escaped.bytes().all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5b | 0x5d..=0x7e)));
    }

    #[test]
    fn header_names_are_lower_case_tokens() {
        assert!(is_header_name("x-user"));
        assert!(is_header_name(":path"));
        for bad in ["", "X-User", "a b", "a:b", "a\r\n", ":", "é"] {
            assert!(!is_header_name(bad), "{bad:?}");
        }
    }
}
