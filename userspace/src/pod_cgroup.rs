//! Pods that were running before ambit (and its CNI plugin) was installed: their network
//! namespace, found through a process of theirs. The kubelet runs every container of a
//! pod below one pod-level cgroup named after the pod's UID, so a process whose cgroup path
//! names that UID belongs to the pod, and its network namespace is the pod's.
//! [`Adopter::overlay`] fills it into the desired state, after `cni_server::overlay` (a
//! sandbox the plugin reported wins), for enrolled pods of this node that have none;
//! enrollment never learns where a namespace came from.
//!
//! Trust: only the first pod-level segment of a cgroup path counts ([`pod_uid`]), since a
//! container allowed to manage its own cgroup can create nested ones named after any pod,
//! but only below its own. A namespace the runtime pinned is preferred to a process's, the
//! agent's own (the node's) is never taken, and the namespace must hold the pod's IP
//! ([`holds_ip`]).
//!
//! This module does not read the configuration, enroll pods, or touch cgroups; it reads
//! `/proc` and the runtimes' pin directories ([`HostPaths`], a parameter so that tests
//! build a fake `/proc`).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::{
    discovery::Snapshot,
    netns::{NetnsError, PodNetns},
};

#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("no metadata.uid to find a process of the pod by")]
    NoUid,
    #[error("cannot list the processes in {}: {source}", proc_root.display())]
    ListProcesses {
        proc_root: PathBuf,
        source: io::Error,
    },
    #[error("cannot read the agent's own network namespace {}: {source}", path.display())]
    OwnNetns { path: PathBuf, source: io::Error },
    #[error("no process of pod UID {uid} runs in a network namespace of its own on this node")]
    NoProcess { uid: String },
    #[error("cannot read the network namespace of process {pid} of pod UID {uid}: {source}")]
    ReadNetns {
        uid: String,
        pid: u32,
        source: io::Error,
    },
    #[error(
        "the processes of pod UID {uid} are in {namespaces} network namespaces, {pinned} of them \
         pinned by the runtime: none is known to be the pod's"
    )]
    Ambiguous {
        uid: String,
        namespaces: usize,
        pinned: usize,
    },
    #[error(
        "the network namespace of process {pid} ({}) does not hold the pod's IP {ip}",
        netns.display()
    )]
    WrongIp {
        pid: u32,
        netns: PathBuf,
        ip: IpAddr,
    },
    #[error("cannot check that {} holds {ip}: {source}", netns.display())]
    CheckIp {
        netns: PathBuf,
        ip: IpAddr,
        source: io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("the scan of the processes stopped: {0}")]
    Scan(#[from] tokio::task::JoinError),
}

/// Where the host's processes and pinned network namespaces are.
#[derive(Clone, Debug)]
pub struct HostPaths {
    /// The host's `/proc`: the agent runs with the host's PIDs (`hostPID`).
    pub proc_root: PathBuf,
    /// Where container runtimes bind-mount pod sandboxes' network namespaces (containerd
    /// `cni-<id>`, CRI-O `<id>`).
    pub netns_dirs: Vec<PathBuf>,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            proc_root: "/proc".into(),
            netns_dirs: vec!["/var/run/netns".into(), "/run/netns".into()],
        }
    }
}

/// A network namespace, by the device and inode its nsfs file shows through any path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct NetnsId {
    dev: u64,
    ino: u64,
}

impl NetnsId {
    fn of(path: &Path) -> io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// A pod's network namespace, as found through one of its processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The lowest PID in the namespace (the sandbox's, usually: it started first).
    pub pid: u32,
    /// The runtime's pin of the namespace; else `/proc/<pid>/ns/net`, which names it only
    /// while that process lives (the next pass then finds the pod again).
    pub netns: PathBuf,
    id: NetnsId,
}

/// What a pod was adopted with; reused while nothing it depends on changed.
struct Adopted {
    uid: String,
    ip: Option<IpAddr>,
    found: Found,
}

impl Adopted {
    /// True when the pod is still the one adopted and its path still names the namespace
    /// found (a process that exited, a PID reused in another namespace, say otherwise).
    fn holds_for(&self, uid: &str, ip: Option<IpAddr>) -> bool {
        self.uid == uid
            && self.ip == ip
            && NetnsId::of(&self.found.netns).is_ok_and(|id| id == self.found.id)
    }
}

/// Fills in the network namespace of pods that predate the CNI plugin; see the module
/// documentation.
pub struct Adopter {
    paths: HostPaths,
    node_name: String,
    /// By pod key. A pod whose namespace still holds is not looked for again, so `/proc`
    /// is scanned only in passes where some pod has no namespace yet (once per pass).
    adopted: BTreeMap<String, Adopted>,
    /// The refusal last logged per pod: failed pods are retried every second, and each
    /// refusal is logged once, when it changes.
    refused: BTreeMap<String, String>,
}

impl Adopter {
    pub fn new(paths: HostPaths, node_name: &str) -> Self {
        Self {
            paths,
            node_name: node_name.to_owned(),
            adopted: BTreeMap::new(),
            refused: BTreeMap::new(),
        }
    }

