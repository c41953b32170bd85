//! Every policy example of Istio's security concept page
//! (istio.io/latest/docs/concepts/security/), with the decisions Istio documents.

use super::*;

const HDR: &str = "apiVersion: security.istio.io/v1beta1\n";

#[test]
fn peer_policy_for_reviews_is_strict_only_for_reviews() {
    let e = engine(&format!(
        "{HDR}kind: PeerAuthentication\nmetadata: {{name: example-peer-policy, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  mtls: {{mode: STRICT}}\n"
    ));
    assert_eq!(
        mode(&e, &workload("foo", &[("app", "reviews")]), 9080),
        MtlsMode::Strict
    );
    assert_eq!(
        mode(&e, &workload("foo", &[("app", "ratings")]), 9080),
        MtlsMode::Permissive
    );
}

#[test]
fn namespace_policy_makes_every_workload_strict() {
    let e = engine(&format!(
        "{HDR}kind: PeerAuthentication\nmetadata: {{name: example-policy, namespace: foo}}\nspec: {{mtls: {{mode: STRICT}}}}\n"
    ));
    assert_eq!(
        mode(&e, &workload("foo", &[("app", "any")]), 1),
        MtlsMode::Strict
    );
    assert_eq!(mode(&e, &workload("bar", &[]), 1), MtlsMode::Permissive);
}

#[test]
fn workload_port_80_disabled_other_ports_inherit_namespace() {
    let e = engine(&format!(
        "{HDR}kind: PeerAuthentication\nmetadata: {{name: example-policy, namespace: foo}}\nspec: {{mtls: {{mode: STRICT}}}}\n---\n{HDR}kind: PeerAuthentication\nmetadata: {{name: example-workload-policy, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: example-app}}}}\n  portLevelMtls:\n    80: {{mode: DISABLE}}\n"
    ));
    let app = workload("foo", &[("app", "example-app")]);
    assert_eq!(mode(&e, &app, 80), MtlsMode::Disable);
    assert_eq!(mode(&e, &app, 8000), MtlsMode::Strict);
}

const HTTPBIN: &str = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin, version: v1}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/sleep]}
    - source: {namespaces: [dev]}
    to:
    - operation: {methods: [GET]}
    when:
    - key: request.auth.claims[iss]
      values: [https://accounts.google.com]
";

#[test]
fn httpbin_allows_sleep_or_dev_with_google_jwt() {
    let httpbin = workload("foo", &[("app", "httpbin"), ("version", "v1")]);
    let other = workload("foo", &[("app", "httpbin"), ("version", "v2")]);
    let google = serde_json::json!({"iss": "https://accounts.google.com", "sub": "u"});
    let evil = serde_json::json!({"iss": "https://evil.example", "sub": "u"});
    let p = Some("foo/httpbin");
    run_table(
        HTTPBIN,
        &[
            (
                "sleep GET google",
                &httpbin,
                Req::mtls("default", "sleep")
                    .http("GET", "/")
                    .jwt(google.clone()),
                allow(p, Some(0)),
            ),
            (
                "dev GET google",
                &httpbin,
                Req::mtls("dev", "x").http("GET", "/").jwt(google.clone()),
                allow(p, Some(0)),
            ),
            (
                "sleep POST",
                &httpbin,
                Req::mtls("default", "sleep")
                    .http("POST", "/")
                    .jwt(google.clone()),
                deny(p, None),
            ),
            (
                "other ns",
                &httpbin,
                Req::mtls("prod", "x").http("GET", "/").jwt(google.clone()),
                deny(p, None),
            ),
            (
                "wrong issuer",
                &httpbin,
                Req::mtls("dev", "x").http("GET", "/").jwt(evil),
                deny(p, None),
            ),
            (
                "no jwt",
                &httpbin,
                Req::mtls("dev", "x").http("GET", "/"),
                deny(p, None),
            ),
            ("tcp", &httpbin, Req::mtls("dev", "x"), deny(p, None)),
            ("v2 not selected", &other, Req::plaintext(), ALLOW_DEFAULT),
        ],
    );
}

#[test]
fn httpbin_deny_rejects_sources_outside_foo() {
    let yaml = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: httpbin-deny, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin, version: v1}}
  action: DENY
  rules:
  - from:
    - source: {notNamespaces: [foo]}
