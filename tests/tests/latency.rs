//! End to end: what a new connection costs in time through the mesh. Not a benchmark (that
//! is `cargo xtask bench`): a guard against stalls of tens of milliseconds, such as Nagle's
//! algorithm holding back a small TLS record until the peer's delayed ACK (issue 12).

use ambit_tests::{
    AgentOptions,
    mesh::{BAR, FOO, LEGACY, Mesh},
};
use serde_json::Value;

/// Where the test runs `ambit-hold serve`: it echoes one byte, as netperf's `TCP_CRR`.
const ECHO_PORT: u16 = 9100;
/// A meshed connect + 1-byte request + 1-byte reply takes a millisecond or two here (debug
/// build); a stall costs 40 ms (Linux's delayed ACK). The bounds leave room for a busy test
/// machine without letting a stall of every connection (median) or of more than one in a
/// hundred (p99) pass.
const MAX_MEDIAN_MS: f64 = 20.0;
const MAX_P99_MS: f64 = 35.0;

/// `ambit-probe crr` from `from` to the echo server of `to`'s `httpbin` pod.
fn crr(mesh: &Mesh, from: usize, to: usize) -> Value {
    let target = format!("{}:{ECHO_PORT}", mesh.httpbin[to].ip);
    let mut cmd = mesh.node.command(&mesh.sleep[from], "timeout");
    cmd.args(["30"]).arg(&mesh.node.binaries.probe).args([
        "crr",
        &target,
        "--seconds",
        "1",
        "--timeout-ms",
        "3000",
    ]);
    let output = ambit_tests::check(&mut cmd).unwrap();
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A mesh whose `foo` and `bar` servers echo on [`ECHO_PORT`].
fn mesh(agent: &AgentOptions) -> Mesh {
    let mut mesh = Mesh::with_agent(ambit_tests::test_binaries!(), agent).expect("mesh");
    for to in [BAR, FOO] {
        let server = mesh.httpbin[to].clone();
        mesh.node.serve_hold(&server, ECHO_PORT).unwrap();
    }
    mesh
}

/// Asserts that new connections `from` → `to` (the path named `path`) work and answer
/// within the bounds above.
fn assert_answers_within_milliseconds(mesh: &Mesh, from: usize, to: usize, path: &str) {
    let report = crr(mesh, from, to);
    let connections = report["connections"].as_u64().unwrap_or(0);
    assert!(
        connections >= 10 && report["failed"] == 0,
        "{path}: connections must work: {report}"
    );
    let ms = |field: &str| report[field].as_f64().unwrap_or(f64::MAX) / 1000.0;
    assert!(
        ms("p50_us") < MAX_MEDIAN_MS && ms("p99_us") < MAX_P99_MS,
        "{path}: a new connection's 1-byte round trip takes {:.1} ms (p99 {:.1} ms): {report}",
        ms("p50_us"),
        ms("p99_us")
    );
}

#[test]
fn a_new_meshed_connection_answers_within_milliseconds() {
    // The same-node path, and the plaintext inbound listener from a pod outside the mesh.
    let mesh = mesh(&AgentOptions::default());
    assert_answers_within_milliseconds(&mesh, FOO, BAR, "same node");
    assert_answers_within_milliseconds(&mesh, LEGACY, FOO, "plaintext inbound");
}

/// HBONE (mutual TLS and HTTP/2 between two pods' proxies): where Nagle's algorithm held
/// the server's second small TLS record back until the client's delayed ACK.
#[test]
fn a_new_connection_over_hbone_answers_within_milliseconds() {
    let mesh = mesh(&AgentOptions::args(&["--same-node-shortcut=false"]));
    assert_answers_within_milliseconds(&mesh, FOO, BAR, "HBONE");
}
