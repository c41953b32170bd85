//! Parsing and validation of `security.istio.io/v1` and `v1beta1` objects into
//! [`super::model`]. Strict like Istio's validation webhook: unknown fields, wrong types,
//! empty strings and malformed values are rejected, each with the object
//! (`namespace/name`) and the field path. The object's semantics (scopes, precedence)
//! are not checked here; [`super::resolve`] owns them.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use super::{
    PolicyObject, PolicySpec,
    model::{
        Action, AuthorizationPolicy, ClaimToHeader, Clause, Condition, ConditionKey,
        ConditionValues, JwtHeader, JwtKeys, JwtRule, MtlsMode, Operation, PeerAuthentication,
        PolicyMeta, RequestAuthentication, Rule, Selector, Source, StringMatch,
    },
    walk::{Fields, Node, Res},
};

/// The annotation that turns a policy into a dry run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// A policy object that failed validation. Its message names the kind, the object
/// (`namespace/name`) and the field path; the files source adds file and document.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {object}: {path}: {problem}")]
pub struct PolicyError {
    pub kind: &'static str,
    /// `namespace/name`, or `<unnamed>` when `metadata.name` itself is the problem.
    pub object: String,
    pub path: String,
    /// Boxed to keep `Result`s of the loader small.
    pub problem: Box<Problem>,
}

/// What is wrong with a field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("unknown field (known: {})", allowed.join(", "))]
    UnknownField { allowed: &'static [&'static str] },
    #[error("expected {expected}, found {found}")]
    WrongType {
        expected: &'static str,
        found: &'static str,
    },
    #[error("is required")]
    Missing,
    #[error("must not be empty")]
    Empty,
    #[error("must set at least one field")]
    NoFields,
    #[error("{0:?} is not a valid CIDR")]
    InvalidCidr(String),
    #[error("{0:?} is not a valid port (0-65535)")]
    InvalidPort(String),
    #[error("{0:?} is not a valid port for portLevelMtls (1-65535)")]
    InvalidMtlsPort(String),
    #[error("{0:?} has a '*' in the middle; only a leading or trailing '*' is supported")]
    WildcardInMiddle(String),
    #[error("{0:?}: path templates ({{*}}, {{**}}) are not supported")]
    PathTemplate(String),
    #[error("{value:?} is not a valid {what} (expected one of: {})", expected.join(", "))]
    UnknownValue {
        what: &'static str,
        value: String,
        expected: &'static [&'static str],
    },
    #[error("{0:?} is not a supported condition key (see Istio's Authorization Policy Conditions)")]
    UnknownConditionKey(String),
    #[error("{0} is not supported by ambit")]
    Unsupported(&'static str),
    #[error("{0}")]
    Conflict(&'static str),
    #[error("is not a valid JWKS: {0}")]
    InvalidJwks(String),
    #[error("{0:?} is not an http:// or https:// URL with a host")]
    InvalidJwksUri(String),
    #[error("{0:?} is not a valid HTTP header name")]
    InvalidHeaderName(String),
    #[error(
        "{0:?}: regex path matching is refused (ambit never compiles a regex from configuration); \
         only a literal path, `literal.*` or `.*literal` converts"
    )]
    RegexPath(String),
    #[error("{0:?} contains '*', which a v1beta1 path cannot express literally")]
    StarInPath(String),
    #[error("names service {0}, which does not exist")]
    UnknownService(String),
    #[error("names service {0}, which has no selector, so it selects no workload")]
    ServiceWithoutSelector(String),
    #[error("names port {port:?}, which service {service} does not have")]
    UnknownServicePort { service: String, port: String },
    #[error(
        "names a port of service {service} whose targetPort is the container port name {port:?}, \
         which ambit cannot resolve; use a numeric targetPort"
    )]
    NamedTargetPort { service: String, port: String },
}

