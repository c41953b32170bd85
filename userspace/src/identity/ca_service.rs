//! The CA served as Istio's certificate API,
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, over gRPC with TLS, so ambit
//! agents and other Istio-compatible node proxies can use it. Owns the wire format (the
//! messages and service are written by hand with prost and tonic, so the build needs no
//! `protoc`), bearer-token authentication and the mapping of refusals to gRPC statuses.
//!
//! The identity asked for is the CSR's one SPIFFE SAN. A node proxy also names it in the
//! request's `metadata` as `ImpersonatedIdentity` (ztunnel does; istiod signs that identity
//! for a trusted node account); when present it must be the CSR's, so the authorizer
//! decides on exactly what gets signed.

use std::{convert::Infallible, future::Future, sync::Arc, task::Poll};

use tokio::net::TcpListener;
use tonic::{
    Status,
    body::Body,
    codegen::{BoxFuture, Service, http},
    server::NamedService,
    transport::{Identity, Server, ServerTlsConfig, server::TcpIncoming},
};

use super::{
    authz::{Authorizer, Refusal},
    ca::{Ca, CaError},
    kube_authz::KubeRefusal,
    spiffe::{SpiffeError, SpiffeId},
};

/// Istio's `security.proto` messages and the client call, by hand.
pub mod proto {
    use tonic::{Status, codegen::http, transport::Channel};

    pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
    /// The `metadata` field in which a node proxy names the workload identity it asks for
    /// (istio `pkg/security`'s `ImpersonatedIdentity`), a string holding the SPIFFE URI.
    pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateRequest {
        /// PEM-encoded CSR.
        #[prost(string, tag = "1")]
        pub csr: String,
        /// Requested lifetime in seconds; 0 asks for the CA's default.
        #[prost(int64, tag = "3")]
        pub validity_duration: i64,
        #[prost(message, optional, tag = "4")]
        pub metadata: Option<prost_types::Struct>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateResponse {
        /// PEM certificates, leaf first, root last.
        #[prost(string, repeated, tag = "1")]
        pub cert_chain: Vec<String>,
    }

    pub mod client {
        use super::*;

        pub async fn create_certificate(
            channel: Channel,
            request: tonic::Request<IstioCertificateRequest>,
        ) -> Result<tonic::Response<IstioCertificateResponse>, Status> {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(format!("CA connection is not ready: {e}")))?;
            let codec =
                tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
            let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE);
            grpc.unary(request, path, codec).await
        }
    }
}

use proto::{IMPERSONATED_IDENTITY, IstioCertificateRequest, IstioCertificateResponse};

#[derive(Debug, thiserror::Error)]
pub enum CaServiceError {
    #[error("failed to make the CA service's TLS certificate: {0}")]
    Identity(#[from] CaError),
    #[error("failed to configure TLS for the CA service: {0}")]
    Tls(tonic::transport::Error),
    #[error("CA service stopped: {0}")]
    Serve(tonic::transport::Error),
}

/// Serves `ca` on `listener` until `shutdown` completes. The service presents a
/// certificate from `ca` itself for `server_names` (DNS names or IP addresses), so clients
/// verify it with the mesh root.
pub async fn serve(
    ca: Arc<Ca>,
    authorizer: Arc<dyn Authorizer>,
    listener: TcpListener,
    server_names: &[String],
    shutdown: impl Future<Output = ()>,
) -> Result<(), CaServiceError> {
    let (chain, key) = ca.serving_identity(server_names)?;
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(chain, key));
    let service = CertificateService {
        handler: Arc::new(Handler { ca, authorizer }),
    };
    Server::builder()
        .tls_config(tls)
        .map_err(CaServiceError::Tls)?
        .add_service(service)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
        .map_err(CaServiceError::Serve)
}

struct Handler {
    ca: Arc<Ca>,
    authorizer: Arc<dyn Authorizer>,
}

/// Why a request got no certificate. Each variant has a stable `reason()` for logs.
#[derive(Debug, thiserror::Error)]
enum Rejected {
    #[error("missing `authorization: Bearer <token>` metadata")]
    NoToken,
    #[error("{IMPERSONATED_IDENTITY} is not a string holding a SPIFFE ID")]
    ImpersonationNotString,
    #[error("{IMPERSONATED_IDENTITY} is not a workload identity: {0}")]
    ImpersonationInvalid(SpiffeError),
    #[error("{IMPERSONATED_IDENTITY} asks for {asked} but the CSR names {csr}")]
    ImpersonationMismatch { asked: SpiffeId, csr: SpiffeId },
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Ca(#[from] CaError),
}

impl Rejected {
    fn reason(&self) -> &'static str {
        match self {
            Self::NoToken => "no_token",
            Self::ImpersonationNotString => "impersonation_not_string",
            Self::ImpersonationInvalid(_) => "impersonation_invalid",
            Self::ImpersonationMismatch { .. } => "impersonation_mismatch",
            Self::Refused(r) => r.reason(),
            Self::Ca(_) => "ca",
        }
    }

