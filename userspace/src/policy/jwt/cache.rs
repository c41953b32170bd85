//! Tokens that verified, so that a client presenting the same token on every request pays
//! for one signature check (an RSA check costs about 200 µs here) rather than one per
//! request, as Envoy's `jwt_cache_config` does.
//!
//! One cache per policy engine: a new configuration starts empty, so nothing verified
//! under older rules survives it. An entry lives until the token expires (plus the clock
//! skew) and at most [`TTL`], which bounds how long a token signed by a key that its
//! `jwksUri` server has since withdrawn keeps working. Only successes are cached: a token
//! that failed is checked again, so a key set fetched later can accept it.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use super::{JwtIdentity, JwtRule};

/// The longest a verified token is taken on trust.
pub const TTL: Duration = Duration::from_secs(60);
/// Entries kept at most; past it the cache starts over (clients re-verify once).
const CAPACITY: usize = 4096;

/// Key: the rule that verified the token (its address, stable for the engine's life, which
/// owns the rules) and the token.
type Key = (usize, String);

#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<Key, (JwtIdentity, Instant)>>,
}

impl TokenCache {
    /// The identity `token` verified to under `rule`, from the cache or from `verify`.
    pub fn get_or_verify<E>(
        &self,
        rule: &JwtRule,
        token: &str,
        skew: Duration,
        verify: impl FnOnce() -> Result<JwtIdentity, E>,
    ) -> Result<JwtIdentity, E> {
        let key = (std::ptr::from_ref(rule) as usize, token.to_owned());
        let now = Instant::now();
        if let Some((identity, until)) = self.lock().get(&key)
            && now < *until
        {
            return Ok(identity.clone());
        }
        let identity = verify()?;
        let until = now + lifetime(&identity, skew);
        let mut entries = self.lock();
        if entries.len() >= CAPACITY {
            entries.retain(|_, (_, until)| now < *until);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key, (identity.clone(), until));
        Ok(identity)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (JwtIdentity, Instant)>> {
        // The map is consistent between operations: a panic elsewhere does not poison it.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How long a verified token may be taken on trust: until its `exp` (plus skew), at most
/// [`TTL`].
fn lifetime(identity: &JwtIdentity, skew: Duration) -> Duration {
    let Some(exp) = identity
        .claims
        .get("exp")
        .and_then(serde_json::Value::as_u64)
    else {
        return TTL;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Duration::from_secs(exp.saturating_sub(now))
        .saturating_add(skew)
        .min(TTL)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn identity(exp: Option<u64>) -> JwtIdentity {
        let mut claims = serde_json::json!({"iss": "i", "sub": "s"});
        if let Some(exp) = exp {
            claims["exp"] = exp.into();
        }
        JwtIdentity {
            principal: "i/s".into(),
            audiences: Vec::new(),
            presenter: None,
            claims,
        }
    }

    fn rule() -> JwtRule {
        JwtRule {
            issuer: "i".into(),
            audiences: Vec::new(),
            keys: crate::policy::model::JwtKeys::Discovery,
            from_headers: Vec::new(),
            from_params: Vec::new(),
            from_cookies: Vec::new(),
            forward_original_token: false,
            output_payload_to_header: None,
            output_claim_to_headers: Vec::new(),
        }
    }

    #[test]
    fn a_verified_token_is_checked_once_per_rule_and_failures_are_not_kept() {
        let cache = TokenCache::default();
        let (a, b) = (rule(), rule());
        let calls = Cell::new(0);
        let verify = || {
            calls.set(calls.get() + 1);
            Ok::<_, ()>(identity(None))
        };
        for _ in 0..3 {
            cache
                .get_or_verify(&a, "t", Duration::ZERO, verify)
                .unwrap();
        }
        assert_eq!(calls.get(), 1);
        // Another rule (another audience, say) verifies for itself.
        cache
            .get_or_verify(&b, "t", Duration::ZERO, verify)
            .unwrap();
        assert_eq!(calls.get(), 2);
        let failing = || Err::<JwtIdentity, _>("bad signature");
        assert!(
            cache
                .get_or_verify(&a, "u", Duration::ZERO, failing)
                .is_err()
        );
        assert!(
            cache
                .get_or_verify(&a, "u", Duration::ZERO, failing)
                .is_err()
        );
    }

    #[test]
    fn an_entry_lives_until_the_token_expires_and_never_past_the_ttl() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let skew = Duration::from_secs(1);
        assert!(lifetime(&identity(Some(now + 5)), skew) <= Duration::from_secs(6));
        assert_eq!(lifetime(&identity(Some(now + 3600)), skew), TTL);
        assert_eq!(lifetime(&identity(Some(now - 10)), skew), skew);
        assert_eq!(lifetime(&identity(None), skew), TTL);
    }
}