impl PolicyObject {
    /// Parses one document of a policy kind. `kind` is the document's `kind`, already read
    /// by the caller; `apiVersion` is checked here.
    pub fn from_yaml(kind: &str, doc: serde_yaml::Value) -> Result<PolicyObject, PolicyError> {
        let root = Node {
            value: &doc,
            path: String::new(),
        };
        let kind_name = match kind {
            "PeerAuthentication" => "PeerAuthentication",
            "RequestAuthentication" => "RequestAuthentication",
            "AuthorizationPolicy" => "AuthorizationPolicy",
            _ => "policy",
        };
        // Name the object in every message, even when metadata itself is the problem.
        let label = match doc["metadata"]["name"].as_str() {
            Some(name) => {
                let namespace = doc["metadata"]["namespace"].as_str().unwrap_or("default");
                format!("{namespace}/{name}")
            }
            None => "<unnamed>".to_owned(),
        };
        let parsed = root
            .fields(&["apiVersion", "kind", "metadata", "spec", "status"])
            .and_then(|fields| {
                let meta = parse_meta(&fields)?;
                let spec = parse_body(kind, &fields)?;
                Ok(PolicyObject { meta, spec })
            });
        parsed.map_err(|e| PolicyError {
            kind: kind_name,
            object: label,
            path: e.path,
            problem: Box::new(e.problem),
        })
    }
}

fn parse_body(kind: &str, fields: &Fields<'_, '_>) -> Res<PolicySpec> {
    let api_version = fields.require("apiVersion")?;
    let version = api_version.string()?;
    if !API_VERSIONS.contains(&version) {
        return api_version.fail(Problem::UnknownValue {
            what: "apiVersion",
            value: version.to_owned(),
            expected: &API_VERSIONS,
        });
    }
    let spec = fields.get("spec");
    let empty = serde_yaml::Value::Mapping(Default::default());
    let spec = spec.unwrap_or(Node {
        value: &empty,
        path: "spec".into(),
    });
    Ok(match kind {
        "PeerAuthentication" => PolicySpec::PeerAuthentication(parse_peer(&spec)?),
        "RequestAuthentication" => PolicySpec::RequestAuthentication(parse_request(&spec)?),
        "AuthorizationPolicy" => PolicySpec::AuthorizationPolicy(parse_authz(&spec)?),
        _ => {
            return Node {
                value: &empty,
                path: "kind".into(),
            }
            .fail(Problem::UnknownValue {
                what: "policy kind",
                value: kind.to_owned(),
                expected: &[
                    "PeerAuthentication",
                    "RequestAuthentication",
                    "AuthorizationPolicy",
                ],
            });
        }
    })
}

pub(super) fn parse_meta(fields: &Fields<'_, '_>) -> Res<PolicyMeta> {
    let metadata = fields.require("metadata")?;
    let meta = metadata.open_fields()?;
    let name = meta.require("name")?.string()?.to_owned();
    let namespace = match meta.get("namespace") {
        Some(ns) => ns.string()?.to_owned(),
        None => "default".to_owned(),
    };
    let creation_timestamp = match meta.get("creationTimestamp") {
        Some(ts) => Some(ts.string()?.to_owned()),
        None => None,
    };
    let mut dry_run = false;
    if let Some(annotations) = meta.get("annotations") {
        for (key, value) in annotations.entries()? {
            if key.as_str() == Some(DRY_RUN_ANNOTATION) {
                dry_run = match value.string()? {
                    "true" => true,
                    "false" => false,
                    other => {
                        return value.fail(Problem::UnknownValue {
                            what: "dry-run flag",
                            value: other.to_owned(),
                            expected: &["true", "false"],
                        });
                    }
                };
            }
        }
    }
    Ok(PolicyMeta {
        namespace,
        name,
        creation_timestamp,
        dry_run,
        converted_from: None,
    })
}

fn reject_target_refs(spec: &Fields<'_, '_>) -> Res<()> {
    for key in ["targetRef", "targetRefs"] {
        if let Some(node) = spec.get(key) {
            return node.fail(Problem::Unsupported(
                "targetRef/targetRefs (gateway and waypoint attachment)",
            ));
        }
    }
    Ok(())
}

