//! `ambit uninstall-node`: takes ambit off a node so that its pods return to direct
//! traffic instead of staying closed (the pinned programs outlive the agent on purpose).
//!
//! It needs no configuration source: everything it undoes is found on the node itself,
//! in the order that never leaves a pod unable to start or talk:
//!
//! 1. the plugin's kubeconfig (a service-account token) is removed and the `ambit-cni`
//!    entry comes out of the CNI conflists, so a pod created from now on does not wait for
//!    an agent that is going away;
//! 2. every pinned link (the cgroup programs and each pod's `sk_lookup`) is detached:
//!    pods' connects and inbound TCP stop being steered to the (absent) proxy;
//! 3. each enrolled namespace recorded under `<state-dir>/netns/` gets its return-path
//!    rule, route and sysctls back as they were before enrollment;
//! 4. the pin directory, with the maps, is removed.
//!
//! Every step runs even if an earlier one failed, and running it again on a clean node
//! does nothing, so it is safe to repeat until it succeeds.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::{
    cni_conf::{self, CniConfError, ConfFile},
    netns::{NetnsError, PodNetns},
    routing::{self, RoutingError, SavedError, SavedSettings},
};

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// Pin directory of the agent's maps and links (`ambit run --bpf-pin-dir`).
    #[arg(long, default_value = "/sys/fs/bpf/ambit")]
    pub bpf_pin_dir: PathBuf,
    /// The agent's state directory (`ambit run --state-dir`): the pods' saved settings.
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/lib/ambit")]
    pub state_dir: PathBuf,
    /// Directory of the CNI network configurations `ambit-cni` chained itself into.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error(transparent)]
    CniConf(#[from] CniConfError),
    #[error("cannot remove the CNI plugin's kubeconfig {}: {source}", path.display())]
    Kubeconfig { path: PathBuf, source: io::Error },
    #[error("cannot detach pinned link {}: {source}", path.display())]
    Detach { path: PathBuf, source: io::Error },
    #[error("cannot remove pin directory {}: {source}", path.display())]
    PinDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Saved(#[from] SavedError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error("{0}")]
    Incomplete(Failures),
}

/// Everything that went wrong in one run, reported together.
#[derive(Debug)]
pub struct Failures(Vec<UninstallError>);

impl fmt::Display for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uninstall incomplete ({} failures)", self.0.len())?;
        for failure in &self.0 {
            write!(f, "; {failure}")?;
        }
        Ok(())
    }
}

/// Takes ambit off this node. Meant for a node whose agent is stopped, or about to stop:
/// an agent still running may enroll a pod again after this returns.
pub async fn uninstall_node(args: &UninstallArgs) -> Result<(), UninstallError> {
    let mut failures = Vec::new();
    failures.extend(unchain(&args.cni_conf_dir));
    failures.extend(detach_links(&args.bpf_pin_dir.join("links")));
    failures.extend(restore_namespaces(&SavedSettings::new(&args.state_dir)).await);
    match fs::remove_dir_all(&args.bpf_pin_dir) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            failures.push(UninstallError::PinDir {
                path: args.bpf_pin_dir.clone(),
                source: error,
            });
        }
        _ => {}
    }
    if failures.is_empty() {
        info!("ambit is off this node; its pods talk directly");
        Ok(())
    } else {
        Err(UninstallError::Incomplete(Failures(failures)))
    }
}

/// Takes the plugin's kubeconfig (a service-account token) and then its entries out of
/// `conf_dir`, under the directory's lock: a watching `ambit install-cni` reads the
/// kubeconfig's absence as this uninstall and stops putting the entry back. The plugin's
/// binary stays in the CNI bin directory: the runtime runs `DEL` for pods set up while the
/// entry was there with the configuration it cached at `ADD`, which still names
/// `ambit-cni`; without the binary that `DEL` would fail and the sandbox never be torn
/// down. Without an entry, nothing else runs it.
fn unchain(conf_dir: &Path) -> Vec<UninstallError> {
    let _lock = match cni_conf::lock_dir(conf_dir) {
        Ok(lock) => lock,
        Err(CniConfError::Lock { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Vec::new();
        }
        Err(error) => return vec![error.into()],
    };
    let mut failures = Vec::new();
    let kubeconfig = conf_dir.join(cni_conf::KUBECONFIG_FILE);
    match fs::remove_file(&kubeconfig) {
        Ok(()) => info!(kubeconfig = %kubeconfig.display(), "removed the CNI plugin's kubeconfig"),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(source) => failures.push(UninstallError::Kubeconfig {
            path: kubeconfig,
            source,
        }),
    }
    match remove_cni_entries(conf_dir) {
        Ok(changed) => {
            for path in changed {
                info!(conflist = %path.display(), "removed the ambit-cni entry");
            }
        }
        Err(errors) => failures.extend(errors),
    }
    failures
}

/// Detaches every link pinned in `links_dir` and removes its pin. Detaching explicitly,
/// rather than only unpinning, also takes the program off its hook when some process
/// (an agent not yet stopped) still holds the link open.
fn detach_links(links_dir: &Path) -> Vec<UninstallError> {
    let entries = match fs::read_dir(links_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(source) => {
            return vec![UninstallError::Detach {
                path: links_dir.to_owned(),
                source,
            }];
        }
    };
    let mut failures = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let detached = crate::sys::bpf_obj_get(&path)
            .and_then(|link| crate::sys::bpf_link_detach(&link))
            .and_then(|()| fs::remove_file(&path));
        match detached {
            Ok(()) => info!(link = %path.display(), "detached"),
            Err(source) => failures.push(UninstallError::Detach { path, source }),
        }
    }
    failures
}

