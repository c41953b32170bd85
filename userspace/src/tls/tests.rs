//! The TLS policy checked from outside: openssl's `s_client` against a server built
//! from [`MeshAcceptor`], and our connector against it, over real TCP on 127.0.0.1.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    time::{Instant, timeout},
};

use super::*;
use crate::identity::{
    Ca, ManagerConfig, SecretManager,
    ca::tests::csr_for,
    test_support::{ca_in, id, local_manager},
};

const SERVER: &str = "spiffe://cluster.local/ns/default/sa/default";
const CLIENT: &str = "spiffe://cluster.local/ns/client/sa/curl";
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

struct Mesh {
    dir: tempfile::TempDir,
    ca: Arc<Ca>,
    manager: SecretManager,
}

fn mesh(ttl: Duration) -> Mesh {
    mesh_with_aliases(ttl, &[])
}

fn mesh_with_aliases(ttl: Duration, aliases: &[&str]) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path(), ttl);
    let config = ManagerConfig {
        ttl,
        trust_domain_aliases: aliases.iter().map(|a| a.to_string()).collect(),
        ..ManagerConfig::default()
    };
    let manager = local_manager(ca.clone(), config);
    Mesh { dir, ca, manager }
}

impl Mesh {
    async fn acceptor(&self, who: &str) -> MeshAcceptor {
        self.manager.add_workload(&id(who));
        MeshAcceptor::for_workload(&self.manager, &id(who))
            .await
            .unwrap()
    }

    async fn connector(&self, who: &str, allowed: &[&str]) -> MeshConnector {
        self.manager.add_workload(&id(who));
        let allowed = allowed.iter().map(|s| id(s)).collect();
        MeshConnector::for_workload(&self.manager, &id(who), allowed)
            .await
            .unwrap()
    }

    fn root_pem(&self) -> PathBuf {
        self.dir.path().join("ca/root-cert.pem")
    }

    /// A certificate and key for openssl, signed by `ca` for `who`. These are the test
    /// client's files, not a key of the manager.
    fn client_files(&self, ca: &Ca, who: &str, name: &str) -> (PathBuf, PathBuf) {
        let (key, csr) = csr_for(vec![rcgen::SanType::URI(who.try_into().unwrap())]);
        let chain = ca.sign(&csr, None, |_| true).unwrap();
        let cert = self.dir.path().join(format!("{name}-cert.pem"));
        let key_path = self.dir.path().join(format!("{name}-key.pem"));
        std::fs::write(&cert, &chain[0]).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert, key_path)
    }
}

