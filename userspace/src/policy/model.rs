//! The validated form of Istio's three security kinds. Every value here has passed
//! [`super::parse`]: strings are non-empty, wildcards sit only at an end, CIDRs and ports
//! are parsed. Nothing here knows about workloads or requests; matching lives in
//! [`super::authz`] and scope resolution in [`super::resolve`].

use std::{collections::BTreeMap, fmt, sync::Arc};

use ipnet::IpNet;

/// Who a policy is: enough to name it in a decision and to order it among its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyMeta {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` as written (RFC 3339, so string order is time order).
    /// Absent sorts as oldest, which makes objects without one fall back to name order.
    pub creation_timestamp: Option<String>,
    /// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    pub dry_run: bool,
    /// Set when ambit made this object from an Istio 1.1 authentication policy, so that
    /// every place that names a deciding policy also names the object the user wrote.
    pub converted_from: Option<ConvertedFrom>,
}

impl PolicyMeta {
    /// The key used to pick the oldest among equals: creation time, then name.
    pub fn age_key(&self) -> (&str, &str) {
        (self.creation_timestamp.as_deref().unwrap_or(""), &self.name)
    }
}

impl fmt::Display for PolicyMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        match &self.converted_from {
            Some(from) => write!(f, " (from {from})"),
            None => Ok(()),
        }
    }
}

/// The `authentication.istio.io/v1alpha1` object a converted policy was made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvertedFrom {
    pub kind: LegacyKind,
    /// `namespace/name` of a `Policy`; `name` of the cluster-scoped `MeshPolicy`.
    pub object: String,
    /// True for the DENY policy that stands for a required end-user token: its denials
    /// are authentication failures, answered with 401 as Istio 1.1 did.
    pub requires_token: bool,
}

impl fmt::Display for ConvertedFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", LEGACY_API_VERSION, self.kind, self.object)
    }
}

/// The API of Istio 1.1's authentication policies.
pub const LEGACY_API_VERSION: &str = "authentication.istio.io/v1alpha1";

/// The two kinds of Istio 1.1's authentication API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegacyKind {
    /// Namespaced: its namespace, or the workloads of its `targets`.
    Policy,
    /// Cluster-scoped and always named `default`: the whole mesh.
    MeshPolicy,
}

impl fmt::Display for LegacyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Policy => "Policy",
            Self::MeshPolicy => "MeshPolicy",
        })
    }
}

/// A cheap handle on a policy's identity, carried by decisions.
pub type PolicyRef = Arc<PolicyMeta>;

/// `spec.selector.matchLabels`. Invariant: never empty (an empty selector is parsed as
/// no selector, which is what Istio does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
}

impl Selector {
    /// True when every selector label is on the workload with the same value.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// A configured mTLS mode; `UNSET` is `None` where a mode is optional.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    Strict,
    Permissive,
    Disable,
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Strict => "STRICT",
            Self::Permissive => "PERMISSIVE",
            Self::Disable => "DISABLE",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub selector: Option<Selector>,
    /// `spec.mtls.mode`; `None` for UNSET or absent (inherit).
    pub mode: Option<MtlsMode>,
    /// `spec.portLevelMtls`, by workload port; `None` inherits the workload's mode.
    /// Invariant: empty unless `selector` is set (Istio's rule, enforced in parsing).
    pub port_level: BTreeMap<u16, Option<MtlsMode>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestAuthentication {
    pub selector: Option<Selector>,
    pub jwt_rules: Vec<JwtRule>,
}

/// One `spec.jwtRules[]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtRule {
    pub issuer: String,
    /// Empty means any audience is accepted.
    pub audiences: Vec<String>,
    pub keys: JwtKeys,
    /// Empty means the default locations (`Authorization: Bearer`, `access_token`).
    pub from_headers: Vec<JwtHeader>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    pub forward_original_token: bool,
    pub output_payload_to_header: Option<String>,
    pub output_claim_to_headers: Vec<ClaimToHeader>,
}

/// Where a rule's verification keys come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JwtKeys {
    /// `jwks`: an inline key set, parsed at load so a bad one is rejected with its object.
    Inline(jsonwebtoken::jwk::JwkSet),
    /// `jwksUri` (`http://` or `https://` with a host, checked in parsing): fetched at run
    /// time by the agent, looked up through [`super::jwt::RemoteKeys`].
    Uri(String),
    /// Neither: Istio discovers keys through OpenID discovery on the issuer. ambit does
    /// not, so tokens of such a rule are rejected.
    Discovery,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtHeader {
    pub name: String,
    /// Stripped from the header value before the token is read (e.g. `Bearer `).
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
            Self::Custom => "CUSTOM",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub selector: Option<Selector>,
    pub action: Action,
    /// `spec.provider.name`. Invariant: set exactly when `action` is CUSTOM.
    pub provider: Option<String>,
    /// `spec.rules`. Empty never matches, so an ALLOW policy without rules denies all.
    pub rules: Vec<Rule>,
}

/// One `spec.rules[]` entry: it matches when any source, any operation and every
/// condition match; an empty list matches anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

/// `from[].source`. Every non-empty clause must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Clause<StringMatch>,
    pub request_principals: Clause<StringMatch>,
    pub namespaces: Clause<StringMatch>,
    pub ip_blocks: Clause<IpNet>,
    pub remote_ip_blocks: Clause<IpNet>,
}

/// `to[].operation`. Every non-empty clause must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    /// Compared without regard to ASCII case, as Istio does.
    pub hosts: Clause<StringMatch>,
    pub ports: Clause<u16>,
    pub methods: Clause<StringMatch>,
    /// Compared with the request path without its query string.
    pub paths: Clause<StringMatch>,
}

/// A field and its `not` form: matches when `any` is empty or one of its values matches,
/// and none of `not` matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clause<T> {
    pub any: Vec<T>,
    pub not: Vec<T>,
}

impl<T> Default for Clause<T> {
    fn default() -> Self {
        Self {
            any: Vec::new(),
            not: Vec::new(),
        }
    }
}

impl<T> Clause<T> {
    pub fn is_empty(&self) -> bool {
        self.any.is_empty() && self.not.is_empty()
    }
}

/// Istio's string matching: exact, `prefix*`, `*suffix`, or `*` (present and non-empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

/// One `when[]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: ConditionValues,
}

/// The attributes of Istio's "Authorization Policy Conditions" reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionKey {
    /// `request.headers[name]`; the name is matched without regard to ASCII case.
    RequestHeader(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    RequestPrincipal,
    RequestAudiences,
    RequestPresenter,
    /// `request.auth.claims[a][b]…`: the path into nested claims.
    RequestClaim(Vec<String>),
    DestinationIp,
    DestinationPort,
    ConnectionSni,
}

impl ConditionKey {
    /// True for the request attributes, which only an HTTP request has.
    pub fn is_http(&self) -> bool {
        matches!(
            self,
            Self::RequestHeader(_)
                | Self::RequestPrincipal
                | Self::RequestAudiences
                | Self::RequestPresenter
                | Self::RequestClaim(_)
        )
    }
}

/// `values` / `notValues`, typed by what the key compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConditionValues {
    Strings(Clause<StringMatch>),
    Ips(Clause<IpNet>),
    Ports(Clause<u16>),
}

/// A policy's spec together with who it is, as the engine stores it.
#[derive(Debug)]
pub struct Named<T> {
    pub meta: PolicyRef,
    pub spec: T,
}
