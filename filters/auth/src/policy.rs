//! The authentication and authorization decision for one request. Plain Rust:
//! credential checks that need state (keys, caches) come through `Verifier`.

use std::rc::Rc;

use gateway_common::problem::Problem;
use gateway_common::request::RequestHeaders;
use serde_json::Value;

use crate::config::{
    Auth, AuthMethod, Basic, DefaultAction, MethodKind, Optional, Provider, Requirement, Rule, TokenSource,
    API_KEY_METHOD, BASIC_METHOD,
};
use crate::credentials::{check_api_key, find_credential, parse_basic, BasicFailure};
use crate::jwt::{claim_at, JwtError};
use crate::mtls::PeerCertificate;

/// Result of checking one JWT.
#[derive(Debug, Clone, PartialEq)]
pub enum JwtCheck {
    Valid(Rc<Value>),
    Invalid(JwtError),
    /// The provider's remote keys must be fetched before this token can be judged.
    NeedKeys,
    /// The provider's IdP must be asked about this (opaque) token first.
    NeedIntrospection,
    /// The IdP could not answer: the token cannot be judged now.
    Unavailable,
}

/// Stateful credential checks (keys, caches, failure counters).
pub trait Verifier {
    fn verify_jwt(&mut self, provider_index: usize, provider: &Provider, token: &str) -> JwtCheck;
    fn check_basic(&mut self, basic: &Basic, user: &str, password: &str) -> Result<String, BasicFailure>;
    /// The client certificate Envoy verified on this connection; `None` without one.
    fn peer_certificate(&mut self) -> Option<PeerCertificate>;
}

/// Who was let in, by which method, and which credential to strip.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub method: String,
    /// Consumer name, else the token subject.
    pub name: Option<String>,
    pub claims: Option<Rc<Value>>,
    pub provider: Option<usize>,
    /// The credential's location when it must not be forwarded.
    pub strip: Option<TokenSource>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schemes {
    pub bearer: bool,
    pub basic: bool,
    pub api_key: bool,
    pub mtls: bool,
}

impl Schemes {
    /// Only a client certificate would do: no HTTP challenge to send.
    fn only_mtls(&self) -> bool {
        self.mtls && !self.bearer && !self.basic && !self.api_key
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    MultipleAuthorization,
    Missing(Schemes),
    Invalid {
        method: String,
        reason: String,
        code: &'static str,
        schemes: Schemes,
    },
    Locked {
        retry_after_seconds: u64,
    },
    InsufficientScope {
        required: Vec<String>,
    },
    ClaimMismatch {
        claim: String,
    },
    /// The rule's `consumers` / `groups` do not include this identity.
    ConsumerNotAllowed,
    /// The IdP that must judge the token could not answer (introspection).
    Unavailable {
        method: String,
    },
    /// A `deny: true` rule matched.
    DeniedByRule {
        rule: String,
    },
    NoRule,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Allow {
        rule: Option<String>,
        identities: Vec<Identity>,
        result: AuthResult,
    },
    Deny(Denial),
    NeedKeys(usize),
    /// Introspect `token` at provider `usize`'s IdP, then decide again.
    NeedIntrospection(usize, String),
}

/// How an allowed request passed, for `result_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    /// Credentials were verified.
    Authenticated,
    /// No credential was needed or present (anonymous rule, `allow_missing`, no rule, CORS preflight).
    Anonymous,
    /// A credential failed and the rule allows that (`allow_missing_or_failed`).
    Failed,
}

impl AuthResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthResult::Authenticated => "authenticated",
            AuthResult::Anonymous => "anonymous",
            AuthResult::Failed => "failed",
        }
    }
}

enum MethodResult {
    Absent,
    Ok(Identity),
    Failed(Denial),
    NeedKeys(usize),
    NeedIntrospection(usize, String),
}

