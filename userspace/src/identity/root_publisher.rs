//! `ambit ca --kubernetes`: the mesh root published as the ConfigMap [`ROOT_CONFIGMAP`]
//! (key [`ROOT_KEY`]) in the CA's own namespace, which the agents mount to verify the CA,
//! and in every namespace enrolled in the mesh, where applications may read it (as istiod
//! publishes `istio-ca-root-cert`). Namespaces are watched; every [`RESYNC`] each ConfigMap
//! is checked again, so one deleted or edited by hand comes back. A namespace that leaves
//! the mesh keeps its ConfigMap: a root is public, and an application may still read it.

use std::{collections::BTreeSet, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::{
    Api, Client, ResourceExt as _,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use tracing::{info, warn};

pub const ROOT_CONFIGMAP: &str = "ambit-ca-root-cert";
pub const ROOT_KEY: &str = "root-cert.pem";
/// How often every published ConfigMap is checked again.
const RESYNC: Duration = Duration::from_secs(60);

/// Publishes `root_pem` until the namespace watch ends (it retries with backoff, so only
/// when the task is dropped).
pub async fn publish(client: Client, own_namespace: String, root_pem: String) {
    let publisher = Publisher {
        client: client.clone(),
        root_pem,
    };
    publisher.ensure(&own_namespace).await;
    // The enrolled namespaces as last listed; a relist rebuilds it in `listing`.
    let mut enrolled = BTreeSet::new();
    let mut listing = BTreeSet::new();
    let events =
        watcher(Api::<Namespace>::all(client), watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut resync = tokio::time::interval(RESYNC);
    resync.tick().await;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Init)) => listing.clear(),
                Some(Ok(watcher::Event::InitApply(namespace))) => {
                    if in_mesh(&namespace) {
                        publisher.ensure(&namespace.name_any()).await;
                        listing.insert(namespace.name_any());
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => enrolled = std::mem::take(&mut listing),
                Some(Ok(watcher::Event::Apply(namespace))) => {
                    let name = namespace.name_any();
                    if !in_mesh(&namespace) {
                        enrolled.remove(&name);
                    } else if enrolled.insert(name.clone()) {
                        publisher.ensure(&name).await;
                    }
                }
                Some(Ok(watcher::Event::Delete(namespace))) => {
                    enrolled.remove(&namespace.name_any());
                }
                Some(Err(error)) => warn!(%error, "watching namespaces to publish the root"),
                None => return,
            },
            _ = resync.tick() => {
                publisher.ensure(&own_namespace).await;
                for namespace in &enrolled {
                    publisher.ensure(namespace).await;
                }
            }
        }
    }
}

/// The agents' own rule for a namespace in the mesh.
fn in_mesh(namespace: &Namespace) -> bool {
    ambit_cni::namespace_enrolled(namespace.labels())
}

struct Publisher {
    client: Client,
    root_pem: String,
}

impl Publisher {
    /// Creates or corrects the ConfigMap in `namespace`; failures are logged and left to
    /// the next resync.
    async fn ensure(&self, namespace: &str) {
        if let Err(error) = self.try_ensure(namespace).await {
            warn!(namespace, %error, configmap = ROOT_CONFIGMAP, "cannot publish the root");
        }
    }

    async fn try_ensure(&self, namespace: &str) -> Result<(), kube::Error> {
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), namespace);
        let data = [(ROOT_KEY.to_owned(), self.root_pem.clone())].into();
        match api.get_opt(ROOT_CONFIGMAP).await? {
            None => {
                let configmap = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(ROOT_CONFIGMAP.to_owned()),
                        namespace: Some(namespace.to_owned()),
                        labels: Some(
                            [(
                                "app.kubernetes.io/managed-by".to_owned(),
                                "ambit-ca".to_owned(),
                            )]
                            .into(),
                        ),
                        ..ObjectMeta::default()
                    },
                    data: Some(data),
                    ..ConfigMap::default()
                };
                api.create(&PostParams::default(), &configmap).await?;
                info!(namespace, configmap = ROOT_CONFIGMAP, "published the root");
            }
            Some(mut configmap) if configmap.data.as_ref() != Some(&data) => {
                configmap.data = Some(data);
                // Replaced at the resourceVersion read: a concurrent writer makes this a
                // conflict, retried at the next resync.
                api.replace(ROOT_CONFIGMAP, &PostParams::default(), &configmap)
                    .await?;
                info!(
                    namespace,
                    configmap = ROOT_CONFIGMAP,
                    "corrected the published root"
                );
            }
            Some(_) => {}
        }
        Ok(())
    }
}
