//! End to end: a client opening connection after connection, more of them than its pod has
//! ephemeral ports, through the plaintext inbound listener, the same-node path and HBONE. The
//! proxy's connection to the application carries the client's address, so it shares the
//! pod's port space with the client's own connections: if it leaves its sockets in
//! TIME_WAIT there, `bind` runs out of the ports it prefers and hands out ports a client
//! connection is using, and that connection to the application never completes (issue 13's
//! upgrade test caught one such request stuck after ~14,000 connections). Run as root
//! (`cargo xtask test`); nothing here is skipped.

use std::{net::SocketAddr, time::Duration};

use ambit_tests::{
    AgentOptions, Node, Pod,
    mesh::{BAR, FOO, LEGACY, Mesh},
    probe::Running,
};

const ECHO_PORT: u16 = 9100;
/// Each pod's ephemeral ports for this test: 1,000 a side of `bind`'s and `connect`'s
/// parity, used up within seconds unless the proxy's sockets give theirs back; few enough
/// that a busy test machine still makes more connections than that.
const PORT_RANGE: (u16, u16) = (32768, 34767);
const SECONDS: u64 = 8;

fn narrow_ports(node: &Node, pod: &Pod) {
    let range = format!(
        "net.ipv4.ip_local_port_range={} {}",
        PORT_RANGE.0, PORT_RANGE.1
    );
    ambit_tests::check(node.command(pod, "sysctl").args(["-w", &range])).expect("sysctl");
}

fn start_crr(node: &Node, client: &Pod, server: &Pod) -> Running {
    let target = SocketAddr::new(server.ip.into(), ECHO_PORT);
    Running::crr(node, client, target, SECONDS, Duration::from_secs(3))
}

/// A mesh whose `foo` and `bar` servers echo on [`ECHO_PORT`], with every pod this test
/// uses narrowed to [`PORT_RANGE`].
fn mesh(agent: &AgentOptions) -> Mesh {
    let mut mesh = Mesh::with_agent(ambit_tests::test_binaries!(), agent).expect("mesh");
    let hold = mesh.node.binaries.hold.to_string_lossy().into_owned();
    for to in [FOO, BAR] {
        let server = mesh.httpbin[to].clone();
        mesh.node
            .serve(
                &server,
                &hold,
                &["serve", &ECHO_PORT.to_string()],
                ECHO_PORT,
            )
            .unwrap();
    }
    for pod in [
        &mesh.sleep[LEGACY],
        &mesh.sleep[FOO],
        &mesh.httpbin[FOO],
        &mesh.httpbin[BAR],
    ] {
        narrow_ports(&mesh.node, pod);
    }
    mesh
}

/// Runs the client loops `(name, client, server)` side by side and asserts each made more
/// connections than a pod has ports, with none failed.
fn assert_never_out_of_ports(mesh: &Mesh, loops: &[(&str, usize, usize)]) {
    let running: Vec<_> = loops
        .iter()
        .map(|&(name, from, to)| {
            let probe = start_crr(&mesh.node, &mesh.sleep[from], &mesh.httpbin[to]);
            (name, probe)
        })
        .collect();
    let ports = u64::from(PORT_RANGE.1 - PORT_RANGE.0 + 1);
    for (name, probe) in running {
        let report = probe.finish();
        eprintln!("{name}: {report}");
        assert_eq!(report["failed"], 0, "{name}: failed requests: {report}");
        // Fewer connections than ports would prove nothing.
        assert!(
            report["connections"].as_u64().unwrap_or(0) > ports,
            "{name}: more connections than the pod has ports ({ports}): {report}"
        );
    }
}

#[test]
fn more_connections_than_the_pods_ports_never_collide_with_the_clients_own() {
    let mesh = mesh(&AgentOptions::default());
    assert_never_out_of_ports(
        &mesh,
        &[
            ("legacy → foo, plaintext inbound", LEGACY, FOO),
            ("foo → bar, same node", FOO, BAR),
        ],
    );
}

/// Through HBONE, the client's reset reaches the destination proxy as a cancelled stream,
/// which hyper reads as an end of stream: the connection to the application then ends in
/// order, and its TIME_WAIT must not keep the port from the next one.
#[test]
fn more_hbone_streams_than_the_pods_ports_never_run_out_of_ports() {
    let mesh = mesh(&AgentOptions::args(&["--same-node-shortcut=false"]));
    assert_never_out_of_ports(&mesh, &[("foo → bar, HBONE", FOO, BAR)]);
}
