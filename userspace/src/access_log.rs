//! Access logs: one JSON line per connection when it closes, and per request on ports
//! authorized request by request, naming both ends (workloads, principals, addresses),
//! the bytes each way, the duration, the authorization decision with its policy, and why
//! the connection closed as a stable code ([`CloseReason`]).
//!
//! `--access-log stdout` (the default), `FILE` (appended to), or `off`, which still
//! writes refusals to stdout: a refusal is always logged. The data path hands entries to
//! a bounded channel and never waits: a writer thread serializes and writes them, and
//! what does not fit in the channel is dropped and counted
//! (`ambit_access_log_dropped_total`).

use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus_client::metrics::counter::Counter;
use serde::{Serialize, Serializer};
use tokio::sync::mpsc;
use tracing::warn;

use crate::{
    peers::End,
    proxy::connections::{CloseReason, Decided, Direction, Path, TunnelMetadata},
};

/// Entries waiting for the writer; past this the data path drops them.
const QUEUE: usize = 4096;
/// After writing what it found, the writer rests this long before it looks again: lines
/// reach the log in batches at most this late, and a busy node's data path wakes the
/// writer thread a few dozen times a second instead of once per connection (a wake-up
/// and a switch of threads cost more than writing the line). [`QUEUE`] entries per rest
/// is ~80,000 lines a second before any is dropped.
const REST: Duration = Duration::from_millis(50);

/// Where `--access-log` sends the lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Only refusals, to stdout.
    Off,
    Stdout,
    File(PathBuf),
}

