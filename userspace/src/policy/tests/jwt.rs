//! RequestAuthentication: which rules apply, where tokens are found, verification with
//! inline and remote keys, and how the request is edited.

use std::sync::{Arc, Mutex};

use super::*;
use crate::policy::{
    Reason,
    jwt::{JwtError, KeysError, RemoteKeys},
};
use jsonwebtoken::{EncodingKey, Header, encode, jwk::JwkSet};

const SECRET: &[u8] = b"a-test-secret-of-32-bytes-length";
// base64url(SECRET)
const SECRET_K: &str = "YS10ZXN0LXNlY3JldC1vZi0zMi1ieXRlcy1sZW5ndGg";

fn jwks(kid: &str) -> String {
    format!(r#"{{"keys": [{{"kty": "oct", "kid": "{kid}", "alg": "HS256", "k": "{SECRET_K}"}}]}}"#)
}

/// A RequestAuthentication for `app: web` in `foo` whose inline JWKS holds SECRET as
/// `k1`; `extra` is appended to the rule (indented four spaces).
fn request_authn_with(issuer: &str, extra: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  jwtRules:\n  - issuer: {issuer}\n    audiences: [web]\n    jwks: '{}'\n{extra}",
        jwks("k1")
    )
}

fn request_authn(issuer: &str) -> String {
    request_authn_with(issuer, "")
}

/// The same rule with keys from `jwksUri`.
fn uri_authn(extra: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: https://issuer\n    jwksUri: https://issuer/keys\n{extra}"
    )
}

fn token_with_kid(kid: &str, claims: serde_json::Value) -> String {
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.into());
    encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap()
}

fn token(claims: serde_json::Value) -> String {
    token_with_kid("k1", claims)
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut request = http::Request::builder().uri(uri);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    request.body(()).unwrap().into_parts().0
}

fn jwt_error(denied: &crate::policy::Denied) -> &JwtError {
    assert_eq!(denied.http_status(), 401);
    match &denied.verdict().reason {
        Reason::JwtRejected(error) => error,
        other => panic!("not a JWT rejection: {other}"),
    }
}

/// A [`RemoteKeys`] that serves one set (or fails) and records what it was asked.
struct FakeKeys {
    set: Option<JwkSet>,
    asked: Mutex<Vec<(String, Option<String>)>>,
}

impl FakeKeys {
    fn serving(kid: &str) -> Arc<Self> {
        Arc::new(Self {
            set: Some(serde_json::from_str(&jwks(kid)).unwrap()),
            asked: Mutex::default(),
        })
    }

    fn failing() -> Arc<Self> {
        Arc::new(Self {
            set: None,
            asked: Mutex::default(),
        })
    }
}

impl RemoteKeys for FakeKeys {
    fn lookup(&self, uri: &str, kid: Option<&str>) -> Result<Arc<JwkSet>, KeysError> {
        self.asked
            .lock()
            .unwrap()
            .push((uri.to_owned(), kid.map(str::to_owned)));
        self.set
            .clone()
            .map(Arc::new)
            .ok_or(KeysError::FetchFailed {
                uri: uri.to_owned(),
                cause: "connection refused".to_owned(),
            })
    }
}

fn remote_engine(yaml: &str, keys: Arc<FakeKeys>) -> PolicyEngine {
    engine(yaml).with_remote_keys(keys)
}

#[test]
fn valid_token_yields_request_principal_and_claims() {
    let e = engine(&request_authn("https://issuer"));
    let w = workload("foo", &[("app", "web")]);
    let t = token(
        serde_json::json!({"iss": "https://issuer", "sub": "alice", "aud": "web", "azp": "cli"}),
    );
    let mut p = parts("/", &[("authorization", &format!("Bearer {t}"))]);
    let jwt = e.resolve(&w).authenticate_request(&mut p).unwrap().unwrap();
    assert_eq!(jwt.principal, "https://issuer/alice");
    assert_eq!(jwt.audiences, ["web"]);
    assert_eq!(jwt.presenter.as_deref(), Some("cli"));
}

