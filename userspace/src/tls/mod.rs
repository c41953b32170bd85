//! Mutual TLS for the data path: the rustls server and client configurations built from
//! the identity manager's certificates, the SPIFFE-aware verifiers behind them, and
//! [`PeerVerified`], the proof of a peer's identity that only this module can build.
//! It does no I/O of its own beyond the handshake and knows nothing of HBONE or policy.
//!
//! Policy: TLS 1.3 (AES-GCM suites) preferred; TLS 1.2 only with the ECDHE AES-GCM suites;
//! nothing older (rustls has no CBC suites and no TLS 1.1); ALPN `h2`. Session resumption is
//! off on both sides, so every connection runs the verifiers against the current certificates.

mod resolve;
mod verify;

use std::{net::IpAddr, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::{CryptoProvider, ring},
    server::NoServerSessionStorage,
};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

pub use resolve::CertResolver;
pub use verify::PeerVerified;

use crate::identity::{SpiffeId, manager};

/// The only application protocol the mesh speaks: HBONE is HTTP/2 `CONNECT`.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate: {0}")]
    Certificate(manager::ManagerError),
    #[error("mesh root is not a usable trust anchor: {0}")]
    Root(rustls::Error),
    #[error("failed to build the TLS configuration: {0}")]
    Config(String),
    #[error("TLS handshake failed: {}", describe_handshake(.0))]
    Handshake(std::io::Error),
    #[error("peer certificate {0}")]
    PeerIdentity(String),
    #[error("peer {peer} is in trust domain {peer_domain}, not ours ({})", .ours.join(", "), peer_domain = .peer.trust_domain())]
    ForeignTrustDomain { peer: SpiffeId, ours: Vec<String> },
    #[error("server identity {peer} is not allowed for this destination (allowed: {})", display_list(.allowed))]
    NotAllowed {
        peer: SpiffeId,
        allowed: Vec<SpiffeId>,
    },
}

/// The handshake error as a person wants it: our verifiers' own message when one of them
/// refused the peer (rustls would only show its `Debug` form).
fn describe_handshake(err: &std::io::Error) -> String {
    let ours = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(|e| match e {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                other.0.downcast_ref::<TlsError>().map(ToString::to_string)
            }
            _ => None,
        });
    ours.unwrap_or_else(|| err.to_string())
}

fn display_list(ids: &[SpiffeId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The roots a peer's chain must reach and the trust domains its identity may be in:
/// ours first, then its aliases.
///
/// Invariant: `trust_domains` is never empty (enforced by [`TrustBundle::new`]).
#[derive(Clone, Debug)]
pub struct TrustBundle {
    roots: Arc<RootCertStore>,
    trust_domains: Vec<String>,
}

impl TrustBundle {
    pub fn new(
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
        trust_domain: &str,
    ) -> Result<Self, TlsError> {
        let mut store = RootCertStore::empty();
        for root in roots {
            store.add(root).map_err(TlsError::Root)?;
        }
        Ok(Self {
            roots: Arc::new(store),
            trust_domains: vec![trust_domain.to_owned()],
        })
    }

    /// Also accepts peers of the trust domains `aliases` (Istio's trust domain migration:
    /// workloads of the old and the new domain talk to each other under one root).
    pub fn with_aliases(mut self, aliases: &[String]) -> Self {
        for alias in aliases {
            if !self.trust_domains.contains(alias) {
                self.trust_domains.push(alias.clone());
            }
        }
        self
    }

    fn contains(&self, trust_domain: &str) -> bool {
        self.trust_domains.iter().any(|d| d == trust_domain)
    }
}

/// ring, restricted to the suites the mesh allows.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ],
        ..ring::default_provider()
    })
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Accepts mesh connections for one workload: presents that workload's current
/// certificate and requires a client certificate from the mesh.
#[derive(Clone)]
pub struct MeshAcceptor {
    config: Arc<ServerConfig>,
}

impl MeshAcceptor {
    /// For the workload `id`, once the manager has its first certificate.
    pub async fn for_workload(
        manager: &manager::SecretManager,
        id: &SpiffeId,
    ) -> Result<Self, TlsError> {
        let (resolver, trust) = resolver_and_trust(manager, id).await?;
        Self::new(resolver, &trust)
    }

    pub fn new(cert: CertResolver, trust: &TrustBundle) -> Result<Self, TlsError> {
        let provider = provider();
        let verifier = verify::MeshClientVerifier::new(trust, provider.clone())?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(cert));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// Runs the handshake and names the verified client.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> Result<(server::TlsStream<IO>, PeerVerified), TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = TlsAcceptor::from(self.config.clone())
            .accept(io)
            .await
            .map_err(TlsError::Handshake)?;
        let peer = PeerVerified::from_handshake(tls.get_ref().1)?;
        Ok((tls, peer))
    }
}

/// Connects from one workload to a destination that may only be run by `allowed`
/// identities (secure naming).
#[derive(Clone)]
pub struct MeshConnector {
    config: Arc<ClientConfig>,
}

impl MeshConnector {
    /// For the source workload `source`, once the manager has its first certificate.
    pub async fn for_workload(
        manager: &manager::SecretManager,
        source: &SpiffeId,
        allowed: Vec<SpiffeId>,
    ) -> Result<Self, TlsError> {
        let (resolver, trust) = resolver_and_trust(manager, source).await?;
        Self::new(resolver, &trust, allowed)
    }

    pub fn new(
        cert: CertResolver,
        trust: &TrustBundle,
        allowed: Vec<SpiffeId>,
    ) -> Result<Self, TlsError> {
        let provider = provider();
        let verifier = verify::SecureNamingVerifier::new(trust, allowed, provider.clone());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(VERSIONS)
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            // Not dangerous: the verifier checks the chain as webpki does, then replaces the
            // DNS-name check (meaningless for URI-only certificates) with secure naming.
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(cert));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// Runs the handshake to the server at `server` and names the verified server. The
    /// address only fills the TLS server name (an IP sends no SNI); identity is checked
    /// against the allowed list, never against the address.
    pub async fn connect<IO>(
        &self,
        server: IpAddr,
        io: IO,
    ) -> Result<(client::TlsStream<IO>, PeerVerified), TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = TlsConnector::from(self.config.clone())
            .connect(ServerName::IpAddress(server.into()), io)
            .await
            .map_err(TlsError::Handshake)?;
        let peer = PeerVerified::from_handshake(tls.get_ref().1)?;
        Ok((tls, peer))
    }
}

async fn resolver_and_trust(
    manager: &manager::SecretManager,
    id: &SpiffeId,
) -> Result<(CertResolver, TrustBundle), TlsError> {
    let first = manager.fetch(id).await.map_err(TlsError::Certificate)?;
    let trust = TrustBundle::new([first.root().clone()], id.trust_domain())?
        .with_aliases(manager.trust_domain_aliases());
    let resolver = CertResolver::new(manager.subscribe(id).map_err(TlsError::Certificate)?);
    Ok((resolver, trust))
}

/// The URI SAN of a certificate, if it has exactly one.
pub(crate) fn uri_san(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let sans = cert.subject_alternative_name().ok().flatten()?;
    let mut uris = sans.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => Some(uri.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
