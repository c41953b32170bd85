//! `ambit ca --kubernetes` end to end: `run_ca` started from its flags, the real kube-rs
//! client talking to a Kubernetes API double (plain HTTP on 127.0.0.1: the API's JSON is
//! what is under test, not its TLS), and the agent's real gRPC client.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, Query, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use clap::Parser;
use rcgen::SanType;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot};

use super::*;
use crate::identity::{
    ca::{Cacerts, tests::csr_for},
    ca_client::{CaClient, CaClientError, CaToken, GrpcCaClient},
    ca_service::proto,
    cli::{CaArgs, run_ca},
    test_support::id,
};

const AUDIENCE: &str = "ambit-ca";
/// The CA's own credential, as its kubeconfig gives it; the double insists on it.
const CA_TOKEN: &str = "ca-service-account-token";
const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

/// A projected token the double knows: what a TokenReview of it returns.
#[derive(Clone)]
struct Token {
    audiences: Vec<&'static str>,
    username: String,
    extra: BTreeMap<&'static str, Vec<String>>,
}

/// The cluster the double serves: tokens and pods.
#[derive(Default)]
struct Cluster {
    tokens: BTreeMap<&'static str, Token>,
    pods: Vec<Value>,
}

/// A service-account token bound to pod `pod` (uid `<pod>-uid`), naming its node when the
/// API server is recent enough to (`node` given).
fn bound_token(audience: &'static str, account: &str, pod: &str, node: Option<&str>) -> Token {
    let (ns, sa) = account.split_once('/').unwrap();
    let mut extra = BTreeMap::from([
        (EXTRA_POD_NAME, vec![pod.to_owned()]),
        (EXTRA_POD_UID, vec![format!("{pod}-uid")]),
    ]);
    if let Some(node) = node {
        extra.insert(EXTRA_NODE_NAME, vec![node.to_owned()]);
    }
    Token {
        audiences: vec![audience],
        username: format!("system:serviceaccount:{ns}:{sa}"),
        extra,
    }
}

fn pod(account: &str, name: &str, node: &str, phase: &str) -> Value {
    let (ns, sa) = account.split_once('/').unwrap();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("{name}-uid"), "resourceVersion": "7"},
        "spec": {
            "nodeName": node,
            "serviceAccountName": sa,
            "containers": [{"name": "app", "image": "app:1"}]
        },
        "status": {"phase": phase}
    })
}

/// Two nodes, each with an agent pod; `default/web` runs on node-a, `shop/cart` on node-b,
/// `shop/batch` finished on node-a. The API server names node-a in its tokens but is too
/// old to name node-b.
fn cluster() -> Cluster {
    let tokens = BTreeMap::from([
        (
            "agent-a",
            bound_token(AUDIENCE, "ambit-system/ambit", "ambit-a", Some("node-a")),
        ),
        (
            "agent-b",
            bound_token(AUDIENCE, "ambit-system/ambit", "ambit-b", None),
        ),
        (
            "agent-a-for-the-api",
            bound_token(
                "https://kubernetes.default.svc",
                "ambit-system/ambit",
                "ambit-a",
                Some("node-a"),
            ),
        ),
        (
            "web-on-a",
            bound_token(AUDIENCE, "default/web", "web-1", Some("node-a")),
        ),
    ]);
    let pods = vec![
        pod("ambit-system/ambit", "ambit-a", "node-a", "Running"),
        pod("ambit-system/ambit", "ambit-b", "node-b", "Running"),
        pod("default/web", "web-1", "node-a", "Running"),
        pod("shop/cart", "cart-1", "node-b", "Running"),
        pod("shop/batch", "batch-1", "node-a", "Succeeded"),
    ];
    Cluster { tokens, pods }
}

type Shared = Arc<Mutex<Cluster>>;

/// Refuses calls without the CA's credential, as the API server would.
fn check_credential(headers: &HeaderMap) -> Result<(), (StatusCode, Json<Value>)> {
    let ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {CA_TOKEN}"));
    if ok {
        Ok(())
    } else {
        Err(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        ))
    }
}

