//! The data path's decision, table-style: the same function the listeners, the re-check
//! and `explain` call.

use std::net::{IpAddr, SocketAddr};

use http::request::Parts;

use super::*;
use crate::discovery::files::snapshot_of;

const PODS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {ambit.io/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: foo, labels: {app: web}}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: foo}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp-raw, port: 9000}
";

const PATH_RULE: &str = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {methods: [GET], notPaths: [/admin*]}}]}]
";

fn applied(extra: &str) -> Applied {
    Applied::new(
        snapshot_of(&format!("{PODS}{extra}")),
        &crate::state::PolicySettings::new("istio-system", "cluster.local"),
    )
}

fn ip() -> IpAddr {
    "10.0.0.5".parse().unwrap()
}

fn plaintext() -> Peer {
    Peer {
        identity: None,
        ip: "10.0.9.9".parse().unwrap(),
    }
}

fn admit_port(applied: &Applied, peer: &Peer, port: u16) -> Result<Admission, Refusal> {
    admit(
        applied,
        "foo/web",
        &[ip()],
        peer,
        SocketAddr::new(ip(), port),
    )
}

fn request(method: &str, path: &str) -> Parts {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "web.foo")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

#[test]
fn only_the_served_pods_own_application_is_admitted() {
    let applied = applied("");
    let peer = plaintext();
    let other: IpAddr = "10.0.0.6".parse().unwrap();
    assert!(matches!(
        admit(
            &applied,
            "foo/web",
            &[other],
            &peer,
            SocketAddr::new(other, 80)
        ),
        Err(Refusal::NotServed(_))
    ));
    assert!(matches!(
        admit(
            &applied,
            "foo/web",
            &[ip()],
            &peer,
            SocketAddr::new(other, 80)
        ),
        Err(Refusal::NotThisPod(_))
    ));
    assert!(matches!(
        admit_port(&applied, &peer, 15006),
        Err(Refusal::ProxyPort(15006))
    ));
}

#[test]
fn a_dual_stack_pod_admits_its_application_at_either_address() {
    let v6: IpAddr = "fd00::5".parse().unwrap();
    let config = PODS.replace(
        "status: {podIP: 10.0.0.5}",
        "status: {podIP: 10.0.0.5, podIPs: [{ip: 10.0.0.5}, {ip: 'fd00::5'}]}",
    );
    let applied = Applied::new(
        snapshot_of(&config),
        &crate::state::PolicySettings::new("istio-system", "cluster.local"),
    );
    let ips = [ip(), v6];
    let peer = Peer {
        identity: None,
        ip: "fd00::9".parse().unwrap(),
    };
    for destination in [ip(), v6] {
        let admitted = admit(
            &applied,
            "foo/web",
            &ips,
            &peer,
            SocketAddr::new(destination, 80),
        );
        assert!(admitted.is_ok(), "{destination}: {admitted:?}");
    }
    let other: IpAddr = "fd00::6".parse().unwrap();
    assert!(matches!(
        admit(&applied, "foo/web", &ips, &peer, SocketAddr::new(other, 80)),
        Err(Refusal::NotThisPod(_))
    ));
}

#[test]
fn plaintext_to_a_strict_port_is_refused_naming_the_policy() {
    let applied = applied(
        "
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec: {mtls: {mode: STRICT}}
",
    );
    match admit_port(&applied, &plaintext(), 8080) {
        Err(Refusal::StrictMtls { port: 8080, policy }) => {
            assert_eq!(policy.unwrap().to_string(), "foo/default");
        }
        other => panic!("expected a STRICT refusal, got {other:?}"),
    }
}

#[test]
fn without_http_rules_a_connection_is_authorized_as_a_whole() {
    let applied = applied("");
    let admission = admit_port(&applied, &plaintext(), 8080).unwrap();
    assert!(matches!(admission.handling, Handling::Connection(_)));
}

#[test]
fn http_rules_make_declared_ports_per_request_and_others_detected() {
    let applied = applied(PATH_RULE);
    let peer = plaintext();
    let on = |port| admit_port(&applied, &peer, port).map(|a| a.handling);
    assert!(matches!(on(8080), Ok(Handling::Requests)));
    assert!(matches!(on(7000), Ok(Handling::Detect)));
    // Declared TCP is never parsed: the ALLOW rule needs HTTP, so it cannot match.
    assert!(matches!(on(9000), Err(Refusal::Denied { .. })));
}

#[test]
fn each_request_is_decided_on_its_own() {
    let applied = applied(PATH_RULE);
    let peer = plaintext();
    let admission = admit_port(&applied, &peer, 8080).unwrap();
    let permit = admission
        .authorize_request(&mut request("GET", "/get?x=1"))
        .unwrap();
    assert_eq!(permit.0.verdict().rule, Some(0));
    let denied = admission
        .authorize_request(&mut request("GET", "/admin/users"))
        .unwrap_err();
    assert_eq!(denied.status(), http::StatusCode::FORBIDDEN);
    let denied = admission
        .authorize_request(&mut request("POST", "/get"))
        .unwrap_err();
    assert_eq!(denied.status(), http::StatusCode::FORBIDDEN);
    // The same connection as opaque TCP: the ALLOW rule needs HTTP.
    assert!(admission.authorize_connection().is_err());
}

#[test]
fn a_rejected_jwt_is_401() {
    let applied = applied(
        "
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  jwtRules:
  - issuer: issuer.example
    jwks: '{\"keys\": []}'
",
    );
    let peer = plaintext();
    let admission = admit_port(&applied, &peer, 8080).unwrap();
    // A RequestAuthentication makes every port of the workload inspect requests.
    assert!(matches!(admission.handling, Handling::Requests));
    let mut parts = request("GET", "/");
    parts.headers.insert(
        http::header::AUTHORIZATION,
        "Bearer not.a.token".parse().unwrap(),
    );
    let denied = admission.authorize_request(&mut parts).unwrap_err();
    assert_eq!(denied.status(), http::StatusCode::UNAUTHORIZED);
    // No token: authentication has nothing to say, and no policy requires one.
    assert!(
        admission
            .authorize_request(&mut request("GET", "/"))
            .is_ok()
    );
}
