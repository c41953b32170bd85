//! RequestAuthentication: which rules apply, token lookup and verification.

use super::*;
use crate::policy::Reason;
use jsonwebtoken::{EncodingKey, Header, encode};

const SECRET: &[u8] = b"a-test-secret-of-32-bytes-length";

/// A RequestAuthentication for `app: web` in `foo` whose inline JWKS holds SECRET.
fn request_authn(issuer: &str) -> String {
    // base64url("a-test-secret-of-32-bytes-length")
    let k = "YS10ZXN0LXNlY3JldC1vZi0zMi1ieXRlcy1sZW5ndGg";
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  jwtRules:\n  - issuer: {issuer}\n    audiences: [web]\n    jwks: '{{\"keys\": [{{\"kty\": \"oct\", \"kid\": \"k1\", \"alg\": \"HS256\", \"k\": \"{k}\"}}]}}'\n"
    )
}

fn token(claims: serde_json::Value) -> String {
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k1".into());
    encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap()
}

#[test]
fn valid_token_yields_request_principal_and_claims() {
    let e = engine(&request_authn("https://issuer"));
    let w = workload("foo", &[("app", "web")]);
    let t = token(
        serde_json::json!({"iss": "https://issuer", "sub": "alice", "aud": "web", "azp": "cli"}),
    );
    let jwt = e.resolve(&w).authenticate(Some(&t)).unwrap().unwrap();
    assert_eq!(jwt.principal, "https://issuer/alice");
    assert_eq!(jwt.audiences, ["web"]);
    assert_eq!(jwt.presenter.as_deref(), Some("cli"));
}

#[test]
fn invalid_tokens_are_rejected_with_401() {
    let e = engine(&request_authn("https://issuer"));
    let w = workload("foo", &[("app", "web")]);
    let policies = e.resolve(&w);
    let cases = [
        ("garbage", "not-a-jwt".to_owned(), "malformed"),
        (
            "unknown issuer",
            token(serde_json::json!({"iss": "https://other"})),
            "not accepted",
        ),
        (
            "wrong audience",
            token(serde_json::json!({"iss": "https://issuer", "aud": "api"})),
            "invalid token",
        ),
        (
            "expired",
            token(serde_json::json!({"iss": "https://issuer", "aud": "web", "exp": 1000})),
            "invalid token",
        ),
        (
            "bad signature",
            format!(
                "{}x",
                token(serde_json::json!({"iss": "https://issuer", "aud": "web"}))
            ),
            "invalid token",
        ),
    ];
    for (name, t, needle) in cases {
        let denied = policies.authenticate(Some(&t)).unwrap_err();
        assert_eq!(denied.http_status(), 401, "{name}");
        let Reason::JwtRejected(error) = &denied.verdict().reason else {
            panic!("{name}")
        };
        assert!(error.to_string().contains(needle), "{name}: {error}");
    }
}

#[test]
fn no_token_or_no_policy_is_left_to_authorization() {
    let e = engine(&request_authn("https://issuer"));
    assert_eq!(
        e.resolve(&workload("foo", &[("app", "web")]))
            .authenticate(None)
            .unwrap(),
        None
    );
    // No RequestAuthentication applies to `db`: a token is ignored, as in Istio.
    assert_eq!(
        e.resolve(&workload("foo", &[("app", "db")]))
            .authenticate(Some("x"))
            .unwrap(),
        None
    );
}

#[test]
fn token_is_found_in_default_and_configured_locations() {
    let e = engine(&request_authn("https://issuer"));
    let p = e.resolve(&workload("foo", &[("app", "web")]));
    assert_eq!(
        p.find_token(&[("authorization", "Bearer abc")], "/"),
        Some("abc")
    );
    assert_eq!(p.find_token(&[], "/x?access_token=def"), Some("def"));
    assert_eq!(p.find_token(&[("x-token", "abc")], "/"), None);
    let custom = request_authn("https://issuer").replace(
        "    audiences: [web]\n",
        "    audiences: [web]\n    fromHeaders: [{name: x-token, prefix: \"T \"}]\n",
    );
    let e = engine(&custom);
    let p = e.resolve(&workload("foo", &[("app", "web")]));
    assert_eq!(p.find_token(&[("X-Token", "T abc")], "/"), Some("abc"));
}

#[test]
fn jwks_uri_tokens_fail_closed() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: foo}\nspec:\n  jwtRules:\n  - issuer: https://issuer\n    jwksUri: https://issuer/keys\n";
    let e = engine(yaml);
    let t = token(serde_json::json!({"iss": "https://issuer"}));
    let denied = e
        .resolve(&workload("foo", &[]))
        .authenticate(Some(&t))
        .unwrap_err();
    assert!(
        denied
            .verdict()
            .reason
            .to_string()
            .contains("does not fetch")
    );
    assert_eq!(
        denied.verdict().policy.as_ref().unwrap().to_string(),
        "foo/jwt"
    );
}
