//! `cargo xtask bench`: what the mesh costs. The test bed's node gets four namespaces,
//! `bench-direct` (not enrolled), `bench-mesh` (enrolled, no policy), `bench-2nodes`
//! (enrolled, no policy, its server on a second node with its own agent, joined as
//! [`Node::join`] does) and `bench-l7` (enrolled, with policies that need HTTP on the
//! server's HTTP port, see [`l7`]), each with a `client` and a `server` pod. Passes go in
//! rounds, direct, mesh, mesh-2nodes, mesh-l7, direct, … so that drift of the machine
//! lands on all modes alike; each pass runs the tools of its mode (all of them but in
//! mesh-l7, where the keep-alive HTTP run goes alone) from the client pod to the server
//! pod of its namespace and reads the CPU (of both agents in mesh-2nodes) and memory of
//! the agents.
//!
//! Fairness between workloads: the direct and mesh namespaces also hold a neighbour pair,
//! whose `iperf3 -P 8` runs while the client measures its round trips again; the ratio of
//! the two p99s is how much a noisy neighbour on the same node proxy hurts.
//!
//! The mesh passes measure whatever the data path of enrolled pods is: the bench only
//! enrolls them (and writes policies) and never picks a listener or a port of the proxy.
//! It checks which hop each mesh mode took (`same-node` and `hbone` in the agent's
//! records), so that a row never claims a path it did not measure.

mod l7;
mod report;
mod tools;
mod usage;

use std::{ffi::OsStr, path::PathBuf, time::Duration};

use ambit_tests::{Binaries, Node, Pod, mesh::within};
use anyhow::{Context as _, bail};
use report::{Figure, Mode, Part, Pass, Report};
use serde_json::Value;
use usage::Usage;

use crate::build::build_binaries;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// A smoke run: one round of passes, 1 s per tool, 100 idle connections. Checks that
    /// every tool runs and every figure is measured; its numbers mean little.
    #[arg(long)]
    pub quick: bool,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Runs the agents with `--same-node-shortcut=false`, so that the mesh mode measures
    /// HBONE between two pods of one node (as before the shortcut).
    #[arg(long)]
    pub no_same_node_shortcut: bool,
    /// Runs only this part of the bench: `fairness` is the direct and mesh passes'
    /// throughput and round-trip rows, alone and beside the noisy neighbour.
    #[arg(long, value_enum, value_name = "PART")]
    pub only: Option<Part>,
    /// Passes ARG to both agents (repeatable), e.g. `--agent-arg=--bulk-lane=false` to
    /// compare with a behaviour switched off in the same build.
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
}

/// Streams of the noisy neighbour's `iperf3`.
const NEIGHBOUR_STREAMS: u32 = 8;
/// How long the neighbour runs before the round trips are measured: its streams must have
/// connected and reached their rate.
const NEIGHBOUR_WARM_UP: Duration = Duration::from_secs(2);
/// How long the agent is left idle after a pass's load before its RSS is read: enough
/// for an allocator that returns memory on a timer to have done so.
const AFTER_LOAD_SETTLE: Duration = Duration::from_secs(5);

/// How much a run measures.
struct Plan {
    /// Rounds of passes, one pass of each mode per round.
    rounds: usize,
    /// Duration of each tool run.
    seconds: u32,
    idle_connections: u32,
    /// The one part to run, or the whole bench.
    only: Option<Part>,
}

impl Plan {
    fn new(quick: bool, only: Option<Part>) -> Self {
        let (rounds, seconds, idle_connections) = match quick {
            true => (1, 1, 100),
            false => (3, 10, 1000),
        };
        Self {
            rounds,
            seconds,
            idle_connections,
            only,
        }
    }

    /// The modes of a round.
    fn modes(&self) -> &'static [Mode] {
        self.only.map_or(&Mode::ALL[..], Part::modes)
    }
}

pub fn bench(opts: &Options) -> anyhow::Result<()> {
    crate::setup::setup()?;
    if !crate::setup::is_root() {
        bail!(
            "the bench creates network namespaces and loads eBPF: run `sudo -E cargo xtask bench`"
        );
    }
    // Release: a debug build of the proxy would measure the compiler, not the design.
    run(opts, Binaries::in_dir(&build_binaries(true)?)?)
}

