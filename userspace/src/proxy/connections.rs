//! The proxy's own record of the connections it handles: live ones, a bounded history of
//! closed ones, and per-workload counters, served by the admin API (`/connections`,
//! `/workloads`). Also the one hook of every connection's telemetry: opening counts it in
//! the [metrics](crate::metrics), closing adds its bytes, counts it closed with its
//! typed [`CloseReason`] and writes its [access log](crate::access_log) line, as each
//! request on it does.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Serialize, Serializer};

use super::{copy::Traffic, hbone::trace_context::TraceId};
use crate::{
    access_log::{AccessLog, Common, ConnectionEntry, Entry, RequestEntry, Side},
    admission::Refusal,
    metrics::{
        ConnectionTally, Metrics,
        labels::{RequestProtocol, ResponseFlags},
    },
    peers::Ends,
    policy::{Permit, Verdict},
};

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
    /// Outbound to a pod this agent also serves, admitted and delivered by the same-node
    /// shortcut: no TLS, no tunnel, and the bytes never leave the node.
    SameNode,
    /// Inbound by the same-node shortcut, forwarded to the application.
    SameNodeInbound,
}

impl Path {
    /// Whether the peer's identity was authenticated (by mutual TLS, or on the same node
    /// by the agent that holds both identities).
    pub fn authenticated(self) -> bool {
        matches!(
            self,
            Self::Hbone | Self::HboneInbound | Self::SameNode | Self::SameNodeInbound
        )
    }
}

/// Why a connection ended, as a stable code for metrics and access logs.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Both sides ended it.
    Done,
    /// A read or a write failed (a reset, a broken pipe), or HTTP on it did.
    Io,
    /// Authorization denied it, when it opened or when a new configuration re-checked it.
    Denied,
    /// Plaintext to a port whose PeerAuthentication mode is STRICT.
    MtlsRequired,
    /// The pod is no longer served at that address (it left the mesh or moved).
    NotServed,
    /// Not somewhere the proxy relays to: one of its own listeners, another pod.
    BadDestination,
    /// A limit of the data path was reached (per workload, per source, descriptors).
    Limit,
    /// The connection to the destination failed, timed out, or its proxy refused it.
    ConnectFailed,
    /// The HBONE tunnel could not be set up (TLS, secure naming, HTTP/2).
    TunnelFailed,
    /// Nowhere to send it: a Service without ready endpoints, a contested address.
    NoRoute,
    /// The kernel recorded no original destination for it.
    NoOriginalDestination,
    /// Its task ended first: the pod was released or the agent stopped.
    Aborted,
}

impl From<&Refusal> for CloseReason {
    fn from(refusal: &Refusal) -> Self {
        match refusal {
            Refusal::NotServed(_) => Self::NotServed,
            Refusal::NotThisPod(_) | Refusal::ProxyPort(_) => Self::BadDestination,
            Refusal::StrictMtls { .. } => Self::MtlsRequired,
            Refusal::Denied { .. } => Self::Denied,
        }
    }
}

/// How a connection ended: the code, and what went wrong in words.
#[derive(Clone, Debug)]
pub struct Close {
    pub reason: CloseReason,
    pub error: Option<String>,
}

impl Close {
    /// Both sides ended it.
    pub fn done() -> Self {
        Self {
            reason: CloseReason::Done,
            error: None,
        }
    }

    pub fn new(reason: CloseReason, error: &impl std::fmt::Display) -> Self {
        Self {
            reason,
            error: Some(error.to_string()),
        }
    }
}

/// An authorization decision as records and access logs show it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Decided {
    #[serde(rename = "decision", serialize_with = "allow_or_deny")]
    pub allowed: bool,
    /// `namespace/name` of the deciding policy.
    pub policy: Option<String>,
    /// The index of the deciding rule in that policy.
    pub rule: Option<usize>,
}

impl Decided {
    fn new(verdict: &Verdict, allowed: bool) -> Self {
        Self {
            allowed,
            policy: verdict.policy.as_ref().map(ToString::to_string),
            rule: verdict.rule,
        }
    }
}

fn allow_or_deny<S: Serializer>(allowed: &bool, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(if *allowed { "allow" } else { "deny" })
}

/// A connection as its listener opens it.
pub struct Opening {
    pub direction: Direction,
    pub path: Path,
    /// `namespace/name` of the pod whose listener accepted it.
    pub workload: String,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub ends: Ends,
    pub tunnel: TunnelMetadata,
    /// Counters shared with the record of the connection's other end (the same-node
    /// shortcut's two records count the same bytes); `None` for counters of its own.
    pub traffic: Option<Arc<Traffic>>,
}

