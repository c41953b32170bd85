//! The Kubernetes objects the agent reads (Namespace, Pod, Service), converted from their
//! YAML form into the fields ambit uses. Unknown fields are ignored here, as real objects
//! carry many; the policy kinds are strict and live in `crate::policy`.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::Deserialize;

/// Namespace label that enrolls its pods, and pod label that opts one out; the rule
/// ([`ambit_cni::membership`]) is shared with the CNI plugin.
pub use ambit_cni::MESH_LABEL;
/// Pod annotation naming the pod's network namespace (files source).
pub const NETNS_ANNOTATION: &str = "ambit.io/netns";
/// Annotation of a static pod's mirror in the API server: the UID the kubelet runs the pod
/// under (its `metadata.uid` is the API server's own).
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

pub type Labels = BTreeMap<String, String>;

/// `metadata` of any object.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
    /// RFC 3339, as Kubernetes writes it; compared as a string, which orders correctly.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

/// One of `metadata.ownerReferences`: the object that created this one.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
    /// Set on the one reference that manages the object (its controller).
    #[serde(default)]
    pub controller: bool,
}

impl ObjectMeta {
    /// The namespace, `default` when unset.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    /// The UID the node knows the pod by (in `K8S_POD_UID` and its cgroup path):
    /// `metadata.uid`, or for a static pod's mirror the kubelet's own UID of the pod.
    pub uid: Option<String>,
    pub labels: Labels,
    /// `metadata.ownerReferences`: what names the pod's workload (`crate::peers`).
    pub owners: Vec<OwnerReference>,
    pub service_account: String,
    /// `status.podIPs`: every address of the pod, at most one per family, `status.podIP`
    /// (the primary) first; empty until the pod has one.
    pub ips: Vec<IpAddr>,
    /// From [`NETNS_ANNOTATION`], or filled in by the agent (`cni_server::overlay`,
    /// `pod_cgroup::Adopter`).
    pub netns: Option<PathBuf>,
    /// Why the agent found no network namespace where it looked for one (never set by a
    /// configuration source); shown with the pod's enrollment failure.
    pub netns_missing: Option<String>,
    /// `spec.nodeName`: the node running the pod; only that node's agent enrolls it.
    pub node_name: Option<String>,
    /// `spec.hostNetwork`: the pod shares its node's network namespace and IP, which
    /// every other such pod and the node itself use too, so that IP names no workload.
    pub host_network: bool,
}

impl Pod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The primary address (`status.podIP`).
    pub fn ip(&self) -> Option<IpAddr> {
        self.ips.first().copied()
    }

    /// True when `ip` is one of the pod's addresses.
    pub fn has_ip(&self, ip: IpAddr) -> bool {
        self.ips.contains(&ip)
    }

    /// True when `node` runs the pod: it names that node in `spec.nodeName`, or no node
    /// (a single-node configuration).
    pub fn runs_on(&self, node: &str) -> bool {
        self.node_name.as_ref().is_none_or(|n| n == node)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub cluster_ip: Option<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub selector: Labels,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// `targetPort`: a number or the name of a container port.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<PodIp>,
    #[serde(default)]
    phase: Option<String>,
}

/// One of `status.podIPs`.
#[derive(Deserialize)]
struct PodIp {
    ip: String,
}

impl PodStatus {
    /// `Succeeded` or `Failed`: every container has stopped for good. The pod keeps its
    /// `podIP` in the API, but the IP is free and may already belong to another pod.
    fn completed(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

#[derive(Deserialize)]
struct PodDoc {
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<PodSpec>,
    #[serde(default)]
    status: Option<PodStatus>,
}

#[derive(Deserialize)]
struct NamespaceDoc {
    metadata: ObjectMeta,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    ports: Vec<ServicePort>,
    #[serde(default)]
    selector: Labels,
}

#[derive(Deserialize)]
struct ServiceDoc {
    metadata: ObjectMeta,
    spec: ServiceSpec,
}

/// Errors converting one document.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("{kind}: {path}: {source}")]
    Shape {
        kind: &'static str,
        /// Where in the object, e.g. `spec.nodeName`.
        path: String,
        source: serde_yaml::Error,
    },
    #[error("{kind} {object}: {field} {value:?} is not an IP address")]
    InvalidIp {
        kind: &'static str,
        object: String,
        field: &'static str,
        value: String,
    },
}

pub(super) fn shape<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    doc: serde_yaml::Value,
) -> Result<T, ObjectError> {
    serde_path_to_error::deserialize(doc).map_err(|error| ObjectError::Shape {
        kind,
        path: error.path().to_string(),
        source: error.into_inner(),
    })
}

