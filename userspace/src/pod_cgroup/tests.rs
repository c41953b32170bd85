use std::os::unix::fs::symlink;

use super::*;
use crate::discovery::{Pod, files};

const MINE: &str = "0b7c2f41-5d6e-4a8b-9c0d-1e2f3a4b5c6d";
const VICTIM: &str = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a";

/// The systemd driver's cgroup of a containerd container of pod `uid` (best effort).
fn systemd_containerd(uid: &str) -> String {
    format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
        uid.replace('-', "_"),
        "ab".repeat(32)
    )
}

/// A fake host in a temporary directory: `proc/`, `netns/` (the runtime's pins) and the
/// namespaces themselves as files under `ns/`, which `proc/<pid>/ns/net` and the pins link
/// to (a symlink stats as its target, as a bind mount or nsfs link does).
struct FakeHost {
    dir: tempfile::TempDir,
}

impl FakeHost {
    /// A host whose agent runs in namespace `node`.
    fn new() -> Self {
        let host = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        for sub in ["proc/self/ns", "netns", "ns"] {
            std::fs::create_dir_all(host.dir.path().join(sub)).unwrap();
        }
        host.link_netns("proc/self/ns/net", "node");
        host
    }

    fn paths(&self) -> HostPaths {
        HostPaths {
            proc_root: self.dir.path().join("proc"),
            netns_dirs: vec![
                self.dir.path().join("missing"),
                self.dir.path().join("netns"),
            ],
        }
    }

    fn link_netns(&self, at: &str, netns: &str) {
        let target = self.dir.path().join("ns").join(netns);
        if !target.exists() {
            std::fs::write(&target, netns).unwrap();
        }
        symlink(target, self.dir.path().join(at)).unwrap();
    }

