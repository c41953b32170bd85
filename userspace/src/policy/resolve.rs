//! Which policies apply to one workload, by Istio's scope rules: mesh (root namespace,
//! no selector), namespace (no selector) and workload (selector matching its labels; for
//! RequestAuthentication and AuthorizationPolicy, a selector in the root namespace also
//! selects workloads of every namespace, while Istio ignores a PeerAuthentication with a
//! selector in the root namespace: `ComposePeerAuthentication` and the istio/api note
//! "PeerAuthentication policies with workload selectors are ignored when deployed in the
//! root namespace").
//!
//! - PeerAuthentication: the narrowest scope that sets a mode wins; within a scope the
//!   oldest policy (creation time, then name) is the only one considered; UNSET
//!   inherits from the wider scope; nothing set means PERMISSIVE. `portLevelMtls` of the
//!   workload policy overrides per port.
//! - RequestAuthentication and AuthorizationPolicy: every matching policy applies.
//!
//! The result, [`WorkloadPolicies`], is what per-request checks run against; building it
//! is the only step that looks at policies of other workloads.

use std::sync::Arc;

use super::{
    authz::{AuthzPolicy, AuthzSet, Decision, Denied, RequestContext, TrustDomains, Verdict},
    jwt::{self, JwtIdentity, JwtSettings, Rejected, RequestAuthn},
    model::{
        Action, AuthorizationPolicy, MtlsMode, Named, PeerAuthentication, PolicyRef,
        RequestAuthentication,
    },
};

/// The policies of one kind that may apply to a workload, split by scope. Each slice is
/// ordered oldest first.
pub(super) struct Candidates<'a, T> {
    /// Root-namespace policies without selector; empty when the workload lives in the
    /// root namespace (they are then its namespace policies).
    pub mesh: &'a [Arc<Named<T>>],
    /// Policies without selector in the workload's namespace.
    pub namespace: &'a [Arc<Named<T>>],
    /// Policies whose selector matches it, oldest first: of its namespace and, for the
    /// kinds where Istio allows it, of the root namespace.
    pub workload: Vec<&'a Arc<Named<T>>>,
}

impl<T> Candidates<'_, T> {
    fn all(&self) -> impl Iterator<Item = &Arc<Named<T>>> {
        self.mesh
            .iter()
            .chain(self.namespace)
            .chain(self.workload.iter().copied())
    }
}

/// Everything the data path needs to check traffic to one workload.
#[derive(Debug)]
pub struct WorkloadPolicies {
    mtls: MtlsResolution,
    request_authn: Vec<RequestAuthn>,
    /// Keys of `jwksUri` rules and the clock skew, shared by the engine's workloads.
    jwt: JwtSettings,
    authz: AuthzSet,
}

/// What one policy does for a workload, as [`WorkloadPolicies::effective`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind")]
pub enum Effect {
    /// Sets the mTLS mode of one port, or (`port: None`) of every port without its own.
    PeerAuthentication { mode: MtlsMode, port: Option<u16> },
    /// Its JWT rules verify tokens presented to the workload.
    RequestAuthentication,
    /// Takes part in authorization with `action`; a dry-run one is evaluated, never enforced.
    AuthorizationPolicy { action: Action, dry_run: bool },
}

/// The PeerAuthentication outcome for one workload.
#[derive(Clone, Debug, PartialEq)]
pub struct MtlsResolution {
    /// The mode of ports without a port-level setting, and the policy that set it
    /// (`None`: nothing set a mode, so the PERMISSIVE default applies).
    default: (MtlsMode, Option<PolicyRef>),
    /// Port-level overrides of the workload policy.
    ports: Vec<(u16, MtlsMode, PolicyRef)>,
}

impl MtlsResolution {
    /// The mode of workload port `port` and the policy that decided it.
    pub fn port(&self, port: u16) -> (MtlsMode, Option<&PolicyRef>) {
        match self.ports.iter().find(|(p, _, _)| *p == port) {
            Some((_, mode, policy)) => (*mode, Some(policy)),
            None => (self.default.0, self.default.1.as_ref()),
        }
    }
}

pub(super) fn resolve(
    peer: Candidates<'_, PeerAuthentication>,
    request: Candidates<'_, RequestAuthentication>,
    authz: Candidates<'_, AuthorizationPolicy>,
    trust: Arc<TrustDomains>,
    jwt: JwtSettings,
) -> WorkloadPolicies {
    let mut set = AuthzSet {
        trust,
        ..AuthzSet::default()
    };
    for policy in authz.all() {
        let target = if policy.meta.dry_run {
            &mut set.dry_run
        } else {
            &mut set.enforced
        };
        target.push(policy.clone());
    }
    WorkloadPolicies {
        mtls: resolve_mtls(&peer),
        request_authn: request.all().cloned().collect(),
        jwt,
        authz: set,
    }
}

