//! A small HTTP server for the test bed, in the spirit of httpbin: `/ip` answers the peer
//! address it sees (`{"origin":"10.0.0.2"}`), `/headers` the request headers,
//! `/status/{code}` an empty answer with that status, `/echo` with `Connection: Upgrade`
//! and `Upgrade: echo` switches protocols (`101`) and echoes every byte until the client
//! closes, anything else `200 ok`. HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on the
//! same port. Every request is logged as one line on stdout,
//! `REQ <METHOD> <path-and-query> <HTTP/1.1|HTTP/2.0>`, so that a test can tell which
//! requests reached the application.
//!
//! Usage: `ambit-httpbin PORT [BIND_IP]`; `BIND_IP` defaults to `0.0.0.0`, and `::`
//! listens dual-stack (IPv4 and IPv6).

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Path, Request},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{any, get},
};
use hyper::{body::Incoming, service::Service as _, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The `Upgrade` protocol `/echo` accepts.
const ECHO_PROTOCOL: &str = "echo";

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: ambit-httpbin PORT [BIND_IP]"))?
        .parse()?;
    let bind: IpAddr = match args.next() {
        Some(ip) => ip.parse()?,
        None => Ipv4Addr::UNSPECIFIED.into(),
    };
    let app = Router::new()
        .route(
            "/ip",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                // Listening on `::`, an IPv4 client shows as `::ffff:a.b.c.d`.
                Json(json!({ "origin": peer.ip().to_canonical().to_string() }))
            }),
        )
        .route(
            "/headers",
            get(|headers: HeaderMap| async move {
                let headers: Map<String, Value> = headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
                    .collect();
                Json(json!({ "headers": headers }))
            }),
        )
        .route("/status/{code}", any(status))
        .route("/echo", any(echo))
        .fallback(any(|| async { "ok\n" }))
        .layer(middleware::from_fn(log_request));
    let listener = tokio::net::TcpListener::bind((bind, port)).await?;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // A passing error (a connection reset before it was accepted, descriptors run
            // out) must not stop the server; the pause keeps it from spinning meanwhile.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let router = TowerToHyperService::new(app.clone());
        let service = service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.call(request)
        });
        tokio::spawn(async move {
            // The auto builder tells the HTTP/2 preface (prior knowledge) from HTTP/1.1,
            // whose upgrades `/echo` needs. A connection's errors end only that connection.
            let _ = Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Writes `REQ <METHOD> <path-and-query> <version>` before handing the request on.
async fn log_request(request: Request, next: Next) -> Response {
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let line = format!(
        "REQ {} {target} {:?}\n",
        request.method(),
        request.version()
    );
    // Flushed per line: stdout may be a file a test reads while the server runs, and the
    // server is killed rather than stopped.
    // A log nobody can write must not change the answer, so errors are ignored. The lock
    // is not `Send`: its scope ends before the await.
    {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout
            .write_all(line.as_bytes())
            .and_then(|()| stdout.flush());
    }
    next.run(request).await
}

/// `/status/{code}`: an empty answer with that status; `400` for a code that is not one.
async fn status(Path(code): Path<u16>) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
}

/// `/echo`: with `Connection: Upgrade` and `Upgrade: echo`, answers `101` and then echoes
/// the upgraded connection's bytes until the client closes; `400` without them.
async fn echo(mut request: Request) -> Response {
    let headers = request.headers();
    let asks_upgrade = header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, ECHO_PROTOCOL);
    if !asks_upgrade {
        return (StatusCode::BAD_REQUEST, "expected Upgrade: echo\n").into_response();
    }
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        // Fails when the client goes away before the switch: nothing to echo then.
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut io = TokioIo::new(upgraded);
        let mut buf = [0u8; 16 * 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = io.shutdown().await;
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static(ECHO_PROTOCOL)),
        ],
    )
        .into_response()
}

/// Whether a comma-separated header lists `token` (case-insensitively).
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}
