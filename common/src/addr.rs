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

    /// An IPv6 address, four words in network byte order as the kernel hands them over.
    pub const fn v6(ip_be: [u32; 4], port: u16) -> Self {
        Self {
            ip: ip_be,
            port,
            family: AF_INET6,
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
        /// An IPv4-mapped IPv6 address is stored as the IPv4 address it is, as the kernel
        /// programs file it.
        fn from(addr: SocketAddr) -> Self {
            match addr.ip().to_canonical() {
                IpAddr::V4(ip) => Self::v4(u32::from_ne_bytes(ip.octets()), addr.port()),
                IpAddr::V6(ip) => {
                    let o = ip.octets();
                    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    Self::v6([word(0), word(4), word(8), word(12)], addr.port())
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

#[cfg(all(test, feature = "user"))]
mod tests {
    use core::net::SocketAddr;

    use super::*;

    #[test]
    fn both_families_round_trip_and_mapped_addresses_are_ipv4() {
        for addr in ["10.44.0.2:80", "[fd44::44:2]:8000", "[::1]:15001"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(SocketAddr::from(SockAddr::from(addr)), addr);
        }
        let mapped: SocketAddr = "[::ffff:10.44.0.2]:80".parse().unwrap();
        assert_eq!(
            SockAddr::from(mapped),
            SockAddr::from("10.44.0.2:80".parse::<SocketAddr>().unwrap())
        );
        let v6 = SockAddr::from("[fd44::44:2]:0".parse::<SocketAddr>().unwrap());
        assert_eq!(v6.family, AF_INET6);
        assert_eq!(v6.ip[0], u32::to_be(0xfd44_0000));
        assert_eq!(SockAddr::v4_mapped(v6.ip), None);
    }
}
