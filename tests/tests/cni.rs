//! The CNI chain, as a container runtime runs it: Debian's reference `bridge` plugin (with
//! `host-local` IPAM) sets up a pod's interface, then `ambit-cni` hands the pod to the agent
//! (`ambit run --cni-socket`). The pods' YAML carries no `ambit.io/netns` annotation: the
//! agent learns the namespace from `ADD`. Without the agent, the plugin asks the API-server
//! double. Run as root (`cargo xtask test`).

use std::{
    ffi::OsStr,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use ambit_tests::{ApiServer, Binaries, Node, Pod, Stack, check, mesh::within};
use serde_json::{Value, json};

/// Where Debian's `containernetworking-plugins` installs the reference plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The CNI pods' bridge and range, apart from the test bed's own `br0` (10.44.0.0/24); the
/// node namespace routes between the two.
const CNI_BRIDGE: &str = "cni0";
const CNI_SUBNET: &str = "10.45.0.0/24";
const HTTP_PORT: u16 = 8000;

fn binaries() -> Binaries {
    ambit_tests::test_binaries!()
}

/// One node's CNI chain: `bridge` then `ambit-cni`, and the sandboxes it set up.
struct Chain {
    node_netns: String,
    ambit_cni: PathBuf,
    socket: PathBuf,
    /// `ambit-cni`'s `kubeconfig`, if any.
    kubeconfig: Option<PathBuf>,
    ipam_dir: PathBuf,
    /// `ip netns` names created for sandboxes, deleted on drop.
    sandboxes: Vec<String>,
}

/// One sandbox: its `ip netns` name and the CNI arguments of its pod.
struct Sandbox {
    netns: String,
    args: String,
}

impl Chain {
    fn new(node: &Node) -> Self {
        // The runtime's namespace is the node's: the bridge plugin creates `cni0` there.
        check(
            node.node_command("sysctl")
                .args(["-qw", "net.ipv4.ip_forward=1"]),
        )
        .unwrap();
        Self {
            node_netns: node.netns.clone(),
            ambit_cni: binaries().ambit.with_file_name("ambit-cni"),
            socket: node.config_dir.with_extension("cni.sock"),
            kubeconfig: None,
            ipam_dir: node.config_dir.with_extension("ipam"),
            sandboxes: Vec::new(),
        }
    }

    /// The plugins' configurations, in chain order, as a conflist would give them.
    fn plugins(&self) -> [(PathBuf, Value); 2] {
        let name = format!("ambit-test-{}", self.node_netns);
        [
            (
                Path::new(CNI_BIN_DIR).join("bridge"),
                json!({
                    "cniVersion": "1.0.0", "name": name, "type": "bridge",
                    "bridge": CNI_BRIDGE, "isGateway": true,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": CNI_SUBNET}]],
                             "routes": [{"dst": "0.0.0.0/0"}], "dataDir": self.ipam_dir},
                }),
            ),
            (self.ambit_cni.clone(), {
                let mut conf = json!({
                    "cniVersion": "1.0.0", "name": name, "type": "ambit-cni",
                    "agent_socket": self.socket, "timeout": 5,
                });
                if let Some(kubeconfig) = &self.kubeconfig {
                    conf["kubeconfig"] = json!(kubeconfig);
                }
                conf
            }),
        ]
    }

    /// A new network namespace for pod `namespace/name`, as the runtime creates a sandbox.
    fn sandbox(&mut self, namespace: &str, name: &str) -> Sandbox {
        let netns = format!("{}-{name}", self.node_netns);
        check(Command::new("ip").args(["netns", "add", &netns])).unwrap();
        self.sandboxes.push(netns.clone());
        let sandbox = Sandbox {
            netns,
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={name};K8S_POD_UID=uid-{name}"
            ),
        };
        // containerd and CRI-O bring `lo` up with the loopback plugin before the chain:
        // the agent's listeners in the pod bind loopback addresses.
        let loopback = json!({"cniVersion": "1.0.0", "name": "cni-loopback", "type": "loopback"});
        let output = self.invoke(
            &Path::new(CNI_BIN_DIR).join("loopback"),
            "ADD",
            &sandbox,
            &loopback,
        );
        assert!(output.status.success(), "loopback ADD: {output:?}");
        sandbox
    }

    /// Runs one plugin per the spec: the reference plugins in the node namespace, where
    /// `bridge` builds `cni0`; `ambit-cni` where the agent runs (this process's namespace,
    /// the host's stand-in), which reaches the API-server double on loopback.
    fn invoke(&self, plugin: &Path, command: &str, sandbox: &Sandbox, conf: &Value) -> Output {
        let mut cmd = if plugin == self.ambit_cni {
            Command::new(plugin)
        } else {
            let mut in_node = Command::new("ip");
            in_node
                .args(["netns", "exec", &self.node_netns])
                .arg(plugin);
            in_node
        };
        let mut child = cmd
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.netns)
            .env(
                "CNI_NETNS",
                Path::new("/var/run/netns").join(&sandbox.netns),
            )
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", &sandbox.args)
            .env("CNI_PATH", CNI_BIN_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// `bridge` ADD: the pod's interface and address; returns its result.
    fn add_interface(&self, sandbox: &Sandbox) -> Value {
        let [(bridge, conf), _] = self.plugins();
        let output = self.invoke(&bridge, "ADD", sandbox, &conf);
        assert!(output.status.success(), "bridge ADD: {output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// `ambit-cni` ADD after `bridge`, with the bridge's result as `prevResult`.
    fn add_ambit(&self, sandbox: &Sandbox, prev: &Value) -> Output {
        let [_, (plugin, mut conf)] = self.plugins();
        conf["prevResult"] = prev.clone();
        self.invoke(&plugin, "ADD", sandbox, &conf)
    }

    /// DEL through the chain in reverse order, each plugin with the ADD's result; every
    /// plugin must succeed and print nothing.
    fn del(&self, sandbox: &Sandbox, result: &Value) {
        for (plugin, mut conf) in self.plugins().into_iter().rev() {
            conf["prevResult"] = result.clone();
            let output = self.invoke(&plugin, "DEL", sandbox, &conf);
            assert!(
                output.status.success(),
                "{} DEL: {output:?}",
                plugin.display()
            );
            assert!(output.stdout.is_empty(), "{output:?}");
        }
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        for netns in &self.sandboxes {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.ipam_dir);
        // The agent leaves its socket file behind when it stops, as any unix listener does.
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The pod's first address in a CNI result.
fn address(result: &Value) -> Ipv4Addr {
    let cidr = result["ips"][0]["address"].as_str().expect("an address");
    cidr.split('/').next().unwrap().parse().unwrap()
}

/// The test bed's view of a pod the chain made, for running commands in it.
fn pod(node: &Node, sandbox: &Sandbox, namespace: &str, name: &str, ip: Ipv4Addr) -> Pod {
    Pod {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        ip,
        service_account: "default".to_owned(),
        labels: Default::default(),
        uid: String::new(),
        netns: sandbox.netns.clone(),
        netns_annotation: false,
        veth: String::new(),
        node: node.id.clone(),
        status_ip: None,
        stack: Stack::V4,
    }
}

/// The pods' YAML as the API server would show them once scheduled and addressed: no
/// `ambit.io/netns` annotation.
fn write_pods(node: &Node, pods: &[&Pod]) {
    let yaml: String = pods
        .iter()
        .map(|p| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}}}\nspec: {{nodeName: \"{}\"}}\nstatus: {{podIP: \"{}\"}}\n",
                p.name, p.namespace, p.node, p.ip
            )
        })
        .collect();
    node.write_file("cni-pods.yaml", &yaml).unwrap();
}

fn start_agent(node: &mut Node, chain: &Chain) {
    node.start_agent_with(&[OsStr::new("--cni-socket"), chain.socket.as_os_str()])
        .unwrap();
}

fn workload(node: &Node, key: &str) -> Value {
    node.agent().unwrap().workload(key).unwrap()
}

fn outbound(node: &Node, key: &str) -> Vec<Value> {
    node.agent().unwrap().recorded(key, "outbound").unwrap()
}

#[test]
fn version_lists_the_spec_versions() {
    let output = Command::new(binaries().ambit.with_file_name("ambit-cni"))
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let version: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(version["cniVersion"], "1.0.0");
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0"))
    );
}

