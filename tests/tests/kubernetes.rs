//! End to end: the agent on `--source kubernetes`, its real kube-rs client against the
//! API-server double of the test bed (plain HTTP on loopback). The seed scenario (`foo`
//! and `bar` enrolled, `legacy` not) is published there instead of written as YAML.

use std::{sync::Arc, time::Duration};

use ambit_tests::{
    ApiServer,
    mesh::{BAR, FOO, LEGACY, Mesh, within},
};
use serde_json::{Value, json};

fn mesh() -> (Mesh, Arc<ApiServer>) {
    let api = Arc::new(ApiServer::start().expect("API server double"));
    let mesh = Mesh::on_kubernetes(ambit_tests::test_binaries!(), Arc::clone(&api)).expect("mesh");
    (mesh, api)
}

/// The redirection state the admin API shows for `workload` (`ns/name`), `absent` when
/// the agent does not know the pod.
fn state(mesh: &Mesh, workload: &str) -> String {
    let entry = mesh.workload(workload).expect("admin API");
    entry["redirection"]["state"]
        .as_str()
        .unwrap_or("absent")
        .to_owned()
}

/// Waits up to `limit` for `workload` to reach `expected`.
fn assert_state(mesh: &Mesh, workload: &str, expected: &str, limit: Duration) {
    let reached = within(limit, || state(mesh, workload) == expected);
    assert!(
        reached.is_some(),
        "{workload}: expected {expected} within {limit:?}, got {}\n{}",
        state(mesh, workload),
        mesh.node.agent().unwrap().log_text()
    );
}

/// HTTP code of `sleep` of namespace `from` calling `httpbin` of namespace `to`; 0 when
/// the connection is refused.
fn code(mesh: &Mesh, from: usize, to: usize) -> u16 {
    mesh.node
        .curl(Some(&mesh.sleep[from]), &mesh.url(to, "/ip"))
        .expect("curl")
        .code
}

/// Waits (config changes apply within a second; 3 s for a loaded machine) until
/// `from → to` answers `expected`.
fn assert_code(mesh: &Mesh, from: usize, to: usize, expected: u16) {
    let mut last = 0;
    let reached = within(Duration::from_secs(3), || {
        last = code(mesh, from, to);
        last == expected
    });
    assert!(
        reached.is_some(),
        "{from} → {to}: expected {expected}, got {last}"
    );
}

/// An AuthorizationPolicy in `foo` denying every source in `namespace`, with `extra`
/// merged into its spec.
fn deny_from(namespace: &str, extra: Value) -> Value {
    let mut policy = json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "foo"},
        "spec": {
            "action": "DENY",
            "rules": [{"from": [{"source": {"namespaces": [namespace]}}]}],
        },
    });
    if let (Some(spec), Value::Object(extra)) = (policy["spec"].as_object_mut(), extra) {
        spec.extend(extra);
    }
    policy
}

#[test]
fn pods_and_namespaces_enroll_and_release_within_a_second() {
    let (mut mesh, api) = mesh();
    let second = Duration::from_secs(1);
    assert_eq!(state(&mesh, "foo/httpbin"), "redirected");
    assert_eq!(state(&mesh, "legacy/httpbin"), "not-enrolled");
    assert_eq!(code(&mesh, FOO, BAR), 200);
    assert_eq!(mesh.recorded("bar/httpbin", "inbound").unwrap().len(), 1);

    // A namespace relabelled, both ways.
    mesh.node.namespace("legacy", true).unwrap();
    assert_state(&mesh, "legacy/sleep", "redirected", second);
    assert_eq!(code(&mesh, LEGACY, FOO), 200);
    assert_eq!(mesh.recorded("legacy/sleep", "outbound").unwrap().len(), 1);
    mesh.node.namespace("legacy", false).unwrap();
    assert_state(&mesh, "legacy/sleep", "not-enrolled", second);

    // A pod relabelled to opt out.
    let sleep = mesh.sleep[FOO].clone();
    mesh.node
        .label_pod(&sleep, "ambit.io/mesh", "disabled")
        .unwrap();
    assert_state(&mesh, "foo/sleep", "opted-out", second);

    // A pod created, then deleted.
    mesh.node.pod("foo", "late").unwrap();
    assert_state(&mesh, "foo/late", "redirected", second);
    api.delete("v1", "Pod", "foo", "late").unwrap();
    assert_state(&mesh, "foo/late", "absent", second);

    // A namespace deleted releases its pods.
    api.delete("v1", "Namespace", "", "bar").unwrap();
    assert_state(&mesh, "bar/httpbin", "not-enrolled", second);
}

