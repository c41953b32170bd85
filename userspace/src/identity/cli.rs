//! How `ambit run` and `ambit ca` start identity: their clap arguments and one function
//! each ([`start`], [`run_ca`]), so `main.rs` only flattens the arguments and calls them.
//! Owns wiring and defaults, nothing else.
//!
//! `ambit run` (standalone mode, the default) embeds the CA: its root lives in
//! `<state-dir>/ca/`, the manager calls it in process, and it is entitled to the identities
//! enrolled on this node. With `--ca-listen` the embedded CA is also served over gRPC for
//! other node proxies, authenticated by the agent's token (`--ca-token-file`, created on
//! first start). With `--ca-address` the agent uses a CA elsewhere instead, e.g. `ambit ca`.
//!
//! `ambit ca` trusts either a grants file or, with `--kubernetes`, the API server
//! (`kube_authz`).

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    authz::{self, Authorizer, AuthzError, GrantsAuthorizer, NodeAuthorizer},
    ca::{Ca, CaError, Cacerts, PluggedCa},
    ca_client::{CaClientError, CaToken, GrpcCaClient, LocalCaClient},
    ca_service::{self, CaServiceError},
    cacerts_secret::{CacertsSecret, CacertsSecretError},
    kube_authz::{KubeAuthorizer, ServiceAccount},
    manager::{ManagerConfig, SecretManager},
    root_publisher,
};

/// The CA's key material and rules, shared by `ambit ca` and the embedded CA.
#[derive(clap::Args, Clone, Debug)]
pub struct CaKeyArgs {
    /// Trust domain of workload identities (`spiffe://<trust-domain>/ns/..`).
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Plugged-in signing certificate (root or intermediate, PEM); default: a root the CA
    /// creates in `<state-dir>/ca/` on first start.
    #[arg(long = "ca-cert", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// Private key of `--ca-cert` (PEM).
    #[arg(long = "ca-key", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Certificates above an intermediate `--ca-cert`, ending with the root (PEM).
    #[arg(long = "ca-chain", requires = "ca_cert")]
    pub ca_chain: Option<PathBuf>,
    /// Plugged-in CA in Istio's `cacerts` layout (`ca-cert.pem`, `ca-key.pem`,
    /// `root-cert.pem`, optional `cert-chain.pem`), e.g. the `cacerts` Secret mounted.
    #[arg(long = "cacerts-dir", conflicts_with = "ca_cert")]
    pub cacerts_dir: Option<PathBuf>,
    /// Longest lifetime the CA issues (`90s`, `30m`, `24h` or seconds).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub max_cert_ttl: Duration,
}

/// `ambit ca`: the CA as its own service.
#[derive(clap::Args, Clone, Debug)]
pub struct CaArgs {
    #[command(flatten)]
    pub keys: CaKeyArgs,
    /// Where a self-created root is kept.
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/lib/ambit")]
    pub state_dir: PathBuf,
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Names (DNS or IP) the service's TLS certificate is valid for.
    #[arg(long = "server-name", default_values = ["ambit-ca", "localhost"])]
    pub server_names: Vec<String>,
    /// Who may ask for what: lines of `<token> <caller> <identity>...` (see `authz`).
    #[arg(long, required_unless_present = "kubernetes")]
    pub grants_file: Option<PathBuf>,
    #[command(flatten)]
    pub kubernetes: KubeCaArgs,
}

