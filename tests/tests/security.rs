//! End to end: regression tests for security issue 9, one or more per finding. Each test
//! asserts what a client sees, whether the agent survives and what the admin API reports,
//! never how a fix works. Run as root (`cargo xtask test`); nothing here is skipped.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use ambit_tests::{
    AgentOptions, Binaries, CurlResult, Node, Pod, Stack,
    mesh::{
        BAR, FOO, HTTP_PORT, LEGACY, Mesh,
        policies::{BAR_STRICT, DENY_FOO_IN_BAR, FOO_STRICT},
        within,
    },
    probe::{Held, last_json, probe, probe_command},
};
use serde_json::Value;

/// Where the tests run applications listening on `[::]` (IPv4 and IPv6).
const DUAL_STACK_PORT: u16 = 8600;
/// Where the tests run `ambit-hold serve`, an echo server that holds connections.
const HOLD_PORT: u16 = 9100;
/// The proxy's socket mark (`ambit_common::marks::PROXY`), and the transparent variant.
const PROXY_MARK: &str = "0x0a3b0000";
const PROXY_TRANSPARENT_MARK: &str = "0x0a3b0001";
const HTTP_GET: &str = "GET /ip HTTP/1.0\\r\\n\\r\\n";

/// Pods of `namespace` labelled `locked: "true"` accept nothing.
fn deny_locked(namespace: &str) -> String {
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-locked, namespace: {namespace}}}
spec:
  selector: {{matchLabels: {{locked: "true"}}}}
  action: DENY
  rules: [{{}}]
"#
    )
}

fn binaries() -> Binaries {
    ambit_tests::test_binaries!()
}

fn mesh() -> Mesh {
    Mesh::new(binaries()).expect("mesh")
}

/// The scenario, with the `httpbin` pods of namespaces `to` also serving on `[::]`.
fn mesh_serving_dual_stack(to: &[usize]) -> Mesh {
    let mut mesh = mesh();
    for &to in to {
        let pod = mesh.httpbin[to].clone();
        mesh.node
            .serve_http_dual_stack(&pod, DUAL_STACK_PORT)
            .unwrap();
    }
    mesh
}

/// The scenario with these extra `ambit run` flags.
fn mesh_with(args: &[&str]) -> Mesh {
    Mesh::with_agent(binaries(), &AgentOptions::args(args)).expect("mesh")
}

fn url(ip: impl std::fmt::Display, port: u16) -> String {
    format!("http://{ip}:{port}/ip")
}

/// `http://[ip%25eth0]:port/ip`: a link-local address with its zone, as curl takes it.
fn link_local_url(pod: &Pod, port: u16) -> String {
    format!("http://[{}%25eth0]:{port}/ip", pod.link_local())
}

/// `http://[ip]:port/ip`.
fn v6_url(ip: impl std::fmt::Display, port: u16) -> String {
    format!("http://[{ip}]:{port}/ip")
}

fn curl(node: &Node, from: &Pod, url: &str) -> CurlResult {
    node.curl(Some(from), url).expect("curl")
}

/// Curls until the status satisfies `ok` (at most `limit`); returns the last result and
/// whether it did.
fn curl_until(
    node: &Node,
    from: &Pod,
    url: &str,
    limit: Duration,
    ok: impl Fn(u16) -> bool,
) -> (CurlResult, bool) {
    let mut last = None;
    let reached = within(limit, || {
        let result = curl(node, from, url);
        let done = ok(result.code);
        last = Some(result);
        done
    });
    (last.expect("curl ran at least once"), reached.is_some())
}

/// Open descriptors of process `pid`.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// The redirection state `/workloads` reports for `namespace/name`.
fn redirection(node: &Node, namespace: &str, name: &str) -> Value {
    let workloads = node.agent().unwrap().admin_get("/workloads").unwrap();
    workloads
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|w| w["namespace"] == namespace && w["name"] == name)
                .cloned()
        })
        .unwrap_or_default()["redirection"]
        .clone()
}

/// The running agent's decision for `from` → `to` on port 8000.
fn explain(mesh: &Mesh, from: &str, to: &str) -> Value {
    mesh.node
        .agent()
        .unwrap()
        .admin_get(&format!("/explain?from={from}&to={to}&port={HTTP_PORT}"))
        .unwrap_or_default()
}

/// Checks that the agent still runs, serves foo/sleep → bar/httpbin, and applies a new
/// policy (a DENY that must then refuse that request); removes the policy again.
fn assert_mesh_healthy(mesh: &Mesh, context: &str) {
    let node = &mesh.node;
    let (sleep, bar) = (&mesh.sleep[FOO], mesh.url(BAR, "/ip"));
    let (result, ok) = curl_until(node, sleep, &bar, Duration::from_secs(5), |c| c == 200);
    assert!(
        ok,
        "{context}: foo/sleep → bar/httpbin must still answer 200: {result:?}"
    );
    node.write_file("health-deny.yaml", DENY_FOO_IN_BAR)
        .unwrap();
    let (result, refused) = curl_until(node, sleep, &bar, Duration::from_secs(5), |c| c != 200);
    assert!(
        refused,
        "{context}: a DENY policy written now must take effect: {result:?}"
    );
    node.remove_file("health-deny.yaml").unwrap();
    let (result, ok) = curl_until(node, sleep, &bar, Duration::from_secs(5), |c| c == 200);
    assert!(ok, "{context}: removing the DENY must apply: {result:?}");
}