/// Restores every namespace with saved settings. A namespace that is gone, or whose path
/// now names another namespace, needs nothing: its record is dropped.
async fn restore_namespaces(saved: &SavedSettings) -> Vec<UninstallError> {
    let recorded = match saved.recorded() {
        Ok(recorded) => recorded,
        Err(error) => return vec![error.into()],
    };
    let mut failures = Vec::new();
    for record in recorded {
        let Some(path) = record.netns else {
            warn!(
                cookie = record.cookie,
                "saved settings without a namespace path (written by an older agent): \
                 that pod's sysctls and return-path rule stay; its record is kept"
            );
            continue;
        };
        if let Err(error) = restore_namespace(saved, record.cookie, &path).await {
            failures.push(error);
        }
    }
    failures
}

async fn restore_namespace(
    saved: &SavedSettings,
    cookie: u64,
    path: &Path,
) -> Result<(), UninstallError> {
    let netns = match PodNetns::enter(path) {
        Ok(netns) => netns,
        Err(NetnsError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            info!(netns = %path.display(), "namespace gone; dropping its saved settings");
            return Ok(saved.forget(cookie)?);
        }
        Err(error) => return Err(error.into()),
    };
    if netns.cookie().await? != cookie {
        info!(netns = %path.display(), "path now names another namespace; dropping the record");
        return Ok(saved.forget(cookie)?);
    }
    routing::remove(&netns, saved).await?;
    info!(netns = %path.display(), "restored routing and sysctls");
    Ok(())
}

/// Takes the `ambit-cni` entry out of every `*.conflist` in `dir` that has one, and
/// returns the files changed. Others are not touched; a missing `dir` is no error.
pub fn remove_cni_entries(dir: &Path) -> Result<Vec<PathBuf>, Vec<UninstallError>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(vec![
                CniConfError::Read {
                    path: dir.to_owned(),
                    source,
                }
                .into(),
            ]);
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    paths.sort();
    let mut changed = Vec::new();
    let mut failures = Vec::new();
    for path in paths {
        match remove_cni_entry(&path) {
            Ok(true) => changed.push(path),
            Ok(false) => {}
            Err(error) => failures.push(error),
        }
    }
    if failures.is_empty() {
        Ok(changed)
    } else {
        Err(failures)
    }
}

/// Rewrites one conflist without the `ambit-cni` entry; `false` if it had none. Every
/// other field and plugin keeps its value and the plugins their order.
fn remove_cni_entry(path: &Path) -> Result<bool, UninstallError> {
    let mut conflist = ConfFile::read(path)?;
    if !cni_conf::remove_entry(&mut conflist.json) {
        return Ok(false);
    }
    conflist.write_to(path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use serde_json::Value;

    use super::*;

    /// A primary network (bridge) with the portmap plugin, and ambit chained after them
    /// the way its installer inserts itself.
    const CHAINED: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "cbr0",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "ambit-cni", "agent_socket": "/var/run/ambit/cni.sock", "log_level": "info"}
  ]
}"#;

    #[test]
    fn the_ambit_entry_leaves_and_everything_else_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-bridge.conflist");
        fs::write(&path, CHAINED).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let other = dir.path().join("99-loopback.conf");
        fs::write(&other, r#"{"type": "ambit-cni"}"#).unwrap();

        assert_eq!(remove_cni_entries(dir.path()).unwrap(), vec![path.clone()]);

        let mut expected: Value = serde_json::from_str(CHAINED).unwrap();
        expected["plugins"].as_array_mut().unwrap().pop();
        let after: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(after, expected);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "the file keeps its mode");
        assert_eq!(
            fs::read_to_string(&other).unwrap(),
            r#"{"type": "ambit-cni"}"#,
            "only conflists are ambit's to edit"
        );

        // Idempotent: nothing left to remove, the file is not rewritten.
        let written = fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(
            remove_cni_entries(dir.path()).unwrap(),
            Vec::<PathBuf>::new()
        );
        assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), written);
    }

    #[test]
    fn a_broken_conflist_is_reported_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-broken.conflist");
        fs::write(&path, "{ not json").unwrap();
        let failures = remove_cni_entries(dir.path()).unwrap_err();
        assert_eq!(failures.len(), 1);
        assert!(failures[0].to_string().contains("10-broken.conflist"));
        assert_eq!(fs::read_to_string(&path).unwrap(), "{ not json");
    }

    #[test]
    fn no_conf_dir_is_nothing_to_do() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            remove_cni_entries(&dir.path().join("absent"))
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn uninstall_takes_out_the_entry_and_the_kubeconfig() {
        let dir = tempfile::tempdir().unwrap();
        let conf_dir = dir.path().join("net.d");
        fs::create_dir(&conf_dir).unwrap();
        let conflist = conf_dir.join("10-bridge.conflist");
        fs::write(&conflist, CHAINED).unwrap();
        let kubeconfig = conf_dir.join(cni_conf::KUBECONFIG_FILE);
        fs::write(&kubeconfig, "{}").unwrap();
        let args = UninstallArgs {
            // Neither exists: a node whose agent never pinned anything.
            bpf_pin_dir: dir.path().join("pins"),
            state_dir: dir.path().join("state"),
            cni_conf_dir: conf_dir.clone(),
        };

        uninstall_node(&args).await.unwrap();

        assert!(!kubeconfig.exists(), "the plugin's token is gone");
        let after: Value = serde_json::from_slice(&fs::read(&conflist).unwrap()).unwrap();
        assert!(
            !after["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .any(cni_conf::is_ambit),
            "{after:#}"
        );
        // Idempotent.
        uninstall_node(&args).await.unwrap();
    }
}
