//! End to end: the mutual TLS data path and Istio's PeerAuthentication and
//! AuthorizationPolicy, step by step as in Istio's mutual TLS migration task, on a node with
//! `foo` and `bar` enrolled and `legacy` not.
//!
//! The policy matrices run with the agent's defaults, so enrolled pods of this one node
//! reach each other by the same-node shortcut (`same_node.rs` tests what sets it apart);
//! the tests of HBONE itself (encryption on the wire, the destination proxy's 503, many
//! streams over pooled connections, a Service's endpoint, the re-check of a live tunnel)
//! run with `--same-node-shortcut=false`, which sends same-node traffic over HBONE.

use std::time::Duration;

use ambit_tests::{
    AgentOptions,
    mesh::{
        BAR, FOO, FOO_HTTPBIN_SERVICE, HTTP_PORT, LEGACY, Mesh, OTHER_PORT, expect,
        policies::{
            ALLOW_BAR_SLEEP, DENY_BAR, FOO_HTTPBIN_8000_DISABLE, FOO_HTTPBIN_PERMISSIVE,
            FOO_STRICT, MESH_STRICT,
        },
        within,
    },
};
use serde_json::Value;

fn mesh() -> Mesh {
    let binaries = ambit_tests::test_binaries!();
    Mesh::new(binaries).expect("mesh")
}

/// The scenario with same-node traffic over HBONE, for the tests of HBONE itself.
fn hbone_mesh() -> Mesh {
    let options = AgentOptions::args(&["--same-node-shortcut=false"]);
    Mesh::with_agent(ambit_tests::test_binaries!(), &options).expect("mesh")
}

#[test]
fn without_policy_every_pair_answers_with_the_client_ip() {
    let mesh = mesh();
    let matrix = mesh.matrix(HTTP_PORT).unwrap();
    for (from, row) in matrix.iter().enumerate() {
        for (to, result) in row.iter().enumerate() {
            assert_eq!(result.code, 200, "from {from} to {to}: {result:?}");
            let body: Value = serde_json::from_str(&result.body).unwrap();
            assert_eq!(
                body["origin"],
                mesh.sleep[from].ip.to_string(),
                "from {from} to {to}"
            );
        }
    }
    let outbound = mesh.recorded("foo/sleep", "outbound").unwrap();
    let paths: Vec<&str> = outbound.iter().filter_map(|c| c["path"].as_str()).collect();
    assert_eq!(
        paths,
        ["same-node", "same-node", "plaintext"],
        "foo → foo, bar: the same-node shortcut; → legacy: plain"
    );
}

#[test]
fn traffic_between_enrolled_pods_is_encrypted_on_the_wire() {
    let mut mesh = hbone_mesh();
    // The capture sees plaintext where there is some: legacy → legacy crosses the veth bare.
    let (_, seen) = mesh.capture_request(LEGACY, LEGACY).unwrap();
    assert!(seen, "the capture must see plaintext traffic");
    let (captured, seen) = mesh.capture_request(FOO, BAR).unwrap();
    assert!(captured > 1000, "the HBONE exchange crossed the veth");
    assert!(!seen, "foo → bar crossed the wire in plaintext");
}

#[test]
fn mesh_wide_strict_refuses_plaintext_clients_only() {
    let mesh = mesh();
    mesh.node
        .write_file("peer-authn.yaml", MESH_STRICT)
        .unwrap();
    mesh.assert_matrix(HTTP_PORT, expect(&[(LEGACY, FOO), (LEGACY, BAR)]));
    mesh.assert_refused_saying("foo/httpbin", "STRICT");
}

#[test]
fn namespace_strict_refuses_plaintext_to_that_namespace_only() {
    let mesh = mesh();
    mesh.node.write_file("peer-authn.yaml", FOO_STRICT).unwrap();
    mesh.assert_matrix(HTTP_PORT, expect(&[(LEGACY, FOO)]));
}

