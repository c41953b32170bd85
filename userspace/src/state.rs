//! The configuration in force: the latest snapshot with the policy engine and the
//! destination index built from it, published together so a reader never pairs pods of one
//! version with policies of another.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    destinations::Destinations,
    discovery::Snapshot,
    policy::{
        PolicyEngine, Workload,
        jwt::{DEFAULT_CLOCK_SKEW, NoRemoteKeys, RemoteKeys},
    },
};

/// How the policy engine of every snapshot verifies JWTs.
#[derive(Clone)]
pub struct JwtSetup {
    /// The keys of `jwksUri` rules (the agent's fetcher).
    pub keys: Arc<dyn RemoteKeys>,
    /// The leeway on `exp` and `nbf`.
    pub clock_skew: Duration,
}

impl Default for JwtSetup {
    /// No `jwksUri` keys (their tokens are rejected) and the default skew.
    fn default() -> Self {
        Self {
            keys: Arc::new(NoRemoteKeys),
            clock_skew: DEFAULT_CLOCK_SKEW,
        }
    }
}

pub struct Applied {
    pub snapshot: Snapshot,
    pub policies: PolicyEngine,
    pub destinations: Destinations,
    /// Enrolled pods with an address, by `namespace/name`, as policies select them.
    workloads: HashMap<String, (IpAddr, Workload)>,
}

impl Applied {
    pub fn new(
        snapshot: Snapshot,
        root_namespace: &str,
        trust_domain: &str,
        jwt: &JwtSetup,
    ) -> Self {
        let policies = PolicyEngine::new(&snapshot.policies, root_namespace)
            .with_trust_domain(trust_domain)
            .with_remote_keys(Arc::clone(&jwt.keys))
            .with_jwt_clock_skew(jwt.clock_skew);
        let destinations = Destinations::new(&snapshot, trust_domain);
        let workloads = snapshot
            .pods
            .iter()
            .filter(|(_, pod)| snapshot.is_enrolled(pod))
            .filter_map(|(key, pod)| Some((key.clone(), (pod.ip?, Workload::from_pod(pod)))))
            .collect();
        Self {
            snapshot,
            policies,
            destinations,
            workloads,
        }
    }

    /// The pod `key` as policies select it now, if it is still enrolled at `ip`: what an
    /// admission decision for a pod served at `ip` must use.
    pub fn served_workload(&self, key: &str, ip: IpAddr) -> Option<&Workload> {
        self.workloads
            .get(key)
            .and_then(|(at, workload)| (*at == ip).then_some(workload))
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
            "istio-system",
            "cluster.local",
            &JwtSetup::default(),
        )
    }

    #[test]
    fn a_served_pod_is_seen_with_its_current_labels_at_its_current_address() {
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let now = applied("{app: web, locked: \"true\"}", "10.0.0.5");
        let workload = now.served_workload("foo/web", ip).unwrap();
        assert_eq!(
            workload.labels.get("locked").map(String::as_str),
            Some("true")
        );
        // Moved to another address, opted out, or gone: no longer served at `ip`.
        assert!(
            applied("{app: web}", "10.0.0.6")
                .served_workload("foo/web", ip)
                .is_none()
        );
        assert!(
            applied("{ambit.io/mesh: disabled}", "10.0.0.5")
                .served_workload("foo/web", ip)
                .is_none()
        );
        assert!(now.served_workload("foo/other", ip).is_none());
    }
}
