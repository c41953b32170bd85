//! The configuration in force: the latest snapshot with the policy engine and the
//! destination index built from it, published together so a reader never pairs pods of one
//! version with policies of another.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use tokio::sync::watch;

use crate::{
    destinations::Destinations,
    discovery::Snapshot,
    policy::{PolicyEngine, Workload},
};

pub struct Applied {
    pub snapshot: Snapshot,
    pub policies: PolicyEngine,
    pub destinations: Destinations,
    /// Enrolled pods with an address, by `namespace/name`, as policies select them.
    workloads: HashMap<String, (IpAddr, Workload)>,
}

impl Applied {
    pub fn new(snapshot: Snapshot, root_namespace: &str, trust_domain: &str) -> Self {
        let policies =
            PolicyEngine::new(&snapshot.policies, root_namespace).with_trust_domain(trust_domain);
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
