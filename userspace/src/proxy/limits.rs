//! What a peer can make the proxy hold, and for how long.
//!
//! Every phase a peer controls has a deadline ([`Limits`]' timeouts) and everything a peer
//! makes the proxy hold is counted against a limit: per destination workload, per source
//! (a verified identity, or an IP before one is known), and node-wide in file descriptors,
//! with a reserve the data path never touches so the agent's own work (configuration, the
//! CA, the admin API) always has descriptors; memory is bounded per connection by the
//! relay's largest buffer and per workload by a budget for relay buffers
//! ([`BufferBudget`]), and what HTTP/2 may buffer for HBONE peers by counting their
//! connections (each holds at most one receive window). A count is a permit that gives
//! itself back when dropped, so no error path can leak one.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use super::hbone::client::STREAMS_PER_CONNECTION;
use crate::identity::SpiffeId;

/// The limits and timeouts of the data path (`ambit run` flags of the same names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// TLS handshake on 15008, and the first `CONNECT` after it.
    pub handshake_timeout: Duration,
    /// Upstream TCP connect, and setting up an HBONE connection (TCP, TLS, HTTP/2).
    pub connect_timeout: Duration,
    /// An HBONE connection with no stream open for this long is closed (both sides).
    pub hbone_idle_timeout: Duration,
    /// Connections and HBONE streams held for one destination workload.
    pub inbound_per_workload: usize,
    /// The same, per source of one workload: a peer identity, or an IP without one.
    pub inbound_per_source: usize,
    /// Connections one workload's applications have open through the proxy.
    pub outbound_per_workload: usize,
    /// TLS handshakes in flight on one workload's HBONE listener.
    pub handshakes_per_workload: usize,
    /// The same, per source IP.
    pub handshakes_per_source: usize,
    /// Concurrent `CONNECT` streams on one HBONE connection.
    pub streams_per_connection: u32,
    /// Established HBONE connections of one workload: each may hold an HTTP/2 receive
    /// window of data its application has not read.
    pub hbone_connections_per_workload: usize,
    /// The same, per peer: one verified identity at one address (one peer proxy's pool).
    pub hbone_connections_per_source: usize,
    /// Descriptors the data path leaves for the agent's own work.
    pub fd_reserve: usize,
    /// Bytes of relay buffers one workload's connections may hold beyond each
    /// direction's small initial buffer.
    pub buffer_per_workload: usize,
}

impl Limits {
    /// The default of `hbone_connections_per_source` for a given `inbound_per_source`: a
    /// peer's pool opens a connection per [`STREAMS_PER_CONNECTION`] streams, and as many
    /// again while certificates roll over (connections whose certificate expired take no
    /// new stream but live until theirs end), and a few more for connections a pool
    /// replaced after an error and the peer has not closed yet.
    pub fn hbone_connections_for(inbound_per_source: usize) -> usize {
        2 * inbound_per_source.div_ceil(STREAMS_PER_CONNECTION) + 10
    }
}

impl Default for Limits {
    fn default() -> Self {
        const INBOUND_PER_SOURCE: usize = 1_024;
        Self {
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            hbone_idle_timeout: Duration::from_secs(60),
            inbound_per_workload: 16_384,
            inbound_per_source: INBOUND_PER_SOURCE,
            outbound_per_workload: 16_384,
            handshakes_per_workload: 256,
            handshakes_per_source: 32,
            streams_per_connection: 100,
            hbone_connections_per_workload: 512,
            hbone_connections_per_source: Self::hbone_connections_for(INBOUND_PER_SOURCE),
            fd_reserve: 512,
            buffer_per_workload: 32 * 1024 * 1024,
        }
    }
}

