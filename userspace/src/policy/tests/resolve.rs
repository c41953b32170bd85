//! PeerAuthentication resolution: narrowest scope wins, oldest among equals, UNSET
//! inherits, PERMISSIVE by default, port-level overrides.

use super::*;

fn pa(name: &str, ns: &str, extra_meta: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}{extra_meta}}}\nspec: {spec}\n---\n"
    )
}

/// A mode and the `namespace/name` of the policy that set it.
type Resolved = (MtlsMode, Option<String>);

fn resolved(yaml: &str, w: &Workload, port: u16) -> Resolved {
    let e = engine(yaml.trim_end_matches("---\n"));
    let policies = e.resolve(w);
    let (mode, policy) = policies.mtls().port(port);
    (mode, policy.map(|p| p.to_string()))
}

#[test]
fn peer_authentication_resolution_table() {
    let app = workload("foo", &[("app", "a")]);
    let mesh_strict = pa("mesh", "istio-system", "", "{mtls: {mode: STRICT}}");
    let ns_disable = pa("ns", "foo", "", "{mtls: {mode: DISABLE}}");
    let wl_permissive = pa(
        "wl",
        "foo",
        "",
        "{selector: {matchLabels: {app: a}}, mtls: {mode: PERMISSIVE}}",
    );
    let wl_unset = pa(
        "wl",
        "foo",
        "",
        "{selector: {matchLabels: {app: a}}, mtls: {mode: UNSET}}",
    );
    let ns_unset = pa("ns", "foo", "", "{mtls: {mode: UNSET}}");
    let mesh_unset = pa("mesh", "istio-system", "", "{}");
    let s = |m: MtlsMode, p: &str| (m, Some(p.to_owned()));
    let table: Vec<(&str, String, u16, Resolved)> = vec![
        (
            "nothing: PERMISSIVE",
            String::new(),
            80,
            (MtlsMode::Permissive, None),
        ),
        (
            "mesh only",
            mesh_strict.clone(),
            80,
            s(MtlsMode::Strict, "istio-system/mesh"),
        ),
        (
            "namespace beats mesh",
            format!("{mesh_strict}{ns_disable}"),
            80,
            s(MtlsMode::Disable, "foo/ns"),
        ),
        (
            "workload beats namespace",
            format!("{mesh_strict}{ns_disable}{wl_permissive}"),
            80,
            s(MtlsMode::Permissive, "foo/wl"),
        ),
        (
            "workload UNSET inherits namespace",
            format!("{mesh_strict}{ns_disable}{wl_unset}"),
            80,
            s(MtlsMode::Disable, "foo/ns"),
        ),
        (
            "UNSET twice inherits mesh",
            format!("{mesh_strict}{ns_unset}{wl_unset}"),
            80,
            s(MtlsMode::Strict, "istio-system/mesh"),
        ),
        (
            "unset mesh mode is PERMISSIVE",
            format!("{mesh_unset}{ns_unset}"),
            80,
            (MtlsMode::Permissive, None),
        ),
        (
            "other namespace policy ignored",
            pa("x", "bar", "", "{mtls: {mode: STRICT}}"),
            80,
            (MtlsMode::Permissive, None),
        ),
        (
            "non-matching selector ignored",
            pa(
                "x",
                "foo",
                "",
                "{selector: {matchLabels: {app: b}}, mtls: {mode: STRICT}}",
            ),
            80,
            (MtlsMode::Permissive, None),
        ),
        (
            "root namespace selector policy is not mesh-wide",
            pa(
                "x",
                "istio-system",
                "",
                "{selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}}",
            ),
            80,
            (MtlsMode::Permissive, None),
        ),
    ];
    let mut failures = Vec::new();
    for (name, yaml, port, want) in table {
        let got = resolved(&yaml, &app, port);
        if got != want {
            failures.push(format!("{name}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn oldest_wins_among_equals_by_timestamp_then_name() {
    let app = workload("foo", &[("app", "a")]);
    let old = pa(
        "zzz",
        "foo",
        ", creationTimestamp: \"2020-01-01T00:00:00Z\"",
        "{mtls: {mode: STRICT}}",
    );
    let new = pa(
        "aaa",
        "foo",
        ", creationTimestamp: \"2024-01-01T00:00:00Z\"",
        "{mtls: {mode: DISABLE}}",
    );
    assert_eq!(
        resolved(&format!("{new}{old}"), &app, 1),
        (MtlsMode::Strict, Some("foo/zzz".into()))
    );
    let b = pa(
        "b",
        "foo",
        "",
        "{selector: {matchLabels: {app: a}}, mtls: {mode: DISABLE}}",
    );
    let a = pa(
        "a",
        "foo",
        "",
        "{selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}}",
    );
    assert_eq!(
        resolved(&format!("{b}{a}"), &app, 1),
        (MtlsMode::Strict, Some("foo/a".into()))
    );
}

#[test]
fn port_level_mtls_overrides_per_port() {
    let app = workload("foo", &[("app", "a")]);
    let yaml = format!(
        "{}{}",
        pa("ns", "foo", "", "{mtls: {mode: STRICT}}"),
        pa(
            "wl",
            "foo",
            "",
            "{selector: {matchLabels: {app: a}}, mtls: {mode: UNSET}, portLevelMtls: {8080: {mode: DISABLE}, \"9090\": {mode: PERMISSIVE}, 7070: {mode: UNSET}}}"
        ),
    );
    assert_eq!(
        resolved(&yaml, &app, 8080),
        (MtlsMode::Disable, Some("foo/wl".into()))
    );
    assert_eq!(
        resolved(&yaml, &app, 9090),
        (MtlsMode::Permissive, Some("foo/wl".into()))
    );
    assert_eq!(
        resolved(&yaml, &app, 7070),
        (MtlsMode::Strict, Some("foo/ns".into()))
    );
    assert_eq!(
        resolved(&yaml, &app, 80),
        (MtlsMode::Strict, Some("foo/ns".into()))
    );
}

#[test]
fn resolution_is_cached_per_workload() {
    let e = engine(&pa("ns", "foo", "", "{mtls: {mode: STRICT}}").replace("---\n", ""));
    let w = workload("foo", &[]);
    assert!(std::sync::Arc::ptr_eq(&e.resolve(&w), &e.resolve(&w)));
    assert_eq!(e.resolve(&w).policies().count(), 1);
}
