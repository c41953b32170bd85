//! The server side of HBONE (15008): terminates mutual TLS with the certificate of the pod
//! whose listener accepted, then serves HTTP/2 `CONNECT` streams, each one application
//! connection.
//!
//! Per connection: a handshake slot (per workload and per source IP) → TLS within the
//! handshake timeout → a count of established connections (per workload and per peer:
//! its verified identity at its address; past either limit, a [`refusal`]) → streams,
//! until the connection has been idle (no stream open) for the idle timeout, or the first
//! stream has not come within the handshake timeout, or the client's certificate expires,
//! or the agent drains (the peer then opens its next connection to the agent that took
//! over); then `GOAWAY`. Per stream: only `CONNECT` to this pod's
//! own application (400 otherwise) → admission with the peer's verified identity and the
//! limits (401 if refused) → for a connection authorized as a whole, connect to the
//! application from inside the pod with the client's IP (503 if it refuses) → 200, then
//! [`inbound::deliver`] until either side closes or a new configuration refuses the
//! connection.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::debug;

use super::{HboneError, baggage, refusal, request, trace_context::TraceParent};
use crate::{
    admission::Peer,
    peers::Client,
    proxy::{
        Accepted, PodProxy, Shared,
        connections::{Close, CloseReason, Path, TunnelMetadata},
        entry::{self, EntryError},
        inbound, l7,
        limits::{Gauge, GaugePermit, HbonePeer, Source},
    },
    tls::MeshAcceptor,
};

/// How often a dead peer is probed with HTTP/2 PINGs, and how long it has to answer.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused connection is kept for the peer to read why and close.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Serves the pod's HBONE listener until the pod is released.
pub async fn serve(listener: tokio::net::TcpListener, pod: Arc<PodProxy>, shared: Shared) {
    crate::proxy::accept_loop(
        listener,
        "hbone",
        pod,
        shared,
        |accepted, pod, shared| async move {
            let peer = accepted.peer;
            let metrics = Arc::clone(shared.connections.metrics());
            match serve_connection(accepted, Arc::clone(&pod), shared).await {
                Ok(()) => {}
                Err(HboneError::Limit(exceeded)) => {
                    metrics.hbone_refused(exceeded);
                    debug!(workload = %pod.key, %peer, limit = exceeded.code(), %exceeded, "HBONE connection refused");
                }
                Err(error) => debug!(workload = %pod.key, %peer, %error, "HBONE connection failed"),
            }
        },
    )
    .await
}