/// The bench with `binaries` already built; `cargo xtask test` runs `--quick` this way on
/// its debug build, to keep the bench working without a second build of everything.
pub fn run(opts: &Options, binaries: Binaries) -> anyhow::Result<()> {
    let plan = Plan::new(opts.quick, opts.only);
    let bed = Bed::new(binaries, !opts.no_same_node_shortcut, &opts.agent_args)?;
    let versions = tools::versions()?;
    eprintln!(
        "bench: node {}, agent pid {}, {} round(s) of passes, {} s per tool run",
        bed.node.id,
        bed.node.agent()?.pid(),
        plan.rounds,
        plan.seconds
    );
    let mut passes = Vec::new();
    for round in 1..=plan.rounds {
        for &mode in plan.modes() {
            eprintln!("bench: round {round}/{}, {}", plan.rounds, mode.name());
            let pass = bed
                .pass(mode, &plan, round == 1)
                .with_context(|| format!("round {round}, {} pass", mode.name()))?;
            passes.push((mode, pass));
        }
    }
    let report = Report::new(
        opts.quick,
        plan.seconds,
        plan.idle_connections,
        versions,
        plan.only,
        &passes,
    )?;
    print!("{}", report.table());
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&report.json())?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// The two nodes, the pods per mode, and the agents' /proc figures.
struct Bed {
    /// Runs every client, every server but the two-node mode's, and the agent whose
    /// memory is measured.
    node: Node,
    /// Runs the two-node mode's server, and its own agent.
    second: Node,
    /// `(client, server)` of [`Mode::Direct`], [`Mode::Mesh`], [`Mode::MeshTwoNodes`] and
    /// [`Mode::MeshL7`].
    direct: (Pod, Pod),
    mesh: (Pod, Pod),
    two_nodes: (Pod, Pod),
    l7: (Pod, Pod),
    /// The noisy neighbours' `(client, server)` in the direct and mesh namespaces.
    neighbours: [(Pod, Pod); 2],
    usage: Usage,
    /// The second node's agent.
    second_usage: Usage,
    /// The hop the mesh mode's connections take.
    mesh_hop: &'static str,
}

/// The namespace of the two-node mode.
const TWO_NODES: &str = "bench-2nodes";

impl Bed {
    fn new(
        binaries: Binaries,
        same_node_shortcut: bool,
        agent_args: &[String],
    ) -> anyhow::Result<Self> {
        let mut node = Node::new(binaries)?;
        let mut second = node.join()?;
        let mut pods = Vec::new();
        let mut neighbours = Vec::new();
        for (namespace, enrolled) in [
            ("bench-direct", false),
            ("bench-mesh", true),
            (TWO_NODES, true),
            (l7::NAMESPACE, true),
        ] {
            node.namespace(namespace, enrolled)?;
            let client = node.pod_with(namespace, "client", "client", &[("app", "client")])?;
            let server = if namespace == TWO_NODES {
                second.namespace(namespace, enrolled)?;
                let server =
                    second.pod_with(namespace, "server", "server", &[("app", "server")])?;
                second.learn(&client, None)?;
                node.learn(&server, None)?;
                tools::start_servers(&mut second, &server)?;
                server
            } else {
                node.pod_with(namespace, "server", "server", &[("app", "server")])?
            };
            // The L7 mode runs the HTTP tool alone.
            if namespace == l7::NAMESPACE {
                node.serve_http(&server, tools::HTTP_PORT)?;
            } else if namespace != TWO_NODES {
                tools::start_servers(&mut node, &server)?;
                let labels = [("app", "neighbour")];
                let noisy = node.pod_with(namespace, "neighbour", "neighbour", &labels)?;
                let sink = node.pod_with(namespace, "neighbour-sink", "neighbour", &labels)?;
                tools::start_iperf3(&mut node, &sink)?;
                neighbours.push((noisy, sink));
            }
            pods.push((client, server));
        }
        node.write_file("bench-l7.yaml", &l7::policies())?;
        let shortcut = format!("--same-node-shortcut={same_node_shortcut}");
        let mut args: Vec<&OsStr> = vec![shortcut.as_ref()];
        args.extend(agent_args.iter().map(OsStr::new));
        let pid = node.start_agent_with(&args)?.pid();
        // The second agent signs with the first one's root, so that both trust each other.
        let ca = node.state_dir().join("ca");
        let (cert, key) = (ca.join("root-cert.pem"), ca.join("root-key.pem"));
        let mut second_args = vec![
            OsStr::new("--ca-cert"),
            cert.as_os_str(),
            OsStr::new("--ca-key"),
            key.as_os_str(),
        ];
        second_args.extend(args);
        let second_pid = second.start_agent_with(&second_args)?.pid();
        let [direct, mesh, two_nodes, l7]: [(Pod, Pod); 4] = pods
            .try_into()
            .ok()
            .context("one client and server pair per mode")?;
        let neighbours = neighbours
            .try_into()
            .ok()
            .context("one neighbour pair in the direct and mesh namespaces")?;
        let bed = Self {
            usage: Usage::new(pid)?,
            second_usage: Usage::new(second_pid)?,
            node,
            second,
            direct,
            mesh,
            two_nodes,
            l7,
            neighbours,
            mesh_hop: if same_node_shortcut {
                "same-node"
            } else {
                "hbone"
            },
        };
        bed.check_paths()?;
        bed.check_hops()?;
        l7::check(
            &bed.node,
            (&bed.l7.0, &bed.l7.1),
            (&bed.mesh.0, &bed.mesh.1),
        )?;
        Ok(bed)
    }

