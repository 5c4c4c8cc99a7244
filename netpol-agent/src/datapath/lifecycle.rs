//! Attachments that outlive the agent, their adoption by the next one, and
//! `netpol-agent cleanup`.
//!
//! Dropping an aya link detaches it, so a persistent datapath keeps its
//! attachments out of aya's hands:
//! - TCX: each link is pinned at `<pin_dir>/links/<ifname>-<program>`; it
//!   stays attached while the pin exists. The next agent opens the pin and
//!   swaps its own program in with `BPF_LINK_UPDATE` (atomic: no packet
//!   sees the hook empty).
//! - netlink: each filter sits on the clsact qdisc at netpol's own priority
//!   and handle ([`NL_PRIORITY`], [`NL_HANDLE`]); it is left in place when
//!   the datapath is dropped, and the next agent replaces its program in
//!   place (a `RTM_NEWTFILTER` without `NLM_F_CREATE` on the same priority
//!   and handle: cls_bpf swaps the program under RCU).
//!
//! The clsact qdiscs netpol added are recorded as symlinks
//! `<pin_dir>/qdiscs/<ifname>` → ifindex, so that cleanup removes those and
//! no other.
use std::{
    mem::ManuallyDrop,
    path::{Path, PathBuf},
};

use aya::programs::{
    Link as _, LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle},
};
use netpol_common::{maps, programs};

use super::{DatapathError, LEAVE_NODE_L3};

/// Priority of netpol's netlink filters on both clsact hooks ("NP").
pub const NL_PRIORITY: u16 = 0x4e50;
/// Handle of netpol's netlink filters at [`NL_PRIORITY`].
pub const NL_HANDLE: TcHandle = TcHandle::new(0, 0x4e50);
/// Folder under the pin dir holding the pinned TCX links.
pub const LINKS_DIR: &str = "links";
/// Folder under the pin dir recording netpol's persistent netlink filters.
pub const FILTERS_DIR: &str = "filters";
/// Folder under the pin dir recording the clsact qdiscs netpol added.
pub const QDISCS_DIR: &str = "qdiscs";

/// One program's attachment to one hook.
#[derive(Debug)]
pub(super) enum Held {
    /// Owned by the program: detached when the datapath is dropped.
    Owned(SchedClassifierLinkId),
    /// A TCX link pinned at `path`: attached while the pin exists (the
    /// datapath's descriptor of it is in its `pins::Pins`).
    Pinned { path: PathBuf },
    /// A netlink filter, left in place when dropped, and its record.
    Filter { link: KeptFilter, record: PathBuf },
    /// A previous agent's attachment, left as it is (its program and maps
    /// of another layout) until the new maps are filled.
    Deferred,
}

/// A netlink filter that is not detached on drop.
#[derive(Debug)]
pub(super) struct KeptFilter(ManuallyDrop<SchedClassifierLink>);

/// How one hook was attached.
pub(super) struct Hook<'a> {
    pub program: &'static str,
    pub interface: &'a str,
    pub hook: TcAttachType,
    /// Keep the attachment past the datapath's life.
    pub persistent: bool,
    pub pin_dir: &'a Path,
}