/// `ambit ca --kubernetes`: callers are node agents proved by the Kubernetes API.
#[derive(clap::Args, Clone, Debug)]
pub struct KubeCaArgs {
    /// Authenticate agents by their service-account tokens (TokenReview) and sign only
    /// identities with a pod on the agent's node, instead of a grants file.
    #[arg(long, conflicts_with = "grants_file")]
    pub kubernetes: bool,
    /// Kubeconfig to reach the API server; default: the pod's own service account.
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Audience agents' projected tokens must be issued for.
    #[arg(long, default_value = "ambit-ca")]
    pub token_audience: String,
    /// Service account (`namespace/name`) of the node agents, which may ask for the
    /// identities of pods on their node (repeatable; Istio's `CA_TRUSTED_NODE_ACCOUNTS`).
    #[arg(
        long = "trusted-node-account",
        value_name = "NAMESPACE/NAME",
        required_if_eq("kubernetes", "true"),
        requires = "kubernetes"
    )]
    pub trusted_node_accounts: Vec<ServiceAccount>,
    /// The CA's own namespace: where its `--cacerts-secret` is, and the first place the
    /// root is published (as the ConfigMap `ambit-ca-root-cert`, which agents mount).
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "ambit-system",
        requires = "kubernetes"
    )]
    pub namespace: String,
    /// Secret in Istio's plug-in layout the CA signs with, unless `--cacerts-dir` or
    /// `--ca-cert` is given; created with a new root when absent.
    #[arg(long, default_value = "cacerts", requires = "kubernetes")]
    pub cacerts_secret: String,
}