/// What an HBONE `CONNECT` carries for telemetry: the trace both proxies log (the client
/// proxy starts it), and the client address the peer claims in `forwarded`. Claims of the
/// peer: logged, never a reason for a decision.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct TunnelMetadata {
    pub trace_id: Option<TraceId>,
    pub forwarded_for: Option<IpAddr>,
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
    #[serde(flatten)]
    pub tunnel: TunnelMetadata,
    /// Milliseconds since the Unix epoch.
    pub opened_ms: u64,
    pub closed_ms: Option<u64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub close_reason: Option<CloseReason>,
    pub error: Option<String>,
    /// The authorization decision of a connection authorized as a whole, or of the
    /// refusal that closed it.
    #[serde(flatten)]
    pub decision: Option<Decided>,
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

pub struct ConnectionLog {
    next_id: AtomicU64,
    inner: Mutex<LogInner>,
    metrics: Arc<Metrics>,
    access_log: AccessLog,
}

#[derive(Default)]
struct LogInner {
    /// Live records carry what they share with their guard, read when a report is made.
    live: BTreeMap<u64, (ConnectionRecord, Arc<Live>)>,
    closed: VecDeque<ConnectionRecord>,
}

/// What a connection's guard, its request log and the live table share.
struct Live {
    traffic: Arc<Traffic>,
    tally: ConnectionTally,
    ends: Ends,
    direction: Direction,
    path: Path,
    source: SocketAddr,
    destination: SocketAddr,
    tunnel: TunnelMetadata,
    opened: Instant,
}

impl Live {
    fn common(&self, decision: Option<Decided>) -> Common {
        let mtls = self.ends.mtls;
        Common {
            time: SystemTime::now(),
            direction: self.direction,
            path: self.path,
            source: Side::new(self.source, &self.ends.source, mtls),
            destination: Side::new(self.destination, &self.ends.destination, mtls),
            service: self.ends.service.clone(),
            mtls,
            tunnel: self.tunnel,
            decision,
        }
    }
}

#[derive(Serialize)]
pub struct ConnectionsReport {
    pub live: Vec<ConnectionRecord>,
    pub closed: Vec<ConnectionRecord>,
}

impl ConnectionLog {
    pub fn new(metrics: Arc<Metrics>, access_log: AccessLog) -> Self {
        Self {
            next_id: AtomicU64::new(0),
            inner: Mutex::default(),
            metrics,
            access_log,
        }
    }

    /// Records a new connection and counts it opened; the guard closes the record when
    /// finished or dropped.
    pub fn open(self: &Arc<Self>, opening: Opening, stats: Arc<WorkloadStats>) -> ConnectionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let counter = match opening.direction {
            Direction::Outbound => &stats.connections_outbound,
            Direction::Inbound => &stats.connections_inbound,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let record = ConnectionRecord {
            id,
            direction: opening.direction,
            path: opening.path,
            workload: opening.workload,
            source: opening.source,
            destination: opening.destination,
            tunnel: opening.tunnel,
            opened_ms: now_ms(),
            closed_ms: None,
            bytes_sent: 0,
            bytes_received: 0,
            close_reason: None,
            error: None,
            decision: None,
            requests: VecDeque::new(),
        };
        let live = Arc::new(Live {
            traffic: opening.traffic.unwrap_or_default(),
            tally: self.metrics.open(opening.direction, &opening.ends),
            ends: opening.ends,
            direction: opening.direction,
            path: opening.path,
            source: opening.source,
            destination: opening.destination,
            tunnel: opening.tunnel,
            opened: Instant::now(),
        });
        self.lock().live.insert(id, (record, Arc::clone(&live)));
        ConnectionGuard {
            log: Arc::clone(self),
            id,
            stats,
            live,
            decision: None,
            closed: None,
        }
    }

