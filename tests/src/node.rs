//! A node: its network namespace and bridge, its pods, its cgroup and the YAML that
//! describes them.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::{
    ApiServer,
    agent::Agent,
    run::{Binaries, CurlResult, check, command_line, ip},
};

/// The bridge's address of the first node; its pods get the following addresses of the
/// /24. A node that [`Node::join`]s it takes [`JOINED_NODE_IP`] and pods from
/// [`JOINED_FIRST_HOST`] on, on the same layer-2 segment.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 44, 0, 1);
const JOINED_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 44, 0, 254);
const JOINED_FIRST_HOST: u8 = 100;
const PREFIX: u8 = 24;
/// Every pod also gets two IPv6 addresses on `eth0`, derived from the last octet of its
/// IPv4 address: `fd44::44:<octet>/64` and the link-local `fe80::44:<octet>/64`. Added with
/// `nodad`, so they are usable at once (duplicate address detection would hold them back
/// for a second or more). Which of its addresses a pod has in `status.podIPs`, and whether
/// it has its IPv4 address at all, is its [`Stack`]: an IPv4 pod's IPv6 addresses are
/// unknown to the agent, which tests use to check that IPv6 cannot go around the mesh.
const IPV6_PREFIX: [u16; 4] = [0xfd44, 0, 0, 0];
const LINK_LOCAL_PREFIX: [u16; 4] = [0xfe80, 0, 0, 0];
/// The gRPC echo server and client (`echo.py serve` / `echo.py call`) in this crate's
/// sources: the path is fixed when the crate is compiled, whichever directory the tests
/// then run in.
pub const GRPC_ECHO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grpc/echo.py");

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

/// The addresses a pod has, as its `status.podIPs` shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// Its IPv4 address only (it still has IPv6 addresses on `eth0`, unknown to the agent).
    V4,
    /// Both, IPv4 first (the primary).
    Dual,
    /// Its IPv6 address only: `eth0` has no IPv4 address.
    V6,
}

/// An address family, to pick which of a pod's addresses to reach it at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// A pod: a network namespace on the node's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// Its IPv4 address; an IPv6-only pod ([`Stack::V6`]) does not have it, only the IPv6
    /// addresses derived from it.
    pub ip: Ipv4Addr,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// `metadata.uid`, shaped as the API server makes them (a UUID).
    pub uid: String,
    /// `ip netns` name.
    pub netns: String,
    /// Whether the configuration names the namespace (`ambit.io/netns`); without it the
    /// agent must find the namespace itself (see [`Node::hide_netns`]).
    pub netns_annotation: bool,
    /// The node side of the pod's veth pair, in the node namespace.
    pub veth: String,
    /// The id of the node the pod runs on (`spec.nodeName`).
    pub node: String,
    /// `status.podIP` when it is not [`Pod::ip`] (see [`Node::set_pod_ip`]).
    pub status_ip: Option<IpAddr>,
    pub stack: Stack,
}

impl Pod {
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }

    /// The pod's unique-local IPv6 address, `fd44::44:<last octet of its IPv4>`.
    pub fn ipv6(&self) -> Ipv6Addr {
        ipv6_host(IPV6_PREFIX, self.ip)
    }

    /// The pod's link-local IPv6 address, `fe80::44:<last octet of its IPv4>` (on `eth0`).
    pub fn link_local(&self) -> Ipv6Addr {
        ipv6_host(LINK_LOCAL_PREFIX, self.ip)
    }

    /// The addresses the configuration shows as `status.podIPs`, `status.podIP` first.
    pub fn pod_ips(&self) -> Vec<IpAddr> {
        match (self.status_ip, self.stack) {
            (Some(ip), _) => vec![ip],
            (None, Stack::V4) => vec![self.ip.into()],
            (None, Stack::Dual) => vec![self.ip.into(), self.ipv6().into()],
            (None, Stack::V6) => vec![self.ipv6().into()],
        }
    }

    /// The pod's address of `family`.
    pub fn addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.ip.into(),
            Family::V6 => self.ipv6().into(),
        }
    }

    /// The host part of a URL reaching the pod over `family`: `10.44.0.2` or `[fd44::44:2]`.
    pub fn host(&self, family: Family) -> String {
        match family {
            Family::V4 => self.ip.to_string(),
            Family::V6 => format!("[{}]", self.ipv6()),
        }
    }
}

