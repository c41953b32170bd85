//! Copying bytes between the two halves of a proxied connection.
//!
//! Each direction has its own buffer. It starts at [`INITIAL_BUFFER`], so an idle
//! connection costs little; it doubles (up to [`MAX_BUFFER`], the bound per direction)
//! whenever a read fills it, so bulk transfers use few system calls; and it goes back to
//! the initial size once the direction has been idle for [`SHRINK_AFTER`], so a
//! connection that once moved bulk data does not keep its buffer for the rest of its life.
//! What a buffer holds beyond the initial size is charged to the workload's
//! [`BufferBudget`]: past the budget a stream keeps the buffer it has (slower, never
//! refused), so one workload's streams cannot take the node proxy's memory.
//!
//! An end of stream on one side is passed on as a half-close (`shutdown`) of the other,
//! and the copy ends when both directions have.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::limits::{BufferBudget, GaugePermit};

const INITIAL_BUFFER: usize = 1024;
const MAX_BUFFER: usize = 256 * 1024;
/// A direction with nothing to read for this long gives its grown buffer back.
const SHRINK_AFTER: Duration = Duration::from_secs(1);

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
/// Invariant: `charge` holds `bytes.len() - INITIAL_BUFFER` of the budget (none at the
/// initial size).
struct Buffer<'a> {
    bytes: Vec<u8>,
    budget: &'a BufferBudget,
    charge: Option<GaugePermit>,
}

impl<'a> Buffer<'a> {
    fn new(budget: &'a BufferBudget) -> Self {
        Self {
            bytes: vec![0; INITIAL_BUFFER],
            budget,
            charge: None,
        }
    }

    /// Reads from `from` into the buffer; a grown buffer that waits [`SHRINK_AFTER`]
    /// for data goes back to the initial size first.
    async fn read_from<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> io::Result<usize> {
        if self.bytes.len() == INITIAL_BUFFER {
            return from.read(&mut self.bytes).await;
        }
        // A read still pending has taken nothing from `from` (AsyncRead's contract), so
        // giving it up for a read into a smaller buffer loses no data.
        match tokio::time::timeout(SHRINK_AFTER, from.read(&mut self.bytes)).await {
            Ok(read) => read,
            Err(_idle) => {
                self.shrink();
                from.read(&mut self.bytes).await
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
        self.bytes = vec![0; INITIAL_BUFFER];
        self.charge = None;
    }
}

#[cfg(test)]
mod tests;
