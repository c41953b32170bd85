//! End to end: Istio's standard metrics and the access log, for meshed (`foo/sleep` →
//! `bar/httpbin`, HBONE: the agent runs with `--same-node-shortcut=false`, since the HBONE
//! metadata is part of what is tested; `same_node.rs` checks the shortcut's), plaintext (`legacy/sleep` → `foo/httpbin`, `foo/sleep` →
//! `legacy/httpbin`), denied (a DENY AuthorizationPolicy) and per-request (an L7 policy)
//! traffic. Counters are compared, series by series, against what curl says it sent and
//! received; the text must parse with Prometheus' own parser (the `prometheus_client`
//! Python package).

use std::{
    collections::BTreeMap,
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use ambit_tests::{
    AgentOptions,
    mesh::{
        BAR, FOO, HTTP_PORT, LEGACY, Mesh,
        policies::{DENY_FOO_IN_BAR, get_not_admin},
        within,
    },
};
use serde_json::Value;

/// What one curl did, by curl's own count: the bytes of its request (line, headers, body)
/// and of the response (headers, body).
#[derive(Debug)]
struct Exchange {
    code: u16,
    sent: u64,
    received: u64,
}

/// One request from `namespace from`'s sleep to `namespace to`'s httpbin, with a 1000-byte
/// header so that the sizes are not those of any other request.
fn exchange(mesh: &Mesh, from: usize, to: usize, path: &str) -> Exchange {
    let mut cmd = mesh.node.command(&mesh.sleep[from], "curl");
    cmd.args(["-sS", "--max-time", "3", "-o", "/dev/null", "-H"])
        .arg(format!("X-Pad: {}", "x".repeat(1000)))
        .args([
            "-w",
            "%{http_code} %{size_request} %{size_upload} %{size_header} %{size_download}",
        ])
        .arg(mesh.url(to, path));
    let output = cmd.output().expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout);
    let n: Vec<u64> = text
        .split_whitespace()
        .map(|v| v.parse().expect("curl prints numbers"))
        .collect();
    assert_eq!(n.len(), 5, "curl printed {text:?}");
    Exchange {
        code: u16::try_from(n[0]).expect("an HTTP status"),
        sent: n[1] + n[2],
        received: n[3] + n[4],
    }
}

fn mesh() -> Mesh {
    let options = AgentOptions::args(&["--same-node-shortcut=false"]);
    Mesh::with_agent(ambit_tests::test_binaries!(), &options).expect("mesh")
}

/// Meshed: `foo/sleep` → `bar/httpbin` over HBONE.
fn meshed(mesh: &Mesh) -> Exchange {
    let exchange = exchange(mesh, FOO, BAR, "/ip");
    assert_eq!(exchange.code, 200, "{exchange:?}");
    exchange
}

/// Plaintext both ways across the mesh's edge: `legacy/sleep` → `foo/httpbin` (inbound),
/// `foo/sleep` → `legacy/httpbin` (outbound).
fn plaintext(mesh: &Mesh) -> (Exchange, Exchange) {
    let inbound = exchange(mesh, LEGACY, FOO, "/ip");
    let outbound = exchange(mesh, FOO, LEGACY, "/ip");
    assert_eq!(
        (inbound.code, outbound.code),
        (200, 200),
        "{inbound:?} {outbound:?}"
    );
    (inbound, outbound)
}

/// Puts `bar/deny-foo` in force (waiting until `foo` is refused), and returns once it is.
fn deny_foo_in_bar(mesh: &Mesh) {
    mesh.node.write_file("deny.yaml", DENY_FOO_IN_BAR).unwrap();
    let refused = within(Duration::from_secs(3), || {
        exchange(mesh, FOO, BAR, "/ip").code == 0
    });
    assert!(refused.is_some(), "bar/deny-foo was not put in force");
}

/// Puts `foo/get-not-admin` in force (an L7 policy: `foo/httpbin` is served request by
/// request), and returns once it is.
fn get_not_admin_in_foo(mesh: &Mesh) {
    mesh.node
        .write_file("l7.yaml", &get_not_admin("foo"))
        .unwrap();
    let applied = within(Duration::from_secs(3), || {
        exchange(mesh, BAR, FOO, "/admin").code == 403
    });
    assert!(applied.is_some(), "foo/get-not-admin was not put in force");
}

/// A label set.
type Labels = BTreeMap<String, String>;

/// A scrape: its text, and each sample's name, labels and value.
struct Scrape {
    text: String,
    samples: Vec<(String, Labels, f64)>,
}

