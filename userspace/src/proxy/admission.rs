//! Whether an inbound connection may reach a pod's application: the PeerAuthentication
//! mode of the port (plaintext only) and the authorization policies, decided against the
//! configuration in force. Re-asked whenever the configuration changes, so a connection
//! that a new policy denies is closed.

use std::net::{IpAddr, SocketAddr};

use crate::{
    identity::SpiffeId,
    policy::{Denied, MtlsMode, RequestContext},
    state::Applied,
};

use super::PodProxy;

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
    #[error("plaintext refused: PeerAuthentication is STRICT on port {port}")]
    StrictMtls { port: u16 },
    #[error("denied by {}: {}", .0.verdict().policy.as_ref().map_or("policy".to_owned(), |p| p.to_string()), .0.verdict().reason)]
    Denied(Denied),
}

/// Decides whether `peer` may reach `destination` on `pod`.
pub fn admit(
    applied: &Applied,
    pod: &PodProxy,
    peer: &Peer,
    destination: SocketAddr,
) -> Result<(), Refusal> {
    let port = destination.port();
    if peer.identity.is_none()
        && applied.policies.peer_authn(&pod.workload, port) == MtlsMode::Strict
    {
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
        .authorize(&pod.workload, &ctx)
        .map(drop)
        .map_err(Refusal::Denied)
}
