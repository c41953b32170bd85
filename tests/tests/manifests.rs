//! The install manifests (`deploy/kubernetes`): every kustomization renders with the real
//! `kubectl kustomize`, the output validates against the Kubernetes schemas
//! (`kubernetes-validate --strict`) and passes the manifest security scan (`checkov`) with
//! no finding other than those accepted, each with its reason, in a `checkov.io/skip`
//! annotation. The tools are installed by `cargo xtask setup`.

use serde::Deserialize as _;
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

/// Where `cargo xtask setup` installs `kubernetes-validate` and `checkov` (a virtual
/// environment of their own, so their pinned dependencies cannot clash with the system's).
const TOOLS: &str = "/opt/ambit-manifest-tools/bin";

/// Each kustomization a user may apply.
const KUSTOMIZATIONS: [&str; 3] = ["", "crds", "overlays/example"];

fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// `kubectl kustomize` of `dir` under `deploy/kubernetes`, written to a file for the tools.
fn render(dir: &str, out: &Path) -> PathBuf {
    let output = ambit_tests::check(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(kubernetes_dir().join(dir)),
    )
    .unwrap();
    let name = if dir.is_empty() { "base" } else { dir };
    let path = out.join(format!("{}.yaml", name.replace('/', "-")));
    std::fs::write(&path, &output.stdout).unwrap();
    path
}

fn rendered() -> (tempfile::TempDir, Vec<PathBuf>) {
    let out = tempfile::tempdir().unwrap();
    let files = KUSTOMIZATIONS
        .iter()
        .map(|d| render(d, out.path()))
        .collect();
    (out, files)
}

#[test]
fn every_kustomization_renders_what_an_install_needs() {
    let (_out, files) = rendered();
    let base = std::fs::read_to_string(&files[0]).unwrap();
    for kind in [
        "kind: Namespace",
        "kind: DaemonSet",
        "kind: Deployment",
        "kind: Service\n",
        "kind: ClusterRole\n",
        "kind: Role\n",
    ] {
        assert!(base.contains(kind), "base lacks {kind:?}");
    }
    assert!(
        !base.contains("CustomResourceDefinition"),
        "the Istio CRDs must stay out of the base: they conflict with Istio's own"
    );
    assert!(
        !base.contains("'*'") && !base.contains("\"*\""),
        "a wildcard in the RBAC rules"
    );
    let crds = std::fs::read_to_string(&files[1]).unwrap();
    for plural in [
        "peerauthentications",
        "requestauthentications",
        "authorizationpolicies",
    ] {
        assert!(
            crds.contains(&format!("name: {plural}.security.istio.io")),
            "{plural}"
        );
    }
    let example = std::fs::read_to_string(&files[2]).unwrap();
    assert!(example.contains("TRUST_DOMAIN: example.org"), "{example}");
    assert!(example.contains("image: registry.example.com/platform/ambit:"));
}

#[test]
fn rendered_manifests_validate_against_the_kubernetes_schemas() {
    let (_out, files) = rendered();
    ambit_tests::check(
        Command::new(Path::new(TOOLS).join("kubernetes-validate"))
            .args(["--strict", "--quiet"])
            .args(&files),
    )
    .unwrap();
}

#[test]
fn rendered_manifests_pass_the_security_scan() {
    let (out, files) = rendered();
    for file in &files {
        let mut checkov = Command::new(Path::new(TOOLS).join("checkov"));
        checkov
            .arg("--file")
            .arg(file)
            .args(["--framework", "kubernetes", "--compact", "--quiet"])
            // Offline: no guideline download from Prisma Cloud, which these machines
            // cannot reach (and the verdicts do not need).
            .arg("--skip-download")
            .env("BC_SKIP_MAPPING", "TRUE")
            // checkov writes a cache beside the scanned file's directory.
            .current_dir(out.path());
        ambit_tests::check(&mut checkov).unwrap();
    }
}

/// The agent's DaemonSet in the rendered base.
fn daemonset(base: &Path) -> serde_yaml::Value {
    let base = std::fs::read_to_string(base).unwrap();
    serde_yaml::Deserializer::from_str(&base)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "DaemonSet")
        .expect("a DaemonSet")
}

