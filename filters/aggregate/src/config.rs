//! aggregate.wasm configuration: composite endpoints and their parts.

use std::collections::BTreeSet;

use gateway_common::config::ConfigErrors;
use gateway_common::request_match::is_lower_case_header_name;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    pub endpoints: Vec<EndpointSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub name: String,
    #[serde(default = "default_method")]
    pub method: String,
    /// Path template, e.g. `/dashboard/{userId}`: `{name}` matches one segment.
    pub path: String,
    pub parts: Vec<PartSpec>,
    /// Failed optional parts: `omit` them or set them to `null`.
    #[serde(default)]
    pub missing: Missing,
    /// Limit for all part bodies together.
    #[serde(default = "default_total_bytes")]
    pub max_total_bytes: usize,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    #[default]
    Omit,
    Null,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartSpec {
    pub name: String,
    /// Envoy cluster to call.
    pub cluster: String,
    #[serde(default = "default_method")]
    pub method: String,
    /// Path template: `{param}` (path parameter), `{query.name}`, `{header.name}`.
    pub path: String,
    /// `:authority` of the call; defaults to the cluster name.
    pub authority: Option<String>,
    /// Where the part's JSON goes: a member name, or `null` to merge its
    /// members at the root.
    pub key: Option<String>,
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Request headers copied to the part call (e.g. `x-user-id`, `authorization`).
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// Keep only these top-level fields of the part's JSON object.
    pub fields: Option<Vec<String>>,
    #[serde(default = "default_part_bytes")]
    pub max_bytes: usize,
}

fn default_method() -> String {
    "GET".into()
}
fn default_true() -> bool {
    true
}
fn default_timeout() -> u64 {
    2_000
}
fn default_part_bytes() -> usize {
    1024 * 1024
}
fn default_total_bytes() -> usize {
    4 * 1024 * 1024
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Literal(String),
    PathParam(String),
    Query(String),
    Header(String),
}

#[derive(Debug, Clone)]
pub struct Part {
    pub spec: PartSpec,
    pub template: Vec<Piece>,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub method: String,
    /// Path segments: `Some(literal)` or `None` for a parameter (names in `params`).
    pub segments: Vec<Result<String, String>>,
    pub parts: Vec<Part>,
    pub missing: Missing,
    pub max_total_bytes: usize,
}

impl AggregateConfig {
    pub fn compile(&self) -> Result<Vec<Endpoint>, ConfigErrors> {
        let mut errors = ConfigErrors::new();
        if self.endpoints.is_empty() {
            errors.add("endpoints", "must list at least one endpoint");
        }
        let mut endpoints = Vec::new();
        for (index, spec) in self.endpoints.iter().enumerate() {
            if let Some(endpoint) = spec.compile(&format!("endpoints[{index}]"), &mut errors) {
                endpoints.push(endpoint);
            }
        }
        errors.into_result(endpoints)
    }
}

