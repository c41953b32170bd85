//! The data path, top down: the kernel redirects a pod's connection (`redirect`), a
//! listener of that pod accepts it ([`outbound`], [`inbound`], [`hbone::server`]), the
//! proxy finds where it was going and whether it may ([`entry`], deciding with
//! [`crate::admission`]), tunnels it between node proxies over mutual TLS ([`hbone`]) or
//! forwards it ([`socket`]) or, to a pod it also serves, delivers it without a tunnel
//! ([`same_node`]), and copies bytes both ways ([`forward`], [`copy`], bulk relays on
//! a lane of their own, [`lanes`]) or serves it
//! request by request where policies look at HTTP ([`l7`]), recording it in
//! [`connections`].

pub mod connections;
pub mod copy;
pub mod entry;
pub mod forward;
pub mod hbone;
pub mod inbound;
pub mod l7;
pub mod lanes;
pub mod limits;
pub mod outbound;
pub mod same_node;
pub mod socket;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, sync::OnceCell};
use tracing::{debug, warn};

use crate::{
    identity::{SecretManager, SpiffeId},
    netns::PodNetns,
    redirect::OrigDstTable,
    state::AppliedRx,
    tls::MeshAcceptor,
};
use connections::{ConnectionLog, WorkloadStats};
use limits::{Descriptors, GaugePermit, Limits, WorkloadCounters};
use socket::ProxyStream;

/// What every listener of one enrolled pod needs to know about it. Only what cannot change
/// without re-enrolling the pod: its labels, and so the policies that select it, are read
/// from the configuration in force at each decision.
pub struct PodProxy {
    /// `namespace/name`.
    pub key: String,
    /// Every address of the pod (`status.podIPs`), the primary first.
    pub ips: Vec<IpAddr>,
    pub identity: SpiffeId,
    pub netns: PodNetns,
    pub netns_cookie: u64,
    pub stats: Arc<WorkloadStats>,
    /// What the pod's peers and applications hold, against [`Limits`].
    pub counters: WorkloadCounters,
    /// The TLS server side of this pod, built on the first HBONE connection (it waits for
    /// the pod's first certificate).
    pub acceptor: OnceCell<MeshAcceptor>,
}

impl PodProxy {
    /// The pod's address that a connection to `peer` goes out from: the one of `peer`'s
    /// family, or the primary one for a pod without an address of that family.
    pub fn ip_toward(&self, peer: IpAddr) -> IpAddr {
        let same_family = |ip: &&IpAddr| ip.is_ipv4() == peer.to_canonical().is_ipv4();
        // A pod is enrolled with at least one address: `peer` is never the answer.
        let ip = self.ips.iter().find(same_family).or(self.ips.first());
        ip.copied().unwrap_or(peer)
    }
}

/// What every listener of the node shares.
#[derive(Clone)]
pub struct Shared {
    pub orig_dst: OrigDstTable,
    pub connections: Arc<ConnectionLog>,
    pub applied: AppliedRx,
    pub identities: SecretManager,
    pub pool: hbone::client::Pool,
    /// The pods this agent serves, for the same-node shortcut.
    pub local: same_node::LocalPods,
    pub limits: Arc<Limits>,
    pub descriptors: Descriptors,
    /// Where relays run: bulk ones apart, so they do not delay everyone else's.
    pub lanes: lanes::Lanes,
    /// Started when the agent hands its listeners over or is told to stop.
    pub drain: crate::drain::DrainWatch,
}

/// A connection one of a pod's listeners accepted.
pub struct Accepted {
    pub stream: ProxyStream,
    pub peer: SocketAddr,
    /// The descriptor `stream` holds, counted against the node's budget.
    pub descriptor: GaugePermit,
}

/// Accepts on `listener` until it is dropped (the pod's tasks are aborted) and hands each
/// connection to `handle` on its own task. Past the node's descriptor budget a connection
/// is reset at once: the reserve stays for the agent's own work.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    role: &'static str,
    pod: Arc<PodProxy>,
    shared: Shared,
    handle: F,
) where
    F: Fn(Accepted, Arc<PodProxy>, Shared) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let peer = socket::canonical(peer);
                let stream = ProxyStream::new(stream);
                // Small writes (a TLS record, a 1-byte reply) go out at once: with Nagle's
                // algorithm a second small write waits for the peer's delayed ACK, up to
                // 40 ms per short connection.
                if let Err(error) = stream.set_nodelay(true) {
                    debug!(workload = %pod.key, role, %peer, %error, "cannot set TCP_NODELAY");
                }
                let descriptor = match shared.descriptors.acquire() {
                    Ok(descriptor) => descriptor,
                    Err(exceeded) => {
                        debug!(workload = %pod.key, role, %peer, %exceeded, "connection reset");
                        stream.reset();
                        continue;
                    }
                };
                let accepted = Accepted {
                    stream,
                    peer,
                    descriptor,
                };
                tokio::spawn(handle(accepted, Arc::clone(&pod), shared.clone()));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(workload = %pod.key, role, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
