//! [`PolicyEngine`]: the policies of a snapshot indexed by namespace and scope, and a
//! per-workload cache of what applies, so a per-request check touches only the policies
//! of its workload. The agent builds a new engine when the snapshot changes; an engine
//! never changes its policies, which is why its cache never needs invalidating.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use super::{
    PolicyObject, PolicySpec,
    authz::TrustDomains,
    authz::{Decision, RequestContext},
    jwt::{JwtSettings, RemoteKeys},
    model::{
        AuthorizationPolicy, MtlsMode, Named, PeerAuthentication, RequestAuthentication, Selector,
    },
    resolve::{self, Candidates, WorkloadPolicies},
};
use crate::discovery::Pod;

/// Istio's default root namespace: its selector-less policies apply mesh-wide, and its
/// AuthorizationPolicies and RequestAuthentications with a selector apply to matching
/// workloads of every namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// The trust domain of identities when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// What policy scoping needs to know about a workload.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
}

impl Workload {
    pub fn from_pod(pod: &Pod) -> Self {
        Self {
            namespace: pod.namespace.clone(),
            labels: pod.labels.clone(),
            service_account: pod.service_account.clone(),
        }
    }

    /// Istio's principal form of the workload's identity: `<td>/ns/<ns>/sa/<sa>`
    /// (the SPIFFE ID without `spiffe://`).
    pub fn principal(&self, trust_domain: &str) -> String {
        format!(
            "{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// The policies of a snapshot, ready to answer per-workload questions.
///
/// Invariant: the policies never change after [`PolicyEngine::new`]; resolved workloads
/// are cached for the engine's lifetime (one entry per distinct workload asked about).
pub struct PolicyEngine {
    root_namespace: String,
    trust_domain: String,
    /// Where `jwksUri` keys come from and the JWT clock skew; set before first use, since
    /// resolved workloads keep a copy.
    jwt: JwtSettings,
    /// `trust_domain` and its aliases, shared with every resolved workload.
    trust_domains: Arc<TrustDomains>,
    namespaces: HashMap<String, NamespaceIndex>,
    cache: RwLock<HashMap<Workload, Arc<WorkloadPolicies>>>,
}

#[derive(Default)]
struct NamespaceIndex {
    peer: Scoped<PeerAuthentication>,
    request: Scoped<RequestAuthentication>,
    authz: Scoped<AuthorizationPolicy>,
}

/// One kind's policies of one namespace, split by whether they have a selector, each
/// list ordered oldest first.
struct Scoped<T> {
    wide: Vec<Arc<Named<T>>>,
    selected: Vec<Arc<Named<T>>>,
}

impl<T> Default for Scoped<T> {
    fn default() -> Self {
        Self {
            wide: Vec::new(),
            selected: Vec::new(),
        }
    }
}

/// The selector of a policy kind.
trait Selected {
    fn selector(&self) -> Option<&Selector>;
}

impl Selected for PeerAuthentication {
    fn selector(&self) -> Option<&Selector> {
        self.selector.as_ref()
    }
}

impl Selected for RequestAuthentication {
    fn selector(&self) -> Option<&Selector> {
        self.selector.as_ref()
    }
}

impl Selected for AuthorizationPolicy {
    fn selector(&self) -> Option<&Selector> {
        self.selector.as_ref()
    }
}

impl<T: Selected> Scoped<T> {
    fn insert(&mut self, policy: Named<T>) {
        let list = match policy.spec.selector() {
            Some(_) => &mut self.selected,
            None => &mut self.wide,
        };
        list.push(Arc::new(policy));
    }

    fn sort(&mut self) {
        for list in [&mut self.wide, &mut self.selected] {
            list.sort_by(|a, b| a.meta.age_key().cmp(&b.meta.age_key()));
        }
    }

    /// The policies of this namespace whose selector matches `w`.
    fn selecting<'a>(&'a self, w: &'a Workload) -> impl Iterator<Item = &'a Arc<Named<T>>> {
        self.selected
            .iter()
            .filter(|p| p.spec.selector().is_some_and(|s| s.matches(&w.labels)))
    }
}

/// What may apply to `w` from its namespace (`local`) and the root namespace (`root`,
/// empty when `w` lives there). `root_selectors`: whether a root-namespace policy with a
/// selector applies (AuthorizationPolicy and RequestAuthentication, not
/// PeerAuthentication, which Istio ignores there even for the root's own workloads).
fn candidates<'a, T: Selected>(
    local: &'a Scoped<T>,
    root: &'a Scoped<T>,
    w: &'a Workload,
    in_root: bool,
    root_selectors: bool,
) -> Candidates<'a, T> {
    let mut workload: Vec<_> = if in_root && !root_selectors {
        Vec::new()
    } else {
        local.selecting(w).collect()
    };
    if !in_root && root_selectors {
        workload.extend(root.selecting(w));
    }
    workload.sort_by(|a, b| a.meta.age_key().cmp(&b.meta.age_key()));
    Candidates {
        mesh: &root.wide,
        namespace: &local.wide,
        workload,
    }
}

static EMPTY_INDEX: std::sync::LazyLock<NamespaceIndex> =
    std::sync::LazyLock::new(NamespaceIndex::default);

impl PolicyEngine {
    /// Indexes `policies`. Selector-less policies in `root_namespace` apply mesh-wide; its
    /// AuthorizationPolicies and RequestAuthentications with a selector apply to the
    /// workloads they select in every namespace.
    pub fn new(policies: &[PolicyObject], root_namespace: &str) -> Self {
        let mut namespaces: HashMap<String, NamespaceIndex> = HashMap::new();
        for object in policies {
            let index = namespaces.entry(object.meta.namespace.clone()).or_default();
            let meta = Arc::new(object.meta.clone());
            match &object.spec {
                PolicySpec::PeerAuthentication(spec) => index.peer.insert(Named {
                    meta,
                    spec: spec.clone(),
                }),
                PolicySpec::RequestAuthentication(spec) => index.request.insert(Named {
                    meta,
                    spec: spec.clone(),
                }),
                PolicySpec::AuthorizationPolicy(spec) => index.authz.insert(Named {
                    meta,
                    spec: spec.clone(),
                }),
            }
        }
        for index in namespaces.values_mut() {
            index.peer.sort();
            index.request.sort();
            index.authz.sort();
        }
        Self {
            root_namespace: root_namespace.to_owned(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            jwt: JwtSettings::default(),
            trust_domains: Arc::new(TrustDomains::new(DEFAULT_TRUST_DOMAIN, &[])),
            namespaces,
            cache: RwLock::default(),
        }
    }

    /// Sets the trust domain used to name workloads (default `cluster.local`). Call it
    /// before [`Self::with_trust_domain_aliases`], which it resets.
    pub fn with_trust_domain(mut self, trust_domain: &str) -> Self {
        trust_domain.clone_into(&mut self.trust_domain);
        self.trust_domains = Arc::new(TrustDomains::new(trust_domain, &[]));
        self
    }

    /// Verifies `jwksUri` tokens with keys from `keys`; without it they are rejected.
    pub fn with_remote_keys(mut self, keys: Arc<dyn RemoteKeys>) -> Self {
        self.jwt.remote = keys;
        self
    }

    /// Sets the leeway on JWT `exp` and `nbf` (default [`super::jwt::DEFAULT_CLOCK_SKEW`]).
    pub fn with_jwt_clock_skew(mut self, skew: Duration) -> Self {
        self.jwt.clock_skew = skew;
        self
    }

    /// Makes `aliases` aliases of the trust domain: principals written with any of them,
    /// with the trust domain or with `cluster.local` match peers of any of them (Istio's
    /// `trustDomainAliases`, see [`TrustDomains`]).
    pub fn with_trust_domain_aliases(mut self, aliases: &[String]) -> Self {
        self.trust_domains = Arc::new(TrustDomains::new(&self.trust_domain, aliases));
        self
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// What applies to `workload`, resolved once and then served from the cache.
    pub fn resolve(&self, workload: &Workload) -> Arc<WorkloadPolicies> {
        // A poisoned lock only means another thread panicked between two complete map
        // operations; the map itself is always consistent, so keep using it.
        if let Some(found) = self
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(workload)
        {
            return found.clone();
        }
        let resolved = Arc::new(self.resolve_uncached(workload));
        self.cache
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(workload.clone())
            .or_insert(resolved)
            .clone()
    }

    fn resolve_uncached(&self, w: &Workload) -> WorkloadPolicies {
        let local = self.namespaces.get(&w.namespace).unwrap_or(&EMPTY_INDEX);
        let in_root = w.namespace == self.root_namespace;
        let root = match self.namespaces.get(&self.root_namespace) {
            // In the root namespace its selector-less policies are namespace policies.
            Some(root) if !in_root => root,
            _ => &EMPTY_INDEX,
        };
        resolve::resolve(
            candidates(&local.peer, &root.peer, w, in_root, false),
            candidates(&local.request, &root.request, w, in_root, true),
            candidates(&local.authz, &root.authz, w, in_root, true),
            self.trust_domains.clone(),
            self.jwt.clone(),
        )
    }

    /// The PeerAuthentication mode of `port` on `workload`.
    pub fn peer_authn(&self, workload: &Workload, port: u16) -> MtlsMode {
        self.resolve(workload).mtls().port(port).0
    }

    /// Authorizes a connection or request to `workload`.
    pub fn authorize(&self, workload: &Workload, ctx: &RequestContext<'_>) -> Decision {
        self.resolve(workload).authorize(ctx)
    }
}
