use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::*;
use crate::proxy::limits::BufferBudget;

#[test]
fn a_request_and_its_answer_never_prove_bulk() {
    let mut streak = Streak::default();
    // 1-byte round trips, or 64 KiB answers, for ever: every read waits for its data.
    for _ in 0..100_000 {
        assert!(!streak.read(1, true));
        assert!(!streak.read(64 * 1024, true));
    }
}

#[test]
fn reads_that_keep_finding_data_prove_bulk() {
    let mut streak = Streak::default();
    let chunk = 256 * 1024;
    let reads = BULK_AFTER as usize / chunk;
    for _ in 1..reads {
        assert!(!streak.read(chunk, false));
    }
    assert!(streak.read(chunk, false));
}

#[test]
fn a_wait_starts_the_streak_again() {
    let mut streak = Streak::default();
    let half = BULK_AFTER as usize / 2;
    assert!(!streak.read(half, false));
    assert!(
        !streak.read(half - 1, true),
        "the read that waited starts a new streak"
    );
    assert!(!streak.read(half - 1, false));
    assert!(streak.read(2, false));
}

/// A connected pair on loopback: the proxy's end wrapped, the peer's plain.
async fn pair() -> (ProxyStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connect = TcpStream::connect(listener.local_addr().unwrap());
    let (peer, accepted) = tokio::join!(connect, listener.accept());
    (ProxyStream::new(accepted.unwrap().0), peer.unwrap())
}

/// Relays through `lanes`: a small exchange, then `payload` from the client, then the
/// server's last word after the client's half-close. Returns what the server got, what
/// the client got back after the exchange, and the relay's counters.
async fn relay(lanes: Lanes, payload: &[u8]) -> (Vec<u8>, Vec<u8>, Arc<Traffic>) {
    let (client, mut client_peer) = pair().await;
    let (server, mut server_peer) = pair().await;
    let traffic = Arc::new(Traffic::default());
    let budget = BufferBudget::new(Arc::default(), 4 * 1024 * 1024);
    let copy = tokio::spawn({
        let traffic = Arc::clone(&traffic);
        async move {
            let directions = Directions::new(&budget);
            lanes.copy(client, server, directions, traffic).await
        }
    });
    let client_side = async {
        client_peer.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        client_peer.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
        client_peer.write_all(payload).await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).await.unwrap();
        back
    };
    let server_side = async {
        let mut ping = [0u8; 4];
        server_peer.read_exact(&mut ping).await.unwrap();
        server_peer.write_all(b"pong").await.unwrap();
        let mut got = ping.to_vec();
        server_peer.read_to_end(&mut got).await.unwrap();
        server_peer.write_all(b"done").await.unwrap();
        server_peer.shutdown().await.unwrap();
        got
    };
    let (back, got) = tokio::join!(client_side, server_side);
    copy.await.unwrap().unwrap();
    (got, back, traffic)
}

#[tokio::test]
async fn a_bulk_relay_moves_to_the_bulk_lane_and_loses_nothing() {
    let lanes = Lanes::start(1).unwrap();
    let payload: Vec<u8> = (0..32 * BULK_AFTER).map(|i| (i % 251) as u8).collect();
    let (got, back, traffic) = relay(lanes.clone(), &payload).await;
    assert!(
        got[..4] == *b"ping" && got[4..] == payload[..],
        "every byte, in order"
    );
    assert_eq!(back, b"done", "half-close and the answer after it");
    let sent = traffic.sent.load(Ordering::Relaxed);
    assert_eq!(sent, 4 + payload.len() as u64, "counted on both lanes");
    assert_eq!(traffic.received.load(Ordering::Relaxed), 8);
    assert_eq!(lanes.moved(), 1, "the relay proved bulk and moved");
}

#[tokio::test]
async fn without_a_bulk_lane_a_bulk_relay_stays() {
    let lanes = Lanes::main_only();
    let payload = vec![7u8; 8 * BULK_AFTER as usize];
    let (got, back, _) = relay(lanes.clone(), &payload).await;
    assert_eq!(got.len(), 4 + payload.len());
    assert_eq!(back, b"done");
    assert_eq!(lanes.moved(), 0);
}

#[tokio::test]
async fn a_small_exchange_stays_on_the_main_runtime() {
    let lanes = Lanes::start(1).unwrap();
    let (got, back, _) = relay(lanes.clone(), b"small").await;
    assert_eq!(got, b"pingsmall");
    assert_eq!(back, b"done");
    assert_eq!(lanes.moved(), 0);
}
