//! Where the agent learns about the cluster: namespaces, pods, services and policies.
//! [`files`] reads them from a directory of YAML (the embedded default), [`kubernetes`]
//! from an API server; both turn each object into a [`Snapshot`] entry with
//! [`parse_object`], so the data path cannot tell them apart.

pub mod endpoints;
pub mod files;
pub mod kubernetes;
pub mod objects;

use std::collections::BTreeMap;

use ambit_cni::Membership;
pub use endpoints::EndpointSlice;
pub use objects::{Namespace, Pod, Service};

use crate::policy::{
    self, PolicyError, PolicyObject,
    legacy::{self, LegacyPolicy},
};
use objects::ObjectError;

/// One object the agent uses, converted and validated.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Policy(PolicyObject),
    /// Waits for [`Snapshot::convert_legacy`].
    Legacy(LegacyPolicy),
}

/// Why an object was rejected; the messages name the object and the field.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Converts `doc`, an object of `kind` in `api_version`, with the validation every source
/// shares. `None` for kinds ambit does not use, and for pods that finished (their IP may
/// already be another pod's).
pub fn parse_object(
    api_version: &str,
    kind: &str,
    doc: serde_yaml::Value,
) -> Result<Option<Object>, Rejected> {
    Ok(match kind {
        "Namespace" => Some(Object::Namespace(Namespace::from_yaml(doc)?)),
        "Pod" => Pod::from_yaml(doc)?.map(Object::Pod),
        "Service" => Some(Object::Service(Service::from_yaml(doc)?)),
        "EndpointSlice" if api_version == "discovery.k8s.io/v1" => {
            EndpointSlice::from_yaml(doc)?.map(Object::EndpointSlice)
        }
        _ if legacy::is_legacy_kind(api_version, kind) => {
            Some(Object::Legacy(LegacyPolicy::from_yaml(kind, doc)?))
        }
        _ if policy::is_policy_kind(api_version, kind) => {
            Some(Object::Policy(PolicyObject::from_yaml(kind, doc)?))
        }
        _ => None,
    })
}

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
    /// By `namespace/name`.
    pub endpoint_slices: BTreeMap<String, EndpointSlice>,
    pub policies: Vec<PolicyObject>,
    /// Istio 1.1 authentication policies as read, waiting for [`Snapshot::convert_legacy`]
    /// (which needs every Service) to turn them into `policies`.
    pub legacy: Vec<LegacyPolicy>,
}

impl Snapshot {
    /// Adds `object`, replacing a namespace, pod, service or slice of the same name.
    pub fn insert(&mut self, object: Object) {
        match object {
            Object::Namespace(namespace) => {
                self.namespaces.insert(namespace.name.clone(), namespace);
            }
            Object::Pod(pod) => {
                self.pods.insert(pod.key(), pod);
            }
            Object::Service(service) => {
                self.services.insert(service.key(), service);
            }
            Object::EndpointSlice(slice) => {
                self.endpoint_slices.insert(slice.key(), slice);
            }
            Object::Policy(policy) => self.policies.push(policy),
            Object::Legacy(policy) => self.legacy.push(policy),
        }
    }

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

    /// Whether `pod` is in the mesh, by the rule the CNI plugin also applies: its namespace
    /// carries `ambit.io/mesh=enabled`, the pod did not opt out, and it has a network
    /// namespace of its own (a `hostNetwork` pod's would be the node's).
    pub fn membership(&self, pod: &Pod) -> Membership {
        let namespace = self.namespaces.get(&pod.namespace).map(|n| &n.labels);
        ambit_cni::membership(namespace, &pod.labels, pod.host_network)
    }

    /// True when `pod` is enrolled (see [`Snapshot::membership`]).
    pub fn is_enrolled(&self, pod: &Pod) -> bool {
        self.membership(pod) == Membership::Enrolled
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
