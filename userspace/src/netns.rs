//! Running code inside a pod's network namespace.
//!
//! Sockets belong to the namespace they were created in, whatever thread uses them later.
//! A [`PodNetns`] owns one thread that entered the pod's namespace once; the agent sends it
//! closures that create sockets (listeners, upstream connections, netlink) and gets the
//! results back. No other thread of the agent ever leaves the node namespace, so a failure
//! half way cannot strand a tokio worker in the wrong namespace.
//!
//! Only creating a socket needs the namespace: binding, options and connecting work from
//! any thread. So the thread keeps a few TCP sockets made ahead ([`PodNetns::tcp_socket`]),
//! and a new upstream connection takes one instead of waiting for the thread to wake, run
//! and wake the connection's task in turn.

use std::{
    fs::File,
    io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// Sockets of one family made ahead; the pod's descriptor count includes them.
pub const SPARE_SOCKETS: usize = 8;
/// Made again once this few are left: the thread wakes once per several connections.
const SPARES_LOW: usize = 2;

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
    spares: Arc<[Spares; 2]>,
}

/// TCP sockets of one family made in the namespace ahead of need.
#[derive(Debug, Default)]
struct Spares {
    sockets: Mutex<Vec<OwnedFd>>,
    /// A refill is queued on the thread: one at a time.
    refilling: AtomicBool,
}

impl Spares {
    fn of(spares: &[Spares; 2], domain: Domain) -> &Spares {
        &spares[usize::from(domain == Domain::IPV6)]
    }

    /// A spare if there is one, and how many are left.
    fn take(&self) -> (Option<OwnedFd>, usize) {
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        let spare = sockets.pop();
        (spare, sockets.len())
    }

    /// Run on the namespace's thread: makes sockets until [`SPARE_SOCKETS`] are ready.
    fn refill(&self, domain: Domain) {
        let mut made = Vec::new();
        let missing = SPARE_SOCKETS.saturating_sub(self.len());
        for _ in 0..missing {
            match tcp_socket(domain) {
                Ok(socket) => made.push(OwnedFd::from(socket)),
                // Out of descriptors, say: connections make their own, and report it.
                Err(_) => break,
            }
        }
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(made);
        self.refilling.store(false, Ordering::Release);
    }

    fn len(&self) -> usize {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A TCP socket of `domain` in the calling thread's namespace.
fn tcp_socket(domain: Domain) -> io::Result<Socket> {
    Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
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
                spares: Arc::default(),
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

    /// A TCP socket of `domain` in the namespace: one made ahead when there is one (and
    /// more are then made in the background), else made now on the thread.
    pub async fn tcp_socket(&self, domain: Domain) -> Result<io::Result<Socket>, NetnsError> {
        let spares = Spares::of(&self.spares, domain);
        let (spare, left) = spares.take();
        if left <= SPARES_LOW && !spares.refilling.swap(true, Ordering::AcqRel) {
            let all = Arc::clone(&self.spares);
            let job: Job = Box::new(move || Spares::of(&all, domain).refill(domain));
            if self.jobs.send(job).is_err() {
                spares.refilling.store(false, Ordering::Release);
            }
        }
        match spare {
            Some(fd) => Ok(Ok(Socket::from(fd))),
            None => self.run(move || tcp_socket(domain)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_are_topped_up_to_the_count_and_taken_one_by_one() {
        let spares: [Spares; 2] = Default::default();
        let v6 = Spares::of(&spares, Domain::IPV6);
        v6.refilling.store(true, Ordering::Release);
        v6.refill(Domain::IPV6);
        assert!(
            !v6.refilling.load(Ordering::Acquire),
            "ready for the next refill"
        );
        assert_eq!(v6.len(), SPARE_SOCKETS);
        assert_eq!(Spares::of(&spares, Domain::IPV4).len(), 0, "per family");

        let (taken, left) = v6.take();
        assert_eq!(left, SPARE_SOCKETS - 1);
        let socket = Socket::from(taken.unwrap());
        assert_eq!(socket.domain().unwrap(), Domain::IPV6);
        assert_eq!(socket.r#type().unwrap(), Type::STREAM);
        v6.refill(Domain::IPV6);
        assert_eq!(v6.len(), SPARE_SOCKETS, "topped up, never beyond");
    }
}
