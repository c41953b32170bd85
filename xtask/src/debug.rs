//! `cargo xtask debug …`: reads a running agent's admin API and prints it for people.

use anyhow::Context as _;
use serde_json::Value;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Known pods: IPs, identity, enrollment, redirection state and counters.
    Workloads(Admin),
    /// Live and recently closed connections through the proxy.
    Connections(Admin),
    /// Per identity: serial, validity, next refresh, state, chain and root fingerprint.
    Certs(Admin),
    /// The policy decision for a connection or request, from the running agent's config.
    Explain {
        #[command(flatten)]
        admin: Admin,
        /// The question as `ambit explain` takes it, e.g.
        /// `--from foo/sleep --to bar/httpbin --port 8000 --method GET --path /ip`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        question: Vec<String>,
    },
    /// The address of the agent's page that draws the mesh on its node (open it in a browser).
    Ui(Agent),
}

#[derive(Debug, clap::Args)]
pub struct Admin {
    #[command(flatten)]
    pub agent: Agent,
    /// Print the raw JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct Agent {
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: String,
}

pub fn debug(cmd: &Command) -> anyhow::Result<()> {
    match cmd {
        Command::Workloads(admin) => {
            let workloads = get(&admin.agent, "/workloads")?;
            print(admin, &workloads, workloads_table)
        }
        Command::Connections(admin) => {
            let report = get(&admin.agent, "/connections")?;
            print(admin, &report, connections_table)
        }
        Command::Certs(admin) => {
            let report = get(&admin.agent, "/certs")?;
            print(admin, &report, certs_table)
        }
        Command::Explain { admin, question } => {
            let answer = get(
                &admin.agent,
                &format!("/explain?{}", explain_query(question)?),
            )?;
            print(admin, &answer, explain_table)
        }
        Command::Ui(agent) => {
            // Asks for the page's data first, so that an address without an agent says so.
            get(agent, "/ui/graph")?;
            println!("http://{}/ui", agent.admin);
            Ok(())
        }
    }
}

/// Turns `--from foo/sleep --plaintext --header k=v` into `from=foo%2Fsleep&plaintext=&header=k%3Dv`.
fn explain_query(question: &[String]) -> anyhow::Result<String> {
    let mut pairs = Vec::new();
    let mut words = question.iter().peekable();
    while let Some(word) = words.next() {
        let key = word
            .strip_prefix("--")
            .with_context(|| format!("{word:?} is not a flag of `ambit explain`"))?;
        let value = match words.peek() {
            Some(next) if !next.starts_with("--") => words.next().cloned().unwrap_or_default(),
            _ => String::new(),
        };
        pairs.push(format!("{}={}", encode(key), encode(&value)));
    }
    Ok(pairs.join("&"))
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print(
    admin: &Admin,
    value: &Value,
    table: fn(&Value) -> Vec<Vec<String>>,
) -> anyhow::Result<()> {
    if admin.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", render(&table(value)));
    }
    Ok(())
}

pub fn get(agent: &Agent, path: &str) -> anyhow::Result<Value> {
    let url = format!("http://{}{path}", agent.admin);
    let mut response = ureq::get(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .with_context(|| {
            format!("cannot reach the agent's admin API at {url} (is `ambit run` running?)")
        })?;
    if !response.status().is_success() {
        let body = response.body_mut().read_to_string().unwrap_or_default();
        anyhow::bail!("{url}: {}: {}", response.status(), body.trim());
    }
    response
        .body_mut()
        .read_json()
        .with_context(|| format!("{url} did not answer JSON"))
}

fn workloads_table(workloads: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![header(&[
        "NAMESPACE",
        "NAME",
        "IPS",
        "IDENTITY",
        "ENROLLED",
        "REDIRECTION",
        "OUT",
        "IN",
    ])];
    for w in workloads.as_array().into_iter().flatten() {
        let state = &w["redirection"];
        let redirection = match state["reason"].as_str() {
            Some(reason) => format!("{}: {reason}", text(&state["state"])),
            None => text(&state["state"]),
        };
        rows.push(vec![
            text(&w["namespace"]),
            text(&w["name"]),
            ips(&w["ips"]),
            text(&w["identity"]),
            text(&w["enrolled"]),
            redirection,
            text(&w["stats"]["connections_outbound"]),
            text(&w["stats"]["connections_inbound"]),
        ]);
    }
    rows
}

fn connections_table(report: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![header(&[
        "STATE",
        "WORKLOAD",
        "DIRECTION",
        "PATH",
        "SOURCE",
        "DESTINATION",
        "SENT",
        "RECEIVED",
        "ERROR",
    ])];
    for (state, key) in [("live", "live"), ("closed", "closed")] {
        for c in report[key].as_array().into_iter().flatten() {
            // A closed connection says why, as its stable code.
            let state = match c["close_reason"].as_str() {
                Some(reason) => format!("{state}: {reason}"),
                None => state.to_owned(),
            };
            rows.push(vec![
                state,
                text(&c["workload"]),
                text(&c["direction"]),
                text(&c["path"]),
                text(&c["source"]),
                text(&c["destination"]),
                text(&c["bytes_sent"]),
                text(&c["bytes_received"]),
                text(&c["error"]),
            ]);
            // A connection authorized request by request lists its latest decisions.
            for r in c["requests"].as_array().into_iter().flatten() {
                let policy = match (&r["policy"], &r["rule"]) {
                    (Value::String(p), Value::Number(rule)) => format!("{p} rule {rule}"),
                    (policy, _) => text(policy),
                };
                rows.push(vec![
                    String::new(),
                    String::new(),
                    "request".to_owned(),
                    format!("{} {}", text(&r["method"]), text(&r["path"])),
                    format!("-> {}", text(&r["status"])),
                    policy,
                    String::new(),
                    String::new(),
                    text(&r["reason"]),
                ]);
            }
        }
    }
    rows
}

fn certs_table(report: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![header(&[
        "IDENTITY",
        "PODS",
        "STATE",
        "SERIAL",
        "NOT BEFORE",
        "NOT AFTER",
        "NEXT REFRESH",
        "CHAIN",
        "ROOT SHA-256",
    ])];
    for id in report["identities"].as_array().into_iter().flatten() {
        let chain: Vec<String> = id["chain"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| text(&c["subject"]))
            .collect();
        rows.push(vec![
            text(&id["identity"]),
            text(&id["pods"]),
            text(&id["state"]),
            text(&id["serial"]),
            text(&id["not_before"]),
            text(&id["not_after"]),
            text(&id["next_refresh"]),
            chain.join(" <- "),
            text(&id["root_sha256"]),
        ]);
    }
    rows
}

fn explain_table(answer: &Value) -> Vec<Vec<String>> {
    ["decision", "mtls", "policy", "action", "rule", "reason"]
        .iter()
        .map(|k| vec![k.to_uppercase(), text(&answer[*k])])
        .collect()
}

fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// A JSON value as a table cell: strings bare, null as `-`.
/// A pod's addresses, comma-separated (`-` for none).
fn ips(value: &Value) -> String {
    let ips: Vec<String> = value.as_array().into_iter().flatten().map(text).collect();
    if ips.is_empty() {
        "-".to_owned()
    } else {
        ips.join(",")
    }
}

pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns separated by two spaces.
pub fn render(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