fn parse_selector(spec: &Fields<'_, '_>) -> Res<Option<Selector>> {
    let Some(selector) = spec.get("selector") else {
        return Ok(None);
    };
    let fields = selector.fields(&["matchLabels"])?;
    let Some(labels) = fields.get("matchLabels") else {
        return Ok(None);
    };
    let mut match_labels = BTreeMap::new();
    for (key, value) in labels.entries()? {
        let Some(key) = key.as_str().filter(|k| !k.is_empty()) else {
            return value.fail(Problem::Empty);
        };
        let serde_yaml::Value::String(value) = value.value else {
            return value.fail(Problem::WrongType {
                expected: "a string",
                found: "another type",
            });
        };
        match_labels.insert(key.to_owned(), value.clone());
    }
    Ok((!match_labels.is_empty()).then_some(Selector { match_labels }))
}

const MTLS_MODES: [&str; 4] = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];

fn parse_mtls(node: &Node<'_>) -> Res<Option<MtlsMode>> {
    let fields = node.fields(&["mode"])?;
    let Some(mode) = fields.get("mode") else {
        return Ok(None);
    };
    Ok(match mode.string()? {
        "UNSET" => None,
        "DISABLE" => Some(MtlsMode::Disable),
        "PERMISSIVE" => Some(MtlsMode::Permissive),
        "STRICT" => Some(MtlsMode::Strict),
        other => {
            return mode.fail(Problem::UnknownValue {
                what: "mTLS mode",
                value: other.to_owned(),
                expected: &MTLS_MODES,
            });
        }
    })
}

fn parse_peer(spec: &Node<'_>) -> Res<PeerAuthentication> {
    let fields = spec.fields(&[
        "selector",
        "mtls",
        "portLevelMtls",
        "targetRef",
        "targetRefs",
    ])?;
    reject_target_refs(&fields)?;
    let selector = parse_selector(&fields)?;
    let mode = match fields.get("mtls") {
        Some(mtls) => parse_mtls(&mtls)?,
        None => None,
    };
    let mut port_level = BTreeMap::new();
    if let Some(ports) = fields.get("portLevelMtls") {
        if selector.is_none() {
            return ports.fail(Problem::Conflict(
                "portLevelMtls requires spec.selector: Istio applies port-level mTLS only to workload policies",
            ));
        }
        for (key, value) in ports.entries()? {
            let text = match key {
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::String(s) => s.clone(),
                _ => String::new(),
            };
            let port = match text.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return value.fail(Problem::InvalidMtlsPort(text)),
            };
            port_level.insert(port, parse_mtls(&value)?);
        }
    }
    Ok(PeerAuthentication {
        selector,
        mode,
        port_level,
    })
}

fn parse_request(spec: &Node<'_>) -> Res<RequestAuthentication> {
    let fields = spec.fields(&["selector", "jwtRules", "targetRef", "targetRefs"])?;
    reject_target_refs(&fields)?;
    let selector = parse_selector(&fields)?;
    let mut jwt_rules = Vec::new();
    if let Some(rules) = fields.get("jwtRules") {
        for rule in rules.items()? {
            jwt_rules.push(parse_jwt_rule(&rule)?);
        }
    }
    Ok(RequestAuthentication {
        selector,
        jwt_rules,
    })
}

