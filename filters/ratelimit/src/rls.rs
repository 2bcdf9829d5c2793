//! Envoy's rate-limit service protocol (`envoy.service.ratelimit.v3`), the one
//! call this module makes: `RateLimitService/ShouldRateLimit`. Only the fields we
//! send and read, encoded and decoded by hand (protobuf wire format): a request
//! is a few strings, and a response from outside is decoded defensively (unknown
//! fields skipped, any malformed byte an error, never a panic).

use std::time::Duration;

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// One descriptor: ordered `(key, value)` entries, and its own hits when they
/// are not the request's one (`RateLimitDescriptor.hits_addend`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    pub entries: Vec<(String, String)>,
    pub hits_addend: Option<u64>,
}

/// `RateLimitRequest { domain = 1, descriptors = 2, hits_addend = 3 }`, each
/// descriptor `{ entries = 1, hits_addend = 3 (UInt64Value { value = 1 }) }`,
/// each entry `{ key = 1, value = 2 }`.
pub fn encode_request(domain: &str, descriptors: &[Descriptor], hits_addend: u32) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, 1, domain.as_bytes());
    for descriptor in descriptors {
        let mut encoded = Vec::new();
        for (key, value) in &descriptor.entries {
            let mut entry = Vec::new();
            put_bytes(&mut entry, 1, key.as_bytes());
            put_bytes(&mut entry, 2, value.as_bytes());
            put_bytes(&mut encoded, 1, &entry);
        }
        if let Some(hits) = descriptor.hits_addend {
            let mut wrapper = Vec::new();
            put_varint(&mut wrapper, 1 << 3, hits);
            put_bytes(&mut encoded, 3, &wrapper);
        }
        put_bytes(&mut out, 2, &encoded);
    }
    if hits_addend != 0 {
        put_varint(&mut out, 3 << 3, u64::from(hits_addend));
    }
    out
}

