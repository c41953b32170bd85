//! The `kubernetes` source: watches of the API server (kube-rs [`watcher`]s, which list,
//! watch from the listed `resourceVersion`, and list again when a watch expires with 410)
//! on Namespaces, Pods, Services, EndpointSlices and the policy kinds, turned into the same [`Snapshot`]
//! as the `files` source by the same [`parse_object`].
//!
//! Every object is converted when it arrives and kept as its last good version: an object
//! that fails validation is logged (and, for a policy, reported as a Kubernetes Event on
//! it) while its previous version stays in force. We keep converted objects rather than a
//! reflector store of raw ones because a store would hold the invalid version.
//!
//! Nothing is published before every kind has been listed once, so a restarted agent never
//! releases pods only because it has not seen them yet. While the API server is away the
//! last snapshot stays in force; the watchers retry and relist when it returns.

use std::{collections::BTreeMap, time::Duration};

use futures::{StreamExt as _, stream::select_all};
use k8s_openapi::api::core::v1 as core;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, PostParams},
    runtime::{
        WatchStreamExt as _,
        utils::Backoff,
        watcher::{self, Event, watcher},
    },
};
use prometheus_client::metrics::counter::Counter;
use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use super::{Object, Rejected, Snapshot, parse_object};
use crate::policy::PolicyObject;

/// Events arriving within this window after the first are published as one snapshot.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// First and longest wait between retries of a failed list or watch. Shorter than kube's
/// default (800 ms to 30 s): after an API server outage the node catches up within seconds.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// The longest wait for `authentication.istio.io` (removed in Istio 1.6, so usually not
/// served): every node asking for it every 5 s would load the API server for nothing.
const LEGACY_RETRY_MAX: Duration = Duration::from_secs(60);
/// Reason of the Event posted on a policy that fails validation.
const INVALID_POLICY: &str = "InvalidPolicy";

/// The kinds watched, in order of precedence: when Istio serves a policy in both `v1`
/// and `v1beta1` (one object, two versions), the `v1` copy is the one kept.
fn resources() -> Vec<ApiResource> {
    let istio = |group: &str, version: &str, kind: &str, plural: &str| ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: format!("{group}/{version}"),
        kind: kind.to_owned(),
        plural: plural.to_owned(),
    };
    let mut resources = vec![
        ApiResource::erase::<core::Namespace>(&()),
        ApiResource::erase::<core::Pod>(&()),
        ApiResource::erase::<core::Service>(&()),
        ApiResource::erase::<k8s_openapi::api::discovery::v1::EndpointSlice>(&()),
    ];
    for version in ["v1", "v1beta1"] {
        for (kind, plural) in [
            ("PeerAuthentication", "peerauthentications"),
            ("RequestAuthentication", "requestauthentications"),
            ("AuthorizationPolicy", "authorizationpolicies"),
        ] {
            resources.push(istio("security.istio.io", version, kind, plural));
        }
    }
    for (kind, plural) in [("Policy", "policies"), ("MeshPolicy", "meshpolicies")] {
        resources.push(istio("authentication.istio.io", "v1alpha1", kind, plural));
    }
    resources
}

/// What the source needs besides the client.
pub struct Options {
    /// Where a converted `MeshPolicy` lands.
    pub root_namespace: String,
    /// Named as the source of the Events the agent posts.
    pub node_name: String,
    /// Counts the objects rejected (`ambit_config_rejected_total`).
    pub rejected: Counter,
}

