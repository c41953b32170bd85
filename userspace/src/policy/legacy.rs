//! Istio 1.1's authentication API, `authentication.istio.io/v1alpha1` `Policy` and
//! `MeshPolicy`: parsed as strictly as the security kinds ([`LegacyPolicy::from_yaml`]),
//! then converted into the v1beta1 model ([`convert`]) the way Istio's own migration
//! (Istio 1.5's `security-policy-migrate`) did, and rendered back as v1beta1 YAML for
//! people ([`converted_yaml`], in `render`).
//!
//! Conversion needs the Services that `targets` name, so it runs where a source has
//! assembled a whole [`Snapshot`] (`Snapshot::convert_legacy`), not per document. Nothing
//! here decides traffic: the converted objects go through the engine like any others.
//!
//! Both spellings of every field are accepted, as Istio's protobuf JSON did
//! (`triggerRules` and `trigger_rules`); writing both in one object is an error.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

mod render;
pub use render::{CONVERTED_FROM_ANNOTATION, converted_yaml};

use super::{
    PolicyError, PolicyObject, PolicySpec,
    model::{
        Action, AuthorizationPolicy, Clause, ConvertedFrom, JwtHeader, JwtRule, LEGACY_API_VERSION,
        LegacyKind, MtlsMode, Operation, PeerAuthentication, PolicyMeta, RequestAuthentication,
        Rule, Selector, Source, StringMatch,
    },
    parse::{Problem, jwt_keys, parse_meta, string_list},
    walk::{Fields, Node, Res},
};
use crate::discovery::{Snapshot, objects::TargetPort};

/// True for the kinds of Istio 1.1's authentication API, in any version, so that an
/// unsupported version is reported rather than ignored.
pub fn is_legacy_kind(api_version: &str, kind: &str) -> bool {
    api_version.starts_with("authentication.istio.io/") && legacy_kind(kind).is_some()
}

fn legacy_kind(kind: &str) -> Option<LegacyKind> {
    match kind {
        "Policy" => Some(LegacyKind::Policy),
        "MeshPolicy" => Some(LegacyKind::MeshPolicy),
        _ => None,
    }
}

/// A validated v1alpha1 policy, before conversion.
#[derive(Clone, Debug, PartialEq)]
pub struct LegacyPolicy {
    pub kind: LegacyKind,
    /// For a `MeshPolicy`, `namespace` is empty: it takes the root namespace when
    /// converted.
    pub meta: PolicyMeta,
    /// Empty: the whole namespace (or mesh).
    pub targets: Vec<Target>,
    /// The mode of the first `peers[].mtls`; `None` when `peers` is absent or empty,
    /// which in Istio 1.1 means mTLS is not required.
    pub peer_mode: Option<MtlsMode>,
    /// `peerIsOptional`: a failed peer authentication is tolerated.
    pub peer_is_optional: bool,
    pub origins: Vec<Origin>,
    /// `originIsOptional`: a request without a valid token is let through.
    pub origin_is_optional: bool,
}

/// `targets[]`: a Service of the policy's namespace, and optionally some of its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    /// Empty: every port.
    pub ports: Vec<PortSelector>,
}

/// `targets[].ports[]`: a Service port by number or by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSelector {
    Number(u16),
    Name(String),
}

/// `origins[].jwt`: the JWT rule and when it applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub rule: JwtRule,
    /// `triggerRules`; empty means every request.
    pub triggers: Vec<Trigger>,
}

/// `triggerRules[]`: matches a request whose path is in none of `excluded` and, when
/// `included` is not empty, in one of `included`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trigger {
    pub excluded: Vec<StringMatch>,
    pub included: Vec<StringMatch>,
}

