//! Sockets the proxy opens inside a pod's network namespace. The kernel programs know them
//! by the agent's cgroup and never redirect them; the marks they carry only route the
//! replies of transparent connections (`routing`).
//!
//! No connect may be aimed at the proxy's own listeners: loopback and unspecified
//! addresses are refused outright, and so are the listeners' ports toward the local
//! application, so nothing a peer asks for can make the proxy connect to itself.
//!
//! Every connection of the data path, accepted or opened, is a [`ProxyStream`]: reset by
//! the kernel if the agent dies while holding it.

use std::{
    io,
    net::SocketAddr,
    ops::{Deref, DerefMut},
    os::fd::OwnedFd,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use ambit_common::{marks, ports};
use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
};
use tracing::debug;

use crate::netns::{NetnsError, PodNetns};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot listen on {addr} in {pod}: {source}")]
    Listen {
        addr: SocketAddr,
        pod: String,
        source: io::Error,
    },
    #[error("connect to {addr} from {pod}: {source}")]
    Connect {
        addr: SocketAddr,
        pod: String,
        source: io::Error,
    },
    #[error("connect to {addr} from {pod}: no answer within {timeout:?}")]
    Timeout {
        addr: SocketAddr,
        pod: String,
        timeout: Duration,
    },
    #[error("refusing to connect to {0}: it could be one of the proxy's own listeners")]
    OwnListener(SocketAddr),
}

/// How an upstream socket presents itself to the peer.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// The pod's own address, chosen by the kernel.
    Pod,
    /// The original client's address, bound transparently: for connections to the local
    /// application, which then sees the real client IP (`routing` brings its replies back).
    Client {
        ip: std::net::IpAddr,
        /// The client reached the pod directly (plaintext inbound): its own connections to
        /// the pod share this connection's 4-tuple space (see [`connect`]). Through a
        /// tunnel or the same-node path they do not: the client's connection ends at
        /// port 15008 or in another namespace.
        direct: bool,
    },
}

/// Opens a listener on `addr` inside the pod's namespace. An IPv6 listener on `::` is
/// dual-stack (`IPV6_V6ONLY` off; bound to any other IPv6 address a socket is IPv6-only
/// whatever the option says): `sk_lookup` may hand it IPv4 connections, which show their
/// addresses as `::ffff:a.b.c.d` ([`canonical`]).
pub async fn listen(netns: &PodNetns, addr: SocketAddr) -> Result<TcpListener, SocketError> {
    let pod = || netns.path().display().to_string();
    netns
        .run(move || -> io::Result<TcpListener> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            if addr.is_ipv6() {
                socket.set_only_v6(false)?;
            }
            socket.set_reuse_address(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            TcpListener::from_std(socket.into())
        })
        .await?
        .map_err(|source| SocketError::Listen {
            addr,
            pod: pod(),
            source,
        })
}

/// Connects to `addr` from inside the pod's namespace, within `timeout`.
///
/// A connection from the client's address ([`Source::Client`]) that reached the pod
/// directly shares the pod's port space with that client's own connections to the pod, so
/// it lets `bind` choose its port: `bind` prefers the other parity than a client's
/// connects, as long as the proxy leaves no TIME_WAIT behind ([`super::lanes`] resets it
/// when the client's side failed). Once `bind`'s half of the range is taken, it hands out
/// ports a client connection may be using, and a connection with the 4-tuple of that
/// client's connection to the pod is stuck. Any other takes its port at connect
/// (`IP_BIND_ADDRESS_NO_PORT`): unique for the 4-tuple, from the whole range, and free
/// to reuse one whose TIME_WAIT (on `lo`) is over a second old, so connections that end
/// in order, and HBONE streams the peer cancels (read as an end of stream), do not pile
/// up ports.
pub async fn connect(
    netns: &PodNetns,
    addr: SocketAddr,
    source: Source,
    timeout: Duration,
) -> Result<ProxyStream, SocketError> {
    if reaches_own_listener(addr, source) {
        return Err(SocketError::OwnListener(addr));
    }
    let pod = || netns.path().display().to_string();
    let error = |source| SocketError::Connect {
        addr,
        pod: pod(),
        source,
    };
    let socket = netns
        .tcp_socket(Domain::for_address(addr))
        .await?
        .and_then(|socket| upstream_socket(socket, addr, source))
        .map_err(error)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(connected) => connected.map(ProxyStream::new).map_err(error),
        Err(_) => Err(SocketError::Timeout {
            addr,
            pod: pod(),
            timeout,
        }),
    }
}

