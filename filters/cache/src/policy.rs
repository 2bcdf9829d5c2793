//! The caching decisions of RFC 9111 for one exchange: the cache key, which
//! stored variant a request may use and how, and whether a response may be stored.

use gateway_common::host::MapType;
use gateway_common::request::{escape_bytes, escape_bytes_into, percent_decode, RequestHeaders};
use gateway_common::text::decimal;
use gateway_common::verdict::{Body, Edit, Reply};

use crate::config::CacheConfig;
use crate::http::{
    corrected_initial_age, freshness_lifetime, if_none_match, is_strong_etag, parse_age, parse_http_date, CacheControl,
    UNDERSTOOD_STATUSES,
};
use crate::store::{Meta, Variant};

/// Response headers never stored or replayed (hop-by-hop, recomputed, or ours).
const NOT_STORED: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "age",
    "cache-status",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "set-cookie",
    "x-envoy-upstream-service-time",
    "server",
];

/// The primary cache key: the target URI (RFC 9111 §2: scheme, authority, path,
/// the query as configured), then the key headers. The method is not part of it:
/// only GET responses are stored and HEAD uses them.
///
/// Every part is lossless: the path and authority were checked to be printable
/// ASCII (the authority holds no `/`), and header values are [`escape_bytes`]d,
/// so two different requests never share a key.
pub fn primary_key(config: &CacheConfig, request: &RequestHeaders) -> String {
    let authority = request.authority();
    let mut key = String::with_capacity(authority.len() + request.target().len() + 16);
    // Lower-cased byte by byte: ASCII folding, every other byte escaped as it is.
    for byte in scheme(request) {
        escape_bytes_into(&mut key, &[byte.to_ascii_lowercase()]);
    }
    key.push_str("://");
    // Checked to be ASCII when the request was read (`is_authority`).
    key.extend(authority.iter().map(|byte| char::from(byte.to_ascii_lowercase())));
    key.push_str(request.path());
    if let Some(query) = request.query().filter(|_| !config.ignore_query) {
        push_query(&mut key, config, query);
    }
    for name in &config.key_headers {
        key.push('\n');
        key.push_str(name);
        key.push(':');
        key.push_str(&joined(request, name).unwrap_or_default());
    }
    key
}

/// The query of a key: its parameters as sent, filtered by the configured names
/// (compared decoded), in their order; nothing when none is left.
fn push_query(key: &mut String, config: &CacheConfig, query: &[u8]) {
    let parameters = || query.split(|byte| *byte == b'&').filter(|pair| !pair.is_empty());
    if config.query_include.is_none() && config.query_exclude.is_none() {
        if parameters().next().is_some() {
            key.push('?');
            let mut first = true;
            for pair in parameters() {
                if !std::mem::take(&mut first) {
                    key.push('&');
                }
                escape_bytes_into(key, pair);
            }
        }
        return;
    }
    let mut pairs: Vec<&[u8]> = parameters().collect();
    let name_of = |pair: &[u8]| percent_decode(pair.split(|byte| *byte == b'=').next().unwrap_or_default());
    if let Some(include) = &config.query_include {
        pairs.retain(|pair| include.iter().any(|name| name.as_bytes() == name_of(pair).as_slice()));
    }
    if let Some(exclude) = &config.query_exclude {
        pairs.retain(|pair| exclude.iter().all(|name| name.as_bytes() != name_of(pair).as_slice()));
    }
    if !pairs.is_empty() {
        key.push('?');
        escape_bytes_into(key, &pairs.join(&b'&'));
    }
}

/// The scheme the client used: `x-forwarded-proto` as Envoy sets it (from the
/// downstream connection when `use_remote_address: true`, from the trusted hop
/// with `xff_num_trusted_hops`), else the request's `:scheme`.
pub fn scheme(request: &RequestHeaders) -> &[u8] {
    request.first("x-forwarded-proto").or_else(|| request.first(":scheme")).unwrap_or_default()
}

/// All values of a header joined as one list, as Vary compares them; each value's
/// bytes kept losslessly ([`escape_bytes`]: `\xff` and `\xfe` stay different).
fn joined(request: &RequestHeaders, name: &str) -> Option<String> {
    let values: Vec<String> = request.values(name).map(|value| escape_bytes(value.trim_ascii())).collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// The request's Cache-Control as the cache honours it (none when configured to
/// ignore clients' directives).
pub fn request_cache_control(config: &CacheConfig, request: &RequestHeaders) -> CacheControl {
    if config.ignore_request_cache_control {
        CacheControl::default()
    } else {
        CacheControl::parse(request.values("cache-control"))
    }
}

/// The selectors a request presents for a stored variant's Vary header names.
pub fn selectors_for(
    request: &RequestHeaders,
    names: &[String],
    upstream_header: &str,
) -> Vec<(String, Option<String>)> {
    let mut selectors: Vec<(String, Option<String>)> =
        names.iter().map(|name| (name.clone(), joined(request, name))).collect();
    selectors.push((":upstream".to_string(), joined(request, upstream_header)));
    selectors
}

/// The stored variant this request selects (RFC 9111 4.1).
pub fn select<'m>(meta: &'m Meta, request: &RequestHeaders, upstream_header: &str) -> Option<&'m Variant> {
    // Compared selector by selector, as `selectors_for` would build them, without
    // building them (this runs on every hit).
    meta.variants.iter().find(|variant| {
        variant.selectors.last().is_some_and(|(name, _)| name == ":upstream")
            && variant.selectors.iter().all(|(name, stored)| {
                let header = if name == ":upstream" { upstream_header } else { name.as_str() };
                joined_equals(request, header, stored.as_deref())
            })
    })
}

