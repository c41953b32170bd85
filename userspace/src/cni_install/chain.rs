//! The primary network's configuration, found as the container runtime finds it, and the
//! `ambit-cni` entry at the end of its plugins.

use std::{
    ffi::OsString,
    fmt, fs, io,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};

use super::InstallError;
use crate::cni_conf::{self, ConfFile};

/// What became of the primary network's configuration in one pass.
#[derive(Debug, PartialEq, Eq)]
pub enum Chain {
    /// The entry was there as wanted; nothing was written.
    Unchanged(PathBuf),
    /// The entry was appended as the last plugin.
    Appended(PathBuf),
    /// An existing entry got our values (or lost a duplicate) in place.
    Updated(PathBuf),
    /// A single-plugin configuration became a conflist of it and the entry.
    Converted { from: PathBuf, to: PathBuf },
    /// The directory has no network configuration (yet).
    NoNetwork,
}

impl Chain {
    pub fn changed(&self) -> bool {
        matches!(
            self,
            Self::Appended(_) | Self::Updated(_) | Self::Converted { .. }
        )
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unchanged(path) => write!(f, "{}", path.display()),
            Self::Appended(path) => write!(f, "entry appended to {}", path.display()),
            Self::Updated(path) => write!(f, "entry updated in {}", path.display()),
            Self::Converted { from, to } => write!(
                f,
                "{} converted to {} with the entry",
                from.display(),
                to.display()
            ),
            Self::NoNetwork => f.write_str("no network configuration"),
        }
    }
}

/// Puts `entry` into the primary network's configuration in `dir` unless it is there as
/// it is. A conflist is rewritten in place; a single-plugin `.conf` or `.json` becomes a
/// `.conflist` of the same name (written before the old file goes, so the runtime always
/// finds one of them), as istio-cni does.
pub fn install(dir: &Path, entry: &Map<String, Value>) -> Result<Chain, InstallError> {
    let Some(path) = primary(dir)? else {
        return Ok(Chain::NoNetwork);
    };
    let mut conf = ConfFile::read(&path)?;
    let not_a_network = |reason| InstallError::NotANetwork {
        path: path.clone(),
        reason,
    };
    if path.extension().is_some_and(|ext| ext == "conflist") {
        let plugins = conf
            .json
            .get_mut("plugins")
            .and_then(Value::as_array_mut)
            .filter(|plugins| !plugins.is_empty())
            .ok_or_else(|| not_a_network("no `plugins`"))?;
        let chain = match set_entry(plugins, entry) {
            Edit::None => return Ok(Chain::Unchanged(path)),
            Edit::Appended => Chain::Appended(path),
            Edit::Updated => Chain::Updated(path),
        };
        conf.write_to(&conf.path)?;
        return Ok(chain);
    }
    // As libcni's `ConfListFromConf`: the network's name and version above, the whole
    // configuration as the one plugin.
    let plugin = conf
        .json
        .as_object()
        .filter(|plugin| {
            plugin
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| !t.is_empty())
        })
        .ok_or_else(|| not_a_network("no plugin `type`"))?;
    let mut conflist = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = plugin.get(key) {
            conflist.insert(key.to_owned(), value.clone());
        }
    }
    let mut plugins = vec![conf.json.clone()];
    set_entry(&mut plugins, entry);
    conflist.insert("plugins".to_owned(), Value::Array(plugins));
    conf.json = Value::Object(conflist);
    let to = path.with_extension("conflist");
    conf.write_to(&to)?;
    fs::remove_file(&path).map_err(|source| InstallError::RemoveConverted {
        from: path.clone(),
        to: to.clone(),
        source,
    })?;
    Ok(Chain::Converted { from: path, to })
}

/// The configuration the runtime uses: the lexically first `*.conflist`, `*.conf` or
/// `*.json` in `dir` (libcni's `ConfFiles`, sorted, which containerd and CRI-O load).
/// `None` while there is none, or no `dir`.
fn primary(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let list_error = |source| InstallError::ConfDir {
        path: dir.to_owned(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(list_error(source)),
    };
    let mut names: Vec<OsString> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(list_error)?;
        let path = entry.path();
        let configuration = path
            .extension()
            .is_some_and(|ext| ext == "conflist" || ext == "conf" || ext == "json");
        // libcni skips directories only: a symbolic link is a configuration too.
        if configuration && !entry.file_type().map_err(list_error)?.is_dir() {
            names.push(entry.file_name());
        }
    }
    Ok(names.into_iter().min().map(|name| dir.join(name)))
}

/// What [`set_entry`] did.
enum Edit {
    None,
    Appended,
    Updated,
}

/// Appends `entry`, or gives the first `ambit-cni` entry `entry`'s values (keys it does
/// not set, an operator's `timeout` say, stay) and drops any later one, which would run
/// the plugin twice per pod.
fn set_entry(plugins: &mut Vec<Value>, entry: &Map<String, Value>) -> Edit {
    let Some(first) = plugins.iter().position(cni_conf::is_ambit) else {
        plugins.push(Value::Object(entry.clone()));
        return Edit::Appended;
    };
    let before = plugins.len();
    let mut index = 0;
    plugins.retain(|plugin| {
        index += 1;
        index <= first + 1 || !cni_conf::is_ambit(plugin)
    });
    let mut changed = plugins.len() != before;
    let existing = plugins[first]
        .as_object_mut()
        .expect("an entry with a `type` is an object");
    for (key, value) in entry {
        if existing.get(key) != Some(value) {
            existing.insert(key.clone(), value.clone());
            changed = true;
        }
    }
    if changed { Edit::Updated } else { Edit::None }
}
