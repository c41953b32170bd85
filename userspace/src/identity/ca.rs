//! The mesh certificate authority: loads or creates its signing key and turns CSRs into
//! workload certificates. It owns the root (or plugged-in intermediate) and the rules an
//! issued certificate follows; it does not decide who may ask for which identity (the
//! caller passes that in) and does no network I/O (see `ca_service`).

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use time::OffsetDateTime;

use super::spiffe::{SpiffeError, SpiffeId};
use crate::state_file;

/// Default and maximum workload certificate lifetime.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Lifetime of a root the CA creates itself.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Lifetime of the CA service's own TLS certificate; it is made anew at each start.
const SERVING_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// File names under `<state-dir>/ca/` for the self-created root.
const ROOT_KEY_FILE: &str = "root-key.pem";
const ROOT_CERT_FILE: &str = "root-cert.pem";

/// Istio's plug-in CA files (the `cacerts` Secret): the signing certificate and its key,
/// the chain from the signing certificate up (the signing certificate itself first, the
/// root not always last), and the root.
const CACERTS_CERT_FILE: &str = "ca-cert.pem";
const CACERTS_KEY_FILE: &str = "ca-key.pem";
const CACERTS_CHAIN_FILE: &str = "cert-chain.pem";
const CACERTS_ROOT_FILE: &str = "root-cert.pem";

/// A plugged-in signing certificate: a root, or an intermediate plus the chain above it.
#[derive(Clone, Debug)]
pub struct PluggedCa {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificates above `cert`, ending with the root. Required when `cert` is an
    /// intermediate, so issued chains reach the root.
    pub chain: Option<PathBuf>,
}

/// Istio's plug-in CA as the PEM texts of its files (the `cacerts` Secret's keys),
/// wherever they were read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cacerts {
    /// `ca-cert.pem`: the signing certificate.
    pub ca_cert: String,
    /// `ca-key.pem`: its private key.
    pub ca_key: String,
    /// `root-cert.pem`: the root, which is what peers trust.
    pub root_cert: String,
    /// `cert-chain.pem`: from the signing certificate up; may be left out when
    /// `ca-cert.pem` is signed by the root directly.
    pub cert_chain: Option<String>,
}

impl Cacerts {
    pub const CA_CERT: &str = CACERTS_CERT_FILE;
    pub const CA_KEY: &str = CACERTS_KEY_FILE;
    pub const ROOT_CERT: &str = CACERTS_ROOT_FILE;
    pub const CERT_CHAIN: &str = CACERTS_CHAIN_FILE;

    /// Reads the files from `dir` (the Secret mounted, say).
    pub fn read_dir(dir: &Path) -> Result<Self, CaError> {
        let chain_path = dir.join(CACERTS_CHAIN_FILE);
        Ok(Self {
            ca_cert: read_string(&dir.join(CACERTS_CERT_FILE))?,
            ca_key: read_string(&dir.join(CACERTS_KEY_FILE))?,
            root_cert: read_string(&dir.join(CACERTS_ROOT_FILE))?,
            cert_chain: chain_path
                .exists()
                .then(|| read_string(&chain_path))
                .transpose()?,
        })
    }

