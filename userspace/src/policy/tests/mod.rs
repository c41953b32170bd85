//! Table-driven tests of the policy engine: the examples of Istio's security concept page
//! (`examples`), every authorization rule (`authz`), PeerAuthentication resolution
//! (`resolve`), JWT verification (`jwt`), the validation messages (`parse`) and Istio
//! 1.1's authentication policies (`legacy`).

mod authz;
mod bypass;
mod examples;
mod jwt;
mod legacy;
mod parse;
mod resolve;
mod scope;

use std::collections::BTreeMap;

use super::{
    Decision, HttpRequest, MtlsMode, PolicyEngine, PolicyObject, RequestContext, Workload,
    jwt::JwtIdentity,
};

/// Parses a multi-document YAML string of policies.
pub(super) fn objects(yaml: &str) -> Vec<PolicyObject> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .filter(|value| !value.is_null())
        .map(|value| {
            let kind = value["kind"].as_str().unwrap().to_owned();
            PolicyObject::from_yaml(&kind, value).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

pub(super) fn engine(yaml: &str) -> PolicyEngine {
    PolicyEngine::new(&objects(yaml), "istio-system")
}

pub(super) fn workload(namespace: &str, labels: &[(&str, &str)]) -> Workload {
    Workload {
        namespace: namespace.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        service_account: "default".to_owned(),
    }
}

/// An owned request, turned into a borrowed [`RequestContext`] by [`check`].
#[derive(Clone)]
pub(super) struct Req {
    principal: Option<String>,
    namespace: Option<String>,
    source_ip: &'static str,
    remote_ip: Option<&'static str>,
    destination_ip: &'static str,
    port: u16,
    sni: Option<&'static str>,
    http: Option<Http>,
}

#[derive(Clone)]
struct Http {
    method: String,
    path: String,
    host: String,
    headers: Vec<(String, String)>,
    jwt: Option<JwtIdentity>,
}

impl Req {
    /// A TCP connection over mTLS from `<ns>/sa/<sa>`.
    pub(super) fn mtls(namespace: &str, sa: &str) -> Self {
        Self {
            principal: Some(format!("cluster.local/ns/{namespace}/sa/{sa}")),
            namespace: Some(namespace.to_owned()),
            ..Self::plaintext()
        }
    }

    /// A plaintext TCP connection.
    pub(super) fn plaintext() -> Self {
        Self {
            principal: None,
            namespace: None,
            source_ip: "10.0.0.1",
            remote_ip: None,
            destination_ip: "10.0.1.1",
            port: 8000,
            sni: None,
            http: None,
        }
    }

    pub(super) fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    pub(super) fn ip(mut self, ip: &'static str) -> Self {
        self.source_ip = ip;
        self
    }

    pub(super) fn remote(mut self, ip: &'static str) -> Self {
        self.remote_ip = Some(ip);
        self
    }

    pub(super) fn dst(mut self, ip: &'static str) -> Self {
        self.destination_ip = ip;
        self
    }

    pub(super) fn sni(mut self, sni: &'static str) -> Self {
        self.sni = Some(sni);
        self
    }

    fn http_mut(&mut self) -> &mut Http {
        self.http.get_or_insert_with(|| Http {
            method: "GET".into(),
            path: "/".into(),
            host: "httpbin.foo".into(),
            headers: Vec::new(),
            jwt: None,
        })
    }

    /// Makes it an HTTP request with `method` and `path`.
    pub(super) fn http(mut self, method: &str, path: &str) -> Self {
        let http = self.http_mut();
        http.method = method.into();
        http.path = path.into();
        self
    }

    pub(super) fn host(mut self, host: &str) -> Self {
        self.http_mut().host = host.into();
        self
    }

    pub(super) fn header(mut self, name: &str, value: &str) -> Self {
        self.http_mut().headers.push((name.into(), value.into()));
        self
    }

    /// A verified JWT with these claims (`iss`/`sub` make the principal).
    pub(super) fn jwt(mut self, claims: serde_json::Value) -> Self {
        let text = |k: &str| claims[k].as_str().unwrap_or_default().to_owned();
        let audiences = match &claims["aud"] {
            serde_json::Value::String(a) => vec![a.clone()],
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        };
        let jwt = JwtIdentity {
            principal: format!("{}/{}", text("iss"), text("sub")),
            audiences,
            presenter: claims["azp"].as_str().map(String::from),
            claims,
        };
        self.http_mut().jwt = Some(jwt);
        self
    }
}

pub(super) fn check(engine: &PolicyEngine, w: &Workload, req: &Req) -> Decision {
    let headers: Vec<(&str, &str)> = req
        .http
        .iter()
        .flat_map(|h| &h.headers)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let ctx = RequestContext {
        source_principal: req.principal.as_deref(),
        source_namespace: req.namespace.as_deref(),
        source_ip: req.source_ip.parse().unwrap(),
        remote_ip: req.remote_ip.unwrap_or(req.source_ip).parse().unwrap(),
        destination_ip: req.destination_ip.parse().unwrap(),
        destination_port: req.port,
        sni: req.sni,
        http: req.http.as_ref().map(|h| HttpRequest {
            method: &h.method,
            path: &h.path,
            host: &h.host,
            headers: &headers,
            jwt: h.jwt.as_ref(),
        }),
    };
    engine.authorize(w, &ctx)
}

/// The expected outcome: allowed or not, deciding policy and rule.
#[derive(Debug, PartialEq)]
pub(super) struct Expect {
    pub allowed: bool,
    pub policy: Option<&'static str>,
    pub rule: Option<usize>,
}

pub(super) const fn allow(policy: Option<&'static str>, rule: Option<usize>) -> Expect {
    Expect {
        allowed: true,
        policy,
        rule,
    }
}

pub(super) const fn deny(policy: Option<&'static str>, rule: Option<usize>) -> Expect {
    Expect {
        allowed: false,
        policy,
        rule,
    }
}

/// Allowed because no ALLOW policy applies.
pub(super) const ALLOW_DEFAULT: Expect = allow(None, None);

pub(super) fn outcome(decision: &Decision) -> (bool, Option<String>, Option<usize>) {
    let (allowed, v) = match decision {
        Ok(p) => (true, p.verdict()),
        Err(d) => (false, d.verdict()),
    };
    (allowed, v.policy.as_ref().map(|p| p.to_string()), v.rule)
}

/// Runs a table of (case name, workload, request, expectation) against one config.
pub(super) fn run_table(yaml: &str, cases: &[(&str, &Workload, Req, Expect)]) {
    let engine = engine(yaml);
    let mut failures = Vec::new();
    for (name, w, req, expect) in cases {
        let decision = check(&engine, w, req);
        let got = outcome(&decision);
        let want = (expect.allowed, expect.policy.map(String::from), expect.rule);
        if got != want {
            failures.push(format!("{name}: got {got:?}, want {want:?} ({decision:?})"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

pub(super) fn mode(engine: &PolicyEngine, w: &Workload, port: u16) -> MtlsMode {
    engine.peer_authn(w, port)
}