impl LegacyPolicy {
    /// Parses one `Policy` or `MeshPolicy` document; `kind` is the document's `kind`.
    pub fn from_yaml(kind: &str, doc: Value) -> Result<LegacyPolicy, PolicyError> {
        let kind = legacy_kind(kind).unwrap_or(LegacyKind::Policy);
        let root = Node {
            value: &doc,
            path: String::new(),
        };
        let name = doc["metadata"]["name"].as_str();
        let label = match (kind, name) {
            (_, None) => "<unnamed>".to_owned(),
            (LegacyKind::MeshPolicy, Some(name)) => name.to_owned(),
            (LegacyKind::Policy, Some(name)) => {
                let namespace = doc["metadata"]["namespace"].as_str().unwrap_or("default");
                format!("{namespace}/{name}")
            }
        };
        parse_document(kind, &root).map_err(|e| PolicyError {
            kind: kind_name(kind),
            object: label,
            path: e.path,
            problem: Box::new(e.problem),
        })
    }

    /// `namespace/name` of a `Policy`, `name` of a `MeshPolicy`: how errors and
    /// converted objects name it.
    fn label(&self) -> String {
        match self.kind {
            LegacyKind::Policy => format!("{}/{}", self.meta.namespace, self.meta.name),
            LegacyKind::MeshPolicy => self.meta.name.clone(),
        }
    }
}

fn kind_name(kind: LegacyKind) -> &'static str {
    match kind {
        LegacyKind::Policy => "Policy",
        LegacyKind::MeshPolicy => "MeshPolicy",
    }
}

fn parse_document(kind: LegacyKind, root: &Node<'_>) -> Res<LegacyPolicy> {
    let fields = root.fields(&["apiVersion", "kind", "metadata", "spec", "status"])?;
    let api_version = fields.require("apiVersion")?;
    let version = api_version.string()?;
    if version != LEGACY_API_VERSION {
        return api_version.fail(Problem::UnknownValue {
            what: "apiVersion",
            value: version.to_owned(),
            expected: &[LEGACY_API_VERSION],
        });
    }
    let mut meta = parse_meta(&fields)?;
    if kind == LegacyKind::MeshPolicy {
        if meta.name != "default" {
            let name = Node {
                value: &root.value["metadata"]["name"],
                path: "metadata.name".into(),
            };
            return name.fail(Problem::Conflict(
                "Istio requires the MeshPolicy to be named `default`",
            ));
        }
        // Cluster-scoped: a namespace written on it means nothing, as in Kubernetes.
        meta.namespace.clear();
    }
    let empty = Value::Mapping(Mapping::new());
    let spec = fields.get("spec").unwrap_or(Node {
        value: &empty,
        path: "spec".into(),
    });
    parse_spec(kind, meta, &spec)
}

fn parse_spec(kind: LegacyKind, meta: PolicyMeta, spec: &Node<'_>) -> Res<LegacyPolicy> {
    let f = spec.fields(&[
        "targets",
        "peers",
        "peerIsOptional",
        "peer_is_optional",
        "origins",
        "originIsOptional",
        "origin_is_optional",
        "principalBinding",
        "principal_binding",
    ])?;
    let mut targets = Vec::new();
    if let Some(list) = f.get("targets") {
        if kind == LegacyKind::MeshPolicy {
            return list.fail(Problem::Conflict(
                "a MeshPolicy applies to the whole mesh and cannot have targets",
            ));
        }
        for item in list.items()? {
            let target = parse_target(&item)?;
            if targets.iter().any(|t: &Target| t.name == target.name) {
                return item.fail(Problem::Conflict("two targets name the same service"));
            }
            targets.push(target);
        }
    }
    let peer_mode = match f.get("peers") {
        Some(list) => parse_peers(&list)?,
        None => None,
    };
    let mut origins = Vec::new();
    if let Some(list) = f.get("origins") {
        for item in list.items()? {
            let jwt = item.fields(&["jwt"])?.require("jwt")?;
            origins.push(parse_jwt(&jwt)?);
        }
    }
    // The v1beta1 model has no principal binding (the request principal is always the
    // token's); it is validated so a typo is caught, and dropped as Istio's migration did.
    if let Some(binding) = either(&f, "principalBinding", "principal_binding")? {
        let value = binding.string()?;
        if !["USE_PEER", "USE_ORIGIN"].contains(&value) {
            return binding.fail(Problem::UnknownValue {
                what: "principal binding",
                value: value.to_owned(),
                expected: &["USE_PEER", "USE_ORIGIN"],
            });
        }
    }
    Ok(LegacyPolicy {
        kind,
        meta,
        targets,
        peer_mode,
        peer_is_optional: flag(&f, "peerIsOptional", "peer_is_optional")?,
        origins,
        origin_is_optional: flag(&f, "originIsOptional", "origin_is_optional")?,
    })
}

