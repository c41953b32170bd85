//! `cargo xtask test`: setup, build, then every test of the workspace and a smoke run of
//! the bench (`bench --quick`). The kernel and network-namespace tests need root; they
//! fail rather than skip without it.

use ambit_tests::Binaries;
use anyhow::bail;

use crate::build::{build_binaries, cargo, run};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Only tests whose name contains this filter.
    pub filter: Option<String>,
}

pub fn test(opts: &Options) -> anyhow::Result<()> {
    crate::setup::setup()?;
    if !crate::setup::is_root() {
        bail!("the kernel and network-namespace tests need root: run `sudo -E cargo xtask test`");
    }
    let binaries = build_binaries(false)?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--exclude", "ambit-ebpf"]);
    if let Some(filter) = &opts.filter {
        cmd.args(["--", filter]);
        return run(&mut cmd);
    }
    run(&mut cmd)?;
    // The bench is only run by hand; its smoke run here keeps every tool and figure working.
    eprintln!("test: cargo xtask bench --quick (on the debug build)");
    let quick = crate::bench::Options {
        quick: true,
        json: None,
        no_same_node_shortcut: false,
        only: None,
        agent_args: Vec::new(),
    };
    crate::bench::run(&quick, Binaries::in_dir(&binaries)?)
}
