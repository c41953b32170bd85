use std::{collections::VecDeque, net::SocketAddr, sync::Arc};

use super::*;
use crate::{
    discovery::files::snapshot_of,
    identity::{SpiffeId, manager::IdentityReport},
    policy::model::Action,
    proxy::connections::{CloseReason, Decided, Path, RequestRecord},
    state::PolicySettings,
};

const CONFIG: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {ambit.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bar, labels: {ambit.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: foo}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: bar}
status: {podIP: 10.0.0.2}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-foo, namespace: bar}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["foo"]}}]
"#;

fn status(key: &str, ip: &str, redirection: Redirection) -> (String, WorkloadStatus) {
    let (namespace, name) = key.split_once('/').unwrap();
    let status = WorkloadStatus {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        ip: Some(ip.parse().unwrap()),
        ips: vec![ip.parse().unwrap()],
        identity: format!("spiffe://cluster.local/ns/{namespace}/sa/default"),
        enrolled: redirection != Redirection::NotEnrolled,
        redirection,
        stats: Arc::default(),
    };
    (key.to_owned(), status)
}

fn record(direction: Direction, path: Path, from: &str, to: &str) -> ConnectionRecord {
    let addr = |a: &str| a.parse::<SocketAddr>().unwrap();
    ConnectionRecord {
        id: 0,
        direction,
        path,
        workload: String::new(),
        source: addr(from),
        destination: addr(to),
        tunnel: Default::default(),
        opened_ms: 1_000,
        closed_ms: Some(2_000),
        bytes_sent: 100,
        bytes_received: 300,
        close_reason: Some(CloseReason::Done),
        error: None,
        decision: None,
        requests: VecDeque::new(),
    }
}

/// `foo/sleep` → `bar/httpbin` over HBONE (recorded at both ends, denied by
/// `bar/deny-foo`), `legacy/sleep` → `bar/httpbin` in plaintext (requests authorized one
/// by one) and `foo/sleep` → an address outside the mesh, still open.
fn scenario() -> Graph {
    let workloads = BTreeMap::from([
        status("foo/sleep", "10.0.0.1", Redirection::Redirected),
        status("bar/httpbin", "10.0.0.2", Redirection::Redirected),
        status("legacy/sleep", "10.0.0.3", Redirection::NotEnrolled),
    ]);
    let meshed = "10.0.0.1:40000";
    let mut denied = record(
        Direction::Inbound,
        Path::HboneInbound,
        meshed,
        "10.0.0.2:8000",
    );
    denied.decision = Some(Decided {
        allowed: false,
        policy: Some("bar/deny-foo".to_owned()),
        rule: Some(0),
    });
    denied.close_reason = Some(CloseReason::Denied);
    let mut requests = record(
        Direction::Inbound,
        Path::PlaintextInbound,
        "10.0.0.3:50000",
        "10.0.0.2:8000",
    );
    requests.requests = VecDeque::from([RequestRecord {
        method: "GET".to_owned(),
        path: "/ip".to_owned(),
        status: 200,
        allowed: true,
        policy: None,
        rule: None,
        reason: "no policy applies".to_owned(),
    }]);
    let mut outside = record(
        Direction::Outbound,
        Path::Plaintext,
        "10.0.0.1:40001",
        "192.0.2.7:443",
    );
    outside.closed_ms = None;
    let connections = ConnectionsReport {
        closed: vec![
            record(Direction::Outbound, Path::Hbone, meshed, "10.0.0.2:8000"),
            denied,
            requests,
        ],
        live: vec![outside],
    };
    let certs = CertsReport {
        identities: vec![IdentityReport {
            identity: SpiffeId::new("cluster.local", "bar", "default").unwrap(),
            pods: 1,
            state: "valid".to_owned(),
            serial: None,
            not_before: Some("2026-03-02T10:00:00Z".to_owned()),
            not_after: Some("2026-03-03T10:00:00Z".to_owned()),
            next_refresh: None,
            chain: Vec::new(),
            root_sha256: None,
        }],
    };
    let applied = Applied::new(
        snapshot_of(CONFIG),
        &PolicySettings::new("istio-system", "cluster.local"),
    );
    graph(&workloads, &connections, &certs, &applied)
}

