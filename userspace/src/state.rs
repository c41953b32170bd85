//! The configuration in force: the latest snapshot with the policy engine and the
//! destination and peer indexes built from it, published together so a reader never pairs pods of one
//! version with policies of another.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    admission::protocol::{self, Protocol},
    destinations::Destinations,
    discovery::Snapshot,
    peers::{ClusterNames, Peers},
    policy::{
        PolicyEngine, Workload,
        jwt::{DEFAULT_CLOCK_SKEW, NoRemoteKeys, RemoteKeys},
    },
};

/// How every snapshot is read: the mesh's names, and how JWTs are verified.
#[derive(Clone)]
pub struct PolicySettings {
    /// Whose selector-less policies apply mesh-wide.
    pub root_namespace: String,
    pub trust_domain: String,
    /// Trust domains whose principals count as the local one's (Istio's migration).
    pub trust_domain_aliases: Vec<String>,
    /// The keys of `jwksUri` rules (the agent's fetcher).
    pub jwt_keys: Arc<dyn RemoteKeys>,
    /// The leeway on `exp` and `nbf`.
    pub clock_skew: Duration,
    /// What telemetry calls the cluster ([`Peers`]).
    pub cluster: ClusterNames,
}

impl PolicySettings {
    /// No aliases, no `jwksUri` keys (their tokens are rejected) and the default skew.
    pub fn new(root_namespace: &str, trust_domain: &str) -> Self {
        Self {
            root_namespace: root_namespace.to_owned(),
            trust_domain: trust_domain.to_owned(),
            trust_domain_aliases: Vec::new(),
            jwt_keys: Arc::new(NoRemoteKeys),
            clock_skew: DEFAULT_CLOCK_SKEW,
            cluster: ClusterNames::default(),
        }
    }
}

pub struct Applied {
    pub snapshot: Snapshot,
    pub policies: PolicyEngine,
    pub destinations: Destinations,
    /// Who is at an address, as metrics and access logs name it.
    pub peers: Peers,
    /// Enrolled pods with an address, by `namespace/name`.
    workloads: HashMap<String, Served>,
}

/// An enrolled pod as the data path decides for it.
pub struct Served {
    /// Every address of the pod.
    pub ips: Vec<IpAddr>,
    /// As policies select it.
    pub workload: Workload,
    /// What the Services selecting it declare, by workload port; absent ports are sniffed.
    ports: HashMap<u16, Protocol>,
}

impl Served {
    pub fn protocol(&self, port: u16) -> Protocol {
        self.ports.get(&port).copied().unwrap_or(Protocol::Detect)
    }
}

impl Applied {
    pub fn new(snapshot: Snapshot, settings: &PolicySettings) -> Self {
        let policies = PolicyEngine::new(&snapshot.policies, &settings.root_namespace)
            .with_trust_domain(&settings.trust_domain)
            .with_trust_domain_aliases(&settings.trust_domain_aliases)
            .with_remote_keys(Arc::clone(&settings.jwt_keys))
            .with_jwt_clock_skew(settings.clock_skew);
        let destinations = Destinations::new(&snapshot, &settings.trust_domain);
        let peers = Peers::new(
            &snapshot,
            &destinations,
            &settings.trust_domain,
            &settings.cluster,
        );
        let workloads = snapshot
            .pods
            .iter()
            .filter(|(_, pod)| snapshot.is_enrolled(pod))
            .filter_map(|(key, pod)| {
                let ports = protocol::declared_ports(&snapshot, pod);
                if pod.ips.is_empty() {
                    return None;
                }
                let served = Served {
                    ips: pod.ips.clone(),
                    workload: Workload::from_pod(pod),
                    ports,
                };
                Some((key.clone(), served))
            })
            .collect();
        Self {
            snapshot,
            policies,
            destinations,
            peers,
            workloads,
        }
    }

    /// The pod `key` as it is now, if it is still enrolled at the addresses `ips`: what an
    /// admission decision for a pod served at `ips` must use.
    pub fn served(&self, key: &str, ips: &[IpAddr]) -> Option<&Served> {
        self.workloads.get(key).filter(|served| served.ips == ips)
    }
}

pub type AppliedRx = watch::Receiver<Arc<Applied>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::files::snapshot_of;

    fn applied(pod_labels: &str, pod_ip: &str) -> Applied {
        let config = format!(
            "
apiVersion: v1
kind: Namespace
metadata: {{name: foo, labels: {{ambit.io/mesh: enabled}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: foo, labels: {pod_labels}}}
status: {{podIP: {pod_ip}}}
"
        );
        Applied::new(
            snapshot_of(&config),
            &PolicySettings::new("istio-system", "cluster.local"),
        )
    }

    #[test]
    fn a_served_pod_is_seen_with_its_current_labels_at_its_current_address() {
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let now = applied("{app: web, locked: \"true\"}", "10.0.0.5");
        let workload = &now.served("foo/web", &[ip]).unwrap().workload;
        assert_eq!(
            workload.labels.get("locked").map(String::as_str),
            Some("true")
        );
        // Moved to another address, opted out, or gone: no longer served at `ip`.
        assert!(
            applied("{app: web}", "10.0.0.6")
                .served("foo/web", &[ip])
                .is_none()
        );
        assert!(
            applied("{ambit.io/mesh: disabled}", "10.0.0.5")
                .served("foo/web", &[ip])
                .is_none()
        );
        assert!(now.served("foo/other", &[ip]).is_none());
    }

    #[test]
    fn a_dual_stack_pod_is_served_at_all_its_addresses_only() {
        let ips: [IpAddr; 2] = ["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let now = applied(
            "{app: web}",
            "10.0.0.5, podIPs: [{ip: 10.0.0.5}, {ip: 'fd00::5'}]",
        );
        assert!(now.served("foo/web", &ips).is_some());
        // Enrolled with one address, the pod gained or lost one: it must be set up again.
        assert!(now.served("foo/web", &ips[..1]).is_none());
        assert!(
            applied("{app: web}", "10.0.0.5")
                .served("foo/web", &ips)
                .is_none()
        );
    }
}
