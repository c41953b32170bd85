//! The sysctl values a pod's network namespace had before `routing` changed them, kept
//! under the agent's state directory so that an agent restarted in between still restores
//! them when the pod leaves the mesh. This module owns the files, not the sysctls.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::state_file;

/// Identifies the running kernel: a new one at every boot.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Sysctl values by name (`net.ipv4.fwmark_reflect`).
pub type Sysctls = BTreeMap<String, i32>;

#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error("cannot read saved pod settings {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write saved pod settings {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "saved pod settings {} are unreadable ({source}); restore the pod's sysctls by hand and remove the file",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot read the boot id from {BOOT_ID}: {source}")]
    BootId { source: io::Error },
}

/// Where the original settings of pod network namespaces are kept:
/// `<state-dir>/netns/<cookie>.json`, one file per namespace, named by its cookie.
#[derive(Clone, Debug)]
pub struct SavedSettings {
    dir: PathBuf,
}

/// One namespace's file. A namespace cookie is unique only within one boot, so the record
/// names its boot: one from an earlier boot belongs to a namespace long gone. It names the
/// namespace's path too, so that `ambit uninstall-node`, which has no configuration to
/// find pods in, can enter the namespace and restore it.
#[derive(Debug, Deserialize, Serialize)]
struct Record {
    boot_id: String,
    /// Absent in records written before it was kept.
    #[serde(default)]
    netns: Option<PathBuf>,
    sysctls: Sysctls,
}

/// A namespace with saved settings of this boot, as [`SavedSettings::recorded`] lists it.
#[derive(Debug, PartialEq, Eq)]
pub struct Recorded {
    pub cookie: u64,
    /// `None` for a record written before the path was kept.
    pub netns: Option<PathBuf>,
}

impl SavedSettings {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("netns"),
        }
    }

    /// The values saved for namespace `cookie` in this boot, if any.
    pub fn load(&self, cookie: u64) -> Result<Option<Sysctls>, SavedError> {
        Ok(self.record(cookie)?.map(|record| record.sysctls))
    }

    fn record(&self, cookie: u64) -> Result<Option<Record>, SavedError> {
        let path = self.path(cookie);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SavedError::Read { path, source }),
        };
        let record: Record = serde_json::from_slice(&bytes)
            .map_err(|source| SavedError::Corrupt { path, source })?;
        Ok((record.boot_id == boot_id()?).then_some(record))
    }

    /// Every namespace with settings saved in this boot; records of earlier boots are
    /// dropped on the way, their namespaces are gone.
    pub fn recorded(&self) -> Result<Vec<Recorded>, SavedError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(SavedError::Read {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut recorded = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| SavedError::Read {
                path: self.dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            let Some(cookie) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|c| c.parse::<u64>().ok())
            else {
                continue;
            };
            match self.record(cookie)? {
                Some(record) => recorded.push(Recorded {
                    cookie,
                    netns: record.netns,
                }),
                None => self.forget(cookie)?,
            }
        }
        recorded.sort_by_key(|r| r.cookie);
        Ok(recorded)
    }

    /// Saves `sysctls` for namespace `cookie`, found at `netns`, replacing whatever was
    /// saved.
    pub fn save(&self, cookie: u64, netns: &Path, sysctls: &Sysctls) -> Result<(), SavedError> {
        let path = self.path(cookie);
        let record = Record {
            boot_id: boot_id()?,
            netns: Some(netns.to_owned()),
            sysctls: sysctls.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&record).expect("a map of integers serializes");
        let write_error = |source| SavedError::Write {
            path: path.clone(),
            source,
        };
        state_file::private_dir(&self.dir).map_err(write_error)?;
        state_file::write(&path, &bytes, 0o600).map_err(write_error)
    }

    /// Drops what was saved for namespace `cookie`; nothing saved is no error.
    pub fn forget(&self, cookie: u64) -> Result<(), SavedError> {
        let path = self.path(cookie);
        match fs::remove_file(&path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => Err(SavedError::Write {
                path,
                source: error,
            }),
            _ => Ok(()),
        }
    }

    fn path(&self, cookie: u64) -> PathBuf {
        self.dir.join(format!("{cookie}.json"))
    }
}

