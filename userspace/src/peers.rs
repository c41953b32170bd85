//! Who is at either end of a connection, as metrics and access logs name them: a pod's
//! workload (the Deployment, CronJob, Job or other controller that owns it, never the
//! pod's own name, so that label sets stay bounded), its namespace, app, version and mesh
//! identity, and the Service an address belongs to. Built once per configuration
//! ([`Peers::new`]); the data path only looks up. Decides nothing about traffic.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::HeaderValue;

use crate::{
    destinations::{self, Destinations},
    discovery::{Pod, Snapshot},
    identity::SpiffeId,
    proxy::hbone::baggage::{self, Baggage},
};

/// The pod label that names the Deployment's revision in the ReplicaSet's name.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Istio's canonical service and revision labels, then the Kubernetes recommended ones.
const CANONICAL_NAME: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
const CANONICAL_REVISION: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];
/// A workload named by a label instead of an owner.
const NAME_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app"];

/// The cluster's names, which telemetry carries: its id (Istio's `CLUSTER_ID`, sent in
/// HBONE `baggage`) and its DNS domain (Service hostnames).
#[derive(Clone, Debug)]
pub struct ClusterNames {
    pub id: String,
    pub domain: String,
}

impl Default for ClusterNames {
    fn default() -> Self {
        Self {
            id: "Kubernetes".to_owned(),
            domain: "cluster.local".to_owned(),
        }
    }
}

/// The kind of a workload as ztunnel's `baggage` names it (`k8s.<kind>.name`): other
/// controllers (StatefulSet, DaemonSet) and pods named by a label are `pod`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    CronJob,
    Job,
    Pod,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "deployment",
            Self::CronJob => "cronjob",
            Self::Job => "job",
            Self::Pod => "pod",
        }
    }
}

/// One pod as telemetry names it.
#[derive(Clone, Debug)]
pub struct WorkloadInfo {
    /// [`workload_of`]; `None` when the pod has neither an owner nor a name label.
    pub name: Option<Arc<str>>,
    pub kind: WorkloadKind,
    pub namespace: Arc<str>,
    /// Istio's canonical service: `service.istio.io/canonical-name`,
    /// `app.kubernetes.io/name` or `app`, else the workload name.
    pub app: Option<Arc<str>>,
    /// Istio's canonical revision: `service.istio.io/canonical-revision`,
    /// `app.kubernetes.io/version` or `version`, else `latest`.
    pub version: Arc<str>,
    /// The SPIFFE ID of an enrolled pod.
    pub principal: Option<Arc<str>>,
    /// What its HBONE `CONNECT` requests carry as `baggage`.
    pub baggage: Option<HeaderValue>,
}

/// One end of a connection: its workload when known, and its identity when the
/// connection is mutual TLS (verified, or presented to the peer).
#[derive(Clone, Debug, Default)]
pub struct End {
    pub workload: Option<Arc<WorkloadInfo>>,
    pub principal: Option<Arc<str>>,
}

impl End {
    pub fn name(&self) -> Option<&Arc<str>> {
        self.workload.as_ref()?.name.as_ref()
    }

    pub fn namespace(&self) -> Option<&Arc<str>> {
        self.workload.as_ref().map(|w| &w.namespace)
    }
}

/// Both ends of a connection and how it travels, for its metrics and access log.
#[derive(Clone, Debug, Default)]
pub struct Ends {
    pub source: End,
    pub destination: End,
    /// The hostname of the Service the client reached, or the one the destination serves.
    pub service: Option<Arc<str>>,
    /// Carried as mutual TLS (HBONE) rather than plaintext.
    pub mtls: bool,
}

/// Every pod and Service of a configuration, indexed for the data path.
#[derive(Debug, Default)]
pub struct Peers {
    /// Pods by `namespace/name`.
    pods: HashMap<String, Arc<WorkloadInfo>>,
    /// Pods by IP; an IP several pods claim names none of them.
    by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
    /// Service hostnames by cluster IP and port.
    services: HashMap<SocketAddr, Arc<str>>,
    /// The Service an endpoint (pod IP and target port) serves; the first by
    /// `namespace/name` when several do.
    endpoints: HashMap<SocketAddr, Arc<str>>,
}

