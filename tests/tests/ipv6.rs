//! End to end: IPv6. The seed's scenario (`foo` and `bar` enrolled, `legacy` not) with
//! IPv6-only pods and with dual-stack pods: who reaches whom, the PeerAuthentication steps,
//! an `ipBlocks` policy with an IPv6 CIDR, the client's IPv6 address as the application
//! sees it, no plaintext on the wire between enrolled pods, IPv4-mapped connects, and what
//! stays refused (link-local). Run as root (`cargo xtask test`); nothing here is skipped.

use std::{sync::Arc, time::Duration};

use ambit_tests::{
    AgentOptions, ApiServer, Family, Stack,
    mesh::{
        BAR, FOO, HTTP_PORT, LEGACY, Mesh, OTHER_PORT, expect,
        policies::{DENY_FOO_IN_BAR, FOO_HTTPBIN_8000_DISABLE, FOO_STRICT, MESH_STRICT},
        within,
    },
};
use serde_json::Value;

fn mesh(stack: Stack) -> Mesh {
    Mesh::with_stack(ambit_tests::test_binaries!(), stack).expect("mesh")
}

/// The scenario with the same-node shortcut off: enrolled pods of this one node talk over
/// HBONE, as pods of two nodes do.
fn hbone_mesh(stack: Stack) -> Mesh {
    let agent = AgentOptions::args(&["--same-node-shortcut=false"]);
    Mesh::with_agent_and_stack(ambit_tests::test_binaries!(), &agent, stack).expect("mesh")
}

/// Every pair answers over `mesh.family`, the application sees the client's address of
/// that family, and `foo/sleep`'s connections took `hop` to the enrolled pods (`hbone`,
/// or `same-node` for the shortcut).
fn assert_reachable_with_client_ip(mesh: &Mesh, hop: &str) {
    let matrix = mesh.matrix(HTTP_PORT).unwrap();
    for (from, row) in matrix.iter().enumerate() {
        for (to, result) in row.iter().enumerate() {
            assert_eq!(result.code, 200, "from {from} to {to}: {result:?}");
            let body: Value = serde_json::from_str(&result.body).unwrap();
            assert_eq!(
                body["origin"],
                mesh.sleep[from].addr(mesh.family).to_string(),
                "from {from} to {to} over {:?}: the server sees the client's address",
                mesh.family
            );
        }
    }
    let outbound = mesh.recorded("foo/sleep", "outbound").unwrap();
    let to_httpbin = |to: usize| {
        let destination = format!("{}:{HTTP_PORT}", mesh.httpbin[to].host(mesh.family));
        outbound
            .iter()
            .rev()
            .find(|c| c["destination"] == destination.as_str())
            .map(|c| c["path"].clone())
    };
    let paths = [FOO, BAR, LEGACY].map(to_httpbin);
    assert_eq!(
        paths,
        [Some(hop.into()), Some(hop.into()), Some("plaintext".into())],
        "foo → foo, bar over {:?}: {hop}; → legacy: plain ({outbound:#?})",
        mesh.family
    );
}

#[test]
fn ipv6_only_pods_are_meshed_and_see_the_clients_ipv6_address() {
    let mesh = hbone_mesh(Stack::V6);
    assert_reachable_with_client_ip(&mesh, "hbone");
    // HBONE between the proxies went over IPv6 too: the enrolled server's proxy recorded
    // the client's IPv6 address on its HBONE listener.
    let inbound = mesh.recorded("bar/httpbin", "inbound").unwrap();
    let source = mesh.sleep[FOO].ipv6().to_string();
    assert!(
        inbound.iter().any(|c| c["path"] == "hbone-inbound"
            && c["source"].as_str().is_some_and(|s| s.contains(&source))),
        "{inbound:#?}"
    );
}

#[test]
fn dual_stack_pods_are_meshed_over_both_families() {
    // The same-node shortcut, by default, over both families.
    let mut mesh = mesh(Stack::Dual);
    for family in [Family::V4, Family::V6] {
        mesh.family = family;
        assert_reachable_with_client_ip(&mesh, "same-node");
    }
    let workload = mesh.workload("foo/httpbin").unwrap();
    let pod = &mesh.httpbin[FOO];
    assert_eq!(
        workload["ips"],
        serde_json::json!([pod.ip.to_string(), pod.ipv6().to_string()]),
        "one pod registered with both its addresses: {workload:#}"
    );
}

#[test]
fn dual_stack_pods_from_the_kubernetes_api_are_meshed_over_both_families() {
    let api = Arc::new(ApiServer::start().expect("API server double"));
    let binaries = ambit_tests::test_binaries!();
    let mut mesh = Mesh::on_kubernetes(binaries, api, Stack::Dual).expect("mesh");
    for family in [Family::V6, Family::V4] {
        mesh.family = family;
        assert_reachable_with_client_ip(&mesh, "same-node");
    }
}

/// Istio's mutual TLS migration over IPv6: plaintext from `legacy` follows the
/// PeerAuthentication in force, as over IPv4.
fn peer_authentication_steps(mesh: &Mesh) {
    mesh.assert_matrix(HTTP_PORT, expect(&[]));
    mesh.node
        .write_file("peer-authn.yaml", MESH_STRICT)
        .unwrap();
    mesh.assert_matrix(HTTP_PORT, expect(&[(LEGACY, FOO), (LEGACY, BAR)]));
    mesh.node.write_file("peer-authn.yaml", FOO_STRICT).unwrap();
    mesh.assert_matrix(HTTP_PORT, expect(&[(LEGACY, FOO)]));
    let policy = format!("{FOO_STRICT}---{FOO_HTTPBIN_8000_DISABLE}");
    mesh.node.write_file("peer-authn.yaml", &policy).unwrap();
    mesh.assert_matrix(OTHER_PORT, expect(&[(LEGACY, FOO)]));
    mesh.assert_matrix(HTTP_PORT, expect(&[]));
    mesh.node.remove_file("peer-authn.yaml").unwrap();
    mesh.assert_matrix(OTHER_PORT, expect(&[]));
    mesh.assert_refused_saying("foo/httpbin", "STRICT");
}

