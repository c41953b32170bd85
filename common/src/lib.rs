//! The contract between ambit's kernel programs (`ebpf/`) and the agent (`userspace/`):
//! `#[repr(C)]` map keys and values, map names and the ports and socket marks both sides
//! must agree on. Grouped by program: [`outbound`] for the connect and sock_ops programs,
//! [`inbound`] for `sk_lookup`.
//!
//! Layout rules: every type is `Copy`, has explicit padding and no `bool`, so the kernel
//! and user space agree byte for byte. Addresses are stored as four `u32` words in network
//! byte order (IPv4 in the first word) so the same maps can carry IPv6 later.
#![no_std]

pub mod addr;
pub mod inbound;
pub mod outbound;

/// Socket marks the proxy sets on its own sockets. Any mark with [`marks::MASK`] bits equal
/// to [`marks::PROXY`] is never redirected.
pub mod marks {
    /// Bits that identify a proxy socket.
    pub const MASK: u32 = 0xffff_fff0;
    /// Upstream sockets the proxy opens from a pod's namespace to other pods.
    pub const PROXY: u32 = 0x0a3b_0000;
    /// Sockets that connect to a local application with the client's IP (transparent
    /// bind). The agent routes packets carrying this mark through `lo` in the pod netns so
    /// the application's replies return to the proxy.
    pub const PROXY_TRANSPARENT: u32 = PROXY | 1;

    /// True when `mark` belongs to one of the proxy's own sockets.
    pub const fn is_proxy(mark: u32) -> bool {
        mark & MASK == PROXY
    }
}

/// Ports of the proxy's listeners inside every enrolled pod's network namespace.
pub mod ports {
    /// Outbound capture: connections the pod's applications make.
    pub const OUTBOUND: u16 = 15001;
    /// Inbound plaintext capture: non-mesh clients reaching the pod.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// Inbound HBONE: mutual TLS and HTTP/2 `CONNECT` from other mesh proxies.
    pub const INBOUND_HBONE: u16 = 15008;
}
