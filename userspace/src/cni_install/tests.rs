use std::{
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use base64::Engine as _;
use serde_json::{Value, json};

use super::*;

/// The conflist of a node whose network is Debian's `containernetworking-plugins`: `bridge`
/// with `host-local` addresses, then `portmap` (containerd's `10-containerd-net.conflist`).
const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "containerd-net",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "promiscMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.88.0.0/16"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

/// The same network as a single-plugin `.conf`.
const BRIDGE_CONF: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "bridge-net",
  "type": "bridge",
  "bridge": "cni0",
  "ipam": {"type": "host-local", "subnet": "10.88.0.0/16"}
}"#;

const CA: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

/// A node's directories in a temporary directory: the CNI bin and configuration
/// directories, the image's plugin binary and the pod's service account.
struct Node {
    _dir: tempfile::TempDir,
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    plugin: PathBuf,
    service_account: PathBuf,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let node = Self {
            bin_dir: path("bin"),
            conf_dir: path("net.d"),
            plugin: path("image/ambit-cni"),
            service_account: path("serviceaccount"),
            _dir: dir,
        };
        for dir in [&node.bin_dir, &node.conf_dir, &node.service_account] {
            fs::create_dir_all(dir).unwrap();
        }
        fs::create_dir_all(node.plugin.parent().unwrap()).unwrap();
        fs::write(&node.plugin, b"\x7fELF plugin v1").unwrap();
        fs::write(node.service_account.join("ca.crt"), CA).unwrap();
        fs::write(node.service_account.join("token"), "token-1").unwrap();
        node
    }

    fn args(&self) -> InstallArgs {
        InstallArgs {
            cni_bin_dir: self.bin_dir.clone(),
            cni_conf_dir: self.conf_dir.clone(),
            plugin_binary: Some(self.plugin.clone()),
            agent_socket: ambit_cni::DEFAULT_SOCKET.into(),
            service_account_dir: self.service_account.clone(),
            api_server_host: "10.96.0.1".into(),
            api_server_port: 443,
            wait: Duration::from_secs(3),
            watch: false,
            check_interval: Duration::from_secs(10),
        }
    }

    fn install(&self) -> Result<Report, InstallError> {
        Installer::new(&self.args()).unwrap().install()
    }

    /// Writes a network configuration, mode 0644 as network plugins leave them.
    fn conf(&self, name: &str, text: &str) -> PathBuf {
        let path = self.conf_dir.join(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        path
    }

    fn installed_binary(&self) -> PathBuf {
        self.bin_dir.join("ambit-cni")
    }

    fn kubeconfig(&self) -> PathBuf {
        self.conf_dir.join("ambit-cni.kubeconfig")
    }

    /// The entry the installer writes for this node.
    fn entry(&self) -> Value {
        json!({
            "type": "ambit-cni",
            "agent_socket": ambit_cni::DEFAULT_SOCKET,
            "kubeconfig": self.kubeconfig(),
        })
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The inode and modification time: a file rewritten, even with the same bytes, changes.
fn written(path: &Path) -> (u64, std::time::SystemTime) {
    let meta = fs::metadata(path).unwrap();
    (meta.ino(), meta.modified().unwrap())
}

#[test]
fn first_install_appends_the_entry_to_the_primary_conflist() {
    let node = Node::new();
    let conflist = node.conf("10-containerd-net.conflist", BRIDGE);
    let later = node.conf(
        "99-loopback.conf",
        r#"{"cniVersion": "1.0.0", "type": "loopback"}"#,
    );

    let report = node.install().unwrap();

    assert_eq!(
        report,
        Report {
            binary: true,
            kubeconfig: true,
            chain: Chain::Appended(conflist.clone()),
        }
    );
    let mut expected: Value = serde_json::from_str(BRIDGE).unwrap();
    expected["plugins"]
        .as_array_mut()
        .unwrap()
        .push(node.entry());
    assert_eq!(
        json(&conflist),
        expected,
        "the rest of the file is as it was"
    );
    assert_eq!(mode(&conflist), 0o644, "the file keeps its mode");
    assert_eq!(
        fs::read_to_string(&later).unwrap(),
        r#"{"cniVersion": "1.0.0", "type": "loopback"}"#,
        "only the primary network is the runtime's, and ours to edit"
    );
    assert_eq!(
        fs::read(node.installed_binary()).unwrap(),
        fs::read(&node.plugin).unwrap()
    );
    assert_eq!(mode(&node.installed_binary()), 0o755);
}

#[test]
fn a_second_pass_writes_nothing() {
    let node = Node::new();
    let conflist = node.conf("10-containerd-net.conflist", BRIDGE);
    node.install().unwrap();
    let files = [conflist.clone(), node.installed_binary(), node.kubeconfig()];
    let before: Vec<_> = files.iter().map(|f| written(f)).collect();

    let report = node.install().unwrap();

    assert_eq!(
        report,
        Report {
            binary: false,
            kubeconfig: false,
            chain: Chain::Unchanged(conflist),
        }
    );
    assert!(!report.changed());
    let after: Vec<_> = files.iter().map(|f| written(f)).collect();
    assert_eq!(after, before);
}

#[test]
fn a_single_plugin_conf_becomes_a_conflist_with_the_entry() {
    let node = Node::new();
    let conf = node.conf("10-bridge.conf", BRIDGE_CONF);
    let conflist = node.conf_dir.join("10-bridge.conflist");

    let report = node.install().unwrap();

    assert_eq!(
        report.chain,
        Chain::Converted {
            from: conf.clone(),
            to: conflist.clone()
        }
    );
    assert!(
        !conf.exists(),
        "the old file goes, or the runtime would still use it"
    );
    let original: Value = serde_json::from_str(BRIDGE_CONF).unwrap();
    assert_eq!(
        json(&conflist),
        json!({
            "cniVersion": "0.4.0",
            "name": "bridge-net",
            "plugins": [original, node.entry()],
        })
    );
    assert_eq!(mode(&conflist), 0o644);
    assert_eq!(node.install().unwrap().chain, Chain::Unchanged(conflist));
}

#[test]
fn an_entry_the_network_plugin_dropped_is_put_back() {
    let node = Node::new();
    let conflist = node.conf("10-containerd-net.conflist", BRIDGE);
    node.install().unwrap();
    // The network plugin writes its configuration again, as they do on restart.
    node.conf("10-containerd-net.conflist", BRIDGE);

    let report = node.install().unwrap();

    assert_eq!(
        report,
        Report {
            binary: false,
            kubeconfig: false,
            chain: Chain::Appended(conflist.clone()),
        }
    );
    assert_eq!(json(&conflist)["plugins"][2], node.entry());
}

#[test]
fn an_entry_with_other_values_is_updated_in_place() {
    let node = Node::new();
    let conflist = node.conf(
        "10-net.conflist",
        r#"{"cniVersion": "1.0.0", "name": "net", "plugins": [
            {"type": "bridge"},
            {"type": "ambit-cni", "agent_socket": "/old.sock", "timeout": 30},
            {"type": "portmap"},
            {"type": "ambit-cni"}
        ]}"#,
    );

    assert_eq!(
        node.install().unwrap().chain,
        Chain::Updated(conflist.clone())
    );

    let mut entry = node.entry();
    entry["timeout"] = json!(30);
    assert_eq!(
        json(&conflist)["plugins"],
        json!([{"type": "bridge"}, entry, {"type": "portmap"}]),
        "our values set where the entry was, an operator's `timeout` kept, a second entry dropped"
    );
}

