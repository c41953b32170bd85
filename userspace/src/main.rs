//! The `ambit` binary: dispatches subcommands to the library.

use std::path::PathBuf;

use ambit::policy::{engine::DEFAULT_ROOT_NAMESPACE, explain};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "ambit",
    version,
    about = "Sidecar-free service-mesh data plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Explain whether a connection or request is allowed, and which policy decided.
    Explain {
        /// Directory of Kubernetes-style YAML (pods, namespaces, policies).
        #[arg(long, value_name = "DIR")]
        config_dir: PathBuf,
        /// Namespace whose selector-less policies apply mesh-wide.
        #[arg(long, default_value = DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        args: explain::ExplainArgs,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Explain {
            config_dir,
            root_namespace,
            output,
            args,
        } => explain::run_cli(&config_dir, &root_namespace, &args, output == Output::Json),
    };
    std::process::exit(code);
}
