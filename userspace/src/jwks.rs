//! Fetching and caching the JWKS documents of `jwksUri` rules, for the policy engine's
//! [`RemoteKeys`] seam. Owns the HTTP(S) client, the cache and its refresh tasks; does
//! not verify tokens (the policy module does) and follows no redirect (a 3xx is a
//! failure, so a key server cannot point the agent somewhere the SSRF check did not see).
//!
//! - **Per URI**, one task fetches the set when the URI comes into force
//!   ([`JwksFetcher::track`], called for every applied snapshot), refreshes it every
//!   [`JwksOptions::refresh`] (20 min), retries a failure after [`JwksOptions::retry`],
//!   and refetches early when a token names a `kid` the set lacks, at most once per
//!   [`JwksOptions::min_refetch`] (10 s): key rotation is picked up without restart, and
//!   tokens with made-up `kid`s cannot make the agent hammer the key server.
//! - **Fail closed**: a set never fetched serves no token. A fetched set stays usable
//!   while refreshes fail for at most [`JwksOptions::usable_for`] (2 × refresh = 40 min)
//!   after its last successful fetch, so a key server restart does not take the mesh's
//!   JWT traffic down, while a revoked key stops working within a bound. There is never a
//!   fallback to other keys.
//! - **Bounded**: every fetch (resolve, connect, TLS, response, body) has one deadline
//!   ([`JwksOptions::timeout`], 5 s) and the body a size cap ([`JwksOptions::max_body`],
//!   1 MiB).
//! - **SSRF**: the host is resolved once; addresses that are loopback, link-local (the
//!   cloud metadata address 169.254.169.254 among them), unspecified or `fd00:ec2::254`
//!   are skipped unless `--allow-private-jwks`, and the agent connects to the address it
//!   checked, so DNS cannot change the answer in between. RFC 1918 addresses are allowed:
//!   key servers run in pods.
//! - **Trust** for `https://`: the node's CA store (`rustls-native-certs`, as istiod trusts
//!   the system pool, so operators keep one place for corporate CAs and it follows OS
//!   updates, where a compiled-in list would go stale), plus `--jwks-ca-file`.

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, Weak},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    net::TcpStream,
    sync::Notify,
    task::AbortHandle,
    time::{Instant, sleep, sleep_until},
};
use tracing::{debug, info, warn};

use crate::policy::jwt::{KeysError, RemoteKeys};

/// Timing and limits of the fetcher. The defaults are what the agent uses; only the
/// CA file and the SSRF switch are flags.
#[derive(Clone, Debug)]
pub struct JwksOptions {
    /// Extra trust anchors (PEM) for `https://` key servers, besides the node's CA store.
    pub ca_file: Option<PathBuf>,
    /// Lets a `jwksUri` reach loopback, link-local and metadata addresses.
    pub allow_private: bool,
    /// Deadline of one whole fetch.
    pub timeout: Duration,
    /// Largest JWKS body accepted.
    pub max_body: usize,
    /// How often a set is fetched again while all is well.
    pub refresh: Duration,
    /// The least time between the starts of two fetches of one URI when tokens ask for
    /// a refetch (unknown `kid`, failed set).
    pub min_refetch: Duration,
    /// When a failed fetch is retried without being asked.
    pub retry: Duration,
    /// How long after its last successful fetch a set may still verify tokens.
    pub usable_for: Duration,
}

const REFRESH: Duration = Duration::from_secs(20 * 60);

impl Default for JwksOptions {
    fn default() -> Self {
        Self {
            ca_file: None,
            allow_private: false,
            timeout: Duration::from_secs(5),
            max_body: 1024 * 1024,
            refresh: REFRESH,
            min_refetch: Duration::from_secs(10),
            retry: Duration::from_secs(30),
            usable_for: 2 * REFRESH,
        }
    }
}

/// Why the fetcher cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read --jwks-ca-file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("--jwks-ca-file {path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("--jwks-ca-file {path}: a certificate cannot be a trust anchor: {source}")]
    BadCertificate {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("cannot configure TLS for jwksUri fetches: {0}")]
    Tls(rustls::Error),
}

/// Why one fetch failed. The URI is named by whoever reports it.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("not an http:// or https:// URL with a host")]
    BadUri,
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error(
        "{host} resolves only to loopback, link-local, unspecified or metadata addresses ({addr} first); pass --allow-private-jwks to allow them"
    )]
    Private { host: String, addr: IpAddr },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered HTTP {0} (redirects are not followed)")]
    Status(http::StatusCode),
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the body could not be read: {0}")]
    Body(String),
    #[error("not a JWKS document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A cloneable handle on the cache of every `jwksUri` in force.
#[derive(Clone)]
pub struct JwksFetcher {
    inner: Arc<Inner>,
}

struct Inner {
    client: Arc<Client>,
    options: JwksOptions,
    /// By URI. Entries come and go only through [`JwksFetcher::track`].
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    keys: KeyState,
    /// Wakes the URI's task for an early refetch (it enforces the rate limit).
    refetch: Arc<Notify>,
    /// Aborted when the URI leaves the configuration.
    task: AbortHandle,
}