/// Which limit refused something. Stable names: logs and connection records carry them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Exceeded {
    #[error("limit reached: inbound connections of the workload (--max-inbound-per-workload)")]
    InboundPerWorkload,
    #[error("limit reached: inbound connections from this source (--max-inbound-per-source)")]
    InboundPerSource,
    #[error("limit reached: outbound connections of the workload (--max-outbound-per-workload)")]
    OutboundPerWorkload,
    #[error("limit reached: TLS handshakes of the workload (--max-handshakes-per-workload)")]
    HandshakesPerWorkload,
    #[error("limit reached: TLS handshakes from this source (--max-handshakes-per-source)")]
    HandshakesPerSource,
    #[error("limit reached: file descriptors of the data path (open-file limit less --fd-reserve)")]
    Descriptors,
    #[error(
        "limit reached: HBONE connections of the workload (--max-hbone-connections-per-workload)"
    )]
    HboneConnectionsPerWorkload,
    #[error(
        "limit reached: HBONE connections from this source (--max-hbone-connections-per-source)"
    )]
    HboneConnectionsPerSource,
}

impl Exceeded {
    /// The limit as a label value: the flag's name without `--max-`.
    pub fn code(self) -> &'static str {
        match self {
            Self::InboundPerWorkload => "inbound-per-workload",
            Self::InboundPerSource => "inbound-per-source",
            Self::OutboundPerWorkload => "outbound-per-workload",
            Self::HandshakesPerWorkload => "handshakes-per-workload",
            Self::HandshakesPerSource => "handshakes-per-source",
            Self::Descriptors => "descriptors",
            Self::HboneConnectionsPerWorkload => "hbone-connections-per-workload",
            Self::HboneConnectionsPerSource => "hbone-connections-per-source",
        }
    }
}

/// Who a count is charged to, within one workload.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Identity(SpiffeId),
    Ip(IpAddr),
}

/// A count with a limit, lock-free.
#[derive(Debug, Default)]
pub struct Gauge(AtomicUsize);

impl Gauge {
    /// One more, unless `limit` are held already.
    pub fn try_acquire(self: &Arc<Self>, limit: usize) -> Option<GaugePermit> {
        self.try_add(1, limit)
    }

    /// `count` more, unless that would hold more than `limit`.
    pub fn try_add(self: &Arc<Self>, count: usize, limit: usize) -> Option<GaugePermit> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(count).filter(|sum| *sum <= limit)
            })
            .ok()
            .map(|_| GaugePermit {
                gauge: Arc::clone(self),
                count,
            })
    }

    /// `count` more, whatever the limit: for what must be held regardless.
    pub fn add(self: &Arc<Self>, count: usize) -> GaugePermit {
        self.0.fetch_add(count, Ordering::AcqRel);
        GaugePermit {
            gauge: Arc::clone(self),
            count,
        }
    }

    pub fn held(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Counts of a [`Gauge`], given back on drop.
#[derive(Debug)]
pub struct GaugePermit {
    gauge: Arc<Gauge>,
    count: usize,
}

impl GaugePermit {
    /// Takes over the counts of `other`, a permit of the same gauge: one permit to hold
    /// and give back instead of many.
    pub fn absorb(&mut self, mut other: GaugePermit) {
        debug_assert!(
            Arc::ptr_eq(&self.gauge, &other.gauge),
            "permits of one gauge"
        );
        self.count += std::mem::take(&mut other.count);
    }
}

impl Drop for GaugePermit {
    fn drop(&mut self) {
        self.gauge.0.fetch_sub(self.count, Ordering::AcqRel);
    }
}

/// Counts per key with one limit for every key; keys at zero take no memory.
#[derive(Debug)]
pub struct Counts<K: Eq + Hash>(Mutex<HashMap<K, usize>>);

impl<K: Eq + Hash> Default for Counts<K> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<K: Clone + Eq + Hash> Counts<K> {
    /// One more for `key`, unless `limit` are held for it already.
    pub fn try_acquire(self: &Arc<Self>, key: &K, limit: usize) -> Option<CountPermit<K>> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(key.clone()).or_default();
        if *count >= limit {
            if *count == 0 {
                counts.remove(key);
            }
            return None;
        }
        *count += 1;
        Some(CountPermit {
            counts: Arc::clone(self),
            key: key.clone(),
        })
    }

    pub fn held(&self, key: &K) -> usize {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(key).copied().unwrap_or(0)
    }
}

