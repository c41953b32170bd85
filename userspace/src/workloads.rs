//! Enrollment: turns the desired state (a [`Snapshot`]) into pods whose traffic goes
//! through the proxy, and back.
//!
//! Enrolling a pod registers it with the kernel programs (closed), opens its listeners
//! inside its namespace, installs the return path for transparent connections (`routing`),
//! hands the listeners to the kernel and asks for its identity's certificate. A pod that
//! fails (its namespace is gone, say) stays registered and so closed, is reported with the
//! reason in `/workloads` and retried on the next pass. A failure on the agent's side (its
//! ports held by another process, say) also makes the agent not ready; one that lies with
//! the pod does not (see [`Failure`]).
//!
//! Only a change of what a pod was set up with (namespace, address, service account)
//! re-enrolls it; labels are read at each decision from the configuration in force. A
//! re-enrolled pod is never opened: its old listeners close (its traffic is refused) and
//! the new ones take over, while its kernel entries stay. Kernel entries are released
//! only once no pod of this node holds them any more.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsFd,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use ambit_cni::Membership;
use ambit_common::ports;
use serde::Serialize;
use tokio::{sync::OnceCell, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    discovery::{Pod, Snapshot},
    identity::{SecretManager, SpiffeError, SpiffeId},
    netns::{NetnsError, PodNetns},
    proxy::{
        PodProxy, Shared,
        connections::WorkloadStats,
        hbone, inbound,
        limits::{GaugePermit, WorkloadCounters},
        outbound, socket,
    },
    redirect::{RedirectError, Redirector},
    routing::{self, RoutingError, SavedSettings},
};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "pod has no network namespace: no ambit.io/netns annotation, no CNI ADD{}",
        why.as_ref().map_or_else(String::new, |why| format!(", {why}"))
    )]
    MissingNetns { why: Option<String> },
    #[error("pod has no status.podIP")]
    MissingIp,
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error("cannot open {}: {source}", netns.display())]
    OpenNetns {
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error(transparent)]
    Identity(#[from] SpiffeError),
}

/// Whether the kernel sends a pod's traffic through the proxy.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", tag = "state", content = "reason")]
pub enum Redirection {
    Redirected,
    /// Its namespace is not labelled `ambit.io/mesh=enabled`.
    NotEnrolled,
    /// The pod is labelled `ambit.io/mesh=disabled`.
    OptedOut,
    /// `spec.hostNetwork`: the pod shares the node's network, which is never meshed.
    HostNetwork,
    /// Enrolled, and served by the agent of the node it runs on (`spec.nodeName`).
    OtherNode,
    /// Enrolled, but setting it up failed; retried.
    Failed(Failure),
}

impl Redirection {
    /// The state's name, as the admin API shows it and metrics label it.
    pub fn state(&self) -> &'static str {
        match self {
            Self::Redirected => "redirected",
            Self::NotEnrolled => "not-enrolled",
            Self::OptedOut => "opted-out",
            Self::HostNetwork => "host-network",
            Self::OtherNode => "other-node",
            Self::Failed(_) => "failed",
        }
    }
}

/// Why an enrolled pod could not be set up. Shown as its reason alone.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Failure {
    pub reason: String,
    /// The pod gives the agent nothing it can set up (no network namespace, or one that no
    /// longer exists, no address, an IPv6 address, an invalid identity): no agent could
    /// serve it, so it is held closed without making the agent unready. Any other failure
    /// (listening ports held by another process, a kernel map or routing error) is the
    /// agent's own and does.
    #[serde(skip)]
    pub lies_with_pod: bool,
}

impl From<&EnrollError> for Failure {
    fn from(error: &EnrollError) -> Self {
        let missing = |source: &std::io::Error| source.kind() == std::io::ErrorKind::NotFound;
        let lies_with_pod = match error {
            EnrollError::MissingNetns { .. }
            | EnrollError::MissingIp
            | EnrollError::Identity(_)
            | EnrollError::Redirect(RedirectError::Ipv6(_)) => true,
            EnrollError::Netns(NetnsError::Open { source, .. })
            | EnrollError::OpenNetns { source, .. } => missing(source),
            _ => false,
        };
        Self {
            reason: error.to_string(),
            lies_with_pod,
        }
    }
}

