//! Per-request authorization on an admitted inbound connection, for ports where the pod's
//! policies look at HTTP attributes. hyper serves the client's HTTP/1.1 or HTTP/2; each
//! request is decided against the configuration in force by the same function `explain`
//! asks ([`Admission::authorize_request`]); a denied request is answered by the proxy
//! (403 `RBAC: access denied`, 401 naming why a JWT was rejected, 400 for a malformed
//! request; a gRPC client gets the matching gRPC status) and never reaches the application;
//! an allowed one is forwarded over a connection to the application opened from inside the
//! pod with the client's IP, and reused. An upgrade (WebSocket) is authorized as the
//! request that asks for it, then relayed as bytes.
//!
//! On a port whose protocol is not declared, the first bytes decide: a client that does not
//! speak HTTP is authorized as opaque TCP, where rules that need HTTP never allow.

mod counted;
mod respond;
pub(super) mod rewind;
mod upstream;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response, StatusCode, Uri, Version, request::Parts};
use http_body_util::Either;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::{
    PodProxy, Shared,
    connections::{Close, CloseReason, ConnectionGuard, RequestLog, RequestOutcome, RequestRecord},
    entry,
    forward::{self, Recheck},
    hbone,
};
use crate::admission::{
    Admission, Handling, Peer, Refusal, RequestDenied, RequestPermit,
    normalize::{FramingError, check_framing},
    protocol::Detected,
};
use crate::{
    metrics::labels::{RequestProtocol, ResponseFlags},
    policy::{Permit, Verdict, authz::ACCESS_DENIED},
};
use respond::Body;
pub use respond::forwarded_client_cert;
use upstream::{Upstream, UpstreamError};

/// How long a client on a port of undeclared protocol has to send its first bytes before
/// its connection is taken as opaque TCP (a protocol where the server speaks first).
const DETECT_WITHIN: Duration = Duration::from_millis(500);
/// HTTP/1 request head limit (request line and headers).
const MAX_HEAD: usize = 64 * 1024;

/// One client connection served request by request.
pub struct Connection {
    pub pod: Arc<PodProxy>,
    pub shared: Shared,
    pub peer: Peer,
    pub destination: SocketAddr,
    /// The `X-Forwarded-Client-Cert` the application gets on a mutual TLS connection.
    pub forwarded_client_cert: Option<HeaderValue>,
    requests: RequestLog,
    upstream: Upstream,
}

impl Connection {
    pub fn new(
        pod: Arc<PodProxy>,
        shared: Shared,
        admission: &Admission,
        forwarded_client_cert: Option<HeaderValue>,
        record: &ConnectionGuard,
    ) -> Self {
        Self {
            pod,
            shared,
            peer: admission.peer.clone(),
            destination: admission.destination,
            forwarded_client_cert,
            requests: record.requests(),
            upstream: Upstream::default(),
        }
    }
}