/// Decides one request.
pub fn decide(auth: &Auth, request: &RequestHeaders, verifier: &mut impl Verifier) -> Outcome {
    // Envoy joins repeated Authorization headers with ','; no credential format
    // we accept contains one, so a comma means several headers.
    if request.count("authorization") > 1 || request.values("authorization").any(|value| value.contains(&b',')) {
        return Outcome::Deny(Denial::MultipleAuthorization);
    }
    if auth.cors_preflight_bypass && request.is_cors_preflight() {
        return Outcome::Allow { rule: None, identities: Vec::new(), result: AuthResult::Anonymous };
    }
    let Some(rule) = auth.rules.iter().find(|rule| rule.conditions.matches(request)) else {
        return match auth.default {
            DefaultAction::Allow => {
                Outcome::Allow { rule: None, identities: Vec::new(), result: AuthResult::Anonymous }
            }
            DefaultAction::Deny => Outcome::Deny(Denial::NoRule),
        };
    };
    let identities = match &rule.requirement {
        Requirement::Anonymous => return anonymous(rule, AuthResult::Anonymous),
        Requirement::Deny => return Outcome::Deny(Denial::DeniedByRule { rule: rule.name.clone() }),
        Requirement::Any(methods) => {
            let schemes = schemes(methods);
            let mut first_failure = None;
            let mut found = None;
            for method in methods {
                match check_method(auth, method, request, verifier) {
                    MethodResult::Absent => {}
                    MethodResult::Ok(identity) => {
                        found = Some(identity);
                        break;
                    }
                    MethodResult::NeedKeys(provider) => return Outcome::NeedKeys(provider),
                    MethodResult::NeedIntrospection(provider, token) => {
                        return Outcome::NeedIntrospection(provider, token)
                    }
                    MethodResult::Failed(denial) => {
                        first_failure.get_or_insert(denial);
                    }
                }
            }
            match (found, first_failure, rule.optional) {
                (Some(identity), _, _) => vec![identity],
                (None, Some(_), Optional::AllowMissingOrFailed) => return anonymous(rule, AuthResult::Failed),
                (None, Some(denial), _) => return Outcome::Deny(with_schemes(denial, schemes)),
                (None, None, Optional::Required) => return Outcome::Deny(Denial::Missing(schemes)),
                (None, None, _) => return anonymous(rule, AuthResult::Anonymous),
            }
        }
        Requirement::All(methods) => {
            let schemes = schemes(methods);
            let mut identities = Vec::new();
            let mut absent = 0;
            for method in methods {
                match check_method(auth, method, request, verifier) {
                    MethodResult::Absent => absent += 1,
                    MethodResult::Ok(identity) => identities.push(identity),
                    MethodResult::NeedKeys(provider) => return Outcome::NeedKeys(provider),
                    MethodResult::NeedIntrospection(provider, token) => {
                        return Outcome::NeedIntrospection(provider, token)
                    }
                    MethodResult::Failed(_) if rule.optional == Optional::AllowMissingOrFailed => {
                        return anonymous(rule, AuthResult::Failed)
                    }
                    MethodResult::Failed(denial) => return Outcome::Deny(with_schemes(denial, schemes)),
                }
            }
            // Every credential missing is "missing"; some of them missing is a failed `all`.
            match (absent, rule.optional) {
                (0, _) => identities,
                (n, Optional::AllowMissing | Optional::AllowMissingOrFailed) if n == methods.len() => {
                    return anonymous(rule, AuthResult::Anonymous)
                }
                (_, Optional::AllowMissingOrFailed) => return anonymous(rule, AuthResult::Failed),
                _ => return Outcome::Deny(Denial::Missing(schemes)),
            }
        }
    };
    if let Some(denial) = authorize(auth, rule, &identities) {
        return Outcome::Deny(denial);
    }
    Outcome::Allow { rule: Some(rule.name.clone()), identities, result: AuthResult::Authenticated }
}

/// A request a rule lets through without a verified identity: no identity
/// headers, and the rule's scopes and claims do not apply (there is nothing to
/// check them on).
fn anonymous(rule: &Rule, result: AuthResult) -> Outcome {
    Outcome::Allow { rule: Some(rule.name.clone()), identities: Vec::new(), result }
}

fn schemes(methods: &[AuthMethod]) -> Schemes {
    Schemes {
        bearer: methods.iter().any(|method| matches!(method.kind, MethodKind::Provider(_))),
        basic: methods.iter().any(|method| method.kind == MethodKind::Basic),
        api_key: methods.iter().any(|method| method.kind == MethodKind::ApiKey),
        mtls: methods.iter().any(|method| method.kind == MethodKind::Mtls),
    }
}

