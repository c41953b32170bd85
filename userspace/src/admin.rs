//! The admin API (JSON, localhost only) and the readiness endpoint.
//!
//! `/workloads`: every known pod with its IP, identity, enrollment and redirection state
//! and counters. `/connections`: live connections and recently closed ones.
//! Readiness (`/healthz/ready`) answers 200 once the first configuration has been applied.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use tokio::net::TcpListener;

use crate::{proxy::connections::ConnectionLog, workloads::WorkloadTable};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the admin API must listen on a loopback address, not {0}")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the admin API reads.
#[derive(Clone)]
pub struct AdminState {
    pub workloads: WorkloadTable,
    pub connections: Arc<ConnectionLog>,
    pub ready: Arc<AtomicBool>,
}

/// Binds the admin listener. Refuses anything but a loopback address: the API shows
/// identities and connections of every pod on the node.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    if !addr.ip().is_loopback() {
        return Err(AdminError::NotLoopback(addr));
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })
}

pub async fn serve_admin(listener: TcpListener, state: AdminState) -> std::io::Result<()> {
    let app = Router::new()
        .route("/workloads", get(workloads))
        .route("/connections", get(connections))
        .with_state(state);
    axum::serve(listener, app).await
}

pub async fn serve_readiness(listener: TcpListener, ready: Arc<AtomicBool>) -> std::io::Result<()> {
    let app = Router::new().route(
        "/healthz/ready",
        get(move || async move {
            if ready.load(Ordering::Acquire) {
                (StatusCode::OK, "ready\n")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }),
    );
    axum::serve(listener, app).await
}

async fn workloads(State(state): State<AdminState>) -> Json<Vec<crate::workloads::WorkloadStatus>> {
    let table = state.workloads.read().unwrap_or_else(|e| e.into_inner());
    Json(table.values().cloned().collect())
}

async fn connections(
    State(state): State<AdminState>,
) -> Json<crate::proxy::connections::ConnectionsReport> {
    Json(state.connections.report())
}
