//! Reading a connection's first bytes to tell its protocol, then serving it as if they had
//! not been read.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::admission::protocol::{self, DETECT_BYTES, Detected};

/// A stream whose first bytes were read ahead: they are served again before the rest.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

/// Reads until the first bytes tell HTTP/1, HTTP/2 or neither, at most [`DETECT_BYTES`]
/// and for at most `within`: a client that sends nothing in time (a server-first
/// protocol) or closes early is opaque TCP.
pub async fn detect<S: AsyncRead + Unpin>(
    mut stream: S,
    within: Duration,
) -> io::Result<(Rewind<S>, Detected)> {
    let mut first = BytesMut::with_capacity(DETECT_BYTES);
    let read = async {
        loop {
            let detected = protocol::detect(&first);
            if detected != Detected::NeedMore {
                return Ok::<_, io::Error>(detected);
            }
            if stream.read_buf(&mut first).await? == 0 {
                return Ok(Detected::Opaque);
            }
        }
    };
    let detected = match tokio::time::timeout(within, read).await {
        Ok(result) => result?,
        Err(_) => Detected::Opaque,
    };
    Ok((Rewind::new(first.freeze(), stream), detected))
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test]
    async fn the_bytes_read_to_detect_are_read_again() {
        let (mut client, server) = duplex(64);
        client.write_all(b"GET /x HTTP/1.1\r\n\r\n").await.unwrap();
        drop(client);
        let (mut rewound, detected) = detect(server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(detected, Detected::Http1);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET /x HTTP/1.1\r\n\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        let (_client, server) = duplex(64);
        let (_, detected) = detect(server, Duration::from_millis(500)).await.unwrap();
        assert_eq!(detected, Detected::Opaque);
    }

    #[tokio::test]
    async fn a_client_that_closes_early_is_opaque() {
        let (mut client, server) = duplex(64);
        client.write_all(b"GE").await.unwrap();
        drop(client);
        let (mut rewound, detected) = detect(server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(detected, Detected::Opaque);
        let mut all = Vec::new();
        rewound.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GE");
    }
}