enum KeyState {
    /// The first fetch has not finished.
    Pending,
    /// No fetch has ever succeeded; the last one failed so.
    Failed(String),
    /// The last successful fetch, and the failure of any refresh since.
    Fetched {
        keys: Arc<JwkSet>,
        at: Instant,
        failure: Option<String>,
    },
}

impl Drop for Inner {
    fn drop(&mut self) {
        let entries = self
            .entries
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for entry in entries.values() {
            entry.task.abort();
        }
    }
}

impl JwksFetcher {
    /// Builds the client; fetches nothing until [`Self::track`].
    pub fn new(options: JwksOptions) -> Result<Self, SetupError> {
        let client = Client::new(&options)?;
        Ok(Self {
            inner: Arc::new(Inner {
                client: Arc::new(client),
                options,
                entries: Mutex::default(),
            }),
        })
    }

    /// Makes `uris` the set in force: new ones start being fetched now, ones no longer
    /// used are dropped with their keys. Must run inside the tokio runtime.
    pub fn track(&self, uris: BTreeSet<String>) {
        let mut entries = self.inner.lock();
        entries.retain(|uri, entry| {
            let keep = uris.contains(uri);
            if !keep {
                entry.task.abort();
                info!(%uri, "jwksUri no longer used; its keys are dropped");
            }
            keep
        });
        for uri in uris {
            if entries.contains_key(&uri) {
                continue;
            }
            let refetch = Arc::new(Notify::new());
            let task = tokio::spawn(follow(
                Arc::downgrade(&self.inner),
                uri.clone(),
                Arc::clone(&refetch),
            ))
            .abort_handle();
            entries.insert(
                uri,
                Entry {
                    keys: KeyState::Pending,
                    refetch,
                    task,
                },
            );
        }
    }
}

impl RemoteKeys for JwksFetcher {
    fn lookup(&self, uri: &str, kid: Option<&str>) -> Result<Arc<JwkSet>, KeysError> {
        let entries = self.inner.lock();
        let Some(entry) = entries.get(uri) else {
            return Err(KeysError::NotFetched {
                uri: uri.to_owned(),
            });
        };
        match &entry.keys {
            KeyState::Pending => Err(KeysError::Pending {
                uri: uri.to_owned(),
            }),
            KeyState::Failed(cause) => {
                entry.refetch.notify_one();
                Err(KeysError::FetchFailed {
                    uri: uri.to_owned(),
                    cause: cause.clone(),
                })
            }
            KeyState::Fetched { keys, at, failure } => {
                let age = at.elapsed();
                if age > self.inner.options.usable_for {
                    entry.refetch.notify_one();
                    return Err(KeysError::Stale {
                        uri: uri.to_owned(),
                        age,
                        cause: failure
                            .clone()
                            .unwrap_or_else(|| "no refresh has completed".to_owned()),
                    });
                }
                let known = |kid: &str| {
                    keys.keys
                        .iter()
                        .any(|k| k.common.key_id.as_deref() == Some(kid))
                };
                if kid.is_some_and(|kid| !known(kid)) {
                    entry.refetch.notify_one();
                }
                Ok(Arc::clone(keys))
            }
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // Every critical section is a complete map or entry update, so a poisoned lock
        // still guards a consistent map.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, uri: &str, result: Result<JwkSet, FetchError>) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(uri) else {
            return;
        };
        match (result, &mut entry.keys) {
            (Ok(keys), state) => {
                debug!(%uri, keys = keys.keys.len(), "JWKS fetched");
                *state = KeyState::Fetched {
                    keys: Arc::new(keys),
                    at: Instant::now(),
                    failure: None,
                };
            }
            (Err(error), KeyState::Fetched { failure, at, .. }) => {
                warn!(%uri, %error, fetched_secs_ago = at.elapsed().as_secs(), "JWKS refresh failed; keeping the last set while it is usable");
                *failure = Some(error.to_string());
            }
            (Err(error), state) => {
                warn!(%uri, %error, "JWKS fetch failed; tokens of its issuers are rejected");
                *state = KeyState::Failed(error.to_string());
            }
        }
    }
}

/// The task of one URI: fetch, then wait for the refresh time or a refetch request
/// (no earlier than `min_refetch` after the last fetch started). Ends when the URI is
/// dropped (aborted) or the fetcher is gone.
async fn follow(inner: Weak<Inner>, uri: String, refetch: Arc<Notify>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let client = Arc::clone(&strong.client);
        let options = strong.options.clone();
        // Not held across the fetch, so dropping the fetcher is never delayed by it.
        drop(strong);
        let started = Instant::now();
        let result = client.fetch(&uri).await;
        let ok = result.is_ok();
        let Some(strong) = inner.upgrade() else {
            return;
        };
        strong.record(&uri, result);
        drop(strong);
        let wait = if ok { options.refresh } else { options.retry };
        tokio::select! {
            () = sleep(wait) => {}
            () = refetch.notified() => sleep_until(started + options.min_refetch).await,
        }
    }
}

