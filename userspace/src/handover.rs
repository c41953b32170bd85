//! Handing the pods' listening sockets from a running agent to the next one (an upgrade:
//! the DaemonSet's surge pod, or a second `ambit run` with the same state directory).
//!
//! The running agent passes its very sockets (`SCM_RIGHTS` over a unix socket), not
//! copies: one listening socket, one accept queue, held by both processes until the old
//! one lets go. Nothing queued is lost, nothing is re-bound, and the `sk_lookup` socket
//! map keeps pointing at the same sockets. The alternative, a second listener joining
//! each port with `SO_REUSEPORT`, loses the connections queued on the old listener when
//! it closes (unless every pod namespace sets `net.ipv4.tcp_migrate_req`), and would let
//! any root process of a pod join the group and take the proxy's connections.
//!
//! Protocol, one `SOCK_SEQPACKET` connection (message boundaries kept, each message with
//! its descriptors): the successor sends [`HELLO`]; the agent answers with [`Batch`]es
//! (JSON, at most [`FDS_PER_BATCH`] descriptors each, the last one marked); the
//! successor checks each socket (a listener, in the namespace and on the port the batch
//! names) and answers [`ACK`]. Only on that answer does the agent stop accepting and
//! start its drain; without it (the successor died, say) it keeps serving. Only the
//! agent's own user (root) may ask: the socket is mode 0600 and the peer's credentials are
//! checked.

use std::{
    collections::HashMap,
    io::{self, Read as _},
    net::TcpListener,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// What the successor sends first.
const HELLO: &[u8] = b"ambit-handover/1";
/// What the successor answers once it holds every socket.
const ACK: &[u8] = b"ok";
/// Below the kernel's `SCM_MAX_FD` (253).
const FDS_PER_BATCH: usize = 192;
/// Time either side has for each message.
const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: io::Error },
    #[error("handover: {0}")]
    Io(#[from] io::Error),
    #[error("handover: malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("handover: {0}")]
    Protocol(&'static str),
    #[error(
        "handover: refusing a peer with uid {0}: only the agent's own user may take the listeners"
    )]
    OtherUser(u32),
    #[error("handover: the socket for {key:?} is not that pod's listener")]
    WrongSocket { key: ListenerKey },
    #[error("handover: the agent stopped before answering")]
    AgentGone,
}

/// Which listener a socket is: the pod's network namespace and the address it is bound to
/// (a pod has two outbound listeners on one port, `127.0.0.1` and `[::1]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub addr: std::net::SocketAddr,
}

/// One message of the agent's answer; its descriptors come in the order of `listeners`.
#[derive(Debug, Serialize, Deserialize)]
struct Batch {
    listeners: Vec<ListenerKey>,
    last: bool,
}

/// The handover socket of agents that share `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("handover.sock")
}

/// Listening sockets received from the previous agent, waiting for their pods to be
/// enrolled.
#[derive(Debug, Default)]
pub struct Inherited(HashMap<ListenerKey, TcpListener>);

impl Inherited {
    /// The listener for `key`, if the previous agent handed one over.
    pub fn take(&mut self, key: ListenerKey) -> Option<TcpListener> {
        self.0.remove(&key)
    }

    /// Closes the listeners left for the namespace `netns_cookie`: its pod took what it
    /// could use.
    pub fn forget(&mut self, netns_cookie: u64) {
        self.0.retain(|key, _| key.netns_cookie != netns_cookie);
    }

    /// Closes the listeners of namespaces not in `keep`: pods this agent does not serve.
    pub fn retain(&mut self, keep: &[u64]) {
        self.0.retain(|key, _| keep.contains(&key.netns_cookie));
    }
}

/// Takes the listeners of the agent serving at `path`; `None` when no agent answers there.
pub async fn take_over(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || take_over_blocking(&path))
        .await
        .map_err(|_| HandoverError::AgentGone)?
}

