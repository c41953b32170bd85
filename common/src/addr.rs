//! The socket address as both sides store it in maps.

/// `AF_INET` as the kernel reports it in `bpf_sock_addr.family`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// An IPv4 or IPv6 socket address.
///
/// Invariant: `ip` holds the address in network byte order, an IPv4 address in `ip[0]`
/// with the other words zero; `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u16,
}

impl SockAddr {
    /// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), given as
    /// four words in network byte order; `None` for any other IPv6 address.
    pub const fn v4_mapped(ip6_be: [u32; 4]) -> Option<u32> {
        if ip6_be[0] == 0 && ip6_be[1] == 0 && ip6_be[2] == u32::to_be(0xffff) {
            Some(ip6_be[3])
        } else {
            None
        }
    }

    /// An IPv4 address; `ip_be` is in network byte order as the kernel hands it over.
    pub const fn v4(ip_be: u32, port: u16) -> Self {
        Self {
            ip: [ip_be, 0, 0, 0],
            port,
            family: AF_INET,
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    use super::*;

    // SAFETY: `SockAddr` is `repr(C)`, `Copy`, has no padding (16 + 2 + 2 bytes at align 4)
    // and every bit pattern is a valid value.
    unsafe impl aya::Pod for SockAddr {}

    impl From<SocketAddr> for SockAddr {
        fn from(addr: SocketAddr) -> Self {
            match addr.ip() {
                IpAddr::V4(ip) => Self::v4(u32::from_ne_bytes(ip.octets()), addr.port()),
                IpAddr::V6(ip) => {
                    let o = ip.octets();
                    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    Self {
                        ip: [word(0), word(4), word(8), word(12)],
                        port: addr.port(),
                        family: AF_INET6,
                    }
                }
            }
        }
    }

    impl From<SockAddr> for SocketAddr {
        fn from(addr: SockAddr) -> Self {
            let ip = if addr.family == AF_INET6 {
                let mut octets = [0u8; 16];
                for (chunk, word) in octets.chunks_exact_mut(4).zip(addr.ip) {
                    chunk.copy_from_slice(&word.to_ne_bytes());
                }
                IpAddr::V6(Ipv6Addr::from(octets))
            } else {
                IpAddr::V4(Ipv4Addr::from(addr.ip[0].to_ne_bytes()))
            };
            SocketAddr::new(ip, addr.port)
        }
    }
}
