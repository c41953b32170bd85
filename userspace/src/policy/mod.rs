//! Istio's security API (`PeerAuthentication`, `RequestAuthentication`,
//! `AuthorizationPolicy`): parsed and validated from YAML ([`parse`]), indexed per
//! namespace and resolved per workload ([`PolicyEngine`]), evaluated per connection and
//! per request ([`authz`]). Istio 1.1's authentication policies are converted into these
//! kinds ([`legacy`]).
//!
//! Decisions are pure functions of the policies and a [`RequestContext`]; this module
//! opens no sockets, reads no files and depends on nothing above it.

pub mod authz;
pub mod engine;
pub mod jwt;
pub mod legacy;
pub mod model;
pub mod parse;
pub mod resolve;
mod walk;

#[cfg(test)]
mod tests;

pub use authz::{Decision, Denied, HttpRequest, Note, Permit, Reason, RequestContext, Verdict};
pub use engine::{PolicyEngine, Workload};
pub use model::{Action, MtlsMode, PolicyMeta, PolicyRef};
pub use parse::PolicyError;
pub use resolve::{MtlsResolution, WorkloadPolicies};

/// A validated policy object, as the sources hand it to the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyObject {
    pub meta: PolicyMeta,
    pub spec: PolicySpec,
}

/// The three kinds, validated.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicySpec {
    PeerAuthentication(model::PeerAuthentication),
    RequestAuthentication(model::RequestAuthentication),
    AuthorizationPolicy(model::AuthorizationPolicy),
}

/// True for the kinds the policy engine parses, Istio 1.1's authentication kinds
/// ([`legacy`]) included. Any version of them is claimed here so that an unsupported
/// version is reported instead of silently ignored.
pub fn is_policy_kind(api_version: &str, kind: &str) -> bool {
    let security = api_version.starts_with("security.istio.io/")
        && matches!(
            kind,
            "PeerAuthentication" | "RequestAuthentication" | "AuthorizationPolicy"
        );
    security || legacy::is_legacy_kind(api_version, kind)
}
