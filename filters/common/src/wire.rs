//! A compact binary encoding for values kept in shared data: fixed-width
//! little-endian integers and length-prefixed byte strings. Decoding never
//! panics: a short or malformed value reads as `None`.

#[derive(Default)]
pub struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    pub fn with_capacity(capacity: usize) -> Self {
        Self { bytes: Vec::with_capacity(capacity) }
    }

    pub fn u8(&mut self, value: u8) -> &mut Self {
        self.bytes.push(value);
        self
    }

    pub fn u16(&mut self, value: u16) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn u32(&mut self, value: u32) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.bytes.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// A byte string of up to 4 GiB, prefixed with its length (u32).
    pub fn bytes(&mut self, value: &[u8]) -> &mut Self {
        self.u32(u32::try_from(value.len()).unwrap_or(u32::MAX));
        self.bytes.extend_from_slice(value.get(..u32::MAX as usize).unwrap_or(value));
        self
    }

    /// An optional u64: a presence byte, then the value.
    pub fn option_u64(&mut self, value: Option<u64>) -> &mut Self {
        match value {
            Some(value) => self.u8(1).u64(value),
            None => self.u8(0),
        }
    }

    /// An optional byte string: a presence byte, then the string.
    pub fn option_bytes(&mut self, value: Option<&[u8]>) -> &mut Self {
        match value {
            Some(value) => self.u8(1).bytes(value),
            None => self.u8(0),
        }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.rest.split_at_checked(count)?;
        self.rest = rest;
        Some(taken)
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let length = usize::try_from(self.u32()?).ok()?;
        self.take(length)
    }

    /// A byte string that must be UTF-8 text.
    pub fn text(&mut self) -> Option<String> {
        std::str::from_utf8(self.bytes()?).ok().map(str::to_string)
    }

    pub fn option_u64(&mut self) -> Option<Option<u64>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.u64()?)),
            _ => None,
        }
    }

    pub fn option_text(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.text()?)),
            _ => None,
        }
    }

    /// How many bytes are left to read (`len - remaining` is the position).
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Whether every byte was read (trailing bytes mean a foreign value).
    pub fn is_done(&self) -> bool {
        self.rest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_short_input_is_none() {
        let mut writer = Writer::default();
        writer.u8(2).u16(513).u32(7).u64(u64::MAX).bytes(b"key").option_u64(Some(9)).option_bytes(None);
        let encoded = writer.finish();
        let mut reader = Reader::new(&encoded);
        assert_eq!(reader.u8(), Some(2));
        assert_eq!(reader.u16(), Some(513));
        assert_eq!(reader.u32(), Some(7));
        assert_eq!(reader.u64(), Some(u64::MAX));
        assert_eq!(reader.bytes(), Some(&b"key"[..]));
        assert_eq!(reader.option_u64(), Some(Some(9)));
        assert_eq!(reader.option_text(), Some(None));
        assert!(reader.is_done());
        for cut in 0..encoded.len() {
            let mut short = Reader::new(&encoded[..cut]);
            let whole = short.u8().is_some()
                && short.u16().is_some()
                && short.u32().is_some()
                && short.u64().is_some()
                && short.bytes().is_some()
                && short.option_u64().is_some()
                && short.option_text().is_some();
            assert!(!whole, "a value cut at {cut} must not decode");
        }
        assert_eq!(Reader::new(&[0xff, 0xff, 0xff, 0xff]).bytes(), None, "a length past the end");
    }
}