pub(super) fn parse_ip(
    kind: &'static str,
    namespace: &str,
    name: &str,
    field: &'static str,
    value: String,
) -> Result<IpAddr, ObjectError> {
    value.parse().map_err(|_| ObjectError::InvalidIp {
        kind,
        object: format!("{namespace}/{name}"),
        field,
        value,
    })
}

impl Namespace {
    pub fn from_yaml(doc: serde_yaml::Value) -> Result<Self, ObjectError> {
        let NamespaceDoc { metadata } = shape("Namespace", doc)?;
        Ok(Self {
            name: metadata.name,
            labels: metadata.labels,
        })
    }
}

impl Pod {
    /// The pod, or `None` for a completed one (`status.phase` `Succeeded` or `Failed`):
    /// it runs nothing and its IP may have been given to another pod, so it is neither
    /// enrolled nor a destination, as if deleted.
    pub fn from_yaml(doc: serde_yaml::Value) -> Result<Option<Self>, ObjectError> {
        let PodDoc {
            metadata,
            spec,
            status,
        } = shape("Pod", doc)?;
        if status.as_ref().is_some_and(PodStatus::completed) {
            return Ok(None);
        }
        let namespace = metadata.namespace().to_owned();
        let ips = match status {
            Some(status) => pod_ips(&namespace, &metadata.name, status)?,
            None => Vec::new(),
        };
        Ok(Some(Self {
            namespace,
            ips,
            netns: metadata
                .annotations
                .get(NETNS_ANNOTATION)
                .map(PathBuf::from),
            netns_missing: None,
            uid: metadata
                .annotations
                .get(MIRROR_ANNOTATION)
                .cloned()
                .or(metadata.uid),
            name: metadata.name,
            labels: metadata.labels,
            owners: metadata.owner_references,
            node_name: spec.as_ref().and_then(|s| s.node_name.clone()),
            host_network: spec.as_ref().is_some_and(|s| s.host_network),
            service_account: spec
                .and_then(|s| s.service_account_name)
                .unwrap_or_else(|| "default".to_owned()),
        }))
    }
}

