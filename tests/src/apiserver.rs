//! A Kubernetes API-server double for the `kubernetes` source: plain HTTP on 127.0.0.1,
//! speaking the wire protocol kube-rs's watcher uses, and nothing more.
//!
//! - `GET /api/v1/{plural}` and `/apis/{group}/{version}/{plural}` (optionally under
//!   `namespaces/{ns}/`): a list (`{kind}List`, `metadata.resourceVersion`). `limit` is
//!   ignored and no `continue` is returned, as a real server does for
//!   `resourceVersion=0`, which is what kube-rs lists with.
//! - the same with `watch=true&resourceVersion=N`: newline-delimited
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK","object":...}` of every change after `N`, a
//!   `BOOKMARK` every second, ending after `timeoutSeconds`. A resourceVersion older than
//!   [`ApiServer::compact`]'s is answered as the real server does: one `ERROR` event
//!   carrying a 410 `Expired` `Status`.
//! - `POST /api/v1/namespaces/{ns}/events`: kept for [`ApiServer::events`].
//! - one object by name: `GET` (404 `NotFound` when absent), `POST` to the collection to
//!   create (409 `AlreadyExists`), `PUT` to replace (409 `Conflict` when the body's
//!   `resourceVersion` is not the stored one), as `ambit ca` and the CNI plugin use them.
//!
//! Served kinds: Namespace, Pod, Service, Event, Secret, ConfigMap, EndpointSlice and
//! `security.istio.io/v1`'s three policy kinds. Anything else (`v1beta1`, `authentication.istio.io`) is a 404, as on a cluster
//! without those CRDs. kube-rs needs no discovery endpoint for what the agent does.
//!
//! The server runs on a runtime of its own, so that the synchronous tests can drive it;
//! [`ApiServer::stop`] closes the listener and every open watch, [`ApiServer::start`]
//! serves the same state on the same port again.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State as AxumState},
    http::{Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::{sync::broadcast, task::JoinHandle};

/// The kinds served: `(group/version path, plural, kind)`.
const SERVED: &[(&str, &str, &str)] = &[
    ("api/v1", "namespaces", "Namespace"),
    ("api/v1", "pods", "Pod"),
    ("api/v1", "services", "Service"),
    ("api/v1", "events", "Event"),
    ("api/v1", "secrets", "Secret"),
    ("api/v1", "configmaps", "ConfigMap"),
    (
        "apis/discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
    ),
    (
        "apis/security.istio.io/v1",
        "peerauthentications",
        "PeerAuthentication",
    ),
    (
        "apis/security.istio.io/v1",
        "requestauthentications",
        "RequestAuthentication",
    ),
    (
        "apis/security.istio.io/v1",
        "authorizationpolicies",
        "AuthorizationPolicy",
    ),
];
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    serving: Mutex<Option<JoinHandle<()>>>,
    kubeconfig: PathBuf,
}

struct Shared {
    state: Mutex<Cluster>,
    changes: broadcast::Sender<Change>,
}

#[derive(Default)]
struct Cluster {
    /// The last resourceVersion handed out.
    revision: u64,
    /// Watches from before this revision are answered with 410.
    compacted: u64,
    /// By `(resource, namespace, name)`; `resource` is `api/v1/pods` and the like.
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change, for watches that resume from an older revision.
    history: Vec<Change>,
    /// Events the agent posted.
    events: Vec<Value>,
}

