//! The agent's Prometheus metrics: Istio's standard TCP and request metrics with their
//! labels ([`labels`]), so that dashboards, Kiali and alerts written for Istio work over
//! ambit, and ambit's own (`ambit_*`: authorization decisions, certificates, configuration,
//! the access log, the HBONE pool, the process; [`collect`]). One registry owned by the
//! agent; the data path records through small typed calls, with a connection's label set
//! resolved once when it opens ([`ConnectionTally`]). Served by [`server`].

mod collect;
pub mod labels;
pub mod server;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

pub use collect::{Certificates, HbonePool, Pods, Process};
use labels::{
    DecisionLabels, LimitLabels, RequestLabels, RequestProtocol, ResponseFlags, TrafficLabels,
};

use crate::{
    peers::Ends,
    policy::Verdict,
    proxy::{
        connections::{CloseReason, Direction},
        copy::Traffic,
        limits::Exceeded,
    },
};

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

type Counters<L> = Family<L, Counter>;

pub struct Metrics {
    registry: Registry,
    opened: Counters<TrafficLabels>,
    closed: Counters<TrafficLabels>,
    /// `istio_tcp_sent_bytes_total`: the response direction, destination to client.
    sent: Counters<TrafficLabels>,
    /// `istio_tcp_received_bytes_total`: the request direction, client to destination.
    received: Counters<TrafficLabels>,
    requests: Counters<RequestLabels>,
    request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    decisions: Counters<DecisionLabels>,
    hbone_refused: Counters<LimitLabels>,
    /// A new configuration was put in force.
    pub config_reloads: Counter,
    /// A file or object of the configuration was rejected.
    pub config_rejected: Counter,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let opened = Family::default();
        let closed = Family::default();
        let sent = Family::default();
        let received = Family::default();
        let requests = Family::default();
        let request_duration = Family::<_, _, fn() -> Histogram>::new_with_constructor(|| {
            Histogram::new(DURATION_BUCKETS_MS)
        });
        let decisions = Family::default();
        let hbone_refused = Family::default();
        let (config_reloads, config_rejected, access_log_dropped) =
            (Counter::default(), Counter::default(), Counter::default());
        let istio = [
            (
                "istio_tcp_connections_opened",
                "Connections opened",
                &opened,
            ),
            (
                "istio_tcp_connections_closed",
                "Connections closed",
                &closed,
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent during response (destination to client) on TCP connections",
                &sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received during request (client to destination) on TCP connections",
                &received,
            ),
        ];
        for (name, help, family) in istio {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "istio_requests",
            "Requests on ports authorized per request",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from a request to its response's headers, on ports authorized per request",
            request_duration.clone(),
        );
        registry.register(
            "ambit_authorization_decisions",
            "Authorization decisions on connections and requests, by deciding policy, its action and the outcome",
            decisions.clone(),
        );
        registry.register(
            "ambit_hbone_connections_refused",
            "HBONE connections refused before any stream, by the limit that refused them",
            hbone_refused.clone(),
        );
        registry.register(
            "ambit_config_reloads",
            "Configurations put in force",
            config_reloads.clone(),
        );
        registry.register(
            "ambit_config_rejected",
            "Configuration files or objects rejected (the previous version stays in force)",
            config_rejected.clone(),
        );
        registry.register(
            "ambit_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            access_log_dropped.clone(),
        );
        Self {
            registry,
            opened,
            closed,
            sent,
            received,
            requests,
            request_duration,
            decisions,
            hbone_refused,
            config_reloads,
            config_rejected,
            access_log_dropped,
        }
    }

    /// Adds metrics computed at each scrape.
    pub fn register_collector(&mut self, collector: impl Collector) {
        self.registry.register_collector(Box::new(collector));
    }

    /// Everything, in the Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail, and every value here encodes.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }

    /// Counts a connection opened between `ends`, and resolves its series.
    pub fn open(self: &Arc<Self>, direction: Direction, ends: &Ends) -> ConnectionTally {
        let labels = TrafficLabels::new(direction, ends);
        self.opened.get_or_create(&labels).inc();
        ConnectionTally {
            metrics: Arc::clone(self),
            sent: self.sent.get_or_create_owned(&labels),
            received: self.received.get_or_create_owned(&labels),
            labels,
            reported: Default::default(),
        }
    }

    /// Counts an HBONE connection refused by `exceeded` before any stream.
    pub fn hbone_refused(&self, exceeded: Exceeded) {
        self.hbone_refused
            .get_or_create(&LimitLabels {
                limit: exceeded.code(),
            })
            .inc();
    }

    /// Counts an authorization decision.
    pub fn authorized(&self, verdict: &Verdict, allowed: bool) {
        self.decisions
            .get_or_create(&DecisionLabels::new(verdict, allowed))
            .inc();
    }
}

