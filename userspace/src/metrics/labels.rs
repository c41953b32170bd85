//! Istio's standard label sets, built from a connection's [`Ends`]. Values are bounded:
//! workloads, namespaces, identities and Service hostnames from the configuration (or
//! checked names from a peer's `baggage`), never pod names, addresses or ports.

use std::{fmt::Write as _, sync::Arc};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};

use crate::{
    peers::{End, Ends},
    policy::Verdict,
    proxy::connections::{CloseReason, Direction},
};

/// A label value, `unknown` when absent, as Istio writes it.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Value(Option<Arc<str>>);

impl From<Option<&Arc<str>>> for Value {
    fn from(value: Option<&Arc<str>>) -> Self {
        Self(value.cloned())
    }
}

impl EncodeLabelValue for Value {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.0.as_deref().unwrap_or("unknown"))
    }
}

/// Which proxy reports: the client's (`source`, outbound) or the server's
/// (`destination`, inbound).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl From<Direction> for Reporter {
    fn from(direction: Direction) -> Self {
        match direction {
            Direction::Outbound => Self::Source,
            Direction::Inbound => Self::Destination,
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RequestProtocol {
    Tcp,
    Http,
    Grpc,
}

/// `connection_security_policy`: `mutual_tls` for HBONE, `none` for plaintext, on both
/// reporters. (Envoy writes `unknown` on the source side because a sidecar cannot tell;
/// ambit's source proxy makes the mutual TLS itself, as ztunnel does.)
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SecurityPolicy {
    MutualTls,
    None,
}

/// `response_flags`, in Envoy's and ztunnel's codes: `-` nothing to report, `DENY` refused
/// by policy (authorization, or plaintext to STRICT mTLS), `CONNECT` the upstream or the
/// tunnel could not be set up, `NR` nowhere to route it, `UO` a limit was reached.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ResponseFlags {
    None,
    Deny,
    Connect,
    NoRoute,
    Overflow,
}

impl From<CloseReason> for ResponseFlags {
    fn from(reason: CloseReason) -> Self {
        match reason {
            CloseReason::Done | CloseReason::Io | CloseReason::Aborted => Self::None,
            CloseReason::Denied | CloseReason::MtlsRequired => Self::Deny,
            CloseReason::ConnectFailed | CloseReason::TunnelFailed => Self::Connect,
            CloseReason::NoRoute
            | CloseReason::NoOriginalDestination
            | CloseReason::BadDestination
            | CloseReason::NotServed => Self::NoRoute,
            CloseReason::Limit => Self::Overflow,
        }
    }
}

macro_rules! label_values {
    ($($t:ty { $($variant:ident => $text:literal),* })*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                encoder.write_str(match self { $(Self::$variant => $text),* })
            }
        }
    )*};
}

label_values! {
    Reporter { Source => "source", Destination => "destination" }
    RequestProtocol { Tcp => "tcp", Http => "http", Grpc => "grpc" }
    SecurityPolicy { MutualTls => "mutual_tls", None => "none" }
    ResponseFlags {
        None => "-", Deny => "DENY", Connect => "CONNECT", NoRoute => "NR", Overflow => "UO"
    }
}

/// The labels of Istio's TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source_workload: Value,
    pub source_workload_namespace: Value,
    pub source_principal: Value,
    pub destination_workload: Value,
    pub destination_workload_namespace: Value,
    pub destination_principal: Value,
    pub destination_service: Value,
    pub request_protocol: RequestProtocol,
    pub response_flags: ResponseFlags,
    pub connection_security_policy: SecurityPolicy,
}

impl TrafficLabels {
    /// The labels of a TCP connection between `ends`, reported by the proxy on the
    /// `direction` side. Principals appear only on mutual TLS, where they were verified or
    /// presented.
    pub fn new(direction: Direction, ends: &Ends) -> Self {
        let principal = |end: &End| Value::from(end.principal.as_ref().filter(|_| ends.mtls));
        Self {
            reporter: direction.into(),
            source_workload: ends.source.name().into(),
            source_workload_namespace: ends.source.namespace().into(),
            source_principal: principal(&ends.source),
            destination_workload: ends.destination.name().into(),
            destination_workload_namespace: ends.destination.namespace().into(),
            destination_principal: principal(&ends.destination),
            destination_service: ends.service.as_ref().into(),
            request_protocol: RequestProtocol::Tcp,
            response_flags: ResponseFlags::None,
            connection_security_policy: match ends.mtls {
                true => SecurityPolicy::MutualTls,
                false => SecurityPolicy::None,
            },
        }
    }
}

