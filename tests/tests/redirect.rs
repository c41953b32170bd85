//! End to end: in-pod redirection with the real kernel programs, the real agent and real
//! clients, on a node built from network namespaces. Run as root (`cargo xtask test`).

use std::time::Duration;

use ambit_tests::{
    Binaries,
    mesh::{BAR, FOO, HTTP_PORT, LEGACY, Mesh, within},
};
use serde_json::Value;

fn binaries() -> Binaries {
    ambit_tests::test_binaries!()
}

fn mesh() -> Mesh {
    Mesh::new(binaries()).expect("mesh")
}

#[test]
fn enrolled_client_goes_through_the_proxy_and_server_sees_its_ip() {
    let mesh = mesh();
    let client = &mesh.sleep[FOO];
    let result = mesh.node.curl(Some(client), &mesh.url(BAR, "/ip")).unwrap();
    assert_eq!(result.code, 200, "{result:?}");
    let body: Value = serde_json::from_str(&result.body).unwrap();
    assert_eq!(
        body["origin"],
        client.ip.to_string(),
        "server must see the client pod's IP"
    );

    let outbound = mesh.recorded("foo/sleep", "outbound").unwrap();
    assert_eq!(outbound.len(), 1, "{outbound:#?}");
    assert_eq!(
        outbound[0]["destination"],
        format!("{}:{HTTP_PORT}", mesh.httpbin[BAR].ip)
    );
    assert!(
        outbound[0]["bytes_received"].as_u64() > Some(0),
        "{outbound:#?}"
    );
    let inbound = mesh.recorded("bar/httpbin", "inbound").unwrap();
    assert_eq!(inbound.len(), 1, "{inbound:#?}");
    assert!(
        inbound[0]["source"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", client.ip))
    );
}

#[test]
fn unenrolled_client_to_enrolled_server_is_captured_inbound_with_its_ip() {
    let mesh = mesh();
    let client = &mesh.sleep[LEGACY];
    let result = mesh.node.curl(Some(client), &mesh.url(FOO, "/ip")).unwrap();
    assert_eq!(result.code, 200, "{result:?}");
    assert!(result.body.contains(&client.ip.to_string()), "{result:?}");
    assert!(
        mesh.recorded("legacy/sleep", "outbound")
            .unwrap()
            .is_empty()
    );
    assert_eq!(mesh.recorded("foo/httpbin", "inbound").unwrap().len(), 1);
}

#[test]
fn unenrolled_and_opted_out_pods_connect_directly() {
    let mut mesh = mesh();
    let legacy = mesh.sleep[LEGACY].clone();
    let result = mesh
        .node
        .curl(Some(&legacy), &mesh.url(LEGACY, "/ip"))
        .unwrap();
    assert_eq!(result.code, 200, "{result:?}");

    let opted_out = mesh.sleep[FOO].clone();
    mesh.node
        .label_pod(&opted_out, "ambit.io/mesh", "disabled")
        .unwrap();
    let released = within(Duration::from_secs(2), || {
        mesh.workload("foo/sleep").unwrap()["redirection"]["state"] == "opted-out"
    });
    assert!(
        released.is_some(),
        "{:#}",
        mesh.workload("foo/sleep").unwrap()
    );
    let result = mesh
        .node
        .curl(Some(&opted_out), &mesh.url(LEGACY, "/ip"))
        .unwrap();
    assert_eq!(result.code, 200, "{result:?}");
    assert!(result.body.contains(&opted_out.ip.to_string()));

    assert!(
        mesh.recorded("legacy/sleep", "outbound")
            .unwrap()
            .is_empty()
    );
    assert!(mesh.recorded("foo/sleep", "outbound").unwrap().is_empty());
    assert!(
        mesh.recorded("legacy/httpbin", "inbound")
            .unwrap()
            .is_empty()
    );
}

#[test]
fn stopped_agent_fails_closed_and_restart_recovers_without_recreating_pods() {
    let mut mesh = mesh();
    let (foo, legacy) = (mesh.sleep[FOO].clone(), mesh.sleep[LEGACY].clone());
    assert_eq!(
        mesh.node
            .curl(Some(&foo), &mesh.url(BAR, "/ip"))
            .unwrap()
            .code,
        200
    );

    let before = mesh.node.linked_programs();
    mesh.node.stop_agent().unwrap();
    let outbound = mesh
        .node
        .curl(Some(&foo), &mesh.url(LEGACY, "/ip"))
        .unwrap();
    assert_eq!(
        outbound.code, 0,
        "enrolled pod reached a server with the agent down: {outbound:?}"
    );
    let inbound = mesh
        .node
        .curl(Some(&legacy), &mesh.url(FOO, "/ip"))
        .unwrap();
    assert_eq!(
        inbound.code, 0,
        "enrolled pod was reached with the agent down: {inbound:?}"
    );
    let direct = mesh
        .node
        .curl(Some(&legacy), &mesh.url(LEGACY, "/ip"))
        .unwrap();
    assert_eq!(
        direct.code, 200,
        "unenrolled traffic must not depend on the agent: {direct:?}"
    );

    mesh.node.start_agent().unwrap();
    let result = mesh.node.curl(Some(&foo), &mesh.url(BAR, "/ip")).unwrap();
    assert_eq!(result.code, 200, "{result:?}");
    assert!(result.body.contains(&foo.ip.to_string()));
    assert_eq!(mesh.recorded("foo/sleep", "outbound").unwrap().len(), 1);
    let log = mesh.node.agent().unwrap().log_text();
    assert!(log.contains("re-adopted pinned link"), "{log}");
    // The pinned links now run the new agent's programs, not the ones it found (those of
    // an older version, after an upgrade).
    let after = mesh.node.linked_programs();
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the same links stay pinned"
    );
    for (link, program) in &before {
        assert_ne!(
            after[link], *program,
            "{link} still runs the stopped agent's program"
        );
    }
}