    /// `(client, server)` of `mode`.
    fn pods(&self, mode: Mode) -> (&Pod, &Pod) {
        let (client, server) = match mode {
            Mode::Direct => &self.direct,
            Mode::Mesh => &self.mesh,
            Mode::MeshTwoNodes => &self.two_nodes,
            Mode::MeshL7 => &self.l7,
        };
        (client, server)
    }

    /// The mesh pods must be redirected and the direct ones not, or the bench would
    /// compare the kernel with itself.
    fn check_paths(&self) -> anyhow::Result<()> {
        let agent = self.node.agent()?;
        let [direct_neighbour, mesh_neighbour] = &self.neighbours;
        let expected = [
            (&self.direct.0, "not-enrolled"),
            (&self.direct.1, "not-enrolled"),
            (&direct_neighbour.0, "not-enrolled"),
            (&direct_neighbour.1, "not-enrolled"),
            (&self.mesh.0, "redirected"),
            (&self.mesh.1, "redirected"),
            (&mesh_neighbour.0, "redirected"),
            (&mesh_neighbour.1, "redirected"),
            (&self.l7.0, "redirected"),
            (&self.l7.1, "redirected"),
            (&self.two_nodes.0, "redirected"),
            (&self.two_nodes.1, "other-node"),
        ];
        let second = self.second.agent()?;
        let mut last = (Value::Null, Value::Null);
        let settled = within(Duration::from_secs(10), || {
            last = (
                agent.admin_get("/workloads").unwrap_or(Value::Null),
                second.admin_get("/workloads").unwrap_or(Value::Null),
            );
            let served_there =
                workload(&last.1, &self.two_nodes.1)["redirection"]["state"] == "redirected";
            served_there
                && expected
                    .iter()
                    .all(|(pod, state)| workload(&last.0, pod)["redirection"]["state"] == *state)
        });
        if settled.is_none() {
            bail!(
                "the bench pods did not reach their redirection states within 10 s: {:#} {:#}",
                last.0,
                last.1
            );
        }
        Ok(())
    }

    /// One request in each mesh mode, and the hop the agent recorded for it: the mesh
    /// mode's must be [`Self::mesh_hop`], the two-node mode's HBONE.
    fn check_hops(&self) -> anyhow::Result<()> {
        let agent = self.node.agent()?;
        for (mode, hop) in [(Mode::Mesh, self.mesh_hop), (Mode::MeshTwoNodes, "hbone")] {
            let (client, server) = self.pods(mode);
            let url = format!("http://{}:{}/ip", server.ip, tools::HTTP_PORT);
            let answered = self.node.curl(Some(client), &url)?;
            if answered.code != 200 {
                bail!("{} mode: {url} answered {answered:?}", mode.name());
            }
            let key = format!("{}/{}", client.namespace, client.name);
            let recorded = agent.recorded(&key, "outbound")?;
            let path = recorded.last().map(|c| c["path"].clone());
            if path != Some(Value::from(hop)) {
                bail!("{} mode went {path:?}, not {hop}", mode.name());
            }
        }
        Ok(())
    }

    /// Every tool of `mode` once, with the agent's CPU around them; in the `first` round
    /// also its memory (see [`Figure::is_memory`]).
    fn pass(&self, mode: Mode, plan: &Plan, first: bool) -> anyhow::Result<Pass> {
        let (client, server) = self.pods(mode);
        let proxied_before = self.proxied(client)?;
        let (pass, least) = match mode {
            Mode::MeshL7 => {
                let mut pass = Pass::new();
                self.http(&mut pass, mode, client, server, plan)?;
                // wrk's keep-alive connections.
                (pass, 1)
            }
            Mode::Direct | Mode::Mesh | Mode::MeshTwoNodes => (
                self.all_tools(mode, client, server, plan, first)?,
                // The idle connections, where the pass holds them; else iperf3's control
                // and data connections.
                match plan.only {
                    None => u64::from(plan.idle_connections),
                    Some(Part::Fairness) => 2,
                },
            ),
        };
        let proxied = self.proxied(client)? - proxied_before;
        match mode {
            Mode::Mesh | Mode::MeshTwoNodes | Mode::MeshL7 if proxied < least => {
                bail!(
                    "only {proxied} of the {} pass's connections went through the proxy",
                    mode.name()
                )
            }
            Mode::Direct if proxied > 0 => {
                bail!("{proxied} of the direct pass's connections went through the proxy")
            }
            _ => Ok(pass),
        }
    }

