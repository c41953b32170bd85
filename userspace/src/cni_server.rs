//! The CNI events source: the `ambit-cni` plugin's requests on a unix socket (`ambit run
//! --cni-socket`). A pod's `ADD` supplies its network namespace (and its addresses, which
//! the API server only shows after the chain returns) to the desired state, as
//! [`overlay`]s onto the pods the configuration source shows; the answer waits until a
//! reconciliation pass has seen the pod with that namespace and the workload table says
//! whether it is redirected or outside the mesh. Enrollment itself never learns about the
//! socket.
//!
//! The sandboxes are also kept in the state directory ([`SandboxStore`]): a restarted agent
//! gets no second `ADD` for pods already running, and without their namespaces it would
//! leave them unredirected.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ambit_cni::{MAX_REQUEST_BYTES, Reply, Request, Sandbox};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, watch},
};
use tracing::{debug, info, warn};

use crate::{
    discovery::Snapshot,
    state_file,
    workloads::{Redirection, WorkloadTable},
};

/// Requests served at once; more wait in the listen backlog. A node starts pods by the
/// dozen at most, so this only bounds what a runaway client can make the agent hold.
const MAX_CONCURRENT: usize = 64;
/// How long a client may take to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an `ADD` waits for the pod's enrollment. Past the plugin's own timeout (10 s
/// by default) nobody listens any more; this only bounds what a request holds.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The sandboxes the plugin reported, by `namespace/name`.
pub type Sandboxes = BTreeMap<String, Sandbox>;

#[derive(Debug, thiserror::Error)]
pub enum CniServerError {
    #[error("cannot create {}: {source}", dir.display())]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the CNI sandboxes saved in {}: {source}", path.display())]
    Load {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot decode the CNI sandboxes saved in {}: {source}", path.display())]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot save the CNI sandboxes in {}: {source}", path.display())]
    Save {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The sandboxes as last reported, in `<state dir>/cni-sandboxes.json`.
pub struct SandboxStore {
    dir: PathBuf,
    path: PathBuf,
    /// One write at a time, each of the map as it is then: the last write holds every
    /// change made before it.
    writing: tokio::sync::Mutex<()>,
}

impl SandboxStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.to_owned(),
            path: state_dir.join("cni-sandboxes.json"),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// What a previous agent saved, less the sandboxes whose namespace is gone (their
    /// `DEL` came while no agent listened); nothing saved is an empty map.
    pub fn load(&self) -> Result<Sandboxes, CniServerError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Sandboxes::new());
            }
            Err(source) => {
                return Err(CniServerError::Load {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let saved: Vec<Sandbox> =
            serde_json::from_slice(&bytes).map_err(|source| CniServerError::Decode {
                path: self.path.clone(),
                source,
            })?;
        Ok(saved
            .into_iter()
            .filter(|sandbox| sandbox.netns.exists())
            .map(|sandbox| (format!("{}/{}", sandbox.namespace, sandbox.name), sandbox))
            .collect())
    }

    async fn save(&self, sandboxes: &watch::Sender<Sandboxes>) -> Result<(), CniServerError> {
        let _writing = self.writing.lock().await;
        let bytes = serde_json::to_vec(&sandboxes.borrow().values().collect::<Vec<_>>())
            .expect("sandboxes serialize");
        let save_error = |source| CniServerError::Save {
            path: self.path.clone(),
            source,
        };
        // A small file, written synchronously: requests are few and this keeps the order
        // of writes simple.
        state_file::private_dir(&self.dir).map_err(save_error)?;
        state_file::write(&self.path, &bytes, 0o600).map_err(save_error)
    }
}

/// What the server reads and writes in the agent.
pub struct CniServer {
    /// Where [`Request::Add`] records a sandbox for the agent's loop to [`overlay`].
    pub sandboxes: watch::Sender<Sandboxes>,
    /// Each snapshot the agent's loop has reconciled, sent once the pass is over.
    pub reconciled: watch::Receiver<Arc<Snapshot>>,
    pub workloads: WorkloadTable,
    pub store: SandboxStore,
}

/// Fills in each pod's network namespace and address from its sandbox where the
/// configuration source shows none (the API server knows neither until the chain returns).
/// A sandbox whose UID is not the pod's belongs to an earlier pod of the same name, whose
/// `DEL` has not come yet.
pub fn overlay(snapshot: &mut Snapshot, sandboxes: &Sandboxes) {
    for (key, pod) in &mut snapshot.pods {
        let Some(sandbox) = sandboxes.get(key) else {
            continue;
        };
        let same_pod = sandbox.uid.is_empty() || pod.uid.as_ref().is_none_or(|u| *u == sandbox.uid);
        if !same_pod {
            continue;
        }
        if pod.netns.is_none() {
            pod.netns = Some(sandbox.netns.clone());
        }
        if pod.ips.is_empty() {
            pod.ips.clone_from(&sandbox.ips);
        }
    }
}

/// Binds `path`, readable and writable by its owner (root) only: whoever may write there
/// could point a pod's enrollment at any network namespace.
pub fn bind(path: &Path) -> Result<UnixListener, CniServerError> {
    let listen_error = |source| CniServerError::Listen {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| CniServerError::CreateDir {
            dir: dir.to_owned(),
            source,
        })?;
    }
    // A previous agent's socket: nobody answers on it any more.
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(listen_error(error));
        }
        _ => {}
    }
    // Bound, restricted, and only then listening: no client can connect in between.
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(listen_error)?;
    socket
        .bind(&socket2::SockAddr::unix(path).map_err(listen_error)?)
        .map_err(listen_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_error)?;
    socket.listen(128).map_err(listen_error)?;
    socket.set_nonblocking(true).map_err(listen_error)?;
    UnixListener::from_std(socket.into()).map_err(listen_error)
}

