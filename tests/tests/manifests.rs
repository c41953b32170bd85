//! The install manifests (`deploy/kubernetes`): every kustomization renders with the real
//! `kubectl kustomize`, the output validates against the Kubernetes schemas
//! (`kubernetes-validate --strict`) and passes the manifest security scan (`checkov`) with
//! no finding other than those accepted, each with its reason, in a `checkov.io/skip`
//! annotation. The tools are installed by `cargo xtask setup`.

use std::{
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
