//! End to end: the agent killed with SIGKILL (a crash, the OOM killer) and started again,
//! and a second agent beside a running one that cannot take its listeners over. Clients must learn at once that their
//! connections broke, enrolled pods must stay closed while no agent serves them, and
//! readiness must say whether this process serves the node's pods. Run as root
//! (`cargo xtask test`); nothing here is skipped.

use std::time::{Duration, Instant};

use ambit_tests::{
    Binaries, Node, Pod,
    mesh::{BAR, FOO, HTTP_PORT, LEGACY, Mesh, within},
    probe::{Held, probe},
};
use serde_json::Value;

/// Where the tests run `ambit-hold serve`, an echo server that holds connections.
const HOLD_PORT: u16 = 9100;
/// Connections held open on each path.
const HELD: u64 = 3;
/// How soon after the agent dies a client must see its connection end, and a new
/// connection be refused.
const PROMPTLY: Duration = Duration::from_secs(1);

fn binaries() -> Binaries {
    ambit_tests::test_binaries!()
}

/// The scenario with `ambit-hold serve` on every `httpbin`.
fn mesh_holding() -> Mesh {
    let mut mesh = Mesh::new(binaries()).expect("mesh");
    for server in mesh.httpbin.clone() {
        mesh.node
            .serve_hold(&server, HOLD_PORT)
            .expect("ambit-hold serve");
    }
    mesh
}

/// Connections held through the proxy on one path, and when the probe reported them open.
struct Path {
    name: &'static str,
    held: Held,
    opened: Instant,
}

impl Path {
    /// Opens [`HELD`] echoed connections from `client` to `server`'s `ambit-hold`.
    fn open(node: &Node, name: &'static str, client: &Pod, server: &Pod) -> Self {
        let target = format!("{}:{HOLD_PORT}", server.ip);
        let count = HELD.to_string();
        let args = ["open", &target, &count, "--echo", "--hold-seconds", "15"];
        let mut held = Held::start(node, client, &args);
        let opened = held.next_line();
        assert_eq!(
            opened["echoed"], HELD,
            "{name}: every connection is up: {opened}"
        );
        Self {
            name,
            held,
            opened: Instant::now(),
        }
    }

    /// Waits for the probe's report on how its connections ended; returns it with the
    /// time from `killed` to the last close.
    fn ended(mut self, killed: Instant) -> (Value, Option<Duration>) {
        let done = self.held.next_line();
        // `opened` was taken when the probe's first line was read, a little after it was
        // printed: the latency computed from it errs on the long side.
        let kill_at = killed.duration_since(self.opened);
        let last = done["last_closed_ms"]
            .as_u64()
            .map(|ms| Duration::from_millis(ms).saturating_sub(kill_at));
        eprintln!("{}: {done} (last close {last:?} after the kill)", self.name);
        (done, last)
    }
}

