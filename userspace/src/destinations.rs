//! Where an address leads: every pod by IP and every service by cluster IP and port, with
//! the identities allowed to serve them (secure naming). Built once per configuration.

use std::{
    collections::{BTreeMap, HashMap},
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
    /// Present when pods that must be reached differently claim this IP: no connection
    /// may go there, for this says why. `identity` is then `None`.
    pub conflict: Option<String>,
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
        let pods = pods_by_ip(snapshot, trust_domain);
        let mut services = HashMap::new();
        for service in snapshot.services.values() {
            let Some(cluster_ip) = service.cluster_ip else {
                continue;
            };
            // An endpoint is reached as its IP is: a conflict on the IP is the endpoint's.
            let mut endpoints: Vec<Endpoint> = snapshot
                .pods
                .values()
                .filter(|p| service.selects(p))
                .filter_map(|p| {
                    Some(Endpoint {
                        pod: p.key(),
                        ..pods.get(&p.ip?)?.clone()
                    })
                })
                .collect();
            endpoints.sort_by_key(|e| e.ip);
            endpoints.dedup_by_key(|e| e.ip);
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
                        service: service.key(),
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

/// One endpoint per pod IP. Several pods may claim an IP: `hostNetwork` pods share their
/// node's, and a deleted pod's object can outlive its IP's reuse. They make one endpoint
/// when they are reached alike (same identity, or none in the mesh); otherwise the IP is a
/// conflict, since whichever pod answers, secure naming would expect the wrong identity.
fn pods_by_ip(snapshot: &Snapshot, trust_domain: &str) -> HashMap<IpAddr, Endpoint> {
    let mut claims: BTreeMap<IpAddr, Vec<(String, Option<SpiffeId>)>> = BTreeMap::new();
    for pod in snapshot.pods.values() {
        if let Some(ip) = pod.ip {
            let identity = mesh_identity(snapshot, pod, trust_domain);
            claims.entry(ip).or_default().push((pod.key(), identity));
        }
    }
    claims
        .into_iter()
        .map(|(ip, claimants)| (ip, endpoint(ip, claimants)))
        .collect()
}

/// The identity a pod's proxy presents: only an enrolled pod has one (never a
/// `hostNetwork` pod, see [`Snapshot::is_enrolled`]).
fn mesh_identity(snapshot: &Snapshot, pod: &Pod, trust_domain: &str) -> Option<SpiffeId> {
    snapshot
        .is_enrolled(pod)
        .then(|| SpiffeId::new(trust_domain, &pod.namespace, &pod.service_account).ok())
        .flatten()
}

/// The endpoint at `ip`; `claimants` (pod key, identity) is non-empty, in key order.
fn endpoint(ip: IpAddr, claimants: Vec<(String, Option<SpiffeId>)>) -> Endpoint {
    let (pod, identity) = claimants[0].clone();
    if claimants.iter().all(|(_, other)| *other == identity) {
        return Endpoint {
            pod,
            ip,
            identity,
            conflict: None,
        };
    }
    let names: Vec<String> = claimants
        .iter()
        .map(|(pod, identity)| match identity {
            Some(identity) => format!("{pod} ({identity})"),
            None => format!("{pod} (not in the mesh)"),
        })
        .collect();
    Endpoint {
        pod,
        ip,
        identity: None,
        conflict: Some(format!(
            "{ip} is claimed by {}; refusing rather than guess whose identity to expect",
            names.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::files::snapshot_of;

    const NAMESPACES: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {ambit.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
";

    /// The destinations of `NAMESPACES` plus `objects`.
    fn destinations(objects: &str) -> Destinations {
        Destinations::new(
            &snapshot_of(&format!("{NAMESPACES}{objects}")),
            "cluster.local",
        )
    }

    /// A pod document; `spec` is a flow mapping's inside.
    fn pod(namespace: &str, name: &str, spec: &str, ip: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: web}}}}\nspec: {{{spec}}}\nstatus: {{podIP: {ip}}}\n"
        )
    }

    const SERVICE: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: foo}\nspec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80}]}\n";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "foo", sa).unwrap()
    }

    fn service_endpoints(d: &Destinations) -> &[Endpoint] {
        &d.service("10.96.0.1:80".parse().unwrap())
            .unwrap()
            .endpoints
    }

    #[test]
    fn enrolled_pod_has_its_identity() {
        let d = destinations(&pod("foo", "a", "serviceAccountName: web", "10.0.0.2"));
        let endpoint = d.pod(ip("10.0.0.2")).unwrap();
        assert_eq!(endpoint.identity, Some(id("web")));
        assert_eq!(endpoint.conflict, None);
    }

    #[test]
    fn host_network_pod_gives_its_ip_no_identity() {
        let d = destinations(&format!(
            "{}{SERVICE}",
            pod("foo", "agent", "hostNetwork: true", "192.168.1.5")
        ));
        let endpoint = d.pod(ip("192.168.1.5")).unwrap();
        assert_eq!((&endpoint.identity, &endpoint.conflict), (&None, &None));
        assert_eq!(service_endpoints(&d)[0].identity, None);
    }

    #[test]
    fn host_network_pods_sharing_the_node_ip_are_no_conflict() {
        let d = destinations(&format!(
            "{}{}",
            pod("foo", "a", "hostNetwork: true", "192.168.1.5"),
            pod("legacy", "b", "hostNetwork: true", "192.168.1.5"),
        ));
        assert_eq!(d.pod(ip("192.168.1.5")).unwrap().conflict, None);
    }

    #[test]
    fn enrolled_pod_claiming_the_node_ip_is_a_conflict() {
        let d = destinations(&format!(
            "{}{}",
            pod("foo", "agent", "hostNetwork: true", "192.168.1.5"),
            pod("foo", "app", "serviceAccountName: web", "192.168.1.5"),
        ));
        let endpoint = d.pod(ip("192.168.1.5")).unwrap();
        assert_eq!(endpoint.identity, None);
        assert!(endpoint.conflict.is_some());
    }

    #[test]
    fn pods_with_different_identities_on_one_ip_are_a_conflict() {
        let d = destinations(&format!(
            "{}{}",
            pod("foo", "a", "serviceAccountName: web", "10.0.0.2"),
            pod("foo", "b", "serviceAccountName: admin", "10.0.0.2"),
        ));
        let endpoint = d.pod(ip("10.0.0.2")).unwrap();
        assert_eq!(endpoint.identity, None);
        assert_eq!(
            endpoint.conflict.as_deref(),
            Some(
                "10.0.0.2 is claimed by foo/a (spiffe://cluster.local/ns/foo/sa/web), \
                 foo/b (spiffe://cluster.local/ns/foo/sa/admin); \
                 refusing rather than guess whose identity to expect"
            )
        );
    }

    #[test]
    fn enrolled_and_unenrolled_pods_on_one_ip_are_a_conflict() {
        let d = destinations(&format!(
            "{}{}",
            pod("foo", "a", "serviceAccountName: web", "10.0.0.2"),
            pod("legacy", "b", "", "10.0.0.2"),
        ));
        let conflict = d.pod(ip("10.0.0.2")).unwrap().conflict.clone().unwrap();
        assert!(
            conflict.contains("legacy/b (not in the mesh)"),
            "{conflict}"
        );
    }

    #[test]
    fn pods_with_one_identity_on_one_ip_are_no_conflict() {
        let d = destinations(&format!(
            "{}{}",
            pod("foo", "a", "serviceAccountName: web", "10.0.0.2"),
            pod("foo", "b", "serviceAccountName: web", "10.0.0.2"),
        ));
        let endpoint = d.pod(ip("10.0.0.2")).unwrap();
        assert_eq!(
            (&endpoint.identity, &endpoint.conflict),
            (&Some(id("web")), &None)
        );
    }

    #[test]
    fn service_endpoint_on_a_conflicting_ip_carries_the_conflict() {
        // `b` is outside the service but claims the IP of its endpoint `a`.
        let d = destinations(&format!(
            "{}{}{SERVICE}",
            pod("foo", "a", "serviceAccountName: web", "10.0.0.2"),
            pod("legacy", "b", "", "10.0.0.2"),
        ));
        let endpoints = service_endpoints(&d);
        assert_eq!(endpoints.len(), 1);
        assert_eq!(endpoints[0].pod, "foo/a");
        assert_eq!(endpoints[0].identity, None);
        assert!(endpoints[0].conflict.is_some());
    }

    #[test]
    fn completed_pod_does_not_claim_its_old_ip() {
        let d = destinations(&format!(
            "{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: job, namespace: legacy}}\nstatus: {{podIP: 10.0.0.2, phase: Succeeded}}\n",
            pod("foo", "a", "serviceAccountName: web", "10.0.0.2"),
        ));
        let endpoint = d.pod(ip("10.0.0.2")).unwrap();
        assert_eq!(
            (&endpoint.identity, &endpoint.conflict),
            (&Some(id("web")), &None)
        );
    }
}