    /// Sets the network namespace of each enrolled pod of this node that has none, or
    /// `netns_missing` to why none was found.
    pub async fn overlay(&mut self, snapshot: &mut Snapshot) {
        let orphans: BTreeSet<String> = snapshot
            .pods
            .iter()
            .filter(|(_, pod)| {
                pod.netns.is_none() && pod.runs_on(&self.node_name) && snapshot.is_enrolled(pod)
            })
            .map(|(key, _)| key.clone())
            .collect();
        self.adopted.retain(|key, _| orphans.contains(key));
        self.refused.retain(|key, _| orphans.contains(key));
        // Per pod: the namespace, or why there is none.
        let mut outcomes: BTreeMap<String, Result<Found, String>> = BTreeMap::new();
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        for key in &orphans {
            let pod = &snapshot.pods[key];
            match &pod.uid {
                None => {
                    outcomes.insert(key.clone(), Err(AdoptError::NoUid.to_string()));
                }
                Some(uid) => match self.adopted.get(key) {
                    Some(adopted) if adopted.holds_for(uid, pod.ip()) => {
                        outcomes.insert(key.clone(), Ok(adopted.found.clone()));
                    }
                    _ => {
                        wanted.insert(uid.clone());
                    }
                },
            }
        }
        if !wanted.is_empty() {
            // Thousands of small reads: off the runtime's workers.
            let paths = self.paths.clone();
            let uids = wanted.clone();
            let mut located = tokio::task::spawn_blocking(move || paths.locate(&uids))
                .await
                .unwrap_or_else(|error| Err(error.into()));
            for key in &orphans {
                let pod = &snapshot.pods[key];
                let Some(uid) = pod.uid.as_ref().filter(|uid| wanted.contains(*uid)) else {
                    continue;
                };
                let outcome = match &mut located {
                    Err(error) => Err(error.to_string()),
                    Ok(by_uid) => match by_uid.remove(uid) {
                        Some(Ok(found)) => self.adopt(key, uid, pod.ip(), found).await,
                        Some(Err(error)) => Err(error.to_string()),
                        None => Err(AdoptError::NoProcess { uid: uid.clone() }.to_string()),
                    },
                };
                outcomes.insert(key.clone(), outcome);
            }
        }
        for (key, outcome) in outcomes {
            let pod = snapshot
                .pods
                .get_mut(&key)
                .expect("orphans are the snapshot's pods");
            match outcome {
                Ok(found) => {
                    self.refused.remove(&key);
                    pod.netns = Some(found.netns);
                }
                Err(reason) => {
                    if self.refused.get(&key) != Some(&reason) {
                        warn!(pod = %key, %reason, "cannot adopt the pod through its processes");
                    }
                    pod.netns_missing = Some(reason.clone());
                    self.refused.insert(key, reason);
                }
            }
        }
    }

    /// Checks `found` against the pod's IP and remembers it.
    async fn adopt(
        &mut self,
        key: &str,
        uid: &str,
        ip: Option<IpAddr>,
        found: Found,
    ) -> Result<Found, String> {
        if let Some(ip) = ip {
            holds_ip(&found, ip).await.map_err(|e| e.to_string())?;
        }
        info!(
            pod = %key,
            pid = found.pid,
            netns = %found.netns.display(),
            "adopted the pod through its process"
        );
        self.adopted.insert(
            key.to_owned(),
            Adopted {
                uid: uid.to_owned(),
                ip,
                found: found.clone(),
            },
        );
        Ok(found)
    }
}

impl HostPaths {
    /// One pass over every process: where the processes of each pod UID in `uids` are.
    /// A UID with no process in a namespace of its own is absent from the answer.
    fn locate(
        &self,
        uids: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, Result<Found, AdoptError>>, AdoptError> {
        let own_path = self.proc_root.join("self/ns/net");
        // A pod's process in the node's namespace (CRI-O's conmon may sit in the pod's
        // cgroup) does not tell the pod's namespace, and enrolling the node's would
        // capture the node.
        let own = NetnsId::of(&own_path).map_err(|source| AdoptError::OwnNetns {
            path: own_path,
            source,
        })?;
        let entries =
            std::fs::read_dir(&self.proc_root).map_err(|source| AdoptError::ListProcesses {
                proc_root: self.proc_root.clone(),
                source,
            })?;
        // Per UID: each namespace its processes are in, with the lowest PID there.
        let mut seen: BTreeMap<&str, BTreeMap<NetnsId, u32>> = BTreeMap::new();
        let mut unreadable: BTreeMap<&str, AdoptError> = BTreeMap::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Unreadable: the process has exited since the listing.
            let Ok(cgroups) = std::fs::read_to_string(entry.path().join("cgroup")) else {
                continue;
            };
            let Some(uid) = cgroup_file_uid(&cgroups).and_then(|uid| uids.get(&uid)) else {
                continue;
            };
            match NetnsId::of(&entry.path().join("ns/net")) {
                Ok(id) if id == own => {}
                Ok(id) => {
                    let lowest = seen.entry(uid).or_default().entry(id).or_insert(pid);
                    *lowest = (*lowest).min(pid);
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    unreadable.entry(uid).or_insert(AdoptError::ReadNetns {
                        uid: uid.to_owned(),
                        pid,
                        source,
                    });
                }
            }
        }
        let pins = if seen.is_empty() {
            BTreeMap::new()
        } else {
            self.pins()
        };
        let mut located: BTreeMap<String, Result<Found, AdoptError>> = unreadable
            .into_iter()
            .map(|(uid, error)| (uid.to_owned(), Err(error)))
            .collect();
        for (uid, namespaces) in seen {
            located.insert(
                uid.to_owned(),
                choose(uid, &namespaces, &pins, &self.proc_root),
            );
        }
        Ok(located)
    }

