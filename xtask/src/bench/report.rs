//! The figures a pass measures, and the report over all passes: medians per mode, each
//! mesh mode's ratio to and difference from direct, rendered as a table and as JSON.
//! Building the report checks that every figure is there and not zero in every mode that
//! measures it, because a bench that prints zeros has measured nothing.

use std::collections::BTreeMap;

use anyhow::bail;
use serde_json::{Value, json};

use crate::debug::render;

/// Where the client's traffic goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Client and server pods in a namespace that is not enrolled: the kernel alone.
    Direct,
    /// Both pods enrolled, on one node, no policy that looks at HTTP: through ambit,
    /// whatever its data path between two pods of one node is (the same-node shortcut,
    /// unless the bench turned it off).
    Mesh,
    /// Both pods enrolled, each on its own node with its own agent, no policy that looks
    /// at HTTP: the encrypted path between two node proxies (HBONE).
    MeshTwoNodes,
    /// Both pods enrolled, and the server's policies need HTTP on its port (a path rule
    /// and a RequestAuthentication): every request is parsed and authorized.
    MeshL7,
}

impl Mode {
    /// In the order of a round of passes and of the table's columns.
    pub const ALL: [Self; 4] = [Self::Direct, Self::Mesh, Self::MeshTwoNodes, Self::MeshL7];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Mesh => "mesh",
            Self::MeshTwoNodes => "mesh-2nodes",
            Self::MeshL7 => "mesh-l7",
        }
    }

    /// `(value, ratio, difference)` column headers, and the JSON key.
    fn columns(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Self::Direct => ("DIRECT", "", "", "direct"),
            Self::Mesh => ("MESH", "MESH/DIRECT", "MESH-DIRECT", "mesh"),
            Self::MeshTwoNodes => ("2NODES", "2NODES/DIRECT", "2NODES-DIRECT", "mesh_2nodes"),
            Self::MeshL7 => ("MESH-L7", "L7/DIRECT", "L7-DIRECT", "mesh_l7"),
        }
    }
}

/// A part of the bench that runs alone (`--only`), for a quicker answer on its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The direct and mesh modes' throughput and round-trip rows, alone and beside the
    /// noisy neighbour: whether one workload's bulk traffic hurts another's latency, and
    /// what keeping it from doing so costs the bulk traffic.
    Fairness,
}

impl Part {
    /// The modes whose passes this part runs, in the order of a round.
    pub fn modes(self) -> &'static [Mode] {
        match self {
            Self::Fairness => &[Mode::Direct, Mode::Mesh],
        }
    }

    /// Whether this part measures `figure`.
    pub fn measures(self, figure: Figure) -> bool {
        match self {
            Self::Fairness => matches!(
                figure,
                Figure::Throughput1
                    | Figure::Throughput4
                    | Figure::AgentCpuPerGb
                    | Figure::AgentCpuPerRoundTrip
                    | Figure::RoundTripMedian
                    | Figure::RoundTripP99
                    | Figure::RoundTripP99UnderLoad
                    | Figure::Unfairness
            ),
        }
    }
}

/// One figure of a pass, in the order of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Figure {
    Throughput1,
    Throughput4,
    RoundTripMedian,
    RoundTripP99,
    RoundTripP99UnderLoad,
    Unfairness,
    ConnectionRate,
    CrrRate,
    CrrMedian,
    CrrP99,
    HttpRequestRate,
    AgentCpu,
    AgentCpuPerGb,
    AgentCpuPerConnection,
    AgentCpuPerCrr,
    AgentCpuPerKiloRequest,
    AgentCpuPerRoundTrip,
    AgentPeakRss,
    AgentIdleRss,
    AgentIdleRssPerConnection,
    AgentRssAfterLoad,
    AgentAnonRssAfterLoad,
}

