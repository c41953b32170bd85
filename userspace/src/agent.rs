//! `ambit run`: wires discovery, the kernel programs, the workload manager and the admin
//! API together and runs until it has drained after SIGTERM or SIGINT ([`crate::drain`]).
//!
//! At start it takes the listening sockets of an agent already running with the same
//! state directory ([`crate::handover`]), which then drains. Stopping the agent leaves the
//! kernel programs and maps pinned: enrolled pods then fail closed until an agent starts
//! again and re-adopts them.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::{error, info, warn};

use crate::{
    access_log::{self, AccessLog},
    admin::{self, AdminState, ReadinessState},
    cni_server::{self, CniServer},
    discovery::{Snapshot, files, kubernetes},
    drain::{self, DrainTrigger, OnSignal, Phase},
    handover,
    identity::cli::parse_duration,
    identity::{self, cli::IdentityArgs},
    jwks::{JwksFetcher, JwksOptions},
    metrics::{self, Metrics},
    peers::ClusterNames,
    pod_cgroup::{Adopter, HostPaths},
    policy::jwt::jwks_uris,
    proxy::limits::{Descriptors, Limits},
    proxy::{
        Shared, connections::ConnectionLog, hbone::client::Pool, lanes::Lanes, same_node::LocalPods,
    },
    redirect::Redirector,
    state::{Applied, PolicySettings},
    workloads::{WorkloadManager, WorkloadTable},
};

/// How often pods that failed to enroll are retried.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Where namespaces, pods, services and policies come from.
    #[arg(long, value_enum, env = "AMBIT_SOURCE", default_value_t = Source::Files)]
    pub source: Source,
    /// Directory of Kubernetes-style YAML (Namespace, Pod, Service, policies), followed
    /// for changes (`--source files`).
    #[arg(long, env = "AMBIT_CONFIG_DIR", required_if_eq("source", "files"))]
    pub config_dir: Option<PathBuf>,
    /// kubeconfig of the API server (`--source kubernetes`); default: the pod's service
    /// account (in-cluster configuration).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Where the agent keeps state across restarts (the embedded CA's root, its token).
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/lib/ambit")]
    pub state_dir: PathBuf,
    /// This node's name; the embedded CA signs only identities of pods on it.
    #[arg(long, env = "NODE_NAME", default_value = "localhost")]
    pub node_name: String,
    /// Namespace whose selector-less policies apply to the whole mesh.
    #[arg(long, default_value = crate::policy::engine::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// cgroup (v2) whose processes are redirected; default: the cgroup2 root.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Where kernel maps and links are pinned (on bpffs).
    #[arg(long, default_value = "/sys/fs/bpf/ambit")]
    pub bpf_pin_dir: PathBuf,
    /// Admin API address; must be loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Readiness endpoint address (`/healthz/ready`).
    #[arg(long, default_value = "127.0.0.1:15021")]
    pub readiness_addr: SocketAddr,
    /// Prometheus metrics address (`GET /metrics`), reachable from off the node.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Where access log lines go: `stdout`, a file (appended to), or `off` (refusals are
    /// still written to stdout).
    #[arg(long, default_value = "stdout")]
    pub access_log: access_log::Target,
    /// The cluster's name in the `baggage` of HBONE requests (Istio's `CLUSTER_ID`).
    #[arg(long, env = "CLUSTER_ID", default_value_t = ClusterNames::default().id)]
    pub cluster_id: String,
    /// The cluster's DNS domain, in Service hostnames (`destination_service`).
    #[arg(long, default_value_t = ClusterNames::default().domain)]
    pub cluster_domain: String,
    /// Unix socket where the `ambit-cni` plugin reports pod sandboxes (the DaemonSet uses
    /// `/var/run/ambit/cni.sock`); off by default, when pods name their network namespace
    /// with the `ambit.io/netns` annotation.
    #[arg(long, env = "AMBIT_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    /// After SIGTERM, how long connections already open keep being relayed before they
    /// are reset; a second SIGTERM ends the drain at once.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Connections between two pods this agent serves skip the HBONE tunnel (same
    /// admission, no TLS); `--same-node-shortcut=false` encrypts every hop.
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub same_node_shortcut: bool,
    /// Relays that prove bulk (a megabyte read without waiting for data) move to threads
    /// of their own at the lowest priority, so that they do not delay other workloads'
    /// connections; `--bulk-lane=false` keeps every relay on the main threads.
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub bulk_lane: bool,
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub jwt: JwtArgs,
}

