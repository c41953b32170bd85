//! Request authentication: finds a JWT where the workload's `RequestAuthentication`
//! rules look for it and verifies it against the rule of its issuer. Keys come from the
//! rule's inline `jwks`; fetching `jwksUri` (or OpenID discovery) is not implemented, so
//! a token of such an issuer is rejected rather than trusted. A request without a token
//! is not this module's concern: authorization decides whether one was required.

use std::sync::Arc;

use jsonwebtoken::{DecodingKey, Validation, jwk::Jwk};
use serde_json::Value;

use super::model::{JwtKeys, JwtRule, Named, PolicyRef, RequestAuthentication};

pub(super) type RequestAuthn = Arc<Named<RequestAuthentication>>;

/// The verified content of a JWT, as authorization sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct JwtIdentity {
    /// `<iss>/<sub>`: Istio's request principal.
    pub principal: String,
    /// `aud`, as a list.
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// The whole payload, for `request.auth.claims[..]`.
    pub claims: Value,
}

impl JwtIdentity {
    /// True when the claim at `path` (nested objects) is a string, boolean or list of
    /// strings of which one passes `test`.
    pub(super) fn claim_matches(&self, path: &[String], test: impl Fn(&str) -> bool) -> bool {
        let mut value = &self.claims;
        for key in path {
            match value.get(key) {
                Some(v) => value = v,
                None => return false,
            }
        }
        match value {
            Value::String(s) => test(s),
            Value::Bool(true) => test("true"),
            Value::Bool(false) => test("false"),
            Value::Array(items) => items.iter().any(|i| i.as_str().is_some_and(&test)),
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("issuer {0:?} is not accepted by any RequestAuthentication of the workload")]
    UnknownIssuer(String),
    #[error(
        "the keys of issuer {0:?} come from jwksUri or OpenID discovery, which ambit does not fetch yet"
    )]
    KeysUnavailable(String),
    #[error("no key of issuer {0:?} matches the token's key id")]
    NoKey(String),
    #[error("invalid token of issuer {issuer:?}: {reason}")]
    Invalid { issuer: String, reason: String },
}

/// Verifies `token` against the rules of `policies`. On failure, also returns the policy
/// whose rule rejected it (none when no rule knows the issuer).
pub(super) fn authenticate(
    policies: &[RequestAuthn],
    token: &str,
) -> Result<JwtIdentity, (Option<PolicyRef>, JwtError)> {
    // Reading the issuer before verifying only selects which rule verifies the token.
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| (None, JwtError::Malformed(e.to_string())))?;
    let issuer = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let found = policies.iter().find_map(|p| {
        p.spec
            .jwt_rules
            .iter()
            .find(|r| r.issuer == issuer)
            .map(|r| (p, r))
    });
    let Some((policy, rule)) = found else {
        return Err((None, JwtError::UnknownIssuer(issuer.to_owned())));
    };
    verify(rule, token).map_err(|e| (Some(policy.meta.clone()), e))
}

fn verify(rule: &JwtRule, token: &str) -> Result<JwtIdentity, JwtError> {
    let issuer = &rule.issuer;
    let invalid = |e: jsonwebtoken::errors::Error| JwtError::Invalid {
        issuer: issuer.clone(),
        reason: e.to_string(),
    };
    let JwtKeys::Inline(set) = &rule.keys else {
        return Err(JwtError::KeysUnavailable(issuer.clone()));
    };
    let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
    let candidates: Vec<&Jwk> = match &header.kid {
        Some(kid) => set.find(kid).into_iter().collect(),
        None => set.keys.iter().collect(),
    };
    if candidates.is_empty() {
        return Err(JwtError::NoKey(issuer.clone()));
    }
    let mut validation = Validation::new(header.alg);
    // Istio requires no claim to be present; `exp` and `nbf` are checked when they are.
    validation.required_spec_claims.clear();
    validation.set_issuer(&[issuer]);
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rule.audiences);
    }
    let mut last = None;
    for jwk in candidates {
        let key = match DecodingKey::from_jwk(jwk) {
            Ok(key) => key,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        match jsonwebtoken::decode::<Value>(token, &key, &validation) {
            Ok(data) => return Ok(identity(data.claims)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| JwtError::NoKey(issuer.clone()), invalid))
}

fn identity(claims: Value) -> JwtIdentity {
    let text = |key: &str| claims.get(key).and_then(Value::as_str);
    let principal = format!(
        "{}/{}",
        text("iss").unwrap_or_default(),
        text("sub").unwrap_or_default()
    );
    let audiences = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    JwtIdentity {
        principal,
        audiences,
        presenter: text("azp").map(str::to_owned),
        claims,
    }
}

/// Where the workload's rules look for a token: each rule's `fromHeaders` and
/// `fromParams`, or, for a rule with neither, `Authorization: Bearer` and the
/// `access_token` query parameter. Returns the first token found.
pub fn find_token<'a>(
    policies: &[RequestAuthn],
    headers: &[(&'a str, &'a str)],
    path: &'a str,
) -> Option<&'a str> {
    let header = |name: &str, prefix: Option<&str>| {
        headers.iter().find_map(|(k, v)| {
            if !k.eq_ignore_ascii_case(name) {
                return None;
            }
            match prefix {
                Some(p) => v.strip_prefix(p),
                None => Some(*v),
            }
        })
    };
    let param = |name: &str| {
        let query = path.split_once('?')?.1;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == name && !v.is_empty()).then_some(v)
        })
    };
    for rule in policies.iter().flat_map(|p| &p.spec.jwt_rules) {
        if rule.from_headers.is_empty() && rule.from_params.is_empty() {
            if let Some(t) =
                header("authorization", Some("Bearer ")).or_else(|| param("access_token"))
            {
                return Some(t);
            }
            continue;
        }
        for h in &rule.from_headers {
            if let Some(t) = header(&h.name, h.prefix.as_deref()) {
                return Some(t);
            }
        }
        if let Some(t) = rule.from_params.iter().find_map(|p| param(p)) {
            return Some(t);
        }
    }
    None
}
