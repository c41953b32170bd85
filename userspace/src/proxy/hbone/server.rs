//! The server side of HBONE (15008): terminates mutual TLS with the certificate of the pod
//! whose listener accepted, then serves HTTP/2 `CONNECT` streams, each one application
//! connection.
//!
//! Per stream: only `CONNECT` to this pod's own IP (400 otherwise) → admission with the
//! peer's verified identity (401 if refused) → connect to the application from inside the
//! pod with the client's IP (503 if it refuses) → 200, then relay until either side closes
//! or a new configuration refuses the connection.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::debug;

use super::{HboneError, request};
use crate::{
    proxy::{
        PodProxy, Shared,
        admission::{self, Peer},
        connections::{Direction, Path},
        forward::{self, Recheck},
        socket,
    },
    tls::MeshAcceptor,
};

/// Concurrent streams a client may open on one connection (the client side opens another
/// connection before reaching it).
pub const MAX_STREAMS: u32 = 1000;

/// Serves the pod's HBONE listener until the pod is released.
pub async fn serve(listener: tokio::net::TcpListener, pod: Arc<PodProxy>, shared: Shared) {
    crate::proxy::accept_loop(
        listener,
        "hbone",
        pod,
        shared,
        |stream, peer, pod, shared| async move {
            if let Err(error) = serve_connection(stream, peer, pod, shared).await {
                debug!(%peer, %error, "HBONE connection failed");
            }
        },
    )
    .await
}

async fn serve_connection(
    stream: TcpStream,
    client: SocketAddr,
    pod: Arc<PodProxy>,
    shared: Shared,
) -> Result<(), HboneError> {
    let acceptor = pod
        .acceptor
        .get_or_try_init(|| MeshAcceptor::for_workload(&shared.identities, &pod.identity))
        .await?;
    let (tls, verified) = acceptor.accept(stream).await?;
    let peer = Arc::new(Peer {
        identity: Some(verified.id().clone()),
        ip: client.ip(),
    });
    let service = service_fn(move |request| {
        let (pod, shared, peer) = (Arc::clone(&pod), shared.clone(), Arc::clone(&peer));
        async move {
            let status = open_stream(request, client, pod, shared, peer).await;
            let mut response = Response::new(Empty::<Bytes>::new());
            *response.status_mut() = status;
            Ok::<_, Infallible>(response)
        }
    });
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .serve_connection(TokioIo::new(tls), service)
        .await?;
    Ok(())
}

/// Handles one `CONNECT` stream and returns the status to answer; on 200 the relay runs
/// on its own task.
async fn open_stream(
    mut request: Request<Incoming>,
    client: SocketAddr,
    pod: Arc<PodProxy>,
    shared: Shared,
    peer: Arc<Peer>,
) -> StatusCode {
    let destination = match request::connect_target(request.method(), request.uri(), pod.ip) {
        Ok(target) => target,
        Err(error) => {
            debug!(workload = %pod.key, %error, "bad HBONE request");
            return StatusCode::BAD_REQUEST;
        }
    };
    let mut record = shared.connections.open(
        Direction::Inbound,
        Path::HboneInbound,
        &pod.key,
        client,
        destination,
        Arc::clone(&pod.stats),
    );
    let applied = shared.applied.borrow().clone();
    if let Err(refusal) = admission::admit(&applied, &pod, &peer, destination) {
        debug!(workload = %pod.key, %refusal, "HBONE stream refused");
        record.finish(Some(refusal.to_string()));
        return StatusCode::UNAUTHORIZED;
    }
    let upstream =
        match socket::connect(&pod.netns, destination, socket::Source::Client(peer.ip)).await {
            Ok(upstream) => upstream,
            Err(error) => {
                record.finish(Some(error.to_string()));
                return StatusCode::SERVICE_UNAVAILABLE;
            }
        };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let tunnel = match upgrade.await {
            Ok(tunnel) => TokioIo::new(tunnel),
            Err(error) => return record.finish(Some(error.to_string())),
        };
        let recheck = Recheck {
            applied: shared.applied.clone(),
            pod: &pod,
            peer: &peer,
            destination,
        };
        forward::relay(tunnel, upstream, &mut record, Some(recheck)).await;
    });
    StatusCode::OK
}
