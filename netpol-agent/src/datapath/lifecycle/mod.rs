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
//!   and handle: `cls_bpf` swaps the program under RCU).
//!
//! The clsact qdiscs netpol added are recorded as symlinks
//! `<pin_dir>/qdiscs/<ifname>` → ifindex, so that cleanup removes those and
//! no other.
mod cleanup;
mod layout;
mod records;
mod sys;

use std::{
    mem::ManuallyDrop,
    path::{Path, PathBuf},
};

use aya::programs::{
    Link as _, LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle},
};

use super::DatapathError;

pub use cleanup::{Cleaned, cleanup};
pub use layout::LAYOUT_RECORD;
pub(super) use layout::{finish_layout, prepare_layout};
pub(super) use records::{ensure_clsact, previous_interfaces, sweep_stale_links, write_record};
pub(crate) use sys::detach_pinned_link;
pub(super) use sys::{bpf_obj_get, bpf_obj_pin, link_type, update_pinned_link};

use records::filter_record;
pub(super) use records::link_pin;
use sys::{
    BPF_LINK_GET_FD_BY_ID, BPF_PROG_QUERY, BPF_TCX_EGRESS, BPF_TCX_INGRESS, bpf_link_detach,
    sys_bpf,
};

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
                tracing::warn!(interface = h.interface, error = %e, "detaching a second netpol link");
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
        count: u32::try_from(MAX).unwrap_or(u32::MAX),
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
        #[expect(
            clippy::cast_possible_truncation,
            reason = "sys_bpf returns a syscall's int result widened to c_long"
        )]
        let fd = fd as i32;
        // SAFETY: the kernel returned a new fd that nothing else owns.
        out.push(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
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

/// Deletes the netlink filters a previous agent recorded on `interface`
/// (both hooks) and their records. Best effort: a filter left behind is
/// moot once a TCX link is in front of it, and `cleanup` removes it.
pub(super) fn delete_filters(interface: &str, pin_dir: &Path) {
    for (program, hook) in [
        (netpol_common::programs::FROM_POD, TcAttachType::Ingress),
        (netpol_common::programs::TO_POD, TcAttachType::Egress),
    ] {
        let record = filter_record(pin_dir, interface, program);
        if std::fs::symlink_metadata(&record).is_err() {
            continue;
        }
        let deleted = SchedClassifierLink::attached(interface, hook, NL_PRIORITY, NL_HANDLE, None)
            .map_err(|e| e.to_string())
            .and_then(|link| link.detach().map_err(|e| e.to_string()));
        match deleted {
            Ok(()) => {
                tracing::info!(
                    interface,
                    program,
                    "deleted a netlink filter a TCX link made moot"
                );
            }
            Err(e) => {
                tracing::debug!(interface, program, error = %e, "deleting a moot netlink filter");
            }
        }
        let _ = std::fs::remove_file(record);
    }
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
