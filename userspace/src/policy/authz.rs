//! Authorization: evaluates the `AuthorizationPolicy`s that apply to one workload against
//! one connection or request, in Istio's order (CUSTOM, DENY, ALLOW; AUDIT and dry-run
//! only add notes). Pure and allocation-free on the common path; which policies apply
//! is decided beforehand by [`super::resolve`].
//!
//! A connection without HTTP attributes follows ztunnel's semantics: a rule that needs
//! HTTP fields never matches in ALLOW (fail closed), and in DENY it is applied on its
//! remaining L4 part (the HTTP fields are dropped, which can only widen the deny).

use std::{fmt, net::IpAddr, sync::Arc};

use ipnet::IpNet;

use super::{
    jwt::{JwtError, JwtIdentity},
    model::{
        Action, AuthorizationPolicy, Clause, Condition, ConditionKey, ConditionValues, Named,
        Operation, PolicyRef, Rule, Source, StringMatch,
    },
};

/// What the proxy knows about one connection, and about the request when it parsed one.
/// Borrowed so that building it costs nothing.
#[derive(Clone, Copy, Debug)]
pub struct RequestContext<'a> {
    /// The peer's identity in Istio's principal form (`<td>/ns/<ns>/sa/<sa>`, no
    /// `spiffe://`); `None` for a plaintext connection.
    pub source_principal: Option<&'a str>,
    /// The namespace in the peer's identity; `None` for a plaintext connection.
    pub source_namespace: Option<&'a str>,
    /// The address the connection came from.
    pub source_ip: IpAddr,
    /// The original client (X-Forwarded-For / PROXY protocol); `source_ip` otherwise.
    pub remote_ip: IpAddr,
    pub destination_ip: IpAddr,
    /// The workload port (not the service port).
    pub destination_port: u16,
    pub sni: Option<&'a str>,
    /// `None` for an opaque TCP connection.
    pub http: Option<HttpRequest<'a>>,
}

/// The HTTP attributes of one request.
#[derive(Clone, Copy, Debug)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The path as `proxy::l7::normalize::normalize_path` made it: policies assume a
    /// normalized path. A query string left in is ignored when matching `paths`.
    pub path: &'a str,
    /// `Host` / `:authority`.
    pub host: &'a str,
    /// Every header line; names are compared without regard to ASCII case.
    pub headers: &'a [(&'a str, &'a str)],
    /// The verified JWT, when `RequestAuthentication` accepted one.
    pub jwt: Option<&'a JwtIdentity>,
}

/// The outcome of a check: a [`Permit`] to go on, or why not.
pub type Decision = Result<Permit, Denied>;

/// Proof that the policies allow the connection or request. Only this module and its
/// siblings can make one.
#[derive(Clone, Debug, PartialEq)]
pub struct Permit(pub(super) Verdict);

/// The connection or request is denied.
#[derive(Clone, Debug, PartialEq)]
pub struct Denied(pub(super) Verdict);

impl Permit {
    pub fn verdict(&self) -> &Verdict {
        &self.0
    }
}

impl Denied {
    pub fn verdict(&self) -> &Verdict {
        &self.0
    }

    /// 401 when authentication failed (a rejected JWT, or a missing one that a converted
    /// Istio 1.1 policy requires), 403 for an authorization denial.
    pub fn http_status(&self) -> u16 {
        let requires_token = self.0.policy.as_ref().is_some_and(|p| {
            p.converted_from
                .as_ref()
                .is_some_and(|from| from.requires_token)
        });
        match self.0.reason {
            Reason::JwtRejected(_) => 401,
            Reason::DenyRuleMatched if requires_token => 401,
            _ => 403,
        }
    }

    /// What the client reads: Envoy's bodies (`RBAC: access denied`; Istio 1.1's
    /// `Origin authentication failed.` for a missing token), or why a JWT was rejected.
    pub fn body(&self) -> String {
        match (&self.0.reason, self.http_status()) {
            (Reason::JwtRejected(_), _) => self.0.reason.to_string(),
            (_, 401) => "Origin authentication failed.".to_owned(),
            _ => ACCESS_DENIED.to_owned(),
        }
    }
}

