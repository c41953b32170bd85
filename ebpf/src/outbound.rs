//! Outbound redirection of enrolled pods' TCP connects.
//!
//! IPv4 (`connect4`) and IPv4-mapped IPv6 (`connect6` to `::ffff:a.b.c.d`, which is IPv4 on
//! the wire) are redirected to the pod's IPv4 outbound listener (`127.0.0.1`), other IPv6
//! to its IPv6 one (`[::1]`, same port): an `IPV6_V6ONLY` socket cannot reach an IPv4
//! listener. Link-local and multicast IPv6 destinations are refused: the proxy cannot
//! carry them (a link-local address means nothing without the zone the connect carries,
//! which the original destination does not keep), and a connect it cannot capture must
//! not leave the pod in plaintext.

use ambit_common::{
    addr::{AF_INET, AF_INET6, SockAddr},
    outbound::{ConnKey, MAX_AGENTS, MAX_ENROLLED, ORIG_DST_ENTRIES, Redirect},
    ports,
};
use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_addr},
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;

// Map names must equal the constants in `ambit_common::outbound`.
#[map]
static PROXY_CGROUPS: HashMap<u64, u32> = HashMap::pinned(MAX_AGENTS, 0);
#[map]
static ENROLLED_NETNS: HashMap<u64, Redirect> = HashMap::pinned(MAX_ENROLLED, 0);
#[map]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);
#[map]
static ORIG_DST: LruHashMap<ConnKey, SockAddr> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

const SOCK_STREAM: u32 = 1;
const LOOPBACK_NET: u32 = 0x7f00_0000;
const THIS_NET: u32 = 0x0000_0000;
const NET_MASK: u32 = 0xff00_0000;
const LOCALHOST: u32 = 0x7f00_0001;
const VERDICT_ALLOW: i32 = 1;
const VERDICT_REJECT: i32 = 0;

/// What to do with one connect.
enum Verdict {
    Allow,
    Reject,
    /// Send it to the outbound listener, remembering where it was going.
    Redirect {
        orig: SockAddr,
        port: u16,
    },
}

#[cgroup_sock_addr(connect4)]
pub fn ambit_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for the program's lifetime.
    let addr = unsafe { &*ctx.sock_addr };
    let verdict = classify(&ctx, addr, |addr| {
        Destination::V4(addr.user_ip4, u16::from_be(addr.user_port as u16))
    });
    apply(&ctx, verdict, |addr, _, port| {
        addr.user_ip4 = u32::to_be(LOCALHOST);
        addr.user_port = u32::from(port.to_be());
    })
}

#[cgroup_sock_addr(connect6)]
pub fn ambit_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let addr = unsafe { &*ctx.sock_addr };
    let verdict = classify(&ctx, addr, |addr| {
        let ip = read_words(&addr.user_ip6);
        let port = u16::from_be(addr.user_port as u16);
        match SockAddr::v4_mapped(ip) {
            Some(v4) => Destination::V4(v4, port),
            None if is_local_v6(ip) => Destination::LocalV6(port),
            None if is_unreachable_v6(ip) => Destination::UnreachableV6,
            None => Destination::V6(ip, port),
        }
    });
    apply(&ctx, verdict, |addr, orig, port| {
        // The loopback of the destination's family (`::ffff:127.0.0.1` for IPv4), one word
        // at a time: the verifier refuses wider stores here.
        let words = if orig.family == AF_INET {
            [0, 0, u32::to_be(0xffff), u32::to_be(LOCALHOST)]
        } else {
            [0, 0, 0, u32::to_be(1)]
        };
        for (i, word) in words.into_iter().enumerate() {
            // SAFETY: writing a field of the context the kernel lent us.
            unsafe { core::ptr::write_volatile(&mut addr.user_ip6[i], word) };
        }
        addr.user_port = u32::from(port.to_be());
    })
}

/// A connect's destination as the policy below sees it.
enum Destination {
    /// IPv4, or IPv4-mapped IPv6 (address in network byte order).
    V4(u32, u16),
    /// `::1` or `::`: the pod's own loopback.
    LocalV6(u16),
    /// Link-local or multicast: nothing the proxy can connect to for the pod.
    UnreachableV6,
    /// Any other IPv6 address (network byte order).
    V6([u32; 4], u16),
}

