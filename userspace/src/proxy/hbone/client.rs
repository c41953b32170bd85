//! The client side of HBONE: one HTTP/2 `CONNECT` stream per application connection, on
//! mutual-TLS connections pooled per (source pod, source identity, allowed destination
//! identities, destination proxy address).
//!
//! A pooled connection's socket lives in the source pod's network namespace, so the
//! destination sees the pod's own IP; that is why the source pod is part of the key.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use super::HboneError;
use crate::{
    identity::{SecretManager, SpiffeId},
    proxy::{PodProxy, socket},
    tls::MeshConnector,
};

/// An open tunnel to the destination application, as a byte stream.
pub type Tunnel = TokioIo<hyper::upgrade::Upgraded>;

type Sender = SendRequest<Empty<Bytes>>;
/// The pooled connection of one key, if one is open.
type Slot = Arc<tokio::sync::Mutex<Option<Sender>>>;

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
    /// One slot per key; the async lock makes concurrent first connections share one
    /// handshake instead of racing.
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
        let mut sender = slot.lock().await;
        let reused = sender.as_ref().is_some_and(|s| !s.is_closed());
        let current = match sender.as_mut().filter(|_| reused) {
            Some(current) => current,
            None => sender.insert(connect(pod, identities, &key).await?),
        };
        match request(current, target).await {
            Err(HboneError::Http(error)) if reused => {
                // The pooled connection died under us (the peer restarted, say): once more
                // on a fresh one.
                debug!(%gateway, %error, "pooled HBONE connection failed; reconnecting");
                let mut fresh = connect(pod, identities, &key).await?;
                let tunnel = request(&mut fresh, target).await;
                *sender = Some(fresh);
                tunnel
            }
            other => other,
        }
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

async fn request(sender: &mut Sender, target: SocketAddr) -> Result<Tunnel, HboneError> {
    sender.ready().await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(Empty::new())?;
    let mut response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        return Err(HboneError::Status(response.status()));
    }
    Ok(TokioIo::new(hyper::upgrade::on(&mut response).await?))
}