/// Established TCP connections that `ambit-hold` holds on `port` in `pod`'s namespace
/// (the proxy's sockets steered there show the same local port).
fn established(node: &Node, pod: &Pod, port: u16) -> usize {
    let output = node
        .command(pod, "ss")
        .args(["-Htnp", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("ss");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.contains("ambit-hold"))
        .count()
}

/// One new connection from `from` to `to`'s HTTP port, sending a request marked `marker`;
/// returns the probe's report and how long it took.
fn connect_once(node: &Node, from: &Pod, to: &Pod, marker: &str) -> (Value, Duration) {
    let target = format!("{}:{HTTP_PORT}", to.ip);
    let request = format!("GET /{marker} HTTP/1.0\\r\\n\\r\\n");
    let start = Instant::now();
    let report = probe(
        node,
        from,
        &[
            "connect",
            &target,
            "--send",
            &request,
            "--timeout-ms",
            "3000",
        ],
    );
    (report, start.elapsed())
}

#[test]
fn a_killed_agent_ends_held_connections_at_once_and_fails_closed_until_restarted() {
    let mut mesh = mesh_holding();
    let node = &mesh.node;
    let (foo_sleep, legacy_sleep) = (&mesh.sleep[FOO], &mesh.sleep[LEGACY]);
    let paths = [
        Path::open(node, "foo → bar over HBONE", foo_sleep, &mesh.httpbin[BAR]),
        Path::open(
            node,
            "legacy → foo, plaintext inbound",
            legacy_sleep,
            &mesh.httpbin[FOO],
        ),
        Path::open(
            node,
            "foo → legacy, direct",
            foo_sleep,
            &mesh.httpbin[LEGACY],
        ),
    ];
    for server in &mesh.httpbin {
        let held = established(node, server, HOLD_PORT);
        assert_eq!(
            held as u64, HELD,
            "{}: the application holds its side",
            server.name
        );
    }

    // Taken before the kill: the agent's sockets close as it dies, before it is reaped.
    let killed = Instant::now();
    mesh.node.kill_agent().unwrap();
    let node = &mesh.node;
    // The applications' side of the proxy's upstream connections.
    for server in &mesh.httpbin {
        let gone = within(PROMPTLY, || established(node, server, HOLD_PORT) == 0);
        eprintln!(
            "{}/{}: server side ended after {gone:?}",
            server.namespace, server.name
        );
        assert!(
            gone.is_some(),
            "{}/{}: the application still holds {} connections 1 s after the agent died",
            server.namespace,
            server.name,
            established(node, server, HOLD_PORT)
        );
    }
    for path in paths {
        let name = path.name;
        let (done, last) = path.ended(killed);
        assert_eq!(
            done["closed"], HELD,
            "{name}: every connection ended: {done}"
        );
        assert!(
            last.is_some_and(|after| after < PROMPTLY),
            "{name}: the connections must end within 1 s of the kill: {done}"
        );
        assert_eq!(
            done["reset"], HELD,
            "{name}: each ended with a reset: {done}"
        );
    }

    // While no agent runs, enrolled pods are closed: connections are refused at once, and
    // nothing reaches a server.
    let capture = mesh.node.capture(&mesh.httpbin[BAR]).unwrap();
    let node = &mesh.node;
    let attempts = [
        (foo_sleep, &mesh.httpbin[BAR], "foo-to-bar-while-dead"),
        (foo_sleep, &mesh.httpbin[LEGACY], "foo-to-legacy-while-dead"),
        (legacy_sleep, &mesh.httpbin[FOO], "legacy-to-foo-while-dead"),
    ];
    for (from, to, marker) in attempts {
        let (report, took) = connect_once(node, from, to, marker);
        eprintln!("{marker}: {report} in {took:?}");
        assert!(
            report["connected"] == false && report["error"] == "refused" && took < PROMPTLY,
            "{marker}: must be refused at once, not time out: {report} in {took:?}"
        );
        assert!(
            !node.app_log(to, HTTP_PORT).contains(marker),
            "{marker} reached the server while no agent ran"
        );
    }
    let packets = capture.finish().unwrap();
    assert!(
        !packets
            .windows(b"while-dead".len())
            .any(|w| w == b"while-dead"),
        "a request crossed bar/httpbin's veth while no agent ran"
    );

    // The next agent re-adopts the pins and serves again, without any other step.
    mesh.node.start_agent().unwrap();
    let node = &mesh.node;
    let result = node.curl(Some(foo_sleep), &mesh.url(BAR, "/ip")).unwrap();
    assert_eq!(result.code, 200, "foo → bar after the restart: {result:?}");
    let outbound = mesh.recorded("foo/sleep", "outbound").unwrap();
    assert_eq!(
        outbound.last().map(|c| &c["path"]),
        Some(&Value::from("same-node")),
        "foo → bar goes through the mesh again (same node: the shortcut): {outbound:#?}"
    );
    let result = node
        .curl(Some(legacy_sleep), &mesh.url(FOO, "/ip"))
        .unwrap();
    assert_eq!(
        result.code, 200,
        "legacy → foo after the restart: {result:?}"
    );
}

#[test]
fn a_second_agent_that_cannot_take_over_is_not_ready_and_says_why() {
    let mesh = Mesh::new(binaries()).expect("mesh");
    let node = &mesh.node;
    // Without the running agent's handover socket, the second one finds the pods' ports
    // held (an upgrade, where it takes them over, is `upgrade.rs`).
    std::fs::remove_file(node.state_dir().join("handover.sock")).expect("a handover socket");
    let second = node.start_agent_beside().unwrap();
    let mut last = None;
    let refused = within(Duration::from_secs(10), || {
        let answer = second.readiness().unwrap();
        let not_ready = answer.code == 503 && answer.body.contains("foo/httpbin");
        last = Some(answer);
        not_ready
    });
    let answer = last.expect("asked at least once");
    eprintln!("second agent: {} {}", answer.code, answer.body);
    assert!(
        refused.is_some(),
        "the second agent holds no listener, yet answers {answer:?}"
    );
    let body: Value = serde_json::from_str(&answer.body).expect("the body is JSON");
    let reasons = body["unserved"].to_string();
    assert!(
        reasons.contains("foo/sleep") && reasons.contains("Address already in use"),
        "the body names the pods and why: {body:#}"
    );

    let first = node.agent().unwrap().readiness().unwrap();
    assert_eq!(first.code, 200, "the first agent stays ready: {first:?}");
    // Nothing the second agent did disturbed the first one's pods.
    drop(second);
    let codes = mesh.codes(HTTP_PORT).unwrap();
    assert_eq!(codes, [[200; 3]; 3], "every pod still reaches every other");
}
