//! Which application protocol a workload port carries, as Istio selects it: the Service
//! port's `appProtocol`, else its name prefix, else the first bytes the client sends.

use std::collections::HashMap;

use crate::discovery::{Pod, Service, Snapshot, objects::TargetPort};

/// How connections to one workload port are recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Declared HTTP (`http`, `http2`, `grpc`, `h2c`): parsed as HTTP/1.1 or HTTP/2,
    /// whichever the client speaks; a client that speaks neither is refused.
    Http,
    /// Declared as something else (`tcp`, `tls`, `mysql`, …): never parsed.
    Opaque,
    /// Not declared: the first bytes decide ([`detect`]).
    Detect,
}

/// The protocols the Services selecting `pod` declare, by workload port; ports they do
/// not declare are left out ([`Protocol::Detect`]). When Services disagree, HTTP wins:
/// parsing is the side where every policy can still be enforced.
pub fn declared_ports(snapshot: &Snapshot, pod: &Pod) -> HashMap<u16, Protocol> {
    let mut ports = HashMap::new();
    let selecting = snapshot
        .services
        .values()
        .filter(|s| s.namespace == pod.namespace && selects(s, pod));
    for port in selecting.flat_map(|s| &s.ports) {
        // A named target port would need the pod's container ports, which the sources do
        // not carry: such a port is sniffed.
        let workload_port = match &port.target_port {
            Some(TargetPort::Number(n)) => *n,
            Some(TargetPort::Name(_)) => continue,
            None => port.port,
        };
        let declared = of_port(port.app_protocol.as_deref(), port.name.as_deref());
        match (ports.get(&workload_port), declared) {
            (_, Protocol::Detect) | (Some(Protocol::Http), _) => {}
            _ => {
                ports.insert(workload_port, declared);
            }
        }
    }
    ports
}

fn selects(service: &Service, pod: &Pod) -> bool {
    !service.selector.is_empty()
        && service
            .selector
            .iter()
            .all(|(k, v)| pod.labels.get(k) == Some(v))
}

/// Istio's protocol selection for one Service port: `appProtocol`, then the name's prefix
/// (`<protocol>` or `<protocol>-<suffix>`), case-insensitively.
fn of_port(app_protocol: Option<&str>, name: Option<&str>) -> Protocol {
    let named = |p: &str| match p.to_ascii_lowercase().as_str() {
        "http" | "http2" | "grpc" | "h2c" | "grpc-web" => Protocol::Http,
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "udp" => Protocol::Opaque,
        _ => Protocol::Detect,
    };
    if let Some(app) = app_protocol {
        let declared = named(app.strip_prefix("kubernetes.io/").unwrap_or(app));
        if declared != Protocol::Detect {
            return declared;
        }
    }
    let Some(name) = name else {
        return Protocol::Detect;
    };
    // `grpc-web` is the only protocol with a dash; test it before splitting.
    if name.to_ascii_lowercase().starts_with("grpc-web") {
        return Protocol::Http;
    }
    named(name.split_once('-').map_or(name, |(prefix, _)| prefix))
}

/// What the first bytes of a connection say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Opaque,
    /// Too few bytes yet to tell.
    NeedMore,
}

/// The HTTP/2 connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];
/// Enough bytes to tell every case apart: the whole preface.
pub const DETECT_BYTES: usize = PREFACE.len();

/// Classifies the first bytes a client sent: an HTTP/1 request line starts with a method
/// and a space, HTTP/2 with its preface; anything else is opaque TCP.
pub fn detect(first: &[u8]) -> Detected {
    let prefix_of = |whole: &[u8]| first.len() < whole.len() && whole.starts_with(first);
    if first.starts_with(PREFACE) {
        return Detected::Http2;
    }
    if METHODS.iter().any(|m| first.starts_with(m)) {
        return Detected::Http1;
    }
    if prefix_of(PREFACE) || METHODS.iter().any(|m| prefix_of(m)) {
        return Detected::NeedMore;
    }
    Detected::Opaque
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::files::snapshot_of;

    #[test]
    fn service_ports_declare_protocols_by_app_protocol_then_name() {
        assert_eq!(of_port(Some("http"), Some("tcp-x")), Protocol::Http);
        assert_eq!(
            of_port(Some("kubernetes.io/h2c"), Some("grpc")),
            Protocol::Http
        );
        assert_eq!(of_port(Some("TCP"), Some("http")), Protocol::Opaque);
        assert_eq!(of_port(None, Some("http-web")), Protocol::Http);
        assert_eq!(of_port(None, Some("HTTP2")), Protocol::Http);
        assert_eq!(of_port(None, Some("grpc-web-ui")), Protocol::Http);
        assert_eq!(of_port(None, Some("mysql")), Protocol::Opaque);
        assert_eq!(of_port(None, Some("httpx")), Protocol::Detect);
        assert_eq!(of_port(None, Some("web")), Protocol::Detect);
        assert_eq!(of_port(None, None), Protocol::Detect);
    }

    #[test]
    fn the_services_selecting_a_pod_declare_its_ports() {
        let snapshot = snapshot_of(
            "
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: foo, labels: {app: web}}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: foo}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp-db, port: 5432}
  - {name: grpc-api, port: 9000, targetPort: api}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: bar}
spec:
  selector: {app: web}
  ports: [{name: tcp, port: 7000}]
",
        );
        let ports = declared_ports(&snapshot, &snapshot.pods["foo/web"]);
        // Named target ports cannot be resolved; another namespace's Service selects
        // nothing.
        let expected = HashMap::from([(8080, Protocol::Http), (5432, Protocol::Opaque)]);
        assert_eq!(ports, expected);
    }

    #[test]
    fn first_bytes_tell_http1_http2_and_opaque_apart() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Detected::Http1);
        assert_eq!(detect(b"DELETE /x"), Detected::Http1);
        assert_eq!(detect(PREFACE), Detected::Http2);
        assert_eq!(detect(b"PRI * HTTP/2.0\r\n"), Detected::NeedMore);
        assert_eq!(detect(b"GE"), Detected::NeedMore);
        assert_eq!(detect(b""), Detected::NeedMore);
        assert_eq!(detect(b"GETX"), Detected::Opaque);
        assert_eq!(detect(b"\x16\x03\x01\x02\x00"), Detected::Opaque);
        assert_eq!(detect(b"SSH-2.0-OpenSSH"), Detected::Opaque);
    }
}