/// Attaches `program` to one hook, adopting (and atomically updating) an
/// attachment a previous agent left there. Returns whether it adopted.
pub(super) fn attach_tcx(
    prog: &mut SchedClassifier,
    h: &Hook<'_>,
) -> Result<(Held, bool), DatapathError> {
    let attach_err = |source: aya::programs::ProgramError| DatapathError::Attach {
        program: h.program,
        interface: h.interface.to_owned(),
        source: Box::new(source),
    };
    if !h.persistent {
        let id = prog
            .attach_with_options(
                h.interface,
                h.hook,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_err)?;
        return Ok((Held::Owned(id), false));
    }
    let path = link_pin(h.pin_dir, h.interface, h.program);
    if !path.exists() {
        pin_unpinned_link(h, &path);
    }
    if path.exists() {
        match adopt_tcx(prog, &path) {
            Ok(()) => return Ok((Held::Pinned { path }, true)),
            Err(e) => {
                // The interface it was attached to is gone (a defunct link
                // refuses updates): start over.
                tracing::info!(pin = %path.display(), error = %e, "stale link pin replaced");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let id = prog
        .attach_with_options(
            h.interface,
            h.hook,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(attach_err)?;
    let link = prog.take_link(id).map_err(attach_err)?;
    let fd = FdLink::try_from(link).map_err(|source| DatapathError::Link {
        program: h.program,
        interface: h.interface.to_owned(),
        source: Box::new(source),
    })?;
    // The pin holds the link; the datapath keeps a descriptor of it.
    drop(fd.pin(&path).map_err(|source| DatapathError::PinLink {
        path: path.clone(),
        source: Box::new(source),
    })?);
    Ok((Held::Pinned { path }, false))
}

/// A link of `h.program` on the hook whose pin is gone (a previous
/// agent's pins were removed, or it pinned on a bpffs since unmounted) is
/// pinned at `path`, so that it is adopted like any other; further links
/// of the program (a second set attached beside it) are detached. Best
/// effort: without them, a new link is attached as before.
fn pin_unpinned_link(h: &Hook<'_>, path: &Path) {
    let links = match tcx_links(h.interface, h.hook, h.program) {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(interface = h.interface, error = %e, "querying TCX links");
            return;
        }
    };
    let mut links = links.into_iter();
    let Some(first) = links.next() else {
        return;
    };
    match bpf_obj_pin(std::os::fd::AsFd::as_fd(&first), path) {
        Ok(()) => tracing::warn!(
            interface = h.interface,
            program = h.program,
            "found netpol's program attached without its pin: adopting it"
        ),
        Err(e) => {
            tracing::warn!(pin = %path.display(), error = %e, "pinning an unpinned netpol link");
            return;
        }
    }
    for extra in links {
        match bpf_link_detach(&extra) {
            Ok(()) => tracing::warn!(
                interface = h.interface,
                program = h.program,
                "detached a second netpol link on the same hook"
            ),
            Err(e) => {
                tracing::warn!(interface = h.interface, error = %e, "detaching a second netpol link")
            }
        }
    }
}

/// Descriptors of the TCX links on `interface`'s `hook` whose program is
/// named `program`, in hook order (`BPF_PROG_QUERY` with link ids,
/// `BPF_LINK_GET_FD_BY_ID`).
fn tcx_links(
    interface: &str,
    hook: TcAttachType,
    program: &str,
) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
    use std::os::fd::FromRawFd as _;
    const MAX: usize = 64;
    #[repr(C)]
    struct Query {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let names: std::collections::BTreeMap<u32, String> =
        SchedClassifier::query_tcx(interface, hook)
            .map_err(std::io::Error::other)?
            .1
            .into_iter()
            .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
            .collect();
    if !names.values().any(|n| n == program) {
        return Ok(Vec::new());
    }
    let ifindex = nix::net::if_::if_nametoindex(interface).map_err(std::io::Error::from)?;
    let mut prog_ids = [0u32; MAX];
    let mut link_ids = [0u32; MAX];
    let mut q = Query {
        target_ifindex: ifindex,
        attach_type: match hook {
            TcAttachType::Ingress => BPF_TCX_INGRESS,
            _ => BPF_TCX_EGRESS,
        },
        query_flags: 0,
        attach_flags: 0,
        prog_ids: prog_ids.as_mut_ptr() as u64,
        count: MAX as u32,
        _pad: 0,
        prog_attach_flags: 0,
        link_ids: link_ids.as_mut_ptr() as u64,
        link_attach_flags: 0,
        revision: 0,
    };
    // SAFETY: `q` is a valid prefix of `union bpf_attr` for BPF_PROG_QUERY;
    // the two id buffers hold `count` entries and outlive the call.
    unsafe { sys_bpf(BPF_PROG_QUERY, &mut q) }?;
    let n = (q.count as usize).min(MAX);
    let mut out = Vec::new();
    for (prog, link) in prog_ids[..n].iter().zip(&link_ids[..n]) {
        if *link == 0 || names.get(prog).map(String::as_str) != Some(program) {
            continue;
        }
        let mut attr = GetFdById {
            id: *link,
            next_id: 0,
            open_flags: 0,
        };
        // SAFETY: `attr` is a valid prefix of `union bpf_attr` for
        // BPF_LINK_GET_FD_BY_ID and outlives the call.
        let fd = unsafe { sys_bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) }?;
        // SAFETY: the kernel returned a new fd that nothing else owns.
        out.push(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) });
    }
    Ok(out)
}

