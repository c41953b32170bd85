//! PLACEHOLDER until the policy engine lands (issue 4): keeps policy documents opaque.

/// A policy object from the config.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyObject {
    pub kind: String,
    pub doc: serde_yaml::Value,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(String);

/// True for the kinds the policy engine parses.
pub fn is_policy_kind(api_version: &str, kind: &str) -> bool {
    api_version.starts_with("security.istio.io/")
        && matches!(
            kind,
            "PeerAuthentication" | "RequestAuthentication" | "AuthorizationPolicy"
        )
}

impl PolicyObject {
    pub fn from_yaml(kind: &str, doc: serde_yaml::Value) -> Result<Self, PolicyError> {
        Ok(Self {
            kind: kind.to_owned(),
            doc,
        })
    }
}