#[test]
fn invalid_tokens_are_rejected_with_401_naming_the_reason() {
    let e = engine(&request_authn("https://issuer"));
    let policies = e.resolve(&workload("foo", &[("app", "web")]));
    let issuer = || "https://issuer".to_owned();
    let cases: [(&str, String, JwtError); 5] = [
        (
            "wrong audience",
            token(serde_json::json!({"iss": "https://issuer", "aud": "api"})),
            JwtError::WrongAudience(issuer()),
        ),
        (
            "expired",
            token(serde_json::json!({"iss": "https://issuer", "aud": "web", "exp": 1000})),
            JwtError::Expired(issuer()),
        ),
        (
            "not yet valid",
            token(serde_json::json!({"iss": "https://issuer", "aud": "web", "nbf": now() + 600})),
            JwtError::NotYetValid(issuer()),
        ),
        (
            "bad signature",
            format!(
                "{}x",
                token(serde_json::json!({"iss": "https://issuer", "aud": "web"}))
            ),
            JwtError::BadSignature(issuer()),
        ),
        (
            "unknown key",
            token_with_kid(
                "k9",
                serde_json::json!({"iss": "https://issuer", "aud": "web"}),
            ),
            JwtError::UnknownKey {
                issuer: issuer(),
                kid: Some("k9".to_owned()),
            },
        ),
    ];
    for (name, t, expected) in cases {
        let mut p = parts("/", &[("authorization", &format!("Bearer {t}"))]);
        let denied = policies.authenticate_request(&mut p).unwrap_err();
        assert_eq!(jwt_error(&denied), &expected, "{name}");
        assert_eq!(
            denied.verdict().policy.as_ref().unwrap().to_string(),
            "foo/jwt",
            "{name}"
        );
    }
    let mut p = parts("/", &[("authorization", "Bearer not-a-jwt")]);
    let denied = policies.authenticate_request(&mut p).unwrap_err();
    assert!(matches!(jwt_error(&denied), JwtError::Malformed(_)));
}

#[test]
fn a_token_of_an_unknown_issuer_is_rejected_naming_it() {
    let e = engine(&request_authn("https://issuer"));
    let t = token(serde_json::json!({"iss": "https://other"}));
    let mut p = parts("/", &[("authorization", &format!("Bearer {t}"))]);
    let denied = e
        .resolve(&workload("foo", &[("app", "web")]))
        .authenticate_request(&mut p)
        .unwrap_err();
    assert_eq!(
        denied.verdict().reason.to_string(),
        "JWT rejected: issuer \"https://other\" is not accepted in header authorization by any RequestAuthentication of the workload"
    );
}

#[test]
fn a_token_is_verified_only_by_a_rule_that_reads_it_where_it_was_found() {
    // Issuer B reads only x-b; its token in the default header (issuer A's) is refused.
    let yaml = format!(
        "{}  - issuer: https://b\n    jwks: '{}'\n    fromHeaders: [{{name: x-b}}]\n",
        request_authn("https://a"),
        jwks("k1")
    );
    let e = engine(&yaml);
    let policies = e.resolve(&workload("foo", &[("app", "web")]));
    let t = token(serde_json::json!({"iss": "https://b"}));
    let mut p = parts("/", &[("authorization", &format!("Bearer {t}"))]);
    let denied = policies.authenticate_request(&mut p).unwrap_err();
    assert!(matches!(jwt_error(&denied), JwtError::UnknownIssuer { .. }));
    let mut p = parts("/", &[("x-b", &t)]);
    assert!(policies.authenticate_request(&mut p).unwrap().is_some());
}

#[test]
fn no_token_or_no_policy_is_left_to_authorization() {
    let e = engine(&request_authn("https://issuer"));
    let mut p = parts("/", &[]);
    assert_eq!(
        e.resolve(&workload("foo", &[("app", "web")]))
            .authenticate_request(&mut p)
            .unwrap(),
        None
    );
    // No RequestAuthentication applies to `db`: a token is ignored and left in place.
    let mut p = parts("/", &[("authorization", "Bearer x")]);
    assert_eq!(
        e.resolve(&workload("foo", &[("app", "db")]))
            .authenticate_request(&mut p)
            .unwrap(),
        None
    );
    assert_eq!(p.headers["authorization"], "Bearer x");
}

#[test]
fn a_header_value_that_is_not_utf8_holds_no_token() {
    let e = engine(&request_authn("https://issuer"));
    let mut p = parts("/", &[]);
    p.headers.insert(
        "authorization",
        http::HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
    );
    let policies = e.resolve(&workload("foo", &[("app", "web")]));
    assert_eq!(policies.authenticate_request(&mut p).unwrap(), None);
}

