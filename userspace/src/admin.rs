//! The admin API (JSON, localhost only) and the readiness endpoint.
//!
//! `/ui`: a page that draws what the JSON endpoints below report as a live graph ([`ui`]).
//!
//! `/workloads`: every known pod with its IP, identity, enrollment and redirection state
//! and counters. `/connections`: live connections and recently closed ones. `/certs`: the
//! certificate of every identity on the node. `/explain?from=NS/POD&to=NS/POD&port=N…`:
//! the policy decision for a connection or request, as `ambit explain` gives it.
//! Readiness (`/healthz/ready`) answers 200 once the first configuration has been applied
//! and this process serves every enrolled pod of the node but those that cannot be served
//! for a reason of their own ([`crate::workloads::Failure`]), and until it drains;
//! otherwise 503. Either way the
//! body says which pods are not served and why.

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
use serde::Serialize;
use tokio::net::TcpListener;

mod ui;

use crate::{
    explain::{self as policy_explain, ExplainArgs},
    identity::{CertsReport, SecretManager},
    proxy::connections::ConnectionLog,
    state::AppliedRx,
    workloads::{Redirection, WorkloadStatus, WorkloadTable},
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

/// What the readiness endpoint reads.
#[derive(Clone)]
pub struct ReadinessState {
    /// Set once the first configuration has been applied.
    pub configured: Arc<AtomicBool>,
    pub draining: crate::drain::DrainWatch,
    pub workloads: WorkloadTable,
}

/// The body of `/healthz/ready`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// False until the first configuration has been applied.
    pub configured: bool,
    /// True once the agent drains (stopped, or handed over to the next agent).
    pub draining: bool,
    /// Enrolled pods of this node this process does not serve for a reason of its own
    /// (their ports held by another process, say): each makes it not ready.
    pub unserved: Vec<PodFailure>,
    /// Enrolled pods held closed for a reason of their own (no network namespace, say):
    /// reported, but no agent could serve them, so they leave readiness alone.
    pub held_closed: Vec<PodFailure>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct PodFailure {
    /// `namespace/name`.
    pub workload: String,
    pub reason: String,
}

impl Readiness {
    pub fn of<'a>(
        configured: bool,
        draining: bool,
        workloads: impl IntoIterator<Item = &'a WorkloadStatus>,
    ) -> Self {
        let (mut unserved, mut held_closed) = (Vec::new(), Vec::new());
        for status in workloads {
            let Redirection::Failed(failure) = &status.redirection else {
                continue;
            };
            let pod = PodFailure {
                workload: format!("{}/{}", status.namespace, status.name),
                reason: failure.reason.clone(),
            };
            match failure.lies_with_pod {
                true => held_closed.push(pod),
                false => unserved.push(pod),
            }
        }
        Self {
            ready: configured && !draining && unserved.is_empty(),
            configured,
            draining,
            unserved,
            held_closed,
        }
    }
}

pub async fn serve_readiness(listener: TcpListener, state: ReadinessState) -> std::io::Result<()> {
    let app = Router::new().route(
        "/healthz/ready",
        get(move || async move {
            let readiness = {
                let table = state.workloads.read().unwrap_or_else(|e| e.into_inner());
                Readiness::of(
                    state.configured.load(Ordering::Acquire),
                    state.draining.is_draining(),
                    table.values(),
                )
            };
            let status = match readiness.ready {
                true => StatusCode::OK,
                false => StatusCode::SERVICE_UNAVAILABLE,
            };
            (status, Json(readiness))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::Failure;

    fn pod(name: &str, redirection: Redirection) -> WorkloadStatus {
        WorkloadStatus {
            namespace: "foo".into(),
            name: name.into(),
            ip: None,
            ips: Vec::new(),
            identity: String::new(),
            enrolled: true,
            redirection,
            stats: Arc::default(),
        }
    }

    fn failed(reason: &str, lies_with_pod: bool) -> Redirection {
        Redirection::Failed(Failure {
            reason: reason.into(),
            lies_with_pod,
        })
    }

    fn failure(workload: &str, reason: &str) -> PodFailure {
        PodFailure {
            workload: workload.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn ready_once_configured_and_serving_every_pod_it_can() {
        let served = [
            pod("a", Redirection::Redirected),
            pod("b", Redirection::NotEnrolled),
        ];
        assert!(
            !Readiness::of(false, false, &served).ready,
            "not configured yet"
        );
        assert!(Readiness::of(true, false, &served).ready);
        assert!(!Readiness::of(true, true, &served).ready, "draining");

        let no_netns = [
            pod("a", Redirection::Redirected),
            pod("b", failed("no netns", true)),
        ];
        let readiness = Readiness::of(true, false, &no_netns);
        assert!(readiness.ready, "a pod no agent could serve: {readiness:?}");
        assert_eq!(readiness.held_closed, [failure("foo/b", "no netns")]);

        let ports_taken = [
            pod("a", failed("address in use", false)),
            pod("b", failed("no netns", true)),
        ];
        assert_eq!(
            Readiness::of(true, false, &ports_taken),
            Readiness {
                ready: false,
                configured: true,
                draining: false,
                unserved: vec![failure("foo/a", "address in use")],
                held_closed: vec![failure("foo/b", "no netns")],
            }
        );
    }
}