impl Peers {
    pub fn new(
        snapshot: &Snapshot,
        destinations: &Destinations,
        trust_domain: &str,
        cluster: &ClusterNames,
    ) -> Self {
        let pods: HashMap<String, Arc<WorkloadInfo>> = snapshot
            .pods
            .iter()
            .map(|(key, pod)| {
                let principal = destinations::mesh_identity(snapshot, pod, trust_domain)
                    .map(|id| Arc::from(id.to_string()));
                (key.clone(), Arc::new(info(pod, principal, cluster)))
            })
            .collect();
        let mut claims: HashMap<IpAddr, Vec<&Arc<WorkloadInfo>>> = HashMap::new();
        for (key, pod) in &snapshot.pods {
            if let Some(info) = pods.get(key) {
                for &ip in &pod.ips {
                    claims.entry(ip).or_default().push(info);
                }
            }
        }
        let by_ip = claims
            .into_iter()
            .filter_map(|(ip, claimants)| match claimants[..] {
                [only] => Some((ip, Arc::clone(only))),
                _ => None,
            })
            .collect();
        let hostnames: BTreeMap<String, Arc<str>> = snapshot
            .services
            .values()
            .map(|s| {
                let host = format!("{}.{}.svc.{}", s.name, s.namespace, cluster.domain);
                (s.key(), Arc::from(host))
            })
            .collect();
        let mut targets: Vec<_> = destinations.services().collect();
        targets.sort_by(|a, b| a.1.service.cmp(&b.1.service));
        let (mut services, mut endpoints) = (HashMap::new(), HashMap::new());
        for (addr, target) in targets {
            let Some(host) = hostnames.get(&target.service) else {
                continue;
            };
            services.insert(*addr, Arc::clone(host));
            for endpoint in target.endpoints.iter().flatten() {
                let at = SocketAddr::new(endpoint.endpoint.ip, endpoint.port);
                endpoints.entry(at).or_insert_with(|| Arc::clone(host));
            }
        }
        Self {
            pods,
            by_ip,
            services,
            endpoints,
        }
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, key: &str) -> Option<&Arc<WorkloadInfo>> {
        self.pods.get(key)
    }

    /// The one pod at `ip`.
    pub fn at(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.by_ip.get(&ip)
    }

    /// The hostname of the Service whose cluster address is `addr`.
    pub fn service(&self, addr: SocketAddr) -> Option<&Arc<str>> {
        self.services.get(&addr)
    }

    /// The hostname of a Service that `endpoint` (a pod address and port) serves.
    pub fn serving(&self, endpoint: SocketAddr) -> Option<&Arc<str>> {
        self.endpoints.get(&endpoint)
    }

    /// The ends of a connection the pod `pod` makes to `destination`, sent on to
    /// `target` (a Service's endpoint, or `destination` itself; `None` when refused),
    /// through HBONE when `mtls`.
    pub fn outbound(
        &self,
        pod: &str,
        destination: SocketAddr,
        target: Option<SocketAddr>,
        mtls: bool,
    ) -> Ends {
        let server = target.and_then(|t| self.at(t.ip()));
        Ends {
            source: self.end(self.pod(pod)),
            destination: self.end(server),
            service: self
                .service(destination)
                .or_else(|| self.serving(target?))
                .cloned(),
            mtls,
        }
    }

