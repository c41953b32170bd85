//! The seed scenario: namespaces `foo` and `bar` enrolled, `legacy` not, each with a
//! client pod `sleep` and a server pod `httpbin` on port 8000, and the agent running;
//! its pods IPv4 (the default), dual-stack or IPv6 only ([`Mesh::with_stack`]).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::Value;

use crate::{AgentOptions, ApiServer, Binaries, CurlResult, Family, Node, Pod, Stack};

pub const HTTP_PORT: u16 = 8000;
/// A second port every `httpbin` serves, for port-level policies.
pub const OTHER_PORT: u16 = 9000;
/// Namespaces of the scenario, in the order of [`Mesh::sleep`] and [`Mesh::httpbin`].
pub const NAMESPACES: [(&str, bool); 3] = [("foo", true), ("bar", true), ("legacy", false)];
pub const FOO: usize = 0;
pub const BAR: usize = 1;
pub const LEGACY: usize = 2;

pub struct Mesh {
    pub node: Node,
    pub sleep: [Pod; 3],
    pub httpbin: [Pod; 3],
    /// The family [`Mesh::url`] and the matrices reach the `httpbin`s over; a test of
    /// dual-stack pods changes it to run them over both.
    pub family: Family,
}

impl Mesh {
    pub fn new(binaries: Binaries) -> anyhow::Result<Self> {
        Self::with_agent(binaries, &AgentOptions::default())
    }

    /// The scenario with the agent started as `agent` says (extra flags, a descriptor
    /// limit).
    pub fn with_agent(binaries: Binaries, agent: &AgentOptions) -> anyhow::Result<Self> {
        Self::build(Node::new(binaries)?, agent, Stack::V4)
    }

    /// The scenario with every pod's addresses as `stack` says; the `httpbin`s listen on
    /// `::` (both families), and the matrices use IPv6 for IPv6-only pods.
    pub fn with_stack(binaries: Binaries, stack: Stack) -> anyhow::Result<Self> {
        Self::with_agent_and_stack(binaries, &AgentOptions::default(), stack)
    }

    /// Both: the agent as `agent` says, the pods' addresses as `stack` says.
    pub fn with_agent_and_stack(
        binaries: Binaries,
        agent: &AgentOptions,
        stack: Stack,
    ) -> anyhow::Result<Self> {
        Self::build(Node::new(binaries)?, agent, stack)
    }

    /// The scenario, its pods' addresses as `stack` says, published to `api`, with the
    /// agent on `--source kubernetes` against it.
    pub fn on_kubernetes(
        binaries: Binaries,
        api: Arc<ApiServer>,
        stack: Stack,
    ) -> anyhow::Result<Self> {
        let kubeconfig = api.kubeconfig().to_owned();
        let mut node = Node::new(binaries)?;
        node.publish_to(api)?;
        let mut agent = AgentOptions::args(&["--source", "kubernetes", "--kubeconfig"]);
        agent.args.push(kubeconfig.into());
        Self::build(node, &agent, stack)
    }

    fn build(mut node: Node, agent: &AgentOptions, stack: Stack) -> anyhow::Result<Self> {
        let mut sleep = Vec::new();
        let mut httpbin = Vec::new();
        for (namespace, enrolled) in NAMESPACES {
            node.namespace(namespace, enrolled)?;
            let labels = |app| [("app", app)];
            sleep.push(node.pod_stack(namespace, "sleep", "sleep", &labels("sleep"), stack)?);
            let server =
                node.pod_stack(namespace, "httpbin", "httpbin", &labels("httpbin"), stack)?;
            for port in [HTTP_PORT, OTHER_PORT] {
                match stack {
                    Stack::V4 => node.serve_http(&server, port)?,
                    Stack::Dual | Stack::V6 => node.serve_http_dual_stack(&server, port)?,
                }
            }
            httpbin.push(server);
        }
        node.start_agent_opts(agent)?;
        let three = |pods: Vec<Pod>| pods.try_into().ok().context("three namespaces");
        Ok(Self {
            node,
            sleep: three(sleep)?,
            httpbin: three(httpbin)?,
            family: match stack {
                Stack::V4 | Stack::Dual => Family::V4,
                Stack::V6 => Family::V6,
            },
        })
    }

    /// `http://<httpbin of namespace index to>:8000<path>`, over [`Mesh::family`].
    pub fn url(&self, to: usize, path: &str) -> String {
        format!(
            "http://{}:{HTTP_PORT}{path}",
            self.httpbin[to].host(self.family)
        )
    }

    /// `curl http://<httpbin>:<port>/ip` from every `sleep` to every `httpbin`, over
    /// [`Mesh::family`]: `result[from][to]`.
    pub fn matrix(&self, port: u16) -> anyhow::Result<Vec<Vec<CurlResult>>> {
        self.sleep
            .iter()
            .map(|client| {
                self.httpbin
                    .iter()
                    .map(|server| {
                        let url = format!("http://{}:{port}/ip", server.host(self.family));
                        self.node.curl(Some(client), &url)
                    })
                    .collect()
            })
            .collect()
    }

    /// The matrix as HTTP codes, `codes[from][to]`.
    pub fn codes(&self, port: u16) -> anyhow::Result<[[u16; 3]; 3]> {
        let matrix = self.matrix(port)?;
        let mut codes = [[0; 3]; 3];
        for (from, row) in matrix.iter().enumerate() {
            for (to, result) in row.iter().enumerate() {
                codes[from][to] = result.code;
            }
        }
        Ok(codes)
    }

