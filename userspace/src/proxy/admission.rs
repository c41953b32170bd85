//! Whether an inbound connection may reach a pod's application: the pod must still be
//! served here and the destination be its own application (never one of the proxy's
//! listeners), then the PeerAuthentication mode of the port (plaintext only) and the
//! authorization policies decide, against the configuration in force: the pod's labels as
//! they are now, not as they were when it was enrolled. Re-asked whenever the
//! configuration changes, so a connection that a new policy denies is closed.

use std::net::{IpAddr, SocketAddr};

use ambit_common::ports;
use tokio::net::TcpStream;

use crate::{
    identity::SpiffeId,
    policy::{Denied, MtlsMode, RequestContext},
    state::Applied,
};

use super::{
    PodProxy, Shared,
    limits::{Exceeded, GaugePermit, InboundPermit, Source},
    socket::{self, SocketError},
};

/// Who is connecting, as far as the proxy could verify.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The client's mesh identity, from its verified certificate; `None` for plaintext.
    pub identity: Option<SpiffeId>,
    pub ip: IpAddr,
}

/// Why a connection may not proceed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is not served by this proxy any more (left the mesh or changed address)")]
    NotServed(String),
    #[error("destination {0} is not this pod's application")]
    NotThisPod(SocketAddr),
    #[error("destination port {0} is one of the proxy's own listeners")]
    ProxyPort(u16),
    #[error("plaintext refused: PeerAuthentication is STRICT on port {port}")]
    StrictMtls { port: u16 },
    #[error("denied by {}: {}", .0.verdict().policy.as_ref().map_or("policy".to_owned(), |p| p.to_string()), .0.verdict().reason)]
    Denied(Denied),
    #[error(transparent)]
    Limit(#[from] Exceeded),
}

/// Decides whether `peer` may reach `destination` on `pod`.
pub fn admit(
    applied: &Applied,
    pod: &PodProxy,
    peer: &Peer,
    destination: SocketAddr,
) -> Result<(), Refusal> {
    let workload = applied
        .served_workload(&pod.key, pod.ip)
        .ok_or_else(|| Refusal::NotServed(pod.key.clone()))?;
    if destination.ip() != pod.ip {
        return Err(Refusal::NotThisPod(destination));
    }
    let port = destination.port();
    if ports::is_listener(port) {
        return Err(Refusal::ProxyPort(port));
    }
    if peer.identity.is_none() && applied.policies.peer_authn(workload, port) == MtlsMode::Strict {
        return Err(Refusal::StrictMtls { port });
    }
    let principal = peer.identity.as_ref().map(SpiffeId::principal);
    let ctx = RequestContext {
        source_principal: principal.as_deref(),
        source_namespace: peer.identity.as_ref().map(SpiffeId::namespace),
        source_ip: peer.ip,
        remote_ip: peer.ip,
        destination_ip: destination.ip(),
        destination_port: port,
        sni: None,
        http: None,
    };
    applied
        .policies
        .authorize(workload, &ctx)
        .map(drop)
        .map_err(Refusal::Denied)
}

/// An inbound connection let in: its connection to the application, and the counts it
/// holds until dropped.
pub struct Entered {
    pub upstream: TcpStream,
    _held: (InboundPermit, GaugePermit),
}

/// Why an inbound connection did not reach the application.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Upstream(#[from] SocketError),
}

/// What both inbound listeners do before relaying: [`admit`] against the configuration in
/// force, count against the limits (`source` is who the connection is charged to), then
/// connect to the application from inside the pod with the client's IP.
pub async fn enter(
    shared: &Shared,
    pod: &PodProxy,
    peer: &Peer,
    source: &Source,
    destination: SocketAddr,
) -> Result<Entered, EntryError> {
    admit(&shared.applied.borrow(), pod, peer, destination)?;
    let permit = pod
        .counters
        .inbound(&shared.limits, source)
        .map_err(Refusal::from)?;
    let descriptor = shared.descriptors.acquire().map_err(Refusal::from)?;
    let upstream = socket::connect(
        &pod.netns,
        destination,
        socket::Source::Client(peer.ip),
        shared.limits.connect_timeout,
    )
    .await?;
    Ok(Entered {
        upstream,
        _held: (permit, descriptor),
    })
}
