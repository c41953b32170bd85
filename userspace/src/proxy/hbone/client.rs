//! The client side of HBONE: one HTTP/2 `CONNECT` stream per application connection, on
//! mutual-TLS connections pooled per (source pod, source identity, allowed destination
//! identities, destination proxy address).
//!
//! A pooled connection's socket lives in the source pod's network namespace, so the
//! destination sees the pod's own IP; that is why the source pod is part of the key.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::SetOnce,
};
use tracing::debug;

use super::{
    HboneError, baggage, refusal,
    trace_context::{TRACEPARENT, TraceParent},
};
use crate::{
    identity::SpiffeId,
    proxy::{PodProxy, Shared, limits::Exceeded, socket},
    tls::MeshConnector,
};

/// Streams one pooled connection carries before the pool opens another: the server's
/// default limit (`--max-streams-per-connection`), so a stream rarely waits for capacity.
pub const STREAMS_PER_CONNECTION: usize = 100;
/// How long a failed stream waits for its connection to end, to tell a server's refusal
/// (which fails the first stream as it ends the connection) from other failures.
const REFUSAL_WAIT: Duration = Duration::from_millis(100);

type Sender = SendRequest<Empty<Bytes>>;

/// One mutual-TLS connection of the pool.
#[derive(Clone)]
struct Pooled {
    sender: Sender,
    /// Streams open on it; each [`Tunnel`] holds one count until dropped.
    streams: Arc<AtomicUsize>,
    /// When the server's certificate expires: no new stream after that.
    not_after: SystemTime,
    /// Set when the connection ends: the limit its server refused it for, if it did.
    ended: Arc<SetOnce<Option<Exceeded>>>,
}

impl Pooled {
    fn usable(&self, now: SystemTime) -> bool {
        !self.sender.is_closed() && now < self.not_after
    }
}

/// A connection being set up, shared by every stream that waits for it: one handshake,
/// and when it fails or times out, every waiter learns at once instead of queueing behind
/// the next attempt.
type Connecting = Arc<tokio::sync::OnceCell<Result<Pooled, Arc<HboneError>>>>;

/// The pooled connections of one key.
#[derive(Default)]
struct SlotState {
    connections: Vec<Pooled>,
    connecting: Option<Connecting>,
}

impl SlotState {
    fn is_busy(&self) -> bool {
        self.connecting.is_some() || self.connections.iter().any(|p| !p.sender.is_closed())
    }
}

type Slot = Arc<Mutex<SlotState>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct PoolKey {
    source_pod: IpAddr,
    source: SpiffeId,
    allowed: Vec<SpiffeId>,
    gateway: SocketAddr,
}

/// Pooled HBONE connections. Cloning shares the pool.
#[derive(Clone, Default)]
pub struct Pool {
    /// Locks are held only to look at or change a slot, never across a connect.
    slots: Arc<Mutex<HashMap<PoolKey, Slot>>>,
}

impl Pool {
    /// The open connections the pool holds.
    pub fn connections(&self) -> usize {
        let slots: Vec<Slot> = lock(&self.slots).values().cloned().collect();
        slots
            .iter()
            .map(|slot| {
                let state = lock(slot);
                state
                    .connections
                    .iter()
                    .filter(|p| !p.sender.is_closed())
                    .count()
            })
            .sum()
    }

    /// Forgets every pooled connection, when the agent drains: each ends (`GOAWAY`) once
    /// its last stream has, and no new stream goes on it.
    pub fn close(&self) {
        lock(&self.slots).clear();
    }

    /// Opens a tunnel from `pod` through the proxy at `gateway`, which must present one of
    /// the `allowed` identities, for `connect`; the request also names the pod's address as
    /// `forwarded`.
    pub async fn open(
        &self,
        pod: &PodProxy,
        shared: &Shared,
        allowed: Vec<SpiffeId>,
        gateway: SocketAddr,
        connect: Connect,
    ) -> Result<Tunnel, HboneError> {
        let key = PoolKey {
            source_pod: pod.ip_toward(gateway.ip()),
            source: pod.identity.clone(),
            allowed,
            gateway,
        };
        let slot = {
            let mut slots = lock(&self.slots);
            if !slots.contains_key(&key) {
                // Keys come and go with pods: forget those with nothing left, so the pool
                // does not grow with every destination it ever served.
                slots.retain(|_, slot| lock(slot).is_busy());
            }
            Arc::clone(slots.entry(key.clone()).or_default())
        };
        let forwarded = baggage::forwarded(pod.ip_toward(gateway.ip()));
        let (pooled, stream, reused) = pick(&slot, pod, shared, &key, false).await?;
        match request(pooled, stream, &connect, &forwarded).await {
            Err(HboneError::Http(error)) if reused => {
                // The pooled connection died under us (the peer restarted, say): once more
                // on a fresh one.
                debug!(%gateway, %error, "pooled HBONE connection failed; reconnecting");
                let (pooled, stream, _) = pick(&slot, pod, shared, &key, true).await?;
                request(pooled, stream, &connect, &forwarded).await
            }
            other => other,
        }
    }
}

