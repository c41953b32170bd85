//! End to end: upgrading the agent in place. Agent A serves; agent B starts beside it on
//! the same pins and state (a DaemonSet's surge pod) and takes A's listening sockets over;
//! A, sent SIGTERM, drains. Clients in a loop through the mesh must see no failure, and
//! connections open through A keep working until A's drain deadline, then are reset.
//! Afterwards only B holds listeners and programs. Run as root (`cargo xtask test`);
//! nothing here is skipped.

use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use ambit_tests::{
    AgentOptions, Binaries, Node, Pod,
    mesh::{BAR, FOO, HTTP_PORT, LEGACY, Mesh, within},
    probe::{Held, Running, probe},
};
use serde_json::Value;

/// Where `ambit-hold serve` (an echo server) runs in every `httpbin`.
const HOLD_PORT: u16 = 9100;
/// Connections held open across the upgrade.
const HELD: u64 = 3;
/// How often a held connection checks that it still works.
const PING: Duration = Duration::from_millis(200);

fn binaries() -> Binaries {
    ambit_tests::test_binaries!()
}

/// The seed scenario with A started with `--drain-timeout drain` and an echo server on
/// every `httpbin`.
fn mesh_draining_in(drain: Duration) -> Mesh {
    let timeout = format!("{}s", drain.as_secs());
    let options = AgentOptions::args(&["--drain-timeout", &timeout]);
    let mut mesh = Mesh::with_agent(binaries(), &options).expect("mesh");
    for server in mesh.httpbin.clone() {
        mesh.node
            .serve_hold(&server, HOLD_PORT)
            .expect("ambit-hold serve");
    }
    mesh
}

/// [`HELD`] connections from `client` to `server`'s echo server, each echoing a byte
/// every [`PING`] for as long as it lives; returns them once all are up, and when.
fn hold(node: &Node, client: &Pod, server: &Pod) -> (Held, Instant) {
    let target = format!("{}:{HOLD_PORT}", server.ip);
    let (count, ping) = (HELD.to_string(), PING.as_millis().to_string());
    let args = [
        "open",
        &target,
        &count,
        "--echo",
        "--ping-ms",
        &ping,
        "--timeout-ms",
        "2000",
        "--hold-seconds",
        "60",
    ];
    let mut held = Held::start(node, client, &args);
    let opened = held.next_line();
    assert_eq!(opened["echoed"], HELD, "every connection is up: {opened}");
    (held, Instant::now())
}

/// A client connecting, sending a byte and reading it back, again and again, for
/// `seconds` (`ambit-probe crr`).
struct Loop {
    name: &'static str,
    probe: Running,
}

impl Loop {
    fn start(node: &Node, name: &'static str, client: &Pod, server: &Pod, seconds: u64) -> Self {
        let target = SocketAddr::new(server.ip.into(), HOLD_PORT);
        let probe = Running::crr(node, client, target, seconds, Duration::from_secs(5));
        Self { name, probe }
    }

    /// Waits for the loop's end and checks that none of its requests failed; `logs` are
    /// the agents' warnings, to tell which one failed a request and why.
    fn assert_no_failure(self, logs: &str) {
        let report = self.probe.finish();
        eprintln!("{}: {report}", self.name);
        assert!(
            report["connections"].as_u64().unwrap_or(0) > 50,
            "{}: the loop ran: {report}",
            self.name
        );
        assert_eq!(
            report["failed"], 0,
            "{}: failed requests: {report}\n{logs}",
            self.name
        );
    }
}

/// Pids holding the proxy's listeners (15001, 15006, 15008) in `pod`'s namespace, one
/// entry per listener and process (a process holds two descriptors of each: one it
/// accepts on, one to hand over).
fn listener_pids(node: &Node, pod: &Pod) -> Vec<(u16, u32)> {
    let output = node
        .command(pod, "ss")
        .args(["-Htlnp"])
        .output()
        .expect("ss");
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(port) = [15001u16, 15006, 15008]
            .into_iter()
            .find(|port| line.contains(&format!("127.0.0.1:{port} ")))
        else {
            continue;
        };
        for part in line.split("pid=").skip(1) {
            let pid = part.split(',').next().unwrap().parse().unwrap();
            found.push((port, pid));
        }
    }
    found.sort_unstable();
    found.dedup();
    found
}

/// The ids of the BPF programs process `pid` holds open (`prog_id:` in its fdinfo).
fn programs_held_by(pid: u32) -> Vec<u64> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let info = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse::<u64>().ok()),
        );
    }
    ids
}

