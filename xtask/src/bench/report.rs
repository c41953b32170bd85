//! The figures a pass measures, and the report over all passes: medians per mode, the
//! mesh/direct ratio and difference, rendered as a table and as JSON. Building the report
//! checks that every figure is there and not zero, because a bench that prints zeros
//! has measured nothing.

use std::collections::BTreeMap;

use anyhow::bail;
use serde_json::{Value, json};

use crate::debug::render;

/// Where the client's traffic goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Client and server pods in a namespace that is not enrolled: the kernel alone.
    Direct,
    /// Both pods enrolled: through ambit, whatever its data path is.
    Mesh,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Mesh => "mesh",
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
    ConnectionRate,
    CrrRate,
    CrrMedian,
    CrrP99,
    AgentCpu,
    AgentCpuPerGb,
    AgentCpuPerConnection,
    AgentCpuPerCrr,
    AgentPeakRss,
    AgentIdleRss,
    AgentIdleRssPerConnection,
}

impl Figure {
    pub const ALL: [Self; 15] = [
        Self::Throughput1,
        Self::Throughput4,
        Self::RoundTripMedian,
        Self::RoundTripP99,
        Self::ConnectionRate,
        Self::CrrRate,
        Self::CrrMedian,
        Self::CrrP99,
        Self::AgentCpu,
        Self::AgentCpuPerGb,
        Self::AgentCpuPerConnection,
        Self::AgentCpuPerCrr,
        Self::AgentPeakRss,
        Self::AgentIdleRss,
        Self::AgentIdleRssPerConnection,
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
            Self::ConnectionRate => ("new connections", "conn/s", "connections_per_second"),
            Self::CrrRate => (
                "new connections, client closes",
                "conn/s",
                "crr_connections_per_second",
            ),
            Self::CrrMedian => ("connection time, median", "us", "crr_connection_median_us"),
            Self::CrrP99 => ("connection time, p99", "us", "crr_connection_p99_us"),
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
            Self::AgentPeakRss => ("agent peak RSS, pass", "MiB", "agent_peak_rss_mib"),
            Self::AgentIdleRss => ("agent RSS, idle conns held", "MiB", "agent_idle_rss_mib"),
            Self::AgentIdleRssPerConnection => (
                "agent RSS per idle conn",
                "KiB/conn",
                "agent_idle_rss_kib_per_connection",
            ),
        }
    }

    /// The agent's memory: measured in the first pair only. The allocator keeps what a
    /// mesh pass freed, so in later passes the peak starts high and held connections
    /// reuse freed memory instead of showing what they cost.
    pub fn is_memory(self) -> bool {
        matches!(
            self,
            Self::AgentPeakRss | Self::AgentIdleRss | Self::AgentIdleRssPerConnection
        )
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
                | Self::AgentIdleRssPerConnection
        )
    }
}

/// What one pass (all tools, one mode) measured.
pub type Pass = BTreeMap<Figure, f64>;

/// Medians over all passes, with the runs they come from.
pub struct Report {
    pub quick: bool,
    pub pairs: usize,
    pub seconds: u32,
    pub idle_connections: u32,
    pub versions: Vec<String>,
    rows: Vec<Row>,
}

struct Row {
    figure: Figure,
    direct: Vec<f64>,
    mesh: Vec<f64>,
}

impl Row {
    fn medians(&self) -> (f64, f64) {
        (median(&self.direct), median(&self.mesh))
    }

    /// mesh / direct, where it means something.
    fn ratio(&self) -> Option<f64> {
        let (direct, mesh) = self.medians();
        (!self.figure.is_agent_cost() && direct > 0.0).then(|| mesh / direct)
    }
}

impl Report {
    /// Gathers the passes (in order: the first pair first); fails naming the pass and
    /// figure that is missing, zero or not a number.
    pub fn new(
        quick: bool,
        seconds: u32,
        idle_connections: u32,
        versions: Vec<String>,
        passes: &[(Mode, Pass)],
    ) -> anyhow::Result<Self> {
        let mut rows = Vec::new();
        for figure in Figure::ALL {
            let mut row = Row {
                figure,
                direct: Vec::new(),
                mesh: Vec::new(),
            };
            for (i, (mode, pass)) in passes.iter().enumerate() {
                if figure.is_memory() && i >= 2 {
                    continue;
                }
                let label = figure.describe().0;
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
                match mode {
                    Mode::Direct => row.direct.push(value),
                    Mode::Mesh => row.mesh.push(value),
                }
            }
            if row.direct.is_empty() || row.mesh.is_empty() {
                bail!("the bench needs at least one direct and one mesh pass");
            }
            rows.push(row);
        }
        Ok(Self {
            quick,
            pairs: passes.len() / 2,
            seconds,
            idle_connections,
            versions,
            rows,
        })
    }

