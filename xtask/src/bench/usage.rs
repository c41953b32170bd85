//! The agent's resource use, read from `/proc/<pid>`: CPU seconds (user + system, all
//! threads) from `stat`, resident memory from `status`, and resetting the peak so each
//! pass gets its own.

use std::process::Command;

use anyhow::Context as _;

/// Reads one process's figures; knows the clock tick that `stat` counts in.
pub struct Usage {
    pid: u32,
    ticks_per_second: f64,
}

impl Usage {
    pub fn new(pid: u32) -> anyhow::Result<Self> {
        let mut cmd = Command::new("getconf");
        cmd.arg("CLK_TCK");
        let output = ambit_tests::check(&mut cmd)?;
        let ticks_per_second: f64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .context("getconf CLK_TCK is not a number")?;
        Ok(Self {
            pid,
            ticks_per_second,
        })
    }

    /// User plus system CPU time of the whole process so far, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        Ok(
            parse_cpu_ticks(&stat).with_context(|| format!("{path}: {stat}"))?
                / self.ticks_per_second,
        )
    }

    /// Resident memory now (`VmRSS`), in MiB.
    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        self.status_mib("VmRSS:")
    }

    /// The anonymous part of resident memory (`RssAnon`: heap, stacks), in MiB: what the
    /// agent itself holds, where the rest of its RSS is file pages (its binary's code)
    /// shared with the page cache.
    pub fn anon_rss_mib(&self) -> anyhow::Result<f64> {
        self.status_mib("RssAnon:")
    }

    /// Peak resident memory since the last [`Self::reset_peak`] (`VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> anyhow::Result<f64> {
        self.status_mib("VmHWM:")
    }

    /// Sets the peak back to the current RSS (`5` to `clear_refs`, proc(5)).
    pub fn reset_peak(&self) -> anyhow::Result<()> {
        let path = format!("/proc/{}/clear_refs", self.pid);
        std::fs::write(&path, "5").with_context(|| format!("cannot write 5 to {path}"))
    }

    fn status_mib(&self, field: &str) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/status", self.pid);
        let status =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        parse_status_kib(&status, field)
            .map(|kib| kib / 1024.0)
            .with_context(|| format!("no {field} in {path}"))
    }
}

/// utime + stime, fields 14 and 15 of `stat`. The command name (field 2) may hold spaces
/// and parentheses, so counting starts after its closing `)`, at field 3.
fn parse_cpu_ticks(stat: &str) -> Option<f64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: f64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS:   12345 kB` → 12345.
fn parse_status_kib(status: &str, field: &str) -> Option<f64> {
    let value = status.lines().find_map(|l| l.strip_prefix(field))?;
    value.trim().strip_suffix("kB")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat =
            "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(325.0));
    }

    #[test]
    fn status_fields_in_kib() {
        let status = "Name:\tambit\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(10240.0));
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(20480.0));
        assert_eq!(parse_status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn own_process_figures_are_positive() {
        let usage = Usage::new(std::process::id()).unwrap();
        assert!(usage.rss_mib().unwrap() > 0.0);
        assert!(usage.cpu_seconds().unwrap() >= 0.0);
    }
}
