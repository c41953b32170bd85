//! Keeps one certificate per identity that has an enrolled pod on this node: requests it
//! when the first pod of the identity enrolls, refreshes it at half-life, backs off
//! exponentially when the CA fails (keeping the current certificate until it expires), and
//! releases it when the last pod leaves.
//!
//! [`SecretManager`] is a cloneable handle; one worker task (spawned by
//! [`SecretManager::spawn`]) owns the schedule and talks to the CA through [`CaClient`].
//! Certificates are published on one `watch` channel per identity, which `tls` reads on
//! every handshake. Timers use tokio's clock, so tests run with `start_paused = true`.
//! Keys are generated in memory (`cert`) and never written anywhere.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
    time::Instant,
};

use super::{
    ca_client::{CaClient, CaClientError},
    cert::{CertError, PendingKey, WorkloadCert},
    spiffe::SpiffeId,
};

mod report;
pub use report::{CertsReport, IdentityReport};

/// Tuning of the refresh schedule.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Lifetime asked of the CA (it may cap it).
    pub ttl: Duration,
    /// First retry delay after a failure; doubles per failure up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A CA call that takes longer counts as a failure.
    pub request_timeout: Duration,
    /// Trust domains whose identities peers may present besides the workloads' own
    /// (`--trust-domain-alias`, Istio's trust domain migration); handed to the TLS
    /// verifiers with each workload's root.
    pub trust_domain_aliases: Vec<String>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            ttl: super::ca::DEFAULT_MAX_TTL,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            trust_domain_aliases: Vec::new(),
        }
    }
}

/// Never refresh sooner than this after a success, so a CA that issues near-expired
/// certificates cannot make the worker spin.
const MIN_REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ManagerError {
    #[error("identity {0} has no enrolled pod on this node")]
    NotEnrolled(SpiffeId),
    #[error("identity {0} was released while waiting for its certificate")]
    Released(SpiffeId),
}

/// Why one request for a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(transparent)]
    Ca(#[from] CaClientError),
    #[error("CA did not answer within {0:?}")]
    Timeout(Duration),
}

/// Handle to the manager; clones share one worker.
#[derive(Clone)]
pub struct SecretManager {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
}

/// State the handle and the worker both read. The lock is never held across an await.
struct Shared {
    slots: Mutex<HashMap<SpiffeId, Slot>>,
    /// Source of [`Slot::generation`]; never reused, even after a slot is removed.
    generations: AtomicU64,
    /// [`ManagerConfig::trust_domain_aliases`].
    trust_domain_aliases: Vec<String>,
}

struct Slot {
    /// Enrolled pods with this identity; the slot is removed when it drops to zero.
    pods: usize,
    /// The current certificate; receivers are the TLS resolvers and `fetch` callers.
    cert: watch::Sender<Option<Arc<WorkloadCert>>>,
    status: Status,
    /// Failed requests since the first pod of the identity enrolled; never reset.
    rotation_failures: u64,
}

/// What the worker is doing for one identity, for the report.
#[derive(Clone, Debug)]
enum Status {
    Requesting,
    Valid {
        refresh_at: Instant,
    },
    Refreshing,
    Backoff {
        until: Instant,
        failures: u32,
        reason: String,
    },
}

enum Command {
    Request { id: SpiffeId, generation: u64 },
    Forget { id: SpiffeId },
}

/// Read-only view of the identities enrolled on this node, for the embedded CA's
/// authorizer: the node may hold exactly these.
#[derive(Clone)]
pub struct Enrolled(Arc<Shared>);