/// `status.podIP` first, then the other addresses of `status.podIPs` (which repeats the
/// primary); an address the pod shows twice counts once.
fn pod_ips(namespace: &str, name: &str, status: PodStatus) -> Result<Vec<IpAddr>, ObjectError> {
    let primary = status.pod_ip.map(|ip| (ip, "status.podIP"));
    let others = status.pod_ips.into_iter().map(|p| (p.ip, "status.podIPs"));
    let mut ips = Vec::new();
    for (value, field) in primary.into_iter().chain(others) {
        let ip = parse_ip("Pod", namespace, name, field, value)?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn from_yaml(doc: serde_yaml::Value) -> Result<Self, ObjectError> {
        let ServiceDoc { metadata, spec } = shape("Service", doc)?;
        let namespace = metadata.namespace().to_owned();
        let cluster_ip = match spec.cluster_ip.as_deref() {
            None | Some("None") | Some("") => None,
            Some(value) => Some(parse_ip(
                "Service",
                &namespace,
                &metadata.name,
                "spec.clusterIP",
                value.to_owned(),
            )?),
        };
        Ok(Self {
            name: metadata.name,
            namespace,
            cluster_ip,
            ports: spec.ports,
            selector: spec.selector,
        })
    }

    /// True when the service selects `pod`: same namespace, every selector label present.
    pub fn selects(&self, pod: &Pod) -> bool {
        !self.selector.is_empty()
            && self.namespace == pod.namespace
            && self
                .selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> serde_yaml::Value {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn pod_defaults_namespace_and_service_account() {
        let pod = Pod::from_yaml(yaml(
            "metadata: {name: p, annotations: {ambit.io/netns: /var/run/netns/x}}\nstatus: {podIP: 10.0.0.2}",
        ))
        .unwrap()
        .unwrap();
        assert_eq!(pod.namespace, "default");
        assert_eq!(pod.service_account, "default");
        assert_eq!(pod.ips, ["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(pod.netns, Some(PathBuf::from("/var/run/netns/x")));
        assert!(!pod.host_network);
    }

    #[test]
    fn pod_reads_every_address_primary_first() {
        let ips = |status: &str| {
            Pod::from_yaml(yaml(&format!("metadata: {{name: p}}\nstatus: {status}")))
                .unwrap()
                .unwrap()
                .ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ips("{podIP: 10.0.0.2, podIPs: [{ip: 10.0.0.2}, {ip: 'fd44::2'}]}"),
            ["10.0.0.2", "fd44::2"]
        );
        assert_eq!(
            ips("{podIP: 'fd44::2', podIPs: [{ip: 'fd44::2'}]}"),
            ["fd44::2"]
        );
        // The API server always sets both; a hand-written file may give either.
        assert_eq!(
            ips("{podIPs: [{ip: 'fd44::2'}, {ip: 10.0.0.2}]}"),
            ["fd44::2", "10.0.0.2"]
        );
        assert_eq!(ips("{podIP: 10.0.0.2}"), ["10.0.0.2"]);
        assert!(ips("{phase: Pending}").is_empty());
        let err = Pod::from_yaml(yaml(
            "metadata: {name: p}\nstatus: {podIPs: [{ip: 'fd44::zz'}]}",
        ))
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            r#"Pod default/p: status.podIPs "fd44::zz" is not an IP address"#
        );
    }

    #[test]
    fn pod_uid_is_the_kubelets() {
        let uid = |doc| Pod::from_yaml(yaml(doc)).unwrap().unwrap().uid;
        assert_eq!(uid("metadata: {name: p, uid: 0f1e}"), Some("0f1e".into()));
        // A static pod runs under the kubelet's UID; the API server's is its mirror's.
        assert_eq!(
            uid("metadata: {name: p, uid: 0f1e, annotations: {kubernetes.io/config.mirror: 9a8b}}"),
            Some("9a8b".into())
        );
        assert_eq!(uid("metadata: {name: p}"), None);
    }

    #[test]
    fn pod_reads_host_network() {
        let pod = Pod::from_yaml(yaml(
            "metadata: {name: p}\nspec: {hostNetwork: true}\nstatus: {podIP: 192.168.1.5}",
        ))
        .unwrap()
        .unwrap();
        assert!(pod.host_network);
    }

    #[test]
    fn completed_pods_are_dropped() {
        for phase in ["Succeeded", "Failed"] {
            let doc = format!("metadata: {{name: p}}\nstatus: {{podIP: 10.0.0.2, phase: {phase}}}");
            assert_eq!(Pod::from_yaml(yaml(&doc)).unwrap(), None, "{phase}");
        }
        for phase in ["Pending", "Running", "Unknown"] {
            let doc = format!("metadata: {{name: p}}\nstatus: {{podIP: 10.0.0.2, phase: {phase}}}");
            assert!(Pod::from_yaml(yaml(&doc)).unwrap().is_some(), "{phase}");
        }
    }

    #[test]
    fn pod_with_bad_ip_names_the_problem() {
        let err = Pod::from_yaml(yaml("metadata: {name: p}\nstatus: {podIP: 10.0.0.300}"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            r#"Pod default/p: status.podIP "10.0.0.300" is not an IP address"#
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = Pod::from_yaml(yaml("metadata: {name: p}\nspec: {nodeName: 42}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("Pod: spec.nodeName: invalid type: integer"),
            "{err}"
        );
    }

    #[test]
    fn service_selects_pods_of_its_namespace_only() {
        let svc = Service::from_yaml(yaml(
            "metadata: {name: s, namespace: foo}\nspec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80, targetPort: 8000}]}",
        ))
        .unwrap();
        let mut pod = Pod::from_yaml(yaml(
            "metadata: {name: p, namespace: foo, labels: {app: web}}",
        ))
        .unwrap()
        .unwrap();
        assert!(svc.selects(&pod));
        pod.namespace = "bar".into();
        assert!(!svc.selects(&pod));
        assert_eq!(svc.ports[0].target_port, Some(TargetPort::Number(8000)));
    }
}
