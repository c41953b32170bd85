//! The serializable certificate report behind the admin API's `/certs` and
//! `cargo xtask debug certs`. Renders the manager's state; decides nothing.

use std::{collections::HashMap, time::SystemTime};

use serde::Serialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::time::Instant;

use super::{Slot, Status};
use crate::identity::{SpiffeId, cert::fingerprint};

#[derive(Debug, Serialize)]
pub struct CertsReport {
    pub identities: Vec<IdentityReport>,
}

#[derive(Debug, Serialize)]
pub struct IdentityReport {
    pub identity: SpiffeId,
    /// Enrolled pods on this node with this identity.
    pub pods: usize,
    /// `requesting`, `valid`, `refreshing` or `backoff until <time> after <n> failures: <reason>`.
    pub state: String,
    pub serial: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub next_refresh: Option<String>,
    /// Subject and issuer of each certificate, leaf first, root last.
    pub chain: Vec<ChainEntry>,
    /// SHA-256 of the root's DER, as `openssl x509 -fingerprint -sha256` prints it.
    pub root_sha256: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChainEntry {
    pub subject: String,
    pub issuer: String,
}

pub(super) fn build(slots: &HashMap<SpiffeId, Slot>) -> CertsReport {
    let mut identities: Vec<_> = slots.iter().map(|(id, slot)| identity(id, slot)).collect();
    identities.sort_by(|a, b| a.identity.cmp(&b.identity));
    CertsReport { identities }
}

fn identity(id: &SpiffeId, slot: &Slot) -> IdentityReport {
    let cert = slot.cert.borrow().clone();
    let (state, next_refresh) = match &slot.status {
        Status::Requesting => ("requesting".to_owned(), None),
        Status::Refreshing => ("refreshing".to_owned(), None),
        Status::Valid { refresh_at } => ("valid".to_owned(), Some(wall(*refresh_at))),
        Status::Backoff {
            until,
            failures,
            reason,
        } => (
            format!(
                "backoff until {} after {failures} failures: {reason}",
                rfc3339(wall(*until))
            ),
            Some(wall(*until)),
        ),
    };
    let state = match (&cert, state) {
        (None, s) if s != "requesting" => format!("no valid certificate; {s}"),
        (_, s) => s,
    };
    IdentityReport {
        identity: id.clone(),
        pods: slot.pods,
        state,
        serial: cert.as_ref().map(|c| c.serial().to_owned()),
        not_before: cert.as_ref().map(|c| rfc3339(c.not_before())),
        not_after: cert.as_ref().map(|c| rfc3339(c.not_after())),
        next_refresh: next_refresh.map(rfc3339),
        chain: cert
            .as_ref()
            .map(|c| {
                c.chain_pem()
                    .iter()
                    .filter_map(|p| chain_entry(p))
                    .collect()
            })
            .unwrap_or_default(),
        root_sha256: cert.as_ref().map(|c| fingerprint(c.root())),
    }
}

fn chain_entry(pem: &str) -> Option<ChainEntry> {
    let der = pem::parse(pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).ok()?;
    let subject = cert.subject().to_string();
    let subject = match (subject.is_empty(), crate::tls::uri_san(&cert)) {
        // Workload certificates have an empty subject; their name is the URI SAN.
        (true, Some(uri)) => format!("URI:{uri}"),
        _ => subject,
    };
    Some(ChainEntry {
        subject,
        issuer: cert.issuer().to_string(),
    })
}

/// A tokio instant as wall-clock time (tokio's clock may be paused in tests).
fn wall(at: Instant) -> SystemTime {
    let now = Instant::now();
    let wall = SystemTime::now();
    if at >= now {
        wall + (at - now)
    } else {
        wall.checked_sub(now - at).unwrap_or(wall)
    }
}

fn rfc3339(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    // Whole seconds: certificate times have no finer resolution.
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}