    /// The ends of a connection `client` makes to `destination` on the pod `pod`. Its
    /// workload is the pod at its address or, from a mutual TLS peer the configuration
    /// does not know, what its `baggage` claims within its verified namespace.
    pub fn inbound(&self, pod: &str, destination: SocketAddr, client: &Client) -> Ends {
        let workload = self.at(client.addr.ip()).cloned().or_else(|| {
            let (identity, _) = client.identity?;
            let claimed = client.baggage?;
            let namespace = claimed.namespace.as_deref()?;
            (namespace == identity.namespace()).then(|| {
                Arc::new(WorkloadInfo {
                    name: claimed.workload.as_deref().map(Arc::from),
                    kind: WorkloadKind::Pod,
                    namespace: Arc::from(namespace),
                    app: None,
                    version: Arc::from("latest"),
                    principal: None,
                    baggage: None,
                })
            })
        });
        Ends {
            source: End {
                workload,
                principal: client.identity.map(|(_, principal)| Arc::clone(principal)),
            },
            destination: self.end(self.pod(pod)),
            service: self.serving(destination).cloned(),
            mtls: client.identity.is_some(),
        }
    }

    fn end(&self, workload: Option<&Arc<WorkloadInfo>>) -> End {
        End {
            principal: workload.and_then(|w| w.principal.clone()),
            workload: workload.cloned(),
        }
    }
}

/// The client of an inbound connection, as its listener knows it.
pub struct Client<'a> {
    pub addr: SocketAddr,
    /// On mutual TLS: the verified identity, and its SPIFFE ID as a label value.
    pub identity: Option<(&'a SpiffeId, &'a Arc<str>)>,
    /// What an HBONE client's `CONNECT` claims about its workload.
    pub baggage: Option<&'a Baggage>,
}

fn info(pod: &Pod, principal: Option<Arc<str>>, cluster: &ClusterNames) -> WorkloadInfo {
    let (kind, name) = match workload_of(pod) {
        Some((kind, name)) => (kind, Some(Arc::<str>::from(name))),
        None => (WorkloadKind::Pod, None),
    };
    let label = |keys: &[&str]| keys.iter().find_map(|k| pod.labels.get(*k));
    let app = label(&CANONICAL_NAME)
        .map(|app| Arc::from(app.as_str()))
        .or_else(|| name.clone());
    let version = label(&CANONICAL_REVISION).map_or("latest", String::as_str);
    let mut info = WorkloadInfo {
        name,
        kind,
        namespace: Arc::from(pod.namespace.as_str()),
        app,
        version: Arc::from(version),
        principal,
        baggage: None,
    };
    info.baggage = baggage::encode(&info, &cluster.id);
    info
}

/// The workload `pod` belongs to, as Istio derives it: the controller in its
/// `ownerReferences`, a ReplicaSet made by a Deployment (its name less the
/// `pod-template-hash` suffix) standing for the Deployment and a Job made by a CronJob
/// (its name less the schedule's timestamp) for the CronJob; without a controller, the
/// pod's `app.kubernetes.io/name` or `app` label. Never the pod's own name, which would
/// give every pod its own metric series.
pub fn workload_of(pod: &Pod) -> Option<(WorkloadKind, String)> {
    let Some(owner) = pod.owners.iter().find(|o| o.controller) else {
        let name = NAME_LABELS.iter().find_map(|k| pod.labels.get(*k))?;
        return Some((WorkloadKind::Pod, name.clone()));
    };
    let deployment = || {
        let hash = pod.labels.get(POD_TEMPLATE_HASH)?;
        owner.name.strip_suffix(hash.as_str())?.strip_suffix('-')
    };
    Some(match owner.kind.as_str() {
        "ReplicaSet" => match deployment() {
            Some(name) => (WorkloadKind::Deployment, name.to_owned()),
            None => (WorkloadKind::Pod, owner.name.clone()),
        },
        "Job" => match cron_job(&owner.name) {
            Some(name) => (WorkloadKind::CronJob, name.to_owned()),
            None => (WorkloadKind::Job, owner.name.clone()),
        },
        _ => (WorkloadKind::Pod, owner.name.clone()),
    })
}