/// A `Status` object, the API server's error body.
fn status(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Json<Value>) {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
    });
    (code, Json(body))
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`: authenticated only when the token
/// is known and one of its audiences is asked for; `status.audiences` is the intersection.
async fn token_review(
    State(cluster): State<Shared>,
    headers: HeaderMap,
    Json(review): Json<Value>,
) -> Result<(StatusCode, Json<Value>), (StatusCode, Json<Value>)> {
    check_credential(&headers)?;
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let asked: Vec<&str> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let known = cluster.lock().unwrap().tokens.get(token).cloned();
    let status = match known {
        Some(t) if t.audiences.iter().any(|a| asked.contains(a)) => json!({
            "authenticated": true,
            "user": {
                "username": t.username,
                "uid": "sa-uid",
                "groups": ["system:serviceaccounts", "system:authenticated"],
                "extra": t.extra
            },
            "audiences": t.audiences.iter().filter(|a| asked.contains(a)).collect::<Vec<_>>()
        }),
        Some(t) => json!({
            "user": {},
            "error": format!("[invalid bearer token, token audiences {:?} is invalid for the target audiences {asked:?}]", t.audiences)
        }),
        None => {
            json!({"user": {}, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        }
    };
    let body = json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"],
        "status": status
    });
    Ok((StatusCode::CREATED, Json(body)))
}

/// `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`, the only selector the CA uses.
async fn list_pods(
    State(cluster): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    check_credential(&headers)?;
    let node = query
        .get("fieldSelector")
        .and_then(|f| f.strip_prefix("spec.nodeName="))
        .ok_or_else(|| {
            status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the double serves node-scoped lists only",
            )
        })?;
    let items: Vec<Value> = cluster
        .lock()
        .unwrap()
        .pods
        .iter()
        .filter(|p| p["spec"]["nodeName"] == node)
        .cloned()
        .collect();
    Ok(Json(json!({
        "kind": "PodList", "apiVersion": "v1",
        "metadata": {"resourceVersion": "7"},
        "items": items
    })))
}

/// `GET /api/v1/namespaces/<ns>/pods/<name>`.
async fn get_pod(
    State(cluster): State<Shared>,
    headers: HeaderMap,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    check_credential(&headers)?;
    cluster
        .lock()
        .unwrap()
        .pods
        .iter()
        .find(|p| p["metadata"]["namespace"] == ns && p["metadata"]["name"] == name)
        .cloned()
        .map(Json)
        .ok_or_else(|| {
            status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("pods \"{name}\" not found"),
            )
        })
}

/// Serves `cluster` on 127.0.0.1 and returns a kubeconfig for it, written in `dir`.
async fn api_double(dir: &Path, cluster: Shared) -> std::path::PathBuf {
    let app = Router::new()
        .route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(token_review),
        )
        .route("/api/v1/pods", get(list_pods))
        .route("/api/v1/namespaces/{ns}/pods/{name}", get(get_pod))
        .with_state(cluster);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let path = dir.join("kubeconfig");
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: double\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: ambit-ca\n  user:\n    token: {CA_TOKEN}\n\
         contexts:\n- name: double\n  context:\n    cluster: double\n    user: ambit-ca\n\
         current-context: double\n"
    );
    std::fs::write(&path, kubeconfig).unwrap();
    path
}

/// The bed: the API double, `ambit ca --kubernetes` trusting `ambit-system/ambit`, and the
/// address and root its clients need.
struct Bed {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

#[derive(clap::Parser)]
struct CaCmd {
    #[command(flatten)]
    ca: CaArgs,
}

impl Bed {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = api_double(dir.path(), Arc::new(Mutex::new(cluster()))).await;
        let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let listen = addr.to_string();
        let state_dir = dir.path().to_str().unwrap().to_owned();
        // Key material from files: where it comes from on a cluster (the `cacerts` Secret)
        // is tested end to end in the test bed; these tests are about who may ask.
        let cacerts = dir.path().join("cacerts");
        std::fs::create_dir(&cacerts).unwrap();
        let files = Cacerts::generate("cluster.local").unwrap();
        for (name, pem) in [
            (Cacerts::CA_CERT, &files.ca_cert),
            (Cacerts::CA_KEY, &files.ca_key),
            (Cacerts::ROOT_CERT, &files.root_cert),
        ] {
            std::fs::write(cacerts.join(name), pem).unwrap();
        }
        let args = CaCmd::try_parse_from([
            "ambit",
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--trusted-node-account",
            "ambit-system/ambit",
            "--listen",
            &listen,
            "--state-dir",
            &state_dir,
            "--cacerts-dir",
            cacerts.to_str().unwrap(),
        ])
        .unwrap()
        .ca;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            run_ca(&args, async {
                let _ = stopped.await;
            })
            .await
            .unwrap()
        });
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            dir,
            addr,
            _stop: stop,
        }
    }

    fn client(&self, token: &str) -> GrpcCaClient {
        let root = std::fs::read_to_string(self.dir.path().join("cacerts/root-cert.pem")).unwrap();
        GrpcCaClient::new(
            &format!("https://{}", self.addr),
            "localhost",
            &root,
            CaToken::Value(token.to_owned()),
        )
        .unwrap()
    }

    /// What the CA answers `token` asking for `identity`.
    async fn ask(&self, token: &str, identity: &str) -> Result<Vec<String>, (tonic::Code, String)> {
        let (_key, csr) = csr_for(vec![SanType::URI(identity.try_into().unwrap())]);
        self.client(token)
            .sign(&id(identity), &csr, Duration::from_secs(3600))
            .await
            .map_err(|e| match e {
                CaClientError::Refused { code, message, .. } => (code, message),
                other => panic!("expected a refusal, got {other}"),
            })
    }
}

fn leaf_uri(chain: &[String]) -> Option<String> {
    let der = pem::parse(&chain[0]).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
    crate::tls::uri_san(&leaf)
}

#[tokio::test]
async fn signs_an_identity_with_a_pod_on_the_callers_node() {
    let bed = Bed::start().await;
    let chain = bed.ask("agent-a", WEB).await.unwrap();
    assert_eq!(leaf_uri(&chain).as_deref(), Some(WEB));
}

#[tokio::test]
async fn refuses_a_token_for_another_audience() {
    let bed = Bed::start().await;
    let (code, message) = bed.ask("agent-a-for-the-api", WEB).await.unwrap_err();
    assert_eq!(code, tonic::Code::Unauthenticated);
    assert!(
        message
            .starts_with("token review rejected the token: [invalid bearer token, token audiences"),
        "{message}"
    );
}

#[tokio::test]
async fn refuses_an_identity_with_no_pod_on_the_callers_node() {
    let bed = Bed::start().await;
    let ghost = "spiffe://cluster.local/ns/default/sa/ghost";
    let (code, message) = bed.ask("agent-a", ghost).await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert_eq!(
        message,
        "no pod running as default/ghost is scheduled on node node-a"
    );
    // A pod that has finished needs no certificate any more.
    let batch = "spiffe://cluster.local/ns/shop/sa/batch";
    let (code, _) = bed.ask("agent-a", batch).await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn refuses_a_node_asking_for_another_nodes_pod() {
    let bed = Bed::start().await;
    let (code, message) = bed.ask("agent-a", CART).await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert_eq!(
        message,
        "no pod running as shop/cart is scheduled on node node-a"
    );
}

#[tokio::test]
async fn finds_the_node_from_the_agent_pod_when_the_token_does_not_name_it() {
    let bed = Bed::start().await;
    let chain = bed.ask("agent-b", CART).await.unwrap();
    assert_eq!(leaf_uri(&chain).as_deref(), Some(CART));
    let (code, message) = bed.ask("agent-b", WEB).await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert_eq!(
        message,
        "no pod running as default/web is scheduled on node node-b"
    );
}

#[tokio::test]
async fn refuses_an_untrusted_service_account() {
    let bed = Bed::start().await;
    // The workload itself, on the right node, asking for its own identity.
    let (code, message) = bed.ask("web-on-a", WEB).await.unwrap_err();
    assert_eq!(code, tonic::Code::PermissionDenied);
    assert_eq!(
        message,
        "service account default/web is not a trusted node agent"
    );
}

#[tokio::test]
async fn refuses_an_impersonated_identity_other_than_the_csrs() {
    let bed = Bed::start().await;
    let root = std::fs::read_to_string(bed.dir.path().join("cacerts/root-cert.pem")).unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(root))
        .domain_name("localhost");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", bed.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    // A request as ztunnel writes it, asking for CART with a CSR naming WEB.
    let (_key, csr) = csr_for(vec![SanType::URI(WEB.try_into().unwrap())]);
    let mut request = tonic::Request::new(proto::IstioCertificateRequest {
        csr,
        validity_duration: 3600,
        metadata: Some(crate::identity::ca_client::impersonating(&id(CART))),
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer agent-a".parse().unwrap());
    let status = proto::client::create_certificate(channel, request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        status.message(),
        format!("ImpersonatedIdentity asks for {CART} but the CSR names {WEB}")
    );
}