/// The field under either spelling; both at once is an error naming the second.
fn either<'a>(f: &Fields<'a, '_>, camel: &str, snake: &str) -> Res<Option<Node<'a>>> {
    match (f.get(camel), f.get(snake)) {
        (Some(_), Some(second)) => second.fail(Problem::Conflict(
            "the same field is written in both spellings (camelCase and snake_case)",
        )),
        (first, second) => Ok(first.or(second)),
    }
}

fn flag(f: &Fields<'_, '_>, camel: &str, snake: &str) -> Res<bool> {
    either(f, camel, snake)?.map_or(Ok(false), |n| n.boolean())
}

fn strings(f: &Fields<'_, '_>, camel: &str, snake: &str) -> Res<Vec<String>> {
    let Some(list) = either(f, camel, snake)? else {
        return Ok(Vec::new());
    };
    list.items()?
        .iter()
        .map(|item| item.string().map(str::to_owned))
        .collect()
}

fn parse_target(node: &Node<'_>) -> Res<Target> {
    let f = node.fields(&["name", "ports"])?;
    let name = f.require("name")?.string()?.to_owned();
    let mut ports = Vec::new();
    if let Some(list) = f.get("ports") {
        for item in list.items()? {
            let p = item.fields(&["number", "name"])?;
            ports.push(match (p.get("number"), p.get("name")) {
                (Some(number), None) => match number.value.as_u64().map(u16::try_from) {
                    Some(Ok(n)) if n != 0 => PortSelector::Number(n),
                    _ => {
                        let text = serde_yaml::to_string(number.value).unwrap_or_default();
                        return number.fail(Problem::InvalidPort(text.trim().to_owned()));
                    }
                },
                (None, Some(name)) => PortSelector::Name(name.string()?.to_owned()),
                (Some(_), Some(name)) => {
                    return name.fail(Problem::Conflict("a port is a number or a name, not both"));
                }
                (None, None) => return item.fail(Problem::NoFields),
            });
        }
    }
    Ok(Target { name, ports })
}

/// `peers`: the mode of the first mTLS method. `mtls: {}` and `mtls:` (null) are
/// STRICT, as in Istio 1.1, where STRICT is the mode enum's zero value.
fn parse_peers(list: &Node<'_>) -> Res<Option<MtlsMode>> {
    let mut mode = None;
    for item in list.items()? {
        let f = item.fields(&["mtls", "jwt"])?;
        if let Some(jwt) = f.get("jwt") {
            return jwt.fail(Problem::Unsupported(
                "peer JWT authentication (peers[].jwt), which Istio 1.1 never implemented,",
            ));
        }
        if !f.contains("mtls") {
            return item.fail(Problem::Missing);
        }
        let parsed = match f.get("mtls") {
            None => MtlsMode::Strict,
            Some(mtls) => parse_peer_mtls(&mtls)?,
        };
        mode.get_or_insert(parsed);
    }
    Ok(mode)
}

fn parse_peer_mtls(node: &Node<'_>) -> Res<MtlsMode> {
    let f = node.fields(&["mode", "allowTls", "allow_tls"])?;
    // `allowTls` was Istio 1.1's older spelling of PERMISSIVE.
    let allow_tls = flag(&f, "allowTls", "allow_tls")?;
    Ok(match f.get("mode") {
        None if allow_tls => MtlsMode::Permissive,
        None => MtlsMode::Strict,
        Some(mode) => match mode.string()? {
            "STRICT" => MtlsMode::Strict,
            "PERMISSIVE" => MtlsMode::Permissive,
            other => {
                return mode.fail(Problem::UnknownValue {
                    what: "v1alpha1 mTLS mode",
                    value: other.to_owned(),
                    expected: &["STRICT", "PERMISSIVE"],
                });
            }
        },
    })
}

