//! How the identity manager reaches a CA: the [`CaClient`] trait, the in-process client
//! the embedded CA uses, and the gRPC client for a CA elsewhere (Istio's certificate
//! API). Owns request transport only; what to request and when is `manager`'s.
//!
//! The gRPC client asks as a node proxy does in Istio's protocol: the identity goes in the
//! request's `metadata` as `ImpersonatedIdentity`, so istiod (with the agent's account in
//! `CA_TRUSTED_NODE_ACCOUNTS`) signs it for the agent, as it does for ztunnel.

use std::{collections::BTreeMap, future::Future, pin::Pin, sync::Arc, time::Duration};

use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use super::{
    authz::{Authorizer, Caller, Refusal},
    ca::{Ca, CaError},
    ca_service::proto,
    spiffe::SpiffeId,
};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Signs CSRs for the manager. `id` is the identity `csr_pem` names, given apart because
/// Istio's protocol carries it in the request too. The returned chain is PEM, leaf first,
/// root last.
pub trait CaClient: Send + Sync + 'static {
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, CaClientError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("in-process CA refused: {0}")]
    Local(#[from] CaError),
    #[error("in-process CA refused: {0}")]
    LocalRefused(#[from] Refusal),
    #[error("CA at {endpoint} refused ({code:?}): {message}")]
    Refused {
        endpoint: String,
        code: tonic::Code,
        message: String,
    },
    #[error("CA endpoint {endpoint} is not usable: {reason}")]
    Endpoint { endpoint: String, reason: String },
    /// The token itself is left out: error messages end up in logs.
    #[error("CA token is not valid in a gRPC header (it must be visible ASCII)")]
    Token,
    #[error(transparent)]
    TokenFile(#[from] super::authz::AuthzError),
}

/// Where the bearer token sent to the CA comes from.
#[derive(Clone, Debug)]
pub enum CaToken {
    Value(String),
    /// Read again for every request: a projected service-account token is rotated by the
    /// kubelet (hourly by default) and an old one expires.
    File(std::path::PathBuf),
}

impl CaToken {
    fn authorization(&self) -> Result<MetadataValue<tonic::metadata::Ascii>, CaClientError> {
        let token = match self {
            Self::Value(token) => token.clone(),
            Self::File(path) => super::authz::read_token(path)?,
        };
        format!("Bearer {token}")
            .parse()
            .map_err(|_| CaClientError::Token)
    }
}

/// The embedded CA, called without a network hop. Entitlement is still checked, with the
/// same authorizer the gRPC service uses, as this node's caller.
pub struct LocalCaClient {
    ca: Arc<Ca>,
    authorizer: Arc<dyn Authorizer>,
    caller: Caller,
}

impl LocalCaClient {
    pub fn new(ca: Arc<Ca>, authorizer: Arc<dyn Authorizer>, caller: Caller) -> Self {
        Self {
            ca,
            authorizer,
            caller,
        }
    }
}

impl CaClient for LocalCaClient {
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, CaClientError>> {
        Box::pin(async move {
            self.authorizer.entitled(&self.caller, id).await?;
            Ok(self.ca.sign(csr_pem, Some(ttl), |named| named == id)?)
        })
    }
}

/// A CA reached over gRPC with TLS, authenticated by a bearer token.
pub struct GrpcCaClient {
    endpoint: String,
    channel: Channel,
    token: CaToken,
}

impl GrpcCaClient {
    /// `endpoint` is `https://host:port`; the CA's serving certificate must chain to
    /// `root_pem` and name `server_name`. Connects lazily, so a CA that is down at start
    /// is retried by the manager's backoff rather than failing the agent. The token is
    /// checked here, so a missing or malformed one fails at start.
    pub fn new(
        endpoint: &str,
        server_name: &str,
        root_pem: &str,
        token: CaToken,
    ) -> Result<Self, CaClientError> {
        let bad = |reason: String| CaClientError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root_pem))
            .domain_name(server_name);
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        token.authorization()?;
        Ok(Self {
            endpoint: endpoint.to_owned(),
            channel,
            token,
        })
    }
}

impl CaClient for GrpcCaClient {
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, CaClientError>> {
        Box::pin(async move {
            let mut request = tonic::Request::new(proto::IstioCertificateRequest {
                csr: csr_pem.to_owned(),
                validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                metadata: Some(impersonating(id)),
            });
            request
                .metadata_mut()
                .insert("authorization", self.token.authorization()?);
            let response = proto::client::create_certificate(self.channel.clone(), request)
                .await
                .map_err(|status| CaClientError::Refused {
                    endpoint: self.endpoint.clone(),
                    code: status.code(),
                    message: status.message().to_owned(),
                })?;
            Ok(response.into_inner().cert_chain)
        })
    }
}

/// The request metadata a node proxy sends for a workload's identity, as ztunnel writes
/// it: one string field, the full SPIFFE URI.
pub(crate) fn impersonating(id: &SpiffeId) -> prost_types::Struct {
    let value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
    };
    prost_types::Struct {
        fields: BTreeMap::from([(proto::IMPERSONATED_IDENTITY.to_owned(), value)]),
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn a_token_file_is_read_again_for_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let token = CaToken::File(path.clone());
        assert_eq!(token.authorization().unwrap(), "Bearer first");
        // The kubelet rotated the projected token.
        std::fs::write(&path, "second").unwrap();
        assert_eq!(token.authorization().unwrap(), "Bearer second");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            token.authorization(),
            Err(CaClientError::TokenFile(_))
        ));
    }
}