    /// Process `pid` in cgroup `cgroup` (a `/proc/<pid>/cgroup` line's path) and in
    /// namespace `netns`.
    fn process(&self, pid: u32, cgroup: &str, netns: &str) {
        let dir = self.dir.path().join(format!("proc/{pid}"));
        std::fs::create_dir_all(dir.join("ns")).unwrap();
        std::fs::write(dir.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
        self.link_netns(&format!("proc/{pid}/ns/net"), netns);
    }

    /// The runtime pins `netns` as `name`.
    fn pin(&self, name: &str, netns: &str) {
        self.link_netns(&format!("netns/{name}"), netns);
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn locate(&self, uid: &str) -> Option<Result<Found, AdoptError>> {
        self.paths()
            .locate(&[uid.to_owned()].into())
            .unwrap()
            .remove(uid)
    }
}

#[test]
fn pod_uid_reads_the_kubelets_layouts() {
    let underscored = MINE.replace('-', "_");
    let static_pod = "6a1f4e0c9b8d7e6f5a4b3c2d1e0f9a8b";
    for (path, uid) in [
        (systemd_containerd(MINE), MINE),
        (
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{underscored}.slice/crio-{}.scope",
                "cd".repeat(32)
            ),
            MINE,
        ),
        (
            format!("/kubepods.slice/kubepods-pod{underscored}.slice/cri-containerd-1.scope"),
            MINE,
        ),
        (
            format!("/kubepods/besteffort/pod{MINE}/{}", "ef".repeat(32)),
            MINE,
        ),
        (format!("/kubepods/pod{MINE}/{}", "ef".repeat(32)), MINE),
        (format!("/kubepods/burstable/pod{static_pod}/c"), static_pod),
        // An agent in a cgroup namespace of its own sees other pods' paths relative to it.
        (
            format!(
                "/../../kubepods-besteffort.slice/kubepods-besteffort-pod{underscored}.slice/cri-containerd-1.scope"
            ),
            MINE,
        ),
    ] {
        assert_eq!(pod_uid(&path).as_deref(), Some(uid), "{path}");
    }
    for path in [
        "/",
        "/system.slice/containerd.service",
        "/user.slice/user-1000.slice/podman-1234.scope",
        "/podman/kubepods/besteffort",
        "/kubepods.slice/kubepods-besteffort.slice",
        "/kubepods/besteffort/pod1234/c",
    ] {
        assert_eq!(pod_uid(path), None, "{path}");
    }
}

#[test]
fn cgroup_v1_lines_are_read_too() {
    let file = format!(
        "12:pids:/kubepods/besteffort/pod{MINE}/c\n1:name=systemd:/kubepods/besteffort/pod{MINE}/c\n0::/\n"
    );
    assert_eq!(cgroup_file_uid(&file).as_deref(), Some(MINE));
    assert_eq!(cgroup_file_uid("0::/system.slice/sshd.service\n"), None);
}

/// A container with a delegated cgroup nests one named after another pod below its own:
/// the path still belongs to the container's pod, the first pod-level segment.
#[test]
fn a_nested_cgroup_named_after_another_pod_stays_its_parents() {
    let victim_slice = format!("kubepods-besteffort-pod{}.slice", VICTIM.replace('-', "_"));
    for path in [
        format!(
            "{}/{victim_slice}/cri-containerd-2.scope",
            systemd_containerd(MINE)
        ),
        format!("/kubepods/besteffort/pod{MINE}/c/pod{VICTIM}/d"),
        format!("/kubepods/besteffort/pod{MINE}/c/kubepods/pod{VICTIM}"),
    ] {
        assert_eq!(pod_uid(&path).as_deref(), Some(MINE), "{path}");
    }

    let host = FakeHost::new();
    host.process(
        40,
        &format!("{}/{victim_slice}", systemd_containerd(MINE)),
        "attacker",
    );
    assert!(host.locate(VICTIM).is_none(), "the victim has no process");
    assert_eq!(host.locate(MINE).unwrap().unwrap().pid, 40);
}

#[test]
fn a_namespace_the_runtime_pinned_is_preferred_to_a_process_path() {
    let host = FakeHost::new();
    host.process(300, &systemd_containerd(MINE), "pod");
    host.process(120, &systemd_containerd(MINE), "pod");
    let found = host.locate(MINE).unwrap().unwrap();
    assert_eq!(
        (found.pid, found.netns),
        (120, host.path("proc/120/ns/net"))
    );

    host.pin("cni-1234", "pod");
    let found = host.locate(MINE).unwrap().unwrap();
    assert_eq!((found.pid, found.netns), (120, host.path("netns/cni-1234")));
}

#[test]
fn the_nodes_own_namespace_is_never_a_pods() {
    let host = FakeHost::new();
    // CRI-O may put conmon, which stays in the node's namespace, in the pod's cgroup.
    host.process(10, &systemd_containerd(MINE), "node");
    assert!(host.locate(MINE).is_none());
    host.process(11, &systemd_containerd(MINE), "pod");
    assert_eq!(host.locate(MINE).unwrap().unwrap().pid, 11);
}

#[test]
fn processes_in_several_namespaces_are_adopted_only_through_the_runtimes_pin() {
    let host = FakeHost::new();
    host.process(10, &systemd_containerd(MINE), "sandbox");
    // A process that made a namespace of its own (unshare -n in a user namespace).
    host.process(11, &systemd_containerd(MINE), "made-up");
    let refused = host.locate(MINE).unwrap().unwrap_err();
    assert!(
        matches!(
            refused,
            AdoptError::Ambiguous {
                namespaces: 2,
                pinned: 0,
                ..
            }
        ),
        "{refused}"
    );
    host.pin("cni-1", "sandbox");
    let found = host.locate(MINE).unwrap().unwrap();
    assert_eq!((found.pid, found.netns), (10, host.path("netns/cni-1")));
}

#[test]
fn locate_fails_without_the_agents_own_namespace() {
    let host = FakeHost::new();
    std::fs::remove_file(host.path("proc/self/ns/net")).unwrap();
    let error = host.paths().locate(&[MINE.to_owned()].into()).unwrap_err();
    assert!(matches!(error, AdoptError::OwnNetns { .. }), "{error}");
}

fn snapshot(pods: &str) -> Snapshot {
    files::snapshot_of(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: foo, labels: {{ambit.io/mesh: enabled}}}}\n\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: plain}}\n{pods}"
    ))
}

fn pod(name: &str, namespace: &str, uid: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, uid: \"{uid}\"{extra}}}\nspec: {{nodeName: n1}}\n"
    )
}

