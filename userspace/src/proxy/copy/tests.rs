use std::sync::Arc;

use tokio::io::{AsyncReadExt, duplex};

use super::*;

/// Copies `client` ⇄ `server` until both directions reached end of stream, on the
/// current runtime.
async fn copy_both_ways<C, S>(
    mut client: C,
    mut server: S,
    traffic: &Traffic,
    budget: &BufferBudget,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut directions = Directions::new(budget);
    let copied = copy(&mut client, &mut server, &mut directions, traffic, false).await?;
    assert_eq!(copied, Copied::Done);
    Ok(())
}

/// A budget with room for `limit` bytes beyond the initial buffers.
fn budget(limit: usize) -> BufferBudget {
    BufferBudget::new(Arc::default(), limit)
}

#[tokio::test]
async fn copies_both_ways_and_passes_half_close_on() {
    let (client, mut client_peer) = duplex(1024);
    let (server, mut server_peer) = duplex(1024);
    let traffic = Traffic::default();
    let budget = budget(MAX_BUFFER);
    let copy = copy_both_ways(client, server, &traffic, &budget);
    let peers = async {
        client_peer.write_all(b"hello").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        server_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello", "server sees the data, then the half-close");
        // The other direction still works after the client half-closed.
        server_peer.write_all(b"world!").await.unwrap();
        server_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
    };
    let (copied, ()) = tokio::join!(copy, peers);
    copied.unwrap();
    assert_eq!(traffic.sent.load(Ordering::Relaxed), 5);
    assert_eq!(traffic.received.load(Ordering::Relaxed), 6);
}

/// Copies `payload` from a client to a server through [`copy_both_ways`] with `budget`.
async fn bulk(payload: &[u8], budget: &BufferBudget) -> Vec<u8> {
    let (client, mut client_peer) = duplex(MAX_BUFFER);
    let (server, mut server_peer) = duplex(MAX_BUFFER);
    let traffic = Traffic::default();
    let copy = copy_both_ways(client, server, &traffic, budget);
    let peers = async {
        let writer = async {
            client_peer.write_all(payload).await.unwrap();
            client_peer.shutdown().await.unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            server_peer.read_to_end(&mut got).await.unwrap();
            server_peer.shutdown().await.unwrap();
            got
        };
        tokio::join!(writer, reader).1
    };
    let (copied, got) = tokio::join!(copy, peers);
    copied.unwrap();
    assert_eq!(traffic.sent.load(Ordering::Relaxed), payload.len() as u64);
    got
}

#[tokio::test]
async fn a_bulk_stream_is_copied_whole_and_gives_its_budget_back() {
    let budget = budget(MAX_BUFFER);
    let payload: Vec<u8> = (0..4 * MAX_BUFFER).map(|i| i as u8).collect();
    assert_eq!(bulk(&payload, &budget).await, payload);
    assert_eq!(budget.held(), 0, "the charge goes with the buffer");
}

#[tokio::test]
async fn a_spent_budget_slows_a_stream_but_does_not_break_it() {
    let budget = budget(0);
    let payload = vec![7u8; 4 * MAX_BUFFER];
    assert_eq!(bulk(&payload, &budget).await, payload);
}

/// Fills `buffer` from a reader holding `available` bytes, then grows it if the read
/// filled it, as the copy does.
async fn read_and_grow(buffer: &mut Buffer, available: usize) -> usize {
    let data = vec![1u8; available];
    let (n, _) = buffer.read_from(&mut &data[..]).await.unwrap();
    if n == buffer.bytes.len() {
        buffer.grow();
    }
    n
}

#[tokio::test]
async fn buffers_start_small_and_grow_only_while_reads_fill_them() {
    let budget = budget(MAX_BUFFER);
    let mut buffer = Buffer::new(budget.clone());
    assert!(buffer.bytes.is_empty(), "no buffer before there is data");
    read_and_grow(&mut buffer, 10).await;
    assert_eq!(
        buffer.bytes.len(),
        INITIAL_BUFFER,
        "a short read does not grow it"
    );
    for _ in 0..20 {
        read_and_grow(&mut buffer, MAX_BUFFER).await;
    }
    assert_eq!(buffer.bytes.len(), MAX_BUFFER, "bounded per direction");
    assert_eq!(budget.held(), MAX_BUFFER - INITIAL_BUFFER);
}

#[tokio::test]
async fn growth_stops_at_the_workload_budget() {
    // Room for 1 KiB → 2 KiB → 4 KiB (1 + 2 KiB), not for the next 4 KiB.
    let budget = budget(3 * INITIAL_BUFFER);
    let mut buffer = Buffer::new(budget.clone());
    for _ in 0..10 {
        read_and_grow(&mut buffer, MAX_BUFFER).await;
    }
    assert_eq!(buffer.bytes.len(), 4 * INITIAL_BUFFER);
    assert_eq!(budget.held(), 3 * INITIAL_BUFFER);
    let mut other = Buffer::new(budget.clone());
    read_and_grow(&mut other, MAX_BUFFER).await;
    assert_eq!(
        other.bytes.len(),
        INITIAL_BUFFER,
        "the workload's other streams too"
    );
    drop(buffer);
    assert_eq!(budget.held(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_idle_direction_gives_its_grown_buffer_back() {
    let budget = budget(MAX_BUFFER);
    let mut buffer = Buffer::new(budget.clone());
    for _ in 0..4 {
        read_and_grow(&mut buffer, MAX_BUFFER).await;
    }
    assert_eq!(buffer.bytes.len(), 16 * INITIAL_BUFFER);
    let (mut writer, mut reader) = duplex(64);
    let read = async { buffer.read_from(&mut reader).await.unwrap().0 };
    let late = async {
        tokio::time::sleep(SHRINK_AFTER * 2).await;
        writer.write_all(b"late").await.unwrap();
    };
    let (n, ()) = tokio::join!(read, late);
    assert_eq!(n, 4, "the data that came after the idle time is read");
    assert_eq!(&buffer.bytes[..4], b"late");
    assert_eq!(buffer.bytes.len(), INITIAL_BUFFER);
    assert_eq!(budget.held(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_direction_waiting_for_data_holds_no_buffer() {
    let budget = budget(MAX_BUFFER);
    let mut buffer = Buffer::new(budget.clone());
    let (mut writer, mut reader) = duplex(64);
    writer.write_all(b"first").await.unwrap();
    assert_eq!(buffer.read_from(&mut reader).await.unwrap(), (5, false));
    assert_eq!(buffer.bytes.len(), INITIAL_BUFFER);
    let waited = tokio::time::timeout(SHRINK_AFTER / 10, buffer.read_from(&mut reader)).await;
    assert!(waited.is_err(), "nothing to read yet");
    assert_eq!(
        buffer.bytes.capacity(),
        0,
        "the wait gave the buffer back at once"
    );
    writer.write_all(b"second").await.unwrap();
    assert_eq!(
        buffer.read_from(&mut reader).await.unwrap(),
        (6, false),
        "the data was there when read"
    );
    assert_eq!(
        &buffer.bytes[..6],
        b"second",
        "read through the scratch buffer"
    );
    assert_eq!(buffer.bytes.len(), INITIAL_BUFFER);
    writer.shutdown().await.unwrap();
    assert_eq!(buffer.read_from(&mut reader).await.unwrap().0, 0);
    assert_eq!(budget.held(), 0);
}
