//! Workload identity: the [`SpiffeId`] newtype, the CA that signs workload certificates,
//! its gRPC service and client, who may ask for what (`authz`), and the manager that
//! keeps one certificate per enrolled identity fresh. TLS configuration built from these
//! certificates lives in `crate::tls`.

pub mod ca;
pub mod spiffe;

pub use ca::{Ca, CaError, PluggedCa};
pub use spiffe::{SpiffeError, SpiffeId};
