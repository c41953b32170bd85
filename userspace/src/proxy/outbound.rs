//! Outbound: connections an enrolled pod's applications make, redirected by `connect4` to
//! the pod's listener on 127.0.0.1:15001.
//!
//! accept → recover the original destination → connect from the pod → copy.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::{
    PodProxy, Shared,
    connections::{Direction, Path},
    forward, socket,
};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("no original destination recorded for {peer} (connection not redirected by ambit?)")]
    NoOrigDst { peer: SocketAddr },
    #[error(transparent)]
    Upstream(#[from] socket::SocketError),
}

/// Serves the pod's outbound listener until the pod is released.
pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>, shared: Shared) {
    super::accept_loop(
        listener,
        "outbound",
        pod,
        shared,
        |stream, peer, pod, shared| async move {
            if let Err(error) = handle(stream, peer, &pod, &shared).await {
                warn!(workload = %pod.workload, %error, "outbound connection failed");
            }
        },
    )
    .await
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    pod: &PodProxy,
    shared: &Shared,
) -> Result<(), OutboundError> {
    let Some(destination) = shared.orig_dst.take(pod.netns_cookie, peer) else {
        forward::reset(stream);
        return Err(OutboundError::NoOrigDst { peer });
    };
    let source = SocketAddr::new(pod.ip, peer.port());
    let mut record = shared.connections.open(
        Direction::Outbound,
        Path::Plaintext,
        &pod.workload,
        source,
        destination,
        Arc::clone(&pod.stats),
    );
    debug!(workload = %pod.workload, %destination, "outbound");
    let upstream = match socket::connect(&pod.netns, destination, socket::Source::Pod).await {
        Ok(upstream) => upstream,
        Err(error) => {
            record.finish(0, 0, Some(error.to_string()));
            forward::reset(stream);
            return Err(error.into());
        }
    };
    forward::copy_both_ways(stream, upstream, &mut record).await;
    Ok(())
}