/// The one decision both connect programs share.
fn classify(
    ctx: &SockAddrContext,
    addr: &bpf_sock_addr,
    destination: impl FnOnce(&bpf_sock_addr) -> Destination,
) -> Verdict {
    if addr.type_ != SOCK_STREAM {
        return Verdict::Allow;
    }
    // SAFETY: bpf_get_netns_cookie accepts a sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: HashMap::get of a plain Copy value; a concurrent update at worst yields the
    // previous value.
    let Some(redirect) = (unsafe { ENROLLED_NETNS.get(&netns) }) else {
        return Verdict::Allow;
    };
    if is_proxy() {
        return Verdict::Allow;
    }
    match destination(addr) {
        // The pod's own loopback stays inside the pod, except the proxy's listeners: only
        // the kernel's redirection (and `sk_lookup`) may hand them connections.
        Destination::V4(ip, port) if is_local_v4(ip) => local(port),
        Destination::LocalV6(port) => local(port),
        Destination::V4(ip, port) => Verdict::Redirect {
            orig: SockAddr::v4(ip, port),
            port: redirect.port,
        },
        Destination::V6(ip, port) => Verdict::Redirect {
            orig: SockAddr::v6(ip, port),
            port: redirect.port,
        },
        Destination::UnreachableV6 => Verdict::Reject,
    }
}

fn local(port: u16) -> Verdict {
    if ports::is_listener(port) {
        Verdict::Reject
    } else {
        Verdict::Allow
    }
}

/// True when the calling process is an agent: its cgroup is one a pod cannot join. Two
/// agents run at once during an upgrade (the old one drains while the new one serves),
/// hence a set.
fn is_proxy() -> bool {
    // SAFETY: no arguments; available to cgroup sock_addr programs.
    let current = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: plain Copy value, see classify.
    unsafe { PROXY_CGROUPS.get(&current) }.is_some()
}

/// 127.0.0.0/8 and 0.0.0.0/8 (a connect to 0.0.0.0 reaches the local host).
fn is_local_v4(ip_be: u32) -> bool {
    let net = u32::from_be(ip_be) & NET_MASK;
    net == LOOPBACK_NET || net == THIS_NET
}

/// `::1` and `::`.
fn is_local_v6(ip: [u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == u32::to_be(1))
}

/// Link-local unicast (`fe80::/10`) and multicast (`ff00::/8`).
fn is_unreachable_v6(ip: [u32; 4]) -> bool {
    let first = u32::from_be(ip[0]);
    first & 0xffc0_0000 == 0xfe80_0000 || first & 0xff00_0000 == 0xff00_0000
}

/// An IPv6 address field of a context, one 4-byte load per word: the verifier refuses the
/// wider loads LLVM would otherwise merge them into.
fn read_words(field: &[u32; 4]) -> [u32; 4] {
    // SAFETY: reading a field of the context the kernel lent us.
    [0, 1, 2, 3].map(|i| unsafe { core::ptr::read_volatile(&field[i]) })
}

/// Carries out `verdict`; `rewrite` points the connect at the outbound listener's port,
/// on the loopback address of the original destination's family.
fn apply(
    ctx: &SockAddrContext,
    verdict: Verdict,
    rewrite: impl FnOnce(&mut bpf_sock_addr, &SockAddr, u16),
) -> i32 {
    let (orig, port) = match verdict {
        Verdict::Allow => return VERDICT_ALLOW,
        Verdict::Reject => return VERDICT_REJECT,
        Verdict::Redirect { orig, port } => (orig, port),
    };
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if ORIG_DST_BY_COOKIE.insert(&cookie, &orig, 0).is_err() {
        // Fail closed: a connect we could not record is refused, not let through unmeshed.
        warn!(
            ctx,
            "ambit: cannot record original destination; refusing connect"
        );
        return VERDICT_REJECT;
    }
    // SAFETY: the kernel hands a valid `bpf_sock_addr` for the program's lifetime.
    rewrite(unsafe { &mut *ctx.sock_addr }, &orig, port);
    VERDICT_ALLOW
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
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return Ok(());
    }
    // An IPv6 socket redirected to `::ffff:127.0.0.1` reaches the IPv4 listener: the proxy
    // sees its IPv4 address.
    let port = ctx.local_port() as u16;
    let local = match ctx.family() {
        f if f == u32::from(AF_INET) => SockAddr::v4(ctx.local_ip4(), port),
        f if f == u32::from(AF_INET6) => {
            // SAFETY: the kernel hands a valid `bpf_sock_ops` for the program's lifetime.
            let ip = read_words(unsafe { &(*ctx.ops).local_ip6 });
            match SockAddr::v4_mapped(ip) {
                Some(v4) => SockAddr::v4(v4, port),
                None => SockAddr::v6(ip, port),
            }
        }
        _ => return Ok(()),
    };
    // SAFETY: sock_ops contexts are accepted by both cookie helpers.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: plain Copy value, see classify.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie) }) else {
        return Ok(());
    };
    let key = ConnKey {
        // SAFETY: as above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        local,
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