    /// A new self-signed root for `trust_domain` that signs workloads itself.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let (ca_key, ca_cert) = create_root(trust_domain)?;
        Ok(Self {
            root_cert: ca_cert.clone(),
            cert_chain: Some(ca_cert.clone()),
            ca_cert,
            ca_key,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "CA state is half there: {present} exists but {missing} does not; restore it or remove both to create a new root"
    )]
    HalfStore { present: PathBuf, missing: PathBuf },
    #[error("{path}: {what}")]
    BadPem { path: PathBuf, what: String },
    #[error("{path}: the private key does not belong to the CA certificate")]
    KeyMismatch { path: PathBuf },
    #[error("{path}: not a CA certificate (basicConstraints CA:TRUE missing)")]
    NotCa { path: PathBuf },
    #[error(
        "{path} is an intermediate (issuer differs from subject): give the chain up to the root"
    )]
    MissingChain { path: PathBuf },
    #[error("failed to generate {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("CSR is not valid PEM or DER: {0}")]
    MalformedCsr(rcgen::Error),
    #[error("CSR signature does not verify against its public key")]
    BadCsrSignature,
    #[error("CSR must carry exactly one SAN, the workload's SPIFFE URI; it has {}: {}", .0.len(), .0.join(", "))]
    SanCount(Vec<String>),
    #[error("CSR SAN must be the workload's SPIFFE URI, found {0}")]
    SanNotUri(String),
    #[error("CSR SAN is not a workload identity: {0}")]
    SanNotSpiffe(SpiffeError),
    #[error("CSR asks for {requested}, outside this CA's trust domain {ours}")]
    ForeignTrustDomain { requested: SpiffeId, ours: String },
    #[error("caller is not entitled to identity {0}")]
    NotEntitled(SpiffeId),
    #[error("failed to sign certificate for {id}: {source}")]
    Sign { id: String, source: rcgen::Error },
}

/// The CA. Holds the signing key in memory; `chain` is what follows every issued leaf.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// PEM of the signing certificate and every certificate above it, root last.
    chain: Vec<String>,
    root: CertificateDer<'static>,
    /// Issued certificates never outlive the signing certificate.
    signer_not_after: OffsetDateTime,
    max_ttl: Duration,
    rng: SystemRandom,
}

impl Ca {
    /// Loads the root kept in `<state_dir>/ca/`, or creates one there on first start, so a
    /// restarted agent keeps the trust its peers have.
    pub fn load_or_create(
        state_dir: &Path,
        trust_domain: &str,
        max_ttl: Duration,
    ) -> Result<Self, CaError> {
        let dir = state_dir.join("ca");
        let key_path = dir.join(ROOT_KEY_FILE);
        let cert_path = dir.join(ROOT_CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => {
                // Whatever an older version or a restore left, the key is the agent's alone.
                restrict(&dir, &key_path)?;
                let plugged = PluggedCa {
                    cert: cert_path,
                    key: key_path,
                    chain: None,
                };
                Self::from_pem_files(&plugged, trust_domain, max_ttl)
            }
            (false, false) => {
                let (key_pem, cert_pem) = create_root(trust_domain)?;
                state_file::private_dir(&dir).map_err(write_error(&dir))?;
                state_file::write(&key_path, key_pem.as_bytes(), 0o600)
                    .map_err(write_error(&key_path))?;
                state_file::write(&cert_path, cert_pem.as_bytes(), 0o644)
                    .map_err(write_error(&cert_path))?;
                tracing::info!(dir = %dir.display(), "created a new mesh root");
                Self::from_pem(&key_pem, &cert_pem, &[], &cert_path, trust_domain, max_ttl)
            }
            (key, _) => {
                let (present, missing) = if key {
                    (key_path, cert_path)
                } else {
                    (cert_path, key_path)
                };
                Err(CaError::HalfStore { present, missing })
            }
        }
    }

    /// Uses an operator's root or intermediate.
    pub fn from_pem_files(
        files: &PluggedCa,
        trust_domain: &str,
        max_ttl: Duration,
    ) -> Result<Self, CaError> {
        let key_pem = read_string(&files.key)?;
        let cert_pem = read_string(&files.cert)?;
        let chain = match &files.chain {
            Some(path) => pem_certs(path, &read_string(path)?)?,
            None => Vec::new(),
        };
        Self::from_pem(
            &key_pem,
            &cert_pem,
            &chain,
            &files.cert,
            trust_domain,
            max_ttl,
        )
    }

