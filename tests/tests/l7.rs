//! End to end: per-request authorization in the node proxy, with real curl over HTTP/1.1
//! and HTTP/2, through HBONE (`foo/sleep` → `bar/httpbin`, mutual TLS) and through the
//! plaintext listener (`legacy/sleep` → `bar/httpbin`, PERMISSIVE).

use std::time::Duration;

use ambit_tests::{
    CurlResult,
    mesh::{BAR, FOO, HTTP_PORT, LEGACY, Mesh, within},
};
use serde_json::Value;

/// `bar/httpbin` answers GET, except under `/admin`.
const GET_NOT_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-not-admin, namespace: bar}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - to: [{operation: {methods: ["GET"], notPaths: ["/admin*"]}}]
"#;

fn mesh_with(policy: &str) -> Mesh {
    let mesh = Mesh::new(ambit_tests::test_binaries!()).expect("mesh");
    mesh.node.write_file("policy.yaml", policy).unwrap();
    // Applied once a denied path is answered by the proxy.
    let applied = within(Duration::from_secs(3), || {
        curl(&mesh, FOO, &["-X", "GET"], "/admin").code == 403
    });
    assert!(applied.is_some(), "the policy was not applied");
    mesh
}

/// curl from the `sleep` of namespace `from` to `bar/httpbin` on `path`, with `args`.
fn curl(mesh: &Mesh, from: usize, args: &[&str], path: &str) -> CurlResult {
    let mut cmd = mesh.node.command(&mesh.sleep[from], "curl");
    cmd.args([
        "-sS",
        "--path-as-is",
        "--max-time",
        "3",
        "-w",
        "\n%{http_code}",
    ])
    .args(args)
    .arg(mesh.url(BAR, path));
    CurlResult::from_output(&cmd.output().expect("curl"))
}

#[test]
fn each_http_request_is_authorized_over_hbone_and_plaintext_in_both_http_versions() {
    let mesh = mesh_with(GET_NOT_ADMIN);
    for from in [FOO, LEGACY] {
        for version in ["--http1.1", "--http2-prior-knowledge"] {
            let ok = curl(&mesh, from, &[version], "/ip");
            assert_eq!(ok.code, 200, "from {from} {version}: {ok:?}");
            let origin: Value = serde_json::from_str(&ok.body).unwrap();
            assert_eq!(origin["origin"], mesh.sleep[from].ip.to_string());
            let admin = curl(&mesh, from, &[version], "/admin/users");
            assert_eq!(admin.code, 403, "from {from} {version}: {admin:?}");
            assert_eq!(admin.body.trim(), "RBAC: access denied");
            let post = curl(&mesh, from, &[version, "-X", "POST"], "/ip");
            assert_eq!(post.code, 403, "from {from} {version}: {post:?}");
        }
    }
}

#[test]
fn requests_on_one_keep_alive_connection_are_decided_one_by_one() {
    let mesh = mesh_with(GET_NOT_ADMIN);
    // One curl, three requests on one connection: allowed, denied, allowed.
    let mut cmd = mesh.node.command(&mesh.sleep[FOO], "curl");
    cmd.args([
        "-sS",
        "--max-time",
        "3",
        "-w",
        "%{http_code} %{num_connects}\n",
    ])
    .args(["-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null"])
    .arg(mesh.url(BAR, "/ip"))
    .arg(mesh.url(BAR, "/admin"))
    .arg(mesh.url(BAR, "/ip"));
    let output = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, ["200 1", "403 0", "200 0"], "{text}");
    // The proxy recorded the three decisions on one inbound connection.
    let connections = mesh.recorded("bar/httpbin", "inbound").unwrap();
    let decided: Vec<Vec<(String, u64)>> = connections
        .iter()
        .map(|c| {
            c["requests"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    (
                        r["path"].as_str().unwrap().to_owned(),
                        r["status"].as_u64().unwrap(),
                    )
                })
                .collect()
        })
        .collect();
    let expected = vec![
        ("/ip".to_owned(), 200),
        ("/admin".to_owned(), 403),
        ("/ip".to_owned(), 200),
    ];
    assert!(decided.contains(&expected), "{decided:?}");
}

#[test]
fn the_application_learns_the_mtls_identity_and_no_client_can_forge_it() {
    let mesh = mesh_with(GET_NOT_ADMIN);
    let forged = "-HX-Forwarded-Client-Cert: URI=spiffe://cluster.local/ns/bar/sa/admin";
    let headers = |from| {
        let result = curl(&mesh, from, &[forged], "/headers");
        assert_eq!(result.code, 200, "{result:?}");
        let body: Value = serde_json::from_str(&result.body).unwrap();
        body["headers"]["x-forwarded-client-cert"]
            .as_str()
            .map(str::to_owned)
    };
    let meshed = headers(FOO).expect("XFCC on an mTLS request");
    assert!(
        meshed.starts_with("By=spiffe://cluster.local/ns/bar/sa/httpbin;Hash="),
        "{meshed}"
    );
    assert!(
        meshed.ends_with(";URI=spiffe://cluster.local/ns/foo/sa/sleep"),
        "{meshed}"
    );
    assert_eq!(
        headers(LEGACY),
        None,
        "a plaintext client's header must be removed"
    );
}

#[test]
fn a_client_that_does_not_speak_http_is_opaque_tcp_and_fails_closed() {
    let mesh = mesh_with(GET_NOT_ADMIN);
    // Bytes that are not HTTP: the ALLOW rule needs HTTP, so nothing allows them.
    let probe = mesh.node.binaries.probe.to_str().unwrap();
    let mut cmd = mesh.node.command(&mesh.sleep[FOO], probe);
    cmd.args(["connect", &format!("{}:{HTTP_PORT}", mesh.httpbin[BAR].ip)])
        .args(["--send", "SSH-2.0-probe\r\n", "--timeout-ms", "3000"]);
    let output = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let answer: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(answer["answered"], false, "{text}");
    let refused = within(Duration::from_secs(3), || {
        mesh.recorded("bar/httpbin", "inbound")
            .unwrap()
            .iter()
            .any(|c| c["error"].as_str().is_some_and(|e| e.contains("no rule")))
    });
    assert!(
        refused.is_some(),
        "{:?}",
        mesh.recorded("bar/httpbin", "inbound")
    );
}