#[test]
fn port_level_disable_reopens_one_port_under_namespace_strict() {
    let mesh = mesh();
    let policy = format!("{FOO_STRICT}---{FOO_HTTPBIN_8000_DISABLE}");
    mesh.node.write_file("peer-authn.yaml", &policy).unwrap();
    mesh.assert_matrix(OTHER_PORT, expect(&[(LEGACY, FOO)]));
    mesh.assert_matrix(HTTP_PORT, expect(&[]));
}

#[test]
fn workload_permissive_overrides_namespace_strict() {
    let mesh = mesh();
    mesh.node.write_file("peer-authn.yaml", FOO_STRICT).unwrap();
    mesh.assert_matrix(HTTP_PORT, expect(&[(LEGACY, FOO)]));
    mesh.node
        .write_file("workload-authn.yaml", FOO_HTTPBIN_PERMISSIVE)
        .unwrap();
    mesh.assert_matrix(HTTP_PORT, expect(&[]));
}

#[test]
fn authorization_allows_by_principal_denies_by_namespace_and_restores() {
    let mesh = mesh();
    mesh.node.write_file("allow.yaml", ALLOW_BAR_SLEEP).unwrap();
    mesh.assert_matrix(HTTP_PORT, expect(&[(FOO, FOO), (LEGACY, FOO)]));
    let denied = mesh.recorded("foo/httpbin", "inbound").unwrap();
    assert!(
        denied.iter().any(|c| c["error"]
            .as_str()
            .is_some_and(|e| e.contains("foo/allow-bar-sleep"))),
        "the refusal names the policy: {denied:#?}"
    );

    mesh.node.write_file("deny.yaml", DENY_BAR).unwrap();
    mesh.assert_matrix(HTTP_PORT, expect(&[(FOO, FOO), (BAR, FOO), (LEGACY, FOO)]));

    mesh.node.remove_file("allow.yaml").unwrap();
    mesh.node.remove_file("deny.yaml").unwrap();
    mesh.assert_matrix(HTTP_PORT, expect(&[]));
}

