//! The data path, top down: the kernel redirects a pod's connection (`redirect`), a
//! listener of that pod accepts it ([`outbound`], [`inbound`]), the proxy finds where it
//! was going, forwards it from inside the pod's namespace ([`socket`]) and copies bytes
//! both ways ([`forward`]), recording it in [`connections`].
//!
//! Today both hops are plaintext; mutual TLS (HBONE) replaces the pod-to-pod hop in
//! `outbound::handle` and [`hbone`] terminates it on the receiving side.

pub mod connections;
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

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::{netns::PodNetns, redirect::OrigDstTable};
use connections::{ConnectionLog, WorkloadStats};

/// What every listener of one enrolled pod needs to know about it.
#[derive(Debug)]
pub struct PodProxy {
    /// `namespace/name`.
    pub workload: String,
    pub ip: IpAddr,
    pub netns: PodNetns,
    pub netns_cookie: u64,
    pub stats: Arc<WorkloadStats>,
}

/// What every listener of the node shares.
#[derive(Clone)]
pub struct Shared {
    pub orig_dst: OrigDstTable,
    pub connections: Arc<ConnectionLog>,
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
                warn!(workload = %pod.workload, role, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
