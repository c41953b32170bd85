//! The CA service end to end: a real TLS gRPC client against the service `start` embeds,
//! and a manager riding out a CA that stops and comes back.

use std::net::{Ipv4Addr, SocketAddr};

use clap::Parser;
use rcgen::SanType;
use tokio::sync::oneshot;

use super::*;
use crate::identity::{
    SpiffeId,
    ca::tests::{corrupt_signature, csr_for},
    ca_client::{CaClient, CaToken},
    test_support::id,
};

const DEFAULT: &str = "spiffe://cluster.local/ns/default/sa/default";

#[derive(clap::Parser)]
struct Run {
    #[command(flatten)]
    identity: IdentityArgs,
}

fn run_args(extra: &[&str]) -> IdentityArgs {
    let mut argv = vec!["ambit"];
    argv.extend_from_slice(extra);
    Run::try_parse_from(argv).unwrap().identity
}

/// The embedded CA served on 127.0.0.1, with `DEFAULT` enrolled on node `node-a`.
async fn embedded(dir: &Path) -> (Identity, oneshot::Sender<()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let args = run_args(&["--ca-listen", "127.0.0.1:0"]);
    let identity = start(&args, dir, "node-a", async {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    identity.manager.add_workload(&id(DEFAULT));
    identity.manager.fetch(&id(DEFAULT)).await.unwrap();
    (identity, stop)
}

fn grpc_client(dir: &Path, addr: SocketAddr, token: &str) -> GrpcCaClient {
    let root = std::fs::read_to_string(dir.join("ca/root-cert.pem")).unwrap();
    GrpcCaClient::new(
        &format!("https://{addr}"),
        "localhost",
        &root,
        CaToken::Value(token.to_owned()),
    )
    .unwrap()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// The gRPC status of a refused request.
fn refusal(err: CaClientError) -> (tonic::Code, String) {
    match err {
        CaClientError::Refused { code, message, .. } => (code, message),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn grpc_service_signs_for_enrolled_identity_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (identity, _stop) = embedded(dir.path()).await;
    let token = authz::read_token(&dir.path().join("ca/agent-token")).unwrap();
    let client = grpc_client(dir.path(), identity.ca_addr.unwrap(), &token);
    let ttl = Duration::from_secs(3600);

    let (_key, csr) = csr_for(vec![uri(DEFAULT)]);
    let chain = client.sign(&id(DEFAULT), &csr, ttl).await.unwrap();
    assert_eq!(chain.len(), 2, "leaf then root");

    let other: SpiffeId = id("spiffe://cluster.local/ns/shop/sa/cart");
    let (_key, csr_other) = csr_for(vec![uri(&other.to_string())]);
    let (code, message) = refusal(client.sign(&other, &csr_other, ttl).await.unwrap_err());
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert_eq!(
        message,
        format!("caller is not entitled to identity {other}")
    );

    let (code, message) = refusal(
        client
            .sign(&id(DEFAULT), &corrupt_signature(&csr), ttl)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert_eq!(
        message,
        "CSR signature does not verify against its public key"
    );

    let (_key, csr_extra) = csr_for(vec![
        uri(DEFAULT),
        SanType::DnsName("db.example".try_into().unwrap()),
    ]);
    let (code, message) = refusal(
        client
            .sign(&id(DEFAULT), &csr_extra, ttl)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert_eq!(
        message,
        format!(
            "CSR must carry exactly one SAN, the workload's SPIFFE URI; it has 2: URI:{DEFAULT}, DNS:db.example"
        )
    );

    let stranger = grpc_client(dir.path(), identity.ca_addr.unwrap(), "not-the-token");
    let (code, message) = refusal(stranger.sign(&id(DEFAULT), &csr, ttl).await.unwrap_err());
    assert_eq!(code, tonic::Code::Unauthenticated);
    assert_eq!(message, "bearer token is not valid");
}

/// Serves `ca` on `addr` until the returned sender fires.
async fn serve_on(
    ca: Arc<Ca>,
    authorizer: Arc<dyn authz::Authorizer>,
    addr: SocketAddr,
) -> (oneshot::Sender<()>, JoinHandle<Result<(), CaServiceError>>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let names = ["localhost".to_owned()];
        ca_service::serve(ca, authorizer, listener, &names, async {
            let _ = stopped.await;
        })
        .await
    });
    (stop, task)
}

/// Polls `check` every 50 ms for at most `limit`.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

#[tokio::test]
async fn manager_keeps_certificate_while_grpc_ca_is_down_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let ca =
        Arc::new(Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(6)).unwrap());
    let authorizer: Arc<dyn authz::Authorizer> = Arc::new(crate::identity::test_support::AllowAll);
    let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let (stop, task) = serve_on(ca.clone(), authorizer.clone(), addr).await;

    let config = ManagerConfig {
        ttl: Duration::from_secs(6),
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_millis(800),
        request_timeout: Duration::from_secs(2),
        ..ManagerConfig::default()
    };
    let manager = SecretManager::spawn(Arc::new(grpc_client(dir.path(), addr, "any")), config);
    let default = id(DEFAULT);
    manager.add_workload(&default);
    let first = tokio::time::timeout(Duration::from_secs(5), manager.fetch(&default))
        .await
        .unwrap()
        .unwrap();

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    // Half-life is 3 s: the refresh fails and backs off, the certificate stays.
    let state = || manager.certs_report().identities[0].state.clone();
    assert!(
        eventually(Duration::from_secs(5), || state()
            .starts_with("backoff until "))
        .await,
        "{}",
        state()
    );
    let served = manager.subscribe(&default).unwrap();
    assert_eq!(served.borrow().as_ref().unwrap().serial(), first.serial());

    let (_stop, _task) = serve_on(ca, authorizer, addr).await;
    assert!(
        eventually(Duration::from_secs(5), || state() == "valid").await,
        "{}",
        state()
    );
    assert_ne!(served.borrow().as_ref().unwrap().serial(), first.serial());
}

#[test]
fn durations_parse_with_units() {
    assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
    assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
    assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
    assert!(parse_duration("1d").is_err());
}

#[test]
fn kubernetes_ca_needs_a_trusted_node_account_and_excludes_a_grants_file() {
    #[derive(clap::Parser)]
    struct CaCmd {
        #[command(flatten)]
        ca: CaArgs,
    }
    let parse = |extra: &[&str]| {
        let mut argv = vec!["ambit"];
        argv.extend_from_slice(extra);
        CaCmd::try_parse_from(argv).map(|c| c.ca)
    };
    assert!(parse(&[]).is_err(), "a grants file or --kubernetes");
    assert!(parse(&["--kubernetes"]).is_err(), "no trusted account");
    let kube = [
        "--kubernetes",
        "--trusted-node-account",
        "ambit-system/ambit",
    ];
    let args = parse(&kube).unwrap();
    assert_eq!(args.kubernetes.token_audience, "ambit-ca");
    assert_eq!(
        args.kubernetes.trusted_node_accounts,
        vec!["ambit-system/ambit".parse().unwrap()]
    );
    assert!(parse(&[&kube[..], &["--grants-file", "g"]].concat()).is_err());
    assert!(parse(&["--kubernetes", "--trusted-node-account", "ambit"]).is_err());
}

#[test]
fn remote_ca_requires_its_root() {
    let argv = ["ambit", "--ca-address", "https://ca:15012"];
    assert!(Run::try_parse_from(argv).is_err());
}
