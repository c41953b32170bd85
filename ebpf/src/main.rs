//! ambit's kernel programs. They only ever act on sockets of enrolled pods, inside each
//! pod's own network namespace:
//!
//! - [`outbound`]: `cgroup/connect4` and `cgroup/connect6` send a TCP connect of an enrolled
//!   pod to the pod-local outbound listener of its family and record where it was going
//!   (link-local and multicast IPv6 are refused); `sock_ops` files that record under
//!   the client's address once the connection is up.
//! - [`inbound`]: `sk_lookup` hands TCP arriving at an enrolled pod's IPs to the proxy's
//!   listeners in that pod's namespace, and drops any other TCP arriving there.
//!
//! Both directions fail closed: an enrolled pod whose proxy is gone gets refused
//! connections, never a plaintext path around the mesh.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod inbound;
#[cfg(target_arch = "bpf")]
mod outbound;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that can reach a panic, so this is never linked in.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