/// One count of a key of [`Counts`], given back on drop.
#[derive(Debug)]
pub struct CountPermit<K: Clone + Eq + Hash> {
    counts: Arc<Counts<K>>,
    key: K,
}

impl<K: Clone + Eq + Hash> Drop for CountPermit<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// One count of a workload and one of a source within it, each against its own limit.
#[derive(Debug)]
struct Scoped<K: Eq + Hash> {
    workload: Arc<Gauge>,
    by_source: Arc<Counts<K>>,
}

impl<K: Eq + Hash> Default for Scoped<K> {
    fn default() -> Self {
        Self {
            workload: Arc::default(),
            by_source: Arc::default(),
        }
    }
}

impl<K: Clone + Eq + Hash> Scoped<K> {
    /// One more for the workload and one for `source`, each with its limit and the reason
    /// to refuse past it; a refused source gives the workload's count back.
    fn try_acquire(
        &self,
        source: &K,
        workload_limit: (usize, Exceeded),
        source_limit: (usize, Exceeded),
    ) -> Result<ScopedPermit<K>, Exceeded> {
        let workload = self
            .workload
            .try_acquire(workload_limit.0)
            .ok_or(workload_limit.1)?;
        let source = self
            .by_source
            .try_acquire(source, source_limit.0)
            .ok_or(source_limit.1)?;
        Ok(ScopedPermit {
            _workload: workload,
            _source: source,
        })
    }
}

/// The counts of a [`Scoped`], given back on drop.
#[derive(Debug)]
pub struct ScopedPermit<K: Clone + Eq + Hash> {
    _workload: GaugePermit,
    _source: CountPermit<K>,
}

/// Permits held for one inbound connection or stream.
pub type InboundPermit = ScopedPermit<Source>;
/// Permits held for one TLS handshake in flight.
pub type HandshakePermit = ScopedPermit<IpAddr>;
/// Permits held for one established HBONE connection.
pub type HboneConnectionPermit = ScopedPermit<HbonePeer>;

/// Who an HBONE connection is charged to: the identity its certificate proves, at the
/// address it comes from. An identity's replicas each have a pool of their own, so the
/// identity alone would count several peers as one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HbonePeer {
    pub identity: SpiffeId,
    pub ip: IpAddr,
}

/// The counters of one workload, held by its listeners.
#[derive(Debug, Default)]
pub struct WorkloadCounters {
    inbound: Scoped<Source>,
    outbound: Arc<Gauge>,
    handshakes: Scoped<IpAddr>,
    hbone_connections: Scoped<HbonePeer>,
    buffers: Arc<Gauge>,
}

impl WorkloadCounters {
    pub fn inbound(&self, limits: &Limits, source: &Source) -> Result<InboundPermit, Exceeded> {
        self.inbound.try_acquire(
            source,
            (limits.inbound_per_workload, Exceeded::InboundPerWorkload),
            (limits.inbound_per_source, Exceeded::InboundPerSource),
        )
    }

    pub fn outbound(&self, limits: &Limits) -> Result<GaugePermit, Exceeded> {
        self.outbound
            .try_acquire(limits.outbound_per_workload)
            .ok_or(Exceeded::OutboundPerWorkload)
    }

    /// The relay-buffer budget of the workload's connections (those its listeners accepted).
    pub fn buffers(&self, limits: &Limits) -> BufferBudget {
        BufferBudget::new(Arc::clone(&self.buffers), limits.buffer_per_workload)
    }

