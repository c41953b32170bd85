//! Enrollment: turns the desired state (a [`Snapshot`]) into pods whose traffic goes
//! through the proxy, and back.
//!
//! Enrolling a pod registers it with the kernel programs (closed) at every address it has,
//! opens its listeners inside its namespace (see [`Listeners`]), installs the return path for transparent connections (`routing`),
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
//!
//! In an upgrade the new agent enrolls pods with the listening sockets the old one handed
//! over ([`crate::handover`]) instead of opening its own, and the old one, once they are
//! handed over, stops accepting ([`WorkloadManager::hand_over`]) and leaves every pod's
//! kernel entries and return path to the new one.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
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
    handover::{Inherited, ListenerKey},
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
    #[error("cannot set up a listener: {0}")]
    Listener(std::io::Error),
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
    /// longer exists, no address, an invalid identity): no agent could
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
            | EnrollError::Identity(_) => true,
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
    /// The primary address (`status.podIP`).
    pub ip: Option<IpAddr>,
    /// Every address (`status.podIPs`), the primary first.
    pub ips: Vec<IpAddr>,
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
    /// The listening sockets the tasks of `listeners` accept on, to hand them over.
    listening: Vec<(ListenerKey, OwnedFd)>,
    _descriptors: GaugePermit,
}

/// What a pod's enrollment is built from. Anything else (labels, annotations) may change
/// without touching the pod's sockets or kernel entries.
#[derive(PartialEq, Eq)]
struct Setup<'a> {
    netns: Option<&'a PathBuf>,
    ips: &'a [IpAddr],
    service_account: &'a str,
}

impl<'a> Setup<'a> {
    fn of(pod: &'a Pod) -> Self {
        Self {
            netns: pod.netns.as_ref(),
            ips: &pod.ips,
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
    /// Listening sockets the previous agent handed over, used instead of new ones.
    inherited: Inherited,
}

/// A pod held closed by [`WorkloadManager::closed`].
struct ClosedPod {
    pod: Pod,
    netns_cookie: u64,
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
            inherited: Inherited::default(),
        }
    }

    /// Enrolls pods with the listening sockets the previous agent handed over.
    pub fn inherit(&mut self, inherited: Inherited) {
        self.inherited = inherited;
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
                        info!(workload = %key, ips = ?pod.ips, "enrolled");
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
                    ip: pod.ip(),
                    ips: pod.ips.clone(),
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
        // Listeners handed over for pods this agent does not serve close; those of pods
        // held closed wait for the retry.
        let waiting: Vec<u64> = self.closed.values().map(|c| c.netns_cookie).collect();
        self.inherited.retain(&waiting);
    }

    /// Copies of the listening sockets of every pod served, for the next agent.
    pub fn listening(&self) -> Vec<(ListenerKey, OwnedFd)> {
        self.enrolled
            .values()
            .flat_map(|e| &e.listening)
            .filter_map(|(key, fd)| match fd.try_clone() {
                Ok(fd) => Some((*key, fd)),
                Err(error) => {
                    warn!(?key, %error, "cannot copy a listener for the next agent");
                    None
                }
            })
            .collect()
    }

    /// Stops accepting on every pod's listeners, which the next agent holds now, and
    /// forgets the pods: their kernel entries, return paths and sockets are the next
    /// agent's. Connections already accepted go on until they end.
    pub async fn hand_over(&mut self) {
        self.closed.clear();
        for (key, enrolled) in std::mem::take(&mut self.enrolled) {
            // Cancelled between two accepts: a connection accepted is on its own task.
            for task in enrolled.listeners {
                task.abort();
                let _ = task.await;
            }
            info!(workload = %key, "stopped accepting");
        }
    }

