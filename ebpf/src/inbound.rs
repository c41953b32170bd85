//! Inbound steering of TCP for enrolled pods' IPs to the proxy's listeners.
//!
//! The program is attached only to enrolled pods' namespaces, so every TCP connection it
//! sees arriving from outside the pod is for an enrolled pod: it is steered to a listener
//! of the proxy or dropped, never passed to the application. That covers addresses the
//! agent does not (yet) know as the pod's, such as its link-local IPv6 address. IPv4 and
//! IPv6 lookups alike: a pod with an IPv6 address has dual-stack listeners, which the
//! kernel lets take both families.

use ambit_common::{
    addr::{AF_INET, AF_INET6, SockAddr},
    inbound::{LISTENER_SLOTS, POD_ADDRESSES, PodSlots, pod_key},
    ports,
};
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::{map, sk_lookup},
    maps::{HashMap, SockMap},
    programs::SkLookupContext,
};
use aya_log_ebpf::warn;

// Map names must equal the constants in `ambit_common::inbound`.
#[map]
static INBOUND_PODS: HashMap<SockAddr, PodSlots> = HashMap::pinned(POD_ADDRESSES, 0);
#[map]
static INBOUND_LISTENERS: SockMap = SockMap::pinned(LISTENER_SLOTS, 0);

const IPPROTO_TCP: u32 = 6;
/// `lo` is always ifindex 1: the proxy's own transparent connections to the application
/// arrive there and must reach the application, not the proxy again. (Only the pod's own
/// processes can send on its `lo`, and their connects are redirected before that.)
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn ambit_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid `bpf_sk_lookup` for the program's lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP || lookup.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let pod = if lookup.family == u32::from(AF_INET) {
        SockAddr::v4(lookup.local_ip4, 0)
    } else if lookup.family == u32::from(AF_INET6) {
        // One 4-byte load per word, as the verifier wants for context fields.
        // SAFETY: reading a field of the context the kernel lent us.
        SockAddr::v6(
            [0, 1, 2, 3].map(|i| unsafe { core::ptr::read_volatile(&lookup.local_ip6[i]) }),
            0,
        )
    } else {
        return SK_DROP;
    };
    let pod = pod_key(pod);
    // SAFETY: plain Copy value; a concurrent update at worst yields the previous value.
    let Some(slots) = (unsafe { INBOUND_PODS.get(&pod) }) else {
        return SK_DROP;
    };
    let slot = if lookup.local_port == u32::from(ports::INBOUND_HBONE) {
        slots.hbone
    } else {
        slots.plaintext
    };
    // Fail closed: an enrolled pod whose listener is missing (proxy down) drops the SYN.
    if INBOUND_LISTENERS.redirect_sk_lookup(&ctx, slot, 0).is_err() {
        warn!(
            &ctx,
            "ambit: no proxy listener in slot {} for an enrolled pod; dropping", slot
        );
        return SK_DROP;
    }
    SK_PASS
}
