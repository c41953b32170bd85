//! Outbound: connections an enrolled pod's applications make, redirected by `connect4` to
//! the pod's listener on 127.0.0.1:15001.
//!
//! accept → recover the original destination → count against the pod's outbound limit →
//! [`decide`] the route (pure) → forward: as HBONE to an enrolled destination, or, when
//! this agent serves that destination too, by the [same-node shortcut](same_node); as
//! plain TCP from the pod to anything else.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ambit_common::ports;
use tracing::{debug, warn};

use super::{
    Accepted, PodProxy, Shared,
    connections::{Close, CloseReason, Direction, Opening, Path, TunnelMetadata},
    forward,
    hbone::{self, client::Connect, trace_context::TraceParent},
    limits::Exceeded,
    same_node::{self, SameNodeError},
    socket::{self, ProxyStream},
};
use crate::{destinations::Destinations, identity::SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("no original destination recorded for {peer} (connection not redirected by ambit?)")]
    NoOrigDst { peer: SocketAddr },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Upstream(#[from] socket::SocketError),
    #[error("HBONE: {0}")]
    Hbone(#[from] hbone::HboneError),
    #[error(transparent)]
    Limit(#[from] Exceeded),
    #[error("same node: {0}")]
    SameNode(#[from] SameNodeError),
}

/// Where a captured connection goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    /// Plain TCP from the pod: the destination is not in the mesh.
    Direct(SocketAddr),
    /// A tunnel through the destination pod's proxy.
    Hbone {
        /// The destination proxy's HBONE address (`pod IP:15008`).
        gateway: SocketAddr,
        /// The application address inside the destination pod (the `:authority`).
        target: SocketAddr,
        /// Identities the destination proxy may present (secure naming).
        allowed: Vec<SpiffeId>,
    },
    /// Nowhere: a service without usable endpoints.
    Refuse(String),
}

/// The route to `destination`: a service address resolves to one of its endpoints (chosen
/// by `pick`), a pod address to that pod; enrolled endpoints are reached by HBONE.
pub fn decide(destinations: &Destinations, destination: SocketAddr, pick: usize) -> Route {
    // The kernel never redirects these; refusing them here too means no configuration and
    // no race can aim the proxy at its own listeners.
    let ip = destination.ip().to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return Route::Refuse(format!("{destination} is local to the pod"));
    }
    if let Some(service) = destinations.service(destination) {
        let endpoints = match &service.endpoints {
            Ok(endpoints) if endpoints.is_empty() => {
                return Route::Refuse(format!("{} has no ready endpoints", service.service));
            }
            Ok(endpoints) => endpoints,
            Err(reason) => return Route::Refuse(format!("{}: {reason}", service.service)),
        };
        let chosen = &endpoints[pick % endpoints.len()];
        let endpoint = &chosen.endpoint;
        if let Some(conflict) = &endpoint.conflict {
            return Route::Refuse(format!("{}: {conflict}", service.service));
        }
        let target = SocketAddr::new(endpoint.ip, chosen.port);
        if endpoint.identity.is_none() {
            return Route::Direct(target);
        }
        // Any workload behind the service may answer for it.
        let mut allowed: Vec<SpiffeId> = endpoints
            .iter()
            .filter_map(|e| e.endpoint.identity.clone())
            .collect();
        allowed.sort();
        allowed.dedup();
        return hbone_route(endpoint.ip, target, allowed);
    }
    match destinations.pod(destination.ip()) {
        Some(endpoint) => match (&endpoint.conflict, &endpoint.identity) {
            (Some(conflict), _) => Route::Refuse(conflict.clone()),
            (None, Some(identity)) => {
                hbone_route(destination.ip(), destination, vec![identity.clone()])
            }
            (None, None) => Route::Direct(destination),
        },
        None => Route::Direct(destination),
    }
}

fn hbone_route(pod: IpAddr, target: SocketAddr, allowed: Vec<SpiffeId>) -> Route {
    Route::Hbone {
        gateway: SocketAddr::new(pod, ports::INBOUND_HBONE),
        target,
        allowed,
    }
}

/// Serves the pod's outbound listener until the pod is released.
pub async fn serve(listener: tokio::net::TcpListener, pod: Arc<PodProxy>, shared: Shared) {
    super::accept_loop(
        listener,
        "outbound",
        pod,
        shared,
        |accepted, pod, shared| async move {
            if let Err(error) = handle(accepted, &pod, &shared).await {
                failed(&pod.key, &error);
            }
        },
    )
    .await
}

fn failed(workload: &str, error: &OutboundError) {
    warn!(%workload, %error, "outbound connection failed");
}

async fn handle(
    accepted: Accepted,
    pod: &Arc<PodProxy>,
    shared: &Shared,
) -> Result<(), OutboundError> {
    let Accepted {
        stream,
        peer,
        descriptor,
    } = accepted;
    let Some(destination) = shared.orig_dst.take(pod.netns_cookie, peer) else {
        stream.reset();
        return Err(OutboundError::NoOrigDst { peer });
    };
    let permit = match pod.counters.outbound(&shared.limits) {
        Ok(permit) => permit,
        Err(exceeded) => {
            stream.reset();
            return Err(exceeded.into());
        }
    };
    let (route, ends, baggage) = {
        let applied = shared.applied.borrow();
        let route = decide(&applied.destinations, destination, usize::from(peer.port()));
        let (target, mtls) = match &route {
            Route::Hbone { target, .. } => (Some(*target), true),
            Route::Direct(target) => (Some(*target), false),
            Route::Refuse(_) => (None, false),
        };
        let ends = applied.peers.outbound(&pod.key, destination, target, mtls);
        let baggage = ends
            .source
            .workload
            .as_ref()
            .and_then(|w| w.baggage.clone());
        (route, ends, baggage)
    };
    let shortcut = shared.local.serving(&route);
    debug!(workload = %pod.key, %destination, ?route, same_node = shortcut.is_some(), "outbound");
    let path = match (&route, &shortcut) {
        (_, Some(_)) => Path::SameNode,
        (Route::Hbone { .. }, None) => Path::Hbone,
        (Route::Direct(_) | Route::Refuse(_), None) => Path::Plaintext,
    };
    // Every connection starts a trace, as with ztunnel: its ID is in this proxy's log line
    // and, through the tunnel's `traceparent`, in the destination proxy's.
    let trace = TraceParent::random();
    let opening = Opening {
        direction: Direction::Outbound,
        path,
        workload: pod.key.clone(),
        source: SocketAddr::new(pod.ip_toward(destination.ip()), peer.port()),
        destination,
        ends,
        tunnel: TunnelMetadata {
            trace_id: Some(trace.trace_id),
            forwarded_for: None,
        },
        traffic: None,
    };
    // A task is as large as the largest future it may await, and every connection's task
    // would otherwise carry the other paths' state for its whole life: the HBONE client's
    // setup is boxed, and the same-node path, which holds more than this task, runs on a
    // task of its own while this one ends (for 1,000 idle connections, 3.3 KiB less each).
    if let Some((server, target)) = shortcut {
        let (pod, shared) = (Arc::clone(pod), shared.clone());
        tokio::spawn(async move {
            let _held = (descriptor, permit);
            let forward = same_node::forward(stream, &pod, server, &shared, opening, target);
            if let Err(error) = forward.await {
                failed(&pod.key, &error.into());
            }
        });
        return Ok(());
    }
    let _held = (descriptor, permit);
    let mut record = shared.connections.open(opening, Arc::clone(&pod.stats));
    let error = match route {
        Route::Direct(addr) => match direct(pod, shared, addr).await {
            Ok((upstream, _descriptor)) => {
                let budget = pod.counters.buffers(&shared.limits);
                forward::relay(stream, upstream, budget, &shared.lanes, &mut record, None).await;
                return Ok(());
            }
            Err(error) => error,
        },
        Route::Hbone {
            gateway,
            target,
            allowed,
        } => {
            let connect = Connect {
                target,
                baggage,
                trace,
            };
            match Box::pin(shared.pool.open(pod, shared, allowed, gateway, connect)).await {
                Ok(tunnel) => {
                    let budget = pod.counters.buffers(&shared.limits);
                    let lanes = &shared.lanes;
                    forward::relay(stream, tunnel, budget, lanes, &mut record, None).await;
                    return Ok(());
                }
                Err(error) => OutboundError::from(error),
            }
        }
        Route::Refuse(reason) => OutboundError::Refused(reason),
    };
    record.finish(Close::new(error.reason(), &error));
    stream.reset();
    Err(error)
}

impl OutboundError {
    pub fn reason(&self) -> CloseReason {
        match self {
            Self::NoOrigDst { .. } => CloseReason::NoOriginalDestination,
            Self::Refused(_) => CloseReason::NoRoute,
            Self::Upstream(_) => CloseReason::ConnectFailed,
            Self::Hbone(error) => error.reason(),
            Self::Limit(_) => CloseReason::Limit,
            Self::SameNode(error) => error.reason(),
        }
    }
}

/// A plain TCP connection from the pod to `addr`, with the descriptor it holds.
async fn direct(
    pod: &PodProxy,
    shared: &Shared,
    addr: SocketAddr,
) -> Result<(ProxyStream, super::limits::GaugePermit), OutboundError> {
    let descriptor = shared.descriptors.acquire()?;
    let timeout = shared.limits.connect_timeout;
    let upstream = socket::connect(&pod.netns, addr, socket::Source::Pod, timeout).await?;
    Ok((upstream, descriptor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::files::snapshot_of;

    const CONFIG: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {ambit.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: foo, labels: {app: web}}
spec: {serviceAccountName: web}
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: foo, labels: {app: web}}
spec: {serviceAccountName: web-canary}
status: {podIP: 10.0.0.12}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {app: old}}
status: {podIP: 10.0.0.21}
---
apiVersion: v1
kind: Pod
metadata: {name: impostor, namespace: legacy}
status: {podIP: 10.0.0.31}
---
apiVersion: v1
kind: Pod
metadata: {name: claimant, namespace: foo}
spec: {serviceAccountName: web}
status: {podIP: 10.0.0.31}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: foo}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}, {port: 81, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: old, namespace: legacy}
spec: {clusterIP: 10.96.0.2, selector: {app: old}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: foo}
spec: {clusterIP: 10.96.0.3, selector: {app: nothing}, ports: [{port: 80}]}
";

    fn destinations() -> Destinations {
        Destinations::new(&snapshot_of(CONFIG), "cluster.local")
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "foo", sa).unwrap()
    }

    fn hbone(pod: &str, target: &str, allowed: &[&str]) -> Route {
        Route::Hbone {
            gateway: addr(&format!("{pod}:15008")),
            target: addr(target),
            allowed: allowed.iter().map(|sa| id(sa)).collect(),
        }
    }

    #[test]
    fn routes_from_a_table() {
        let d = destinations();
        let cases: &[(&str, usize, Route)] = &[
            (
                "10.0.0.11:8080",
                0,
                hbone("10.0.0.11", "10.0.0.11:8080", &["web"]),
            ),
            ("10.0.0.21:80", 0, Route::Direct(addr("10.0.0.21:80"))),
            ("192.0.2.1:443", 0, Route::Direct(addr("192.0.2.1:443"))),
            // A service resolves to an endpoint; any of its workloads may answer.
            (
                "10.96.0.1:80",
                0,
                hbone("10.0.0.11", "10.0.0.11:8080", &["web", "web-canary"]),
            ),
            (
                "10.96.0.1:80",
                1,
                hbone("10.0.0.12", "10.0.0.12:8080", &["web", "web-canary"]),
            ),
            ("10.96.0.2:80", 0, Route::Direct(addr("10.0.0.21:80"))),
            (
                "10.96.0.3:80",
                0,
                Route::Refuse("foo/empty has no ready endpoints".into()),
            ),
            (
                "10.96.0.1:81",
                0,
                Route::Refuse(
                    "foo/web: named targetPort \"http\" resolves only through the Service's EndpointSlices, and it has none".into(),
                ),
            ),
            // A port the service does not expose is not the service.
            ("10.96.0.1:82", 0, Route::Direct(addr("10.96.0.1:82"))),
            // Two pods reached differently claim one IP: neither identity is expected.
            (
                "10.0.0.31:80",
                0,
                Route::Refuse(
                    "10.0.0.31 is claimed by foo/claimant (spiffe://cluster.local/ns/foo/sa/web), legacy/impostor (not in the mesh); refusing rather than guess whose identity to expect".into(),
                ),
            ),
            // Never the pod's own loopback, where the proxy listens.
            (
                "127.0.0.1:15006",
                0,
                Route::Refuse("127.0.0.1:15006 is local to the pod".into()),
            ),
            (
                "0.0.0.0:15001",
                0,
                Route::Refuse("0.0.0.0:15001 is local to the pod".into()),
            ),
        ];
        for (destination, pick, expected) in cases {
            assert_eq!(
                &decide(&d, addr(destination), *pick),
                expected,
                "{destination} pick {pick}"
            );
        }
    }
}
