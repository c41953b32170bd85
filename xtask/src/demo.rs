//! `cargo xtask demo`: builds ambit, creates a node with pods in `foo` and `bar`
//! (enrolled) and `legacy` (not), runs the agent, and shows a `curl` from every `sleep`
//! pod to every `httpbin` pod: the HTTP code, the address the server saw and the path the
//! connection took according to the proxy's own records. Then it walks through Istio's
//! mutual TLS migration and authorization steps, showing who reaches whom after each, and
//! the L7 steps: per-request decisions under a path rule, and a JWT required by Istio 1.1's
//! end-user authentication policy, the same by pod IP, by Service address and from outside
//! the mesh. Tears everything down at the end.

use std::time::Duration;

use ambit_tests::{
    Binaries, Pod,
    mesh::{FOO_HTTPBIN_SERVICE, HTTP_PORT, Mesh, NAMESPACES, OTHER_PORT, policies},
};
use serde_json::Value;

use crate::{
    build::build_binaries,
    debug::{render, text},
};

pub fn demo() -> anyhow::Result<()> {
    crate::setup::setup()?;
    let mesh = Mesh::new(Binaries::in_dir(&build_binaries(false)?)?)?;
    let agent = mesh.node.agent()?;
    println!(
        "node {} with the agent's admin API on {}\n",
        mesh.node.id, agent.admin
    );
    print!("{}", render(&workloads(&agent.admin_get("/workloads")?)));
    println!();

    let mut rows = vec![
        ["FROM", "TO", "HTTP", "SERVER SAW", "PATH"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for client in &mesh.sleep {
        for (to, server) in mesh.httpbin.iter().enumerate() {
            let seen_before = mesh.connections()?.last().and_then(|c| c["id"].as_u64());
            let result = mesh.node.curl(Some(client), &mesh.url(to, "/ip"))?;
            let new: Vec<Value> = mesh
                .connections()?
                .into_iter()
                .filter(|c| c["id"].as_u64() > seen_before)
                .collect();
            let seen: Value = serde_json::from_str(&result.body).unwrap_or(Value::Null);
            rows.push(vec![
                format!("{}/{}", client.namespace, client.name),
                format!("{}/{}", server.namespace, server.name),
                result.code.to_string(),
                text(&seen["origin"]),
                path(client, server, &new),
            ]);
        }
    }
    print!("{}", render(&rows));
    policy_steps(&mesh)?;
    l7_steps(&mesh)?;
    println!("\ntearing down node {}", mesh.node.id);
    Ok(())
}

/// A policy step: a title and the policy files in force after it (others are removed).
const STEPS: &[(&str, &[(&str, &str)])] = &[
    (
        "mesh-wide STRICT mTLS (PeerAuthentication istio-system/default)",
        &[("mesh-strict.yaml", policies::MESH_STRICT)],
    ),
    (
        "STRICT mTLS in foo only (PeerAuthentication foo/default)",
        &[("foo-strict.yaml", policies::FOO_STRICT)],
    ),
    (
        "foo STRICT, but foo/httpbin accepts plaintext on 8000 (portLevelMtls DISABLE)",
        &[
            ("foo-strict.yaml", policies::FOO_STRICT),
            ("foo-httpbin.yaml", policies::FOO_HTTPBIN_8000_DISABLE),
        ],
    ),
    (
        "foo/httpbin allows only principal cluster.local/ns/bar/sa/sleep on 8000",
        &[("allow.yaml", policies::ALLOW_BAR_SLEEP)],
    ),
    (
        "... and DENY from namespace bar",
        &[
            ("allow.yaml", policies::ALLOW_BAR_SLEEP),
            ("deny.yaml", policies::DENY_BAR),
        ],
    ),
    ("all policies removed", &[]),
];

/// How long the demo waits for a policy change to apply (the agent follows the directory
/// within a second).
const SETTLE: Duration = Duration::from_millis(1500);

fn policy_steps(mesh: &Mesh) -> anyhow::Result<()> {
    let mut written: Vec<&str> = Vec::new();
    for (title, files) in STEPS {
        for old in written.drain(..) {
            mesh.node.remove_file(old)?;
        }
        for (name, yaml) in *files {
            mesh.node.write_file(name, yaml)?;
            written.push(name);
        }
        std::thread::sleep(SETTLE);
        println!("\n== {title}");
        for port in [HTTP_PORT, OTHER_PORT] {
            print!("{}", render(&matrix(mesh, port)?));
        }
    }
    Ok(())
}

/// The reachability matrix on `port`: one row per client, one column per server.
fn matrix(mesh: &Mesh, port: u16) -> anyhow::Result<Vec<Vec<String>>> {
    let mut header = vec![format!("port {port}: from \\ to")];
    header.extend(NAMESPACES.iter().map(|(ns, _)| format!("{ns}/httpbin")));
    let mut rows = vec![header];
    for (client, codes) in mesh.sleep.iter().zip(mesh.codes(port)?) {
        let mut row = vec![format!("{}/{}", client.namespace, client.name)];
        row.extend(codes.iter().map(|code| match code {
            0 => "refused".to_owned(),
            code => code.to_string(),
        }));
        rows.push(row);
    }
    Ok(rows)
}

/// The path of the connection from `client` to `server`, from the proxy's new records.
fn path(client: &Pod, server: &Pod, records: &[Value]) -> String {
    let key = |p: &Pod| format!("{}/{}", p.namespace, p.name);
    let outbound = records
        .iter()
        .find(|r| r["workload"] == key(client) && r["direction"] == "outbound");
    let inbound = records
        .iter()
        .find(|r| r["workload"] == key(server) && r["direction"] == "inbound");
    let hop = |record: Option<&Value>| record.map(|r| text(&r["path"]));
    match (hop(outbound), hop(inbound)) {
        (Some(out), Some(inb)) if out == "hbone" => {
            format!("proxy -> HBONE (mTLS) -> proxy [{inb}]")
        }
        (Some(out), Some(inb)) if out == "same-node" => {
            format!("proxy -> same node, no tunnel -> proxy [{inb}]")
        }
        (Some(out), Some(inb)) => format!("proxy [{out}] -> proxy [{inb}]"),
        (Some(out), None) => format!("proxy [{out}] -> direct"),
        (None, Some(inb)) => format!("direct -> proxy [{inb}]"),
        (None, None) => "direct".to_owned(),
    }
}

fn workloads(workloads: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![
        ["POD", "IP", "IDENTITY", "REDIRECTION"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for w in workloads.as_array().into_iter().flatten() {
        rows.push(vec![
            format!("{}/{}", text(&w["namespace"]), text(&w["name"])),
            text(&w["ip"]),
            text(&w["identity"]),
            text(&w["redirection"]["state"]),
        ]);
    }
    rows
}

/// `FOO_HTTPBIN_SERVICE`'s address, as the L7 steps reach `foo/httpbin` besides its pod IP.
const SERVICE_URL: &str = "http://10.96.0.10:80";

/// Istio 1.1's end-user authentication task (`authentication.istio.io/v1alpha1`), with
/// an inline HS256 key standing in for the task's key set on GitHub.
const JWT_EXAMPLE: &str = r#"
apiVersion: "authentication.istio.io/v1alpha1"
kind: "Policy"
metadata:
  name: "jwt-example"
  namespace: foo
spec:
  targets:
  - name: httpbin
  origins:
  - jwt:
      issuer: "testing@secure.istio.io"
      jwks: '{"keys": [{"kty": "oct", "kid": "demo", "alg": "HS256", "k": "YS1kZW1vLXNlY3JldC1vZi0zMi1ieXRlcy1sZW5ndGg"}]}'
  principalBinding: USE_ORIGIN
"#;
const JWT_SECRET: &[u8] = b"a-demo-secret-of-32-bytes-length";

/// The L7 steps: each request from each client, by pod IP and by Service address (the
/// latter only from meshed clients: outside the mesh no one resolves Service addresses).
fn l7_steps(mesh: &Mesh) -> anyhow::Result<()> {
    mesh.node.write_file("service.yaml", FOO_HTTPBIN_SERVICE)?;
    mesh.node
        .write_file("l7.yaml", &policies::get_not_admin("foo"))?;
    std::thread::sleep(SETTLE);
    println!(
        "\n== L7: foo/httpbin answers GET except under /admin (AuthorizationPolicy foo/get-not-admin)"
    );
    let requests: &[(&str, &str, Option<&str>)] = &[
        ("GET", "/ip", None),
        ("GET", "/admin/users", None),
        ("GET", "//admin/users", None),
        ("POST", "/ip", None),
    ];
    print!("{}", render(&requests_table(mesh, requests)?));

    mesh.node.remove_file("l7.yaml")?;
    mesh.node.write_file("jwt.yaml", JWT_EXAMPLE)?;
    std::thread::sleep(SETTLE);
    println!(
        "\n== L7: a JWT required on foo/httpbin (Istio 1.1 Policy foo/jwt-example, converted at load)"
    );
    let token = demo_token()?;
    let requests: &[(&str, &str, Option<&str>)] = &[
        ("GET", "/headers", None),
        ("GET", "/headers", Some(token.as_str())),
        ("GET", "/headers", Some("not-a-token")),
    ];
    print!("{}", render(&requests_table(mesh, requests)?));
    mesh.node.remove_file("jwt.yaml")?;
    mesh.node.remove_file("service.yaml")?;
    Ok(())
}

fn demo_token() -> anyhow::Result<String> {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("demo".to_owned());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    let claims = serde_json::json!({
        "iss": "testing@secure.istio.io",
        "sub": "testing@secure.istio.io",
        "exp": exp,
    });
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET);
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

fn requests_table(
    mesh: &Mesh,
    requests: &[(&str, &str, Option<&str>)],
) -> anyhow::Result<Vec<Vec<String>>> {
    let mut rows = vec![
        ["FROM", "REQUEST", "TOKEN", "VIA", "HTTP", "ANSWER"]
            .map(str::to_owned)
            .to_vec(),
    ];
    let pod_url = format!("http://{}:{HTTP_PORT}", mesh.httpbin[0].ip);
    for (client, (_, enrolled)) in mesh.sleep.iter().zip(NAMESPACES) {
        let mut vias = vec![("pod IP", pod_url.as_str())];
        if enrolled {
            vias.push(("Service", SERVICE_URL));
        }
        for (method, path, token) in requests {
            for (via, base) in &vias {
                let auth = token.map(|t| format!("Authorization: Bearer {t}"));
                let mut args = vec!["--path-as-is", "-X", method];
                if let Some(auth) = &auth {
                    args.extend(["-H", auth.as_str()]);
                }
                let result = mesh
                    .node
                    .curl_with(Some(client), &args, &format!("{base}{path}"))?;
                let answer = match result.code {
                    200 => "from the app".to_owned(),
                    0 => "no answer".to_owned(),
                    _ => format!("proxy: {}", first_line(&result.body)),
                };
                rows.push(vec![
                    format!("{}/{}", client.namespace, client.name),
                    format!("{method} {path}"),
                    token
                        .map_or("-", |t| {
                            if t.contains('.') {
                                "valid"
                            } else {
                                "malformed"
                            }
                        })
                        .to_owned(),
                    (*via).to_owned(),
                    result.code.to_string(),
                    answer,
                ]);
            }
        }
    }
    Ok(rows)
}

/// The first line of a body, shortened for a table cell.
fn first_line(body: &str) -> String {
    let line = body.lines().next().unwrap_or_default();
    match line.char_indices().nth(60) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line.to_owned(),
    }
}
