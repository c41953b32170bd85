//! The protocol between the `ambit-cni` plugin and the node agent (`ambit run
//! --cni-socket`): over a unix stream socket, one connection per request, the plugin writes
//! one [`Request`] as a line of JSON and the agent answers with one [`Reply`] line.
//!
//! Also the rule both sides apply to tell a pod in the mesh from one outside it
//! ([`membership`]): the agent for every pod it knows, the plugin when the agent cannot
//! answer.

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

mod membership;

pub use membership::{MESH_LABEL, Membership, membership, namespace_enrolled};

/// Where the plugin finds the agent unless its configuration says `agent_socket`.
pub const DEFAULT_SOCKET: &str = "/var/run/ambit/cni.sock";

/// Longest request line the agent reads: a pod's names and addresses fit many times over.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// A pod sandbox as the runtime describes it to the plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`: tells a pod from a later one of the same name, so that a late `DEL`
    /// of the old one leaves the new one alone. Empty when the runtime does not pass it.
    #[serde(default)]
    pub uid: String,
    /// `CNI_NETNS`.
    pub netns: PathBuf,
    /// The addresses the plugins before ambit gave the pod (`prevResult.ips`): the API
    /// server only shows `status.podIP` once the chain has returned.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// The sandbox was created; the agent answers once the pod is redirected (its
    /// listeners exist in `netns`) or known to be outside the mesh.
    Add(Sandbox),
    /// The sandbox is going away; the agent forgets its netns.
    Del {
        namespace: String,
        name: String,
        #[serde(default)]
        uid: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Reply {
    /// The agent holds the pod's sockets: its first packet goes through the proxy.
    Enrolled,
    /// The pod is not meshed (its namespace is not enrolled, it opted out, it uses the
    /// host's network); it may start as it is.
    NotInMesh { reason: String },
    /// `DEL` done.
    Released,
    /// The agent could not redirect the pod (yet); the pod must not start.
    Failed { reason: String },
}

impl Request {
    /// `namespace/name`, the agent's key for a pod.
    pub fn pod_key(&self) -> String {
        match self {
            Self::Add(sandbox) => format!("{}/{}", sandbox.namespace, sandbox.name),
            Self::Del {
                namespace, name, ..
            } => format!("{namespace}/{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_tagged_json() {
        let add = Request::Add(Sandbox {
            namespace: "foo".into(),
            name: "p".into(),
            uid: "u".into(),
            netns: "/var/run/netns/x".into(),
            ips: vec!["10.45.0.2".parse().unwrap()],
        });
        assert_eq!(
            serde_json::to_string(&add).unwrap(),
            r#"{"command":"add","namespace":"foo","name":"p","uid":"u","netns":"/var/run/netns/x","ips":["10.45.0.2"]}"#
        );
        let reply: Reply =
            serde_json::from_str(r#"{"result":"not-in-mesh","reason":"why"}"#).unwrap();
        assert_eq!(
            reply,
            Reply::NotInMesh {
                reason: "why".into()
            }
        );
    }
}