impl Scrape {
    fn of(mesh: &Mesh) -> Self {
        let text = mesh.node.agent().unwrap().metrics_text().expect("scrape");
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("name and value");
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (name, parse_labels(labels.trim_end_matches('}'))),
                    None => (series, Labels::new()),
                };
                (name.to_owned(), labels, value.parse().expect("a number"))
            })
            .collect();
        Self { text, samples }
    }

    /// The value of the series `name` with exactly `labels`; 0 when absent.
    fn value(&self, name: &str, labels: &Labels) -> f64 {
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .map_or(0.0, |(_, _, value)| *value)
    }
}

/// `k="v",k="v"`; no value here holds a quote or a comma.
fn parse_labels(text: &str) -> Labels {
    text.split("\",")
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once("=\"").expect("k=\"v\"");
            (key.to_owned(), value.trim_end_matches('"').to_owned())
        })
        .collect()
}

/// Istio's labels of a TCP connection from `from`'s sleep to `to`'s httpbin.
fn tcp(reporter: &str, from: &str, to: &str, mtls: bool, flags: &str) -> Labels {
    let principal = |namespace: &str, account: &str| match mtls {
        true => format!("spiffe://cluster.local/ns/{namespace}/sa/{account}"),
        false => "unknown".to_owned(),
    };
    [
        ("reporter", reporter.to_owned()),
        ("source_workload", "sleep".to_owned()),
        ("source_workload_namespace", from.to_owned()),
        ("source_principal", principal(from, "sleep")),
        ("destination_workload", "httpbin".to_owned()),
        ("destination_workload_namespace", to.to_owned()),
        ("destination_principal", principal(to, "httpbin")),
        ("destination_service", "unknown".to_owned()),
        ("request_protocol", "tcp".to_owned()),
        ("response_flags", flags.to_owned()),
        (
            "connection_security_policy",
            if mtls { "mutual_tls" } else { "none" }.to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The same labels as a request's: its protocol, flags and status.
fn request(mut labels: Labels, flags: &str, code: u16) -> Labels {
    labels.insert("request_protocol".to_owned(), "http".to_owned());
    labels.insert("response_flags".to_owned(), flags.to_owned());
    labels.insert("response_code".to_owned(), code.to_string());
    labels
}

const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const SENT: &str = "istio_tcp_sent_bytes_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";

/// Scrapes until every `(name, labels, by)` has grown by `by` since `before` (connections
/// are counted closed once both proxies are done with them), and returns that scrape.
fn scrape_after(mesh: &Mesh, before: &Scrape, series: &[(&str, &Labels, f64)]) -> Scrape {
    let mut last = Scrape::of(mesh);
    let grown = |scrape: &Scrape| {
        series.iter().all(|(name, labels, by)| {
            scrape.value(name, labels) - before.value(name, labels) >= *by
        })
    };
    let reached = within(Duration::from_secs(5), || {
        last = Scrape::of(mesh);
        grown(&last)
    });
    assert!(reached.is_some(), "{series:?} did not grow:\n{}", last.text);
    last
}

/// Asserts that a connection of `labels` (one, `exchange`'s) was counted opened and closed
/// between `before` and `after`, with the bytes curl counted.
fn assert_connection(before: &Scrape, after: &Scrape, labels: &Labels, exchange: &Exchange) {
    let delta = |name| after.value(name, labels) - before.value(name, labels);
    assert_eq!(delta(OPENED), 1.0, "{labels:?}\n{}", after.text);
    assert_eq!(delta(CLOSED), 1.0, "{labels:?}\n{}", after.text);
    // Istio's sense: received during request (client to destination), sent during response.
    assert_eq!(delta(RECEIVED), exchange.sent as f64, "{labels:?}");
    assert_eq!(delta(SENT), exchange.received as f64, "{labels:?}");
}

#[test]
fn istio_metrics_count_meshed_plaintext_denied_and_http_traffic_as_sent() {
    let mesh = mesh();

    let before = Scrape::of(&mesh);
    let sent = meshed(&mesh);
    let destination = tcp("destination", "foo", "bar", true, "-");
    let source = tcp("source", "foo", "bar", true, "-");
    let after = scrape_after(
        &mesh,
        &before,
        &[(CLOSED, &destination, 1.0), (CLOSED, &source, 1.0)],
    );
    assert_connection(&before, &after, &destination, &sent);
    assert_connection(&before, &after, &source, &sent);

    let before = after;
    let (inbound, outbound) = plaintext(&mesh);
    let from_legacy = tcp("destination", "legacy", "foo", false, "-");
    let to_legacy = tcp("source", "foo", "legacy", false, "-");
    let after = scrape_after(
        &mesh,
        &before,
        &[(CLOSED, &from_legacy, 1.0), (CLOSED, &to_legacy, 1.0)],
    );
    assert_connection(&before, &after, &from_legacy, &inbound);
    assert_connection(&before, &after, &to_legacy, &outbound);

    deny_foo_in_bar(&mesh);
    let before = Scrape::of(&mesh);
    assert_eq!(exchange(&mesh, FOO, BAR, "/ip").code, 0);
    let refused = tcp("destination", "foo", "bar", true, "DENY");
    let refused_at_source = tcp("source", "foo", "bar", true, "DENY");
    let after = scrape_after(
        &mesh,
        &before,
        &[(CLOSED, &refused, 1.0), (CLOSED, &refused_at_source, 1.0)],
    );
    let delta = |name, labels: &Labels| after.value(name, labels) - before.value(name, labels);
    assert_eq!(delta(CLOSED, &refused), 1.0, "{}", after.text);
    assert_eq!(
        delta(OPENED, &destination),
        1.0,
        "opened before it was refused"
    );
    assert_eq!(delta(CLOSED, &destination), 0.0);
    let decision = [
        ("policy", "bar/deny-foo"),
        ("action", "DENY"),
        ("decision", "deny"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into();
    assert_eq!(
        delta("ambit_authorization_decisions_total", &decision),
        1.0,
        "{}",
        after.text
    );

    get_not_admin_in_foo(&mesh);
    let before = Scrape::of(&mesh);
    assert_eq!(exchange(&mesh, BAR, FOO, "/ip").code, 200);
    assert_eq!(exchange(&mesh, BAR, FOO, "/admin").code, 403);
    let connection = tcp("destination", "bar", "foo", true, "-");
    let allowed = request(connection.clone(), "-", 200);
    let denied = request(connection.clone(), "DENY", 403);
    let after = scrape_after(
        &mesh,
        &before,
        &[
            ("istio_requests_total", &allowed, 1.0),
            ("istio_requests_total", &denied, 1.0),
            (CLOSED, &connection, 2.0),
        ],
    );
    let delta = |name, labels: &Labels| after.value(name, labels) - before.value(name, labels);
    assert_eq!(delta("istio_requests_total", &allowed), 1.0);
    assert_eq!(delta("istio_requests_total", &denied), 1.0);
    assert_eq!(
        delta("istio_request_duration_milliseconds_count", &allowed),
        1.0
    );
    assert_eq!(delta(CLOSED, &connection), 2.0, "one connection per curl");

    assert_prometheus_parses(&after, &destination);
}

/// Prometheus' own parser reads the whole text, with the types ambit declared and the
/// values ambit's text gives.
fn assert_prometheus_parses(scrape: &Scrape, meshed: &Labels) {
    const PARSE: &str = "
import json, sys
from prometheus_client.parser import text_string_to_metric_families
families = {
    f.name: {'type': f.type, 'samples': [[s.name, s.labels, s.value] for s in f.samples]}
    for f in text_string_to_metric_families(sys.stdin.read())
}
print(json.dumps(families))
";
    let mut python = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs (cargo xtask setup installs prometheus-client)");
    python
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.text.as_bytes())
        .unwrap();
    let output = python.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "Prometheus' parser rejects the text: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        scrape.text
    );
    let families: Value = serde_json::from_slice(&output.stdout).unwrap();
    for (family, kind) in [
        ("istio_tcp_connections_opened", "counter"),
        ("istio_tcp_connections_closed", "counter"),
        ("istio_tcp_sent_bytes", "counter"),
        ("istio_tcp_received_bytes", "counter"),
        ("istio_requests", "counter"),
        ("istio_request_duration_milliseconds", "histogram"),
        ("ambit_authorization_decisions", "counter"),
        ("ambit_config_reloads", "counter"),
        ("ambit_certificate_expiry_timestamp_seconds", "gauge"),
        ("ambit_hbone_pool_connections", "gauge"),
        ("ambit_pods", "gauge"),
        ("ambit_process_cpu_seconds", "counter"),
        ("ambit_process_resident_memory_bytes", "gauge"),
    ] {
        assert_eq!(families[family]["type"], kind, "{family}: {families}");
    }
    // The seed's pods: sleep and httpbin in each namespace, foo and bar enrolled.
    let pods = |namespace: &str, state: &str| {
        families["ambit_pods"]["samples"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s[1] == serde_json::json!({"namespace": namespace, "state": state}))
            .map(|s| s[2].as_f64().unwrap())
    };
    assert_eq!(pods("foo", "redirected"), Some(2.0));
    assert_eq!(pods("legacy", "not-enrolled"), Some(2.0));
    assert_eq!(pods("legacy", "redirected"), None);
    let want: serde_json::Map<String, Value> = meshed
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
        .collect();
    let parsed = families["istio_tcp_connections_opened"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[1] == Value::Object(want.clone()))
        .map(|s| s[2].as_f64().unwrap());
    assert_eq!(parsed, Some(scrape.value(OPENED, meshed)));
}

/// The access log lines whose fields at the JSON pointers in `want` have those values.
fn lines(mesh: &Mesh, want: &[(&str, Value)]) -> Vec<Value> {
    let lines = mesh.node.agent().unwrap().access_log_lines().unwrap();
    lines
        .into_iter()
        .filter(|l| want.iter().all(|(at, v)| l.pointer(at) == Some(v)))
        .collect()
}

/// Waits for one access log line matching `want` and returns it.
fn logged(mesh: &Mesh, want: &[(&str, Value)]) -> Value {
    let mut found = Vec::new();
    let seen = within(Duration::from_secs(5), || {
        found = lines(mesh, want);
        !found.is_empty()
    });
    let all = mesh.node.agent().unwrap().access_log_lines().unwrap();
    assert!(seen.is_some(), "no line with {want:?} in {all:#?}");
    found.remove(0)
}

#[test]
fn the_access_log_has_a_line_per_connection_and_request_with_both_ends_and_the_decision() {
    let mesh = mesh();
    let (foo, bar, legacy) = (
        mesh.sleep[FOO].ip.to_string(),
        mesh.httpbin[BAR].ip.to_string(),
        mesh.sleep[LEGACY].ip.to_string(),
    );
    let principal =
        |ns: &str, sa: &str| Value::from(format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"));
    let from = |ip: &str| format!("{ip}:");

    let sent = meshed(&mesh);
    let mut traces = Vec::new();
    for path in ["hbone", "hbone-inbound"] {
        let line = logged(
            &mesh,
            &[
                ("/kind", "connection".into()),
                ("/path", path.into()),
                ("/destination/address", format!("{bar}:8000").into()),
            ],
        );
        assert!(
            line["source"]["address"]
                .as_str()
                .unwrap()
                .starts_with(&from(&foo))
        );
        assert_eq!(line["source"]["workload"], "sleep", "{line}");
        assert_eq!(line["source"]["namespace"], "foo", "{line}");
        assert_eq!(
            line["source"]["principal"],
            principal("foo", "sleep"),
            "{line}"
        );
        assert_eq!(line["destination"]["workload"], "httpbin", "{line}");
        assert_eq!(line["destination"]["namespace"], "bar", "{line}");
        assert_eq!(
            line["destination"]["principal"],
            principal("bar", "httpbin")
        );
        assert_eq!(line["mtls"], true);
        assert_eq!(line["bytes_sent"], sent.sent, "{line}");
        assert_eq!(line["bytes_received"], sent.received, "{line}");
        assert_eq!(line["close_reason"], "done", "{line}");
        assert!(
            line["duration_ms"].is_u64() && line["time"].is_string(),
            "{line}"
        );
        // The destination's proxy decides; no policy applies, so none decided.
        let decision = if path == "hbone" {
            Value::Null
        } else {
            "allow".into()
        };
        assert_eq!(line["decision"], decision, "{line}");
        assert_eq!(line["policy"], Value::Null, "{line}");
        let forwarded_for = if path == "hbone" {
            Value::Null
        } else {
            foo.clone().into()
        };
        assert_eq!(line["forwarded_for"], forwarded_for, "{line}");
        traces.push(line["trace_id"].clone());
    }
    // The source's proxy starts the trace and sends it in the tunnel's `traceparent`.
    assert!(
        traces[0].as_str().is_some_and(|t| t.len() == 32) && traces[0] == traces[1],
        "both proxies log the connection's trace: {traces:?}"
    );

    let (inbound, _) = plaintext(&mesh);
    let line = logged(&mesh, &[("/path", "plaintext-inbound".into())]);
    assert!(
        line["source"]["address"]
            .as_str()
            .unwrap()
            .starts_with(&from(&legacy))
    );
    assert_eq!(line["source"]["workload"], "sleep");
    assert_eq!(line["source"]["namespace"], "legacy");
    assert_eq!(
        line["source"]["principal"],
        Value::Null,
        "plaintext proves no identity"
    );
    assert_eq!(line["destination"]["namespace"], "foo");
    assert_eq!(line["mtls"], false);
    assert_eq!(line["bytes_sent"], inbound.sent);
    assert_eq!(line["bytes_received"], inbound.received);

    deny_foo_in_bar(&mesh);
    // The refusal that proved the policy in force may be a connection admitted just before
    // and closed by the re-check (at the source: an I/O error); this one meets it at
    // admission.
    assert_eq!(exchange(&mesh, FOO, BAR, "/ip").code, 0);
    let refused = logged(
        &mesh,
        &[
            ("/path", "hbone-inbound".into()),
            ("/close_reason", "denied".into()),
        ],
    );
    assert_eq!(refused["decision"], "deny", "{refused}");
    assert_eq!(refused["policy"], "bar/deny-foo", "{refused}");
    assert_eq!(refused["rule"], 0, "{refused}");
    assert_eq!(refused["source"]["principal"], principal("foo", "sleep"));
    let at_source = logged(
        &mesh,
        &[
            ("/path", "hbone".into()),
            ("/close_reason", "denied".into()),
        ],
    );
    assert!(
        at_source["error"].as_str().unwrap().contains("401"),
        "{at_source}"
    );

    get_not_admin_in_foo(&mesh);
    assert_eq!(exchange(&mesh, BAR, FOO, "/ip").code, 200);
    let denied = logged(
        &mesh,
        &[
            ("/kind", "request".into()),
            ("/status", 403.into()),
            ("/source/namespace", "bar".into()),
        ],
    );
    assert_eq!(denied["request_path"], "/admin", "{denied}");
    assert_eq!(denied["method"], "GET");
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["policy"], "foo/get-not-admin");
    assert_eq!(denied["destination"]["workload"], "httpbin");
    let allowed = logged(
        &mesh,
        &[("/kind", "request".into()), ("/status", 200.into())],
    );
    assert_eq!(allowed["request_path"], "/ip");
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["policy"], "foo/get-not-admin");
    assert_eq!(allowed["rule"], 0);
}

/// A peer that is not ambit: one `CONNECT` shaped as ztunnel's outbound path sends it
/// (`baggage`, `forwarded`, `traceparent`), by Python's `h2` over Python's TLS, with the
/// certificate of a workload this node does not know, from an address no pod has. It is
/// served, and the destination's metrics and access log name the client from its baggage
/// (within the namespace its certificate proves), with its trace and claimed address.
#[test]
fn a_connect_shaped_as_ztunnels_is_served_and_its_peer_metadata_read() {
    const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    const BAGGAGE: &str = "k8s.cluster.name=Kubernetes,k8s.namespace.name=remote,\
                           k8s.deployment.name=web,service.name=web,service.version=v1";
    let mesh = mesh();
    let dir = tempfile::tempdir().unwrap();
    let principal = "spiffe://cluster.local/ns/remote/sa/web";
    let [cert, key] = mesh
        .node
        .workload_certificate(dir.path(), principal)
        .unwrap();
    let before = Scrape::of(&mesh);
    let output = mesh
        .node
        .hbone_peer("ztunnel_connect.py", &mesh.httpbin[FOO], HTTP_PORT)
        .args([&cert, &key])
        .arg(mesh.node.root_cert())
        .args([
            BAGGAGE,
            "for=10.99.0.7",
            &format!("00-{TRACE_ID}-b7ad6b7169203331-01"),
        ])
        .output()
        .expect("python3 runs (cargo xtask setup installs h2)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    let answer: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(answer["status"], 200, "{answer}");
    let response = answer["response"].as_str().unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200")
            && response.contains(&format!("\"origin\":\"{}\"", mesh.node.ip())),
        "the application answers and sees the client's address: {answer}"
    );

    let line = logged(
        &mesh,
        &[
            ("/path", "hbone-inbound".into()),
            ("/trace_id", TRACE_ID.into()),
        ],
    );
    assert_eq!(line["forwarded_for"], "10.99.0.7", "{line}");
    assert_eq!(line["source"]["principal"], principal, "{line}");
    assert_eq!(line["source"]["workload"], "web", "{line}");
    assert_eq!(line["source"]["namespace"], "remote", "{line}");
    assert_eq!(line["close_reason"], "done", "{line}");

    let mut labels = tcp("destination", "remote", "foo", true, "-");
    labels.insert("source_workload".into(), "web".into());
    labels.insert("source_principal".into(), principal.into());
    let after = scrape_after(&mesh, &before, &[(CLOSED, &labels, 1.0)]);
    let delta = |name| after.value(name, &labels) - before.value(name, &labels);
    assert_eq!(delta(OPENED), 1.0, "{labels:?}\n{}", after.text);
}
