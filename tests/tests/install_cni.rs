//! `ambit install-cni` as the DaemonSet's sidecar runs it, on a node made of temporary
//! directories: the plugin copied beside the primary network's plugins, its entry chained
//! into the primary conflist, its kubeconfig from the pod's service account; with
//! `--watch`, repairs, and a SIGTERM that removes nothing; then `ambit uninstall-node`,
//! run while a watch goes on (a deletion), takes the entry and kubeconfig out for good.
//! Needs no root (no pins, no pods).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Child, Command},
    time::Duration,
};

use ambit_tests::{Binaries, check, mesh::within};
use serde_json::{Value, json};

/// Debian's `bridge` with `host-local` addresses, then `portmap`, as containerd writes it.
const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "containerd-net",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

/// A node's CNI directories and a pod's service account.
struct Node {
    dir: tempfile::TempDir,
    binaries: Binaries,
}

impl Node {
    fn new() -> Self {
        let node = Self {
            dir: tempfile::tempdir().unwrap(),
            binaries: ambit_tests::test_binaries!(),
        };
        for dir in ["bin", "net.d", "serviceaccount"] {
            std::fs::create_dir(node.path(dir)).unwrap();
        }
        std::fs::write(node.path("serviceaccount/ca.crt"), "CA").unwrap();
        std::fs::write(node.path("serviceaccount/token"), "token-1").unwrap();
        node
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn conflist(&self) -> PathBuf {
        self.path("net.d/10-containerd-net.conflist")
    }

    /// `ambit install-cni` with the pod's environment, the plugin taken from beside
    /// `ambit` (its default).
    fn install_cni(&self) -> Command {
        let mut cmd = Command::new(&self.binaries.ambit);
        cmd.arg("install-cni")
            .arg("--cni-bin-dir")
            .arg(self.path("bin"))
            .arg("--cni-conf-dir")
            .arg(self.path("net.d"))
            .arg("--service-account-dir")
            .arg(self.path("serviceaccount"))
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443");
        cmd
    }

    /// The `type`s of the primary conflist's plugins.
    fn chain(&self) -> Vec<String> {
        let conflist: Value =
            serde_json::from_slice(&std::fs::read(self.conflist()).unwrap()).unwrap();
        conflist["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// The `--watch` process, killed if the test fails before it stops it.
struct Watch(Child);

impl Watch {
    /// Starts the sidecar and waits for its first pass (logged), so that what the test
    /// does next meets the watch, not the first install.
    fn start(node: &Node, log: &str) -> Self {
        let log = node.path(log);
        let child = node
            .install_cni()
            .args(["--watch", "--check-interval", "1s"])
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let watch = Self(child);
        let installed = within(Duration::from_secs(10), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("installed"))
        });
        assert!(
            installed.is_some(),
            "no first pass: {:?}",
            std::fs::read_to_string(&log)
        );
        watch
    }

    /// SIGTERM, as the kubelet stops the sidecar; whether it exited 0 within 10 s.
    fn stop(&mut self) -> bool {
        check(Command::new("kill").args(["-TERM", &self.0.id().to_string()])).unwrap();
        let mut status = None;
        within(Duration::from_secs(10), || {
            status = self.0.try_wait().unwrap();
            status.is_some()
        });
        status.is_some_and(|s| s.success())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn install_cni_chains_the_plugin_repairs_it_and_keeps_it_until_uninstall_node() {
    let node = Node::new();
    std::fs::write(node.conflist(), BRIDGE).unwrap();

    check(&mut node.install_cni()).unwrap();

    assert_eq!(node.chain(), ["bridge", "portmap", "ambit-cni"]);
    let conflist: Value = serde_json::from_slice(&std::fs::read(node.conflist()).unwrap()).unwrap();
    let kubeconfig = node.path("net.d/ambit-cni.kubeconfig");
    assert_eq!(
        conflist["plugins"][2],
        json!({
            "type": "ambit-cni",
            "agent_socket": "/var/run/ambit/cni.sock",
            "kubeconfig": kubeconfig,
        })
    );
    let installed = node.path("bin/ambit-cni");
    let plugin = node.binaries.ambit.with_file_name("ambit-cni");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&plugin).unwrap()
    );
    let version = check(Command::new(&installed).env("CNI_COMMAND", "VERSION")).unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("supportedVersions"),
        "the installed copy runs: {version:?}"
    );
    let mode = std::fs::metadata(&kubeconfig).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let written: Value = serde_json::from_slice(&std::fs::read(&kubeconfig).unwrap()).unwrap();
    assert_eq!(
        written["clusters"][0]["cluster"]["server"],
        "https://10.96.0.1:443"
    );
    assert_eq!(written["users"][0]["user"]["token"], "token-1");

    // The sidecar: the network plugin rewrites its conflist without the entry, the
    // kubelet rotates the token; both are put back within a check or two.
    let mut watch = Watch::start(&node, "watch-1.log");
    std::fs::write(node.conflist(), BRIDGE).unwrap();
    std::fs::write(node.path("serviceaccount/token"), "token-2").unwrap();
    let repaired = within(Duration::from_secs(10), || {
        node.chain().last().map(String::as_str) == Some("ambit-cni")
            && std::fs::read_to_string(&kubeconfig).is_ok_and(|k| k.contains("token-2"))
    });
    assert!(repaired.is_some(), "not repaired: {:?}", node.chain());

    // A rolling update: SIGTERM, exit 0, everything stays.
    assert!(watch.stop(), "exit 0 on SIGTERM");
    assert_eq!(node.chain(), ["bridge", "portmap", "ambit-cni"]);
    assert!(kubeconfig.exists() && installed.exists());

    // A deletion: the next pod's sidecar watches while the agent's pre-stop hook
    // uninstalls; the entry and the token go, and the sidecar does not put them back.
    let mut watch = Watch::start(&node, "watch-2.log");
    check(
        Command::new(&node.binaries.ambit)
            .arg("uninstall-node")
            .arg("--cni-conf-dir")
            .arg(node.path("net.d"))
            .arg("--bpf-pin-dir")
            .arg(node.path("pins"))
            .arg("--state-dir")
            .arg(node.path("state")),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(watch.stop(), "exit 0 on SIGTERM");
    assert_eq!(node.chain(), ["bridge", "portmap"]);
    assert!(!kubeconfig.exists());
    // The binary stays for the runtime's cached `DEL`s of pods set up with the entry.
    assert!(installed.exists());
}

#[test]
fn install_cni_without_a_network_configuration_fails_naming_the_directory() {
    let node = Node::new();
    let output = node.install_cni().args(["--wait", "1s"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&node.path("net.d").display().to_string()) && stderr.contains("after 1s"),
        "{stderr}"
    );
}
