//! Inbound plaintext: connections from outside the mesh to an enrolled pod's IP, steered
//! by `sk_lookup` to the pod's listener (15006). The accepted socket's local address is
//! the destination the client asked for.
//!
//! accept → admit (PeerAuthentication mode of the port, then authorization, with no
//! identity) → count against the limits → connect to the application with the client's
//! IP → relay.

use std::sync::Arc;

use tracing::debug;

use super::{
    Accepted, PodProxy, Shared,
    admission::{self, Peer},
    connections::{Direction, Path},
    forward::{self, Recheck},
    limits::Source,
};

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("cannot read the destination of the accepted connection: {0}")]
    LocalAddr(std::io::Error),
    #[error(transparent)]
    Entry(#[from] admission::EntryError),
}

/// Serves the pod's plaintext listener until the pod is released.
pub async fn serve(listener: tokio::net::TcpListener, pod: Arc<PodProxy>, shared: Shared) {
    super::accept_loop(
        listener,
        "inbound",
        pod,
        shared,
        |accepted, pod, shared| async move {
            let peer = accepted.peer;
            if let Err(error) = handle(accepted, &pod, &shared).await {
                debug!(workload = %pod.key, %peer, %error, "inbound connection refused or failed");
            }
        },
    )
    .await
}

async fn handle(accepted: Accepted, pod: &PodProxy, shared: &Shared) -> Result<(), InboundError> {
    let Accepted {
        stream,
        peer: client,
        descriptor: _descriptor,
    } = accepted;
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
    let mut entered =
        match admission::enter(shared, pod, &peer, &Source::Ip(peer.ip), destination).await {
            Ok(entered) => entered,
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
    forward::relay(stream, &mut entered.upstream, &mut record, Some(recheck)).await;
    Ok(())
}
