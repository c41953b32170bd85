//! Builders shared by the identity and TLS tests.

use std::{path::Path, sync::Arc, time::Duration};

use super::{
    Ca, ManagerConfig, SecretManager, SpiffeId,
    authz::{Authorizer, Caller},
    ca_client::LocalCaClient,
};

pub(crate) fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// Entitles every caller to everything: for tests about something else than entitlement.
pub(crate) struct AllowAll;

impl Authorizer for AllowAll {
    fn authenticate(&self, _token: &str) -> Option<Caller> {
        Some(Caller {
            name: "test".into(),
        })
    }

    fn entitled(&self, _caller: &Caller, _identity: &SpiffeId) -> bool {
        true
    }
}

pub(crate) fn ca_in(dir: &Path, max_ttl: Duration) -> Arc<Ca> {
    Arc::new(Ca::load_or_create(dir, "cluster.local", max_ttl).unwrap())
}

/// A manager talking to `ca` in process.
pub(crate) fn local_manager(ca: Arc<Ca>, config: ManagerConfig) -> SecretManager {
    let client = LocalCaClient::new(
        ca,
        Arc::new(AllowAll),
        Caller {
            name: "test".into(),
        },
    );
    SecretManager::spawn(Arc::new(client), config)
}