/// Serves on 127.0.0.1: each connection is greeted with `peer=<client identity>` and then
/// echoed line by line until the client closes.
async fn echo_server(acceptor: MeshAcceptor) -> SocketAddr {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok((tls, peer)) = acceptor.accept(tcp).await else {
                    return;
                };
                let (read, mut write) = tokio::io::split(tls);
                if write
                    .write_all(format!("peer={}\n", peer.id()).as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line == "bye" {
                        return;
                    }
                    if write
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Runs `openssl s_client` against `addr` and returns everything it printed.
async fn s_client(
    addr: SocketAddr,
    root: &Path,
    cert: Option<&(PathBuf, PathBuf)>,
    extra: &[&str],
) -> String {
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string(), "-CAfile"])
        .arg(root)
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some((c, k)) = cert {
        cmd.arg("-cert").arg(c).arg("-key").arg(k);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The server closes on `bye`, so `-ign_eof` runs end when the server is done.
    let _ = stdin.write_all(b"bye\n").await;
    drop(stdin);
    let out = timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("openssl s_client must finish within 10 s")
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A mesh server for `SERVER` and openssl client files for `CLIENT`.
async fn served_mesh() -> (Mesh, SocketAddr, (PathBuf, PathBuf)) {
    let mesh = mesh(Duration::from_secs(3600));
    let addr = echo_server(mesh.acceptor(SERVER).await).await;
    let files = mesh.client_files(&mesh.ca, CLIENT, "client");
    (mesh, addr, files)
}

fn greeted(out: &str) -> bool {
    out.contains(&format!("peer={CLIENT}"))
}

#[tokio::test]
async fn openssl_tls1_2_ecdhe_ecdsa_aes128_gcm_with_mesh_cert_succeeds() {
    let (mesh, addr, files) = served_mesh().await;
    let out = s_client(
        addr,
        &mesh.root_pem(),
        Some(&files),
        &[
            "-ign_eof",
            "-tls1_2",
            "-cipher",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "-alpn",
            "h2",
        ],
    )
    .await;
    assert!(greeted(&out), "{out}");
    assert!(
        out.contains("Cipher is ECDHE-ECDSA-AES128-GCM-SHA256"),
        "{out}"
    );
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
}

#[tokio::test]
async fn openssl_tls1_3_with_mesh_cert_succeeds() {
    let (mesh, addr, files) = served_mesh().await;
    let out = s_client(
        addr,
        &mesh.root_pem(),
        Some(&files),
        &["-ign_eof", "-tls1_3"],
    )
    .await;
    assert!(greeted(&out), "{out}");
    assert!(out.contains("TLSv1.3"), "{out}");
}

#[tokio::test]
async fn openssl_tls1_1_is_refused() {
    let (mesh, addr, files) = served_mesh().await;
    // SECLEVEL=0 so it is our server, not openssl's own policy, that refuses TLS 1.1.
    let out = s_client(
        addr,
        &mesh.root_pem(),
        Some(&files),
        &["-ign_eof", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
    )
    .await;
    assert!(!greeted(&out), "{out}");
    // rustls answers a ClientHello without TLS 1.2 or 1.3 with handshake_failure.
    assert!(out.contains("alert handshake failure"), "{out}");
}

#[tokio::test]
async fn openssl_cbc_suite_is_refused() {
    let (mesh, addr, files) = served_mesh().await;
    let out = s_client(
        addr,
        &mesh.root_pem(),
        Some(&files),
        &[
            "-ign_eof",
            "-tls1_2",
            "-cipher",
            "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA",
        ],
    )
    .await;
    assert!(!greeted(&out), "{out}");
    assert!(out.contains("handshake failure"), "{out}");
}

#[tokio::test]
async fn openssl_without_client_cert_is_refused() {
    let (mesh, addr, _files) = served_mesh().await;
    for version in ["-tls1_2", "-tls1_3"] {
        let out = s_client(addr, &mesh.root_pem(), None, &["-ign_eof", version]).await;
        assert!(!greeted(&out), "{version}: {out}");
        assert!(
            out.contains("certificate required") || out.contains("handshake failure"),
            "{version}: {out}"
        );
    }
}

#[tokio::test]
async fn openssl_client_cert_from_another_root_is_refused() {
    let (mesh, addr, _files) = served_mesh().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = ca_in(other_dir.path(), Duration::from_secs(3600));
    let files = mesh.client_files(&other_ca, CLIENT, "foreign-root");
    let out = s_client(addr, &mesh.root_pem(), Some(&files), &["-ign_eof"]).await;
    assert!(!greeted(&out), "{out}");
    // The foreign root has the same name as ours, so its signature is what fails.
    assert!(out.contains("alert decrypt error"), "{out}");
}

#[tokio::test]
async fn openssl_client_cert_from_another_trust_domain_is_refused() {
    let (mesh, addr, _files) = served_mesh().await;
    // Same root key, other trust domain: only the SPIFFE check can refuse this one.
    let other_td =
        Ca::load_or_create(mesh.dir.path(), "other.domain", Duration::from_secs(3600)).unwrap();
    let files = mesh.client_files(
        &other_td,
        "spiffe://other.domain/ns/client/sa/curl",
        "foreign-td",
    );
    let out = s_client(addr, &mesh.root_pem(), Some(&files), &["-ign_eof"]).await;
    assert!(!out.contains("peer="), "{out}");
    assert!(out.contains("alert certificate unknown"), "{out}");
}

#[tokio::test]
async fn openssl_client_cert_from_an_aliased_trust_domain_is_accepted() {
    let mesh = mesh_with_aliases(Duration::from_secs(3600), &["old.domain"]);
    let addr = echo_server(mesh.acceptor(SERVER).await).await;
    let old_td =
        Ca::load_or_create(mesh.dir.path(), "old.domain", Duration::from_secs(3600)).unwrap();
    let old_client = "spiffe://old.domain/ns/client/sa/curl";
    let files = mesh.client_files(&old_td, old_client, "aliased-td");
    let out = s_client(addr, &mesh.root_pem(), Some(&files), &["-ign_eof"]).await;
    assert!(out.contains(&format!("peer={old_client}")), "{out}");
}

/// A server still certified in the old trust domain, under the same root, is the same
/// workload to a client whose bundle has that domain as an alias, and a stranger to one
/// without it.
#[tokio::test]
async fn client_accepts_a_server_of_an_aliased_trust_domain_as_the_same_workload() {
    let ours = mesh_with_aliases(Duration::from_secs(3600), &["old.domain"]);
    let old_ca = Arc::new(
        Ca::load_or_create(ours.dir.path(), "old.domain", Duration::from_secs(3600)).unwrap(),
    );
    let old = Mesh {
        manager: local_manager(
            old_ca.clone(),
            ManagerConfig {
                trust_domain_aliases: vec!["cluster.local".into()],
                ..ManagerConfig::default()
            },
        ),
        ca: old_ca,
        dir: tempfile::tempdir().unwrap(),
    };
    let addr = echo_server(
        old.acceptor("spiffe://old.domain/ns/default/sa/default")
            .await,
    )
    .await;
    let connector = ours.connector(CLIENT, &[SERVER]).await;
    one_exchange(&connector, addr).await.unwrap();
    let without_alias = mesh(Duration::from_secs(3600));
    let connector = without_alias.connector(CLIENT, &[SERVER]).await;
    assert!(one_exchange(&connector, addr).await.is_err());
}

#[tokio::test]
async fn mesh_peers_verify_each_other_over_tls1_3_with_h2() {
    let mesh = mesh(Duration::from_secs(3600));
    let addr = echo_server(mesh.acceptor(SERVER).await).await;
    let connector = mesh.connector(CLIENT, &[SERVER]).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (tls, peer) = connector.connect(LOCALHOST, tcp).await.unwrap();
    assert_eq!(peer.id(), &id(SERVER));
    let conn = tls.get_ref().1;
    assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let mut lines = BufReader::new(tls).lines();
    assert_eq!(
        lines.next_line().await.unwrap().unwrap(),
        format!("peer={CLIENT}")
    );
}

#[tokio::test]
async fn client_refuses_server_identity_not_in_allowed_list() {
    let mesh = mesh(Duration::from_secs(3600));
    let addr = echo_server(mesh.acceptor(SERVER).await).await;
    let connector = mesh
        .connector(CLIENT, &["spiffe://cluster.local/ns/default/sa/reviews"])
        .await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = connector.connect(LOCALHOST, tcp).await.err().unwrap();
    assert!(
        err.to_string().contains(&format!(
            "server identity {SERVER} is not allowed for this destination"
        )),
        "{err}"
    );
}

/// One TLS connection to `addr` that sends a line and reads it back. Returns the serial
/// of the certificate the server presented.
async fn one_exchange(connector: &MeshConnector, addr: SocketAddr) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (tls, _) = connector
        .connect(LOCALHOST, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no server cert")?[0]
        .clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).map_err(|e| e.to_string())?;
    let serial = parsed.raw_serial_as_string();
    let mut lines = BufReader::new(tls).lines();
    lines.next_line().await.map_err(|e| e.to_string())?;
    lines
        .get_mut()
        .write_all(b"hello\n")
        .await
        .map_err(|e| e.to_string())?;
    match lines.next_line().await.map_err(|e| e.to_string())? {
        Some(line) if line == "hello" => Ok(serial),
        other => Err(format!("unexpected echo {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_handshakes_and_long_lived_connection_working() {
    const RUN: Duration = Duration::from_secs(9);
    let mesh = mesh(Duration::from_secs(3));
    let addr = echo_server(mesh.acceptor(SERVER).await).await;
    let connector = mesh.connector(CLIENT, &[SERVER]).await;

    // A connection opened before the first rotation, exercised until after several.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (tls, _) = connector.connect(LOCALHOST, tcp).await.unwrap();
    let long_lived = tokio::spawn(async move {
        let mut lines = BufReader::new(tls).lines();
        lines.next_line().await.unwrap();
        let start = Instant::now();
        let mut round_trips = 0u32;
        while start.elapsed() < RUN {
            lines.get_mut().write_all(b"ping\n").await.unwrap();
            assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ping"));
            round_trips += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        round_trips
    });

    let start = Instant::now();
    let mut serials = Vec::new();
    let mut handshakes = 0u32;
    while start.elapsed() < RUN {
        let serial = one_exchange(&connector, addr)
            .await
            .unwrap_or_else(|e| panic!("handshake {handshakes} failed: {e}"));
        handshakes += 1;
        if serials.last() != Some(&serial) {
            serials.push(serial);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let round_trips = timeout(Duration::from_secs(5), long_lived)
        .await
        .unwrap()
        .unwrap();
    assert!(
        round_trips > 50,
        "long-lived connection made {round_trips} round trips"
    );
    // A 3 s certificate rotates every ~1.5 s: at least 4 server certificates in 9 s.
    assert!(
        serials.len() >= 4,
        "server certificates seen: {serials:?} over {handshakes} handshakes"
    );
}