    pub fn handshake(&self, limits: &Limits, source: IpAddr) -> Result<HandshakePermit, Exceeded> {
        self.handshakes.try_acquire(
            &source,
            (
                limits.handshakes_per_workload,
                Exceeded::HandshakesPerWorkload,
            ),
            (limits.handshakes_per_source, Exceeded::HandshakesPerSource),
        )
    }

    /// An HBONE connection whose peer proved its identity, held until the connection ends.
    pub fn hbone_connection(
        &self,
        limits: &Limits,
        peer: &HbonePeer,
    ) -> Result<HboneConnectionPermit, Exceeded> {
        self.hbone_connections.try_acquire(
            peer,
            (
                limits.hbone_connections_per_workload,
                Exceeded::HboneConnectionsPerWorkload,
            ),
            (
                limits.hbone_connections_per_source,
                Exceeded::HboneConnectionsPerSource,
            ),
        )
    }
}

/// Bytes of relay buffers one workload holds beyond the initial ones, up to a limit.
/// Running out slows a stream (it keeps a smaller buffer) and refuses nothing.
#[derive(Clone, Debug)]
pub struct BufferBudget {
    held: Arc<Gauge>,
    limit: usize,
}

impl BufferBudget {
    pub fn new(held: Arc<Gauge>, limit: usize) -> Self {
        Self { held, limit }
    }

    /// `bytes` more, unless the workload would hold more than its limit.
    pub fn charge(&self, bytes: usize) -> Option<GaugePermit> {
        self.held.try_add(bytes, self.limit)
    }

    pub fn held(&self) -> usize {
        self.held.held()
    }
}

/// Node-wide open descriptors: each socket the data path accepts or opens holds one, and
/// each enrolled pod's listeners and namespace hold theirs. The data path may not take
/// the last `reserve`.
#[derive(Clone, Debug)]
pub struct Descriptors {
    held: Arc<Gauge>,
    limit: usize,
}

/// Descriptors an enrolled pod holds whatever the load: its three listeners, the
/// namespace its thread entered, and the sockets that thread makes ahead (of each family).
pub const PER_POD_DESCRIPTORS: usize = 4 + 2 * crate::netns::SPARE_SOCKETS;

impl Descriptors {
    /// `open_files` is the process's open-file limit, of which `in_use` are open already
    /// (the runtime, the kernel maps, the admin listeners).
    pub fn new(open_files: usize, in_use: usize, reserve: usize) -> Self {
        Self {
            held: Arc::default(),
            limit: open_files.saturating_sub(in_use.saturating_add(reserve)),
        }
    }

    /// One descriptor for the data path, unless only the reserve is left.
    pub fn acquire(&self) -> Result<GaugePermit, Exceeded> {
        self.held
            .try_acquire(self.limit)
            .ok_or(Exceeded::Descriptors)
    }

    /// The descriptors of one enrolled pod, held until the pod is released.
    pub fn hold_for_pod(&self) -> GaugePermit {
        self.held.add(PER_POD_DESCRIPTORS)
    }

