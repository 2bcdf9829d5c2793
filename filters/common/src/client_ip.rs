//! The client's address, derived one way for every module (rate-limit keys and
//! the `client_ip` match condition), and CIDR lists to match it against.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Deserialize;

use crate::config::ConfigErrors;
use crate::platform::Host;
use crate::request::RequestHeaders;

/// At most this many trusted proxies: more is a configuration mistake.
const MAX_TRUSTED_HOPS: u32 = 16;

/// Where the client's address comes from (a module's top-level `client_ip`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientIpSpec {
    /// 0: the peer address of the connection. N > 0: the N+1-th address from the
    /// right of `x-forwarded-for` (N trusted proxies in front of Envoy).
    #[serde(default)]
    pub trusted_hops: u32,
}

impl ClientIpSpec {
    pub fn check(&self, field: &str, errors: &mut ConfigErrors) {
        if self.trusted_hops > MAX_TRUSTED_HOPS {
            errors.add(format!("{field}.trusted_hops"), format!("must be at most {MAX_TRUSTED_HOPS}"));
        }
    }

    /// Derives the client address of this request (one property read,
    /// `source.address`), sets it on `request` for `client_ip` conditions, and
    /// returns it as text without a port (e.g. for a rate-limit key).
    pub fn derive_into(&self, host: &impl Host, request: &mut RequestHeaders) -> Option<Vec<u8>> {
        let peer = host.property(&["source", "address"]).ok().flatten();
        let text = client_ip(peer.as_deref(), request.first("x-forwarded-for"), self.trusted_hops);
        request.set_client_ip(text.as_deref().and_then(parse_ip));
        text
    }
}

/// The client address: the peer, or with `trusted_hops` N > 0 the N+1-th entry from
/// the right of `x-forwarded-for` (the peer when there are fewer entries).
pub fn client_ip(peer: Option<&[u8]>, forwarded_for: Option<&[u8]>, trusted_hops: u32) -> Option<Vec<u8>> {
    let peer = peer.map(strip_port);
    if trusted_hops == 0 {
        return peer;
    }
    let entries: Vec<&[u8]> = forwarded_for
        .map(|value| value.split(|byte| *byte == b',').map(<[u8]>::trim_ascii).collect())
        .unwrap_or_default();
    let hops = usize::try_from(trusted_hops).unwrap_or(usize::MAX);
    match entries.len().checked_sub(hops.saturating_add(1)).and_then(|index| entries.get(index)) {
        // A forwarded entry may carry a port (`1.2.3.4:5678`, `[2001:db8::1]:443`):
        // the client is the address, not each of its source ports.
        Some(entry) if !entry.is_empty() => Some(strip_port(entry)),
        _ => peer,
    }
}

/// `1.2.3.4:5678` -> `1.2.3.4`, `[::1]:80` -> `::1`.
fn strip_port(address: &[u8]) -> Vec<u8> {
    if let Some(rest) = address.strip_prefix(b"[") {
        if let Some(end) = rest.iter().position(|byte| *byte == b']') {
            return rest.get(..end).unwrap_or(rest).to_vec();
        }
    }
    let colons = address.iter().filter(|byte| **byte == b':').count();
    match address.iter().rposition(|byte| *byte == b':') {
        Some(colon) if colons == 1 => address.get(..colon).unwrap_or(address).to_vec(),
        _ => address.to_vec(),
    }
}

/// An address as [`client_ip`] gives it, parsed; an IPv4-mapped IPv6 address
/// (`::ffff:192.0.2.1`, from a dual-stack listener) is its IPv4 address. `None`
/// when the text is no IP address (the address cannot be known).
pub fn parse_ip(text: &[u8]) -> Option<IpAddr> {
    let ip: IpAddr = std::str::from_utf8(text).ok()?.parse().ok()?;
    Some(ip.to_canonical())
}

/// IPv4 and IPv6 ranges (`10.0.0.0/8`, `2001:db8::/32`, or single addresses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl CidrList {
    /// Compiles `entries`; every bad entry is reported at `field[index]`.
    pub fn compile(entries: &[String], field: &str, errors: &mut ConfigErrors) -> Option<Self> {
        if entries.is_empty() {
            errors.add(field, "must list at least one address or CIDR range");
            return None;
        }
        let mut list = CidrList::default();
        let mut ok = true;
        for (index, entry) in entries.iter().enumerate() {
            match parse_cidr(entry) {
                Ok(IpRange::V4(network, mask)) => list.v4.push((network, mask)),
                Ok(IpRange::V6(network, mask)) => list.v6.push((network, mask)),
                Err(reason) => {
                    errors.add(format!("{field}[{index}]"), reason);
                    ok = false;
                }
            }
        }
        ok.then_some(list)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                let bits = u32::from(v4);
                self.v4.iter().any(|(network, mask)| bits & mask == *network)
            }
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                self.v6.iter().any(|(network, mask)| bits & mask == *network)
            }
        }
    }
}

enum IpRange {
    V4(u32, u32),
    V6(u128, u128),
}