    /// The keep-alive HTTP run and the agent's CPU per 1,000 requests; in the L7 mode
    /// with the token its policies want.
    fn http(
        &self,
        pass: &mut Pass,
        mode: Mode,
        client: &Pod,
        server: &Pod,
        plan: &Plan,
    ) -> anyhow::Result<()> {
        let authorization = l7::authorization();
        let headers: &[&str] = match mode {
            Mode::MeshL7 => &[&authorization],
            Mode::Direct | Mode::Mesh | Mode::MeshTwoNodes => &[],
        };
        let (rate, cpu) = self.cpu(mode, || {
            tools::wrk_keepalive(&self.node, client, server.ip, plan.seconds, headers)
        })?;
        pass.insert(Figure::HttpRequestRate, rate.per_second);
        // CPU seconds * 1e6 / requests: µs per request, i.e. ms per 1,000 requests.
        pass.insert(Figure::AgentCpuPerKiloRequest, cpu * 1e6 / rate.requests);
        Ok(())
    }

    /// Every tool, for the direct and mesh modes.
    fn all_tools(
        &self,
        mode: Mode,
        client: &Pod,
        server: &Pod,
        plan: &Plan,
        first: bool,
    ) -> anyhow::Result<Pass> {
        let mut pass = Pass::new();
        if plan.only == Some(Part::Fairness) {
            self.streams_and_round_trips(&mut pass, mode, client, server, plan)?;
            return Ok(pass);
        }
        let (node, ip, seconds) = (&self.node, server.ip, plan.seconds);
        self.usage.reset_peak()?;
        let pass_start = self.cpu_seconds(mode)?;

        // Idle connections before the other tools, so that the first mesh pass measures
        // them on an agent that has only seen direct traffic, which bypasses it.
        let before = self.usage.rss_mib()?;
        let held = tools::hold(node, client, ip, plan.idle_connections)?;
        let with_held = self.usage.rss_mib()?;
        drop(held);
        if first {
            pass.insert(Figure::AgentIdleRss, with_held);
            let per_connection =
                (with_held - before).max(0.0) * 1024.0 / f64::from(plan.idle_connections);
            pass.insert(Figure::AgentIdleRssPerConnection, per_connection);
        }

        self.streams_and_round_trips(&mut pass, mode, client, server, plan)?;
        let (rate, cpu) = self.cpu(mode, || tools::wrk(node, client, ip, seconds))?;
        pass.insert(Figure::ConnectionRate, rate.per_second);
        pass.insert(Figure::AgentCpuPerConnection, cpu * 1e6 / rate.requests);
        let (crr, cpu) = self.cpu(mode, || tools::crr(node, client, ip, seconds))?;
        pass.insert(Figure::CrrRate, crr.per_second);
        pass.insert(Figure::CrrMedian, crr.median_us);
        pass.insert(Figure::CrrP99, crr.p99_us);
        pass.insert(Figure::AgentCpuPerCrr, cpu * 1e6 / crr.connections);
        self.http(&mut pass, mode, client, server, plan)?;

        pass.insert(Figure::AgentCpu, self.cpu_seconds(mode)? - pass_start);
        if first {
            pass.insert(Figure::AgentPeakRss, self.usage.peak_rss_mib()?);
            // What the agent gives back once the load is gone: its pooled HBONE
            // connections stay up (until --hbone-idle-timeout), the rest is freed memory
            // the allocator may return.
            std::thread::sleep(AFTER_LOAD_SETTLE);
            pass.insert(Figure::AgentRssAfterLoad, self.usage.rss_mib()?);
            pass.insert(Figure::AgentAnonRssAfterLoad, self.usage.anon_rss_mib()?);
        }
        Ok(pass)
    }

