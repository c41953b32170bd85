//! Inbound plaintext: connections from outside the mesh to an enrolled pod's IP, steered
//! by `sk_lookup` to the pod's listener (15006). The accepted socket's local address is
//! the destination the client asked for.
//!
//! accept → connect to the application with the client's IP → copy. The PeerAuthentication
//! mode and authorization will decide between accept and connect.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::{
    PodProxy, Shared,
    connections::{Direction, Path},
    forward, socket,
};

/// Serves the pod's inbound listener until the pod is released.
pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>, shared: Shared) {
    super::accept_loop(
        listener,
        "inbound",
        pod,
        shared,
        |stream, peer, pod, shared| async move {
            if let Err(error) = handle(stream, peer, &pod, &shared).await {
                debug!(workload = %pod.workload, %error, "inbound connection failed");
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
) -> Result<(), socket::SocketError> {
    let destination = stream
        .local_addr()
        .map_err(|source| socket::SocketError::Connect {
            addr: peer,
            pod: pod.workload.clone(),
            source,
        })?;
    let mut record = shared.connections.open(
        Direction::Inbound,
        Path::PlaintextInbound,
        &pod.workload,
        peer,
        destination,
        Arc::clone(&pod.stats),
    );
    let upstream =
        match socket::connect(&pod.netns, destination, socket::Source::Client(peer.ip())).await {
            Ok(upstream) => upstream,
            Err(error) => {
                record.finish(0, 0, Some(error.to_string()));
                forward::reset(stream);
                return Err(error);
            }
        };
    forward::copy_both_ways(stream, upstream, &mut record).await;
    Ok(())
}
