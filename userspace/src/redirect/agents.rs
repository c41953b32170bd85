//! The running agents the kernel programs recognise: the pinned set of their cgroup ids
//! ([`PROXY_CGROUPS_MAP`]), whose connects are the proxy's own and never redirected.
//!
//! Two agents run at once during an upgrade, so the map is a set: each agent adds its own
//! id at load and removes it on a clean exit. A crashed agent cannot remove its id, and a
//! stale id must not stay: whatever process later runs in that cgroup would have its
//! connects let around the mesh. So an agent proves it is alive with a shared `flock` on
//! `<pin dir>/agents/<cgroup id>` (a directory: bpffs holds nothing else), which the
//! kernel releases when the process dies, however it dies; the next agent removes every id
//! whose lock nobody holds. Only ever an agent's own id is added: nothing a pod does can
//! put its cgroup in the set. Locks live in the pin directory because sharing it is what
//! makes two agents the same node's (they may not share a PID namespace or `/proc`).

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use ambit_common::outbound::PROXY_CGROUPS_MAP;
use aya::maps::{HashMap, MapData, MapError};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use tracing::{info, warn};

use super::ignore_missing;

#[derive(Debug, thiserror::Error)]
pub enum AgentsError {
    #[error("cannot take the agent lock {}: {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
    #[error("map {PROXY_CGROUPS_MAP}: {0}")]
    Map(#[from] MapError),
}

/// This agent's entry in the set, held for its lifetime.
pub struct Registration {
    map: HashMap<MapData, u64, u32>,
    own: u64,
    locks: PathBuf,
    /// The shared lock that tells other agents this one is alive.
    _alive: Flock<File>,
}

impl Registration {
    /// Adds `own` (this agent's cgroup id) to `map` and removes the ids of agents that are
    /// gone. The lock is taken before the id is added: an agent that finds the id must
    /// find its holder alive.
    pub fn register(
        mut map: HashMap<MapData, u64, u32>,
        pin_dir: &Path,
        own: u64,
    ) -> Result<Self, AgentsError> {
        let locks = pin_dir.join("agents");
        let alive = lock(&locks, own, FlockArg::LockShared)?.ok_or_else(|| AgentsError::Lock {
            path: locks.join(own.to_string()),
            source: io::ErrorKind::WouldBlock.into(),
        })?;
        map.insert(own, 1, 0)?;
        let others: Vec<u64> = map.keys().filter_map(Result::ok).collect();
        for id in others.into_iter().filter(|id| *id != own) {
            match holder_alive(&locks, id) {
                Ok(true) => info!(cgroup = id, "another agent runs beside this one"),
                Ok(false) => {
                    info!(cgroup = id, "removing the cgroup of an agent that is gone");
                    ignore_missing(map.remove(&id))?;
                }
                // Kept: a live agent whose connects were suddenly redirected would loop
                // them back into the proxy.
                Err(error) => warn!(cgroup = id, %error, "cannot tell whether an agent runs"),
            }
        }
        Ok(Self {
            map,
            own,
            locks,
            _alive: alive,
        })
    }

    /// Removes this agent's id, unless another live agent shares its cgroup. For a clean
    /// exit; after a crash the next agent does it.
    pub fn leave(self) {
        let Self {
            mut map,
            own,
            locks,
            _alive,
        } = self;
        drop(_alive);
        match lock(&locks, own, FlockArg::LockExclusiveNonblock) {
            Ok(Some(_sole)) => {
                if let Err(error) = ignore_missing(map.remove(&own)) {
                    warn!(%error, "cannot remove this agent's cgroup from the kernel map");
                }
            }
            Ok(None) => info!("another agent shares this cgroup; its id stays"),
            Err(error) => warn!(%error, "cannot tell whether another agent shares this cgroup"),
        }
    }
}

/// True when an agent holds the lock of cgroup `id`.
fn holder_alive(locks: &Path, id: u64) -> Result<bool, AgentsError> {
    if !locks.join(id.to_string()).exists() {
        return Ok(false);
    }
    Ok(lock(locks, id, FlockArg::LockExclusiveNonblock)?.is_none())
}

/// Takes `arg` on the lock of cgroup `id`, creating it; `None` when a non-blocking lock is
/// held by someone else.
fn lock(locks: &Path, id: u64, arg: FlockArg) -> Result<Option<Flock<File>>, AgentsError> {
    let path = locks.join(id.to_string());
    let error = |source| AgentsError::Lock {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&path).map_err(error)?;
    let dir = File::open(&path).map_err(error)?;
    match Flock::lock(dir, arg) {
        Ok(held) => Ok(Some(held)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(error(errno.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_tells_a_live_agent_from_a_dead_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!holder_alive(dir.path(), 7).unwrap(), "never started");
        let held = lock(dir.path(), 7, FlockArg::LockShared).unwrap().unwrap();
        assert!(holder_alive(dir.path(), 7).unwrap());
        // A second agent in the same cgroup shares the lock.
        let beside = lock(dir.path(), 7, FlockArg::LockSharedNonblock)
            .unwrap()
            .unwrap();
        drop(held);
        assert!(holder_alive(dir.path(), 7).unwrap(), "one still runs");
        drop(beside);
        assert!(!holder_alive(dir.path(), 7).unwrap(), "both gone");
    }
}
