use std::{
    fs,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
};

use super::*;
use crate::identity::{
    ca_client::BoxFuture,
    test_support::{ca_in, id, local_manager},
};

const DEFAULT: &str = "spiffe://cluster.local/ns/default/sa/default";

fn config(ttl_secs: u64) -> ManagerConfig {
    ManagerConfig {
        ttl: Duration::from_secs(ttl_secs),
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(8),
        request_timeout: Duration::from_secs(5),
        ..ManagerConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn refreshes_at_half_life() {
    let dir = tempfile::tempdir().unwrap();
    let manager = local_manager(ca_in(dir.path(), Duration::from_secs(3600)), config(100));
    let default = id(DEFAULT);
    manager.add_workload(&default);
    let first = manager.fetch(&default).await.unwrap();
    assert_eq!(first.id(), &default);

    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(
        manager.fetch(&default).await.unwrap().serial(),
        first.serial()
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let second = manager.fetch(&default).await.unwrap();
    assert_ne!(
        second.serial(),
        first.serial(),
        "rotated after half of 100 s"
    );
    let report = manager.certs_report();
    assert_eq!(report.identities[0].state, "valid");
    assert_eq!(
        report.identities[0].serial.as_deref(),
        Some(second.serial())
    );
}

/// Wraps a CA client with an off switch, standing in for a CA that goes down.
struct Switchable {
    inner: Arc<dyn CaClient>,
    down: AtomicBool,
}

impl CaClient for Switchable {
    fn sign<'a>(
        &'a self,
        id: &'a SpiffeId,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<String>, CaClientError>> {
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(CaClientError::Endpoint {
                    endpoint: "https://ca.test:15012".into(),
                    reason: "connection refused".into(),
                })
            });
        }
        self.inner.sign(id, csr_pem, ttl)
    }
}

/// The failure count in a `backoff until … after N failures: …` state.
fn failures(state: &str) -> u32 {
    let after = state.split(" after ").nth(1).unwrap();
    after.split(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(start_paused = true)]
async fn keeps_serving_through_ca_outage_with_visible_backoff_and_recovers() {
    use crate::identity::{authz::Caller, ca_client::LocalCaClient, test_support::AllowAll};
    let dir = tempfile::tempdir().unwrap();
    let local = LocalCaClient::new(
        ca_in(dir.path(), Duration::from_secs(3600)),
        Arc::new(AllowAll),
        Caller {
            name: "t".into(),
            node: None,
        },
    );
    let ca = Arc::new(Switchable {
        inner: Arc::new(local),
        down: AtomicBool::new(false),
    });
    let manager = SecretManager::spawn(ca.clone(), config(600));
    let default = id(DEFAULT);
    manager.add_workload(&default);
    let current = manager.fetch(&default).await.unwrap();
    let served = manager.subscribe(&default).unwrap();

    ca.down.store(true, Ordering::SeqCst);
    // Past half-life (300 s): first failure; then 1, 2, 4 s of backoff, capped at 8.
    tokio::time::sleep(Duration::from_secs(301)).await;
    let state = manager.certs_report().identities[0].state.clone();
    assert!(state.starts_with("backoff until "), "{state}");
    assert!(
        state.ends_with(
            "failures: CA endpoint https://ca.test:15012 is not usable: connection refused"
        ),
        "{state}"
    );
    let early = failures(&state);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let state = manager.certs_report().identities[0].state.clone();
    // Backoff 1, 2, 4 s, then capped at 8 s: about 10 more failures within 60 s, not 60.
    let late = failures(&state);
    assert!(
        (early + 8..=early + 11).contains(&late),
        "{early} then {late}: {state}"
    );
    let still = served.borrow().clone().unwrap();
    assert_eq!(
        still.serial(),
        current.serial(),
        "old certificate served until expiry"
    );

    ca.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(9)).await;
    let report = manager.certs_report();
    assert_eq!(report.identities[0].state, "valid");
    assert_ne!(served.borrow().as_ref().unwrap().serial(), current.serial());
}