#[test]
fn add_returns_once_the_pod_is_meshed_and_del_releases_it() {
    let mut node = Node::new(binaries()).unwrap();
    node.namespace("foo", true).unwrap();
    let server = node.pod("foo", "server").unwrap();
    node.serve_http(&server, HTTP_PORT).unwrap();
    let mut chain = Chain::new(&node);
    start_agent(&mut node, &chain);

    let sandbox = chain.sandbox("foo", "client");
    let result = chain.add_interface(&sandbox);
    let client = pod(&node, &sandbox, "foo", "client", address(&result));
    write_pods(&node, &[&client]);
    let started = Instant::now();
    let output = chain.add_ambit(&sandbox, &result);
    assert!(output.status.success(), "ambit-cni ADD: {output:?}");
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed, result, "prevResult passes through unchanged");
    eprintln!("ADD took {:?}", started.elapsed());

    // The pod's very first connection, the moment ADD returned.
    let url = format!("http://{}:{HTTP_PORT}/ip", server.ip);
    let response = node.curl(Some(&client), &url).unwrap();
    assert_eq!(response.code, 200, "{response:?}");
    let recorded = outbound(&node, "foo/client");
    assert_eq!(recorded.len(), 1, "{recorded:#?}");
    assert_eq!(
        recorded[0]["destination"],
        format!("{}:{HTTP_PORT}", server.ip)
    );
    assert_eq!(
        workload(&node, "foo/client")["redirection"]["state"],
        "redirected"
    );

    // A restarted agent gets no second ADD: it finds the pod's namespace in its state.
    node.stop_agent().unwrap();
    start_agent(&mut node, &chain);
    assert_eq!(
        workload(&node, "foo/client")["redirection"]["state"],
        "redirected"
    );
    let response = node.curl(Some(&client), &url).unwrap();
    assert_eq!(response.code, 200, "{response:?}");
    assert_eq!(outbound(&node, "foo/client").len(), 1);

    chain.del(&sandbox, &result);
    // The agent forgot the namespace: the pod, still in the configuration, is no longer
    // redirected (the API server would soon remove it too).
    let released = within(Duration::from_secs(5), || {
        workload(&node, "foo/client")["redirection"]["state"] != "redirected"
    });
    assert!(released.is_some(), "{:#}", workload(&node, "foo/client"));
}

