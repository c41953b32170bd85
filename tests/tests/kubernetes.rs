//! End to end: the agent on `--source kubernetes`, its real kube-rs client against the
//! API-server double of the test bed (plain HTTP on loopback). The seed scenario (`foo`
//! and `bar` enrolled, `legacy` not) is published there instead of written as YAML.

use std::{sync::Arc, time::Duration};

use ambit_tests::{
    ApiServer, Stack,
    mesh::{BAR, FOO, LEGACY, Mesh, within},
};
use serde_json::{Value, json};

fn mesh() -> (Mesh, Arc<ApiServer>) {
    let api = Arc::new(ApiServer::start().expect("API server double"));
    let binaries = ambit_tests::test_binaries!();
    let mesh = Mesh::on_kubernetes(binaries, Arc::clone(&api), Stack::V4).expect("mesh");
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

/// A Service in `namespace` at `cluster_ip`:80, port named `http`, with `spec` merged in.
fn service(namespace: &str, name: &str, cluster_ip: &str, spec: Value) -> Value {
    let mut service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80}]},
    });
    if let (Some(fields), Value::Object(extra)) = (service["spec"].as_object_mut(), spec) {
        fields.extend(extra);
    }
    service
}

/// The EndpointSlice of `namespace/service`: one endpoint at `ip`, port `http` on 8000.
fn slice(namespace: &str, service: &str, ip: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-x1"),
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}],
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
    })
}

#[test]
fn endpoint_slices_route_selectorless_services_skip_unready_endpoints_and_name_ports() {
    let (mesh, api) = mesh();
    let curl = |from: usize, url: &str| {
        mesh.node
            .curl(Some(&mesh.sleep[from]), url)
            .expect("curl")
            .code
    };
    let last_path = |workload: &str| {
        mesh.recorded(workload, "outbound")
            .unwrap()
            .last()
            .expect("recorded")["path"]
            .clone()
    };

    // A Service without a selector, as `kubernetes.default` is: its EndpointSlice is all
    // there is. Its endpoint, legacy/httpbin, is outside the mesh: reached directly.
    let legacy = mesh.httpbin[LEGACY].ip.to_string();
    api.apply(service("foo", "external", "10.96.0.20", json!({})))
        .unwrap();
    api.apply(slice("foo", "external", &legacy, true)).unwrap();
    // Until the agent has the Service its address leads nowhere and curl gives up (3 s).
    let reached = within(Duration::from_secs(10), || {
        curl(FOO, "http://10.96.0.20:80/ip") == 200
    });
    assert!(
        reached.is_some(),
        "the selector-less Service is not routed: {:?}\n{}",
        mesh.recorded("foo/sleep", "outbound").unwrap().last(),
        mesh.node.agent().unwrap().log_text()
    );
    assert_eq!(last_path("foo/sleep"), "plaintext");

    // Its only endpoint turns unready: the Service has nowhere to go.
    api.apply(slice("foo", "external", &legacy, false)).unwrap();
    let refused = within(Duration::from_secs(3), || {
        curl(FOO, "http://10.96.0.20:80/ip") == 0
    });
    assert!(refused.is_some(), "an unready endpoint still gets traffic");

    // A named targetPort resolves through the slice; the enrolled endpoint is reached
    // over HBONE.
    api.apply(service(
        "bar",
        "httpbin",
        "10.96.0.21",
        json!({"selector": {"app": "httpbin"}, "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}),
    ))
    .unwrap();
    let bar = mesh.httpbin[BAR].ip.to_string();
    api.apply(slice("bar", "httpbin", &bar, true)).unwrap();
    let reached = within(Duration::from_secs(10), || {
        curl(FOO, "http://10.96.0.21:80/ip") == 200
    });
    assert!(reached.is_some(), "the named targetPort is not resolved");
    assert_eq!(last_path("foo/sleep"), "same-node");
}