impl CniServer {
    pub async fn serve(self, listener: UnixListener) {
        let server = Arc::new(self);
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT));
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "cannot accept a CNI request");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                return;
            };
            let server = Arc::clone(&server);
            tokio::spawn(async move {
                server.handle(stream).await;
                drop(permit);
            });
        }
    }

    async fn handle(&self, stream: UnixStream) {
        let (reader, mut writer) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(reader.take(MAX_REQUEST_BYTES));
        let reply = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
            Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
                Ok(request) => self.answer(request).await,
                Err(error) => Reply::Failed {
                    reason: format!("cannot decode the request: {error}"),
                },
            },
            Ok(Err(error)) => {
                debug!(%error, "cannot read a CNI request");
                return;
            }
            Err(_) => {
                debug!("a CNI client sent no request in time");
                return;
            }
        };
        let mut answer = serde_json::to_vec(&reply).unwrap_or_default();
        answer.push(b'\n');
        if let Err(error) = writer.write_all(&answer).await {
            debug!(%error, "the CNI client left before the answer");
        }
    }

    async fn answer(&self, request: Request) -> Reply {
        let key = request.pod_key();
        match request {
            Request::Add(sandbox) => {
                info!(pod = %key, netns = %sandbox.netns.display(), "CNI ADD");
                let netns = sandbox.netns.clone();
                self.sandboxes.send_modify(|sandboxes| {
                    sandboxes.insert(key.clone(), sandbox);
                });
                // Saved before the answer: a pod must not start on a namespace that a
                // restarted agent would not know.
                if let Err(error) = self.store.save(&self.sandboxes).await {
                    warn!(%error, "cannot save the CNI sandboxes");
                    return Reply::Failed {
                        reason: error.to_string(),
                    };
                }
                let reply = self.wait_for(&key, &netns).await;
                info!(pod = %key, ?reply, "CNI ADD answered");
                reply
            }
            Request::Del { uid, .. } => {
                info!(pod = %key, "CNI DEL");
                // A late DEL of a pod's predecessor of the same name must not take the
                // namespace of the pod that replaced it.
                let removed = self.sandboxes.send_if_modified(|sandboxes| {
                    let same = sandboxes
                        .get(&key)
                        .is_some_and(|s| uid.is_empty() || s.uid.is_empty() || s.uid == uid);
                    same && sandboxes.remove(&key).is_some()
                });
                // A stale entry left behind is pruned at the next start, its namespace
                // gone by then.
                if removed && let Err(error) = self.store.save(&self.sandboxes).await {
                    warn!(%error, "cannot save the CNI sandboxes");
                }
                Reply::Released
            }
        }
    }

    /// Waits until a reconciled snapshot shows `key` in `netns` and the workload table
    /// has a verdict for it; a pod that fails to set up is retried by the agent until
    /// [`ANSWER_TIMEOUT`].
    async fn wait_for(&self, key: &str, netns: &Path) -> Reply {
        let mut reconciled = self.reconciled.clone();
        let mut last_failure = None;
        let wait = async {
            loop {
                let seen = reconciled
                    .borrow_and_update()
                    .pods
                    .get(key)
                    .is_some_and(|pod| pod.netns.as_deref() == Some(netns));
                if seen {
                    match self.verdict(key) {
                        Ok(reply) => return reply,
                        Err(failure) => last_failure = failure,
                    }
                }
                if reconciled.changed().await.is_err() {
                    return Reply::Failed {
                        reason: "the agent is shutting down".into(),
                    };
                }
            }
        };
        match tokio::time::timeout(ANSWER_TIMEOUT, wait).await {
            Ok(reply) => reply,
            Err(_) => Reply::Failed {
                reason: last_failure.unwrap_or_else(|| {
                    format!(
                        "the configuration source did not show {key} within {} s",
                        ANSWER_TIMEOUT.as_secs()
                    )
                }),
            },
        }
    }

    /// The pod's state as the last pass left it, or (as the error) why it is not final
    /// yet.
    fn verdict(&self, key: &str) -> Result<Reply, Option<String>> {
        let table = self.workloads.read().unwrap_or_else(|e| e.into_inner());
        let not_in_mesh = |reason: &str| {
            Ok(Reply::NotInMesh {
                reason: reason.to_owned(),
            })
        };
        match table.get(key).map(|status| &status.redirection) {
            Some(Redirection::Redirected) => Ok(Reply::Enrolled),
            Some(Redirection::NotEnrolled) => not_in_mesh("its namespace is not enrolled"),
            Some(Redirection::OptedOut) => not_in_mesh("the pod opted out"),
            Some(Redirection::HostNetwork) => not_in_mesh("the pod uses the host's network"),
            Some(Redirection::OtherNode) => Ok(Reply::Failed {
                reason: "the pod is scheduled on another node".into(),
            }),
            Some(Redirection::Failed(failure)) => Err(Some(failure.reason.clone())),
            None => Err(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::files;

    #[test]
    fn overlay_fills_only_what_the_source_lacks() {
        let mut snapshot = files::snapshot_of(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: foo}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: foo, annotations: {ambit.io/netns: /run/netns/b}}\nstatus: {podIP: 10.0.0.2}\n",
        );
        let sandbox = |name: &str| Sandbox {
            namespace: "foo".into(),
            name: name.into(),
            uid: String::new(),
            netns: format!("/cni/{name}").into(),
            ips: vec!["10.45.0.9".parse().unwrap()],
        };
        let sandboxes = ["a", "b"]
            .into_iter()
            .map(|n| (format!("foo/{n}"), sandbox(n)))
            .collect();
        overlay(&mut snapshot, &sandboxes);
        let (a, b) = (&snapshot.pods["foo/a"], &snapshot.pods["foo/b"]);
        assert_eq!(a.netns.as_deref(), Some(Path::new("/cni/a")));
        assert_eq!(a.ip(), Some("10.45.0.9".parse().unwrap()));
        assert_eq!(b.netns.as_deref(), Some(Path::new("/run/netns/b")));
        assert_eq!(b.ip(), Some("10.0.0.2".parse().unwrap()));
    }

    #[test]
    fn overlay_skips_the_sandbox_of_an_earlier_pod_of_the_same_name() {
        let mut snapshot = files::snapshot_of(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: foo, uid: new}\n",
        );
        let sandbox = |uid: &str| Sandbox {
            namespace: "foo".into(),
            name: "a".into(),
            uid: uid.into(),
            netns: format!("/cni/{uid}").into(),
            ips: vec![],
        };
        for (uid, netns) in [
            ("old", None),
            ("new", Some("/cni/new")),
            ("", Some("/cni/")),
        ] {
            let mut snapshot = snapshot.clone();
            overlay(&mut snapshot, &[("foo/a".to_owned(), sandbox(uid))].into());
            let found = snapshot.pods["foo/a"].netns.as_deref();
            assert_eq!(found, netns.map(Path::new), "sandbox uid {uid:?}");
        }
        snapshot.pods.get_mut("foo/a").unwrap().uid = None;
        overlay(
            &mut snapshot,
            &[("foo/a".to_owned(), sandbox("old"))].into(),
        );
        assert!(
            snapshot.pods["foo/a"].netns.is_some(),
            "a pod without UID takes any"
        );
    }

    #[tokio::test]
    async fn saved_sandboxes_come_back_unless_their_namespace_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let alive = dir.path().join("netns-alive");
        std::fs::write(&alive, "").unwrap();
        let sandbox = |name: &str, netns: PathBuf| Sandbox {
            namespace: "foo".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            netns,
            ips: vec![],
        };
        let sandboxes: Sandboxes = [
            ("foo/a".to_owned(), sandbox("a", alive)),
            ("foo/b".to_owned(), sandbox("b", dir.path().join("gone"))),
        ]
        .into();
        let store = SandboxStore::new(&dir.path().join("state"));
        assert!(store.load().unwrap().is_empty());
        store
            .save(&watch::Sender::new(sandboxes.clone()))
            .await
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.keys().collect::<Vec<_>>(), ["foo/a"]);
        assert_eq!(loaded["foo/a"], sandboxes["foo/a"]);
    }
}
