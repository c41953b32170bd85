//! `ambit explain` as users run it: the built binary on a directory of YAML.

use std::{path::Path, process::Command};

const CONFIG: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {ambit.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bar, labels: {ambit.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: foo, labels: {app: sleep}}
spec: {serviceAccountName: sleep}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: bar, labels: {app: httpbin}}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: legacy}
status: {podIP: 10.0.9.9}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bar}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: bar}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]
    to: [{operation: {methods: [GET], paths: [\"/get*\"]}}]
";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn explain(dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_ambit"))
        .arg("explain")
        .arg("--config-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    Run {
        code: output.status.code().unwrap(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

fn config() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), CONFIG).unwrap();
    dir
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

const TO_HTTPBIN: [&str; 4] = ["--to", "bar/httpbin", "--port", "8000"];

#[test]
fn allowed_request_exits_0_with_the_deciding_rule() {
    let dir = config();
    let mut args = vec![
        "--from",
        "foo/sleep",
        "--method",
        "GET",
        "--path",
        "/get?x=1",
    ];
    args.extend(TO_HTTPBIN);
    args.extend(["--output", "json"]);
    let run = explain(dir.path(), &args);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        json(&run),
        serde_json::json!({
            "decision": "ALLOW", "mtls": "STRICT", "policy": "bar/allow-sleep",
            "action": "ALLOW", "rule": 0, "reason": "an ALLOW rule matched"
        })
    );
}

#[test]
fn denied_request_exits_1() {
    let dir = config();
    let mut args = vec!["--from", "foo/sleep", "--method", "POST", "--path", "/get"];
    args.extend(TO_HTTPBIN);
    args.extend(["--output", "json"]);
    let run = explain(dir.path(), &args);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let v = json(&run);
    assert_eq!(v["decision"], "DENY");
    assert_eq!(v["policy"], "bar/allow-sleep");
    assert_eq!(v["rule"], serde_json::Value::Null);
}

#[test]
fn tcp_connection_cannot_match_an_http_rule() {
    let dir = config();
    let mut args = vec!["--from", "foo/sleep", "--output", "json"];
    args.extend(TO_HTTPBIN);
    let run = explain(dir.path(), &args);
    assert_eq!(run.code, 1);
    assert!(
        json(&run)["reason"]
            .as_str()
            .unwrap()
            .contains("TCP connection")
    );
}

#[test]
fn plaintext_to_strict_is_denied() {
    let dir = config();
    for source in [["--from", "legacy/client"], ["--from-ip", "192.0.2.1"]] {
        let mut args = source.to_vec();
        args.extend(TO_HTTPBIN);
        args.extend(["--output", "json"]);
        let run = explain(dir.path(), &args);
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert_eq!(
            json(&run),
            serde_json::json!({
                "decision": "DENY", "mtls": "STRICT", "policy": "bar/default",
                "action": null, "rule": null,
                "reason": "plaintext connection to port 8000, where PeerAuthentication requires mTLS (STRICT)"
            })
        );
    }
    // --plaintext forces it for an enrolled source too.
    let mut args = vec!["--from", "foo/sleep", "--plaintext"];
    args.extend(TO_HTTPBIN);
    assert_eq!(explain(dir.path(), &args).code, 1);
}

#[test]
fn text_output_lists_the_decision() {
    let dir = config();
    let mut args = vec!["--from", "foo/sleep", "--method", "GET", "--path", "/get"];
    args.extend(TO_HTTPBIN);
    let run = explain(dir.path(), &args);
    assert_eq!(run.code, 0);
    assert!(
        run.stdout
            .starts_with("decision: ALLOW\nmtls:     STRICT\npolicy:   bar/allow-sleep\n"),
        "{}",
        run.stdout
    );
}

#[test]
fn unknown_pod_exits_2() {
    let dir = config();
    let run = explain(
        dir.path(),
        &["--from", "foo/nope", "--to", "bar/httpbin", "--port", "80"],
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("no pod foo/nope in the config"),
        "{}",
        run.stderr
    );
}

#[test]
fn bad_flag_value_exits_2() {
    let dir = config();
    let run = explain(
        dir.path(),
        &[
            "--from",
            "foo/sleep",
            "--to",
            "bar/httpbin",
            "--port",
            "http",
        ],
    );
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("--port"), "{}", run.stderr);
    let run = explain(
        dir.path(),
        &[
            "--from",
            "foo/sleep",
            "--to",
            "bar/httpbin",
            "--port",
            "80",
            "--header",
            "novalue",
        ],
    );
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("NAME=VALUE"), "{}", run.stderr);
}

