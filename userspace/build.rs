//! Builds the kernel programs (`ebpf/`) with the nightly toolchain and bpf-linker and
//! places the object in OUT_DIR, where `redirect` embeds it. `cargo xtask setup` installs
//! what this needs; a missing piece fails here with the command that fixes it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not installed; run `cargo xtask setup` (it installs the toolchain the kernel programs need)"
        ));
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("userspace has a parent directory")?
        .join("ebpf");
    let root = root.to_str().context("workspace path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ambit-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the kernel programs failed; `cargo xtask setup` checks the toolchain")
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("bpf-linker"))
            .find(|p| p.is_file())
    })
}
