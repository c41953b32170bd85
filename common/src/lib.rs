//! The contract between ambit's kernel programs (`ebpf/`) and the agent (`userspace/`):
//! `#[repr(C)]` map keys and values, map names and the ports and socket marks both sides
//! must agree on. Grouped by program: [`outbound`] for the connect and sock_ops programs,
//! [`inbound`] for `sk_lookup`.
//!
//! Layout rules: every type is `Copy`, has explicit padding and no `bool`, so the kernel
//! and user space agree byte for byte. Addresses are stored as four `u32` words in network
//! byte order (IPv4 in the first word), so the same maps carry both families.
#![no_std]

pub mod addr;
pub mod inbound;
pub mod outbound;

/// Socket marks the proxy sets on its own sockets, for routing only: a mark is not an
/// identity (any process with `CAP_NET_RAW` can set one), so the kernel programs never
/// trust it (see [`outbound::PROXY_CGROUPS_MAP`]).
pub mod marks {
    /// Upstream sockets the proxy opens from a pod's namespace to other pods.
    pub const PROXY: u32 = 0x0a3b_0000;
    /// Sockets that connect to a local application with the client's IP (transparent
    /// bind). The agent routes packets carrying this mark through `lo` in the pod netns so
    /// the application's replies return to the proxy.
    pub const PROXY_TRANSPARENT: u32 = PROXY | 1;
}

/// Ports of the proxy's listeners inside every enrolled pod's network namespace.
pub mod ports {
    /// Outbound capture: connections the pod's applications make.
    pub const OUTBOUND: u16 = 15001;
    /// Inbound plaintext capture: non-mesh clients reaching the pod.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// Inbound HBONE: mutual TLS and HTTP/2 `CONNECT` from other mesh proxies.
    pub const INBOUND_HBONE: u16 = 15008;

    /// True for the ports of the proxy's own listeners: no pod process and no connection
    /// the proxy makes may be aimed at them, or the proxy would end up connecting to itself.
    pub const fn is_listener(port: u16) -> bool {
        matches!(port, OUTBOUND | INBOUND_PLAINTEXT | INBOUND_HBONE)
    }
}