/// Where the agent learns about the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// A directory of YAML (`--config-dir`).
    Files,
    /// The API server: in-cluster, or `--kubeconfig`.
    Kubernetes,
}

/// How RequestAuthentication fetches `jwksUri` keys and checks token times.
#[derive(Debug, clap::Args)]
pub struct JwtArgs {
    /// PEM bundle of CA certificates trusted for `https://` jwksUri, besides the node's
    /// CA store.
    #[arg(long)]
    pub jwks_ca_file: Option<PathBuf>,
    /// Lets jwksUri reach loopback, link-local and cloud metadata addresses (refused by
    /// default against SSRF).
    #[arg(long)]
    pub allow_private_jwks: bool,
    /// Leeway on a JWT's `exp` and `nbf`.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub jwt_clock_skew: Duration,
}

/// Timeouts and limits of the data path: what one peer or one pod can make the proxy hold.
#[derive(Debug, clap::Args)]
pub struct LimitArgs {
    /// Time a client has for the TLS handshake on 15008, and then for its first CONNECT.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Time an upstream TCP connect, or setting up an HBONE connection, may take.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// An HBONE connection with no stream open for this long is closed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub hbone_idle_timeout: Duration,
    /// Connections and HBONE streams held for one destination pod.
    #[arg(long, default_value_t = Limits::default().inbound_per_workload)]
    pub max_inbound_per_workload: usize,
    /// The same, per source of one pod: a client identity, or a client IP without one.
    #[arg(long, default_value_t = Limits::default().inbound_per_source)]
    pub max_inbound_per_source: usize,
    /// Connections one pod's applications may have open through the proxy.
    #[arg(long, default_value_t = Limits::default().outbound_per_workload)]
    pub max_outbound_per_workload: usize,
    /// TLS handshakes in flight on one pod's HBONE listener.
    #[arg(long, default_value_t = Limits::default().handshakes_per_workload)]
    pub max_handshakes_per_workload: usize,
    /// TLS handshakes in flight from one source IP to one pod.
    #[arg(long, default_value_t = Limits::default().handshakes_per_source)]
    pub max_handshakes_per_source: usize,
    /// Concurrent CONNECT streams on one HBONE connection.
    #[arg(long, default_value_t = Limits::default().streams_per_connection)]
    pub max_streams_per_connection: u32,
    /// Established HBONE connections of one destination pod.
    #[arg(long, default_value_t = Limits::default().hbone_connections_per_workload)]
    pub max_hbone_connections_per_workload: usize,
    /// The same, per peer: one client identity at one address. Default: twice the
    /// connections a peer's pool needs for --max-inbound-per-source streams, plus 10.
    #[arg(long)]
    pub max_hbone_connections_per_source: Option<usize>,
    /// File descriptors the data path leaves for the agent's own work.
    #[arg(long, default_value_t = Limits::default().fd_reserve)]
    pub fd_reserve: usize,
    /// Bytes of relay buffers one pod's connections may hold beyond their initial 1 KiB
    /// per direction; past it their buffers stop growing.
    #[arg(long, default_value_t = Limits::default().buffer_per_workload)]
    pub max_buffer_per_workload: usize,
}

