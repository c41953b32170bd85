//! Builders shared by the identity and TLS tests.

use std::{path::Path, sync::Arc, time::Duration};

use super::{
    Ca, ManagerConfig, SecretManager, SpiffeId,
    authz::{Authorizer, Caller, Refusal},
    ca_client::{BoxFuture, LocalCaClient},
};

pub(crate) fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// Entitles every caller to everything: for tests about something else than entitlement.
pub(crate) struct AllowAll;

impl Authorizer for AllowAll {
    fn authenticate<'a>(&'a self, _token: &'a str) -> BoxFuture<'a, Result<Caller, Refusal>> {
        Box::pin(async { Ok(test_caller()) })
    }

    fn entitled<'a>(
        &'a self,
        _caller: &'a Caller,
        _identity: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async { Ok(()) })
    }
}

fn test_caller() -> Caller {
    Caller {
        name: "test".into(),
        node: None,
    }
}

pub(crate) fn ca_in(dir: &Path, max_ttl: Duration) -> Arc<Ca> {
    Arc::new(Ca::load_or_create(dir, "cluster.local", max_ttl).unwrap())
}

/// A manager talking to `ca` in process.
pub(crate) fn local_manager(ca: Arc<Ca>, config: ManagerConfig) -> SecretManager {
    let client = LocalCaClient::new(ca, Arc::new(AllowAll), test_caller());
    SecretManager::spawn(Arc::new(client), config)
}
