//! `ambit uninstall-node`: with the agent stopped (enrolled pods closed, as the pinned
//! programs keep them), it takes ambit off the node and its pods talk directly again.
//! Run as root (`cargo xtask test`).

use std::process::Command;

use ambit_tests::{
    Pod, check,
    mesh::{BAR, FOO, LEGACY, Mesh},
};

/// A CNI chain as the installer leaves it: the primary network, then `ambit-cni`.
const CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "test-net",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.88.0.0/16"}},
    {"type": "ambit-cni", "agent_socket": "/var/run/ambit/cni.sock"}
  ]
}"#;

/// The return path's sysctls inside `pod`, and whether its mark rule is there.
fn pod_settings(mesh: &Mesh, pod: &Pod) -> (String, String, bool) {
    let read = |sysctl: &str| {
        let output = check(
            mesh.node
                .command(pod, "cat")
                .arg(format!("/proc/sys/net/ipv4/{sysctl}")),
        )
        .unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let rules = check(mesh.node.command(pod, "ip").args(["rule", "show"])).unwrap();
    let marked = String::from_utf8_lossy(&rules.stdout).contains("fwmark");
    (read("tcp_fwmark_accept"), read("fwmark_reflect"), marked)
}

#[test]
fn uninstall_node_releases_every_pod_and_leaves_no_program_pin_or_cni_entry() {
    let mut mesh = Mesh::new(ambit_tests::test_binaries!()).expect("mesh");
    let (foo, legacy) = (mesh.sleep[FOO].clone(), mesh.sleep[LEGACY].clone());
    let meshed = mesh.node.curl(Some(&foo), &mesh.url(BAR, "/ip")).unwrap();
    assert_eq!(meshed.code, 200, "{meshed:?}");
    assert_eq!(
        pod_settings(&mesh, &foo),
        ("1".into(), "1".into(), true),
        "an enrolled pod has the return path"
    );

    mesh.node.stop_agent().unwrap();
    let closed = mesh.node.curl(Some(&foo), &mesh.url(BAR, "/ip")).unwrap();
    assert_eq!(
        closed.code, 0,
        "fail closed with the agent down: {closed:?}"
    );

    let cni = tempfile::tempdir().unwrap();
    let conflist = cni.path().join("10-test.conflist");
    std::fs::write(&conflist, CONFLIST).unwrap();
    let uninstall = || {
        let mut cmd = Command::new(&mesh.node.binaries.ambit);
        cmd.arg("uninstall-node")
            .arg("--bpf-pin-dir")
            .arg(&mesh.node.pin_dir)
            .arg("--state-dir")
            .arg(mesh.node.state_dir())
            .arg("--cni-conf-dir")
            .arg(cni.path());
        check(&mut cmd).unwrap()
    };
    uninstall();

    let attached = check(
        Command::new("bpftool")
            .args(["--json", "cgroup", "show"])
            .arg(&mesh.node.cgroup),
    )
    .unwrap();
    // bpftool prints nothing at all for a cgroup without programs on some versions.
    let attached: serde_json::Value = match attached.stdout.trim_ascii() {
        [] => serde_json::json!([]),
        json => serde_json::from_slice(json).unwrap(),
    };
    assert_eq!(
        attached,
        serde_json::json!([]),
        "programs still attached to {}",
        mesh.node.cgroup.display()
    );
    assert!(
        !mesh.node.pin_dir.exists(),
        "{} is still there",
        mesh.node.pin_dir.display()
    );
    let chain: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&conflist).unwrap()).unwrap();
    let types: Vec<&str> = chain["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["bridge"], "{chain:#}");

    // Direct now, both ways: no proxy saw these (it is not running).
    let outbound = mesh.node.curl(Some(&foo), &mesh.url(BAR, "/ip")).unwrap();
    assert_eq!(outbound.code, 200, "{outbound:?}");
    assert!(outbound.body.contains(&foo.ip.to_string()), "{outbound:?}");
    let inbound = mesh
        .node
        .curl(Some(&legacy), &mesh.url(FOO, "/ip"))
        .unwrap();
    assert_eq!(inbound.code, 200, "{inbound:?}");
    assert_eq!(
        pod_settings(&mesh, &foo),
        ("0".into(), "0".into(), false),
        "the pod's own sysctls are back and the return path is gone"
    );
    assert!(
        std::fs::read_dir(mesh.node.state_dir().join("netns"))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "saved settings of restored pods are dropped"
    );

    // Idempotent: a second run finds nothing to do and succeeds.
    uninstall();
}