/// One pod as the admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadStatus {
    pub namespace: String,
    pub name: String,
    pub ip: Option<IpAddr>,
    pub identity: String,
    pub enrolled: bool,
    pub redirection: Redirection,
    pub stats: Arc<WorkloadStats>,
}

/// The admin view of every known pod, by `namespace/name`.
pub type WorkloadTable = Arc<RwLock<BTreeMap<String, WorkloadStatus>>>;

/// A pod the proxy serves.
struct EnrolledPod {
    /// The pod as it was when enrolled; a change of its [`Setup`] re-enrolls it.
    pod: Pod,
    identity: SpiffeId,
    proxy: Arc<PodProxy>,
    listeners: Vec<JoinHandle<()>>,
    _descriptors: GaugePermit,
}

/// What a pod's enrollment is built from. Anything else (labels, annotations) may change
/// without touching the pod's sockets or kernel entries.
#[derive(PartialEq, Eq)]
struct Setup<'a> {
    netns: Option<&'a PathBuf>,
    ip: Option<IpAddr>,
    service_account: &'a str,
}

impl<'a> Setup<'a> {
    fn of(pod: &'a Pod) -> Self {
        Self {
            netns: pod.netns.as_ref(),
            ip: pod.ip,
            service_account: &pod.service_account,
        }
    }
}

pub struct WorkloadManager {
    redirector: Redirector,
    shared: Shared,
    /// Certificates are requested for an identity while at least one of its pods is
    /// enrolled.
    identities: SecretManager,
    trust_domain: String,
    node_name: String,
    saved_settings: SavedSettings,
    enrolled: BTreeMap<String, EnrolledPod>,
    /// Pods registered with the kernel programs whose listeners could not be set up: their
    /// traffic is refused (fail closed) until a retry succeeds or they leave the mesh.
    closed: BTreeMap<String, ClosedPod>,
    table: WorkloadTable,
}

/// A pod held closed by [`WorkloadManager::closed`].
struct ClosedPod {
    pod: Pod,
    netns_cookie: u64,
    ip: IpAddr,
}

impl WorkloadManager {
    pub fn new(
        redirector: Redirector,
        shared: Shared,
        identities: SecretManager,
        trust_domain: String,
        node_name: String,
        saved_settings: SavedSettings,
        table: WorkloadTable,
    ) -> Self {
        Self {
            redirector,
            shared,
            identities,
            trust_domain,
            node_name,
            saved_settings,
            enrolled: BTreeMap::new(),
            closed: BTreeMap::new(),
            table,
        }
    }

    pub fn table(&self) -> WorkloadTable {
        Arc::clone(&self.table)
    }

    /// True when some enrolled pod failed to set up and should be retried.
    pub fn has_failures(&self) -> bool {
        self.read_table()
            .values()
            .any(|w| matches!(w.redirection, Redirection::Failed(_)))
    }

