//! `ambit-cni`: a chained CNI plugin (spec 1.0.0) placed after the cluster's primary
//! plugin, as istio-cni is. `ADD` hands the pod to the node agent and returns only once the
//! agent holds the pod's sockets (or has found it outside the mesh), so that an enrolled
//! pod's first packet is already captured; `prevResult` passes through unchanged.
//!
//! When the agent cannot answer (no socket, refused, timed out, closed without a reply) and
//! the configuration names a `kubeconfig`, the plugin asks the API server for the pod and
//! its namespace and applies the agent's own rule ([`ambit_cni::membership`]), as
//! istio-cni does: a pod outside the mesh starts without the agent. A pod in the mesh, or
//! one the API server cannot tell about, fails `ADD` with code 11 ("try again later"), so
//! a meshed pod never starts unmeshed. Without `kubeconfig`, no answer from the agent
//! fails `ADD` for every pod.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use ambit_cni::{DEFAULT_SOCKET, Membership, Reply, Request, Sandbox};
use serde::Deserialize;
use serde_json::{Value, json};

mod fallback;

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
    /// A kubeconfig for the API server, asked when the agent cannot answer.
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
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
        Err(error) => {
            let no_answer = format!(
                "no answer from the ambit agent at {} for {pod}",
                socket.display()
            );
            without_agent(conf, namespace, name, &no_answer, &error).map(|()| prev)
        }
    }
}

/// `ADD` when the agent gave no answer (`no_answer`, because of `agent_error`): the pod
/// may start only if the API server shows it outside the mesh.
fn without_agent(
    conf: &NetConf,
    namespace: &str,
    name: &str,
    no_answer: &str,
    agent_error: &std::io::Error,
) -> Result<(), CniError> {
    let Some(kubeconfig) = &conf.kubeconfig else {
        return Err(CniError::new(
            TRY_AGAIN_LATER,
            no_answer,
            format!(
                "{agent_error}; a pod cannot start until the agent has redirected it or found it \
                 outside the mesh (set `kubeconfig` to let a pod outside the mesh start \
                 without the agent)"
            ),
        ));
    };
    match fallback::membership(kubeconfig, namespace, name) {
        Ok(Membership::Enrolled) => Err(CniError::new(
            TRY_AGAIN_LATER,
            format!("{no_answer}, which the API server shows in the mesh"),
            format!("{agent_error}; the pod cannot start until the agent has redirected it"),
        )),
        Ok(outside) => {
            // stderr reaches the runtime's log: say why this pod started without the agent.
            eprintln!(
                "ambit-cni: {no_answer} ({agent_error}); the API server shows it outside the \
                 mesh ({outside}), so it starts without the agent"
            );
            Ok(())
        }
        Err(api_error) => Err(CniError::new(
            TRY_AGAIN_LATER,
            format!("{no_answer}, and the API server cannot tell whether it is in the mesh"),
            format!("agent: {agent_error}; API server: {api_error}"),
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

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use super::*;

    fn conf(value: Value) -> NetConf {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn conf_reads_kubeconfig_and_keeps_it_optional() {
        let full = conf(json!({
            "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ambit-cni",
            "agent_socket": "/run/ambit.sock", "timeout": 3,
            "kubeconfig": "/etc/cni/net.d/ambit-cni.kubeconfig",
            "prevResult": {"cniVersion": "1.0.0", "ips": []},
        }));
        assert_eq!(
            full.kubeconfig.as_deref(),
            Some(Path::new("/etc/cni/net.d/ambit-cni.kubeconfig"))
        );
        assert_eq!(
            full.agent_socket.as_deref(),
            Some(Path::new("/run/ambit.sock"))
        );
        assert_eq!(full.timeout, Some(3));
        let bare = conf(json!({"cniVersion": "1.0.0", "name": "n", "type": "ambit-cni"}));
        assert_eq!(bare.kubeconfig, None);
        assert_eq!(bare.agent_socket, None);
        assert_eq!(bare.timeout, None);
    }

    #[test]
    fn no_agent_and_no_kubeconfig_fails_add() {
        let bare = conf(json!({"cniVersion": "1.0.0"}));
        let agent_error = std::io::Error::from(ErrorKind::NotFound);
        let error = without_agent(&bare, "plain", "web", "no answer", &agent_error).unwrap_err();
        assert_eq!(error.code, TRY_AGAIN_LATER);
        assert_eq!(error.msg, "no answer");
    }

    #[test]
    fn no_agent_and_no_api_server_fails_add_naming_both() {
        let unreadable = conf(json!({"cniVersion": "1.0.0", "kubeconfig": "/nonexistent/kc"}));
        let agent_error = std::io::Error::from(ErrorKind::ConnectionRefused);
        let error =
            without_agent(&unreadable, "plain", "web", "no answer", &agent_error).unwrap_err();
        assert_eq!(error.code, TRY_AGAIN_LATER);
        assert!(error.msg.contains("cannot tell"), "{}", error.msg);
        assert!(
            error.details.contains("agent: connection refused")
                && error.details.contains("/nonexistent/kc"),
            "{}",
            error.details
        );
    }
}