impl Figure {
    pub const ALL: [Self; 22] = [
        Self::Throughput1,
        Self::Throughput4,
        Self::RoundTripMedian,
        Self::RoundTripP99,
        Self::RoundTripP99UnderLoad,
        Self::Unfairness,
        Self::ConnectionRate,
        Self::CrrRate,
        Self::CrrMedian,
        Self::CrrP99,
        Self::HttpRequestRate,
        Self::AgentCpu,
        Self::AgentCpuPerGb,
        Self::AgentCpuPerConnection,
        Self::AgentCpuPerCrr,
        Self::AgentCpuPerKiloRequest,
        Self::AgentCpuPerRoundTrip,
        Self::AgentPeakRss,
        Self::AgentIdleRss,
        Self::AgentIdleRssPerConnection,
        Self::AgentRssAfterLoad,
        Self::AgentAnonRssAfterLoad,
    ];

    /// `(label, unit, JSON key)`.
    fn describe(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::Throughput1 => ("throughput, 1 stream", "Gbit/s", "throughput_1_stream_gbps"),
            Self::Throughput4 => (
                "throughput, 4 streams",
                "Gbit/s",
                "throughput_4_streams_gbps",
            ),
            Self::RoundTripMedian => ("round trip, median", "us", "round_trip_median_us"),
            Self::RoundTripP99 => ("round trip, p99", "us", "round_trip_p99_us"),
            Self::RoundTripP99UnderLoad => (
                "round trip, p99, neighbour iperf3 -P 8",
                "us",
                "round_trip_p99_under_load_us",
            ),
            Self::Unfairness => (
                "round trip p99, loaded / alone",
                "x",
                "round_trip_p99_loaded_over_alone",
            ),
            Self::ConnectionRate => ("new connections", "conn/s", "connections_per_second"),
            Self::CrrRate => (
                "new connections, client closes",
                "conn/s",
                "crr_connections_per_second",
            ),
            Self::CrrMedian => ("connection time, median", "us", "crr_connection_median_us"),
            Self::CrrP99 => ("connection time, p99", "us", "crr_connection_p99_us"),
            Self::HttpRequestRate => (
                "HTTP requests/s, keep-alive",
                "req/s",
                "http_keepalive_requests_per_second",
            ),
            Self::AgentCpu => ("agent CPU, whole pass", "s", "agent_cpu_seconds"),
            Self::AgentCpuPerGb => ("agent CPU per GB, 1 stream", "ms/GB", "agent_cpu_ms_per_gb"),
            Self::AgentCpuPerConnection => (
                "agent CPU per connection",
                "us/conn",
                "agent_cpu_us_per_connection",
            ),
            Self::AgentCpuPerCrr => (
                "agent CPU per conn, client closes",
                "us/conn",
                "agent_cpu_us_per_crr_connection",
            ),
            Self::AgentCpuPerKiloRequest => (
                "agent CPU per 1,000 requests",
                "ms/1k req",
                "agent_cpu_ms_per_1000_requests",
            ),
            Self::AgentCpuPerRoundTrip => (
                "agent CPU per round trip",
                "us/rt",
                "agent_cpu_us_per_round_trip",
            ),
            Self::AgentPeakRss => ("agent peak RSS, pass", "MiB", "agent_peak_rss_mib"),
            Self::AgentIdleRss => ("agent RSS, idle conns held", "MiB", "agent_idle_rss_mib"),
            Self::AgentIdleRssPerConnection => (
                "agent RSS per idle conn",
                "KiB/conn",
                "agent_idle_rss_kib_per_connection",
            ),
            Self::AgentRssAfterLoad => (
                "agent RSS, idle after load",
                "MiB",
                "agent_rss_after_load_mib",
            ),
            Self::AgentAnonRssAfterLoad => (
                "of which anonymous (heap, stacks)",
                "MiB",
                "agent_anon_rss_after_load_mib",
            ),
        }
    }

    /// The modes whose passes measure this figure. The L7 mode only differs from the
    /// mesh one where HTTP requests are made, so only the HTTP rows run in it; the agent's
    /// memory is the one agent's of the direct and mesh modes (the two-node mode has two),
    /// and only those have a noisy neighbour.
    pub fn modes(self) -> &'static [Mode] {
        if self.is_http() {
            &Mode::ALL
        } else if self.is_memory() || self.is_fairness() {
            &[Mode::Direct, Mode::Mesh]
        } else {
            &[Mode::Direct, Mode::Mesh, Mode::MeshTwoNodes]
        }
    }

    /// Measured by the keep-alive HTTP run, the one tool of an L7 pass.
    pub fn is_http(self) -> bool {
        matches!(self, Self::HttpRequestRate | Self::AgentCpuPerKiloRequest)
    }

    /// The agent's memory: measured in the first round only. The allocator keeps what a
    /// mesh pass freed, so in later passes the peak starts high and held connections
    /// reuse freed memory instead of showing what they cost.
    pub fn is_memory(self) -> bool {
        matches!(
            self,
            Self::AgentPeakRss
                | Self::AgentIdleRss
                | Self::AgentIdleRssPerConnection
                | Self::AgentRssAfterLoad
                | Self::AgentAnonRssAfterLoad
        )
    }

    /// Measured beside a noisy neighbour, which only the one-node modes have.
    fn is_fairness(self) -> bool {
        matches!(self, Self::RoundTripP99UnderLoad | Self::Unfairness)
    }

    /// What the agent spends on traffic: near zero in a direct pass (that traffic
    /// bypasses the agent), so zero is allowed there and a ratio to it means nothing.
    fn is_agent_cost(self) -> bool {
        matches!(
            self,
            Self::AgentCpu
                | Self::AgentCpuPerGb
                | Self::AgentCpuPerConnection
                | Self::AgentCpuPerCrr
                | Self::AgentCpuPerKiloRequest
                | Self::AgentCpuPerRoundTrip
                | Self::AgentIdleRssPerConnection
        )
    }
}