fn take_over_blocking(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let socket = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    match socket.connect(&SockAddr::unix(path)?) {
        Ok(()) => {}
        // No agent, or a dead one's socket.
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(source) => {
            return Err(HandoverError::Socket {
                path: path.to_owned(),
                source,
            });
        }
    }
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.set_write_timeout(Some(TIMEOUT))?;
    socket.send(HELLO)?;
    let mut inherited = Inherited::default();
    let mut buf = vec![0; MAX_MESSAGE];
    loop {
        let (len, fds) = crate::sys::recv_with_fds(&socket, &mut buf)?;
        if len == 0 {
            return Err(HandoverError::AgentGone);
        }
        let batch: Batch = serde_json::from_slice(&buf[..len])?;
        if batch.listeners.len() != fds.len() {
            return Err(HandoverError::Protocol(
                "descriptors do not match the batch",
            ));
        }
        for (key, fd) in batch.listeners.into_iter().zip(fds) {
            inherited.0.insert(key, checked_listener(key, fd)?);
        }
        if batch.last {
            break;
        }
    }
    socket.send(ACK)?;
    info!(
        listeners = inherited.0.len(),
        "took over the listening sockets of the running agent"
    );
    Ok(Some(inherited))
}

/// `fd` as the listener `key` names, after checking that it is one: a listening TCP
/// socket in that namespace, bound to that address.
fn checked_listener(key: ListenerKey, fd: OwnedFd) -> Result<TcpListener, HandoverError> {
    let socket = SockRef::from(&fd);
    let is_it = socket.is_listener()?
        && crate::sys::netns_cookie(&fd)? == key.netns_cookie
        && socket
            .local_addr()?
            .as_socket()
            .is_some_and(|addr| addr == key.addr);
    if !is_it {
        return Err(HandoverError::WrongSocket { key });
    }
    let listener = TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// What the handover socket asks of the agent's main loop.
pub enum Request {
    /// Copies of the listening sockets of every pod the agent serves.
    Listeners(oneshot::Sender<Vec<(ListenerKey, OwnedFd)>>),
    /// The successor holds them all: stop accepting and drain.
    HandedOver,
}

/// Serves successors at `path` (replacing a previous agent's socket, whose listeners this
/// agent took over first) on a thread of its own, asking the main loop through
/// `requests`.
pub fn serve(path: &Path, requests: mpsc::Sender<Request>) -> Result<(), HandoverError> {
    let error = |source| HandoverError::Socket {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(error(e)),
        _ => {}
    }
    let listener = Socket::new(Domain::UNIX, Type::SEQPACKET, None).map_err(error)?;
    listener
        .bind(&SockAddr::unix(path).map_err(error)?)
        .map_err(error)?;
    // Restricted before it listens: no one can connect in between.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(error)?;
    listener.listen(4).map_err(error)?;
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            while let Ok((peer, _)) = listener.accept() {
                match hand_over(&peer, &requests) {
                    Ok(true) => {
                        info!("the listening sockets are the next agent's now; draining");
                    }
                    Ok(false) => return,
                    Err(error) => warn!(%error, "handover failed; still serving"),
                }
            }
        })
        .map_err(error)?;
    Ok(())
}