impl Enrolled {
    pub fn contains(&self, id: &SpiffeId) -> bool {
        self.0.lock().contains_key(id)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<SpiffeId, Slot>> {
        // A panic while holding this lock leaves plain data behind, still consistent
        // field by field, so a poisoned lock is safe to keep using.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SecretManager {
    /// Starts the worker on the current tokio runtime. It stops when the last handle drops.
    pub fn spawn(ca: Arc<dyn CaClient>, config: ManagerConfig) -> Self {
        let (manager, worker) = Self::new(config);
        worker.spawn(ca);
        manager
    }

    /// The handle and a worker not started yet, for a CA client that needs the handle
    /// first (the embedded CA's authorizer reads [`SecretManager::enrolled`]). Enrollments
    /// made before the worker starts wait for it.
    pub fn new(config: ManagerConfig) -> (Self, PendingWorker) {
        let shared = Arc::new(Shared {
            slots: Mutex::new(HashMap::new()),
            generations: AtomicU64::new(0),
            trust_domain_aliases: config.trust_domain_aliases.clone(),
        });
        let (commands, rx) = mpsc::unbounded_channel();
        let pending = PendingWorker {
            shared: shared.clone(),
            config,
            commands: rx,
        };
        (Self { shared, commands }, pending)
    }

    /// Trust domains accepted from peers besides each workload's own.
    pub fn trust_domain_aliases(&self) -> &[String] {
        &self.shared.trust_domain_aliases
    }

    /// A pod with identity `id` enrolled on this node. The first one starts a request.
    pub fn add_workload(&self, id: &SpiffeId) {
        let mut slots = self.shared.lock();
        if let Some(slot) = slots.get_mut(id) {
            slot.pods += 1;
            return;
        }
        let generation = self.shared.generations.fetch_add(1, Ordering::Relaxed);
        slots.insert(
            id.clone(),
            Slot {
                pods: 1,
                cert: watch::Sender::new(None),
                status: Status::Requesting,
                rotation_failures: 0,
            },
        );
        // The worker only stops when every handle is gone, and `self` is one.
        let _ = self.commands.send(Command::Request {
            id: id.clone(),
            generation,
        });
    }

    /// A pod with identity `id` left. The last one releases the key and certificate.
    pub fn remove_workload(&self, id: &SpiffeId) {
        let mut slots = self.shared.lock();
        let Some(slot) = slots.get_mut(id) else {
            return;
        };
        slot.pods -= 1;
        if slot.pods == 0 {
            slots.remove(id);
            let _ = self.commands.send(Command::Forget { id: id.clone() });
        }
    }

    /// The current certificate of `id`, waiting for the first one if none was issued yet.
    pub async fn fetch(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, ManagerError> {
        let mut rx = self.subscribe(id)?;
        let current = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ManagerError::Released(id.clone()))?;
        current
            .as_ref()
            .cloned()
            .ok_or_else(|| ManagerError::Released(id.clone()))
    }

    /// Follows the certificate of `id` as it rotates (`None` before the first one and
    /// after expiry without a successor).
    pub fn subscribe(
        &self,
        id: &SpiffeId,
    ) -> Result<watch::Receiver<Option<Arc<WorkloadCert>>>, ManagerError> {
        self.shared
            .lock()
            .get(id)
            .map(|slot| slot.cert.subscribe())
            .ok_or_else(|| ManagerError::NotEnrolled(id.clone()))
    }

    /// The identities enrolled on this node, as the embedded CA's authorizer sees them.
    pub fn enrolled(&self) -> Enrolled {
        Enrolled(self.shared.clone())
    }

    /// Per identity: certificate, validity, next refresh and state.
    pub fn certs_report(&self) -> CertsReport {
        report::build(&self.shared.lock())
    }

    /// Per identity: when its certificate expires and how often asking for one failed.
    pub fn cert_states(&self) -> Vec<CertState> {
        self.shared
            .lock()
            .iter()
            .map(|(id, slot)| CertState {
                identity: id.clone(),
                not_after: slot.cert.borrow().as_ref().map(|c| c.not_after()),
                rotation_failures: slot.rotation_failures,
            })
            .collect()
    }
}

/// One identity's certificate, for metrics.
#[derive(Clone, Debug)]
pub struct CertState {
    pub identity: SpiffeId,
    /// `None` before the first certificate and after expiry without a successor.
    pub not_after: Option<SystemTime>,
    pub rotation_failures: u64,
}

/// A worker waiting for its CA client; see [`SecretManager::new`].
pub struct PendingWorker {
    shared: Arc<Shared>,
    config: ManagerConfig,
    commands: mpsc::UnboundedReceiver<Command>,
}

impl PendingWorker {
    pub fn spawn(self, ca: Arc<dyn CaClient>) {
        let worker = Worker {
            shared: self.shared,
            ca,
            config: self.config,
            commands: self.commands,
            schedule: HashMap::new(),
            inflight: JoinSet::new(),
        };
        tokio::spawn(worker.run());
    }
}

/// The worker's own bookkeeping per identity.
struct Entry {
    /// Set on every (re-)enrollment, so answers meant for a slot that was released and
    /// created again meanwhile are dropped.
    generation: u64,
    /// When to ask the CA next; `None` while a request is in flight.
    next_request: Option<Instant>,
    /// When the published certificate expires and must be withdrawn.
    expires_at: Option<Instant>,
    failures: u32,
}

struct Worker {
    shared: Arc<Shared>,
    ca: Arc<dyn CaClient>,
    config: ManagerConfig,
    commands: mpsc::UnboundedReceiver<Command>,
    schedule: HashMap<SpiffeId, Entry>,
    inflight: JoinSet<(SpiffeId, u64, Result<WorkloadCert, RefreshError>)>,
}

impl Worker {
    async fn run(mut self) {
        loop {
            let wake = self
                .schedule
                .values()
                .flat_map(|e| [e.next_request, e.expires_at])
                .flatten()
                .min();
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::Request { id, generation }) => {
                        self.schedule.insert(id.clone(), Entry {
                            generation,
                            next_request: None,
                            expires_at: None,
                            failures: 0,
                        });
                        self.request(id, generation);
                    }
                    Some(Command::Forget { id }) => {
                        self.schedule.remove(&id);
                    }
                    None => return,
                },
                Some(done) = self.inflight.join_next(), if !self.inflight.is_empty() => {
                    match done {
                        Ok((id, generation, result)) => self.complete(id, generation, result),
                        // Requests neither panic nor get aborted; a JoinError would mean a
                        // bug, and the entry stays without a schedule, visible in the report.
                        Err(e) => tracing::error!(error = %e, "certificate request task failed"),
                    }
                }
                () = sleep_until(wake), if wake.is_some() => self.on_timers(),
            }
        }
    }

    fn request(&mut self, id: SpiffeId, generation: u64) {
        if let Some(slot) = self.shared.lock().get_mut(&id)
            && slot.cert.borrow().is_some()
        {
            slot.status = Status::Refreshing;
        }
        let ca = self.ca.clone();
        let ttl = self.config.ttl;
        let limit = self.config.request_timeout;
        self.inflight.spawn(async move {
            let result = match tokio::time::timeout(limit, issue(&*ca, &id, ttl)).await {
                Ok(result) => result,
                Err(_) => Err(RefreshError::Timeout(limit)),
            };
            (id, generation, result)
        });
    }

    fn complete(
        &mut self,
        id: SpiffeId,
        generation: u64,
        result: Result<WorkloadCert, RefreshError>,
    ) {
        let Some(entry) = self
            .schedule
            .get_mut(&id)
            .filter(|e| e.generation == generation)
        else {
            return;
        };
        let mut slots = self.shared.lock();
        let Some(slot) = slots.get_mut(&id) else {
            return;
        };
        let now = Instant::now();
        match result {
            Ok(cert) => {
                let wall = SystemTime::now();
                let refresh_at = now + cert.until_half_life(wall).max(MIN_REFRESH);
                entry.next_request = Some(refresh_at);
                entry.expires_at = Some(now + cert.until_expiry(wall));
                entry.failures = 0;
                tracing::info!(%id, serial = cert.serial(), "certificate issued");
                slot.status = Status::Valid { refresh_at };
                slot.cert.send_replace(Some(Arc::new(cert)));
            }
            Err(error) => {
                entry.failures += 1;
                let until = now + backoff(&self.config, entry.failures);
                entry.next_request = Some(until);
                tracing::warn!(%id, failures = entry.failures, %error, "certificate request failed");
                slot.rotation_failures += 1;
                slot.status = Status::Backoff {
                    until,
                    failures: entry.failures,
                    reason: error.to_string(),
                };
            }
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        for (id, entry) in &mut self.schedule {
            if entry.expires_at.is_some_and(|t| t <= now) {
                entry.expires_at = None;
                if let Some(slot) = self.shared.lock().get_mut(id) {
                    tracing::warn!(%id, "certificate expired without a successor");
                    slot.cert.send_replace(None);
                }
            }
            if entry.next_request.is_some_and(|t| t <= now) {
                entry.next_request = None;
                due.push((id.clone(), entry.generation));
            }
        }
        for (id, generation) in due {
            self.request(id, generation);
        }
    }
}

/// Generates a fresh key, has the CA sign it, pairs the answer with the key.
async fn issue(
    ca: &dyn CaClient,
    id: &SpiffeId,
    ttl: Duration,
) -> Result<WorkloadCert, RefreshError> {
    let pending = PendingKey::generate(id)?;
    let chain = ca.sign(id, &pending.csr_pem, ttl).await?;
    Ok(WorkloadCert::new(id, pending, chain)?)
}

/// `initial * 2^(failures-1)`, capped.
fn backoff(config: &ManagerConfig, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1));
    config
        .initial_backoff
        .saturating_mul(factor)
        .min(config.max_backoff)
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
