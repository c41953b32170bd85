//! The same-node shortcut: a connection from one pod to another that this agent also
//! serves is admitted and delivered here, without an HBONE tunnel to itself.
//!
//! The agent holds both pods' keys and listeners, so the source's identity is as proved
//! as a mutual TLS handshake would prove it, and the destination's identity is checked
//! against the route's allowed identities as secure naming would check the server's
//! certificate ([`LocalPods::serving`]). Both certificates must be current, as the
//! handshake would need them. From there the destination side is the HBONE server's own
//! code, called with the source as the verified peer: [`entry::enter`] (PeerAuthentication,
//! authorization, limits, the connection to the application from inside its pod with the
//! client's IP), then [`inbound::deliver`] (relay or per-request authorization, and the
//! re-check of live connections when the configuration changes). Skipped: TLS, HTTP/2 and
//! the TCP hop to 15008. Not done here: anything about routes (see
//! [`super::outbound::decide`]).
//!
//! Both ends are recorded as on HBONE: an outbound record (`same-node`) and an inbound
//! one (`same-node-inbound`), sharing the byte counters and the trace, both labelled
//! `mutual_tls` (README, "How it works", says why).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use tracing::debug;

use super::{
    PodProxy, Shared,
    connections::{Close, CloseReason, Opening, Path, TunnelMetadata},
    entry::{self, EntryError},
    inbound, l7,
    limits::Source,
    outbound::Route,
    socket::ProxyStream,
};
use crate::{
    admission::Peer,
    identity::{SpiffeId, manager::ManagerError},
    peers::Client,
};

/// Why a same-node connection did not reach the application.
#[derive(Debug, thiserror::Error)]
pub enum SameNodeError {
    #[error("no certificate for {id} within {timeout:?}")]
    CertificateTimeout {
        id: SpiffeId,
        timeout: std::time::Duration,
    },
    #[error(transparent)]
    Certificate(#[from] ManagerError),
    #[error(transparent)]
    Entry(#[from] EntryError),
}

impl SameNodeError {
    pub fn reason(&self) -> CloseReason {
        match self {
            // Where HBONE would have waited for the certificate and timed out.
            Self::CertificateTimeout { .. } | Self::Certificate(_) => CloseReason::ConnectFailed,
            Self::Entry(error) => error.reason(),
        }
    }
}

/// The pods this agent serves, by each of their IPs, with the identity each runs as; empty when the
/// shortcut is off (`--same-node-shortcut=false`). Cloning shares the table.
pub struct LocalPods<P = PodProxy> {
    enabled: bool,
    pods: Arc<RwLock<ByIp<P>>>,
}

/// Each served pod at its IP, with the identity it runs as.
type ByIp<P> = HashMap<IpAddr, (SpiffeId, Arc<P>)>;

impl<P> Clone for LocalPods<P> {
    fn clone(&self) -> Self {
        Self {
            enabled: self.enabled,
            pods: Arc::clone(&self.pods),
        }
    }
}

impl<P> LocalPods<P> {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            pods: Arc::default(),
        }
    }

    /// `pod` is served at `ip` as `identity`, from now on.
    pub fn insert(&self, ip: IpAddr, identity: SpiffeId, pod: &Arc<P>) {
        if self.enabled {
            self.write().insert(ip, (identity, Arc::clone(pod)));
        }
    }

    /// `pod` is no longer served at `ip`; another pod since served there stays.
    pub fn remove(&self, ip: IpAddr, pod: &Arc<P>) {
        let mut pods = self.write();
        if pods
            .get(&ip)
            .is_some_and(|(_, held)| Arc::ptr_eq(held, pod))
        {
            pods.remove(&ip);
        }
    }

