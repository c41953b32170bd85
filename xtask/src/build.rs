//! `cargo xtask build`, and the command helpers every subcommand uses.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Build what ships: the `dist` profile (release, with whole-program LTO), into
    /// `target/dist`.
    #[arg(long)]
    pub release: bool,
}

pub fn build(opts: &Options) -> anyhow::Result<()> {
    crate::setup::setup()?;
    build_binaries(opts.release).map(drop)
}

/// Builds `ambit` and the test bed's binaries; returns the directory holding them.
pub fn build_binaries(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "ambit",
        "--package",
        "ambit-cni",
        "--package",
        "ambit-tests",
        "--bins",
    ]);
    let profile = if release { "dist" } else { "dev" };
    cmd.args(["--profile", profile]);
    run(&mut cmd)?;
    // Cargo puts the dev profile's output in `debug`.
    Ok(workspace_root()
        .join("target")
        .join(if release { "dist" } else { "debug" }))
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// `cargo`, the same one that runs xtask.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited output; fails naming the command line.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = ambit_tests::command_line(cmd);
    let status = cmd.status().with_context(|| format!("cannot run {line}"))?;
    if !status.success() {
        bail!("{line} failed ({status})");
    }
    Ok(())
}