    /// Uses a CA in Istio's plug-in layout, as istiod reads `cacerts`. `origin` names
    /// where the files came from (a directory, a Secret) in errors.
    pub fn from_cacerts(
        files: &Cacerts,
        origin: &Path,
        trust_domain: &str,
        max_ttl: Duration,
    ) -> Result<Self, CaError> {
        let cert_path = origin.join(CACERTS_CERT_FILE);
        let root = first_cert(&origin.join(CACERTS_ROOT_FILE), &files.root_cert)?;
        let listed = match &files.cert_chain {
            Some(chain) => pem_certs(&origin.join(CACERTS_CHAIN_FILE), chain)?,
            None => Vec::new(),
        };
        let signer = first_cert(&cert_path, &files.ca_cert)?;
        // What `from_pem` wants is what lies above the signer, root last: drop the signer
        // where Istio's chain repeats it, add the root where the chain stops short of it.
        let mut above: Vec<_> = listed.into_iter().filter(|c| *c != signer).collect();
        if signer != root && above.last() != Some(&root) {
            above.push(root);
        }
        Self::from_pem(
            &files.ca_key,
            &files.ca_cert,
            &above,
            &cert_path,
            trust_domain,
            max_ttl,
        )
    }

    fn from_pem(
        key_pem: &str,
        cert_pem: &str,
        above: &[CertificateDer<'static>],
        cert_path: &Path,
        trust_domain: &str,
        max_ttl: Duration,
    ) -> Result<Self, CaError> {
        let bad = |what: String| CaError::BadPem {
            path: cert_path.to_owned(),
            what,
        };
        let signer = first_cert(cert_path, cert_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| bad(format!("private key: {e}")))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&signer).map_err(|e| bad(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(CaError::NotCa {
                path: cert_path.to_owned(),
            });
        }
        if parsed.public_key().subject_public_key.data.as_ref()
            != rcgen::PublicKeyData::der_bytes(&key)
        {
            return Err(CaError::KeyMismatch {
                path: cert_path.to_owned(),
            });
        }
        if above.is_empty() && parsed.subject().as_raw() != parsed.issuer().as_raw() {
            return Err(CaError::MissingChain {
                path: cert_path.to_owned(),
            });
        }
        let signer_not_after = parsed.validity().not_after.to_datetime();
        let issuer =
            Issuer::from_ca_cert_der(&signer, key).map_err(|e| bad(format!("as issuer: {e}")))?;
        let mut chain = vec![signer.clone()];
        chain.extend(above.iter().cloned());
        let root = chain.last().cloned().unwrap_or(signer);
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            chain: chain.iter().map(|c| to_pem(c)).collect(),
            root,
            signer_not_after,
            max_ttl,
            rng: SystemRandom::new(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The mesh root every issued chain ends with.
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The root as PEM, as peers and applications are given it.
    pub fn root_pem(&self) -> String {
        to_pem(&self.root)
    }

    /// Signs `csr_pem` into a workload certificate and returns the chain as PEM, leaf
    /// first and root last (Istio's order). `ttl` is honoured up to the CA's maximum;
    /// `entitled` says whether the caller may hold the identity the CSR names.
    pub fn sign(
        &self,
        csr_pem: &str,
        ttl: Option<Duration>,
        entitled: impl FnOnce(&SpiffeId) -> bool,
    ) -> Result<Vec<String>, CaError> {
        let csr = parse_csr(csr_pem)?;
        let id = self.requested_identity(&csr.params.subject_alt_names)?;
        if !entitled(&id) {
            return Err(CaError::NotEntitled(id));
        }
        let ttl = ttl
            .filter(|t| !t.is_zero())
            .unwrap_or(self.max_ttl)
            .min(self.max_ttl);
        let mut params = self.leaf_params(ttl)?;
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(
            |source| CaError::Sign {
                id: id.to_string(),
                source,
            },
        )?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| CaError::Sign {
                id: id.to_string(),
                source,
            })?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok(chain)
    }

    /// The identity `csr_pem` asks for, under the same rules as [`Self::sign`]: for a
    /// caller whose entitlement takes I/O to decide before signing.
    pub fn csr_identity(&self, csr_pem: &str) -> Result<SpiffeId, CaError> {
        self.requested_identity(&parse_csr(csr_pem)?.params.subject_alt_names)
    }

    /// A TLS server certificate for the CA service itself, valid for `names` (DNS names or
    /// IP addresses). Returns the chain PEM and the private key PEM; both stay in memory.
    pub fn serving_identity(&self, names: &[String]) -> Result<(String, String), CaError> {
        let what = "the CA service certificate";
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|source| CaError::Generate { what, source })?;
        let mut params = self.leaf_params(SERVING_TTL)?;
        params.subject_alt_names = CertificateParams::new(names.to_vec())
            .map_err(|source| CaError::Generate { what, source })?
            .subject_alt_names;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CaError::Generate { what, source })?;
        let mut chain = cert.pem();
        for pem in &self.chain {
            chain.push_str(pem);
        }
        Ok((chain, key.serialize_pem()))
    }