    /// The pod that takes `route` on this node, and the application address in it: an
    /// HBONE route to a pod this agent serves as one of the identities the route allows.
    /// Anything else (a pod of another node, or one whose identity the route does not
    /// allow, which HBONE's secure naming would then refuse) goes as routed.
    pub fn serving(&self, route: &Route) -> Option<(Arc<P>, SocketAddr)> {
        let Route::Hbone {
            gateway,
            target,
            allowed,
        } = route
        else {
            return None;
        };
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        let (identity, pod) = pods.get(&gateway.ip())?;
        allowed
            .contains(identity)
            .then(|| (Arc::clone(pod), *target))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ByIp<P>> {
        self.pods.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Carries `client`, accepted on `source`'s outbound listener for `target` on `server`,
/// as the HBONE server would once the tunnel was up; `outbound` is the client side's
/// record, opened here so that both records count the same bytes.
pub async fn forward(
    client: ProxyStream,
    source: &PodProxy,
    server: Arc<PodProxy>,
    shared: &Shared,
    outbound: Opening,
    target: SocketAddr,
) -> Result<(), SameNodeError> {
    let trace_id = outbound.tunnel.trace_id;
    let client_addr = outbound.source;
    let stats = Arc::clone(&source.stats);
    // Boxed, as `entry::enter` below: their state is needed only until the connection
    // is up, and would otherwise stay in the connection's future for its whole life.
    let fingerprint = match Box::pin(certificates(shared, source, &server)).await {
        Ok(fingerprint) => fingerprint,
        Err(error) => {
            let mut record = shared.connections.open(outbound, stats);
            record.finish(Close::new(error.reason(), &error));
            client.reset();
            return Err(error);
        }
    };
    let principal: Arc<str> = Arc::from(source.identity.to_string());
    let applied = Arc::clone(&shared.applied.borrow());
    let mut inbound_record = inbound::open(
        shared,
        &applied.peers,
        &server,
        Path::SameNodeInbound,
        &Client {
            addr: client_addr,
            identity: Some((&source.identity, &principal)),
            baggage: None,
        },
        target,
        TunnelMetadata {
            trace_id,
            forwarded_for: None,
        },
    );
    let mut outbound_record = shared.connections.open(
        Opening {
            traffic: Some(inbound_record.shared_traffic()),
            ..outbound
        },
        stats,
    );
    // The source's address of the target's family, as its HBONE client would connect.
    let peer = Peer {
        identity: Some(source.identity.clone()),
        ip: client_addr.ip(),
    };
    let charged = Source::Identity(source.identity.clone());
    let entered = match Box::pin(entry::enter(
        shared, &applied, &server, &peer, &charged, target,
    ))
    .await
    {
        Ok(entered) => entered,
        Err(error) => {
            debug!(workload = %server.key, %error, "same-node connection refused or failed");
            inbound::refused(&mut inbound_record, &error);
            outbound_record.finish(Close::new(error.reason(), &error));
            client.reset();
            return Err(error.into());
        }
    };
    let forwarded_client_cert = fingerprint
        .and_then(|hash| l7::forwarded_client_cert(&server.identity, &hash, &source.identity));
    inbound::deliver(
        client,
        entered,
        Arc::clone(&server),
        shared.clone(),
        forwarded_client_cert,
        &mut inbound_record,
    )
    .await;
    // The client side ends as the destination side did (done, denied by a re-check, ...).
    let close = inbound_record.closed().cloned().unwrap_or(Close {
        reason: CloseReason::Aborted,
        error: None,
    });
    outbound_record.finish(close);
    Ok(())
}

/// Waits, as a handshake would, for both pods' current certificates; returns the SHA-256
/// of the source's leaf, which `X-Forwarded-Client-Cert` names.
async fn certificates(
    shared: &Shared,
    source: &PodProxy,
    server: &PodProxy,
) -> Result<Option<[u8; 32]>, SameNodeError> {
    let timeout = shared.limits.connect_timeout;
    let fetch = |id: &SpiffeId| {
        let id = id.clone();
        async move {
            match tokio::time::timeout(timeout, shared.identities.fetch(&id)).await {
                Ok(fetched) => Ok(fetched?),
                Err(_) => Err(SameNodeError::CertificateTimeout { id, timeout }),
            }
        }
    };
    let (source_cert, _) = tokio::try_join!(fetch(&source.identity), fetch(&server.identity))?;
    let leaf = source_cert.certified();
    Ok(leaf
        .cert
        .first()
        .map(|der| crate::identity::cert::sha256(der)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "foo", sa).unwrap()
    }

    fn hbone(pod: &str, allowed: &[&str]) -> Route {
        let ip: IpAddr = pod.parse().unwrap();
        Route::Hbone {
            gateway: SocketAddr::new(ip, 15008),
            target: SocketAddr::new(ip, 8000),
            allowed: allowed.iter().map(|sa| id(sa)).collect(),
        }
    }

    fn local(enabled: bool) -> (LocalPods<String>, Arc<String>) {
        let pods = LocalPods::new(enabled);
        let web = Arc::new("web".to_owned());
        pods.insert("10.0.0.11".parse().unwrap(), id("web"), &web);
        (pods, web)
    }

    #[test]
    fn takes_the_shortcut_only_to_a_served_pod_whose_identity_the_route_allows() {
        let (pods, web) = local(true);
        let served = |route: &Route| {
            pods.serving(route)
                .map(|(pod, target)| (pod.as_str().to_owned(), target))
        };
        let cases: &[(Route, Option<(&str, &str)>)] = &[
            (
                hbone("10.0.0.11", &["web"]),
                Some(("web", "10.0.0.11:8000")),
            ),
            // A Service's other identities may answer too.
            (
                hbone("10.0.0.11", &["canary", "web"]),
                Some(("web", "10.0.0.11:8000")),
            ),
            // Secure naming: the pod here runs as another identity than the route expects.
            (hbone("10.0.0.11", &["canary"]), None),
            // Another node's pod.
            (hbone("10.0.0.12", &["web"]), None),
            (Route::Direct("10.0.0.11:8000".parse().unwrap()), None),
            (Route::Refuse("nowhere".into()), None),
        ];
        for (route, expected) in cases {
            let expected = expected.map(|(pod, target)| (pod.to_owned(), target.parse().unwrap()));
            assert_eq!(served(route), expected, "{route:?}");
        }
        pods.remove("10.0.0.11".parse().unwrap(), &web);
        assert!(pods.serving(&hbone("10.0.0.11", &["web"])).is_none());
    }

    #[test]
    fn a_pod_that_left_does_not_remove_the_one_now_at_its_address() {
        let (pods, old) = local(true);
        let new = Arc::new("web-2".to_owned());
        pods.insert("10.0.0.11".parse().unwrap(), id("web"), &new);
        pods.remove("10.0.0.11".parse().unwrap(), &old);
        let served = pods.serving(&hbone("10.0.0.11", &["web"])).map(|(p, _)| p);
        assert_eq!(served.as_deref().map(String::as_str), Some("web-2"));
    }

    #[test]
    fn switched_off_nothing_takes_the_shortcut() {
        let (pods, _) = local(false);
        assert!(pods.serving(&hbone("10.0.0.11", &["web"])).is_none());
    }
}
