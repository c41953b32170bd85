//! The data path, top down: the kernel redirects a pod's connection (`redirect`), a
//! listener of that pod accepts it ([`outbound`], [`inbound`], [`hbone::server`]), the
//! proxy finds where it was going and whether it may ([`admission`]), tunnels it between
//! node proxies over mutual TLS ([`hbone`]) or forwards it ([`socket`]), and copies bytes
//! both ways ([`forward`], [`copy`]), recording it in [`connections`].

pub mod admission;
pub mod connections;
pub mod copy;
pub mod forward;
pub mod hbone;
pub mod inbound;
pub mod outbound;
pub mod socket;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::OnceCell,
};
use tracing::warn;

use crate::{
    identity::{SecretManager, SpiffeId},
    netns::PodNetns,
    policy::Workload,
    redirect::OrigDstTable,
    state::AppliedRx,
    tls::MeshAcceptor,
};
use connections::{ConnectionLog, WorkloadStats};

/// What every listener of one enrolled pod needs to know about it.
pub struct PodProxy {
    /// `namespace/name`.
    pub key: String,
    pub ip: IpAddr,
    pub identity: SpiffeId,
    /// The pod as policies select it.
    pub workload: Workload,
    pub netns: PodNetns,
    pub netns_cookie: u64,
    pub stats: Arc<WorkloadStats>,
    /// The TLS server side of this pod, built on the first HBONE connection (it waits for
    /// the pod's first certificate).
    pub acceptor: OnceCell<MeshAcceptor>,
}

/// What every listener of the node shares.
#[derive(Clone)]
pub struct Shared {
    pub orig_dst: OrigDstTable,
    pub connections: Arc<ConnectionLog>,
    pub applied: AppliedRx,
    pub identities: SecretManager,
    pub pool: hbone::client::Pool,
}

/// Accepts on `listener` until it is dropped (the pod's tasks are aborted) and hands each
/// connection to `handle` on its own task.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    role: &'static str,
    pod: Arc<PodProxy>,
    shared: Shared,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<PodProxy>, Shared) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer, Arc::clone(&pod), shared.clone()));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(workload = %pod.key, role, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
