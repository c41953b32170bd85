//! The fetcher against real local key servers (plain HTTP and HTTPS with a test CA on
//! 127.0.0.1, so the SSRF check is switched off for them), and its cache rules with a
//! paused clock.

use std::{
    convert::Infallible,
    io::Write as _,
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use http_body_util::Full;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

use super::*;

const K: &str = "YS10ZXN0LXNlY3JldC1vZi0zMi1ieXRlcy1sZW5ndGg";

fn jwks(kid: &str) -> String {
    format!(r#"{{"keys": [{{"kty": "oct", "kid": "{kid}", "alg": "HS256", "k": "{K}"}}]}}"#)
}

/// A key server on 127.0.0.1 that answers every request with `body` and counts them.
struct KeyServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KeyServer {
    /// Serves over TLS when `tls` is given; `silent` accepts and never answers.
    async fn start(body: &str, tls: Option<tokio_rustls::TlsAcceptor>, silent: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body.to_owned()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (Arc::clone(&body), Arc::clone(&hits));
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                if silent {
                    held.push(tcp);
                    continue;
                }
                let (b, h, tls) = (Arc::clone(&b), Arc::clone(&h), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| {
                        h.fetch_add(1, Ordering::SeqCst);
                        let body = b.lock().unwrap().clone();
                        async move {
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        Some(tls) => {
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            http.serve_connection(TokioIo::new(stream), service).await
                        }
                        None => http.serve_connection(TokioIo::new(tcp), service).await,
                    };
                });
            }
        });
        Self {
            addr,
            body,
            hits,
            task,
        }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}/keys", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A CA (as a PEM file) and a TLS acceptor whose certificate it signed for 127.0.0.1.
fn test_tls() -> (tempfile::NamedTempFile, tokio_rustls::TlsAcceptor) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let mut ca_file = tempfile::NamedTempFile::new().unwrap();
    ca_file.write_all(ca_cert.pem().as_bytes()).unwrap();
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![leaf.der().clone()], key)
    .unwrap();
    (ca_file, tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Short timings so tests take well under a second per step.
fn options() -> JwksOptions {
    JwksOptions {
        allow_private: true,
        timeout: Duration::from_secs(1),
        retry: Duration::from_millis(100),
        min_refetch: Duration::from_millis(800),
        ..JwksOptions::default()
    }
}

fn kids(set: &JwkSet) -> Vec<String> {
    set.keys
        .iter()
        .filter_map(|k| k.common.key_id.clone())
        .collect()
}

/// Polls `check` until it holds, for at most 3 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..300 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn tracking(fetcher: &JwksFetcher, uri: &str) {
    fetcher.track(BTreeSet::from([uri.to_owned()]));
}

#[tokio::test]
async fn fetches_over_https_trusting_the_ca_file() {
    let (ca_file, tls) = test_tls();
    let server = KeyServer::start(&jwks("k1"), Some(tls), false).await;
    let uri = server.url("https");
    let fetcher = JwksFetcher::new(JwksOptions {
        ca_file: Some(ca_file.path().to_owned()),
        ..options()
    })
    .unwrap();
    tracking(&fetcher, &uri);
    assert_eq!(
        fetcher.lookup(&uri, None).unwrap_err(),
        KeysError::Pending { uri: uri.clone() }
    );
    eventually("the first fetch", || fetcher.lookup(&uri, None).is_ok()).await;
    assert_eq!(kids(&fetcher.lookup(&uri, Some("k1")).unwrap()), ["k1"]);
}

#[tokio::test]
async fn an_https_server_outside_the_trusted_cas_is_not_used() {
    let (_ca_file, tls) = test_tls();
    let server = KeyServer::start(&jwks("k1"), Some(tls), false).await;
    let client = Client::new(&options()).unwrap();
    let error = client.fetch(&server.url("https")).await.unwrap_err();
    assert!(matches!(error, FetchError::Tls { .. }), "{error}");
}

