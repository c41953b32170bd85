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
    authorization: MetadataValue<tonic::metadata::Ascii>,
}

impl GrpcCaClient {
    /// `endpoint` is `https://host:port`; the CA's serving certificate must chain to
    /// `root_pem` and name `server_name`. Connects lazily, so a CA that is down at start
    /// is retried by the manager's backoff rather than failing the agent.
    pub fn new(
        endpoint: &str,
        server_name: &str,
        root_pem: &str,
        token: &str,
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
        let authorization = format!("Bearer {token}")
            .parse()
            .map_err(|_| CaClientError::Token)?;
        Ok(Self {
            endpoint: endpoint.to_owned(),
            channel,
            authorization,
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
                .insert("authorization", self.authorization.clone());
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
