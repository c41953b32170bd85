//! The configuration in force: the latest snapshot with the policy engine and the
//! destination index built from it, published together so a reader never pairs pods of one
//! version with policies of another.

use std::sync::Arc;

use tokio::sync::watch;

use crate::{destinations::Destinations, discovery::Snapshot, policy::PolicyEngine};

pub struct Applied {
    pub snapshot: Snapshot,
    pub policies: PolicyEngine,
    pub destinations: Destinations,
}

impl Applied {
    pub fn new(snapshot: Snapshot, root_namespace: &str, trust_domain: &str) -> Self {
        let policies =
            PolicyEngine::new(&snapshot.policies, root_namespace).with_trust_domain(trust_domain);
        let destinations = Destinations::new(&snapshot, trust_domain);
        Self {
            snapshot,
            policies,
            destinations,
        }
    }
}

pub type AppliedRx = watch::Receiver<Arc<Applied>>;
