//! One workload's key and certificate as the agent holds them: the key is generated here,
//! in memory, and never serialized anywhere but into the rustls signing key. Owns the CSR
//! we send and the checks on what the CA sends back; scheduling lives in `manager`.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::{crypto::ring::sign::any_ecdsa_type, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};

use super::spiffe::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("failed to generate a key pair or CSR for {id}: {source}")]
    Generate { id: SpiffeId, source: rcgen::Error },
    #[error("failed to load the key for {id} into rustls: {source}")]
    Key { id: SpiffeId, source: rustls::Error },
    #[error("CA answered for {id} with an empty chain")]
    EmptyChain { id: SpiffeId },
    #[error("CA answered for {id} with a chain that is not PEM: {reason}")]
    BadChain { id: SpiffeId, reason: String },
    #[error("CA issued a certificate for {issued:?}, but {id} was requested")]
    WrongIdentity {
        id: SpiffeId,
        issued: Option<String>,
    },
    #[error("CA issued a certificate for {id} that does not match our key")]
    WrongKey { id: SpiffeId },
}

/// A key generated on this node and the CSR that asks for `id` with it.
pub struct PendingKey {
    key: KeyPair,
    pub csr_pem: String,
}

impl PendingKey {
    /// ECDSA P-256, the key Istio's agents use; the CSR's only SAN is `id`.
    pub fn generate(id: &SpiffeId) -> Result<Self, CertError> {
        let err = |source| CertError::Generate {
            id: id.clone(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(err)?)];
        let csr_pem = params
            .serialize_request(&key)
            .map_err(err)?
            .pem()
            .map_err(err)?;
        Ok(Self { key, csr_pem })
    }
}

/// A workload certificate ready for rustls. Invariant (checked in [`WorkloadCert::new`]):
/// the leaf names `id` as its SPIFFE URI and carries the public half of `certified.key`.
#[derive(Debug)]
pub struct WorkloadCert {
    id: SpiffeId,
    certified: Arc<CertifiedKey>,
    chain_pem: Vec<String>,
    root: CertificateDer<'static>,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
    /// Only tests see the key bytes, to prove they never reach the disk.
    #[cfg(test)]
    pub(crate) key_der: Vec<u8>,
}

impl WorkloadCert {
    /// Pairs `pending`'s key with the chain the CA returned (PEM, leaf first, root last).
    pub fn new(
        id: &SpiffeId,
        pending: PendingKey,
        chain_pem: Vec<String>,
    ) -> Result<Self, CertError> {
        let bad = |reason: String| CertError::BadChain {
            id: id.clone(),
            reason,
        };
        let mut ders = Vec::with_capacity(chain_pem.len());
        for pem in &chain_pem {
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                ders.push(der.map_err(|e| bad(e.to_string()))?);
            }
        }
        let (Some(leaf), Some(root)) = (ders.first(), ders.last()) else {
            return Err(CertError::EmptyChain { id: id.clone() });
        };
        let root = root.clone();
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
        let issued = crate::tls::uri_san(&parsed);
        if issued.as_deref() != Some(id.to_string().as_str()) {
            return Err(CertError::WrongIdentity {
                id: id.clone(),
                issued,
            });
        }
        if parsed.public_key().subject_public_key.data.as_ref()
            != rcgen::PublicKeyData::der_bytes(&pending.key)
        {
            return Err(CertError::WrongKey { id: id.clone() });
        }
        let serial = parsed.raw_serial_as_string();
        let validity = parsed.validity();
        let not_before = to_system_time(validity.not_before.timestamp());
        let not_after = to_system_time(validity.not_after.timestamp());

        let signing_key = any_ecdsa_type(&PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            pending.key.serialize_der(),
        )))
        .map_err(|source| CertError::Key {
            id: id.clone(),
            source,
        })?;
        // Peers already hold the root; sending it would only cost bytes.
        let sent = ders.len().saturating_sub(1).max(1);
        ders.truncate(sent);
        Ok(Self {
            id: id.clone(),
            certified: Arc::new(CertifiedKey::new(ders, signing_key)),
            chain_pem,
            root,
            serial,
            not_before,
            not_after,
            #[cfg(test)]
            key_der: pending.key.serialize_der(),
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// What rustls presents: the chain without the root, and the signing key.
    pub fn certified(&self) -> Arc<CertifiedKey> {
        self.certified.clone()
    }

    /// As the CA returned it: leaf first, root last.
    pub fn chain_pem(&self) -> &[String] {
        &self.chain_pem
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// `aa:bb:…`, as `openssl x509 -serial` shows it (lowercase).
    pub fn serial(&self) -> &str {
        &self.serial
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Time left until half the certificate's life has passed, from `now`.
    pub fn until_half_life(&self, now: SystemTime) -> Duration {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        (self.not_before + life / 2)
            .duration_since(now)
            .unwrap_or_default()
    }

    /// Time left until the certificate expires, from `now`.
    pub fn until_expiry(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

fn to_system_time(unix: i64) -> SystemTime {
    match u64::try_from(unix) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// SHA-256 of a DER certificate: what `X-Forwarded-Client-Cert` names a peer's leaf by.
pub fn sha256(der: &[u8]) -> [u8; 32] {
    let mut digest = [0; 32];
    digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
    digest
}

/// Hex SHA-256 of a DER certificate, colon-separated as `openssl x509 -fingerprint`.
pub fn fingerprint(der: &CertificateDer<'_>) -> String {
    sha256(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}
