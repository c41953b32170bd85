//! Decision time of the policy engine: one request to a workload whose namespace holds
//! 10, 100 or 1,000 policies, in a mesh of 10,000 more. Most policies select other
//! workloads, as in a real namespace; the engine must not pay for them per request.

use std::hint::black_box;

use ambit::policy::{HttpRequest, PolicyEngine, PolicyObject, RequestContext, Workload};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const MESH_POLICIES: usize = 10_000;
const MESH_NAMESPACES: usize = 100;

fn policy(yaml: &str) -> PolicyObject {
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let kind = value["kind"].as_str().unwrap().to_owned();
    PolicyObject::from_yaml(&kind, value).unwrap()
}

/// An ALLOW policy in `ns` selecting `app` with three rules, the last of which matches
/// the benchmark's request when `app` is `web`.
fn allow(ns: &str, name: &str, app: &str) -> PolicyObject {
    policy(&format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/ops/sa/admin]}}}}]
  - to: [{{operation: {{methods: [POST], paths: [\"/admin*\"]}}}}]
  - from: [{{source: {{namespaces: [bar], ipBlocks: [10.0.0.0/8]}}}}]
    to: [{{operation: {{methods: [GET, HEAD], paths: [\"/api/*\"], ports: [\"8000\"]}}}}]
    when: [{{key: \"request.headers[x-tenant]\", values: [\"acme*\"]}}]
"
    ))
}

fn deny(ns: &str, name: &str) -> PolicyObject {
    policy(&format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  action: DENY
  rules: [{{from: [{{source: {{namespaces: [evil], notIpBlocks: [10.0.0.0/8]}}}}]}}]
"
    ))
}

fn config(in_namespace: usize) -> Vec<PolicyObject> {
    let mut policies = vec![deny("istio-system", "mesh-deny"), deny("foo", "ns-deny")];
    policies.push(allow("foo", "web", "web"));
    for i in 3..in_namespace {
        policies.push(allow("foo", &format!("p{i}"), &format!("svc-{i}")));
    }
    for i in 0..MESH_POLICIES {
        let ns = format!("ns-{}", i % MESH_NAMESPACES);
        policies.push(allow(&ns, &format!("m{i}"), &format!("svc-{i}")));
    }
    policies
}

fn decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("authorize");
    let web = Workload {
        namespace: "foo".into(),
        labels: [("app", "web"), ("version", "v1"), ("team", "payments")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        service_account: "web".into(),
    };
    let headers = [
        ("user-agent", "curl/8"),
        ("accept", "*/*"),
        ("x-tenant", "acme-corp"),
    ];
    for n in [10, 100, 1_000] {
        let engine = PolicyEngine::new(&config(n), "istio-system");
        let http = RequestContext {
            source_principal: Some("cluster.local/ns/bar/sa/client"),
            source_namespace: Some("bar"),
            source_ip: "10.1.2.3".parse().unwrap(),
            remote_ip: "10.1.2.3".parse().unwrap(),
            destination_ip: "10.2.0.7".parse().unwrap(),
            destination_port: 8000,
            sni: None,
            http: Some(HttpRequest {
                method: "GET",
                path: "/api/items?page=2",
                host: "web.foo.svc.cluster.local",
                headers: &headers,
                jwt: None,
            }),
        };
        let tcp = RequestContext { http: None, ..http };
        assert!(engine.authorize(&web, &http).is_ok());
        assert!(engine.authorize(&web, &tcp).is_err());
        group.bench_with_input(BenchmarkId::new("http", n), &http, |b, ctx| {
            b.iter(|| engine.authorize(black_box(&web), black_box(ctx)).is_ok())
        });
        group.bench_with_input(BenchmarkId::new("tcp", n), &tcp, |b, ctx| {
            b.iter(|| engine.authorize(black_box(&web), black_box(ctx)).is_ok())
        });
        let resolved = engine.resolve(&web);
        group.bench_with_input(BenchmarkId::new("http-pre-resolved", n), &http, |b, ctx| {
            b.iter(|| resolved.authorize(black_box(ctx)).is_ok())
        });
    }
    group.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
