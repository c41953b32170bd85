//! Where an address leads: every pod by IP and every service by cluster IP and port, with
//! the identities allowed to serve them (secure naming). Built once per configuration.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use crate::{
    discovery::{
        EndpointSlice, Pod, Service, Snapshot,
        objects::{ServicePort, TargetPort},
    },
    identity::SpiffeId,
};

/// An address that can be connected to: a pod, or an address outside the cluster's pods
/// (a selector-less Service's endpoint, such as the API server).
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    /// `namespace/name` of the pod at `ip`, when one is known.
    pub pod: Option<String>,
    pub ip: IpAddr,
    /// Present when the pod is enrolled in the mesh: connections to it travel as HBONE
    /// and its node proxy must present this identity.
    pub identity: Option<SpiffeId>,
    /// Present when pods that must be reached differently claim this IP: no connection
    /// may go there, for this says why. `identity` is then `None`.
    pub conflict: Option<String>,
}

/// A service endpoint and the port it serves the service port on (which may differ
/// between endpoints: a named `targetPort` resolves per pod).
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceEndpoint {
    pub endpoint: Endpoint,
    pub port: u16,
}

/// A service port: the endpoints behind it, or why there can be none.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceTarget {
    /// `namespace/name`.
    pub service: String,
    pub endpoints: Result<Vec<ServiceEndpoint>, String>,
}

#[derive(Debug, Default)]
pub struct Destinations {
    pods: HashMap<IpAddr, Endpoint>,
    services: HashMap<SocketAddr, ServiceTarget>,
}