#[tokio::test]
async fn only_enrolled_pods_of_this_node_without_a_namespace_are_adopted() {
    let host = FakeHost::new();
    let uids: Vec<String> = (0..5)
        .map(|i| format!("00000000-0000-4000-8000-00000000000{i}"))
        .collect();
    for (pid, uid) in (100..).zip(&uids) {
        host.process(pid, &systemd_containerd(uid), &format!("pod{pid}"));
    }
    let mut snapshot = snapshot(
        &[
            pod("adopted", "foo", &uids[0], ""),
            pod(
                "annotated",
                "foo",
                &uids[1],
                ", annotations: {ambit.io/netns: /run/netns/a}",
            ),
            pod("plain", "plain", &uids[2], ""),
            pod("elsewhere", "foo", &uids[3], "").replace("n1", "n2"),
            pod(
                "no-process",
                "foo",
                "00000000-0000-4000-8000-0000000000ff",
                "",
            ),
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: no-uid, namespace: foo}\n".into(),
        ]
        .concat(),
    );
    let mut adopter = Adopter::new(host.paths(), "n1");
    adopter.overlay(&mut snapshot).await;
    let pods = &snapshot.pods;
    assert_eq!(
        pods["foo/adopted"].netns,
        Some(host.path("proc/100/ns/net"))
    );
    assert_eq!(pods["foo/annotated"].netns, Some("/run/netns/a".into()));
    assert_eq!(pods["plain/plain"].netns, None);
    assert_eq!(pods["foo/elsewhere"].netns, None);
    for key in [
        "foo/adopted",
        "foo/annotated",
        "plain/plain",
        "foo/elsewhere",
    ] {
        assert_eq!(pods[key].netns_missing, None, "{key}");
    }
    assert_eq!(
        pods["foo/no-process"].netns_missing.as_deref(),
        Some(
            "no process of pod UID 00000000-0000-4000-8000-0000000000ff runs in a network \
             namespace of its own on this node"
        )
    );
    assert_eq!(
        pods["foo/no-uid"].netns_missing.as_deref(),
        Some("no metadata.uid to find a process of the pod by")
    );
}

#[tokio::test]
async fn an_adoption_holds_without_a_rescan_until_its_process_is_gone() {
    let host = FakeHost::new();
    host.process(100, &systemd_containerd(MINE), "pod");
    let source = snapshot(&pod("a", "foo", MINE, ""));
    let mut adopter = Adopter::new(host.paths(), "n1");
    async fn pass(adopter: &mut Adopter, source: &Snapshot) -> Pod {
        let mut snapshot = source.clone();
        adopter.overlay(&mut snapshot).await;
        snapshot.pods.remove("foo/a").unwrap()
    }
    assert_eq!(
        pass(&mut adopter, &source).await.netns,
        Some(host.path("proc/100/ns/net"))
    );

    // No scan: one would fail without the agent's own namespace.
    std::fs::remove_file(host.path("proc/self/ns/net")).unwrap();
    host.process(90, &systemd_containerd(MINE), "pod");
    assert_eq!(
        pass(&mut adopter, &source).await.netns,
        Some(host.path("proc/100/ns/net"))
    );

    // The process exited: the pod is looked for again.
    host.link_netns("proc/self/ns/net", "node");
    std::fs::remove_dir_all(host.path("proc/100")).unwrap();
    assert_eq!(
        pass(&mut adopter, &source).await.netns,
        Some(host.path("proc/90/ns/net"))
    );
}

#[tokio::test]
async fn a_pod_with_an_ip_is_adopted_only_once_its_namespace_is_checked() {
    let host = FakeHost::new();
    host.process(100, &systemd_containerd(MINE), "pod");
    let mut snapshot = snapshot(&format!(
        "{}status: {{podIP: 10.0.0.5}}\n",
        pod("a", "foo", MINE, "")
    ));
    Adopter::new(host.paths(), "n1")
        .overlay(&mut snapshot)
        .await;
    // The fake namespace is a plain file, which cannot be entered to look for the IP.
    let pod = &snapshot.pods["foo/a"];
    assert_eq!(pod.netns, None);
    let refused = pod.netns_missing.as_deref().unwrap();
    assert!(
        refused.starts_with("cannot enter network namespace"),
        "{refused}"
    );
}