#[tokio::test]
async fn fetches_over_plain_http_and_forgets_dropped_uris() {
    let server = KeyServer::start(&jwks("k1"), None, false).await;
    let uri = server.url("http");
    let fetcher = JwksFetcher::new(options()).unwrap();
    tracking(&fetcher, &uri);
    eventually("the first fetch", || fetcher.lookup(&uri, None).is_ok()).await;
    fetcher.track(BTreeSet::new());
    assert_eq!(
        fetcher.lookup(&uri, None).unwrap_err(),
        KeysError::NotFetched { uri: uri.clone() }
    );
}

#[tokio::test]
async fn an_unknown_kid_refetches_and_picks_up_a_rotated_key() {
    let server = KeyServer::start(&jwks("k1"), None, false).await;
    let uri = server.url("http");
    let fetcher = JwksFetcher::new(options()).unwrap();
    tracking(&fetcher, &uri);
    eventually("the first fetch", || fetcher.lookup(&uri, None).is_ok()).await;
    *server.body.lock().unwrap() = jwks("k2");
    // This request still sees the old set (and fails in the policy check); a later one
    // sees the rotated key.
    assert_eq!(kids(&fetcher.lookup(&uri, Some("k2")).unwrap()), ["k1"]);
    eventually("the rotated key", || {
        kids(&fetcher.lookup(&uri, None).unwrap()) == ["k2"]
    })
    .await;
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn refetches_for_unknown_kids_are_rate_limited_per_uri() {
    let server = KeyServer::start(&jwks("k1"), None, false).await;
    let uri = server.url("http");
    let fetcher = JwksFetcher::new(options()).unwrap();
    let tracked = Instant::now();
    tracking(&fetcher, &uri);
    eventually("the first fetch", || fetcher.lookup(&uri, None).is_ok()).await;
    for i in 0..50 {
        let _ = fetcher.lookup(&uri, Some(&format!("made-up-{i}")));
    }
    eventually("one refetch", || server.hits() == 2).await;
    // Not before `min_refetch` after the first fetch started, which was after tracking.
    assert!(tracked.elapsed() >= Duration::from_millis(800));
    for i in 0..50 {
        let _ = fetcher.lookup(&uri, Some(&format!("made-up-again-{i}")));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.hits(), 2, "a refetch within min_refetch of the last");
    eventually("the next allowed refetch", || server.hits() == 3).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.hits(), 3, "many requests asked, one refetch ran");
}

#[tokio::test]
async fn sets_are_refreshed_periodically_without_being_asked() {
    let server = KeyServer::start(&jwks("k1"), None, false).await;
    let uri = server.url("http");
    let fetcher = JwksFetcher::new(JwksOptions {
        refresh: Duration::from_millis(100),
        ..options()
    })
    .unwrap();
    tracking(&fetcher, &uri);
    eventually("the first fetch", || fetcher.lookup(&uri, None).is_ok()).await;
    *server.body.lock().unwrap() = jwks("k2");
    eventually("a refresh", || {
        kids(&fetcher.lookup(&uri, None).unwrap()) == ["k2"]
    })
    .await;
}

