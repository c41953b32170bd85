//! End to end, across two nodes (two agents on one layer-2 segment): the client proxy
//! checks that the server proxy presents the destination's identity (secure naming), and
//! that its certificate chains to the mesh root.

use std::ffi::OsStr;

use ambit_tests::{Node, Pod};
use serde_json::Value;

const PORT: u16 = 8000;

struct TwoNodes {
    /// Runs the client; its configuration says the server runs as `foo/httpbin`.
    a: Node,
    /// Runs the server.
    b: Node,
    client: Pod,
    server: Pod,
}

/// Node `a` with `foo/sleep`, node `b` with `foo/httpbin` running as `server_account`.
/// With `shared_root`, b's agent signs with a's CA root; otherwise it makes its own.
fn two_nodes(server_account: &str, shared_root: bool) -> TwoNodes {
    let binaries = ambit_tests::test_binaries!();
    let mut a = Node::new(binaries).unwrap();
    let mut b = a.join().unwrap();
    a.namespace("foo", true).unwrap();
    b.namespace("foo", true).unwrap();
    let client = a
        .pod_with("foo", "sleep", "sleep", &[("app", "sleep")])
        .unwrap();
    let server = b
        .pod_with("foo", "httpbin", server_account, &[("app", "httpbin")])
        .unwrap();
    b.serve_http(&server, PORT).unwrap();
    a.learn(&server, Some("httpbin")).unwrap();
    b.learn(&client, None).unwrap();

    a.start_agent().unwrap();
    if shared_root {
        let ca = a.state_dir().join("ca");
        let (cert, key) = (ca.join("root-cert.pem"), ca.join("root-key.pem"));
        let args = [
            OsStr::new("--ca-cert"),
            cert.as_os_str(),
            OsStr::new("--ca-key"),
            key.as_os_str(),
        ];
        b.start_agent_with(&args).unwrap();
    } else {
        b.start_agent().unwrap();
    }
    TwoNodes {
        a,
        b,
        client,
        server,
    }
}

impl TwoNodes {
    fn curl(&self) -> ambit_tests::CurlResult {
        let url = format!("http://{}:{PORT}/ip", self.server.ip);
        self.a.curl(Some(&self.client), &url).unwrap()
    }

    /// The client proxy's record of its outbound connections.
    fn outbound(&self) -> Vec<Value> {
        let report = self.a.agent().unwrap().admin_get("/connections").unwrap();
        ["live", "closed"]
            .iter()
            .flat_map(|k| report[*k].as_array().cloned().unwrap_or_default())
            .filter(|c| c["direction"] == "outbound")
            .collect()
    }
}

#[test]
fn client_reaches_a_pod_on_another_node_over_hbone() {
    let nodes = two_nodes("httpbin", true);
    let result = nodes.curl();
    assert_eq!(result.code, 200, "{result:?}");
    assert!(
        result.body.contains(&nodes.client.ip.to_string()),
        "{result:?}"
    );
    let outbound = nodes.outbound();
    assert_eq!(outbound.len(), 1, "{outbound:#?}");
    assert_eq!(outbound[0]["path"], "hbone");
    let b_workloads = nodes.b.agent().unwrap().admin_get("/workloads").unwrap();
    let sleep = b_workloads
        .as_array()
        .and_then(|l| l.iter().find(|w| w["name"] == "sleep").cloned())
        .unwrap_or_default();
    assert_eq!(
        sleep["redirection"]["state"], "other-node",
        "{b_workloads:#}"
    );
}

#[test]
fn server_presenting_another_identity_is_refused_by_the_client_proxy() {
    let nodes = two_nodes("imposter", true);
    let result = nodes.curl();
    assert_eq!(
        result.code, 0,
        "the client must not reach an impostor: {result:?}"
    );
    let outbound = nodes.outbound();
    let error = outbound
        .first()
        .and_then(|c| c["error"].as_str())
        .unwrap_or_default();
    assert!(
        error.contains("spiffe://cluster.local/ns/foo/sa/imposter")
            && error.contains("not allowed"),
        "{outbound:#?}"
    );
}

#[test]
fn server_certificate_from_another_root_is_refused() {
    let nodes = two_nodes("httpbin", false);
    let result = nodes.curl();
    assert_eq!(result.code, 0, "{result:?}");
    let outbound = nodes.outbound();
    let error = outbound
        .first()
        .and_then(|c| c["error"].as_str())
        .unwrap_or_default();
    assert!(
        error.contains("TLS handshake failed: invalid peer certificate"),
        "{outbound:#?}"
    );
}
