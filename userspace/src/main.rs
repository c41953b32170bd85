//! The `ambit` binary: the node agent and its one-shot commands. Dispatch only; each
//! command lives in the library.

use ambit::explain;
use clap::{Parser, Subcommand};

/// jemalloc rather than glibc's malloc, which kept the peak of a load for good (the
/// bench's 77 MiB, idle): jemalloc gives freed pages back to the system.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its first allocation: a background thread purges
/// freed pages, so an idle agent returns memory too (without it jemalloc purges only when
/// it allocates); pages freed 1 s ago go back at once (`dirty_decay_ms`, 10 s by default),
/// without the lazy `MADV_FREE` stage that leaves them counted in RSS
/// (`muzzy_decay_ms:0`).
// SAFETY: a NUL-terminated string that jemalloc only reads, under the name that the
// prefixed build of tikv-jemalloc-sys (the default on Linux) looks up.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

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