    fn status(&self) -> Status {
        let message = self.to_string();
        match self {
            Self::NoToken | Self::Refused(Refusal::UnknownToken) => {
                Status::unauthenticated(message)
            }
            Self::ImpersonationNotString
            | Self::ImpersonationInvalid(_)
            | Self::ImpersonationMismatch { .. } => Status::invalid_argument(message),
            Self::Refused(Refusal::NotEntitled(_)) => Status::permission_denied(message),
            Self::Refused(Refusal::Kubernetes(k)) => kube_status(k, message),
            Self::Ca(e) => status_of(e),
        }
    }
}

/// A token the API server does not vouch for is unauthenticated; a proven caller asking
/// beyond its node is denied; an API server we cannot reach is worth a retry.
fn kube_status(refusal: &KubeRefusal, message: String) -> Status {
    match refusal {
        KubeRefusal::TokenRejected { .. }
        | KubeRefusal::WrongAudience { .. }
        | KubeRefusal::NotServiceAccount { .. }
        | KubeRefusal::NotPodBound { .. }
        | KubeRefusal::CallerPodGone { .. }
        | KubeRefusal::CallerPodUnscheduled { .. } => Status::unauthenticated(message),
        KubeRefusal::UntrustedAccount { .. }
        | KubeRefusal::NoPodOnNode { .. }
        | KubeRefusal::NoNode(_) => Status::permission_denied(message),
        KubeRefusal::Api { .. } => Status::unavailable(message),
    }
}

impl Handler {
    /// Authenticates, reads the identity asked for, checks entitlement, signs: the caller
    /// learns nothing of the CSR rules before its token is accepted.
    async fn create(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Rejected> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(Rejected::NoToken)?
            .trim()
            .to_owned();
        let caller = self.authorizer.authenticate(&token).await?;
        let request = request.into_inner();
        let id = self.ca.csr_identity(&request.csr)?;
        if let Some(asked) = impersonated(&request)?
            && asked != id
        {
            return Err(Rejected::ImpersonationMismatch { asked, csr: id });
        }
        self.authorizer.entitled(&caller, &id).await?;
        let ttl = u64::try_from(request.validity_duration)
            .ok()
            .map(std::time::Duration::from_secs);
        let chain = self.ca.sign(&request.csr, ttl, |named| named == &id)?;
        tracing::debug!(caller = caller.name, %id, "certificate issued");
        Ok(IstioCertificateResponse { cert_chain: chain })
    }
}

/// The identity named in the request's `metadata`, if any.
fn impersonated(request: &IstioCertificateRequest) -> Result<Option<SpiffeId>, Rejected> {
    let Some(value) = request
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(prost_types::value::Kind::StringValue(s)) => {
            s.parse().map(Some).map_err(Rejected::ImpersonationInvalid)
        }
        _ => Err(Rejected::ImpersonationNotString),
    }
}

fn status_of(err: &CaError) -> Status {
    let message = err.to_string();
    match err {
        CaError::NotEntitled(_) => Status::permission_denied(message),
        CaError::MalformedCsr(_)
        | CaError::BadCsrSignature
        | CaError::SanCount(_)
        | CaError::SanNotUri(_)
        | CaError::SanNotSpiffe(_)
        | CaError::ForeignTrustDomain { .. } => Status::invalid_argument(message),
        CaError::Read { .. }
        | CaError::Write { .. }
        | CaError::HalfStore { .. }
        | CaError::BadPem { .. }
        | CaError::KeyMismatch { .. }
        | CaError::NotCa { .. }
        | CaError::MissingChain { .. }
        | CaError::Generate { .. }
        | CaError::Sign { .. } => Status::internal(message),
    }
}

/// The tonic service, routing the one method this API has.
#[derive(Clone)]
struct CertificateService {
    handler: Arc<Handler>,
}

impl NamedService for CertificateService {
    const NAME: &'static str = "istio.v1.auth.IstioCertificateService";
}

impl Service<http::Request<Body>> for CertificateService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != proto::CREATE_CERTIFICATE {
            let path = request.uri().path().to_owned();
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("no method {path}")).into_http())
            });
        }
        let method = CreateCertificate(self.handler.clone());
        Box::pin(async move {
            let codec =
                tonic_prost::ProstCodec::<IstioCertificateResponse, IstioCertificateRequest>::default();
            Ok(tonic::server::Grpc::new(codec).unary(method, request).await)
        })
    }
}

/// One call of `CreateCertificate`, as tonic's unary machinery wants it.
struct CreateCertificate(Arc<Handler>);

impl Service<tonic::Request<IstioCertificateRequest>> for CreateCertificate {
    type Response = tonic::Response<IstioCertificateResponse>;
    type Error = Status;
    type Future = BoxFuture<Self::Response, Status>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let handler = self.0.clone();
        Box::pin(async move {
            handler
                .create(request)
                .await
                .map(tonic::Response::new)
                .map_err(|e| {
                    tracing::warn!(reason = e.reason(), error = %e, "certificate request failed");
                    e.status()
                })
        })
    }
}