/// Envoy's body for an RBAC denial, which clients and tests of Istio look for.
pub const ACCESS_DENIED: &str = "RBAC: access denied";

/// Why a decision came out the way it did.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The deciding policy, when one decided.
    pub policy: Option<PolicyRef>,
    /// Its action.
    pub action: Option<Action>,
    /// The index of the deciding rule in the policy's `rules`.
    pub rule: Option<usize>,
    pub reason: Reason,
    /// AUDIT matches and dry-run outcomes: reported, never deciding.
    pub notes: Vec<Note>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// No ALLOW policy applies, so everything not denied is allowed.
    NoAllowPolicy,
    AllowRuleMatched,
    DenyRuleMatched,
    /// ALLOW policies apply but none of their rules matched.
    NoAllowRuleMatched {
        policies: usize,
        /// True for a connection without HTTP attributes, where rules that need them
        /// cannot match.
        tcp: bool,
    },
    /// A matching CUSTOM policy: ambit has no external authorizer, so it fails closed.
    CustomUnsupported {
        provider: String,
    },
    /// Plaintext reached a port whose PeerAuthentication mode is STRICT.
    PlaintextToStrict {
        port: u16,
    },
    /// The request carried a JWT that RequestAuthentication rejects.
    JwtRejected(JwtError),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoAllowPolicy => f.write_str("no ALLOW policy applies and no DENY rule matched"),
            Self::AllowRuleMatched => f.write_str("an ALLOW rule matched"),
            Self::DenyRuleMatched => f.write_str("a DENY rule matched"),
            Self::NoAllowRuleMatched { policies, tcp } => {
                write!(f, "no rule of the {policies} ALLOW polic")?;
                f.write_str(if *policies == 1 { "y" } else { "ies" })?;
                f.write_str(" applying to the workload matched")?;
                if *tcp {
                    f.write_str(" (TCP connection: rules that need HTTP attributes never match)")?;
                }
                Ok(())
            }
            Self::CustomUnsupported { provider } => write!(
                f,
                "a CUSTOM rule matched, but external authorization (provider {provider:?}) is not supported by ambit: denied to fail closed"
            ),
            Self::PlaintextToStrict { port } => write!(
                f,
                "plaintext connection to port {port}, where PeerAuthentication requires mTLS (STRICT)"
            ),
            Self::JwtRejected(e) => write!(f, "JWT rejected: {e}"),
        }
    }
}

/// Something a decision reports without being decided by it.
#[derive(Clone, Debug, PartialEq)]
pub enum Note {
    /// An AUDIT policy's rule matched: the request should be audited.
    Audit { policy: PolicyRef, rule: usize },
    /// Dry-run policies apply: this is what the decision would be if they were enforced.
    DryRun {
        allowed: bool,
        policy: Option<PolicyRef>,
        action: Option<Action>,
        rule: Option<usize>,
    },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Audit { policy, rule } => {
                write!(f, "audit: rule {rule} of AUDIT policy {policy} matched")
            }
            Self::DryRun {
                allowed,
                policy,
                action,
                rule,
            } => {
                let outcome = if *allowed { "ALLOW" } else { "DENY" };
                write!(
                    f,
                    "dry-run: with dry-run policies enforced it would {outcome}"
                )?;
                if let (Some(policy), Some(action)) = (policy, action) {
                    write!(f, " by {action} policy {policy}")?;
                }
                if let Some(rule) = rule {
                    write!(f, " rule {rule}")?;
                }
                Ok(())
            }
        }
    }
}

pub(super) type AuthzPolicy = Arc<Named<AuthorizationPolicy>>;

/// Policies of one workload grouped by action. Each list is in a stable order (oldest
/// first), so the same request always names the same deciding policy.
#[derive(Debug, Default)]
pub struct ByAction {
    pub(super) custom: Vec<AuthzPolicy>,
    pub(super) deny: Vec<AuthzPolicy>,
    pub(super) allow: Vec<AuthzPolicy>,
    pub(super) audit: Vec<AuthzPolicy>,
}

