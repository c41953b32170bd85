//! End to end: per-request authorization in the node proxy, with real curl over HTTP/1.1
//! and HTTP/2, from a mesh client (`foo/sleep` → `bar/httpbin`: by the same-node shortcut,
//! and in the first test through HBONE, with `--same-node-shortcut=false`) and through
//! the plaintext listener (`legacy/sleep` → `bar/httpbin`, PERMISSIVE).

use std::time::Duration;

use ambit_tests::{
    AgentOptions, CurlResult,
    mesh::{BAR, FOO, HTTP_PORT, LEGACY, Mesh, policies::get_not_admin, within},
};
use serde_json::Value;

fn mesh_with(policy: &str) -> Mesh {
    mesh_with_agent(policy, &AgentOptions::default())
}

/// [`mesh_with`] the agent started as `agent` says.
fn mesh_with_agent(policy: &str, agent: &AgentOptions) -> Mesh {
    let mesh = Mesh::with_agent(ambit_tests::test_binaries!(), agent).expect("mesh");
    mesh.node.write_file("policy.yaml", policy).unwrap();
    // Applied once a denied path is answered by the proxy.
    let applied = within(Duration::from_secs(3), || {
        curl(&mesh, FOO, &["-X", "GET"], "/admin").code == 403
    });
    assert!(applied.is_some(), "the policy was not applied");
    mesh
}

/// curl from the `sleep` of namespace `from` to `bar/httpbin` on `path` (sent as written),
/// with `args`.
fn curl(mesh: &Mesh, from: usize, args: &[&str], path: &str) -> CurlResult {
    let args = [&["--path-as-is"], args].concat();
    let url = mesh.url(BAR, path);
    mesh.node
        .curl_with(Some(&mesh.sleep[from]), &args, &url)
        .expect("curl")
}

#[test]
fn each_http_request_is_authorized_over_hbone_and_plaintext_in_both_http_versions() {
    let hbone = AgentOptions::args(&["--same-node-shortcut=false"]);
    let mesh = mesh_with_agent(&get_not_admin("bar"), &hbone);
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
    let mesh = mesh_with(&get_not_admin("bar"));
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
    // Its bytes are counted as a relayed connection's are.
    let served = connections
        .iter()
        .find(|c| c["requests"].as_array().is_some_and(|r| r.len() == 3))
        .unwrap();
    assert!(served["bytes_sent"].as_u64() > Some(0), "{served}");
    assert!(served["bytes_received"].as_u64() > Some(0), "{served}");
}

#[test]
fn the_application_learns_the_mtls_identity_and_no_client_can_forge_it() {
    let mesh = mesh_with(&get_not_admin("bar"));
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
    let mesh = mesh_with(&get_not_admin("bar"));
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

/// `bar/httpbin` refuses `/admin` and everything under it, to anyone.
const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: bar}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
  - to: [{operation: {hosts: ["secret.example"]}}]
  - when: [{key: "request.headers[x-role]", values: ["admin"]}]
"#;