/// Serves `client` per request (or, when it turns out not to speak HTTP on a port of
/// undeclared protocol, as opaque TCP) until it closes or a new configuration refuses it.
pub async fn serve<C>(
    client: C,
    admission: Admission,
    conn: Connection,
    record: &mut ConnectionGuard,
) where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (client, detected) = match admission.handling {
        Handling::Detect => match rewind::detect(client, DETECT_WITHIN).await {
            Ok(detected) => detected,
            Err(error) => return record.finish(Close::new(CloseReason::Io, &error)),
        },
        Handling::Requests | Handling::Connection(_) => (
            rewind::Rewind::new(bytes::Bytes::new(), client),
            Detected::Http1,
        ),
    };
    let conn = Arc::new(conn);
    let recheck = |whole| Recheck {
        applied: conn.shared.applied.clone(),
        pod: &conn.pod,
        peer: &conn.peer,
        destination: conn.destination,
        whole,
    };
    if detected == Detected::Opaque {
        match admission.authorize_connection() {
            Ok(permit) => record.permitted(&permit),
            Err(refusal) => {
                record.refused(&refusal);
                return record.finish(Close::new((&refusal).into(), &refusal));
            }
        }
        let upstream = entry::connect(&conn.shared, &conn.pod, &conn.peer, conn.destination);
        match upstream.await {
            Ok(upstream) => {
                let budget = conn.pod.counters.buffers(&conn.shared.limits);
                let lanes = &conn.shared.lanes;
                let recheck = Some(recheck(true));
                forward::relay(client, upstream, budget, lanes, record, recheck).await;
            }
            Err(error) => record.finish(Close::new(CloseReason::ConnectFailed, &error)),
        }
        return;
    }
    let limits = &conn.shared.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_buf_size(MAX_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.streams_per_connection)
        .max_header_list_size(hbone::MAX_HEADERS);
    let service = {
        let conn = Arc::clone(&conn);
        service_fn(move |request| {
            let conn = Arc::clone(&conn);
            async move { Ok::<_, Infallible>(handle(request, &conn).await) }
        })
    };
    let client = counted::Counted::new(client, record.shared_traffic());
    let served = builder.serve_connection_with_upgrades(TokioIo::new(client), service);
    let close = tokio::select! {
        served = served => match served {
            Ok(()) => Close::done(),
            Err(error) => Close::new(CloseReason::Io, &error),
        },
        refusal = recheck(false).refused() => forward::closed_by(record, &refusal),
    };
    record.finish(close);
}