#[tokio::test]
async fn a_body_over_the_cap_is_refused() {
    let big = format!(r#"{{"keys": [], "pad": "{}"}}"#, "x".repeat(2048));
    let server = KeyServer::start(&big, None, false).await;
    let client = Client::new(&JwksOptions {
        max_body: 1024,
        ..options()
    })
    .unwrap();
    let error = client.fetch(&server.url("http")).await.unwrap_err();
    assert!(
        matches!(error, FetchError::TooLarge { limit: 1024 }),
        "{error}"
    );
}

#[tokio::test]
async fn a_server_that_does_not_answer_times_out() {
    let server = KeyServer::start("", None, true).await;
    let client = Client::new(&JwksOptions {
        timeout: Duration::from_millis(200),
        ..options()
    })
    .unwrap();
    let error = client.fetch(&server.url("http")).await.unwrap_err();
    assert!(matches!(error, FetchError::Timeout(_)), "{error}");
}

#[tokio::test]
async fn a_document_that_is_not_a_jwks_is_refused() {
    let server = KeyServer::start("<html>", None, false).await;
    let client = Client::new(&options()).unwrap();
    let error = client.fetch(&server.url("http")).await.unwrap_err();
    assert!(matches!(error, FetchError::Json(_)), "{error}");
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allowed() {
    let server = KeyServer::start(&jwks("k1"), None, false).await;
    let strict = Client::new(&JwksOptions {
        allow_private: false,
        ..options()
    })
    .unwrap();
    for uri in [
        server.url("http"),
        "http://169.254.169.254/latest/meta-data".to_owned(),
        "http://[::1]:1/keys".to_owned(),
        "http://[fd00:ec2::254]/keys".to_owned(),
        "http://[::ffff:127.0.0.1]:1/keys".to_owned(),
        "http://0.0.0.0:1/keys".to_owned(),
    ] {
        let error = strict.fetch(&uri).await.unwrap_err();
        assert!(
            matches!(error, FetchError::Private { .. }),
            "{uri}: {error}"
        );
        assert!(error.to_string().contains("--allow-private-jwks"));
    }
    assert_eq!(server.hits(), 0, "a refused address is never connected to");
    // RFC 1918 and public addresses are allowed: key servers run in pods.
    for ip in [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "8.8.8.8",
        "fd00::1",
    ] {
        assert!(!is_private(ip.parse().unwrap()), "{ip}");
    }
}

#[tokio::test]
async fn an_unreachable_server_fails_the_lookup() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let uri = format!("http://{}/keys", closed.local_addr().unwrap());
    drop(closed);
    let fetcher = JwksFetcher::new(options()).unwrap();
    tracking(&fetcher, &uri);
    eventually("the failed fetch", || {
        matches!(
            fetcher.lookup(&uri, None),
            Err(KeysError::FetchFailed { .. })
        )
    })
    .await;
    let error = fetcher.lookup(&uri, None).unwrap_err().to_string();
    assert!(error.contains("cannot connect"), "{error}");
}

/// An entry as a successful fetch leaves it, without a task or a server.
fn fetched(fetcher: &JwksFetcher, uri: &str) {
    let task = tokio::spawn(std::future::pending::<()>()).abort_handle();
    fetcher.inner.lock().insert(
        uri.to_owned(),
        Entry {
            keys: KeyState::Pending,
            refetch: Arc::new(Notify::new()),
            task,
        },
    );
    fetcher
        .inner
        .record(uri, Ok(serde_json::from_str(&jwks("k1")).unwrap()));
}

#[tokio::test(start_paused = true)]
async fn a_set_whose_refreshes_fail_is_used_for_a_bounded_time_only() {
    let fetcher = JwksFetcher::new(JwksOptions::default()).unwrap();
    let uri = "https://issuer/keys";
    fetched(&fetcher, uri);
    fetcher
        .inner
        .record(uri, Err(FetchError::Timeout(Duration::from_secs(5))));
    let usable_for = JwksOptions::default().usable_for;
    tokio::time::advance(usable_for - Duration::from_secs(1)).await;
    assert!(fetcher.lookup(uri, Some("k1")).is_ok());
    tokio::time::advance(Duration::from_secs(2)).await;
    let error = fetcher.lookup(uri, Some("k1")).unwrap_err();
    assert!(
        matches!(&error, KeysError::Stale { cause, .. } if cause.contains("no answer")),
        "{error}"
    );
    // A successful refresh makes it usable again.
    fetcher
        .inner
        .record(uri, Ok(serde_json::from_str(&jwks("k1")).unwrap()));
    assert!(fetcher.lookup(uri, Some("k1")).is_ok());
}