async fn serve_connection(
    accepted: Accepted,
    pod: Arc<PodProxy>,
    shared: Shared,
) -> Result<(), HboneError> {
    let Accepted {
        stream,
        peer: client,
        descriptor: _descriptor,
    } = accepted;
    let limits = Arc::clone(&shared.limits);
    let permits = pod
        .counters
        .handshake(&limits, client.ip())
        .and_then(|handshake| {
            let connection = pod.counters.inbound(&limits, &Source::Ip(client.ip()))?;
            Ok((handshake, connection))
        });
    let (handshake, _connection) = match permits {
        Ok(permits) => permits,
        Err(exceeded) => {
            stream.reset();
            return Err(exceeded.into());
        }
    };
    // The deadline covers waiting for the pod's first certificate too: with the CA down,
    // connections must not pile up waiting for it.
    let handshake_done = async {
        let acceptor = pod
            .acceptor
            .get_or_try_init(|| MeshAcceptor::for_workload(&shared.identities, &pod.identity))
            .await?;
        acceptor.accept(stream).await
    };
    let (tls, verified) = tokio::time::timeout(limits.handshake_timeout, handshake_done)
        .await
        .map_err(|_| HboneError::HandshakeTimeout(limits.handshake_timeout))??;
    drop(handshake);
    let counted = HbonePeer {
        identity: verified.id().clone(),
        ip: client.ip(),
    };
    // Each connection may hold a receive window of what the application has not read:
    // counting connections bounds that memory per peer and per workload.
    let _established = match pod.counters.hbone_connection(&limits, &counted) {
        Ok(permit) => permit,
        Err(exceeded) => {
            let linger = limits.handshake_timeout.min(REFUSAL_LINGER);
            if let Err(error) = refusal::refuse(tls, exceeded, linger).await {
                debug!(peer = %verified.id(), %error, "HBONE refusal not read");
            }
            return Err(exceeded.into());
        }
    };
    let peer = Arc::new(Peer {
        identity: Some(verified.id().clone()),
        ip: client.ip(),
    });
    let source = Arc::new(Source::Identity(verified.id().clone()));
    let principal: Arc<str> = Arc::from(verified.id().to_string());
    let forwarded_client_cert =
        l7::forwarded_client_cert(&pod.identity, verified.fingerprint(), verified.id());
    let activity = Arc::new(Activity::default());
    let drain = shared.drain.clone();
    let service = {
        let activity = Arc::clone(&activity);
        service_fn(move |request| {
            let (pod, shared, peer) = (Arc::clone(&pod), shared.clone(), Arc::clone(&peer));
            let (source, open) = (Arc::clone(&source), activity.open());
            let (principal, forwarded_client_cert) =
                (Arc::clone(&principal), forwarded_client_cert.clone());
            async move {
                let stream = Stream {
                    client,
                    peer,
                    principal,
                    source,
                    open,
                    forwarded_client_cert,
                };
                let status = open_stream(request, stream, pod, shared).await;
                let mut response = Response::new(Empty::<Bytes>::new());
                *response.status_mut() = status;
                Ok::<_, Infallible>(response)
            }
        })
    };
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(limits.streams_per_connection)
        .initial_stream_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::MAX_FRAME)
        .max_header_list_size(super::MAX_HEADERS)
        .serve_connection(TokioIo::new(tls), service);
    let mut connection = std::pin::pin!(connection);
    let ended = activity.ended(
        limits.handshake_timeout,
        limits.hbone_idle_timeout,
        verified.not_after(),
    );
    let ended = async {
        tokio::select! {
            why = ended => why,
            () = drain.started() => "the agent drains",
        }
    };
    tokio::select! {
        served = connection.as_mut() => served?,
        why = ended => {
            debug!(peer = %verified.id(), why, "closing HBONE connection (GOAWAY)");
            connection.as_mut().graceful_shutdown();
            connection.await?;
        }
    }
    Ok(())
}

/// The streams of one connection, to tell when it has gone idle.
#[derive(Default)]
struct Activity {
    open: Arc<Gauge>,
    /// Streams ever opened: a stream that came and went between two looks still counts.
    opened: AtomicU64,
}

impl Activity {
    /// Counts a stream until the permit is dropped (its relay ended or it was refused).
    fn open(&self) -> GaugePermit {
        self.opened.fetch_add(1, Ordering::AcqRel);
        self.open.add(1)
    }

    /// Resolves, with the reason, when the connection should be closed: no first stream
    /// within `first`, no stream open for `idle`, or the client's certificate expired.
    async fn ended(&self, first: Duration, idle: Duration, not_after: SystemTime) -> &'static str {
        let expires = tokio::time::sleep(
            not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        );
        let mut expires = std::pin::pin!(expires);
        let tick = first
            .min(idle)
            .clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut ticks = tokio::time::interval(tick);
        let (mut last_busy, mut seen, mut limit) = (Instant::now(), 0, first);
        loop {
            tokio::select! {
                () = &mut expires => return "client certificate expired",
                _ = ticks.tick() => {}
            }
            let opened = self.opened.load(Ordering::Acquire);
            if opened != seen || self.open.held() > 0 {
                (seen, last_busy, limit) = (opened, Instant::now(), idle);
            } else if last_busy.elapsed() >= limit {
                return if opened == 0 {
                    "no request in time"
                } else {
                    "idle"
                };
            }
        }
    }
}

