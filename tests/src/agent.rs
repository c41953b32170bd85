//! The agent under test: the real `ambit run` binary, one per node, with its own cgroup
//! (a child of the node's, see [`Node::agent_cgroup`]), pin directory, admin and metrics
//! ports, and access log file.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    node::{AgentOptions, Node},
    run::{CurlResult, check},
};

pub struct Agent {
    child: Child,
    pub admin: SocketAddr,
    pub readiness: SocketAddr,
    /// `--metrics-addr`, on loopback: agents of parallel tests share the host's network.
    pub metrics: SocketAddr,
    /// The agent's stderr.
    pub log: PathBuf,
    /// `--access-log`.
    pub access_log: PathBuf,
}

/// The access log of the agent that logs to `log`: one per agent, like its log, since a
/// second agent may run beside the first.
pub(crate) fn access_log_of(log: &std::path::Path) -> PathBuf {
    log.with_extension("access.log")
}

/// Starts of an agent that lost one of its ports to another process.
const START_ATTEMPTS: usize = 3;

impl Agent {
    /// Starts an agent for `node` on free loopback ports, logging to `log`, and waits until
    /// it is ready or, when `options` expect it [`AgentOptions::unready`], until its
    /// readiness endpoint answers. A port that was free when picked can be taken before the
    /// agent binds it (a parallel test's client connection, say): the agent then exits, and
    /// is started again on other ports.
    pub(crate) fn start(node: &Node, options: &AgentOptions, log: PathBuf) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(node, options, log.clone()) {
                Err(error)
                    if attempt < START_ATTEMPTS
                        && format!("{error:#}").contains("Address already in use") =>
                {
                    attempt += 1;
                }
                started => return started,
            }
        }
    }

    fn start_once(node: &Node, options: &AgentOptions, log: PathBuf) -> anyhow::Result<Self> {
        let (admin, readiness, metrics) = (free_port()?, free_port()?, free_port()?);
        let access_log = access_log_of(&log);
        // The shell joins the agent's cgroup, then becomes (exec) the agent, through
        // `prlimit` when asked: the child's PID stays the agent's.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"echo $$ > "$1" && shift && exec "$@""#, "sh"])
            .arg(node.agent_cgroup.join("cgroup.procs"));
        if let Some(nofile) = options.nofile {
            cmd.args(["prlimit", &format!("--nofile={nofile}:{nofile}"), "--"]);
        }
        let child = cmd
            .arg(&node.binaries.ambit)
            .arg("run")
            .arg("--config-dir")
            .arg(&node.config_dir)
            .arg("--cgroup")
            .arg(&node.cgroup)
            .arg("--bpf-pin-dir")
            .arg(&node.pin_dir)
            .arg("--state-dir")
            .arg(node.state_dir())
            .args(["--node-name", &node.id])
            .args(&options.args)
            .args(["--admin-addr", &admin.to_string()])
            .args(["--readiness-addr", &readiness.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .arg("--access-log")
            .arg(&access_log)
            .env("RUST_LOG", "info,ambit=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(File::options().create(true).append(true).open(&log)?)
            .spawn()
            .context("cannot start the agent")?;
        let mut agent = Self {
            child,
            admin,
            readiness,
            metrics,
            log,
            access_log,
        };
        agent.wait_readiness(|code| options.unready || code == 200)?;
        agent.check_cgroup(node)?;
        Ok(agent)
    }

    /// Sends SIGTERM to the agent (by its PID) and waits for it to exit.
    pub(crate) fn stop(&mut self) -> anyhow::Result<()> {
        self.terminate()?;
        if self.wait_exit(Duration::from_secs(10))?.is_some() {
            return Ok(());
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("the agent did not exit within 10 s of SIGTERM")
    }

    /// Sends SIGTERM to the agent (by its PID): it starts draining, or with a second one
    /// ends its drain.
    pub fn terminate(&self) -> anyhow::Result<()> {
        check(Command::new("kill").args(["-TERM", &self.child.id().to_string()]))?;
        Ok(())
    }

    /// Waits at most `limit` for the agent to exit; its status, or `None` while it runs.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the agent with SIGKILL, as the OOM killer or a crash would end it, and waits
    /// for it to exit.
    pub(crate) fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("cannot kill the agent")?;
        self.child.wait()?;
        Ok(())
    }

    /// The agent's process id, for reading its `/proc` figures (CPU time, RSS) or
    /// attaching a profiler.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the agent process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// GET `path` on the admin API, as JSON; any status but 200 is an error carrying the
    /// body.
    pub fn admin_get(&self, path: &str) -> anyhow::Result<Value> {
        let body = get(self.admin, path)?;
        serde_json::from_str(&body).with_context(|| format!("admin {path} is not JSON"))
    }

    /// The metrics endpoint's text (`GET /metrics`).
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        get(self.metrics, "/metrics")
    }

    /// `GET /healthz/ready`: the status (0 when nothing answered) and the body.
    pub fn readiness(&self) -> anyhow::Result<CurlResult> {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "1", "-w", "\n%{http_code}"])
            .arg(format!("http://{}/healthz/ready", self.readiness))
            .output()
            .context("cannot run curl")?;
        Ok(CurlResult::from_output(&output))
    }

    /// Every connection the proxy recorded, live and recently closed, in the order it saw
    /// them.
    pub fn connections(&self) -> anyhow::Result<Vec<Value>> {
        let report = self.admin_get("/connections")?;
        let mut all: Vec<Value> = ["closed", "live"]
            .iter()
            .flat_map(|k| report[*k].as_array().cloned().unwrap_or_default())
            .collect();
        all.sort_by_key(|c| c["id"].as_u64());
        Ok(all)
    }

    /// Connections the proxy recorded for `workload` (`ns/name`) in `direction`.
    pub fn recorded(&self, workload: &str, direction: &str) -> anyhow::Result<Vec<Value>> {
        Ok(self
            .connections()?
            .into_iter()
            .filter(|c| c["workload"] == workload && c["direction"] == direction)
            .collect())
    }

    /// The admin API's entry for `workload` (`ns/name`), or null.
    pub fn workload(&self, workload: &str) -> anyhow::Result<Value> {
        let workloads = self.admin_get("/workloads")?;
        let (namespace, name) = workload.split_once('/').context("namespace/name")?;
        Ok(workloads
            .as_array()
            .and_then(|list| {
                list.iter()
                    .find(|w| w["namespace"] == namespace && w["name"] == name)
                    .cloned()
            })
            .unwrap_or(Value::Null))
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The access log's lines so far, as JSON.
    pub fn access_log_lines(&self) -> anyhow::Result<Vec<Value>> {
        let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines()
            .map(|line| serde_json::from_str(line).with_context(|| format!("not JSON: {line}")))
            .collect()
    }

    /// Fails unless the agent runs in [`Node::agent_cgroup`].
    fn check_cgroup(&self, node: &Node) -> anyhow::Result<()> {
        let membership = std::fs::read_to_string(format!("/proc/{}/cgroup", self.pid()))?;
        let expected = node
            .agent_cgroup
            .strip_prefix(crate::node::cgroup2_root()?)
            .context("the agent cgroup is under the cgroup2 root")?;
        // cgroup2's line: `0::/<path below the root>`.
        let in_place = membership
            .lines()
            .any(|l| l.strip_prefix("0::") == Some(&format!("/{}", expected.display())));
        if !in_place {
            bail!(
                "the agent is not in {}: {membership}",
                node.agent_cgroup.display()
            );
        }
        Ok(())
    }

    /// Polls the readiness endpoint until it answers with a status that satisfies `done`,
    /// for at most 20 s.
    fn wait_readiness(&mut self, done: impl Fn(u16) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the agent exited ({status}) while starting:\n{}",
                    self.log_text()
                );
            }
            let answer = self.readiness()?;
            if answer.code != 0 && done(answer.code) {
                return Ok(());
            }
            last = Some(answer);
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "the agent was not ready within 20 s (last answer {last:?}):\n{}",
            self.log_text()
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.stop();
        }
    }
}

/// The body of `GET http://<addr><path>`; any status but 200 is an error carrying it.
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let output = check(Command::new("curl").args([
        "-sS",
        "--max-time",
        "3",
        "-w",
        "\n%{http_code}",
        &format!("http://{addr}{path}"),
    ]))?;
    let response = CurlResult::from_output(&output);
    if response.code != 200 {
        bail!("{addr}{path}: {}: {}", response.code, response.body.trim());
    }
    Ok(response.body)
}

/// A loopback port that was free a moment ago.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?)
}