/// What one pass (all tools of its mode, see [`Figure::modes`]) measured.
pub type Pass = BTreeMap<Figure, f64>;

/// Medians over all passes, with the runs they come from.
pub struct Report {
    pub quick: bool,
    /// Rounds of passes: one pass of each mode.
    pub rounds: usize,
    pub seconds: u32,
    pub idle_connections: u32,
    pub versions: Vec<String>,
    /// The modes of the passes, in the order of a round: every mode, or the part's.
    modes: &'static [Mode],
    rows: Vec<Row>,
}

struct Row {
    figure: Figure,
    /// The runs of each mode in [`Figure::modes`], in pass order; at least one each.
    runs: BTreeMap<Mode, Vec<f64>>,
}

impl Row {
    /// The median of `mode`, or `None` where the figure is not measured in it.
    fn median(&self, mode: Mode) -> Option<f64> {
        self.runs.get(&mode).map(|runs| median(runs))
    }

    /// `mode` / direct, where it means something.
    fn ratio(&self, mode: Mode) -> Option<f64> {
        let (direct, value) = (self.median(Mode::Direct)?, self.median(mode)?);
        (mode != Mode::Direct && !self.figure.is_agent_cost() && direct > 0.0)
            .then(|| value / direct)
    }

    /// `mode` - direct.
    fn difference(&self, mode: Mode) -> Option<f64> {
        (mode != Mode::Direct).then_some(self.median(mode)? - self.median(Mode::Direct)?)
    }
}

impl Report {
    /// Gathers the passes (in order: the first round first) of the whole bench or, with
    /// `only`, of that part; fails naming the pass and figure that is missing, zero or not
    /// a number, or the figure that no pass of a mode measuring it has.
    pub fn new(
        quick: bool,
        seconds: u32,
        idle_connections: u32,
        versions: Vec<String>,
        only: Option<Part>,
        passes: &[(Mode, Pass)],
    ) -> anyhow::Result<Self> {
        let modes = only.map_or(&Mode::ALL[..], Part::modes);
        let mut rows = Vec::new();
        for figure in Figure::ALL {
            if only.is_some_and(|part| !part.measures(figure)) {
                continue;
            }
            let label = figure.describe().0;
            let mut runs: BTreeMap<Mode, Vec<f64>> = figure
                .modes()
                .iter()
                .filter(|m| modes.contains(m))
                .map(|m| (*m, Vec::new()))
                .collect();
            for (i, (mode, pass)) in passes.iter().enumerate() {
                let Some(mode_runs) = runs.get_mut(mode) else {
                    continue;
                };
                // Memory: the first pass of each mode, i.e. the first round.
                if figure.is_memory() && !mode_runs.is_empty() {
                    continue;
                }
                let Some(&value) = pass.get(&figure) else {
                    bail!("pass {} ({}) has no figure for {label}", i + 1, mode.name());
                };
                let may_be_zero = figure.is_agent_cost() && *mode == Mode::Direct;
                if !value.is_finite() || value < 0.0 || (value == 0.0 && !may_be_zero) {
                    bail!(
                        "pass {} ({}) measured {value} for {label}",
                        i + 1,
                        mode.name()
                    );
                }
                mode_runs.push(value);
            }
            if let Some((mode, _)) = runs.iter().find(|(_, r)| r.is_empty()) {
                bail!("no {} pass measured {label}", mode.name());
            }
            rows.push(Row { figure, runs });
        }
        Ok(Self {
            quick,
            rounds: passes.iter().filter(|(m, _)| *m == Mode::Direct).count(),
            seconds,
            idle_connections,
            versions,
            modes,
            rows,
        })
    }

