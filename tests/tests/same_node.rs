//! End to end: the same-node shortcut. A connection between two pods the agent serves
//! (`foo/sleep` → `bar/httpbin` on one node) is decided by the destination's own
//! admission (identity, PeerAuthentication, authorization, per request where a policy
//! looks at HTTP), recorded at both ends, delivered with the client's IP, re-checked when
//! policies change, and never crosses the wire as HBONE; with
//! `--same-node-shortcut=false` it is HBONE again.

use std::time::{Duration, Instant};

use ambit_tests::{
    AgentOptions, CurlResult,
    mesh::{
        BAR, FOO, LEGACY, Mesh,
        policies::{DENY_BAR, DENY_FOO_IN_BAR, MESH_STRICT, get_not_admin},
        within,
    },
    pcap_packets,
    probe::Held,
};
use serde_json::Value;

fn mesh() -> Mesh {
    Mesh::new(ambit_tests::test_binaries!()).expect("mesh")
}

/// curl from the `sleep` of `from` to the `httpbin` of `to` on `path`.
fn curl(mesh: &Mesh, from: usize, to: usize, path: &str) -> CurlResult {
    mesh.node
        .curl(Some(&mesh.sleep[from]), &mesh.url(to, path))
        .expect("curl")
}

/// Packets to or from port 15008 on `bar/httpbin`'s veth while `send` runs.
fn hbone_packets(mesh: &mut Mesh, send: impl FnOnce(&Mesh)) -> usize {
    let server = mesh.httpbin[BAR].clone();
    let capture = mesh
        .node
        .capture_matching(&server, &["tcp", "port", "15008"])
        .unwrap();
    send(mesh);
    pcap_packets(&capture.finish().unwrap())
}

/// The last connection recorded for `workload` in `direction`.
fn last(mesh: &Mesh, workload: &str, direction: &str) -> Value {
    let recorded = mesh.recorded(workload, direction).unwrap();
    recorded.last().cloned().unwrap_or_default()
}

/// Waits (config changes apply within a second) until `from` → `to` answers `code`.
fn until_code(mesh: &Mesh, from: usize, to: usize, code: u16) {
    let mut seen = None;
    let reached = within(Duration::from_secs(3), || {
        let result = curl(mesh, from, to, "/ip");
        let done = result.code == code;
        seen = Some(result);
        done
    });
    assert!(reached.is_some(), "{from} → {to}: wanted {code}, {seen:?}");
}

#[test]
fn a_same_node_connection_skips_the_tunnel_and_keeps_the_client_ip() {
    let mut mesh = mesh();
    let mut result = None;
    let packets = hbone_packets(&mut mesh, |mesh| {
        result = Some(curl(mesh, FOO, BAR, "/ip"));
    });
    let result = result.unwrap();
    assert_eq!(result.code, 200, "{result:?}");
    let body: Value = serde_json::from_str(&result.body).unwrap();
    assert_eq!(body["origin"], mesh.sleep[FOO].ip.to_string());
    assert_eq!(packets, 0, "no HBONE on the wire");

    // Both ends recorded, as on HBONE; the client side's record closes once the
    // destination side's has.
    let mut outbound = Value::Null;
    let closed = within(Duration::from_secs(3), || {
        outbound = last(&mesh, "foo/sleep", "outbound");
        !outbound["closed_ms"].is_null()
    });
    assert!(closed.is_some(), "{outbound:#}");
    let inbound = last(&mesh, "bar/httpbin", "inbound");
    assert_eq!(outbound["path"], "same-node", "{outbound:#}");
    assert_eq!(inbound["path"], "same-node-inbound", "{inbound:#}");
    assert_eq!(outbound["trace_id"], inbound["trace_id"]);
    assert!(outbound["trace_id"].is_string(), "{outbound:#}");
    for record in [&outbound, &inbound] {
        assert_eq!(record["close_reason"], "done", "{record:#}");
        assert!(record["bytes_sent"].as_u64() > Some(0), "{record:#}");
        assert!(record["bytes_received"].as_u64() > Some(0), "{record:#}");
    }
    assert_eq!(outbound["bytes_received"], inbound["bytes_received"]);
    assert_eq!(inbound["decision"], "allow", "{inbound:#}");

    // Reported by both ends, with both identities, as `mutual_tls` (README says why).
    let metrics = mesh.node.agent().unwrap().metrics_text().unwrap();
    for reporter in ["source", "destination"] {
        let wanted = [
            format!("reporter=\"{reporter}\""),
            "source_principal=\"spiffe://cluster.local/ns/foo/sa/sleep\"".to_owned(),
            "destination_principal=\"spiffe://cluster.local/ns/bar/sa/httpbin\"".to_owned(),
            "connection_security_policy=\"mutual_tls\"".to_owned(),
        ];
        let counted = metrics.lines().any(|line| {
            line.starts_with("istio_tcp_connections_opened_total{")
                && wanted.iter().all(|label| line.contains(label.as_str()))
        });
        assert!(
            counted,
            "no {reporter} series with {wanted:?} in\n{metrics}"
        );
    }
}

#[test]
fn switched_off_same_node_traffic_goes_over_hbone() {
    let options = AgentOptions::args(&["--same-node-shortcut=false"]);
    let mut mesh = Mesh::with_agent(ambit_tests::test_binaries!(), &options).expect("mesh");
    let mut code = 0;
    let packets = hbone_packets(&mut mesh, |mesh| code = curl(mesh, FOO, BAR, "/ip").code);
    assert_eq!(code, 200);
    assert!(packets > 0, "the capture must see the HBONE exchange");
    assert_eq!(last(&mesh, "foo/sleep", "outbound")["path"], "hbone");
    assert_eq!(
        last(&mesh, "bar/httpbin", "inbound")["path"],
        "hbone-inbound"
    );
}