/// Swaps `prog` into the link pinned at `path`.
fn adopt_tcx(
    prog: &mut SchedClassifier,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let pinned = PinnedLink::from_pin(path)?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned))?;
    let id = prog.attach_to_link(link)?;
    // Taken so that dropping the program does not detach it; the pin holds
    // the link.
    drop(FdLink::try_from(prog.take_link(id)?)?);
    Ok(())
}

/// Netlink: replaces the program of the filter at netpol's priority and
/// handle when there is one, adds the filter otherwise.
pub(super) fn attach_netlink(
    prog: &mut SchedClassifier,
    h: &Hook<'_>,
) -> Result<(Held, bool), DatapathError> {
    let attach_err = |source: aya::programs::ProgramError| DatapathError::Attach {
        program: h.program,
        interface: h.interface.to_owned(),
        source: Box::new(source),
    };
    let adopted = SchedClassifierLink::attached(h.interface, h.hook, NL_PRIORITY, NL_HANDLE, None)
        .ok()
        .and_then(|link| prog.attach_to_link(link).ok());
    let (id, adopted) = match adopted {
        Some(id) => (id, true),
        None => (
            prog.attach_with_options(
                h.interface,
                h.hook,
                TcAttachOptions::Netlink(NlOptions {
                    priority: NL_PRIORITY,
                    handle: NL_HANDLE,
                    classid: None,
                }),
            )
            .map_err(attach_err)?,
            false,
        ),
    };
    if !h.persistent {
        return Ok((Held::Owned(id), adopted));
    }
    let link = KeptFilter(ManuallyDrop::new(prog.take_link(id).map_err(attach_err)?));
    let record = filter_record(h.pin_dir, h.interface, h.program);
    let ifindex = nix::net::if_::if_nametoindex(h.interface).unwrap_or(0);
    if let Err(e) = write_record(&record, &ifindex.to_string()) {
        tracing::warn!(record = %record.display(), error = %e, "recording a netlink filter");
    }
    Ok((Held::Filter { link, record }, adopted))
}

