//! The workload identity newtype: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.
//! Parsing is the only way to build one, so every [`SpiffeId`] in the agent is well formed.
//! Owns the syntax only; who may hold an identity is decided in `authz`.

use std::{fmt, str::FromStr, sync::Arc};

use serde::{Serialize, Serializer};

/// An Istio-style workload identity. Invariant (enforced by [`SpiffeId::new`] and
/// [`FromStr`]): every part is a non-empty run of `[A-Za-z0-9._-]`, so the URI form has
/// exactly the five path segments and round-trips through `Display` and `parse`.
/// Shared behind an `Arc`: identities are cloned into every resolver, error and report.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<Parts>);

#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<account>"
    )]
    Shape(String),
    #[error("identity {id:?}: {part} {value:?} must be non-empty and use only [A-Za-z0-9._-]")]
    Part {
        id: String,
        part: &'static str,
        value: String,
    },
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeError> {
        let id = || format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        for (part, value) in [
            ("trust domain", trust_domain),
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if !valid_part(value) {
                return Err(SpiffeError::Part {
                    id: id(),
                    part,
                    value: value.to_owned(),
                });
            }
        }
        Ok(Self(Arc::new(Parts {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })))
    }

    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// The form Istio's `AuthorizationPolicy` principals use: `td/ns/x/sa/y`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.0.trust_domain, self.0.namespace, self.0.service_account
        )
    }
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeError::Scheme(s.to_owned()))?;
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            [td, "ns", ns, "sa", sa] => Self::new(td, ns, sa),
            _ => Err(SpiffeError::Shape(s.to_owned())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.principal())
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/default"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "default");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/default"
        );
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/default");
    }

    #[test]
    fn rejects_malformed_identities() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/namespace/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn error_names_the_bad_part() {
        let err = SpiffeId::new("cluster.local", "a/b", "c").unwrap_err();
        assert!(err.to_string().contains("namespace \"a/b\""), "{err}");
    }
}
