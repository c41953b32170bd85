//! Who may ask the CA for which identity. [`Authorizer`] maps a bearer token to a
//! [`Caller`] and decides entitlement, refusing with a typed [`Refusal`]. This module owns
//! tokens and grants, not the CSR rules (`ca`).
//!
//! Three implementations; the third, [`KubeAuthorizer`](super::kube_authz::KubeAuthorizer)
//! (`ambit ca --kubernetes`), asks the Kubernetes API and lives in `kube_authz`:
//! - [`NodeAuthorizer`] (embedded CA, `ambit run`): one token, read from a file the agent
//!   owns, belonging to this node. The node is entitled to exactly the identities that have
//!   an enrolled pod on it, as the identity manager counts them ([`Enrolled`]), so the CA
//!   signs nothing the node has not enrolled.
//! - [`GrantsAuthorizer`] (`ambit ca` without Kubernetes): a grants file with one line per
//!   caller, `<token> <caller-name> <identity>...`, where an identity is a SPIFFE ID or
//!   `spiffe://<td>/ns/<ns>/sa/*` for every account of a namespace. `#` starts a comment.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ring::{
    digest::{SHA256, SHA256_OUTPUT_LEN, digest},
    rand::{SecureRandom, SystemRandom},
};
use subtle::ConstantTimeEq;

use super::{ca_client::BoxFuture, kube_authz::KubeRefusal, manager::Enrolled, spiffe::SpiffeId};
use crate::state_file;

/// An authenticated caller of the CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// For logs: a node name, the name the grants file gives the token, or the service
    /// account and pod of a Kubernetes node agent.
    pub name: String,
    /// The node the caller proved it runs on, when its authenticator can tell; the
    /// Kubernetes rule entitles a caller to what runs on this node.
    pub node: Option<String>,
}

/// Asynchronous because the Kubernetes implementation asks the API server; the others
/// answer at once.
pub trait Authorizer: Send + Sync + 'static {
    /// The caller `token` belongs to.
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Refusal>>;
    /// Whether `caller` may hold `identity`.
    fn entitled<'a>(
        &'a self,
        caller: &'a Caller,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), Refusal>>;
}

/// Why a caller was refused. The token itself never appears: refusals are logged.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("bearer token is not valid")]
    UnknownToken,
    #[error("caller is not entitled to identity {0}")]
    NotEntitled(SpiffeId),
    #[error(transparent)]
    Kubernetes(#[from] KubeRefusal),
}

