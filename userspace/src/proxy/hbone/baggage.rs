//! Peer metadata on HBONE `CONNECT` requests, as ztunnel sends and reads it: W3C `baggage`
//! with OpenTelemetry's Kubernetes keys (`k8s.cluster.name`, `k8s.namespace.name`,
//! `k8s.<kind>.name`, `service.name`, `service.version`) describing the client's workload,
//! and `forwarded: for=<client IP>` (RFC 7239). Both are the client's claims: the server
//! uses them for telemetry only, never for a decision. (`traceparent` is in
//! [`super::trace_context`].)

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::peers::WorkloadInfo;

pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
pub const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// The longest name a Kubernetes object can have (a DNS subdomain).
const MAX_NAME: usize = 253;

/// The `baggage` a workload's `CONNECT` requests carry; `None` if a label value cannot be
/// a header value.
pub fn encode(workload: &WorkloadInfo, cluster: &str) -> Option<HeaderValue> {
    let mut entries = vec![
        format!("k8s.cluster.name={cluster}"),
        format!("k8s.namespace.name={}", workload.namespace),
    ];
    if let Some(name) = &workload.name {
        entries.push(format!("k8s.{}.name={name}", workload.kind.as_str()));
    }
    if let Some(app) = &workload.app {
        entries.push(format!("service.name={app}"));
    }
    entries.push(format!("service.version={}", workload.version));
    HeaderValue::from_str(&entries.join(",")).ok()
}

/// `forwarded: for=<client>`, an IPv6 address quoted and bracketed as RFC 7239 asks.
pub fn forwarded(client: IpAddr) -> HeaderValue {
    let value = match client {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    HeaderValue::from_str(&value).expect("an IP address is a valid header value")
}

/// The client address the first element of `forwarded` names (`for=`, with or without a
/// port, an IPv6 address quoted and bracketed); `None` for an obfuscated or unknown one.
pub fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let first = headers.get(FORWARDED)?.to_str().ok()?.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim().eq_ignore_ascii_case("for").then(|| value.trim())
    })?;
    let node = node.trim_matches('"');
    match node.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']')?.0.parse().ok(),
        None => node.split(':').next()?.parse().ok(),
    }
}

/// What a client's `baggage` says about its workload.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub namespace: Option<String>,
    pub workload: Option<String>,
}

/// The workload entries of every `baggage` header in `headers`. Values that cannot be a
/// Kubernetes name are left out: they become metric labels, and a peer must not be able
/// to write arbitrary text there.
pub fn parse(headers: &HeaderMap) -> Baggage {
    let mut baggage = Baggage::default();
    let entries = headers
        .get_all(BAGGAGE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for entry in entries {
        // W3C baggage: `key=value;property…`, with optional whitespace around both.
        let Some((key, value)) = entry.split(';').next().and_then(|e| e.split_once('=')) else {
            continue;
        };
        let value = value.trim();
        if !is_name(value) {
            continue;
        }
        match key.trim() {
            "k8s.namespace.name" => baggage.namespace = Some(value.to_owned()),
            "k8s.deployment.name"
            | "k8s.cronjob.name"
            | "k8s.job.name"
            | "k8s.pod.name"
            | "k8s.statefulset.name"
            | "k8s.daemonset.name"
            | "k8s.replicaset.name" => {
                baggage.workload = Some(value.to_owned());
            }
            _ => {}
        }
    }
    baggage
}

/// A DNS subdomain, as Kubernetes object names are.
fn is_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_NAME
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::peers::WorkloadKind;

    fn workload() -> WorkloadInfo {
        WorkloadInfo {
            name: Some(Arc::from("web")),
            kind: WorkloadKind::Deployment,
            namespace: Arc::from("foo"),
            app: Some(Arc::from("web-app")),
            version: Arc::from("v2"),
            principal: None,
            baggage: None,
        }
    }

    #[test]
    fn baggage_names_the_workload_as_ztunnel_does_and_reads_back() {
        let value = encode(&workload(), "Kubernetes").unwrap();
        assert_eq!(
            value,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=foo,k8s.deployment.name=web,\
             service.name=web-app,service.version=v2"
        );
        let mut headers = HeaderMap::new();
        headers.insert(BAGGAGE, value);
        assert_eq!(
            parse(&headers),
            Baggage {
                namespace: Some("foo".into()),
                workload: Some("web".into()),
            }
        );
    }

    #[test]
    fn baggage_is_read_across_headers_and_bad_values_are_left_out() {
        let mut headers = HeaderMap::new();
        for value in [
            "k8s.namespace.name = bar ;prop=1",
            "k8s.pod.name=Not_A_Name,other=x",
            "k8s.job.name=",
        ] {
            headers.append(BAGGAGE, HeaderValue::from_static(value));
        }
        assert_eq!(
            parse(&headers),
            Baggage {
                namespace: Some("bar".into()),
                workload: None,
            }
        );
        assert_eq!(parse(&HeaderMap::new()), Baggage::default());
    }

    #[test]
    fn forwarded_quotes_ipv6_and_reads_back() {
        assert_eq!(forwarded("10.0.0.1".parse().unwrap()), "for=10.0.0.1");
        assert_eq!(forwarded("fd00::1".parse().unwrap()), "for=\"[fd00::1]\"");
        let read = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(FORWARDED, HeaderValue::from_static(value));
            forwarded_for(&headers)
        };
        for ip in ["10.0.0.1", "fd00::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut headers = HeaderMap::new();
            headers.insert(FORWARDED, forwarded(ip));
            assert_eq!(forwarded_for(&headers), Some(ip));
        }
        assert_eq!(
            read("proto=http;For=\"192.0.2.43:47011\", for=10.9.9.9"),
            "192.0.2.43".parse().ok()
        );
        assert_eq!(
            read("for=\"[2001:db8:cafe::17]:4711\""),
            "2001:db8:cafe::17".parse().ok()
        );
        for hidden in ["for=_hidden", "for=unknown", "by=10.0.0.1", "for="] {
            assert_eq!(read(hidden), None, "{hidden}");
        }
        assert_eq!(forwarded_for(&HeaderMap::new()), None);
    }
}
