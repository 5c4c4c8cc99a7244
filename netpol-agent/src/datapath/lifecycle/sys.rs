//! The system calls aya does not wrap: `bpf(2)` pin, link and query
//! commands, and the link type of an interface (`SIOCGIFHWADDR`).

use std::path::Path;

/// Detaches the TCX link pinned at `path` now, then removes the pin.
///
/// Removing the pin alone is not enough: the kernel drops a pin's
/// reference from a deferred work item, so the program would stay on the
/// hook for a moment after the pin is gone (and for as long as any other
/// process holds the link's fd). `BPF_LINK_DETACH` takes it off the hook
/// before this returns.
pub(crate) fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    let fd = bpf_obj_get(path)?;
    bpf_link_detach(&fd)?;
    drop(fd);
    std::fs::remove_file(path)
}

/// Swaps `program` into the link pinned at `path` (`BPF_LINK_UPDATE`),
/// atomically: the hook never runs without a program.
pub(crate) fn update_pinned_link(
    path: &Path,
    program: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let link = bpf_obj_get(path)?;
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd().cast_unsigned(),
        new_prog_fd: program.as_raw_fd().cast_unsigned(),
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for
    // BPF_LINK_UPDATE (no padding) and outlives the call.
    unsafe { sys_bpf(BPF_LINK_UPDATE, &mut attr) }?;
    Ok(())
}

/// `bpf(cmd, attr, sizeof attr)`: the kernel's return value, or the
/// error it set.
///
/// # Safety
/// `attr` is a valid prefix of `union bpf_attr` for `cmd` (no
/// uninitialised padding), and every pointer in it is valid for what the
/// kernel reads or writes through it during the call.
pub(super) unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: the caller's contract; `attr` outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

const BPF_OBJ_PIN: libc::c_long = 6;
pub(super) const BPF_PROG_QUERY: libc::c_long = 16;
pub(super) const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
pub(super) const BPF_TCX_INGRESS: u32 = 46;
pub(super) const BPF_TCX_EGRESS: u32 = 47;
const BPF_OBJ_GET: libc::c_long = 7;
pub(super) const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

pub(crate) fn bpf_obj_get(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let fd = bpf_obj(BPF_OBJ_GET, path, 0)?;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "sys_bpf returns a syscall's int result widened to c_long"
    )]
    let fd = fd as i32;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Pins the object `fd` refers to at `path` (`BPF_OBJ_PIN`).
pub(crate) fn bpf_obj_pin(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    bpf_obj(BPF_OBJ_PIN, path, fd.as_raw_fd().cast_unsigned()).map(drop)
}

/// `BPF_OBJ_GET` or `BPF_OBJ_PIN` of `path` (with `fd` for a pin).
fn bpf_obj(cmd: libc::c_long, path: &Path, fd: u32) -> std::io::Result<libc::c_long> {
    use std::os::unix::ffi::OsStrExt as _;
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        // Explicit so the kernel's zero check past `path_fd` never sees
        // uninitialised padding.
        _pad: u32,
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for both
    // commands; `c_path` is NUL-terminated and outlives the call.
    unsafe { sys_bpf(cmd, &mut attr) }
}

pub(super) fn bpf_link_detach(fd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let mut attr = LinkDetach {
        link_fd: fd.as_raw_fd().cast_unsigned(),
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for
    // BPF_LINK_DETACH and outlives the call.
    unsafe { sys_bpf(BPF_LINK_DETACH, &mut attr) }?;
    Ok(())
}

/// The link type (`ARPHRD_*`) of `interface` in the calling thread's
/// namespace (`SIOCGIFHWADDR`: a socket speaks to the namespace it was
/// opened in, where `/sys/class/net` shows the one sysfs was mounted in).
pub(crate) fn link_type(interface: &str) -> std::io::Result<u16> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let name = interface.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not an interface name",
        ));
    }
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket(2) returned a new fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `ifreq` is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // The request's type is the libc target's (c_ulong with glibc, c_int
    // with musl, the static image's); the number fits either.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::unnecessary_cast,
        reason = "the ioctl request type differs by libc target"
    )]
    let request = libc::SIOCGIFHWADDR as _;
    // SAFETY: `req` is a valid `ifreq` with a NUL-terminated name (checked
    // shorter than IFNAMSIZ, the rest zeroed) and outlives the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut req) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled `ifru_hwaddr`, whose `sa_family` is the
    // device's type.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_its_link_type_and_bad_names_are_refused() {
        // `lo` exists in every namespace, unprivileged.
        assert_eq!(link_type("lo").ok(), Some(libc::ARPHRD_LOOPBACK));
        assert!(link_type("").is_err());
        assert!(link_type("a-name-far-too-long").is_err());
        assert!(link_type("nosuchif0").is_err());
    }
}
