//! The converted objects of a snapshot as `security.istio.io/v1beta1` YAML, for people
//! checking what ambit made of their Istio 1.1 policies (`ambit explain --show-converted`).
//! Renders the fields conversion produces; it is not a general v1beta1 serializer.

use serde_yaml::{Mapping, Value};

use crate::{
    discovery::Snapshot,
    policy::{
        PolicySpec,
        model::{
            AuthorizationPolicy, Clause, JwtKeys, MtlsMode, PeerAuthentication,
            RequestAuthentication, Selector, StringMatch,
        },
    },
};

/// The converted objects of `snapshot` (those with [`PolicyMeta::converted_from`]) as
/// multi-document `security.istio.io/v1beta1` YAML, each annotated with the object it
/// came from. Renders the fields conversion produces.
pub fn converted_yaml(snapshot: &Snapshot) -> String {
    let documents: Vec<String> = snapshot
        .policies
        .iter()
        .filter_map(|object| {
            let from = object.meta.converted_from.as_ref()?;
            let (kind, spec) = match &object.spec {
                PolicySpec::PeerAuthentication(p) => ("PeerAuthentication", render_peer(p)),
                PolicySpec::RequestAuthentication(r) => {
                    ("RequestAuthentication", render_request(r))
                }
                PolicySpec::AuthorizationPolicy(a) => ("AuthorizationPolicy", render_authz(a)),
            };
            let mut metadata = map([
                ("name", object.meta.name.as_str().into()),
                ("namespace", object.meta.namespace.as_str().into()),
            ]);
            metadata.insert(
                "annotations".into(),
                Value::Mapping(map([(CONVERTED_FROM_ANNOTATION, from.to_string().into())])),
            );
            let doc = map([
                ("apiVersion", "security.istio.io/v1beta1".into()),
                ("kind", kind.into()),
                ("metadata", Value::Mapping(metadata)),
                ("spec", Value::Mapping(spec)),
            ]);
            // A mapping of strings, lists and mappings always serializes.
            serde_yaml::to_string(&doc).ok()
        })
        .collect();
    documents.join("---\n")
}

/// The annotation on rendered objects naming their v1alpha1 source.
pub const CONVERTED_FROM_ANNOTATION: &str = "ambit.io/converted-from";

fn map<const N: usize>(entries: [(&str, Value); N]) -> Mapping {
    entries
        .into_iter()
        .map(|(k, v)| (Value::from(k), v))
        .collect()
}

fn selector_entry(spec: &mut Mapping, selector: &Option<Selector>) {
    if let Some(selector) = selector {
        let labels = selector
            .match_labels
            .iter()
            .map(|(k, v)| (Value::from(k.as_str()), Value::from(v.as_str())))
            .collect();
        spec.insert(
            "selector".into(),
            Value::Mapping(map([("matchLabels", Value::Mapping(labels))])),
        );
    }
}

fn mode_value(mode: Option<MtlsMode>) -> Value {
    Value::Mapping(map([(
        "mode",
        mode.map_or("UNSET".to_owned(), |m| m.to_string()).into(),
    )]))
}

fn render_peer(p: &PeerAuthentication) -> Mapping {
    let mut spec = Mapping::new();
    selector_entry(&mut spec, &p.selector);
    if p.mode.is_some() {
        spec.insert("mtls".into(), mode_value(p.mode));
    }
    if !p.port_level.is_empty() {
        let ports = p
            .port_level
            .iter()
            .map(|(port, mode)| (Value::from(*port), mode_value(*mode)))
            .collect();
        spec.insert("portLevelMtls".into(), Value::Mapping(ports));
    }
    spec
}

fn strings_value<T: AsRef<str>>(items: &[T]) -> Value {
    Value::Sequence(items.iter().map(|s| s.as_ref().into()).collect())
}

fn render_request(r: &RequestAuthentication) -> Mapping {
    let mut spec = Mapping::new();
    selector_entry(&mut spec, &r.selector);
    let rules = r
        .jwt_rules
        .iter()
        .map(|rule| {
            let mut m = map([("issuer", rule.issuer.as_str().into())]);
            if !rule.audiences.is_empty() {
                m.insert("audiences".into(), strings_value(&rule.audiences));
            }
            match &rule.keys {
                JwtKeys::Uri(uri) => {
                    m.insert("jwksUri".into(), uri.as_str().into());
                }
                JwtKeys::Inline(set) => {
                    let text = serde_json::to_string(set).unwrap_or_default();
                    m.insert("jwks".into(), text.into());
                }
                JwtKeys::Discovery => {}
            }
            if !rule.from_headers.is_empty() {
                let headers = rule
                    .from_headers
                    .iter()
                    .map(|h| Value::Mapping(map([("name", h.name.as_str().into())])))
                    .collect();
                m.insert("fromHeaders".into(), Value::Sequence(headers));
            }
            if !rule.from_params.is_empty() {
                m.insert("fromParams".into(), strings_value(&rule.from_params));
            }
            m.insert(
                "forwardOriginalToken".into(),
                rule.forward_original_token.into(),
            );
            Value::Mapping(m)
        })
        .collect();
    spec.insert("jwtRules".into(), Value::Sequence(rules));
    spec
}

fn match_text(m: &StringMatch) -> String {
    match m {
        StringMatch::Exact(s) => s.clone(),
        StringMatch::Prefix(s) => format!("{s}*"),
        StringMatch::Suffix(s) => format!("*{s}"),
        StringMatch::Presence => "*".to_owned(),
    }
}

/// `key`/`notKey` of a clause, when set.
fn clause_entries<T>(
    m: &mut Mapping,
    c: &Clause<T>,
    key: &str,
    not_key: &str,
    text: fn(&T) -> String,
) {
    for (k, items) in [(key, &c.any), (not_key, &c.not)] {
        if !items.is_empty() {
            let items: Vec<String> = items.iter().map(text).collect();
            m.insert(k.into(), strings_value(&items));
        }
    }
}

fn render_authz(a: &AuthorizationPolicy) -> Mapping {
    let mut spec = Mapping::new();
    selector_entry(&mut spec, &a.selector);
    spec.insert("action".into(), a.action.to_string().into());
    let rules = a
        .rules
        .iter()
        .map(|rule| {
            let mut r = Mapping::new();
            let from: Vec<Value> = rule
                .from
                .iter()
                .map(|s| {
                    let mut m = Mapping::new();
                    let c = &s.request_principals;
                    clause_entries(
                        &mut m,
                        c,
                        "requestPrincipals",
                        "notRequestPrincipals",
                        match_text,
                    );
                    Value::Mapping(map([("source", Value::Mapping(m))]))
                })
                .collect();
            let to: Vec<Value> = rule
                .to
                .iter()
                .map(|o| {
                    let mut m = Mapping::new();
                    clause_entries(&mut m, &o.ports, "ports", "notPorts", u16::to_string);
                    clause_entries(&mut m, &o.paths, "paths", "notPaths", match_text);
                    Value::Mapping(map([("operation", Value::Mapping(m))]))
                })
                .collect();
            for (key, list) in [("from", from), ("to", to)] {
                if !list.is_empty() {
                    r.insert(key.into(), Value::Sequence(list));
                }
            }
            Value::Mapping(r)
        })
        .collect();
    spec.insert("rules".into(), Value::Sequence(rules));
    spec
}
