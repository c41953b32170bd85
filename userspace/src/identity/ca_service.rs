//! The CA served as Istio's certificate API,
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, over gRPC with TLS, so ambit
//! agents and other Istio-compatible node proxies can use it. Owns the wire format (the
//! messages and service are written by hand with prost and tonic, so the build needs no
//! `protoc`), bearer-token authentication and the mapping of CA errors to gRPC statuses.

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
    authz::Authorizer,
    ca::{Ca, CaError},
};

/// Istio's `security.proto` messages and the client call, by hand.
pub mod proto {
    use tonic::{Status, codegen::http, transport::Channel};

    pub const CREATE_CERTIFICATE: &str = "/istio.v1.auth.IstioCertificateService/CreateCertificate";

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

use proto::{IstioCertificateRequest, IstioCertificateResponse};

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

impl Handler {
    fn create(
        &self,
        request: tonic::Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?;
        let caller = self
            .authorizer
            .authenticate(token.trim())
            .ok_or_else(|| Status::unauthenticated("bearer token is not valid"))?;
        let request = request.into_inner();
        let ttl = u64::try_from(request.validity_duration)
            .ok()
            .map(std::time::Duration::from_secs);
        let chain = self
            .ca
            .sign(&request.csr, ttl, |id| {
                self.authorizer.entitled(&caller, id)
            })
            .map_err(|e| {
                tracing::warn!(caller = caller.name, error = %e, "certificate request refused");
                status_of(&e)
            })?;
        Ok(IstioCertificateResponse { cert_chain: chain })
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
        let result = self.0.create(request).map(tonic::Response::new);
        Box::pin(async move { result })
    }
}
