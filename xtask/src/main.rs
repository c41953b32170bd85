//! `cargo xtask`: the developer and operator commands of ambit. One module per
//! subcommand; every command that builds runs `setup` first, which only acts on what is
//! missing.

mod bench;
mod build;
mod debug;
mod demo;
mod fuzz;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build needs (Debian packages, rust-src, bpf-linker); idempotent.
    Setup,
    /// Build the agent (kernel programs included).
    Build(build::Options),
    /// Run every test: unit, kernel and network-namespace end-to-end (as root).
    Test(test::Options),
    /// Build, create a small node with pods, run the agent and show who reaches whom.
    Demo,
    /// Measure the mesh against direct pod-to-pod traffic on one node (as root).
    Bench(bench::Options),
    /// Fuzz the parsers (cargo-fuzz, nightly) for a while; not part of `test`.
    Fuzz(fuzz::Options),
    /// Inspect a running agent through its admin API.
    #[command(subcommand)]
    Debug(debug::Command),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup(),
        Command::Build(opts) => build::build(&opts),
        Command::Test(opts) => test::test(&opts),
        Command::Demo => demo::demo(),
        Command::Bench(opts) => bench::bench(&opts),
        Command::Fuzz(opts) => fuzz::fuzz(&opts),
        Command::Debug(cmd) => debug::debug(&cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