impl Destinations {
    pub fn new(snapshot: &Snapshot, trust_domain: &str) -> Self {
        let pods = pods_by_ip(snapshot, trust_domain);
        let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
        for slice in snapshot.endpoint_slices.values() {
            if let Some(service) = &slice.service {
                slices
                    .entry((slice.namespace.as_str(), service.as_str()))
                    .or_default()
                    .push(slice);
            }
        }
        let mut services = HashMap::new();
        for service in snapshot.services.values() {
            let Some(cluster_ip) = service.cluster_ip else {
                continue;
            };
            let slices = slices
                .get(&(service.namespace.as_str(), service.name.as_str()))
                .map_or(&[][..], Vec::as_slice);
            for port in &service.ports {
                let endpoints = if slices.is_empty() {
                    selected_endpoints(snapshot, &pods, service, cluster_ip, port)
                } else {
                    Ok(sliced_endpoints(&pods, slices, port))
                };
                services.insert(
                    SocketAddr::new(cluster_ip, port.port),
                    ServiceTarget {
                        service: service.key(),
                        endpoints,
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

    /// Every service port, by cluster address.
    pub fn services(&self) -> impl Iterator<Item = (&SocketAddr, &ServiceTarget)> {
        self.services.iter()
    }
}

/// Without EndpointSlices (the `files` source, or before the controller has written
/// them): the pods the selector picks, on the numeric `targetPort`.
fn selected_endpoints(
    snapshot: &Snapshot,
    pods: &HashMap<IpAddr, Endpoint>,
    service: &Service,
    cluster_ip: IpAddr,
    port: &ServicePort,
) -> Result<Vec<ServiceEndpoint>, String> {
    let target = match &port.target_port {
        None => port.port,
        Some(TargetPort::Number(n)) => *n,
        Some(TargetPort::Name(name)) => {
            return Err(format!(
                "named targetPort {name:?} resolves only through the Service's EndpointSlices, and it has none"
            ));
        }
    };
    // An endpoint is reached as its IP is: a conflict on the IP is the endpoint's. A
    // dual-stack pod is reached at its address of the service address's family.
    let mut endpoints: Vec<ServiceEndpoint> = snapshot
        .pods
        .values()
        .filter(|p| service.selects(p))
        .filter_map(|p| {
            let ip = p
                .ips
                .iter()
                .find(|ip| ip.is_ipv4() == cluster_ip.is_ipv4())?;
            Some(ServiceEndpoint {
                endpoint: Endpoint {
                    pod: Some(p.key()),
                    ..pods.get(ip)?.clone()
                },
                port: target,
            })
        })
        .collect();
    endpoints.sort_by_key(|e| e.endpoint.ip);
    endpoints.dedup_by_key(|e| e.endpoint.ip);
    Ok(endpoints)
}

/// With EndpointSlices: their ready addresses, on the port each slice gives the service
/// port's name. An address of a known pod is reached as that pod is (its identity, its
/// conflict); any other address directly.
fn sliced_endpoints(
    pods: &HashMap<IpAddr, Endpoint>,
    slices: &[&EndpointSlice],
    port: &ServicePort,
) -> Vec<ServiceEndpoint> {
    let name = port.name.as_deref().unwrap_or_default();
    let mut endpoints: Vec<ServiceEndpoint> = slices
        .iter()
        .filter_map(|slice| Some((slice, slice.port(name)?)))
        .flat_map(|(slice, target)| {
            slice.ready_addresses().map(move |ip| ServiceEndpoint {
                endpoint: pods.get(&ip).cloned().unwrap_or(Endpoint {
                    pod: None,
                    ip,
                    identity: None,
                    conflict: None,
                }),
                port: target,
            })
        })
        .collect();
    endpoints.sort_by_key(|e| (e.endpoint.ip, e.port));
    endpoints.dedup_by_key(|e| (e.endpoint.ip, e.port));
    endpoints
}

/// One endpoint per pod IP (every address of a dual-stack pod). Several pods may claim an IP: `hostNetwork` pods share their
/// node's, and a deleted pod's object can outlive its IP's reuse. They make one endpoint
/// when they are reached alike (same identity, or none in the mesh); otherwise the IP is a
/// conflict, since whichever pod answers, secure naming would expect the wrong identity.
fn pods_by_ip(snapshot: &Snapshot, trust_domain: &str) -> HashMap<IpAddr, Endpoint> {
    let mut claims: BTreeMap<IpAddr, Vec<(String, Option<SpiffeId>)>> = BTreeMap::new();
    for pod in snapshot.pods.values() {
        let identity = mesh_identity(snapshot, pod, trust_domain);
        for &ip in &pod.ips {
            claims
                .entry(ip)
                .or_default()
                .push((pod.key(), identity.clone()));
        }
    }
    claims
        .into_iter()
        .map(|(ip, claimants)| (ip, endpoint(ip, claimants)))
        .collect()
}

/// The identity a pod's proxy presents: only an enrolled pod has one (never a
/// `hostNetwork` pod, see [`Snapshot::is_enrolled`]).
pub(crate) fn mesh_identity(
    snapshot: &Snapshot,
    pod: &Pod,
    trust_domain: &str,
) -> Option<SpiffeId> {
    snapshot
        .is_enrolled(pod)
        .then(|| SpiffeId::new(trust_domain, &pod.namespace, &pod.service_account).ok())
        .flatten()
}

/// The endpoint at `ip`; `claimants` (pod key, identity) is non-empty, in key order.
fn endpoint(ip: IpAddr, claimants: Vec<(String, Option<SpiffeId>)>) -> Endpoint {
    let (pod, identity) = claimants[0].clone();
    let pod = Some(pod);
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

    fn service_endpoints(d: &Destinations) -> Vec<Endpoint> {
        service_endpoints_at(d, "10.96.0.1:80")
    }

    /// An EndpointSlice of `foo/web` with `endpoints` (a flow sequence's inside).
    fn slice(name: &str, endpoints: &str, ports: &str) -> String {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: foo, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints: [{endpoints}]\nports: [{ports}]\n"
        )
    }

    /// The endpoints of the service port at `addr`.
    fn service_at(d: &Destinations, addr: &str) -> Result<Vec<ServiceEndpoint>, String> {
        d.service(addr.parse().unwrap()).unwrap().endpoints.clone()
    }

    fn targets(d: &Destinations, addr: &str) -> Result<Vec<(String, u16)>, String> {
        service_at(d, addr).map(|endpoints| {
            endpoints
                .iter()
                .map(|e| (e.endpoint.ip.to_string(), e.port))
                .collect()
        })
    }

    #[test]
    fn slices_give_a_selectorless_service_its_endpoints_reached_directly() {
        let d = destinations(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: foo}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 443, name: https}}]}}\n{}",
            slice(
                "web-1",
                "{addresses: [192.168.9.9]}",
                "{name: https, port: 6443}"
            )
        ));
        assert_eq!(
            targets(&d, "10.96.0.1:443"),
            Ok(vec![("192.168.9.9".into(), 6443)])
        );
        let endpoint = &service_endpoints_at(&d, "10.96.0.1:443")[0];
        assert_eq!((&endpoint.pod, &endpoint.identity), (&None, &None));
    }

    fn service_endpoints_at(d: &Destinations, addr: &str) -> Vec<Endpoint> {
        service_at(d, addr)
            .unwrap()
            .into_iter()
            .map(|e| e.endpoint)
            .collect()
    }

    #[test]
    fn slices_leave_out_unready_endpoints_and_resolve_named_ports_per_slice() {
        let d = destinations(&format!(
            "{}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: foo}}\nspec: {{clusterIP: 10.96.0.1, selector: {{app: web}}, ports: [{{port: 80, name: http, targetPort: web-http}}]}}\n{}{}",
            pod("foo", "a", "serviceAccountName: web", "10.0.0.2"),
            pod("foo", "b", "serviceAccountName: web", "10.0.0.3"),
            slice(
                "web-1",
                "{addresses: [10.0.0.2], conditions: {ready: true}}, {addresses: [10.0.0.3], conditions: {ready: false}}",
                "{name: http, port: 8080}"
            ),
            slice(
                "web-2",
                "{addresses: [10.0.0.4]}",
                "{name: http, port: 9090}"
            ),
        ));
        assert_eq!(
            targets(&d, "10.96.0.1:80"),
            Ok(vec![("10.0.0.2".into(), 8080), ("10.0.0.4".into(), 9090)])
        );
        // A pod's address keeps the pod's identity.
        let endpoints = service_endpoints_at(&d, "10.96.0.1:80");
        assert_eq!(endpoints[0].identity, Some(id("web")));
        assert_eq!(endpoints[0].pod.as_deref(), Some("foo/a"));
    }

    #[test]
    fn without_slices_a_named_target_port_is_refused_with_the_reason() {
        let d = destinations(
            "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: foo}\nspec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80, targetPort: web-http}]}\n",
        );
        let reason = targets(&d, "10.96.0.1:80").unwrap_err();
        assert!(reason.contains("EndpointSlices"), "{reason}");
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
        assert_eq!(endpoints[0].pod.as_deref(), Some("foo/a"));
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