fn with_schemes(denial: Denial, schemes: Schemes) -> Denial {
    match denial {
        Denial::Invalid { method, reason, code, .. } => Denial::Invalid { method, reason, code, schemes },
        other => other,
    }
}

fn invalid(method: &str, reason: impl Into<String>, code: &'static str) -> MethodResult {
    MethodResult::Failed(Denial::Invalid {
        method: method.to_string(),
        reason: reason.into(),
        code,
        schemes: Schemes::default(),
    })
}

fn check_method(
    auth: &Auth,
    method: &AuthMethod,
    request: &RequestHeaders,
    verifier: &mut impl Verifier,
) -> MethodResult {
    let (kind, method) = (method.kind, method.name.as_str());
    if kind == MethodKind::ApiKey {
        let Some(api_keys) = &auth.api_keys else { return MethodResult::Absent };
        return match find_credential(request, &api_keys.sources) {
            None => MethodResult::Absent,
            Some(Err(_)) => invalid(method, "malformed API key", "malformed"),
            Some(Ok(found)) => match check_api_key(api_keys, &found.value) {
                Some(consumer) => MethodResult::Ok(Identity {
                    method: method.to_string(),
                    name: Some(consumer),
                    claims: None,
                    provider: None,
                    strip: (!api_keys.forward_key).then_some(found.source),
                }),
                None => invalid(method, "unknown API key", "unknown_key"),
            },
        };
    }
    if kind == MethodKind::Mtls {
        let Some(mtls) = &auth.mtls else { return MethodResult::Absent };
        let Some(certificate) = verifier.peer_certificate() else { return MethodResult::Absent };
        return match mtls.consumer_for(&certificate) {
            Some(consumer) => MethodResult::Ok(Identity {
                method: method.to_string(),
                name: Some(consumer.to_string()),
                claims: None,
                provider: None,
                strip: None,
            }),
            None => invalid(method, "the client certificate belongs to no consumer", "unknown_certificate"),
        };
    }
    if kind == MethodKind::Basic {
        let Some(basic) = &auth.basic else { return MethodResult::Absent };
        let Some(header) = request.first("authorization") else { return MethodResult::Absent };
        if !header.get(..6).is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"basic ")) {
            return MethodResult::Absent;
        }
        let Some((user, password)) = parse_basic(header) else {
            return invalid(method, "malformed basic credentials", "malformed");
        };
        return match verifier.check_basic(basic, &user, &password) {
            Ok(consumer) => MethodResult::Ok(Identity {
                method: method.to_string(),
                name: Some(consumer),
                claims: None,
                provider: None,
                strip: (!basic.forward_credentials)
                    .then(|| TokenSource::Header { name: "authorization".into(), prefix: None }),
            }),
            Err(BasicFailure::Invalid) => invalid(method, "invalid username or password", "bad_password"),
            Err(BasicFailure::Locked { retry_after_seconds }) => {
                MethodResult::Failed(Denial::Locked { retry_after_seconds })
            }
        };
    }
    let MethodKind::Provider(index) = kind else { return MethodResult::Absent };
    let Some(provider) = auth.providers.get(index) else { return MethodResult::Absent };
    match find_credential(request, &provider.sources) {
        None => MethodResult::Absent,
        Some(Err(_)) => invalid(method, "malformed token: not UTF-8", "malformed"),
        Some(Ok(found)) => match verifier.verify_jwt(index, provider, &found.value) {
            JwtCheck::Valid(claims) => MethodResult::Ok(Identity {
                method: method.to_string(),
                name: subject(&claims),
                claims: Some(claims),
                provider: Some(index),
                strip: (!provider.forward_token).then_some(found.source),
            }),
            JwtCheck::Invalid(error) => invalid(method, error.description(), error.code()),
            JwtCheck::NeedKeys => MethodResult::NeedKeys(index),
            JwtCheck::NeedIntrospection => MethodResult::NeedIntrospection(index, found.value.clone()),
            JwtCheck::Unavailable => MethodResult::Failed(Denial::Unavailable { method: method.to_string() }),
        },
    }
}

/// Who a verified token speaks for: `sub`; for an introspection answer without
/// one (a client-credentials token), its `username`, else its `client_id`.
fn subject(claims: &Value) -> Option<String> {
    ["sub", "username", "client_id"]
        .iter()
        .find_map(|name| claims.get(*name).and_then(Value::as_str))
        .map(str::to_owned)
}