#[derive(Clone, Debug)]
struct Change {
    revision: u64,
    resource: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

impl ApiServer {
    /// Starts the double on a free loopback port and writes a kubeconfig for it.
    pub fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let kubeconfig = std::env::temp_dir().join(format!(
            "ambit-apiserver-{}-{}.kubeconfig",
            std::process::id(),
            addr.port()
        ));
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "double", "cluster": {"server": format!("http://{addr}")}}],
            "users": [{"name": "agent", "user": {}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "agent"}}],
            "current-context": "double",
        });
        // JSON is YAML: kube reads it as a kubeconfig.
        std::fs::write(&kubeconfig, config.to_string())?;
        let server = Self {
            shared: Arc::new(Shared {
                state: Mutex::new(Cluster::default()),
                changes: broadcast::channel(4096).0,
            }),
            addr,
            runtime,
            serving: Mutex::new(None),
            kubeconfig,
        };
        server.serve(listener);
        Ok(server)
    }

    /// The kubeconfig that points at this server.
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    /// Serves again on the same port, with the state it had when stopped.
    pub fn restart(&self) -> anyhow::Result<()> {
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .with_context(|| format!("cannot listen on {} again", self.addr))?;
        self.serve(listener);
        Ok(())
    }

    /// Stops serving: the port refuses connections and every open watch ends.
    pub fn stop(&self) {
        let serving = self.serving.lock().unwrap().take();
        if let Some(task) = serving {
            task.abort();
            // Dropping the task drops its connections; wait so the port is free again.
            let _ = self.runtime.block_on(task);
        }
    }

    /// Forgets the history up to now: a watch resuming from an older resourceVersion gets
    /// `410 Expired` and must list again.
    pub fn compact(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.compacted = state.revision;
        state.history.clear();
    }

    /// Creates `object` or replaces the object of the same kind, namespace and name (a
    /// no-op when nothing but server-set metadata differs).
    pub fn apply(&self, object: Value) -> anyhow::Result<()> {
        let key = identify(&object)?;
        let mut state = self.shared.state.lock().unwrap();
        state.store(&self.shared.changes, key, object);
        Ok(())
    }

    /// The stored object of `api_version`/`kind` named `name` in `namespace`.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let probe = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": namespace}});
        let key = identify(&probe).ok()?;
        self.shared.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// Deletes the object of `api_version`/`kind` named `name` in `namespace` (empty for a
    /// cluster-scoped kind).
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let probe = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": namespace}});
        let (resource, namespace, name) = identify(&probe)?;
        let mut state = self.shared.state.lock().unwrap();
        let mut object = state
            .objects
            .remove(&(resource.clone(), namespace.clone(), name.clone()))
            .with_context(|| format!("no {kind} {namespace}/{name}"))?;
        state.revision += 1;
        object["metadata"]["resourceVersion"] = state.revision.to_string().into();
        state.record(&self.shared.changes, resource, namespace, "DELETED", object);
        Ok(())
    }

    /// The Events posted so far.
    pub fn events(&self) -> Vec<Value> {
        self.shared.state.lock().unwrap().events.clone()
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let router = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&self.shared));
        let task = self.runtime.spawn(async move {
            // Owned here: aborting this task drops every connection, watches included.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                connections.spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        *self.serving.lock().unwrap() = Some(task);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

impl Cluster {
    /// Creates or replaces the object at `key`, as [`ApiServer::apply`] describes; returns
    /// it as stored.
    fn store(
        &mut self,
        changes: &broadcast::Sender<Change>,
        key: (String, String, String),
        mut object: Value,
    ) -> Value {
        let previous = self.objects.get(&key).cloned();
        let kind = match &previous {
            Some(previous) => {
                for field in ["uid", "resourceVersion", "creationTimestamp"] {
                    object["metadata"][field] = previous["metadata"][field].clone();
                }
                if *previous == object {
                    return object;
                }
                "MODIFIED"
            }
            None => "ADDED",
        };
        self.revision += 1;
        let revision = self.revision;
        if previous.is_none() {
            object["metadata"]["uid"] = format!("uid-{revision}").into();
            object["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z".into();
        }
        object["metadata"]["resourceVersion"] = revision.to_string().into();
        let (resource, namespace, _) = key.clone();
        self.objects.insert(key, object.clone());
        self.record(changes, resource, namespace, kind, object.clone());
        object
    }

    fn record(
        &mut self,
        changes: &broadcast::Sender<Change>,
        resource: String,
        namespace: String,
        kind: &'static str,
        object: Value,
    ) {
        let change = Change {
            revision: self.revision,
            resource,
            namespace,
            kind,
            object,
        };
        self.history.push(change.clone());
        // No watch open is fine: the history has it.
        let _ = changes.send(change);
    }
}

/// `(resource, namespace, name)` of an object, from its apiVersion, kind and metadata.
fn identify(object: &Value) -> anyhow::Result<(String, String, String)> {
    let api_version = object["apiVersion"].as_str().context("apiVersion")?;
    let kind = object["kind"].as_str().context("kind")?;
    let group_version = match api_version {
        "v1" => "api/v1".to_owned(),
        other => format!("apis/{other}"),
    };
    let (_, plural, _) = SERVED
        .iter()
        .find(|(gv, _, k)| *gv == group_version && *k == kind)
        .with_context(|| format!("the double does not serve {api_version} {kind}"))?;
    let name = object["metadata"]["name"]
        .as_str()
        .context("metadata.name")?;
    let namespace = match kind {
        "Namespace" => "",
        _ => object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default"),
    };
    Ok((
        format!("{group_version}/{plural}"),
        namespace.to_owned(),
        name.to_owned(),
    ))
}

/// What a request names.
struct Route {
    resource: String,
    kind: &'static str,
    /// `None` for a cluster-scoped kind, or a list across namespaces.
    namespace: Option<String>,
    /// One object rather than the collection.
    name: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("api/v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("apis/{group}/{version}"), rest),
        _ => return None,
    };
    let owned = |s: &&str| (*s).to_owned();
    let (plural, namespace, name) = match rest {
        [plural] => (*plural, None, None),
        // `namespaces/{name}` is a Namespace; `namespaces/{ns}/{plural}` a collection.
        ["namespaces", name] => ("namespaces", None, Some(owned(name))),
        ["namespaces", namespace, plural] => (*plural, Some(owned(namespace)), None),
        ["namespaces", namespace, plural, name] if *plural != "namespaces" => {
            (*plural, Some(owned(namespace)), Some(owned(name)))
        }
        _ => return None,
    };
    let (_, _, kind) = SERVED
        .iter()
        .find(|(gv, p, _)| *gv == group_version && *p == plural)?;
    Some(Route {
        resource: format!("{group_version}/{plural}"),
        kind,
        namespace,
        name,
    })
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

/// The real server's answer for an object that does not exist, `resource` being
/// `api/v1/pods` and the like.
fn not_found(resource: &str, name: &str) -> Response {
    let plural = resource.rsplit('/').next().unwrap_or(resource);
    let mut body = status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{plural} \"{name}\" not found"),
    );
    body["details"] = json!({"name": name, "kind": plural});
    respond(StatusCode::NOT_FOUND, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(Route {
        resource,
        kind,
        namespace,
        name,
    }) = route(uri.path())
    else {
        let message = format!(
            "the server could not find the requested resource ({})",
            uri.path()
        );
        return respond(
            StatusCode::NOT_FOUND,
            &status(StatusCode::NOT_FOUND, "NotFound", &message),
        );
    };
    let parse = || serde_json::from_slice::<Value>(&body).ok();
    if let Some(name) = name {
        let key = (resource, namespace.unwrap_or_default(), name);
        return match method {
            Method::GET => match shared.state.lock().unwrap().objects.get(&key) {
                Some(object) => respond(StatusCode::OK, object),
                None => not_found(&key.0, &key.2),
            },
            Method::PUT => match parse() {
                Some(object) => replace(&shared, kind, key, object),
                None => not_json(),
            },
            _ => not_supported(),
        };
    }
    match method {
        Method::POST if kind == "Event" => {
            let Some(mut event) = parse() else {
                return not_json();
            };
            event["metadata"]["namespace"] = namespace.unwrap_or_default().into();
            shared.state.lock().unwrap().events.push(event.clone());
            respond(StatusCode::CREATED, &event)
        }
        Method::POST => match parse() {
            Some(object) => create(&shared, resource, kind, namespace, object),
            None => not_json(),
        },
        Method::GET if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) => {
            watch(&shared, resource, kind, namespace, &query)
        }
        Method::GET => {
            let state = shared.state.lock().unwrap();
            let items: Vec<&Value> = state
                .objects
                .iter()
                .filter(|((r, ns, _), _)| {
                    *r == resource && namespace.as_ref().is_none_or(|n| n == ns)
                })
                .map(|(_, object)| object)
                .collect();
            let list = json!({
                "kind": format!("{kind}List"),
                "apiVersion": object_api_version(&resource),
                "metadata": {"resourceVersion": state.revision.to_string()},
                "items": items,
            });
            respond(StatusCode::OK, &list)
        }
        _ => not_supported(),
    }
}

fn not_json() -> Response {
    respond(
        StatusCode::BAD_REQUEST,
        &status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON"),
    )
}

fn not_supported() -> Response {
    respond(
        StatusCode::METHOD_NOT_ALLOWED,
        &status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the double",
        ),
    )
}

/// `POST` to a collection: the object is created, unless one of that name exists.
fn create(
    shared: &Shared,
    resource: String,
    kind: &str,
    namespace: Option<String>,
    mut object: Value,
) -> Response {
    let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
        return respond(
            StatusCode::UNPROCESSABLE_ENTITY,
            &status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value",
            ),
        );
    };
    let namespace = namespace.unwrap_or_default();
    if !namespace.is_empty() {
        object["metadata"]["namespace"] = namespace.clone().into();
    }
    let key = (resource, namespace, name);
    let mut state = shared.state.lock().unwrap();
    if state.objects.contains_key(&key) {
        let message = format!("{} \"{}\" already exists", kind.to_lowercase(), key.2);
        return respond(
            StatusCode::CONFLICT,
            &status(StatusCode::CONFLICT, "AlreadyExists", &message),
        );
    }
    let stored = state.store(&shared.changes, key, object);
    respond(StatusCode::CREATED, &stored)
}