    /// Descriptors held now: by connections, and by pods while they are enrolled. Once the
    /// pods are handed over, zero means no connection is left (see `drain`).
    pub fn held(&self) -> usize {
        self.held.held()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_up_to_the_limit_and_give_back_on_drop() {
        let limits = Limits {
            inbound_per_workload: 3,
            inbound_per_source: 2,
            ..Limits::default()
        };
        let counters = WorkloadCounters::default();
        let a = Source::Ip("10.0.0.1".parse().unwrap());
        let b = Source::Ip("10.0.0.2".parse().unwrap());
        let a1 = counters.inbound(&limits, &a).unwrap();
        let _a2 = counters.inbound(&limits, &a).unwrap();
        assert_eq!(
            counters.inbound(&limits, &a).unwrap_err(),
            Exceeded::InboundPerSource
        );
        let _b1 = counters.inbound(&limits, &b).unwrap();
        assert_eq!(
            counters.inbound(&limits, &b).unwrap_err(),
            Exceeded::InboundPerWorkload
        );
        drop(a1);
        assert_eq!(counters.inbound.by_source.held(&a), 1);
        let _b2 = counters.inbound(&limits, &b).unwrap();
        assert_eq!(counters.inbound.workload.held(), 3);
    }

    #[test]
    fn a_refused_source_count_gives_back_the_workload_count() {
        let limits = Limits {
            handshakes_per_source: 1,
            ..Limits::default()
        };
        let counters = WorkloadCounters::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let _first = counters.handshake(&limits, ip).unwrap();
        assert_eq!(
            counters.handshake(&limits, ip).unwrap_err(),
            Exceeded::HandshakesPerSource
        );
        assert_eq!(counters.handshakes.workload.held(), 1);
    }

    fn peer(identity: &str, ip: &str) -> HbonePeer {
        HbonePeer {
            identity: identity.parse().unwrap(),
            ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn hbone_connections_are_counted_per_identity_at_one_address_and_per_workload() {
        let limits = Limits {
            hbone_connections_per_source: 2,
            hbone_connections_per_workload: 4,
            ..Limits::default()
        };
        let counters = WorkloadCounters::default();
        let web = peer("spiffe://cluster.local/ns/a/sa/web", "10.0.0.1");
        let held: Vec<_> = (0..2)
            .map(|_| counters.hbone_connection(&limits, &web).unwrap())
            .collect();
        assert_eq!(
            counters.hbone_connection(&limits, &web).unwrap_err(),
            Exceeded::HboneConnectionsPerSource
        );
        // Another replica of the same identity is another peer, and so is another identity
        // at the same address.
        let replica = peer("spiffe://cluster.local/ns/a/sa/web", "10.0.0.2");
        let other = peer("spiffe://cluster.local/ns/a/sa/other", "10.0.0.1");
        let _replica = counters.hbone_connection(&limits, &replica).unwrap();
        let _other = counters.hbone_connection(&limits, &other).unwrap();
        assert_eq!(
            counters.hbone_connection(&limits, &replica).unwrap_err(),
            Exceeded::HboneConnectionsPerWorkload
        );
        assert_eq!(counters.hbone_connections.workload.held(), 4);
        drop(held);
        assert_eq!(counters.hbone_connections.by_source.held(&web), 0);
        assert!(counters.hbone_connection(&limits, &web).is_ok());
    }

    #[test]
    fn hbone_connections_per_source_follow_the_streams_a_source_may_hold() {
        assert_eq!(Limits::default().hbone_connections_per_source, 32);
        // 10,000 streams fill 100 connections of a pool; twice that and the slack.
        assert_eq!(Limits::hbone_connections_for(10_000), 210);
    }

    #[test]
    fn a_buffer_budget_charges_up_to_its_limit_and_absorbed_permits_give_back_once() {
        let limits = Limits {
            buffer_per_workload: 3000,
            ..Limits::default()
        };
        let counters = WorkloadCounters::default();
        let budget = counters.buffers(&limits);
        let mut first = budget.charge(1000).unwrap();
        first.absorb(budget.charge(1500).unwrap());
        assert!(
            budget.charge(600).is_none(),
            "3100 bytes would pass the limit"
        );
        let last = budget.charge(500).unwrap();
        assert_eq!(
            counters.buffers(&limits).held(),
            3000,
            "one budget per workload"
        );
        drop(first);
        assert_eq!(budget.held(), 500);
        drop(last);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn descriptors_keep_the_reserve() {
        let descriptors = Descriptors::new(100, 10, 80);
        let held: Vec<_> = (0..10).map(|_| descriptors.acquire().unwrap()).collect();
        assert_eq!(descriptors.acquire().unwrap_err(), Exceeded::Descriptors);
        drop(held);
        let pod = descriptors.hold_for_pod();
        assert_eq!(descriptors.held.held(), PER_POD_DESCRIPTORS);
        drop(pod);
        assert!(descriptors.acquire().is_ok());
    }
}