fn ipv6_host(prefix: [u16; 4], ip: Ipv4Addr) -> Ipv6Addr {
    let [p0, p1, p2, p3] = prefix;
    Ipv6Addr::new(p0, p1, p2, p3, 0, 0, 0x44, u16::from(ip.octets()[3]))
}

/// How the test bed starts a node's agent.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// Extra `ambit run` arguments.
    pub args: Vec<OsString>,
    /// Starts the agent under `prlimit --nofile=N:N`: a hard limit the agent cannot raise
    /// (it raises its soft limit to the hard one), to test what happens when its
    /// descriptors run out.
    pub nofile: Option<u64>,
    /// The agent cannot serve every pod (another process holds a pod's ports), so it will
    /// not be ready: starting waits only until its readiness endpoint answers.
    pub unready: bool,
}

impl AgentOptions {
    /// Options with these `ambit run` arguments.
    pub fn args(args: &[&str]) -> Self {
        Self {
            args: args.iter().map(OsString::from).collect(),
            ..Self::default()
        }
    }

    /// Options for an agent that will not be ready (see [`Self::unready`]).
    pub fn not_ready() -> Self {
        Self {
            unready: true,
            ..Self::default()
        }
    }
}

pub struct Node {
    /// Unique per process and node; part of every global name.
    pub id: String,
    pub binaries: Binaries,
    /// `ip netns` name of the node namespace (holds the bridge).
    pub netns: String,
    /// The cgroup the kernel programs attach to; the pods' processes run in it.
    pub cgroup: PathBuf,
    /// The agent runs in this child of [`Node::cgroup`], as a DaemonSet's agent sits below
    /// the cgroup the programs attach to in production: its own sockets go through the
    /// programs, so every test exercises how the kernel tells the proxy from a pod.
    pub agent_cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub config_dir: PathBuf,
    /// This node's address on the bridge, and the host number of its first pod.
    ip: Ipv4Addr,
    first_host: u8,
    namespaces: BTreeMap<String, bool>,
    pods: Vec<Pod>,
    /// Pods of other nodes this node's configuration knows about.
    remote_pods: Vec<Pod>,
    processes: Vec<Child>,
    agent: Option<Agent>,
    /// The API server double the model is also published to, and what was last
    /// published there per object: only changes are applied, so an object a test deleted
    /// there stays deleted.
    api: Option<(Arc<ApiServer>, BTreeMap<String, Value>)>,
}

impl Node {
    /// Creates the node namespace with its bridge, a cgroup for the pods' processes, and an
    /// empty config directory.
    pub fn new(binaries: Binaries) -> anyhow::Result<Self> {
        Self::create(binaries, NODE_IP, 2)
    }

    /// A second node on this node's layer-2 segment (the two bridges are linked), with
    /// its own agent, cgroup and configuration.
    pub fn join(&self) -> anyhow::Result<Self> {
        let node = Self::create(self.binaries.clone(), JOINED_NODE_IP, JOINED_FIRST_HOST)?;
        ip(&[
            "-n",
            &self.netns,
            "link",
            "add",
            "uplink",
            "type",
            "veth",
            "peer",
            "name",
            "uplink",
            "netns",
            &node.netns,
        ])?;
        for netns in [&self.netns, &node.netns] {
            ip(&["-n", netns, "link", "set", "uplink", "master", "br0", "up"])?;
        }
        Ok(node)
    }

