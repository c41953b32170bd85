//! The one way ambit builds a Kubernetes API client (the agent's `kubernetes` source and
//! `ambit ca --kubernetes`): from a kubeconfig file (its current context), or from the
//! pod's own service account.

use std::path::{Path, PathBuf};

use kube::{
    Client, Config,
    config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError},
};

/// Why the client cannot be built. The messages leave the cause to the error chain
/// (`ambit: {error:#}`), which kube's errors already spell out in full.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        source: KubeconfigError,
    },
    #[error("no in-cluster Kubernetes configuration (pass --kubeconfig outside a pod)")]
    InCluster(#[source] InClusterError),
    #[error("cannot build the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client from `kubeconfig`, or from the pod's service account when `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig_error = |source| KubeError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?
        }
        None => Config::incluster().map_err(KubeError::InCluster)?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}
