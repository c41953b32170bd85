//! End to end: RequestAuthentication (JWT) enforced by the node proxy, with real curl,
//! through HBONE (`foo/sleep`) and plaintext (`legacy/sleep`) to `bar/httpbin`; key sets
//! inline and fetched over HTTPS from a pod (`openssl s_server`); and Istio 1.1's seed
//! end-user task, as the seed writes it, on `foo/httpbin`.

use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ambit_tests::{
    AgentOptions, CurlResult,
    mesh::{BAR, FOO, FOO_HTTPBIN_SERVICE, HTTP_PORT, LEGACY, Mesh, within},
};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

/// The HS256 secrets of the tests' key sets, with their base64url for the JWKs.
const SECRET: &[u8] = b"a-test-secret-of-32-bytes-length";
const SECRET_K: &str = "YS10ZXN0LXNlY3JldC1vZi0zMi1ieXRlcy1sZW5ndGg";
const OTHER_SECRET: &[u8] = b"another-test-secret-of-32-bytes!";
const OTHER_SECRET_K: &str = "YW5vdGhlci10ZXN0LXNlY3JldC1vZi0zMi1ieXRlcyE";

fn jwk(kid: &str, secret: &[u8]) -> Value {
    let k = if secret == SECRET {
        SECRET_K
    } else {
        OTHER_SECRET_K
    };
    json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": k})
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token signed with `secret` under `kid`, with `claims` (plus `exp` an hour ahead
/// unless given).
fn token(kid: &str, secret: &[u8], mut claims: Value) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = json!(now() + 3600);
    }
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
}

/// curl from the `sleep` of `from` to `url` with `args`.
fn curl(mesh: &Mesh, from: usize, args: &[&str], url: &str) -> CurlResult {
    mesh.node
        .curl_with(Some(&mesh.sleep[from]), args, url)
        .expect("curl")
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// Two issuers on `bar/httpbin`: `https://a` read from the default places and verified
/// with an inline key set, `https://b` from `x-jwt: Token …` or `?token=`, forwarded to
/// the app. Requests without a principal are refused.
fn inline_policies() -> String {
    let keys = json!({"keys": [jwk("a1", SECRET)]}).to_string();
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: bar}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: https://a
    audiences: [httpbin]
    jwks: '{keys}'
  - issuer: https://b
    jwks: '{keys}'
    fromHeaders: [{{name: x-jwt, prefix: "Token "}}]
    fromParams: [token]
    forwardOriginalToken: true
  - issuer: https://metadata
    jwksUri: http://169.254.169.254/jwks.json
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: require-jwt, namespace: bar}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  rules:
  - from: [{{source: {{requestPrincipals: ["*"]}}}}]
"#
    )
}

#[test]
fn tokens_are_verified_against_inline_keys_and_invalid_ones_get_401() {
    let mesh = Mesh::new(ambit_tests::test_binaries!()).expect("mesh");
    mesh.node
        .write_file("jwt.yaml", &inline_policies())
        .unwrap();
    let url = |path: &str| mesh.url(BAR, path);
    let valid = token(
        "a1",
        SECRET,
        json!({"iss": "https://a", "sub": "alice", "aud": "httpbin"}),
    );
    let applied = within(Duration::from_secs(3), || {
        curl(&mesh, FOO, &[], &url("/ip")).code == 403
    });
    assert!(applied.is_some(), "the policies were not applied");
    let rejected = [
        (
            "expired",
            token(
                "a1",
                SECRET,
                json!({"iss": "https://a", "aud": "httpbin", "exp": now() - 60}),
            ),
        ),
        (
            "wrong issuer",
            token(
                "a1",
                SECRET,
                json!({"iss": "https://evil", "aud": "httpbin"}),
            ),
        ),
        (
            "wrong audience",
            token("a1", SECRET, json!({"iss": "https://a", "aud": "other"})),
        ),
        (
            "unknown key",
            token("a9", SECRET, json!({"iss": "https://a", "aud": "httpbin"})),
        ),
        (
            "bad signature",
            token(
                "a1",
                OTHER_SECRET,
                json!({"iss": "https://a", "aud": "httpbin"}),
            ),
        ),
    ];
    for from in [FOO, LEGACY] {
        let none = curl(&mesh, from, &[], &url("/ip"));
        assert_eq!(none.code, 403, "from {from}, no token: {none:?}");
        let ok = curl(&mesh, from, &["-H", &bearer(&valid)], &url("/headers"));
        assert_eq!(ok.code, 200, "from {from}: {ok:?}");
        let headers: Value = serde_json::from_str(&ok.body).unwrap();
        assert_eq!(
            headers["headers"]["authorization"],
            Value::Null,
            "the token must not be forwarded: {headers}"
        );
        for (what, bad) in &rejected {
            let result = curl(&mesh, from, &["-H", &bearer(bad)], &url("/ip"));
            assert_eq!(result.code, 401, "from {from}, {what}: {result:?}");
            assert!(result.body.contains("JWT rejected"), "{what}: {result:?}");
        }
        // The second issuer's places, and its token forwarded as configured.
        let b = token("a1", SECRET, json!({"iss": "https://b", "sub": "bob"}));
        let header = curl(
            &mesh,
            from,
            &["-H", &format!("x-jwt: Token {b}")],
            &url("/headers"),
        );
        assert_eq!(header.code, 200, "from {from}: {header:?}");
        assert!(header.body.contains(&b), "forwardOriginalToken: {header:?}");
        let param = curl(&mesh, from, &[], &url(&format!("/ip?token={b}")));
        assert_eq!(param.code, 200, "from {from}: {param:?}");
        // A key set on the cloud metadata address is never fetched (SSRF), so its
        // tokens are refused.
        let ssrf = token("a1", SECRET, json!({"iss": "https://metadata"}));
        let refused = curl(&mesh, from, &["-H", &bearer(&ssrf)], &url("/ip"));
        assert_eq!(refused.code, 401, "from {from}: {refused:?}");
        assert!(refused.body.contains("private"), "{refused:?}");
        // `https://b` in the default place is read by nobody: no principal.
        let misplaced = curl(&mesh, from, &["-H", &bearer(&b)], &url("/ip"));
        assert_eq!(misplaced.code, 401, "from {from}: {misplaced:?}");
    }
}

