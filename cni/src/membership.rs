//! Which pods are in the mesh: the one rule that the agent applies to every pod it knows
//! and that the plugin applies when the agent cannot answer, so the two never disagree. It
//! reads labels and a flag only; where they come from (a snapshot, the API server) is the
//! caller's business.

use std::{collections::BTreeMap, fmt};

/// Label that enrolls a namespace (`enabled`) or takes a pod out of the mesh (`disabled`).
pub const MESH_LABEL: &str = "ambit.io/mesh";

/// Whether a pod is in the mesh, or the first reason it is not, in the order the agent
/// reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Its namespace is labelled `ambit.io/mesh=enabled`, and the pod is not excluded.
    Enrolled,
    /// The pod is labelled `ambit.io/mesh=disabled`, whatever its namespace says.
    OptedOut,
    /// `spec.hostNetwork`: the pod's network namespace is the node's, and redirecting it
    /// would capture the node.
    HostNetwork,
    /// Its namespace is not labelled `ambit.io/mesh=enabled`, or is not known.
    NotEnrolled,
}

/// Whether a namespace with `labels` is enrolled: its pods are in the mesh unless excluded.
pub fn namespace_enrolled(labels: &BTreeMap<String, String>) -> bool {
    labels.get(MESH_LABEL).map(String::as_str) == Some("enabled")
}

/// The rule: `namespace_labels` is `None` when the pod's namespace is not known.
pub fn membership(
    namespace_labels: Option<&BTreeMap<String, String>>,
    pod_labels: &BTreeMap<String, String>,
    host_network: bool,
) -> Membership {
    if pod_labels.get(MESH_LABEL).map(String::as_str) == Some("disabled") {
        Membership::OptedOut
    } else if host_network {
        Membership::HostNetwork
    } else if namespace_labels.is_some_and(namespace_enrolled) {
        Membership::Enrolled
    } else {
        Membership::NotEnrolled
    }
}

impl fmt::Display for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enrolled => "the pod is in the mesh",
            Self::OptedOut => "the pod opted out (ambit.io/mesh=disabled)",
            Self::HostNetwork => "the pod uses the host's network",
            Self::NotEnrolled => "its namespace is not enrolled (no ambit.io/mesh=enabled)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn membership_follows_namespace_then_pod_then_network() {
        let enabled = labels(&[(MESH_LABEL, "enabled")]);
        let disabled = labels(&[(MESH_LABEL, "disabled")]);
        let none = labels(&[]);
        let cases = [
            // (namespace labels, pod labels, hostNetwork, expected)
            (Some(&enabled), &none, false, Membership::Enrolled),
            (
                Some(&enabled),
                &labels(&[("app", "web")]),
                false,
                Membership::Enrolled,
            ),
            (Some(&enabled), &disabled, false, Membership::OptedOut),
            (Some(&enabled), &none, true, Membership::HostNetwork),
            // Opting out is named first: it is what the pod's owner asked for.
            (Some(&enabled), &disabled, true, Membership::OptedOut),
            (Some(&none), &none, false, Membership::NotEnrolled),
            (Some(&disabled), &none, false, Membership::NotEnrolled),
            (
                Some(&labels(&[(MESH_LABEL, "true")])),
                &none,
                false,
                Membership::NotEnrolled,
            ),
            (None, &none, false, Membership::NotEnrolled),
            // A pod cannot enroll itself in a namespace that is not enrolled.
            (Some(&none), &enabled, false, Membership::NotEnrolled),
            (Some(&none), &none, true, Membership::HostNetwork),
        ];
        for (namespace, pod, host_network, expected) in cases {
            assert_eq!(
                membership(namespace, pod, host_network),
                expected,
                "namespace {namespace:?}, pod {pod:?}, hostNetwork {host_network}"
            );
        }
    }
}