    /// Parameters shared by everything this CA issues: fresh random serial, not CA,
    /// valid from now for `ttl` but never past the signing certificate.
    fn leaf_params(&self, ttl: Duration) -> Result<CertificateParams, CaError> {
        let mut serial = [0u8; 16];
        self.rng.fill(&mut serial).map_err(|_| CaError::Generate {
            what: "a serial number",
            source: rcgen::Error::RingUnspecified,
        })?;
        // A positive INTEGER that is never zero.
        serial[0] = (serial[0] & 0x7f) | 0x01;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.not_before = now;
        params.not_after = (now + ttl).min(self.signer_not_after);
        Ok(params)
    }

    /// The identity a CSR names, if its SANs are exactly one SPIFFE URI in our trust domain.
    fn requested_identity(&self, sans: &[SanType]) -> Result<SpiffeId, CaError> {
        let uri = match sans {
            [SanType::URI(uri)] => uri.as_str(),
            [other] => return Err(CaError::SanNotUri(describe_san(other))),
            _ => return Err(CaError::SanCount(sans.iter().map(describe_san).collect())),
        };
        let id: SpiffeId = uri.parse().map_err(CaError::SanNotSpiffe)?;
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                requested: id,
                ours: self.trust_domain.clone(),
            });
        }
        Ok(id)
    }
}

/// A self-signed ECDSA P-256 root for `trust_domain`, as (key PEM, cert PEM).
fn create_root(trust_domain: &str) -> Result<(String, String), CaError> {
    let what = "the mesh root";
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| CaError::Generate { what, source })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "ambit mesh root");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + ROOT_TTL;
    let cert = params
        .self_signed(&key)
        .map_err(|source| CaError::Generate { what, source })?;
    Ok((key.serialize_pem(), cert.pem()))
}

/// Parses a CSR and checks its self-signature.
fn parse_csr(csr_pem: &str) -> Result<CertificateSigningRequestParams, CaError> {
    CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CaError::BadCsrSignature,
        other => CaError::MalformedCsr(other),
    })
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::URI(u) => format!("URI:{}", u.as_str()),
        SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        SanType::Rfc822Name(e) => format!("email:{}", e.as_str()),
        _ => "otherName".to_owned(),
    }
}

fn read_string(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_certs(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::BadPem {
            path: path.to_owned(),
            what: format!("certificate: {e}"),
        })
}

fn first_cert(path: &Path, pem: &str) -> Result<CertificateDer<'static>, CaError> {
    pem_certs(path, pem)?
        .into_iter()
        .next()
        .ok_or_else(|| CaError::BadPem {
            path: path.to_owned(),
            what: "no certificate".into(),
        })
}

/// Takes the CA's own directory and root key back to modes 0700 and 0600.
fn restrict(dir: &Path, key: &Path) -> Result<(), CaError> {
    state_file::private_dir(dir).map_err(write_error(dir))?;
    fs::set_permissions(key, fs::Permissions::from_mode(0o600)).map_err(write_error(key))
}

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_owned();
    move |source| CaError::Write { path, source }
}

fn to_pem(der: &CertificateDer<'_>) -> String {
    // LF, as rcgen writes them and as PEM files on Linux are: a root published from the
    // Secret reads the same as the Secret's own `root-cert.pem`.
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.as_ref()), config)
}

#[cfg(test)]
#[path = "ca_tests.rs"]
pub(crate) mod tests;
