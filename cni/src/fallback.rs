//! What `ADD` falls back on when the agent cannot answer: the API server. The plugin reads
//! the pod and its namespace and applies the agent's own rule ([`ambit_cni::membership`]),
//! as istio-cni does, so that a broken agent never keeps a pod outside the mesh from
//! starting. The tokio runtime the client needs is built here only: the normal path stays
//! synchronous.

use std::{
    collections::BTreeMap,
    error::Error as _,
    fmt::{self, Debug},
    path::{Path, PathBuf},
    time::Duration,
};

use ambit_cni::Membership;
use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
    core::Status,
};
use serde::de::DeserializeOwned;

/// How long the API server gets for both requests, connection and TLS included: the
/// runtime has already waited for the agent.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the API server cannot tell whether the pod is in the mesh. Each message carries
/// its cause: the plugin reports one line.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot start a runtime for the API client: {0}")]
    Runtime(std::io::Error),
    #[error("cannot read kubeconfig {}: {error}", path.display())]
    Kubeconfig {
        path: PathBuf,
        error: KubeconfigError,
    },
    #[error("cannot build the API client: {}", Causes(.0))]
    Client(kube::Error),
    /// The API server answered, with an error (not found, forbidden).
    #[error("cannot get {what}: the API server says {status}")]
    Refused { what: String, status: Box<Status> },
    #[error("cannot get {what}: {}", Causes(.error))]
    Unreachable { what: String, error: kube::Error },
    #[error("no answer within {} s", API_TIMEOUT.as_secs())]
    Timeout,
}

/// An error and its causes, `: `-separated: kube's transport errors say what failed
/// (`client error (Connect)`) and leave why (`Connection refused`) to their sources. A
/// cause that its error's message already spells out is not repeated.
struct Causes<'a>(&'a kube::Error);

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut said = self.0.to_string();
        f.write_str(&said)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !said.contains(&text) {
                write!(f, ": {text}")?;
            }
            said = text;
            source = cause.source();
        }
        Ok(())
    }
}

/// Whether the API server, through `kubeconfig`, shows pod `namespace/name` in the mesh.
pub fn membership(kubeconfig: &Path, namespace: &str, name: &str) -> Result<Membership, ApiError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ApiError::Runtime)?;
    runtime.block_on(async {
        tokio::time::timeout(API_TIMEOUT, ask(kubeconfig, namespace, name))
            .await
            .unwrap_or(Err(ApiError::Timeout))
    })
}

async fn ask(kubeconfig: &Path, namespace: &str, name: &str) -> Result<Membership, ApiError> {
    let client = client(kubeconfig).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let namespaces: Api<Namespace> = Api::all(client);
    let (pod, namespace) = tokio::try_join!(
        get(&pods, name, format!("pod {namespace}/{name}")),
        get(&namespaces, namespace, format!("namespace {namespace}")),
    )?;
    Ok(rule(&namespace, &pod))
}

async fn client(kubeconfig: &Path) -> Result<Client, ApiError> {
    let kubeconfig_error = |error| ApiError::Kubeconfig {
        path: kubeconfig.to_owned(),
        error,
    };
    let file = Kubeconfig::read_from(kubeconfig).map_err(kubeconfig_error)?;
    let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(kubeconfig_error)?;
    Client::try_from(config).map_err(ApiError::Client)
}

async fn get<K>(api: &Api<K>, name: &str, what: String) -> Result<K, ApiError>
where
    K: Clone + DeserializeOwned + Debug,
{
    api.get(name).await.map_err(|error| match error {
        kube::Error::Api(status) => ApiError::Refused { what, status },
        error => ApiError::Unreachable { what, error },
    })
}

/// The shared rule on the API's objects.
fn rule(namespace: &Namespace, pod: &Pod) -> Membership {
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network);
    ambit_cni::membership(
        Some(labels(&namespace.metadata)),
        labels(&pod.metadata),
        host_network.unwrap_or(false),
    )
}

fn labels(metadata: &ObjectMeta) -> &BTreeMap<String, String> {
    static NONE: BTreeMap<String, String> = BTreeMap::new();
    metadata.labels.as_ref().unwrap_or(&NONE)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn namespace(labels: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": "foo", "labels": labels}})).unwrap()
    }

    fn pod(metadata: serde_json::Value, spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": metadata, "spec": spec})).unwrap()
    }

    #[test]
    fn rule_reads_the_api_objects() {
        let enrolled = namespace(json!({"ambit.io/mesh": "enabled"}));
        let plain = namespace(json!({}));
        let app = pod(json!({"name": "a"}), json!({"containers": []}));
        let opted_out = pod(
            json!({"name": "a", "labels": {"ambit.io/mesh": "disabled"}}),
            json!({"containers": []}),
        );
        let host = pod(
            json!({"name": "a"}),
            json!({"containers": [], "hostNetwork": true}),
        );
        assert_eq!(rule(&enrolled, &app), Membership::Enrolled);
        assert_eq!(rule(&plain, &app), Membership::NotEnrolled);
        assert_eq!(rule(&enrolled, &opted_out), Membership::OptedOut);
        assert_eq!(rule(&enrolled, &host), Membership::HostNetwork);
        let unlabelled: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "foo"}})).unwrap();
        assert_eq!(rule(&unlabelled, &app), Membership::NotEnrolled);
    }

    #[test]
    fn missing_kubeconfig_cannot_tell() {
        let error = membership(Path::new("/nonexistent/ambit.kubeconfig"), "foo", "a");
        assert!(
            matches!(error, Err(ApiError::Kubeconfig { .. })),
            "{error:?}"
        );
    }

    #[test]
    fn closed_port_cannot_tell() {
        let dir = tempfile::tempdir().unwrap();
        // Bound then closed: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, kubeconfig(&format!("http://{addr}"), None)).unwrap();
        let error = membership(&path, "foo", "a");
        assert!(
            matches!(&error, Err(ApiError::Unreachable { what, .. }) if what.starts_with("pod") || what.starts_with("namespace")),
            "{error:?}"
        );
    }

    /// The kubeconfig the install step writes (https, a CA, a bearer token) gives a client:
    /// the plugin's TLS stack has its crypto provider.
    #[tokio::test]
    async fn tls_kubeconfig_with_a_token_gives_a_client() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["kubernetes".to_owned()]).unwrap();
        let ca_path = dir.path().join("ca.crt");
        std::fs::write(&ca_path, ca.cert.pem()).unwrap();
        let path = dir.path().join("kubeconfig");
        let config = kubeconfig("https://10.96.0.1:443", Some(&ca_path));
        std::fs::write(&path, config).unwrap();
        client(&path).await.unwrap();
    }

    fn kubeconfig(server: &str, ca: Option<&Path>) -> String {
        let mut cluster = json!({"server": server});
        if let Some(ca) = ca {
            cluster["certificate-authority"] = json!(ca);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        })
        .to_string()
    }
}
