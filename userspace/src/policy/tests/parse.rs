//! Validation: each kind of malformed input is rejected with a message naming the object
//! and the field path.

use crate::policy::PolicyObject;

fn error(yaml: &str) -> String {
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let kind = value["kind"].as_str().unwrap().to_owned();
    PolicyObject::from_yaml(&kind, value)
        .unwrap_err()
        .to_string()
}

const AP: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-bar, namespace: foo}\n";
const PA: &str = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: pa, namespace: foo}\n";
const RA: &str = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: ra, namespace: foo}\n";

#[test]
fn malformed_inputs_are_named_by_object_and_field() {
    let cases: &[(&str, String, &str)] = &[
        ("bad CIDR", format!("{AP}spec: {{rules: [{{from: [{{source: {{ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}}}}]}}]}}"),
            r#"AuthorizationPolicy foo/allow-bar: spec.rules[0].from[0].source.ipBlocks[1]: "10.0.0.0/33" is not a valid CIDR"#),
        ("bad not CIDR", format!("{AP}spec: {{rules: [{{from: [{{source: {{notRemoteIpBlocks: [nope]}}}}]}}]}}"),
            r#"foo/allow-bar: spec.rules[0].from[0].source.notRemoteIpBlocks[0]: "nope" is not a valid CIDR"#),
        ("bad port", format!("{AP}spec: {{rules: [{{to: [{{operation: {{ports: [\"70000\"]}}}}]}}]}}"),
            r#"foo/allow-bar: spec.rules[0].to[0].operation.ports[0]: "70000" is not a valid port"#),
        ("port as number", format!("{AP}spec: {{rules: [{{to: [{{operation: {{notPorts: [80]}}}}]}}]}}"),
            "foo/allow-bar: spec.rules[0].to[0].operation.notPorts[0]: expected a string, found a number"),
        ("wildcard in the middle", format!("{AP}spec: {{rules: [{{to: [{{operation: {{paths: [\"/a/*/b\"]}}}}]}}]}}"),
            r#"foo/allow-bar: spec.rules[0].to[0].operation.paths[0]: "/a/*/b" has a '*' in the middle"#),
        ("wildcard at both ends", format!("{AP}spec: {{rules: [{{from: [{{source: {{principals: [\"*a*\"]}}}}]}}]}}"),
            r#"spec.rules[0].from[0].source.principals[0]: "*a*" has a '*' in the middle"#),
        ("empty string", format!("{AP}spec: {{rules: [{{to: [{{operation: {{methods: [GET, \"\"]}}}}]}}]}}"),
            "foo/allow-bar: spec.rules[0].to[0].operation.methods[1]: must not be empty"),
        ("unknown field", format!("{AP}spec: {{rules: [{{from: [{{source: {{principal: [a]}}}}]}}]}}"),
            "foo/allow-bar: spec.rules[0].from[0].source.principal: unknown field (known: principals,"),
        ("unknown spec field", format!("{AP}spec: {{actions: DENY}}"),
            "foo/allow-bar: spec.actions: unknown field"),
        ("wrong type", format!("{AP}spec: {{rules: {{from: []}}}}"),
            "foo/allow-bar: spec.rules: expected a list, found a mapping"),
        ("unknown action", format!("{AP}spec: {{action: REJECT}}"),
            r#"foo/allow-bar: spec.action: "REJECT" is not a valid action (expected one of: ALLOW, DENY, AUDIT, CUSTOM)"#),
        ("unknown when key", format!("{AP}spec: {{rules: [{{when: [{{key: request.colour, values: [red]}}]}}]}}"),
            r#"foo/allow-bar: spec.rules[0].when[0].key: "request.colour" is not a supported condition key"#),
        ("bad header key", format!("{AP}spec: {{rules: [{{when: [{{key: \"request.headers[]\", values: [a]}}]}}]}}"),
            r#"spec.rules[0].when[0].key: "request.headers[]" is not a supported condition key"#),
        ("experimental key", format!("{AP}spec: {{rules: [{{when: [{{key: \"experimental.envoy.filters.a.b[c]\", values: [x]}}]}}]}}"),
            "spec.rules[0].when[0].key: the experimental.envoy.filters.* condition is not supported by ambit"),
        ("condition without values", format!("{AP}spec: {{rules: [{{when: [{{key: source.ip}}]}}]}}"),
            "spec.rules[0].when[0]: a condition needs values or notValues"),
        ("condition ip value", format!("{AP}spec: {{rules: [{{when: [{{key: source.ip, notValues: [10.0.0.300]}}]}}]}}"),
            r#"spec.rules[0].when[0].notValues[0]: "10.0.0.300" is not a valid CIDR"#),
        ("condition port value", format!("{AP}spec: {{rules: [{{when: [{{key: destination.port, values: [http]}}]}}]}}"),
            r#"spec.rules[0].when[0].values[0]: "http" is not a valid port"#),
        ("empty source", format!("{AP}spec: {{rules: [{{from: [{{source: {{}}}}]}}]}}"),
            "spec.rules[0].from[0].source: must set at least one field"),
        ("missing source", format!("{AP}spec: {{rules: [{{from: [{{}}]}}]}}"),
            "spec.rules[0].from[0].source: is required"),
        ("path template", format!("{AP}spec: {{rules: [{{to: [{{operation: {{paths: [\"/a/{{*}}/b\"]}}}}]}}]}}"),
            "path templates ({*}, {**}) are not supported"),
        ("custom without provider", format!("{AP}spec: {{action: CUSTOM}}"),
            "foo/allow-bar: spec.provider: is required"),
        ("provider without custom", format!("{AP}spec: {{action: DENY, provider: {{name: x}}}}"),
            "foo/allow-bar: spec.provider: provider is only valid with action CUSTOM"),
        ("targetRef", format!("{AP}spec: {{targetRef: {{kind: Gateway, name: gw}}}}"),
            "foo/allow-bar: spec.targetRef: targetRef/targetRefs (gateway and waypoint attachment) is not supported by ambit"),
        ("targetRefs", format!("{PA}spec: {{targetRefs: [{{kind: Service, name: s}}]}}"),
            "PeerAuthentication foo/pa: spec.targetRefs: targetRef/targetRefs"),
        ("unknown mode", format!("{PA}spec: {{mtls: {{mode: STRICTER}}}}"),
            r#"PeerAuthentication foo/pa: spec.mtls.mode: "STRICTER" is not a valid mTLS mode (expected one of: UNSET, DISABLE, PERMISSIVE, STRICT)"#),
        ("unknown port mode", format!("{PA}spec: {{selector: {{matchLabels: {{a: b}}}}, portLevelMtls: {{8080: {{mode: ON}}}}}}"),
            r#"foo/pa: spec.portLevelMtls[8080].mode: "ON" is not a valid mTLS mode"#),
        ("port-level without selector", format!("{PA}spec: {{portLevelMtls: {{8080: {{mode: DISABLE}}}}}}"),
            "foo/pa: spec.portLevelMtls: portLevelMtls requires spec.selector"),
        ("bad port-level port", format!("{PA}spec: {{selector: {{matchLabels: {{a: b}}}}, portLevelMtls: {{0: {{mode: DISABLE}}}}}}"),
            r#"foo/pa: spec.portLevelMtls[0]: "0" is not a valid port for portLevelMtls"#),
        ("jwt rule without issuer", format!("{RA}spec: {{jwtRules: [{{audiences: [a]}}]}}"),
            "RequestAuthentication foo/ra: spec.jwtRules[0].issuer: is required"),
        ("jwks and jwksUri", format!("{RA}spec: {{jwtRules: [{{issuer: i, jwks: '{{\"keys\": []}}', jwksUri: https://k}}]}}"),
            "foo/ra: spec.jwtRules[0].jwksUri: jwks and jwksUri are mutually exclusive"),
        ("bad jwks", format!("{RA}spec: {{jwtRules: [{{issuer: i, jwks: '{{nope'}}]}}"),
            "foo/ra: spec.jwtRules[0].jwks: is not a valid JWKS"),
        ("bad forwardOriginalToken", format!("{RA}spec: {{jwtRules: [{{issuer: i, forwardOriginalToken: \"yes\"}}]}}"),
            "foo/ra: spec.jwtRules[0].forwardOriginalToken: expected a boolean, found a string"),
        ("jwksUri not http", format!("{RA}spec: {{jwtRules: [{{issuer: i, jwksUri: 'file:///etc/keys'}}]}}"),
            "foo/ra: spec.jwtRules[0].jwksUri: \"file:///etc/keys\" is not an http:// or https:// URL with a host"),
        ("bad fromHeaders name", format!("{RA}spec: {{jwtRules: [{{issuer: i, fromHeaders: [{{name: 'a b'}}]}}]}}"),
            "foo/ra: spec.jwtRules[0].fromHeaders[0].name: \"a b\" is not a valid HTTP header name"),
        ("bad outputPayloadToHeader", format!("{RA}spec: {{jwtRules: [{{issuer: i, outputPayloadToHeader: 'x:y'}}]}}"),
            "foo/ra: spec.jwtRules[0].outputPayloadToHeader: \"x:y\" is not a valid HTTP header name"),
        ("unknown jwt field", format!("{RA}spec: {{jwtRules: [{{issuer: i, jwks_uri: x}}]}}"),
            "foo/ra: spec.jwtRules[0].jwks_uri: unknown field"),
        ("unsupported apiVersion", AP.replace("/v1\n", "/v1alpha1\n") + "spec: {}",
            r#"foo/allow-bar: apiVersion: "security.istio.io/v1alpha1" is not a valid apiVersion"#),
        ("missing name", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {namespace: foo}\n".into(),
            "AuthorizationPolicy <unnamed>: metadata.name: is required"),
        ("bad dry-run", format!("{}spec: {{}}", AP.replace("namespace: foo}", "namespace: foo, annotations: {istio.io/dry-run: maybe}}")),
            r#"foo/allow-bar: metadata.annotations[istio.io/dry-run]: "maybe" is not a valid dry-run flag"#),
    ];
    let mut failures = Vec::new();
    for (name, yaml, want) in cases {
        let got = error(yaml);
        if !got.contains(want) {
            failures.push(format!("{name}:\n   got: {got}\n  want: {want}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn valid_objects_parse_with_every_field() {
    let yaml = format!(
        "{AP}spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [a]
        notPrincipals: [b]
        requestPrincipals: [\"*\"]
        notRequestPrincipals: [c]
        namespaces: [\"x*\"]
        notNamespaces: [\"*y\"]
        ipBlocks: [10.0.0.1/24]
        notIpBlocks: [\"::1\"]
        remoteIpBlocks: [1.2.3.4]
        notRemoteIpBlocks: [5.6.7.0/24]
    to:
    - operation: {{hosts: [h], notHosts: [i], ports: [\"1\"], notPorts: [\"2\"], methods: [GET], notMethods: [PUT], paths: [/a], notPaths: [/b]}}
    when:
    - {{key: \"request.auth.claims[a][b]\", values: [v], notValues: [w]}}
"
    );
    let value: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    PolicyObject::from_yaml("AuthorizationPolicy", value).unwrap();
}

#[test]
fn files_loader_prefixes_file_and_document() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        format!("{AP}spec: {{}}\n---\n{AP}spec: {{action: NOPE}}\n"),
    )
    .unwrap();
    let message = crate::discovery::files::DirState::load_strict(dir.path(), "istio-system")
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(
            "p.yaml: document 2: AuthorizationPolicy foo/allow-bar: spec.action: \"NOPE\""
        ),
        "{message}"
    );
}