fn parse_jwt_rule(node: &Node<'_>) -> Res<JwtRule> {
    let fields = node.fields(&[
        "issuer",
        "audiences",
        "jwks",
        "jwksUri",
        "fromHeaders",
        "fromParams",
        "fromCookies",
        "forwardOriginalToken",
        "outputPayloadToHeader",
        "outputClaimToHeaders",
        "timeout",
    ])?;
    let issuer = fields.require("issuer")?.string()?.to_owned();
    let keys = jwt_keys(fields.get("jwks"), fields.get("jwksUri"))?;
    let mut from_headers = Vec::new();
    if let Some(headers) = fields.get("fromHeaders") {
        for header in headers.items()? {
            let f = header.fields(&["name", "prefix"])?;
            from_headers.push(JwtHeader {
                name: header_name(&f.require("name")?)?,
                prefix: optional_string(&f, "prefix")?,
            });
        }
    }
    let mut output_claim_to_headers = Vec::new();
    if let Some(list) = fields.get("outputClaimToHeaders") {
        for item in list.items()? {
            let f = item.fields(&["header", "claim"])?;
            output_claim_to_headers.push(ClaimToHeader {
                header: f.require("header")?.string()?.to_owned(),
                claim: f.require("claim")?.string()?.to_owned(),
            });
        }
    }
    if let Some(timeout) = fields.get("timeout") {
        // Only meaningful with jwksUri fetching; checked so a typo'd type is caught.
        timeout.string()?;
    }
    Ok(JwtRule {
        issuer,
        audiences: string_list(&fields, "audiences")?,
        keys,
        from_headers,
        from_params: string_list(&fields, "fromParams")?,
        from_cookies: string_list(&fields, "fromCookies")?,
        forward_original_token: match fields.get("forwardOriginalToken") {
            Some(b) => b.boolean()?,
            None => false,
        },
        output_payload_to_header: fields
            .get("outputPayloadToHeader")
            .map(|n| header_name(&n))
            .transpose()?,
        output_claim_to_headers,
    })
}

/// Parsed here so that the data path can name these headers without a fallible step.
fn header_name(node: &Node<'_>) -> Res<String> {
    let text = node.string()?;
    match http::HeaderName::from_bytes(text.as_bytes()) {
        Ok(_) => Ok(text.to_owned()),
        Err(_) => node.fail(Problem::InvalidHeaderName(text.to_owned())),
    }
}

fn is_fetchable_uri(text: &str) -> bool {
    text.parse::<http::Uri>()
        .is_ok_and(|uri| matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some())
}

/// The keys of a JWT rule from its `jwks` and `jwksUri` fields.
pub(super) fn jwt_keys(jwks: Option<Node<'_>>, uri: Option<Node<'_>>) -> Res<JwtKeys> {
    Ok(match (jwks, uri) {
        (Some(_), Some(uri)) => {
            return uri.fail(Problem::Conflict("jwks and jwksUri are mutually exclusive"));
        }
        (Some(jwks), None) => {
            let text = jwks.string()?;
            match serde_json::from_str(text) {
                Ok(set) => JwtKeys::Inline(set),
                Err(e) => return jwks.fail(Problem::InvalidJwks(e.to_string())),
            }
        }
        (None, Some(uri)) => {
            let text = uri.string()?;
            if !is_fetchable_uri(text) {
                return uri.fail(Problem::InvalidJwksUri(text.to_owned()));
            }
            JwtKeys::Uri(text.to_owned())
        }
        (None, None) => JwtKeys::Discovery,
    })
}

pub(super) fn optional_string(fields: &Fields<'_, '_>, key: &str) -> Res<Option<String>> {
    fields
        .get(key)
        .map(|n| n.string().map(str::to_owned))
        .transpose()
}

pub(super) fn string_list(fields: &Fields<'_, '_>, key: &str) -> Res<Vec<String>> {
    let Some(list) = fields.get(key) else {
        return Ok(Vec::new());
    };
    list.items()?
        .iter()
        .map(|item| item.string().map(str::to_owned))
        .collect()
}

const ACTIONS: [&str; 4] = ["ALLOW", "DENY", "AUDIT", "CUSTOM"];