/// A descriptor entry value for any bytes: printable ASCII except `%` as is,
/// every other byte `%XX`. Protobuf strings must be UTF-8 (a service refuses a
/// request with a raw `\xff`), and the escape is reversible, so two different
/// client values never become one descriptor.
pub fn entry_value(bytes: &[u8]) -> String {
    gateway_common::field::percent_escape(bytes, |byte| (0x20..=0x7e).contains(&byte))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Code {
    #[default]
    Unknown,
    Ok,
    OverLimit,
}

impl Code {
    fn from_wire(value: u64) -> Self {
        match value {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        }
    }
}

/// `DescriptorStatus.current_limit`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CurrentLimit {
    pub name: String,
    pub requests_per_unit: u32,
    /// The unit in seconds; `None` for UNKNOWN or a value we do not know.
    pub unit_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescriptorStatus {
    pub code: Code,
    pub current_limit: Option<CurrentLimit>,
    pub limit_remaining: u32,
    pub duration_until_reset: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Response {
    pub overall_code: Code,
    pub statuses: Vec<DescriptorStatus>,
    /// Raw `(key, value)` pairs as the service sent them; checked before use.
    pub response_headers_to_add: Vec<(Vec<u8>, Vec<u8>)>,
    pub request_headers_to_add: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError;

/// `RateLimitResponse { overall_code = 1, statuses = 2, response_headers_to_add
/// = 3, request_headers_to_add = 4 }`; the other fields are skipped.
pub fn decode_response(bytes: &[u8]) -> Result<Response, DecodeError> {
    let mut response = Response::default();
    for field in Fields(bytes) {
        match field? {
            (1, Value::Varint(code)) => response.overall_code = Code::from_wire(code),
            (2, Value::Bytes(status)) => response.statuses.push(decode_status(status)?),
            (3, Value::Bytes(header)) => response.response_headers_to_add.push(decode_header(header)?),
            (4, Value::Bytes(header)) => response.request_headers_to_add.push(decode_header(header)?),
            (1..=4, _) => return Err(DecodeError),
            _ => {}
        }
    }
    Ok(response)
}

/// `DescriptorStatus { code = 1, current_limit = 2, limit_remaining = 3,
/// duration_until_reset = 4 }`.
fn decode_status(bytes: &[u8]) -> Result<DescriptorStatus, DecodeError> {
    let mut status = DescriptorStatus::default();
    for field in Fields(bytes) {
        match field? {
            (1, Value::Varint(code)) => status.code = Code::from_wire(code),
            (2, Value::Bytes(limit)) => status.current_limit = Some(decode_limit(limit)?),
            (3, Value::Varint(remaining)) => status.limit_remaining = u32::try_from(remaining).unwrap_or(u32::MAX),
            (4, Value::Bytes(duration)) => status.duration_until_reset = Some(decode_duration(duration)?),
            (1..=4, _) => return Err(DecodeError),
            _ => {}
        }
    }
    Ok(status)
}

/// `RateLimit { requests_per_unit = 1, unit = 2, name = 3 }`.
fn decode_limit(bytes: &[u8]) -> Result<CurrentLimit, DecodeError> {
    let mut limit = CurrentLimit::default();
    for field in Fields(bytes) {
        match field? {
            (1, Value::Varint(requests)) => limit.requests_per_unit = u32::try_from(requests).unwrap_or(u32::MAX),
            (2, Value::Varint(unit)) => limit.unit_seconds = unit_seconds(unit),
            (3, Value::Bytes(name)) => limit.name = String::from_utf8(name.to_vec()).map_err(|_| DecodeError)?,
            (1..=3, _) => return Err(DecodeError),
            _ => {}
        }
    }
    Ok(limit)
}

/// `RateLimit.Unit`: SECOND = 1, MINUTE = 2, HOUR = 3, DAY = 4, MONTH = 5,
/// YEAR = 6, WEEK = 7 (a month is 30 days, a year 365, as envoyproxy/ratelimit
/// counts them).
fn unit_seconds(unit: u64) -> Option<u64> {
    match unit {
        1 => Some(1),
        2 => Some(60),
        3 => Some(3_600),
        4 => Some(86_400),
        5 => Some(30 * 86_400),
        6 => Some(365 * 86_400),
        7 => Some(7 * 86_400),
        _ => None,
    }
}

/// `google.protobuf.Duration { seconds = 1, nanos = 2 }`; negative is an error.
fn decode_duration(bytes: &[u8]) -> Result<Duration, DecodeError> {
    let (mut seconds, mut nanos) = (0i64, 0i64);
    for field in Fields(bytes) {
        match field? {
            // int64 and int32 are two's complement in a varint.
            (1, Value::Varint(value)) => seconds = value as i64,
            (2, Value::Varint(value)) => nanos = value as i64,
            (1..=2, _) => return Err(DecodeError),
            _ => {}
        }
    }
    let seconds = u64::try_from(seconds).map_err(|_| DecodeError)?;
    let nanos = u32::try_from(nanos).ok().filter(|nanos| *nanos < 1_000_000_000).ok_or(DecodeError)?;
    Ok(Duration::new(seconds, nanos))
}

/// `config.core.v3.HeaderValue { key = 1, value = 2, raw_value = 3 }`.
fn decode_header(bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), DecodeError> {
    let (mut key, mut value, mut raw_value) = (Vec::new(), Vec::new(), Vec::new());
    for field in Fields(bytes) {
        match field? {
            (1, Value::Bytes(bytes)) => key = bytes.to_vec(),
            (2, Value::Bytes(bytes)) => value = bytes.to_vec(),
            (3, Value::Bytes(bytes)) => raw_value = bytes.to_vec(),
            (1..=3, _) => return Err(DecodeError),
            _ => {}
        }
    }
    Ok((key, if value.is_empty() { raw_value } else { value }))
}

// ---- protobuf wire format ------------------------------------------------------

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of one message, in order: `(number, value)`, or an error at the
/// first malformed byte (after which iteration stops).
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let field = self.read_field();
        if field.is_err() {
            self.0 = &[];
        }
        Some(field)
    }
}

impl<'a> Fields<'a> {
    fn read_field(&mut self) -> Result<(u64, Value<'a>), DecodeError> {
        let tag = self.varint()?;
        let number = tag >> 3;
        if number == 0 {
            return Err(DecodeError);
        }
        let value = match tag & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.skip(8)?;
                Value::Fixed
            }
            2 => {
                let length = usize::try_from(self.varint()?).map_err(|_| DecodeError)?;
                Value::Bytes(self.skip(length)?)
            }
            5 => {
                self.skip(4)?;
                Value::Fixed
            }
            // Groups (3, 4) are not used by these messages; 6 and 7 do not exist.
            _ => return Err(DecodeError),
        };
        Ok((number, value))
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first().ok_or(DecodeError)?;
            self.0 = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError)
    }

    fn skip(&mut self, length: usize) -> Result<&'a [u8], DecodeError> {
        if length > self.0.len() {
            return Err(DecodeError);
        }
        let (taken, rest) = self.0.split_at(length);
        self.0 = rest;
        Ok(taken)
    }
}

fn put_varint(out: &mut Vec<u8>, tag: u64, value: u64) {
    write_varint(out, tag);
    write_varint(out, value);
}

