//! `cargo xtask demo`: builds ambit, creates a node with pods in `foo` and `bar`
//! (enrolled) and `legacy` (not), runs the agent, and shows a `curl` from every `sleep`
//! pod to every `httpbin` pod: the HTTP code, the address the server saw and the path the
//! connection took according to the proxy's own records. Tears everything down at the end.

use ambit_tests::{Binaries, Node, Pod};
use serde_json::Value;

use crate::{
    build::build_binaries,
    debug::{render, text},
};

const NAMESPACES: [(&str, bool); 3] = [("foo", true), ("bar", true), ("legacy", false)];
const PORT: u16 = 8000;

pub fn demo() -> anyhow::Result<()> {
    crate::setup::setup()?;
    let binaries = Binaries::in_dir(&build_binaries(false)?)?;
    let mut node = Node::new(binaries)?;
    let mut pods: Vec<(Pod, Pod)> = Vec::new();
    for (namespace, enrolled) in NAMESPACES {
        node.namespace(namespace, enrolled)?;
        let sleep = node.pod_with(namespace, "sleep", "sleep", &[("app", "sleep")])?;
        let httpbin = node.pod_with(namespace, "httpbin", "httpbin", &[("app", "httpbin")])?;
        node.serve_http(&httpbin, PORT)?;
        pods.push((sleep, httpbin));
    }
    node.start_agent()?;
    let agent = node.agent()?;
    println!(
        "node {} with the agent's admin API on {}\n",
        node.id, agent.admin
    );
    print!("{}", render(&workloads(&agent.admin_get("/workloads")?)));
    println!();

    let mut rows = vec![
        ["FROM", "TO", "HTTP", "SERVER SAW", "PATH"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for (client, _) in &pods {
        for (_, server) in &pods {
            let seen_before = recorded(&node)?.last().and_then(|c| c["id"].as_u64());
            let url = format!("http://{}:{PORT}/ip", server.ip);
            let result = node.curl(Some(client), &url)?;
            let new: Vec<Value> = recorded(&node)?
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
    println!("\ntearing down node {}", node.id);
    Ok(())
}

/// Every connection the proxy recorded, closed ones first, in order.
fn recorded(node: &Node) -> anyhow::Result<Vec<Value>> {
    let report = node.agent()?.admin_get("/connections")?;
    let mut all: Vec<Value> = report["closed"].as_array().cloned().unwrap_or_default();
    all.extend(report["live"].as_array().cloned().unwrap_or_default());
    all.sort_by_key(|c| c["id"].as_u64());
    Ok(all)
}

/// The path of the connection from `client` to `server`, from the proxy's new records.
fn path(client: &Pod, server: &Pod, records: &[Value]) -> String {
    let key = |p: &Pod| format!("{}/{}", p.namespace, p.name);
    let outbound = records
        .iter()
        .any(|r| r["workload"] == key(client) && r["direction"] == "outbound");
    let inbound = records
        .iter()
        .any(|r| r["workload"] == key(server) && r["direction"] == "inbound");
    match (outbound, inbound) {
        (true, true) => "proxy out (client pod) -> proxy in (server pod)",
        (true, false) => "proxy out (client pod) -> direct",
        (false, true) => "direct -> proxy in (server pod)",
        (false, false) => "direct",
    }
    .to_owned()
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
