//! `ambit ca --kubernetes`: the CA's callers are node agents proved by the Kubernetes API,
//! the way istiod trusts ztunnel (`CA_TRUSTED_NODE_ACCOUNTS`). Owns the two API questions
//! and the rule built on them; not the CSR rules (`ca`) nor the wire format (`ca_service`).
//!
//! - **Who is calling**: the bearer token is a projected service-account token. A
//!   `TokenReview` with our audience authenticates it; the reviewed user must be one of the
//!   trusted node-agent accounts, and the token's pod binding names the agent pod, whose
//!   node is the caller's node (from the token's `node-name` extra when the API server
//!   adds it, else from the pod itself, checked against the token's pod UID).
//! - **What it may hold**: the node authorizer rule: an identity
//!   `spiffe://<td>/ns/<ns>/sa/<sa>` only while a pod running as `<ns>/<sa>` is scheduled on
//!   the caller's node. Every request asks the API server afresh, so a deleted pod's
//!   identity is refused at once; there is no cache to go stale.

use std::{fmt, str::FromStr, sync::Arc};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams},
};

use super::{
    authz::{Authorizer, Caller, Refusal},
    ca_client::BoxFuture,
    spiffe::SpiffeId,
};

/// Keys of `status.user.extra` in a reviewed bound token (kube-apiserver's service-account
/// authenticator sets them from the token's `kubernetes.io` claim).
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Only in tokens minted by API servers from 1.30 on; older ones make us read the pod.
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// How the API server names a service account as a user.
const SA_USER_PREFIX: &str = "system:serviceaccount:";

/// A service account, written `namespace/name` (as `CA_TRUSTED_NODE_ACCOUNTS` writes them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl FromStr for ServiceAccount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{s:?} is not a service account as namespace/name")),
        }
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a Kubernetes caller was refused. Each variant is a `reason()` for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum KubeRefusal {
    /// The API server did not authenticate the token: expired, revoked, another audience,
    /// or not a token at all. `error` is the API server's own explanation.
    #[error("token review rejected the token: {error}")]
    TokenRejected { error: String },
    /// An authenticated token whose audiences do not include ours; the API server should
    /// never answer so, but a token for someone else must not pass if it does.
    #[error("token was reviewed for audiences {audiences:?}, not {expected}")]
    WrongAudience {
        audiences: Vec<String>,
        expected: String,
    },
    #[error("{user} is not a service account")]
    NotServiceAccount { user: String },
    #[error("service account {account} is not a trusted node agent")]
    UntrustedAccount { account: ServiceAccount },
    /// A legacy or unbound token: nothing ties it to a pod, hence to a node.
    #[error("token of {account} is not bound to a pod")]
    NotPodBound { account: ServiceAccount },
    /// The token's pod is gone, or the name now belongs to another pod: the token outlived
    /// its pod (an agent that restarts gets a new token and retries).
    #[error("pod {namespace}/{pod} of the token (uid {uid}) no longer exists")]
    CallerPodGone {
        namespace: String,
        pod: String,
        uid: String,
    },
    #[error("pod {namespace}/{pod} of the token is not scheduled on a node")]
    CallerPodUnscheduled { namespace: String, pod: String },
    /// The node authorizer rule: the node asked for an identity none of its pods has.
    #[error("no pod running as {account} is scheduled on node {node}")]
    NoPodOnNode {
        account: ServiceAccount,
        node: String,
    },
    /// Only a node agent proved by a token reaches the pod check; grants-file callers have
    /// no node.
    #[error("caller {0} has no node")]
    NoNode(String),
    #[error("Kubernetes API call failed ({what}): {source}")]
    Api {
        what: &'static str,
        source: kube::Error,
    },
}

impl KubeRefusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TokenRejected { .. } => "token_rejected",
            Self::WrongAudience { .. } => "wrong_audience",
            Self::NotServiceAccount { .. } => "not_service_account",
            Self::UntrustedAccount { .. } => "untrusted_account",
            Self::NotPodBound { .. } => "not_pod_bound",
            Self::CallerPodGone { .. } => "caller_pod_gone",
            Self::CallerPodUnscheduled { .. } => "caller_pod_unscheduled",
            Self::NoPodOnNode { .. } => "no_pod_on_node",
            Self::NoNode(_) => "no_node",
            Self::Api { .. } => "kubernetes_api",
        }
    }
}

/// The Kubernetes authorizer of `ambit ca --kubernetes`.
pub struct KubeAuthorizer {
    client: Client,
    /// The audience agents' tokens are projected for; a token for another audience (the
    /// API server's own, another service's) is refused, so a leaked one is no use here.
    audience: String,
    trusted: Arc<[ServiceAccount]>,
}

