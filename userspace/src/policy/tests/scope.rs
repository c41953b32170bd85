//! Two scoping rules beyond namespace and selector: root-namespace policies with a
//! selector, and trust-domain aliases.

use super::*;

fn authz(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n"
    )
}

/// Istio: "If the authorization policy is in the root namespace, the selector will
/// additionally match with workloads in all namespaces"; every matching policy applies.
#[test]
fn root_authorization_policy_with_selector_applies_in_every_namespace() {
    let yaml = format!(
        "{}{}",
        authz(
            "deny-admin",
            "istio-system",
            "{selector: {matchLabels: {app: web}}, action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}",
        ),
        authz(
            "allow-get",
            "foo",
            "{selector: {matchLabels: {app: web}}, rules: [{to: [{operation: {methods: [GET]}}]}]}",
        ),
    );
    let yaml = yaml.trim_end_matches("---\n");
    let web_foo = workload("foo", &[("app", "web")]);
    let web_bar = workload("bar", &[("app", "web")]);
    let web_root = workload("istio-system", &[("app", "web")]);
    let db_bar = workload("bar", &[("app", "db")]);
    let admin = || Req::plaintext().http("GET", "/admin");
    run_table(
        yaml,
        &[
            (
                "foo: root DENY applies",
                &web_foo,
                admin(),
                deny(Some("istio-system/deny-admin"), Some(0)),
            ),
            (
                "foo: namespace ALLOW still applies",
                &web_foo,
                Req::plaintext().http("GET", "/"),
                allow(Some("foo/allow-get"), Some(0)),
            ),
            (
                "foo: both apply",
                &web_foo,
                Req::plaintext().http("POST", "/"),
                deny(Some("foo/allow-get"), None),
            ),
            (
                "bar: root DENY applies",
                &web_bar,
                admin(),
                deny(Some("istio-system/deny-admin"), Some(0)),
            ),
            (
                "bar: no ALLOW there",
                &web_bar,
                Req::plaintext().http("POST", "/"),
                ALLOW_DEFAULT,
            ),
            (
                "root namespace itself",
                &web_root,
                admin(),
                deny(Some("istio-system/deny-admin"), Some(0)),
            ),
            ("not selected", &db_bar, admin(), ALLOW_DEFAULT),
        ],
    );
}

#[test]
fn root_request_authentication_with_selector_applies_in_every_namespace() {
    let yaml = "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: istio-system}
spec:
  selector: {matchLabels: {app: web}}
  jwtRules: [{issuer: https://issuer.example, jwks: '{\"keys\": []}'}]
";
    let e = engine(yaml);
    let names = |w: &Workload| {
        e.resolve(w)
            .policies()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&workload("bar", &[("app", "web")])),
        ["istio-system/jwt"]
    );
    assert!(names(&workload("bar", &[("app", "db")])).is_empty());
}

/// Istio's `ComposePeerAuthentication` ignores a PeerAuthentication with a selector in
/// the root namespace, for the root namespace's own workloads too.
#[test]
fn root_peer_authentication_with_selector_is_ignored() {
    let yaml = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict-web, namespace: istio-system}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}
";
    let e = engine(yaml);
    for ns in ["foo", "istio-system"] {
        let w = workload(ns, &[("app", "web")]);
        assert_eq!(mode(&e, &w, 80), MtlsMode::Permissive, "{ns}");
    }
}

fn aliased(yaml: &str) -> PolicyEngine {
    PolicyEngine::new(&objects(yaml), "istio-system")
        .with_trust_domain("new-td")
        .with_trust_domain_aliases(&["old-td".to_owned()])
}

fn from(principal: &str) -> Req {
    let mut req = Req::plaintext();
    req.principal = Some(principal.to_owned());
    req.namespace = principal.split('/').nth(2).map(String::from);
    req
}

/// istio.io "Trust Domain Migration": a policy written for `old-td` keeps matching the
/// workload once it is `new-td`, with `old-td` an alias.
#[test]
fn principals_match_across_trust_domain_aliases() {
    let w = workload("foo", &[]);
    let cases: &[(&str, &str, bool)] = &[
        // (principal in the policy, peer, allowed)
        ("old-td/ns/bar/sa/a", "new-td/ns/bar/sa/a", true),
        ("old-td/ns/bar/sa/a", "old-td/ns/bar/sa/a", true),
        ("new-td/ns/bar/sa/a", "old-td/ns/bar/sa/a", true),
        ("cluster.local/ns/bar/sa/a", "new-td/ns/bar/sa/a", true),
        ("cluster.local/ns/bar/sa/a", "old-td/ns/bar/sa/a", true),
        ("old-td/ns/bar/sa/a", "new-td/ns/bar/sa/b", false),
        ("old-td/ns/bar/sa/a", "other-td/ns/bar/sa/a", false),
        ("other-td/ns/bar/sa/a", "new-td/ns/bar/sa/a", false),
        ("other-td/ns/bar/sa/a", "other-td/ns/bar/sa/a", true),
        ("*/ns/bar/sa/a", "old-td/ns/bar/sa/a", true),
        ("old-td/ns/bar/*", "new-td/ns/bar/sa/z", true),
        ("old-td/ns/bar/*", "new-td/ns/baz/sa/z", false),
        ("*-td/ns/bar/sa/a", "new-td/ns/bar/sa/a", true),
    ];
    let mut failures = Vec::new();
    for (written, peer, want) in cases {
        for yaml in [
            authz(
                "p",
                "foo",
                &format!("{{rules: [{{from: [{{source: {{principals: [\"{written}\"]}}}}]}}]}}"),
            ),
            authz(
                "p",
                "foo",
                &format!(
                    "{{rules: [{{when: [{{key: source.principal, values: [\"{written}\"]}}]}}]}}"
                ),
            ),
        ] {
            let e = aliased(yaml.trim_end_matches("---\n"));
            let got = check(&e, &w, &from(peer)).is_ok();
            if got != *want {
                failures.push(format!("{written} vs peer {peer}: got {got}, want {want}"));
            }
        }
        let not = authz(
            "p",
            "foo",
            &format!(
                "{{action: DENY, rules: [{{from: [{{source: {{notPrincipals: [\"{written}\"]}}}}]}}]}}"
            ),
        );
        let e = aliased(not.trim_end_matches("---\n"));
        if check(&e, &w, &from(peer)).is_ok() != *want {
            failures.push(format!(
                "notPrincipals {written} vs peer {peer}: want allowed={want}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn without_aliases_cluster_local_names_the_local_trust_domain() {
    let yaml = authz(
        "p",
        "foo",
        "{rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/a]}}]}]}",
    );
    let e = PolicyEngine::new(&objects(yaml.trim_end_matches("---\n")), "istio-system")
        .with_trust_domain("new-td");
    let w = workload("foo", &[]);
    assert!(check(&e, &w, &from("new-td/ns/bar/sa/a")).is_ok());
    assert!(check(&e, &w, &from("old-td/ns/bar/sa/a")).is_err());
}