fn parse_authz(spec: &Node<'_>) -> Res<AuthorizationPolicy> {
    let fields = spec.fields(&[
        "selector",
        "action",
        "provider",
        "rules",
        "targetRef",
        "targetRefs",
    ])?;
    reject_target_refs(&fields)?;
    let selector = parse_selector(&fields)?;
    let action = match fields.get("action") {
        None => Action::Allow,
        Some(node) => match node.string()? {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            "CUSTOM" => Action::Custom,
            other => {
                return node.fail(Problem::UnknownValue {
                    what: "action",
                    value: other.to_owned(),
                    expected: &ACTIONS,
                });
            }
        },
    };
    let provider = match fields.get("provider") {
        Some(node) => {
            if action != Action::Custom {
                return node.fail(Problem::Conflict(
                    "provider is only valid with action CUSTOM",
                ));
            }
            let f = node.fields(&["name"])?;
            Some(f.require("name")?.string()?.to_owned())
        }
        None if action == Action::Custom => return Err(fields.missing("provider")),
        None => None,
    };
    let mut rules = Vec::new();
    if let Some(list) = fields.get("rules") {
        for rule in list.items()? {
            rules.push(parse_rule(&rule)?);
        }
    }
    Ok(AuthorizationPolicy {
        selector,
        action,
        provider,
        rules,
    })
}

fn parse_rule(node: &Node<'_>) -> Res<Rule> {
    let fields = node.fields(&["from", "to", "when"])?;
    let mut rule = Rule::default();
    if let Some(from) = fields.get("from") {
        for item in from.items()? {
            let f = item.fields(&["source"])?;
            rule.from.push(parse_source(&f.require("source")?)?);
        }
    }
    if let Some(to) = fields.get("to") {
        for item in to.items()? {
            let f = item.fields(&["operation"])?;
            rule.to.push(parse_operation(&f.require("operation")?)?);
        }
    }
    if let Some(when) = fields.get("when") {
        for item in when.items()? {
            rule.when.push(parse_condition(&item)?);
        }
    }
    Ok(rule)
}

fn parse_source(node: &Node<'_>) -> Res<Source> {
    let f = node.fields(&[
        "principals",
        "notPrincipals",
        "requestPrincipals",
        "notRequestPrincipals",
        "namespaces",
        "notNamespaces",
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
    ])?;
    let source = Source {
        principals: clause(&f, "principals", "notPrincipals", string_match)?,
        request_principals: clause(
            &f,
            "requestPrincipals",
            "notRequestPrincipals",
            string_match,
        )?,
        namespaces: clause(&f, "namespaces", "notNamespaces", string_match)?,
        ip_blocks: clause(&f, "ipBlocks", "notIpBlocks", cidr)?,
        remote_ip_blocks: clause(&f, "remoteIpBlocks", "notRemoteIpBlocks", cidr)?,
    };
    if source == Source::default() {
        return node.fail(Problem::NoFields);
    }
    Ok(source)
}

fn parse_operation(node: &Node<'_>) -> Res<Operation> {
    let f = node.fields(&[
        "hosts",
        "notHosts",
        "ports",
        "notPorts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
    ])?;
    let operation = Operation {
        hosts: clause(&f, "hosts", "notHosts", string_match)?,
        ports: clause(&f, "ports", "notPorts", port)?,
        methods: clause(&f, "methods", "notMethods", string_match)?,
        paths: clause(&f, "paths", "notPaths", path_match)?,
    };
    if operation == Operation::default() {
        return node.fail(Problem::NoFields);
    }
    Ok(operation)
}

fn parse_condition(node: &Node<'_>) -> Res<Condition> {
    let f = node.fields(&["key", "values", "notValues"])?;
    let key_node = f.require("key")?;
    let text = key_node.string()?;
    let key = match condition_key(text) {
        Ok(key) => key,
        Err(problem) => return key_node.fail(problem),
    };
    let values = match key {
        ConditionKey::SourceIp | ConditionKey::RemoteIp | ConditionKey::DestinationIp => {
            ConditionValues::Ips(clause(&f, "values", "notValues", cidr)?)
        }
        ConditionKey::DestinationPort => {
            ConditionValues::Ports(clause(&f, "values", "notValues", port)?)
        }
        _ => ConditionValues::Strings(clause(&f, "values", "notValues", string_match)?),
    };
    let empty = match &values {
        ConditionValues::Ips(c) => c.is_empty(),
        ConditionValues::Ports(c) => c.is_empty(),
        ConditionValues::Strings(c) => c.is_empty(),
    };
    if empty {
        return node.fail(Problem::Conflict("a condition needs values or notValues"));
    }
    Ok(Condition { key, values })
}

