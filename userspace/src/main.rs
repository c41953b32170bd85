//! The `ambit` binary: the node agent and its one-shot commands. Dispatch only; each
//! command lives in the library.

use std::path::PathBuf;

use ambit::policy::{engine::DEFAULT_ROOT_NAMESPACE, explain};
use clap::{Parser, Subcommand, ValueEnum};

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
    Run(Box<ambit::agent::RunArgs>),
    /// Run the certificate authority (Istio's certificate API over gRPC) standalone.
    Ca(ambit::identity::cli::CaArgs),
    /// Explain whether a connection or request is allowed, and which policy decided.
    Explain {
        /// Directory of Kubernetes-style YAML (pods, namespaces, policies).
        #[arg(long, value_name = "DIR")]
        config_dir: PathBuf,
        /// Namespace whose selector-less policies apply mesh-wide.
        #[arg(long, default_value = DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
        /// An alias of the trust domain, as `ambit run --trust-domain-alias` (repeatable).
        #[arg(long = "trust-domain-alias", value_name = "TRUST_DOMAIN")]
        trust_domain_aliases: Vec<String>,
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Explain {
        config_dir,
        root_namespace,
        trust_domain_aliases,
        output,
        args,
    } = &cli.command
    {
        let code = explain::run_cli(
            config_dir,
            root_namespace,
            trust_domain_aliases,
            args,
            *output == Output::Json,
        );
        return std::process::ExitCode::from(u8::try_from(code).unwrap_or(2));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ambit: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => ambit::agent::run(*args).await,
            Command::Ca(args) => {
                ambit::identity::cli::run_ca(&args, ambit::agent::shutdown_signal())
                    .await
                    .map_err(Into::into)
            }
            Command::Explain { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ambit: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
