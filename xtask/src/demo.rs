//! `cargo xtask demo`: builds ambit, creates a node with pods in `foo` and `bar`
//! (enrolled) and `legacy` (not), runs the agent, and shows a `curl` from every `sleep`
//! pod to every `httpbin` pod: the HTTP code, the address the server saw and the path the
//! connection took according to the proxy's own records. Then it walks through Istio's
//! mutual TLS migration and authorization steps, showing who reaches whom after each.
//! Tears everything down at the end.

use std::time::Duration;

use ambit_tests::{
    Binaries, Pod,
    mesh::{HTTP_PORT, Mesh, NAMESPACES, OTHER_PORT, policies},
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
