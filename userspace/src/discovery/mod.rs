//! Where the agent learns about the cluster: namespaces, pods, services and policies.
//! [`files`] reads them from a directory of YAML (the embedded default); a Kubernetes
//! source will produce the same [`Snapshot`].

pub mod files;
pub mod objects;

use std::collections::BTreeMap;

pub use objects::{Namespace, Pod, Service};

use crate::policy::{
    PolicyError, PolicyObject,
    legacy::{self, LegacyPolicy},
};

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
    /// Istio 1.1 authentication policies as read, waiting for [`Snapshot::convert_legacy`]
    /// (which needs every Service) to turn them into `policies`.
    pub legacy: Vec<LegacyPolicy>,
}

impl Snapshot {
    /// Converts the `legacy` policies into `policies` (see [`legacy::convert`]); a
    /// `MeshPolicy` lands in `root_namespace`. A policy that cannot be converted (its
    /// target names no Service) is left out and returned as an error; the others apply.
    pub fn convert_legacy(&mut self, root_namespace: &str) -> Vec<PolicyError> {
        let mut errors = Vec::new();
        for policy in std::mem::take(&mut self.legacy) {
            match legacy::convert(&policy, self, root_namespace) {
                Ok(objects) => self.policies.extend(objects),
                Err(error) => errors.push(error),
            }
        }
        errors
    }

    /// True when `pod` is enrolled: its namespace carries `ambit.io/mesh=enabled`, the
    /// pod did not opt out, and it has a network namespace of its own (a `hostNetwork`
    /// pod's would be the node's, and redirecting it would capture the node).
    pub fn is_enrolled(&self, pod: &Pod) -> bool {
        !pod.opted_out()
            && !pod.host_network
            && self
                .namespaces
                .get(&pod.namespace)
                .is_some_and(Namespace::mesh_enabled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(pods: &str) -> Snapshot {
        files::snapshot_of(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: foo, labels: {{ambit.io/mesh: enabled}}}}\n{pods}"
        ))
    }

    #[test]
    fn host_network_pod_is_never_enrolled() {
        let snapshot = snapshot(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: agent, namespace: foo}\nspec: {hostNetwork: true}\nstatus: {podIP: 192.168.1.5}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: app, namespace: foo}\nstatus: {podIP: 10.0.0.2}\n",
        );
        assert!(!snapshot.is_enrolled(&snapshot.pods["foo/agent"]));
        assert!(snapshot.is_enrolled(&snapshot.pods["foo/app"]));
    }

    #[test]
    fn completed_pod_is_not_in_the_snapshot() {
        let snapshot = snapshot(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: job, namespace: foo}\nstatus: {podIP: 10.0.0.3, phase: Succeeded}\n",
        );
        assert!(snapshot.pods.is_empty());
    }
}
