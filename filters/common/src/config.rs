//! Configuration parsing shared by the filters: strict JSON (unknown fields are
//! errors), every error naming the field it is about.

use serde::de::DeserializeOwned;

use crate::host::{self, LogLevel};

/// Errors collected while validating a configuration, each naming its field.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigErrors(Vec<String>);

impl ConfigErrors {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` is invalid because of `reason`.
    pub fn add(&mut self, field: impl AsRef<str>, reason: impl AsRef<str>) {
        self.0.push(format!("{}: {}", field.as_ref(), reason.as_ref()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn messages(&self) -> &[String] {
        &self.0
    }

    /// `Ok(value)` when nothing was recorded.
    pub fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

/// Config values that end up in headers, paths or authorities are checked at load
/// with the same rules `field.rs` applies when writing (one source of truth).
impl ConfigErrors {
    /// A header name: a lower-case RFC 9110 token.
    pub fn check_header_name(&mut self, field: impl AsRef<str>, name: &str) -> bool {
        let ok = crate::field::is_header_name(name) && !name.starts_with(':');
        if !ok {
            self.add(field, "must be a lower-case header name (RFC 9110 token characters)");
        }
        ok
    }

    /// A header value: visible ASCII with inner spaces (no CR, LF, NUL, DEL or non-ASCII).
    pub fn check_header_value(&mut self, field: impl AsRef<str>, value: &str) -> bool {
        let ok = crate::field::is_field_value(value.as_bytes());
        if !ok {
            self.add(field, "must be a valid header value: visible ASCII, no control characters");
        }
        ok
    }

    /// A URI authority (`host[:port]`), non-empty.
    pub fn check_authority(&mut self, field: impl AsRef<str>, value: &str) -> bool {
        let ok = !value.is_empty() && crate::request::is_authority(value.as_bytes());
        if !ok {
            self.add(field, "must be a host[:port] authority (RFC 3986 characters only)");
        }
        ok
    }

    /// Exactly one of the named options is given; the error lists them.
    pub fn check_exactly_one(&mut self, field: impl AsRef<str>, options: &[(&str, bool)]) -> bool {
        let ok = options.iter().filter(|(_, given)| *given).count() == 1;
        if !ok {
            let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
            self.add(field, format!("needs exactly one of {}", names.join(", ")));
        }
        ok
    }

    /// A name that is non-empty and not used before in `seen` (`what` names the kind).
    pub fn check_unique_name(
        &mut self,
        field: impl AsRef<str>,
        name: &str,
        what: &str,
        seen: &mut std::collections::BTreeSet<String>,
    ) -> bool {
        if name.is_empty() {
            self.add(field, "must not be empty");
            false
        } else if !seen.insert(name.to_string()) {
            self.add(field, format!("duplicate {what} `{name}`"));
            false
        } else {
            true
        }
    }

    /// An HTTP method as matched on the wire: upper-case letters and `-` (every
    /// standard and WebDAV method; RFC 9110 methods are case-sensitive tokens).
    pub fn check_method(&mut self, field: impl AsRef<str>, method: &str) -> bool {
        let ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
        if !ok {
            self.add(field, "must be an upper-case method name");
        }
        ok
    }

    /// A request target: printable ASCII starting with `/`.
    pub fn check_path(&mut self, field: impl AsRef<str>, value: &str) -> bool {
        let ok = crate::request::check_target(value.as_bytes()).is_ok() && value.starts_with('/');
        if !ok {
            self.add(field, "must be a path: printable ASCII starting with '/', no spaces");
        }
        ok
    }
}

/// Parses the plugin configuration JSON. An empty configuration parses as `{}`.
/// The error names the path of the offending field, e.g.
/// `routes[2].match.headers[0].regex: ...`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigErrors> {
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    // serde would also fill a struct from a JSON array (`[]`): only an object is a configuration.
    if text.iter().find(|byte| !byte.is_ascii_whitespace()) != Some(&b'{') {
        let mut errors = ConfigErrors::new();
        errors.add("(configuration)", "must be a JSON object");
        return Err(errors);
    }
    let mut errors = ConfigErrors::new();
    let mut document: serde_json::Value = match serde_json::from_slice(text) {
        Ok(document) => document,
        Err(error) => {
            errors.add("(configuration)", format!("not valid JSON: {error}"));
            return Err(errors);
        }
    };
    integral_floats_as_integers(&mut document);
    match serde_path_to_error::deserialize::<_, T>(document) {
        Ok(value) => Ok(value),
        Err(error) => {
            let path = error.path().to_string();
            let field = if path == "." { "(configuration)".to_string() } else { path };
            errors.add(field, error.into_inner().to_string());
            Err(errors)
        }
    }
}

/// Istio hands `pluginConfig` over as JSON made from a protobuf Struct, where every
/// number is a double: `10` arrives as `10.0`. A number with no fractional part is
/// read as the integer it is, so integer fields accept it; `1.5` still is no
/// integer.
fn integral_floats_as_integers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(number) => {
            if let Some(float) = number.as_f64().filter(|_| number.is_f64()) {
                // Exactly representable range only (|x| <= 2^53).
                if float.fract() == 0.0 && float.abs() <= 9_007_199_254_740_992.0 {
                    #[allow(clippy::cast_possible_truncation)]
                    let integer = float as i64;
                    *value = Value::from(integer);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        Value::Object(members) => members.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

/// The first 16 hex digits of the configuration's SHA-256: equal digests, equal
/// configurations (as the host handed them over).
pub fn config_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().take(8).map(|byte| format!("{byte:02x}")).collect()
}

/// The `on_configure` step every filter shares: reads the plugin configuration,
/// parses it strictly, compiles it, and logs one line per problem (each naming
/// its field), or one line with the module version and the configuration's
/// digest when it is accepted. `None` means "refuse this configuration".
pub fn load_plugin_config<C: DeserializeOwned, T>(
    module: &str,
    compile: impl FnOnce(&C) -> Result<T, ConfigErrors>,
) -> Option<T> {
    let skipped = host::define_metric(host::MetricType::Counter, &format!("{module}.header_values_skipped"));
    crate::field::count_skipped_in(skipped.ok());
    let bytes = match host::plugin_configuration() {
        Ok(bytes) => bytes,
        Err(error) => {
            host::log(LogLevel::Error, &format!("{module}: cannot read plugin configuration: {error:?}"));
            return None;
        }
    };
    match parse_json::<C>(&bytes).and_then(|config| compile(&config)) {
        Ok(compiled) => {
            // One line per VM start: which build runs which configuration.
            host::log(
                LogLevel::Info,
                &format!(
                    "{module} {}: configuration accepted, sha256 {}",
                    env!("CARGO_PKG_VERSION"),
                    config_digest(&bytes)
                ),
            );
            Some(compiled)
        }
        Err(errors) => {
            for message in errors.messages() {
                host::log(LogLevel::Error, &format!("{module}: invalid configuration: {message}"));
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[allow(dead_code)]
        audience: String,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[allow(dead_code)]
        providers: Vec<Inner>,
    }

    #[test]
    fn unknown_field_names_its_path() {
        let error = parse_json::<Outer>(br#"{"providers":[{"audiance":"x"}]}"#).unwrap_err();
        let message = &error.messages()[0];
        assert!(message.starts_with("providers[0]"), "{message}");
        assert!(message.contains("audiance"), "{message}");
    }

    #[test]
    fn empty_configuration_is_an_empty_object() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Empty {}
        assert!(parse_json::<Empty>(b"").is_ok());
        assert!(parse_json::<Empty>(b"  \n").is_ok());
    }

    #[test]
    fn integral_doubles_are_integers_as_istio_sends_them() {
        #[derive(Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct Limits {
            requests: u64,
            burst: Option<u32>,
            ratio: f64,
        }
        let parsed = parse_json::<Limits>(br#"{"requests": 10.0, "burst": 2.0, "ratio": 0.5}"#).unwrap();
        assert_eq!((parsed.requests, parsed.burst, parsed.ratio), (10, Some(2), 0.5));
        let error = parse_json::<Limits>(br#"{"requests": 1.5, "ratio": 1}"#).unwrap_err();
        assert!(error.messages()[0].starts_with("requests"), "{error:?}");
        let error = parse_json::<Limits>(br#"{"requests": -1.0, "ratio": 1}"#).unwrap_err();
        assert!(error.messages()[0].starts_with("requests"), "{error:?}");
        assert!(parse_json::<Limits>(br#"{"requests": 1} x"#).is_err(), "trailing characters");
    }

    #[test]
    fn only_an_object_is_a_configuration() {
        #[derive(Deserialize, Debug)]
        struct Lenient {}
        for bad in [&b"[]"[..], b"  []", b"1", b"\"x\"", b"null"] {
            let error = parse_json::<Lenient>(bad).unwrap_err();
            assert!(error.messages()[0].contains("must be a JSON object"), "{error:?}");
        }
    }
}
