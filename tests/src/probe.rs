//! Running `ambit-probe` (`tests/src/bin/probe.rs`) in a pod and reading its JSON lines.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{Node, Pod};

/// Runs `ambit-probe ARGS...` in `pod` (with room for many descriptors) and returns its
/// last JSON line.
pub fn probe(node: &Node, pod: &Pod, args: &[&str]) -> Value {
    let output = probe_command(node, pod, args)
        .output()
        .expect("run ambit-probe");
    last_json(&output.stdout, &output.stderr, args)
}

/// `ambit-probe ARGS...` in `pod`, under `prlimit --nofile=16384`.
pub fn probe_command(node: &Node, pod: &Pod, args: &[&str]) -> Command {
    let mut cmd = node.command(pod, "prlimit");
    cmd.arg("--nofile=16384")
        .arg(&node.binaries.probe)
        .args(args);
    cmd
}

/// The last JSON line of a finished `ambit-probe`; panics with its output when there is
/// none.
pub fn last_json(stdout: &[u8], stderr: &[u8], args: &[&str]) -> Value {
    let stdout = String::from_utf8_lossy(stdout);
    let line = stdout.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "ambit-probe {args:?} printed no JSON ({e}): stdout {stdout:?} stderr {:?}",
            String::from_utf8_lossy(stderr)
        )
    })
}

/// An `ambit-probe` started in the background, whose last JSON line is read when it ends.
pub struct Running {
    child: Child,
    args: Vec<String>,
}

impl Running {
    pub fn start(node: &Node, pod: &Pod, args: &[&str]) -> Self {
        let child = probe_command(node, pod, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ambit-probe");
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        Self { child, args }
    }

    /// `ambit-probe crr` from `pod` to `target` for `seconds`, each attempt given `timeout`.
    pub fn crr(
        node: &Node,
        pod: &Pod,
        target: SocketAddr,
        seconds: u64,
        timeout: Duration,
    ) -> Self {
        let (target, seconds) = (target.to_string(), seconds.to_string());
        let timeout = timeout.as_millis().to_string();
        let args = [
            "crr",
            &target,
            "--seconds",
            &seconds,
            "--timeout-ms",
            &timeout,
        ];
        Self::start(node, pod, &args)
    }

    /// Waits for the end and returns the last JSON line.
    pub fn finish(self) -> Value {
        let output = self.child.wait_with_output().expect("ambit-probe");
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        last_json(&output.stdout, &output.stderr, &args)
    }
}

/// A running `ambit-probe open`, read line by line; killed on drop.
pub struct Held {
    child: Child,
    lines: BufReader<ChildStdout>,
    args: Vec<String>,
}

impl Held {
    pub fn start(node: &Node, pod: &Pod, args: &[&str]) -> Self {
        let mut child = probe_command(node, pod, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ambit-probe");
        let lines = BufReader::new(child.stdout.take().expect("piped"));
        Self {
            child,
            lines,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// The next JSON line; the probe always ends by itself, so this returns.
    pub fn next_line(&mut self) -> Value {
        let mut line = String::new();
        self.lines.read_line(&mut line).expect("read ambit-probe");
        serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "ambit-probe {:?}: expected a JSON line, got {line:?} ({e})",
                self.args
            )
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
