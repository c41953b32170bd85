//! The bypass classes of Istio's security bulletins, through the engine: a DENY on
//! `/admin` applies to every spelling of it once the path is normalized, hosts match
//! with any case, port or final dot, and a repeated header cannot pick the line a policy
//! sees.

use super::*;
use crate::admission::normalize::normalize_path;

fn policy(action: &str, rule: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n  action: {action}\n  rules:\n  - {rule}\n"
    )
}

const P: Option<&str> = Some("foo/p");

/// Every spelling of `/admin` a client can send is denied by `paths: [/admin]` once
/// normalized; a path that only looks alike is not.
#[test]
fn deny_on_admin_applies_to_every_normalized_variant() {
    let engine = engine(&policy("DENY", "to: [{operation: {paths: [/admin]}}]"));
    let w = workload("foo", &[]);
    let denied = [
        "/admin",
        "//admin",
        "///admin",
        "/./admin",
        "/a/../admin",
        "/a/b/../../admin",
        "/../admin",
        "/%2e%2e/admin",
        "/x/%2E%2E/admin",
        "/%2e/admin",
        "/%61dmin",
        "/x%2F..%2Fadmin",
        "/%2Fadmin",
        "/x%5C..%5Cadmin",
        "/x\\..\\admin",
        "/admin?x=1",
        "/admin?",
        "/./admin?/public",
    ];
    let allowed = [
        "/admin/",
        "/administrator",
        "/public?/admin",
        "/admin%3B",
        "/Admin",
    ];
    let mut failures = Vec::new();
    for (target, want_denied) in denied
        .iter()
        .map(|t| (t, true))
        .chain(allowed.iter().map(|t| (t, false)))
    {
        let normalized = normalize_path(target).unwrap();
        let req = Req::plaintext().http("GET", normalized.path());
        let decision = check(&engine, &w, &req);
        if decision.is_err() != want_denied {
            failures.push(format!(
                "{target:?} -> {:?}: {decision:?}",
                normalized.path()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// A fragment never reaches the engine: the proxy answers 400.
#[test]
fn fragment_is_refused_before_matching() {
    assert!(normalize_path("/public#/../admin").is_err());
}

#[test]
fn hosts_match_any_case_with_or_without_port_and_final_dot() {
    let w = workload("foo", &[]);
    let get = |host: &str| Req::plaintext().http("GET", "/").host(host);
    let deny_admin = policy("DENY", "to: [{operation: {hosts: [admin.example.com]}}]");
    run_table(
        &deny_admin,
        &[
            ("exact", &w, get("admin.example.com"), deny(P, Some(0))),
            ("case", &w, get("ADMIN.Example.com"), deny(P, Some(0))),
            ("port", &w, get("admin.example.com:8080"), deny(P, Some(0))),
            (
                "case and port",
                &w,
                get("Admin.Example.Com:80"),
                deny(P, Some(0)),
            ),
            ("final dot", &w, get("admin.example.com."), deny(P, Some(0))),
            (
                "dot and port",
                &w,
                get("admin.example.com.:443"),
                deny(P, Some(0)),
            ),
            ("other host", &w, get("www.example.com"), ALLOW_DEFAULT),
            (
                "longer name",
                &w,
                get("admin.example.com.evil"),
                ALLOW_DEFAULT,
            ),
            ("not a port", &w, get("admin.example.com:x"), ALLOW_DEFAULT),
        ],
    );
    let not_hosts = policy("ALLOW", "to: [{operation: {notHosts: [\"*.internal\"]}}]");
    run_table(
        &not_hosts,
        &[
            ("public", &w, get("www.example.com"), allow(P, Some(0))),
            ("excluded", &w, get("db.internal"), deny(P, None)),
            (
                "excluded with port",
                &w,
                get("db.internal:5432"),
                deny(P, None),
            ),
            ("excluded with dot", &w, get("db.INTERNAL."), deny(P, None)),
        ],
    );
    let with_port = policy(
        "ALLOW",
        "to: [{operation: {hosts: [\"a.example.com:8080\"]}}]",
    );
    run_table(
        &with_port,
        &[
            (
                "that port",
                &w,
                get("a.example.com:8080"),
                allow(P, Some(0)),
            ),
            ("no port", &w, get("a.example.com"), deny(P, None)),
            ("other port", &w, get("a.example.com:9090"), deny(P, None)),
        ],
    );
    let v6 = policy("DENY", "to: [{operation: {hosts: [\"[fd00::1]\"]}}]");
    run_table(
        &v6,
        &[
            ("bracketed", &w, get("[fd00::1]"), deny(P, Some(0))),
            (
                "bracketed with port",
                &w,
                get("[fd00::1]:80"),
                deny(P, Some(0)),
            ),
        ],
    );
}

/// Each line of a repeated header is matched on its own, and the way a doubt goes
/// follows the action: an ALLOW needs every line to pass, a DENY one line to match.
#[test]
fn repeated_header_lines_cannot_pick_what_the_policy_sees() {
    let w = workload("foo", &[]);
    let req = |lines: &[&str]| {
        lines
            .iter()
            .fold(Req::plaintext().http("GET", "/"), |r, v| {
                r.header("X-User", v)
            })
    };
    let cond = |action: &str, key: &str| {
        policy(
            action,
            &format!("when: [{{key: \"request.headers[x-user]\", {key}: [admin]}}]"),
        )
    };
    run_table(
        &cond("DENY", "values"),
        &[
            (
                "DENY values: one line",
                &w,
                req(&["admin"]),
                deny(P, Some(0)),
            ),
            (
                "DENY values: among others",
                &w,
                req(&["bob", "admin"]),
                deny(P, Some(0)),
            ),
            (
                "DENY values: first",
                &w,
                req(&["admin", "bob"]),
                deny(P, Some(0)),
            ),
            (
                "DENY values: one joined line is one value",
                &w,
                req(&["bob,admin"]),
                ALLOW_DEFAULT,
            ),
            ("DENY values: other", &w, req(&["bob"]), ALLOW_DEFAULT),
            ("DENY values: absent", &w, req(&[]), ALLOW_DEFAULT),
        ],
    );
    run_table(
        &cond("DENY", "notValues"),
        &[
            ("DENY notValues: admin", &w, req(&["admin"]), ALLOW_DEFAULT),
            ("DENY notValues: other", &w, req(&["bob"]), deny(P, Some(0))),
            (
                "DENY notValues: admin plus another",
                &w,
                req(&["admin", "bob"]),
                deny(P, Some(0)),
            ),
            ("DENY notValues: absent", &w, req(&[]), deny(P, Some(0))),
        ],
    );
    run_table(
        &cond("ALLOW", "values"),
        &[
            (
                "ALLOW values: admin",
                &w,
                req(&["admin"]),
                allow(P, Some(0)),
            ),
            (
                "ALLOW values: admin twice",
                &w,
                req(&["admin", "admin"]),
                allow(P, Some(0)),
            ),
            (
                "ALLOW values: admin plus another",
                &w,
                req(&["admin", "bob"]),
                deny(P, None),
            ),
            (
                "ALLOW values: another plus admin",
                &w,
                req(&["bob", "admin"]),
                deny(P, None),
            ),
            ("ALLOW values: absent", &w, req(&[]), deny(P, None)),
        ],
    );
    run_table(
        &cond("ALLOW", "notValues"),
        &[
            (
                "ALLOW notValues: other",
                &w,
                req(&["bob"]),
                allow(P, Some(0)),
            ),
            ("ALLOW notValues: admin", &w, req(&["admin"]), deny(P, None)),
            (
                "ALLOW notValues: among others",
                &w,
                req(&["bob", "admin"]),
                deny(P, None),
            ),
            ("ALLOW notValues: absent", &w, req(&[]), allow(P, Some(0))),
        ],
    );
}