fn parse_cidr(entry: &str) -> Result<IpRange, String> {
    let (address, prefix) = match entry.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (entry, None),
    };
    let address: IpAddr = address.parse().map_err(|_| format!("'{entry}' is not an IPv4 or IPv6 address or range"))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix: u32 = match prefix {
        None => max,
        Some(digits) if !digits.is_empty() && digits.len() <= 3 && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse().map_err(|_| format!("'{entry}': bad prefix length"))?
        }
        Some(_) => return Err(format!("'{entry}': the prefix length must be a number")),
    };
    if prefix > max {
        return Err(format!("'{entry}': the prefix length must be at most {max}"));
    }
    match address {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            let bits = u32::from(v4);
            if bits & !mask != 0 {
                let network = Ipv4Addr::from(bits & mask);
                return Err(format!("'{entry}' has host bits set (the range is {network}/{prefix})"));
            }
            Ok(IpRange::V4(bits, mask))
        }
        IpAddr::V6(v6) => {
            if v6.to_ipv4_mapped().is_some() {
                return Err(format!("'{entry}' is an IPv4-mapped address: write IPv4 ranges as IPv4"));
            }
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            let bits = u128::from(v6);
            if bits & !mask != 0 {
                let network = Ipv6Addr::from(bits & mask);
                return Err(format!("'{entry}' has host bits set (the range is {network}/{prefix})"));
            }
            Ok(IpRange::V6(bits, mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Result<CidrList, String> {
        let mut errors = ConfigErrors::default();
        let entries: Vec<String> = entries.iter().map(|entry| entry.to_string()).collect();
        CidrList::compile(&entries, "client_ip", &mut errors).ok_or_else(|| errors.messages().join("; "))
    }

    fn ip(text: &str) -> IpAddr {
        parse_ip(text.as_bytes()).unwrap()
    }

    #[test]
    fn client_ip_from_peer_or_trusted_hops() {
        assert_eq!(client_ip(Some(b"10.0.0.1:5555"), None, 0).unwrap(), b"10.0.0.1");
        assert_eq!(client_ip(Some(b"[::1]:80"), None, 0).unwrap(), b"::1");
        assert_eq!(client_ip(Some(b"::1"), None, 0).unwrap(), b"::1");
        let xff = b"203.0.113.7, 198.51.100.2:4711, 10.0.0.9";
        assert_eq!(client_ip(Some(b"10.0.0.9:1"), Some(xff), 1).unwrap(), b"198.51.100.2");
        assert_eq!(client_ip(Some(b"10.0.0.9:1"), Some(xff), 2).unwrap(), b"203.0.113.7");
        assert_eq!(client_ip(Some(b"10.0.0.9:1"), Some(xff), 3).unwrap(), b"10.0.0.9", "too few entries: the peer");
        assert_eq!(client_ip(Some(b"10.0.0.9:1"), Some(b""), 1).unwrap(), b"10.0.0.9");
        assert_eq!(client_ip(Some(b"10.0.0.9:1"), None, u32::MAX).unwrap(), b"10.0.0.9");
        // Issue 15: a port in the trusted entry is not part of the client.
        for entry in [&b"198.51.100.2:40001"[..], b"198.51.100.2:40002", b"198.51.100.2"] {
            let xff = [entry, b", 10.0.0.1"].concat();
            assert_eq!(client_ip(Some(b"10.0.0.9:1"), Some(&xff), 1).unwrap(), b"198.51.100.2");
        }
        let v6 = b"[2001:db8::1]:443, 10.0.0.1";
        assert_eq!(client_ip(Some(b"10.0.0.9:1"), Some(v6), 1).unwrap(), b"2001:db8::1");
    }

    #[test]
    fn ranges_of_both_families_match_their_members_only() {
        let ranges = list(&["10.0.0.0/8", "192.0.2.1", "2001:db8::/32", "0.0.0.0/0"]).unwrap();
        assert!(ranges.contains(ip("10.255.0.1")) && ranges.contains(ip("8.8.8.8")));
        let ranges = list(&["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"]).unwrap();
        assert!(ranges.contains(ip("10.1.2.3")) && ranges.contains(ip("192.0.2.1")));
        assert!(!ranges.contains(ip("11.0.0.1")) && !ranges.contains(ip("192.0.2.2")));
        assert!(ranges.contains(ip("2001:db8:ffff::1")) && !ranges.contains(ip("2001:db9::1")));
        // A dual-stack listener reports IPv4 clients as mapped addresses.
        assert!(ranges.contains(ip("::ffff:10.9.9.9")));
        assert!(!ranges.contains(ip("::ffff:11.9.9.9")));
        let v6_all = list(&["::/0"]).unwrap();
        assert!(v6_all.contains(ip("::1")) && !v6_all.contains(ip("127.0.0.1")));
    }

    #[test]
    fn bad_ranges_are_refused_with_the_entry_named() {
        for (entry, reason) in [
            ("10.0.0.1/8", "host bits set (the range is 10.0.0.0/8)"),
            ("10.0.0.0/33", "at most 32"),
            ("2001:db8::/129", "at most 128"),
            ("10.0.0.0/", "must be a number"),
            ("10.0.0.0/+8", "must be a number"),
            ("10.0.0.0/08x", "must be a number"),
            ("10.0.0", "not an IPv4 or IPv6"),
            ("localhost", "not an IPv4 or IPv6"),
            ("::ffff:10.0.0.0/104", "IPv4-mapped"),
        ] {
            let error = list(&["192.0.2.0/24", entry]).unwrap_err();
            assert!(error.contains("client_ip[1]") && error.contains(reason), "{entry}: {error}");
        }
        assert!(list(&[]).unwrap_err().contains("at least one"));
    }

    #[test]
    fn text_that_is_no_address_parses_to_none() {
        assert_eq!(parse_ip(b"unknown"), None);
        assert_eq!(parse_ip(b"10.0.0.1\xff"), None);
        assert_eq!(parse_ip(b""), None);
        assert_eq!(parse_ip(b"::ffff:192.0.2.1"), Some(ip("192.0.2.1")));
    }
}
