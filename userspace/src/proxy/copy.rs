//! Copying bytes between the two halves of a proxied connection.
//!
//! Each direction has its own buffer, allocated once: it starts small, so idle
//! connections stay cheap, and doubles (up to [`MAX_BUFFER`]) whenever a read fills it, so
//! bulk transfers use few system calls. An end of stream on one side is passed on as a
//! half-close (`shutdown`) of the other, and the copy ends when both directions have.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const INITIAL_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// Bytes moved so far, readable while the copy runs.
#[derive(Debug, Default)]
pub struct Traffic {
    /// From the client towards the destination.
    pub sent: AtomicU64,
    /// From the destination back to the client.
    pub received: AtomicU64,
}

/// Copies `client` ⇄ `server` until both directions reached end of stream.
pub async fn copy_both_ways<C, S>(client: C, server: S, traffic: &Traffic) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite,
    S: AsyncRead + AsyncWrite,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    tokio::try_join!(
        copy_one_way(client_read, server_write, &traffic.sent),
        copy_one_way(server_read, client_write, &traffic.received),
    )?;
    Ok(())
}

async fn copy_one_way<R, W>(mut from: R, mut to: W, counter: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; INITIAL_BUFFER];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer[..n]).await?;
        // TLS and HTTP/2 streams hold data until flushed.
        to.flush().await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if n == buffer.len() && buffer.len() < MAX_BUFFER {
            buffer.resize(buffer.len() * 2, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;

    #[tokio::test]
    async fn copies_both_ways_and_passes_half_close_on() {
        let (client, mut client_peer) = duplex(1024);
        let (server, mut server_peer) = duplex(1024);
        let traffic = Traffic::default();
        let copy = copy_both_ways(client, server, &traffic);
        let peers = async {
            client_peer.write_all(b"hello").await.unwrap();
            client_peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            server_peer.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello", "server sees the data, then the half-close");
            // The other direction still works after the client half-closed.
            server_peer.write_all(b"world!").await.unwrap();
            server_peer.shutdown().await.unwrap();
            let mut back = Vec::new();
            client_peer.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"world!");
        };
        let (copied, ()) = tokio::join!(copy, peers);
        copied.unwrap();
        assert_eq!(traffic.sent.load(Ordering::Relaxed), 5);
        assert_eq!(traffic.received.load(Ordering::Relaxed), 6);
    }

    #[tokio::test]
    async fn buffer_grows_with_a_bulk_stream() {
        let (client, mut client_peer) = duplex(MAX_BUFFER);
        let (server, mut server_peer) = duplex(MAX_BUFFER);
        let traffic = Traffic::default();
        let payload = vec![7u8; 4 * MAX_BUFFER];
        let copy = copy_both_ways(client, server, &traffic);
        let peers = async {
            let writer = async {
                client_peer.write_all(&payload).await.unwrap();
                client_peer.shutdown().await.unwrap();
            };
            let reader = async {
                let mut got = Vec::new();
                server_peer.read_to_end(&mut got).await.unwrap();
                server_peer.shutdown().await.unwrap();
                got
            };
            let ((), got) = tokio::join!(writer, reader);
            assert_eq!(got.len(), payload.len());
        };
        let (copied, ()) = tokio::join!(copy, peers);
        copied.unwrap();
        assert_eq!(traffic.sent.load(Ordering::Relaxed), payload.len() as u64);
    }
}
