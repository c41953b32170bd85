//! A small HTTP server for the test bed, in the spirit of httpbin: `/ip` answers the peer
//! address it sees (`{"origin":"10.0.0.2"}`), `/headers` the request headers, anything
//! else `200 ok`. Usage: `ambit-httpbin PORT`.

use std::net::{Ipv4Addr, SocketAddr};

use axum::{
    Json, Router,
    extract::ConnectInfo,
    http::HeaderMap,
    routing::{any, get},
};
use serde_json::{Map, Value, json};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: ambit-httpbin PORT"))?
        .parse()?;
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
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}
