//! Inbound: the plaintext listener, and what both inbound listeners do with a connection
//! once it is admitted.
//!
//! The plaintext listener (15006) takes connections from outside the mesh to an enrolled
//! pod's IP, steered by `sk_lookup`; the accepted socket's local address is the
//! destination the client asked for. accept → admit with no identity (PeerAuthentication
//! mode of the port, then authorization) → count against the limits → [`deliver`].

use std::{net::SocketAddr, sync::Arc};

use http::HeaderValue;
use tracing::debug;

use super::{
    Accepted, PodProxy, Shared,
    connections::{Close, ConnectionGuard, Direction, Opening, Path, TunnelMetadata},
    entry::{self, Entered},
    forward::{self, Recheck},
    l7,
    lanes::Movable,
    limits::Source,
};
use crate::{
    admission::{Handling, Peer},
    peers::{Client, Peers},
};

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("cannot read the destination of the accepted connection: {0}")]
    LocalAddr(std::io::Error),
    #[error(transparent)]
    Entry(#[from] entry::EntryError),
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
            if let Err(error) = handle(accepted, pod, shared).await {
                debug!(%peer, %error, "inbound connection refused or failed");
            }
        },
    )
    .await
}

async fn handle(
    accepted: Accepted,
    pod: Arc<PodProxy>,
    shared: Shared,
) -> Result<(), InboundError> {
    let Accepted {
        stream,
        peer: client,
        descriptor: _descriptor,
    } = accepted;
    // A dual-stack listener shows IPv4 as `::ffff:a.b.c.d`.
    let destination = stream
        .local_addr()
        .map(super::socket::canonical)
        .map_err(InboundError::LocalAddr)?;
    let client_of = Client {
        addr: client,
        identity: None,
        baggage: None,
    };
    let applied = Arc::clone(&shared.applied.borrow());
    let mut record = open(
        &shared,
        &applied.peers,
        &pod,
        Path::PlaintextInbound,
        &client_of,
        destination,
        TunnelMetadata::default(),
    );
    let peer = Peer {
        identity: None,
        ip: client.ip(),
    };
    let source = Source::Ip(peer.ip);
    let entered = match entry::enter(&shared, &applied, &pod, &peer, &source, destination).await {
        Ok(entered) => entered,
        Err(error) => {
            refused(&mut record, &error);
            stream.reset();
            return Err(error.into());
        }
    };
    deliver(stream, entered, pod, shared, None, &mut record).await;
    Ok(())
}

/// Records a connection from `client` to `destination` arriving on `path`, its ends named
/// by `peers`.
pub fn open(
    shared: &Shared,
    peers: &Peers,
    pod: &PodProxy,
    path: Path,
    client: &Client,
    destination: SocketAddr,
    tunnel: TunnelMetadata,
) -> ConnectionGuard {
    let ends = peers.inbound(&pod.key, destination, client);
    let opening = Opening {
        direction: Direction::Inbound,
        path,
        workload: pod.key.clone(),
        source: client.addr,
        destination,
        ends,
        tunnel,
        traffic: None,
    };
    shared.connections.open(opening, Arc::clone(&pod.stats))
}

/// Closes the record of a connection that did not get in.
pub fn refused(record: &mut ConnectionGuard, error: &entry::EntryError) {
    if let entry::EntryError::Refused(refusal) = error {
        record.refused(refusal);
    }
    record.finish(Close::new(error.reason(), error));
}

/// Serves an admitted connection until it ends: bytes relayed to the application when it
/// was authorized as a whole, else request by request ([`l7`]). Either way it is closed
/// when a new configuration refuses it. `forwarded_client_cert` is the client's identity
/// for the application, on mutual TLS.
pub async fn deliver<C>(
    client: C,
    entered: Entered,
    pod: Arc<PodProxy>,
    shared: Shared,
    forwarded_client_cert: Option<HeaderValue>,
    record: &mut ConnectionGuard,
) where
    C: Movable + Send + 'static,
{
    let Entered {
        admission,
        upstream,
        held: _held,
    } = entered;
    if let Handling::Connection(permit) = &admission.handling {
        record.permitted(permit);
    }
    match upstream {
        Some(upstream) => {
            let recheck = Recheck {
                applied: shared.applied.clone(),
                pod: &pod,
                peer: &admission.peer,
                destination: admission.destination,
                whole: true,
            };
            let budget = pod.counters.buffers(&shared.limits);
            let lanes = &shared.lanes;
            forward::relay(client, upstream, budget, lanes, record, Some(recheck)).await;
        }
        None => {
            let conn = l7::Connection::new(
                Arc::clone(&pod),
                shared,
                &admission,
                forwarded_client_cert,
                record,
            );
            // Boxed: the HTTP server's state (several KiB) is then only in the tasks of
            // connections served request by request, not in every relayed one.
            Box::pin(l7::serve(client, admission, conn, record)).await;
        }
    }
}
