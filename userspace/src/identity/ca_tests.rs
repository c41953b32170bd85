use std::process::Command;

use rcgen::{CertificateParams, KeyPair, SanType};

use super::*;

pub(crate) fn test_ca(dir: &Path) -> Ca {
    Ca::load_or_create(dir, "cluster.local", DEFAULT_MAX_TTL).unwrap()
}

pub(crate) fn csr_for(sans: Vec<SanType>) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let csr = params.serialize_request(&key).unwrap();
    (key, csr.pem().unwrap())
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

const DEFAULT_ID: &str = "spiffe://cluster.local/ns/default/sa/default";

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn openssl_verifies_issued_chain_with_spiffe_uri_as_only_san() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (_key, csr) = csr_for(vec![uri(DEFAULT_ID)]);
    let chain = ca.sign(&csr, None, |_| true).unwrap();
    assert_eq!(chain.len(), 2, "leaf then root");
    let leaf = dir.path().join("leaf.pem");
    fs::write(&leaf, &chain[0]).unwrap();
    let root = dir.path().join("ca/root-cert.pem");
    let (ok, out) = openssl(&[
        "verify",
        "-CAfile",
        root.to_str().unwrap(),
        "-purpose",
        "sslserver",
        leaf.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, text) = openssl(&["x509", "-noout", "-text", "-in", leaf.to_str().unwrap()]);
    assert!(ok, "{text}");
    let san_line = text
        .lines()
        .skip_while(|l| !l.contains("Subject Alternative Name"))
        .nth(1)
        .unwrap()
        .trim();
    assert_eq!(san_line, format!("URI:{DEFAULT_ID}"));
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("Digital Signature, Key Encipherment"),
        "{text}"
    );
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn root_survives_restart_with_private_key_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let first = test_ca(dir.path()).root().clone();
    assert_eq!(mode(&dir.path().join("ca/root-key.pem")), 0o600);
    assert_eq!(test_ca(dir.path()).root(), &first);
}

#[test]
fn root_created_in_a_wide_directory_gets_private_modes() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    fs::create_dir(&ca_dir).unwrap();
    fs::set_permissions(&ca_dir, fs::Permissions::from_mode(0o755)).unwrap();
    test_ca(dir.path());
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&ca_dir.join("root-key.pem")), 0o600);
    assert_eq!(mode(&ca_dir.join("root-cert.pem")), 0o644);
}

#[test]
fn loaded_root_key_is_taken_back_to_0600() {
    let dir = tempfile::tempdir().unwrap();
    test_ca(dir.path());
    let key = dir.path().join("ca/root-key.pem");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    test_ca(dir.path());
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn half_present_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    test_ca(dir.path());
    fs::remove_file(dir.path().join("ca/root-cert.pem")).unwrap();
    let err = Ca::load_or_create(dir.path(), "cluster.local", DEFAULT_MAX_TTL)
        .err()
        .unwrap();
    assert!(matches!(err, CaError::HalfStore { .. }), "{err}");
}

#[test]
fn ttl_is_capped_at_the_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
    let (_key, csr) = csr_for(vec![uri(DEFAULT_ID)]);
    for (asked, expect) in [(Some(60), 60), (Some(7200), 3600), (None, 3600)] {
        let chain = ca
            .sign(&csr, asked.map(Duration::from_secs), |_| true)
            .unwrap();
        let der = pem::parse(&chain[0]).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
        let v = cert.validity();
        let secs = (v.not_after.timestamp() - v.not_before.timestamp()) as u64;
        assert_eq!(secs, expect, "asked {asked:?}");
    }
}

#[test]
fn refuses_extra_san() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (_key, csr) = csr_for(vec![
        uri(DEFAULT_ID),
        SanType::DnsName("evil.example".try_into().unwrap()),
    ]);
    let err = ca.sign(&csr, None, |_| true).unwrap_err();
    assert!(matches!(err, CaError::SanCount(_)), "{err}");
    assert!(err.to_string().contains("DNS:evil.example"), "{err}");
}

#[test]
fn refuses_dns_san_and_foreign_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (_key, csr) = csr_for(vec![SanType::DnsName("a.example".try_into().unwrap())]);
    let err = ca.sign(&csr, None, |_| true).unwrap_err();
    assert!(matches!(err, CaError::SanNotUri(_)), "{err}");
    let (_key, csr) = csr_for(vec![uri("spiffe://other.domain/ns/default/sa/default")]);
    let err = ca.sign(&csr, None, |_| true).unwrap_err();
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
}

#[test]
fn refuses_identity_the_caller_may_not_have() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (_key, csr) = csr_for(vec![uri(DEFAULT_ID)]);
    let err = ca.sign(&csr, None, |_| false).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("caller is not entitled to identity {DEFAULT_ID}")
    );
}