/// One connection's series, resolved when it opened. Bytes are added when asked
/// ([`ConnectionTally::report`], at each scrape) and when it closes, never per read.
pub struct ConnectionTally {
    metrics: Arc<Metrics>,
    labels: TrafficLabels,
    sent: Counter,
    received: Counter,
    /// What [`Traffic`] had reached at the last report: client to destination, back.
    reported: [AtomicU64; 2],
}

impl ConnectionTally {
    /// Adds the bytes `traffic` moved since the last report.
    pub fn report(&self, traffic: &Traffic) {
        add(
            &self.received,
            &self.reported[0],
            traffic.sent.load(Ordering::Relaxed),
        );
        add(
            &self.sent,
            &self.reported[1],
            traffic.received.load(Ordering::Relaxed),
        );
    }

    /// Reports the last bytes and counts the connection closed for `reason`.
    pub fn close(&self, traffic: &Traffic, reason: CloseReason) {
        self.report(traffic);
        let labels = TrafficLabels {
            response_flags: reason.into(),
            ..self.labels.clone()
        };
        self.metrics.closed.get_or_create(&labels).inc();
    }

    /// Counts one request on this connection, answered `status` after `duration`.
    pub fn request(
        &self,
        protocol: RequestProtocol,
        flags: ResponseFlags,
        status: u16,
        duration: Duration,
    ) {
        let labels = RequestLabels {
            traffic: TrafficLabels {
                request_protocol: protocol,
                response_flags: flags,
                ..self.labels.clone()
            },
            response_code: status,
        };
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .request_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64() * 1000.0);
    }
}

/// Adds to `counter` what `now` has grown past `reported`. Concurrent reports (a scrape
/// and the close) each add only their own growth: `fetch_max` hands out every byte once.
fn add(counter: &Counter, reported: &AtomicU64, now: u64) {
    let before = reported.fetch_max(now, Ordering::Relaxed);
    if now > before {
        counter.inc_by(now - before);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric_lines(metrics: &Metrics, prefix: &str) -> Vec<String> {
        metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn bytes_are_reported_once_whether_by_a_scrape_or_at_close() {
        let metrics = Arc::new(Metrics::new());
        let tally = metrics.open(Direction::Inbound, &Ends::default());
        let traffic = Traffic::default();
        traffic.sent.store(100, Ordering::Relaxed);
        traffic.received.store(7, Ordering::Relaxed);
        tally.report(&traffic);
        tally.report(&traffic);
        traffic.sent.store(150, Ordering::Relaxed);
        tally.close(&traffic, CloseReason::Done);
        let value = |name| {
            let lines = metric_lines(&metrics, name);
            assert_eq!(lines.len(), 1, "{lines:?}");
            lines[0].rsplit(' ').next().unwrap().to_owned()
        };
        assert_eq!(value("istio_tcp_received_bytes_total{"), "150");
        assert_eq!(value("istio_tcp_sent_bytes_total{"), "7");
        assert_eq!(value("istio_tcp_connections_opened_total{"), "1");
        assert_eq!(value("istio_tcp_connections_closed_total{"), "1");
    }

    #[test]
    fn a_request_is_counted_with_its_status_and_duration() {
        let metrics = Arc::new(Metrics::new());
        let tally = metrics.open(Direction::Inbound, &Ends::default());
        tally.request(
            RequestProtocol::Http,
            ResponseFlags::Deny,
            403,
            Duration::from_millis(3),
        );
        let requests = metric_lines(&metrics, "istio_requests_total{");
        assert_eq!(requests.len(), 1);
        assert!(
            requests[0].contains("request_protocol=\"http\",response_flags=\"DENY\"")
                && requests[0].ends_with("response_code=\"403\"} 1"),
            "{requests:?}"
        );
        let buckets = metric_lines(&metrics, "istio_request_duration_milliseconds_bucket{");
        let le5 = buckets
            .iter()
            .find(|l| l.contains("le=\"5\""))
            .unwrap_or_else(|| panic!("{buckets:?}"));
        assert!(le5.ends_with(" 1"), "{le5}");
    }
}
