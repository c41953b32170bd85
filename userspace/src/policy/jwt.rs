//! Request authentication: finds a JWT where the workload's `RequestAuthentication`
//! rules look for it ([`extract`]), verifies it against the rule of its issuer, and edits
//! the request as that rule says. Keys come from the rule's inline `jwks` or, for
//! `jwksUri`, from a [`RemoteKeys`] the agent plugs in; this module never fetches
//! anything itself. OpenID discovery (a rule with neither) is not supported: its tokens
//! are rejected. A request without a token is not this module's concern: authorization
//! decides whether one was required.

mod cache;
mod extract;

use std::{collections::BTreeSet, fmt, sync::Arc, time::Duration};

use http::{HeaderName, HeaderValue, request::Parts};
use jsonwebtoken::{
    DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{Jwk, JwkSet},
};
use serde_json::Value;

use self::extract::Location;
use super::{
    PolicyObject, PolicySpec,
    model::{JwtKeys, JwtRule, Named, PolicyRef, RequestAuthentication},
};

pub(super) type RequestAuthn = Arc<Named<RequestAuthentication>>;

/// How far `exp` and `nbf` may be off when nothing else is configured: the seed's
/// 5-second token must fail a few seconds after it expires, not a minute later (the
/// `jsonwebtoken` default).
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(1);

/// Key sets of `jwksUri` rules, kept by someone who fetches them (the agent's
/// `jwks` module). Called on the data path for every request with such a token, so it
/// never blocks and never does I/O.
pub trait RemoteKeys: Send + Sync {
    /// The key set of `uri`, for a token whose header names `kid`. When `kid` is not in
    /// the set, the implementation refetches it in the background (rate-limited) and
    /// still answers with what it has: this request fails, a later one sees a rotated
    /// key. It never answers with keys of another URI or with keys it no longer trusts.
    fn lookup(&self, uri: &str, kid: Option<&str>) -> Result<Arc<JwkSet>, KeysError>;
}

/// Why a `jwksUri` key set cannot be used. Every case rejects the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    /// Nothing fetches this URI: the offline `explain`, or a URI that left the
    /// configuration.
    #[error("{uri} is not fetched by this process")]
    NotFetched { uri: String },
    /// The first fetch has not finished yet.
    #[error("{uri} is still being fetched")]
    Pending { uri: String },
    /// No fetch has ever succeeded.
    #[error("{uri} could not be fetched: {cause}")]
    FetchFailed { uri: String, cause: String },
    /// Fetched once, but refreshes have failed for longer than the set may be used.
    #[error("{uri} was last fetched {}s ago and could not be refreshed since: {cause}", age.as_secs())]
    Stale {
        uri: String,
        age: Duration,
        cause: String,
    },
}

/// Why a present token is rejected (HTTP 401, with this as the reason).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token: {0}")]
    Malformed(String),
    /// No rule of the workload has the token's issuer, or none that reads the token
    /// where it was found (Envoy's "Jwt issuer is not configured").
    #[error(
        "issuer {issuer:?} is not accepted{} by any RequestAuthentication of the workload",
        location.as_ref().map(|l| format!(" in {l}")).unwrap_or_default()
    )]
    UnknownIssuer {
        issuer: String,
        location: Option<String>,
    },
    /// Boxed: a rejection travels in every `Denied`, which stays small.
    #[error("the keys of issuer {issuer:?} are unavailable: {source}")]
    KeysUnavailable {
        issuer: String,
        source: Box<KeysError>,
    },
    #[error("issuer {0:?} has neither jwks nor jwksUri; OpenID discovery is not supported")]
    DiscoveryUnsupported(String),
    #[error(
        "no key of issuer {issuer:?} matches the token's key id {}",
        kid.as_deref().unwrap_or("(none)")
    )]
    UnknownKey { issuer: String, kid: Option<String> },
    #[error("the token of issuer {0:?} has expired")]
    Expired(String),
    #[error("the token of issuer {0:?} is not valid yet (nbf)")]
    NotYetValid(String),
    #[error("the token's audience is not one of issuer {0:?}'s accepted audiences")]
    WrongAudience(String),
    #[error("the token's issuer does not match {0:?}")]
    WrongIssuer(String),
    #[error("the token's signature does not verify with the keys of issuer {0:?}")]
    BadSignature(String),
    /// Anything else `jsonwebtoken` refuses (an algorithm the key cannot verify, a key
    /// it cannot read).
    #[error("invalid token of issuer {issuer:?}: {reason}")]
    Invalid { issuer: String, reason: String },
}

