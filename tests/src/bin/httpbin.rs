//! A small HTTP server for the test bed, in the spirit of httpbin: `/ip` answers the peer
//! address it sees (`{"origin":"10.0.0.2"}`), `/headers` the request headers, anything
//! else `200 ok`. Usage: `ambit-httpbin PORT [BIND_IP]`; `BIND_IP` defaults to
//! `0.0.0.0`, and `::` listens dual-stack (IPv4 and IPv6).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::{
    Json, Router,
    extract::ConnectInfo,
    http::HeaderMap,
    routing::{any, get},
};
use serde_json::{Map, Value, json};

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
                Json(json!({ "origin": peer.ip().to_string() }))
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
        .fallback(any(|| async { "ok\n" }));
    let listener = tokio::net::TcpListener::bind((bind, port)).await?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
