//! End to end: the admin API's identity and policy views (`/certs`, `/explain`) on a
//! running agent, and `ambit explain` agreeing with it.

use std::{process::Command, time::Duration};

use ambit_tests::mesh::{Mesh, policies::ALLOW_BAR_SLEEP, within};
use serde_json::Value;

fn mesh() -> Mesh {
    let binaries = ambit_tests::test_binaries!();
    Mesh::new(binaries).expect("mesh")
}

fn identities(mesh: &Mesh) -> Vec<Value> {
    let report = mesh.node.agent().unwrap().admin_get("/certs").unwrap();
    report["identities"].as_array().cloned().unwrap_or_default()
}

#[test]
fn certificates_are_issued_for_enrolled_identities_only() {
    let mesh = mesh();
    let all_valid = within(Duration::from_secs(10), || {
        let ids = identities(&mesh);
        ids.len() == 4 && ids.iter().all(|i| i["state"] == "valid")
    });
    let ids = identities(&mesh);
    assert!(all_valid.is_some(), "{ids:#?}");
    let names: Vec<&str> = ids.iter().filter_map(|i| i["identity"].as_str()).collect();
    assert_eq!(
        names,
        [
            "spiffe://cluster.local/ns/bar/sa/httpbin",
            "spiffe://cluster.local/ns/bar/sa/sleep",
            "spiffe://cluster.local/ns/foo/sa/httpbin",
            "spiffe://cluster.local/ns/foo/sa/sleep",
        ]
    );
    for id in &ids {
        assert!(
            id["serial"].is_string() && id["next_refresh"].is_string(),
            "{id:#}"
        );
        assert_eq!(
            id["chain"].as_array().map(Vec::len),
            Some(2),
            "leaf and root: {id:#}"
        );
    }
}

#[test]
fn explain_endpoint_follows_the_config_and_agrees_with_the_cli() {
    let mesh = mesh();
    let agent = mesh.node.agent().unwrap();
    let ask = |from: &str| {
        agent
            .admin_get(&format!("/explain?from={from}&to=foo/httpbin&port=8000"))
            .unwrap()
    };
    assert_eq!(ask("legacy/sleep")["decision"], "ALLOW");

    mesh.node
        .write_file("policy.yaml", ALLOW_BAR_SLEEP)
        .unwrap();
    let applied = within(Duration::from_secs(2), || {
        ask("legacy/sleep")["decision"] == "DENY"
    });
    assert!(applied.is_some(), "{:#}", ask("legacy/sleep"));
    let denied = ask("foo/sleep");
    assert_eq!(denied["decision"], "DENY");
    assert_eq!(denied["policy"], "foo/allow-bar-sleep");
    let allowed = ask("bar/sleep");
    assert_eq!(allowed["decision"], "ALLOW");
    assert_eq!(allowed["rule"], 0);

    let cli = Command::new(&mesh.node.binaries.ambit)
        .args(["explain", "--config-dir"])
        .arg(&mesh.node.config_dir)
        .args([
            "--from",
            "bar/sleep",
            "--to",
            "foo/httpbin",
            "--port",
            "8000",
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        cli.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let from_cli: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(from_cli, allowed);
}

#[test]
fn explain_endpoint_rejects_a_bad_question_with_the_reason() {
    let mesh = mesh();
    let agent = mesh.node.agent().unwrap();
    let error = agent
        .admin_get("/explain?from=foo/sleep&to=foo/nope&port=8000")
        .unwrap_err()
        .to_string();
    assert!(error.contains("no pod foo/nope in the config"), "{error}");
}