impl JwtError {
    fn from_jsonwebtoken(issuer: &str, error: &jsonwebtoken::errors::Error) -> Self {
        let issuer = issuer.to_owned();
        match error.kind() {
            ErrorKind::ExpiredSignature => Self::Expired(issuer),
            ErrorKind::ImmatureSignature => Self::NotYetValid(issuer),
            ErrorKind::InvalidAudience => Self::WrongAudience(issuer),
            ErrorKind::InvalidIssuer => Self::WrongIssuer(issuer),
            ErrorKind::InvalidSignature => Self::BadSignature(issuer),
            _ => Self::Invalid {
                issuer,
                reason: error.to_string(),
            },
        }
    }

    /// Claims are checked only after the signature verified, so one of these says more
    /// than a signature failure with another candidate key.
    fn is_about_claims(&self) -> bool {
        matches!(
            self,
            Self::Expired(_) | Self::NotYetValid(_) | Self::WrongAudience(_) | Self::WrongIssuer(_)
        )
    }
}

/// What verification needs besides the policies; the same for every workload of an
/// engine.
#[derive(Clone)]
pub(super) struct JwtSettings {
    pub remote: Arc<dyn RemoteKeys>,
    /// The leeway on `exp` and `nbf`.
    pub clock_skew: Duration,
    /// Tokens that verified, shared by the engine's workloads.
    pub verified: Arc<cache::TokenCache>,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            remote: Arc::new(NoRemoteKeys),
            clock_skew: DEFAULT_CLOCK_SKEW,
            verified: Arc::default(),
        }
    }
}

impl fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSettings")
            .field("clock_skew", &self.clock_skew)
            .finish_non_exhaustive()
    }
}

/// Where no fetcher is plugged in, `jwksUri` tokens are rejected, never trusted.
pub struct NoRemoteKeys;

impl RemoteKeys for NoRemoteKeys {
    fn lookup(&self, uri: &str, _kid: Option<&str>) -> Result<Arc<JwkSet>, KeysError> {
        Err(KeysError::NotFetched {
            uri: uri.to_owned(),
        })
    }
}

/// The `jwksUri`s of `policies`: what the agent keeps fetched for a snapshot.
pub fn jwks_uris(policies: &[PolicyObject]) -> BTreeSet<String> {
    policies
        .iter()
        .filter_map(|p| match &p.spec {
            PolicySpec::RequestAuthentication(spec) => Some(&spec.jwt_rules),
            _ => None,
        })
        .flatten()
        .filter_map(|rule| match &rule.keys {
            JwtKeys::Uri(uri) => Some(uri.clone()),
            _ => None,
        })
        .collect()
}

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

/// A rejection and the policy whose rule rejected the token (none when no rule knows
/// its issuer).
pub(super) type Rejected = (Option<PolicyRef>, JwtError);

/// Finds, verifies and strips the request's token (see
/// [`super::WorkloadPolicies::authenticate_request`]). `policies` is not empty.
pub(super) fn authenticate_request(
    policies: &[RequestAuthn],
    settings: &JwtSettings,
    parts: &mut Parts,
) -> Result<Option<JwtIdentity>, Rejected> {
    // As Envoy does for every provider, with or without a token: only the proxy may set
    // these headers, so a client can never forge a verified payload.
    for rule in rules(policies) {
        if let Some(name) = &rule.output_payload_to_header {
            parts.headers.remove(name.as_str());
        }
    }
    let Some(found) = extract::find_in_request(policies, parts) else {
        return Ok(None);
    };
    let issuer = issuer_of(&found.token)?;
    let (policy, rule) = rule_for(policies, &issuer, Some(&found.location))?;
    let identity = settings
        .verified
        .get_or_verify(rule, &found.token, settings.clock_skew, || {
            verify(rule, &found.token, settings)
        })
        .map_err(|e| (Some(policy.clone()), e))?;
    if !rule.forward_original_token {
        found.location.remove(&mut parts.headers);
    }
    if let Some(name) = &rule.output_payload_to_header {
        // Both hold by construction: parsing checked the name, and a token that verified
        // has three base64url segments, which are valid header characters.
        let payload = found.token.split('.').nth(1).unwrap_or_default();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(payload),
        ) {
            parts.headers.insert(name, value);
        }
    }
    Ok(Some(identity))
}