/// Why the proxy answers a request itself.
#[derive(Debug, thiserror::Error)]
enum Answer {
    /// HTTP/1 framing that the application could read differently (request smuggling).
    #[error("bad request: {0}")]
    Framing(#[from] FramingError),
    #[error(transparent)]
    Request(#[from] RequestDenied),
    /// The configuration in force no longer admits the connection.
    #[error(transparent)]
    Connection(#[from] Refusal),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl Answer {
    fn status(&self) -> StatusCode {
        match self {
            Self::Request(denied) => denied.status(),
            Self::Framing(_) => StatusCode::BAD_REQUEST,
            Self::Connection(Refusal::NotServed(_)) | Self::Upstream(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Connection(_) => StatusCode::FORBIDDEN,
        }
    }

    /// `response_flags`: refused by policy, or the application could not be reached.
    fn flags(&self) -> ResponseFlags {
        match self {
            Self::Request(RequestDenied::Denied(_)) | Self::Connection(Refusal::Denied { .. }) => {
                ResponseFlags::Deny
            }
            Self::Upstream(_) => ResponseFlags::Connect,
            Self::Framing(_) | Self::Request(_) | Self::Connection(_) => ResponseFlags::None,
        }
    }

    /// The policy's verdict, when a policy denied.
    fn verdict(&self) -> Option<&Verdict> {
        match self {
            Self::Request(RequestDenied::Denied(denied))
            | Self::Connection(Refusal::Denied { denied, .. }) => Some(denied.verdict()),
            _ => None,
        }
    }

    /// What the client reads: Envoy's text for a denial, the reason for the rest.
    fn message(&self) -> String {
        match self {
            Self::Request(RequestDenied::Denied(denied))
            | Self::Connection(Refusal::Denied { denied, .. }) => denied.body(),
            _ if self.status() == StatusCode::FORBIDDEN => ACCESS_DENIED.to_owned(),
            _ => self.to_string(),
        }
    }
}

/// Decides one request and answers it, from the application or from the proxy.
async fn handle(mut request: Request<Incoming>, conn: &Connection) -> Response<Body> {
    let started = Instant::now();
    let grpc = respond::is_grpc(request.headers());
    let upgrade = respond::wants_upgrade(request.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    let method = parts.method.to_string();
    let (response, path, verdict) = match decide(conn, &mut parts) {
        Ok(permit) => {
            respond::prepare_headers(
                &mut parts.headers,
                upgrade,
                conn.forwarded_client_cert.as_ref(),
            );
            let forwarded = Request::from_parts(parts_for_upstream(parts, conn), body);
            let path = forwarded.uri().path().to_owned();
            let (response, failed) = match conn.upstream.send(conn, forwarded).await {
                Ok(mut response) => {
                    if let Some(downstream) = downstream_upgrade
                        && response.status() == StatusCode::SWITCHING_PROTOCOLS
                    {
                        tunnel(downstream, hyper::upgrade::on(&mut response));
                    }
                    (response.map(Either::Left), None)
                }
                Err(error) => {
                    debug!(workload = %conn.pod.key, %error, "request to the application failed");
                    let answer = Answer::from(error);
                    let response = respond::answer(answer.status(), &answer.message(), grpc);
                    (response, Some(answer))
                }
            };
            (response, path, Ok((permit.0, failed)))
        }
        Err(answer) => {
            let response = respond::answer(answer.status(), &answer.message(), grpc);
            (response, parts.uri.path().to_owned(), Err(answer))
        }
    };
    let status = response.status();
    conn.requests.record(request_outcome(
        method, path, status, grpc, &verdict, started,
    ));
    response
}

/// What is recorded of a request answered `status`: allowed with its permit (and the
/// answer when the application could not be reached), or the proxy's answer.
fn request_outcome<'v>(
    method: String,
    path: String,
    status: StatusCode,
    grpc: bool,
    verdict: &'v Result<(Permit, Option<Answer>), Answer>,
    started: Instant,
) -> RequestOutcome<'v> {
    let (decided, flags, reason) = match verdict {
        Ok((permit, failed)) => (
            Some(permit.verdict()),
            failed.as_ref().map_or(ResponseFlags::None, Answer::flags),
            permit.verdict().reason.to_string(),
        ),
        Err(answer) => (answer.verdict(), answer.flags(), answer.to_string()),
    };
    let record = RequestRecord {
        method,
        path,
        status: status.as_u16(),
        allowed: verdict.is_ok(),
        policy: decided
            .and_then(|v| v.policy.as_ref())
            .map(ToString::to_string),
        rule: decided.and_then(|v| v.rule),
        reason,
    };
    RequestOutcome {
        record,
        verdict: decided,
        protocol: if grpc {
            RequestProtocol::Grpc
        } else {
            RequestProtocol::Http
        },
        flags,
        started,
    }
}

/// Admits the connection again against the configuration in force, then decides the
/// request, editing it into what the application will receive.
fn decide(conn: &Connection, parts: &mut Parts) -> Result<RequestPermit, Answer> {
    if parts.version < Version::HTTP_2 {
        check_framing(&parts.headers)?;
    }
    let admission = entry::admit(&conn.shared, &conn.pod, &conn.peer, conn.destination)?;
    Ok(admission.authorize_request(parts)?)
}

/// The request as the application gets it: origin-form for HTTP/1, absolute for HTTP/2
/// (its `:scheme` and `:authority`), defaulting to the destination address.
fn parts_for_upstream(mut parts: Parts, conn: &Connection) -> Parts {
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let uri = if parts.version == Version::HTTP_2 {
        let authority = parts
            .uri
            .authority()
            .map_or_else(|| conn.destination.to_string(), ToString::to_string);
        let scheme = parts.uri.scheme_str().unwrap_or("http");
        Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path_and_query)
            .build()
    } else {
        Uri::builder().path_and_query(path_and_query).build()
    };
    if let Ok(uri) = uri {
        parts.uri = uri;
    }
    parts
}

/// Relays the two upgraded connections as bytes once both sides have switched.
fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (Ok(downstream), Ok(upstream)) = tokio::join!(downstream, upstream) else {
            return;
        };
        let mut downstream = TokioIo::new(downstream);
        let mut upstream = TokioIo::new(upstream);
        let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
    });
}