impl From<&LimitArgs> for Limits {
    fn from(args: &LimitArgs) -> Self {
        Self {
            handshake_timeout: args.handshake_timeout,
            connect_timeout: args.connect_timeout,
            hbone_idle_timeout: args.hbone_idle_timeout,
            inbound_per_workload: args.max_inbound_per_workload,
            inbound_per_source: args.max_inbound_per_source,
            outbound_per_workload: args.max_outbound_per_workload,
            handshakes_per_workload: args.max_handshakes_per_workload,
            handshakes_per_source: args.max_handshakes_per_source,
            streams_per_connection: args.max_streams_per_connection,
            hbone_connections_per_workload: args.max_hbone_connections_per_workload,
            hbone_connections_per_source: args
                .max_hbone_connections_per_source
                .unwrap_or_else(|| Limits::hbone_connections_for(args.max_inbound_per_source)),
            fd_reserve: args.fd_reserve,
            buffer_per_workload: args.max_buffer_per_workload,
        }
    }
}

/// How `ambit run` ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Nothing left open.
    Clean,
    /// Drain cut short (deadline, second signal): the caller exits without closing the
    /// connections left, so that the kernel resets them.
    ResetOpenConnections,
}

/// How long a new agent waits for the one it took over from to let go of the admin,
/// readiness and metrics ports (it closes them as it starts draining).
const PORTS_RELEASE: Duration = Duration::from_secs(5);