fn rules(policies: &[RequestAuthn]) -> impl Iterator<Item = &JwtRule> {
    policies.iter().flat_map(|p| &p.spec.jwt_rules)
}

/// Reading the issuer before verifying only selects which rule verifies the token.
fn issuer_of(token: &str) -> Result<String, Rejected> {
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| (None, JwtError::Malformed(e.to_string())))?;
    Ok(claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

/// The first rule of `issuer` that reads tokens at `location` (any location when
/// `None`), with its policy.
fn rule_for<'p>(
    policies: &'p [RequestAuthn],
    issuer: &str,
    location: Option<&Location<'_>>,
) -> Result<(&'p PolicyRef, &'p JwtRule), Rejected> {
    policies
        .iter()
        .flat_map(|p| p.spec.jwt_rules.iter().map(move |r| (&p.meta, r)))
        .find(|(_, r)| r.issuer == issuer && location.is_none_or(|l| Location::of(r).contains(l)))
        .ok_or_else(|| {
            let error = JwtError::UnknownIssuer {
                issuer: issuer.to_owned(),
                location: location.map(ToString::to_string),
            };
            (None, error)
        })
}

fn verify(rule: &JwtRule, token: &str, settings: &JwtSettings) -> Result<JwtIdentity, JwtError> {
    let issuer = &rule.issuer;
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
    let remote;
    let set = match &rule.keys {
        JwtKeys::Inline(set) => set,
        JwtKeys::Uri(uri) => {
            remote = settings
                .remote
                .lookup(uri, header.kid.as_deref())
                .map_err(|source| JwtError::KeysUnavailable {
                    issuer: issuer.clone(),
                    source: Box::new(source),
                })?;
            &*remote
        }
        JwtKeys::Discovery => return Err(JwtError::DiscoveryUnsupported(issuer.clone())),
    };
    // As Envoy: a key without `kid` is a candidate for any token, one with a `kid` only
    // for tokens naming it.
    let candidates: Vec<&Jwk> = set
        .keys
        .iter()
        .filter(|jwk| match (&header.kid, &jwk.common.key_id) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        })
        .collect();
    if candidates.is_empty() {
        return Err(JwtError::UnknownKey {
            issuer: issuer.clone(),
            kid: header.kid,
        });
    }
    let mut validation = Validation::new(header.alg);
    // Istio requires no claim to be present; `exp` and `nbf` are checked when they are.
    validation.required_spec_claims.clear();
    validation.validate_nbf = true;
    validation.leeway = whole_seconds(settings.clock_skew);
    validation.set_issuer(&[issuer]);
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rule.audiences);
    }
    let mut rejected: Option<JwtError> = None;
    for jwk in candidates {
        let error = match DecodingKey::from_jwk(jwk) {
            Ok(key) => match jsonwebtoken::decode::<Value>(token, &key, &validation) {
                Ok(data) => return Ok(identity(data.claims)),
                Err(e) => JwtError::from_jsonwebtoken(issuer, &e),
            },
            Err(e) => JwtError::from_jsonwebtoken(issuer, &e),
        };
        if rejected.as_ref().is_none_or(|r| !r.is_about_claims()) {
            rejected = Some(error);
        }
    }
    Err(rejected.unwrap_or_else(|| JwtError::UnknownKey {
        issuer: issuer.clone(),
        kid: None,
    }))
}

/// `jsonwebtoken` counts leeway in whole seconds; a fraction rounds up so a configured
/// skew is never cut short.
fn whole_seconds(skew: Duration) -> u64 {
    skew.as_secs() + u64::from(skew.subsec_nanos() > 0)
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
