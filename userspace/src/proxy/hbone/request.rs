//! What an HBONE `CONNECT` request may ask for: a TCP port of the pod whose listener
//! accepted it, never one of the proxy's own listeners. Pure, so it is unit-tested and
//! fuzzed without a network.

use std::net::{IpAddr, SocketAddr};

use ambit_common::ports;
use http::{Method, Uri};

/// Why a request is answered 400 before admission.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("method {0} is not CONNECT")]
    Method(String),
    #[error("authority {0:?} is not an ip:port")]
    Authority(String),
    #[error("target {target} is not this pod ({pod:?})")]
    OtherPod {
        target: SocketAddr,
        pod: Vec<IpAddr>,
    },
    #[error("target port {0} is one of the proxy's own listeners")]
    ProxyPort(u16),
    #[error("target port 0 is not a port")]
    PortZero,
}

/// The application address a `CONNECT` request asks for on the pod at `pod_ips` (every
/// address of the pod; the authority of an IPv6 one is bracketed, `[fd44::5]:8080`).
///
/// The target must be one of the pod's own IPs (the proxy never relays elsewhere) on a
/// port that is not one of the proxy's listeners (which would make the proxy connect to
/// itself).
pub fn connect_target(
    method: &Method,
    uri: &Uri,
    pod_ips: &[IpAddr],
) -> Result<SocketAddr, BadRequest> {
    if method != Method::CONNECT {
        return Err(BadRequest::Method(method.to_string()));
    }
    // A CONNECT URI is an authority alone; anything else (a path, a scheme) is malformed.
    let authority = match (uri.authority(), uri.scheme(), uri.path_and_query()) {
        (Some(authority), None, None) => authority.as_str(),
        _ => return Err(BadRequest::Authority(uri.to_string())),
    };
    let target: SocketAddr = authority
        .parse()
        .map_err(|_| BadRequest::Authority(authority.to_owned()))?;
    let Some(&pod_ip) = pod_ips.iter().find(|&&ip| ip == target.ip()) else {
        return Err(BadRequest::OtherPod {
            target,
            pod: pod_ips.to_vec(),
        });
    };
    match target.port() {
        0 => return Err(BadRequest::PortZero),
        port if ports::is_listener(port) => return Err(BadRequest::ProxyPort(port)),
        _ => {}
    }
    // Rebuilt from the pod's address: nothing else of the authority (an IPv6 scope) counts.
    Ok(SocketAddr::new(pod_ip, target.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: [IpAddr; 2] = [
        IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 5)),
        IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5)),
    ];

    fn target(method: Method, uri: &str) -> Result<SocketAddr, BadRequest> {
        connect_target(&method, &uri.parse().unwrap(), &POD)
    }

    #[test]
    fn accepts_this_pods_application_ports_only() {
        assert_eq!(
            target(Method::CONNECT, "10.0.0.5:8080"),
            Ok("10.0.0.5:8080".parse().unwrap())
        );
        assert_eq!(
            target(Method::GET, "10.0.0.5:8080"),
            Err(BadRequest::Method("GET".into()))
        );
        assert!(matches!(
            target(Method::CONNECT, "10.0.0.6:8080"),
            Err(BadRequest::OtherPod { .. })
        ));
        assert!(matches!(
            target(Method::CONNECT, "127.0.0.1:8080"),
            Err(BadRequest::OtherPod { .. })
        ));
        for port in [15001, 15006, 15008] {
            assert_eq!(
                target(Method::CONNECT, &format!("10.0.0.5:{port}")),
                Err(BadRequest::ProxyPort(port))
            );
        }
        assert_eq!(
            target(Method::CONNECT, "10.0.0.5:0"),
            Err(BadRequest::PortZero)
        );
        assert_eq!(
            target(Method::CONNECT, "[fd00::5]:8080"),
            Ok("[fd00::5]:8080".parse().unwrap()),
            "either address of a dual-stack pod"
        );
        let v6 = target(Method::CONNECT, "[fd00::5%1]:80");
        assert_eq!(
            v6,
            Ok("[fd00::5]:80".parse().unwrap()),
            "the scope is dropped"
        );
        for other in ["[fd00::6]:80", "[::ffff:10.0.0.5]:80", "[::1]:80"] {
            assert!(
                matches!(
                    target(Method::CONNECT, other),
                    Err(BadRequest::OtherPod { .. })
                ),
                "{other}"
            );
        }
        for uri in ["http://10.0.0.5:80/", "10.0.0.5", "web.foo:80", "/path"] {
            assert!(
                matches!(target(Method::CONNECT, uri), Err(BadRequest::Authority(_))),
                "{uri}"
            );
        }
    }
}