/// A connection of `slot` with room for one more stream, opening one if none has or
/// `fresh` asks for a new one. Returns it, the new stream's count on it and whether it
/// was reused.
async fn pick(
    slot: &Slot,
    pod: &PodProxy,
    shared: &Shared,
    key: &PoolKey,
    fresh: bool,
) -> Result<(Pooled, StreamCount, bool), HboneError> {
    let connecting = {
        let mut state = lock(slot);
        let now = SystemTime::now();
        state.connections.retain(|p| p.usable(now));
        let reusable = state
            .connections
            .iter()
            .filter(|_| !fresh)
            .find(|p| p.streams.load(Ordering::Acquire) < STREAMS_PER_CONNECTION);
        if let Some(pooled) = reusable {
            return Ok((pooled.clone(), StreamCount::new(&pooled.streams), true));
        }
        Arc::clone(state.connecting.get_or_insert_with(Connecting::default))
    };
    // If the task that started this connect is cancelled, the next waiter takes it over.
    let result = connecting
        .get_or_init(|| async {
            let timeout = shared.limits.connect_timeout;
            match tokio::time::timeout(timeout, connect(pod, shared, key)).await {
                Ok(connected) => connected.map_err(Arc::new),
                Err(_) => Err(Arc::new(HboneError::Timeout(timeout))),
            }
        })
        .await
        .clone();
    {
        // The first waiter back files the outcome; the next stream starts over.
        let mut state = lock(slot);
        if state
            .connecting
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &connecting))
        {
            state.connecting = None;
            if let Ok(pooled) = &result {
                state.connections.push(pooled.clone());
            }
        }
    }
    let pooled = result.map_err(HboneError::Setup)?;
    let stream = StreamCount::new(&pooled.streams);
    Ok((pooled, stream, false))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// An open tunnel to the destination application, as a byte stream. Holds its
/// connection's stream count until dropped.
pub struct Tunnel {
    io: TokioIo<hyper::upgrade::Upgraded>,
    _stream: StreamCount,
}

/// One counted stream of a pooled connection.
struct StreamCount(Arc<AtomicUsize>);

