//! Running code inside a pod's network namespace.
//!
//! Sockets belong to the namespace they were created in, whatever thread uses them later.
//! A [`PodNetns`] owns one thread that entered the pod's namespace once; the agent sends it
//! closures that create sockets (listeners, upstream connections, netlink) and gets the
//! results back. No other thread of the agent ever leaves the node namespace, so a failure
//! half way cannot strand a tokio worker in the wrong namespace.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {}: {source} (the agent needs CAP_SYS_ADMIN)", path.display())]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot start the thread for network namespace {}: {source}", path.display())]
    Thread { path: PathBuf, source: io::Error },
    #[error("the thread of network namespace {} has stopped", path.display())]
    Stopped { path: PathBuf },
    #[error("cannot read the cookie of network namespace {}: {source}", path.display())]
    Cookie { path: PathBuf, source: io::Error },
}

/// A handle to the thread that lives in one pod's network namespace. Cloning shares the
/// thread; it exits when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct PodNetns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
}

impl PodNetns {
    /// Starts a thread inside the namespace at `path` (e.g. `/var/run/netns/pod`). The thread
    /// enters tokio's runtime too, so closures can create tokio sockets directly.
    pub fn enter(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let runtime = tokio::runtime::Handle::try_current().ok();
        let (jobs, queue) = mpsc::channel::<Job>();
        let (entered_tx, entered_rx) = mpsc::channel();
        thread::Builder::new()
            .name("ambit-netns".into())
            .spawn(move || {
                let entered = setns(&file, CloneFlags::CLONE_NEWNET);
                let failed = entered.is_err();
                let _ = entered_tx.send(entered);
                if failed {
                    return;
                }
                let _runtime = runtime.as_ref().map(|r| r.enter());
                for job in queue {
                    job();
                }
            })
            .map_err(|source| NetnsError::Thread {
                path: path.to_owned(),
                source,
            })?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                path: path.to_owned(),
                jobs,
            }),
            Ok(Err(source)) => Err(NetnsError::Enter {
                path: path.to_owned(),
                source,
            }),
            Err(_) => Err(NetnsError::Stopped {
                path: path.to_owned(),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's cookie: the key the kernel programs use for it.
    pub async fn cookie(&self) -> Result<u64, NetnsError> {
        self.run(|| {
            let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
            crate::sys::netns_cookie(&probe)
        })
        .await?
        .map_err(|source| NetnsError::Cookie {
            path: self.path.clone(),
            source,
        })
    }

    /// Runs `f` inside the namespace and returns its result. `f` must not block for long:
    /// it shares the thread with every other socket operation of this pod.
    pub async fn run<R, F>(&self, f: F) -> Result<R, NetnsError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let stopped = || NetnsError::Stopped {
            path: self.path.clone(),
        };
        self.jobs.send(job).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }
}
