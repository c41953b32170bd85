//! Hands rustls a workload's current certificate on every handshake. Reading the
//! manager's watch channel per handshake is what makes rotation seamless: new handshakes
//! see the new certificate at once, established connections keep the keys they agreed.

use std::sync::Arc;

use rustls::{
    SignatureScheme,
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::sync::watch;

use crate::identity::WorkloadCert;

/// The latest certificate of one identity, as the manager publishes it.
#[derive(Debug)]
pub struct CertResolver {
    current: watch::Receiver<Option<Arc<WorkloadCert>>>,
}

impl CertResolver {
    pub fn new(current: watch::Receiver<Option<Arc<WorkloadCert>>>) -> Self {
        Self { current }
    }

    fn certified(&self) -> Option<Arc<CertifiedKey>> {
        self.current.borrow().as_ref().map(|c| c.certified())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified()
    }
}

impl ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.certified()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