fn parse_jwt(node: &Node<'_>) -> Res<Origin> {
    let f = node.fields(&[
        "issuer",
        "audiences",
        "jwksUri",
        "jwks_uri",
        "jwks",
        "jwtHeaders",
        "jwt_headers",
        "jwtParams",
        "jwt_params",
        "triggerRules",
        "trigger_rules",
    ])?;
    let issuer = f.require("issuer")?.string()?.to_owned();
    let keys = jwt_keys(f.get("jwks"), either(&f, "jwksUri", "jwks_uri")?)?;
    let from_headers = strings(&f, "jwtHeaders", "jwt_headers")?
        .into_iter()
        .map(|name| JwtHeader { name, prefix: None })
        .collect();
    let mut triggers = Vec::new();
    if let Some(list) = either(&f, "triggerRules", "trigger_rules")? {
        for item in list.items()? {
            let t = item.fields(&[
                "excludedPaths",
                "excluded_paths",
                "includedPaths",
                "included_paths",
            ])?;
            triggers.push(Trigger {
                excluded: paths(&t, "excludedPaths", "excluded_paths")?,
                included: paths(&t, "includedPaths", "included_paths")?,
            });
        }
    }
    Ok(Origin {
        rule: JwtRule {
            issuer,
            audiences: string_list(&f, "audiences")?,
            keys,
            from_headers,
            from_params: strings(&f, "jwtParams", "jwt_params")?,
            from_cookies: Vec::new(),
            // Istio 1.1's origin authentication passed the token on to the application.
            forward_original_token: true,
            output_payload_to_header: None,
            output_claim_to_headers: Vec::new(),
        },
        triggers,
    })
}

fn paths(f: &Fields<'_, '_>, camel: &str, snake: &str) -> Res<Vec<StringMatch>> {
    let Some(list) = either(f, camel, snake)? else {
        return Ok(Vec::new());
    };
    list.items()?.iter().map(path_match).collect()
}

/// One v1alpha1 `StringMatch` as a v1beta1 path match.
fn path_match(node: &Node<'_>) -> Res<StringMatch> {
    let f = node.fields(&["exact", "prefix", "suffix", "regex"])?;
    let mut set = ["exact", "prefix", "suffix", "regex"]
        .into_iter()
        .filter_map(|key| f.get(key).map(|n| (key, n)));
    let Some((key, value)) = set.next() else {
        return node.fail(Problem::NoFields);
    };
    if let Some((_, second)) = set.next() {
        return second.fail(Problem::Conflict(
            "a path match is one of exact, prefix, suffix or regex",
        ));
    }
    let text = value.string()?;
    let matched = match key {
        "exact" => StringMatch::Exact(text.to_owned()),
        "prefix" => StringMatch::Prefix(text.to_owned()),
        "suffix" => StringMatch::Suffix(text.to_owned()),
        _ => match regex_as_match(text) {
            Some(matched) => matched,
            None => return value.fail(Problem::RegexPath(text.to_owned())),
        },
    };
    // The v1beta1 form writes prefix and suffix with a '*', so a literal one would
    // change meaning when shown as v1beta1 YAML.
    if text.contains('*') && key != "regex" {
        return value.fail(Problem::StarInPath(text.to_owned()));
    }
    Ok(matched)
}

/// The regexes that are plain string matches, converted without compiling anything:
/// Envoy matched a path regex against the whole path, so a literal is an exact match,
/// `literal.*` a prefix and `.*literal` a suffix. Anything else is refused (`None`).
fn regex_as_match(regex: &str) -> Option<StringMatch> {
    const META: &[char] = &[
        '\\', '^', '$', '.', '|', '?', '*', '+', '(', ')', '[', ']', '{', '}',
    ];
    let literal = |s: &str| (!s.is_empty() && !s.contains(META)).then(|| s.to_owned());
    if let Some(body) = regex.strip_suffix(".*") {
        return literal(body).map(StringMatch::Prefix);
    }
    if let Some(body) = regex.strip_prefix(".*") {
        return literal(body).map(StringMatch::Suffix);
    }
    literal(regex).map(StringMatch::Exact)
}

