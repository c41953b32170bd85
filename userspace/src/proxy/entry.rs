//! What both inbound listeners do with a connection before anything reaches the
//! application: admit it against the configuration in force ([`crate::admission`]), count
//! it against the limits, and, when it is authorized as a whole, connect to the
//! application from inside the pod with the client's IP. A connection authorized per
//! request connects only for a request that is allowed.

use std::net::SocketAddr;

use crate::{
    admission::{self, Admission, Handling, Peer, Refusal},
    state::Applied,
};

use super::{
    PodProxy, Shared,
    connections::CloseReason,
    limits::{Exceeded, GaugePermit, InboundPermit, Source},
    socket::{self, ProxyStream, SocketError},
};

/// An inbound connection let in: what was decided, its connection to the application
/// when it is authorized as a whole, and the counts it holds until dropped.
pub struct Entered {
    pub admission: Admission,
    pub upstream: Option<ProxyStream>,
    /// Counts against the limits, held until the connection ends.
    pub held: (InboundPermit, GaugePermit),
}

/// Why an inbound connection did not reach the application.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Limit(#[from] Exceeded),
    #[error(transparent)]
    Upstream(#[from] SocketError),
}

impl EntryError {
    pub fn reason(&self) -> CloseReason {
        match self {
            Self::Refused(refusal) => refusal.into(),
            Self::Limit(_) => CloseReason::Limit,
            Self::Upstream(_) => CloseReason::ConnectFailed,
        }
    }
}

/// Admits `peer` to `destination` on `pod` against the configuration in force.
pub fn admit(
    shared: &Shared,
    pod: &PodProxy,
    peer: &Peer,
    destination: SocketAddr,
) -> Result<Admission, Refusal> {
    admission::admit(
        &shared.applied.borrow(),
        &pod.key,
        &pod.ips,
        peer,
        destination,
    )
}

/// Admits against `applied` (the configuration in force, read once by the caller),
/// counts (`source` is who the connection is charged to) and, for a connection authorized
/// as a whole, connects to the application.
pub async fn enter(
    shared: &Shared,
    applied: &Applied,
    pod: &PodProxy,
    peer: &Peer,
    source: &Source,
    destination: SocketAddr,
) -> Result<Entered, EntryError> {
    let admission = admission::admit(applied, &pod.key, &pod.ips, peer, destination)?;
    let permit = pod.counters.inbound(&shared.limits, source)?;
    let descriptor = shared.descriptors.acquire()?;
    let upstream = match admission.handling {
        Handling::Connection(_) => Some(connect(shared, pod, peer, destination).await?),
        Handling::Requests | Handling::Detect => None,
    };
    Ok(Entered {
        admission,
        upstream,
        held: (permit, descriptor),
    })
}

/// Connects to the application on `destination` from inside the pod, with the client's IP.
pub async fn connect(
    shared: &Shared,
    pod: &PodProxy,
    peer: &Peer,
    destination: SocketAddr,
) -> Result<ProxyStream, SocketError> {
    socket::connect(
        &pod.netns,
        destination,
        socket::Source::Client {
            ip: peer.ip,
            direct: peer.identity.is_none(),
        },
        shared.limits.connect_timeout,
    )
    .await
}