#[test]
fn the_token_is_removed_before_forwarding_unless_forward_original_token() {
    let t = token(serde_json::json!({"iss": "https://issuer", "aud": "web"}));
    let bearer = format!("Bearer {t}");
    for (extra, kept) in [("", false), ("    forwardOriginalToken: true\n", true)] {
        let e = engine(&request_authn_with("https://issuer", extra));
        let mut p = parts("/", &[("authorization", &bearer), ("x-other", "1")]);
        let policies = e.resolve(&workload("foo", &[("app", "web")]));
        assert!(policies.authenticate_request(&mut p).unwrap().is_some());
        assert_eq!(p.headers.contains_key("authorization"), kept, "{extra}");
        assert_eq!(p.headers["x-other"], "1");
    }
}

#[test]
fn from_headers_reads_the_named_header_after_its_prefix() {
    let e = engine(&request_authn_with(
        "https://issuer",
        "    fromHeaders: [{name: x-token, prefix: \"T \"}]\n",
    ));
    let policies = e.resolve(&workload("foo", &[("app", "web")]));
    let t = token(serde_json::json!({"iss": "https://issuer", "aud": "web", "sub": "bob"}));
    let mut p = parts("/", &[("X-Token", &format!("T {t}"))]);
    let jwt = policies.authenticate_request(&mut p).unwrap().unwrap();
    assert_eq!(jwt.principal, "https://issuer/bob");
    assert!(!p.headers.contains_key("x-token"));
    // The rule names its locations, so the default one is not read.
    let mut p = parts("/", &[("authorization", &format!("Bearer {t}"))]);
    assert_eq!(policies.authenticate_request(&mut p).unwrap(), None);
    // Without the prefix the header holds no token.
    let mut p = parts("/", &[("x-token", &t)]);
    assert_eq!(policies.authenticate_request(&mut p).unwrap(), None);
}

#[test]
fn from_params_reads_the_query_and_leaves_the_token_there_as_envoy_does() {
    let e = engine(&request_authn_with(
        "https://issuer",
        "    fromParams: [my_token]\n",
    ));
    let policies = e.resolve(&workload("foo", &[("app", "web")]));
    let t = token(serde_json::json!({"iss": "https://issuer", "aud": "web"}));
    let uri = format!("/ip?a=1&my_token={t}");
    let mut p = parts(&uri, &[]);
    assert!(policies.authenticate_request(&mut p).unwrap().is_some());
    assert_eq!(p.uri.to_string(), uri);
    let mut p = parts(&format!("/ip?access_token={t}"), &[]);
    assert_eq!(policies.authenticate_request(&mut p).unwrap(), None);
}

#[test]
fn from_cookies_reads_the_named_cookie() {
    let e = engine(&request_authn_with(
        "https://issuer",
        "    fromCookies: [session]\n",
    ));
    let policies = e.resolve(&workload("foo", &[("app", "web")]));
    let t = token(serde_json::json!({"iss": "https://issuer", "aud": "web"}));
    let cookie = format!("a=1; session={t}");
    let mut p = parts("/", &[("cookie", "other=2"), ("cookie", &cookie)]);
    assert!(policies.authenticate_request(&mut p).unwrap().is_some());
}

#[test]
fn default_locations_are_bearer_and_access_token() {
    let e = engine(&request_authn("https://issuer"));
    let policies = e.resolve(&workload("foo", &[("app", "web")]));
    let t = token(serde_json::json!({"iss": "https://issuer", "aud": "web"}));
    let mut p = parts(&format!("/x?access_token={t}"), &[]);
    assert!(policies.authenticate_request(&mut p).unwrap().is_some());
    let mut p = parts("/", &[("authorization", &format!("Bearer {t}"))]);
    assert!(policies.authenticate_request(&mut p).unwrap().is_some());
    let mut p = parts("/", &[("x-token", &t)]);
    assert_eq!(policies.authenticate_request(&mut p).unwrap(), None);
}

#[test]
fn output_payload_to_header_carries_the_payload_and_cannot_be_forged() {
    let e = engine(&request_authn_with(
        "https://issuer",
        "    outputPayloadToHeader: x-jwt-payload\n",
    ));
    let policies = e.resolve(&workload("foo", &[("app", "web")]));
    let t = token(serde_json::json!({"iss": "https://issuer", "aud": "web"}));
    let mut p = parts(
        "/",
        &[
            ("authorization", &format!("Bearer {t}")),
            ("x-jwt-payload", "forged"),
        ],
    );
    policies.authenticate_request(&mut p).unwrap().unwrap();
    let payload = t.split('.').nth(1).unwrap();
    let values: Vec<_> = p.headers.get_all("x-jwt-payload").iter().collect();
    assert_eq!(values, [payload]);
    // Without a token the forged header is still removed.
    let mut p = parts("/", &[("x-jwt-payload", "forged")]);
    assert_eq!(policies.authenticate_request(&mut p).unwrap(), None);
    assert!(!p.headers.contains_key("x-jwt-payload"));
}