#[tokio::test(start_paused = true)]
async fn withdraws_an_expired_certificate_without_successor() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(dir.path(), Duration::from_secs(3600));
    let down = Arc::new(Switchable {
        inner: Arc::new(crate::identity::ca_client::LocalCaClient::new(
            ca,
            Arc::new(crate::identity::test_support::AllowAll),
            crate::identity::authz::Caller {
                name: "t".into(),
                node: None,
            },
        )),
        down: AtomicBool::new(false),
    });
    let manager = SecretManager::spawn(down.clone(), config(20));
    let default = id(DEFAULT);
    manager.add_workload(&default);
    manager.fetch(&default).await.unwrap();
    down.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(21)).await;
    assert!(manager.subscribe(&default).unwrap().borrow().is_none());
    let state = &manager.certs_report().identities[0].state;
    assert!(
        state.starts_with("no valid certificate; backoff"),
        "{state}"
    );
}

#[tokio::test(start_paused = true)]
async fn releases_identity_when_last_pod_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let manager = local_manager(ca_in(dir.path(), Duration::from_secs(3600)), config(600));
    let default = id(DEFAULT);
    manager.add_workload(&default);
    manager.add_workload(&default);
    manager.fetch(&default).await.unwrap();
    assert!(manager.enrolled().contains(&default));
    manager.remove_workload(&default);
    assert_eq!(manager.certs_report().identities[0].pods, 1);
    manager.remove_workload(&default);
    assert!(!manager.enrolled().contains(&default));
    assert!(matches!(
        manager.fetch(&default).await,
        Err(ManagerError::NotEnrolled(_))
    ));
    assert!(manager.certs_report().identities.is_empty());
}

#[test]
fn backoff_doubles_and_is_capped() {
    let c = config(1);
    let got: Vec<_> = (1..=6).map(|n| backoff(&c, n).as_secs()).collect();
    assert_eq!(got, [1, 2, 4, 8, 8, 8]);
    assert_eq!(backoff(&c, u32::MAX), c.max_backoff);
}

/// The 32-byte P-256 private scalar inside a PKCS#8 document (ECPrivateKey version 1,
/// then the OCTET STRING holding the scalar).
fn private_scalar(pkcs8: &[u8]) -> &[u8] {
    let marker = [0x02, 0x01, 0x01, 0x04, 0x20];
    let at = pkcs8
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap();
    &pkcs8[at + marker.len()..at + marker.len() + 32]
}

/// Every file under `dir` (bounded), skipping what cannot be read.
fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>, depth: usize) {
    if depth == 0 || out.len() > 50_000 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            files_under(&entry.path(), out, depth - 1);
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
}

#[tokio::test]
async fn workload_private_key_never_reaches_disk() {
    // Only files written while the test runs can hold the key; older ones are skipped so
    // a large temp dir does not make the scan slow.
    let started = std::time::SystemTime::now() - Duration::from_secs(1);
    let state = tempfile::tempdir().unwrap();
    let manager = local_manager(ca_in(state.path(), Duration::from_secs(3600)), config(600));
    let default = id(DEFAULT);
    manager.add_workload(&default);
    let cert = manager.fetch(&default).await.unwrap();
    let der = cert.key_der.clone();
    let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", der.clone()));
    let pem_line = pem.lines().nth(1).unwrap().to_owned();
    let needles: [&[u8]; 3] = [&der, private_scalar(&der), pem_line.as_bytes()];

    let mut files = Vec::new();
    files_under(state.path(), &mut files, 8);
    assert!(
        files.iter().any(|f| f.ends_with("root-key.pem")),
        "the scan must see the state dir"
    );
    files_under(&std::env::temp_dir(), &mut files, 6);
    for file in files {
        let Ok(meta) = fs::metadata(&file) else {
            continue;
        };
        if meta.len() > 16 << 20 || meta.modified().is_ok_and(|m| m < started) {
            continue;
        }
        let Ok(bytes) = fs::read(&file) else { continue };
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "workload key found in {}",
                file.display()
            );
        }
    }
}