/// The CNI plugin is installed by a native sidecar that keeps it installed, with nothing
/// but the two CNI directories and no capability, and the agent listens where the
/// plugin's entry says it does.
#[test]
fn the_daemonset_installs_the_cni_plugin_with_a_native_sidecar() {
    let (_out, files) = rendered();
    let pod = &daemonset(&files[0])["spec"]["template"]["spec"];
    let install = pod["initContainers"]
        .as_sequence()
        .and_then(|init| init.iter().find(|c| c["name"] == "install-cni"))
        .expect("an install-cni init container");
    assert_eq!(install["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(
        install["args"],
        serde_yaml::to_value(["install-cni", "--watch"]).unwrap()
    );
    let mounts: Vec<(&str, &str)> = install["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["mountPath"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        mounts,
        [("cni-bin", "/opt/cni/bin"), ("cni-conf", "/etc/cni/net.d")],
        "the host's paths, and nothing else"
    );
    let security = &install["securityContext"];
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert_eq!(security["capabilities"]["add"], serde_yaml::Value::Null);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    // `ambit install-cni --agent-socket` defaults to the plugin's default socket.
    let agent_args = &pod["containers"][0]["args"];
    assert!(
        agent_args
            .as_sequence()
            .unwrap()
            .iter()
            .any(|a| a == "--cni-socket=/var/run/ambit/cni.sock"),
        "{agent_args:?}"
    );
}

/// The DaemonSet's pre-stop hook (a shell script) uninstalls only when the API server says
/// the DaemonSet is gone or being deleted, or that the agent's account or rights are gone;
/// on a rolling update, or with the API server unreachable, it leaves the node closed. Run
/// with `curl` and `ambit` replaced by stubs: one answers as the API server would, the
/// other records that it ran.
#[test]
fn pre_stop_uninstalls_only_when_the_daemonset_is_being_deleted() {
    let (out, files) = rendered();
    let daemonset = daemonset(&files[0]);
    let command = &daemonset["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]
        ["command"];
    assert_eq!(command[0], "/bin/sh");
    let dir = out.path();
    let (account, bin, ran) = (dir.join("sa"), dir.join("bin"), dir.join("ran"));
    std::fs::create_dir_all(&account).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(account.join("token"), "token").unwrap();
    std::fs::write(account.join("ca.crt"), "").unwrap();
    let script = command[2]
        .as_str()
        .unwrap()
        .replace(
            "/var/run/secrets/kubernetes.io/serviceaccount",
            account.to_str().unwrap(),
        )
        .replace("/usr/local/bin/ambit", bin.join("ambit").to_str().unwrap());
    let stub = |name: &str, body: &str| {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    stub("ambit", &format!("echo \"$@\" > {}", ran.display()));

    let cases = [
        ("a rolling update", r#"printf '{}\n200'"#, false),
        (
            "a DaemonSet being deleted",
            r#"printf '{"metadata":{"deletionTimestamp":"2026-01-01T00:00:00Z"}}\n200'"#,
            true,
        ),
        ("a DaemonSet gone", r#"printf '{}\n404'"#, true),
        ("the service account gone", r#"printf '{}\n401'"#, true),
        ("the agent's rights gone", r#"printf '{}\n403'"#, true),
        ("an API server error", r#"printf '{}\n500'"#, false),
        (
            "no API server",
            "echo 'connection refused' >&2; exit 7",
            false,
        ),
    ];
    for (case, curl, uninstalls) in cases {
        stub("curl", curl);
        let _ = std::fs::remove_file(&ran);
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let status = Command::new("/bin/sh")
            .args(["-c", &script])
            .env("PATH", path)
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443")
            .env("POD_NAMESPACE", "ambit-system")
            .status()
            .unwrap();
        assert!(status.success(), "{case}: the hook failed ({status})");
        let ran = std::fs::read_to_string(&ran).ok();
        if uninstalls {
            assert_eq!(ran.as_deref(), Some("uninstall-node\n"), "{case}");
        } else {
            assert_eq!(ran, None, "{case}: uninstalled");
        }
    }
}

/// An upgrade is hitless: the new agent starts beside the old one (surge, never a node
/// without an agent), no hostPort keeps it off the node, and the old one is given its
/// whole drain before the kubelet kills it.
#[test]
fn the_daemonset_upgrades_with_surge_and_lets_the_old_agent_drain() {
    let (_out, files) = rendered();
    let daemonset = daemonset(&files[0]);
    let rolling = &daemonset["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxSurge"], 1, "{rolling:?}");
    assert_eq!(rolling["maxUnavailable"], 0, "{rolling:?}");
    let pod = &daemonset["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    assert_eq!(
        agent["ports"],
        serde_yaml::Value::Null,
        "with hostNetwork a port is a hostPort, which would keep the surge pod off the node"
    );
    let drain = agent["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--drain-timeout="))
        .expect("--drain-timeout set explicitly");
    let minutes: u64 = drain
        .strip_suffix('m')
        .expect("in minutes")
        .parse()
        .unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > minutes * 60,
        "grace period {grace}s must exceed the drain ({drain}) and leave the pre-stop hook time"
    );
}