/// One-shot HTTP/1.1 GETs over plain TCP or rustls, with the SSRF check.
struct Client {
    tls: Arc<ClientConfig>,
    allow_private: bool,
    timeout: Duration,
    max_body: usize,
}

impl Client {
    fn new(options: &JwksOptions) -> Result<Self, SetupError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            warn!(%error, "some of the node's CA certificates could not be read");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        debug!(added, ignored, "node CA certificates for jwksUri");
        if let Some(path) = &options.ca_file {
            add_ca_file(&mut roots, path)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(SetupError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: Arc::new(tls),
            allow_private: options.allow_private,
            timeout: options.timeout,
            max_body: options.max_body,
        })
    }

    async fn fetch(&self, uri: &str) -> Result<JwkSet, FetchError> {
        tokio::time::timeout(self.timeout, self.fetch_unbounded(uri))
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))?
    }

    async fn fetch_unbounded(&self, text: &str) -> Result<JwkSet, FetchError> {
        let uri: http::Uri = text.parse().map_err(|_| FetchError::BadUri)?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(FetchError::BadUri),
        };
        let authority = uri.authority().ok_or(FetchError::BadUri)?.clone();
        // `host()` keeps the brackets of an IPv6 literal; resolving and TLS want it bare.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addr = self.resolve(host, port).await?;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| FetchError::Connect { addr, source })?;
        let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(http::header::HOST, authority.as_str())
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "ambit")
            .body(Empty::<Bytes>::new())
            .map_err(|_| FetchError::BadUri)?;
        if https {
            let name = ServerName::try_from(host.to_owned()).map_err(|_| FetchError::BadUri)?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
                .connect(name, tcp)
                .await
                .map_err(|source| FetchError::Tls {
                    host: host.to_owned(),
                    source,
                })?;
            self.exchange(TokioIo::new(tls), request).await
        } else {
            self.exchange(TokioIo::new(tcp), request).await
        }
    }

    /// The first address of `host` that the SSRF rule allows.
    async fn resolve(&self, host: &str, port: u16) -> Result<std::net::SocketAddr, FetchError> {
        let addrs: Vec<_> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| FetchError::Resolve {
                host: host.to_owned(),
                source,
            })?
            .collect();
        let first = addrs.first().ok_or_else(|| FetchError::NoAddress {
            host: host.to_owned(),
        })?;
        addrs
            .iter()
            .find(|a| self.allow_private || !is_private(a.ip()))
            .copied()
            .ok_or_else(|| FetchError::Private {
                host: host.to_owned(),
                addr: first.ip(),
            })
    }

    async fn exchange<S>(
        &self,
        io: TokioIo<S>,
        request: http::Request<Empty<Bytes>>,
    ) -> Result<JwkSet, FetchError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
        // The connection is driven beside the exchange and dropped with it, so a fetch
        // cut by its deadline leaves nothing behind.
        let exchange = async {
            let response = sender.send_request(request).await?;
            if response.status() != http::StatusCode::OK {
                return Err(FetchError::Status(response.status()));
            }
            let body = Limited::new(response.into_body(), self.max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        FetchError::TooLarge {
                            limit: self.max_body,
                        }
                    } else {
                        FetchError::Body(e.to_string())
                    }
                })?
                .to_bytes();
            Ok(serde_json::from_slice(&body)?)
        };
        tokio::pin!(exchange, connection);
        tokio::select! {
            result = &mut exchange => result,
            // A connection that ends first (with or without error) ends the exchange too;
            // finish it so the response already read is not lost.
            ended = &mut connection => {
                ended?;
                exchange.await
            }
        }
    }
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), SetupError> {
    let mut found = false;
    let certs = CertificateDer::pem_file_iter(path).map_err(|source| SetupError::CaFile {
        path: path.to_owned(),
        source,
    })?;
    for cert in certs {
        let cert = cert.map_err(|source| SetupError::CaFile {
            path: path.to_owned(),
            source,
        })?;
        roots
            .add(cert)
            .map_err(|source| SetupError::BadCertificate {
                path: path.to_owned(),
                source,
            })?;
        found = true;
    }
    if found {
        Ok(())
    } else {
        Err(SetupError::NoCertificate {
            path: path.to_owned(),
        })
    }
}

/// Addresses a `jwksUri` may not reach without `--allow-private-jwks`: the node itself
/// and what only the node should see (link-local, which holds 169.254.169.254, and AWS's
/// IPv6 metadata address). IPv4-mapped IPv6 addresses are judged as the IPv4 address.
fn is_private(ip: IpAddr) -> bool {
    const AWS_METADATA_V6: std::net::Ipv6Addr =
        std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_private(IpAddr::V4(v4)),
            None => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_unicast_link_local()
                    || v6 == AWS_METADATA_V6
            }
        },
    }
}