/// Flips one bit of the CSR's signature, leaving it well-formed.
pub(crate) fn corrupt_signature(csr_pem: &str) -> String {
    let mut der = pem::parse(csr_pem).unwrap().into_contents();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))
}

#[test]
fn refuses_bad_csr_signature() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_ca(dir.path());
    let (_key, csr) = csr_for(vec![uri(DEFAULT_ID)]);
    let err = ca
        .sign(&corrupt_signature(&csr), None, |_| true)
        .unwrap_err();
    assert!(matches!(err, CaError::BadCsrSignature), "{err}");
}

#[test]
fn plugged_intermediate_chain_reaches_the_root() {
    let dir = tempfile::tempdir().unwrap();
    // An operator's root and an intermediate it signed, made with openssl.
    let d = |f: &str| dir.path().join(f).to_str().unwrap().to_owned();
    let run = |args: &[&str]| {
        let (ok, out) = openssl(args);
        assert!(ok, "openssl {args:?}: {out}");
    };
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &d("root.key"),
    ]);
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &d("root.key"),
        "-subj",
        "/O=corp/CN=corp root",
        "-days",
        "30",
        "-out",
        &d("root.pem"),
    ]);
    run(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        &d("int.key"),
    ]);
    run(&[
        "req",
        "-new",
        "-key",
        &d("int.key"),
        "-subj",
        "/O=corp/CN=mesh intermediate",
        "-out",
        &d("int.csr"),
    ]);
    fs::write(
        d("ext.cnf"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &d("int.csr"),
        "-CA",
        &d("root.pem"),
        "-CAkey",
        &d("root.key"),
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        &d("ext.cnf"),
        "-out",
        &d("int.pem"),
    ]);
    let plugged = PluggedCa {
        cert: d("int.pem").into(),
        key: d("int.key").into(),
        chain: None,
    };
    let err = Ca::from_pem_files(&plugged, "cluster.local", DEFAULT_MAX_TTL)
        .err()
        .unwrap();
    assert!(matches!(err, CaError::MissingChain { .. }), "{err}");
    let plugged = PluggedCa {
        chain: Some(d("root.pem").into()),
        ..plugged
    };
    let ca = Ca::from_pem_files(&plugged, "cluster.local", DEFAULT_MAX_TTL).unwrap();
    let (_key, csr) = csr_for(vec![uri(DEFAULT_ID)]);
    let chain = ca.sign(&csr, None, |_| true).unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    fs::write(d("leaf.pem"), &chain[0]).unwrap();
    fs::write(d("untrusted.pem"), &chain[1]).unwrap();
    run(&[
        "verify",
        "-CAfile",
        &d("root.pem"),
        "-untrusted",
        &d("untrusted.pem"),
        &d("leaf.pem"),
    ]);
}

/// Istio's `cacerts` files for an intermediate under a fresh root, in `dir`; with the
/// chain file as Istio's tooling writes it (intermediate, then root) when `chain` is set.
fn write_cacerts(dir: &Path, chain: bool) -> String {
    let (root_key, root_pem) = create_root("cluster.local").unwrap();
    let issuer =
        Issuer::from_ca_cert_pem(&root_pem, KeyPair::from_pem(&root_key).unwrap()).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "plugged intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let cert_pem = params.signed_by(&key, &issuer).unwrap().pem();
    fs::write(dir.join("ca-cert.pem"), &cert_pem).unwrap();
    fs::write(dir.join("ca-key.pem"), key.serialize_pem()).unwrap();
    fs::write(dir.join("root-cert.pem"), &root_pem).unwrap();
    if chain {
        fs::write(dir.join("cert-chain.pem"), format!("{cert_pem}{root_pem}")).unwrap();
    }
    root_pem
}

#[test]
fn istio_cacerts_layout_issues_chains_up_to_its_root() {
    for chain_file in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let root_pem = write_cacerts(dir.path(), chain_file);
        let files = Cacerts::read_dir(dir.path()).unwrap();
        let ca = Ca::from_cacerts(&files, dir.path(), "cluster.local", DEFAULT_MAX_TTL).unwrap();
        let (_key, csr) = csr_for(vec![uri(DEFAULT_ID)]);
        let chain = ca.sign(&csr, None, |_| true).unwrap();
        assert_eq!(
            chain.len(),
            3,
            "leaf, intermediate, root (chain file: {chain_file})"
        );
        let der = |p: &str| pem::parse(p).unwrap().into_contents();
        assert_eq!(der(&chain[2]), der(&root_pem), "chain file: {chain_file}");
    }
}