impl StreamCount {
    fn new(streams: &Arc<AtomicUsize>) -> Self {
        streams.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(streams))
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

async fn connect(pod: &PodProxy, shared: &Shared, key: &PoolKey) -> Result<Pooled, HboneError> {
    let descriptor = shared.descriptors.acquire()?;
    let tcp = socket::connect(
        &pod.netns,
        key.gateway,
        socket::Source::Pod,
        shared.limits.connect_timeout,
    )
    .await?;
    let connector =
        MeshConnector::for_workload(&shared.identities, &key.source, key.allowed.clone()).await?;
    let (tls, server) = connector.connect(key.gateway.ip(), tcp).await?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .max_header_list_size(super::MAX_HEADERS)
        .handshake(TokioIo::new(tls))
        .await?;
    Ok(Pooled {
        sender,
        streams: Arc::default(),
        not_after: server.not_after(),
        ended: drive(connection, key.gateway, descriptor),
    })
}

/// Runs `connection` on its own task, holding `held` until it ends, and tells how it
/// ended.
fn drive(
    connection: impl Future<Output = hyper::Result<()>> + Send + 'static,
    gateway: SocketAddr,
    held: impl Send + 'static,
) -> Arc<SetOnce<Option<Exceeded>>> {
    let ended = Arc::new(SetOnce::new());
    tokio::spawn({
        let ended = Arc::clone(&ended);
        async move {
            let _held = held;
            let refused = match connection.await {
                Ok(()) => None,
                Err(error) => {
                    debug!(%gateway, %error, "HBONE connection ended");
                    refusal::named_in(&error)
                }
            };
            let _ = ended.set(refused);
        }
    });
    ended
}

/// What one `CONNECT` asks for, and says about its client: its workload (`baggage`) and
/// the trace of the connection (`traceparent`), as ztunnel sends them.
pub struct Connect {
    pub target: SocketAddr,
    pub baggage: Option<HeaderValue>,
    pub trace: TraceParent,
}

/// Opens the stream `stream` counts on `pooled`; the count is released on every error
/// path by its drop. A stream failed by the server's refusal of the connection fails
/// with the limit the server named.
async fn request(
    pooled: Pooled,
    stream: StreamCount,
    connect: &Connect,
    forwarded: &HeaderValue,
) -> Result<Tunnel, HboneError> {
    let ended = Arc::clone(&pooled.ended);
    match open_stream(pooled, stream, connect, forwarded).await {
        Err(HboneError::Http(error)) => {
            let refused = tokio::time::timeout(REFUSAL_WAIT, ended.wait()).await;
            let refused = refused.ok().copied().flatten();
            Err(refused.map_or(HboneError::Http(error), HboneError::Refused))
        }
        other => other,
    }
}

async fn open_stream(
    pooled: Pooled,
    stream: StreamCount,
    connect: &Connect,
    forwarded: &HeaderValue,
) -> Result<Tunnel, HboneError> {
    let mut sender = pooled.sender;
    sender.ready().await?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(connect.target.to_string())
        .header(baggage::FORWARDED, forwarded.clone())
        .header(TRACEPARENT, connect.trace.header());
    if let Some(value) = &connect.baggage {
        request = request.header(baggage::BAGGAGE, value.clone());
    }
    let mut response = sender.send_request(request.body(Empty::new())?).await?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status(response.status()));
    }
    Ok(Tunnel {
        io: TokioIo::new(hyper::upgrade::on(&mut response).await?),
        _stream: stream,
    })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http::Response;
    use hyper::service::service_fn;

    use super::*;
    use crate::proxy::connections::CloseReason;

    /// A pooled connection over an in-memory HTTP/2 connection to `serve`, and its task.
    async fn pooled_to<F>(
        not_after: SystemTime,
        serve: impl FnOnce(tokio::io::DuplexStream) -> F,
    ) -> (Pooled, tokio::task::JoinHandle<()>)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve(server));
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(client))
            .await
            .unwrap();
        let pooled = Pooled {
            sender,
            streams: Arc::default(),
            not_after,
            ended: drive(connection, "10.0.0.2:15008".parse().unwrap(), ()),
        };
        (pooled, server)
    }

    /// A pooled connection to a server answering every stream 200.
    async fn pooled(not_after: SystemTime) -> (Pooled, tokio::task::JoinHandle<()>) {
        pooled_to(not_after, |server| async move {
            let service =
                service_fn(|_| async { Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())) });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server), service)
                .await;
        })
        .await
    }

    #[tokio::test]
    async fn a_stream_on_a_connection_the_server_refused_fails_with_the_limit_it_named() {
        let far = SystemTime::now() + Duration::from_secs(60);
        let (pooled, server) = pooled_to(far, |server| async move {
            let within = Duration::from_secs(5);
            let _ = refusal::refuse(server, Exceeded::HboneConnectionsPerWorkload, within).await;
        })
        .await;
        let connect = Connect {
            target: "10.0.0.2:80".parse().unwrap(),
            baggage: None,
            trace: TraceParent::random(),
        };
        let stream = StreamCount::new(&pooled.streams);
        let forwarded = baggage::forwarded("10.0.0.1".parse().unwrap());
        let error = request(pooled, stream, &connect, &forwarded)
            .await
            .err()
            .expect("a refused connection opens no stream");
        assert!(
            matches!(
                error,
                HboneError::Refused(Exceeded::HboneConnectionsPerWorkload)
            ),
            "{error}"
        );
        assert_eq!(error.reason(), CloseReason::Limit);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_pooled_connection_serves_until_its_server_certificate_expires_or_it_closes() {
        let now = SystemTime::now();
        let (pooled, server) = pooled(now + Duration::from_secs(60)).await;
        assert!(pooled.usable(now));
        assert!(
            !pooled.usable(now + Duration::from_secs(61)),
            "no new stream on a connection whose server certificate has expired"
        );
        server.abort();
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while pooled.usable(now) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(closed.is_ok(), "a connection the peer closed is not reused");
    }
}
