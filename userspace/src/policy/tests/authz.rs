//! Every authorization rule: each field and its `not` form, each match kind, each
//! condition key, precedence, scopes, TCP semantics, AUDIT, dry-run and CUSTOM.

use super::*;
use crate::policy::{Note, Reason};

/// An ALLOW policy `p` on `app: web` in `foo` with one rule made of `rule` (YAML lines
/// indented for a rule list item's body).
fn allow_policy(rule: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n  - {rule}\n"
    )
}

fn web() -> Workload {
    workload("foo", &[("app", "web")])
}

/// (case name, request, expectation) against the rule of the table row.
type Case = (&'static str, Req, Expect);

const P: Option<&str> = Some("foo/p");
const YES: Expect = allow(P, Some(0));
const NO: Expect = deny(P, None);

#[test]
fn source_fields_and_their_not_forms() {
    let w = web();
    let tables: &[(&str, Vec<Case>)] = &[
        (
            "from: [{source: {principals: [cluster.local/ns/bar/sa/a]}}]",
            vec![
                ("exact", Req::mtls("bar", "a"), YES),
                ("other", Req::mtls("bar", "b"), NO),
                ("plaintext", Req::plaintext(), NO),
            ],
        ),
        (
            "from: [{source: {notPrincipals: [cluster.local/ns/bar/sa/a]}}]",
            vec![
                ("excluded", Req::mtls("bar", "a"), NO),
                ("other", Req::mtls("bar", "b"), YES),
                ("plaintext passes a not", Req::plaintext(), YES),
            ],
        ),
        (
            "from: [{source: {namespaces: [bar]}}]",
            vec![
                ("bar", Req::mtls("bar", "a"), YES),
                ("baz", Req::mtls("baz", "a"), NO),
            ],
        ),
        (
            "from: [{source: {notNamespaces: [bar]}}]",
            vec![
                ("bar", Req::mtls("bar", "a"), NO),
                ("baz", Req::mtls("baz", "a"), YES),
            ],
        ),
        (
            "from: [{source: {ipBlocks: [10.1.0.0/16, 192.168.1.7]}}]",
            vec![
                ("in cidr", Req::plaintext().ip("10.1.2.3"), YES),
                ("single ip", Req::plaintext().ip("192.168.1.7"), YES),
                ("outside", Req::plaintext().ip("10.2.0.1"), NO),
            ],
        ),
        (
            "from: [{source: {notIpBlocks: [10.1.0.0/16]}}]",
            vec![
                ("in", Req::plaintext().ip("10.1.2.3"), NO),
                ("out", Req::plaintext().ip("10.2.0.1"), YES),
            ],
        ),
        (
            "from: [{source: {ipBlocks: [\"fd44::/64\", 10.44.0.0/24]}}]",
            vec![
                ("v6 in", Req::plaintext().ip("fd44::44:2"), YES),
                ("v6 outside", Req::plaintext().ip("fd45::2"), NO),
                ("v4 in", Req::plaintext().ip("10.44.0.2"), YES),
            ],
        ),
        (
            "from: [{source: {notIpBlocks: [\"fd44::44:2/128\"]}}]",
            vec![
                ("the one", Req::plaintext().ip("fd44::44:2"), NO),
                ("another", Req::plaintext().ip("fd44::44:3"), YES),
                (
                    "a v4 address is outside a v6 block",
                    Req::plaintext().ip("10.44.0.2"),
                    YES,
                ),
            ],
        ),
        (
            "from: [{source: {remoteIpBlocks: [\"2001:db8::/32\"]}}]",
            vec![
                ("remote in", Req::plaintext().remote("2001:db8::1"), YES),
                (
                    "source ip does not count",
                    Req::plaintext().ip("10.0.0.9").remote("10.0.0.9"),
                    NO,
                ),
            ],
        ),
        (
            "from: [{source: {notRemoteIpBlocks: [10.9.0.0/16]}}]",
            vec![
                ("remote in", Req::plaintext().remote("10.9.1.1"), NO),
                ("remote out", Req::plaintext().remote("10.8.1.1"), YES),
            ],
        ),
        (
            "from: [{source: {requestPrincipals: [\"iss/alice\"]}}]",
            vec![
                (
                    "alice",
                    Req::plaintext()
                        .http("GET", "/")
                        .jwt(serde_json::json!({"iss": "iss", "sub": "alice"})),
                    YES,
                ),
                (
                    "bob",
                    Req::plaintext()
                        .http("GET", "/")
                        .jwt(serde_json::json!({"iss": "iss", "sub": "bob"})),
                    NO,
                ),
                ("no jwt", Req::plaintext().http("GET", "/"), NO),
            ],
        ),
        (
            "from: [{source: {notRequestPrincipals: [\"iss/alice\"]}}]",
            vec![
                (
                    "alice",
                    Req::plaintext()
                        .http("GET", "/")
                        .jwt(serde_json::json!({"iss": "iss", "sub": "alice"})),
                    NO,
                ),
                ("no jwt", Req::plaintext().http("GET", "/"), YES),
            ],
        ),
        (
            "from: [{source: {principals: [cluster.local/ns/bar/sa/a]}}, {source: {namespaces: [baz]}}]",
            vec![
                ("first source", Req::mtls("bar", "a"), YES),
                ("second source", Req::mtls("baz", "z"), YES),
                ("neither", Req::mtls("qux", "a"), NO),
            ],
        ),
        (
            "from: [{source: {namespaces: [bar], ipBlocks: [10.1.0.0/16]}}]",
            vec![
                ("both fields", Req::mtls("bar", "a").ip("10.1.0.5"), YES),
                ("one field only", Req::mtls("bar", "a").ip("10.2.0.5"), NO),
            ],
        ),
    ];
    for (rule, cases) in tables {
        let cases: Vec<_> = cases
            .iter()
            .map(|(name, req, expect)| (*name, &w, req.clone(), Expect { ..*expect }))
            .collect();
        run_table(&allow_policy(rule), &cases);
    }
}

#[test]
fn operation_fields_and_their_not_forms() {
    let w = web();
    let get = |path: &str| Req::plaintext().http("GET", path);
    let tables: &[(&str, Vec<Case>)] = &[
        (
            "to: [{operation: {hosts: [\"*.example.com\"]}}]",
            vec![
                ("suffix", get("/").host("api.example.com"), YES),
                ("case-insensitive", get("/").host("API.Example.COM"), YES),
                ("other", get("/").host("example.org"), NO),
            ],
        ),
        (
            "to: [{operation: {notHosts: [\"admin.*\"]}}]",
            vec![
                ("prefix excluded", get("/").host("admin.example.com"), NO),
                ("other", get("/").host("www.example.com"), YES),
            ],
        ),
        (
            "to: [{operation: {ports: [\"8080\"]}}]",
            vec![
                ("port", Req::plaintext().port(8080), YES),
                ("other port", Req::plaintext().port(9090), NO),
            ],
        ),
        (
            "to: [{operation: {notPorts: [\"8080\"]}}]",
            vec![
                ("port", Req::plaintext().port(8080), NO),
                ("other port", Req::plaintext().port(9090), YES),
            ],
        ),
        (
            "to: [{operation: {methods: [GET]}}]",
            vec![
                ("GET", get("/"), YES),
                (
                    "get is case-sensitive",
                    Req::plaintext().http("get", "/"),
                    NO,
                ),
            ],
        ),
        (
            "to: [{operation: {notMethods: [DELETE]}}]",
            vec![
                ("DELETE", Req::plaintext().http("DELETE", "/"), NO),
                ("GET", get("/"), YES),
            ],
        ),
        (
            "to: [{operation: {paths: [/exact]}}]",
            vec![
                ("exact", get("/exact"), YES),
                ("longer", get("/exact/more"), NO),
            ],
        ),
        (
            "to: [{operation: {notPaths: [\"/private*\"]}}]",
            vec![
                ("private", get("/private/x"), NO),
                ("public", get("/public"), YES),
            ],
        ),
        (
            "to: [{operation: {paths: [\"*\"]}}]",
            vec![("presence", get("/a"), YES)],
        ),
        (
            "to: [{operation: {ports: [\"80\"]}}, {operation: {methods: [POST]}}]",
            vec![
                ("first op", get("/").port(80), YES),
                ("second op", Req::plaintext().http("POST", "/"), YES),
                ("neither", get("/"), NO),
            ],
        ),
    ];
    for (rule, cases) in tables {
        let cases: Vec<_> = cases
            .iter()
            .map(|(name, req, expect)| (*name, &w, req.clone(), Expect { ..*expect }))
            .collect();
        run_table(&allow_policy(rule), &cases);
    }
}

#[test]
fn every_condition_key_and_not_values() {
    let w = web();
    let jwt = serde_json::json!({
        "iss": "https://issuer", "sub": "alice", "aud": ["web", "api"], "azp": "cli",
        "groups": ["dev", "ops"], "org": {"team": "payments"}, "admin": true
    });
    let http = || Req::plaintext().http("GET", "/").jwt(jwt.clone());
    let tables: &[(&str, &str, Req, Req)] = &[
        // (key, values, matching request, non-matching request)
        (
            "request.headers[x-user]",
            "[\"ad*\"]",
            http().header("X-User", "admin"),
            http().header("x-user", "bob"),
        ),
        (
            "source.ip",
            "[10.1.0.0/16]",
            Req::plaintext().ip("10.1.1.1"),
            Req::plaintext().ip("10.2.1.1"),
        ),
        (
            "remote.ip",
            "[10.1.1.1]",
            Req::plaintext().remote("10.1.1.1"),
            Req::plaintext(),
        ),
        (
            "source.namespace",
            "[bar]",
            Req::mtls("bar", "a"),
            Req::plaintext(),
        ),
        (
            "source.principal",
            "[\"*/sa/a\"]",
            Req::mtls("bar", "a"),
            Req::mtls("bar", "b"),
        ),
        (
            "request.auth.principal",
            "[https://issuer/alice]",
            http(),
            Req::plaintext().http("GET", "/"),
        ),
        (
            "request.auth.audiences",
            "[api]",
            http(),
            Req::plaintext().http("GET", "/"),
        ),
        (
            "request.auth.presenter",
            "[cli]",
            http(),
            Req::plaintext().http("GET", "/"),
        ),
        (
            "request.auth.claims[groups]",
            "[ops]",
            http(),
            Req::plaintext().http("GET", "/"),
        ),
        (
            "request.auth.claims[org][team]",
            "[pay*]",
            http(),
            Req::plaintext().http("GET", "/"),
        ),
        (
            "request.auth.claims[admin]",
            "[\"true\"]",
            http(),
            Req::plaintext().http("GET", "/"),
        ),
        (
            "destination.ip",
            "[10.0.1.0/24]",
            Req::plaintext(),
            Req::plaintext().dst("10.0.2.1"),
        ),
        (
            "destination.port",
            "[\"8000\"]",
            Req::plaintext(),
            Req::plaintext().port(80),
        ),
        (
            "connection.sni",
            "[\"*.local\"]",
            Req::plaintext().sni("web.local"),
            Req::plaintext(),
        ),
    ];
    for (key, values, matching, other) in tables {
        let yes = allow_policy(&format!("when: [{{key: \"{key}\", values: {values}}}]"));
        run_table(
            &yes,
            &[
                (key, &w, matching.clone(), YES),
                (key, &w, other.clone(), NO),
            ],
        );
        let not = allow_policy(&format!("when: [{{key: \"{key}\", notValues: {values}}}]"));
        run_table(
            &not,
            &[
                (key, &w, matching.clone(), NO),
                (key, &w, other.clone(), YES),
            ],
        );
    }
}

#[test]
fn string_match_kinds() {
    let w = web();
    let cases = [
        ("exact", "cluster.local/ns/bar/sa/a", "a", true),
        ("exact miss", "cluster.local/ns/bar/sa/a", "ab", false),
        ("prefix", "cluster.local/ns/bar/*", "zzz", true),
        ("prefix miss", "cluster.local/ns/baz/*", "a", false),
        ("suffix", "*/sa/a", "a", true),
        ("suffix miss", "*/sa/b", "a", false),
        ("presence", "*", "a", true),
    ];
    for (name, value, sa, allowed) in cases {
        let yaml = allow_policy(&format!(
            "from: [{{source: {{principals: [\"{value}\"]}}}}]"
        ));
        let expect = if allowed { YES } else { NO };
        run_table(&yaml, &[(name, &w, Req::mtls("bar", sa), expect)]);
    }
}

#[test]
fn rule_needs_all_parts_and_any_rule_matches() {
    let w = web();
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec:
  rules:
  - from: [{source: {namespaces: [bar]}}]
    to: [{operation: {methods: [GET]}}]
    when: [{key: \"request.headers[x]\", values: [\"1\"]}, {key: destination.port, values: [\"8000\"]}]
  - to: [{operation: {paths: [/public]}}]
";
    run_table(
        yaml,
        &[
            (
                "all parts",
                &w,
                Req::mtls("bar", "a").http("GET", "/").header("x", "1"),
                YES,
            ),
            (
                "one condition fails",
                &w,
                Req::mtls("bar", "a").http("GET", "/").header("x", "2"),
                NO,
            ),
            (
                "second rule",
                &w,
                Req::plaintext().http("POST", "/public"),
                allow(P, Some(1)),
            ),
        ],
    );
}

#[test]
fn tcp_connection_never_matches_http_allow_but_applies_l4_part_of_deny() {
    let w = web();
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: foo}
spec:
  rules:
  - to: [{operation: {methods: [GET], ports: [\"8000\"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-post, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {methods: [POST], ports: [\"9000\"]}}]
";
    let allow_get = Some("foo/allow-get");
    run_table(
        yaml,
        &[
            (
                "http GET",
                &w,
                Req::plaintext().http("GET", "/"),
                allow(allow_get, Some(0)),
            ),
            (
                "tcp on 8000: ALLOW needs HTTP",
                &w,
                Req::plaintext(),
                deny(allow_get, None),
            ),
            (
                "tcp on 9000: DENY on its port",
                &w,
                Req::plaintext().port(9000),
                deny(Some("foo/deny-post"), Some(0)),
            ),
            (
                "http GET on 9000",
                &w,
                Req::plaintext().http("GET", "/").port(9000),
                deny(allow_get, None),
            ),
        ],
    );
    let decision = check(&engine(yaml), &w, &Req::plaintext());
    let reason = decision.unwrap_err().verdict().reason.to_string();
    assert!(reason.contains("TCP connection"), "{reason}");
}

#[test]
fn scopes_root_namespace_namespace_and_selector() {
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-deny, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [evil]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-allow, namespace: foo}
spec:
  rules: [{from: [{source: {namespaces: [bar]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {namespaces: [baz]}}]}]
";
    let web = web();
    let db = workload("foo", &[("app", "db")]);
    let other = workload("qux", &[]);
    run_table(
        yaml,
        &[
            (
                "mesh deny applies everywhere",
                &other,
                Req::mtls("evil", "a"),
                deny(Some("istio-system/mesh-deny"), Some(0)),
            ),
            (
                "other namespace has no allow",
                &other,
                Req::mtls("x", "a"),
                ALLOW_DEFAULT,
            ),
            (
                "namespace allow",
                &db,
                Req::mtls("bar", "a"),
                allow(Some("foo/ns-allow"), Some(0)),
            ),
            (
                "selector policy not on db",
                &db,
                Req::mtls("baz", "a"),
                deny(Some("foo/ns-allow"), None),
            ),
            (
                "selector policy on web",
                &web,
                Req::mtls("baz", "a"),
                allow(Some("foo/web-only"), Some(0)),
            ),
            (
                "two allow policies, none matches",
                &web,
                Req::mtls("x", "a"),
                deny(None, None),
            ),
        ],
    );
    // A different root namespace makes istio-system an ordinary namespace.
    let custom = PolicyEngine::new(&objects(yaml), "mesh-root");
    assert!(check(&custom, &other, &Req::mtls("evil", "a")).is_ok());
}

#[test]
fn audit_marks_without_deciding() {
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-get, namespace: foo}
spec:
  action: AUDIT
  rules: [{to: [{operation: {methods: [GET]}}]}]
";
    let e = engine(yaml);
    let permit = check(&e, &web(), &Req::plaintext().http("GET", "/")).unwrap();
    assert_eq!(permit.verdict().reason, Reason::NoAllowPolicy);
    assert!(
        matches!(&permit.verdict().notes[..], [Note::Audit { policy, rule: 0 }] if policy.name == "audit-get")
    );
    let permit = check(&e, &web(), &Req::plaintext().http("POST", "/")).unwrap();
    assert!(permit.verdict().notes.is_empty());
}

#[test]
fn dry_run_reports_without_enforcing() {
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-get
  namespace: foo
  annotations: {istio.io/dry-run: \"true\"}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [GET]}}]}]
";
    let e = engine(yaml);
    let permit = check(&e, &web(), &Req::plaintext().http("GET", "/")).unwrap();
    match &permit.verdict().notes[..] {
        [
            Note::DryRun {
                allowed: false,
                policy: Some(p),
                rule: Some(0),
                ..
            },
        ] => {
            assert_eq!(p.to_string(), "foo/deny-get")
        }
        other => panic!("{other:?}"),
    }
    let note = permit.verdict().notes[0].to_string();
    assert!(note.starts_with("dry-run: "), "{note}");
    let permit = check(&e, &web(), &Req::plaintext().http("POST", "/")).unwrap();
    assert!(matches!(
        &permit.verdict().notes[..],
        [Note::DryRun { allowed: true, .. }]
    ));
}

#[test]
fn custom_is_denied_clearly_when_it_matches() {
    let yaml = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: foo}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]
";
    let e = engine(yaml);
    let denied = check(&e, &web(), &Req::plaintext().http("GET", "/admin/x")).unwrap_err();
    let reason = denied.verdict().reason.to_string();
    assert!(
        reason.contains("CUSTOM") && reason.contains("\"opa\"") && reason.contains("not supported"),
        "{reason}"
    );
    assert_eq!(denied.http_status(), 403);
    assert!(check(&e, &web(), &Req::plaintext().http("GET", "/public")).is_ok());
}