/// The labels of Istio's request metrics: the connection's, with the request's protocol,
/// flags and status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub traffic: TrafficLabels,
    pub response_code: u16,
}

/// `ambit_hbone_connections_refused_total`: the limit that refused an HBONE connection
/// before any stream (the `ambit run` flag's name without `--max-`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

/// `ambit_authorization_decisions_total`: the deciding policy (`namespace/name`, or
/// `none` when no single policy decided), its action, and the outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub policy: String,
    pub action: String,
    pub decision: &'static str,
}

impl DecisionLabels {
    pub fn new(verdict: &Verdict, allowed: bool) -> Self {
        let policy = match &verdict.policy {
            Some(policy) => format!("{}/{}", policy.namespace, policy.name),
            None => "none".to_owned(),
        };
        Self {
            policy,
            action: verdict
                .action
                .map_or_else(|| "none".to_owned(), |action| action.to_string()),
            decision: if allowed { "allow" } else { "deny" },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::WorkloadInfo;

    fn workload(name: &str, namespace: &str) -> Arc<WorkloadInfo> {
        Arc::new(WorkloadInfo {
            name: Some(Arc::from(name)),
            kind: crate::peers::WorkloadKind::Deployment,
            namespace: Arc::from(namespace),
            app: None,
            version: Arc::from("latest"),
            principal: None,
            baggage: None,
        })
    }

    fn end(name: &str, namespace: &str, principal: &str) -> End {
        End {
            workload: Some(workload(name, namespace)),
            principal: Some(Arc::from(principal)),
        }
    }

    fn encoded(labels: &TrafficLabels) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        let family = prometheus_client::metrics::family::Family::<
            TrafficLabels,
            prometheus_client::metrics::counter::Counter,
        >::default();
        family.get_or_create(labels).inc();
        registry.register("t", "t", family);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text.lines()
            .find(|l| l.starts_with("t_total{"))
            .unwrap()
            .to_owned()
    }

    #[test]
    fn mutual_tls_labels_name_both_ends_and_their_principals() {
        let ends = Ends {
            source: end("sleep", "foo", "spiffe://cluster.local/ns/foo/sa/sleep"),
            destination: end("httpbin", "bar", "spiffe://cluster.local/ns/bar/sa/httpbin"),
            service: Some(Arc::from("httpbin.bar.svc.cluster.local")),
            mtls: true,
        };
        assert_eq!(
            encoded(&TrafficLabels::new(Direction::Inbound, &ends)),
            "t_total{reporter=\"destination\",source_workload=\"sleep\",\
             source_workload_namespace=\"foo\",\
             source_principal=\"spiffe://cluster.local/ns/foo/sa/sleep\",\
             destination_workload=\"httpbin\",destination_workload_namespace=\"bar\",\
             destination_principal=\"spiffe://cluster.local/ns/bar/sa/httpbin\",\
             destination_service=\"httpbin.bar.svc.cluster.local\",request_protocol=\"tcp\",\
             response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 1"
        );
    }

    #[test]
    fn plaintext_labels_leave_principals_and_the_unknown_source_unknown() {
        let ends = Ends {
            source: End::default(),
            destination: end("httpbin", "foo", "spiffe://cluster.local/ns/foo/sa/httpbin"),
            service: None,
            mtls: false,
        };
        let mut labels = TrafficLabels::new(Direction::Outbound, &ends);
        labels.response_flags = CloseReason::Denied.into();
        assert_eq!(
            encoded(&labels),
            "t_total{reporter=\"source\",source_workload=\"unknown\",\
             source_workload_namespace=\"unknown\",source_principal=\"unknown\",\
             destination_workload=\"httpbin\",destination_workload_namespace=\"foo\",\
             destination_principal=\"unknown\",destination_service=\"unknown\",\
             request_protocol=\"tcp\",response_flags=\"DENY\",\
             connection_security_policy=\"none\"} 1"
        );
    }
}