/// Whether [`joined`] of `name` equals `stored`, without allocating for the
/// common cases (absent, or one value that needs no escaping).
fn joined_equals(request: &RequestHeaders, name: &str, stored: Option<&str>) -> bool {
    let mut values = request.values(name);
    match (values.next(), values.next(), stored) {
        (None, _, None) => true,
        (None, _, Some(_)) | (Some(_), _, None) => false,
        // `escape_bytes` keeps printable ASCII but `%` as it is.
        (Some(only), None, Some(stored)) if only.iter().all(|b| (0x20..=0x7e).contains(b) && *b != b'%') => {
            only.trim_ascii() == stored.as_bytes()
        }
        _ => joined(request, name).as_deref() == stored,
    }
}

/// How a stored variant may be used for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Fresh,
    /// Stale, but the request accepts it (`max-stale`).
    StaleAccepted,
    /// Must be revalidated with the origin first.
    Revalidate,
}

pub fn usability(variant: &Variant, request_cc: &CacheControl, now: u64) -> Use {
    if variant.no_cache || request_cc.no_cache {
        return Use::Revalidate;
    }
    let age = variant.current_age(now);
    if request_cc.max_age.is_some_and(|max_age| age > max_age) {
        return Use::Revalidate;
    }
    if request_cc.min_fresh.is_some_and(|min_fresh| variant.ttl(now) < i64::try_from(min_fresh).unwrap_or(i64::MAX)) {
        return Use::Revalidate;
    }
    let ttl = variant.ttl(now);
    if ttl > 0 {
        return Use::Fresh;
    }
    let staleness = u64::try_from(-ttl).unwrap_or(0);
    match request_cc.max_stale {
        Some(limit) if !variant.no_stale && limit.is_none_or(|limit| staleness <= limit) => Use::StaleAccepted,
        _ => Use::Revalidate,
    }
}

/// What a GET/HEAD does with what the cache holds for it (RFC 9111 4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupPlan {
    /// Forward to the origin; the response may be stored. The `Cache-Status`
    /// `fwd` parameter says why.
    Forward(&'static str),
    /// `only-if-cached` and nothing usable: 504.
    GatewayTimeout,
    /// Answer from the stored variant (its body permitting); `ttl` is its
    /// freshness left (negative: stale that long), for `Cache-Status`.
    Serve { ttl: i64 },
    /// Answer with the stale variant now and revalidate it in the background.
    ServeStaleAndRevalidate { ttl: i64 },
    /// Forward with the stored validators, then answer from the result.
    Revalidate,
}

/// Decides a lookup: `request_cc` as the request sent it, `found` whether the URI
/// is stored at all, `variant` the stored variant the request selects.
pub fn plan_lookup(request_cc: &CacheControl, found: bool, variant: Option<&Variant>, now: u64) -> LookupPlan {
    if request_cc.no_store {
        return LookupPlan::Forward("fwd=request");
    }
    let Some(variant) = variant else {
        if request_cc.only_if_cached {
            return LookupPlan::GatewayTimeout;
        }
        return LookupPlan::Forward(if found { "fwd=vary-miss" } else { "fwd=uri-miss" });
    };
    match usability(variant, request_cc, now) {
        Use::Fresh | Use::StaleAccepted => LookupPlan::Serve { ttl: variant.ttl(now) },
        Use::Revalidate if within_stale_while_revalidate(variant, request_cc, now) => {
            LookupPlan::ServeStaleAndRevalidate { ttl: variant.ttl(now) }
        }
        Use::Revalidate if request_cc.only_if_cached => LookupPlan::GatewayTimeout,
        Use::Revalidate => LookupPlan::Revalidate,
    }
}

/// Whether a stale variant may be served at once while it is revalidated in the
/// background (RFC 5861 `stale-while-revalidate`): within the window, and never
/// when the variant or the request asks for a check first.
pub fn within_stale_while_revalidate(variant: &Variant, request_cc: &CacheControl, now: u64) -> bool {
    let staleness = u64::try_from(-variant.ttl(now)).unwrap_or(0);
    !variant.no_cache
        && !request_cc.no_cache
        && request_cc.max_age.is_none()
        && request_cc.min_fresh.is_none()
        && variant.stale_while_revalidate.is_some_and(|window| staleness <= window)
}

/// The keys a successful unsafe request invalidates (RFC 9111 4.4): its own URI
/// and the URIs in `Location` and `Content-Location` when they have the same
/// origin (scheme and authority); relative references share the request's.
pub fn invalidated_keys(config: &CacheConfig, request: &RequestHeaders, headers: &[(String, Vec<u8>)]) -> Vec<String> {
    let mut keys = vec![primary_key(config, request)];
    let origin = format!(
        "{}://{}",
        String::from_utf8_lossy(scheme(request)).to_ascii_lowercase(),
        String::from_utf8_lossy(request.authority()).to_ascii_lowercase()
    );
    for name in ["location", "content-location"] {
        let Some(value) = header_values(headers, name).next() else { continue };
        // Bytes that are not text name no URI we could have stored.
        let Ok(target) = std::str::from_utf8(value) else { continue };
        let target = target.trim();
        let path = if target.starts_with('/') && !target.starts_with("//") {
            Some(target.to_string())
        } else {
            same_origin_path(target, &origin)
        };
        // Same scheme, authority and key headers, the target's path.
        if let Some(target) = path.and_then(|path| request.with_target(path.as_bytes())) {
            keys.push(primary_key(config, &target));
        }
    }
    keys
}

/// The path (and query) of an absolute URI whose origin is `origin`
/// (`scheme://authority`, lower-case); `None` for another origin.
fn same_origin_path(target: &str, origin: &str) -> Option<String> {
    let (scheme, rest) = target.split_once("://")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let candidate = format!("{}://{}", scheme.to_ascii_lowercase(), authority.to_ascii_lowercase());
    (candidate == origin).then(|| format!("/{path}"))
}