    pub fn table(&self) -> String {
        let mut table = vec![
            [
                "FIGURE",
                "UNIT",
                "DIRECT",
                "MESH",
                "MESH/DIRECT",
                "MESH-DIRECT",
            ]
            .map(str::to_owned)
            .to_vec(),
        ];
        for row in &self.rows {
            let (label, unit, _) = row.figure.describe();
            let (direct, mesh) = row.medians();
            table.push(vec![
                label.to_owned(),
                unit.to_owned(),
                number(direct),
                number(mesh),
                row.ratio()
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
                number(mesh - direct),
            ]);
        }
        let mut out = render(&table);
        out.push_str(&format!(
            "\nmedians of {} direct/mesh pair(s) (agent memory: first pair only), {} s per tool run, {} idle connections held{}\n",
            self.pairs,
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

    pub fn json(&self) -> Value {
        let figures: serde_json::Map<String, Value> = self
            .rows
            .iter()
            .map(|row| {
                let (label, unit, key) = row.figure.describe();
                let (direct, mesh) = row.medians();
                let entry = json!({
                    "label": label,
                    "unit": unit,
                    "direct": {"median": direct, "runs": row.direct},
                    "mesh": {"median": mesh, "runs": row.mesh},
                    "ratio": row.ratio(),
                    "difference": mesh - direct,
                });
                (key.to_owned(), entry)
            })
            .collect();
        json!({
            "quick": self.quick,
            "pairs": self.pairs,
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

    fn pass(value: f64) -> Pass {
        Figure::ALL.iter().map(|f| (*f, value)).collect()
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn ratio_and_difference_are_mesh_over_and_minus_direct() {
        let passes = [
            (Mode::Direct, pass(2.0)),
            (Mode::Mesh, pass(3.0)),
            (Mode::Direct, pass(4.0)),
            (Mode::Mesh, pass(5.0)),
        ];
        let report = Report::new(false, 10, 1000, vec![], &passes).unwrap();
        let json = report.json();
        let rtt = &json["figures"]["round_trip_median_us"];
        assert_eq!(rtt["direct"]["median"], 3.0);
        assert_eq!(rtt["mesh"]["median"], 4.0);
        assert_eq!(rtt["difference"], 1.0);
        assert_eq!(rtt["ratio"], 4.0 / 3.0);
        assert_eq!(json["figures"]["agent_cpu_seconds"]["ratio"], Value::Null);
        assert_eq!(json["pairs"], 2);
    }

    #[test]
    fn memory_comes_from_the_first_pair_only() {
        let later = |v| {
            let mut p = pass(v);
            p.retain(|f, _| !f.is_memory());
            p
        };
        let passes = [
            (Mode::Direct, pass(1.0)),
            (Mode::Mesh, pass(2.0)),
            (Mode::Direct, later(5.0)),
            (Mode::Mesh, later(6.0)),
        ];
        let json = Report::new(false, 10, 1000, vec![], &passes)
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
        let mut mesh = pass(1.0);
        mesh.insert(Figure::ConnectionRate, 0.0);
        let error = Report::new(
            true,
            1,
            10,
            vec![],
            &[(Mode::Direct, pass(1.0)), (Mode::Mesh, mesh)],
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(error.contains("new connections"), "{error}");
    }

    #[test]
    fn a_missing_figure_fails_the_report() {
        let mut direct = pass(1.0);
        direct.remove(&Figure::Throughput4);
        assert!(
            Report::new(
                true,
                1,
                10,
                vec![],
                &[(Mode::Direct, direct), (Mode::Mesh, pass(1.0))]
            )
            .is_err()
        );
    }

    #[test]
    fn agent_cpu_may_be_zero_in_a_direct_pass_only() {
        let mut direct = pass(1.0);
        direct.insert(Figure::AgentCpu, 0.0);
        assert!(
            Report::new(
                true,
                1,
                10,
                vec![],
                &[(Mode::Direct, direct.clone()), (Mode::Mesh, pass(1.0))]
            )
            .is_ok()
        );
        assert!(
            Report::new(
                true,
                1,
                10,
                vec![],
                &[(Mode::Direct, pass(1.0)), (Mode::Mesh, direct)]
            )
            .is_err()
        );
    }
}
