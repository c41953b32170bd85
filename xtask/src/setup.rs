//! `cargo xtask setup`: installs, only where missing, what building ambit needs:
//! Debian packages (LLVM 22 for bpf-linker, the clients the tests use), Python's `grpcio`
//! (the gRPC tests' client and server), `prometheus-client` (Prometheus' own parser of
//! the metrics text) and `websocket-client` (the UI test's DevTools client), `kubectl` and the manifest checkers
//! (`kubernetes-validate`, `checkov`), `rust-src` for the nightly toolchain, and
//! bpf-linker built against LLVM 22. Checks that the nightly's
//! LLVM major matches bpf-linker's, since a mismatch fails late with `Invalid record`.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::build::{cargo, run};

/// The LLVM major that bpf-linker is built against and the nightly must use.
const LLVM_MAJOR: &str = "22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages: LLVM for bpf-linker, make for jemalloc, and the real clients and tools
/// the tests and the bench run.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    // The agent's allocator: tikv-jemalloc-sys builds jemalloc with configure and make.
    "make",
    "curl",
    "iproute2",
    "openssl",
    "util-linux",
    "tcpdump",
    "bpftool",
    // cargo xtask bench
    "iperf3",
    "sockperf",
    "wrk",
    // The gRPC tests: pip, which installs grpcio for whichever python3 comes first on PATH.
    "python3-pip",
    // The manifest tests' checkers live in a virtual environment of their own.
    "python3-venv",
    // The CNI tests chain the reference plugins (`bridge`, `host-local`, in /usr/lib/cni)
    // before ambit-cni, as a container runtime does.
    "containernetworking-plugins",
    // The UI test loads the admin page in a real browser, headless.
    "chromium",
];

/// The virtual environment of the manifest tests' checkers (`tests/tests/manifests.rs`
/// runs them from its `bin/`): apart from the system's packages, since checkov pins
/// dozens of dependencies that would otherwise replace the system's or grpcio's.
const MANIFEST_TOOLS: &str = "/opt/ambit-manifest-tools";
/// The checkers and their versions, pinned so a release cannot change a verdict unseen.
const MANIFEST_CHECKERS: &[(&str, &str)] =
    &[("kubernetes-validate", "1.37.0"), ("checkov", "3.3.30")];

/// Python modules the tests import, from PyPI, as (pip name, module): the gRPC tests'
/// client and server, Prometheus' parser of the text format and the HTTP/2 library of the
/// ztunnel-shaped HBONE client (`tests/tests/metrics.rs`), and the WebSocket client that
/// drives Chromium over DevTools (`tests/tests/ui.rs`).
const PYTHON_MODULES: &[(&str, &str)] = &[
    ("grpcio", "grpc"),
    ("prometheus-client", "prometheus_client.parser"),
    ("h2", "h2.connection"),
    ("websocket-client", "websocket"),
];

pub fn setup() -> anyhow::Result<()> {
    install_packages()?;
    install_python_modules()?;
    install_kubectl()?;
    install_manifest_checkers()?;
    check_nightly()?;
    install_rust_src()?;
    install_bpf_linker()
}

fn install_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `sudo apt-get install -y {}` or `sudo cargo xtask setup`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Installs [`PYTHON_MODULES`] from PyPI for the first `python3` on PATH: the interpreter
/// the test bed starts `tests/grpc/echo.py` and the metrics parser with, since
/// `cargo xtask test` runs setup and the tests in one environment.
fn install_python_modules() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for (package, module) in PYTHON_MODULES {
        if !python_imports(module)? {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "install", "--quiet"]).args(&missing);
    if externally_managed()? {
        // PEP 668: Debian's own python3 refuses pip outside a virtual environment. Run as
        // root, pip installs into /usr/local/lib/python3.*/dist-packages, apart from the
        // files apt manages, and the tests need the modules in that very interpreter (not
        // a venv), so the override is deliberate. Without root pip would fall back to the
        // user's site, which the tests, run as root, do not see.
        if !is_root() {
            bail!(
                "python3 ({}) lacks {} and is the system's: run `sudo cargo xtask setup`",
                python_path(),
                missing.join(", ")
            );
        }
        pip.arg("--break-system-packages");
    }
    eprintln!(
        "setup: installing {} from PyPI for {}",
        missing.join(", "),
        python_path()
    );
    run(&mut pip)?;
    for (package, module) in PYTHON_MODULES {
        if !python_imports(module)? {
            bail!(
                "pip installed {package}, but {} still cannot import {module}",
                python_path()
            );
        }
    }
    Ok(())
}

