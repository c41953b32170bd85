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
//! and the copy ends when both directions have. A copy may also stop between two chunks
//! when it proves bulk, to go on in another lane ([`super::lanes`]) from where each
//! direction stood ([`Directions`]).

use std::{
    cell::RefCell,
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    sync::Notify,
};

use super::{
    lanes::Streak,
    limits::{BufferBudget, GaugePermit},
};

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

/// Where each direction of a relay stands between two chunks: its buffer, whether it
/// ended, and how bulk it has been. What a relay carries when it changes lanes.
pub struct Directions {
    sent: OneWay,
    received: OneWay,
}

impl Directions {
    /// Both directions at their start, with buffers grown within `budget` (the
    /// workload's).
    pub fn new(budget: &BufferBudget) -> Self {
        Self {
            sent: OneWay::new(budget),
            received: OneWay::new(budget),
        }
    }
}

/// How [`copy`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// Both directions reached end of stream.
    Done,
    /// One direction proved bulk ([`Streak`]) and both stopped between two chunks: nothing
    /// read is left unwritten, and the copy may go on elsewhere.
    Bulk,
}

/// Copies `client` ⇄ `server` from where `directions` stand until both reached end of
/// stream or, with `stop_when_bulk`, until one proves bulk.
pub async fn copy<C, S>(
    client: &mut C,
    server: &mut S,
    directions: &mut Directions,
    traffic: &Traffic,
    stop_when_bulk: bool,
) -> io::Result<Copied>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    let stop = stop_when_bulk.then(Notify::new);
    let Directions { sent, received } = directions;
    let (sent_end, received_end) = tokio::try_join!(
        sent.copy(client_read, server_write, &traffic.sent, stop.as_ref()),
        received.copy(server_read, client_write, &traffic.received, stop.as_ref()),
    )?;
    Ok(match (sent_end, received_end) {
        (Copied::Done, Copied::Done) => Copied::Done,
        _ => Copied::Bulk,
    })
}

/// One direction: its buffer, whether it passed the end of stream on, and its streak.
struct OneWay {
    buffer: Buffer,
    ended: bool,
    streak: Streak,
}

impl OneWay {
    fn new(budget: &BufferBudget) -> Self {
        Self {
            buffer: Buffer::new(budget.clone()),
            ended: false,
            streak: Streak::default(),
        }
    }

    /// Copies until the end of stream, passed on as a half-close; with `stop`, returns
    /// [`Copied::Bulk`] between two chunks once this direction proved bulk (and tells the
    /// other one through `stop`) or the other did.
    async fn copy<R, W>(
        &mut self,
        mut from: R,
        mut to: W,
        counter: &AtomicU64,
        stop: Option<&Notify>,
    ) -> io::Result<Copied>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        while !self.ended {
            let read = self.buffer.read_from(&mut from);
            // A pending read has taken nothing from `from` (AsyncRead's contract): giving
            // it up loses no data.
            let (n, waited) = match stop {
                Some(stop) => tokio::select! {
                    read = read => read?,
                    () = stop.notified() => return Ok(Copied::Bulk),
                },
                None => read.await?,
            };
            if n == 0 {
                to.shutdown().await?;
                self.ended = true;
                break;
            }
            to.write_all(&self.buffer.bytes[..n]).await?;
            // TLS and HTTP/2 streams hold data until flushed.
            to.flush().await?;
            counter.fetch_add(n as u64, Ordering::Relaxed);
            if n == self.buffer.bytes.len() {
                self.buffer.grow();
            }
            if let Some(stop) = stop
                && self.streak.read(n, waited)
            {
                stop.notify_one();
                return Ok(Copied::Bulk);
            }
        }
        Ok(Copied::Done)
    }
}

/// One direction's buffer and what it is charged.
///
/// Invariants: `bytes` is empty (waiting for data), [`INITIAL_BUFFER`] long, or grown
/// beyond it; `charge` holds `bytes.len() - INITIAL_BUFFER` of the budget when grown,
/// none otherwise.
struct Buffer {
    bytes: Vec<u8>,
    budget: BufferBudget,
    charge: Option<GaugePermit>,
}

impl Buffer {
    fn new(budget: BufferBudget) -> Self {
        Self {
            bytes: Vec::new(),
            budget,
            charge: None,
        }
    }

    /// Reads from `from` into `self.bytes[..n]` and returns `n`, and whether it had to
    /// wait for data; a grown buffer that waits [`SHRINK_AFTER`] for data is given back
    /// first.
    async fn read_from<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> io::Result<(usize, bool)> {
        let mut waited = false;
        if self.bytes.len() > INITIAL_BUFFER {
            // A read still pending has taken nothing from `from` (AsyncRead's contract),
            // so giving it up for a read into a smaller buffer loses no data.
            let read = read_noting_wait(from, &mut self.bytes, &mut waited);
            match tokio::time::timeout(SHRINK_AFTER, read).await {
                Ok(read) => return Ok((read?, waited)),
                Err(_idle) => self.shrink(),
            }
        }
        let n = std::future::poll_fn(|cx| {
            let polled = self.poll_read_small(from, cx);
            waited |= polled.is_pending();
            polled
        })
        .await?;
        Ok((n, waited))
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

/// Reads from `from` into `buffer`; sets `waited` when no data was there at first.
async fn read_noting_wait<R: AsyncRead + Unpin>(
    from: &mut R,
    buffer: &mut [u8],
    waited: &mut bool,
) -> io::Result<usize> {
    let mut read = ReadBuf::new(buffer);
    std::future::poll_fn(|cx| {
        let polled = Pin::new(&mut *from).poll_read(cx, &mut read);
        *waited |= polled.is_pending();
        polled
    })
    .await?;
    Ok(read.filled().len())
}

#[cfg(test)]
mod tests;
