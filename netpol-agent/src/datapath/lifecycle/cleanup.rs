//! `netpol-agent cleanup`: removing everything netpol attached or pinned
//! on the node.

use std::path::Path;

use aya::programs::{Link as _, TcAttachType, tc::SchedClassifierLink};
use netpol_common::programs;

use super::super::DatapathError;
use super::{LINKS_DIR, NL_HANDLE, NL_PRIORITY, QDISCS_DIR, detach_pinned_link};

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
    let pin_dir = bpffs.join(super::super::PIN_SUBDIR);
    let mut cleaned = Cleaned::default();

    if let Ok(entries) = std::fs::read_dir(pin_dir.join(LINKS_DIR)) {
        for entry in entries.flatten() {
            let path = entry.path();
            detach_pinned_link(&path).map_err(|source| DatapathError::Unpin {
                path: path.clone(),
                source,
            })?;
            cleaned.links.push(super::records::interface_of(
                &entry.file_name().to_string_lossy(),
            ));
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
            let interface = super::records::interface_of(&entry.file_name().to_string_lossy());
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
