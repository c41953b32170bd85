//! The `files` source: a directory of Kubernetes-style YAML (any number of files, each
//! with any number of documents), re-read on every change.
//!
//! A file that fails to parse is reported with its path and the reason, and the objects it
//! held before stay in force until it parses again: a bad edit never drops a pod or a
//! policy. Files whose bytes did not change are not parsed again.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{Rejected, Snapshot};
use crate::policy::PolicyError;

/// How often the directory is re-read even without a change notification (a safety net
/// for file systems where inotify misses events).
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Notifications arriving within this window are handled by one reload.
const DEBOUNCE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: cannot read: {source}", file.display())]
    Read { file: PathBuf, source: io::Error },
    #[error("{}: invalid YAML: {source}", file.display())]
    Yaml {
        file: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{}: document {document}: {reason}", file.display())]
    Header {
        file: PathBuf,
        document: usize,
        reason: &'static str,
    },
    #[error("{}: document {document}: {source}", file.display())]
    Rejected {
        file: PathBuf,
        document: usize,
        source: Rejected,
    },
    /// An Istio 1.1 policy that parsed but names something the configuration lacks;
    /// it depends on other files, so it is left out while the rest applies.
    #[error("{source} (policy left out until this is fixed)")]
    Conversion { source: PolicyError },
    #[error("cannot list {}: {source}", dir.display())]
    ListDir { dir: PathBuf, source: io::Error },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

/// The objects of one file's `text`; `file` names it in errors. When the file defines an
/// object twice, the later definition wins.
pub fn parse_file(file: &Path, text: &str) -> Result<Snapshot, FileError> {
    let mut objects = Snapshot::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document_no = index + 1;
        let value = serde_yaml::Value::deserialize(document).map_err(|source| FileError::Yaml {
            file: file.to_owned(),
            source,
        })?;
        if value.is_null() {
            continue;
        }
        let header_error = |reason| FileError::Header {
            file: file.to_owned(),
            document: document_no,
            reason,
        };
        let header: Header = serde_yaml::from_value(value.clone())
            .map_err(|_| header_error("not an object with apiVersion and kind"))?;
        let kind = header.kind.ok_or_else(|| header_error("missing kind"))?;
        let api_version = header
            .api_version
            .ok_or_else(|| header_error("missing apiVersion"))?;
        match super::parse_object(&api_version, &kind, value) {
            Ok(Some(object)) => objects.insert(object),
            Ok(None) => {
                debug!(file = %file.display(), %kind, "ignoring object of a kind ambit does not use")
            }
            Err(source) => {
                return Err(FileError::Rejected {
                    file: file.to_owned(),
                    document: document_no,
                    source,
                });
            }
        }
    }
    Ok(objects)
}

/// True for the files the source reads: `*.yaml`, `*.yml` and `*.json`, not hidden
/// (editors write hidden temporary files next to the real ones).
fn is_config_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(ext, Some("yaml" | "yml" | "json")) && path.is_file()
}

/// The last good contents of a directory, file by file.
pub struct DirState {
    /// Where a `MeshPolicy` goes when converted.
    root_namespace: String,
    /// Raw bytes and parsed objects per file; the objects are from the last time the file
    /// parsed, which may be older than the bytes.
    files: BTreeMap<PathBuf, (Vec<u8>, Snapshot)>,
    /// The union of `files` with Istio 1.1 policies converted, as of the last reload.
    assembled: Snapshot,
    /// The conversion errors of the last reload. A rescan runs every second, so these
    /// are reported again only when they change.
    conversion_errors: Vec<String>,
}

/// The snapshot of one YAML text, for unit tests of what is built from a configuration.
#[cfg(test)]
pub(crate) fn snapshot_of(yaml: &str) -> Snapshot {
    let mut snapshot = parse_file(Path::new("test.yaml"), yaml).expect("test configuration parses");
    let errors = snapshot.convert_legacy(crate::policy::engine::DEFAULT_ROOT_NAMESPACE);
    assert!(errors.is_empty(), "test configuration converts: {errors:?}");
    snapshot
}

impl DirState {
    /// An empty state; `root_namespace` receives converted `MeshPolicy` objects.
    pub fn new(root_namespace: &str) -> Self {
        Self {
            root_namespace: root_namespace.to_owned(),
            files: BTreeMap::new(),
            assembled: Snapshot::default(),
            conversion_errors: Vec::new(),
        }
    }

    /// Reads `dir` once and fails on the first bad file or policy: for one-shot commands
    /// (`explain`) where there is no previous state to fall back on.
    pub fn load_strict(dir: &Path, root_namespace: &str) -> Result<Snapshot, FileError> {
        let mut state = Self::new(root_namespace);
        match state.reload(dir).into_iter().next() {
            Some(error) => Err(error),
            None => Ok(state.snapshot()),
        }
    }

    /// Re-reads `dir`. Files that disappeared are forgotten; files that fail keep their
    /// previous objects. Returns the errors met, one per bad file.
    pub fn reload(&mut self, dir: &Path) -> Vec<FileError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(source) => {
                return vec![FileError::ListDir {
                    dir: dir.to_owned(),
                    source,
                }];
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_config_file(p))
            .collect();
        paths.sort();
        self.files.retain(|path, _| paths.contains(path));