#[test]
fn a_five_second_token_stops_working_once_it_expires() {
    let mesh = Mesh::new(ambit_tests::test_binaries!()).expect("mesh");
    mesh.node
        .write_file("jwt.yaml", &inline_policies())
        .unwrap();
    let url = mesh.url(BAR, "/ip");
    let short = token(
        "a1",
        SECRET,
        json!({"iss": "https://a", "aud": "httpbin", "exp": now() + 5}),
    );
    // Without the policy every request is 200: it is in force once a bad token is refused.
    let applied = within(Duration::from_secs(3), || {
        curl(&mesh, FOO, &["-H", &bearer("not.a.token")], &url).code == 401
    });
    assert!(applied.is_some(), "the policies were not applied");
    let accepted = curl(&mesh, FOO, &["-H", &bearer(&short)], &url);
    assert_eq!(accepted.code, 200, "{accepted:?}");
    // Expiry plus the default 1 s of clock skew, counted in whole seconds.
    let refused = within(Duration::from_secs(10), || {
        curl(&mesh, LEGACY, &["-H", &bearer(&short)], &url).code == 401
    });
    assert!(refused.is_some(), "an expired token was still accepted");
}

/// `openssl s_server -WWW` serving the files of `dir` over HTTPS on a loopback port of
/// the agent's own network namespace (where a node agent's fetches start), with a
/// certificate signed by a CA the agent is told to trust. Stopped when dropped.
struct KeyServer {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<std::process::Child>,
}