    /// Sends one request from the `sleep` of `from` to the `httpbin` of `to` (over
    /// [`Mesh::family`]) with a header unique to this node, while `tcpdump` captures on the
    /// server's veth; returns how many bytes were captured and whether the header crossed
    /// the wire in plaintext.
    pub fn capture_request(&mut self, from: usize, to: usize) -> anyhow::Result<(usize, bool)> {
        let marker = format!("X-Ambit-Marker: plaintext-{}", self.node.id);
        let server = self.httpbin[to].clone();
        let capture = self.node.capture(&server)?;
        let result = self.node.curl_with(
            Some(&self.sleep[from]),
            &["-H", &marker],
            &self.url(to, "/headers"),
        )?;
        let packets = capture.finish()?;
        anyhow::ensure!(result.code == 200, "the marked request failed: {result:?}");
        let seen = packets
            .windows(marker.len())
            .any(|w| w == marker.as_bytes());
        Ok((packets.len(), seen))
    }

    /// Waits (up to 3 s: config changes apply within a second) for the matrix on `port`,
    /// over the mesh's family, to become `expected`, and fails showing the last one seen.
    pub fn assert_matrix(&self, port: u16, expected: [[u16; 3]; 3]) {
        let mut last = [[0; 3]; 3];
        let reached = within(Duration::from_secs(3), || {
            last = self.codes(port).expect("curl");
            last == expected
        });
        assert!(
            reached.is_some(),
            "port {port} over {:?}: rows are from foo, bar, legacy sleep; columns to foo, bar, legacy httpbin\nexpected {expected:?}\n     got {last:?}",
            self.family
        );
    }

    /// Every connection the proxy recorded, in the order it saw them.
    pub fn connections(&self) -> anyhow::Result<Vec<Value>> {
        self.node.agent()?.connections()
    }

    /// Connections the proxy recorded for `workload` (`ns/name`) in `direction`.
    pub fn recorded(&self, workload: &str, direction: &str) -> anyhow::Result<Vec<Value>> {
        self.node.agent()?.recorded(workload, direction)
    }

    /// Fails unless one of `workload`'s inbound records was refused with an error that
    /// says `why` (a refusal names its reason).
    pub fn assert_refused_saying(&self, workload: &str, why: &str) {
        let inbound = self.recorded(workload, "inbound").expect("records");
        assert!(
            inbound
                .iter()
                .any(|c| c["error"].as_str().is_some_and(|e| e.contains(why))),
            "no refusal of {workload} says {why:?}: {inbound:#?}"
        );
    }

    /// The admin API's entry for `workload` (`ns/name`), or null.
    pub fn workload(&self, workload: &str) -> anyhow::Result<Value> {
        self.node.agent()?.workload(workload)
    }
}

/// The codes of a matrix: 200 everywhere but where `refused` says (`(from, to)`: no
/// answer).
pub fn expect(refused: &[(usize, usize)]) -> [[u16; 3]; 3] {
    let mut codes = [[200; 3]; 3];
    for (from, to) in refused {
        codes[*from][*to] = 0;
    }
    codes
}

/// Polls `check` every 20 ms until it holds or `limit` passes; returns the time it took.
pub fn within(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() <= limit {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// `foo/httpbin` behind a Service: `10.96.0.10:80` to its port 8000, named `http` (so the
/// port is declared HTTP).
pub const FOO_HTTPBIN_SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: httpbin}
  ports: [{name: http, port: 80, targetPort: 8000}]
";

/// The policies of the seed's tasks (Istio's mutual TLS migration and authorization), as
/// the tests and the demo apply them.
pub mod policies {
    /// Mesh-wide STRICT mutual TLS (the root namespace's PeerAuthentication).
    pub const MESH_STRICT: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

    /// STRICT mutual TLS for namespace `foo`.
    pub const FOO_STRICT: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec: {mtls: {mode: STRICT}}
";

    /// `foo`'s httpbin: STRICT, but plaintext allowed on port 8000.
    pub const FOO_HTTPBIN_8000_DISABLE: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: STRICT}
  portLevelMtls: {8000: {mode: DISABLE}}
";

    /// `foo`'s httpbin: PERMISSIVE, overriding a namespace policy.
    pub const FOO_HTTPBIN_PERMISSIVE: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: PERMISSIVE}
";

    /// `foo`'s httpbin accepts only `bar`'s sleep, on port 8000.
    pub const ALLOW_BAR_SLEEP: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-bar-sleep, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bar/sa/sleep"]}}]
    to: [{operation: {ports: ["8000"]}}]
"#;

    /// Nothing in `bar` accepts connections from namespace `foo`.
    pub const DENY_FOO_IN_BAR: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-foo, namespace: bar}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["foo"]}}]
"#;

    /// STRICT mutual TLS for namespace `bar`.
    pub const BAR_STRICT: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: bar}
spec: {mtls: {mode: STRICT}}
";

    /// Nothing in `foo` accepts connections from namespace `bar`.
    pub const DENY_BAR: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-bar, namespace: foo}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["bar"]}}]
"#;

    /// The `httpbin` of `namespace` answers GET, except under `/admin`.
    pub fn get_not_admin(namespace: &str) -> String {
        format!(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: get-not-admin, namespace: {namespace}}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  rules:
  - to: [{{operation: {{methods: ["GET"], notPaths: ["/admin*"]}}}}]
"#
        )
    }
}
