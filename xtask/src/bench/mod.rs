//! `cargo xtask bench`: what the mesh costs on one node. The test bed's node gets three
//! namespaces, `bench-direct` (not enrolled), `bench-mesh` (enrolled, no policy) and
//! `bench-l7` (enrolled, with policies that need HTTP on the server's HTTP port, see
//! [`l7`]), each with a `client` and a `server` pod, and one agent. Passes go in rounds,
//! direct, mesh, mesh-l7, direct, … so that drift of the machine lands on all modes
//! alike; each pass runs the tools of its mode (all of them in direct and mesh, the
//! keep-alive HTTP run alone in mesh-l7) from the client pod to the server pod of its
//! namespace and reads the agent's CPU and memory.
//!
//! Fairness between workloads: the direct and mesh namespaces also hold a neighbour pair,
//! whose `iperf3 -P 8` runs while the client measures its round trips again; the ratio of
//! the two p99s is how much a noisy neighbour on the same node proxy hurts.
//!
//! The mesh passes measure whatever the data path of enrolled pods is: the bench only
//! enrolls them (and writes policies) and never picks a listener or a port of the proxy.

mod l7;
mod report;
mod tools;
mod usage;

use std::{path::PathBuf, time::Duration};

use ambit_tests::{Binaries, Node, Pod, mesh::within};
use anyhow::{Context as _, bail};
use report::{Figure, Mode, Pass, Report};
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
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 1,
                seconds: 1,
                idle_connections: 100,
            }
        } else {
            Self {
                rounds: 3,
                seconds: 10,
                idle_connections: 1000,
            }
        }
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
    let plan = Plan::new(opts.quick);
    let bed = Bed::new(binaries)?;
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
        for mode in Mode::ALL {
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

/// The node, its pods per mode, and the agent's /proc figures.
struct Bed {
    node: Node,
    /// `(client, server)` of [`Mode::Direct`], [`Mode::Mesh`] and [`Mode::MeshL7`].
    direct: (Pod, Pod),
    mesh: (Pod, Pod),
    l7: (Pod, Pod),
    /// The noisy neighbours' `(client, server)` in the direct and mesh namespaces.
    neighbours: [(Pod, Pod); 2],
    usage: Usage,
}

impl Bed {
    fn new(binaries: Binaries) -> anyhow::Result<Self> {
        let mut node = Node::new(binaries)?;
        let mut pods = Vec::new();
        let mut neighbours = Vec::new();
        for (namespace, enrolled) in [
            ("bench-direct", false),
            ("bench-mesh", true),
            (l7::NAMESPACE, true),
        ] {
            node.namespace(namespace, enrolled)?;
            let client = node.pod_with(namespace, "client", "client", &[("app", "client")])?;
            let server = node.pod_with(namespace, "server", "server", &[("app", "server")])?;
            // The L7 mode runs the HTTP tool alone.
            if namespace == l7::NAMESPACE {
                node.serve_http(&server, tools::HTTP_PORT)?;
            } else {
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
        let pid = node.start_agent()?.pid();
        let [direct, mesh, l7]: [(Pod, Pod); 3] = pods
            .try_into()
            .ok()
            .context("one client and server pair per mode")?;
        let neighbours = neighbours
            .try_into()
            .ok()
            .context("one neighbour pair in the direct and mesh namespaces")?;
        let bed = Self {
            usage: Usage::new(pid)?,
            node,
            direct,
            mesh,
            l7,
            neighbours,
        };
        bed.check_paths()?;
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
        ];
        let mut last = Value::Null;
        let settled = within(Duration::from_secs(10), || {
            last = agent.admin_get("/workloads").unwrap_or(Value::Null);
            expected
                .iter()
                .all(|(pod, state)| workload(&last, pod)["redirection"]["state"] == *state)
        });
        if settled.is_none() {
            bail!("the bench pods did not reach their redirection states within 10 s: {last:#}");
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
            Mode::Direct | Mode::Mesh => (
                self.all_tools(mode, client, server, plan, first)?,
                u64::from(plan.idle_connections),
            ),
        };
        let proxied = self.proxied(client)? - proxied_before;
        match mode {
            Mode::Mesh | Mode::MeshL7 if proxied < least => {
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
            Mode::Direct | Mode::Mesh => &[],
        };
        let (rate, cpu) = self
            .cpu(|| tools::wrk_keepalive(&self.node, client, server.ip, plan.seconds, headers))?;
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
        let (node, ip, seconds) = (&self.node, server.ip, plan.seconds);
        self.usage.reset_peak()?;
        let pass_start = self.usage.cpu_seconds()?;
        let mut pass = Pass::new();

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

        let (one, cpu) = self.cpu(|| tools::iperf3(node, client, ip, 1, seconds))?;
        pass.insert(Figure::Throughput1, one.bits_per_second / 1e9);
        pass.insert(Figure::AgentCpuPerGb, cpu * 1e3 / (one.bytes / 1e9));
        let four = tools::iperf3(node, client, ip, 4, seconds)?;
        pass.insert(Figure::Throughput4, four.bits_per_second / 1e9);
        let rtt = tools::sockperf(node, client, ip, seconds)?;
        pass.insert(Figure::RoundTripMedian, rtt.median_us);
        pass.insert(Figure::RoundTripP99, rtt.p99_us);
        let loaded = self.round_trip_beside_neighbour(mode, client, server, seconds)?;
        pass.insert(Figure::RoundTripP99UnderLoad, loaded.p99_us);
        pass.insert(Figure::Unfairness, loaded.p99_us / rtt.p99_us);
        let (rate, cpu) = self.cpu(|| tools::wrk(node, client, ip, seconds))?;
        pass.insert(Figure::ConnectionRate, rate.per_second);
        pass.insert(Figure::AgentCpuPerConnection, cpu * 1e6 / rate.requests);
        let (crr, cpu) = self.cpu(|| tools::crr(node, client, ip, seconds))?;
        pass.insert(Figure::CrrRate, crr.per_second);
        pass.insert(Figure::CrrMedian, crr.median_us);
        pass.insert(Figure::CrrP99, crr.p99_us);
        pass.insert(Figure::AgentCpuPerCrr, cpu * 1e6 / crr.connections);
        self.http(&mut pass, mode, client, server, plan)?;

        pass.insert(Figure::AgentCpu, self.usage.cpu_seconds()? - pass_start);
        if first {
            pass.insert(Figure::AgentPeakRss, self.usage.peak_rss_mib()?);
            // What the agent gives back once the load is gone: its pooled HBONE
            // connections stay up (until --hbone-idle-timeout), the rest is freed memory
            // the allocator may return.
            std::thread::sleep(AFTER_LOAD_SETTLE);
            pass.insert(Figure::AgentRssAfterLoad, self.usage.rss_mib()?);
        }
        Ok(pass)
    }

    /// The client's round trips to its server while the mode's neighbour pair runs
    /// `iperf3 -P 8` through the same node (and, meshed, the same agent).
    fn round_trip_beside_neighbour(
        &self,
        mode: Mode,
        client: &Pod,
        server: &Pod,
        seconds: u32,
    ) -> anyhow::Result<tools::RoundTrip> {
        let (noisy, sink) = match mode {
            Mode::Direct => &self.neighbours[0],
            Mode::Mesh => &self.neighbours[1],
            Mode::MeshL7 => bail!("the L7 mode has no neighbour"),
        };
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

    /// Runs `measure` and returns its result with the agent CPU seconds it took.
    fn cpu<T>(&self, measure: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, f64)> {
        let before = self.usage.cpu_seconds()?;
        let value = measure()?;
        Ok((value, self.usage.cpu_seconds()? - before))
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