fn put_bytes(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
    write_varint(out, (number << 3) | 2);
    write_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_encodes_as_protobuf_does() {
        let descriptors =
            [Descriptor { entries: vec![("rule".into(), "r".into()), ("k".into(), "v".into())], hits_addend: None }];
        let encoded = encode_request("gw", &descriptors, 3);
        // Reference bytes: domain "gw"; one descriptor with entries {rule: r}, {k: v}; hits_addend 3.
        let expected: &[u8] = &[
            0x0a, 2, b'g', b'w', //
            0x12, 19, //
            0x0a, 9, 0x0a, 4, b'r', b'u', b'l', b'e', 0x12, 1, b'r', //
            0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', //
            0x18, 3,
        ];
        assert_eq!(encoded, expected);
    }

    #[test]
    fn a_descriptor_carries_its_own_hits() {
        let descriptor = Descriptor { entries: vec![("k".into(), "v".into())], hits_addend: Some(300) };
        let encoded = encode_request("d", &[descriptor], 0);
        // descriptor: entry (8 bytes), then field 3 = UInt64Value { value = 300 } (0x08, 0xac 0x02).
        let expected: &[u8] =
            &[0x0a, 1, b'd', 0x12, 13, 0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', 0x1a, 3, 0x08, 0xac, 0x02];
        assert_eq!(encoded, expected);
    }

    #[test]
    fn entry_values_escape_reversibly() {
        assert_eq!(entry_value(b"alice"), "alice");
        assert_eq!(entry_value(b"a b"), "a b");
        assert_eq!(entry_value(b"\xff"), "%FF");
        assert_eq!(entry_value(b"%FF"), "%25FF", "a literal %FF is not the byte 0xff");
        assert_eq!(entry_value(b"a\r\nb"), "a%0D%0Ab");
        assert_eq!(entry_value("josé".as_bytes()), "jos%C3%A9");
    }

    fn status_bytes(code: u8, requests: u8, unit: u8, remaining: u8, reset_seconds: u8) -> Vec<u8> {
        let mut limit = vec![0x08, requests, 0x10, unit];
        put_bytes(&mut limit, 3, b"per-minute");
        let mut status = vec![0x08, code];
        put_bytes(&mut status, 2, &limit);
        status.extend_from_slice(&[0x18, remaining]);
        put_bytes(&mut status, 4, &[0x08, reset_seconds, 0x10, 5]);
        status
    }

    #[test]
    fn a_response_decodes_with_statuses_and_headers() {
        let mut bytes = vec![0x08, 2];
        put_bytes(&mut bytes, 2, &status_bytes(2, 10, 2, 0, 42));
        let mut header = Vec::new();
        put_bytes(&mut header, 1, b"x-rls");
        put_bytes(&mut header, 2, b"yes");
        put_bytes(&mut bytes, 3, &header);
        // An unknown field (raw_body = 5) and a fixed64 field (99) are skipped.
        put_bytes(&mut bytes, 5, b"ignored");
        bytes.extend_from_slice(&[0x99, 0x06, 1, 2, 3, 4, 5, 6, 7, 8]);
        let response = decode_response(&bytes).unwrap();
        assert_eq!(response.overall_code, Code::OverLimit);
        let status = &response.statuses[0];
        assert_eq!(status.code, Code::OverLimit);
        assert_eq!(
            status.current_limit,
            Some(CurrentLimit { name: "per-minute".into(), requests_per_unit: 10, unit_seconds: Some(60) })
        );
        assert_eq!(status.limit_remaining, 0);
        assert_eq!(status.duration_until_reset, Some(Duration::new(42, 5)));
        assert_eq!(response.response_headers_to_add, vec![(b"x-rls".to_vec(), b"yes".to_vec())]);
    }

    #[test]
    fn malformed_responses_are_errors() {
        let cases: [&[u8]; 7] = [
            &[0x08],                                                                   // a varint cut short
            &[0x12, 5, 1],                                                             // a length beyond the message
            &[0x0b],                                                                   // a group
            &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], // an 11-byte varint
            &[0x0a, 1, 0],                                                             // overall_code as bytes
            &[0x00, 1],                                                                // field number 0
            &[0x12, 4, 0x22, 2, 0x08, 0x7f], // valid: a status resetting in 127 s, nanos left out
        ];
        for (index, bytes) in cases.iter().enumerate().take(6) {
            assert_eq!(decode_response(bytes), Err(DecodeError), "case {index}");
        }
        assert!(decode_response(cases[6]).is_ok());
        // A negative duration (int64 -1 is ten bytes of 0xff..0x01).
        let mut status = Vec::new();
        put_bytes(&mut status, 4, &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        let mut bytes = Vec::new();
        put_bytes(&mut bytes, 2, &status);
        assert_eq!(decode_response(&bytes), Err(DecodeError));
        assert_eq!(decode_response(&[]), Ok(Response::default()), "an empty message is all defaults");
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = decode_response(&bytes);
        }
    }
}
