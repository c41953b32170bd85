//! The `ambit` binary: the node agent and its one-shot commands.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ambit",
    version,
    about = "Sidecar-free service-mesh node agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Run(ambit::agent::RunArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => ambit::agent::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ambit: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