#[test]
fn node_to_enrolled_pod_on_any_port_lands_in_the_plaintext_listener() {
    let mesh = mesh();
    let target = &mesh.httpbin[FOO];
    // Nothing listens on 9999 in the pod: the proxy accepts, finds no application, resets.
    let result = mesh
        .node
        .curl(None, &format!("http://{}:9999/", target.ip))
        .unwrap();
    assert_eq!(result.code, 0, "{result:?}");
    let inbound = mesh.recorded("foo/httpbin", "inbound").unwrap();
    assert_eq!(inbound.len(), 1, "{inbound:#?}");
    assert_eq!(inbound[0]["path"], "plaintext-inbound");
    assert_eq!(inbound[0]["destination"], format!("{}:9999", target.ip));
    assert!(
        inbound[0]["source"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", mesh.node.ip()))
    );
}

#[test]
fn relabelling_a_namespace_enrolls_and_releases_its_pods_within_a_second() {
    let mut mesh = mesh();
    let client = mesh.sleep[LEGACY].clone();
    mesh.node.namespace("legacy", true).unwrap();
    let enrolled = within(Duration::from_secs(1), || {
        mesh.workload("legacy/sleep").unwrap()["redirection"]["state"] == "redirected"
    });
    assert!(
        enrolled.is_some(),
        "{:#}",
        mesh.workload("legacy/sleep").unwrap()
    );
    assert_eq!(
        mesh.node
            .curl(Some(&client), &mesh.url(FOO, "/ip"))
            .unwrap()
            .code,
        200
    );
    assert_eq!(mesh.recorded("legacy/sleep", "outbound").unwrap().len(), 1);

    mesh.node.namespace("legacy", false).unwrap();
    let released = within(Duration::from_secs(1), || {
        mesh.workload("legacy/sleep").unwrap()["redirection"]["state"] == "not-enrolled"
    });
    assert!(
        released.is_some(),
        "{:#}",
        mesh.workload("legacy/sleep").unwrap()
    );
    assert_eq!(
        mesh.node
            .curl(Some(&client), &mesh.url(FOO, "/ip"))
            .unwrap()
            .code,
        200
    );
    assert_eq!(
        mesh.recorded("legacy/sleep", "outbound").unwrap().len(),
        1,
        "released pod still captured"
    );
}

#[test]
fn malformed_yaml_is_reported_and_the_previous_state_kept() {
    let mut mesh = mesh();
    mesh.node
        .write_file(
            "namespaces.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: foo\n",
        )
        .unwrap();
    let log_has_error = within(Duration::from_secs(2), || {
        let log = mesh.node.agent().unwrap().log_text();
        log.contains("namespaces.yaml: invalid YAML")
    });
    assert!(
        log_has_error.is_some(),
        "{}",
        mesh.node.agent().unwrap().log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        mesh.workload("foo/sleep").unwrap()["redirection"]["state"],
        "redirected"
    );
    let client = mesh.sleep[FOO].clone();
    assert_eq!(
        mesh.node
            .curl(Some(&client), &mesh.url(BAR, "/ip"))
            .unwrap()
            .code,
        200
    );
    assert_eq!(mesh.recorded("foo/sleep", "outbound").unwrap().len(), 1);
    // Still running, and still following the directory: a good edit applies.
    mesh.node.namespace("foo", false).unwrap();
    let released = within(Duration::from_secs(1), || {
        mesh.workload("foo/sleep").unwrap()["redirection"]["state"] == "not-enrolled"
    });
    assert!(released.is_some());
}

#[test]
fn workloads_report_ip_identity_and_redirection() {
    let mesh = mesh();
    let foo = mesh.workload("foo/sleep").unwrap();
    assert_eq!(foo["ip"], mesh.sleep[FOO].ip.to_string());
    assert_eq!(foo["identity"], "spiffe://cluster.local/ns/foo/sa/sleep");
    assert_eq!(foo["enrolled"], true);
    assert_eq!(foo["redirection"]["state"], "redirected");
    let legacy = mesh.workload("legacy/httpbin").unwrap();
    assert_eq!(legacy["enrolled"], false);
    assert_eq!(legacy["redirection"]["state"], "not-enrolled");
}

#[test]
fn a_pod_whose_enrollment_fails_is_closed_until_it_leaves_the_mesh() {
    let mut node = ambit_tests::Node::new(binaries()).unwrap();
    node.namespace("foo", true).unwrap();
    node.namespace("legacy", false).unwrap();
    let blocked = node.pod("foo", "blocked").unwrap();
    let web = node.pod("legacy", "web").unwrap();
    node.serve_http(&web, HTTP_PORT).unwrap();
    // An application holds the proxy's outbound port, so the proxy cannot listen there. It
    // never answers, so a connection that reaches it shows no response either.
    node.serve_hold(&blocked, 15001).unwrap();
    node.serve_http(&blocked, HTTP_PORT).unwrap();
    node.start_agent_opts(&ambit_tests::AgentOptions::not_ready())
        .unwrap();
    // Another process holds the pod's ports: the agent says it is not ready, and why.
    let readiness = |node: &ambit_tests::Node| node.agent().unwrap().readiness().unwrap();
    let unready = within(Duration::from_secs(5), || {
        let answer = readiness(&node);
        answer.code == 503 && answer.body.contains("foo/blocked")
    });
    assert!(unready.is_some(), "{:?}", readiness(&node));
    let state = |node: &ambit_tests::Node| {
        let workloads = node.agent().unwrap().admin_get("/workloads").unwrap();
        workloads
            .as_array()
            .and_then(|l| l.iter().find(|w| w["name"] == "blocked").cloned())
            .unwrap_or_default()["redirection"]
            .clone()
    };
    let failed = state(&node);
    assert_eq!(failed["state"], "failed", "{failed:#}");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("15001"),
        "{failed:#}"
    );

    let out = node
        .curl(Some(&blocked), &format!("http://{}:{HTTP_PORT}/ip", web.ip))
        .unwrap();
    assert_eq!(
        out.code, 0,
        "a pod that failed to enroll must not bypass the mesh: {out:?}"
    );
    let inbound = node
        .curl(None, &format!("http://{}:{HTTP_PORT}/ip", blocked.ip))
        .unwrap();
    assert_eq!(inbound.code, 0, "nor be reachable around it: {inbound:?}");

    node.namespace("foo", false).unwrap();
    let released = within(Duration::from_secs(2), || {
        state(&node)["state"] == "not-enrolled"
    });
    assert!(released.is_some(), "{:#}", state(&node));
    assert_eq!(
        readiness(&node).code,
        200,
        "released, the pod no longer holds readiness"
    );
    let out = node
        .curl(Some(&blocked), &format!("http://{}:{HTTP_PORT}/ip", web.ip))
        .unwrap();
    assert_eq!(
        out.code, 200,
        "released, the pod is as if ambit were not there: {out:?}"
    );
}
