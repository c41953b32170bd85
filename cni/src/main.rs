//! `ambit-cni`: a chained CNI plugin (spec 1.0.0) placed after the cluster's primary
//! plugin, as istio-cni is. `ADD` hands the pod to the node agent and returns only once the
//! agent holds the pod's sockets (or has found it outside the mesh), so that an enrolled
//! pod's first packet is already captured; `prevResult` passes through unchanged.
//!
//! When the agent cannot be reached, `ADD` fails (code 11, "try again later") for every
//! pod: this plugin does not yet ask the API server whether the pod's namespace is
//! enrolled, so it cannot tell a pod outside the mesh from one that must not start
//! unmeshed.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use ambit_cni::{DEFAULT_SOCKET, Reply, Request, Sandbox};
use serde::Deserialize;
use serde_json::{Value, json};

const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// How long `ADD` waits for the agent unless the configuration says `timeout`.
const DEFAULT_TIMEOUT_SECS: u64 = 10;
/// `DEL` never fails, but it should not hold the runtime's teardown up for long either.
const DEL_TIMEOUT: Duration = Duration::from_secs(2);

/// The spec's well-known error codes.
const INCOMPATIBLE_VERSION: u32 = 1;
const INVALID_ENV: u32 = 4;
const DECODE_FAILED: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;
/// Plugin-specific (100 and up): the agent answered that it cannot redirect the pod.
const AGENT_REFUSED: u32 = 100;

/// The network configuration on stdin: the spec's fields and ours.
#[derive(Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    /// Seconds `ADD` waits for the agent.
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
}

/// The spec's error object.
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

fn main() -> ExitCode {
    let mut stdin = String::new();
    let outcome = std::io::stdin()
        .read_to_string(&mut stdin)
        .map_err(|e| CniError::new(DECODE_FAILED, "cannot read stdin", e.to_string()))
        .and_then(|_| run(&stdin));
    // The error names the configuration's version, as the spec asks, when it can be read.
    let version = serde_json::from_str::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".to_owned());
    match outcome {
        Ok(output) => {
            if let Some(output) = output {
                println!("{output}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!(
                "{}",
                json!({"cniVersion": version, "code": error.code, "msg": error.msg, "details": error.details})
            );
            ExitCode::FAILURE
        }
    }
}

/// Runs `CNI_COMMAND` on the configuration `stdin`; returns what goes to stdout.
fn run(stdin: &str) -> Result<Option<Value>, CniError> {
    let command = std::env::var("CNI_COMMAND")
        .map_err(|_| CniError::new(INVALID_ENV, "CNI_COMMAND is not set", ""))?;
    if command == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf: NetConf = serde_json::from_str(stdin).map_err(|e| {
        CniError::new(
            DECODE_FAILED,
            "cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {:?}", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let args = cni_args();
    match command.as_str() {
        "ADD" => add(&conf, &socket, &args).map(Some),
        "CHECK" => {
            // Whether the pod is still redirected is the agent's to keep (it retries a
            // pod that fails); all the runtime can be told here is whether the chain
            // handed this plugin what it needs. The spec wants no output on success.
            prev_result(&conf)?;
            Ok(None)
        }
        "DEL" => {
            del(&socket, &args);
            Ok(None)
        }
        other => Err(CniError::new(
            INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
            "",
        )),
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
fn cni_args() -> Vec<(String, String)> {
    std::env::var("CNI_ARGS")
        .unwrap_or_default()
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn arg<'a>(args: &'a [(String, String)], key: &str) -> Option<&'a str> {
    args.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn prev_result(conf: &NetConf) -> Result<&Value, CniError> {
    conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            INVALID_CONFIG,
            "ambit-cni is a chained plugin and got no prevResult",
            "list it after the plugin that sets up the pod's interface",
        )
    })
}

fn add(conf: &NetConf, socket: &Path, args: &[(String, String)]) -> Result<Value, CniError> {
    let prev = prev_result(conf)?.clone();
    let (Some(namespace), Some(name)) = (arg(args, "K8S_POD_NAMESPACE"), arg(args, "K8S_POD_NAME"))
    else {
        // Not a Kubernetes pod: nothing ambit could enroll.
        return Ok(prev);
    };
    let netns = std::env::var("CNI_NETNS")
        .ok()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| CniError::new(INVALID_ENV, "CNI_NETNS is not set", ""))?;
    let ips = prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse::<IpAddr>().ok())
        .collect();
    let request = Request::Add(Sandbox {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: arg(args, "K8S_POD_UID").unwrap_or_default().to_owned(),
        netns: netns.into(),
        ips,
    });
    let timeout = Duration::from_secs(conf.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS));
    let pod = format!("{namespace}/{name}");
    match ask(socket, &request, timeout) {
        Ok(Reply::Enrolled | Reply::NotInMesh { .. }) => Ok(prev),
        Ok(Reply::Failed { reason }) => Err(CniError::new(
            AGENT_REFUSED,
            format!("the ambit agent cannot redirect {pod}"),
            reason,
        )),
        Ok(other) => Err(CniError::new(
            AGENT_REFUSED,
            format!("unexpected answer from the ambit agent for {pod}"),
            format!("{other:?}"),
        )),
        Err(error) => Err(CniError::new(
            TRY_AGAIN_LATER,
            format!(
                "no answer from the ambit agent at {} for {pod}",
                socket.display()
            ),
            format!(
                "{error}; a pod cannot start until the agent has redirected it or found it \
                 outside the mesh (this plugin does not ask the API server instead)"
            ),
        )),
    }
}

/// Tells the agent to forget the pod; best effort, as `DEL` must not fail.
fn del(socket: &Path, args: &[(String, String)]) {
    let (Some(namespace), Some(name)) = (arg(args, "K8S_POD_NAMESPACE"), arg(args, "K8S_POD_NAME"))
    else {
        return;
    };
    let request = Request::Del {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: arg(args, "K8S_POD_UID").unwrap_or_default().to_owned(),
    };
    if let Err(error) = ask(socket, &request, DEL_TIMEOUT) {
        // stderr reaches the runtime's log; stdout must stay empty for DEL.
        eprintln!(
            "ambit-cni: cannot tell the agent at {} that {namespace}/{name} is gone: {error}",
            socket.display()
        );
    }
}

/// One request, one reply, within `timeout` for each of writing and reading.
fn ask(socket: &Path, request: &Request, timeout: Duration) -> std::io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        ));
    }
    Ok(serde_json::from_str(&answer)?)
}
