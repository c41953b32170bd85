//! The connection to the application behind one client connection, opened for the first
//! allowed request and reused by the next ones: HTTP/1.1 for an HTTP/1 client, HTTP/2
//! (prior knowledge) for an HTTP/2 client, so gRPC stays gRPC.

use http::{Request, Response, Version};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::Mutex;
use tracing::debug;

use super::Connection;
use crate::proxy::{entry, socket::SocketError};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the application: {0}")]
    Connect(#[from] SocketError),
    #[error("HTTP to the application failed: {0}")]
    Http(#[from] hyper::Error),
}

enum Sender {
    Http1(http1::SendRequest<Incoming>),
    Http2(http2::SendRequest<Incoming>),
}

impl Sender {
    fn usable_for(&self, version: Version) -> bool {
        match self {
            Self::Http1(s) => version != Version::HTTP_2 && !s.is_closed(),
            Self::Http2(s) => version == Version::HTTP_2 && !s.is_closed(),
        }
    }
}

/// The application side of one client connection.
#[derive(Default)]
pub struct Upstream {
    /// Held across an HTTP/1 exchange (one request at a time, as on the client side);
    /// only while cloning the sender for HTTP/2.
    sender: Mutex<Option<Sender>>,
}

impl Upstream {
    /// Sends `request` to the application, connecting first if there is no usable
    /// connection.
    pub async fn send(
        &self,
        conn: &Connection,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut slot = self.sender.lock().await;
        let sender = match slot.take() {
            Some(sender) if sender.usable_for(request.version()) => sender,
            _ => open(conn, request.version()).await?,
        };
        match sender {
            Sender::Http2(sender) => {
                let mut shared = sender.clone();
                *slot = Some(Sender::Http2(sender));
                drop(slot);
                Ok(shared.send_request(request).await?)
            }
            Sender::Http1(mut sender) => {
                let sent = match sender.ready().await {
                    Ok(()) => sender.send_request(request).await,
                    Err(error) => Err(error),
                };
                *slot = Some(Sender::Http1(sender));
                Ok(sent?)
            }
        }
    }
}

async fn open(conn: &Connection, version: Version) -> Result<Sender, UpstreamError> {
    let stream = entry::connect(&conn.shared, &conn.pod, &conn.peer, conn.destination).await?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    let key = conn.pod.key.clone();
    if version == Version::HTTP_2 {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(workload = %key, %error, "HTTP/2 connection to the application ended");
            }
        });
        Ok(Sender::Http2(sender))
    } else {
        let (sender, connection) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                debug!(workload = %key, %error, "HTTP/1 connection to the application ended");
            }
        });
        Ok(Sender::Http1(sender))
    }
}
