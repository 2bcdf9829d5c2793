//! Client-certificate identity (mutual TLS): the consumer is taken from the
//! certificate Envoy verified on the downstream connection, by subject, SAN
//! (SPIFFE IDs) or fingerprint. Plain Rust; the glue reads Envoy's `connection.*`
//! properties into a [`PeerCertificate`].

use serde::Deserialize;

use gateway_common::config::ConfigErrors;

/// The method name rules use: `"require": {"any": ["mtls"]}`.
pub const MTLS_METHOD: &str = "mtls";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSpec {
    /// Ordered; the first entry the certificate matches names the consumer.
    pub consumers: Vec<CertificateConsumerSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConsumerSpec {
    pub consumer: String,
    /// The subject as Envoy gives it (RFC 2253: `CN=billing,O=Example`).
    pub subject: Option<String>,
    /// The certificate's first URI SAN, exactly (a SPIFFE ID).
    pub uri_san: Option<String>,
    /// The first URI SAN starts with this (ends with `/`: a SPIFFE path prefix).
    pub uri_san_prefix: Option<String>,
    /// The certificate's first DNS SAN, exactly.
    pub dns_san: Option<String>,
    /// SHA-256 of the certificate (DER), hex, with or without `:` separators.
    pub sha256: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CertificateMatch {
    Subject(String),
    UriSan(String),
    UriSanPrefix(String),
    DnsSan(String),
    /// Lower-case hex, no separators (as Envoy's property).
    Sha256(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CertificateConsumer {
    consumer: String,
    matcher: CertificateMatch,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mtls {
    consumers: Vec<CertificateConsumer>,
}

/// What Envoy says about the client certificate it verified (Envoy's
/// `connection.subject_peer_certificate`, `uri_san_peer_certificate`,
/// `dns_san_peer_certificate`, `sha256_peer_certificate_digest`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCertificate {
    pub subject: Option<Vec<u8>>,
    pub uri_san: Option<Vec<u8>>,
    pub dns_san: Option<Vec<u8>>,
    pub sha256: Option<Vec<u8>>,
}

impl MtlsSpec {
    pub fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<Mtls> {
        let errors_before = errors.messages().len();
        if self.consumers.is_empty() {
            errors.add(format!("{field}.consumers"), "must list at least one consumer");
        }
        let consumers = self
            .consumers
            .iter()
            .enumerate()
            .filter_map(|(index, spec)| spec.compile(&format!("{field}.consumers[{index}]"), errors))
            .collect();
        (errors.messages().len() == errors_before).then_some(Mtls { consumers })
    }
}

impl CertificateConsumerSpec {
    fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<CertificateConsumer> {
        // The consumer name goes into the consumer header.
        if self.consumer.is_empty() || !errors.check_header_value(format!("{field}.consumer"), &self.consumer) {
            if self.consumer.is_empty() {
                errors.add(format!("{field}.consumer"), "must not be empty");
            }
            return None;
        }
        let given = [
            self.subject.clone().map(CertificateMatch::Subject),
            self.uri_san.clone().map(CertificateMatch::UriSan),
            self.uri_san_prefix.clone().map(CertificateMatch::UriSanPrefix),
            self.dns_san.clone().map(CertificateMatch::DnsSan),
            self.sha256.as_deref().map(|hex| CertificateMatch::Sha256(hex.replace(':', "").to_ascii_lowercase())),
        ];
        let mut given: Vec<CertificateMatch> = given.into_iter().flatten().collect();
        if given.len() != 1 {
            errors.add(field, "needs exactly one of subject, uri_san, uri_san_prefix, dns_san, sha256");
            return None;
        }
        let matcher = given.pop()?;
        let problem = match &matcher {
            CertificateMatch::Sha256(hex) if hex.len() != 64 || !hex.bytes().all(|byte| byte.is_ascii_hexdigit()) => {
                Some(("sha256", "must be 32 bytes in hex (64 digits, `:` separators allowed)"))
            }
            CertificateMatch::UriSanPrefix(prefix) if !prefix.contains("://") || !prefix.ends_with('/') => {
                Some(("uri_san_prefix", "must be a URI ending with `/` (e.g. spiffe://example.org/ns/prod/)"))
            }
            CertificateMatch::Subject(text)
            | CertificateMatch::UriSan(text)
            | CertificateMatch::UriSanPrefix(text)
            | CertificateMatch::DnsSan(text)
                if text.is_empty() || !text.bytes().all(|byte| (0x20..=0x7e).contains(&byte)) =>
            {
                Some(("value", "must be non-empty printable ASCII"))
            }
            _ => None,
        };
        if let Some((name, reason)) = problem {
            errors.add(format!("{field}.{name}"), reason);
            return None;
        }
        Some(CertificateConsumer { consumer: self.consumer.clone(), matcher })
    }
}

impl Mtls {
    /// The consumer of the first entry the certificate matches.
    pub fn consumer_for(&self, certificate: &PeerCertificate) -> Option<&str> {
        let is = |value: &Option<Vec<u8>>, expected: &str| value.as_deref() == Some(expected.as_bytes());
        self.consumers
            .iter()
            .find(|entry| match &entry.matcher {
                CertificateMatch::Subject(subject) => is(&certificate.subject, subject),
                CertificateMatch::UriSan(uri) => is(&certificate.uri_san, uri),
                CertificateMatch::UriSanPrefix(prefix) => {
                    certificate.uri_san.as_deref().is_some_and(|uri| uri.starts_with(prefix.as_bytes()))
                }
                CertificateMatch::DnsSan(name) => is(&certificate.dns_san, name),
                CertificateMatch::Sha256(hex) => {
                    certificate.sha256.as_deref().is_some_and(|digest| digest.eq_ignore_ascii_case(hex.as_bytes()))
                }
            })
            .map(|entry| entry.consumer.as_str())
    }
}

/// Envoy's `connection.mtls`: a serialized bool (one byte, 1 for true).
pub fn is_true(property: &[u8]) -> bool {
    property == [1] || property == b"true"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mtls(json: &str) -> Result<Mtls, Vec<String>> {
        let spec: MtlsSpec = serde_json::from_str(json).unwrap();
        let mut errors = ConfigErrors::new();
        spec.compile("mtls", &mut errors).ok_or_else(|| errors.messages().to_vec())
    }

    fn certificate(subject: &str, uri: Option<&str>, sha256: &str) -> PeerCertificate {
        PeerCertificate {
            subject: Some(subject.as_bytes().to_vec()),
            uri_san: uri.map(|uri| uri.as_bytes().to_vec()),
            dns_san: None,
            sha256: Some(sha256.as_bytes().to_vec()),
        }
    }

    const DIGEST: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

    #[test]
    fn the_first_matching_entry_names_the_consumer() {
        let mtls = mtls(&format!(
            r#"{{"consumers": [
                {{"consumer": "billing", "uri_san": "spiffe://example.org/ns/billing/sa/api"}},
                {{"consumer": "prod", "uri_san_prefix": "spiffe://example.org/ns/prod/"}},
                {{"consumer": "ops", "sha256": "{}"}},
                {{"consumer": "partner", "subject": "CN=partner,O=Partner Inc"}}]}}"#,
            DIGEST
                .to_uppercase()
                .as_bytes()
                .chunks(2)
                .map(|pair| String::from_utf8_lossy(pair))
                .collect::<Vec<_>>()
                .join(":")
        ))
        .unwrap();
        let other = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
        let of = |cert: PeerCertificate| mtls.consumer_for(&cert).map(str::to_string);
        assert_eq!(
            of(certificate("CN=x", Some("spiffe://example.org/ns/billing/sa/api"), other)),
            Some("billing".into())
        );
        assert_eq!(of(certificate("CN=x", Some("spiffe://example.org/ns/prod/sa/web"), other)), Some("prod".into()));
        assert_eq!(of(certificate("CN=x", Some("spiffe://example.org/ns/production/sa/web"), other)), None);
        assert_eq!(of(certificate("CN=x", None, DIGEST)), Some("ops".into()));
        assert_eq!(of(certificate("CN=partner,O=Partner Inc", None, other)), Some("partner".into()));
        assert_eq!(of(certificate("CN=partner,O=Partner Inc,OU=x", None, other)), None);
        assert_eq!(of(PeerCertificate::default()), None);
    }

    #[test]
    fn bad_entries_are_refused_naming_the_field() {
        for (json, field) in [
            (r#"{"consumers": []}"#, "mtls.consumers"),
            (r#"{"consumers": [{"consumer": "a"}]}"#, "mtls.consumers[0]: needs exactly one"),
            (
                r#"{"consumers": [{"consumer": "a", "subject": "CN=a", "sha256": "00"}]}"#,
                "mtls.consumers[0]: needs exactly one",
            ),
            (r#"{"consumers": [{"consumer": "a", "sha256": "abcd"}]}"#, "mtls.consumers[0].sha256"),
            (
                r#"{"consumers": [{"consumer": "a", "uri_san_prefix": "spiffe://example.org/ns"}]}"#,
                "mtls.consumers[0].uri_san_prefix",
            ),
            (r#"{"consumers": [{"consumer": "a", "subject": ""}]}"#, "mtls.consumers[0].value"),
            (r#"{"consumers": [{"consumer": "a\r\nx", "subject": "CN=a"}]}"#, "mtls.consumers[0].consumer"),
            (r#"{"consumers": [{"consumer": "", "subject": "CN=a"}]}"#, "mtls.consumers[0].consumer"),
        ] {
            let errors = mtls(json).unwrap_err();
            assert!(errors.iter().any(|error| error.starts_with(field)), "{json}: {errors:?}");
        }
    }

    #[test]
    fn the_mtls_property_is_a_serialized_bool() {
        assert!(is_true(&[1]) && is_true(b"true"));
        assert!(!is_true(&[0]) && !is_true(b"") && !is_true(b"false"));
    }
}
