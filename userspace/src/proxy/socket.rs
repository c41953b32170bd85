//! Sockets the proxy opens inside a pod's network namespace. Each carries one of the
//! proxy's marks so the kernel programs never redirect it back to the proxy.

use std::{io, net::SocketAddr};

use ambit_common::marks;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

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
}

/// How an upstream socket presents itself to the peer.
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// The pod's own address, chosen by the kernel.
    Pod,
    /// The original client's address, bound transparently: for connections to the local
    /// application, which then sees the real client IP (`routing` brings its replies back).
    Client(std::net::IpAddr),
}

/// Opens a listener on `addr` inside the pod's namespace.
pub async fn listen(netns: &PodNetns, addr: SocketAddr) -> Result<TcpListener, SocketError> {
    let pod = || netns.path().display().to_string();
    netns
        .run(move || -> io::Result<TcpListener> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
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

/// Connects to `addr` from inside the pod's namespace.
pub async fn connect(
    netns: &PodNetns,
    addr: SocketAddr,
    source: Source,
) -> Result<TcpStream, SocketError> {
    let error = |source| SocketError::Connect {
        addr,
        pod: netns.path().display().to_string(),
        source,
    };
    let socket = netns
        .run(move || -> io::Result<TcpSocket> {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_nonblocking(true)?;
            socket.set_tcp_nodelay(true)?;
            match source {
                Source::Pod => socket.set_mark(marks::PROXY)?,
                Source::Client(ip) => {
                    socket.set_mark(marks::PROXY_TRANSPARENT)?;
                    // Through `lo`, so `sk_lookup` sees loopback ingress and lets it reach
                    // the application instead of steering it back to the proxy.
                    socket.bind_device(Some(b"lo"))?;
                    socket.set_ip_transparent_v4(true)?;
                    socket.bind(&SocketAddr::new(ip, 0).into())?;
                }
            }
            Ok(TcpSocket::from_std_stream(socket.into()))
        })
        .await?
        .map_err(error)?;
    socket.connect(addr).await.map_err(error)
}
