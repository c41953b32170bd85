//! The agent's only `unsafe` code: socket options that `nix` and `socket2` do not wrap.

use std::{io, os::fd::AsFd, os::fd::AsRawFd};

/// `SO_NETNS_COOKIE` from `<asm-generic/socket.h>` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace `socket` lives in: the key the kernel programs use
/// for that namespace (`bpf_get_netns_cookie`).
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is valid for the borrow; `cookie` and `len` are live, correctly sized
    // out-parameters for this option.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Registers the kernel programs' log ring buffer with tokio's reactor.
pub fn register_kernel_logger(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> io::Result<tokio::io::unix::AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>> {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and unchanged until
    // the logger is dropped, and `AsyncFd` owns the logger.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| e.into_parts().1)
}