fn edge<'a>(graph: &'a Graph, id: &str) -> &'a Edge {
    let found = graph.edges.iter().find(|e| e.id == id);
    found.unwrap_or_else(|| panic!("no edge {id} in {:?}", graph.edges))
}

#[test]
fn a_connection_between_two_pods_of_the_node_is_one_edge_with_the_inbound_decision() {
    let graph = scenario();
    let meshed = edge(&graph, "foo/sleep>bar/httpbin>mtls");
    assert!(meshed.mtls);
    assert_eq!(
        (meshed.connections, meshed.allowed, meshed.denied),
        (1, 0, 1)
    );
    assert_eq!((meshed.bytes_sent, meshed.bytes_received), (100, 300));
    let decision = &meshed.decisions[0];
    assert_eq!(decision.policy.as_deref(), Some("bar/deny-foo"));
    assert_eq!((decision.allowed, decision.rule), (false, Some(0)));
    assert_eq!(graph.edges.len(), 3, "{:?}", graph.edges);
}

#[test]
fn request_decisions_count_on_their_edge() {
    let graph = scenario();
    let plaintext = edge(&graph, "legacy/sleep>bar/httpbin>plaintext");
    assert!(!plaintext.mtls);
    assert_eq!((plaintext.allowed, plaintext.denied), (1, 0));
    assert_eq!(
        plaintext.decisions[0].request.as_deref(),
        Some("GET /ip → 200")
    );
}

#[test]
fn outbound_connections_leaving_the_node_are_edges_to_their_address() {
    let graph = scenario();
    let outside = edge(&graph, "foo/sleep>192.0.2.7>plaintext");
    assert_eq!((outside.connections, outside.live), (1, 1));
    assert!(outside.decisions.is_empty());
}

#[test]
fn nodes_are_the_served_pods_and_every_edge_end() {
    let graph = scenario();
    let kinds: Vec<(&str, NodeKind)> = graph.nodes.iter().map(|n| (&*n.id, n.kind)).collect();
    assert_eq!(
        kinds,
        [
            ("192.0.2.7", NodeKind::Address),
            ("bar/httpbin", NodeKind::Local),
            ("foo/sleep", NodeKind::Local),
            ("legacy/sleep", NodeKind::Peer),
        ]
    );
}

#[test]
fn a_served_pod_shows_its_certificate_and_effective_policies() {
    let graph = scenario();
    let httpbin = graph.nodes.iter().find(|n| n.id == "bar/httpbin").unwrap();
    let cert = httpbin.certificate.as_ref().expect("bar's certificate");
    assert_eq!(cert.not_after.as_deref(), Some("2026-03-03T10:00:00Z"));
    let policies: Vec<(&str, Effect)> = httpbin
        .policies
        .iter()
        .map(|p| (&*p.policy, p.effect))
        .collect();
    let deny = Effect::AuthorizationPolicy {
        action: Action::Deny,
        dry_run: false,
    };
    assert_eq!(policies, [("bar/deny-foo", deny)]);
    let sleep = graph.nodes.iter().find(|n| n.id == "foo/sleep").unwrap();
    assert!(sleep.certificate.is_none() && sleep.policies.is_empty());
}

#[test]
fn the_page_loads_nothing_from_outside_and_its_policy_allows_its_own_code() {
    assert!(
        !PAGE.contains("http://") && !PAGE.contains("https://"),
        "the page names an external URL"
    );
    for tag in ["script", "style"] {
        assert_eq!(PAGE.matches(&format!("<{tag}")).count(), 1, "one <{tag}>");
        assert!(
            !element_text(PAGE, tag).trim().is_empty(),
            "<{tag}> has text"
        );
    }
    let csp = CONTENT_SECURITY_POLICY.as_str();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'sha256-"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");
}