#[test]
fn a_connection_denied_by_a_later_policy_is_closed_within_a_second() {
    let mesh = hbone_mesh();
    // A long-lived connection from bar/sleep to foo/httpbin:9000: curl's telnet mode sends
    // nothing while its stdin stays open, and the server waits for a request.
    let mut cmd = mesh.node.command(&mesh.sleep[BAR], "curl");
    cmd.args([
        "-sS",
        "--max-time",
        "20",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .arg(format!("telnet://{}:{}", mesh.httpbin[FOO].ip, OTHER_PORT))
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    let mut client = cmd.spawn().unwrap();
    let live = within(Duration::from_secs(3), || {
        mesh.connections().unwrap().iter().any(|c| {
            c["workload"] == "foo/httpbin"
                && c["closed_ms"].is_null()
                && c["path"] == "hbone-inbound"
        })
    });
    assert!(live.is_some(), "the long-lived connection is open");

    mesh.node.write_file("deny.yaml", DENY_BAR).unwrap();
    let closed = within(Duration::from_millis(1500), || {
        mesh.connections().unwrap().iter().any(|c| {
            c["workload"] == "foo/httpbin"
                && c["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("foo/deny-bar"))
        })
    });
    let _ = client.kill();
    let _ = client.wait();
    assert!(closed.is_some(), "{:#?}", mesh.connections().unwrap());
    mesh.node.remove_file("deny.yaml").unwrap();
}

#[test]
fn a_service_address_reaches_its_enrolled_endpoint_over_hbone() {
    let mesh = hbone_mesh();
    mesh.node
        .write_file("service.yaml", FOO_HTTPBIN_SERVICE)
        .unwrap();
    let client = &mesh.sleep[BAR];
    let mut result = None;
    // Until the service is applied the address leads nowhere and curl times out (3 s).
    let reached = within(Duration::from_secs(7), || {
        let r = mesh
            .node
            .curl(Some(client), "http://10.96.0.10:80/ip")
            .unwrap();
        let ok = r.code == 200;
        result = Some(r);
        ok
    });
    assert!(reached.is_some(), "{result:?}");
    assert!(result.unwrap().body.contains(&client.ip.to_string()));
    let outbound = mesh.recorded("bar/sleep", "outbound").unwrap();
    let last = outbound.last().expect("recorded");
    assert_eq!(last["destination"], "10.96.0.10:80");
    assert_eq!(last["path"], "hbone");
}

#[test]
fn a_refusing_application_is_reported_as_503_by_the_destination_proxy() {
    let mesh = hbone_mesh();
    let url = format!("http://{}:7777/", mesh.httpbin[BAR].ip);
    let result = mesh.node.curl(Some(&mesh.sleep[FOO]), &url).unwrap();
    assert_eq!(result.code, 0, "nothing listens on 7777: {result:?}");
    let outbound = mesh.recorded("foo/sleep", "outbound").unwrap();
    let error = outbound
        .last()
        .and_then(|c| c["error"].as_str())
        .unwrap_or_default();
    assert!(error.contains("503"), "{outbound:#?}");
    let inbound = mesh.recorded("bar/httpbin", "inbound").unwrap();
    let error = inbound
        .last()
        .and_then(|c| c["error"].as_str())
        .unwrap_or_default();
    assert!(error.contains("refused"), "{inbound:#?}");
}

/// A destination proxy that refuses the pool's connection past its limit: the source's
/// record closes with `limit` and names the destination's flag, so that the operator of
/// the source sees which limit of which side refused.
#[test]
fn a_connection_the_destination_refuses_is_recorded_by_the_source_with_its_limit() {
    let options = AgentOptions::args(&[
        "--same-node-shortcut=false",
        "--max-hbone-connections-per-workload",
        "0",
    ]);
    let mesh = Mesh::with_agent(ambit_tests::test_binaries!(), &options).expect("mesh");
    let url = format!("http://{}:{HTTP_PORT}/ip", mesh.httpbin[BAR].ip);
    let result = mesh.node.curl(Some(&mesh.sleep[FOO]), &url).unwrap();
    assert_ne!(result.code, 200, "{result:?}");
    let outbound = mesh.recorded("foo/sleep", "outbound").unwrap();
    let last = outbound.last().cloned().unwrap_or_default();
    assert_eq!(last["close_reason"], "limit", "{outbound:#?}");
    let error = last["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("destination proxy refused")
            && error.contains("--max-hbone-connections-per-workload"),
        "{outbound:#?}"
    );
}

/// 250 connections need 3 pooled HBONE connections of 100 streams: with the server
/// allowing a peer exactly that many (`--max-hbone-connections-per-source 3`), all get
/// through and none is refused, so the pool never opens more than its streams need.
#[test]
fn more_connections_than_one_hbone_connection_carries_all_get_through() {
    use std::io::BufRead as _;
    const CONNECTIONS: u32 = 250;
    const PORT: u16 = 9100;
    let options = AgentOptions::args(&[
        "--same-node-shortcut=false",
        "--max-hbone-connections-per-source",
        "3",
    ]);
    let mut mesh = Mesh::with_agent(ambit_tests::test_binaries!(), &options).expect("mesh");
    let hold = mesh.node.binaries.hold.to_string_lossy().into_owned();
    let server = mesh.httpbin[BAR].clone();
    mesh.node
        .serve(
            &server,
            "prlimit",
            &["--nofile=4096", &hold, "serve", &PORT.to_string()],
            PORT,
        )
        .unwrap();
    let mut client = mesh
        .node
        .command(&mesh.sleep[FOO], "prlimit")
        .args(["--nofile=4096", &hold, "connect"])
        .arg(format!("{}:{PORT}", server.ip))
        .args([&CONNECTIONS.to_string(), "30"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let stdout = client.stdout.take().unwrap();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let live = mesh
        .recorded("foo/sleep", "outbound")
        .unwrap()
        .iter()
        .filter(|c| c["closed_ms"].is_null() && c["path"] == "hbone")
        .count();
    drop(client.stdin.take());
    let status = client.wait().unwrap();
    assert_eq!(line.trim(), format!("ready {CONNECTIONS}"), "{status}");
    assert_eq!(live, CONNECTIONS as usize);
    let metrics = mesh.node.agent().unwrap().metrics_text().unwrap();
    assert!(
        !metrics.contains("ambit_hbone_connections_refused_total{"),
        "{metrics}"
    );
}
