//! What ambit keeps in the host's CNI network configuration directory: the `ambit-cni`
//! entry chained into a conflist and the kubeconfig beside it, as `ambit install-cni` puts
//! them there and `ambit uninstall-node` takes them out. Which file is the primary network,
//! and what the entry holds, are the installer's business.
//!
//! The two never edit the directory at the same time ([`lock_dir`]), and the kubeconfig
//! tells them apart: `uninstall-node` removes it before the entries, and a watching
//! installer that finds it gone takes that for the uninstall and stops repairing. On a
//! deletion the installer (a native sidecar) outlives the agent, whose pre-stop hook
//! uninstalls, so without this it would put the entry back on its next check.

use std::{
    fs::File,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// The plugin's `type` in a conflist's `plugins`, which is also its file name in the CNI
/// bin directory (runtimes find a plugin's binary by its type).
pub const PLUGIN_TYPE: &str = "ambit-cni";

/// The kubeconfig the plugin reads, in the configuration directory.
pub const KUBECONFIG_FILE: &str = "ambit-cni.kubeconfig";

#[derive(Debug, thiserror::Error)]
pub enum CniConfError {
    #[error("cannot read CNI configuration {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("CNI configuration {} is not valid JSON, left as it is: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write CNI configuration {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot lock the CNI configuration directory {}: {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
}

/// Takes an exclusive lock (flock(2)) on the configuration directory itself, which the
/// installer's sidecar and the agent's pre-stop hook see as the same host directory; it
/// is released when the returned file is dropped.
pub fn lock_dir(dir: &Path) -> Result<File, CniConfError> {
    let lock_error = |source| CniConfError::Lock {
        path: dir.to_owned(),
        source,
    };
    let dir_file = File::open(dir).map_err(lock_error)?;
    dir_file.lock().map_err(lock_error)?;
    Ok(dir_file)
}

/// A network configuration file as read: its JSON and its mode, which a rewrite keeps.
#[derive(Debug)]
pub struct ConfFile {
    pub path: PathBuf,
    pub json: Value,
    pub mode: u32,
}

impl ConfFile {
    pub fn read(path: &Path) -> Result<Self, CniConfError> {
        let read_error = |source| CniConfError::Read {
            path: path.to_owned(),
            source,
        };
        let text = std::fs::read(path).map_err(read_error)?;
        let json = serde_json::from_slice(&text).map_err(|source| CniConfError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let mode = std::fs::metadata(path)
            .map_err(read_error)?
            .permissions()
            .mode()
            & 0o7777;
        Ok(Self {
            path: path.to_owned(),
            json,
            mode,
        })
    }

    /// Writes the JSON to `path` (its own path, or a new name), whole or not at all: a
    /// runtime reading the directory meanwhile sees the old file or the new one. Object
    /// keys come out sorted, which CNI runtimes ignore.
    pub fn write_to(&self, path: &Path) -> Result<(), CniConfError> {
        let mut bytes = serde_json::to_vec_pretty(&self.json).expect("a JSON value serializes");
        bytes.push(b'\n');
        crate::state_file::write(path, &bytes, self.mode).map_err(|source| CniConfError::Write {
            path: path.to_owned(),
            source,
        })
    }
}

/// Whether a conflist's plugin is ambit's.
pub fn is_ambit(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// Takes every `ambit-cni` entry out of a conflist's `plugins`; whether there was one.
pub fn remove_entry(conflist: &mut Value) -> bool {
    let Some(plugins) = conflist.get_mut("plugins").and_then(Value::as_array_mut) else {
        return false;
    };
    let before = plugins.len();
    plugins.retain(|plugin| !is_ambit(plugin));
    plugins.len() != before
}
