//! Inbound plaintext: connections from outside the mesh to an enrolled pod's IP, steered
//! by `sk_lookup` to the pod's listener (15006). The accepted socket's local address is
//! the destination the client asked for.
//!
//! accept → admit (PeerAuthentication mode of the port, then authorization, with no
//! identity) → connect to the application with the client's IP → relay.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::debug;

use super::{
    PodProxy, Shared,
    admission::{self, Peer, Refusal},
    connections::{Direction, Path},
    forward::{self, Recheck},
    socket,
};

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("cannot read the destination of the accepted connection: {0}")]
    LocalAddr(std::io::Error),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Upstream(#[from] socket::SocketError),
}

/// Serves the pod's plaintext listener until the pod is released.
pub async fn serve(listener: tokio::net::TcpListener, pod: Arc<PodProxy>, shared: Shared) {
    super::accept_loop(
        listener,
        "inbound",
        pod,
        shared,
        |stream, peer, pod, shared| async move {
            if let Err(error) = handle(stream, peer, &pod, &shared).await {
                debug!(workload = %pod.key, %peer, %error, "inbound connection refused or failed");
            }
        },
    )
    .await
}

async fn handle(
    stream: TcpStream,
    client: SocketAddr,
    pod: &PodProxy,
    shared: &Shared,
) -> Result<(), InboundError> {
    let destination = stream.local_addr().map_err(InboundError::LocalAddr)?;
    let mut record = shared.connections.open(
        Direction::Inbound,
        Path::PlaintextInbound,
        &pod.key,
        client,
        destination,
        Arc::clone(&pod.stats),
    );
    let peer = Peer {
        identity: None,
        ip: client.ip(),
    };
    let applied = shared.applied.borrow().clone();
    if let Err(refusal) = admission::admit(&applied, pod, &peer, destination) {
        record.finish(Some(refusal.to_string()));
        forward::reset(stream);
        return Err(refusal.into());
    }
    let upstream =
        match socket::connect(&pod.netns, destination, socket::Source::Client(peer.ip)).await {
            Ok(upstream) => upstream,
            Err(error) => {
                record.finish(Some(error.to_string()));
                forward::reset(stream);
                return Err(error.into());
            }
        };
    let recheck = Recheck {
        applied: shared.applied.clone(),
        pod,
        peer: &peer,
        destination,
    };
    forward::relay(stream, upstream, &mut record, Some(recheck)).await;
    Ok(())
}