    /// One column per mode, then the ratios, then the differences; a cell is empty where
    /// the figure is not measured in that mode.
    pub fn table(&self) -> String {
        let others = &self.modes[1..];
        let mut header = vec!["FIGURE", "UNIT"];
        header.extend(self.modes.iter().map(|m| m.columns().0));
        header.extend(others.iter().map(|m| m.columns().1));
        header.extend(others.iter().map(|m| m.columns().2));
        let mut table = vec![header.into_iter().map(str::to_owned).collect::<Vec<_>>()];
        for row in &self.rows {
            let (label, unit, _) = row.figure.describe();
            let mut cells = vec![label.to_owned(), unit.to_owned()];
            cells.extend(
                self.modes
                    .iter()
                    .map(|m| row.median(*m).map(number).unwrap_or_default()),
            );
            cells.extend(others.iter().map(|m| {
                match row.median(*m) {
                    None => String::new(),
                    Some(_) => row
                        .ratio(*m)
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
                }
            }));
            cells.extend(
                others
                    .iter()
                    .map(|m| row.difference(*m).map(number).unwrap_or_default()),
            );
            table.push(cells);
        }
        let mut out = render(&table);
        out.push_str(&format!(
            "\nmedians of {} round(s) of passes ({}; agent memory: first round, one-node modes only; {}: HTTP rows only), {} s per tool run, {} idle connections held{}\n",
            self.rounds,
            self.modes
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(", "),
            Mode::MeshL7.name(),
            self.seconds,
            self.idle_connections,
            if self.quick {
                " (--quick: a smoke run, not a measurement)"
            } else {
                ""
            }
        ));
        for version in &self.versions {
            out.push_str(&format!("tool: {version}\n"));
        }
        out
    }

    /// Per figure: each mode's median and runs (`null` for a mode that does not measure
    /// it), with the ratio to direct and the difference inside each mesh mode; the
    /// top-level `ratio` and `difference` are the mesh mode's, as before the L7 mode.
    pub fn json(&self) -> Value {
        let figures: serde_json::Map<String, Value> = self
            .rows
            .iter()
            .map(|row| {
                let (label, unit, key) = row.figure.describe();
                let mut entry = json!({
                    "label": label,
                    "unit": unit,
                    "ratio": row.ratio(Mode::Mesh),
                    "difference": row.difference(Mode::Mesh),
                });
                for mode in Mode::ALL {
                    let value = match (row.median(mode), row.runs.get(&mode)) {
                        (Some(median), Some(runs)) => {
                            let mut value = json!({"median": median, "runs": runs});
                            if mode != Mode::Direct {
                                value["ratio"] = json!(row.ratio(mode));
                                value["difference"] = json!(row.difference(mode));
                            }
                            value
                        }
                        _ => Value::Null,
                    };
                    entry[mode.columns().3] = value;
                }
                (key.to_owned(), entry)
            })
            .collect();
        json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "modes": self.modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "seconds_per_run": self.seconds,
            "idle_connections": self.idle_connections,
            "tools": self.versions,
            "figures": figures,
        })
    }
}