impl KubeAuthorizer {
    pub fn new(client: Client, audience: &str, trusted: Vec<ServiceAccount>) -> Self {
        Self {
            client,
            audience: audience.to_owned(),
            trusted: trusted.into(),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, KubeRefusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| KubeRefusal::Api {
                what: "create TokenReview",
                source,
            })?;
        let status = reviewed.status.unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => {
                return Err(KubeRefusal::TokenRejected {
                    error: status.error.unwrap_or_else(|| "not authenticated".into()),
                });
            }
        };
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(KubeRefusal::WrongAudience {
                audiences,
                expected: self.audience.clone(),
            });
        }
        let account = service_account(&user)?;
        if !self.trusted.contains(&account) {
            return Err(KubeRefusal::UntrustedAccount { account });
        }
        let (Some(pod), Some(uid)) = (extra(&user, EXTRA_POD_NAME), extra(&user, EXTRA_POD_UID))
        else {
            return Err(KubeRefusal::NotPodBound { account });
        };
        let node = match extra(&user, EXTRA_NODE_NAME) {
            Some(node) => node.to_owned(),
            None => self.node_of(&account.namespace, pod, uid).await?,
        };
        Ok(Caller {
            name: format!("{account} (pod {pod})"),
            node: Some(node),
        })
    }

    /// The node of the agent pod `namespace/pod`, if it is still the pod with `uid`.
    async fn node_of(&self, namespace: &str, pod: &str, uid: &str) -> Result<String, KubeRefusal> {
        let found = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(pod)
            .await
            .map_err(|source| KubeRefusal::Api {
                what: "get the caller's pod",
                source,
            })?;
        let gone = || KubeRefusal::CallerPodGone {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            uid: uid.to_owned(),
        };
        let found = found.ok_or_else(gone)?;
        if found.metadata.uid.as_deref() != Some(uid) {
            return Err(gone());
        }
        found
            .spec
            .and_then(|s| s.node_name)
            .ok_or_else(|| KubeRefusal::CallerPodUnscheduled {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
            })
    }

    /// Whether a pod running as `account` is scheduled on `node`. Pods that have finished
    /// (`Succeeded`, `Failed`) no longer need a certificate and do not count.
    async fn runs_on(&self, account: &ServiceAccount, node: &str) -> Result<bool, KubeRefusal> {
        // The API server filters by node; namespace and account are checked here, since
        // `spec.serviceAccountName` is not a field selector every API server version has.
        let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = Api::<Pod>::all(self.client.clone())
            .list(&params)
            .await
            .map_err(|source| KubeRefusal::Api {
                what: "list the pods of the caller's node",
                source,
            })?;
        Ok(pods.items.iter().any(|pod| {
            let spec = pod.spec.as_ref();
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            pod.metadata.namespace.as_deref() == Some(account.namespace.as_str())
                && spec.and_then(|s| s.service_account_name.as_deref())
                    == Some(account.name.as_str())
                && spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && !matches!(phase, Some("Succeeded" | "Failed"))
        }))
    }

    async fn check(&self, caller: &Caller, identity: &SpiffeId) -> Result<(), KubeRefusal> {
        let node = caller
            .node
            .as_deref()
            .ok_or_else(|| KubeRefusal::NoNode(caller.name.clone()))?;
        let account = ServiceAccount {
            namespace: identity.namespace().to_owned(),
            name: identity.service_account().to_owned(),
        };
        if self.runs_on(&account, node).await? {
            Ok(())
        } else {
            Err(KubeRefusal::NoPodOnNode {
                account,
                node: node.to_owned(),
            })
        }
    }
}

impl Authorizer for KubeAuthorizer {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Refusal>> {
        Box::pin(async move { Ok(self.review(token).await?) })
    }

    fn entitled<'a>(
        &'a self,
        caller: &'a Caller,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move { Ok(self.check(caller, identity).await?) })
    }
}

/// The service account a reviewed user is (`system:serviceaccount:<ns>:<name>`).
fn service_account(user: &UserInfo) -> Result<ServiceAccount, KubeRefusal> {
    let username = user.username.as_deref().unwrap_or_default();
    username
        .strip_prefix(SA_USER_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .map(|(namespace, name)| ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
        .ok_or_else(|| KubeRefusal::NotServiceAccount {
            user: username.to_owned(),
        })
}

/// The single value of an extra, as the service-account authenticator writes them.
fn extra<'u>(user: &'u UserInfo, key: &str) -> Option<&'u str> {
    match user.extra.as_ref()?.get(key)?.as_slice() {
        [value] if !value.is_empty() => Some(value),
        _ => None,
    }
}

#[cfg(test)]
#[path = "kube_authz_tests.rs"]
mod tests;