impl Refusal {
    /// A stable label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UnknownToken => "unknown_token",
            Self::NotEntitled(_) => "not_entitled",
            Self::Kubernetes(k) => k.reason(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("failed to read token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to create token file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to restrict token file {path} to mode 0600: {source}")]
    Restrict {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("failed to generate a token")]
    Random,
    #[error("{path}:{line}: {reason}")]
    Grants {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// What a token is compared by: its SHA-256 digest. Comparing digests of fixed length in
/// constant time tells a caller nothing of a token, not even its length, through timing.
struct TokenDigest([u8; SHA256_OUTPUT_LEN]);

impl TokenDigest {
    fn of(token: &str) -> Self {
        let mut bytes = [0; SHA256_OUTPUT_LEN];
        bytes.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
        Self(bytes)
    }

    fn matches(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

/// The embedded CA's authorizer: this node's token, this node's enrolled identities.
pub struct NodeAuthorizer {
    node: String,
    token: TokenDigest,
    enrolled: Enrolled,
}

impl NodeAuthorizer {
    pub fn new(node: &str, token: &str, enrolled: Enrolled) -> Self {
        Self {
            node: node.to_owned(),
            token: TokenDigest::of(token),
            enrolled,
        }
    }

    pub fn caller(&self) -> Caller {
        Caller {
            name: self.node.clone(),
            node: Some(self.node.clone()),
        }
    }
}

impl Authorizer for NodeAuthorizer {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Refusal>> {
        let known = self.token.matches(&TokenDigest::of(token));
        Box::pin(async move { known.then(|| self.caller()).ok_or(Refusal::UnknownToken) })
    }

    fn entitled<'a>(
        &'a self,
        caller: &'a Caller,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        let entitled = caller.name == self.node && self.enrolled.contains(identity);
        Box::pin(async move { entitled_or_refused(entitled, identity) })
    }
}

fn entitled_or_refused(entitled: bool, identity: &SpiffeId) -> Result<(), Refusal> {
    if entitled {
        Ok(())
    } else {
        Err(Refusal::NotEntitled(identity.clone()))
    }
}

/// Static grants for a standalone `ambit ca`.
pub struct GrantsAuthorizer {
    grants: Vec<Grant>,
}

struct Grant {
    token: TokenDigest,
    caller: String,
    identities: Vec<Pattern>,
}

enum Pattern {
    Exact(SpiffeId),
    /// Every service account of one namespace.
    Namespace {
        trust_domain: String,
        namespace: String,
    },
}

impl Pattern {
    fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(exact) => exact == id,
            Self::Namespace {
                trust_domain,
                namespace,
            } => id.trust_domain() == trust_domain && id.namespace() == namespace,
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        if let Some(prefix) = s.strip_suffix("/sa/*") {
            // Validate the prefix by completing it with a placeholder account.
            let id: SpiffeId = format!("{prefix}/sa/x")
                .parse()
                .map_err(|e| format!("{e}"))?;
            return Ok(Self::Namespace {
                trust_domain: id.trust_domain().to_owned(),
                namespace: id.namespace().to_owned(),
            });
        }
        s.parse().map(Self::Exact).map_err(|e| format!("{e}"))
    }
}

impl GrantsAuthorizer {
    pub fn from_file(path: &Path) -> Result<Self, AuthzError> {
        let text = fs::read_to_string(path).map_err(|source| AuthzError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut grants = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default();
            let mut words = line.split_whitespace();
            let Some(token) = words.next() else { continue };
            let err = |reason: String| AuthzError::Grants {
                path: path.to_owned(),
                line: n + 1,
                reason,
            };
            let caller = words
                .next()
                .ok_or_else(|| err("expected <token> <caller-name> <identity>...".into()))?;
            let identities = words
                .map(Pattern::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            if identities.is_empty() {
                return Err(err(format!("caller {caller} is granted no identity")));
            }
            grants.push(Grant {
                token: TokenDigest::of(token),
                caller: caller.to_owned(),
                identities,
            });
        }
        Ok(Self { grants })
    }
}

impl Authorizer for GrantsAuthorizer {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Refusal>> {
        let presented = TokenDigest::of(token);
        // Stopping at the match reveals only which grant matched, which its holder knows.
        let caller = self
            .grants
            .iter()
            .find(|g| g.token.matches(&presented))
            .map(|g| Caller {
                name: g.caller.clone(),
                node: None,
            });
        Box::pin(async move { caller.ok_or(Refusal::UnknownToken) })
    }

    fn entitled<'a>(
        &'a self,
        caller: &'a Caller,
        identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        let entitled = self
            .grants
            .iter()
            .filter(|g| g.caller == caller.name)
            .any(|g| g.identities.iter().any(|p| p.matches(identity)));
        Box::pin(async move { entitled_or_refused(entitled, identity) })
    }
}

/// Reads a token file (surrounding whitespace ignored).
pub fn read_token(path: &Path) -> Result<String, AuthzError> {
    let token = fs::read_to_string(path).map_err(|source| AuthzError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthzError::EmptyToken(path.to_owned()));
    }
    Ok(token.to_owned())
}

/// Reads the agent's token, creating a random one on first start. The file is the agent's
/// own secret and is kept at mode 0600, whatever mode it was found with. Its directory is
/// created with mode 0700 when missing; an existing one may be the operator's
/// (`--ca-token-file`) and is left as it is.
pub fn ensure_token(path: &Path) -> Result<String, AuthzError> {
    let err = |source| AuthzError::Write {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
            AuthzError::Restrict {
                path: path.to_owned(),
                source,
            }
        })?;
        return read_token(path);
    }
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthzError::Random)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    state_file::write(path, token.as_bytes(), 0o600).map_err(err)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ManagerConfig, SecretManager};

    #[tokio::test]
    async fn grants_file_entitles_exact_and_namespace_identities() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants");
        fs::write(
            &path,
            "# token caller identities\n\
             t1 node-a spiffe://cluster.local/ns/default/sa/default spiffe://cluster.local/ns/shop/sa/*\n\
             t2 node-b spiffe://cluster.local/ns/other/sa/x\n",
        )
        .unwrap();
        let authz = GrantsAuthorizer::from_file(&path).unwrap();
        let a = authz.authenticate("t1").await.unwrap();
        assert_eq!(a.name, "node-a");
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        let entitled = async |s: &str| authz.entitled(&a, &id(s)).await;
        entitled("spiffe://cluster.local/ns/default/sa/default")
            .await
            .unwrap();
        entitled("spiffe://cluster.local/ns/shop/sa/cart")
            .await
            .unwrap();
        let refused = entitled("spiffe://cluster.local/ns/other/sa/x")
            .await
            .unwrap_err();
        assert_eq!(refused.reason(), "not_entitled");
        let refused = authz.authenticate("t3").await.unwrap_err();
        assert_eq!(refused.reason(), "unknown_token");
    }

    #[tokio::test]
    async fn node_token_must_match_exactly() {
        let (manager, _worker) = SecretManager::new(ManagerConfig::default());
        let authz = NodeAuthorizer::new("node-a", "secret", manager.enrolled());
        assert_eq!(authz.authenticate("secret").await.unwrap(), authz.caller());
        for wrong in ["", "secre", "secret ", "Secret", "secretsecret"] {
            let refused = authz.authenticate(wrong).await.unwrap_err();
            assert!(matches!(refused, Refusal::UnknownToken), "{wrong:?}");
        }
    }

    #[test]
    fn new_token_file_is_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca/agent-token");
        let token = ensure_token(&path).unwrap();
        assert_eq!(token.len(), 64);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("ca")), 0o700);
        assert_eq!(ensure_token(&path).unwrap(), token);
    }

    #[test]
    fn existing_token_file_is_taken_back_to_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent-token");
        fs::write(&path, "t0k3n\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(ensure_token(&path).unwrap(), "t0k3n");
        assert_eq!(mode(&path), 0o600);
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn grants_file_error_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants");
        fs::write(&path, "t1 node-a spiffe://cluster.local/ns/a\n").unwrap();
        let err = GrantsAuthorizer::from_file(&path).err().unwrap();
        assert!(err.to_string().contains("grants:1:"), "{err}");
    }
}
