//! Workload identity: the [`SpiffeId`] newtype, the CA that signs workload certificates
//! (`ca`), its gRPC service and clients (`ca_service`, `ca_client`), who may ask for what
//! (`authz`, and `kube_authz` for node agents proved by the Kubernetes API), where `ambit ca
//! --kubernetes` keeps its key (`cacerts_secret`) and publishes its root (`root_publisher`),
//! the in-memory key and certificate of a workload (`cert`), the manager that
//! keeps one certificate per enrolled identity fresh (`manager`), and how `ambit run` and
//! `ambit ca` start all this (`cli`). TLS configuration built from these certificates
//! lives in `crate::tls`.

pub mod authz;
pub mod ca;
pub mod ca_client;
pub mod ca_service;
pub mod cacerts_secret;
pub mod cert;
pub mod cli;
pub mod kube_authz;
pub mod manager;
pub mod root_publisher;
pub mod spiffe;

pub use ca::{Ca, CaError, Cacerts, PluggedCa};
pub use cert::WorkloadCert;
pub use manager::{CertsReport, ManagerConfig, SecretManager};
pub use spiffe::{SpiffeError, SpiffeId};

#[cfg(test)]
pub(crate) mod test_support;