impl ByAction {
    pub(super) fn push(&mut self, policy: AuthzPolicy) {
        match policy.spec.action {
            Action::Custom => self.custom.push(policy),
            Action::Deny => self.deny.push(policy),
            Action::Allow => self.allow.push(policy),
            Action::Audit => self.audit.push(policy),
        }
    }

    fn is_empty(&self) -> bool {
        self.custom.is_empty() && self.deny.is_empty() && self.allow.is_empty()
    }

    /// Every policy, in action order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &AuthzPolicy> {
        self.custom
            .iter()
            .chain(&self.deny)
            .chain(&self.allow)
            .chain(&self.audit)
    }
}

/// The authorization policies that apply to one workload.
#[derive(Debug, Default)]
pub struct AuthzSet {
    pub(super) enforced: ByAction,
    /// Policies annotated `istio.io/dry-run: "true"`.
    pub(super) dry_run: ByAction,
    /// The trust domains principals are matched across.
    pub(super) trust: Arc<TrustDomains>,
}

/// The local trust domain and its aliases (`--trust-domain-alias`): identities that differ
/// only in which of these they name are one identity, as in Istio's trust domain
/// migration (istio.io "Trust Domain Migration"; `pilot/pkg/security/trustdomain`).
///
/// Istio rewrites each policy principal `<td>/ns/<ns>/sa/<sa>` whose `<td>` is one of
/// these or `cluster.local` (which Istio reads as "the local trust domain") into one
/// principal per trust domain here. Matching at request time is the same: a peer whose
/// trust domain is one of these also matches a principal written with any other of them
/// or with `cluster.local`. A peer of any other trust domain matches only as written.
/// Unlike Istio, which leaves principals of other than five segments untouched, a prefix
/// or suffix pattern (`old-td/ns/foo/*`) is matched across the domains too.
#[derive(Debug, Default)]
pub(super) struct TrustDomains(Vec<String>);

impl TrustDomains {
    /// `local` first, then `aliases`.
    pub(super) fn new(local: &str, aliases: &[String]) -> Self {
        let mut domains = vec![local.to_owned()];
        for alias in aliases {
            if !domains.contains(alias) {
                domains.push(alias.clone());
            }
        }
        Self(domains)
    }

    /// `m` matches `principal`, or `principal` in another of these trust domains.
    fn principal_matches(&self, m: &StringMatch, principal: Option<&str>) -> bool {
        let Some(principal) = principal else {
            return false;
        };
        if m.matches(Some(principal)) {
            return true;
        }
        let Some((domain, rest)) = principal.split_once('/') else {
            return false;
        };
        if !self.0.iter().any(|d| d == domain) {
            return false;
        }
        self.0
            .iter()
            .map(String::as_str)
            .chain([super::engine::DEFAULT_TRUST_DOMAIN])
            .filter(|d| *d != domain)
            .any(|d| m.matches_joined(d, rest))
    }
}

impl AuthzSet {
    /// Evaluates `ctx`. Allocates only to report AUDIT or dry-run notes.
    pub fn evaluate(&self, ctx: &RequestContext<'_>) -> Decision {
        let trust = &self.trust;
        let mut decision = decide(&[&self.enforced], ctx, trust);
        let notes = &mut match &mut decision {
            Ok(Permit(v)) | Err(Denied(v)) => v,
        }
        .notes;
        for policy in &self.enforced.audit {
            if let Some(rule) = first_match(policy, ctx, trust, Side::Allow) {
                notes.push(Note::Audit {
                    policy: policy.meta.clone(),
                    rule,
                });
            }
        }
        if !self.dry_run.is_empty() {
            let (allowed, shadow) = match decide(&[&self.enforced, &self.dry_run], ctx, trust) {
                Ok(Permit(v)) => (true, v),
                Err(Denied(v)) => (false, v),
            };
            notes.push(Note::DryRun {
                allowed,
                policy: shadow.policy,
                action: shadow.action,
                rule: shadow.rule,
            });
        }
        decision
    }