fn openssl(args: &[&str], dir: &Path) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "openssl {args:?}: {output:?}");
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl KeyServer {
    fn start(keys: &Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_owned();
        let d = d.as_path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let ca = [
            &["req", "-x509"],
            &ec[..],
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ];
        openssl(
            &[
                &ca.concat()[..],
                &["-days", "1", "-subj", "/CN=jwks test CA"],
            ]
            .concat(),
            d,
        );
        let csr = [
            &["req"],
            &ec[..],
            &["-keyout", "server.key", "-out", "server.csr"],
        ];
        openssl(&[&csr.concat()[..], &["-subj", "/CN=jwks"]].concat(), d);
        std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "1",
                "-extfile",
                "san.ext",
            ],
            d,
        );
        let mut server = Self {
            dir,
            port: free_port(),
            child: None,
        };
        server.publish(keys);
        let child = std::process::Command::new("openssl")
            .args([
                "s_server",
                "-quiet",
                "-WWW",
                "-cert",
                "server.pem",
                "-key",
                "server.key",
            ])
            .args(["-accept", &format!("127.0.0.1:{}", server.port)])
            .current_dir(d)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        server.child = Some(child);
        let port = server.port;
        let listening = within(Duration::from_secs(5), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(listening.is_some(), "openssl s_server did not start");
        server
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/jwks.json", self.port)
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    fn publish(&self, keys: &Value) {
        std::fs::write(self.dir.path().join("jwks.json"), keys.to_string()).unwrap();
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn keys_are_fetched_over_https_rotated_without_restart_and_never_bypassed_when_unreachable() {
    let keys = KeyServer::start(&json!({"keys": [jwk("k1", SECRET)]}));
    // The key server is on loopback, which only `--allow-private-jwks` permits.
    let ca = keys.ca();
    let options = AgentOptions::args(&["--jwks-ca-file", &ca, "--allow-private-jwks"]);
    let mesh = Mesh::with_agent(ambit_tests::test_binaries!(), &options).expect("mesh");
    // Bound but not listening, so connects are refused for as long as the test runs; and
    // a file name the key server does not have, should the port ever be its.
    let closed = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    closed
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let closed_port = closed.local_addr().unwrap().as_socket().unwrap().port();
    assert_ne!(closed_port, keys.port);
    let unreachable = format!("https://127.0.0.1:{closed_port}/unreachable.json");
    let policy = format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: bar}}
spec:
  jwtRules:
  - {{issuer: https://fetched, jwksUri: "{}"}}
  - {{issuer: https://down, jwksUri: "{unreachable}"}}
"#,
        keys.url()
    );
    mesh.node.write_file("jwt.yaml", &policy).unwrap();
    let url = mesh.url(BAR, "/ip");
    let k1 = token("k1", SECRET, json!({"iss": "https://fetched"}));
    let down = token("k1", SECRET, json!({"iss": "https://down"}));
    // Without a policy every request is 200: the configuration is in force once a token
    // of the unreachable key set is refused.
    let applied = within(Duration::from_secs(5), || {
        curl(&mesh, FOO, &["-H", &bearer(&down)], &url).code == 401
    });
    assert!(
        applied.is_some(),
        "the RequestAuthentication was not applied"
    );
    let fetched = within(Duration::from_secs(5), || {
        curl(&mesh, FOO, &["-H", &bearer(&k1)], &url).code == 200
    });
    assert!(
        fetched.is_some(),
        "{:?}",
        curl(&mesh, FOO, &["-H", &bearer(&k1)], &url)
    );

    // A key set that cannot be fetched never lets a token through.
    for from in [FOO, LEGACY, FOO, LEGACY] {
        let result = curl(&mesh, from, &["-H", &bearer(&down)], &url);
        assert_eq!(result.code, 401, "{result:?}");
        assert!(result.body.contains("unreachable.json"), "{result:?}");
    }

    // The server rotates to a new key: a token of the new key is accepted once the
    // unknown `kid` made the agent fetch again (rate-limited to one fetch per 10 s).
    keys.publish(&json!({"keys": [jwk("k2", OTHER_SECRET)]}));
    let k2 = token("k2", OTHER_SECRET, json!({"iss": "https://fetched"}));
    let rotated = within(Duration::from_secs(15), || {
        curl(&mesh, LEGACY, &["-H", &bearer(&k2)], &url).code == 200
    });
    assert!(
        rotated.is_some(),
        "{:?}",
        curl(&mesh, LEGACY, &["-H", &bearer(&k2)], &url)
    );
}

/// The seed's end-user authentication task (Istio 1.1), its YAML as written but for the
/// key set, which the test serves inline instead of from GitHub.
fn seed_policy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../userspace/tests/fixtures/istio-1.1-authn/seed")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let keys = json!({"keys": [jwk("test", SECRET)]}).to_string();
    let inline = format!("jwks: '{keys}'");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("jwksUri:"))
        .expect("the seed names a jwksUri");
    text.replace(line.trim_start(), &inline)
        .replace("metadata:\n", "metadata:\n  namespace: foo\n")
}

#[test]
fn the_seed_end_user_task_runs_as_written() {
    let mesh = Mesh::new(ambit_tests::test_binaries!()).expect("mesh");
    mesh.node
        .write_file("service.yaml", FOO_HTTPBIN_SERVICE)
        .unwrap();
    let url = |path: &str| format!("http://{}:{HTTP_PORT}{path}", mesh.httpbin[FOO].ip);
    let demo = token(
        "test",
        SECRET,
        json!({"iss": "testing@secure.istio.io", "sub": "testing@secure.istio.io"}),
    );
    let code = |path: &str, token: Option<&str>| {
        let auth = token.map(bearer);
        let args: Vec<&str> = auth.iter().flat_map(|a| ["-H", a.as_str()]).collect();
        curl(&mesh, LEGACY, &args, &url(path)).code
    };

    mesh.node
        .write_file("jwt.yaml", &seed_policy("15-jwt-example.yaml"))
        .unwrap();
    let applied = within(Duration::from_secs(3), || code("/headers", None) == 401);
    assert!(applied.is_some(), "no token: {}", code("/headers", None));
    assert_eq!(code("/headers", Some(&demo)), 200);

    mesh.node
        .write_file(
            "jwt.yaml",
            &seed_policy("16-jwt-example-excluded-paths.yaml"),
        )
        .unwrap();
    let applied = within(Duration::from_secs(3), || code("/user-agent", None) == 200);
    assert!(applied.is_some(), "/user-agent stayed protected");
    assert_eq!(code("/headers", None), 401);

    mesh.node
        .write_file(
            "jwt.yaml",
            &seed_policy("17-jwt-example-included-paths.yaml"),
        )
        .unwrap();
    let applied = within(Duration::from_secs(3), || code("/headers", None) == 200);
    assert!(applied.is_some(), "/headers stayed protected");
    assert_eq!(code("/ip", None), 401);
    assert_eq!(code("/ip", Some(&demo)), 200);
    assert_eq!(code("/user-agent", None), 200);
}
