//! `cargo xtask test`: setup, build, then every test of the workspace. The kernel and
//! network-namespace tests need root; they fail rather than skip without it.

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
    build_binaries(false)?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--exclude", "ambit-ebpf"]);
    if let Some(filter) = &opts.filter {
        cmd.args(["--", filter]);
    }
    run(&mut cmd)
}