    /// Adds the bytes live connections moved so far to the metrics, so that a scrape
    /// sees long connections grow rather than jump when they close.
    pub fn report_traffic(&self) {
        for (_, live) in self.lock().live.values() {
            live.tally.report(&live.traffic);
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn report(&self) -> ConnectionsReport {
        let inner = self.lock();
        ConnectionsReport {
            live: inner
                .live
                .values()
                .map(|(record, live)| {
                    let mut record = record.clone();
                    record.bytes_sent = live.traffic.sent.load(Ordering::Relaxed);
                    record.bytes_received = live.traffic.received.load(Ordering::Relaxed);
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

    /// Moves the record to the history with how it ended.
    fn close(&self, id: u64, traffic: &Traffic, close: &Close, decision: Option<&Decided>) {
        let mut inner = self.lock();
        if let Some((mut record, _)) = inner.live.remove(&id) {
            record.closed_ms = Some(now_ms());
            record.bytes_sent = traffic.sent.load(Ordering::Relaxed);
            record.bytes_received = traffic.received.load(Ordering::Relaxed);
            record.close_reason = Some(close.reason);
            record.error = close.error.clone();
            record.decision = decision.cloned();
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
    live: Arc<Live>,
    /// Kept here rather than in the shared record, so that deciding takes no lock.
    decision: Option<Decided>,
    /// How it ended, once finished.
    closed: Option<Close>,
}

impl ConnectionGuard {
    /// The counters the copy loop updates.
    pub fn traffic(&self) -> &Traffic {
        &self.live.traffic
    }

    /// The same counters, for a stream that counts its own bytes.
    pub fn shared_traffic(&self) -> Arc<Traffic> {
        Arc::clone(&self.live.traffic)
    }

    /// How the connection ended, once [finished](Self::finish).
    pub fn closed(&self) -> Option<&Close> {
        self.closed.as_ref()
    }

    /// A handle that adds request decisions to this connection's record.
    pub fn requests(&self) -> RequestLog {
        RequestLog {
            log: Arc::clone(&self.log),
            id: self.id,
            live: Arc::clone(&self.live),
        }
    }

    /// Authorization let the connection in as a whole.
    pub fn permitted(&mut self, permit: &Permit) {
        self.decide(permit.verdict(), true);
    }

    /// Admission refused the connection, or a new configuration does.
    pub fn refused(&mut self, refusal: &Refusal) {
        match refusal {
            Refusal::Denied { denied, .. } => self.decide(denied.verdict(), false),
            Refusal::StrictMtls { policy, .. } => {
                self.decision = Some(Decided {
                    allowed: false,
                    policy: policy.as_ref().map(ToString::to_string),
                    rule: None,
                });
            }
            Refusal::NotServed(_) | Refusal::NotThisPod(_) | Refusal::ProxyPort(_) => {}
        }
    }

    fn decide(&mut self, verdict: &Verdict, allowed: bool) {
        self.log.metrics.authorized(verdict, allowed);
        self.decision = Some(Decided::new(verdict, allowed));
    }

    /// Closes the record with the bytes counted so far and how it ended, counts it closed
    /// and writes its access log line.
    pub fn finish(&mut self, close: Close) {
        if self.closed.is_some() {
            return;
        }
        self.closed = Some(close.clone());
        let live = &self.live;
        let sent = live.traffic.sent.load(Ordering::Relaxed);
        let received = live.traffic.received.load(Ordering::Relaxed);
        self.stats.bytes_sent.fetch_add(sent, Ordering::Relaxed);
        self.stats
            .bytes_received
            .fetch_add(received, Ordering::Relaxed);
        live.tally.close(&live.traffic, close.reason);
        self.log
            .close(self.id, &live.traffic, &close, self.decision.as_ref());
        self.log
            .access_log
            .write(Entry::Connection(ConnectionEntry {
                common: live.common(self.decision.take()),
                bytes_sent: sent,
                bytes_received: received,
                duration_ms: millis(live.opened),
                close_reason: close.reason,
                error: close.error,
            }));
    }
}

/// One request's outcome, for its metrics and access log line.
pub struct RequestOutcome<'a> {
    pub record: RequestRecord,
    /// The authorization decision, when policies decided the request.
    pub verdict: Option<&'a Verdict>,
    pub protocol: RequestProtocol,
    pub flags: ResponseFlags,
    pub started: Instant,
}

/// Adds request decisions to one connection's record, from the tasks serving its
/// requests, and records their metrics and access log lines.
#[derive(Clone)]
pub struct RequestLog {
    log: Arc<ConnectionLog>,
    id: u64,
    live: Arc<Live>,
}

impl RequestLog {
    pub fn record(&self, outcome: RequestOutcome) {
        let RequestOutcome {
            record,
            verdict,
            protocol,
            flags,
            started,
        } = outcome;
        let decision = verdict.map(|verdict| {
            self.log.metrics.authorized(verdict, record.allowed);
            Decided::new(verdict, record.allowed)
        });
        self.live
            .tally
            .request(protocol, flags, record.status, started.elapsed());
        self.log.access_log.write(Entry::Request(RequestEntry {
            common: self.live.common(decision),
            method: record.method.clone(),
            request_path: record.path.clone(),
            status: record.status,
            duration_ms: millis(started),
        }));
        self.log.record_request(self.id, record);
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.finish(Close {
            reason: CloseReason::Aborted,
            error: None,
        });
    }
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
