//! Where the agent learns about the cluster: namespaces, pods, services and policies.
//! [`files`] reads them from a directory of YAML (the embedded default); a Kubernetes
//! source will produce the same [`Snapshot`].

pub mod files;
pub mod objects;

use std::collections::BTreeMap;

pub use objects::{Namespace, Pod, Service};

use crate::policy::PolicyObject;

/// Everything the sources know at one moment. Cheap to compare, so consumers can skip
/// reconciling when nothing changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// By name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// By `namespace/name`.
    pub pods: BTreeMap<String, Pod>,
    /// By `namespace/name`.
    pub services: BTreeMap<String, Service>,
    pub policies: Vec<PolicyObject>,
}

impl Snapshot {
    /// True when `pod` is enrolled: its namespace carries `ambit.io/mesh=enabled` and the
    /// pod did not opt out.
    pub fn is_enrolled(&self, pod: &Pod) -> bool {
        !pod.opted_out()
            && self
                .namespaces
                .get(&pod.namespace)
                .is_some_and(Namespace::mesh_enabled)
    }
}