/// One place the converted objects apply: the policy's namespace (no selector) or the
/// workloads of one target Service, optionally only some of their ports.
struct Scope {
    name: String,
    selector: Option<Selector>,
    /// Workload ports; empty means every port.
    ports: Vec<u16>,
}

/// Converts `policy` into v1beta1 objects, resolving `targets` through `snapshot`'s
/// Services; a `MeshPolicy` becomes objects of `root_namespace`.
///
/// Per scope (the namespace, or each target Service's selector):
/// - a `PeerAuthentication` always, because in Istio 1.1 the narrowest policy replaced
///   the wider ones entirely: no `peers` means mTLS is not required, which is
///   PERMISSIVE (not DISABLE, as in Istio's migration: a client that does speak mTLS
///   must still get in). `peerIsOptional` also makes STRICT PERMISSIVE. Target ports
///   become `portLevelMtls`, the other ports inheriting, as they did in Istio 1.1.
/// - with `origins`, a `RequestAuthentication` holding one JWT rule per origin;
/// - unless `originIsOptional`, the DENY policy of [`token_requirement`].
pub fn convert(
    policy: &LegacyPolicy,
    snapshot: &Snapshot,
    root_namespace: &str,
) -> Result<Vec<PolicyObject>, PolicyError> {
    let namespace = match policy.kind {
        LegacyKind::Policy => policy.meta.namespace.as_str(),
        LegacyKind::MeshPolicy => root_namespace,
    };
    let scopes = if policy.targets.is_empty() {
        vec![Scope {
            name: policy.meta.name.clone(),
            selector: None,
            ports: Vec::new(),
        }]
    } else {
        policy
            .targets
            .iter()
            .enumerate()
            .map(|(i, target)| resolve_target(policy, namespace, i, target, snapshot))
            .collect::<Result<_, _>>()?
    };
    let mut mode = policy.peer_mode.unwrap_or(MtlsMode::Permissive);
    if policy.peer_is_optional {
        mode = MtlsMode::Permissive;
    }
    let object = |scope: &Scope, requires_token, spec| PolicyObject {
        meta: PolicyMeta {
            namespace: namespace.to_owned(),
            name: scope.name.clone(),
            converted_from: Some(ConvertedFrom {
                kind: policy.kind,
                object: policy.label(),
                requires_token,
            }),
            ..policy.meta.clone()
        },
        spec,
    };
    let mut objects = Vec::new();
    for scope in &scopes {
        let (top, port_level) = if scope.ports.is_empty() {
            (Some(mode), BTreeMap::new())
        } else {
            (None, scope.ports.iter().map(|p| (*p, Some(mode))).collect())
        };
        objects.push(object(
            scope,
            false,
            PolicySpec::PeerAuthentication(PeerAuthentication {
                selector: scope.selector.clone(),
                mode: top,
                port_level,
            }),
        ));
        if policy.origins.is_empty() {
            continue;
        }
        objects.push(object(
            scope,
            false,
            PolicySpec::RequestAuthentication(RequestAuthentication {
                selector: scope.selector.clone(),
                jwt_rules: policy.origins.iter().map(|o| o.rule.clone()).collect(),
            }),
        ));
        if !policy.origin_is_optional {
            objects.push(object(
                scope,
                true,
                PolicySpec::AuthorizationPolicy(token_requirement(policy, scope)),
            ));
        }
    }
    Ok(objects)
}