impl EndpointSpec {
    fn compile(&self, field: &str, errors: &mut ConfigErrors) -> Option<Endpoint> {
        if self.name.is_empty() {
            errors.add(format!("{field}.name"), "must not be empty");
        }
        check_method(&self.method, &format!("{field}.method"), errors);
        if !self.path.starts_with('/') {
            errors.add(format!("{field}.path"), "must start with '/'");
        }
        let mut params = BTreeSet::new();
        let segments: Vec<Result<String, String>> = self
            .path
            .split('/')
            .skip(1)
            .map(|segment| match segment.strip_prefix('{').and_then(|rest| rest.strip_suffix('}')) {
                Some(name) => {
                    if name.is_empty() || !params.insert(name.to_string()) {
                        errors.add(format!("{field}.path"), format!("parameter `{{{name}}}` is empty or repeated"));
                    }
                    Err(name.to_string())
                }
                None => Ok(segment.to_string()),
            })
            .collect();
        if self.parts.is_empty() {
            errors.add(format!("{field}.parts"), "must list at least one part");
        }
        let mut names = BTreeSet::new();
        let mut keys = BTreeSet::new();
        let mut parts = Vec::new();
        for (index, spec) in self.parts.iter().enumerate() {
            let part_field = format!("{field}.parts[{index}]");
            if spec.name.is_empty() || spec.name.contains(',') || !names.insert(spec.name.as_str()) {
                errors.add(format!("{part_field}.name"), "must be non-empty, unique and without ','");
            } else {
                // Named in the `x-aggregate-partial` header.
                errors.check_header_value(format!("{part_field}.name"), &spec.name);
            }
            if let Some(key) = &spec.key {
                if key.is_empty() || key == "_partial" || !keys.insert(key.as_str()) {
                    errors.add(format!("{part_field}.key"), format!("duplicate or reserved merge key `{key}`"));
                }
            }
            if spec.cluster.is_empty() || !spec.cluster.bytes().all(|byte| (0x21..=0x7e).contains(&byte)) {
                errors.add(format!("{part_field}.cluster"), "must name an Envoy cluster (printable ASCII, no spaces)");
            }
            match &spec.authority {
                Some(authority) => {
                    errors.check_authority(format!("{part_field}.authority"), authority);
                }
                // The cluster name is the default authority.
                None if !spec.cluster.is_empty() && !gateway_common::request::is_authority(spec.cluster.as_bytes()) => {
                    errors.add(
                        format!("{part_field}.authority"),
                        "needed: the cluster name is not a valid authority (RFC 3986 characters only)",
                    );
                }
                None => {}
            }
            check_method(&spec.method, &format!("{part_field}.method"), errors);
            if !(1..=60_000).contains(&spec.timeout_ms) {
                errors.add(format!("{part_field}.timeout_ms"), "must be between 1 and 60000");
            }
            if spec.max_bytes == 0 {
                errors.add(format!("{part_field}.max_bytes"), "must be above zero");
            }
            for (header_index, header) in spec.forward_headers.iter().enumerate() {
                if !is_lower_case_header_name(header) || header.starts_with(':') {
                    errors.add(
                        format!("{part_field}.forward_headers[{header_index}]"),
                        "must be a lower-case header name",
                    );
                }
            }
            let template = parse_template(&spec.path, &params, &format!("{part_field}.path"), errors);
            parts.push(Part { spec: spec.clone(), template });
        }
        Some(Endpoint {
            name: self.name.clone(),
            method: self.method.clone(),
            segments,
            parts,
            missing: self.missing,
            max_total_bytes: self.max_total_bytes,
        })
    }
}

fn check_method(method: &str, field: &str, errors: &mut ConfigErrors) {
    errors.check_method(field, method);
}

/// Parses `/users/{userId}?tenant={header.x-tenant}` against the endpoint's parameters.
fn parse_template(template: &str, params: &BTreeSet<String>, field: &str, errors: &mut ConfigErrors) -> Vec<Piece> {
    if !template.starts_with('/') {
        errors.add(field, "must start with '/'");
    }
    let mut pieces = Vec::new();
    let mut rest = template;
    let literal_ok = |text: &str| text.bytes().all(|byte| (0x21..=0x7e).contains(&byte));
    if !literal_ok(&template.replace(['{', '}'], "")) {
        errors.add(field, "must be printable ASCII without spaces (percent-encode other bytes)");
    }
    while let Some(open) = rest.find('{') {
        let (literal, after) = rest.split_at(open);
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal.to_string()));
        }
        let Some(close) = after.find('}') else {
            errors.add(field, "unclosed `{`");
            return pieces;
        };
        let name = after.get(1..close).unwrap_or_default();
        let piece = if let Some(query) = name.strip_prefix("query.") {
            Piece::Query(query.to_string())
        } else if let Some(header) = name.strip_prefix("header.") {
            Piece::Header(header.to_ascii_lowercase())
        } else if params.contains(name) {
            Piece::PathParam(name.to_string())
        } else {
            errors.add(field, format!("unknown parameter `{{{name}}}` (not in the endpoint path, nor query./header.)"));
            Piece::Literal(String::new())
        };
        pieces.push(piece);
        rest = after.get(close + 1..).unwrap_or_default();
    }
    if !rest.is_empty() {
        pieces.push(Piece::Literal(rest.to_string()));
    }
    pieces
}