    /// True when a rule of any policy (enforced, audit or dry-run) could match a request to
    /// `port` on its HTTP attributes: then requests to that port are worth parsing. Errs on
    /// the side of parsing, which only costs time.
    pub fn needs_http(&self, port: u16) -> bool {
        self.enforced
            .iter()
            .chain(self.dry_run.iter())
            .flat_map(|p| &p.spec.rules)
            .any(|rule| rule_needs_http(rule, port))
    }
}

fn rule_needs_http(rule: &Rule, port: u16) -> bool {
    let reaches = |op: &Operation| clause(&op.ports, |p| *p == port);
    if !rule.to.is_empty() && !rule.to.iter().any(reaches) {
        return false;
    }
    rule.from.iter().any(|s| !s.request_principals.is_empty())
        || rule.to.iter().any(|op| {
            reaches(op) && !(op.hosts.is_empty() && op.methods.is_empty() && op.paths.is_empty())
        })
        || rule.when.iter().any(|c| c.key.is_http())
}

/// Which way a rule fails closed, by its policy's action: what an attribute in doubt
/// (an HTTP field on a TCP connection, one of several lines of a header) does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// ALLOW and AUDIT: a doubt never matches. A field that needs HTTP makes the rule
    /// unmatchable on TCP; a header condition must hold for every line of the header.
    Allow,
    /// DENY and CUSTOM: a doubt matches. A field that needs HTTP is dropped on TCP (the
    /// rest of the rule applies); a header condition holding for any line is enough.
    Deny,
}

fn decide(sets: &[&ByAction], ctx: &RequestContext<'_>, trust: &TrustDomains) -> Decision {
    let verdict = |policy: &AuthzPolicy, rule, reason| Verdict {
        policy: Some(policy.meta.clone()),
        action: Some(policy.spec.action),
        rule,
        reason,
        notes: Vec::new(),
    };
    for policy in sets.iter().flat_map(|s| &s.custom) {
        if let Some(rule) = first_match(policy, ctx, trust, Side::Deny) {
            let provider = policy.spec.provider.clone().unwrap_or_default();
            return Err(Denied(verdict(
                policy,
                Some(rule),
                Reason::CustomUnsupported { provider },
            )));
        }
    }
    for policy in sets.iter().flat_map(|s| &s.deny) {
        if let Some(rule) = first_match(policy, ctx, trust, Side::Deny) {
            return Err(Denied(verdict(policy, Some(rule), Reason::DenyRuleMatched)));
        }
    }
    let mut allow = sets.iter().flat_map(|s| &s.allow).peekable();
    let Some(&only) = allow.peek() else {
        return Ok(Permit(Verdict {
            policy: None,
            action: None,
            rule: None,
            reason: Reason::NoAllowPolicy,
            notes: Vec::new(),
        }));
    };
    let mut policies = 0;
    for policy in allow {
        policies += 1;
        if let Some(rule) = first_match(policy, ctx, trust, Side::Allow) {
            return Ok(Permit(verdict(
                policy,
                Some(rule),
                Reason::AllowRuleMatched,
            )));
        }
    }
    let reason = Reason::NoAllowRuleMatched {
        policies,
        tcp: ctx.http.is_none(),
    };
    Err(Denied(if policies == 1 {
        // One ALLOW policy: naming it is what an operator needs (often `allow-nothing`).
        verdict(only, None, reason)
    } else {
        Verdict {
            policy: None,
            action: Some(Action::Allow),
            rule: None,
            reason,
            notes: Vec::new(),
        }
    }))
}

fn first_match(
    policy: &AuthzPolicy,
    ctx: &RequestContext<'_>,
    trust: &TrustDomains,
    side: Side,
) -> Option<usize> {
    policy
        .spec
        .rules
        .iter()
        .position(|rule| rule_matches(rule, ctx, trust, side))
}

