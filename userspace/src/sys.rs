//! The agent's only `unsafe` code: socket options that `nix` and `socket2` do not wrap,
//! descriptors received over a unix socket, and
//! the two `bpf(2)` commands on pinned links that aya does not offer.

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

/// `bpf(2)` commands that aya 0.14 does not offer for cgroup and `sk_lookup` links.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Opens the BPF object pinned at `path` (`BPF_OBJ_GET`).
pub fn bpf_obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // `union bpf_attr` for BPF_OBJ_GET: pathname, bpf_fd, file_flags, path_fd. The kernel
    // refuses non-zero bytes past the last field, so the padding is explicit.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let attr = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid, fully initialised `bpf_attr` prefix for this command and
    // outlives the call; `path` is NUL-terminated and alive; the kernel reads `size` bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            size_of::<ObjGet>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Points the BPF link `link` at `program` (`BPF_LINK_UPDATE`): the hook switches from the
/// old program to the new one atomically, never running neither.
pub fn bpf_link_update(link: &impl AsFd, program: &impl AsFd) -> io::Result<()> {
    // `union bpf_attr` for BPF_LINK_UPDATE: link_fd, new_prog_fd, flags, old_prog_fd.
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let fd = |f: &dyn AsFd| u32::try_from(f.as_fd().as_raw_fd()).unwrap_or(u32::MAX);
    let attr = LinkUpdate {
        link_fd: fd(link),
        new_prog_fd: fd(program),
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: as in `bpf_obj_get`; both descriptors are borrowed for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw const attr,
            size_of::<LinkUpdate>() as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Detaches the BPF link `link` from its hook (`BPF_LINK_DETACH`) whoever else still holds
/// it open: the link object lives on, defunct, until its last descriptor or pin goes.
pub fn bpf_link_detach(link: &impl AsFd) -> io::Result<()> {
    // `union bpf_attr` for BPF_LINK_DETACH: link_fd.
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let attr = LinkDetach {
        link_fd: u32::try_from(link.as_fd().as_raw_fd()).unwrap_or(u32::MAX),
    };
    // SAFETY: as in `bpf_obj_get`; the descriptor is borrowed for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &raw const attr,
            size_of::<LinkDetach>() as libc::c_uint,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receives one message of at most `buf.len()` bytes on a unix socket, with the
/// descriptors it carries (`SCM_RIGHTS`): `nix` hands them over as raw numbers. A message
/// or its descriptors cut short is an error: what was received is closed.
pub fn recv_with_fds(
    socket: &impl AsFd,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<std::os::fd::OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::FromRawFd as _;
    /// At most `SCM_MAX_FD` descriptors come with one message.
    const MAX_FDS: usize = 253;
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let message = recvmsg::<()>(
        socket.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel installed these descriptors in this process for this
            // message; nothing else knows them yet.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if message
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message or its descriptors truncated",
        ));
    }
    Ok((message.bytes, fds))
}

/// Sets the nice value of the calling thread (on Linux a per-thread attribute: the other
/// threads of the process keep theirs). Raising it needs no privilege.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: plain integers; `who` 0 is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