/// Serves one successor; false once the main loop is gone.
fn hand_over(peer: &Socket, requests: &mpsc::Sender<Request>) -> Result<bool, HandoverError> {
    let uid = nix::sys::socket::getsockopt(peer, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?
        .uid();
    if uid != nix::unistd::geteuid().as_raw() {
        return Err(HandoverError::OtherUser(uid));
    }
    peer.set_read_timeout(Some(TIMEOUT))?;
    peer.set_write_timeout(Some(TIMEOUT))?;
    let mut buf = [0u8; 64];
    let len = (&mut &*peer).read(&mut buf)?;
    if &buf[..len] != HELLO {
        return Err(HandoverError::Protocol("unexpected greeting"));
    }
    let (reply, listeners) = oneshot::channel();
    if requests.blocking_send(Request::Listeners(reply)).is_err() {
        return Ok(false);
    }
    let listeners = listeners
        .blocking_recv()
        .map_err(|_| HandoverError::AgentGone)?;
    // At least one batch, the last marked: an agent serving no pod sends an empty one.
    let chunks: Vec<_> = listeners.chunks(FDS_PER_BATCH).collect();
    let count = chunks.len().max(1);
    for index in 0..count {
        let chunk = chunks.get(index).copied().unwrap_or_default();
        let batch = Batch {
            listeners: chunk.iter().map(|(key, _)| *key).collect(),
            last: index + 1 == count,
        };
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
        send_message(peer, &serde_json::to_vec(&batch)?, &fds)?;
    }
    let len = (&mut &*peer).read(&mut buf)?;
    if &buf[..len] != ACK {
        return Err(HandoverError::Protocol("the successor did not confirm"));
    }
    Ok(requests.blocking_send(Request::HandedOver).is_ok())
}

fn send_message(peer: &Socket, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), HandoverError> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        peer.as_raw_fd(),
        &[io::IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `path` as an agent whose listeners are `offered`; what the main loop is
    /// asked comes out of the returned channel.
    fn agent(
        path: &Path,
        offered: Vec<(ListenerKey, OwnedFd)>,
    ) -> std::sync::mpsc::Receiver<&'static str> {
        let (tx, mut rx) = mpsc::channel(1);
        serve(path, tx).unwrap();
        let (asked_tx, asked) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut offered = Some(offered);
            while let Some(request) = rx.blocking_recv() {
                let what = match request {
                    Request::Listeners(reply) => {
                        let _ = reply.send(offered.take().unwrap_or_default());
                        "listeners"
                    }
                    Request::HandedOver => "handed over",
                };
                let _ = asked_tx.send(what);
            }
        });
        asked
    }

    fn listener() -> (TcpListener, ListenerKey) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let key = ListenerKey {
            netns_cookie: crate::sys::netns_cookie(&listener).unwrap(),
            addr: listener.local_addr().unwrap(),
        };
        (listener, key)
    }

    #[tokio::test]
    async fn the_successor_gets_the_very_sockets_and_the_agent_hands_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        assert!(take_over(&path).await.unwrap().is_none(), "no agent yet");
        let (first, first_key) = listener();
        let (second, second_key) = listener();
        let offered = vec![
            (first_key, OwnedFd::from(first.try_clone().unwrap())),
            (second_key, OwnedFd::from(second.try_clone().unwrap())),
        ];
        let asked = agent(&path, offered);
        let mut inherited = take_over(&path).await.unwrap().expect("an agent answered");
        let wait = Duration::from_secs(5);
        assert_eq!(asked.recv_timeout(wait), Ok("listeners"));
        assert_eq!(asked.recv_timeout(wait), Ok("handed over"));
        let taken = inherited.take(first_key).expect("handed over");
        // The same socket: a connection queued on the agent's is accepted by the successor.
        let client = std::net::TcpStream::connect(first.local_addr().unwrap()).unwrap();
        drop(first);
        taken.set_nonblocking(false).unwrap();
        let (_, peer) = taken.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(inherited.take(second_key).is_some());
        drop(second);
    }

    #[tokio::test]
    async fn a_socket_that_is_not_the_claimed_listener_is_refused_and_nothing_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let (listener, mut key) = listener();
        key.addr.set_port(key.addr.port().wrapping_add(1));
        let asked = agent(&path, vec![(key, OwnedFd::from(listener))]);
        let error = take_over(&path).await.unwrap_err();
        assert!(
            matches!(error, HandoverError::WrongSocket { .. }),
            "{error}"
        );
        // The successor went away without confirming: the agent keeps serving.
        assert_eq!(asked.recv_timeout(Duration::from_secs(5)), Ok("listeners"));
        assert_eq!(
            asked.recv_timeout(Duration::from_millis(500)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        );
    }
}
