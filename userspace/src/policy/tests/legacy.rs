//! Istio 1.1's authentication policies: every field in both spellings, the validation
//! messages, and the conversion into the v1beta1 model.

use crate::{
    discovery::{Snapshot, files::snapshot_of},
    policy::{
        PolicyObject, PolicySpec,
        legacy::{LegacyPolicy, Origin, PortSelector, Target, Trigger, converted_yaml},
        model::{Action, Clause, JwtHeader, JwtKeys, LegacyKind, MtlsMode, Operation, StringMatch},
    },
};

const POLICY: &str = "apiVersion: authentication.istio.io/v1alpha1\nkind: Policy\nmetadata: {name: p, namespace: foo}\n";

fn parse(yaml: &str) -> Result<LegacyPolicy, String> {
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let kind = value["kind"].as_str().unwrap().to_owned();
    LegacyPolicy::from_yaml(&kind, value).map_err(|e| e.to_string())
}

fn spec(spec: &str) -> LegacyPolicy {
    parse(&format!("{POLICY}spec:\n{spec}")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_field_parses_in_camel_case() {
    let p = spec(
        "  targets:
  - name: httpbin
    ports: [{number: 8000}, {name: http}]
  peers: [{mtls: {mode: PERMISSIVE}}]
  peerIsOptional: true
  origins:
  - jwt:
      issuer: iss
      audiences: [a, b]
      jwksUri: https://example.com/jwks.json
      jwtHeaders: [x-jwt]
      jwtParams: [token]
      triggerRules:
      - excludedPaths: [{exact: /health}, {prefix: /status/}]
        includedPaths: [{suffix: .json}]
  originIsOptional: true
  principalBinding: USE_ORIGIN
",
    );
    assert_eq!(p.kind, LegacyKind::Policy);
    assert_eq!(
        (p.meta.namespace.as_str(), p.meta.name.as_str()),
        ("foo", "p")
    );
    assert_eq!(
        p.targets,
        [Target {
            name: "httpbin".into(),
            ports: vec![
                PortSelector::Number(8000),
                PortSelector::Name("http".into())
            ],
        }]
    );
    assert_eq!(p.peer_mode, Some(MtlsMode::Permissive));
    assert!(p.peer_is_optional && p.origin_is_optional);
    let [Origin { rule, triggers }] = p.origins.as_slice() else {
        panic!("{:?}", p.origins)
    };
    assert_eq!(rule.issuer, "iss");
    assert_eq!(rule.audiences, ["a", "b"]);
    assert_eq!(
        rule.keys,
        JwtKeys::Uri("https://example.com/jwks.json".into())
    );
    assert_eq!(
        rule.from_headers,
        [JwtHeader {
            name: "x-jwt".into(),
            prefix: None
        }]
    );
    assert_eq!(rule.from_params, ["token"]);
    assert_eq!(
        triggers,
        &[Trigger {
            excluded: vec![
                StringMatch::Exact("/health".into()),
                StringMatch::Prefix("/status/".into())
            ],
            included: vec![StringMatch::Suffix(".json".into())],
        }]
    );
}

#[test]
fn snake_case_spellings_parse_the_same() {
    let camel = spec(
        "  peers: [{mtls: {allowTls: true}}]\n  peerIsOptional: true\n  originIsOptional: true\n  principalBinding: USE_PEER\n  origins:\n  - jwt: {issuer: i, jwksUri: https://keys.example/jwks.json, jwtHeaders: [h], jwtParams: [q], triggerRules: [{excludedPaths: [{exact: /a}], includedPaths: [{prefix: /b}]}]}\n",
    );
    let snake = spec(
        "  peers: [{mtls: {allow_tls: true}}]\n  peer_is_optional: true\n  origin_is_optional: true\n  principal_binding: USE_PEER\n  origins:\n  - jwt: {issuer: i, jwks_uri: https://keys.example/jwks.json, jwt_headers: [h], jwt_params: [q], trigger_rules: [{excluded_paths: [{exact: /a}], included_paths: [{prefix: /b}]}]}\n",
    );
    assert_eq!(camel, snake);
    assert_eq!(camel.peer_mode, Some(MtlsMode::Permissive));
}

#[test]
fn empty_or_null_mtls_is_strict_and_no_peers_is_none() {
    for peers in [
        "[{mtls: {}}]",
        "[{mtls: null}]",
        "[{mtls: }]",
        "[{mtls: {mode: STRICT}}]",
    ] {
        let p = spec(&format!("  peers: {peers}\n"));
        assert_eq!(p.peer_mode, Some(MtlsMode::Strict), "{peers}");
    }
    assert_eq!(spec("  peers: []\n").peer_mode, None);
    assert_eq!(spec("  targets: [{name: a}]\n").peer_mode, None);
}

#[test]
fn inline_jwks_is_parsed_at_load() {
    let p = spec(
        "  origins: [{jwt: {issuer: i, jwks: '{\"keys\": [{\"kty\": \"oct\", \"k\": \"AAAA\"}]}'}}]\n",
    );
    assert!(matches!(p.origins[0].rule.keys, JwtKeys::Inline(_)));
}

#[test]
fn mesh_policy_is_cluster_scoped_and_named_default() {
    let mesh = "apiVersion: authentication.istio.io/v1alpha1\nkind: MeshPolicy\n";
    let p = parse(&format!(
        "{mesh}metadata: {{name: default}}\nspec: {{peers: [{{mtls: {{}}}}]}}"
    ))
    .unwrap();
    assert_eq!(p.kind, LegacyKind::MeshPolicy);
    assert_eq!(p.meta.namespace, "");
    assert_eq!(
        parse(&format!("{mesh}metadata: {{name: strict}}\nspec: {{}}")).unwrap_err(),
        "MeshPolicy strict: metadata.name: Istio requires the MeshPolicy to be named `default`"
    );
    assert_eq!(
        parse(&format!(
            "{mesh}metadata: {{name: default}}\nspec: {{targets: [{{name: a}}]}}"
        ))
        .unwrap_err(),
        "MeshPolicy default: spec.targets: a MeshPolicy applies to the whole mesh and cannot have targets"
    );
}

#[test]
fn malformed_legacy_policies_are_named_by_object_and_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "unknown spec field",
            "  peer: []\n",
            "Policy foo/p: spec.peer: unknown field (known: targets, peers,",
        ),
        (
            "unknown jwt field",
            "  origins: [{jwt: {issuer: i, jwks_url: u}}]\n",
            "Policy foo/p: spec.origins[0].jwt.jwks_url: unknown field",
        ),
        (
            "unknown trigger field",
            "  origins: [{jwt: {issuer: i, trigger_rules: [{excluded_path: []}]}}]\n",
            "Policy foo/p: spec.origins[0].jwt.trigger_rules[0].excluded_path: unknown field",
        ),
        (
            "unknown target field",
            "  targets: [{name: a, labels: {app: a}}]\n",
            "Policy foo/p: spec.targets[0].labels: unknown field (known: name, ports)",
        ),
        (
            "both spellings",
            "  origins: [{jwt: {issuer: i, triggerRules: [], trigger_rules: []}}]\n",
            "Policy foo/p: spec.origins[0].jwt.trigger_rules: the same field is written in both spellings",
        ),
        (
            "missing issuer",
            "  origins: [{jwt: {jwksUri: u}}]\n",
            "Policy foo/p: spec.origins[0].jwt.issuer: is required",
        ),
        (
            "origin without jwt",
            "  origins: [{}]\n",
            "Policy foo/p: spec.origins[0].jwt: is required",
        ),
        (
            "bad mode",
            "  peers: [{mtls: {mode: DISABLE}}]\n",
            r#"Policy foo/p: spec.peers[0].mtls.mode: "DISABLE" is not a valid v1alpha1 mTLS mode (expected one of: STRICT, PERMISSIVE)"#,
        ),
        (
            "peer jwt",
            "  peers: [{jwt: {issuer: i}}]\n",
            "Policy foo/p: spec.peers[0].jwt: peer JWT authentication",
        ),
        (
            "bad binding",
            "  principalBinding: USE_BOTH\n",
            r#"Policy foo/p: spec.principalBinding: "USE_BOTH" is not a valid principal binding"#,
        ),
        (
            "bad flag",
            "  originIsOptional: yes please\n",
            "Policy foo/p: spec.originIsOptional: expected a boolean, found a string",
        ),
        (
            "port zero",
            "  targets: [{name: a, ports: [{number: 0}]}]\n",
            r#"Policy foo/p: spec.targets[0].ports[0].number: "0" is not a valid port"#,
        ),
        (
            "port number and name",
            "  targets: [{name: a, ports: [{number: 80, name: http}]}]\n",
            "Policy foo/p: spec.targets[0].ports[0].name: a port is a number or a name, not both",
        ),
        (
            "duplicate target",
            "  targets: [{name: a}, {name: a}]\n",
            "Policy foo/p: spec.targets[1]: two targets name the same service",
        ),
        (
            "two matchers",
            "  origins: [{jwt: {issuer: i, triggerRules: [{includedPaths: [{exact: /a, prefix: /b}]}]}}]\n",
            "Policy foo/p: spec.origins[0].jwt.triggerRules[0].includedPaths[0].prefix: a path match is one of",
        ),
        (
            "star in a path",
            "  origins: [{jwt: {issuer: i, triggerRules: [{includedPaths: [{prefix: /a*}]}]}}]\n",
            r#"Policy foo/p: spec.origins[0].jwt.triggerRules[0].includedPaths[0].prefix: "/a*" contains '*'"#,
        ),
        (
            "jwks and jwksUri",
            "  origins: [{jwt: {issuer: i, jwks: '{}', jwks_uri: u}}]\n",
            "Policy foo/p: spec.origins[0].jwt.jwks_uri: jwks and jwksUri are mutually exclusive",
        ),
    ];
    let mut failures = Vec::new();
    for (name, body, want) in cases {
        match parse(&format!("{POLICY}spec:\n{body}")) {
            Ok(p) => failures.push(format!("{name}: accepted: {p:?}")),
            Err(got) if got.starts_with(want) => {}
            Err(got) => failures.push(format!("{name}: got {got:?}, want prefix {want:?}")),
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn unsupported_version_is_reported() {
    let err = parse(
        "apiVersion: authentication.istio.io/v1beta1\nkind: Policy\nmetadata: {name: p, namespace: foo}\n",
    )
    .unwrap_err();
    assert!(
        err.starts_with(r#"Policy foo/p: apiVersion: "authentication.istio.io/v1beta1" is not a valid apiVersion"#),
        "{err}"
    );
    assert!(crate::policy::is_policy_kind(
        "authentication.istio.io/v1beta1",
        "MeshPolicy"
    ));
    assert!(!crate::policy::is_policy_kind(
        "authentication.istio.io/v1alpha1",
        "Other"
    ));
}

fn trigger_path(regex: &str) -> Result<StringMatch, String> {
    parse(&format!(
        "{POLICY}spec: {{origins: [{{jwt: {{issuer: i, trigger_rules: [{{included_paths: [{{regex: '{regex}'}}]}}]}}}}]}}"
    ))
    .map(|p| p.origins[0].triggers[0].included[0].clone())
}

#[test]
fn regex_paths_convert_only_when_they_are_plain_strings() {
    assert_eq!(trigger_path("/ip"), Ok(StringMatch::Exact("/ip".into())));
    assert_eq!(
        trigger_path("/api/.*"),
        Ok(StringMatch::Prefix("/api/".into()))
    );
    assert_eq!(
        trigger_path(".*-health"),
        Ok(StringMatch::Suffix("-health".into()))
    );
    for regex in [
        "^/pets/(.*?)?",
        "/a.b",
        "/a|/b",
        ".*",
        "/x/.*/y",
        "/[0-9]+",
        r"/a\.json",
    ] {
        let err = trigger_path(regex).unwrap_err();
        assert!(
            err.contains("included_paths[0].regex")
                && err.contains("regex path matching is refused"),
            "{regex}: {err}"
        );
    }
}

const CLUSTER: &str = "apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {app: httpbin}
  ports:
  - {name: http, port: 8000, targetPort: 80}
  - {name: admin, port: 9000}
  - {name: named, port: 9100, targetPort: metrics}
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: foo}
spec: {ports: [{port: 443}]}
";

fn convert(policy: &str) -> Vec<PolicyObject> {
    snapshot_of(&format!("{CLUSTER}---\n{policy}")).policies
}

fn convert_error(policy: &str) -> String {
    let mut snapshot: Snapshot = crate::discovery::files::parse_file(
        std::path::Path::new("t.yaml"),
        &format!("{CLUSTER}---\n{policy}"),
    )
    .unwrap();
    let errors = snapshot.convert_legacy("istio-system");
    assert!(snapshot.policies.is_empty());
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

fn peer(objects: &[PolicyObject]) -> &crate::policy::model::PeerAuthentication {
    objects
        .iter()
        .find_map(|o| match &o.spec {
            PolicySpec::PeerAuthentication(p) => Some(p),
            _ => None,
        })
        .expect("a PeerAuthentication")
}

fn authz(objects: &[PolicyObject]) -> Option<&crate::policy::model::AuthorizationPolicy> {
    objects.iter().find_map(|o| match &o.spec {
        PolicySpec::AuthorizationPolicy(a) => Some(a),
        _ => None,
    })
}

#[test]
fn namespace_policy_converts_to_namespace_peer_authentication() {
    let objects = convert(&format!("{POLICY}spec: {{peers: [{{mtls: {{}}}}]}}"));
    assert_eq!(objects.len(), 1);
    assert_eq!(
        objects[0].meta.to_string(),
        "foo/p (from authentication.istio.io/v1alpha1 Policy foo/p)"
    );
    let p = peer(&objects);
    assert_eq!(
        (p.selector.is_none(), p.mode),
        (true, Some(MtlsMode::Strict))
    );
}

#[test]
fn mesh_policy_converts_into_the_root_namespace() {
    let objects = convert(
        "apiVersion: authentication.istio.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: default}\nspec: {peers: [{mtls: {}}]}",
    );
    assert_eq!(
        objects[0].meta.to_string(),
        "istio-system/default (from authentication.istio.io/v1alpha1 MeshPolicy default)"
    );
}

#[test]
fn no_peers_and_optional_peers_are_permissive() {
    let target = "targets: [{name: httpbin}]";
    for spec in [
        format!("{{{target}}}"),
        format!("{{{target}, peers: [{{mtls: {{}}}}], peerIsOptional: true}}"),
    ] {
        let objects = convert(&format!("{POLICY}spec: {spec}"));
        assert_eq!(peer(&objects).mode, Some(MtlsMode::Permissive), "{spec}");
    }
}

#[test]
fn target_selects_the_service_workloads_and_ports_resolve_to_target_ports() {
    let objects = convert(&format!(
        "{POLICY}spec: {{targets: [{{name: httpbin, ports: [{{name: http}}, {{number: 9000}}, {{number: 1234}}]}}], peers: [{{mtls: {{}}}}]}}"
    ));
    assert_eq!(objects[0].meta.name, "p-httpbin");
    let p = peer(&objects);
    assert_eq!(p.selector.as_ref().unwrap().match_labels["app"], "httpbin");
    assert_eq!(p.mode, None, "other ports inherit");
    let ports: Vec<_> = p.port_level.iter().map(|(k, v)| (*k, *v)).collect();
    // http → targetPort 80; 9000 has no targetPort; 1234 is no Service port and is kept.
    assert_eq!(
        ports,
        [
            (80, Some(MtlsMode::Strict)),
            (1234, Some(MtlsMode::Strict)),
            (9000, Some(MtlsMode::Strict))
        ]
    );
}

#[test]
fn unresolvable_targets_reject_the_policy_naming_the_field() {
    let cases = [
        (
            "{targets: [{name: nope}]}",
            "Policy foo/p: spec.targets[0].name: names service foo/nope, which does not exist",
        ),
        (
            "{targets: [{name: external}]}",
            "Policy foo/p: spec.targets[0].name: names service foo/external, which has no selector",
        ),
        (
            "{targets: [{name: httpbin, ports: [{name: grpc}]}]}",
            r#"Policy foo/p: spec.targets[0].ports[0].name: names port "grpc", which service foo/httpbin does not have"#,
        ),
        (
            "{targets: [{name: httpbin, ports: [{number: 9100}]}]}",
            r#"Policy foo/p: spec.targets[0].ports[0]: names a port of service foo/httpbin whose targetPort is the container port name "metrics""#,
        ),
    ];
    for (spec, want) in cases {
        let got = convert_error(&format!("{POLICY}spec: {spec}"));
        assert!(got.starts_with(want), "{spec}: {got}");
    }
}

#[test]
fn origins_convert_to_request_authentication_and_a_token_requirement() {
    let objects = convert(&format!(
        "{POLICY}spec: {{targets: [{{name: httpbin}}], origins: [{{jwt: {{issuer: i, jwksUri: https://keys.example/jwks.json}}}}]}}"
    ));
    let kinds: Vec<_> = objects
        .iter()
        .map(|o| {
            (
                o.meta.name.as_str(),
                o.meta.converted_from.as_ref().unwrap().requires_token,
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("p-httpbin", false),
            ("p-httpbin", false),
            ("p-httpbin", true)
        ]
    );
    let PolicySpec::RequestAuthentication(r) = &objects[1].spec else {
        panic!("{:?}", objects[1])
    };
    assert_eq!(r.jwt_rules[0].issuer, "i");
    let a = authz(&objects).unwrap();
    assert_eq!(a.action, Action::Deny);
    assert_eq!(a.rules.len(), 1);
    assert!(a.rules[0].to.is_empty(), "every path needs a token");
    let principals = &a.rules[0].from[0].request_principals;
    assert_eq!(principals.not, [StringMatch::Presence]);
}

#[test]
fn optional_origin_has_no_token_requirement() {
    let objects = convert(&format!(
        "{POLICY}spec: {{origins: [{{jwt: {{issuer: i}}}}], originIsOptional: true}}"
    ));
    assert_eq!(objects.len(), 2);
    assert!(authz(&objects).is_none());
}

#[test]
fn trigger_rules_and_target_ports_become_operations() {
    let objects = convert(&format!(
        "{POLICY}spec:
  targets: [{{name: httpbin, ports: [{{number: 8000}}]}}]
  origins:
  - jwt:
      issuer: a
      trigger_rules:
      - excluded_paths: [{{exact: /health}}]
      - included_paths: [{{prefix: /admin/}}]
  - jwt: {{issuer: b}}
"
    ));
    let a = authz(&objects).unwrap();
    let ops: Vec<&Operation> = a.rules.iter().flat_map(|r| &r.to).collect();
    let ports = Clause {
        any: vec![80],
        not: vec![],
    };
    assert_eq!(
        ops,
        [
            &Operation {
                ports: ports.clone(),
                paths: Clause {
                    any: vec![],
                    not: vec![StringMatch::Exact("/health".into())]
                },
                ..Operation::default()
            },
            &Operation {
                ports: ports.clone(),
                paths: Clause {
                    any: vec![StringMatch::Prefix("/admin/".into())],
                    not: vec![]
                },
                ..Operation::default()
            },
            &Operation {
                ports,
                ..Operation::default()
            },
        ]
    );
}

#[test]
fn rendered_objects_parse_back_as_the_converted_ones() {
    let snapshot = snapshot_of(&format!(
        "{CLUSTER}---\n{POLICY}spec:
  targets: [{{name: httpbin, ports: [{{name: http}}]}}]
  peers: [{{mtls: {{mode: PERMISSIVE}}}}]
  origins:
  - jwt:
      issuer: i
      audiences: [web]
      jwks: '{{\"keys\": [{{\"kty\": \"oct\", \"k\": \"AAAA\"}}]}}'
      jwtHeaders: [x-jwt]
      jwtParams: [tok]
      triggerRules: [{{excludedPaths: [{{suffix: .css}}], includedPaths: [{{exact: /ip}}]}}]
"
    ));
    let rendered = converted_yaml(&snapshot);
    let reparsed = super::objects(&rendered);
    assert_eq!(reparsed.len(), snapshot.policies.len(), "{rendered}");
    for (back, original) in reparsed.iter().zip(&snapshot.policies) {
        assert_eq!(back.spec, original.spec, "{rendered}");
        assert_eq!(back.meta.name, original.meta.name);
    }
    assert!(
        rendered.contains("ambit.io/converted-from: authentication.istio.io/v1alpha1 Policy foo/p")
    );
}

#[test]
fn missing_token_denial_answers_401_and_names_its_source() {
    let snapshot = snapshot_of(&format!(
        "{CLUSTER}---\n{POLICY}spec: {{targets: [{{name: httpbin}}], origins: [{{jwt: {{issuer: i}}}}]}}"
    ));
    let engine = crate::policy::PolicyEngine::new(&snapshot.policies, "istio-system");
    let w = super::workload("foo", &[("app", "httpbin")]);
    let denied = super::check(&engine, &w, &super::Req::plaintext().http("GET", "/")).unwrap_err();
    assert_eq!(denied.http_status(), 401);
    assert_eq!(
        denied.verdict().policy.as_ref().unwrap().to_string(),
        "foo/p-httpbin (from authentication.istio.io/v1alpha1 Policy foo/p)"
    );
    let with_token = super::Req::plaintext()
        .http("GET", "/")
        .jwt(serde_json::json!({"iss": "i", "sub": "u"}));
    assert!(super::check(&engine, &w, &with_token).is_ok());
}