#[test]
fn the_lexically_first_configuration_is_the_primary() {
    let node = Node::new();
    fs::create_dir(node.conf_dir.join("00-dir.conflist")).unwrap();
    node.conf("00-notes.txt", "not a configuration");
    node.conf("20-b.conflist", BRIDGE);
    let first = node.conf("10-a.conflist", BRIDGE);

    assert_eq!(node.install().unwrap().chain, Chain::Appended(first));
    assert_eq!(
        fs::read_to_string(node.conf_dir.join("20-b.conflist")).unwrap(),
        BRIDGE
    );
}

#[test]
fn no_network_yet_leaves_the_chain_for_later() {
    let node = Node::new();
    let report = node.install().unwrap();
    assert_eq!(report.chain, Chain::NoNetwork);
    assert!(report.binary && report.kubeconfig, "{report:?}");
}

#[test]
fn a_configuration_that_is_not_json_is_named_and_left_alone() {
    let node = Node::new();
    let broken = node.conf("10-broken.conflist", "{ not json");
    let error = node.install().unwrap_err().to_string();
    assert!(error.contains("10-broken.conflist"), "{error}");
    assert!(error.contains("not valid JSON"), "{error}");
    assert_eq!(fs::read_to_string(&broken).unwrap(), "{ not json");
}

