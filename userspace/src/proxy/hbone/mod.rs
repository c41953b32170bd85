//! HBONE: application connections tunnelled between node proxies as HTTP/2 `CONNECT`
//! streams (`:authority` = the original `ip:port`) over mutual TLS, on port 15008.
//! [`client`] opens streams over pooled connections; [`server`] terminates them in the
//! destination pod.

pub mod baggage;
pub mod client;
pub mod refusal;
pub mod request;
pub mod server;
pub mod trace_context;

use std::{sync::Arc, time::Duration};

use crate::{
    proxy::{connections::CloseReason, limits::Exceeded, socket::SocketError},
    tls::TlsError,
};

/// HTTP/2 flow-control windows of both sides. The protocol's default (64 KiB per stream)
/// caps one stream at a window per round trip; a tunnel carries bulk transfers, so each
/// stream gets room for a few milliseconds of a fast link.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// One stream's window for the whole connection: a lone stream runs as it would alone,
/// the streams of one connection share it, and a connection can make its receiver hold at
/// most this much that the application has not read (the server counts connections
/// against `--max-hbone-connections-per-*`, so that is bounded per peer and per pod).
const CONNECTION_WINDOW: u32 = STREAM_WINDOW;
/// Larger DATA frames than the default 16 KiB mean fewer frames, headers and wake-ups.
const MAX_FRAME: u32 = 1024 * 1024;
/// A `CONNECT` and its answer carry a few short headers; a peer may not make the proxy
/// buffer more (hyper's default is 16 MiB).
pub const MAX_HEADERS: u32 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    #[error("the destination proxy answered {0}")]
    Status(http::StatusCode),
    #[error("bad CONNECT request: {0}")]
    Request(#[from] http::Error),
    #[error("no HBONE connection within {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake not done within {0:?}")]
    HandshakeTimeout(Duration),
    /// The outcome of a connect shared by every stream that waited for it.
    #[error(transparent)]
    Setup(Arc<HboneError>),
    #[error(transparent)]
    Limit(#[from] Exceeded),
    /// The destination proxy refused the connection past one of its limits.
    #[error("the destination proxy refused the connection: {0}")]
    Refused(Exceeded),
}

impl HboneError {
    pub fn reason(&self) -> CloseReason {
        match self {
            Self::Socket(_) | Self::Timeout(_) => CloseReason::ConnectFailed,
            // The destination proxy answers 401 for a refusal, 503 when the application
            // refused.
            Self::Status(status) if *status == http::StatusCode::UNAUTHORIZED => {
                CloseReason::Denied
            }
            Self::Status(status) if *status == http::StatusCode::SERVICE_UNAVAILABLE => {
                CloseReason::ConnectFailed
            }
            Self::Tls(_)
            | Self::Http(_)
            | Self::Status(_)
            | Self::Request(_)
            | Self::HandshakeTimeout(_) => CloseReason::TunnelFailed,
            Self::Setup(error) => error.reason(),
            Self::Limit(_) | Self::Refused(_) => CloseReason::Limit,
        }
    }
}