    /// Takes this agent out of the kernel's set of agents (see [`Redirector::leave`]).
    pub fn leave(&mut self) {
        self.redirector.leave();
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
        let ips = pod.ips.clone();
        if ips.is_empty() {
            return Err(EnrollError::MissingIp);
        }
        let netns = PodNetns::enter(&path)?;
        let netns_file = File::open(&path).map_err(|source| EnrollError::OpenNetns {
            netns: path.clone(),
            source,
        })?;
        let netns_cookie = netns.cookie().await?;
        // From here on the pod is closed: its traffic is refused until its listeners serve,
        // and stays refused if setting them up fails.
        self.closed.insert(
            pod.key(),
            ClosedPod {
                pod: pod.clone(),
                netns_cookie,
            },
        );
        self.redirector.register(netns_cookie, &ips, &netns_file)?;
        let listeners = Listeners::open(&netns, netns_cookie, &ips, &mut self.inherited).await?;
        let listening = listeners.handover_copies(netns_cookie)?;
        routing::install(&netns, &self.saved_settings, &ips).await?;
        self.redirector
            .serve(&ips, listeners.hbone.as_fd(), listeners.plaintext.as_fd())?;
        self.closed.remove(&pod.key());

        let proxy = Arc::new(PodProxy {
            key: pod.key(),
            ips,
            identity: identity.clone(),
            netns,
            netns_cookie,
            stats: Arc::default(),
            counters: WorkloadCounters::default(),
            acceptor: OnceCell::new(),
        });
        // Known before its listeners accept: connections queued while no agent accepted
        // (an upgrade's handover) are taken the moment a task starts, on another worker,
        // and the same-node path and the HBONE server look the pod up by identity and IP.
        self.identities.add_workload(&identity);
        for ip in &proxy.ips {
            self.shared.local.insert(*ip, identity.clone(), &proxy);
        }
        let outbound = std::iter::once(listeners.outbound).chain(listeners.outbound_v6);
        let mut tasks: Vec<JoinHandle<()>> = outbound
            .map(|listener| {
                tokio::spawn(outbound::serve(
                    listener,
                    Arc::clone(&proxy),
                    self.shared.clone(),
                ))
            })
            .collect();
        tasks.push(tokio::spawn(inbound::serve(
            listeners.plaintext,
            Arc::clone(&proxy),
            self.shared.clone(),
        )));
        tasks.push(tokio::spawn(hbone::server::serve(
            listeners.hbone,
            Arc::clone(&proxy),
            self.shared.clone(),
        )));
        Ok(EnrolledPod {
            pod: pod.clone(),
            identity,
            proxy,
            listeners: tasks,
            listening,
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
        for ip in &proxy.ips {
            self.shared.local.remove(*ip, &proxy);
        }
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
            .map(|e| (e.proxy.netns_cookie, &e.proxy.ips))
            .chain(self.closed.values().map(|c| (c.netns_cookie, &c.pod.ips)));
        let (cookies, ips): (Vec<u64>, Vec<&Vec<IpAddr>>) = held.unzip();
        let ips: Vec<IpAddr> = ips.into_iter().flatten().copied().collect();
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

/// A pod's listening sockets, in its namespace.
///
/// IPv4 connects are redirected to `127.0.0.1:15001`, IPv6 ones to `[::1]:15001` (an
/// `IPV6_V6ONLY` socket cannot reach an IPv4 listener). The inbound listeners take what
/// `sk_lookup` steers to the pod's addresses: on `127.0.0.1` for an IPv4-only pod, whose
/// namespace (or kernel) may have no IPv6 at all; for a pod with an IPv6 address, one
/// dual-stack socket per role, since an IPv6 lookup can only pick an IPv6 socket and an
/// IPv4 lookup only an IPv4 or dual-stack one. That socket is bound to `::`: the kernel
/// makes a socket bound to any other IPv6 address (`::1` included) IPv6-only. It listens
/// on every address of the namespace, but nothing but the kernel's steering reaches it
/// from outside (`sk_lookup` steers or drops all TCP arriving there), and inside the pod
/// the kernel redirects or refuses every connect to it.
struct Listeners {
    outbound: tokio::net::TcpListener,
    /// Absent only when the namespace has no IPv6 loopback (and the pod no IPv6 address):
    /// its IPv6 connects, redirected to `[::1]:15001`, then fail.
    outbound_v6: Option<tokio::net::TcpListener>,
    plaintext: tokio::net::TcpListener,
    hbone: tokio::net::TcpListener,
}

impl Listeners {
    /// The pod's listeners: those the previous agent handed over for these very
    /// addresses, and new ones for the rest.
    async fn open(
        netns: &PodNetns,
        netns_cookie: u64,
        ips: &[IpAddr],
        inherited: &mut Inherited,
    ) -> Result<Self, EnrollError> {
        let dual_stack = ips.iter().any(IpAddr::is_ipv6);
        let v4 = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let v6 = |port| SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port);
        let any = |port| SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        let inbound = if dual_stack { any } else { v4 };
        let mut listen = Listen {
            netns,
            netns_cookie,
            inherited,
        };
        let outbound = listen.at(v4(ports::OUTBOUND)).await?;
        let outbound_v6 = match listen.at(v6(ports::OUTBOUND)).await {
            Ok(listener) => Some(listener),
            Err(EnrollError::Socket(socket::SocketError::Listen { source, .. }))
                if !dual_stack && lacks_ipv6(&source) =>
            {
                None
            }
            Err(error) => return Err(error),
        };
        let plaintext = listen.at(inbound(ports::INBOUND_PLAINTEXT)).await?;
        let hbone = listen.at(inbound(ports::INBOUND_HBONE)).await?;
        // Sockets handed over for other addresses (the pod's families changed across the
        // upgrade) would keep their ports taken.
        inherited.forget(netns_cookie);
        Ok(Self {
            outbound,
            outbound_v6,
            plaintext,
            hbone,
        })
    }

    /// Copies of the listening sockets, each with its key, for the next agent.
    fn handover_copies(
        &self,
        netns_cookie: u64,
    ) -> Result<Vec<(ListenerKey, OwnedFd)>, EnrollError> {
        [
            Some(&self.outbound),
            self.outbound_v6.as_ref(),
            Some(&self.plaintext),
            Some(&self.hbone),
        ]
        .into_iter()
        .flatten()
        .map(|listener| {
            let key = ListenerKey {
                netns_cookie,
                addr: listener.local_addr()?,
            };
            Ok((key, listener.as_fd().try_clone_to_owned()?))
        })
        .collect::<Result<_, io::Error>>()
        .map_err(EnrollError::Listener)
    }
}

/// Where a pod's listeners come from: the previous agent's, or new ones in its namespace.
struct Listen<'a> {
    netns: &'a PodNetns,
    netns_cookie: u64,
    inherited: &'a mut Inherited,
}

impl Listen<'_> {
    async fn at(&mut self, addr: SocketAddr) -> Result<tokio::net::TcpListener, EnrollError> {
        let key = ListenerKey {
            netns_cookie: self.netns_cookie,
            addr,
        };
        match self.inherited.take(key) {
            Some(listener) => {
                tokio::net::TcpListener::from_std(listener).map_err(EnrollError::Listener)
            }
            None => Ok(socket::listen(self.netns, addr).await?),
        }
    }
}

/// The error of binding `::1` where there is no IPv6: the kernel has none, or the
/// namespace has it disabled.
fn lacks_ipv6(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
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