/// Identity options of `ambit run`.
#[derive(clap::Args, Clone, Debug)]
pub struct IdentityArgs {
    #[command(flatten)]
    pub keys: CaKeyArgs,
    /// Use the CA at this address (`https://host:port`) instead of the embedded one.
    #[arg(long, env = "AMBIT_CA_ADDRESS", requires = "ca_root_cert")]
    pub ca_address: Option<String>,
    /// Root the remote CA's serving certificate chains to (PEM).
    #[arg(long)]
    pub ca_root_cert: Option<PathBuf>,
    /// Name the remote CA's certificate must carry.
    #[arg(long, default_value = "ambit-ca")]
    pub ca_server_name: String,
    /// The agent's bearer token; default `<state-dir>/ca/agent-token`, created on first
    /// start when the CA is embedded.
    #[arg(long, env = "AMBIT_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,
    /// Also serve the embedded CA over gRPC on this address.
    #[arg(long)]
    pub ca_listen: Option<SocketAddr>,
    /// Lifetime asked for workload certificates (capped by the CA).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// A former (or future) trust domain of this mesh: peers whose certificates name it
    /// are accepted, and policy principals written with it match (repeatable).
    #[arg(long = "trust-domain-alias", value_name = "TRUST_DOMAIN")]
    pub trust_domain_aliases: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Token(#[from] AuthzError),
    #[error(transparent)]
    Client(#[from] CaClientError),
    #[error(transparent)]
    Service(#[from] CaServiceError),
    #[error("failed to bind the CA service to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kubernetes(#[from] crate::kube_client::KubeError),
    #[error(transparent)]
    CacertsSecret(#[from] CacertsSecretError),
    #[error("failed to read the CA root {path}: {source}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `ambit run` gets back: the manager the data path uses, and the embedded CA
/// service when one is served.
pub struct Identity {
    pub manager: SecretManager,
    /// Address the embedded CA service listens on (`--ca-listen`, port resolved).
    pub ca_addr: Option<SocketAddr>,
    pub ca_service: Option<JoinHandle<Result<(), CaServiceError>>>,
}

/// Starts identity for `ambit run` on node `node`: the embedded CA (unless
/// `--ca-address`) and the manager. `shutdown` stops the embedded CA service.
pub async fn start(
    args: &IdentityArgs,
    state_dir: &Path,
    node: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Identity, StartError> {
    let config = ManagerConfig {
        ttl: args.cert_ttl,
        trust_domain_aliases: args.trust_domain_aliases.clone(),
        ..ManagerConfig::default()
    };
    let token_file = args
        .ca_token_file
        .clone()
        .unwrap_or_else(|| state_dir.join("ca/agent-token"));
    if let (Some(address), Some(root)) = (&args.ca_address, &args.ca_root_cert) {
        let root_pem = std::fs::read_to_string(root).map_err(|source| StartError::Root {
            path: root.clone(),
            source,
        })?;
        let token = CaToken::File(token_file);
        let client = GrpcCaClient::new(address, &args.ca_server_name, &root_pem, token)?;
        return Ok(Identity {
            manager: SecretManager::spawn(Arc::new(client), config),
            ca_addr: None,
            ca_service: None,
        });
    }

    let ca = Arc::new(load_ca(&args.keys, state_dir)?);
    let token = authz::ensure_token(&token_file)?;
    let (manager, worker) = SecretManager::new(config);
    let authorizer = Arc::new(NodeAuthorizer::new(node, &token, manager.enrolled()));
    worker.spawn(Arc::new(LocalCaClient::new(
        ca.clone(),
        authorizer.clone(),
        authorizer.caller(),
    )));
    let (ca_addr, ca_service) = match args.ca_listen {
        Some(addr) => {
            let listener = bind(addr).await?;
            let bound = listener
                .local_addr()
                .map_err(|source| StartError::Bind { addr, source })?;
            let names = vec!["localhost".to_owned(), bound.ip().to_string()];
            let task = tokio::spawn(async move {
                ca_service::serve(ca, authorizer, listener, &names, shutdown).await
            });
            (Some(bound), Some(task))
        }
        None => (None, None),
    };
    Ok(Identity {
        manager,
        ca_addr,
        ca_service,
    })
}

/// Runs `ambit ca` until `shutdown`.
pub async fn run_ca(args: &CaArgs, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let kube = &args.kubernetes;
    // Callers are proved by a grants file or, without one (clap requires one of the two),
    // by the API server: `Err` holds the file, `Ok` the API server's client.
    let trust = match &args.grants_file {
        Some(path) => Err(path),
        None => Ok(crate::kube_client::client(kube.kubeconfig.as_deref()).await?),
    };
    let keys = &args.keys;
    let ca = Arc::new(match &trust {
        Ok(client) if keys.cacerts_dir.is_none() && keys.ca_cert.is_none() => {
            let secret = CacertsSecret::new(client.clone(), &kube.namespace, &kube.cacerts_secret);
            let files = secret.load_or_generate(&keys.trust_domain).await?;
            Ca::from_cacerts(
                &files,
                &secret.origin(),
                &keys.trust_domain,
                keys.max_cert_ttl,
            )?
        }
        _ => load_ca(keys, &args.state_dir)?,
    });
    let (authorizer, _publisher): (Arc<dyn Authorizer>, _) = match trust {
        Ok(client) => {
            let publisher = tokio::spawn(root_publisher::publish(
                client.clone(),
                kube.namespace.clone(),
                ca.root_pem(),
            ));
            let authorizer = KubeAuthorizer::new(
                client,
                &kube.token_audience,
                kube.trusted_node_accounts.clone(),
            );
            (Arc::new(authorizer), Some(AbortOnDrop(publisher)))
        }
        Err(path) => (Arc::new(GrantsAuthorizer::from_file(path)?), None),
    };
    let listener = bind(args.listen).await?;
    tracing::info!(addr = %args.listen, trust_domain = ca.trust_domain(), "CA serving");
    ca_service::serve(ca, authorizer, listener, &args.server_names, shutdown).await?;
    Ok(())
}

/// Stops a background task with the function that started it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn load_ca(keys: &CaKeyArgs, state_dir: &Path) -> Result<Ca, CaError> {
    if let Some(dir) = &keys.cacerts_dir {
        let files = Cacerts::read_dir(dir)?;
        return Ca::from_cacerts(&files, dir, &keys.trust_domain, keys.max_cert_ttl);
    }
    match (&keys.ca_cert, &keys.ca_key) {
        (Some(cert), Some(key)) => Ca::from_pem_files(
            &PluggedCa {
                cert: cert.clone(),
                key: key.clone(),
                chain: keys.ca_chain.clone(),
            },
            &keys.trust_domain,
            keys.max_cert_ttl,
        ),
        _ => Ca::load_or_create(state_dir, &keys.trust_domain, keys.max_cert_ttl),
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// `90s`, `30m`, `24h`, or plain seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m or 24h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
#[path = "cli_tests.rs"]
mod tests;
