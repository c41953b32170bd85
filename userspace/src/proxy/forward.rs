//! Copying bytes between the accepted connection and the upstream one.

use std::time::Duration;

use tokio::net::TcpStream;

use super::connections::ConnectionGuard;

/// Copies both ways until both sides have closed; a half-close on one side is passed on
/// to the other. Byte counts land in the connection record.
pub async fn copy_both_ways(
    mut downstream: TcpStream,
    mut upstream: TcpStream,
    record: &mut ConnectionGuard,
) {
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((sent, received)) => record.finish(sent, received, None),
        Err(error) => record.finish(0, 0, Some(error.to_string())),
    }
}

/// Closes `stream` with a reset rather than a FIN, so the client sees the refusal the
/// upstream gave (or the policy's) instead of an empty, successful connection.
pub fn reset(stream: TcpStream) {
    let socket = socket2::SockRef::from(&stream);
    let _ = socket.set_linger(Some(Duration::ZERO));
    drop(stream);
}