    /// The throughput and round-trip rows, the latter beside the noisy neighbour too
    /// where `mode` has one: the whole of a pass of [`Part::Fairness`].
    fn streams_and_round_trips(
        &self,
        pass: &mut Pass,
        mode: Mode,
        client: &Pod,
        server: &Pod,
        plan: &Plan,
    ) -> anyhow::Result<()> {
        let (node, ip, seconds) = (&self.node, server.ip, plan.seconds);
        let (one, cpu) = self.cpu(mode, || tools::iperf3(node, client, ip, 1, seconds))?;
        pass.insert(Figure::Throughput1, one.bits_per_second / 1e9);
        pass.insert(Figure::AgentCpuPerGb, cpu * 1e3 / (one.bytes / 1e9));
        let four = tools::iperf3(node, client, ip, 4, seconds)?;
        pass.insert(Figure::Throughput4, four.bits_per_second / 1e9);
        let (rtt, cpu) = self.cpu(mode, || tools::sockperf(node, client, ip, seconds))?;
        pass.insert(Figure::RoundTripMedian, rtt.median_us);
        pass.insert(Figure::RoundTripP99, rtt.p99_us);
        pass.insert(Figure::AgentCpuPerRoundTrip, cpu * 1e6 / rtt.round_trips);
        if let Some(neighbour) = self.neighbour(mode) {
            let loaded = self.round_trip_beside(neighbour, client, server, seconds)?;
            pass.insert(Figure::RoundTripP99UnderLoad, loaded.p99_us);
            pass.insert(Figure::Unfairness, loaded.p99_us / rtt.p99_us);
        }
        Ok(())
    }

    /// The noisy neighbour pair of `mode`: the one-node modes have one.
    fn neighbour(&self, mode: Mode) -> Option<&(Pod, Pod)> {
        match mode {
            Mode::Direct => Some(&self.neighbours[0]),
            Mode::Mesh => Some(&self.neighbours[1]),
            Mode::MeshTwoNodes | Mode::MeshL7 => None,
        }
    }

    /// The client's round trips to its server while the `neighbour` pair runs
    /// `iperf3 -P 8` on the same node (and, meshed, through the same agent).
    fn round_trip_beside(
        &self,
        (noisy, sink): &(Pod, Pod),
        client: &Pod,
        server: &Pod,
        seconds: u32,
    ) -> anyhow::Result<tools::RoundTrip> {
        let node = &self.node;
        // sockperf runs at least 2 s; the neighbour outlasts it by its warm-up and a second.
        let neighbour_seconds = seconds.max(2) + NEIGHBOUR_WARM_UP.as_secs() as u32 + 1;
        std::thread::scope(|scope| {
            let neighbour = scope.spawn(|| {
                tools::iperf3(node, noisy, sink.ip, NEIGHBOUR_STREAMS, neighbour_seconds)
            });
            std::thread::sleep(NEIGHBOUR_WARM_UP);
            let loaded = tools::sockperf(node, client, server.ip, seconds);
            let neighbour = neighbour
                .join()
                .map_err(|_| anyhow::anyhow!("the neighbour's iperf3 thread panicked"))?;
            neighbour.context("the noisy neighbour")?;
            loaded.context("round trips beside the noisy neighbour")
        })
    }

    /// Runs `measure` and returns its result with the agent CPU seconds it took in
    /// `mode`.
    fn cpu<T>(
        &self,
        mode: Mode,
        measure: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(T, f64)> {
        let before = self.cpu_seconds(mode)?;
        let value = measure()?;
        Ok((value, self.cpu_seconds(mode)? - before))
    }

    /// CPU seconds so far of the agents `mode` goes through: both in the two-node mode.
    fn cpu_seconds(&self, mode: Mode) -> anyhow::Result<f64> {
        let first = self.usage.cpu_seconds()?;
        Ok(match mode {
            Mode::MeshTwoNodes => first + self.second_usage.cpu_seconds()?,
            Mode::Direct | Mode::Mesh | Mode::MeshL7 => first,
        })
    }

    /// Outbound connections the proxy has handled for `pod` so far.
    fn proxied(&self, pod: &Pod) -> anyhow::Result<u64> {
        let workloads = self.node.agent()?.admin_get("/workloads")?;
        Ok(workload(&workloads, pod)["stats"]["connections_outbound"]
            .as_u64()
            .unwrap_or(0))
    }
}

/// The admin API's entry for `pod` in `/workloads`, or null.
fn workload<'a>(workloads: &'a Value, pod: &Pod) -> &'a Value {
    workloads
        .as_array()
        .and_then(|list| {
            list.iter().find(|w| {
                w["namespace"] == pod.namespace.as_str() && w["name"] == pod.name.as_str()
            })
        })
        .unwrap_or(&Value::Null)
}