/// Scopes from `scope` (space-separated) or `scp` (array or string).
pub fn scopes(claims: &Value) -> Vec<String> {
    let mut scopes = Vec::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(Value::String(text)) => scopes.extend(text.split_whitespace().map(str::to_owned)),
            Some(Value::Array(values)) => scopes.extend(values.iter().filter_map(Value::as_str).map(str::to_owned)),
            _ => {}
        }
    }
    scopes
}

fn authorize(auth: &Auth, rule: &Rule, identities: &[Identity]) -> Option<Denial> {
    if (!rule.consumers.is_empty() || !rule.groups.is_empty()) && !identities.iter().any(|id| admitted(auth, rule, id))
    {
        return Some(Denial::ConsumerNotAllowed);
    }
    let claims: Vec<&Value> = identities.iter().filter_map(|identity| identity.claims.as_deref()).collect();
    if !rule.scopes.is_empty() {
        let held: Vec<String> = claims.iter().flat_map(|claims| scopes(claims)).collect();
        if !rule.scopes.iter().all(|scope| held.contains(scope)) {
            return Some(Denial::InsufficientScope { required: rule.scopes.clone() });
        }
    }
    for (claim, accepted) in &rule.claims {
        let ok = claims.iter().any(|claims| match claim_at(claims, claim) {
            Some(Value::String(value)) => accepted.contains(value),
            Some(Value::Array(values)) => {
                values.iter().filter_map(Value::as_str).any(|v| accepted.iter().any(|a| a == v))
            }
            Some(Value::Number(number)) => accepted.contains(&number.to_string()),
            Some(Value::Bool(flag)) => accepted.contains(&flag.to_string()),
            _ => false,
        });
        if !ok {
            return Some(Denial::ClaimMismatch { claim: claim.clone() });
        }
    }
    None
}

/// Whether the rule's ACL admits this identity: its consumer name is listed, or
/// one of its groups is (configured groups of API-key and basic consumers; for a
/// token, its provider's `groups_claim`: a string or an array of strings).
fn admitted(auth: &Auth, rule: &Rule, identity: &Identity) -> bool {
    if identity.name.as_ref().is_some_and(|name| rule.consumers.contains(name)) {
        return true;
    }
    if rule.groups.is_empty() {
        return false;
    }
    let member = |group: &str| rule.groups.iter().any(|wanted| wanted == group);
    match (identity.provider, identity.claims.as_deref()) {
        (Some(index), Some(claims)) => {
            let claim = auth.providers.get(index).and_then(|provider| provider.groups_claim.as_deref());
            match claim.and_then(|claim| claim_at(claims, claim)) {
                Some(Value::String(group)) => member(group),
                Some(Value::Array(groups)) => groups.iter().filter_map(Value::as_str).any(member),
                _ => false,
            }
        }
        _ => identity
            .name
            .as_ref()
            .and_then(|name| auth.consumer_groups.get(name))
            .is_some_and(|groups| groups.iter().any(|group| member(group))),
    }
}

/// Text inside a quoted auth-param: only RFC 6750's charset, the rest `%XX`.
/// Reasons can carry token text (`kid`, `alg`) that nobody has verified yet.
fn quoted(text: &str) -> String {
    gateway_common::field::auth_param_text(text)
}