#[test]
fn peer_authentication_steps_apply_to_ipv6_only_pods() {
    peer_authentication_steps(&mesh(Stack::V6));
}

#[test]
fn peer_authentication_steps_apply_to_dual_stack_pods_over_ipv6() {
    let mut mesh = mesh(Stack::Dual);
    mesh.family = Family::V6;
    peer_authentication_steps(&mesh);
}

/// `foo/httpbin` accepts only the address block of `bar/sleep`'s IPv6 address.
fn allow_from(block: &str) -> String {
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-block, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{ipBlocks: ["{block}"]}}}}]
"#
    )
}

#[test]
fn ip_blocks_with_an_ipv6_cidr_allow_and_deny_as_written() {
    let mut mesh = mesh(Stack::Dual);
    let block = format!("{}/128", mesh.sleep[BAR].ipv6());
    mesh.node
        .write_file("allow.yaml", &allow_from(&block))
        .unwrap();
    mesh.family = Family::V6;
    mesh.assert_matrix(HTTP_PORT, expect(&[(FOO, FOO), (LEGACY, FOO)]));
    // Over IPv4 the same client comes from an address outside the block.
    mesh.family = Family::V4;
    mesh.assert_matrix(HTTP_PORT, expect(&[(FOO, FOO), (BAR, FOO), (LEGACY, FOO)]));
    let denied = mesh.recorded("foo/httpbin", "inbound").unwrap();
    assert!(
        denied.iter().any(|c| c["error"]
            .as_str()
            .is_some_and(|e| e.contains("foo/allow-block"))),
        "the refusal names the policy: {denied:#?}"
    );

    // The whole unique-local prefix: every client over IPv6, none over IPv4.
    mesh.node
        .write_file("allow.yaml", &allow_from("fd44::/64"))
        .unwrap();
    mesh.family = Family::V6;
    mesh.assert_matrix(HTTP_PORT, expect(&[]));
    mesh.family = Family::V4;
    mesh.assert_matrix(HTTP_PORT, expect(&[(FOO, FOO), (BAR, FOO), (LEGACY, FOO)]));
}

#[test]
fn traffic_between_enrolled_pods_over_ipv6_is_encrypted_on_the_wire() {
    let mut mesh = hbone_mesh(Stack::V6);
    // The capture sees plaintext where there is some: legacy → legacy crosses the veth bare.
    let (_, seen) = mesh.capture_request(LEGACY, LEGACY).unwrap();
    assert!(seen, "the capture must see plaintext traffic over IPv6");
    let (captured, seen) = mesh.capture_request(FOO, BAR).unwrap();
    assert!(captured > 1000, "the HBONE exchange crossed the veth");
    assert!(!seen, "foo → bar crossed the wire in plaintext over IPv6");
}

#[test]
fn ipv4_mapped_connects_of_a_dual_stack_pod_are_meshed() {
    let mesh = mesh(Stack::Dual);
    let (node, sleep) = (&mesh.node, &mesh.sleep[FOO]);
    let mapped = format!("http://[::ffff:{}]:{HTTP_PORT}/ip", mesh.httpbin[BAR].ip);
    let result = node.curl(Some(sleep), &mapped).unwrap();
    assert_eq!(result.code, 200, "{result:?}");
    let last = mesh.recorded("foo/sleep", "outbound").unwrap();
    let last = last.last().expect("recorded");
    assert_eq!(
        last["destination"],
        format!("{}:{HTTP_PORT}", mesh.httpbin[BAR].ip),
        "the proxy sees the IPv4 destination"
    );
    assert_eq!(last["path"], "same-node");

    node.write_file("deny.yaml", DENY_FOO_IN_BAR).unwrap();
    let refused = within(Duration::from_secs(3), || {
        node.curl(Some(sleep), &mapped).unwrap().code != 200
    });
    assert!(refused.is_some(), "the DENY applies through {mapped}");
}

#[test]
fn link_local_stays_refused_both_ways() {
    let mesh = mesh(Stack::Dual);
    let node = &mesh.node;
    let link_local = |to: usize| {
        format!(
            "http://[{}%25eth0]:{HTTP_PORT}/ip",
            mesh.httpbin[to].link_local()
        )
    };
    // The test bed's link-local addresses work: unenrolled pods reach each other.
    let result = node
        .curl(Some(&mesh.sleep[LEGACY]), &link_local(LEGACY))
        .unwrap();
    assert_eq!(result.code, 200, "legacy → legacy link-local: {result:?}");
    // An enrolled pod's link-local connects are refused by the kernel (the proxy could not
    // carry them), and a link-local address of an enrolled pod is nobody's to reach.
    for (from, to) in [(FOO, BAR), (FOO, LEGACY), (LEGACY, FOO)] {
        let result = node.curl(Some(&mesh.sleep[from]), &link_local(to)).unwrap();
        assert_eq!(
            result.code, 0,
            "from {from} to {to} over link-local: {result:?}"
        );
    }
}