/// Follows the cluster and publishes a new [`Snapshot`] on `tx` whenever the objects
/// change, the first time once every kind has been listed. Runs until `tx` has no
/// receivers.
pub async fn watch_cluster(client: Client, options: Options, tx: watch::Sender<Snapshot>) {
    let reporter = Reporter {
        client: client.clone(),
        node_name: options.node_name,
        rejected: options.rejected,
    };
    let mut kinds: Vec<Watched> = resources().into_iter().map(Watched::new).collect();
    let mut events = select_all(kinds.iter().enumerate().map(|(index, kind)| {
        let api = Api::<DynamicObject>::all_with(client.clone(), &kind.resource);
        let retry_max = if kind.resource.group == "authentication.istio.io" {
            LEGACY_RETRY_MAX
        } else {
            RETRY_MAX
        };
        watcher(api, watcher::Config::default())
            .backoff(Retry::up_to(retry_max))
            .map(move |event| (index, event))
            .boxed()
    }));
    let mut publish_at: Option<Instant> = None;
    let mut conversion_errors = Vec::new();
    // The first snapshot is announced even when empty: the agent waits for it.
    let mut announced = false;
    loop {
        let publish = async move {
            match publish_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = events.next() => {
                let Some((index, event)) = event else { return };
                if kinds[index].handle(event, &reporter) {
                    publish_at.get_or_insert_with(|| Instant::now() + DEBOUNCE);
                }
            }
            () = publish => {
                publish_at = None;
                // An incomplete list would release the pods not listed yet; the kind
                // whose list completes last schedules the first publication.
                if kinds.iter().all(|kind| kind.synced) {
                    let snapshot = assemble(&kinds, &options.root_namespace, &mut conversion_errors, &reporter.rejected);
                    if tx.send_if_modified(|current| {
                        let changed = *current != snapshot;
                        if changed {
                            *current = snapshot;
                        }
                        changed || !std::mem::replace(&mut announced, true)
                    }) {
                        info!("cluster configuration changed");
                    }
                }
            }
            () = tx.closed() => return,
        }
    }
}

/// The union of every kind's objects, Istio 1.1 policies converted. `reported` holds the
/// conversion errors of the last call: they are logged again only when they change.
fn assemble(
    kinds: &[Watched],
    root_namespace: &str,
    reported: &mut Vec<String>,
    rejected: &Counter,
) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let mut policies: BTreeMap<(&str, &str), &PolicyObject> = BTreeMap::new();
    for kind in kinds {
        for (key, object) in &kind.objects {
            match object {
                Object::Policy(policy) => {
                    policies
                        .entry((kind.resource.kind.as_str(), key.as_str()))
                        .or_insert(policy);
                }
                other => snapshot.insert(other.clone()),
            }
        }
    }
    snapshot.policies = policies.into_values().cloned().collect();
    let errors: Vec<String> = snapshot
        .convert_legacy(root_namespace)
        .iter()
        .map(ToString::to_string)
        .collect();
    if errors != *reported {
        for error in &errors {
            warn!("{error} (policy left out until this is fixed)");
            rejected.inc();
        }
        *reported = errors;
    }
    snapshot
}

/// One watched kind.
struct Watched {
    resource: ApiResource,
    /// The last good version of each object, by `namespace/name` (`name` when
    /// cluster-scoped).
    objects: BTreeMap<String, Object>,
    /// The objects of a list in progress; they replace `objects` once it completes, so
    /// objects deleted while the watch was down disappear.
    relisting: Option<BTreeMap<String, Object>>,
    /// The rejection last reported per object: a relist does not report it again.
    rejected: BTreeMap<String, String>,
    /// Listed at least once, or found not served.
    synced: bool,
}

impl Watched {
    fn new(resource: ApiResource) -> Self {
        Self {
            resource,
            objects: BTreeMap::new(),
            relisting: None,
            rejected: BTreeMap::new(),
            synced: false,
        }
    }

