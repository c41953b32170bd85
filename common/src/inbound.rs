//! Inbound steering: an `sk_lookup` program attached to each enrolled pod's netns hands TCP
//! connections for the pod's IPs to the proxy's listeners in that netns: port 15008 to the
//! HBONE listener, every other port to the plaintext listener.

use crate::addr::SockAddr;

/// Pod address ([`SockAddr`] with port 0) → [`PodSlots`]: the enrolled pod IPs, every
/// address of a pod (IPv4 and IPv6) with the same slots.
pub const INBOUND_PODS_MAP: &str = "INBOUND_PODS";
/// `SockMap` of listener sockets, indexed by [`PodSlots::hbone`] and [`PodSlots::plaintext`].
pub const INBOUND_LISTENERS_MAP: &str = "INBOUND_LISTENERS";
/// Entries of [`INBOUND_PODS_MAP`]: room for every enrolled pod to be dual-stack.
pub const POD_ADDRESSES: u32 = 2 * crate::outbound::MAX_ENROLLED;
/// Slots in [`INBOUND_LISTENERS_MAP`]: two per enrolled pod.
pub const LISTENER_SLOTS: u32 = 2 * crate::outbound::MAX_ENROLLED;

/// Where the listeners of one pod sit in the socket map.
///
/// A pod present in [`INBOUND_PODS_MAP`] whose slot is empty (the proxy is down) has its
/// inbound connections dropped: the program never falls back to the application.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodSlots {
    pub hbone: u32,
    pub plaintext: u32,
}

/// The pod-IP key of [`INBOUND_PODS_MAP`].
pub const fn pod_key(mut addr: SockAddr) -> SockAddr {
    addr.port = 0;
    addr
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: repr(C), Copy, two u32 with no padding, every bit pattern valid.
    unsafe impl aya::Pod for PodSlots {}
}
