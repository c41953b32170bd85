//! `ambit install-cni`: puts the `ambit-cni` plugin on the node, as istio-cni's installer
//! does. The binary goes into the host's CNI bin directory, a kubeconfig for it (from
//! this pod's service account) into the configuration directory, and its entry at the end
//! of the primary network's conflist, in that order, so that the runtime never meets an
//! entry whose binary or kubeconfig is missing.
//!
//! With `--watch` it stays, as the DaemonSet's native sidecar, and puts back what others
//! undo: primary network plugins rewrite their conflist without our entry, and the
//! service-account token rotates. It never removes anything, not even on SIGTERM: a
//! rolling update must find the entry still there, so that an enrolled pod created
//! meanwhile never starts unmeshed. Taking it out is `ambit uninstall-node`'s job, and
//! once it has run (the kubeconfig is gone) the watch repairs nothing more.

mod chain;
mod kubeconfig;

use std::{
    fmt, fs,
    future::Future,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tracing::{info, warn};

pub use chain::Chain;

use crate::{
    cni_conf::{self, CniConfError},
    identity::cli::parse_duration,
};

/// How often the first install looks for the primary network's configuration.
const WAIT_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The host's CNI plugin directory, where `ambit-cni` is copied.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The host's CNI network configuration directory, mounted at the host's own path: the
    /// plugin's entry names the kubeconfig in it by this path.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The plugin to install [default: `ambit-cni` beside this executable].
    #[arg(long)]
    pub plugin_binary: Option<PathBuf>,
    /// The agent's socket for the plugin (`ambit run --cni-socket`), as the host sees it.
    #[arg(long, default_value = ambit_cni::DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
    /// Service account whose CA certificate (`ca.crt`) and token (`token`) go into the
    /// plugin's kubeconfig.
    #[arg(long, default_value = "/var/run/secrets/kubernetes.io/serviceaccount")]
    pub service_account_dir: PathBuf,
    /// API server host the plugin asks, as the kubelet tells every pod.
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    pub api_server_host: String,
    /// API server port the plugin asks.
    #[arg(long, env = "KUBERNETES_SERVICE_PORT", default_value = "443")]
    pub api_server_port: u16,
    /// How long to wait for the primary network plugin to write its configuration
    /// (`90s`, `5m`) before giving up.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub wait: Duration,
    /// After installing, keep checking and repair what changed, until SIGTERM (which
    /// leaves everything installed).
    #[arg(long)]
    pub watch: bool,
    /// With `--watch`, the time between checks.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub check_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot find the ambit-cni binary beside this executable (pass --plugin-binary): {0}")]
    OwnPath(#[source] io::Error),
    #[error("{} is not UTF-8, which a CNI configuration (JSON) cannot name", .0.display())]
    NotUtf8(PathBuf),
    #[error("cannot read the plugin binary {}: {source}", path.display())]
    PluginRead { path: PathBuf, source: io::Error },
    #[error("cannot install the plugin binary as {}: {source}", path.display())]
    PluginWrite { path: PathBuf, source: io::Error },
    #[error("cannot read the service account's {}: {source}", path.display())]
    ServiceAccount { path: PathBuf, source: io::Error },
    #[error("the service account's token {} is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error("cannot write the plugin's kubeconfig {}: {source}", path.display())]
    KubeconfigWrite { path: PathBuf, source: io::Error },
    #[error("cannot read the CNI configuration directory {}: {source}", path.display())]
    ConfDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    CniConf(#[from] CniConfError),
    #[error(
        "CNI configuration {} is not one the runtime would load ({reason}), left as it is",
        path.display()
    )]
    NotANetwork { path: PathBuf, reason: &'static str },
    #[error("cannot remove {} after converting it to {}: {source}", from.display(), to.display())]
    RemoveConverted {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error(
        "no CNI network configuration (*.conflist, *.conf or *.json) in {} after {}s: \
         the cluster's network plugin has not written one; is it installed?",
        dir.display(),
        waited.as_secs()
    )]
    NoNetwork { dir: PathBuf, waited: Duration },
}

/// What one pass changed. Empty when everything was already as wanted: nothing was written.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    /// The plugin binary was written.
    pub binary: bool,
    /// The kubeconfig was written (first install, or a rotated token).
    pub kubeconfig: bool,
    /// The primary network's configuration.
    pub chain: Chain,
}

impl Report {
    pub fn changed(&self) -> bool {
        self.binary || self.kubeconfig || self.chain.changed()
    }
}

impl fmt::Display for Report {
    /// What was written, for the log: `binary, kubeconfig, entry appended to 10-x.conflist`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.binary {
            parts.push("binary".to_owned());
        }
        if self.kubeconfig {
            parts.push("kubeconfig".to_owned());
        }
        if self.chain.changed() {
            parts.push(self.chain.to_string());
        }
        f.write_str(&parts.join(", "))
    }
}

