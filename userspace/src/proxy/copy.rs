//! Copying bytes between the two halves of a proxied connection.
//!
//! Each direction has its own buffer. It is [`INITIAL_BUFFER`] long while the direction
//! has data, and none at all while it waits for data: a read that finds nothing gives the
//! small buffer back, and the next one reads into a scratch buffer of the thread, so an
//! idle connection holds no buffer. It doubles (up to [`MAX_BUFFER`], the bound per
//! direction) whenever a read fills it, so bulk transfers use few system calls; and a
//! grown buffer is given back once the direction has been idle for [`SHRINK_AFTER`], so a
//! connection that once moved bulk data does not keep its buffer for the rest of its life.
//! What a buffer holds beyond the initial size is charged to the workload's
//! [`BufferBudget`]: past the budget a stream keeps the buffer it has (slower, never
//! refused), so one workload's streams cannot take the node proxy's memory.
//!
//! An end of stream on one side is passed on as a half-close (`shutdown`) of the other,
//! and the copy ends when both directions have.

use std::{
    cell::RefCell,
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::limits::{BufferBudget, GaugePermit};

const INITIAL_BUFFER: usize = 1024;
const MAX_BUFFER: usize = 256 * 1024;
/// A direction with nothing to read for this long gives its grown buffer back.
const SHRINK_AFTER: Duration = Duration::from_secs(1);

thread_local! {
    /// Where a direction without a buffer reads: only for the length of one `poll_read`,
    /// so every direction polled on this thread can use it in turn.
    static SCRATCH: RefCell<[u8; INITIAL_BUFFER]> = const { RefCell::new([0; INITIAL_BUFFER]) };
}

/// Bytes moved so far, readable while the copy runs.
#[derive(Debug, Default)]
pub struct Traffic {
    /// From the client towards the destination.
    pub sent: AtomicU64,
    /// From the destination back to the client.
    pub received: AtomicU64,
}

/// Copies `client` ⇄ `server` until both directions reached end of stream, growing
/// buffers only as far as `budget` allows.
pub async fn copy_both_ways<C, S>(
    client: C,
    server: S,
    traffic: &Traffic,
    budget: &BufferBudget,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite,
    S: AsyncRead + AsyncWrite,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    tokio::try_join!(
        copy_one_way(client_read, server_write, &traffic.sent, budget),
        copy_one_way(server_read, client_write, &traffic.received, budget),
    )?;
    Ok(())
}

async fn copy_one_way<R, W>(
    mut from: R,
    mut to: W,
    counter: &AtomicU64,
    budget: &BufferBudget,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = Buffer::new(budget);
    loop {
        let n = buffer.read_from(&mut from).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer.bytes[..n]).await?;
        // TLS and HTTP/2 streams hold data until flushed.
        to.flush().await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if n == buffer.bytes.len() {
            buffer.grow();
        }
    }
}

/// One direction's buffer and what it is charged.
///
/// Invariants: `bytes` is empty (waiting for data), [`INITIAL_BUFFER`] long, or grown
/// beyond it; `charge` holds `bytes.len() - INITIAL_BUFFER` of the budget when grown,
/// none otherwise.
struct Buffer<'a> {
    bytes: Vec<u8>,
    budget: &'a BufferBudget,
    charge: Option<GaugePermit>,
}

impl<'a> Buffer<'a> {
    fn new(budget: &'a BufferBudget) -> Self {
        Self {
            bytes: Vec::new(),
            budget,
            charge: None,
        }
    }

    /// Reads from `from` into `self.bytes[..n]` and returns `n`; a grown buffer that
    /// waits [`SHRINK_AFTER`] for data is given back first.
    async fn read_from<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> io::Result<usize> {
        if self.bytes.len() > INITIAL_BUFFER {
            // A read still pending has taken nothing from `from` (AsyncRead's contract),
            // so giving it up for a read into a smaller buffer loses no data.
            match tokio::time::timeout(SHRINK_AFTER, from.read(&mut self.bytes)).await {
                Ok(read) => return read,
                Err(_idle) => self.shrink(),
            }
        }
        std::future::poll_fn(|cx| self.poll_read_small(from, cx)).await
    }

    /// A read at the initial size that holds a buffer only once there is data: into the
    /// buffer if it has one, which it gives back when nothing is there, else into the
    /// thread's scratch buffer, copied into a new one when something was read.
    fn poll_read_small<R: AsyncRead + Unpin>(
        &mut self,
        from: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.bytes.is_empty() {
            // Never borrowed twice: no `poll_read` of a stream polls another copy.
            return SCRATCH.with_borrow_mut(|scratch| {
                let mut read = ReadBuf::new(scratch);
                ready!(Pin::new(from).poll_read(cx, &mut read))?;
                let filled = read.filled();
                if !filled.is_empty() {
                    self.bytes = vec![0; INITIAL_BUFFER];
                    self.bytes[..filled.len()].copy_from_slice(filled);
                }
                Poll::Ready(Ok(filled.len()))
            });
        }
        let mut read = ReadBuf::new(&mut self.bytes);
        match Pin::new(from).poll_read(cx, &mut read) {
            Poll::Ready(result) => Poll::Ready(result.map(|()| read.filled().len())),
            Poll::Pending => {
                self.bytes = Vec::new();
                Poll::Pending
            }
        }
    }

    /// Doubles the buffer, if it is below the maximum and the budget has room.
    fn grow(&mut self) {
        let len = self.bytes.len();
        if len >= MAX_BUFFER {
            return;
        }
        let Some(more) = self.budget.charge(len) else {
            return;
        };
        match &mut self.charge {
            Some(charge) => charge.absorb(more),
            None => self.charge = Some(more),
        }
        // A new allocation rather than a resize: the old contents are already sent.
        self.bytes = vec![0; len * 2];
    }

    fn shrink(&mut self) {
        self.bytes = Vec::new();
        self.charge = None;
    }
}

#[cfg(test)]
mod tests;