/// The median; the mean of the middle two for an even count.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Three significant digits or so, without exponent.
fn number(value: f64) -> String {
    match value.abs() {
        v if v >= 100.0 => format!("{value:.0}"),
        v if v >= 10.0 => format!("{value:.1}"),
        v if v >= 1.0 => format!("{value:.2}"),
        _ => format!("{value:.3}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass of `mode` with every figure it measures at `value`.
    fn pass(mode: Mode, value: f64) -> (Mode, Pass) {
        let figures = Figure::ALL
            .iter()
            .filter(|f| f.modes().contains(&mode))
            .map(|f| (*f, value))
            .collect();
        (mode, figures)
    }

    /// One round: direct, mesh and mesh-l7 at `direct`, `mesh` and `l7`, the two-node
    /// mesh at twice `mesh`.
    fn round(direct: f64, mesh: f64, l7: f64) -> [(Mode, Pass); 4] {
        [
            pass(Mode::Direct, direct),
            pass(Mode::Mesh, mesh),
            pass(Mode::MeshTwoNodes, 2.0 * mesh),
            pass(Mode::MeshL7, l7),
        ]
    }

    fn failure(passes: &[(Mode, Pass)]) -> String {
        Report::new(true, 1, 10, vec![], None, passes)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn the_fairness_part_reports_its_rows_in_its_modes_only() {
        let only = |(mode, mut pass): (Mode, Pass)| {
            pass.retain(|f, _| Part::Fairness.measures(*f));
            (mode, pass)
        };
        let passes = round(2.0, 3.0, 1.0).map(only);
        let report =
            Report::new(false, 10, 1000, vec![], Some(Part::Fairness), &passes[..2]).unwrap();
        let json = report.json();
        assert_eq!(json["modes"], json!(["direct", "mesh"]));
        let unfairness = &json["figures"]["round_trip_p99_loaded_over_alone"];
        assert_eq!(unfairness["mesh"]["median"], 3.0);
        assert!(json["figures"].get("connections_per_second").is_none());
        let table = report.table();
        let header = table.lines().next().unwrap_or_default();
        assert_eq!(
            header.split_whitespace().collect::<Vec<_>>(),
            [
                "FIGURE",
                "UNIT",
                "DIRECT",
                "MESH",
                "MESH/DIRECT",
                "MESH-DIRECT"
            ]
        );
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn ratio_and_difference_are_each_mesh_mode_over_and_minus_direct() {
        let passes = [round(2.0, 3.0, 1.0), round(4.0, 5.0, 2.0)].concat();
        let report = Report::new(false, 10, 1000, vec![], None, &passes).unwrap();
        let json = report.json();
        let rtt = &json["figures"]["round_trip_median_us"];
        assert_eq!(rtt["direct"]["median"], 3.0);
        assert_eq!(rtt["mesh"]["median"], 4.0);
        assert_eq!(rtt["difference"], 1.0);
        assert_eq!(rtt["ratio"], 4.0 / 3.0);
        assert_eq!(rtt["mesh"]["ratio"], 4.0 / 3.0);
        assert_eq!(rtt["mesh_2nodes"]["median"], 8.0);
        assert_eq!(rtt["mesh_2nodes"]["ratio"], 8.0 / 3.0);
        assert_eq!(rtt["mesh_2nodes"]["difference"], 5.0);
        let http = &json["figures"]["http_keepalive_requests_per_second"];
        assert_eq!(http["mesh_l7"]["median"], 1.5);
        assert_eq!(http["mesh_l7"]["runs"], json!([1.0, 2.0]));
        assert_eq!(http["mesh_l7"]["ratio"], 0.5);
        assert_eq!(http["mesh_l7"]["difference"], -1.5);
        let cpu = &json["figures"]["agent_cpu_ms_per_1000_requests"];
        assert_eq!(cpu["mesh_l7"]["ratio"], Value::Null);
        assert_eq!(cpu["mesh_l7"]["median"], 1.5);
        assert_eq!(json["figures"]["agent_cpu_seconds"]["ratio"], Value::Null);
        assert_eq!(json["rounds"], 2);
    }

    #[test]
    fn rows_not_measured_in_l7_have_empty_l7_cells() {
        let report = Report::new(false, 10, 1000, vec![], None, &round(2.0, 3.0, 1.0)).unwrap();
        let json = report.json();
        assert_eq!(
            json["figures"]["round_trip_median_us"]["mesh_l7"],
            Value::Null
        );
        let table = report.table();
        let line = |label: &str| {
            table
                .lines()
                .find(|l| l.starts_with(label))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        // label, unit, direct, mesh, two nodes, two ratios, two differences: no L7 cells.
        assert_eq!(
            line("round trip, median"),
            [
                "round", "trip,", "median", "us", "2.00", "3.00", "6.00", "1.50", "3.00", "1.00",
                "4.00"
            ]
        );
        // label (3 words), unit, direct, mesh, two nodes, l7, three ratios, three
        // differences.
        assert_eq!(
            line("HTTP requests/s"),
            [
                "HTTP",
                "requests/s,",
                "keep-alive",
                "req/s",
                "2.00",
                "3.00",
                "6.00",
                "1.00",
                "1.50",
                "3.00",
                "0.50",
                "1.00",
                "4.00",
                "-1.00"
            ]
        );
    }

    #[test]
    fn memory_comes_from_the_first_round_only() {
        let later = |(mode, mut p): (Mode, Pass)| {
            p.retain(|f, _| !f.is_memory());
            (mode, p)
        };
        let mut passes = round(1.0, 2.0, 3.0).to_vec();
        passes.extend(round(5.0, 6.0, 7.0).map(later));
        let json = Report::new(false, 10, 1000, vec![], None, &passes)
            .unwrap()
            .json();
        let idle = &json["figures"]["agent_idle_rss_mib"];
        assert_eq!(idle["mesh"]["runs"], json!([2.0]));
        assert_eq!(
            json["figures"]["connections_per_second"]["mesh"]["runs"],
            json!([2.0, 6.0])
        );
    }

    #[test]
    fn a_zero_figure_fails_the_report() {
        let mut passes = round(1.0, 1.0, 1.0);
        passes[1].1.insert(Figure::ConnectionRate, 0.0);
        let error = failure(&passes);
        assert!(error.contains("new connections"), "{error}");
        let mut passes = round(1.0, 1.0, 1.0);
        passes[3].1.insert(Figure::HttpRequestRate, 0.0);
        let error = failure(&passes);
        assert!(error.contains("(mesh-l7)"), "{error}");
        let mut passes = round(1.0, 1.0, 1.0);
        passes[2].1.insert(Figure::Throughput1, 0.0);
        let error = failure(&passes);
        assert!(error.contains("(mesh-2nodes)"), "{error}");
    }

    #[test]
    fn a_missing_figure_fails_the_report() {
        let mut passes = round(1.0, 1.0, 1.0);
        passes[0].1.remove(&Figure::Throughput4);
        assert!(failure(&passes).contains("throughput, 4 streams"));
        let mut passes = round(1.0, 1.0, 1.0);
        passes[3].1.remove(&Figure::AgentCpuPerKiloRequest);
        let error = failure(&passes);
        assert!(error.contains("pass 4 (mesh-l7)"), "{error}");
    }

    #[test]
    fn a_missing_mode_fails_the_report() {
        let error = failure(&round(1.0, 1.0, 1.0)[..3]);
        assert!(error.contains("no mesh-l7 pass"), "{error}");
    }

    #[test]
    fn agent_cpu_may_be_zero_in_a_direct_pass_only() {
        let mut passes = round(1.0, 1.0, 1.0);
        passes[0].1.insert(Figure::AgentCpu, 0.0);
        passes[0].1.insert(Figure::AgentCpuPerKiloRequest, 0.0);
        assert!(Report::new(true, 1, 10, vec![], None, &passes).is_ok());
        let mut passes = round(1.0, 1.0, 1.0);
        passes[1].1.insert(Figure::AgentCpu, 0.0);
        assert!(Report::new(true, 1, 10, vec![], None, &passes).is_err());
        let mut passes = round(1.0, 1.0, 1.0);
        passes[3].1.insert(Figure::AgentCpuPerKiloRequest, 0.0);
        assert!(Report::new(true, 1, 10, vec![], None, &passes).is_err());
    }
}
