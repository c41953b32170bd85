//! The admin API's picture of the mesh: `GET /ui` serves one self-contained page
//! (`ui.html`: inline CSS and JS, nothing loaded from anywhere, locked down by its
//! Content-Security-Policy) that polls `GET /ui/graph`, the JSON graph that [`graph`]
//! builds from the connection log, the workload table, the certificates and the
//! configuration in force. The page only draws: every count, mark and name is decided
//! here, so its script stays small.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::LazyLock,
};

use axum::{
    Json, Router,
    extract::State,
    http::header,
    response::{IntoResponse, Response},
    routing::get,
};
use base64::Engine as _;
use serde::Serialize;

use super::AdminState;
use crate::{
    identity::CertsReport,
    policy::resolve::Effect,
    proxy::connections::{ConnectionRecord, ConnectionsReport, Direction},
    state::Applied,
    workloads::{Redirection, WorkloadStatus},
};

const PAGE: &str = include_str!("ui.html");

/// Decisions listed per edge, newest first.
const DECISIONS_KEPT: usize = 20;

/// The page's policy: nothing but its own inline script and style (by hash, so no
/// injected markup could run), and fetches of its own origin.
static CONTENT_SECURITY_POLICY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
         img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        sha256_source(element_text(PAGE, "script")),
        sha256_source(element_text(PAGE, "style")),
    )
});

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/ui", get(page))
        .route("/ui/graph", get(graph_json))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                CONTENT_SECURITY_POLICY.as_str(),
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

async fn graph_json(State(state): State<AdminState>) -> Json<Graph> {
    let connections = state.connections.report();
    let certs = state.identities.certs_report();
    let applied = state.applied.borrow().clone();
    let workloads = state.workloads.read().unwrap_or_else(|e| e.into_inner());
    Json(graph(&workloads, &connections, &certs, &applied))
}

/// The workloads this agent serves and every endpoint they exchanged connections with,
/// and one edge per (source, destination, mTLS or not).
#[derive(Debug, Serialize)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

#[derive(Debug, Serialize)]
pub struct Node {
    /// `namespace/name` of a pod, or the IP of anything else.
    pub id: String,
    pub kind: NodeKind,
    pub ip: Option<IpAddr>,
    pub identity: Option<String>,
    pub redirection: Option<Redirection>,
    /// The certificate of its identity, on a pod this agent serves.
    pub certificate: Option<Certificate>,
    /// The policies that apply to it in the configuration in force (enrolled pods).
    pub policies: Vec<EffectivePolicy>,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A pod this agent serves.
    Local,
    /// A known pod that this agent does not serve (not enrolled, or on another node).
    Peer,
    /// An address no known pod has.
    Address,
}