pub async fn run(args: RunArgs) -> anyhow::Result<Exit> {
    use anyhow::Context as _;
    let source = SourceConfig::resolve(&args).await?;
    let open_files = raise_fd_limit();
    let cgroup = match args.cgroup.clone() {
        Some(cgroup) => cgroup,
        None => crate::redirect::cgroup2_root().context("no cgroup2 mount found; pass --cgroup")?,
    };
    let mut redirector = Redirector::load(&cgroup, &args.bpf_pin_dir)?;
    if let Some(logger) = redirector.take_logger() {
        tokio::spawn(forward_kernel_logs(logger));
    }
    let (stop_ca, ca_stopped) = watch::channel(());
    let identity = identity::cli::start(
        &args.identity,
        &args.state_dir,
        &args.node_name,
        async move {
            let mut ca_stopped = ca_stopped;
            let _ = ca_stopped.changed().await;
        },
    )
    .await?;
    let trust_domain = args.identity.keys.trust_domain.clone();
    let pool = Pool::default();
    // Shared by the enrollment manager that writes it, and the admin API, readiness and
    // metrics that read it.
    let workload_table = WorkloadTable::default();
    let metrics = {
        let mut metrics = Metrics::new();
        metrics.register_collector(metrics::Pods(Arc::clone(&workload_table)));
        metrics.register_collector(metrics::Process);
        metrics.register_collector(metrics::Certificates(identity.manager.clone()));
        metrics.register_collector(metrics::HbonePool(pool.clone()));
        Arc::new(metrics)
    };
    let access_log = AccessLog::start(&args.access_log, metrics.access_log_dropped.clone())?;
    let _flush_access_log = access_log::FlushOnExit(access_log.clone());
    let (snapshot_tx, mut snapshots) = watch::channel(Snapshot::default());
    source
        .start(&args, snapshot_tx, metrics.config_rejected.clone())
        .await?;
    let store = cni_server::SandboxStore::new(&args.state_dir);
    let saved = match &args.cni_socket {
        Some(_) => store.load()?,
        None => cni_server::Sandboxes::new(),
    };
    // Held here for the whole loop, so the loop's `changed()` on it only ever reports
    // real changes, with or without a CNI socket.
    let (sandboxes_tx, mut sandboxes) = watch::channel(saved);
    let (reconciled_tx, reconciled_rx) = watch::channel(Arc::new(Snapshot::default()));
    let jwks = JwksFetcher::new(JwksOptions {
        ca_file: args.jwt.jwks_ca_file.clone(),
        allow_private: args.jwt.allow_private_jwks,
        ..JwksOptions::default()
    })?;
    let settings = PolicySettings {
        trust_domain_aliases: args.identity.trust_domain_aliases.clone(),
        jwt_keys: Arc::new(jwks.clone()),
        clock_skew: args.jwt.jwt_clock_skew,
        cluster: ClusterNames {
            id: args.cluster_id.clone(),
            domain: args.cluster_domain.clone(),
        },
        ..PolicySettings::new(&args.root_namespace, &trust_domain)
    };
    let applied = |snapshot: Snapshot| {
        // Fetching starts before the engine that needs the keys is in force; URIs the
        // snapshot no longer uses are dropped with their keys.
        jwks.track(jwks_uris(&snapshot.policies));
        metrics.config_reloads.inc();
        Arc::new(Applied::new(snapshot, &settings))
    };
    let (applied_tx, applied_rx) = watch::channel(applied(snapshots.borrow().clone()));
    let connections = Arc::new(ConnectionLog::new(Arc::clone(&metrics), access_log));
    let limits = Limits::from(&args.limits);
    let descriptors = Descriptors::new(open_files, open_descriptors(), limits.fd_reserve);
    let (drain_trigger, drain_watch) = drain::channel();
    let shared = Shared {
        orig_dst: redirector.orig_dst(),
        connections: Arc::clone(&connections),
        applied: applied_rx.clone(),
        identities: identity.manager.clone(),
        pool: pool.clone(),
        local: LocalPods::new(args.same_node_shortcut),
        limits: Arc::new(limits),
        descriptors: descriptors.clone(),
        lanes: lanes(args.bulk_lane)?,
        drain: drain_watch.clone(),
    };
    // Last thing before serving: the running agent stops accepting as soon as this one
    // holds its listeners.
    let handover_path = handover::socket_path(&args.state_dir);
    let predecessor = handover::take_over(&handover_path).await?;
    let took_over = predecessor.is_some();
    let mut manager = WorkloadManager::new(
        redirector,
        shared,
        identity.manager.clone(),
        trust_domain.clone(),
        args.node_name.clone(),
        crate::routing::SavedSettings::new(&args.state_dir),
        workload_table,
    );
    manager.inherit(predecessor.unwrap_or_default());
    let configured = Arc::new(AtomicBool::new(false));

    let metrics_listener =
        bind_after_predecessor(took_over, || metrics::server::bind(args.metrics_addr)).await?;
    let admin_listener = bind_after_predecessor(took_over, || admin::bind(args.admin_addr)).await?;
    let readiness_listener = bind_after_predecessor(took_over, || {
        tokio::net::TcpListener::bind(args.readiness_addr)
    })
    .await
    .with_context(|| format!("cannot listen on {}", args.readiness_addr))?;
    let admin_state = AdminState {
        workloads: manager.table(),
        connections: Arc::clone(&connections),
        identities: identity.manager.clone(),
        applied: applied_rx,
    };
    // Closed when the listeners are handed over: the ports are the next agent's then.
    let mut endpoints: Vec<JoinHandle<()>> = vec![
        tokio::spawn(async move {
            let _ = admin::serve_admin(admin_listener, admin_state).await;
        }),
        tokio::spawn(metrics::server::serve(metrics_listener, connections)),
    ];
    if let Some(path) = &args.cni_socket {
        let listener = cni_server::bind(path)?;
        let server = CniServer {
            sandboxes: sandboxes_tx.clone(),
            reconciled: reconciled_rx,
            workloads: manager.table(),
            store,
        };
        tokio::spawn(server.serve(listener));
        info!(socket = %path.display(), "CNI socket listening");
    }
    let readiness = ReadinessState {
        configured: Arc::clone(&configured),
        draining: drain_watch,
        workloads: manager.table(),
    };
    endpoints.push(tokio::spawn(async move {
        let _ = admin::serve_readiness(readiness_listener, readiness).await;
    }));
    let (handover_tx, mut handover_rx) = mpsc::channel(1);
    handover::serve(&handover_path, handover_tx)?;
    info!(admin = %args.admin_addr, readiness = %args.readiness_addr, metrics = %args.metrics_addr,
        "admin API listening");

    let mut adopter = Adopter::new(HostPaths::default(), &args.node_name);
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    let mut signals = Signals::new()?;
    let mut phase = Phase::Serving;
    let mut stop_ca = Some(stop_ca);
    let draining = Draining {
        trigger: drain_trigger,
        pool,
    };
    loop {
        let mut snapshot = snapshots.borrow_and_update().clone();
        cni_server::overlay(&mut snapshot, &sandboxes.borrow_and_update());
        // After the CNI overlay: a sandbox the plugin reported wins over a process found.
        adopter.overlay(&mut snapshot).await;
        // Published before the pods are reconciled: admission reads each pod from it, so a
        // pod's listeners never serve before the configuration that enrolls it is in force.
        // Retries reconcile the same snapshot; live connections are re-checked only when
        // the configuration really changed (draining too: what is still relayed stays
        // under the policies in force).
        if applied_tx.borrow().snapshot != snapshot {
            applied_tx.send_replace(applied(snapshot.clone()));
        }
        // A draining agent's pods are the next agent's.
        if !phase.is_draining() {
            manager.reconcile(&snapshot).await;
            reconciled_tx.send_replace(Arc::new(snapshot));
            configured.store(true, Ordering::Release);
        }
        loop {
            let deadline = phase.deadline();
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return Ok(Exit::Clean);
                    }
                    break;
                }
                _ = sandboxes.changed() => break,
                _ = retry.tick(), if !phase.is_draining() => {
                    if manager.has_failures() {
                        break;
                    }
                }
                Some(request) = handover_rx.recv() => match request {
                    handover::Request::Listeners(reply) => {
                        let _ = reply.send(manager.listening());
                    }
                    handover::Request::HandedOver => {
                        if phase == Phase::Serving {
                            phase = Phase::HandedOver;
                            draining.start(&mut manager).await;
                        }
                        for endpoint in &endpoints {
                            endpoint.abort();
                        }
                    }
                },
                () = signals.next() => {
                    let (next, action) = phase.on_signal(Instant::now(), args.drain_timeout);
                    phase = next;
                    match action {
                        OnSignal::StartDrain => {
                            info!(timeout = ?args.drain_timeout,
                                "draining: enrolled pods fail closed until the next agent serves");
                            draining.start(&mut manager).await;
                        }
                        OnSignal::SetDeadline => {
                            info!(timeout = ?args.drain_timeout, "draining until the deadline");
                        }
                        OnSignal::EndNow => {
                            warn!("second signal: resetting the connections still open");
                            return Ok(finish(&mut manager, &mut stop_ca, Exit::ResetOpenConnections));
                        }
                    }
                }
                () = drain::drained(&descriptors), if deadline.is_some() => {
                    info!("drained: no connection left");
                    return Ok(finish(&mut manager, &mut stop_ca, Exit::Clean));
                }
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    warn!("drain deadline passed: resetting the connections still open");
                    return Ok(finish(&mut manager, &mut stop_ca, Exit::ResetOpenConnections));
                }
            }
        }
    }
}