fn condition_key(text: &str) -> Result<ConditionKey, Problem> {
    let unknown = || Problem::UnknownConditionKey(text.to_owned());
    Ok(match text {
        "source.ip" => ConditionKey::SourceIp,
        "remote.ip" => ConditionKey::RemoteIp,
        "source.namespace" => ConditionKey::SourceNamespace,
        "source.principal" => ConditionKey::SourcePrincipal,
        "request.auth.principal" => ConditionKey::RequestPrincipal,
        "request.auth.audiences" => ConditionKey::RequestAudiences,
        "request.auth.presenter" => ConditionKey::RequestPresenter,
        "destination.ip" => ConditionKey::DestinationIp,
        "destination.port" => ConditionKey::DestinationPort,
        "connection.sni" => ConditionKey::ConnectionSni,
        _ if text.starts_with("experimental.envoy.filters.") => {
            return Err(Problem::Unsupported(
                "the experimental.envoy.filters.* condition",
            ));
        }
        _ => {
            if let Some(rest) = text.strip_prefix("request.headers") {
                let names = bracketed(rest).ok_or_else(unknown)?;
                match <[String; 1]>::try_from(names) {
                    Ok([name]) => ConditionKey::RequestHeader(name),
                    Err(_) => return Err(unknown()),
                }
            } else if let Some(rest) = text.strip_prefix("request.auth.claims") {
                ConditionKey::RequestClaim(bracketed(rest).ok_or_else(unknown)?)
            } else {
                return Err(unknown());
            }
        }
    })
}

/// `[a][b]` → `["a", "b"]`; `None` unless at least one non-empty segment and nothing else.
fn bracketed(mut rest: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        let name = &inner[..end];
        if name.is_empty() || name.contains('[') {
            return None;
        }
        names.push(name.to_owned());
        rest = &inner[end + 1..];
    }
    (!names.is_empty()).then_some(names)
}

fn clause<T>(
    fields: &Fields<'_, '_>,
    key: &str,
    not_key: &str,
    parse: fn(&Node<'_>) -> Res<T>,
) -> Res<Clause<T>> {
    let list = |key: &str| -> Res<Vec<T>> {
        match fields.get(key) {
            None => Ok(Vec::new()),
            Some(node) => node.items()?.iter().map(parse).collect(),
        }
    };
    Ok(Clause {
        any: list(key)?,
        not: list(not_key)?,
    })
}

fn string_match(node: &Node<'_>) -> Res<StringMatch> {
    let value = node.string()?;
    if value == "*" {
        return Ok(StringMatch::Presence);
    }
    let (kind, body): (fn(String) -> StringMatch, &str) =
        if let Some(body) = value.strip_prefix('*') {
            (StringMatch::Suffix, body)
        } else if let Some(body) = value.strip_suffix('*') {
            (StringMatch::Prefix, body)
        } else {
            (StringMatch::Exact, value)
        };
    if body.contains('*') {
        return node.fail(Problem::WildcardInMiddle(value.to_owned()));
    }
    Ok(kind(body.to_owned()))
}

fn path_match(node: &Node<'_>) -> Res<StringMatch> {
    let value = node.string()?;
    if value.contains("{*}") || value.contains("{**}") {
        return node.fail(Problem::PathTemplate(value.to_owned()));
    }
    string_match(node)
}

fn cidr(node: &Node<'_>) -> Res<IpNet> {
    let value = node.string()?;
    if let Ok(net) = value.parse::<IpNet>() {
        // Host bits are allowed, as in Istio; only the network part takes part in matching.
        return Ok(net.trunc());
    }
    match value.parse::<IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip)),
        Err(_) => node.fail(Problem::InvalidCidr(value.to_owned())),
    }
}

fn port(node: &Node<'_>) -> Res<u16> {
    let value = node.string()?;
    value
        .parse::<u16>()
        .or_else(|_| node.fail(Problem::InvalidPort(value.to_owned())))
}
