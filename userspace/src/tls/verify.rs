//! The two certificate verifiers and the proof they vouch for. Both check the chain as
//! webpki does and then the SPIFFE URI SAN themselves: webpki's name check only knows DNS
//! names and IP addresses, which workload certificates do not carry.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
    },
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{TlsError, TrustBundle, uri_san};
use crate::identity::SpiffeId;

/// Proof that the peer of a completed handshake holds `id`: its chain reached the mesh
/// root and its certificate names `id` in our trust domain or one of its aliases. Only this module builds one,
/// and only from a connection configured by [`super::MeshAcceptor`] or
/// [`super::MeshConnector`], whose verifiers did those checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerVerified {
    id: SpiffeId,
    not_after: SystemTime,
    /// SHA-256 of the peer's leaf certificate (DER), as `X-Forwarded-Client-Cert` names it.
    fingerprint: [u8; 32],
}

impl PeerVerified {
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// When the peer's certificate expires: a connection must not outlive it.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// SHA-256 of the peer's leaf certificate (DER).
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.fingerprint
    }

    pub(super) fn from_handshake(conn: &rustls::CommonState) -> Result<Self, TlsError> {
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| TlsError::PeerIdentity("missing after the handshake".into()))?;
        let (id, not_after) = identity_and_expiry(leaf)?;
        Ok(Self {
            id,
            not_after,
            fingerprint: crate::identity::cert::sha256(leaf),
        })
    }
}

/// The identity a certificate names in its one URI SAN, and the end of its validity.
fn identity_and_expiry(cert: &CertificateDer<'_>) -> Result<(SpiffeId, SystemTime), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| TlsError::PeerIdentity(format!("does not parse: {e}")))?;
    let not_after = u64::try_from(parsed.validity().not_after.timestamp())
        .map_or(UNIX_EPOCH, |secs| UNIX_EPOCH + Duration::from_secs(secs));
    Ok((spiffe_id(&parsed)?, not_after))
}

/// The identity a certificate names in its one URI SAN.
fn spiffe_id(parsed: &x509_parser::certificate::X509Certificate<'_>) -> Result<SpiffeId, TlsError> {
    let uri = uri_san(parsed)
        .ok_or_else(|| TlsError::PeerIdentity("has not exactly one URI SAN".into()))?;
    uri.parse()
        .map_err(|e| TlsError::PeerIdentity(format!("URI SAN: {e}")))
}

/// Wraps our error so rustls reports it (and sends `bad_certificate`).
fn reject(err: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

fn in_domain(cert: &CertificateDer<'_>, trust: &TrustBundle) -> Result<SpiffeId, rustls::Error> {
    let (id, _) = identity_and_expiry(cert).map_err(reject)?;
    if !trust.contains(id.trust_domain()) {
        return Err(reject(TlsError::ForeignTrustDomain {
            peer: id,
            ours: trust.trust_domains.clone(),
        }));
    }
    Ok(id)
}

/// Secure naming across aliases: `id` is `allowed`, or names the same namespace and
/// service account in another trust domain of the bundle (a server not yet, or no
/// longer, re-issued in the trust domain the destination index names).
fn is_allowed(id: &SpiffeId, allowed: &[SpiffeId]) -> bool {
    allowed.iter().any(|a| {
        a == id || (a.namespace() == id.namespace() && a.service_account() == id.service_account())
    })
}

/// Server side: a client certificate is mandatory, must chain to the mesh root and name a
/// workload in our trust domain or one of its aliases.
#[derive(Debug)]
pub(super) struct MeshClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust: TrustBundle,
}

impl MeshClientVerifier {
    pub(super) fn new(
        trust: &TrustBundle,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let inner = WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), provider)
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Self {
            inner,
            trust: trust.clone(),
        })
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        in_domain(end_entity, &self.trust)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: the server's chain must reach the mesh root and its identity must be one
/// of those allowed to run the destination.
#[derive(Debug)]
pub(super) struct SecureNamingVerifier {
    trust: TrustBundle,
    allowed: Vec<SpiffeId>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SecureNamingVerifier {
    pub(super) fn new(
        trust: &TrustBundle,
        allowed: Vec<SpiffeId>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            trust: trust.clone(),
            allowed,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SecureNamingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.trust.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        // Only reached for an identity in the bundle, so matching namespace and service
        // account across trust domains never lets a foreign domain through.
        let id = in_domain(end_entity, &self.trust)?;
        if !is_allowed(&id, &self.allowed) {
            return Err(reject(TlsError::NotAllowed {
                peer: id,
                allowed: self.allowed.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