";
    let w = workload("foo", &[("app", "httpbin"), ("version", "v1")]);
    let p = Some("foo/httpbin-deny");
    run_table(
        yaml,
        &[
            ("from bar", &w, Req::mtls("bar", "x"), deny(p, Some(0))),
            ("from foo", &w, Req::mtls("foo", "x"), ALLOW_DEFAULT),
            (
                "plaintext has no namespace",
                &w,
                Req::plaintext(),
                deny(p, Some(0)),
            ),
        ],
    );
    // With the allow policy too, deny takes precedence.
    let both = format!("{HTTPBIN}---\n{yaml}");
    let google = serde_json::json!({"iss": "https://accounts.google.com"});
    run_table(
        &both,
        &[(
            "dev matches allow but deny wins",
            &w,
            Req::mtls("dev", "x").http("GET", "/").jwt(google),
            deny(p, Some(0)),
        )],
    );
}

#[test]
fn allow_read_allows_get_and_head_on_products() {
    let yaml = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-read, namespace: default}
spec:
  selector: {matchLabels: {app: products}}
  action: ALLOW
  rules:
  - to:
    - operation:
         methods: [GET, HEAD]
";
    let products = workload("default", &[("app", "products")]);
    let reviews = workload("default", &[("app", "reviews")]);
    let p = Some("default/allow-read");
    run_table(
        yaml,
        &[
            (
                "GET",
                &products,
                Req::plaintext().http("GET", "/"),
                allow(p, Some(0)),
            ),
            (
                "HEAD",
                &products,
                Req::plaintext().http("HEAD", "/"),
                allow(p, Some(0)),
            ),
            (
                "POST",
                &products,
                Req::plaintext().http("POST", "/"),
                deny(p, None),
            ),
            (
                "other workload",
                &reviews,
                Req::plaintext().http("POST", "/"),
                ALLOW_DEFAULT,
            ),
        ],
    );
}

#[test]
fn tester_matches_prefix_and_suffix_paths() {
    let yaml = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: tester, namespace: default}
spec:
  selector: {matchLabels: {app: products}}
  action: ALLOW
  rules:
  - to:
    - operation:
        paths: [\"/test/*\", \"*/info\"]
";
    let w = workload("default", &[("app", "products")]);
    let p = Some("default/tester");
    run_table(
        yaml,
        &[
            (
                "prefix",
                &w,
                Req::plaintext().http("GET", "/test/a/b"),
                allow(p, Some(0)),
            ),
            (
                "suffix",
                &w,
                Req::plaintext().http("GET", "/x/info"),
                allow(p, Some(0)),
            ),
            (
                "query ignored",
                &w,
                Req::plaintext().http("GET", "/x/info?a=b"),
                allow(p, Some(0)),
            ),
            (
                "neither",
                &w,
                Req::plaintext().http("GET", "/testing"),
                deny(p, None),
            ),
        ],
    );
}

#[test]
fn jwt_required_except_healthz_and_for_admin() {
    let allow_yaml = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: disable-jwt-for-healthz, namespace: default}
spec:
  selector: {matchLabels: {app: products}}
  action: ALLOW
  rules:
  - to:
    - operation:
        notPaths: [\"/healthz\"]
    from:
    - source:
        requestPrincipals: [\"*\"]
";
    let deny_yaml = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: enable-jwt-for-admin, namespace: default}
spec:
  selector: {matchLabels: {app: products}}
  action: DENY
  rules:
  - to:
    - operation:
        paths: [\"/admin\"]
    from:
    - source:
        notRequestPrincipals: [\"*\"]
";
    let w = workload("default", &[("app", "products")]);
    let token = serde_json::json!({"iss": "issuer", "sub": "alice"});
    let a = Some("default/disable-jwt-for-healthz");
    run_table(
        allow_yaml,
        &[
            (
                "api with jwt",
                &w,
                Req::plaintext().http("GET", "/api").jwt(token.clone()),
                allow(a, Some(0)),
            ),
            (
                "api without jwt",
                &w,
                Req::plaintext().http("GET", "/api"),
                deny(a, None),
            ),
            // The only ALLOW rule excludes /healthz, so /healthz matches no rule.
            (
                "healthz",
                &w,
                Req::plaintext().http("GET", "/healthz"),
                deny(a, None),
            ),
        ],
    );
    let d = Some("default/enable-jwt-for-admin");
    run_table(
        deny_yaml,
        &[
            (
                "admin without jwt",
                &w,
                Req::plaintext().http("GET", "/admin"),
                deny(d, Some(0)),
            ),
            (
                "admin with jwt",
                &w,
                Req::plaintext().http("GET", "/admin").jwt(token),
                ALLOW_DEFAULT,
            ),
            (
                "other path",
                &w,
                Req::plaintext().http("GET", "/api"),
                ALLOW_DEFAULT,
            ),
            // TCP: the rule is all HTTP fields, so its L4 part (nothing) denies everything.
            (
                "tcp applies the L4 part",
                &w,
                Req::plaintext(),
                deny(d, Some(0)),
            ),
        ],
    );
}

#[test]
fn allow_nothing_deny_all_and_allow_all() {
    let allow_nothing = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-nothing}
spec:
  action: ALLOW
";
    let deny_all = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-all}
spec:
  action: DENY
  rules:
  - {}
";
    let allow_all = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-all}