fn rule_matches(rule: &Rule, ctx: &RequestContext<'_>, trust: &TrustDomains, side: Side) -> bool {
    (rule.from.is_empty()
        || rule
            .from
            .iter()
            .any(|s| source_matches(s, ctx, trust, side)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, ctx, side)))
        && rule
            .when
            .iter()
            .all(|c| condition_matches(c, ctx, trust, side))
}

fn source_matches(
    source: &Source,
    ctx: &RequestContext<'_>,
    trust: &TrustDomains,
    side: Side,
) -> bool {
    clause(&source.principals, |m| {
        trust.principal_matches(m, ctx.source_principal)
    }) && clause(&source.namespaces, |m| m.matches(ctx.source_namespace))
        && clause(&source.ip_blocks, |net| net.contains(&ctx.source_ip))
        && clause(&source.remote_ip_blocks, |net| net.contains(&ctx.remote_ip))
        && http_clause(&source.request_principals, ctx, side, |req, m| {
            m.matches(req.jwt.map(|j| j.principal.as_str()))
        })
}

fn operation_matches(op: &Operation, ctx: &RequestContext<'_>, side: Side) -> bool {
    clause(&op.ports, |p| *p == ctx.destination_port)
        && http_clause(&op.hosts, ctx, side, |req, m| host_matches(m, req.host))
        && http_clause(&op.methods, ctx, side, |req, m| m.matches(Some(req.method)))
        && http_clause(&op.paths, ctx, side, |req, m| {
            let path = req.path.split_once('?').map_or(req.path, |(p, _)| p);
            m.matches(Some(path))
        })
}

fn condition_matches(
    cond: &Condition,
    ctx: &RequestContext<'_>,
    trust: &TrustDomains,
    side: Side,
) -> bool {
    match (&cond.values, &cond.key) {
        (ConditionValues::Ips(c), key) => {
            let ip = match key {
                ConditionKey::SourceIp => ctx.source_ip,
                ConditionKey::RemoteIp => ctx.remote_ip,
                _ => ctx.destination_ip,
            };
            clause(c, |net: &IpNet| net.contains(&ip))
        }
        (ConditionValues::Ports(c), _) => clause(c, |p| *p == ctx.destination_port),
        (ConditionValues::Strings(c), key) => match key {
            ConditionKey::SourceNamespace => clause(c, |m| m.matches(ctx.source_namespace)),
            ConditionKey::SourcePrincipal => {
                clause(c, |m| trust.principal_matches(m, ctx.source_principal))
            }
            ConditionKey::ConnectionSni => clause(c, |m| m.matches(ctx.sni)),
            ConditionKey::RequestHeader(name) => match &ctx.http {
                _ if c.is_empty() => true,
                Some(req) => header_clause(c, req, name, side),
                None => side == Side::Deny,
            },
            ConditionKey::RequestPrincipal => http_clause(c, ctx, side, |req, m| {
                m.matches(req.jwt.map(|j| j.principal.as_str()))
            }),
            ConditionKey::RequestAudiences => http_clause(c, ctx, side, |req, m| {
                req.jwt
                    .is_some_and(|j| j.audiences.iter().any(|a| m.matches(Some(a))))
            }),
            ConditionKey::RequestPresenter => http_clause(c, ctx, side, |req, m| {
                m.matches(req.jwt.and_then(|j| j.presenter.as_deref()))
            }),
            ConditionKey::RequestClaim(path) => http_clause(c, ctx, side, |req, m| {
                req.jwt
                    .is_some_and(|j| j.claim_matches(path, |v| m.matches(Some(v))))
            }),
            // Typed keys never carry string values (parse guarantees it).
            ConditionKey::SourceIp
            | ConditionKey::RemoteIp
            | ConditionKey::DestinationIp
            | ConditionKey::DestinationPort => false,
        },
    }
}

