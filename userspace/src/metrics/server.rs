//! The metrics listener (`--metrics-addr`, by default `0.0.0.0:15020` in the node's
//! network namespace). It is the one listener besides the data path that is reachable
//! from off the node, so it serves nothing but `GET /metrics` (and `/stats/prometheus`,
//! Istio's path for the same), to a bounded number of connections, each with deadlines.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tracing::debug;

use crate::proxy::connections::ConnectionLog;

/// Scrapers served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection is kept, keep-alive included: a scraper reconnects.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// The paths that answer.
const PATHS: [&str; 2] = ["/metrics", "/stats/prometheus"];
const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Serves scrapes of `connections`' metrics on `listener`, forever.
pub async fn serve(listener: TcpListener, connections: Arc<ConnectionLog>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "metrics: too many connections; closing");
            continue;
        };
        let connections = Arc::clone(&connections);
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request| {
                let connections = Arc::clone(&connections);
                async move { Ok::<_, Infallible>(answer(&request, &connections)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // Past its lifetime the connection is dropped, and so closed.
            if let Ok(Err(error)) = tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                debug!(%peer, %error, "metrics connection failed");
            }
        });
    }
}

fn answer(request: &Request<Incoming>, connections: &ConnectionLog) -> Response<Full<Bytes>> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, path) if PATHS.contains(&path) => {
            connections.report_traffic();
            let text = connections.metrics().encode();
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(CONTENT_TYPE),
            );
            return response;
        }
        (_, path) if PATHS.contains(&path) => (StatusCode::METHOD_NOT_ALLOWED, "GET only\n"),
        _ => (StatusCode::NOT_FOUND, "only /metrics is served here\n"),
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