spec:
  action: ALLOW
  rules:
  - {}
";
    let w = workload("default", &[]);
    let req = Req::mtls("default", "x").http("GET", "/");
    run_table(
        allow_nothing,
        &[(
            "allow-nothing",
            &w,
            req.clone(),
            deny(Some("default/allow-nothing"), None),
        )],
    );
    run_table(
        deny_all,
        &[(
            "deny-all",
            &w,
            req.clone(),
            deny(Some("default/deny-all"), Some(0)),
        )],
    );
    run_table(
        allow_all,
        &[(
            "allow-all",
            &w,
            req.clone(),
            allow(Some("default/allow-all"), Some(0)),
        )],
    );
    run_table(
        &format!("{allow_all}---\n{deny_all}"),
        &[(
            "deny-all beats allow-all",
            &w,
            req.clone(),
            deny(Some("default/deny-all"), Some(0)),
        )],
    );
    run_table(
        &format!("{allow_all}---\n{allow_nothing}"),
        &[(
            "allow-all makes allow-nothing useless",
            &w,
            req,
            allow(Some("default/allow-all"), Some(0)),
        )],
    );
    // `spec: {}` is an ALLOW policy without rules.
    run_table(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: empty}\nspec: {}\n",
        &[(
            "spec {}",
            &w,
            Req::plaintext(),
            deny(Some("default/empty"), None),
        )],
    );
}

#[test]
fn header_condition_selects_versions() {
    let yaml = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin, version: v1}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/sleep]}
    to:
    - operation: {methods: [GET]}
    when:
    - key: request.headers[version]
      values: [v1, v2]
";
    let w = workload("foo", &[("app", "httpbin"), ("version", "v1")]);
    let sleep = Req::mtls("default", "sleep").http("GET", "/");
    let p = Some("foo/httpbin");
    run_table(
        yaml,
        &[
            (
                "v1",
                &w,
                sleep.clone().header("version", "v1"),
                allow(p, Some(0)),
            ),
            (
                "v2 any case name",
                &w,
                sleep.clone().header("Version", "v2"),
                allow(p, Some(0)),
            ),
            (
                "v3",
                &w,
                sleep.clone().header("version", "v3"),
                deny(p, None),
            ),
            ("absent", &w, sleep, deny(p, None)),
        ],
    );
}

#[test]
fn public_and_authenticated_only_access() {
    let public = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin, version: v1}}
  action: ALLOW
  rules:
  - to:
    - operation: {methods: [GET, POST]}
";
    let authenticated = public.replace(
        "  - to:",
        "  - from:\n    - source: {principals: [\"*\"]}\n    to:",
    );
    let w = workload("foo", &[("app", "httpbin"), ("version", "v1")]);
    let p = Some("foo/httpbin");
    run_table(
        public,
        &[(
            "plaintext GET",
            &w,
            Req::plaintext().http("GET", "/"),
            allow(p, Some(0)),
        )],
    );
    run_table(
        &authenticated,
        &[
            (
                "plaintext GET",
                &w,
                Req::plaintext().http("GET", "/"),
                deny(p, None),
            ),
            (
                "mtls POST",
                &w,
                Req::mtls("bar", "x").http("POST", "/"),
                allow(p, Some(0)),
            ),
        ],
    );
}

#[test]
fn mongodb_policy_on_plain_tcp() {
    let yaml = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: mongodb-policy, namespace: default}
spec:
  selector: {matchLabels: {app: mongodb}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/bookinfo-ratings-v2]}
    to:
    - operation: {ports: [\"27017\"]}
";
    let w = workload("default", &[("app", "mongodb")]);
    let p = Some("default/mongodb-policy");
    run_table(
        yaml,
        &[
            (
                "ratings-v2",
                &w,
                Req::mtls("default", "bookinfo-ratings-v2").port(27017),
                allow(p, Some(0)),
            ),
            (
                "other sa",
                &w,
                Req::mtls("default", "bookinfo-ratings-v1").port(27017),
                deny(p, None),
            ),
            (
                "other port",
                &w,
                Req::mtls("default", "bookinfo-ratings-v2").port(27018),
                deny(p, None),
            ),
        ],
    );
}