#[test]
fn clock_skew_bounds_how_late_an_expired_token_passes() {
    let yaml = request_authn("https://issuer");
    let t = token(serde_json::json!({"iss": "https://issuer", "aud": "web", "exp": now() - 3}));
    let bearer = format!("Bearer {t}");
    let w = workload("foo", &[("app", "web")]);
    // The default 1 s: three seconds past `exp` is expired (the seed's 5-second token
    // fails about six seconds after it was issued).
    let mut p = parts("/", &[("authorization", &bearer)]);
    let denied = engine(&yaml)
        .resolve(&w)
        .authenticate_request(&mut p)
        .unwrap_err();
    assert!(matches!(jwt_error(&denied), JwtError::Expired(_)));
    let mut p = parts("/", &[("authorization", &bearer)]);
    let lenient = engine(&yaml).with_jwt_clock_skew(std::time::Duration::from_secs(10));
    assert!(
        lenient
            .resolve(&w)
            .authenticate_request(&mut p)
            .unwrap()
            .is_some()
    );
}

#[test]
fn jwks_uri_tokens_verify_with_remote_keys() {
    let keys = FakeKeys::serving("k1");
    let e = remote_engine(&uri_authn(""), keys.clone());
    let t = token(serde_json::json!({"iss": "https://issuer", "sub": "carol"}));
    let mut p = parts("/", &[("authorization", &format!("Bearer {t}"))]);
    let jwt = e
        .resolve(&workload("foo", &[]))
        .authenticate_request(&mut p)
        .unwrap()
        .unwrap();
    assert_eq!(jwt.principal, "https://issuer/carol");
    assert_eq!(
        *keys.asked.lock().unwrap(),
        [("https://issuer/keys".to_owned(), Some("k1".to_owned()))]
    );
}

#[test]
fn a_kid_missing_from_remote_keys_is_rejected_and_reported_to_the_fetcher() {
    let keys = FakeKeys::serving("old");
    let e = remote_engine(&uri_authn(""), keys.clone());
    let t = token_with_kid("new", serde_json::json!({"iss": "https://issuer"}));
    let mut p = parts("/", &[("authorization", &format!("Bearer {t}"))]);
    let denied = e
        .resolve(&workload("foo", &[]))
        .authenticate_request(&mut p)
        .unwrap_err();
    assert!(matches!(jwt_error(&denied), JwtError::UnknownKey { .. }));
    // The fetcher saw the kid, which is what makes it refetch.
    assert_eq!(keys.asked.lock().unwrap()[0].1.as_deref(), Some("new"));
}

#[test]
fn unavailable_remote_keys_reject_the_token_never_pass_it() {
    for keys in [None, Some(FakeKeys::failing())] {
        let e = match &keys {
            Some(keys) => remote_engine(&uri_authn(""), keys.clone()),
            None => engine(&uri_authn("")),
        };
        let t = token(serde_json::json!({"iss": "https://issuer"}));
        let mut p = parts("/", &[("authorization", &format!("Bearer {t}"))]);
        let denied = e
            .resolve(&workload("foo", &[]))
            .authenticate_request(&mut p)
            .unwrap_err();
        let error = jwt_error(&denied);
        assert!(matches!(error, JwtError::KeysUnavailable { .. }), "{error}");
        assert!(error.to_string().contains("https://issuer/keys"), "{error}");
    }
}

#[test]
fn discovery_is_rejected_with_a_clear_reason() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: foo}\nspec:\n  jwtRules:\n  - issuer: https://issuer\n";
    let t = token(serde_json::json!({"iss": "https://issuer"}));
    let mut p = parts("/", &[("authorization", &format!("Bearer {t}"))]);
    let denied = engine(yaml)
        .resolve(&workload("foo", &[]))
        .authenticate_request(&mut p)
        .unwrap_err();
    assert!(
        jwt_error(&denied)
            .to_string()
            .contains("OpenID discovery is not supported")
    );
}

#[test]
fn the_jwks_uris_of_a_configuration_are_listed_for_prefetch() {
    let yaml = format!("{}---\n{}", uri_authn(""), request_authn("https://inline"));
    let uris = crate::policy::jwt::jwks_uris(&objects(&yaml));
    assert_eq!(
        uris.into_iter().collect::<Vec<_>>(),
        ["https://issuer/keys"]
    );
}