#[test]
fn the_destinations_policies_refuse_as_on_hbone() {
    let mesh = mesh();
    mesh.node.write_file("deny.yaml", DENY_FOO_IN_BAR).unwrap();
    until_code(&mesh, FOO, BAR, 0);
    assert_eq!(
        curl(&mesh, BAR, BAR, "/ip").code,
        200,
        "bar itself is let in"
    );
    let refused = mesh.recorded("bar/httpbin", "inbound").unwrap();
    let denial = refused
        .iter()
        .find(|c| c["close_reason"] == "denied")
        .unwrap_or_else(|| panic!("{refused:#?}"));
    assert_eq!(denial["path"], "same-node-inbound");
    assert_eq!(denial["policy"], "bar/deny-foo");
    let outbound = mesh.recorded("foo/sleep", "outbound").unwrap();
    assert!(
        outbound
            .iter()
            .any(|c| c["path"] == "same-node" && c["close_reason"] == "denied"),
        "{outbound:#?}"
    );
    mesh.node.remove_file("deny.yaml").unwrap();

    // STRICT still refuses a plaintext client, and admits the mesh's on the shortcut.
    mesh.node
        .write_file("peer-authn.yaml", MESH_STRICT)
        .unwrap();
    until_code(&mesh, LEGACY, FOO, 0);
    assert_eq!(curl(&mesh, FOO, BAR, "/ip").code, 200);
    assert_eq!(last(&mesh, "foo/sleep", "outbound")["path"], "same-node");
}

#[test]
fn l7_policies_decide_each_request_on_the_shortcut() {
    let mesh = mesh();
    mesh.node
        .write_file("policy.yaml", &get_not_admin("bar"))
        .unwrap();
    let denied = within(Duration::from_secs(3), || {
        curl(&mesh, FOO, BAR, "/admin").code == 403
    });
    assert!(denied.is_some(), "the policy was not applied");
    let allowed = curl(&mesh, FOO, BAR, "/headers");
    assert_eq!(allowed.code, 200, "{allowed:?}");
    let body: Value = serde_json::from_str(&allowed.body).unwrap();
    let xfcc = body["headers"]["x-forwarded-client-cert"]
        .as_str()
        .unwrap_or_default();
    assert!(
        xfcc.starts_with("By=spiffe://cluster.local/ns/bar/sa/httpbin;Hash=")
            && xfcc.ends_with(";URI=spiffe://cluster.local/ns/foo/sa/sleep"),
        "{body:#}"
    );
    let inbound = mesh.recorded("bar/httpbin", "inbound").unwrap();
    let decided: Vec<(&Value, &Value)> = inbound
        .iter()
        .filter(|c| c["path"] == "same-node-inbound")
        .flat_map(|c| c["requests"].as_array().into_iter().flatten())
        .map(|r| (&r["path"], &r["status"]))
        .collect();
    assert!(
        decided.contains(&(&Value::from("/admin"), &Value::from(403)))
            && decided.contains(&(&Value::from("/headers"), &Value::from(200))),
        "{inbound:#?}"
    );
}

#[test]
fn a_policy_change_closes_a_live_shortcut_connection() {
    const PORT: u16 = 9100;
    let mut mesh = mesh();
    let server = mesh.httpbin[FOO].clone();
    mesh.node.serve_hold(&server, PORT).unwrap();
    // bar/sleep holds a connection to foo/httpbin open, every hop up (one byte echoed).
    let target = format!("{}:{PORT}", server.ip);
    let mut held = Held::start(
        &mesh.node,
        &mesh.sleep[BAR],
        &["open", &target, "1", "--echo", "--hold-seconds", "12"],
    );
    let opened = held.next_line();
    let since_open = Instant::now();
    assert_eq!(opened["echoed"], 1, "{opened}");
    let live = mesh.recorded("foo/httpbin", "inbound").unwrap();
    assert!(
        live.iter()
            .any(|c| c["closed_ms"].is_null() && c["path"] == "same-node-inbound"),
        "{live:#?}"
    );

    mesh.node.write_file("deny.yaml", DENY_BAR).unwrap();
    let written_ms = since_open.elapsed().as_millis();
    let done = held.next_line();
    let closed_ms = done["last_closed_ms"].as_u64().map(u128::from);
    assert!(
        done["closed"] == 1 && closed_ms.is_some_and(|ms| ms < written_ms + 2000),
        "the held connection must be closed within 2 s of the policy (at {written_ms} ms): {done}"
    );
    // Both ends' records say why (the client side's is closed just after the other's).
    let denied = |workload: &str, direction: &str, path: &str| {
        let mut records = Vec::new();
        let mut found = None;
        within(Duration::from_secs(1), || {
            records = mesh.recorded(workload, direction).unwrap();
            found = records
                .iter()
                .find(|c| c["path"] == path && c["close_reason"] == "denied")
                .cloned();
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("{records:#?}"))
    };
    let inbound = denied("foo/httpbin", "inbound", "same-node-inbound");
    assert_eq!(inbound["policy"], "foo/deny-bar", "{inbound:#}");
    denied("bar/sleep", "outbound", "same-node");
}
