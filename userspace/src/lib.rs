//! The ambit node agent as a library: discovery, redirection, identity, policy, the proxy
//! and its telemetry (metrics, access logs), wired together by `ambit run` in `main.rs`.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod admission;
pub mod agent;
pub mod cni_conf;
pub mod cni_install;
pub mod cni_server;
pub mod destinations;
pub mod discovery;
pub mod drain;
pub mod explain;
pub mod handover;
pub mod identity;
pub mod jwks;
pub mod kube_client;
pub mod metrics;
pub mod netns;
pub mod peers;
pub mod pod_cgroup;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod routing;
pub mod state;
mod state_file;
#[allow(unsafe_code)]
pub mod sys;
pub mod tls;
pub mod uninstall;
pub mod workloads;