fn resolve_mtls(peer: &Candidates<'_, PeerAuthentication>) -> MtlsResolution {
    // Candidates are ordered oldest first, so `first` is Istio's "oldest wins".
    let workload = peer.workload.first().copied();
    let levels = [workload, peer.namespace.first(), peer.mesh.first()];
    let default = levels
        .iter()
        .flatten()
        .find_map(|p| p.spec.mode.map(|mode| (mode, Some(p.meta.clone()))))
        .unwrap_or((MtlsMode::Permissive, None));
    let ports = workload
        .map(|p| {
            p.spec
                .port_level
                .iter()
                .filter_map(|(port, mode)| mode.map(|m| (*port, m, p.meta.clone())))
                .collect()
        })
        .unwrap_or_default();
    MtlsResolution { default, ports }
}

impl WorkloadPolicies {
    /// The PeerAuthentication mode of workload port `port`.
    pub fn mtls(&self) -> &MtlsResolution {
        &self.mtls
    }

    /// Finds the request's token where the workload's rules look (`fromHeaders` name and
    /// prefix, `fromParams`, or the defaults `Authorization: Bearer` and `access_token`),
    /// verifies it, and edits the request as the deciding rule says: the token removed
    /// unless `forwardOriginalToken` (a header token only: Envoy leaves a query parameter
    /// in place), the payload (the token's base64url payload segment, as Envoy sends it)
    /// set in `outputPayloadToHeader`. Every rule's `outputPayloadToHeader` that the
    /// client sent is removed first, so it can never be forged. `Ok(None)`: no token, or
    /// no RequestAuthentication applies (then the request is left untouched, as in
    /// Istio). A token that fails verification is denied (HTTP 401, the reason naming
    /// why); keys that cannot be fetched always deny.
    pub fn authenticate_request(
        &self,
        parts: &mut http::request::Parts,
    ) -> Result<Option<JwtIdentity>, Denied> {
        if self.request_authn.is_empty() {
            return Ok(None);
        }
        jwt::authenticate_request(&self.request_authn, &self.jwt, parts).map_err(rejected)
    }

    /// True when requests to workload port `port` must be parsed: a RequestAuthentication
    /// applies (a token must be verified wherever it is presented) or an authorization rule
    /// looks at HTTP attributes there.
    pub fn inspects_http(&self, port: u16) -> bool {
        !self.request_authn.is_empty() || self.authz.needs_http(port)
    }

    /// Authorizes one connection or request (see [`super::authz`]).
    pub fn authorize(&self, ctx: &RequestContext<'_>) -> Decision {
        self.authz.evaluate(ctx)
    }

    /// Every policy that applies, for debugging (`namespace/name` of each).
    pub fn policies(&self) -> impl Iterator<Item = &PolicyRef> {
        self.effective().map(|(_, policy)| policy)
    }

    /// Every policy that applies and what it does here: PeerAuthentication mode setters
    /// first (the default, then port overrides), then RequestAuthentications, then
    /// AuthorizationPolicies in evaluation order (enforced before dry-run).
    pub fn effective(&self) -> impl Iterator<Item = (Effect, &PolicyRef)> {
        let (mode, default) = &self.mtls.default;
        let mtls = default
            .iter()
            .map(|p| {
                (
                    Effect::PeerAuthentication {
                        mode: *mode,
                        port: None,
                    },
                    p,
                )
            })
            .chain(self.mtls.ports.iter().map(|(port, mode, p)| {
                let effect = Effect::PeerAuthentication {
                    mode: *mode,
                    port: Some(*port),
                };
                (effect, p)
            }));
        mtls.chain(
            self.request_authn
                .iter()
                .map(|p| (Effect::RequestAuthentication, &p.meta)),
        )
        .chain(self.authz.enforced.iter().map(|p| authz_effect(p, false)))
        .chain(self.authz.dry_run.iter().map(|p| authz_effect(p, true)))
    }
}

fn authz_effect(policy: &AuthzPolicy, dry_run: bool) -> (Effect, &PolicyRef) {
    let effect = Effect::AuthorizationPolicy {
        action: policy.spec.action,
        dry_run,
    };
    (effect, &policy.meta)
}

fn rejected((policy, error): Rejected) -> Denied {
    Denied(Verdict {
        policy,
        action: None,
        rule: None,
        reason: super::Reason::JwtRejected(error),
        notes: Vec::new(),
    })
}
