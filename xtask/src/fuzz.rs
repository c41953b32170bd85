//! `cargo xtask fuzz [--seconds N] [TARGET]`: runs the cargo-fuzz targets of `fuzz/`
//! one after another for N seconds each and reports how many inputs each executed and
//! whether it crashed. Installs cargo-fuzz when missing. Not part of `cargo xtask test`:
//! a useful run takes minutes per target.
//!
//! Each target reads the hand-written seeds in `fuzz/seeds/<target>` and grows its corpus
//! in `fuzz/corpus/<target>` (not in git); a crashing input lands in
//! `fuzz/artifacts/<target>`.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::build::{cargo, run, workspace_root};

/// The targets in `fuzz/fuzz_targets/`.
const TARGETS: [&str; 3] = ["policy", "files", "hbone_connect"];
/// Installed when `cargo fuzz` is missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// An input that takes longer than this is reported as a hang (libFuzzer's `-timeout`).
const INPUT_TIMEOUT_SECONDS: u32 = 10;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// How long to fuzz each target.
    #[arg(long, default_value_t = 60)]
    seconds: u32,
    /// Fuzz only this target.
    #[arg(value_parser = TARGETS)]
    target: Option<String>,
}

/// What one target's run found.
struct Report {
    target: &'static str,
    executions: Option<u64>,
    /// The input libFuzzer saved when the target crashed or hung.
    finding: Option<String>,
}

pub fn fuzz(opts: &Options) -> anyhow::Result<()> {
    // The targets link the agent library, whose build script builds the kernel programs.
    crate::setup::setup()?;
    install_cargo_fuzz()?;
    let targets: Vec<&'static str> = TARGETS
        .into_iter()
        .filter(|t| opts.target.as_deref().is_none_or(|only| only == *t))
        .collect();
    let mut reports = Vec::new();
    for target in targets {
        reports.push(fuzz_target(target, opts.seconds)?);
    }
    println!("\nTARGET         EXECUTIONS  RESULT");
    for report in &reports {
        let executions = report
            .executions
            .map_or_else(|| "?".to_owned(), |n| n.to_string());
        let result = report
            .finding
            .as_deref()
            .map_or_else(|| "no crash".to_owned(), |input| format!("CRASH: {input}"));
        println!("{:<14} {executions:>10}  {result}", report.target);
    }
    let crashed: Vec<&str> = reports
        .iter()
        .filter(|r| r.finding.is_some())
        .map(|r| r.target)
        .collect();
    if !crashed.is_empty() {
        bail!(
            "{} crashed; reproduce with `cargo +nightly fuzz run <target> <input>` in the workspace root",
            crashed.join(", ")
        );
    }
    Ok(())
}

fn install_cargo_fuzz() -> anyhow::Result<()> {
    let installed = Command::new("cargo-fuzz")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    run(cargo().args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
    ]))
}

/// Runs `target` for `seconds`, passing libFuzzer's output through while reading its
/// final statistics and the path of any crashing input from it.
fn fuzz_target(target: &'static str, seconds: u32) -> anyhow::Result<Report> {
    let fuzz_dir = workspace_root().join("fuzz");
    let corpus = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot create {}", corpus.display()))?;
    let mut cmd = nightly_cargo(&fuzz_dir);
    cmd.args(["fuzz", "run", target])
        .arg(&corpus)
        .arg(fuzz_dir.join("seeds").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped());
    let line = ambit_tests::command_line(&cmd);
    eprintln!("fuzz: {line}");
    let mut child = cmd.spawn().with_context(|| format!("cannot run {line}"))?;
    let stderr = child.stderr.take().context("stderr is piped")?;
    let mut report = Report {
        target,
        executions: None,
        finding: None,
    };
    for output in BufReader::new(stderr).lines() {
        let output = output.with_context(|| format!("cannot read the output of {line}"))?;
        eprintln!("{output}");
        if let Some(n) = output.strip_prefix("stat::number_of_executed_units:") {
            report.executions = n.trim().parse().ok();
        }
        if let Some((_, input)) = output.split_once("Test unit written to ") {
            report.finding = Some(input.trim().to_owned());
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for {line}"))?;
    if !status.success() && report.finding.is_none() {
        bail!("{line} failed ({status}) without saving an input");
    }
    Ok(report)
}

/// `cargo` of the nightly toolchain (sanitizers need it), in `dir`. Variables the cargo
/// running xtask set for its own toolchain are dropped so they do not leak into the build.
fn nightly_cargo(dir: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .current_dir(dir)
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN");
    cmd
}