#[test]
fn a_configuration_the_runtime_would_not_load_is_named_and_left_alone() {
    for (name, text) in [
        (
            "10-a.conf",
            r#"{"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}"#,
        ),
        (
            "10-a.conflist",
            r#"{"cniVersion": "1.0.0", "type": "bridge"}"#,
        ),
        ("10-a.conflist", r#"{"cniVersion": "1.0.0", "plugins": []}"#),
    ] {
        let node = Node::new();
        let path = node.conf(name, text);
        let error = node.install().unwrap_err();
        assert!(
            matches!(&error, InstallError::NotANetwork { path: p, .. } if *p == path),
            "{name} {text}: {error}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), text);
    }
}

#[test]
fn the_binary_is_renamed_into_place_and_only_when_it_differs() {
    let node = Node::new();
    node.install().unwrap();
    let installed = node.installed_binary();
    let first = written(&installed);
    assert!(!node.install().unwrap().binary);
    assert_eq!(written(&installed), first, "same bytes: not rewritten");

    fs::write(&node.plugin, b"\x7fELF plugin v2").unwrap();
    assert!(node.install().unwrap().binary);
    assert_eq!(fs::read(&installed).unwrap(), b"\x7fELF plugin v2");
    assert_eq!(mode(&installed), 0o755);
    assert_ne!(
        written(&installed).0,
        first.0,
        "a new file renamed over the old one, which a running plugin keeps"
    );
    let names: Vec<_> = fs::read_dir(&node.bin_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ambit-cni"], "no temporary file left");

    fs::set_permissions(&installed, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(node.install().unwrap().binary, "a wrong mode is repaired");
    assert_eq!(mode(&installed), 0o755);
}

#[test]
fn the_kubeconfig_carries_the_service_account_and_follows_its_token() {
    let node = Node::new();
    let mut args = node.args();
    args.api_server_host = "fd00::1".into();
    args.api_server_port = 6443;
    let installer = Installer::new(&args).unwrap();
    installer.install().unwrap();
    let path = node.kubeconfig();
    assert_eq!(mode(&path), 0o600, "it holds a token");

    // What the plugin gets from a standard reader: the current context's cluster and user.
    let read = || {
        let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
        let context = kubeconfig.current_context.clone().unwrap();
        let named = kubeconfig
            .contexts
            .iter()
            .find(|c| c.name == context)
            .unwrap();
        let context = named.context.clone().unwrap();
        let cluster = kubeconfig
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)
            .and_then(|c| c.cluster.clone())
            .unwrap();
        let user = context.user.unwrap();
        assert!(
            kubeconfig
                .auth_infos
                .iter()
                .any(|u| u.name == user && u.auth_info.is_some()),
            "user {user} is defined"
        );
        // kube keeps the token secret (no accessor without another crate): read it as JSON.
        let token = json(&path)["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == user.as_str())
            .unwrap()["user"]["token"]
            .clone();
        (cluster, token)
    };
    let (cluster, token) = read();
    assert_eq!(cluster.server.as_deref(), Some("https://[fd00::1]:6443"));
    let ca = base64::engine::general_purpose::STANDARD
        .decode(cluster.certificate_authority_data.unwrap())
        .unwrap();
    assert_eq!(ca, CA);
    assert_eq!(token, "token-1");

    // The kubelet rotates the projected token.
    fs::write(node.service_account.join("token"), "token-2\n").unwrap();
    assert!(installer.install().unwrap().kubeconfig);
    assert_eq!(read().1, "token-2");
    assert!(!installer.install().unwrap().kubeconfig);
}

#[test]
fn a_missing_or_empty_token_is_named() {
    let node = Node::new();
    fs::write(node.service_account.join("token"), "\n").unwrap();
    let error = node.install().unwrap_err().to_string();
    assert!(
        error.contains("serviceaccount/token") && error.contains("empty"),
        "{error}"
    );
    fs::remove_file(node.service_account.join("token")).unwrap();
    let error = node.install().unwrap_err().to_string();
    assert!(error.contains("serviceaccount/token"), "{error}");
    assert!(!node.kubeconfig().exists());
}

#[test]
fn server_urls_bracket_ipv6_hosts() {
    assert_eq!(
        kubeconfig::server_url("10.96.0.1", 443),
        "https://10.96.0.1:443"
    );
    assert_eq!(
        kubeconfig::server_url("fd00:10:96::1", 443),
        "https://[fd00:10:96::1]:443"
    );
    assert_eq!(
        kubeconfig::server_url("kubernetes.default.svc", 6443),
        "https://kubernetes.default.svc:6443"
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_network_configuration_it_gives_up_after_the_wait_naming_the_dir() {
    let node = Node::new();
    let error = install_cni(&node.args(), std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&node.conf_dir.display().to_string()),
        "{error}"
    );
    assert!(error.contains("after 3s"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_network_written_while_waiting_is_chained_into() {
    let node = Node::new();
    let conflist = node.conf_dir.join("10-containerd-net.conflist");
    let args = node.args();
    let write_later = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        node.conf("10-containerd-net.conflist", BRIDGE);
        std::future::pending::<()>().await;
    };
    tokio::select! {
        result = install_cni(&args, std::future::pending()) => result.unwrap(),
        () = write_later => unreachable!("pending"),
    }
    assert_eq!(json(&conflist)["plugins"][2], node.entry());
}

/// The watch puts back what the network plugin dropped and the token the kubelet rotated,
/// and its shutdown (a rolling update) leaves everything installed.
#[tokio::test(start_paused = true)]
async fn the_watch_repairs_and_its_shutdown_removes_nothing() {
    let node = Node::new();
    let conflist = node.conf("10-containerd-net.conflist", BRIDGE);
    let mut args = node.args();
    args.watch = true;
    // Checks run at 10 s and 20 s; the shutdown comes at 25 s.
    let meanwhile = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        node.conf("10-containerd-net.conflist", BRIDGE);
        fs::write(node.service_account.join("token"), "token-2").unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
    };
    install_cni(&args, meanwhile).await.unwrap();
    assert_eq!(json(&conflist)["plugins"][2], node.entry());
    assert!(
        fs::read_to_string(node.kubeconfig())
            .unwrap()
            .contains("token-2")
    );
    assert!(node.installed_binary().exists());
}

impl Node {
    /// `ambit uninstall-node` on this node (nothing pinned, no pods).
    async fn uninstall(&self) {
        let args = crate::uninstall::UninstallArgs {
            bpf_pin_dir: self.conf_dir.with_file_name("pins"),
            state_dir: self.conf_dir.with_file_name("state"),
            cni_conf_dir: self.conf_dir.clone(),
        };
        crate::uninstall::uninstall_node(&args).await.unwrap();
    }
}

#[tokio::test]
async fn a_repair_after_uninstall_node_writes_nothing() {
    let node = Node::new();
    let conflist = node.conf("10-containerd-net.conflist", BRIDGE);
    let installer = Installer::new(&node.args()).unwrap();
    installer.install().unwrap();

    node.uninstall().await;

    assert_eq!(installer.repair().unwrap(), None);
    assert_eq!(
        json(&conflist),
        serde_json::from_str::<Value>(BRIDGE).unwrap()
    );
    assert!(!node.kubeconfig().exists());
}

/// A deletion: the agent's pre-stop hook uninstalls while the sidecar still watches (it is
/// stopped only after the agent); its next checks must not put the entry back.
#[tokio::test(start_paused = true)]
async fn the_watch_does_not_undo_an_uninstall() {
    let node = Node::new();
    let conflist = node.conf("10-containerd-net.conflist", BRIDGE);
    let mut args = node.args();
    args.watch = true;
    let meanwhile = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        node.uninstall().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    };
    install_cni(&args, meanwhile).await.unwrap();
    assert_eq!(
        json(&conflist),
        serde_json::from_str::<Value>(BRIDGE).unwrap()
    );
    assert!(!node.kubeconfig().exists());
}