#[test]
fn bad_config_file_exits_2_naming_file_object_and_field() {
    let dir = config();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-bar, namespace: foo}\nspec:\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/33]}\n",
    )
    .unwrap();
    let run = explain(
        dir.path(),
        &["--from", "foo/sleep", "--to", "bar/httpbin", "--port", "80"],
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("bad.yaml: document 1: AuthorizationPolicy foo/allow-bar: spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not a valid CIDR"),
        "{}",
        run.stderr
    );
}

#[test]
fn destination_outside_the_mesh_is_not_enforced() {
    let dir = config();
    let run = explain(
        dir.path(),
        &[
            "--from",
            "foo/sleep",
            "--to",
            "legacy/client",
            "--port",
            "80",
            "--output",
            "json",
        ],
    );
    assert_eq!(run.code, 0);
    assert_eq!(json(&run)["mtls"], serde_json::Value::Null);
}

#[test]
fn query_string_form_deserializes() {
    let args: ambit::explain::ExplainArgs = serde_urlencoded::from_str(
        "from=foo/sleep&to=bar/httpbin&port=8000&method=GET&header=x-a%3D1&header=x-b%3D2%3D3",
    )
    .unwrap();
    assert_eq!(args.from.as_deref(), Some("foo/sleep"));
    assert_eq!(args.port, 8000);
    assert_eq!(
        args.headers,
        [
            ("x-a".to_owned(), "1".to_owned()),
            ("x-b".to_owned(), "2=3".to_owned())
        ]
    );
    let error = serde_urlencoded::from_str::<ambit::explain::ExplainArgs>("to=a/b&port=x&from=a/c")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("port: \"x\" is not a port number"),
        "{error}"
    );
}

#[test]
fn convert_prints_the_objects_a_v1alpha1_policy_is_enforced_as() {
    let dir = config();
    let legacy = r#"
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: default, namespace: bar}
spec:
  peers: [{mtls: {}}]
"#;
    std::fs::write(dir.path().join("legacy.yaml"), legacy).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ambit"))
        .args(["convert", "--config-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(text.contains("kind: PeerAuthentication"), "{text}");
    assert!(text.contains("STRICT"), "{text}");
}

#[test]
fn principals_are_those_of_the_given_trust_domain_and_its_aliases() {
    let dir = config();
    let deny = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-example-org-sleep, namespace: bar}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["example.org/ns/foo/sa/sleep"]}}]}]
"#;
    std::fs::write(dir.path().join("deny.yaml"), deny).unwrap();
    let args = [
        "--from",
        "foo/sleep",
        "--to",
        "bar/httpbin",
        "--port",
        "8000",
        "--method",
        "GET",
        "--path",
        "/get",
    ];
    let with = |extra: &[&str]| {
        let all: Vec<&str> = args.iter().chain(extra).copied().collect();
        explain(dir.path(), &all).code
    };
    assert_eq!(
        with(&[]),
        0,
        "cluster.local/ns/foo/sa/sleep is not the denied principal"
    );
    assert_eq!(with(&["--trust-domain", "example.org"]), 1);
    assert_eq!(with(&["--trust-domain-alias", "example.org"]), 1);
}