/// Detaches one hook: unpins a TCX link, deletes a netlink filter.
pub(super) fn detach(
    held: Held,
    prog: &mut SchedClassifier,
    name: &'static str,
) -> Result<(), DatapathError> {
    let program_err = |source| DatapathError::Program {
        name,
        source: Box::new(source),
    };
    match held {
        Held::Owned(id) => prog.detach(id).map_err(program_err),
        Held::Pinned { path } => match detach_pinned_link(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DatapathError::Unpin { path, source }),
        },
        // What a previous agent attached is removed with the interface,
        // or by cleanup.
        Held::Deferred => Ok(()),
        Held::Filter {
            link: KeptFilter(link),
            record,
        } => {
            let _ = std::fs::remove_file(record);
            ManuallyDrop::into_inner(link).detach().map_err(program_err)
        }
    }
}

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
pub(super) fn update_pinned_link(
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
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
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
unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
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
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

pub(super) fn bpf_obj_get(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let fd = bpf_obj(BPF_OBJ_GET, path, 0)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the object `fd` refers to at `path` (`BPF_OBJ_PIN`).
pub(super) fn bpf_obj_pin(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    bpf_obj(BPF_OBJ_PIN, path, fd.as_raw_fd() as u32).map(drop)
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

fn bpf_link_detach(fd: &std::os::fd::OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let mut attr = LinkDetach {
        link_fd: fd.as_raw_fd() as u32,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for
    // BPF_LINK_DETACH and outlives the call.
    unsafe { sys_bpf(BPF_LINK_DETACH, &mut attr) }?;
    Ok(())
}

/// The link type (`ARPHRD_*`) of `interface` in the calling thread's
/// namespace (`SIOCGIFHWADDR`: a socket speaks to the namespace it was
/// opened in, where `/sys/class/net` shows the one sysfs was mounted in).
pub(super) fn link_type(interface: &str) -> std::io::Result<u16> {
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
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid `ifreq` with a NUL-terminated name (checked
    // shorter than IFNAMSIZ, the rest zeroed) and outlives the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled `ifru_hwaddr`, whose `sa_family` is the
    // device's type.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Whether a previous agent left an attachment of `program` on `interface`.
pub(super) fn previously_attached(h: &Hook<'_>, tcx: bool) -> bool {
    if tcx {
        return link_pin(h.pin_dir, h.interface, h.program).exists();
    }
    // aya cannot look a netlink filter up: netpol records its own.
    let record = filter_record(h.pin_dir, h.interface, h.program);
    let recorded = std::fs::read_link(record)
        .ok()
        .and_then(|t| t.to_string_lossy().parse::<u32>().ok());
    recorded.is_some() && recorded == nix::net::if_::if_nametoindex(h.interface).ok()
}

/// `<pin_dir>/layout` → the layout version of the maps pinned there.
pub const LAYOUT_RECORD: &str = "layout";

/// Where the maps of a layout being replaced wait until the new ones are
/// filled: `<pin_dir>/layout-v<N>`.
pub(super) fn old_layout_dir(pin_dir: &Path, version: u32) -> PathBuf {
    pin_dir.join(format!("layout-v{version}"))
}

/// Reads the layout of the maps pinned in `pin_dir`. Maps of another
/// layout are moved to [`old_layout_dir`] (the programs attached keep
/// them, and keep enforcing), so that the load creates fresh ones; returns
/// that layout. Pins from before layouts were recorded are layout 1.
pub(super) fn prepare_layout(pin_dir: &Path) -> Result<Option<u32>, DatapathError> {
    let current = netpol_common::LAYOUT_VERSION;
    let record = pin_dir.join(LAYOUT_RECORD);
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DatapathError::PinDir { path, source }
    };
    let has_maps = maps::ALL.iter().any(|m| pin_dir.join(m).exists());
    let recorded = std::fs::read_link(&record)
        .ok()
        .and_then(|t| t.to_string_lossy().parse::<u32>().ok())
        .or(has_maps.then_some(1));
    match recorded {
        None => {
            write_record(&record, &current.to_string()).map_err(io_err(&record))?;
            Ok(None)
        }
        Some(v) if v == current => {
            write_record(&record, &current.to_string()).map_err(io_err(&record))?;
            Ok(None)
        }
        Some(v) => {
            let old = old_layout_dir(pin_dir, v);
            if old.exists() {
                // A replacement was interrupted: the maps at the top are
                // new ones, maybe partly filled; start them over.
                for m in maps::ALL {
                    let _ = std::fs::remove_file(pin_dir.join(m));
                }
            } else {
                std::fs::create_dir_all(&old).map_err(io_err(&old))?;
                for m in maps::ALL {
                    let from = pin_dir.join(m);
                    if from.exists() {
                        std::fs::rename(&from, old.join(m)).map_err(io_err(&from))?;
                    }
                }
            }
            tracing::info!(
                found = v,
                current,
                "pinned maps of another layout: replacing them; the programs attached keep the old ones until the new ones are filled"
            );
            Ok(Some(v))
        }
    }
}

/// Records that the maps in `pin_dir` are of the current layout and
/// removes those of layout `old`.
pub(super) fn finish_layout(pin_dir: &Path, old: u32) -> Result<(), DatapathError> {
    let record = pin_dir.join(LAYOUT_RECORD);
    write_record(&record, &netpol_common::LAYOUT_VERSION.to_string()).map_err(|source| {
        DatapathError::PinDir {
            path: record.clone(),
            source,
        }
    })?;
    let dir = old_layout_dir(pin_dir, old);
    std::fs::remove_dir_all(&dir).map_err(|source| DatapathError::Unpin { path: dir, source })
}

/// `<pin_dir>/filters/<ifname>-<program>` → ifindex: a persistent netlink
/// filter netpol attached.
fn filter_record(pin_dir: &Path, interface: &str, program: &str) -> PathBuf {
    pin_dir
        .join(FILTERS_DIR)
        .join(format!("{interface}-{program}"))
}

/// Points `link` at `target`, replacing what it pointed at.
pub(super) fn write_record(link: &Path, target: &str) -> std::io::Result<()> {
    if let Some(dir) = link.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::os::unix::fs::symlink(target, link)
}

/// `<pin_dir>/links/<ifname>-<program>`.
pub(super) fn link_pin(pin_dir: &Path, interface: &str, program: &str) -> PathBuf {
    pin_dir
        .join(LINKS_DIR)
        .join(format!("{interface}-{program}"))
}

/// The interface and program of a link pin or filter record named
/// `<interface>-<program>`. Program names hold underscores, never a `-`;
/// interface names may hold both, so the program is matched as a suffix.
fn pinned_interface(name: &str) -> Option<(&str, &'static str)> {
    [
        programs::FROM_POD,
        programs::TO_POD,
        programs::LEAVE_NODE,
        LEAVE_NODE_L3,
    ]
    .into_iter()
    .find_map(|p| Some((name.strip_suffix(p)?.strip_suffix('-')?, p)))
    .filter(|(interface, _)| !interface.is_empty())
}

/// Pod interfaces (still present) that a previous agent attached to: link
/// pins and netlink filter records of `from_pod` and `to_pod` (uplinks'
/// `leave_node`s are not waited for, see `Datapath::awaiting_interfaces`).
pub(super) fn previous_interfaces(pin_dir: &Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for dir in [LINKS_DIR, FILTERS_DIR] {
        let Ok(entries) = std::fs::read_dir(pin_dir.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((interface, program)) = pinned_interface(&name)
                && [programs::FROM_POD, programs::TO_POD].contains(&program)
                && nix::net::if_::if_nametoindex(interface).is_ok()
            {
                out.insert(interface.to_owned());
            }
        }
    }
    out
}

/// Removes link pins whose interface no longer exists (a pod deleted while
/// no agent ran): the kernel already detached them.
pub(super) fn sweep_stale_links(pin_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(pin_dir.join(LINKS_DIR)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((interface, _)) = pinned_interface(&name)
            && nix::net::if_::if_nametoindex(interface).is_err()
        {
            tracing::info!(interface, pin = %entry.path().display(), "removing the link pin of a gone interface");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Adds a clsact qdisc to `interface` when it has none, recording that
/// netpol added it; an error names the `programs` about to be attached.
pub(super) fn ensure_clsact(
    interface: &str,
    programs: &[&str],
    pin_dir: &Path,
) -> Result<(), DatapathError> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => {
            tracing::info!(interface, "added clsact qdisc");
            if let Err(e) = record_clsact(interface, pin_dir) {
                tracing::warn!(interface, error = %e, "recording the clsact qdisc netpol added; cleanup will leave it");
            }
            Ok(())
        }
        Err(tc::TcError::AlreadyAttached) => Ok(()),
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(DatapathError::Clsact {
            programs: programs.join(" and "),
            interface: interface.to_owned(),
            source: Box::new(source),
        }),
    }
}

fn record_clsact(interface: &str, pin_dir: &Path) -> std::io::Result<()> {
    let dir = pin_dir.join(QDISCS_DIR);
    std::fs::create_dir_all(&dir)?;
    let ifindex = nix::net::if_::if_nametoindex(interface).map_err(std::io::Error::from)?;
    write_record(&dir.join(interface), &ifindex.to_string())
}

/// What [`cleanup`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// Pinned TCX links removed (and so detached).
    pub links: Vec<String>,
    /// Netlink filters deleted, as `<ifname> <ingress|egress>`.
    pub filters: Vec<String>,
    /// Interfaces whose clsact qdisc (added by netpol) was deleted.
    pub qdiscs: Vec<String>,
    /// Whether the pin folder (maps, records) was removed.
    pub pins: bool,
}

/// Removes everything netpol attached or pinned on this node (the
/// calling thread's network namespace and `<bpffs>/netpol`): pinned TCX
/// links, netlink filters at netpol's priority and handle, the clsact
/// qdiscs netpol added, and the pin folder. Run it with no agent running:
/// a running agent keeps its links until it exits.
///
/// # Errors
/// When a filter, qdisc or pin cannot be removed; what was removed before
/// stays removed.
pub async fn cleanup(bpffs: &Path) -> Result<Cleaned, DatapathError> {
    let pin_dir = bpffs.join(super::PIN_SUBDIR);
    let mut cleaned = Cleaned::default();

    if let Ok(entries) = std::fs::read_dir(pin_dir.join(LINKS_DIR)) {
        for entry in entries.flatten() {
            let path = entry.path();
            detach_pinned_link(&path).map_err(|source| DatapathError::Unpin {
                path: path.clone(),
                source,
            })?;
            cleaned
                .links
                .push(entry.file_name().to_string_lossy().into_owned());
        }
    }

    // Netlink: netpol's filters sit at its own priority and handle.
    let interfaces = nix::net::if_::if_nameindex().map_err(|e| DatapathError::Interfaces {
        source: std::io::Error::from(e),
    })?;
    for i in &interfaces {
        let name = i.name().to_string_lossy().into_owned();
        for (hook, label) in [
            (TcAttachType::Ingress, "ingress"),
            (TcAttachType::Egress, "egress"),
        ] {
            let Ok(link) = SchedClassifierLink::attached(&name, hook, NL_PRIORITY, NL_HANDLE, None)
            else {
                continue;
            };
            match link.detach() {
                Ok(()) => cleaned.filters.push(format!("{name} {label}")),
                // No clsact, or no filter of netpol's there.
                Err(aya::programs::ProgramError::NetlinkError(e))
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)
                    ) => {}
                Err(source) => {
                    return Err(DatapathError::Program {
                        name: if hook == TcAttachType::Ingress {
                            programs::FROM_POD
                        } else {
                            programs::TO_POD
                        },
                        source: Box::new(source),
                    });
                }
            }
        }
    }

    // The clsact qdiscs netpol added, where the interface is still the one
    // it added it to.
    if let Ok(entries) = std::fs::read_dir(pin_dir.join(QDISCS_DIR)) {
        let mut handle = None;
        for entry in entries.flatten() {
            let interface = entry.file_name().to_string_lossy().into_owned();
            let recorded = std::fs::read_link(entry.path())
                .ok()
                .and_then(|t| t.to_string_lossy().parse::<u32>().ok());
            let current = nix::net::if_::if_nametoindex(interface.as_str()).ok();
            if let (Some(recorded), Some(current)) = (recorded, current)
                && recorded == current
            {
                if handle.is_none() {
                    let (conn, h, _) = rtnetlink::new_connection()
                        .map_err(|source| DatapathError::Interfaces { source })?;
                    tokio::spawn(conn);
                    handle = Some(h);
                }
                if let Some(h) = &handle {
                    delete_clsact(h, &interface, current).await?;
                    cleaned.qdiscs.push(interface);
                }
            }
        }
    }

    if pin_dir.exists() {
        std::fs::remove_dir_all(&pin_dir).map_err(|source| DatapathError::Unpin {
            path: pin_dir.clone(),
            source,
        })?;
        cleaned.pins = true;
    }
    Ok(cleaned)
}

async fn delete_clsact(
    handle: &rtnetlink::Handle,
    interface: &str,
    ifindex: u32,
) -> Result<(), DatapathError> {
    use netlink_packet_route::tc::TcHandle as NlHandle;
    let index = i32::try_from(ifindex).unwrap_or(i32::MAX);
    let mut req = handle.qdisc().del(index);
    req.message_mut().header.parent = NlHandle::CLSACT;
    req.message_mut().header.handle = NlHandle {
        major: 0xffff,
        minor: 0,
    };
    match req.execute().await {
        Ok(()) => Ok(()),
        // Already gone.
        Err(rtnetlink::Error::NetlinkError(e))
            if e.code
                .is_some_and(|c| matches!(-c.get(), libc::ENOENT | libc::EINVAL)) =>
        {
            Ok(())
        }
        Err(e) => Err(DatapathError::QdiscDelete {
            interface: interface.to_owned(),
            message: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_give_back_interface_and_program() {
        assert_eq!(
            pinned_interface("eth0-from_pod"),
            Some(("eth0", programs::FROM_POD))
        );
        assert_eq!(
            pinned_interface("veth1-to_pod"),
            Some(("veth1", programs::TO_POD))
        );
        assert_eq!(
            pinned_interface("eth0-leave_node"),
            Some(("eth0", programs::LEAVE_NODE))
        );
        // Interface names may hold dashes and underscores themselves.
        assert_eq!(
            pinned_interface("flannel-v6.1-leave_node"),
            Some(("flannel-v6.1", programs::LEAVE_NODE))
        );
        assert_eq!(
            pinned_interface("my_if-to-to_pod"),
            Some(("my_if-to", programs::TO_POD))
        );
        assert_eq!(
            pinned_interface("wg0-leave_node_l3"),
            Some(("wg0", LEAVE_NODE_L3))
        );
    }

    #[test]
    fn other_names_are_not_pins_of_netpol() {
        for name in [
            "eth0",
            "leave_node",
            "-leave_node",
            "eth0leave_node",
            "eth0-other",
            "wg0-leave_node_l4",
        ] {
            assert_eq!(pinned_interface(name), None, "{name}");
        }
    }

    #[test]
    fn link_pins_are_named_interface_dash_program() {
        let p = link_pin(Path::new("/b/netpol"), "eth0", programs::LEAVE_NODE);
        assert_eq!(p, Path::new("/b/netpol/links/eth0-leave_node"));
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert_eq!(pinned_interface(name), Some(("eth0", programs::LEAVE_NODE)));
    }
}

#[cfg(test)]
mod link_type_tests {
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