/// The local reply that answers a request from a stored variant: `304` with the
/// headers RFC 9111 4.3.4 keeps when the client's own conditions match, else the
/// stored status, headers and body (none for HEAD); `Age` and `Cache-Status` always.
pub fn stored_reply(
    variant: &Variant,
    body: impl Into<Body>,
    client: &RequestHeaders,
    head: bool,
    cache_status: String,
    now: u64,
) -> Reply {
    const KEPT_ON_304: &[&str] = &["etag", "cache-control", "content-location", "date", "expires", "vary"];
    let computed = vec![("age".into(), decimal(variant.current_age(now))), ("cache-status".into(), cache_status)];
    if not_modified(variant, client) {
        let kept = variant.headers.iter().filter(|(name, _)| KEPT_ON_304.contains(&name.as_str())).cloned();
        return Reply::new(304, kept.chain(computed).collect(), Body::default());
    }
    let body = if head { Body::default() } else { body.into() };
    // The stored fields are sent as they are kept: no copy per hit.
    Reply { shared_headers: Some(variant.headers.clone()), ..Reply::new(u32::from(variant.status), computed, body) }
}

/// The response headers a cache replays from an origin's answer: everything but
/// hop-by-hop fields and those recomputed (the stored-header rule, cookies kept:
/// this answer is not stored for anyone else).
pub fn replayed_headers(headers: &[(String, Vec<u8>)]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| !name.starts_with(':') && (name == "set-cookie" || !NOT_STORED.contains(&name.as_str())))
        .map(|(name, value)| (name.clone(), String::from_utf8_lossy(value).into_owned()))
        .collect()
}

/// The client's request as an unconditional GET (or HEAD) for a re-fetch: its
/// headers without validators or hop-by-hop fields. `None` when a value is not
/// text (the call API takes text).
pub fn refetch_headers(client: &RequestHeaders) -> Option<Vec<(String, String)>> {
    const LEFT_OUT: &[&str] = &[
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
        "if-range",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "content-length",
    ];
    let mut headers = vec![
        (":method".to_string(), String::from_utf8(client.method().to_vec()).ok()?),
        (":path".to_string(), client.target().to_string()),
        (":authority".to_string(), String::from_utf8(client.authority().to_vec()).ok()?),
    ];
    for (name, value) in client.pairs().iter() {
        let name = String::from_utf8(name.to_vec()).ok()?;
        if name.starts_with(':') || LEFT_OUT.contains(&name.as_str()) {
            continue;
        }
        headers.push((name, String::from_utf8(value.to_vec()).ok()?));
    }
    Some(headers)
}

/// The request edits of a revalidation: our validators replace the client's (the
/// client's own conditions are judged against the revalidated entry afterwards).
pub fn revalidation_edits(variant: &Variant) -> Vec<Edit> {
    let map = MapType::HttpRequestHeaders;
    let mut edits = vec![Edit::Remove(map, "if-none-match".into()), Edit::Remove(map, "if-modified-since".into())];
    if let Some(etag) = &variant.etag {
        edits.push(Edit::Set(map, "if-none-match".into(), etag.clone().into_bytes()));
    }
    if let Some(modified) = &variant.last_modified {
        edits.push(Edit::Set(map, "if-modified-since".into(), modified.clone().into_bytes()));
    }
    edits
}

/// Whether a client's conditional request is satisfied by the stored variant
/// (answer 304). `If-None-Match` takes precedence over `If-Modified-Since`.
pub fn not_modified(variant: &Variant, request: &RequestHeaders) -> bool {
    if let Some(header) = request.first("if-none-match") {
        return if_none_match(header, variant.etag.as_deref());
    }
    match (request.first("if-modified-since").and_then(parse_http_date), variant.last_modified.as_deref()) {
        (Some(since), Some(modified)) => parse_http_date(modified.as_bytes()).is_some_and(|modified| modified <= since),
        _ => false,
    }
}

/// What the request side knows when the response arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    pub key: String,
    pub selectors_request: RequestHeaders,
    pub authenticated: bool,
    pub request_no_store: bool,
    pub request_time: u64,
}

fn header_values<'h>(headers: &'h [(String, Vec<u8>)], name: &'h str) -> impl Iterator<Item = &'h [u8]> + 'h {
    headers.iter().filter(move |(key, _)| key == name).map(|(_, value)| value.as_slice())
}

/// Header fields a 304 never replaces in a stored response (RFC 9111 4.3.4):
/// they describe the stored content, which the 304 did not send.
const DESCRIBE_THE_CONTENT: &[&str] =
    &["content-encoding", "content-range", "content-md5", "content-digest", "repr-digest", "digest"];

/// Whether a method is safe (RFC 9110 9.2.1); a successful response to any
/// other method invalidates (RFC 9111 4.4), whether we know the method or not.
pub fn is_safe_method(method: &[u8]) -> bool {
    matches!(method, b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE")
}

/// Why a response was not stored (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    NoStore,
    /// `must-understand` with a status code whose rules we do not implement.
    NotUnderstood,
    Private,
    Authorization,
    Status,
    VaryStar,
    SetCookie,
    NoFreshness,
}