/// A `request.headers[name]` condition, on each line of the header on its own: a client
/// that repeats a header must not pick the line the policy sees while the application
/// reads another. So in ALLOW every line must satisfy `values`/`notValues`, and in DENY
/// one line that does is enough. Envoy instead matches the lines joined with `,`, where
/// an extra line defeats a DENY on `values` (`x: admin` plus `x: y` is `admin,y`) and an
/// ALLOW on `notValues`. A header without any line is matched as absent.
fn header_clause(c: &Clause<StringMatch>, req: &HttpRequest<'_>, name: &str, side: Side) -> bool {
    let holds = |value: Option<&str>| clause(c, |m| m.matches(value));
    let mut lines = req
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| Some(*v))
        .peekable();
    if lines.peek().is_none() {
        return holds(None);
    }
    match side {
        Side::Allow => lines.all(holds),
        Side::Deny => lines.any(holds),
    }
}

/// `hosts`: without regard to ASCII case (RFC 4343; Istio since GHSA-7774-7vr3-cc8j), and
/// with or without the authority's port and a trailing dot.
///
/// Istio matches the whole `:authority`, so `hosts: [a.com]` misses `a.com:8080` and
/// operators are told to add `a.com:*` (istio/istio#44080); a DENY or `notHosts` on
/// `a.com` is then bypassed by adding a port or a final dot (`a.com.`). ambit matches
/// the pattern against the authority as sent and against its bare host name, a superset
/// of Istio's matches: a pattern naming a port (`a.com:8080`, `a.com:*`) still needs
/// that port. Matching the bare name in ALLOW reaches nothing more, since the port in
/// the authority never changes where the proxy sends the request.
fn host_matches(m: &StringMatch, authority: &str) -> bool {
    m.matches_ignore_case(authority) || m.matches_ignore_case(bare_host(authority))
}

/// `authority` without its `:port` (when all digits) and one final dot.
fn bare_host(authority: &str) -> &str {
    let host = match authority.rsplit_once(':') {
        // `[v6]:port` or `name:port`; a colon inside an unbracketed IPv6 is no port.
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (host.ends_with(']') || !host.contains(':')) =>
        {
            host
        }
        _ => authority,
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// `any` (if set) has a match and `not` has none. A missing attribute matches no value,
/// so it fails a positive clause and passes a negative one, as in Envoy.
fn clause<T>(c: &Clause<T>, test: impl Fn(&T) -> bool) -> bool {
    (c.any.is_empty() || c.any.iter().any(&test)) && !c.not.iter().any(&test)
}

/// A clause on HTTP attributes, with the TCP-connection rule applied.
fn http_clause<T>(
    c: &Clause<T>,
    ctx: &RequestContext<'_>,
    side: Side,
    test: impl Fn(&HttpRequest<'_>, &T) -> bool,
) -> bool {
    if c.is_empty() {
        return true;
    }
    match &ctx.http {
        Some(req) => clause(c, |v| test(req, v)),
        None => side == Side::Deny,
    }
}

impl StringMatch {
    /// Matches `value`; `None` (absent attribute) matches nothing, and presence (`*`)
    /// needs a non-empty value.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(value) = value else { return false };
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(s) => value.starts_with(s.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
            Self::Presence => !value.is_empty(),
        }
    }

    /// As [`Self::matches`] on `{first}/{rest}`, without building that string.
    fn matches_joined(&self, first: &str, rest: &str) -> bool {
        let len = first.len() + 1 + rest.len();
        let joined = || first.bytes().chain([b'/']).chain(rest.bytes());
        match self {
            Self::Exact(s) => len == s.len() && joined().eq(s.bytes()),
            Self::Prefix(s) => len >= s.len() && joined().zip(s.bytes()).all(|(a, b)| a == b),
            Self::Suffix(s) => {
                len >= s.len() && joined().rev().zip(s.bytes().rev()).all(|(a, b)| a == b)
            }
            Self::Presence => true,
        }
    }

    /// As [`Self::matches`], ignoring ASCII case (hosts).
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        let b = value.as_bytes();
        match self {
            Self::Exact(s) => value.eq_ignore_ascii_case(s),
            Self::Prefix(s) => {
                b.len() >= s.len() && b[..s.len()].eq_ignore_ascii_case(s.as_bytes())
            }
            Self::Suffix(s) => {
                b.len() >= s.len() && b[b.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
            Self::Presence => !value.is_empty(),
        }
    }
}
