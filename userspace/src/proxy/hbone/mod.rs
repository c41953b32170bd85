//! HBONE: application connections tunnelled between node proxies as HTTP/2 `CONNECT`
//! streams (`:authority` = the original `ip:port`) over mutual TLS, on port 15008.
//! [`client`] opens streams over pooled connections; [`server`] terminates them in the
//! destination pod.

pub mod client;
pub mod server;

use crate::{proxy::socket::SocketError, tls::TlsError};

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
}
