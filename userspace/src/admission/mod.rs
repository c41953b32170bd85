//! Whether a connection, and then each request on it, may reach an enrolled pod's
//! application. One decision, asked by both inbound listeners (HBONE and plaintext), by the
//! re-check of live connections when the configuration changes, and by `explain`, so that
//! what `explain` says is what the data path does.
//!
//! A connection is admitted ([`admit`]) when the pod is still served at that address, the
//! destination is its application (never one of the proxy's listeners), and the port's
//! PeerAuthentication mode accepts the transport. Authorization then happens once for the
//! connection, or per request where the pod's policies look at HTTP attributes on that
//! port ([`Handling`]); [`Admission::authorize_request`] decides a request.

pub mod normalize;
pub mod protocol;
mod request;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ambit_common::ports;

use crate::{
    identity::SpiffeId,
    policy::{Denied, MtlsMode, Permit, PolicyRef, RequestContext, WorkloadPolicies},
    state::Applied,
};
use protocol::Protocol;
pub use request::{RequestDenied, RequestPermit};

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
    StrictMtls {
        port: u16,
        /// The PeerAuthentication that set the mode.
        policy: Option<PolicyRef>,
    },
    #[error("denied by {}: {}", .denied.verdict().policy.as_ref().map_or("policy".to_owned(), |p| p.to_string()), .denied.verdict().reason)]
    Denied { mtls: MtlsMode, denied: Denied },
}

/// How an admitted connection is authorized.
#[derive(Clone, Debug)]
pub enum Handling {
    /// Once, for the whole connection: no policy looks at HTTP attributes on this port,
    /// or the port is declared as another protocol.
    Connection(Permit),
    /// Per request: the port is declared HTTP.
    Requests,
    /// Per request if the client's first bytes are HTTP, else once for the connection
    /// ([`Admission::authorize_connection`]).
    Detect,
}

/// A connection let in, and what was decided: the transport's mTLS mode, the policies in
/// force for the pod, and how the rest is authorized.
#[derive(Debug)]
pub struct Admission {
    pub peer: Peer,
    pub destination: SocketAddr,
    /// The port's PeerAuthentication mode and the policy that set it.
    pub mtls: (MtlsMode, Option<PolicyRef>),
    pub policies: Arc<WorkloadPolicies>,
    pub handling: Handling,
    /// The peer's principal (`<td>/ns/<ns>/sa/<sa>`), computed once.
    principal: Option<String>,
}

/// Decides whether `peer` may connect to `destination` on the pod `key` served at `ips`
/// (every address of the pod), against the configuration `applied`.
pub fn admit(
    applied: &Applied,
    key: &str,
    ips: &[IpAddr],
    peer: &Peer,
    destination: SocketAddr,
) -> Result<Admission, Refusal> {
    let served = applied
        .served(key, ips)
        .ok_or_else(|| Refusal::NotServed(key.to_owned()))?;
    if !ips.contains(&destination.ip()) {
        return Err(Refusal::NotThisPod(destination));
    }
    let port = destination.port();
    if ports::is_listener(port) {
        return Err(Refusal::ProxyPort(port));
    }
    let policies = applied.policies.resolve(&served.workload);
    let (mode, policy) = policies.mtls().port(port);
    let mtls = (mode, policy.cloned());
    if peer.identity.is_none() && mode == MtlsMode::Strict {
        return Err(Refusal::StrictMtls {
            port,
            policy: mtls.1,
        });
    }
    let mut admission = Admission {
        peer: peer.clone(),
        destination,
        mtls,
        policies,
        handling: Handling::Requests,
        principal: peer.identity.as_ref().map(SpiffeId::principal),
    };
    admission.handling = match (
        admission.policies.inspects_http(port),
        served.protocol(port),
    ) {
        (true, Protocol::Http) => Handling::Requests,
        (true, Protocol::Detect) => Handling::Detect,
        (false, _) | (true, Protocol::Opaque) => {
            Handling::Connection(admission.authorize_connection()?)
        }
    };
    Ok(admission)
}

impl Admission {
    /// Authorizes the connection as a whole if that is how it is handled, or as opaque
    /// TCP for a connection whose client did not speak HTTP.
    pub fn authorize_whole(&self) -> Result<(), Refusal> {
        match self.handling {
            Handling::Connection(_) => Ok(()),
            Handling::Requests | Handling::Detect => self.authorize_connection().map(drop),
        }
    }

    /// Authorizes the connection as opaque TCP: rules that need HTTP attributes never
    /// match in ALLOW and are applied on their L4 part in DENY.
    pub fn authorize_connection(&self) -> Result<Permit, Refusal> {
        self.policies
            .authorize(&self.context(None))
            .map_err(|denied| Refusal::Denied {
                mtls: self.mtls.0,
                denied,
            })
    }

    /// The connection's attributes, with `http` for a request.
    fn context<'r>(&'r self, http: Option<crate::policy::HttpRequest<'r>>) -> RequestContext<'r> {
        RequestContext {
            source_principal: self.principal.as_deref(),
            source_namespace: self.peer.identity.as_ref().map(SpiffeId::namespace),
            source_ip: self.peer.ip,
            remote_ip: self.peer.ip,
            destination_ip: self.destination.ip(),
            destination_port: self.destination.port(),
            sni: None,
            http,
        }
    }
}

#[cfg(test)]
mod tests;