    fn create(binaries: Binaries, node_ip: Ipv4Addr, first_host: u8) -> anyhow::Result<Self> {
        let id = format!(
            "{:x}{}",
            std::process::id() & 0xffff,
            NEXT_NODE.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup_root = cgroup2_root()?;
        let cgroup = cgroup_root.join(format!("ambit-test-{id}"));
        let mut node = Self {
            netns: format!("ambit-{id}-node"),
            agent_cgroup: cgroup.join("agent"),
            cgroup,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/ambit-test-{id}")),
            config_dir: std::env::temp_dir().join(format!("ambit-test-{id}")),
            id,
            binaries,
            ip: node_ip,
            first_host,
            namespaces: BTreeMap::new(),
            pods: Vec::new(),
            remote_pods: Vec::new(),
            processes: Vec::new(),
            agent: None,
            api: None,
        };
        // From here on, Drop cleans up whatever was created.
        ip(&["netns", "add", &node.netns])?;
        let n = node.netns.clone();
        ip(&["-n", &n, "link", "set", "lo", "up"])?;
        // No multicast snooping: IPv6 neighbour discovery between pods must not depend on
        // the bridge having seen MLD reports.
        ip(&[
            "-n",
            &n,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&[
            "-n",
            &n,
            "addr",
            "add",
            &format!("{node_ip}/{PREFIX}"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &n, "link", "set", "br0", "up"])?;
        for cgroup in [&node.cgroup, &node.agent_cgroup] {
            std::fs::create_dir_all(cgroup)
                .with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
        }
        std::fs::create_dir_all(&node.config_dir)?;
        node.write_config()?;
        Ok(node)
    }

    /// Declares a Kubernetes namespace, labelled `ambit.io/mesh=enabled` when `enrolled`.
    pub fn namespace(&mut self, name: &str, enrolled: bool) -> anyhow::Result<()> {
        self.namespaces.insert(name.to_owned(), enrolled);
        self.write_config()
    }

    /// Creates a pod: a network namespace with `lo` up and `eth0` on the bridge.
    pub fn pod(&mut self, namespace: &str, name: &str) -> anyhow::Result<Pod> {
        self.pod_with(namespace, name, "default", &[])
    }

    pub fn pod_with(
        &mut self,
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<Pod> {
        let node = self.id.clone();
        self.pod_on(&node, namespace, name, service_account, labels)
    }

    /// A pod whose `spec.nodeName` is `node`. With a node that has no agent here, this
    /// node's agent treats it as a mesh pod elsewhere and tunnels to its IP on 15008, so
    /// whatever listens there in the pod's namespace plays that node's proxy.
    pub fn pod_on(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<Pod> {
        self.create_pod(node, namespace, name, service_account, labels, Stack::V4)
    }

    /// A pod of this node with the addresses `stack` says.
    pub fn pod_stack(
        &mut self,
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: &[(&str, &str)],
        stack: Stack,
    ) -> anyhow::Result<Pod> {
        let node = self.id.clone();
        self.create_pod(&node, namespace, name, service_account, labels, stack)
    }

    fn create_pod(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: &[(&str, &str)],
        stack: Stack,
    ) -> anyhow::Result<Pod> {
        let index = self.pods.len();
        let host_octet = u8::try_from(index)
            .ok()
            .and_then(|i| i.checked_add(self.first_host))
            .context("too many pods on one node")?;
        let [a, b, c, _] = self.ip.octets();
        let pod = Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ip: Ipv4Addr::new(a, b, c, host_octet),
            service_account: service_account.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            // The node's id is hex digits, as a UUID's are.
            uid: format!("{:0>8}-0000-4000-8000-{index:012x}", self.id),
            netns: format!("ambit-{}-p{index}", self.id),
            netns_annotation: true,
            veth: format!("veth{index}"),
            node: node.to_owned(),
            status_ip: None,
            stack,
        };
        let (node, netns, veth) = (&self.netns, &pod.netns, pod.veth.clone());
        ip(&["netns", "add", netns])?;
        self.pods.push(pod.clone());
        ip(&[
            "-n", node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
            netns,
        ])?;
        ip(&["-n", node, "link", "set", &veth, "master", "br0", "up"])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        if stack != Stack::V6 {
            ip(&[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{}/{PREFIX}", pod.ip),
                "dev",
                "eth0",
            ])?;
        }
        for v6 in [pod.ipv6(), pod.link_local()] {
            ip(&[
                "-n",
                netns,
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        if stack != Stack::V6 {
            ip(&[
                "-n",
                netns,
                "route",
                "add",
                "default",
                "via",
                &self.ip.to_string(),
            ])?;
        }
        self.write_config()?;
        Ok(pod)
    }

    /// Changes a pod's labels (e.g. `ambit.io/mesh=disabled`) in the YAML.
    pub fn label_pod(&mut self, pod: &Pod, key: &str, value: &str) -> anyhow::Result<()> {
        self.model(pod)?
            .labels
            .insert(key.to_owned(), value.to_owned());
        self.write_config()
    }

    /// Sets label `key` to `value` on every pod of `namespace`, in one write.
    pub fn label_namespace_pods(
        &mut self,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> anyhow::Result<()> {
        for pod in self.pods.iter_mut().filter(|p| p.namespace == namespace) {
            pod.labels.insert(key.to_owned(), value.to_owned());
        }
        self.write_config()
    }

    /// Changes a pod's `spec.serviceAccountName` (its identity) in the YAML.
    pub fn set_service_account(&mut self, pod: &Pod, account: &str) -> anyhow::Result<()> {
        account.clone_into(&mut self.model(pod)?.service_account);
        self.write_config()
    }

    /// Leaves the `ambit.io/netns` annotation out of the pod's YAML, as the API server shows
    /// a pod.
    pub fn hide_netns(&mut self, pod: &Pod) -> anyhow::Result<()> {
        self.model(pod)?.netns_annotation = false;
        self.write_config()
    }

    /// The cgroup a kubelet with the systemd cgroup driver gives a containerd container of
    /// `pod` (best-effort QoS), below the node's cgroup.
    pub fn container_cgroup(&self, pod: &Pod) -> PathBuf {
        self.cgroup
            .join("kubepods.slice/kubepods-besteffort.slice")
            .join(format!(
                "kubepods-besteffort-pod{}.slice",
                pod.uid.replace('-', "_")
            ))
            .join(format!("cri-containerd-{}.scope", "0a".repeat(32)))
    }

    /// Starts a process that only waits (a sandbox's `pause`) in `pod`'s network namespace
    /// and in `cgroup`, a descendant of the node's cgroup created as needed; returns its
    /// PID once it is in both. Stopped, and its cgroups removed, when the node is dropped.
    pub fn start_process_in(&mut self, pod: &Pod, cgroup: &Path) -> anyhow::Result<u32> {
        if !cgroup.starts_with(&self.cgroup) {
            bail!("{} is not below the node's cgroup", cgroup.display());
        }
        std::fs::create_dir_all(cgroup)
            .with_context(|| format!("cannot create cgroup {}", cgroup.display()))?;
        let mut cmd = self.command_in(cgroup, pod, "sleep");
        cmd.arg("infinity");
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", command_line(&cmd)))?;
        let pid = child.id();
        self.processes.push(child);
        let netns = |path: &Path| std::fs::metadata(path).map(|m| m.ino()).ok();
        let target = netns(&pod.netns_path());
        for _ in 0..100 {
            if target.is_some() && netns(Path::new(&format!("/proc/{pid}/ns/net"))) == target {
                return Ok(pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("process {pid} did not enter {} within 5 s", pod.netns)
    }

    /// Shows `ip` as the pod's only `status.podIP` (its interfaces keep their addresses).
    pub fn set_pod_ip(&mut self, pod: &Pod, ip: IpAddr) -> anyhow::Result<()> {
        self.model(pod)?.status_ip = Some(ip);
        self.write_config()
    }

    /// This node's record of `pod`.
    fn model(&mut self, pod: &Pod) -> anyhow::Result<&mut Pod> {
        self.pods
            .iter_mut()
            .find(|p| p.netns == pod.netns)
            .context("no such pod")
    }

    /// The agent's state directory (its CA root survives agent restarts).
    pub fn state_dir(&self) -> PathBuf {
        self.config_dir.with_extension("state")
    }

    /// The root certificate of the agent's CA.
    pub fn root_cert(&self) -> PathBuf {
        self.state_dir().join("ca/root-cert.pem")
    }

    /// A certificate for `id` signed by the agent's CA root, and its key, written to `dir`
    /// (paths: certificate, key): what a peer proxy sharing the root presents, without an
    /// agent of its own.
    pub fn workload_certificate(&self, dir: &Path, id: &str) -> anyhow::Result<[String; 2]> {
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let (key, csr, cert, ext) = (
            path("key.pem"),
            path("csr.pem"),
            path("cert.pem"),
            path("ext.cnf"),
        );
        std::fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=critical,URI:{id}\n"
            ),
        )?;
        check(Command::new("openssl").args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-subj",
            "/O=elsewhere",
            "-out",
            &csr,
        ]))?;
        let root_key = self.state_dir().join("ca/root-key.pem");
        check(Command::new("openssl").args([
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &self.root_cert().to_string_lossy(),
            "-CAkey",
            &root_key.to_string_lossy(),
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ]))?;
        Ok([cert, key])
    }

    /// A Python HBONE peer from `tests/hbone/` run in the node namespace, given the
    /// HBONE address of `server` and the target `server`:`port` as its first arguments.
    pub fn hbone_peer(&self, script: &str, server: &Pod, port: u16) -> Command {
        let mut cmd = self.node_command("python3");
        cmd.arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("hbone")
                .join(script),
        )
        .arg(format!("{}:15008", server.ip))
        .arg(format!("{}:{port}", server.ip));
        cmd
    }

    /// The node's own address on the bridge.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Adds a pod of another node to this node's configuration, as a cluster-wide source
    /// would show it; `service_account` overrides the pod's own (a configuration that lies).
    pub fn learn(&mut self, pod: &Pod, service_account: Option<&str>) -> anyhow::Result<()> {
        let mut pod = pod.clone();
        if let Some(sa) = service_account {
            pod.service_account = sa.to_owned();
        }
        self.remote_pods.retain(|p| p.netns != pod.netns);
        self.remote_pods.push(pod);
        self.write_config()
    }

    /// A command that runs inside `pod`: in its network namespace and in the node's cgroup,
    /// where a kubelet would have put it.
    pub fn command(&self, pod: &Pod, program: &str) -> Command {
        self.command_in(&self.cgroup, pod, program)
    }

    /// A command in `pod`'s network namespace and in `cgroup`.
    fn command_in(&self, cgroup: &Path, pod: &Pod, program: &str) -> Command {
        let mut cmd = Command::new("sh");
        // Join the cgroup first: `nsenter` keeps the cgroup, `ip netns exec` would hide /sys.
        cmd.args([
            "-c",
            r#"echo $$ > "$1" && n="$2" && shift 2 && exec nsenter --net="$n" -- "$@""#,
            "sh",
        ])
        .arg(cgroup.join("cgroup.procs"))
        .arg(pod.netns_path())
        .arg(program);
        cmd
    }

    /// A command in the node namespace (not in any pod).
    pub fn node_command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]);
        cmd
    }

    /// Starts `ambit-httpbin` on `port` in `pod`; stopped when the node is dropped.
    pub fn serve_http(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        let program = self.binaries.httpbin.to_string_lossy().into_owned();
        self.serve(pod, &program, &[&port.to_string()], port)
    }

    /// Starts `ambit-httpbin` on `[::]:port` in `pod`: dual-stack, it answers IPv4 and IPv6,
    /// as an application listening on `::` does.
    pub fn serve_http_dual_stack(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        let program = self.binaries.httpbin.to_string_lossy().into_owned();
        self.serve(pod, &program, &[&port.to_string(), "::"], port)
    }

    /// Starts the gRPC echo server (`tests/grpc/echo.py`, service `ambit.test.Echo`) on
    /// `[::]:port` and `0.0.0.0:port` in `pod`; it logs `GRPC /ambit.test.Echo/<Method>`
    /// per call to [`Node::app_log`]. Stopped when the node is dropped.
    pub fn serve_grpc(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        self.serve(
            pod,
            "python3",
            &[GRPC_ECHO, "serve", &port.to_string()],
            port,
        )
    }

    /// Calls `/ambit.test.Echo/<method>` on `target` (`HOST:PORT`, `[v6]:PORT`) from
    /// `from` over h2c with `metadata`, and returns what the client printed:
    /// `OK <reply>` or `STATUS <code name> <details>` (e.g. `STATUS PERMISSION_DENIED ...`).
    /// The call gives up after 3 s (`STATUS DEADLINE_EXCEEDED ...`).
    pub fn grpc_call(
        &self,
        from: &Pod,
        target: &str,
        method: &str,
        metadata: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let mut cmd = self.command(from, "python3");
        cmd.args([GRPC_ECHO, "call", target, method]);
        for (key, value) in metadata {
            cmd.arg("--metadata").arg(format!("{key}={value}"));
        }
        let output = check(&mut cmd)?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Starts `ambit-hold serve` in `pod` on `port`: it accepts connections and holds them
    /// open, echoing, until the node is dropped.
    pub fn serve_hold(&mut self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        let hold = self.binaries.hold.to_string_lossy().into_owned();
        self.serve(pod, &hold, &["serve", &port.to_string()], port)
    }

    /// Starts the server `program ARGS...` in `pod` and waits until something listens on
    /// `port` there; stopped when the node is dropped. Its stdout is appended to the log
    /// [`Node::app_log`] reads, its stderr to a file next to it that a failed start quotes.
    pub fn serve(
        &mut self,
        pod: &Pod,
        program: &str,
        args: &[&str],
        port: u16,
    ) -> anyhow::Result<()> {
        let log = self.app_log_path(pod, port);
        let stderr = log.with_extension("stderr");
        std::fs::create_dir_all(self.apps_dir())?;
        let append = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))
        };
        let mut cmd = self.command(pod, program);
        cmd.args(args)
            .stdout(append(&log)?)
            .stderr(append(&stderr)?);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", command_line(&cmd)))?;
        self.processes.push(child);
        self.wait_listening(pod, port).with_context(|| {
            format!(
                "{} said on stderr: {}",
                command_line(&cmd),
                std::fs::read_to_string(&stderr).unwrap_or_default().trim()
            )
        })
    }

    /// What the application [`Node::serve`] started on `port` in `pod` wrote on stdout so
    /// far: for `ambit-httpbin` one `REQ <METHOD> <path> <version>` line per request, for
    /// the gRPC server one `GRPC <path>` line per call. Panics when no application was
    /// started there, so that a test never reads an empty log by mistake.
    pub fn app_log(&self, pod: &Pod, port: u16) -> String {
        let path = self.app_log_path(pod, port);
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "no application log for port {port} in pod {} ({}): {e}",
                pod.name,
                path.display()
            )
        })
    }

    /// The directory of the applications' logs, one per pod and port.
    fn apps_dir(&self) -> PathBuf {
        self.config_dir.with_extension("apps")
    }

    fn app_log_path(&self, pod: &Pod, port: u16) -> PathBuf {
        self.apps_dir()
            .join(format!("{}-{}-{port}.log", pod.netns, pod.name))
    }

    /// `curl` from `pod` (or from the node namespace when `None`) to `url`.
    pub fn curl(&self, from: Option<&Pod>, url: &str) -> anyhow::Result<CurlResult> {
        self.curl_with(from, &[], url)
    }

    /// [`Self::curl`] with more curl options (`-X POST`, `-H ...`, `--http2-prior-knowledge`).
    pub fn curl_with(
        &self,
        from: Option<&Pod>,
        args: &[&str],
        url: &str,
    ) -> anyhow::Result<CurlResult> {
        let mut cmd = match from {
            Some(pod) => self.command(pod, "curl"),
            None => self.node_command("curl"),
        };
        // `-g`: brackets are an IPv6 literal (`http://[fd44::5]:8000/`), not a glob.
        cmd.args(["-sS", "-g", "--max-time", "3", "-w", "\n%{http_code}"])
            .args(args)
            .arg(url);
        let output = cmd.output().context("cannot run curl")?;
        Ok(CurlResult::from_output(&output))
    }

    /// Starts the agent for this node and waits until it is ready.
    pub fn start_agent(&mut self) -> anyhow::Result<&Agent> {
        self.start_agent_with(&[])
    }

    /// Starts the agent with extra `ambit run` arguments.
    pub fn start_agent_with(&mut self, args: &[&std::ffi::OsStr]) -> anyhow::Result<&Agent> {
        self.start_agent_opts(&AgentOptions {
            args: args.iter().map(|a| a.to_os_string()).collect(),
            ..AgentOptions::default()
        })
    }

    /// Starts the agent as `options` say, and waits until it is ready (unless
    /// [`AgentOptions::unready`]).
    pub fn start_agent_opts(&mut self, options: &AgentOptions) -> anyhow::Result<&Agent> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        let agent = Agent::start(self, options, self.agent_log())?;
        Ok(self.agent.insert(agent))
    }

    /// Stops the agent (SIGTERM) and waits for it to exit.
    pub fn stop_agent(&mut self) -> anyhow::Result<()> {
        match self.agent.take() {
            Some(mut agent) => agent.stop(),
            None => bail!("the agent is not running"),
        }
    }

    /// Kills the agent (SIGKILL) and waits for it to exit: it leaves its kernel programs
    /// pinned, as a crash would, and [`Self::start_agent`] starts the next one on them.
    pub fn kill_agent(&mut self) -> anyhow::Result<()> {
        match self.agent.take() {
            Some(mut agent) => agent.kill(),
            None => bail!("the agent is not running"),
        }
    }

    /// Starts a second agent beside the running one, on the same pins, state and
    /// configuration, as a rolling update with surge would: it takes the running one's
    /// listeners over, and that one drains. Returns once its readiness endpoint answers,
    /// whatever it says. It is stopped when dropped.
    pub fn start_agent_beside(&self) -> anyhow::Result<Agent> {
        self.agent()?;
        Agent::start(self, &AgentOptions::not_ready(), self.second_agent_log())
    }

    /// The log of the node's agent.
    pub(crate) fn agent_log(&self) -> PathBuf {
        self.config_dir.with_extension("agent.log")
    }

    /// The log of an agent started by [`Self::start_agent_beside`].
    pub(crate) fn second_agent_log(&self) -> PathBuf {
        self.config_dir.with_extension("agent-beside.log")
    }

    /// The program each link pinned under the node's pin directory runs, by link name.
    pub fn linked_programs(&self) -> BTreeMap<String, u64> {
        let dir = self.pin_dir.join("links");
        let mut programs = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let output = check(
                Command::new("bpftool")
                    .args(["--json", "link", "show", "pinned"])
                    .arg(&path),
            )
            .unwrap();
            let link: Value = serde_json::from_slice(&output.stdout).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            programs.insert(name, link["prog_id"].as_u64().unwrap());
        }
        assert!(
            programs.len() >= 4,
            "links pinned in {}: {programs:?}",
            dir.display()
        );
        programs
    }

    pub fn agent(&self) -> anyhow::Result<&Agent> {
        self.agent.as_ref().context("the agent is not running")
    }

    /// The node's agent, to signal it or wait for it.
    pub fn agent_mut(&mut self) -> anyhow::Result<&mut Agent> {
        self.agent.as_mut().context("the agent is not running")
    }

    /// Rewrites one file of the config directory atomically (write, then rename), as a
    /// config management tool would.
    pub fn write_file(&self, name: &str, contents: &str) -> anyhow::Result<()> {
        let tmp = self.config_dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents)?;
        std::fs::rename(&tmp, self.config_dir.join(name))?;
        Ok(())
    }

    /// Removes one file of the config directory.
    pub fn remove_file(&self, name: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.config_dir.join(name))
            .with_context(|| format!("cannot remove {name} from the config directory"))
    }

    /// Starts `tcpdump` on `pod`'s veth (in the node namespace), writing packets to a file;
    /// [`Capture::finish`] stops it and returns the bytes captured.
    pub fn capture(&mut self, pod: &Pod) -> anyhow::Result<Capture> {
        self.capture_matching(pod, &[])
    }

    /// [`Self::capture`] of the packets that match the `tcpdump` filter `filter` (its
    /// words, e.g. `["tcp", "port", "15008"]`).
    pub fn capture_matching(&mut self, pod: &Pod, filter: &[&str]) -> anyhow::Result<Capture> {
        let file = self.config_dir.with_extension(format!("{}.pcap", pod.veth));
        let log = file.with_extension("log");
        let mut cmd = self.node_command("tcpdump");
        cmd.args(["-i", &pod.veth, "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&file)
            .args(filter)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let child = cmd.spawn().context("cannot start tcpdump")?;
        let capture = Capture { child, file, log };
        // tcpdump says "listening on ..." once the capture is armed.
        for _ in 0..100 {
            let said = std::fs::read_to_string(&capture.log).unwrap_or_default();
            if said.contains("listening on") {
                return Ok(capture);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("tcpdump did not start within 5 s")
    }
    /// Publishes the node's namespaces and pods to `api` from now on, as they change, for
    /// an agent on `--source kubernetes`.
    pub fn publish_to(&mut self, api: Arc<ApiServer>) -> anyhow::Result<()> {
        self.api = Some((api, BTreeMap::new()));
        self.write_config()
    }

    /// The namespaces and pods as the API server shows them.
    fn cluster_objects(&self) -> Vec<Value> {
        let namespaces = self.namespaces.iter().map(|(name, enrolled)| {
            let labels = if *enrolled {
                json!({"ambit.io/mesh": "enabled"})
            } else {
                json!({})
            };
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
        });
        let pods = self.pods.iter().chain(&self.remote_pods).map(|pod| {
            let annotations = if pod.netns_annotation {
                json!({"ambit.io/netns": pod.netns_path()})
            } else {
                json!({})
            };
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod.name,
                    "namespace": pod.namespace,
                    "labels": pod.labels,
                    "annotations": annotations,
                },
                "spec": {"serviceAccountName": pod.service_account, "nodeName": pod.node},
                "status": {
                    "phase": "Running",
                    "podIP": pod.pod_ips()[0].to_string(),
                    "podIPs": pod.pod_ips().iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
                },
            })
        });
        namespaces.chain(pods).collect()
    }

    /// Writes `namespaces.yaml` and `pods.yaml` from the node's model, and publishes what
    /// changed to the API server double, if any.
    fn write_config(&mut self) -> anyhow::Result<()> {
        if self.api.is_some() {
            let objects = self.cluster_objects();
            if let Some((api, published)) = &mut self.api {
                for object in objects {
                    let key = format!(
                        "{}/{}/{}",
                        object["kind"], object["metadata"]["namespace"], object["metadata"]["name"]
                    );
                    if published.get(&key) != Some(&object) {
                        api.apply(object.clone())?;
                        published.insert(key, object);
                    }
                }
            }
        }
        let mut namespaces = String::new();
        for (name, enrolled) in &self.namespaces {
            let labels = if *enrolled {
                "{ambit.io/mesh: enabled}"
            } else {
                "{}"
            };
            write!(
                namespaces,
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n"
            )?;
        }
        self.write_file("namespaces.yaml", &namespaces)?;
        let mut pods = String::new();
        for pod in self.pods.iter().chain(&self.remote_pods) {
            let labels: Vec<String> = pod
                .labels
                .iter()
                // Quoted: a value such as `true` or `1` must stay a string.
                .map(|(k, v)| format!("{k}: \"{v}\""))
                .collect();
            let annotations = if pod.netns_annotation {
                format!("ambit.io/netns: {}", pod.netns_path().display())
            } else {
                String::new()
            };
            write!(
                pods,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: \"{}\"\n  labels: {{{}}}\n  annotations: {{{annotations}}}\nspec: {{serviceAccountName: {}, nodeName: \"{}\"}}\nstatus: {{podIP: \"{}\", podIPs: [{}]}}\n",
                pod.name,
                pod.namespace,
                pod.uid,
                labels.join(", "),
                pod.service_account,
                pod.node,
                pod.pod_ips()[0],
                pod.pod_ips()
                    .iter()
                    .map(|ip| format!("{{ip: \"{ip}\"}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
        }
        self.write_file("pods.yaml", &pods)
    }

    fn wait_listening(&self, pod: &Pod, port: u16) -> anyhow::Result<()> {
        let filter = format!("sport = :{port}");
        for _ in 0..100 {
            let out = check(
                Command::new("ip")
                    .args(["netns", "exec", &pod.netns, "ss", "-Htln"])
                    .arg(&filter),
            )?;
            if !out.stdout.is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("nothing listens on port {port} in {} after 5 s", pod.name)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.stop();
        }
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pod in &self.pods {
            let _ = ip(&["netns", "del", &pod.netns]);
        }
        let _ = ip(&["netns", "del", &self.netns]);
        // Unpinning releases the kernel programs and maps of this node's agent.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        remove_cgroup(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.config_dir);
        let _ = std::fs::remove_dir_all(self.state_dir());
        // A failing test keeps the agent's and the applications' logs for the reader.
        if !std::thread::panicking() {
            for log in [self.agent_log(), self.second_agent_log()] {
                let _ = std::fs::remove_file(crate::agent::access_log_of(&log));
                let _ = std::fs::remove_file(log);
            }
            let _ = std::fs::remove_dir_all(self.apps_dir());
        }
    }
}

/// A running packet capture.
pub struct Capture {
    child: Child,
    file: PathBuf,
    /// tcpdump's messages.
    log: PathBuf,
}

impl Capture {
    /// Stops the capture (SIGINT, so tcpdump flushes) and returns the raw pcap bytes.
    pub fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        // Give the last packets time to be written.
        std::thread::sleep(Duration::from_millis(200));
        check(Command::new("kill").args(["-INT", &self.child.id().to_string()]))?;
        self.child.wait()?;
        std::fs::read(&self.file).context("tcpdump wrote no capture")
    }
}

/// The packets of a pcap file (as [`Capture::finish`] returns it), by their record headers.
pub fn pcap_packets(pcap: &[u8]) -> usize {
    // A 24-byte file header, then per packet a 16-byte header whose third word is the
    // length captured (in the byte order of the file's magic; tcpdump writes the host's).
    let mut at = 24;
    let mut packets = 0;
    while let Some(header) = pcap.get(at..at + 16) {
        let captured = u32::from_ne_bytes([header[8], header[9], header[10], header[11]]);
        at += 16 + captured as usize;
        packets += 1;
    }
    packets
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Removes `cgroup` and every cgroup below it, children first (a cgroup with children
/// cannot be removed; its files are the kernel's and go with it). Best effort, for Drop.
fn remove_cgroup(cgroup: &Path) {
    if let Ok(entries) = std::fs::read_dir(cgroup) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(cgroup);
}

/// The first cgroup2 mount (`/sys/fs/cgroup` or, on hybrid hosts, `/sys/fs/cgroup/unified`).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .context("no cgroup2 file system is mounted")
}