#[derive(Debug, Serialize)]
pub struct Certificate {
    /// As `/certs` says it: `requesting`, `valid`, `refreshing` or `backoff …`.
    pub state: String,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct EffectivePolicy {
    /// `namespace/name`.
    pub policy: String,
    #[serde(flatten)]
    pub effect: Effect,
}

#[derive(Debug, Default, Serialize)]
pub struct Edge {
    /// `source>destination>mtls|plaintext`: stable across polls.
    pub id: String,
    pub source: String,
    pub destination: String,
    /// Carried as mutual TLS (HBONE) rather than plaintext.
    pub mtls: bool,
    pub connections: u64,
    /// Of those, still open.
    pub live: u64,
    /// Authorization decisions, per connection and per request.
    pub allowed: u64,
    pub denied: u64,
    /// Client to destination.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The latest decisions, newest first.
    pub decisions: Vec<DecisionView>,
}

#[derive(Debug, Serialize)]
pub struct DecisionView {
    /// When its connection closed, or opened if still open (milliseconds since the epoch).
    pub time_ms: u64,
    pub allowed: bool,
    /// `namespace/name` of the deciding policy.
    pub policy: Option<String>,
    /// The index of the deciding rule in that policy.
    pub rule: Option<usize>,
    /// `METHOD path → status` of a request's decision; absent for a connection's.
    pub request: Option<String>,
    /// Why, in words: the request's reason, or the connection's error.
    pub reason: Option<String>,
}

/// Builds the graph. A connection between two pods of this node is recorded twice (by
/// the client's outbound listener and the server's inbound one): it is counted once, from
/// the inbound record, which carries the decision. An outbound record counts only when
/// its destination is no pod this agent serves (elsewhere, outside the mesh, a Service).
pub fn graph(
    workloads: &BTreeMap<String, WorkloadStatus>,
    connections: &ConnectionsReport,
    certs: &CertsReport,
    applied: &Applied,
) -> Graph {
    let by_ip: HashMap<IpAddr, (&String, &WorkloadStatus)> = workloads
        .iter()
        .flat_map(|(key, status)| status.ips.iter().map(move |&ip| (ip, (key, status))))
        .collect();
    let endpoint = |ip: IpAddr| match by_ip.get(&ip) {
        Some((key, _)) => (*key).clone(),
        None => ip.to_string(),
    };
    let local_ip = |ip: IpAddr| by_ip.get(&ip).is_some_and(|(_, s)| served_here(s));

    let mut edges: BTreeMap<(String, String, bool), Edge> = BTreeMap::new();
    let records = connections.closed.iter().map(|r| (r, false));
    for (record, live) in records.chain(connections.live.iter().map(|r| (r, true))) {
        if record.direction == Direction::Outbound && local_ip(record.destination.ip()) {
            continue;
        }
        let mtls = record.path.authenticated();
        let source = endpoint(record.source.ip());
        let destination = endpoint(record.destination.ip());
        let edge = edges
            .entry((source.clone(), destination.clone(), mtls))
            .or_insert_with(|| Edge {
                id: format!(
                    "{source}>{destination}>{}",
                    if mtls { "mtls" } else { "plaintext" }
                ),
                source,
                destination,
                mtls,
                ..Edge::default()
            });
        edge.add(record, live);
    }
    let mut edges: Vec<Edge> = edges.into_values().collect();
    for edge in &mut edges {
        edge.decisions.sort_by_key(|d| std::cmp::Reverse(d.time_ms));
        edge.decisions.truncate(DECISIONS_KEPT);
    }

    let mut ids: Vec<&String> = workloads
        .iter()
        .filter(|(_, status)| served_here(status))
        .map(|(key, _)| key)
        .chain(edges.iter().flat_map(|e| [&e.source, &e.destination]))
        .collect();
    ids.sort();
    ids.dedup();
    let nodes = ids
        .into_iter()
        .map(|id| node(id, workloads.get(id), certs, applied))
        .collect();
    Graph { nodes, edges }
}

impl Edge {
    fn add(&mut self, record: &ConnectionRecord, live: bool) {
        self.connections += 1;
        self.live += u64::from(live);
        self.bytes_sent += record.bytes_sent;
        self.bytes_received += record.bytes_received;
        let time_ms = record.closed_ms.unwrap_or(record.opened_ms);
        if let Some(decided) = &record.decision {
            self.count(decided.allowed);
            self.decisions.push(DecisionView {
                time_ms,
                allowed: decided.allowed,
                policy: decided.policy.clone(),
                rule: decided.rule,
                request: None,
                reason: record.error.clone(),
            });
        }
        for request in &record.requests {
            self.count(request.allowed);
            self.decisions.push(DecisionView {
                time_ms,
                allowed: request.allowed,
                policy: request.policy.clone(),
                rule: request.rule,
                request: Some(format!(
                    "{} {} → {}",
                    request.method, request.path, request.status
                )),
                reason: Some(request.reason.clone()),
            });
        }
    }

    fn count(&mut self, allowed: bool) {
        if allowed {
            self.allowed += 1;
        } else {
            self.denied += 1;
        }
    }
}

fn node(id: &str, status: Option<&WorkloadStatus>, certs: &CertsReport, applied: &Applied) -> Node {
    let Some(status) = status else {
        return Node {
            id: id.to_owned(),
            kind: NodeKind::Address,
            ip: id.parse().ok(),
            identity: None,
            redirection: None,
            certificate: None,
            policies: Vec::new(),
        };
    };
    let local = served_here(status);
    let certificate = certs
        .identities
        .iter()
        .find(|c| local && c.identity.to_string() == status.identity)
        .map(|c| Certificate {
            state: c.state.clone(),
            not_before: c.not_before.clone(),
            not_after: c.not_after.clone(),
        });
    let policies = applied
        .served(id, &status.ips)
        .map(|served| {
            applied
                .policies
                .resolve(&served.workload)
                .effective()
                .map(|(effect, policy)| EffectivePolicy {
                    policy: policy.to_string(),
                    effect,
                })
                .collect()
        })
        .unwrap_or_default();
    Node {
        id: id.to_owned(),
        kind: if local {
            NodeKind::Local
        } else {
            NodeKind::Peer
        },
        ip: status.ip,
        identity: status.enrolled.then(|| status.identity.clone()),
        redirection: Some(status.redirection.clone()),
        certificate,
        policies,
    }
}

/// An enrolled pod of this node (redirected, or being retried after a failure).
fn served_here(status: &WorkloadStatus) -> bool {
    matches!(
        status.redirection,
        Redirection::Redirected | Redirection::Failed(_)
    )
}

/// The text of the page's one `<tag>` element, as the browser hashes it.
fn element_text<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let start = page.find(&open).map(|i| i + open.len());
    let end = page.find(&format!("</{tag}>"));
    match (start, end) {
        (Some(start), Some(end)) if start <= end => &page[start..end],
        // `ui.html` has both elements (a unit test says so); an empty hash would only
        // block the page's own script or style, never let another run.
        _ => "",
    }
}

/// A CSP hash source: `sha256-<base64 of the digest>`.
fn sha256_source(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

#[cfg(test)]
mod tests;
