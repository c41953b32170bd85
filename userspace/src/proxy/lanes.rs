//! Fairness between workloads: relays that prove bulk move to threads of their own, which
//! the kernel runs after the ones serving everything else.
//!
//! Why: the agent's runtime runs every relay's task on a couple of worker threads, first
//! come first served. One poll of a bulk relay copies until tokio's budget of I/O
//! operations runs out, up to megabytes with grown buffers, and a task woken by a packet
//! of a latency-sensitive connection (a 1-byte round trip) waits behind every bulk task
//! queued before it: a neighbour's `iperf3 -P 8` took another workload's round-trip p99
//! from 0.16 ms to 2.2 ms. Slicing the bulk tasks' polls only makes the queue longer. So
//! connections start on the main runtime and a relay whose reads keep finding
//! [`BULK_AFTER`] bytes waiting ([`Streak`]) is carried to the bulk lane: a runtime of its
//! own, whose workers, at the lowest scheduling priority (nice 19), so a
//! main worker woken for a small message runs as soon as it is runnable, and bulk
//! threads take whatever CPU is left (all of it when nothing else wants it).
//!
//! Only plain TCP sockets move (the same-node shortcut's two legs, plaintext inbound and
//! outbound to outside the mesh): the socket is taken off one runtime's reactor and
//! registered with the other's. An HBONE stream cannot: it is a stream of an HTTP/2
//! connection whose task, with its TLS, serves every stream of that connection on the
//! runtime it started on. A relay that moved stays on the bulk lane until it ends; its
//! record, byte counters, buffer budget, re-check and drain stay with the task that
//! started it on the main runtime, which waits for the bulk task and ends it when the
//! connection must close.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::{runtime::Runtime, task::JoinHandle};
use tracing::{debug, warn};

use super::{
    copy::{self, Copied, Directions, Traffic},
    hbone::client::Tunnel,
    l7::rewind::Rewind,
    socket::ProxyStream,
};

/// Bytes a relay reads without ever waiting for data, in a row, before it counts as
/// bulk: a few reads of grown buffers. A request and its answer wait for each other, so
/// interactive traffic never gets there however long it lives.
pub const BULK_AFTER: u64 = 1024 * 1024;

/// The nice value of the bulk lane's threads: the lowest priority CFS/EEVDF offers
/// short of `SCHED_IDLE` (weight 15 against 1024 at nice 0).
const BULK_NICE: i32 = 19;

/// Bytes read in a row without waiting, in one direction of a relay.
#[derive(Debug, Default)]
pub struct Streak(u64);

impl Streak {
    /// Counts a read of `bytes`; `waited` when the data was not there yet when it was
    /// asked for. True once the relay proved bulk.
    pub fn read(&mut self, bytes: usize, waited: bool) -> bool {
        if waited {
            self.0 = 0;
        }
        self.0 += bytes as u64;
        self.0 >= BULK_AFTER
    }
}

/// The bulk lane, when there is one (`--bulk-lane`, on by default).
#[derive(Clone, Default)]
pub struct Lanes {
    bulk: Option<Arc<BulkRuntime>>,
    /// Relays carried to the bulk lane so far.
    moved: Arc<AtomicU64>,
}

