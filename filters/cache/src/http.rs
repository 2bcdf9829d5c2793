//! RFC 9111 header semantics as plain functions: Cache-Control parsing, what may
//! be stored, freshness lifetime, age, conditional requests. Times are Unix seconds.

/// Cache-Control directives we act on (request or response). Unknown directives
/// are ignored, as RFC 9111 5.2 requires; a malformed value of a known
/// directive makes that directive count as present with no usable argument.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub only_if_cached: bool,
    /// `must-understand` (RFC 9111 5.2.2.3): store only if the status code's
    /// caching rules are understood, and then `no-store` may be ignored.
    pub must_understand: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    /// `max-stale` present: `Some(None)` means any staleness.
    pub max_stale: Option<Option<u64>>,
    pub min_fresh: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

fn delta_seconds(value: Option<&str>) -> Option<u64> {
    let value = value?.trim().trim_matches('"');
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Larger than 2^31 is treated as 2^31 (RFC 9111 1.2.2).
    Some(value.parse::<u64>().unwrap_or(u64::MAX).min(2_147_483_648))
}

impl CacheControl {
    /// Parses every `cache-control` value (several headers count as one list).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Self {
        let mut cc = CacheControl::default();
        for value in values {
            let text = String::from_utf8_lossy(value);
            for directive in text.split(',') {
                let (name, argument) = match directive.split_once('=') {
                    Some((name, argument)) => (name.trim().to_ascii_lowercase(), Some(argument)),
                    None => (directive.trim().to_ascii_lowercase(), None),
                };
                match name.as_str() {
                    "no-store" => cc.no_store = true,
                    // `no-cache="field"` restricts fields; we treat it as plain no-cache (stricter).
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "only-if-cached" => cc.only_if_cached = true,
                    "must-understand" => cc.must_understand = true,
                    // A malformed max-age makes the response stale (RFC 9111 4.2.1).
                    "max-age" => cc.max_age = Some(delta_seconds(argument).unwrap_or(0)),
                    "s-maxage" => cc.s_maxage = Some(delta_seconds(argument).unwrap_or(0)),
                    "max-stale" => cc.max_stale = Some(delta_seconds(argument)),
                    "min-fresh" => cc.min_fresh = Some(delta_seconds(argument).unwrap_or(0)),
                    "stale-while-revalidate" => cc.stale_while_revalidate = delta_seconds(argument),
                    "stale-if-error" => cc.stale_if_error = delta_seconds(argument),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Parses an HTTP-date (IMF-fixdate, RFC 850 and asctime forms, RFC 9110 5.6.7).
/// Invalid dates are `None` (an invalid `Expires` means "already expired").
pub fn parse_http_date(value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let parts: Vec<&str> = text.split([' ', ',', '-']).filter(|part| !part.is_empty()).collect();
    let (day, month, year, time) = match parts.as_slice() {
        // Sun, 06 Nov 1994 08:49:37 GMT  /  Sunday, 06-Nov-94 08:49:37 GMT
        [_, day, month, year, time, "GMT"] => (*day, *month, *year, *time),
        // Sun Nov  6 08:49:37 1994
        [_, month, day, time, year] => (*day, *month, *year, *time),
        _ => return None,
    };
    let day: u64 = day.parse().ok()?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|name| *name == month)? as u64
        + 1;
    let mut year: u64 = year.parse().ok()?;
    if year < 100 {
        year += if year < 70 { 2000 } else { 1900 };
    }
    let mut clock = time.split(':').map(|part| part.parse::<u64>().ok());
    let (hour, minute, second) = (clock.next()??, clock.next()??, clock.next()??);
    if !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 || year < 1970 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    (era * 146_097 + day_of_era).saturating_sub(719_468)
}

/// Formats Unix seconds as an IMF-fixdate.
pub fn format_http_date(seconds: u64) -> String {
    let days = seconds / 86_400;
    let rest = seconds % 86_400;
    // Civil from days (inverse of the above).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"].get((days % 7) as usize).unwrap_or(&"Thu");
    let month_name = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .get((month as usize).saturating_sub(1))
        .unwrap_or(&"Jan");
    format!("{weekday}, {day:02} {month_name} {year} {:02}:{:02}:{:02} GMT", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Freshness lifetime of a stored response for a shared cache (RFC 9111 4.2.1):
/// `s-maxage`, then `max-age`, then `Expires - Date`; otherwise the configured
/// default (heuristic freshness is off unless configured).
pub fn freshness_lifetime(
    cc: &CacheControl,
    expires: Option<&[u8]>,
    date: Option<u64>,
    response_time: u64,
    default_ttl: Option<u64>,
) -> u64 {
    if let Some(s_maxage) = cc.s_maxage {
        return s_maxage;
    }
    if let Some(max_age) = cc.max_age {
        return max_age;
    }
    if let Some(expires) = expires {
        // An invalid Expires (e.g. "0") means already expired.
        return parse_http_date(expires).map_or(0, |expires| expires.saturating_sub(date.unwrap_or(response_time)));
    }
    default_ttl.unwrap_or(0)
}

/// The age calculation of RFC 9111 4.2.3, at storage time.
pub fn corrected_initial_age(age_header: Option<u64>, date: Option<u64>, request_time: u64, response_time: u64) -> u64 {
    let apparent_age = date.map_or(0, |date| response_time.saturating_sub(date));
    let response_delay = response_time.saturating_sub(request_time);
    let corrected_age_value = age_header.unwrap_or(0).saturating_add(response_delay);
    apparent_age.max(corrected_age_value)
}

/// Status codes a shared cache may store without explicit freshness
/// ("heuristically cacheable", RFC 9110 15.1), minus 206 (no range support).
pub const HEURISTICALLY_CACHEABLE: &[u16] = &[200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Status codes whose caching rules this cache implements (RFC 9110 15), the
/// ones `must-understand` admits: the heuristically cacheable ones and the
/// redirects that are cacheable with explicit freshness.
pub const UNDERSTOOD_STATUSES: &[u16] = &[200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501];

/// An `Age` value (RFC 9111 5.1): a list (two field lines that Envoy joined,
/// `7200, 0`) uses its first member; anything but a non-negative integer is none.
pub fn parse_age(value: &[u8]) -> Option<u64> {
    delta_seconds(std::str::from_utf8(value).ok()?.split(',').next())
}

/// Whether an entity tag is strong (not `W/`-prefixed).
pub fn is_strong_etag(etag: &str) -> bool {
    !etag.trim_start().starts_with("W/")
}

/// Whether an entity tag list (`If-None-Match`) matches `etag` (weak comparison).
pub fn if_none_match(header: &[u8], etag: Option<&str>) -> bool {
    let text = String::from_utf8_lossy(header);
    if text.trim() == "*" {
        return etag.is_some();
    }
    let Some(etag) = etag else { return false };
    let weak = |tag: &str| tag.trim().trim_start_matches("W/").to_string();
    text.split(',').any(|candidate| weak(candidate) == weak(etag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_parsing() {
        let cc =
            CacheControl::parse([&b"public, max-age=60, s-maxage=\"30\""[..], b"stale-while-revalidate=5, X-Foo=1"]);
        assert!(cc.public);
        assert_eq!((cc.max_age, cc.s_maxage, cc.stale_while_revalidate), (Some(60), Some(30), Some(5)));
        let malformed = CacheControl::parse([&b"max-age=abc, no-cache, max-stale"[..]]);
        assert_eq!(malformed.max_age, Some(0), "a malformed max-age is stale");
        assert!(malformed.no_cache);
        assert_eq!(malformed.max_stale, Some(None));
        let cc = CacheControl::parse([&b"max-age=99999999999"[..]]);
        assert_eq!(cc.max_age, Some(2_147_483_648));
        let _ = CacheControl::parse([&b"\xff\xfe,=,==,max-age="[..]]);
    }

    #[test]
    fn http_dates_round_trip_and_accept_the_three_forms() {
        assert_eq!(parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(parse_http_date(b"Sun Nov  6 08:49:37 1994"), Some(784_111_777));
        assert_eq!(format_http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(parse_http_date(b"0"), None);
        assert_eq!(parse_http_date(b"\xff"), None);
        let now = 1_800_000_123;
        assert_eq!(parse_http_date(format_http_date(now).as_bytes()), Some(now));
    }

    #[test]
    fn freshness_order_and_age() {
        let cc = CacheControl::parse([&b"max-age=60, s-maxage=10"[..]]);
        assert_eq!(freshness_lifetime(&cc, None, None, 100, None), 10, "s-maxage wins in a shared cache");
        let none = CacheControl::default();
        let expires = format_http_date(1_000_120);
        assert_eq!(freshness_lifetime(&none, Some(expires.as_bytes()), Some(1_000_000), 1_000_000, None), 120);
        assert_eq!(freshness_lifetime(&none, Some(b"0"), Some(1_000_000), 1_000_000, None), 0);
        assert_eq!(freshness_lifetime(&none, None, None, 5, Some(30)), 30);
        assert_eq!(corrected_initial_age(Some(10), Some(95), 99, 100), 11);
        assert_eq!(corrected_initial_age(None, Some(80), 99, 100), 20);
    }

    #[test]
    fn entity_tags() {
        assert!(if_none_match(b"\"a\", W/\"b\"", Some("\"b\"")));
        assert!(if_none_match(b"*", Some("\"x\"")));
        assert!(!if_none_match(b"\"a\"", Some("\"b\"")));
        assert!(!if_none_match(b"\"a\"", None));
    }
}