impl FromStr for Target {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(match value {
            "off" => Self::Off,
            "stdout" => Self::Stdout,
            path => Self::File(PathBuf::from(path)),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("cannot open the access log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the access log's writer thread: {0}")]
    Writer(std::io::Error),
}

/// The data path's handle on the writer. Cloning shares it.
#[derive(Clone)]
pub struct AccessLog {
    queue: Option<mpsc::Sender<Message>>,
    /// `--access-log off`: refusals only.
    refusals_only: bool,
    dropped: Counter,
}

impl AccessLog {
    /// Opens `target` and starts its writer thread.
    pub fn start(target: &Target, dropped: Counter) -> Result<Self, AccessLogError> {
        let out: Box<dyn Write + Send> = match target {
            Target::Off | Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError::Open {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        let (queue, entries) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("access-log".to_owned())
            .spawn(move || write_entries(entries, out))
            .map_err(AccessLogError::Writer)?;
        Ok(Self {
            queue: Some(queue),
            refusals_only: *target == Target::Off,
            dropped,
        })
    }

    /// Writes nothing (unit tests).
    pub fn disabled() -> Self {
        Self {
            queue: None,
            refusals_only: false,
            dropped: Counter::default(),
        }
    }

    /// Queues `entry` for the writer, or drops (and counts) it when the queue is full.
    pub fn write(&self, entry: Entry) {
        let Some(queue) = &self.queue else {
            return;
        };
        if self.refusals_only && !entry.is_refusal() {
            return;
        }
        if queue.try_send(Message::Entry(entry)).is_err() {
            self.dropped.inc();
        }
    }

    /// Writes out what is queued, waiting at most `timeout`: before the agent exits, so
    /// the last lines do not go with the process.
    pub fn flush(&self, timeout: Duration) {
        let Some(queue) = &self.queue else {
            return;
        };
        let (done, flushed) = std::sync::mpsc::sync_channel(1);
        if queue.try_send(Message::Flush(done)).is_ok() {
            let _ = flushed.recv_timeout(timeout);
        }
    }
}

/// Flushes the access log when dropped: the agent holds one for as long as it runs, so
/// whichever way it ends, its last lines are written first.
pub struct FlushOnExit(pub AccessLog);

impl Drop for FlushOnExit {
    fn drop(&mut self) {
        self.0.flush(Duration::from_secs(1));
    }
}

/// What the writer thread is handed. Nearly every message is an entry, so boxing it to
/// shrink the rare flush would only add an allocation per line.
#[allow(clippy::large_enum_variant)]
enum Message {
    Entry(Entry),
    /// Write what came before and flush, then say so.
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// Serializes and writes entries until every handle is gone, flushing whenever the queue
/// runs dry and then resting for [`REST`].
fn write_entries(mut entries: mpsc::Receiver<Message>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(out);
    let mut failing = false;
    while let Some(message) = entries.blocking_recv() {
        let dry = entries.is_empty();
        let written = match message {
            Message::Entry(entry) => serde_json::to_writer(&mut out, &entry)
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"))
                .and_then(|()| match dry {
                    true => out.flush(),
                    false => Ok(()),
                }),
            Message::Flush(done) => {
                let flushed = out.flush();
                let _ = done.send(());
                flushed
            }
        };
        if dry {
            std::thread::sleep(REST);
        }
        match written {
            Ok(()) => failing = false,
            // Once per outage, not once per line.
            Err(error) if !failing => {
                failing = true;
                warn!(%error, "cannot write the access log");
            }
            Err(_) => {}
        }
    }
}

/// One line of the access log.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    Connection(ConnectionEntry),
    Request(RequestEntry),
}

impl Entry {
    /// Refused by policy: by authorization, or plaintext to a STRICT mTLS port.
    pub fn is_refusal(&self) -> bool {
        let common = match self {
            Self::Connection(c) => &c.common,
            Self::Request(r) => &r.common,
        };
        common.decision.as_ref().is_some_and(|d| !d.allowed)
            || matches!(self, Self::Connection(c)
                if matches!(c.close_reason, CloseReason::Denied | CloseReason::MtlsRequired))
    }
}

/// What connection and request lines share.
#[derive(Debug, Serialize)]
pub struct Common {
    /// When the connection closed, or the request was answered (RFC 3339, UTC).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub direction: Direction,
    /// The hop through the proxy (`hbone`, `same-node`, `plaintext`, `hbone-inbound`,
    /// `same-node-inbound`, `plaintext-inbound`).
    pub path: Path,
    pub source: Side,
    pub destination: Side,
    /// The Service hostname, when one was reached or the destination serves one.
    pub service: Option<Arc<str>>,
    pub mtls: bool,
    #[serde(flatten)]
    pub tunnel: TunnelMetadata,
    /// The authorization decision (inbound: the destination's proxy decides).
    #[serde(flatten)]
    pub decision: Option<Decided>,
}

/// One end of a connection.
#[derive(Debug, Serialize)]
pub struct Side {
    pub address: SocketAddr,
    pub workload: Option<Arc<str>>,
    pub namespace: Option<Arc<str>>,
    /// The SPIFFE ID, on mutual TLS.
    pub principal: Option<Arc<str>>,
}

impl Side {
    pub fn new(address: SocketAddr, end: &End, mtls: bool) -> Self {
        Self {
            address,
            workload: end.name().cloned(),
            namespace: end.namespace().cloned(),
            principal: end.principal.clone().filter(|_| mtls),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ConnectionEntry {
    #[serde(flatten)]
    pub common: Common,
    /// Client to destination.
    pub bytes_sent: u64,
    /// Destination to client.
    pub bytes_received: u64,
    pub duration_ms: u64,
    pub close_reason: CloseReason,
    /// What went wrong, in words, when something did.
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RequestEntry {
    #[serde(flatten)]
    pub common: Common,
    pub method: String,
    /// As authorized and forwarded (normalized, without the query).
    pub request_path: String,
    /// The application's status, or the proxy's own answer.
    pub status: u16,
    /// Until the response's headers.
    pub duration_ms: u64,
}

fn rfc3339<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    use time::{OffsetDateTime, format_description::well_known::Rfc3339};
    let text = OffsetDateTime::from(*time)
        .format(&Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    serializer.serialize_str(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{peers::WorkloadInfo, proxy::hbone::trace_context::TraceParent};

    fn entry(allowed: Option<bool>, reason: CloseReason) -> Entry {
        let sleep = End {
            workload: Some(Arc::new(WorkloadInfo {
                name: Some(Arc::from("sleep")),
                kind: crate::peers::WorkloadKind::Pod,
                namespace: Arc::from("foo"),
                app: None,
                version: Arc::from("latest"),
                principal: None,
                baggage: None,
            })),
            principal: Some(Arc::from("spiffe://cluster.local/ns/foo/sa/sleep")),
        };
        Entry::Connection(ConnectionEntry {
            common: Common {
                time: SystemTime::UNIX_EPOCH,
                direction: Direction::Inbound,
                path: Path::HboneInbound,
                source: Side::new("10.0.0.2:40000".parse().unwrap(), &sleep, true),
                destination: Side::new("10.0.0.3:8000".parse().unwrap(), &End::default(), true),
                service: None,
                mtls: true,
                tunnel: TunnelMetadata {
                    trace_id: TraceParent::parse(
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                    )
                    .map(|t| t.trace_id),
                    forwarded_for: "10.0.0.2".parse().ok(),
                },
                decision: allowed.map(|allowed| Decided {
                    allowed,
                    policy: Some("bar/deny-foo".into()),
                    rule: Some(0),
                }),
            },
            bytes_sent: 10,
            bytes_received: 20,
            duration_ms: 3,
            close_reason: reason,
            error: None,
        })
    }

    #[test]
    fn a_connection_line_is_flat_json_with_stable_codes() {
        let line = serde_json::to_value(entry(Some(false), CloseReason::Denied)).unwrap();
        assert_eq!(line["kind"], "connection");
        assert_eq!(line["time"], "1970-01-01T00:00:00Z");
        assert_eq!(line["path"], "hbone-inbound");
        assert_eq!(line["source"]["workload"], "sleep");
        assert_eq!(
            line["source"]["principal"],
            "spiffe://cluster.local/ns/foo/sa/sleep"
        );
        assert_eq!(line["destination"]["workload"], serde_json::Value::Null);
        assert_eq!(line["decision"], "deny");
        assert_eq!(line["policy"], "bar/deny-foo");
        assert_eq!(line["close_reason"], "denied");
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(line["forwarded_for"], "10.0.0.2");
        assert_eq!(
            (line["bytes_sent"].as_u64(), line["bytes_received"].as_u64()),
            (Some(10), Some(20))
        );
    }

    #[test]
    fn refusals_are_told_apart() {
        assert!(entry(Some(false), CloseReason::Denied).is_refusal());
        assert!(entry(None, CloseReason::MtlsRequired).is_refusal());
        assert!(!entry(Some(true), CloseReason::Done).is_refusal());
        assert!(!entry(None, CloseReason::ConnectFailed).is_refusal());
    }

    #[test]
    fn a_flush_writes_every_line_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(&Target::File(path.clone()), Counter::default()).unwrap();
        for _ in 0..3 {
            log.write(entry(Some(true), CloseReason::Done));
        }
        log.flush(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[tokio::test]
    async fn off_writes_refusals_only_and_a_full_queue_counts_drops() {
        let (queue, mut entries) = mpsc::channel(1);
        let log = AccessLog {
            queue: Some(queue),
            refusals_only: true,
            dropped: Counter::default(),
        };
        log.write(entry(Some(true), CloseReason::Done));
        assert!(
            entries.try_recv().is_err(),
            "an allowed connection is not logged"
        );
        log.write(entry(Some(false), CloseReason::Denied));
        log.write(entry(Some(false), CloseReason::Denied));
        assert!(entries.try_recv().is_ok());
        assert_eq!(log.dropped.get(), 1);
    }
}