#[test]
fn pod_outside_the_mesh_starts_and_a_missing_agent_fails_add() {
    let mut node = Node::new(binaries()).unwrap();
    node.namespace("foo", true).unwrap();
    node.namespace("plain", false).unwrap();
    let mut chain = Chain::new(&node);
    start_agent(&mut node, &chain);

    let sandbox = chain.sandbox("plain", "web");
    let result = chain.add_interface(&sandbox);
    let web = pod(&node, &sandbox, "plain", "web", address(&result));
    write_pods(&node, &[&web]);
    let output = chain.add_ambit(&sandbox, &result);
    assert!(output.status.success(), "ambit-cni ADD: {output:?}");
    assert_eq!(
        workload(&node, "plain/web")["redirection"]["state"],
        "not-enrolled"
    );
    chain.del(&sandbox, &result);

    // Without the agent (and no `kubeconfig` to ask the API server), a pod of an enrolled
    // namespace must not start unmeshed: ADD fails with "try again later" and the runtime
    // retries.
    node.stop_agent().unwrap();
    let sandbox = chain.sandbox("foo", "late");
    let result = chain.add_interface(&sandbox);
    let output = chain.add_ambit(&sandbox, &result);
    assert!(!output.status.success(), "{output:?}");
    let error: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(error["code"], 11, "{error:#}");
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("no answer from the ambit agent"),
        "{error:#}"
    );
    // DEL never fails, agent or not.
    chain.del(&sandbox, &result);
}