    /// Applies one watcher event; true when the objects may have changed.
    fn handle(
        &mut self,
        event: watcher::Result<Event<DynamicObject>>,
        reporter: &Reporter,
    ) -> bool {
        let kind = &self.resource.kind;
        match event {
            Ok(Event::Init) => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            Ok(Event::InitApply(object) | Event::Apply(object)) => {
                self.apply(object, reporter);
                // During a list nothing is in force yet.
                self.relisting.is_none()
            }
            Ok(Event::InitDone) => {
                if let Some(listed) = self.relisting.take() {
                    self.objects = listed;
                }
                if !self.synced {
                    debug!(%kind, objects = self.objects.len(), "listed");
                }
                self.synced = true;
                true
            }
            Ok(Event::Delete(object)) => {
                let key = key(&object);
                self.rejected.remove(&key);
                self.objects.remove(&key).is_some()
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.code == 404 =>
            {
                // A CRD this cluster does not have (Istio's older or newer versions): it
                // holds no object, and the watcher keeps asking in case it is installed.
                if !self.synced {
                    info!(api_version = %self.resource.api_version, %kind, "not served by the API server; none in force");
                }
                let changed = !self.synced || !self.objects.is_empty();
                self.objects.clear();
                self.synced = true;
                changed
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                info!(%kind, "watch expired; listing again");
                false
            }
            Err(error) => {
                warn!(%kind, %error, "watch failed; keeping the last state and retrying");
                false
            }
        }
    }

    /// Converts `object` into the list in progress or the objects in force. A rejected
    /// object keeps its previous good version there.
    fn apply(&mut self, object: DynamicObject, reporter: &Reporter) {
        let key = key(&object);
        let converted = self.convert(&object);
        let previous = self.objects.get(&key).cloned();
        let target = self.relisting.as_mut().unwrap_or(&mut self.objects);
        match converted {
            Ok(Some(converted)) => {
                target.insert(key.clone(), converted);
                self.rejected.remove(&key);
            }
            Ok(None) => {
                target.remove(&key);
                self.rejected.remove(&key);
            }
            Err(error) => {
                if let Some(previous) = previous {
                    target.insert(key.clone(), previous);
                }
                let message = error.to_string();
                if self.rejected.get(&key) != Some(&message) {
                    warn!("{message} (rejected, keeping the last good version)");
                    reporter.rejected.inc();
                    if matches!(error, Rejected::Policy(_)) {
                        reporter.invalid_policy(&self.resource, &object, &message);
                    }
                    self.rejected.insert(key, message);
                }
            }
        }
    }

    /// `object` through the parser the `files` source uses. Objects in a list carry no
    /// `apiVersion` and `kind`; the watched resource says what they are.
    fn convert(&self, object: &DynamicObject) -> Result<Option<Object>, Rejected> {
        let mut json = serde_json::to_value(object).unwrap_or_default();
        json["apiVersion"] = self.resource.api_version.clone().into();
        json["kind"] = self.resource.kind.clone().into();
        // A JSON value always has a YAML equivalent.
        let doc = serde_yaml::to_value(json).unwrap_or_default();
        parse_object(&self.resource.api_version, &self.resource.kind, doc)
    }
}

fn key(object: &DynamicObject) -> String {
    let name = object.metadata.name.as_deref().unwrap_or_default();
    match &object.metadata.namespace {
        Some(namespace) => format!("{namespace}/{name}"),
        None => name.to_owned(),
    }
}

/// Posts Events on the objects the agent rejects, so `kubectl describe` shows why, and
/// counts them.
struct Reporter {
    client: Client,
    node_name: String,
    rejected: Counter,
}

impl Reporter {
    /// Posts (in the background) a Warning Event `InvalidPolicy` on `object`.
    fn invalid_policy(&self, resource: &ApiResource, object: &DynamicObject, message: &str) {
        let meta = &object.metadata;
        // A cluster-scoped policy (MeshPolicy) gets its Event in `default`, as kubectl does.
        let namespace = meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let now = time::OffsetDateTime::now_utc();
        let timestamp = now
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let event = serde_json::json!({
            "metadata": {
                "name": format!("{}.{:x}", meta.name.as_deref().unwrap_or("policy"), now.unix_timestamp_nanos()),
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": resource.api_version,
                "kind": resource.kind,
                "namespace": meta.namespace,
                "name": meta.name,
                "uid": meta.uid,
                "resourceVersion": meta.resource_version,
            },
            "reason": INVALID_POLICY,
            "message": message,
            "type": "Warning",
            "source": {"component": "ambit", "host": self.node_name},
            "reportingComponent": "ambit",
            "reportingInstance": self.node_name,
            "firstTimestamp": timestamp,
            "lastTimestamp": timestamp,
            "count": 1,
        });
        let event: core::Event = match serde_json::from_value(event) {
            Ok(event) => event,
            Err(error) => return warn!(%error, "cannot build the Event for a rejected policy"),
        };
        let api = Api::<core::Event>::namespaced(self.client.clone(), &namespace);
        tokio::spawn(async move {
            if let Err(error) = api.create(&PostParams::default(), &event).await {
                warn!(%error, "cannot post the Event for a rejected policy");
            }
        });
    }
}

/// Exponential wait between retries, from [`RETRY_MIN`] to `max`, reset once a list or
/// watch succeeds.
struct Retry {
    next: Duration,
    max: Duration,
}

impl Retry {
    fn up_to(max: Duration) -> Self {
        Self {
            next: RETRY_MIN,
            max,
        }
    }
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(wait)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.next = RETRY_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "foo", "uid": "u1", "resourceVersion": "3"},
            "spec": {"nodeName": "n1"},
            "status": {"podIP": ip},
        }))
        .unwrap()
    }

    fn reporter() -> Reporter {
        // Never used: the tests reject no policy.
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        Reporter {
            client: Client::try_from(config).unwrap(),
            node_name: "n1".to_owned(),
            rejected: Counter::default(),
        }
    }

    #[tokio::test]
    async fn rejected_object_keeps_its_last_good_version() {
        let mut pods = Watched::new(ApiResource::erase::<core::Pod>(&()));
        let reporter = reporter();
        assert!(!pods.handle(Ok(Event::Init), &reporter));
        assert!(!pods.handle(Ok(Event::InitApply(pod("a", "10.0.0.2"))), &reporter));
        assert!(pods.handle(Ok(Event::InitDone), &reporter));
        assert!(pods.synced);
        pods.handle(Ok(Event::Apply(pod("a", "10.0.0.300"))), &reporter);
        let Some(Object::Pod(kept)) = pods.objects.get("foo/a") else {
            panic!("pod dropped")
        };
        assert_eq!(kept.ip(), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(pods.rejected.len(), 1);
    }

    #[tokio::test]
    async fn relist_drops_objects_deleted_meanwhile() {
        let mut pods = Watched::new(ApiResource::erase::<core::Pod>(&()));
        let reporter = reporter();
        for event in [
            Event::Init,
            Event::InitApply(pod("a", "10.0.0.2")),
            Event::InitApply(pod("b", "10.0.0.3")),
            Event::InitDone,
            Event::Init,
            Event::InitApply(pod("b", "10.0.0.3")),
        ] {
            pods.handle(Ok(event), &reporter);
        }
        assert_eq!(
            pods.objects.len(),
            2,
            "the old state holds until the list completes"
        );
        pods.handle(Ok(Event::InitDone), &reporter);
        assert_eq!(pods.objects.keys().collect::<Vec<_>>(), ["foo/b"]);
    }

    #[tokio::test]
    async fn a_policy_served_in_v1_and_v1beta1_counts_once_as_v1() {
        let reporter = reporter();
        let mut kinds: Vec<Watched> = resources()
            .into_iter()
            .filter(|r| r.kind == "AuthorizationPolicy")
            .map(Watched::new)
            .collect();
        assert_eq!(kinds[0].resource.version, "v1");
        for (kind, action) in kinds.iter_mut().zip(["DENY", "AUDIT"]) {
            let policy = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "foo"},
                "spec": {"action": action, "rules": [{}]},
            }))
            .unwrap();
            for event in [Event::Init, Event::InitApply(policy), Event::InitDone] {
                kind.handle(Ok(event), &reporter);
            }
            assert!(kind.rejected.is_empty(), "{:?}", kind.rejected);
        }
        let snapshot = assemble(&kinds, "istio-system", &mut Vec::new(), &Counter::default());
        let Some(Object::Policy(v1)) = kinds[0].objects.get("foo/p") else {
            panic!("v1 policy converted")
        };
        assert_eq!(snapshot.policies, std::slice::from_ref(v1));
    }
}