/// `socket` (a new TCP socket of the pod's namespace) made ready for a connection to
/// `addr`, bound as `source` says.
fn upstream_socket(socket: Socket, addr: SocketAddr, source: Source) -> io::Result<TcpSocket> {
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    match source {
        Source::Pod => socket.set_mark(marks::PROXY)?,
        Source::Client { ip, direct } => {
            socket.set_mark(marks::PROXY_TRANSPARENT)?;
            // Through `lo`, so `sk_lookup` sees loopback ingress and lets it reach the
            // application instead of steering it back to the proxy.
            socket.bind_device(Some(b"lo"))?;
            match addr {
                SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
                SocketAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
            }
            if !direct {
                setsockopt(&socket, sockopt::IpBindAddressNoPort, &true)?;
            }
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
    }
    Ok(TcpSocket::from_std_stream(socket.into()))
}

/// A TCP connection of the data path, closed with a reset if the agent dies while it
/// holds it.
///
/// Its socket carries `SO_LINGER` 0 for as long as the agent holds it, so when the agent is
/// killed (a crash, the OOM killer) the kernel closes it with a reset: the peer learns that
/// the connection broke instead of seeing an orderly end of stream, which would make a
/// response cut short look complete. Dropping it clears the option first, so every close
/// the agent makes itself stays as orderly as without it and discards nothing still
/// queued; [`ProxyStream::reset`] keeps it instead.
#[derive(Debug)]
pub struct ProxyStream {
    stream: TcpStream,
    /// False once the agent chose to reset the connection.
    orderly_close: bool,
}

impl ProxyStream {
    pub fn new(stream: TcpStream) -> Self {
        if let Err(error) = SockRef::from(&stream).set_linger(Some(Duration::ZERO)) {
            // Only the agent's death would show it: that connection ends with a FIN.
            debug!(%error, "cannot arm the reset on close");
        }
        Self {
            stream,
            orderly_close: true,
        }
    }

    /// Takes over a descriptor of a data-path socket (nonblocking, as every socket of the
    /// proxy is), registering it with the current runtime.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        TcpStream::from_std(std::net::TcpStream::from(fd)).map(Self::new)
    }

    /// Lets this descriptor go while another one of the same socket (taken with
    /// `try_clone_to_owned`) holds the connection: the socket is neither closed nor
    /// disarmed.
    pub fn hand_over(mut self) {
        self.orderly_close = false;
    }

    /// Closes the connection with a reset rather than a FIN, so the client sees the refusal
    /// the upstream gave (or the policy's) instead of an empty, successful connection.
    pub fn reset(mut self) {
        self.orderly_close = false;
    }
}

impl Drop for ProxyStream {
    fn drop(&mut self) {
        if self.orderly_close {
            let _ = SockRef::from(&self.stream).set_linger(None);
        }
    }
}

impl Deref for ProxyStream {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

impl DerefMut for ProxyStream {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

impl AsyncRead for ProxyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ProxyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a dual-stack socket
/// shows IPv4 peers) turned into the IPv4 address it is: policies, limits and logs see
/// one form of each address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// True when a connect to `addr` could land on one of the proxy's listeners in the pod:
/// they listen on loopback, and toward the application any of their ports would be theirs.
fn reaches_own_listener(addr: SocketAddr, source: Source) -> bool {
    let ip = addr.ip().to_canonical();
    ip.is_loopback()
        || ip.is_unspecified()
        || (matches!(source, Source::Client { .. }) && ports::is_listener(addr.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_aims_at_the_proxys_own_listeners() {
        let client = Source::Client {
            ip: "10.0.0.9".parse().unwrap(),
            direct: true,
        };
        let refused = [
            ("127.0.0.1:15006", Source::Pod),
            ("127.0.0.1:8080", client),
            ("0.0.0.0:15001", Source::Pod),
            ("[::ffff:127.0.0.1]:80", Source::Pod),
            ("[::1]:80", Source::Pod),
            ("10.0.0.5:15006", client),
            ("10.0.0.5:15008", client),
        ];
        for (addr, source) in refused {
            assert!(
                reaches_own_listener(addr.parse().unwrap(), source),
                "{addr}"
            );
        }
        // Another proxy's HBONE port is where tunnels go; the application's ports are fine.
        for (addr, source) in [("10.0.0.6:15008", Source::Pod), ("10.0.0.5:8080", client)] {
            assert!(
                !reaches_own_listener(addr.parse().unwrap(), source),
                "{addr}"
            );
        }
    }

    /// A connected pair on loopback: the proxy's side wrapped, the peer's plain.
    async fn pair() -> (ProxyStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (peer, accepted) = tokio::join!(connect, listener.accept());
        (ProxyStream::new(accepted.unwrap().0), peer.unwrap())
    }

    #[tokio::test]
    async fn a_held_stream_would_be_reset_by_the_kernel() {
        let (stream, _peer) = pair().await;
        assert_eq!(
            SockRef::from(&*stream).linger().unwrap(),
            Some(Duration::ZERO)
        );
    }

    #[tokio::test]
    async fn dropping_a_stream_closes_it_in_order_with_nothing_lost() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut stream, mut peer) = pair().await;
        let payload = vec![7u8; 4 * 1024 * 1024];
        stream.write_all(&payload[..1024 * 1024]).await.unwrap();
        let write_rest = async move {
            stream.write_all(&payload[1024 * 1024..]).await.unwrap();
            drop(stream);
        };
        let mut got = Vec::new();
        let (read, ()) = tokio::join!(peer.read_to_end(&mut got), write_rest);
        read.expect("an end of stream, not a reset");
        assert_eq!(got.len(), 4 * 1024 * 1024);
    }

    #[tokio::test]
    async fn reset_closes_with_a_reset() {
        use tokio::io::AsyncReadExt as _;
        let (stream, mut peer) = pair().await;
        stream.reset();
        let mut byte = [0u8; 1];
        let error = peer.read(&mut byte).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }
}