impl Lanes {
    /// A bulk lane of `threads` workers at the lowest priority.
    pub fn start(threads: usize) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("ambit-bulk")
            .on_thread_start(|| {
                if let Err(error) = crate::sys::set_thread_nice(BULK_NICE) {
                    warn!(%error, "cannot lower the priority of a bulk-lane thread");
                }
            })
            .enable_all()
            .build()?;
        Ok(Self {
            bulk: Some(Arc::new(BulkRuntime(Some(runtime)))),
            moved: Arc::default(),
        })
    }

    /// Relays carried to the bulk lane so far.
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// Every relay stays on the main runtime.
    pub fn main_only() -> Self {
        Self::default()
    }

    /// Copies `client` ⇄ `server` until both directions ended: on the main runtime, then,
    /// once the relay proves bulk and both streams can move, on the bulk lane.
    pub async fn copy<C, S>(
        &self,
        mut client: C,
        mut server: S,
        mut directions: Directions,
        traffic: Arc<Traffic>,
    ) -> io::Result<()>
    where
        C: Movable,
        S: Movable,
    {
        let Some(bulk) = &self.bulk else {
            let copied = copy::copy(&mut client, &mut server, &mut directions, &traffic, false);
            return aborting_on_error(copied.await, server).map(drop);
        };
        let copied = copy::copy(&mut client, &mut server, &mut directions, &traffic, true).await;
        let copied = match copied {
            Ok(copied) => copied,
            Err(error) => {
                server.abort();
                return Err(error);
            }
        };
        if copied == Copied::Done {
            return Ok(());
        }
        let sockets = match (client.duplicate_socket(), server.duplicate_socket()) {
            (Some(Ok(client_fd)), Some(Ok(server_fd))) => Some((client_fd, server_fd)),
            (Some(Err(error)), _) | (_, Some(Err(error))) => {
                debug!(%error, "bulk relay stays on the main runtime");
                None
            }
            _ => None,
        };
        let Some((client_fd, server_fd)) = sockets else {
            let copied = copy::copy(&mut client, &mut server, &mut directions, &traffic, false);
            return aborting_on_error(copied.await, server).map(drop);
        };
        // From here the duplicates hold the sockets: the originals leave this runtime's
        // reactor without closing the connection.
        client.let_go();
        server.let_go();
        self.moved.fetch_add(1, Ordering::Relaxed);
        debug!("a bulk relay moves to the bulk lane");
        let task = bulk.handle().spawn(async move {
            let mut client = ProxyStream::from_fd(client_fd)?;
            let mut server = ProxyStream::from_fd(server_fd)?;
            let copied = copy::copy(&mut client, &mut server, &mut directions, &traffic, false);
            aborting_on_error(copied.await, server).map(drop)
        });
        AbortOnDrop(task)
            .await
            .unwrap_or_else(|joined| Err(io::Error::other(joined)))
    }
}

/// Passes `copied` on; on an error (a reset, say) resets `upstream`, the socket the
/// proxy opened, as the client's end was: the application sees an abort, and no
/// TIME_WAIT stays in the pod's namespace under the client's address (`socket::connect`).
fn aborting_on_error<T, S: Movable>(copied: io::Result<T>, upstream: S) -> io::Result<T> {
    if copied.is_err() {
        upstream.abort();
    }
    copied
}

/// The bulk lane's runtime, shut down without waiting when the last handle goes (a
/// runtime may not be dropped from async code, which waits for its tasks).
struct BulkRuntime(Option<Runtime>);

impl BulkRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        // Some until dropped.
        self.0.as_ref().map(Runtime::handle).expect("running")
    }
}

impl Drop for BulkRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The bulk task of a relay, ended with it: when the relay is dropped (the configuration
/// refused the connection, or the agent stops), so is the copy on the bulk lane.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One end of a relay, and whether it can move to the bulk lane.
pub trait Movable: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Sized {
    /// A second descriptor of the plain TCP socket underneath, for the bulk runtime to
    /// register; `None` for a stream that cannot move.
    fn duplicate_socket(&self) -> Option<io::Result<OwnedFd>> {
        None
    }

    /// Drops this end once [`Self::duplicate_socket`]'s descriptor holds the connection.
    fn let_go(self) {}

    /// Closes this end with a reset, where it has one.
    fn abort(self) {}
}

impl Movable for ProxyStream {
    fn duplicate_socket(&self) -> Option<io::Result<OwnedFd>> {
        Some(self.as_fd().try_clone_to_owned())
    }

    fn let_go(self) {
        self.hand_over();
    }

    fn abort(self) {
        self.reset();
    }
}

/// Driven by its HTTP/2 connection's task.
impl Movable for TokioIo<Upgraded> {}

/// Driven by its HTTP/2 connection's task.
impl Movable for Tunnel {}

/// Holds bytes read ahead; the relay of a detected opaque stream stays where it started.
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Movable for Rewind<S> {}

#[cfg(test)]
mod tests;