/// `PUT` to an object: replaced when the body's `resourceVersion` is the stored one.
fn replace(shared: &Shared, kind: &str, key: (String, String, String), object: Value) -> Response {
    let mut state = shared.state.lock().unwrap();
    let Some(stored) = state.objects.get(&key) else {
        return not_found(&key.0, &key.2);
    };
    if object["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"] {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{}\": the object has been modified",
            kind.to_lowercase(),
            key.2
        );
        return respond(
            StatusCode::CONFLICT,
            &status(StatusCode::CONFLICT, "Conflict", &message),
        );
    }
    let stored = state.store(&shared.changes, key, object);
    respond(StatusCode::OK, &stored)
}

/// `v1` for `api/v1/...`, `group/version` for `apis/group/version/...`.
fn object_api_version(resource: &str) -> String {
    let parts: Vec<&str> = resource.split('/').collect();
    match parts.as_slice() {
        ["api", version, _] => (*version).to_owned(),
        ["apis", group, version, _] => format!("{group}/{version}"),
        _ => String::new(),
    }
}

/// A watch stream from `resourceVersion`.
fn watch(
    shared: &Shared,
    resource: String,
    kind: &'static str,
    namespace: Option<String>,
    query: &BTreeMap<String, String>,
) -> Response {
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let state = shared.state.lock().unwrap();
    let from = match query.get("resourceVersion").map(|rv| rv.parse::<u64>()) {
        Some(Ok(0)) | None => state.revision,
        Some(Ok(revision)) => revision,
        Some(Err(_)) => {
            return respond(
                StatusCode::BAD_REQUEST,
                &status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "resourceVersion is not a number",
                ),
            );
        }
    };
    let line = |kind: &str, object: &Value| {
        let mut line = json!({"type": kind, "object": object}).to_string();
        line.push('\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    };
    if from < state.compacted {
        // The real server starts the stream and then reports the expiry as an event.
        let message = format!("too old resource version: {from} ({})", state.compacted);
        let expired = status(StatusCode::GONE, "Expired", &message);
        return Response::new(Body::from_stream(futures::stream::iter([line(
            "ERROR", &expired,
        )])));
    }
    let api_version = object_api_version(&resource);
    let mine = move |change: &Change| {
        change.resource == resource && namespace.as_ref().is_none_or(|n| *n == change.namespace)
    };
    // Subscribed under the lock: no change falls between the history and the live feed.
    let live = shared.changes.subscribe();
    let backlog: VecDeque<Change> = state
        .history
        .iter()
        .filter(|c| c.revision > from && mine(c))
        .cloned()
        .collect();
    let stream = Watch {
        backlog,
        live,
        seen: state.revision.max(from),
        deadline: tokio::time::Instant::now() + timeout,
        api_version,
        kind,
        mine: Box::new(mine),
    };
    drop(state);
    let events = futures::stream::unfold(stream, move |mut watch| async move {
        let (kind, object) = watch.next().await?;
        Some((line(kind, &object), watch))
    });
    Response::new(Body::from_stream(events))
}

struct Watch {
    backlog: VecDeque<Change>,
    live: broadcast::Receiver<Change>,
    /// The newest revision this stream has passed: what a bookmark may claim.
    seen: u64,
    deadline: tokio::time::Instant,
    api_version: String,
    kind: &'static str,
    mine: Box<dyn Fn(&Change) -> bool + Send>,
}

impl Watch {
    /// The next event, `None` at the timeout or when the feed is lost.
    async fn next(&mut self) -> Option<(&'static str, Value)> {
        if let Some(change) = self.backlog.pop_front() {
            self.seen = self.seen.max(change.revision);
            return Some((change.kind, change.object));
        }
        loop {
            tokio::select! {
                change = self.live.recv() => {
                    // Lagging behind: end the watch; the client resumes from what it got.
                    let change = change.ok()?;
                    if change.revision <= self.seen {
                        continue;
                    }
                    self.seen = change.revision;
                    if (self.mine)(&change) {
                        return Some((change.kind, change.object));
                    }
                }
                () = tokio::time::sleep(BOOKMARK_INTERVAL) => {
                    let bookmark = json!({
                        "kind": self.kind,
                        "apiVersion": self.api_version,
                        "metadata": {"resourceVersion": self.seen.to_string()},
                    });
                    return Some(("BOOKMARK", bookmark));
                }
                () = tokio::time::sleep_until(self.deadline) => return None,
            }
        }
    }
}