/// What starting the drain takes.
struct Draining {
    trigger: DrainTrigger,
    pool: Pool,
}

impl Draining {
    /// Stops accepting, and tells HBONE connections and readiness.
    async fn start(&self, manager: &mut WorkloadManager) {
        manager.hand_over().await;
        self.trigger.start();
        self.pool.close();
    }
}

/// Leaves the kernel's set of agents and stops the embedded CA, returning `exit`.
fn finish(
    manager: &mut WorkloadManager,
    stop_ca: &mut Option<watch::Sender<()>>,
    exit: Exit,
) -> Exit {
    manager.leave();
    drop(stop_ca.take());
    exit
}

/// Binds with `bind`; after a handover, retries for [`PORTS_RELEASE`] while the previous
/// agent lets go of the port.
async fn bind_after_predecessor<T, E, F>(
    took_over: bool,
    mut bind: impl FnMut() -> F,
) -> Result<T, E>
where
    F: Future<Output = Result<T, E>>,
{
    let give_up = Instant::now() + PORTS_RELEASE;
    loop {
        match bind().await {
            Err(_) if took_over && Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            bound => return bound,
        }
    }
}

/// SIGTERM and SIGINT, each time they come.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// A configuration source, checked before the agent touches the kernel.
enum SourceConfig {
    Files(PathBuf),
    Kubernetes(kube::Client),
}