/// Connects from `pod` to `target` (sending an HTTP request), while watching the agent's
/// open descriptors; returns the probe's report and the highest descriptor count seen.
fn attack_and_watch(mesh: &Mesh, pod: &Pod, target: &str) -> (Value, usize) {
    let pid = mesh.node.agent().unwrap().pid();
    let args = [
        "connect",
        target,
        "--send",
        HTTP_GET,
        "--timeout-ms",
        "1000",
    ];
    let child = probe_command(&mesh.node, pod, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ambit-probe");
    let mut peak = fd_count(pid);
    let start = Instant::now();
    // Watch past the probe's own timeout: a loop keeps going after the client gave up.
    while start.elapsed() < Duration::from_millis(1800) {
        peak = peak.max(fd_count(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("ambit-probe");
    (last_json(&output.stdout, &output.stderr, &args), peak)
}

/// How many descriptors above its idle count the agent may hold around one attacking
/// connection and the checks after it; a loop takes thousands.
const FD_SLACK: usize = 100;

/// Finding 1 (critical): one connection from an enrolled pod to its own
/// `127.0.0.1:15006` made the proxy connect to itself hop after hop until it ran out of
/// descriptors, taking the mesh down for every pod and breaking configuration reloads.
#[test]
fn a_pod_connecting_to_its_own_plaintext_listener_does_not_loop_the_proxy() {
    let mesh = mesh();
    assert_eq!(
        curl(&mesh.node, &mesh.sleep[FOO], &mesh.url(BAR, "/ip")).code,
        200
    );
    let pid = mesh.node.agent().unwrap().pid();
    let idle = fd_count(pid);
    let (report, peak) = attack_and_watch(&mesh, &mesh.sleep[FOO], "127.0.0.1:15006");
    assert!(agent_running(&mesh), "the agent died: {report}");
    assert!(
        peak < idle + FD_SLACK,
        "one connection to 127.0.0.1:15006 drove the agent from {idle} to {peak} open descriptors ({report})"
    );
    assert_mesh_healthy(&mesh, "after a connection to 127.0.0.1:15006");
}

/// True while the agent process runs (and is not a zombie).
fn agent_running(mesh: &Mesh) -> bool {
    let pid = mesh.node.agent().unwrap().pid();
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
}

/// Finding 1, the same class: no other path leads the proxy to connect to one of its own
/// listeners (its loopback listeners from inside the pod, `0.0.0.0`, the pod's own IP,
/// IPv4-mapped loopback, and the pod's IP from outside on the listener ports).
/// `127.0.0.1:15006` itself is the test above.
#[test]
fn no_path_makes_the_proxy_connect_to_its_own_listeners() {
    let mesh = mesh();
    let sleep = mesh.sleep[FOO].clone();
    let (legacy, server) = (mesh.sleep[LEGACY].clone(), mesh.httpbin[FOO].clone());
    let mut targets = Vec::new();
    for port in [15001, 15008] {
        targets.push((sleep.clone(), format!("127.0.0.1:{port}")));
    }
    for port in [15001, 15006, 15008] {
        targets.push((sleep.clone(), format!("{}:{port}", sleep.ip)));
        targets.push((server.clone(), format!("{}:{port}", server.ip)));
        targets.push((legacy.clone(), format!("{}:{port}", server.ip)));
    }
    for port in [15001, 15006, 15008] {
        targets.push((sleep.clone(), format!("0.0.0.0:{port}")));
        targets.push((sleep.clone(), format!("[::ffff:127.0.0.1]:{port}")));
    }
    assert_no_path_to_own_listeners(&mesh, &targets);
}

/// The same over IPv6, with dual-stack pods, whose inbound listeners are bound to `[::]`:
/// IPv6 loopback and unspecified, the pods' IPv6 addresses from inside and outside.
#[test]
fn no_ipv6_path_makes_the_proxy_connect_to_its_own_listeners() {
    let mesh = Mesh::with_stack(binaries(), Stack::Dual).expect("mesh");
    let sleep = mesh.sleep[FOO].clone();
    let (legacy, server) = (mesh.sleep[LEGACY].clone(), mesh.httpbin[FOO].clone());
    let mut targets = Vec::new();
    for port in [15001, 15006, 15008] {
        for local in ["::1", "::"] {
            targets.push((sleep.clone(), format!("[{local}]:{port}")));
        }
        targets.push((sleep.clone(), format!("[{}]:{port}", sleep.ipv6())));
        targets.push((server.clone(), format!("[{}]:{port}", server.ipv6())));
        targets.push((legacy.clone(), format!("[{}]:{port}", server.ipv6())));
        targets.push((sleep.clone(), format!("{}:{port}", sleep.ip)));
    }
    assert_no_path_to_own_listeners(&mesh, &targets);
}

/// Attacks from each `(pod, target)` in turn: the agent survives, its descriptors stay
/// near their idle count, and the mesh keeps working and applying policies.
fn assert_no_path_to_own_listeners(mesh: &Mesh, targets: &[(Pod, String)]) {
    let pid = mesh.node.agent().unwrap().pid();
    let idle = fd_count(pid);
    for (pod, target) in targets {
        let context = format!("{}/{} → {target}", pod.namespace, pod.name);
        let (report, peak) = attack_and_watch(mesh, pod, target);
        assert!(agent_running(mesh), "{context}: the agent died");
        assert!(
            peak < idle + FD_SLACK,
            "{context}: the agent went from {idle} to {peak} open descriptors ({report})"
        );
        let result = curl(&mesh.node, &mesh.sleep[FOO], &mesh.url(BAR, "/ip"));
        assert_eq!(
            result.code, 200,
            "{context}: the mesh must still work: {result:?}"
        );
    }
    assert_mesh_healthy(mesh, "after every path to the proxy's own listeners");
}

/// Finding 2: an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is IPv4 traffic. It went
/// around the proxy, in plaintext past a DENY; it must be meshed like IPv4: refused by the
/// DENY, and over mutual TLS where the destination is STRICT.
#[test]
fn an_ipv4_mapped_address_is_meshed_like_ipv4() {
    let mesh = mesh();
    let (node, sleep) = (&mesh.node, &mesh.sleep[FOO]);
    let bar_ip = mesh.httpbin[BAR].ip;
    let (v4, mapped) = (
        url(bar_ip, HTTP_PORT),
        v6_url(format!("::ffff:{bar_ip}"), HTTP_PORT),
    );

    node.write_file("deny.yaml", DENY_FOO_IN_BAR).unwrap();
    let (result, refused) = curl_until(node, sleep, &v4, Duration::from_secs(3), |c| c != 200);
    assert!(refused, "the DENY applies over IPv4: {result:?}");
    let result = curl(node, sleep, &mapped);
    assert_ne!(
        result.code, 200,
        "foo/sleep reached bar/httpbin through {mapped} past a DENY: {result:?}"
    );

    node.remove_file("deny.yaml").unwrap();
    node.write_file("strict.yaml", BAR_STRICT).unwrap();
    let legacy = &mesh.sleep[LEGACY];
    let (result, refused) = curl_until(node, legacy, &v4, Duration::from_secs(3), |c| c != 200);
    assert!(refused, "STRICT applies to plaintext clients: {result:?}");
    let (result, ok) = curl_until(node, sleep, &v4, Duration::from_secs(3), |c| c == 200);
    assert!(
        ok,
        "foo/sleep reaches STRICT bar/httpbin over IPv4: {result:?}"
    );
    let result = curl(node, sleep, &mapped);
    assert_eq!(
        result.code, 200,
        "through {mapped} foo/sleep must be meshed (mutual TLS) as over IPv4: {result:?}"
    );
}

/// Finding 2: IPv6 connects of an enrolled pod (global or link-local) went out in
/// plaintext, past a DENY. Every one must be captured or refused: refused towards an
/// address of a mesh pod that the agent does not know (these pods' `status.podIPs` are
/// IPv4 only), link-local ones refused, and towards anything else seen by the proxy.
#[test]
fn ipv6_connects_of_an_enrolled_pod_do_not_leave_the_mesh() {
    let mesh = mesh_serving_dual_stack(&[BAR, LEGACY]);
    let (node, sleep) = (&mesh.node, &mesh.sleep[FOO]);
    let (bar, legacy) = (&mesh.httpbin[BAR], &mesh.httpbin[LEGACY]);
    // The test bed's IPv6 works: unenrolled pods reach each other both ways.
    for url in [
        v6_url(legacy.ipv6(), DUAL_STACK_PORT),
        link_local_url(legacy, DUAL_STACK_PORT),
    ] {
        let result = curl(node, &mesh.sleep[LEGACY], &url);
        assert_eq!(
            result.code, 200,
            "legacy → legacy over IPv6 ({url}): {result:?}"
        );
    }

    node.write_file("deny.yaml", DENY_FOO_IN_BAR).unwrap();
    let v4 = url(bar.ip, DUAL_STACK_PORT);
    let (result, refused) = curl_until(node, sleep, &v4, Duration::from_secs(3), |c| c != 200);
    assert!(refused, "the DENY applies over IPv4: {result:?}");
    for url in [
        v6_url(bar.ipv6(), DUAL_STACK_PORT),
        link_local_url(bar, DUAL_STACK_PORT),
    ] {
        let result = curl(node, sleep, &url);
        assert_ne!(
            result.code, 200,
            "foo/sleep reached bar/httpbin over IPv6 ({url}) past a DENY: {result:?}"
        );
    }

    let global = v6_url(legacy.ipv6(), DUAL_STACK_PORT);
    let result = curl(node, sleep, &global);
    let seen = mesh
        .recorded("foo/sleep", "outbound")
        .unwrap()
        .iter()
        .any(|c| {
            c["destination"]
                .as_str()
                .is_some_and(|d| d.contains(&legacy.ipv6().to_string()))
        });
    assert!(
        result.code == 200 && seen,
        "foo/sleep → legacy/httpbin over IPv6 ({global}) goes through the proxy: {result:?}"
    );
    let link_local = link_local_url(legacy, DUAL_STACK_PORT);
    let result = curl(node, sleep, &link_local);
    assert_eq!(
        result.code, 0,
        "foo/sleep reached legacy/httpbin over link-local IPv6 ({link_local}): {result:?}"
    );
}

/// Finding 2: a non-mesh pod reached a STRICT pod over IPv6 when the application listens
/// on `::`. Every IPv6 TCP connection arriving at an enrolled pod at an address it is not
/// enrolled at (its `status.podIPs` are IPv4 only here) must be refused.
#[test]
fn ipv6_to_an_enrolled_pod_is_refused() {
    let mesh = mesh_serving_dual_stack(&[FOO, LEGACY]);
    let (node, client) = (&mesh.node, &mesh.sleep[LEGACY]);
    let (server, legacy) = (&mesh.httpbin[FOO], &mesh.httpbin[LEGACY]);
    let result = curl(node, client, &v6_url(legacy.ipv6(), DUAL_STACK_PORT));
    assert_eq!(result.code, 200, "legacy → legacy over IPv6: {result:?}");

    node.write_file("strict.yaml", FOO_STRICT).unwrap();
    let v4 = url(server.ip, DUAL_STACK_PORT);
    let (result, refused) = curl_until(node, client, &v4, Duration::from_secs(3), |c| c != 200);
    assert!(refused, "STRICT applies over IPv4: {result:?}");
    for url in [
        v6_url(server.ipv6(), DUAL_STACK_PORT),
        link_local_url(server, DUAL_STACK_PORT),
    ] {
        let result = curl(node, client, &url);
        assert_ne!(
            result.code, 200,
            "legacy/sleep reached STRICT foo/httpbin over IPv6 ({url}): {result:?}"
        );
    }
}

/// Finding 2: a pod whose `status.podIP` is IPv6 failed to enroll, and was left reachable
/// in plaintext. It is now meshed at that address, and only there: TCP to the addresses its
/// namespace has but its status does not show (its IPv4 address here, its link-local one)
/// is dropped, and its own connects, IPv4 included, go through the proxy.
#[test]
fn a_pod_whose_pod_ip_is_ipv6_is_meshed_and_reached_only_there() {
    let mut node = Node::new(binaries()).unwrap();
    node.namespace("foo", true).unwrap();
    node.namespace("legacy", false).unwrap();
    let six = node.pod("foo", "six").unwrap();
    node.set_pod_ip(&six, six.ipv6().into()).unwrap();
    let (client, web) = (
        node.pod("legacy", "client").unwrap(),
        node.pod("legacy", "web").unwrap(),
    );
    for pod in [&six, &web] {
        node.serve_http_dual_stack(pod, DUAL_STACK_PORT).unwrap();
    }
    node.start_agent().unwrap();
    assert_eq!(redirection(&node, "foo", "six")["state"], "redirected");

    let result = curl(&node, &client, &v6_url(six.ipv6(), DUAL_STACK_PORT));
    assert_eq!(
        result.code, 200,
        "legacy → foo/six at its IPv6 podIP: {result:?}"
    );
    assert!(
        result.body.contains(&client.ipv6().to_string()),
        "the application sees the client's IPv6 address: {result:?}"
    );
    let inbound = node
        .agent()
        .unwrap()
        .recorded("foo/six", "inbound")
        .unwrap();
    assert!(
        inbound.iter().any(|c| c["path"] == "plaintext-inbound"),
        "through the proxy: {inbound:#?}"
    );
    for url in [
        url(six.ip, DUAL_STACK_PORT),
        link_local_url(&six, DUAL_STACK_PORT),
    ] {
        let result = curl(&node, &client, &url);
        assert_eq!(
            result.code, 0,
            "foo/six was reached at {url}, an address it is not enrolled at: {result:?}"
        );
    }
    let result = curl(&node, &six, &url(web.ip, DUAL_STACK_PORT));
    assert_eq!(result.code, 200, "foo/six → legacy/web: {result:?}");
    let outbound = node
        .agent()
        .unwrap()
        .recorded("foo/six", "outbound")
        .unwrap();
    assert!(
        outbound
            .iter()
            .any(|c| c["destination"] == format!("{}:{DUAL_STACK_PORT}", web.ip).as_str()),
        "foo/six's IPv4 connect went through the proxy: {outbound:#?}"
    );
}

/// Finding 3: a pod process with `CAP_NET_RAW` set the proxy's mark on its socket and went
/// around the proxy, in plaintext past a DENY. The kernel must tell the proxy by something
/// a pod cannot forge: a marked connect is captured like any other.
#[test]
fn a_forged_proxy_mark_does_not_let_a_pod_around_the_proxy() {
    let mesh = mesh();
    let (node, sleep) = (&mesh.node, &mesh.sleep[FOO]);
    node.write_file("deny.yaml", DENY_FOO_IN_BAR).unwrap();
    let (result, refused) = curl_until(
        node,
        sleep,
        &mesh.url(BAR, "/ip"),
        Duration::from_secs(3),
        |c| c != 200,
    );
    assert!(refused, "the DENY applies: {result:?}");
    let bar = format!("{}:{HTTP_PORT}", mesh.httpbin[BAR].ip);
    for mark in [PROXY_MARK, PROXY_TRANSPARENT_MARK] {
        let report = probe(
            node,
            sleep,
            &["connect", &bar, "--mark", mark, "--send", HTTP_GET],
        );
        assert_eq!(
            report["answered"], false,
            "a socket marked {mark} reached bar/httpbin past a DENY: {report}"
        );
    }

    // Towards a destination outside the mesh the marked connect is let through, by the
    // proxy: it shows up as foo/sleep's outbound connection.
    let legacy = format!("{}:{HTTP_PORT}", mesh.httpbin[LEGACY].ip);
    let report = probe(
        node,
        sleep,
        &["connect", &legacy, "--mark", PROXY_MARK, "--send", HTTP_GET],
    );
    let recorded = mesh
        .recorded("foo/sleep", "outbound")
        .unwrap()
        .iter()
        .any(|c| c["destination"] == legacy.as_str());
    assert!(
        recorded,
        "a marked connect to {legacy} went around the proxy ({report}): {:#?}",
        mesh.recorded("foo/sleep", "outbound").unwrap()
    );
}

/// Finding 4: a pod relabelled so that a DENY selects it kept answering 200 on new streams
/// of HBONE connections pooled before the relabel. New requests must be refused within a
/// couple of seconds.
#[test]
fn a_relabel_that_brings_a_deny_applies_to_pooled_hbone_connections() {
    // Same-node traffic over HBONE, so that there is a pooled connection to test.
    let mut mesh = mesh_with(&["--same-node-shortcut=false"]);
    let (sleep, bar_url) = (mesh.sleep[FOO].clone(), mesh.url(BAR, "/ip"));
    // Establishes the pooled HBONE connection foo/sleep's proxy → bar/httpbin's.
    let result = curl(&mesh.node, &sleep, &bar_url);
    assert_eq!(result.code, 200, "{result:?}");

    mesh.node
        .write_file("deny-locked.yaml", &deny_locked("bar"))
        .unwrap();
    let target = mesh.httpbin[BAR].clone();
    mesh.node.label_pod(&target, "locked", "true").unwrap();
    let applied = within(Duration::from_secs(3), || {
        explain(&mesh, "foo/sleep", "bar/httpbin")["decision"] == "DENY"
    });
    assert!(
        applied.is_some(),
        "the agent took the relabel: {:#}",
        explain(&mesh, "foo/sleep", "bar/httpbin")
    );
    let (result, refused) = curl_until(&mesh.node, &sleep, &bar_url, Duration::from_secs(2), |c| {
        c != 200
    });
    assert!(
        refused,
        "bar/httpbin is locked, yet foo/sleep still gets 200: {result:?}"
    );
    for _ in 0..3 {
        let result = curl(&mesh.node, &sleep, &bar_url);
        assert_ne!(result.code, 200, "a locked pod answered again: {result:?}");
    }
}

/// Finding 4: a plaintext connection held open across a relabel was re-checked against the
/// pod as it was before, so a DENY selecting the new label left it open. It must be closed
/// within a few seconds.
#[test]
fn a_relabel_that_brings_a_deny_closes_held_plaintext_connections() {
    let mut mesh = mesh();
    let server = mesh.httpbin[FOO].clone();
    mesh.node.serve_hold(&server, HOLD_PORT).unwrap();
    mesh.node
        .write_file("deny-locked.yaml", &deny_locked("foo"))
        .unwrap();
    let target = format!("{}:{HOLD_PORT}", server.ip);
    let client = mesh.sleep[LEGACY].clone();
    let mut held = Held::start(
        &mesh.node,
        &client,
        &["open", &target, "1", "--echo", "--hold-seconds", "12"],
    );
    let opened = held.next_line();
    let since_open = Instant::now();
    assert_eq!(
        opened["echoed"], 1,
        "legacy/sleep holds a connection to foo/httpbin: {opened}"
    );

    mesh.node.label_pod(&server, "locked", "true").unwrap();
    let relabelled_ms = since_open.elapsed().as_millis();
    let applied = within(Duration::from_secs(3), || {
        explain(&mesh, "legacy/sleep", "foo/httpbin")["decision"] == "DENY"
    });
    assert!(applied.is_some(), "the agent took the relabel");
    let done = held.next_line();
    let closed_ms = done["last_closed_ms"].as_u64().map(u128::from);
    assert!(
        done["closed"] == 1 && closed_ms.is_some_and(|ms| ms < relabelled_ms + 4000),
        "the held connection must be closed within 4 s of the relabel (at {relabelled_ms} ms): {done}"
    );
}

/// Finding 5: relabelling released a pod's kernel entries before enrolling it again, and a
/// non-mesh client hammering a STRICT pod got plaintext connections through in that window.
/// Relabels (and an identity change) must never open one.
#[test]
fn relabelling_pods_never_opens_a_window_around_strict() {
    const RELABELS: usize = 8;
    let mut mesh = mesh();
    let (client, server) = (mesh.sleep[LEGACY].clone(), mesh.httpbin[FOO].clone());
    mesh.node.write_file("strict.yaml", FOO_STRICT).unwrap();
    let (result, refused) = curl_until(
        &mesh.node,
        &client,
        &mesh.url(FOO, "/ip"),
        Duration::from_secs(3),
        |c| c != 200,
    );
    assert!(refused, "STRICT applies: {result:?}");

    let target = format!("{}:{HTTP_PORT}", server.ip);
    let seconds = (RELABELS as f64 * 0.3 + 2.5).to_string();
    let args = [
        "hammer",
        target.as_str(),
        "--seconds",
        &seconds,
        "--timeout-ms",
        "500",
    ];
    let hammer = probe_command(&mesh.node, &client, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the hammer");
    std::thread::sleep(Duration::from_millis(700));
    for i in 0..RELABELS {
        let value = if i % 2 == 0 { "a" } else { "b" };
        mesh.node
            .label_namespace_pods("foo", "revision", value)
            .unwrap();
        if i == RELABELS / 2 {
            // A new identity re-enrolls the pod too.
            mesh.node
                .set_service_account(&server, "httpbin-v2")
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let output = hammer.wait_with_output().expect("the hammer");
    let report = last_json(&output.stdout, &output.stderr, &args);
    assert!(
        report["connected"].as_u64() > Some(2000),
        "the hammer must connect often enough to find a window: {report}"
    );
    assert_eq!(
        report["answered"], 0,
        "plaintext requests reached STRICT foo/httpbin during {RELABELS} relabels: {report}"
    );
    let state = redirection(&mesh.node, "foo", "httpbin");
    assert_eq!(state["state"], "redirected", "{state:#}");
}

/// Finding 6a: TLS handshakes on 15008 that never start stayed open forever. With
/// `--handshake-timeout 2s` the proxy must close them shortly after 2 s.
#[test]
fn half_open_handshakes_are_closed_after_the_handshake_timeout() {
    const CONNECTIONS: &str = "200";
    let mesh = mesh_with(&["--handshake-timeout", "2s"]);
    let target = format!("{}:15008", mesh.httpbin[FOO].ip);
    let mut held = Held::start(
        &mesh.node,
        &mesh.sleep[LEGACY],
        &[
            "open",
            &target,
            CONNECTIONS,
            "--hold-seconds",
            "12",
            "--timeout-ms",
            "3000",
        ],
    );
    let opened = held.next_line();
    assert!(
        opened["connected"].as_u64() > Some(0),
        "legacy/sleep connects to 15008: {opened}"
    );
    let done = held.next_line();
    assert!(
        done["closed"] == opened["connected"]
            && done["last_closed_ms"].as_u64().is_some_and(|ms| ms < 5000),
        "every silent connection to 15008 must be closed within 2 s + 3 s of slack: {done}"
    );
    assert_mesh_healthy(&mesh, "after the half-open handshakes");
}

/// Finding 6b: a non-mesh client opening more idle connections (to 15008 and to a plain
/// port) than the agent has descriptors starved every meshed connection and configuration
/// reloads. While such a flood holds, the mesh must still serve and apply a new policy.
#[test]
fn a_connection_flood_starves_neither_the_mesh_nor_config_reloads() {
    const NOFILE: u64 = 4096;
    const PER_PORT: &str = "3000";
    let agent = AgentOptions {
        nofile: Some(NOFILE),
        ..AgentOptions::default()
    };
    let mesh = Mesh::with_agent(binaries(), &agent).expect("mesh");
    let (node, attacker) = (&mesh.node, &mesh.sleep[LEGACY]);
    let server = &mesh.httpbin[FOO];
    let mut floods: Vec<Held> = [15008, HTTP_PORT]
        .iter()
        .map(|port| {
            let target = format!("{}:{port}", server.ip);
            Held::start(
                node,
                attacker,
                &[
                    "open",
                    &target,
                    PER_PORT,
                    "--hold-seconds",
                    "40",
                    "--timeout-ms",
                    "3000",
                ],
            )
        })
        .collect();
    let opened: Vec<Value> = floods.iter_mut().map(Held::next_line).collect();
    let pid = node.agent().unwrap().pid();
    let context = format!(
        "while legacy/sleep holds {opened:?} (agent at {} of {NOFILE} descriptors)",
        fd_count(pid)
    );
    assert_mesh_healthy(&mesh, &context);
    drop(floods);
}

/// Finding 6c: upstream connects had no timeout and the HBONE pool held its slot lock
/// while connecting, so a destination that accepts TCP but never answers TLS hung every
/// new connection to it. With `--connect-timeout 2s` both of two concurrent requests must
/// fail quickly, and other destinations keep working meanwhile.
#[test]
fn a_destination_that_stalls_tls_does_not_hang_connections_to_it() {
    let mut mesh = mesh_with(&["--connect-timeout", "2s"]);
    // A mesh pod "on another node": this node's agent tunnels to its IP on 15008, where
    // a server accepts and never answers.
    let stalled = mesh
        .node
        .pod_on(
            "elsewhere",
            "bar",
            "stalled",
            "stalled",
            &[("app", "stalled")],
        )
        .unwrap();
    let probe = mesh.node.binaries.probe.to_string_lossy().into_owned();
    mesh.node
        .serve(&stalled, &probe, &["sink", "15008"], 15008)
        .unwrap();
    let other = within(Duration::from_secs(3), || {
        redirection(&mesh.node, "bar", "stalled")["state"] == "other-node"
    });
    assert!(other.is_some(), "the agent knows bar/stalled");

    let sleep = mesh.sleep[FOO].clone();
    let start = Instant::now();
    let requests: Vec<Child> = (0..2)
        .map(|_| {
            mesh.node
                .command(&sleep, "curl")
                .args(["-sS", "--max-time", "20", "-o", "/dev/null", "-w"])
                .arg("%{http_code}")
                .arg(url(stalled.ip, HTTP_PORT))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("curl")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let meanwhile = curl(&mesh.node, &sleep, &mesh.url(BAR, "/ip"));
    let mut outcomes = Vec::new();
    for request in requests {
        let output = request.wait_with_output().expect("curl");
        outcomes.push((
            String::from_utf8_lossy(&output.stdout).into_owned(),
            start.elapsed(),
        ));
    }
    assert_eq!(
        meanwhile.code, 200,
        "foo/sleep → bar/httpbin while bar/stalled hangs: {meanwhile:?}"
    );
    for (code, took) in &outcomes {
        assert!(
            code != "200" && *took < Duration::from_secs(8),
            "requests to a stalled peer must fail within 8 s with a 2 s connect timeout: {outcomes:?}"
        );
    }
}

/// Finding 6d: an authenticated peer could open unlimited streams, each holding an
/// upstream connection. With `--max-inbound-per-source 5`, at most 5 of 10 held
/// connections get through, and new ones do once those close.
#[test]
fn inbound_connections_per_source_are_capped() {
    let mut mesh = mesh_with(&["--max-inbound-per-source", "5"]);
    let server = mesh.httpbin[BAR].clone();
    mesh.node.serve_hold(&server, HOLD_PORT).unwrap();
    let target = format!("{}:{HOLD_PORT}", server.ip);
    let sleep = mesh.sleep[FOO].clone();
    let open = |count: &str, hold: &str| {
        let mut held = Held::start(
            &mesh.node,
            &sleep,
            &[
                "open",
                &target,
                count,
                "--echo",
                "--hold-seconds",
                hold,
                "--timeout-ms",
                "3000",
            ],
        );
        let opened = held.next_line();
        let _done = held.next_line();
        opened
    };
    let first = open("10", "2");
    let echoed = first["echoed"].as_u64().unwrap_or(0);
    assert!(
        (1..=5).contains(&echoed),
        "10 held connections from foo/sleep with a cap of 5 per source: {first}"
    );
    let mut again = Value::Null;
    let recovered = within(Duration::from_secs(5), || {
        again = open("5", "0");
        again["echoed"] == 5
    });
    assert!(
        recovered.is_some(),
        "once they closed, new connections get through: {again}"
    );
}

/// An authenticated peer could open an HBONE connection per stream, each able to make the
/// proxy buffer a receive window of data the application does not read. With
/// `--max-hbone-connections-per-source 3`, a peer (Python's `h2`, a valid certificate)
/// holding 3 gets its 4th refused with a `GOAWAY` naming the limit, counted by name, while
/// another identity from the same address is served and the 3 held ones keep working.
#[test]
fn hbone_connections_past_the_per_source_limit_are_refused_by_name() {
    const HELD: usize = 3;
    const ENHANCE_YOUR_CALM: u64 = 0xb;
    let mesh = mesh_with(&["--max-hbone-connections-per-source", &HELD.to_string()]);
    let dir = tempfile::tempdir().unwrap();
    let certificate = |name: &str| {
        let dir = dir.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let id = format!("spiffe://cluster.local/ns/remote/sa/{name}");
        mesh.node.workload_certificate(&dir, &id).unwrap()
    };
    let ([cert, key], [other_cert, other_key]) = (certificate("peer"), certificate("other"));
    let output = mesh
        .node
        .hbone_peer("connection_limit.py", &mesh.httpbin[FOO], HTTP_PORT)
        .arg(mesh.node.root_cert())
        .arg(HELD.to_string())
        .args([&cert, &key, &other_cert, &other_key])
        .output()
        .expect("python3 runs (cargo xtask setup installs h2)");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let answer: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    let refused = &answer["refused"];
    assert_eq!(refused["goaway"], ENHANCE_YOUR_CALM, "{answer}");
    assert_eq!(refused["debug"], "hbone-connections-per-source", "{answer}");
    assert_eq!(
        refused["status"],
        Value::Null,
        "no stream answered: {answer}"
    );
    for served in ["other", "held_tunnel", "held_new_stream"] {
        let response = answer[served].as_str().unwrap_or_default();
        assert!(
            response.starts_with("HTTP/1.1 200") && response.contains("\"origin\""),
            "{served}: {answer}"
        );
    }
    // Counted and logged as the refusal ends, which the peer does not wait for.
    let agent = mesh.node.agent().unwrap();
    let counted =
        r#"ambit_hbone_connections_refused_total{limit="hbone-connections-per-source"} 1"#;
    let logged = |line: &str| {
        line.contains("HBONE connection refused")
            && line.contains(r#"limit="hbone-connections-per-source""#)
    };
    let seen = within(Duration::from_secs(3), || {
        let metrics = agent.metrics_text().unwrap_or_default();
        metrics.lines().any(|line| line == counted) && agent.log_text().lines().any(logged)
    });
    assert!(
        seen.is_some(),
        "{counted}, and a log line naming the limit:\n{}\n{}",
        agent.metrics_text().unwrap_or_default(),
        agent.log_text()
    );
}

/// What the agent changed in a pod's namespace: the two sysctls and the policy rule of the
/// return path (`ip rule` lists it with the proxy's transparent mark), and the same for
/// IPv6 (`net.ipv6.fwmark_reflect`, `ip -6 rule`).
fn pod_settings(pod: &Pod) -> [(String, String, bool); 2] {
    let read = |args: &[&str]| {
        let output = ambit_tests::check(
            std::process::Command::new("ip")
                .args(["netns", "exec", &pod.netns])
                .args(args),
        )
        .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    [
        (
            read(&["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]),
            read(&["cat", "/proc/sys/net/ipv4/fwmark_reflect"]),
            read(&["ip", "rule", "show"]).contains("0xa3b0001"),
        ),
        (
            read(&["cat", "/proc/sys/net/ipv4/tcp_fwmark_accept"]),
            read(&["cat", "/proc/sys/net/ipv6/fwmark_reflect"]),
            read(&["ip", "-6", "rule", "show"]).contains("0xa3b0001"),
        ),
    ]
}

/// A pod that leaves the mesh gets back the sysctls and routes the agent set in its
/// namespace, as they were before it was enrolled; for a pod with an IPv6 address the IPv6
/// ones too (an IPv4 pod's are never touched).
#[test]
fn a_pod_leaving_the_mesh_gets_its_settings_back() {
    for (stack, ipv6) in [(Stack::V4, false), (Stack::Dual, true)] {
        pod_leaves_the_mesh_and_gets_its_settings_back(stack, ipv6);
    }
}

fn pod_leaves_the_mesh_and_gets_its_settings_back(stack: Stack, ipv6: bool) {
    let mut mesh = Mesh::with_stack(binaries(), stack).expect("mesh");
    let pod = mesh.sleep[FOO].clone();
    let on = ("1".to_owned(), "1".to_owned(), true);
    let off = ("0".to_owned(), "0".to_owned(), false);
    let enrolled = pod_settings(&pod);
    let expected_v6 = if ipv6 {
        on.clone()
    } else {
        ("1".into(), "0".into(), false)
    };
    assert_eq!(enrolled, [on, expected_v6], "while enrolled ({stack:?})");
    mesh.node
        .label_pod(&pod, "ambit.io/mesh", "disabled")
        .unwrap();
    let left = within(Duration::from_secs(3), || {
        redirection(&mesh.node, "foo", "sleep")["state"] == "opted-out"
    });
    assert!(left.is_some(), "foo/sleep did not leave the mesh");
    assert_eq!(
        pod_settings(&pod),
        [off.clone(), off],
        "after leaving the mesh, the namespace's defaults must be back ({stack:?})"
    );
}
