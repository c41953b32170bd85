//! The admin API (JSON, localhost only) and the readiness endpoint.
//!
//! `/ui`: a page that draws what the JSON endpoints below report as a live graph ([`ui`]).
//!
//! `/workloads`: every known pod with its IP, identity, enrollment and redirection state
//! and counters. `/connections`: live connections and recently closed ones. `/certs`: the
//! certificate of every identity on the node. `/explain?from=NS/POD&to=NS/POD&port=N…`:
//! the policy decision for a connection or request, as `ambit explain` gives it.
//! Readiness (`/healthz/ready`) answers 200 once the first configuration has been applied.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

mod ui;

use crate::{
    explain::{self as policy_explain, ExplainArgs},
    identity::{CertsReport, SecretManager},
    proxy::connections::ConnectionLog,
    state::AppliedRx,
    workloads::WorkloadTable,
};

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
    pub identities: SecretManager,
    pub applied: AppliedRx,
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
        .route("/certs", get(certs))
        .route("/explain", get(explain))
        .merge(ui::routes())
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

async fn certs(State(state): State<AdminState>) -> Json<CertsReport> {
    Json(state.identities.certs_report())
}

/// The same answer as `ambit explain --output json`, for the configuration in force.
async fn explain(State(state): State<AdminState>, Query(args): Query<ExplainArgs>) -> Response {
    let applied = state.applied.borrow().clone();
    match policy_explain::explain(&applied, &args) {
        Ok(explanation) => Json(explanation).into_response(),
        Err(error) => (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response(),
    }
}