/// Issue 11: a broken ambit never stops a pod outside the mesh from starting. With no agent
/// listening, the plugin asks the API server (its `kubeconfig`): a pod in the mesh waits
/// (code 11), a pod outside it starts; a pod the API server does not show, or any pod once
/// the API server is down too, waits.
#[test]
fn without_the_agent_the_api_server_lets_only_pods_outside_the_mesh_start() {
    let api = Arc::new(ApiServer::start().unwrap());
    let mut node = Node::new(binaries()).unwrap();
    node.publish_to(Arc::clone(&api)).unwrap();
    node.namespace("foo", true).unwrap();
    node.namespace("plain", false).unwrap();
    let mut chain = Chain::new(&node);
    chain.kubeconfig = Some(api.kubeconfig().to_owned());
    // No agent is started: nothing listens on the chain's socket.
    let mut added = Vec::new();

    let (sandbox, result, output) = add_pod(&mut chain, &api, "foo", "app", json!({}));
    let error = cni_error(&output);
    assert_eq!(error["code"], 11, "{error:#}");
    let msg = error["msg"].as_str().unwrap();
    assert!(msg.contains("no answer from the ambit agent"), "{error:#}");
    assert!(msg.contains("shows in the mesh"), "{error:#}");
    added.push((sandbox, result));

    let (sandbox, result, output) = add_pod(&mut chain, &api, "plain", "web", json!({}));
    assert_starts_outside_the_mesh(&output, &result, "namespace is not enrolled");
    added.push((sandbox, result));

    let opted_out = json!({"ambit.io/mesh": "disabled"});
    let (sandbox, result, output) = add_pod(&mut chain, &api, "foo", "legacy", opted_out);
    assert_starts_outside_the_mesh(&output, &result, "opted out");
    added.push((sandbox, result));

    // A pod the API server does not show: it cannot tell.
    let sandbox = chain.sandbox("plain", "unknown");
    let result = chain.add_interface(&sandbox);
    let error = cni_error(&chain.add_ambit(&sandbox, &result));
    assert_eq!(error["code"], 11, "{error:#}");
    let details = error["details"].as_str().unwrap();
    assert!(details.contains(r#"pods "unknown" not found"#), "{error:#}");
    added.push((sandbox, result));

    // The API server is down too: nothing can tell that this pod is outside the mesh.
    api.stop();
    let (sandbox, result, output) = add_pod(&mut chain, &api, "plain", "late", json!({}));
    let error = cni_error(&output);
    assert_eq!(error["code"], 11, "{error:#}");
    assert!(
        error["msg"].as_str().unwrap().contains("cannot tell"),
        "{error:#}"
    );
    added.push((sandbox, result));

    for (sandbox, result) in &added {
        chain.del(sandbox, result);
    }
}

/// Creates pod `namespace/name` with `labels` in the API server, then its sandbox through
/// the chain: the sandbox, the bridge's result and `ambit-cni`'s ADD.
fn add_pod(
    chain: &mut Chain,
    api: &ApiServer,
    namespace: &str,
    name: &str,
    labels: Value,
) -> (Sandbox, Value, Output) {
    api.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }))
    .unwrap();
    let sandbox = chain.sandbox(namespace, name);
    let result = chain.add_interface(&sandbox);
    let output = chain.add_ambit(&sandbox, &result);
    (sandbox, result, output)
}

/// The CNI error `ambit-cni` printed for a failed command.
fn cni_error(output: &Output) -> Value {
    assert!(!output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// ADD succeeded without the agent, passing `prev` through, and said why on stderr.
fn assert_starts_outside_the_mesh(output: &Output, prev: &Value, why: &str) {
    assert!(output.status.success(), "ambit-cni ADD: {output:?}");
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed, *prev, "prevResult passes through unchanged");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains("outside the mesh") && log.contains(why),
        "{log}"
    );
}