impl SourceConfig {
    /// Reads what `args` name (the kubeconfig, the in-cluster account), so that a
    /// misconfigured agent fails before it loads programs or creates a CA.
    async fn resolve(args: &RunArgs) -> anyhow::Result<Self> {
        Ok(match (args.source, &args.config_dir) {
            (Source::Files, Some(dir)) => Self::Files(dir.clone()),
            (Source::Files, None) => anyhow::bail!("--source files needs --config-dir"),
            (Source::Kubernetes, _) => {
                Self::Kubernetes(crate::kube_client::client(args.kubeconfig.as_deref()).await?)
            }
        })
    }

    /// Starts the source and returns once it has published its first full snapshot:
    /// reconciling before that would release a restarted agent's pods only because the
    /// source had not shown them yet.
    /// `rejected` counts the files and objects rejected.
    async fn start(
        self,
        args: &RunArgs,
        tx: watch::Sender<Snapshot>,
        rejected: Counter,
    ) -> anyhow::Result<()> {
        match self {
            Self::Files(dir) => {
                let mut initial = files::DirState::new(&args.root_namespace);
                for error in initial.reload(&dir) {
                    error!("config rejected: {error}");
                    rejected.inc();
                }
                tx.send_replace(initial.snapshot());
                let root = args.root_namespace.clone();
                tokio::spawn(files::watch_dir(dir, root, tx, rejected));
            }
            Self::Kubernetes(client) => {
                let mut first = tx.subscribe();
                let options = kubernetes::Options {
                    root_namespace: args.root_namespace.clone(),
                    node_name: args.node_name.clone(),
                    rejected,
                };
                tokio::spawn(kubernetes::watch_cluster(client, options, tx));
                info!("waiting for the first list of the API server's objects");
                first.changed().await?;
                info!("listed the API server's objects");
            }
        }
        Ok(())
    }
}

/// The relays' lanes: with `bulk_lane`, a bulk lane with as many workers as the main
/// runtime has (one per CPU).
fn lanes(bulk_lane: bool) -> anyhow::Result<Lanes> {
    use anyhow::Context as _;
    if !bulk_lane {
        return Ok(Lanes::main_only());
    }
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    Lanes::start(threads).context("cannot start the bulk lane's threads")
}

/// Raises the soft limit on open files to the hard limit: every meshed connection holds up
/// to four descriptors, and the usual soft limit of 1,024 would cap the node at about 250.
/// Returns the limit in force.
fn raise_fd_limit() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let limit = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                info!(from = soft, to = hard, "raised the open-file limit");
                hard
            }
            Err(error) => {
                tracing::warn!(%error, soft, "cannot raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(error) => {
            tracing::warn!(%error, "cannot read the open-file limit; assuming 1024");
            1024
        }
    };
    usize::try_from(limit).unwrap_or(usize::MAX)
}

/// Descriptors this process has open now.
fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Prints the kernel programs' aya-log lines through the agent's logger.
async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let mut fd = match crate::sys::register_kernel_logger(logger) {
        Ok(fd) => fd,
        Err(error) => return tracing::warn!(%error, "kernel program logs unavailable"),
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
