//! Where an address leads: every pod by IP and every service by cluster IP and port, with
//! the identities allowed to serve them (secure naming). Built once per configuration.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use crate::{
    discovery::{Pod, Snapshot, objects::TargetPort},
    identity::SpiffeId,
};

/// A pod that can be connected to.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    /// `namespace/name`.
    pub pod: String,
    pub ip: IpAddr,
    /// Present when the pod is enrolled in the mesh: connections to it travel as HBONE
    /// and its node proxy must present this identity.
    pub identity: Option<SpiffeId>,
}

/// A service port: the endpoints behind it and the target port on them.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceTarget {
    /// `namespace/name`.
    pub service: String,
    pub target_port: Result<u16, String>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Default)]
pub struct Destinations {
    pods: HashMap<IpAddr, Endpoint>,
    services: HashMap<SocketAddr, ServiceTarget>,
}

impl Destinations {
    pub fn new(snapshot: &Snapshot, trust_domain: &str) -> Self {
        let endpoint = |pod: &Pod| {
            let ip = pod.ip?;
            let identity = snapshot
                .is_enrolled(pod)
                .then(|| SpiffeId::new(trust_domain, &pod.namespace, &pod.service_account).ok())
                .flatten();
            Some(Endpoint {
                pod: pod.key(),
                ip,
                identity,
            })
        };
        let pods = snapshot
            .pods
            .values()
            .filter_map(|p| endpoint(p).map(|e| (e.ip, e)))
            .collect();
        let mut services = HashMap::new();
        for service in snapshot.services.values() {
            let Some(cluster_ip) = service.cluster_ip else {
                continue;
            };
            let mut endpoints: Vec<Endpoint> = snapshot
                .pods
                .values()
                .filter(|p| service.selects(p))
                .filter_map(endpoint)
                .collect();
            endpoints.sort_by_key(|e| e.ip);
            for port in &service.ports {
                let target_port = match &port.target_port {
                    None => Ok(port.port),
                    Some(TargetPort::Number(n)) => Ok(*n),
                    Some(TargetPort::Name(name)) => Err(format!(
                        "named targetPort {name:?} is not supported; use a number"
                    )),
                };
                services.insert(
                    SocketAddr::new(cluster_ip, port.port),
                    ServiceTarget {
                        service: format!("{}/{}", service.namespace, service.name),
                        target_port,
                        endpoints: endpoints.clone(),
                    },
                );
            }
        }
        Self { pods, services }
    }

    pub fn pod(&self, ip: IpAddr) -> Option<&Endpoint> {
        self.pods.get(&ip)
    }

    pub fn service(&self, addr: SocketAddr) -> Option<&ServiceTarget> {
        self.services.get(&addr)
    }
}