/// Who a stream comes from, and its count on the connection.
struct Stream {
    client: std::net::SocketAddr,
    peer: Arc<Peer>,
    /// The peer's verified identity as a label value.
    principal: Arc<str>,
    /// The verified identity, which the stream is counted against.
    source: Arc<Source>,
    open: GaugePermit,
    /// The peer's identity as the application sees it on HTTP requests.
    forwarded_client_cert: Option<http::HeaderValue>,
}

/// Handles one `CONNECT` stream and returns the status to answer; on 200 the relay runs
/// on its own task, holding the stream's counts until it ends.
async fn open_stream(
    mut request: Request<Incoming>,
    stream: Stream,
    pod: Arc<PodProxy>,
    shared: Shared,
) -> StatusCode {
    let Stream {
        client,
        peer,
        principal,
        source,
        open,
        forwarded_client_cert,
    } = stream;
    let destination = match request::connect_target(request.method(), request.uri(), &pod.ips) {
        Ok(target) => target,
        Err(error) => {
            debug!(workload = %pod.key, %error, "bad HBONE request");
            return StatusCode::BAD_REQUEST;
        }
    };
    let claimed = baggage::parse(request.headers());
    let client_of = Client {
        addr: client,
        identity: peer.identity.as_ref().map(|id| (id, &principal)),
        baggage: Some(&claimed),
    };
    let applied = Arc::clone(&shared.applied.borrow());
    let mut record = inbound::open(
        &shared,
        &applied.peers,
        &pod,
        Path::HboneInbound,
        &client_of,
        destination,
        TunnelMetadata {
            trace_id: TraceParent::from_headers(request.headers()).map(|t| t.trace_id),
            forwarded_for: baggage::forwarded_for(request.headers()),
        },
    );
    let entered = match entry::enter(&shared, &applied, &pod, &peer, &source, destination).await {
        Ok(entered) => entered,
        Err(error) => {
            debug!(workload = %pod.key, %error, "HBONE stream refused or failed");
            inbound::refused(&mut record, &error);
            return match error {
                EntryError::Refused(_) | EntryError::Limit(_) => StatusCode::UNAUTHORIZED,
                EntryError::Upstream(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
        }
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let _open = open;
        let tunnel = match upgrade.await {
            Ok(tunnel) => TokioIo::new(tunnel),
            Err(error) => return record.finish(Close::new(CloseReason::Io, &error)),
        };
        inbound::deliver(
            tunnel,
            entered,
            pod,
            shared,
            forwarded_client_cert,
            &mut record,
        )
        .await;
    });
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    fn far() -> SystemTime {
        SystemTime::now() + Duration::from_secs(24 * 3600)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_first_stream_ends_after_the_handshake_timeout() {
        let activity = Activity::default();
        let start = tokio::time::Instant::now();
        assert_eq!(
            activity.ended(FIRST, IDLE, far()).await,
            "no request in time"
        );
        assert!(start.elapsed() >= FIRST && start.elapsed() < FIRST + Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_ends_only_after_its_streams_have_been_idle() {
        let activity = Arc::new(Activity::default());
        let stream = activity.open();
        let watcher = {
            let activity = Arc::clone(&activity);
            tokio::spawn(async move { activity.ended(FIRST, IDLE, far()).await })
        };
        tokio::time::sleep(IDLE * 3).await;
        assert!(!watcher.is_finished(), "ended while a stream was open");
        let closed = tokio::time::Instant::now();
        drop(stream);
        assert_eq!(watcher.await.unwrap(), "idle");
        // Activity is looked at once a tick (at most a second).
        assert!(closed.elapsed() >= IDLE - Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_ends_when_the_client_certificate_expires() {
        let activity = Activity::default();
        let _stream = activity.open();
        let expiry = SystemTime::now() + Duration::from_secs(5);
        assert_eq!(
            activity.ended(FIRST, IDLE, expiry).await,
            "client certificate expired"
        );
    }
}