#[test]
fn an_edited_policy_applies_and_an_invalid_one_keeps_the_last_good_one() {
    let (mesh, api) = mesh();
    // Before any policy both callers are answered: what follows cannot be a leftover.
    assert_eq!(code(&mesh, FOO, FOO), 200);
    assert_eq!(code(&mesh, BAR, FOO), 200);

    api.apply(deny_from("bar", json!({}))).unwrap();
    assert_code(&mesh, BAR, FOO, 0);
    assert_eq!(code(&mesh, FOO, FOO), 200);

    // The same object edited: now `foo` is denied and `bar` answered again.
    api.apply(deny_from("foo", json!({}))).unwrap();
    assert_code(&mesh, FOO, FOO, 0);
    assert_code(&mesh, BAR, FOO, 200);

    // An invalid edit: an Event names the field, and the last good version stays.
    api.apply(deny_from("bar", json!({"action": "MAYBE"})))
        .unwrap();
    let mut events = Vec::new();
    let reported = within(Duration::from_secs(3), || {
        events = api.events();
        !events.is_empty()
    });
    assert!(
        reported.is_some(),
        "no Event posted\n{}",
        mesh.node.agent().unwrap().log_text()
    );
    let event = &events[0];
    assert_eq!(event["reason"], "InvalidPolicy", "{event:#}");
    assert_eq!(event["type"], "Warning", "{event:#}");
    assert_eq!(event["metadata"]["namespace"], "foo", "{event:#}");
    assert_eq!(
        event["involvedObject"],
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "namespace": "foo",
            "name": "deny",
            "uid": event["involvedObject"]["uid"],
            "resourceVersion": event["involvedObject"]["resourceVersion"],
        }),
        "{event:#}"
    );
    let message = event["message"].as_str().unwrap_or_default();
    assert!(message.contains("spec.action"), "{message}");
    // The agent handled the edit (it posted the Event) and still enforces the last good
    // version, with the `foo` rule, not the edit's `bar` rule.
    assert_eq!(code(&mesh, FOO, FOO), 0);
    assert_eq!(code(&mesh, BAR, FOO), 200);

    api.delete("security.istio.io/v1", "AuthorizationPolicy", "foo", "deny")
        .unwrap();
    assert_code(&mesh, FOO, FOO, 200);
}

#[test]
fn an_api_server_outage_changes_nothing_and_the_agent_catches_up() {
    let (mut mesh, api) = mesh();
    assert_eq!(code(&mesh, BAR, FOO), 200);
    api.apply(deny_from("bar", json!({}))).unwrap();
    assert_code(&mesh, BAR, FOO, 0);

    api.stop();
    // Changes the agent cannot see yet, and a history forgotten: its watches resume from
    // a resourceVersion the server answers with 410, so it must list again.
    api.delete("security.istio.io/v1", "AuthorizationPolicy", "foo", "deny")
        .unwrap();
    mesh.node.pod("foo", "late").unwrap();
    api.compact();
    for _ in 0..10 {
        assert_eq!(code(&mesh, BAR, FOO), 0, "the policy stays in force");
        assert_eq!(code(&mesh, FOO, FOO), 200, "traffic goes on");
        assert_eq!(state(&mesh, "foo/httpbin"), "redirected");
        assert_eq!(state(&mesh, "foo/late"), "absent");
        std::thread::sleep(Duration::from_secs(1));
    }

    api.restart().unwrap();
    // The watchers retry at most 5 s apart.
    let caught_up = within(Duration::from_secs(10), || {
        state(&mesh, "foo/late") == "redirected" && code(&mesh, BAR, FOO) == 200
    });
    let log = mesh.node.agent().unwrap().log_text();
    assert!(caught_up.is_some(), "{log}");
    assert!(log.contains("watch expired; listing again"), "{log}");
}