fn boot_id() -> Result<String, SavedError> {
    fs::read_to_string(BOOT_ID)
        .map(|id| id.trim().to_owned())
        .map_err(|source| SavedError::BootId { source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctls(values: &[(&str, i32)]) -> Sysctls {
        values.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn saved_values_come_back_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedSettings::new(dir.path());
        assert_eq!(saved.load(7).unwrap(), None);
        let original = sysctls(&[("net.ipv4.fwmark_reflect", 0)]);
        saved
            .save(7, Path::new("/var/run/netns/a"), &original)
            .unwrap();
        assert_eq!(saved.load(7).unwrap(), Some(original));
        assert_eq!(saved.load(8).unwrap(), None);
        saved.forget(7).unwrap();
        assert_eq!(saved.load(7).unwrap(), None);
        saved.forget(7).unwrap();
    }

    #[test]
    fn a_clone_reads_what_the_original_saved() {
        // An agent restarted with the same state directory.
        let dir = tempfile::tempdir().unwrap();
        SavedSettings::new(dir.path())
            .save(
                7,
                Path::new("/var/run/netns/a"),
                &sysctls(&[("net.ipv4.tcp_fwmark_accept", 0)]),
            )
            .unwrap();
        let restarted = SavedSettings::new(dir.path());
        assert!(restarted.load(7).unwrap().is_some());
    }

    #[test]
    fn record_of_an_earlier_boot_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedSettings::new(dir.path());
        saved
            .save(
                7,
                Path::new("/var/run/netns/a"),
                &sysctls(&[("net.ipv4.fwmark_reflect", 0)]),
            )
            .unwrap();
        let path = dir.path().join("netns/7.json");
        let text = fs::read_to_string(&path).unwrap();
        let stale = text.replace(&boot_id().unwrap(), "an-earlier-boot");
        assert_ne!(text, stale);
        fs::write(&path, stale).unwrap();
        assert_eq!(saved.load(7).unwrap(), None);
    }

    #[test]
    fn records_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedSettings::new(dir.path());
        saved
            .save(7, Path::new("/var/run/netns/a"), &Sysctls::new())
            .unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("netns")), 0o700);
        assert_eq!(mode(&dir.path().join("netns/7.json")), 0o600);
    }

    #[test]
    fn records_of_this_boot_are_listed_with_their_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedSettings::new(dir.path());
        assert_eq!(saved.recorded().unwrap(), Vec::new());
        saved
            .save(9, Path::new("/var/run/netns/b"), &Sysctls::new())
            .unwrap();
        saved
            .save(7, Path::new("/var/run/netns/a"), &Sysctls::new())
            .unwrap();
        // Written by an agent that did not keep the path yet.
        let old = format!(r#"{{"boot_id":"{}","sysctls":{{}}}}"#, boot_id().unwrap());
        fs::write(dir.path().join("netns/8.json"), old).unwrap();
        fs::write(
            dir.path().join("netns/6.json"),
            r#"{"boot_id":"earlier","sysctls":{}}"#,
        )
        .unwrap();
        let recorded = saved.recorded().unwrap();
        let expected = [
            (7, Some("/var/run/netns/a")),
            (8, None),
            (9, Some("/var/run/netns/b")),
        ]
        .map(|(cookie, netns)| Recorded {
            cookie,
            netns: netns.map(PathBuf::from),
        });
        assert_eq!(recorded, expected);
        assert!(
            !dir.path().join("netns/6.json").exists(),
            "a record of an earlier boot is dropped"
        );
    }

    #[test]
    fn corrupt_record_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let saved = SavedSettings::new(dir.path());
        fs::create_dir(dir.path().join("netns")).unwrap();
        fs::write(dir.path().join("netns/7.json"), "{").unwrap();
        let message = saved.load(7).unwrap_err().to_string();
        assert!(message.contains("netns/7.json"), "{message}");
    }
}