/// "A valid token is required on the paths where an origin is triggered" as a DENY
/// policy: deny requests without a request principal (`notRequestPrincipals: ["*"]`)
/// whose path triggers an origin (`paths` for `includedPaths`, `notPaths` for
/// `excludedPaths`, `ports` for target ports).
///
/// DENY, not ALLOW: an ALLOW policy would switch the workload to "deny unless a rule
/// matches", shutting out every request the user's own ALLOW policies (or none) let in;
/// a DENY only removes the token-less requests on trigger paths and composes with
/// whatever else applies. An invalid token never gets here (RequestAuthentication
/// rejects it with 401), and a denial by this policy is also answered with 401
/// ([`ConvertedFrom::requires_token`]), as Istio 1.1 answered a missing token.
///
/// One rule per origin trigger rule, so the rules' OR is Istio 1.1's "any origin
/// triggered"; an origin without trigger rules is triggered everywhere, which is a rule
/// without paths. On an opaque TCP port the rule keeps only its L4 part and denies,
/// as Istio's own converted policy did: fail closed.
fn token_requirement(policy: &LegacyPolicy, scope: &Scope) -> AuthorizationPolicy {
    let from = vec![Source {
        request_principals: Clause {
            any: Vec::new(),
            not: vec![StringMatch::Presence],
        },
        ..Source::default()
    }];
    let rule = |included: &[StringMatch], excluded: &[StringMatch]| {
        let operation = Operation {
            ports: Clause {
                any: scope.ports.clone(),
                not: Vec::new(),
            },
            paths: Clause {
                any: included.to_vec(),
                not: excluded.to_vec(),
            },
            ..Operation::default()
        };
        Rule {
            from: from.clone(),
            to: if operation == Operation::default() {
                Vec::new()
            } else {
                vec![operation]
            },
            when: Vec::new(),
        }
    };
    let mut rules = Vec::new();
    for origin in &policy.origins {
        if origin.triggers.is_empty() {
            rules.push(rule(&[], &[]));
        }
        for trigger in &origin.triggers {
            rules.push(rule(&trigger.included, &trigger.excluded));
        }
    }
    rules.dedup();
    AuthorizationPolicy {
        selector: scope.selector.clone(),
        action: Action::Deny,
        provider: None,
        rules,
    }
}

/// The workloads and ports of `targets[index]`: the Service's selector, and each port
/// resolved through the Service's ports to its target port.
fn resolve_target(
    policy: &LegacyPolicy,
    namespace: &str,
    index: usize,
    target: &Target,
    snapshot: &Snapshot,
) -> Result<Scope, PolicyError> {
    let fail = |path: String, problem| PolicyError {
        kind: kind_name(policy.kind),
        object: policy.label(),
        path,
        problem: Box::new(problem),
    };
    let key = format!("{namespace}/{}", target.name);
    let name_path = || format!("spec.targets[{index}].name");
    let Some(service) = snapshot.services.get(&key) else {
        return Err(fail(name_path(), Problem::UnknownService(key)));
    };
    if service.selector.is_empty() {
        return Err(fail(name_path(), Problem::ServiceWithoutSelector(key)));
    }
    let mut ports = Vec::new();
    for (j, selector) in target.ports.iter().enumerate() {
        let port = service.ports.iter().find(|p| match selector {
            PortSelector::Number(n) => p.port == *n,
            PortSelector::Name(name) => p.name.as_deref() == Some(name.as_str()),
        });
        let resolved = match (selector, port) {
            (_, Some(port)) => match &port.target_port {
                None => port.port,
                Some(TargetPort::Number(n)) => *n,
                Some(TargetPort::Name(name)) => {
                    return Err(fail(
                        format!("spec.targets[{index}].ports[{j}]"),
                        Problem::NamedTargetPort {
                            service: key,
                            port: name.clone(),
                        },
                    ));
                }
            },
            // A number that is no port of the Service still names a port: it is kept as
            // the workload port, so what the user asked to protect stays protected.
            (PortSelector::Number(n), None) => *n,
            (PortSelector::Name(name), None) => {
                return Err(fail(
                    format!("spec.targets[{index}].ports[{j}].name"),
                    Problem::UnknownServicePort {
                        service: key,
                        port: name.clone(),
                    },
                ));
            }
        };
        if !ports.contains(&resolved) {
            ports.push(resolved);
        }
    }
    Ok(Scope {
        name: format!("{}-{}", policy.meta.name, target.name),
        selector: Some(Selector {
            match_labels: service.selector.clone(),
        }),
        ports,
    })
}