fn python_imports(module: &str) -> anyhow::Result<bool> {
    let status = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stderr(std::process::Stdio::null())
        .status()
        .context("no python3 on PATH: install python3 and python3-pip")?;
    Ok(status.success())
}

/// Whether `python3` is a distribution's interpreter that refuses pip (PEP 668): the
/// `EXTERNALLY-MANAGED` marker in its standard library, outside a virtual environment.
fn externally_managed() -> anyhow::Result<bool> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import os, sys, sysconfig; print(sys.prefix == sys.base_prefix and os.path.isfile(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))",
        ])
        .output()
        .context("cannot run python3")?;
    Ok(output.stdout.trim_ascii() == b"True")
}

/// The interpreter `python3` runs, for messages.
fn python_path() -> String {
    Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "python3".to_owned())
}

/// `kubectl` for `kubectl kustomize`: Debian's `kubernetes-client` unless a kubectl is on
/// PATH already (another package, such as the Kubernetes project's or a cloud SDK's, owns
/// /usr/bin/kubectl then, and installing Debian's would conflict with it).
fn install_kubectl() -> anyhow::Result<()> {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "no kubectl: run `sudo apt-get install -y kubernetes-client` or `sudo cargo xtask setup`"
        );
    }
    eprintln!("setup: installing kubernetes-client (kubectl)");
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "kubernetes-client",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// `kubernetes-validate` and `checkov` from PyPI, at their pinned versions, in
/// [`MANIFEST_TOOLS`].
fn install_manifest_checkers() -> anyhow::Result<()> {
    let bin = std::path::Path::new(MANIFEST_TOOLS).join("bin");
    let missing: Vec<String> = MANIFEST_CHECKERS
        .iter()
        .filter(|(tool, version)| {
            !Command::new(bin.join(tool))
                .arg("--version")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim().ends_with(version))
        })
        .map(|(tool, version)| format!("{tool}=={version}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the manifest checkers {} are missing from {MANIFEST_TOOLS}: run `sudo cargo xtask setup`",
            missing.join(" ")
        );
    }
    if !bin.join("pip").exists() {
        run(Command::new("python3").args(["-m", "venv", MANIFEST_TOOLS]))?;
    }
    eprintln!(
        "setup: installing {} into {MANIFEST_TOOLS}",
        missing.join(" ")
    );
    run(Command::new(bin.join("pip"))
        .args(["install", "--quiet"])
        .args(&missing))
}

fn check_nightly() -> anyhow::Result<()> {
    let output = Command::new("rustc").args(["+nightly", "-vV"]).output();
    let text = match output {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => bail!(
            "no nightly Rust toolchain: the kernel programs need one with LLVM {LLVM_MAJOR}; install it with `rustup toolchain install nightly` and check `rustc +nightly -vV`"
        ),
    };
    let llvm = text
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` does not report an LLVM version")?;
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!(
            "the nightly toolchain uses LLVM {llvm}, but bpf-linker is built for LLVM {LLVM_MAJOR}; install a nightly on LLVM {LLVM_MAJOR} (`rustup toolchain install nightly-<date>`, then `rustup override set`) or the bpf link fails with `Invalid record`"
        );
    }
    Ok(())
}

fn install_rust_src() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("cannot run rustup")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about 3 minutes)"
    );
    let prefix = format!("/usr/lib/llvm-{LLVM_MAJOR}");
    let path = format!("{prefix}/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(cargo()
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ])
        .env(format!("LLVM_SYS_{LLVM_MAJOR}1_PREFIX"), &prefix)
        .env("LLVM_PREFIX", &prefix)
        .env("PATH", path))
}