    /// Brings the node to `snapshot`: enrolls, re-enrolls and releases pods, and clears
    /// kernel state that a previous agent left for pods that are no longer enrolled.
    pub async fn reconcile(&mut self, snapshot: &Snapshot) {
        let stale = |pods: &mut dyn Iterator<Item = (&String, &Pod)>| -> Vec<String> {
            pods.filter(|(key, then)| !self.still_served(snapshot, key, then))
                .map(|(key, _)| key.clone())
                .collect()
        };
        let stale_enrolled = stale(&mut self.enrolled.iter().map(|(k, e)| (k, &e.pod)));
        let stale_closed = stale(&mut self.closed.iter().map(|(k, c)| (k, &c.pod)));
        for key in stale_enrolled {
            if let Some(enrolled) = self.enrolled.remove(&key) {
                self.stop(enrolled, snapshot).await;
            }
        }
        // Their kernel entries stay until `release_leftovers`, after the pass has enrolled
        // whatever takes them over.
        for key in stale_closed {
            self.closed.remove(&key);
        }

        let mut table = BTreeMap::new();
        for (key, pod) in &snapshot.pods {
            let membership = snapshot.membership(pod);
            let redirection = match membership {
                Membership::OptedOut => Redirection::OptedOut,
                Membership::HostNetwork => Redirection::HostNetwork,
                Membership::NotEnrolled => Redirection::NotEnrolled,
                Membership::Enrolled if !pod.runs_on(&self.node_name) => Redirection::OtherNode,
                Membership::Enrolled if self.enrolled.contains_key(key) => Redirection::Redirected,
                Membership::Enrolled => match self.enroll(pod).await {
                    Ok(enrolled) => {
                        info!(workload = %key, ip = ?pod.ip, "enrolled");
                        self.enrolled.insert(key.clone(), enrolled);
                        Redirection::Redirected
                    }
                    Err(error) => {
                        warn!(workload = %key, %error, "cannot enroll");
                        Redirection::Failed(Failure::from(&error))
                    }
                },
            };
            let stats = self
                .enrolled
                .get(key)
                .map(|e| Arc::clone(&e.proxy.stats))
                .unwrap_or_default();
            table.insert(
                key.clone(),
                WorkloadStatus {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    ip: pod.ip,
                    identity: SpiffeId::new(
                        &self.trust_domain,
                        &pod.namespace,
                        &pod.service_account,
                    )
                    .map_or_else(|e| e.to_string(), |id| id.to_string()),
                    enrolled: membership == Membership::Enrolled,
                    redirection,
                    stats,
                },
            );
        }
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table;
        self.release_leftovers();
    }

    /// True when the pod set up as `then` is still in `snapshot`, unchanged, and still
    /// this agent's to redirect; otherwise it must be released (and maybe set up again).
    fn still_served(&self, snapshot: &Snapshot, key: &str, then: &Pod) -> bool {
        snapshot
            .pods
            .get(key)
            .is_some_and(|pod| self.serves(snapshot, pod) && Setup::of(pod) == Setup::of(then))
    }

    /// True for the pods this agent redirects.
    fn serves(&self, snapshot: &Snapshot, pod: &Pod) -> bool {
        snapshot.is_enrolled(pod) && pod.runs_on(&self.node_name)
    }

    async fn enroll(&mut self, pod: &Pod) -> Result<EnrolledPod, EnrollError> {
        let identity = SpiffeId::new(&self.trust_domain, &pod.namespace, &pod.service_account)?;
        let path = pod.netns.clone().ok_or_else(|| EnrollError::MissingNetns {
            why: pod.netns_missing.clone(),
        })?;
        let ip = pod.ip.ok_or(EnrollError::MissingIp)?;
        let netns = PodNetns::enter(&path)?;
        let netns_file = File::open(&path).map_err(|source| EnrollError::OpenNetns {
            netns: path.clone(),
            source,
        })?;
        let netns_cookie = netns.cookie().await?;
        // From here on the pod is closed: its traffic is refused until its listeners serve,
        // and stays refused if setting them up fails (an IPv6 address, say).
        self.closed.insert(
            pod.key(),
            ClosedPod {
                pod: pod.clone(),
                netns_cookie,
                ip,
            },
        );
        self.redirector.register(netns_cookie, ip, &netns_file)?;
        let on_loopback = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let outbound_listener = socket::listen(&netns, on_loopback(ports::OUTBOUND)).await?;
        let plaintext_listener =
            socket::listen(&netns, on_loopback(ports::INBOUND_PLAINTEXT)).await?;
        let hbone_listener = socket::listen(&netns, on_loopback(ports::INBOUND_HBONE)).await?;
        routing::install(&netns, &self.saved_settings).await?;
        self.redirector
            .serve(ip, hbone_listener.as_fd(), plaintext_listener.as_fd())?;
        self.closed.remove(&pod.key());

        let proxy = Arc::new(PodProxy {
            key: pod.key(),
            ip,
            identity: identity.clone(),
            netns,
            netns_cookie,
            stats: Arc::default(),
            counters: WorkloadCounters::default(),
            acceptor: OnceCell::new(),
        });
        let listeners = vec![
            tokio::spawn(outbound::serve(
                outbound_listener,
                Arc::clone(&proxy),
                self.shared.clone(),
            )),
            tokio::spawn(inbound::serve(
                plaintext_listener,
                Arc::clone(&proxy),
                self.shared.clone(),
            )),
            tokio::spawn(hbone::server::serve(
                hbone_listener,
                Arc::clone(&proxy),
                self.shared.clone(),
            )),
        ];
        self.identities.add_workload(&identity);
        self.shared.local.insert(ip, identity.clone(), &proxy);
        Ok(EnrolledPod {
            pod: pod.clone(),
            identity,
            proxy,
            listeners,
            _descriptors: self.shared.descriptors.hold_for_pod(),
        })
    }

