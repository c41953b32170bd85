//! The configuration in force: the latest snapshot and the policy engine built from it,
//! published together so a reader never pairs pods of one version with policies of another.

use std::sync::Arc;

use tokio::sync::watch;

use crate::{discovery::Snapshot, policy::PolicyEngine};

pub struct Applied {
    pub snapshot: Snapshot,
    pub policies: PolicyEngine,
}

impl Applied {
    pub fn new(snapshot: Snapshot, root_namespace: &str, trust_domain: &str) -> Self {
        let policies =
            PolicyEngine::new(&snapshot.policies, root_namespace).with_trust_domain(trust_domain);
        Self { snapshot, policies }
    }
}

pub type AppliedRx = watch::Receiver<Arc<Applied>>;
