//! Outbound redirection: `cgroup/connect4` and `cgroup/connect6` rewrite a TCP connect of an
//! enrolled pod to the pod-local outbound listener and remember the original destination;
//! `sock_ops` re-keys that record by the client's local address once the connection is
//! established, which is the peer address the proxy sees on the accepted socket.
//!
//! The proxy's own sockets are recognised by the cgroup of the process that connects
//! ([`PROXY_CGROUPS_MAP`]), which a pod cannot change, never by a socket mark, which any
//! process with `CAP_NET_RAW` can set.

use crate::addr::SockAddr;

/// Set of cgroup (v2) ids (`u64` → `u32` 1) of the running agents: connects made from
/// them are the proxy's own and are never redirected. More than one during an upgrade,
/// when the old agent drains beside the new one. Each agent adds its own id at load and
/// removes it on exit; a dead agent's id is removed by the next one (`redirect`).
pub const PROXY_CGROUPS_MAP: &str = "PROXY_CGROUPS";
/// The map of the same role in versions before upgrades were hitless: an `Array` of one
/// `u64`. A pinned map whose definition differs fails to load, so the set took a new
/// name; the agent removes this pin when it finds it.
pub const LEGACY_PROXY_CGROUP_MAP: &str = "PROXY_CGROUP";
/// Agents (cgroups) that may be recognised at once.
pub const MAX_AGENTS: u32 = 16;
/// Netns cookie (`u64`) → [`Redirect`]: the enrolled pod namespaces.
pub const ENROLLED_NETNS_MAP: &str = "ENROLLED_NETNS";
/// Socket cookie (`u64`) → original destination [`SockAddr`], written at connect time.
pub const ORIG_DST_BY_COOKIE_MAP: &str = "ORIG_DST_BY_COOKIE";
/// [`ConnKey`] → original destination [`SockAddr`], written once the connection is established.
pub const ORIG_DST_MAP: &str = "ORIG_DST";

/// Entries of the two LRU maps; old entries are evicted when a proxy never claims them.
pub const ORIG_DST_ENTRIES: u32 = 65_536;
/// Pods one node can enroll.
pub const MAX_ENROLLED: u32 = 4_096;

/// What to do with connects from an enrolled netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// Port of the outbound listeners on 127.0.0.1 and ::1 in the pod netns (host byte order).
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A client socket inside one pod: the netns cookie disambiguates `127.0.0.1:port`, which
/// repeats across pods.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    /// The client's local address (the proxy's peer address on the accepted socket).
    pub local: SockAddr,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: repr(C), Copy, explicit padding fields, every bit pattern valid.
    unsafe impl aya::Pod for Redirect {}
    // SAFETY: repr(C), Copy, 8 + 20 + 4 bytes at align 8 with explicit padding, every bit
    // pattern valid.
    unsafe impl aya::Pod for ConnKey {}
}
