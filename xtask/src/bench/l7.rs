//! The policies of the mesh L7 mode and their check. The server pod of `bench-l7` has one
//! `AuthorizationPolicy` ALLOW with a path rule that also wants a verified token, and one
//! `RequestAuthentication` with an inline key set: each needs HTTP on the port, so every
//! request there is parsed, its token verified (RS256) and its path authorized. The pods
//! of `bench-mesh` match neither, so the plain mesh mode stays on the L4 fast path.

use std::time::Duration;

use ambit_tests::{CurlResult, Node, Pod, mesh::within};
use anyhow::bail;

use super::tools::{HTTP_KEEPALIVE_PATH, HTTP_PORT};

pub const NAMESPACE: &str = "bench-l7";

/// A test fixture, not a secret: an RSA-2048 public key (`kid: bench`, RS256, the usual
/// algorithm of identity providers and of Istio's demo token), and a token it verifies,
/// `{"iss": "bench@ambit.test", "sub": "wrk", "aud": "bench", "exp": 4102444800}` (the
/// year 2100). Made once with Python's `cryptography`; the private key was not kept.
const JWKS: &str = r#"{"keys":[{"kty":"RSA","kid":"bench","alg":"RS256","use":"sig","n":"2E6t-EUxHYbW3OzFOqZIDOPJoDr47C09pZtb4j1LPtjnpzfPoS5JS4u5UtPZK4_5E0Jje3rlo5tPYL-2X7DG7OKqdAVPhFBqYCRbF--vr_2VmtCZrQ_8qP3H_tW2OmXT129l1E8H2lqTQn3f6AcIBVVpKhREYVwL1qHpOZGW94P78Ybdqc_AIYEhOsf1caKJQ1e7kDjLXCBFL1NdmFMhCrdwaI2RKqodba0yEp8Jzf00O4WcEqItzntsqEhVfJcRTNluojE2G28eMIUyslZTvL8h20PX53BpmhLaclH5km0uwTq4mj_49ok9qMJmLBWnTdLC02a8atN7H5FQS_WaUw","e":"AQAB"}]}"#;
const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImJlbmNoIn0.eyJpc3MiOiJiZW5jaEBhbWJpdC50ZXN0Iiwic3ViIjoid3JrIiwiYXVkIjoiYmVuY2giLCJpYXQiOjE3NjcyMjU2MDAsImV4cCI6NDEwMjQ0NDgwMH0.yw8tQYIc0lVk4oXZTTZaxy-hFGdjLzbJIXGtc-1SFwV4su3S2H5sfW-Sdyl7uVSS32Qz_r2D8Jc9PYlQmU1oXs4AIkEPt2hiTSLQJCPrjH7d6PySqGt3hispLOjedryt9jtP3rqWaFZhydckf-0BVBOFe8IrfDYfOYrsxRBcx_VAguvmtCzYrY2H6kKySusL7ObMNwcZ9egEwzYUnF-QHwbEYYfKVLJ7BYtuskD-QixZwQOrab_pCYLVu8ggWpJWD3S_lCJ05vqUpPg_-P1N6dmE-Uk3g3iAQFF_-ayH5akfQiClI968oZNA0AJMZa2-o27dv9tNVetvdHLul-nSrg";

/// The header every request of the L7 mode carries.
pub fn authorization() -> String {
    format!("Authorization: Bearer {TOKEN}")
}

/// The config file with both policies, for the `server` pod of [`NAMESPACE`].
pub fn policies() -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: bench-l7-path, namespace: {NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{requestPrincipals: ["bench@ambit.test/wrk"]}}}}]
    to: [{{operation: {{methods: ["GET"], paths: ["{HTTP_KEEPALIVE_PATH}"]}}}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: bench-l7-jwt, namespace: {NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  jwtRules:
  - issuer: bench@ambit.test
    audiences: [bench]
    jwks: '{JWKS}'
"#
    )
}

/// Checks, before any pass, that the L7 mode is what it claims: the server of
/// `bench-l7` answers the bench's request with the token (200), and the proxy decides per
/// request without it (403), with a bad signature (401) and on another path (403); the
/// server of `bench-mesh` answers without a token (no policy there).
pub fn check(node: &Node, l7: (&Pod, &Pod), mesh: (&Pod, &Pod)) -> anyhow::Result<()> {
    let token = authorization();
    // The signature's first byte changed: 'y' to 'z' in base64url.
    let forged = token.replacen(".yw8t", ".zw8t", 1);
    let cases: [(&Pod, &Pod, &str, Option<&str>, u16); 5] = [
        (l7.0, l7.1, HTTP_KEEPALIVE_PATH, Some(&token), 200),
        (l7.0, l7.1, HTTP_KEEPALIVE_PATH, None, 403),
        (l7.0, l7.1, HTTP_KEEPALIVE_PATH, Some(&forged), 401),
        (l7.0, l7.1, "/headers", Some(&token), 403),
        (mesh.0, mesh.1, HTTP_KEEPALIVE_PATH, None, 200),
    ];
    for (client, server, path, header, want) in cases {
        let mut last = None;
        // The agent may still be loading the policies just after it is ready.
        let settled = within(Duration::from_secs(10), || {
            let got = curl(node, client, server, path, header);
            let ok = got.code == want;
            last = Some(got);
            ok
        });
        if settled.is_none() {
            bail!(
                "the L7 mode is not in effect: GET {path} from {}/{} to {}/{} {} answered {:?}, expected {want}",
                client.namespace,
                client.name,
                server.namespace,
                server.name,
                match header {
                    None => "without a token",
                    Some(h) if h == token => "with the bench's token",
                    Some(_) => "with a forged token",
                },
                last
            );
        }
    }
    Ok(())
}

fn curl(node: &Node, client: &Pod, server: &Pod, path: &str, header: Option<&str>) -> CurlResult {
    let mut cmd = node.command(client, "curl");
    cmd.args(["-sS", "--max-time", "3", "-w", "\n%{http_code}"]);
    if let Some(header) = header {
        cmd.args(["-H", header]);
    }
    cmd.arg(format!("http://{}:{HTTP_PORT}{path}", server.ip));
    match cmd.output() {
        Ok(output) => CurlResult::from_output(&output),
        Err(e) => CurlResult {
            code: 0,
            body: format!("cannot run curl: {e}"),
            exit: -1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forged_token_differs_in_its_signature_only() {
        let token = authorization();
        let forged = token.replacen(".yw8t", ".zw8t", 1);
        assert_ne!(forged, token);
        assert_eq!(
            forged.rsplit_once('.').map(|p| p.0),
            token.rsplit_once('.').map(|p| p.0)
        );
    }

    #[test]
    fn the_policies_name_the_route_wrk_requests_and_the_tokens_issuer() {
        let policies = policies();
        assert!(policies.contains(r#"paths: ["/ip"]"#), "{policies}");
        assert!(policies.contains("issuer: bench@ambit.test"), "{policies}");
        assert!(policies.contains(JWKS), "{policies}");
    }
}
