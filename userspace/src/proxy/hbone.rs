//! Inbound HBONE (15008): where other mesh proxies will reach this pod over mutual TLS.
//!
//! The listener is opened and steered to now so the kernel path is complete; until the
//! mutual TLS data path lands every connection is recorded and refused with a reset, so
//! nothing reaches the application unauthenticated through this port.

use std::sync::Arc;

use tokio::net::TcpListener;

use super::{
    PodProxy, Shared,
    connections::{Direction, Path},
    forward,
};

pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>, shared: Shared) {
    super::accept_loop(
        listener,
        "hbone",
        pod,
        shared,
        |stream, peer, pod, shared| async move {
            let destination = stream.local_addr().unwrap_or(peer);
            let mut record = shared.connections.open(
                Direction::Inbound,
                Path::Hbone,
                &pod.workload,
                peer,
                destination,
                Arc::clone(&pod.stats),
            );
            record.finish(0, 0, Some("HBONE is not served yet".to_owned()));
            forward::reset(stream);
        },
    )
    .await
}
