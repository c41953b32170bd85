//! The `ambit` binary: the node agent and its one-shot commands. Dispatch only; each
//! command lives in the library.

use ambit::explain;
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
    Run(Box<ambit::agent::RunArgs>),
    /// Run the certificate authority (Istio's certificate API over gRPC) standalone.
    Ca(Box<ambit::identity::cli::CaArgs>),
    /// Explain whether a connection or request is allowed, and which policy decided.
    Explain(Box<explain::ExplainCli>),
    /// Print the v1beta1 objects that Istio 1.1 (`authentication.istio.io/v1alpha1`)
    /// policies are converted to and enforced as.
    Convert(explain::ConvertCli),
    /// Take ambit off this node (agent stopped): release every enrolled pod, detach the
    /// kernel programs, remove the pins and the CNI entry. Pods return to direct traffic.
    UninstallNode(ambit::uninstall::UninstallArgs),
    /// Install the `ambit-cni` plugin on this node: its binary, a kubeconfig for it, and
    /// its entry at the end of the primary network's conflist; with `--watch`, keep them
    /// so (the DaemonSet's sidecar). Removes nothing, ever: `uninstall-node` does.
    InstallCni(Box<ambit::cni_install::InstallArgs>),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let offline = match &cli.command {
        Command::Explain(args) => Some(explain::run_cli(args)),
        Command::Convert(args) => Some(explain::run_convert(args)),
        Command::Run(_) | Command::Ca(_) | Command::UninstallNode(_) | Command::InstallCni(_) => {
            None
        }
    };
    if let Some(code) = offline {
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
            Command::Run(args) => match ambit::agent::run(*args).await {
                Ok(ambit::agent::Exit::ResetOpenConnections) => {
                    // Without closing what is left: the kernel resets each connection the
                    // proxy still holds (`SO_LINGER` 0), where an orderly close would make
                    // a cut-short response look complete.
                    std::process::exit(0);
                }
                other => other.map(drop),
            },
            Command::Ca(args) => {
                ambit::identity::cli::run_ca(&args, ambit::agent::shutdown_signal())
                    .await
                    .map_err(Into::into)
            }
            Command::UninstallNode(args) => ambit::uninstall::uninstall_node(&args)
                .await
                .map_err(Into::into),
            Command::InstallCni(args) => {
                ambit::cni_install::install_cni(&args, ambit::agent::shutdown_signal())
                    .await
                    .map_err(Into::into)
            }
            Command::Explain(_) | Command::Convert(_) => Ok(()),
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
