//! Sockets the proxy opens inside a pod's network namespace. The kernel programs know them
//! by the agent's cgroup and never redirect them; the marks they carry only route the
//! replies of transparent connections (`routing`).
//!
//! No connect may be aimed at the proxy's own listeners: loopback and unspecified
//! addresses are refused outright, and so are the listeners' ports toward the local
//! application, so nothing a peer asks for can make the proxy connect to itself.

use std::{io, net::SocketAddr, time::Duration};

use ambit_common::{marks, ports};
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

/// Connects to `addr` from inside the pod's namespace, within `timeout`.
pub async fn connect(
    netns: &PodNetns,
    addr: SocketAddr,
    source: Source,
    timeout: Duration,
) -> Result<TcpStream, SocketError> {
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
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(connected) => connected.map_err(error),
        Err(_) => Err(SocketError::Timeout {
            addr,
            pod: pod(),
            timeout,
        }),
    }
}

/// True when a connect to `addr` could land on one of the proxy's listeners in the pod:
/// they listen on loopback, and toward the application any of their ports would be theirs.
fn reaches_own_listener(addr: SocketAddr, source: Source) -> bool {
    let ip = addr.ip().to_canonical();
    ip.is_loopback()
        || ip.is_unspecified()
        || (matches!(source, Source::Client(_)) && ports::is_listener(addr.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_aims_at_the_proxys_own_listeners() {
        let client = Source::Client("10.0.0.9".parse().unwrap());
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
}
