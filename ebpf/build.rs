//! Rebuild the kernel programs when bpf-linker changes (it embeds the LLVM that links them).
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