/// Decides whether a GET response may be stored by a shared cache (RFC 9111 3,
/// 3.5) and builds the variant (body fields filled when stored).
pub fn storable(
    config: &CacheConfig,
    exchange: &Exchange,
    status: u16,
    headers: &[(String, Vec<u8>)],
    response_time: u64,
) -> Result<Variant, NotStored> {
    let values = |name: &'static str| header_values(headers, name);
    let first = |name: &'static str| values(name).next();
    let cc = CacheControl::parse(values("cache-control"));
    if cc.must_understand && !UNDERSTOOD_STATUSES.contains(&status) {
        return Err(NotStored::NotUnderstood);
    }
    // must-understand with a status we understand overrides no-store (5.2.2.3).
    if (cc.no_store && !cc.must_understand) || exchange.request_no_store {
        return Err(NotStored::NoStore);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    if exchange.authenticated && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate) {
        return Err(NotStored::Authorization);
    }
    if first("set-cookie").is_some() {
        return Err(NotStored::SetCookie);
    }
    let mut vary_names: Vec<String> = Vec::new();
    for value in values("vary") {
        for name in String::from_utf8_lossy(value).split(',') {
            let name = name.trim().to_ascii_lowercase();
            if name == "*" {
                return Err(NotStored::VaryStar);
            }
            if !name.is_empty() && !vary_names.contains(&name) {
                vary_names.push(name);
            }
        }
    }
    let explicit = cc.s_maxage.is_some() || cc.max_age.is_some() || first("expires").is_some();
    let heuristic = config.cacheable_statuses.contains(&status) && config.default_ttl_seconds.is_some();
    let revalidate_only = cc.no_cache && (first("etag").is_some() || first("last-modified").is_some());
    if !(200..600).contains(&status) || status == 206 || (!config.cacheable_statuses.contains(&status) && !explicit) {
        return Err(NotStored::Status);
    }
    if !explicit && !heuristic && !revalidate_only {
        return Err(NotStored::NoFreshness);
    }
    let date = first("date").and_then(parse_http_date);
    let age = first("age").and_then(parse_age);
    let text = |value: &[u8]| String::from_utf8_lossy(value).into_owned();
    Ok(Variant {
        selectors: selectors_for(&exchange.selectors_request, &vary_names, &config.upstream_header),
        status,
        headers: headers
            .iter()
            .filter(|(name, _)| !name.starts_with(':') && !NOT_STORED.contains(&name.as_str()))
            .map(|(name, value)| (name.clone(), text(value)))
            .collect::<Vec<_>>()
            .into(),
        stored_at: response_time,
        initial_age: corrected_initial_age(age, date, exchange.request_time, response_time),
        lifetime: freshness_lifetime(&cc, first("expires"), date, response_time, config.default_ttl_seconds),
        no_cache: cc.no_cache,
        no_stale: cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some(),
        stale_while_revalidate: cc.stale_while_revalidate,
        stale_if_error: cc.stale_if_error,
        etag: first("etag").map(text),
        last_modified: first("last-modified").map(text),
        generation: 0,
        body_len: 0,
        position: 0,
    })
}

/// Whether a 304 identifies this stored variant for update (RFC 9111 4.3.4): a
/// strong validator in it must equal the stored one (strong comparison); else a
/// weak `ETag` must match weakly, else a `Last-Modified` must be the stored one.
/// A 304 without any validator updates the one variant it revalidated (the
/// request carried that variant's validators).
pub fn selected_for_update(stored: &Variant, headers: &[(String, Vec<u8>)]) -> bool {
    let text =
        |name: &'static str| header_values(headers, name).next().map(|v| String::from_utf8_lossy(v).trim().to_string());
    if let Some(etag) = text("etag") {
        let stored_etag = stored.etag.as_deref().map(str::trim);
        return if is_strong_etag(&etag) {
            stored_etag == Some(etag.as_str())
        } else {
            let opaque = |tag: &str| tag.trim_start_matches("W/").to_string();
            stored_etag.is_some_and(|stored| opaque(stored) == opaque(&etag))
        };
    }
    match text("last-modified") {
        Some(modified) => stored.last_modified.as_deref().map(str::trim) == Some(modified.as_str()),
        None => true,
    }
}