    /// The namespaces bind-mounted in [`Self::netns_dirs`], by identity; the first path
    /// listed for one wins. A directory that does not exist holds none.
    fn pins(&self) -> BTreeMap<NetnsId, PathBuf> {
        let mut pins = BTreeMap::new();
        for dir in &self.netns_dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if let Ok(id) = NetnsId::of(&entry.path()) {
                    pins.entry(id).or_insert_with(|| entry.path());
                }
            }
        }
        pins
    }
}

/// The pod's namespace among those its processes are in: the only one the runtime pinned
/// (a process may have made a namespace of its own), else the only one there is.
fn choose(
    uid: &str,
    namespaces: &BTreeMap<NetnsId, u32>,
    pins: &BTreeMap<NetnsId, PathBuf>,
    proc_root: &Path,
) -> Result<Found, AdoptError> {
    let pinned: Vec<(&NetnsId, &PathBuf)> = namespaces
        .keys()
        .filter_map(|id| pins.get_key_value(id))
        .collect();
    match (pinned.as_slice(), namespaces.len()) {
        ([(id, path)], _) => Ok(Found {
            pid: namespaces[*id],
            netns: (*path).clone(),
            id: **id,
        }),
        ([], 1) => {
            let (id, pid) = namespaces.first_key_value().expect("one namespace");
            Ok(Found {
                pid: *pid,
                netns: proc_root.join(pid.to_string()).join("ns/net"),
                id: *id,
            })
        }
        _ => Err(AdoptError::Ambiguous {
            uid: uid.to_owned(),
            namespaces: namespaces.len(),
            pinned: pinned.len(),
        }),
    }
}

/// The pod UID in a `/proc/<pid>/cgroup` file: cgroup v2's `0::<path>` line, or the
/// first v1 hierarchy whose path names one.
fn cgroup_file_uid(file: &str) -> Option<String> {
    file.lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .find_map(pod_uid)
}

/// The pod UID a cgroup path names in its first pod-level segment. Later segments are the
/// container's own making (a container with a delegated cgroup can create
/// `.../pod<its uid>/x/pod<another uid>`), so they never count. Layouts, systemd driver:
/// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid, '-' as '_'>.slice/
/// cri-containerd-<id>.scope` (CRI-O: `crio-<id>.scope`; guaranteed pods have no QoS
/// slice: `kubepods-pod<uid>.slice`); cgroupfs driver: `/kubepods/besteffort/pod<uid>/<id>`
/// or `/kubepods/pod<uid>/<id>`. Segments above are ignored (`..` when the agent has a
/// cgroup namespace of its own).
pub fn pod_uid(path: &str) -> Option<String> {
    path.split('/').find_map(|segment| {
        let uid = match segment.strip_suffix(".slice") {
            Some(slice) => {
                let pod = slice.strip_prefix("kubepods-")?;
                let pod = ["besteffort-", "burstable-"]
                    .iter()
                    .find_map(|qos| pod.strip_prefix(qos))
                    .unwrap_or(pod);
                pod.strip_prefix("pod")?.replace('_', "-")
            }
            None => segment.strip_prefix("pod")?.to_owned(),
        };
        is_uid(&uid).then_some(uid)
    })
}

/// True for a UID as the kubelet writes it: a UUID, or the 32 hex digits of a static
/// pod's. Anything else (`podman`, say) is no pod-level segment.
fn is_uid(uid: &str) -> bool {
    (32..=36).contains(&uid.len())
        && uid
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-')
}

/// Refuses `found` unless its namespace holds `ip`: a second defence against a process that
/// was not what it seemed (a PID reused, a stale pin). Not a proof: a pod allowed to
/// configure its own network (CAP_NET_ADMIN) can add any address, or allow non-local binds.
async fn holds_ip(found: &Found, ip: IpAddr) -> Result<(), AdoptError> {
    let netns = PodNetns::enter(&found.netns)?;
    let address = SocketAddr::new(ip, 0);
    // Binding succeeds only to an address of the namespace.
    let bound = netns
        .run(move || {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(address),
                socket2::Type::DGRAM,
                None,
            )?;
            socket.bind(&address.into())
        })
        .await?;
    match bound {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AddrNotAvailable => Err(AdoptError::WrongIp {
            pid: found.pid,
            netns: found.netns.clone(),
            ip,
        }),
        Err(source) => Err(AdoptError::CheckIp {
            netns: found.netns.clone(),
            ip,
            source,
        }),
    }
}

#[cfg(test)]
mod tests;
