//! Relaying an admitted connection, and ending it when the configuration stops admitting it.

use std::net::SocketAddr;

use tracing::info;

use super::{
    PodProxy,
    connections::{Close, CloseReason, ConnectionGuard},
    copy::Directions,
    lanes::{Lanes, Movable},
    limits::BufferBudget,
};
use crate::{
    admission::{self, Peer, Refusal},
    state::AppliedRx,
};

/// What an inbound connection was admitted for, to ask again when the configuration
/// changes.
pub struct Recheck<'a> {
    pub applied: AppliedRx,
    pub pod: &'a PodProxy,
    pub peer: &'a Peer,
    pub destination: SocketAddr,
    /// Authorized as a whole (opaque TCP) rather than per request: the new configuration
    /// must authorize the connection too, not only admit it.
    pub whole: bool,
}

impl Recheck<'_> {
    /// Resolves when a new configuration refuses the connection; never otherwise.
    pub async fn refused(mut self) -> Refusal {
        loop {
            if self.applied.changed().await.is_err() {
                return std::future::pending().await;
            }
            let current = self.applied.borrow_and_update().clone();
            let (pod, peer) = (self.pod, self.peer);
            let decided = admission::admit(&current, &pod.key, &pod.ips, peer, self.destination)
                .and_then(|admitted| match self.whole {
                    true => admitted.authorize_whole(),
                    false => Ok(()),
                });
            if let Err(refusal) = decided {
                info!(workload = %self.pod.key, peer = %self.peer.ip, %refusal,
                    "closing a connection the configuration no longer admits");
                return refusal;
            }
        }
    }
}

/// Copies both ways, with buffers grown within `budget` (the workload's), on the main
/// runtime or, once it proves bulk, on the bulk lane of `lanes`, until both sides have
/// closed or, with `recheck`, until the configuration refuses the connection; either way
/// the record is closed.
pub async fn relay<C, S>(
    client: C,
    server: S,
    budget: BufferBudget,
    lanes: &Lanes,
    record: &mut ConnectionGuard,
    recheck: Option<Recheck<'_>>,
) where
    C: Movable,
    S: Movable,
{
    let directions = Directions::new(&budget);
    let copy = lanes.copy(client, server, directions, record.shared_traffic());
    let refused = async {
        match recheck {
            Some(recheck) => recheck.refused().await,
            None => std::future::pending().await,
        }
    };
    let close = tokio::select! {
        result = copy => match result {
            Ok(()) => Close::done(),
            Err(error) => Close::new(CloseReason::Io, &error),
        },
        refusal = refused => closed_by(record, &refusal),
    };
    record.finish(close);
}

/// Records that a new configuration refused a live connection.
pub fn closed_by(record: &mut ConnectionGuard, refusal: &Refusal) -> Close {
    record.refused(refusal);
    Close::new(refusal.into(), &format_args!("closed: {refusal}"))
}
