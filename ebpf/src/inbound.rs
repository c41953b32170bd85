//! Inbound steering of TCP for enrolled pods' IPs to the proxy's listeners.

use ambit_common::{
    addr::{AF_INET, SockAddr},
    inbound::{LISTENER_SLOTS, PodSlots, pod_key},
    outbound::MAX_ENROLLED,
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
static INBOUND_PODS: HashMap<SockAddr, PodSlots> = HashMap::pinned(MAX_ENROLLED, 0);
#[map]
static INBOUND_LISTENERS: SockMap = SockMap::pinned(LISTENER_SLOTS, 0);

const IPPROTO_TCP: u32 = 6;
/// `lo` is always ifindex 1: the proxy's own transparent connections to the application
/// arrive there and must reach the application, not the proxy again.
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn ambit_sk_lookup(ctx: SkLookupContext) -> u32 {
    // Fail closed: an enrolled pod whose listener is missing (proxy down) drops the SYN.
    match try_sk_lookup(&ctx) {
        Ok(verdict) => verdict,
        Err(verdict) => verdict,
    }
}

fn try_sk_lookup(ctx: &SkLookupContext) -> Result<u32, u32> {
    // SAFETY: the kernel hands a valid `bpf_sk_lookup` for the program's lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP
        || lookup.family != u32::from(AF_INET)
        || lookup.ingress_ifindex == LOOPBACK_IFINDEX
    {
        return Ok(SK_PASS);
    }
    let pod = pod_key(SockAddr::v4(lookup.local_ip4, 0));
    // SAFETY: plain Copy value; a concurrent update at worst yields the previous value.
    let Some(slots) = (unsafe { INBOUND_PODS.get(&pod) }) else {
        return Ok(SK_PASS);
    };
    let slot = if lookup.local_port == u32::from(ports::INBOUND_HBONE) {
        slots.hbone
    } else {
        slots.plaintext
    };
    if INBOUND_LISTENERS.redirect_sk_lookup(ctx, slot, 0).is_err() {
        warn!(
            ctx,
            "ambit: no proxy listener in slot {} for an enrolled pod; dropping", slot
        );
        return Err(SK_DROP);
    }
    Ok(SK_PASS)
}