/// The cgroup ids in the kernel's set of agents.
fn agent_cgroups(node: &Node) -> Vec<u64> {
    let path = node.pin_dir.join("PROXY_CGROUPS");
    let output = ambit_tests::check(
        std::process::Command::new("bpftool")
            .args(["--json", "map", "dump", "pinned"])
            .arg(&path),
    )
    .expect("bpftool map dump");
    let entries: Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut ids: Vec<u64> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| match &entry["formatted"]["key"] {
            Value::Number(id) => id.as_u64().unwrap(),
            _ => {
                let bytes: Vec<u8> = entry["key"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16))
                    .collect::<Result<_, _>>()
                    .unwrap();
                u64::from_le_bytes(bytes.try_into().unwrap())
            }
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// Puts `id` in the kernel's set of agents, as a crashed agent would have left it.
fn plant_agent_cgroup(node: &Node, id: u64) {
    let hex = |bytes: &[u8]| {
        bytes
            .iter()
            .map(|b| format!("{b:#04x}"))
            .collect::<Vec<_>>()
    };
    let path = node.pin_dir.join("PROXY_CGROUPS");
    ambit_tests::check(
        std::process::Command::new("bpftool")
            .args(["map", "update", "pinned"])
            .arg(&path)
            .arg("key")
            .args(hex(&id.to_le_bytes()))
            .arg("value")
            .args(hex(&1u32.to_le_bytes())),
    )
    .expect("bpftool map update");
}

#[test]
fn an_upgrade_under_load_drops_nothing_and_leaves_only_the_new_agent() {
    const DRAIN: Duration = Duration::from_secs(6);
    let mut mesh = mesh_draining_in(DRAIN);
    let node = &mut mesh.node;
    let (foo_sleep, legacy_sleep) = (mesh.sleep[FOO].clone(), mesh.sleep[LEGACY].clone());
    let (foo_server, bar_server) = (mesh.httpbin[FOO].clone(), mesh.httpbin[BAR].clone());
    let own_cgroup = std::fs::metadata(&node.agent_cgroup).unwrap().ino();
    // The id of a cgroup whose agent crashed: the next agent must take it out.
    let stale = own_cgroup + 1_000_000;
    plant_agent_cgroup(node, stale);

    let (mut held, opened) = hold(node, &foo_sleep, &bar_server);
    let loops = [
        Loop::start(node, "foo → bar, same node", &foo_sleep, &bar_server, 16),
        Loop::start(
            node,
            "legacy → foo, plaintext inbound",
            &legacy_sleep,
            &foo_server,
            16,
        ),
    ];
    // Load on A for a moment first: the loops must cross the handover, not start after it.
    std::thread::sleep(Duration::from_secs(1));

    let b = node.start_agent_beside().expect("agent B");
    let ready = within(Duration::from_secs(20), || {
        b.readiness().is_ok_and(|r| r.code == 200)
    });
    assert!(ready.is_some(), "B never became ready:\n{}", b.log_text());
    assert!(
        b.log_text()
            .contains("took over the listening sockets of the running agent"),
        "B took A's listeners:\n{}",
        b.log_text()
    );
    let a_ready = node.agent().unwrap().readiness().unwrap();
    assert_ne!(
        a_ready.code, 200,
        "A, handed over, is not ready: {a_ready:?}"
    );
    assert_eq!(
        agent_cgroups(node),
        [own_cgroup],
        "B removed the dead agent's cgroup and kept the live ones' (A and B share one)"
    );

    let a_programs = programs_held_by(node.agent().unwrap().pid());
    assert!(!a_programs.is_empty(), "A holds its programs");
    let a = node.agent_mut().unwrap();
    let a_pid = a.pid();
    let terminated = Instant::now();
    a.terminate().unwrap();
    // The held connections keep A draining until its deadline, and then no longer.
    let early = a.wait_exit(DRAIN - Duration::from_millis(500)).unwrap();
    assert!(
        early.is_none(),
        "A exited before its deadline: {early:?}\n{}\n{}",
        a.log_text(),
        held.next_line()
    );
    let status = a.wait_exit(Duration::from_secs(3)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "A ends its drain at the deadline: {status:?}"
    );
    let exited = terminated.elapsed();
    eprintln!("A exited {exited:?} after SIGTERM");

    let done = held.next_line();
    eprintln!("held connections: {done}");
    let since_open = |ms: &Value| Duration::from_millis(ms.as_u64().unwrap());
    let sigterm_at = terminated.duration_since(opened);
    assert_eq!(done["closed"], HELD, "{done}");
    assert_eq!(
        done["reset"], HELD,
        "reset at the deadline, never hung: {done}"
    );
    let last_echo = since_open(&done["min_last_echo_ms"]);
    assert!(
        last_echo + PING * 3 >= sigterm_at + DRAIN,
        "every held connection echoed until the deadline ({last_echo:?} after opening; \
         SIGTERM at {sigterm_at:?}): {done}"
    );
    let last_close = since_open(&done["last_closed_ms"]);
    assert!(
        last_close <= sigterm_at + exited + Duration::from_secs(1),
        "reset as A exited: {done}"
    );

    let warnings = |log: String| {
        let lines: Vec<_> = log.lines().filter(|l| l.contains("WARN")).collect();
        lines.join("\n")
    };
    let logs = format!(
        "A's warnings:\n{}\nB's warnings:\n{}",
        warnings(node.agent().unwrap().log_text()),
        warnings(b.log_text())
    );
    for requests in loops {
        requests.assert_no_failure(&logs);
    }
    assert!(
        !b.recorded("bar/httpbin", "inbound").unwrap().is_empty(),
        "B served the loop after the handover"
    );

    // Only B holds the pods' listeners and the kernel programs.
    let b_pid = b.pid();
    for pod in [
        &mesh.sleep[FOO],
        &mesh.httpbin[FOO],
        &mesh.sleep[BAR],
        &mesh.httpbin[BAR],
    ] {
        let holders = listener_pids(&mesh.node, pod);
        assert_eq!(
            holders,
            [(15001, b_pid), (15006, b_pid), (15008, b_pid)],
            "{}/{}: listeners (A was {a_pid})",
            pod.namespace,
            pod.name
        );
    }
    let b_programs = programs_held_by(b_pid);
    for (link, program) in mesh.node.linked_programs() {
        assert!(
            b_programs.contains(&program) && !a_programs.contains(&program),
            "link {link} runs program {program}: B's are {b_programs:?}, A's were {a_programs:?}"
        );
    }
    let codes = mesh.codes(HTTP_PORT).unwrap();
    assert_eq!(
        codes, [[200; 3]; 3],
        "every pod reaches every other through B"
    );
}

#[test]
fn a_second_sigterm_ends_the_drain_at_once_and_resets_what_is_left() {
    let mut mesh = mesh_draining_in(Duration::from_secs(120));
    let (foo_sleep, bar_server) = (mesh.sleep[FOO].clone(), mesh.httpbin[BAR].clone());
    let (mut held, opened) = hold(&mesh.node, &foo_sleep, &bar_server);

    mesh.node.agent().unwrap().terminate().unwrap();
    let readiness = within(Duration::from_secs(5), || {
        let answer = mesh.node.agent().unwrap().readiness().unwrap();
        answer.code == 503 && answer.body.contains(r#""draining":true"#)
    });
    assert!(
        readiness.is_some(),
        "a draining agent is not ready, and says why"
    );
    // Without a successor the listeners are closed: new connections are refused at
    // once (fail closed), while the open ones go on.
    let target = format!("{}:{HTTP_PORT}", bar_server.ip);
    let refused = probe(
        &mesh.node,
        &foo_sleep,
        &["connect", &target, "--timeout-ms", "3000"],
    );
    assert_eq!(refused["connected"], false, "{refused}");
    let a = mesh.node.agent_mut().unwrap();
    assert!(
        a.wait_exit(Duration::from_secs(2)).unwrap().is_none(),
        "A drains while connections are open"
    );

    let second = Instant::now();
    a.terminate().unwrap();
    let status = a.wait_exit(Duration::from_secs(1)).unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "the second SIGTERM ends the drain at once: {status:?}"
    );
    let done = held.next_line();
    eprintln!("held connections: {done}");
    let second_at = second.duration_since(opened);
    assert_eq!(done["reset"], HELD, "{done}");
    let ms = |key: &str| Duration::from_millis(done[key].as_u64().unwrap());
    assert!(
        ms("min_last_echo_ms") + PING * 3 >= second_at,
        "the connections worked until the second SIGTERM: {done}"
    );
    assert!(
        ms("last_closed_ms") <= second_at + Duration::from_secs(1),
        "reset within a second of it: {done}"
    );
}
