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
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use super::HboneError;
use crate::{
    identity::{SecretManager, SpiffeId},
    proxy::{PodProxy, socket},
    tls::MeshConnector,
};

/// Streams one pooled connection carries before the pool opens another. Below the
/// server's limit (`server::MAX_STREAMS`), so a stream never waits for capacity.
const STREAMS_PER_CONNECTION: usize = 100;

type Sender = SendRequest<Empty<Bytes>>;

/// One mutual-TLS connection of the pool.
struct Pooled {
    sender: Sender,
    /// Streams open on it; each [`Tunnel`] holds one count until dropped.
    streams: Arc<AtomicUsize>,
}

/// The pooled connections of one key.
type Slot = Arc<tokio::sync::Mutex<Vec<Pooled>>>;

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
    /// The async lock of a slot is held only to pick or open a connection, so concurrent
    /// first streams share one handshake instead of racing, and requests never queue
    /// behind each other.
    slots: Arc<Mutex<HashMap<PoolKey, Slot>>>,
}

impl Pool {
    /// Opens a tunnel from `pod` to `target` through the proxy at `gateway`, which must
    /// present one of the `allowed` identities.
    pub async fn open(
        &self,
        pod: &PodProxy,
        identities: &SecretManager,
        allowed: Vec<SpiffeId>,
        gateway: SocketAddr,
        target: SocketAddr,
    ) -> Result<Tunnel, HboneError> {
        let key = PoolKey {
            source_pod: pod.ip,
            source: pod.identity.clone(),
            allowed,
            gateway,
        };
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(slots.entry(key.clone()).or_default())
        };
        let (sender, streams, reused) = self.pick(&slot, pod, identities, &key, false).await?;
        match request(sender, streams, target).await {
            Err(HboneError::Http(error)) if reused => {
                // The pooled connection died under us (the peer restarted, say): once more
                // on a fresh one.
                debug!(%gateway, %error, "pooled HBONE connection failed; reconnecting");
                let (sender, streams, _) = self.pick(&slot, pod, identities, &key, true).await?;
                request(sender, streams, target).await
            }
            other => other,
        }
    }

    /// A connection of `slot` with room for one more stream, opening one if none has or
    /// `fresh` asks for a new one. Returns its sender, its stream count (already counting
    /// the new stream) and whether it was reused.
    async fn pick(
        &self,
        slot: &Slot,
        pod: &PodProxy,
        identities: &SecretManager,
        key: &PoolKey,
        fresh: bool,
    ) -> Result<(Sender, Arc<AtomicUsize>, bool), HboneError> {
        let mut pooled = slot.lock().await;
        pooled.retain(|p| !p.sender.is_closed());
        let reused = pooled
            .iter()
            .filter(|_| !fresh)
            .find(|p| p.streams.load(Ordering::Acquire) < STREAMS_PER_CONNECTION);
        let (sender, streams, reused) = match reused {
            Some(p) => (p.sender.clone(), Arc::clone(&p.streams), true),
            None => {
                let sender = connect(pod, identities, key).await?;
                let streams = Arc::new(AtomicUsize::new(0));
                pooled.push(Pooled {
                    sender: sender.clone(),
                    streams: Arc::clone(&streams),
                });
                (sender, streams, false)
            }
        };
        streams.fetch_add(1, Ordering::AcqRel);
        Ok((sender, streams, reused))
    }
}

/// An open tunnel to the destination application, as a byte stream. Holds its
/// connection's stream count until dropped.
pub struct Tunnel {
    io: TokioIo<hyper::upgrade::Upgraded>,
    _stream: StreamCount,
}

/// One counted stream of a pooled connection.
struct StreamCount(Arc<AtomicUsize>);

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

async fn connect(
    pod: &PodProxy,
    identities: &SecretManager,
    key: &PoolKey,
) -> Result<Sender, HboneError> {
    let tcp = socket::connect(&pod.netns, key.gateway, socket::Source::Pod).await?;
    let connector =
        MeshConnector::for_workload(identities, &key.source, key.allowed.clone()).await?;
    let (tls, _server) = connector.connect(key.gateway.ip(), tcp).await?;
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .handshake(TokioIo::new(tls))
        .await?;
    let gateway = key.gateway;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%gateway, %error, "HBONE connection ended");
        }
    });
    Ok(sender)
}

async fn request(
    mut sender: Sender,
    streams: Arc<AtomicUsize>,
    target: SocketAddr,
) -> Result<Tunnel, HboneError> {
    // Counted from here on: released on every error path by the guard's drop.
    let stream = StreamCount(streams);
    sender.ready().await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(Empty::new())?;
    let mut response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status(response.status()));
    }
    Ok(Tunnel {
        io: TokioIo::new(hyper::upgrade::on(&mut response).await?),
        _stream: stream,
    })
}