/// Sends `request` as raw bytes from the `sleep` of `from` to `bar/httpbin` and returns
/// everything that came back until the proxy or the app closed (or 3 s passed).
fn raw(mesh: &Mesh, from: usize, request: &str) -> String {
    const SCRIPT: &str = "
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
s.sendall(sys.argv[3].encode())
out = b''
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
except socket.timeout:
    pass
sys.stdout.write(out.decode('latin-1'))
";
    let mut cmd = mesh.node.command(&mesh.sleep[from], "python3");
    cmd.args(["-c", SCRIPT])
        .arg(mesh.httpbin[BAR].ip.to_string())
        .arg(HTTP_PORT.to_string())
        .arg(request);
    let output = cmd.output().expect("python3");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The status codes of the responses in `response`, in order (bodies may run into the
/// next status line: they end without a newline).
fn statuses(response: &str) -> Vec<&str> {
    response
        .match_indices("HTTP/1.1 ")
        .filter_map(|(at, prefix)| response.get(at + prefix.len()..at + prefix.len() + 3))
        .collect()
}

#[test]
fn no_spelling_of_a_denied_path_host_or_header_gets_through() {
    let mesh = mesh_with(DENY_ADMIN);
    // What the app saw while the policy was being applied is not this test's business.
    let seen = mesh.node.app_log(&mesh.httpbin[BAR], HTTP_PORT).len();
    for from in [FOO, LEGACY] {
        for path in [
            "/admin",
            "//admin",
            "/./admin",
            "/a/../admin",
            "/%2e/admin",
            "/%2E%2e/admin",
            "/%61dmin",
            "/x/..%2Fadmin",
            "/x%5C..%5Cadmin",
            "/admin/?q=1",
            "/admin?q=/ip",
            "/ip/../admin/users",
        ] {
            let result = curl(&mesh, from, &[], path);
            assert_eq!(result.code, 403, "from {from}: {path} was {result:?}");
        }
        for host in ["secret.example", "SECRET.Example", "secret.example:8000"] {
            let result = curl(&mesh, from, &["-H", &format!("Host: {host}")], "/ip");
            assert_eq!(result.code, 403, "from {from}: Host {host} was {result:?}");
        }
        let repeated = curl(
            &mesh,
            from,
            &["-H", "x-role: user", "-H", "x-role: admin"],
            "/ip",
        );
        assert_eq!(
            repeated.code, 403,
            "from {from}: repeated header {repeated:?}"
        );
        // A fragment is no part of the path: dropped before matching and forwarding, so
        // what is matched is what the application gets.
        let close = "HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n";
        let fragment = raw(&mesh, from, &format!("GET /admin#/../ip {close}"));
        assert_eq!(statuses(&fragment), ["403"], "from {from}: {fragment}");
        let fragment = raw(&mesh, from, &format!("GET /ip#/../admin {close}"));
        assert_eq!(statuses(&fragment), ["200"], "from {from}: {fragment}");
        // What is allowed still is.
        assert_eq!(curl(&mesh, from, &[], "/ip").code, 200);
        assert_eq!(curl(&mesh, from, &[], "/administrator").code, 200);
    }
    // No denied request reached the application; the allowed ones did.
    let log = &mesh.node.app_log(&mesh.httpbin[BAR], HTTP_PORT)[seen..];
    assert!(!log.contains("admin "), "{log}");
    assert!(log.contains("REQ GET /administrator "), "{log}");
}

#[test]
fn pipelined_requests_are_each_decided_and_the_denied_one_never_reaches_the_app() {
    let mesh = mesh_with(&get_not_admin("bar"));
    let seen = mesh.node.app_log(&mesh.httpbin[BAR], HTTP_PORT).len();
    let pipelined = "GET /ip HTTP/1.1\r\nHost: web\r\n\r\n\
                     GET /admin/pipelined HTTP/1.1\r\nHost: web\r\n\r\n\
                     GET /headers HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n";
    for from in [FOO, LEGACY] {
        let response = raw(&mesh, from, pipelined);
        assert_eq!(
            statuses(&response),
            ["200", "403", "200"],
            "from {from}: {response}"
        );
    }
    let log = &mesh.node.app_log(&mesh.httpbin[BAR], HTTP_PORT)[seen..];
    assert!(!log.contains("/admin/pipelined"), "{log}");
    assert_eq!(log.matches("REQ GET /headers ").count(), 2, "{log}");
}

#[test]
fn a_request_smuggled_behind_content_length_and_transfer_encoding_never_reaches_the_app() {
    let mesh = mesh_with(&get_not_admin("bar"));
    // CL.TE: a front end that believes Content-Length would forward the hidden request
    // as the body; one that believes Transfer-Encoding sees two requests.
    let smuggle = "GET /ip HTTP/1.1\r\nHost: web\r\nContent-Length: 48\r\nTransfer-Encoding: chunked\r\n\r\n\
                   0\r\n\r\nGET /admin/smuggled HTTP/1.1\r\nHost: web\r\n\r\n";
    for from in [FOO, LEGACY] {
        let response = raw(&mesh, from, smuggle);
        assert!(statuses(&response).len() <= 1, "from {from}: {response}");
    }
    let log = mesh.node.app_log(&mesh.httpbin[BAR], HTTP_PORT);
    assert!(!log.contains("/admin/smuggled"), "{log}");
}

/// gRPC on `bar/httpbin` port 9100: `Say` for everyone, `Admin` for nobody.
const GRPC_PORT: u16 = 9100;
const GRPC_SAY_ONLY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: grpc-say-only, namespace: bar}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - to: [{operation: {ports: ["9100"], paths: ["/ambit.test.Echo/Say"]}}]
  - to: [{operation: {ports: ["8000"]}}]
"#;

#[test]
fn grpc_calls_are_authorized_per_method_and_denied_with_permission_denied() {
    let mut mesh = Mesh::new(ambit_tests::test_binaries!()).expect("mesh");
    let server = mesh.httpbin[BAR].clone();
    mesh.node.serve_grpc(&server, GRPC_PORT).unwrap();
    mesh.node.write_file("policy.yaml", GRPC_SAY_ONLY).unwrap();
    let target = format!("{}:{GRPC_PORT}", server.ip);
    let call = |from: usize, method| {
        mesh.node
            .grpc_call(&mesh.sleep[from], &target, method, &[])
            .unwrap()
    };
    let applied = within(Duration::from_secs(3), || {
        call(FOO, "Admin").starts_with("STATUS PERMISSION_DENIED")
    });
    assert!(
        applied.is_some(),
        "the policy was not applied: {}",
        call(FOO, "Admin")
    );
    for from in [FOO, LEGACY] {
        assert!(call(from, "Say").starts_with("OK"), "from {from}");
        let denied = call(from, "Admin");
        assert!(
            denied.starts_with("STATUS PERMISSION_DENIED RBAC: access denied"),
            "from {from}: {denied}"
        );
    }
    let log = mesh.node.app_log(&server, GRPC_PORT);
    assert!(log.contains("GRPC /ambit.test.Echo/Say"), "{log}");
    assert!(!log.contains("Admin"), "{log}");
}

#[test]
fn an_upgrade_is_authorized_as_its_request_then_relayed_as_bytes() {
    let mesh = mesh_with(&get_not_admin("bar"));
    let upgrade = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nhello through the tunnel"
        )
    };
    for from in [FOO, LEGACY] {
        let echoed = raw(&mesh, from, &upgrade("/echo"));
        assert_eq!(statuses(&echoed), ["101"], "from {from}: {echoed}");
        assert!(
            echoed.ends_with("hello through the tunnel"),
            "from {from}: {echoed}"
        );
        // Denied: no switch, so the bytes after the request are read as HTTP (and
        // refused as a malformed request).
        let denied = raw(&mesh, from, &upgrade("/admin/echo"));
        assert_eq!(
            statuses(&denied).first(),
            Some(&"403"),
            "from {from}: {denied}"
        );
        assert!(!denied.contains("hello through"), "from {from}: {denied}");
    }
}
