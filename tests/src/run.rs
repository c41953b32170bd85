//! Running commands: the binaries the test bed needs and errors that name the command.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, bail};

/// Where the test bed finds ambit's binaries.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub ambit: PathBuf,
    pub httpbin: PathBuf,
    /// `ambit-hold`: holds many idle connections open (server and client).
    pub hold: PathBuf,
    /// `ambit-probe`: the clients real tools cannot play (marked sockets, a fast connect
    /// loop, hundreds of idle connections) and a server that never answers.
    pub probe: PathBuf,
}

impl Binaries {
    /// The binaries in one cargo target directory (`target/debug`, say).
    pub fn in_dir(dir: &Path) -> anyhow::Result<Self> {
        let binaries = Self {
            ambit: dir.join("ambit"),
            httpbin: dir.join("ambit-httpbin"),
            hold: dir.join("ambit-hold"),
            probe: dir.join("ambit-probe"),
        };
        for path in [
            &binaries.ambit,
            &binaries.httpbin,
            &binaries.hold,
            &binaries.probe,
        ] {
            if !path.is_file() {
                bail!(
                    "{} is missing: build with `cargo build -p ambit -p ambit-tests` (cargo xtask test does)",
                    path.display()
                );
            }
        }
        Ok(binaries)
    }
}

/// `cmd` as a shell-like line, for error messages.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion; fails with the command line and its stderr unless it exits 0.
pub fn check(cmd: &mut Command) -> anyhow::Result<Output> {
    let output = cmd
        .output()
        .with_context(|| format!("cannot run {}", command_line(cmd)))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}): {}",
            command_line(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// `ip ARGS...`, checked.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    check(Command::new("ip").args(args)).map(drop)
}

/// What `curl` reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurlResult {
    /// The HTTP status, or 0 when no response came (refused, reset, timed out).
    pub code: u16,
    pub body: String,
    /// curl's exit status: 0, or 7 (refused), 28 (timeout), 52/56 (reset) ...
    pub exit: i32,
}

impl CurlResult {
    pub fn from_output(output: &Output) -> Self {
        let stdout = String::from_utf8_lossy(&output.stdout);
        // The status code is the last line, written by `-w`.
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        Self {
            code: code.trim().parse().unwrap_or(0),
            body: body.to_owned(),
            exit: output.status.code().unwrap_or(-1),
        }
    }
}