        let mut errors = Vec::new();
        for path in paths {
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(source) => {
                    errors.push(FileError::Read { file: path, source });
                    continue;
                }
            };
            if self.files.get(&path).is_some_and(|(old, _)| *old == bytes) {
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            match parse_file(&path, &text) {
                Ok(objects) => {
                    self.files.insert(path, (bytes, objects));
                }
                Err(error) => {
                    // Remember the bad bytes so the error is reported once per edit, but
                    // keep the objects of the last good version.
                    let objects = self.files.remove(&path).map(|(_, o)| o).unwrap_or_default();
                    self.files.insert(path, (bytes, objects));
                    errors.push(error);
                }
            }
        }
        let mut assembled = self.union();
        let conversion = assembled.convert_legacy(&self.root_namespace);
        self.assembled = assembled;
        let messages: Vec<String> = conversion.iter().map(ToString::to_string).collect();
        if messages != self.conversion_errors {
            self.conversion_errors = messages;
            errors.extend(
                conversion
                    .into_iter()
                    .map(|source| FileError::Conversion { source }),
            );
        }
        errors
    }

    /// The configuration as of the last reload: the union of all files, Istio 1.1
    /// policies converted. When two files define the same object, the one in the file
    /// that sorts last wins.
    pub fn snapshot(&self) -> Snapshot {
        self.assembled.clone()
    }

    fn union(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (_, objects) in self.files.values() {
            let objects = objects.clone();
            snapshot.namespaces.extend(objects.namespaces);
            snapshot.pods.extend(objects.pods);
            snapshot.services.extend(objects.services);
            snapshot.policies.extend(objects.policies);
            snapshot.legacy.extend(objects.legacy);
        }
        snapshot
    }
}

/// Follows `dir` and publishes a new [`Snapshot`] on `tx` whenever the objects change;
/// `root_namespace` receives converted `MeshPolicy` objects, `rejected` counts the files
/// and policies rejected. Runs until `tx` has no receivers.
pub async fn watch_dir(
    dir: PathBuf,
    root_namespace: String,
    tx: watch::Sender<Snapshot>,
    rejected: Counter,
) {
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    // Keep the watcher alive for the whole loop; without it we fall back to rescanning.
    let _watcher = match start_watcher(&dir, events_tx) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            warn!(dir = %dir.display(), %error, "cannot watch config dir; rescanning every second");
            None
        }
    };
    let mut state = DirState::new(&root_namespace);
    let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
    loop {
        tokio::select! {
            _ = rescan.tick() => {}
            Some(()) = events_rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while events_rx.try_recv().is_ok() {}
            }
        }
        for error in state.reload(&dir) {
            warn!("config rejected, keeping the previous version: {error}");
            rejected.inc();
        }
        let snapshot = state.snapshot();
        let changed = tx.send_if_modified(|current| {
            if *current == snapshot {
                return false;
            }
            *current = snapshot;
            true
        });
        if changed {
            info!(dir = %dir.display(), "config changed");
        }
        if tx.is_closed() {
            return;
        }
    }
}

fn start_watcher(
    dir: &Path,
    events: mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = events.send(());
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::engine::DEFAULT_ROOT_NAMESPACE;

    const GOOD: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: foo, labels: {ambit.io/mesh: enabled}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: foo}\nstatus: {podIP: 10.1.0.2}\n";

    #[test]
    fn multi_document_file_yields_every_object() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        let snapshot = DirState::load_strict(dir.path(), DEFAULT_ROOT_NAMESPACE).unwrap();
        assert!(snapshot.namespaces.contains_key("foo"));
        assert!(snapshot.is_enrolled(&snapshot.pods["foo/a"]));
    }

    #[test]
    fn malformed_file_is_reported_and_previous_objects_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let mut state = DirState::new(DEFAULT_ROOT_NAMESPACE);
        assert!(state.reload(dir.path()).is_empty());

        std::fs::write(&file, "kind: Pod\nmetadata: [unclosed").unwrap();
        let errors = state.reload(dir.path());
        assert_eq!(errors.len(), 1);
        let message = errors[0].to_string();
        assert!(
            message.contains("a.yaml") && message.contains("invalid YAML"),
            "{message}"
        );
        assert!(state.snapshot().pods.contains_key("foo/a"));
    }

    #[test]
    fn document_without_kind_names_file_and_document() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            "---\napiVersion: v1\nmetadata: {name: x}\n",
        )
        .unwrap();
        let message = DirState::load_strict(dir.path(), DEFAULT_ROOT_NAMESPACE)
            .unwrap_err()
            .to_string();
        assert!(
            message.ends_with("b.yaml: document 1: missing kind"),
            "{message}"
        );
    }

    #[test]
    fn legacy_policy_naming_no_service_is_left_out_and_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let policy = "apiVersion: authentication.istio.io/v1alpha1\nkind: Policy\nmetadata: {name: p, namespace: foo}\nspec: {targets: [{name: web}]}\n";
        std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
        std::fs::write(dir.path().join("b.yaml"), policy).unwrap();
        let mut state = DirState::new(DEFAULT_ROOT_NAMESPACE);
        let errors = state.reload(dir.path());
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "Policy foo/p: spec.targets[0].name: names service foo/web, which does not exist \
             (policy left out until this is fixed)"
        );
        assert!(state.snapshot().pods.contains_key("foo/a"));
        assert!(state.reload(dir.path()).is_empty(), "reported once");

        let service = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: foo}\nspec: {selector: {app: web}}\n";
        std::fs::write(dir.path().join("a.yaml"), format!("{GOOD}{service}")).unwrap();
        assert!(state.reload(dir.path()).is_empty());
        assert_eq!(state.snapshot().policies.len(), 1);
    }

    #[test]
    fn removed_file_drops_its_objects() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, GOOD).unwrap();
        let mut state = DirState::new(DEFAULT_ROOT_NAMESPACE);
        state.reload(dir.path());
        std::fs::remove_file(&file).unwrap();
        state.reload(dir.path());
        assert!(state.snapshot().pods.is_empty());
    }
}