/// The CronJob that named the Job `job`: `<cronjob>-<scheduled time in minutes>`, 8 to 10
/// digits.
fn cron_job(job: &str) -> Option<&str> {
    let (name, stamp) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
    (digits && !name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::files::snapshot_of;

    fn pod(yaml: &str) -> Pod {
        let doc = serde_yaml::from_str(yaml).unwrap();
        Pod::from_yaml(doc).unwrap().unwrap()
    }

    fn owned(kind: &str, owner: &str, labels: &str) -> Pod {
        pod(&format!(
            "metadata: {{name: web-7d4b9-x2x7q, namespace: foo, labels: {{{labels}}}, ownerReferences: [{{apiVersion: apps/v1, kind: {kind}, name: {owner}, uid: u, controller: true}}]}}"
        ))
    }

    #[test]
    fn workload_names_come_from_the_controller_and_never_from_the_pod() {
        use WorkloadKind::*;
        let cases = [
            (
                owned(
                    "ReplicaSet",
                    "web-7d4b9",
                    "pod-template-hash: 7d4b9, app: other",
                ),
                Some((Deployment, "web")),
            ),
            // A ReplicaSet without the hash label, or whose name does not end in it.
            (
                owned("ReplicaSet", "web-7d4b9", "app: x"),
                Some((Pod, "web-7d4b9")),
            ),
            (
                owned("ReplicaSet", "web-7d4b9", "pod-template-hash: '11111'"),
                Some((Pod, "web-7d4b9")),
            ),
            (owned("StatefulSet", "db", ""), Some((Pod, "db"))),
            (owned("DaemonSet", "agent", ""), Some((Pod, "agent"))),
            (
                owned("Job", "backup-28958400", ""),
                Some((CronJob, "backup")),
            ),
            (owned("Job", "migrate", ""), Some((Job, "migrate"))),
            (
                owned("Job", "migrate-1234567", ""),
                Some((Job, "migrate-1234567")),
            ),
            // No controller: the name labels, the recommended one first.
            (
                pod(
                    "metadata: {name: sleep-1, labels: {app: sleep, app.kubernetes.io/name: sleeper}}",
                ),
                Some((Pod, "sleeper")),
            ),
            (
                pod("metadata: {name: sleep-1, labels: {app: sleep}}"),
                Some((Pod, "sleep")),
            ),
            (
                pod(
                    "metadata: {name: sleep-1, ownerReferences: [{kind: ReplicaSet, name: rs, controller: false}]}",
                ),
                None,
            ),
            (pod("metadata: {name: sleep-1}"), None),
        ];
        for (pod, expected) in &cases {
            let derived = workload_of(pod);
            let derived = derived.as_ref().map(|(kind, name)| (*kind, name.as_str()));
            assert_eq!(derived, *expected, "{:?} {:?}", pod.owners, pod.labels);
        }
    }

    const CONFIG: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {ambit.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9-x2x7q
  namespace: foo
  labels: {app: web, version: v2, pod-template-hash: 7d4b9}
  ownerReferences: [{kind: ReplicaSet, name: web-7d4b9, controller: true}]
spec: {serviceAccountName: web}
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
status: {podIP: 10.0.0.21}
---
apiVersion: v1
kind: Pod
metadata: {name: twin, namespace: legacy, labels: {app: twin}}
spec: {hostNetwork: true}
status: {podIP: 192.168.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: twin2, namespace: legacy, labels: {app: twin}}
spec: {hostNetwork: true}
status: {podIP: 192.168.1.5}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: foo}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: a-web, namespace: foo}
spec: {clusterIP: 10.96.0.2, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
";

    fn peers() -> Peers {
        let snapshot = snapshot_of(CONFIG);
        let destinations = Destinations::new(&snapshot, "cluster.local");
        Peers::new(
            &snapshot,
            &destinations,
            "cluster.local",
            &ClusterNames::default(),
        )
    }

    #[test]
    fn pods_are_named_by_workload_app_version_and_identity() {
        let peers = peers();
        let web = peers.at("10.0.0.11".parse().unwrap()).unwrap();
        assert_eq!(web.name.as_deref(), Some("web"));
        assert_eq!(web.kind, WorkloadKind::Deployment);
        assert_eq!(&*web.namespace, "foo");
        assert_eq!(web.app.as_deref(), Some("web"));
        assert_eq!(&*web.version, "v2");
        assert_eq!(
            web.principal.as_deref(),
            Some("spiffe://cluster.local/ns/foo/sa/web")
        );
        let old = peers.pod("legacy/old").unwrap();
        assert_eq!(
            (old.name.as_deref(), old.principal.as_deref()),
            (None, None)
        );
        assert_eq!(&*old.version, "latest");
        // Shared by two pods: nobody's.
        assert!(peers.at("192.168.1.5".parse().unwrap()).is_none());
    }

    #[test]
    fn outbound_ends_name_the_pod_the_endpoint_and_the_service_reached() {
        let peers = peers();
        let ends = peers.outbound(
            "legacy/old",
            "10.96.0.1:80".parse().unwrap(),
            Some("10.0.0.11:8080".parse().unwrap()),
            false,
        );
        assert_eq!(ends.source.namespace().map(|n| &**n), Some("legacy"));
        assert_eq!(ends.destination.name().map(|n| &**n), Some("web"));
        assert_eq!(ends.service.as_deref(), Some("web.foo.svc.cluster.local"));
        let refused = peers.outbound("legacy/old", "192.0.2.1:80".parse().unwrap(), None, false);
        assert!(refused.destination.workload.is_none() && refused.service.is_none());
    }

    #[test]
    fn an_unknown_mtls_client_is_named_by_its_baggage_within_its_namespace() {
        let peers = peers();
        let id = SpiffeId::new("cluster.local", "bar", "client").unwrap();
        let principal: Arc<str> = Arc::from(id.to_string());
        let claim = |namespace: &str| Baggage {
            namespace: Some(namespace.to_owned()),
            workload: Some("client".to_owned()),
        };
        let (honest, lying) = (claim("bar"), claim("foo"));
        let client = |baggage| Client {
            addr: "10.9.9.9:40000".parse().unwrap(),
            identity: Some((&id, &principal)),
            baggage: Some(baggage),
        };
        let destination = "10.0.0.11:8080".parse().unwrap();
        let ends = peers.inbound("foo/web-7d4b9-x2x7q", destination, &client(&honest));
        assert_eq!(ends.source.name().map(|n| &**n), Some("client"));
        assert_eq!(ends.source.principal.as_deref(), Some(&*principal));
        assert_eq!(ends.destination.name().map(|n| &**n), Some("web"));
        assert_eq!(ends.service.as_deref(), Some("a-web.foo.svc.cluster.local"));
        assert!(ends.mtls);
        let ends = peers.inbound("foo/web-7d4b9-x2x7q", destination, &client(&lying));
        assert!(
            ends.source.workload.is_none(),
            "a namespace the identity does not prove"
        );
        // A known address wins over any claim; plaintext has no principal.
        let ends = peers.inbound(
            "foo/web-7d4b9-x2x7q",
            destination,
            &Client {
                addr: "10.0.0.21:40000".parse().unwrap(),
                identity: None,
                baggage: None,
            },
        );
        assert_eq!(ends.source.namespace().map(|n| &**n), Some("legacy"));
        assert!(!ends.mtls && ends.source.principal.is_none());
    }

    #[test]
    fn services_are_named_by_hostname_from_either_address() {
        let peers = peers();
        assert_eq!(
            peers.service("10.96.0.1:80".parse().unwrap()).map(|h| &**h),
            Some("web.foo.svc.cluster.local")
        );
        // Two Services select the pod: the first by name answers for it.
        assert_eq!(
            peers
                .serving("10.0.0.11:8080".parse().unwrap())
                .map(|h| &**h),
            Some("a-web.foo.svc.cluster.local")
        );
        assert!(peers.serving("10.0.0.11:9090".parse().unwrap()).is_none());
    }
}