/// Updates a stored variant from a 304 response (RFC 9111 4.3.4): its header
/// fields replace the stored ones (not those that describe the stored content,
/// nor those never stored), and freshness is recomputed. The caller checks
/// [`selected_for_update`] first.
pub fn refreshed(
    config: &CacheConfig,
    stored: &Variant,
    headers: &[(String, Vec<u8>)],
    request_time: u64,
    response_time: u64,
) -> Variant {
    let mut variant = stored.clone();
    let updating =
        |name: &str| !name.starts_with(':') && !NOT_STORED.contains(&name) && !DESCRIBE_THE_CONTENT.contains(&name);
    // Every field the 304 carries replaces all stored lines of that name (a
    // repeated field keeps all its new lines).
    let mut fields = variant.headers.to_vec();
    fields.retain(|(stored_name, _)| !headers.iter().any(|(name, _)| name == stored_name && updating(name)));
    for (name, value) in headers.iter().filter(|(name, _)| updating(name)) {
        fields.push((name.clone(), String::from_utf8_lossy(value).into_owned()));
    }
    variant.headers = fields.into();
    let stored: Vec<(String, Vec<u8>)> =
        variant.headers.iter().map(|(name, value)| (name.clone(), value.as_bytes().to_vec())).collect();
    let values = |name: &'static str| header_values(&stored, name);
    let cc = CacheControl::parse(values("cache-control"));
    let date = values("date").next().and_then(parse_http_date);
    let expires = values("expires").next().map(<[u8]>::to_vec);
    let age = headers.iter().find(|(name, _)| name == "age").and_then(|(_, age)| parse_age(age));
    variant.stored_at = response_time;
    variant.initial_age = corrected_initial_age(age, date, request_time, response_time);
    variant.lifetime = freshness_lifetime(&cc, expires.as_deref(), date, response_time, config.default_ttl_seconds);
    variant.no_cache = cc.no_cache;
    variant.no_stale = cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some();
    variant.stale_while_revalidate = cc.stale_while_revalidate;
    variant.stale_if_error = cc.stale_if_error;
    if let Some(etag) = headers.iter().find(|(name, _)| name == "etag") {
        variant.etag = Some(String::from_utf8_lossy(&etag.1).into_owned());
    }
    variant
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::format_http_date;

    fn config(json: &str) -> CacheConfig {
        gateway_common::config::parse_json(json.as_bytes()).unwrap()
    }

    fn request(pairs: &[(&str, &str)]) -> RequestHeaders {
        gateway_common::testing::request_text(pairs)
    }

    fn raw_request(pairs: &[(&str, &[u8])]) -> RequestHeaders {
        gateway_common::testing::request(pairs)
    }

    fn exchange(authenticated: bool) -> Exchange {
        Exchange {
            key: "k".into(),
            selectors_request: request(&[(":path", "/"), ("accept-encoding", "gzip"), ("x-gateway-cluster", "v1")]),
            authenticated,
            request_no_store: false,
            request_time: 1000,
        }
    }

    fn response(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn keys_follow_the_query_configuration() {
        let r = request(&[
            (":authority", "API.example.com"),
            (":path", "/a?b=2&utm_source=x&a=1"),
            ("x-tenant", "t1"),
            ("x-forwarded-proto", "https"),
        ]);
        let k = |json: &str| primary_key(&config(json), &r);
        assert_eq!(k("{}"), "https://api.example.com/a?b=2&utm_source=x&a=1");
        assert_eq!(k(r#"{"ignore_query": true}"#), "https://api.example.com/a");
        assert_eq!(k(r#"{"query_exclude": ["utm_source"]}"#), "https://api.example.com/a?b=2&a=1");
        assert_eq!(k(r#"{"query_include": ["a"]}"#), "https://api.example.com/a?a=1");
        assert_eq!(
            k(r#"{"key_headers": ["x-tenant"]}"#),
            "https://api.example.com/a?b=2&utm_source=x&a=1\nx-tenant:t1"
        );
    }

    #[test]
    fn the_key_has_the_scheme_and_never_merges_distinct_requests() {
        let c = config(r#"{"key_headers": ["x-tenant"]}"#);
        let key = |pairs: &[(&str, &[u8])]| primary_key(&c, &raw_request(pairs));
        let http = key(&[(":path", b"/"), (":authority", b"a"), ("x-forwarded-proto", b"http")]);
        let https = key(&[(":path", b"/"), (":authority", b"a"), ("x-forwarded-proto", b"https")]);
        assert_ne!(http, https);
        // `:scheme` is only the fallback: Envoy sets x-forwarded-proto from the connection.
        let claimed =
            key(&[(":path", b"/"), (":authority", b"a"), (":scheme", b"https"), ("x-forwarded-proto", b"http")]);
        assert_eq!(claimed, http);
        let variants: Vec<String> = [&b"\xff"[..], b"\xfe", b"%FF", b"", b"\xff\nx"]
            .iter()
            .map(|tenant| key(&[(":path", b"/"), (":authority", b"a"), ("x-tenant", tenant)]))
            .collect();
        for (i, one) in variants.iter().enumerate() {
            assert!(variants[i + 1..].iter().all(|other| other != one), "{variants:?}");
        }
        let with_query = key(&[(":path", b"/a?x=%FF"), (":authority", b"a")]);
        assert_ne!(with_query, key(&[(":path", b"/a?x=%FE"), (":authority", b"a")]));
    }

    proptest::proptest! {
        #[test]
        fn distinct_raw_requests_never_share_a_cache_key(
            path_a in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..16),
            path_b in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..16),
            tenant_a in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8),
            tenant_b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8),
        ) {
            let c = config(r#"{"key_headers": ["x-tenant"]}"#);
            let view = |path: &[u8], tenant: &[u8]| {
                let mut target = b"/".to_vec();
                target.extend_from_slice(path);
                RequestHeaders::from_pairs(vec![
                    (b":path".to_vec(), target),
                    (b"x-tenant".to_vec(), tenant.to_vec()),
                ]).ok()
            };
            if let (Some(a), Some(b)) = (view(&path_a, &tenant_a), view(&path_b, &tenant_b)) {
                // Same key only for the same target and the same (trimmed) tenant bytes.
                let same_input = a.target() == b.target() && tenant_a.trim_ascii() == tenant_b.trim_ascii();
                proptest::prop_assert_eq!(primary_key(&c, &a) == primary_key(&c, &b), same_input);
            }
        }

        #[test]
        fn select_picks_exactly_the_variants_whose_selectors_the_request_builds(
            stored in proptest::collection::vec(proptest::collection::vec(0x1eu8..0x80, 0..6), 0..3),
            asked in proptest::collection::vec(proptest::collection::vec(0x1eu8..0x80, 0..6), 0..3),
            upstream in proptest::option::of(proptest::collection::vec(0x61u8..0x63, 1..3)),
        ) {
            let view = |values: &[Vec<u8>]| {
                let mut pairs = vec![(b":path".to_vec(), b"/".to_vec())];
                pairs.extend(values.iter().map(|value| (b"accept".to_vec(), value.clone())));
                if let Some(upstream) = &upstream {
                    pairs.push((b"x-gateway-cluster".to_vec(), upstream.clone()));
                }
                RequestHeaders::from_pairs(pairs).ok()
            };
            if let (Some(stored), Some(asked)) = (view(&stored), view(&asked)) {
                let names = vec!["accept".to_string()];
                let variant = Variant { selectors: selectors_for(&stored, &names, "x-gateway-cluster"), ..stored_with(&[("cache-control", "max-age=1")]) };
                let meta = Meta { key: "k".into(), variants: vec![variant], next_generation: 2 };
                let built = selectors_for(&asked, &names, "x-gateway-cluster");
                proptest::prop_assert_eq!(select(&meta, &asked, "x-gateway-cluster").is_some(), built == meta.variants[0].selectors);
            }
        }
    }

    #[test]
    fn unsafe_requests_invalidate_same_origin_locations_only() {
        let c = config("{}");
        let post = request(&[
            (":method", "POST"),
            (":path", "/orders"),
            (":authority", "Api.test"),
            ("x-forwarded-proto", "https"),
        ]);
        let key = |path: &str| primary_key(&c, &post.with_target(path.as_bytes()).unwrap());
        let keys = |location: &str, content_location: &str| {
            invalidated_keys(&c, &post, &response(&[("location", location), ("content-location", content_location)]))
        };
        assert_eq!(
            keys("/orders/7", "https://api.test/orders/7/summary"),
            vec![key("/orders"), key("/orders/7"), key("/orders/7/summary")]
        );
        // Another scheme, host or port is another origin; so is a scheme-relative reference.
        assert_eq!(keys("http://api.test/orders/7", "https://api.test:8443/x"), vec![key("/orders")]);
        assert_eq!(keys("https://evil.test/orders/7", "//api.test/x"), vec![key("/orders")]);
        assert_eq!(keys("https://API.test", "/a b"), vec![key("/orders"), key("/")]);
    }

    fn stored(lifetime: u64, swr: Option<u64>) -> Variant {
        Variant {
            selectors: vec![],
            status: 200,
            headers: Default::default(),
            stored_at: 1000,
            initial_age: 0,
            lifetime,
            no_cache: false,
            no_stale: false,
            stale_while_revalidate: swr,
            stale_if_error: None,
            etag: None,
            last_modified: None,
            generation: 1,
            body_len: 0,
            position: 0,
        }
    }

    #[test]
    fn lookups_are_planned_by_rfc_9111() {
        let plain = CacheControl::default();
        let cc = |text: &str| CacheControl::parse([text.as_bytes()]);
        let fresh = stored(60, None);
        assert_eq!(plan_lookup(&plain, true, Some(&fresh), 1010), LookupPlan::Serve { ttl: 50 });
        assert_eq!(plan_lookup(&cc("no-store"), true, Some(&fresh), 1010), LookupPlan::Forward("fwd=request"));
        assert_eq!(plan_lookup(&plain, false, None, 1010), LookupPlan::Forward("fwd=uri-miss"));
        assert_eq!(plan_lookup(&plain, true, None, 1010), LookupPlan::Forward("fwd=vary-miss"));
        assert_eq!(plan_lookup(&cc("only-if-cached"), false, None, 1010), LookupPlan::GatewayTimeout);
        assert_eq!(plan_lookup(&cc("no-cache"), true, Some(&fresh), 1010), LookupPlan::Revalidate);
        let stale = stored(10, Some(30));
        assert_eq!(plan_lookup(&plain, true, Some(&stale), 1020), LookupPlan::ServeStaleAndRevalidate { ttl: -10 });
        assert_eq!(plan_lookup(&plain, true, Some(&stale), 1050), LookupPlan::Revalidate, "past the window");
        assert_eq!(plan_lookup(&cc("only-if-cached"), true, Some(&stale), 1050), LookupPlan::GatewayTimeout);
        assert_eq!(plan_lookup(&cc("max-stale=100"), true, Some(&stale), 1050), LookupPlan::Serve { ttl: -40 });
    }

    #[test]
    fn stale_while_revalidate_only_within_its_window_and_without_request_checks() {
        let mut stale = stored(10, Some(30));
        let plain = CacheControl::default();
        assert!(within_stale_while_revalidate(&stale, &plain, 1020));
        assert!(!within_stale_while_revalidate(&stale, &plain, 1041), "past the window");
        let no_cache = CacheControl::parse([&b"no-cache"[..]]);
        assert!(!within_stale_while_revalidate(&stale, &no_cache, 1020));
        stale.no_cache = true;
        assert!(!within_stale_while_revalidate(&stale, &plain, 1020));
    }

    #[test]
    fn stored_replies_and_revalidation_edits() {
        let mut variant = stored(60, None);
        variant.headers = vec![("etag".into(), "\"v1\"".into()), ("x-extra".into(), "1".into())].into();
        variant.etag = Some("\"v1\"".into());
        let plain = request(&[(":path", "/")]);
        let reply = stored_reply(&variant, b"body".to_vec(), &plain, false, "wasm-cache; hit".into(), 1010);
        assert_eq!((reply.status, &*reply.body), (200, &b"body"[..]));
        assert_eq!(reply.header("age"), Some("10"));
        assert_eq!(reply.header("x-extra"), Some("1"));
        assert!(
            matches!(&reply.shared_headers, Some(fields) if gateway_common::verdict::SharedFields::ptr_eq(fields, &variant.headers)),
            "not copied"
        );
        // A hit answers with the stored bytes themselves, not a copy.
        let stored_body: std::rc::Rc<[u8]> = std::rc::Rc::from(&b"body"[..]);
        let shared =
            stored_reply(&variant, std::rc::Rc::clone(&stored_body), &plain, false, "wasm-cache; hit".into(), 1010);
        assert!(matches!(&shared.body, Body::Shared(bytes) if std::rc::Rc::ptr_eq(bytes, &stored_body)));
        assert_eq!(shared.body, reply.body, "equal bytes are equal bodies, however held");
        let head = stored_reply(&variant, b"body".to_vec(), &plain, true, "wasm-cache; hit".into(), 1010);
        assert!(head.body.is_empty());
        let conditional = request(&[(":path", "/"), ("if-none-match", "\"v1\"")]);
        let not_modified =
            stored_reply(&variant, b"body".to_vec(), &conditional, false, "wasm-cache; hit".into(), 1010);
        assert_eq!(not_modified.status, 304);
        assert!(not_modified.body.is_empty());
        assert_eq!(not_modified.header("x-extra"), None, "only the RFC 9111 4.3.4 headers");
        let map = MapType::HttpRequestHeaders;
        assert_eq!(
            revalidation_edits(&variant),
            vec![
                Edit::Remove(map, "if-none-match".into()),
                Edit::Remove(map, "if-modified-since".into()),
                Edit::Set(map, "if-none-match".into(), b"\"v1\"".to_vec()),
            ]
        );
    }

    #[test]
    fn vary_selectors_keep_raw_bytes_apart() {
        let names = vec!["x-token".to_string()];
        let ff = selectors_for(&raw_request(&[(":path", b"/"), ("x-token", b"\xff")]), &names, "x-gateway-cluster");
        let fe = selectors_for(&raw_request(&[(":path", b"/"), ("x-token", b"\xfe")]), &names, "x-gateway-cluster");
        assert_ne!(ff, fe);
    }

    #[test]
    fn what_a_shared_cache_may_store() {
        let c = config("{}");
        let ok = |headers: &[(&str, &str)], authenticated: bool| {
            storable(&c, &exchange(authenticated), 200, &response(headers), 1000)
        };
        assert!(ok(&[("cache-control", "max-age=60")], false).is_ok());
        assert_eq!(ok(&[("cache-control", "max-age=60, private")], false).unwrap_err(), NotStored::Private);
        assert_eq!(ok(&[("cache-control", "no-store, max-age=60")], false).unwrap_err(), NotStored::NoStore);
        assert_eq!(ok(&[("cache-control", "max-age=60")], true).unwrap_err(), NotStored::Authorization);
        assert!(ok(&[("cache-control", "public, max-age=60")], true).is_ok());
        assert!(ok(&[("cache-control", "s-maxage=60")], true).is_ok());
        assert_eq!(ok(&[("cache-control", "max-age=60"), ("vary", "*")], false).unwrap_err(), NotStored::VaryStar);
        assert_eq!(ok(&[], false).unwrap_err(), NotStored::NoFreshness, "heuristics are off by default");
        assert!(ok(&[("cache-control", "no-cache"), ("etag", "\"v1\"")], false).is_ok(), "stored for revalidation");
        assert_eq!(storable(&c, &exchange(false), 302, &response(&[]), 1000).unwrap_err(), NotStored::Status);
        assert!(storable(&c, &exchange(false), 302, &response(&[("cache-control", "max-age=5")]), 1000).is_ok());
        let heuristic = config(r#"{"default_ttl_seconds": 30}"#);
        assert_eq!(storable(&heuristic, &exchange(false), 200, &response(&[]), 1000).unwrap().lifetime, 30);
    }

    #[test]
    fn vary_and_upstream_select_variants() {
        let c = config("{}");
        let variant = storable(
            &c,
            &exchange(false),
            200,
            &response(&[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")]),
            1000,
        )
        .unwrap();
        let meta = Meta { key: "k".into(), variants: vec![variant], next_generation: 2 };
        let same = request(&[(":path", "/"), ("accept-encoding", "gzip"), ("x-gateway-cluster", "v1")]);
        let other_encoding = request(&[(":path", "/"), ("accept-encoding", "br"), ("x-gateway-cluster", "v1")]);
        let other_upstream = request(&[(":path", "/"), ("accept-encoding", "gzip"), ("x-gateway-cluster", "v2")]);
        assert!(select(&meta, &same, "x-gateway-cluster").is_some());
        assert!(select(&meta, &other_encoding, "x-gateway-cluster").is_none());
        assert!(select(&meta, &other_upstream, "x-gateway-cluster").is_none(), "a canary never gets the other body");
    }

    #[test]
    fn freshness_and_request_directives() {
        let c = config("{}");
        let date = format_http_date(1000);
        let v =
            storable(&c, &exchange(false), 200, &response(&[("cache-control", "max-age=60"), ("date", &date)]), 1000)
                .unwrap();
        let none = CacheControl::default();
        assert_eq!(usability(&v, &none, 1030), Use::Fresh);
        assert_eq!(usability(&v, &none, 1061), Use::Revalidate);
        assert_eq!(usability(&v, &CacheControl::parse([&b"max-stale=10"[..]]), 1065), Use::StaleAccepted);
        assert_eq!(usability(&v, &CacheControl::parse([&b"max-stale=1"[..]]), 1065), Use::Revalidate);
        assert_eq!(usability(&v, &CacheControl::parse([&b"max-age=10"[..]]), 1030), Use::Revalidate);
        assert_eq!(usability(&v, &CacheControl::parse([&b"min-fresh=40"[..]]), 1030), Use::Revalidate);
        assert_eq!(usability(&v, &CacheControl::parse([&b"no-cache"[..]]), 1001), Use::Revalidate);
        let strict =
            storable(&c, &exchange(false), 200, &response(&[("cache-control", "max-age=60, must-revalidate")]), 1000)
                .unwrap();
        assert_eq!(usability(&strict, &CacheControl::parse([&b"max-stale"[..]]), 2000), Use::Revalidate);
    }

    #[test]
    fn conditional_requests_and_304_refresh() {
        let c = config("{}");
        let v = storable(
            &c,
            &exchange(false),
            200,
            &response(&[("cache-control", "max-age=1"), ("etag", "\"v1\""), ("last-modified", &format_http_date(500))]),
            1000,
        )
        .unwrap();
        assert!(not_modified(&v, &request(&[("if-none-match", "\"v1\"")])));
        assert!(!not_modified(&v, &request(&[("if-none-match", "\"v0\"")])));
        assert!(not_modified(&v, &request(&[("if-modified-since", &format_http_date(600))])));
        assert!(!not_modified(&v, &request(&[("if-modified-since", &format_http_date(400))])));
        let updated = refreshed(&c, &v, &response(&[("cache-control", "max-age=100"), ("x-new", "1")]), 2000, 2000);
        assert_eq!(updated.lifetime, 100);
        assert_eq!(usability(&updated, &CacheControl::default(), 2050), Use::Fresh);
        assert!(updated.headers.iter().any(|(name, value)| name == "x-new" && value == "1"));
    }

    fn stored_with(headers: &[(&str, &str)]) -> Variant {
        storable(&config("{}"), &exchange(false), 200, &response(headers), 1000).unwrap()
    }

    /// RFC 9111 4.3.4: a strong validator in the 304 selects only the stored
    /// response with the same strong validator; weak ones compare weakly.
    #[test]
    fn rfc9111_4_3_4_a_304_updates_only_the_representation_it_names() {
        let strong = stored_with(&[("cache-control", "max-age=1"), ("etag", "\"v1\"")]);
        assert!(selected_for_update(&strong, &response(&[("etag", "\"v1\"")])));
        assert!(!selected_for_update(&strong, &response(&[("etag", "\"v2\"")])));
        assert!(!selected_for_update(&strong, &response(&[("etag", "W/\"v2\"")])));
        assert!(selected_for_update(&strong, &response(&[("etag", "W/\"v1\"")])), "weak comparison");
        let weak = stored_with(&[("cache-control", "max-age=1"), ("etag", "W/\"v1\"")]);
        assert!(!selected_for_update(&weak, &response(&[("etag", "\"v1\"")])), "a strong one needs a strong match");
        let unvalidated = stored_with(&[("cache-control", "max-age=1"), ("last-modified", &format_http_date(500))]);
        assert!(!selected_for_update(&unvalidated, &response(&[("etag", "\"new\"")])), "stored has no ETag");
        assert!(selected_for_update(&unvalidated, &response(&[("last-modified", &format_http_date(500))])));
        assert!(!selected_for_update(&unvalidated, &response(&[("last-modified", &format_http_date(900))])));
        assert!(selected_for_update(&unvalidated, &response(&[("cache-control", "max-age=5")])), "no validator");
    }

    /// RFC 9111 4.3.4: header fields of the 304 replace the stored ones, except
    /// those that describe the stored content.
    #[test]
    fn rfc9111_4_3_4_a_304_never_replaces_what_describes_the_content() {
        let c = config("{}");
        let stored = stored_with(&[
            ("cache-control", "max-age=1"),
            ("etag", "\"v1\""),
            ("content-type", "text/plain"),
            ("content-encoding", "gzip"),
            ("content-md5", "Q2hlY2sgSW50ZWdyaXR5IQ=="),
        ]);
        let updated = refreshed(
            &c,
            &stored,
            &response(&[
                ("etag", "\"v1\""),
                ("content-type", "text/html"),
                ("content-encoding", "br"),
                ("content-range", "bytes 0-1/2"),
                ("content-md5", "other"),
                ("content-length", "0"),
            ]),
            2000,
            2000,
        );
        let header = |name: &str| updated.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(header("content-type"), Some("text/html"), "Content-Type is updated");
        assert_eq!(header("content-encoding"), Some("gzip"));
        assert_eq!(header("content-md5"), Some("Q2hlY2sgSW50ZWdyaXR5IQ=="));
        assert_eq!(header("content-range"), None);
        assert_eq!(header("content-length"), None);
    }

    /// RFC 9111 5.1: a list-valued Age (two field lines joined) uses its first member.
    #[test]
    fn rfc9111_5_1_a_list_valued_age_uses_the_first_member() {
        let v = stored_with(&[("cache-control", "max-age=3600"), ("age", "7200,0")]);
        assert!(v.initial_age >= 7200, "initial age {}", v.initial_age);
        assert_eq!(usability(&v, &CacheControl::default(), 1000), Use::Revalidate, "already stale");
        assert_eq!(stored_with(&[("cache-control", "max-age=60"), ("age", "junk")]).initial_age, 0);
    }

    /// RFC 9111 5.2.2.3 and 3: must-understand stores only status codes whose
    /// rules the cache implements, and then overrides no-store.
    #[test]
    fn rfc9111_5_2_2_3_must_understand() {
        let c = config("{}");
        let must =
            |status: u16, cc: &str| storable(&c, &exchange(false), status, &response(&[("cache-control", cc)]), 1000);
        assert_eq!(must(599, "must-understand, max-age=60").unwrap_err(), NotStored::NotUnderstood);
        assert_eq!(must(299, "must-understand, no-store, max-age=60").unwrap_err(), NotStored::NotUnderstood);
        assert!(must(200, "must-understand, no-store, max-age=60").is_ok(), "no-store is overridden");
        assert_eq!(must(200, "no-store, max-age=60").unwrap_err(), NotStored::NoStore);
    }

    /// RFC 9111 4.4 with RFC 9110 9.2.1: every method but the safe ones invalidates.
    #[test]
    fn rfc9111_4_4_every_unsafe_method_invalidates() {
        for method in [&b"GET"[..], b"HEAD", b"OPTIONS", b"TRACE"] {
            assert!(is_safe_method(method));
        }
        for method in [&b"POST"[..], b"PUT", b"PATCH", b"DELETE", b"PROPPATCH", b"LINK", b"MKCOL", b"get"] {
            assert!(!is_safe_method(method), "{}", String::from_utf8_lossy(method));
        }
    }
}
