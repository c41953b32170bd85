//! Refusing an HBONE connection for the price of a few bytes: past a connection limit the
//! server answers with its half of the HTTP/2 preface (a SETTINGS frame allowing no
//! stream) and a `GOAWAY` (`ENHANCE_YOUR_CALM`, the limit's name as debug data), then
//! closes. No HTTP/2 connection is built, so nothing the peer sends is buffered.
//! [`named_in`] reads the limit back on the client side.

use std::{io, time::Duration};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proxy::limits::Exceeded;

/// Frame types, setting and error code of RFC 9113 (sections 6.5, 6.5.2, 6.8 and 7).
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// What the server reads and drops after its `GOAWAY`, waiting for the peer to close:
/// closing with the peer's bytes unread would reset the connection, and a reset can
/// discard the `GOAWAY` before the peer has read it.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Writes the refusal for `exceeded` on `stream` (a TLS stream: then `close_notify`),
/// and waits for the peer to close, all within `within`.
pub async fn refuse<S>(mut stream: S, exceeded: Exceeded, within: Duration) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let refused = async {
        stream.write_all(&frames(exceeded)).await?;
        stream.shutdown().await?;
        let (mut sink, mut drained) = ([0; 4096], 0);
        while drained < DRAIN_LIMIT {
            match stream.read(&mut sink).await? {
                0 => break,
                read => drained += read,
            }
        }
        Ok(())
    };
    tokio::time::timeout(within, refused)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// The limit a server's refusal named, from the error a client's HTTP/2 connection ended
/// with. h2 shows a `GOAWAY`'s debug data only in its error's text, as `(b"…")`.
pub fn named_in(error: &(dyn std::error::Error + 'static)) -> Option<Exceeded> {
    let text = std::iter::successors(Some(error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ");
    REFUSALS
        .into_iter()
        .find(|exceeded| text.contains(&format!("(b\"{}\")", exceeded.code())))
}

/// The limits a server refuses a whole connection for.
const REFUSALS: [Exceeded; 2] = [
    Exceeded::HboneConnectionsPerSource,
    Exceeded::HboneConnectionsPerWorkload,
];

/// The server's SETTINGS (no stream may open) and a `GOAWAY` refusing every stream.
fn frames(exceeded: Exceeded) -> Vec<u8> {
    let mut frames = Vec::new();
    let mut settings = SETTINGS_MAX_CONCURRENT_STREAMS.to_be_bytes().to_vec();
    settings.extend_from_slice(&0u32.to_be_bytes());
    frame(&mut frames, SETTINGS, &settings);
    // Last stream 0: the peer knows none of its streams was processed.
    let mut goaway = 0u32.to_be_bytes().to_vec();
    goaway.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    goaway.extend_from_slice(exceeded.code().as_bytes());
    frame(&mut frames, GOAWAY, &goaway);
    frames
}

/// A frame on the connection (stream 0), without flags.
fn frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    // One setting, or a limit's name: far below the 16 KiB a frame may always carry.
    let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, 0]);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;

    #[tokio::test]
    async fn an_http2_client_reads_the_refusal_and_the_limit_it_names() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let refusing = tokio::spawn(refuse(
            server,
            Exceeded::HboneConnectionsPerSource,
            Duration::from_secs(5),
        ));
        let (mut sender, connection) =
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake::<_, Empty<Bytes>>(TokioIo::new(client))
                .await
                .unwrap();
        let connection = tokio::spawn(connection);
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(Empty::new())
            .unwrap();
        assert!(sender.send_request(request).await.is_err());
        let error = connection.await.unwrap().unwrap_err();
        assert_eq!(named_in(&error), Some(Exceeded::HboneConnectionsPerSource));
        // h2 words ENHANCE_YOUR_CALM as "detected excessive load generating behavior".
        let source = error.source().map(ToString::to_string).unwrap_or_default();
        assert!(
            source.contains("excessive load") && source.contains("hbone-connections-per-source"),
            "{error}: {source}"
        );
        // The client has closed, which ends the refusal.
        refusing.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_closes_is_given_up_on() {
        let (_client, server) = tokio::io::duplex(64 * 1024);
        let error = refuse(
            server,
            Exceeded::HboneConnectionsPerWorkload,
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }
}