/// The answer for a denial: status, standard headers, problem+json.
pub fn problem(denial: &Denial, realm: &str) -> Problem {
    let challenges = |schemes: &Schemes, error: Option<(&str, &str)>| -> Vec<String> {
        let mut out = Vec::new();
        if schemes.bearer {
            out.push(match error {
                Some((code, description)) => {
                    format!("Bearer realm=\"{realm}\", error=\"{code}\", error_description=\"{}\"", quoted(description))
                }
                None => format!("Bearer realm=\"{realm}\""),
            });
        }
        if schemes.basic {
            out.push(format!("Basic realm=\"{realm}\", charset=\"UTF-8\""));
        }
        if schemes.api_key || out.is_empty() {
            out.push(format!("ApiKey realm=\"{realm}\""));
        }
        out
    };
    let with_challenges = |mut problem: Problem, values: Vec<String>| {
        for value in values {
            problem = problem.with_header("www-authenticate", value);
        }
        problem
    };
    match denial {
        Denial::MultipleAuthorization => Problem::new(
            400,
            "multiple-authorization",
            "Bad Request",
            "the request carries more than one Authorization header",
        ),
        // RFC 9110: a 401 carries a challenge; a client certificate has none.
        Denial::Missing(schemes) if schemes.only_mtls() => Problem::new(
            403,
            "client-certificate-required",
            "Forbidden",
            "this request needs a client certificate the gateway trusts (mutual TLS)",
        ),
        Denial::Invalid { method, reason, schemes, .. } if schemes.only_mtls() => {
            Problem::new(403, "client-certificate-refused", "Forbidden", format!("{method}: {reason}"))
        }
        Denial::Missing(schemes) => with_challenges(
            Problem::new(401, "credentials-missing", "Unauthorized", "this request needs credentials"),
            challenges(schemes, None),
        ),
        Denial::Invalid { method, reason, schemes, .. } => {
            let bearer_error = (schemes.bearer && method != API_KEY_METHOD && method != BASIC_METHOD)
                .then_some(("invalid_token", reason.as_str()));
            with_challenges(
                Problem::new(401, "credentials-invalid", "Unauthorized", format!("{method}: {reason}")),
                challenges(schemes, bearer_error),
            )
        }
        Denial::Locked { retry_after_seconds } => Problem::new(
            429,
            "too-many-failed-logins",
            "Too Many Requests",
            format!("too many failed logins for this user; retry in {retry_after_seconds} s"),
        )
        .with_header("retry-after", retry_after_seconds.to_string()),
        Denial::InsufficientScope { required } => Problem::new(
            403,
            "insufficient-scope",
            "Forbidden",
            format!("this request needs scope {}", required.join(" ")),
        )
        .with_header(
            "www-authenticate",
            format!(
                "Bearer realm=\"{realm}\", error=\"insufficient_scope\", error_description=\"missing scope\", scope=\"{}\"",
                quoted(&required.join(" "))
            ),
        ),
        Denial::ClaimMismatch { claim } => Problem::new(
            403,
            "claim-mismatch",
            "Forbidden",
            format!("claim {claim} does not allow this request"),
        ),
        Denial::ConsumerNotAllowed => Problem::new(
            403,
            "consumer-not-allowed",
            "Forbidden",
            "this consumer is not allowed by the rule".to_string(),
        ),
        Denial::Unavailable { method } => Problem::new(
            503,
            "credentials-unverifiable",
            "Service Unavailable",
            format!("{method}: the identity provider cannot check this token now; retry"),
        )
        .with_header("retry-after", "1"),
        Denial::DeniedByRule { rule } => {
            Problem::new(403, "denied-by-rule", "Forbidden", format!("rule {rule} refuses this request"))
        }
        Denial::NoRule => Problem::new(403, "no-rule", "Forbidden", "no rule allows this request"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthConfig;
    use serde_json::json;

    struct Fake;

    impl Verifier for Fake {
        fn verify_jwt(&mut self, _: usize, _: &Provider, token: &str) -> JwtCheck {
            match token {
                "good" => {
                    JwtCheck::Valid(Rc::new(json!({"sub": "alice", "scope": "orders:read profile", "tenant": "a"})))
                }
                "fetch" => JwtCheck::NeedKeys,
                _ => JwtCheck::Invalid(JwtError::Expired),
            }
        }
        fn check_basic(&mut self, _: &Basic, user: &str, password: &str) -> Result<String, BasicFailure> {
            if (user, password) == ("bob", "pw") {
                Ok("bob".into())
            } else {
                Err(BasicFailure::Invalid)
            }
        }
        fn peer_certificate(&mut self) -> Option<PeerCertificate> {
            None
        }
    }

    fn auth() -> Auth {
        let config: AuthConfig = gateway_common::config::parse_json(
            json!({
                "providers": [{"name": "idp", "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}]}}],
                "api_keys": {"keys": [{"consumer": "acme", "sha256": "0b8a6b3a4a8ce0d1b9a9a6e3b8f1f1d1b3b9f0a5f5f7e0a2c1f3b4a5d6e7f8a9"}]},
                "basic": {"users": [{"username": "bob", "bcrypt": "$2b$04$aaaaaaaaaaaaaaaaaaaaaOsAEeJQ9yZnI6GQbU6mPDHVb0tO3mBtu"}]},
                "rules": [
                    {"name": "health", "match": {"path": {"exact": "/health"}}, "allow_anonymous": true},
                    {"name": "orders", "match": {"path": {"prefix": "/orders"}}, "require": {"any": ["idp"]},
                     "scopes": ["orders:read"], "claims": {"tenant": ["a", "b"]}},
                    {"name": "admin", "match": {"path": {"prefix": "/admin"}}, "require": {"all": ["idp", "basic"]}},
                    {"name": "products", "match": {"path": {"prefix": "/products"}}, "require": {"any": ["api_key", "basic"]}},
                    {"name": "feed", "match": {"path": {"prefix": "/feed"}}, "require": {"any": ["idp"]},
                     "allow_missing": true, "scopes": ["orders:read"]},
                    {"name": "public", "match": {"path": {"prefix": "/public"}}, "require": {"all": ["idp", "basic"]},
                     "allow_missing_or_failed": true}
                ]
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        config.compile().unwrap()
    }

    fn request(pairs: &[(&str, &str)]) -> RequestHeaders {
        gateway_common::testing::request_text(pairs)
    }

    fn decide_for(pairs: &[(&str, &str)]) -> Outcome {
        decide(&auth(), &request(pairs), &mut Fake)
    }

    fn result_of(pairs: &[(&str, &str)]) -> Option<AuthResult> {
        match decide_for(pairs) {
            Outcome::Allow { result, .. } => Some(result),
            _ => None,
        }
    }

    /// Issue 17 item 5: jwt_authn's allow_missing and allow_missing_or_failed.
    #[test]
    fn optional_credentials_pass_anonymously_and_say_so() {
        assert_eq!(result_of(&[(":path", "/feed")]), Some(AuthResult::Anonymous), "no token: anonymous");
        assert_eq!(result_of(&[(":path", "/feed"), ("authorization", "Bearer good")]), Some(AuthResult::Authenticated));
        assert!(
            matches!(
                decide_for(&[(":path", "/feed"), ("authorization", "Bearer old")]),
                Outcome::Deny(Denial::Invalid { code: "expired", .. })
            ),
            "allow_missing: a bad token is still a 401"
        );
        assert_eq!(result_of(&[(":path", "/public")]), Some(AuthResult::Anonymous));
        assert_eq!(result_of(&[(":path", "/public"), ("authorization", "Bearer old")]), Some(AuthResult::Failed));
        assert_eq!(
            result_of(&[(":path", "/public"), ("authorization", "Bearer good")]),
            Some(AuthResult::Failed),
            "`all` with one credential missing is a failure, allowed here"
        );
        assert_eq!(result_of(&[(":path", "/orders")]), None, "required rules are unchanged");
        let Outcome::Allow { identities, .. } = decide_for(&[(":path", "/public"), ("authorization", "Bearer old")])
        else {
            panic!()
        };
        assert!(identities.is_empty(), "no identity for a failed credential");
    }

    #[test]
    fn rules_requirements_and_scopes() {
        assert!(matches!(decide_for(&[(":path", "/health")]), Outcome::Allow { .. }));
        assert!(matches!(decide_for(&[(":path", "/elsewhere")]), Outcome::Deny(Denial::NoRule)));
        let Outcome::Allow { identities, .. } = decide_for(&[(":path", "/orders"), ("authorization", "Bearer good")])
        else {
            panic!()
        };
        assert_eq!(identities[0].name.as_deref(), Some("alice"));
        assert_eq!(
            identities[0].strip,
            Some(TokenSource::Header { name: "authorization".into(), prefix: Some("Bearer ".into()) })
        );
        assert!(matches!(
            decide_for(&[(":path", "/orders"), ("authorization", "Bearer old")]),
            Outcome::Deny(Denial::Invalid { code: "expired", .. })
        ));
        assert!(matches!(
            decide_for(&[(":path", "/orders")]),
            Outcome::Deny(Denial::Missing(Schemes { bearer: true, .. }))
        ));
        assert_eq!(decide_for(&[(":path", "/orders"), ("authorization", "Bearer fetch")]), Outcome::NeedKeys(0));
        assert!(matches!(
            decide_for(&[(":path", "/admin"), ("authorization", "Bearer good")]),
            Outcome::Deny(Denial::Missing(_))
        ));
        assert!(matches!(
            decide_for(&[(":path", "/orders"), ("authorization", "Bearer a"), ("authorization", "Bearer b")]),
            Outcome::Deny(Denial::MultipleAuthorization)
        ));
        assert!(matches!(
            decide_for(&[(":path", "/products"), ("authorization", "Basic Ym9iOnB3")]),
            Outcome::Allow { .. }
        ));
        assert!(matches!(
            decide_for(&[(":path", "/products"), ("authorization", "Basic Ym9iOm5v")]),
            Outcome::Deny(Denial::Invalid { code: "bad_password", .. })
        ));
        assert!(matches!(
            decide_for(&[
                (":method", "OPTIONS"),
                (":path", "/orders"),
                ("origin", "https://a"),
                ("access-control-request-method", "GET")
            ]),
            Outcome::Allow { .. }
        ));
    }

    #[test]
    fn token_text_never_breaks_the_challenge() {
        let problem = problem(
            &Denial::Invalid {
                method: "idp".into(),
                reason: "unknown kid `a\"\r\nSet-Cookie: x=1\r\n\r\n\u{0}\u{7f}é\\`".into(),
                code: "invalid",
                schemes: Schemes { bearer: true, basic: false, api_key: false, mtls: false },
            },
            "gw",
        );
        let value = &problem.headers[0].1;
        assert!(gateway_common::field::is_field_value(value.as_bytes()), "{value:?}");
        let description = value.split("error_description=\"").nth(1).unwrap().strip_suffix('"').unwrap();
        assert!(description.bytes().all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5b | 0x5d..=0x7e)), "{description}");
        assert!(description.contains("%0D%0ASet-Cookie"), "{description}");
    }

    #[test]
    fn answers_carry_the_standard_challenges() {
        let problem = problem(
            &Denial::Invalid {
                method: "idp".into(),
                reason: "token expired".into(),
                code: "expired",
                schemes: Schemes { bearer: true, basic: false, api_key: false, mtls: false },
            },
            "gw",
        );
        assert_eq!(problem.status, 401);
        assert_eq!(
            problem.headers,
            vec![(
                "www-authenticate".to_string(),
                "Bearer realm=\"gw\", error=\"invalid_token\", error_description=\"token expired\"".to_string()
            )]
        );
        let scope = super::problem(&Denial::InsufficientScope { required: vec!["a".into(), "b".into()] }, "gw");
        assert_eq!(scope.status, 403);
        assert!(
            scope.headers[0].1.contains("error=\"insufficient_scope\"") && scope.headers[0].1.contains("scope=\"a b\"")
        );
    }

    #[test]
    fn config_errors_name_fields() {
        let cases = [
            (json!({"providers": [{"name": "a", "jwks": {"keys": []}}]}), "providers[0].jwks"),
            (
                json!({"providers": [{"name": "a", "algorithms": ["HS999"], "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}}]}),
                "providers[0].algorithms[0]",
            ),
            (json!({"api_keys": {"keys": [{"consumer": "a", "sha256": "plaintext-key"}]}}), "api_keys.keys[0].sha256"),
            (json!({"rules": [{"name": "r", "require": {"any": ["ghost"]}}]}), "rules[0].require[0]"),
            (
                json!({"basic": {"users": [{"username": "u", "bcrypt": "$2b$15$aaaaaaaaaaaaaaaaaaaaaOsAEeJQ9yZnI6GQbU6mPDHVb0tO3mBtu"}]}}),
                "basic.users[0].bcrypt",
            ),
            (json!({"providers": [{"name": "a", "audiance": ["x"], "jwks": {"keys": []}}]}), "providers[0]"),
        ];
        for (json, field) in cases {
            let errors = match gateway_common::config::parse_json::<AuthConfig>(json.to_string().as_bytes()) {
                Ok(config) => config.compile().unwrap_err(),
                Err(errors) => errors,
            };
            assert!(errors.messages().iter().any(|m| m.starts_with(field)), "{json}: {errors:?}");
        }
    }
}
