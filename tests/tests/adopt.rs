//! Pods that were running before the agent, with no `ambit.io/netns` annotation and no CNI
//! plugin to report them: the agent finds a process of each by the pod UID in its cgroup
//! path (laid out below the node's cgroup as a kubelet with the systemd driver and
//! containerd does) and enrolls the pod in that process's network namespace. Run as root
//! (`cargo xtask test adopt`).

use std::time::Duration;

use ambit_tests::{Binaries, Node, Pod, mesh::within};
use serde_json::Value;

const HTTP_PORT: u16 = 8000;

fn binaries() -> Binaries {
    ambit_tests::test_binaries!()
}

/// A node with namespace `foo` enrolled and `foo/server` (annotated, as usual) serving
/// HTTP.
fn node_with_server() -> (Node, Pod) {
    let mut node = Node::new(binaries()).unwrap();
    node.namespace("foo", true).unwrap();
    let server = node.pod("foo", "server").unwrap();
    node.serve_http(&server, HTTP_PORT).unwrap();
    (node, server)
}

/// A pod of `foo` whose YAML names no network namespace, as the API server shows it.
fn unannotated_pod(node: &mut Node, name: &str) -> Pod {
    let pod = node.pod("foo", name).unwrap();
    node.hide_netns(&pod).unwrap();
    pod
}

/// Waits up to 5 s for the workload table to show `key` in `state`; returns its entry.
fn wait_for_state(node: &Node, key: &str, state: &str) -> Value {
    let agent = node.agent().unwrap();
    let mut last = Value::Null;
    let reached = within(Duration::from_secs(5), || {
        last = agent.workload(key).unwrap();
        last["redirection"]["state"] == state
    });
    assert!(reached.is_some(), "{key} is not {state}: {last:#}");
    last
}

/// The failure the workload table shows for `key` once it has one.
fn failure(node: &Node, key: &str) -> String {
    let entry = wait_for_state(node, key, "failed");
    entry["redirection"]["reason"].as_str().unwrap().to_owned()
}

#[test]
fn pod_started_before_the_agent_is_adopted_through_its_cgroup() {
    let (mut node, server) = node_with_server();
    let old = unannotated_pod(&mut node, "old");
    let pid = node
        .start_process_in(&old, &node.container_cgroup(&old))
        .unwrap();
    node.start_agent().unwrap();

    wait_for_state(&node, "foo/old", "redirected");
    let url = format!("http://{}:{HTTP_PORT}/ip", server.ip);
    let response = node.curl(Some(&old), &url).unwrap();
    assert_eq!(response.code, 200, "{response:?}");
    let body: Value = serde_json::from_str(&response.body).unwrap();
    assert_eq!(body["origin"], old.ip.to_string());
    let agent = node.agent().unwrap();
    let outbound = agent.recorded("foo/old", "outbound").unwrap();
    let paths: Vec<&Value> = outbound.iter().map(|c| &c["path"]).collect();
    assert_eq!(paths, ["same-node"], "{outbound:#?}");
    let inbound = agent.recorded("foo/server", "inbound").unwrap();
    assert!(
        inbound.iter().any(|c| c["path"] == "same-node-inbound"
            && c["source"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{}:", old.ip))),
        "{inbound:#?}"
    );
    // The runtime's pin of the namespace (here `ip netns`'s) is preferred to the process.
    let log = agent.log_text();
    let adopted = log
        .lines()
        .find(|l| l.contains("adopted the pod through its process") && l.contains("foo/old"))
        .unwrap_or_else(|| panic!("no adoption logged:\n{log}"));
    assert!(adopted.contains(&format!("pid={pid}")), "{adopted}");
    assert!(
        adopted.contains(&old.netns_path().display().to_string()),
        "{adopted}"
    );
}

#[test]
fn pod_without_a_process_is_not_adopted_and_says_why_until_one_starts() {
    let (mut node, _server) = node_with_server();
    let ghost = unannotated_pod(&mut node, "ghost");
    node.start_agent().unwrap();

    let reason = failure(&node, "foo/ghost");
    assert_eq!(
        reason,
        format!(
            "pod has no network namespace: no ambit.io/netns annotation, no CNI ADD, no \
             process of pod UID {} runs in a network namespace of its own on this node",
            ghost.uid
        )
    );
    // Failed pods are retried: the pod's first process is found by the next pass.
    node.start_process_in(&ghost, &node.container_cgroup(&ghost))
        .unwrap();
    wait_for_state(&node, "foo/ghost", "redirected");
}

/// A container that may manage its own cgroup nests one named after another pod below its
/// own: the victim must not be enrolled in the attacker's network namespace.
#[test]
fn cgroup_nested_in_another_pods_does_not_adopt_the_pod_it_names() {
    let (mut node, _server) = node_with_server();
    let attacker = unannotated_pod(&mut node, "attacker");
    let victim = unannotated_pod(&mut node, "victim");
    let nested = node.container_cgroup(&attacker).join(format!(
        "kubepods-besteffort-pod{}.slice",
        victim.uid.replace('-', "_")
    ));
    node.start_process_in(&attacker, &nested).unwrap();
    node.start_agent().unwrap();

    wait_for_state(&node, "foo/attacker", "redirected");
    let reason = failure(&node, "foo/victim");
    assert!(
        reason.contains(&format!("no process of pod UID {}", victim.uid)),
        "{reason}"
    );
}

#[test]
fn process_whose_namespace_lacks_the_pod_ip_is_not_adopted() {
    let (mut node, _server) = node_with_server();
    let moved = unannotated_pod(&mut node, "moved");
    node.set_pod_ip(&moved, "10.44.0.200".parse().unwrap())
        .unwrap();
    node.start_process_in(&moved, &node.container_cgroup(&moved))
        .unwrap();
    node.start_agent().unwrap();

    let reason = failure(&node, "foo/moved");
    assert!(
        reason.ends_with(&format!(
            "({}) does not hold the pod's IP 10.44.0.200",
            moved.netns_path().display()
        )),
        "{reason}"
    );
}
