//! The proxy's own record of the connections it handles: live ones, a bounded history of
//! closed ones, and per-workload counters. Served by the admin API (`/connections`,
//! `/workloads`).

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use super::copy::Traffic;

/// Closed connections kept for inspection.
const HISTORY: usize = 1024;
/// The latest requests kept per connection authorized request by request.
const REQUESTS_KEPT: usize = 16;

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// The hop a connection took through the proxy.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// Outbound, forwarded in plaintext to the original destination.
    Plaintext,
    /// Inbound through the plaintext listener (15006), forwarded to the application.
    PlaintextInbound,
    /// Outbound through an HBONE tunnel (mutual TLS, HTTP/2 CONNECT) to the destination's
    /// node proxy.
    Hbone,
    /// Inbound through the HBONE listener (15008), forwarded to the application.
    HboneInbound,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConnectionRecord {
    pub id: u64,
    pub direction: Direction,
    pub path: Path,
    /// `namespace/name` of the pod whose listener accepted it.
    pub workload: String,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// Milliseconds since the Unix epoch.
    pub opened_ms: u64,
    pub closed_ms: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub error: Option<String>,
    /// On a connection authorized request by request, the latest decisions (oldest first).
    #[serde(skip_serializing_if = "VecDeque::is_empty")]
    pub requests: VecDeque<RequestRecord>,
}

/// One request's decision, on a connection authorized request by request.
#[derive(Clone, Debug, Serialize)]
pub struct RequestRecord {
    pub method: String,
    /// The path as authorized and forwarded (normalized, without the query).
    pub path: String,
    /// What the client was answered: the application's status, or the proxy's own
    /// (400, 401, 403, 503).
    pub status: u16,
    pub allowed: bool,
    /// `namespace/name` of the deciding policy.
    pub policy: Option<String>,
    /// The index of the deciding rule in that policy.
    pub rule: Option<usize>,
    pub reason: String,
}

/// Counters of one workload, shared between its listeners and the admin API.
#[derive(Debug, Default, Serialize)]
pub struct WorkloadStats {
    pub connections_outbound: AtomicU64,
    pub connections_inbound: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

#[derive(Default)]
pub struct ConnectionLog {
    next_id: AtomicU64,
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    /// Live records carry their traffic counters, read when a report is made.
    live: BTreeMap<u64, (ConnectionRecord, Arc<Traffic>)>,
    closed: VecDeque<ConnectionRecord>,
}

#[derive(Serialize)]
pub struct ConnectionsReport {
    pub live: Vec<ConnectionRecord>,
    pub closed: Vec<ConnectionRecord>,
}

impl ConnectionLog {
    /// Records a new connection; the guard closes the record when finished or dropped.
    pub fn open(
        self: &Arc<Self>,
        direction: Direction,
        path: Path,
        workload: &str,
        source: SocketAddr,
        destination: SocketAddr,
        stats: Arc<WorkloadStats>,
    ) -> ConnectionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let counter = match direction {
            Direction::Outbound => &stats.connections_outbound,
            Direction::Inbound => &stats.connections_inbound,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let record = ConnectionRecord {
            id,
            direction,
            path,
            workload: workload.to_owned(),
            source,
            destination,
            opened_ms: now_ms(),
            closed_ms: None,
            bytes_sent: 0,
            bytes_received: 0,
            error: None,
            requests: VecDeque::new(),
        };
        let traffic = Arc::new(Traffic::default());
        self.lock().live.insert(id, (record, Arc::clone(&traffic)));
        ConnectionGuard {
            log: Arc::clone(self),
            id,
            stats,
            traffic,
            finished: false,
        }
    }

    pub fn report(&self) -> ConnectionsReport {
        let inner = self.lock();
        ConnectionsReport {
            live: inner
                .live
                .values()
                .map(|(record, traffic)| {
                    let mut record = record.clone();
                    record.bytes_sent = traffic.sent.load(Ordering::Relaxed);
                    record.bytes_received = traffic.received.load(Ordering::Relaxed);
                    record
                })
                .collect(),
            closed: inner.closed.iter().cloned().collect(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_request(&self, id: u64, request: RequestRecord) {
        if let Some((record, _)) = self.lock().live.get_mut(&id) {
            if record.requests.len() == REQUESTS_KEPT {
                record.requests.pop_front();
            }
            record.requests.push_back(request);
        }
    }

    fn close(&self, id: u64, sent: u64, received: u64, error: Option<String>) {
        let mut inner = self.lock();
        if let Some((mut record, _)) = inner.live.remove(&id) {
            record.closed_ms = Some(now_ms());
            record.bytes_sent = sent;
            record.bytes_received = received;
            record.error = error;
            if inner.closed.len() == HISTORY {
                inner.closed.pop_front();
            }
            inner.closed.push_back(record);
        }
    }
}

/// Closes its record exactly once: through [`ConnectionGuard::finish`], or as aborted
/// when dropped without it.
pub struct ConnectionGuard {
    log: Arc<ConnectionLog>,
    id: u64,
    stats: Arc<WorkloadStats>,
    traffic: Arc<Traffic>,
    finished: bool,
}

impl ConnectionGuard {
    /// The counters the copy loop updates.
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    /// The same counters, for a stream that counts its own bytes.
    pub fn shared_traffic(&self) -> Arc<Traffic> {
        Arc::clone(&self.traffic)
    }

    /// A handle that adds request decisions to this connection's record.
    pub fn requests(&self) -> RequestLog {
        RequestLog {
            log: Arc::clone(&self.log),
            id: self.id,
        }
    }

    /// Closes the record with the bytes counted so far and `error`, if the connection
    /// ended with one.
    pub fn finish(&mut self, error: Option<String>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let sent = self.traffic.sent.load(Ordering::Relaxed);
        let received = self.traffic.received.load(Ordering::Relaxed);
        self.stats.bytes_sent.fetch_add(sent, Ordering::Relaxed);
        self.stats
            .bytes_received
            .fetch_add(received, Ordering::Relaxed);
        self.log.close(self.id, sent, received, error);
    }
}

/// Adds request decisions to one connection's record, from the tasks serving its requests.
#[derive(Clone)]
pub struct RequestLog {
    log: Arc<ConnectionLog>,
    id: u64,
}

impl RequestLog {
    pub fn record(&self, request: RequestRecord) {
        self.log.record_request(self.id, request);
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.finish(Some("aborted".to_owned()));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
