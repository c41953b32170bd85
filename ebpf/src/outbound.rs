//! Outbound redirection of enrolled pods' TCP connects.

use ambit_common::{
    addr::{AF_INET, SockAddr},
    marks,
    outbound::{ConnKey, MAX_ENROLLED, ORIG_DST_ENTRIES, Redirect},
};
use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;

// Map names must equal the constants in `ambit_common::outbound`.
#[map]
static ENROLLED_NETNS: HashMap<u64, Redirect> = HashMap::pinned(MAX_ENROLLED, 0);
#[map]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);
#[map]
static ORIG_DST: LruHashMap<ConnKey, SockAddr> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

const SOCK_STREAM: u32 = 1;
const LOOPBACK_NET: u32 = 0x7f00_0000;
const LOOPBACK_MASK: u32 = 0xff00_0000;
const VERDICT_ALLOW: i32 = 1;
const VERDICT_REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn ambit_connect4(ctx: SockAddrContext) -> i32 {
    // Fail closed: a connect we meant to redirect but could not record is refused rather
    // than let through unmeshed.
    try_connect4(&ctx).unwrap_or(VERDICT_REJECT)
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return Ok(VERDICT_ALLOW);
    }
    // SAFETY: bpf_get_netns_cookie accepts a sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: HashMap::get of a plain Copy value; a concurrent update at worst yields the
    // previous value.
    let Some(redirect) = (unsafe { ENROLLED_NETNS.get(&netns) }) else {
        return Ok(VERDICT_ALLOW);
    };
    let dst_ip = addr.user_ip4;
    if u32::from_be(dst_ip) & LOOPBACK_MASK == LOOPBACK_NET {
        return Ok(VERDICT_ALLOW);
    }
    // SAFETY: `sk` is always set for connect hooks; reading `mark` from bpf_sock is allowed.
    let mark = unsafe { (*(addr.__bindgen_anon_1.sk as *const bpf_sock)).mark };
    if marks::is_proxy(mark) {
        return Ok(VERDICT_ALLOW);
    }

    let orig = SockAddr::v4(dst_ip, u16::from_be(addr.user_port as u16));
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if ORIG_DST_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        warn!(
            ctx,
            "ambit: cannot record original destination; refusing connect"
        );
        return Err(VERDICT_REJECT);
    }
    addr.user_ip4 = u32::to_be(0x7f00_0001);
    addr.user_port = u32::from(redirect.port.to_be());
    Ok(VERDICT_ALLOW)
}

#[sock_ops]
pub fn ambit_sockops_established(ctx: SockOpsContext) -> u32 {
    // Returning 1 only acknowledges the callback; sock_ops cannot block a connection.
    let _ = try_sockops_established(&ctx);
    1
}

/// Files the original destination under the client's local address, which is what the
/// proxy sees as the peer of the accepted socket.
fn try_sockops_established(ctx: &SockOpsContext) -> Result<(), i32> {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || ctx.family() != u32::from(AF_INET) {
        return Ok(());
    }
    // SAFETY: sock_ops contexts are accepted by both cookie helpers.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: plain Copy value, see try_connect4.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }) else {
        return Ok(());
    };
    let key = ConnKey {
        // SAFETY: as above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        local: SockAddr::v4(ctx.local_ip4(), ctx.local_port() as u16),
        _pad: 0,
    };
    if let Err(e) = ORIG_DST.insert(&key, orig, 0) {
        warn!(ctx, "ambit: cannot file original destination: {}", e);
        return Err(e);
    }
    // The proxy looks up by address from here on.
    let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
    Ok(())
}