/// Installs, waiting up to `--wait` for the primary network; with `--watch`, then repairs
/// every `--check-interval` until `shutdown`. Shutdown at any point is a success and
/// removes nothing.
pub async fn install_cni(
    args: &InstallArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), InstallError> {
    let installer = Installer::new(args)?;
    tokio::pin!(shutdown);
    let first = async {
        let deadline = Instant::now() + args.wait;
        loop {
            let report = installer.install()?;
            if report.chain != Chain::NoNetwork {
                return Ok(report);
            }
            if Instant::now() >= deadline {
                return Err(InstallError::NoNetwork {
                    dir: args.cni_conf_dir.clone(),
                    waited: args.wait,
                });
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    };
    let report = tokio::select! {
        () = &mut shutdown => return Ok(()),
        report = first => report?,
    };
    if report.changed() {
        info!(changed = %report, "installed ambit-cni");
    } else {
        info!(network = %report.chain, "ambit-cni was already installed");
    }
    if !args.watch {
        return Ok(());
    }
    loop {
        tokio::select! {
            () = &mut shutdown => {
                info!("stopping; ambit-cni stays installed (`ambit uninstall-node` removes it)");
                return Ok(());
            }
            () = tokio::time::sleep(args.check_interval) => {}
        }
        // Errors are for the next check to retry: exiting would only restart the container
        // with a growing back-off, and the previous installation stays meanwhile.
        match installer.repair() {
            Ok(None) => {
                info!(
                    "the plugin's kubeconfig is gone: `ambit uninstall-node` ran; \
                     no more repairs until this container starts again"
                );
                shutdown.await;
                return Ok(());
            }
            Ok(Some(report)) if report.chain == Chain::NoNetwork => {
                warn!(dir = %args.cni_conf_dir.display(), "no CNI network configuration to chain into");
            }
            Ok(Some(report)) if report.changed() => {
                info!(changed = %report, "repaired ambit-cni");
            }
            Ok(Some(_)) => {}
            Err(error) => warn!(%error, "cannot check the ambit-cni installation"),
        }
    }
}

/// Everything one pass needs, resolved once.
#[derive(Debug)]
pub struct Installer {
    plugin_binary: PathBuf,
    installed_binary: PathBuf,
    conf_dir: PathBuf,
    kubeconfig: PathBuf,
    service_account_dir: PathBuf,
    api_server: String,
    /// The plugin's entry, as it must appear in the primary conflist.
    entry: Map<String, Value>,
}

impl Installer {
    pub fn new(args: &InstallArgs) -> Result<Self, InstallError> {
        let plugin_binary = match &args.plugin_binary {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .map_err(InstallError::OwnPath)?
                .with_file_name(cni_conf::PLUGIN_TYPE),
        };
        // The runtime resolves the entry's paths from its own working directory.
        let conf_dir =
            std::path::absolute(&args.cni_conf_dir).map_err(|source| InstallError::ConfDir {
                path: args.cni_conf_dir.clone(),
                source,
            })?;
        let kubeconfig = conf_dir.join(cni_conf::KUBECONFIG_FILE);
        let entry = Map::from_iter([
            ("type".to_owned(), json!(cni_conf::PLUGIN_TYPE)),
            ("agent_socket".to_owned(), json_path(&args.agent_socket)?),
            ("kubeconfig".to_owned(), json_path(&kubeconfig)?),
        ]);
        Ok(Self {
            plugin_binary,
            installed_binary: args.cni_bin_dir.join(cni_conf::PLUGIN_TYPE),
            conf_dir,
            kubeconfig,
            service_account_dir: args.service_account_dir.clone(),
            api_server: kubeconfig::server_url(&args.api_server_host, args.api_server_port),
            entry,
        })
    }

    /// One pass: writes what differs from what it should be, binary first and entry last.
    pub fn install(&self) -> Result<Report, InstallError> {
        let _lock = cni_conf::lock_dir(&self.conf_dir)?;
        self.write_all()
    }

    /// A pass of the watch: the same, unless the kubeconfig is gone, which means that
    /// `ambit uninstall-node` ran (see `cni_conf`): then it writes nothing and says `None`.
    pub fn repair(&self) -> Result<Option<Report>, InstallError> {
        let _lock = cni_conf::lock_dir(&self.conf_dir)?;
        if !self.kubeconfig.exists() {
            return Ok(None);
        }
        self.write_all().map(Some)
    }

    fn write_all(&self) -> Result<Report, InstallError> {
        let binary = self.install_binary()?;
        let kubeconfig = kubeconfig::install(
            &self.kubeconfig,
            &self.api_server,
            &self.service_account_dir,
        )?;
        let chain = chain::install(&self.conf_dir, &self.entry)?;
        Ok(Report {
            binary,
            kubeconfig,
            chain,
        })
    }

    /// Copies the plugin into the bin directory unless the same bytes are there with mode
    /// 0755; whether it wrote. The copy is renamed into place, so a runtime starting the
    /// plugin meanwhile runs the old binary or the new one, never a partial file.
    fn install_binary(&self) -> Result<bool, InstallError> {
        let bytes = fs::read(&self.plugin_binary).map_err(|source| InstallError::PluginRead {
            path: self.plugin_binary.clone(),
            source,
        })?;
        if same_file(&self.installed_binary, &bytes, 0o755) {
            return Ok(false);
        }
        crate::state_file::write(&self.installed_binary, &bytes, 0o755).map_err(|source| {
            InstallError::PluginWrite {
                path: self.installed_binary.clone(),
                source,
            }
        })?;
        Ok(true)
    }
}

/// A path as a JSON string; JSON cannot carry a path that is not UTF-8.
fn json_path(path: &Path) -> Result<Value, InstallError> {
    path.to_str()
        .map(|path| json!(path))
        .ok_or_else(|| InstallError::NotUtf8(path.to_owned()))
}

/// Whether `path` holds exactly `bytes` with mode `mode`. Anything unreadable is "no":
/// writing it anew then reports the real error.
fn same_file(path: &Path, bytes: &[u8], mode: u32) -> bool {
    let same_mode = fs::metadata(path).is_ok_and(|meta| {
        meta.permissions().mode() & 0o7777 == mode && meta.len() == bytes.len() as u64
    });
    same_mode && fs::read(path).is_ok_and(|old| old == bytes)
}

#[cfg(test)]
mod tests;
