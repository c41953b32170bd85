//! End to end: `ambit ca --kubernetes`, the real binary and its kube-rs client against the
//! test bed's API-server double. Its key material lives in the `cacerts` Secret (generated
//! on first start, reused afterwards, refused with a clear error when incomplete) and its
//! root is published as a ConfigMap in its own namespace and every enrolled one.
//! (Who may ask the CA for what, through real gRPC, is tested in `identity::kube_authz`.)

use std::{
    io::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use ambit_tests::{ApiServer, mesh::within};
use serde_json::{Value, json};

const CA_NAMESPACE: &str = "ambit-system";
const ROOT_CONFIGMAP: &str = "ambit-ca-root-cert";

/// The CA process, killed on drop.
struct Ca(Child);

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ca_command(api: &ApiServer, state: &Path, extra: &[&str]) -> Command {
    let binaries = ambit_tests::test_binaries!();
    let mut cmd = Command::new(&binaries.ambit);
    cmd.args(["ca", "--kubernetes", "--kubeconfig"])
        .arg(api.kubeconfig())
        .args(["--trusted-node-account", "ambit-system/ambit"])
        .args(["--namespace", CA_NAMESPACE, "--listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .env_remove("POD_NAMESPACE")
        .env_remove("AMBIT_TRUST_DOMAIN");
    cmd
}

fn start_ca(api: &ApiServer, state: &Path) -> Ca {
    let child = ca_command(api, state, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ambit ca starts");
    Ca(child)
}

fn namespace(api: &ApiServer, name: &str, enrolled: bool) {
    let labels = if enrolled {
        json!({"ambit.io/mesh": "enabled"})
    } else {
        json!({})
    };
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}))
        .unwrap();
}

/// `data[key]` of a Secret, decoded from base64 (with coreutils, as the test crate has no
/// base64 of its own).
fn secret_file(secret: &Value, key: &str) -> String {
    let encoded = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("Secret has no {key}: {secret}"));
    let mut decode = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("base64");
    decode
        .stdin
        .take()
        .unwrap()
        .write_all(encoded.as_bytes())
        .unwrap();
    let output = decode.wait_with_output().unwrap();
    assert!(output.status.success(), "{key} is not base64");
    String::from_utf8(output.stdout).unwrap()
}

fn published_root(api: &ApiServer, namespace: &str) -> Option<String> {
    let configmap = api.get("v1", "ConfigMap", namespace, ROOT_CONFIGMAP)?;
    configmap["data"]["root-cert.pem"]
        .as_str()
        .map(str::to_owned)
}

/// Waits up to `limit` for `root` to be published in `namespace`.
fn assert_published(api: &ApiServer, namespace: &str, root: &str, limit: Duration) {
    let published = within(limit, || {
        published_root(api, namespace).as_deref() == Some(root)
    });
    assert!(
        published.is_some(),
        "the root is not published in {namespace}: {:?}",
        published_root(api, namespace)
    );
}

#[test]
fn the_ca_generates_its_root_into_cacerts_once_and_publishes_it_to_enrolled_namespaces() {
    let api = ApiServer::start().expect("API server double");
    let state = tempfile::tempdir().unwrap();
    namespace(&api, CA_NAMESPACE, false);
    namespace(&api, "foo", true);
    namespace(&api, "bar", false);

    let ca = start_ca(&api, state.path());
    let secret = within(Duration::from_secs(10), || {
        api.get("v1", "Secret", CA_NAMESPACE, "cacerts").is_some()
    });
    assert!(secret.is_some(), "no cacerts Secret was generated");
    let secret = api.get("v1", "Secret", CA_NAMESPACE, "cacerts").unwrap();
    let root = secret_file(&secret, "root-cert.pem");
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
    // A generated root signs workloads itself: it is the signing certificate too.
    assert_eq!(secret_file(&secret, "ca-cert.pem"), root);
    assert!(secret_file(&secret, "ca-key.pem").contains("PRIVATE KEY"));

    for namespace in [CA_NAMESPACE, "foo"] {
        assert_published(&api, namespace, &root, Duration::from_secs(5));
    }
    assert_eq!(published_root(&api, "bar"), None, "bar is not in the mesh");

    // A namespace enrolled later gets it too.
    namespace(&api, "bar", true);
    assert_published(&api, "bar", &root, Duration::from_secs(5));

    // A restarted CA signs with the root in the Secret: nothing is generated again.
    drop(ca);
    let _ca = start_ca(&api, state.path());
    namespace(&api, "late", true);
    // The same root: the restarted CA read it from the Secret.
    assert_published(&api, "late", &root, Duration::from_secs(10));
    assert_eq!(
        api.get("v1", "Secret", CA_NAMESPACE, "cacerts").unwrap(),
        secret,
        "the restarted CA rewrote its Secret"
    );
}

#[test]
fn an_incomplete_cacerts_secret_is_refused_by_name_and_left_alone() {
    let api = ApiServer::start().expect("API server double");
    let state = tempfile::tempdir().unwrap();
    namespace(&api, CA_NAMESPACE, false);
    let broken = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "cacerts", "namespace": CA_NAMESPACE},
        // `-----BEGIN CERTIFICATE-----` in base64, and no key.
        "data": {"ca-cert.pem": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t", "root-cert.pem": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t"},
    });
    api.apply(broken).unwrap();
    let before = api.get("v1", "Secret", CA_NAMESPACE, "cacerts").unwrap();

    let mut cmd = ca_command(&api, state.path(), &[]);
    let output = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|child| {
            let mut ca = Ca(child);
            let exited = within(Duration::from_secs(10), || {
                matches!(ca.0.try_wait(), Ok(Some(_)))
            });
            assert!(
                exited.is_some(),
                "the CA runs with a Secret that has no key"
            );
            let mut stderr = String::new();
            std::io::Read::read_to_string(ca.0.stderr.as_mut().unwrap(), &mut stderr)?;
            Ok(stderr)
        })
        .unwrap();
    assert!(
        output.contains("ambit-system/cacerts") && output.contains("ca-key.pem"),
        "the error does not name the Secret and the missing file: {output}"
    );
    assert_eq!(
        api.get("v1", "Secret", CA_NAMESPACE, "cacerts").unwrap(),
        before
    );
    assert_eq!(published_root(&api, CA_NAMESPACE), None);
}