    /// Stops serving a pod: closes its listeners, after which the kernel refuses its
    /// traffic, and removes its return path unless a pod of `snapshot` is served in the same
    /// namespace. Its kernel entries are left to [`Self::release_leftovers`].
    async fn stop(&mut self, enrolled: EnrolledPod, snapshot: &Snapshot) {
        let EnrolledPod {
            pod,
            identity,
            proxy,
            listeners,
            ..
        } = enrolled;
        self.identities.remove_workload(&identity);
        self.shared.local.remove(proxy.ip, &proxy);
        // Waiting for the aborted tasks means their listening sockets are closed before a
        // new enrollment binds the same ports. Connections already open finish on their
        // own, re-checked against the configuration in force.
        for task in listeners {
            task.abort();
            let _ = task.await;
        }
        let same_netns = snapshot
            .pods
            .values()
            .any(|p| self.serves(snapshot, p) && p.netns == pod.netns);
        if !same_netns && let Err(error) = routing::remove(&proxy.netns, &self.saved_settings).await
        {
            warn!(workload = %pod.key(), %error, "cannot remove the return path");
        }
        info!(workload = %pod.key(), "stopped serving");
    }

    /// Removes kernel entries of pods that are neither enrolled nor held closed now: pods
    /// that left the mesh in this pass, or while a previous agent was down.
    fn release_leftovers(&mut self) {
        let held = self
            .enrolled
            .values()
            .map(|e| (e.proxy.netns_cookie, e.proxy.ip))
            .chain(self.closed.values().map(|c| (c.netns_cookie, c.ip)));
        let (cookies, ips): (Vec<u64>, Vec<IpAddr>) = held.unzip();
        for cookie in self.redirector.enrolled_cookies() {
            if !cookies.contains(&cookie)
                && let Err(error) = self.redirector.release_netns(cookie)
            {
                warn!(netns_cookie = cookie, %error, "cannot release a leftover namespace");
            }
        }
        for ip in self.redirector.inbound_ips() {
            if !ips.contains(&ip)
                && let Err(error) = self.redirector.release_ip(ip)
            {
                warn!(%ip, %error, "cannot release a leftover pod address");
            }
        }
        self.redirector.prune_links(&cookies);
    }

    fn read_table(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, WorkloadStatus>> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[test]
    fn failures_that_lie_with_the_pod_are_told_apart() {
        let netns = PathBuf::from("/var/run/netns/pod");
        let open = |kind: io::ErrorKind| {
            EnrollError::Netns(NetnsError::Open {
                path: netns.clone(),
                source: kind.into(),
            })
        };
        let listen = EnrollError::Socket(socket::SocketError::Listen {
            addr: "127.0.0.1:15001".parse().unwrap(),
            pod: "/var/run/netns/pod".into(),
            source: io::ErrorKind::AddrInUse.into(),
        });
        let cases = [
            (EnrollError::MissingNetns { why: None }, true),
            (EnrollError::MissingIp, true),
            (
                EnrollError::Redirect(RedirectError::Ipv6("fd00::1".parse().unwrap())),
                true,
            ),
            (open(io::ErrorKind::NotFound), true),
            (open(io::ErrorKind::PermissionDenied), false),
            (listen, false),
        ];
        for (error, lies_with_pod) in cases {
            assert_eq!(
                Failure::from(&error).lies_with_pod,
                lies_with_pod,
                "{error}"
            );
        }
    }
}
