//! What netpol records in its pin folder about its attachments: link pins
//! and netlink filter records (`<interface>-<program>`), and the clsact
//! qdiscs it added.

use std::path::{Path, PathBuf};

use aya::programs::tc;
use netpol_common::programs;

use super::super::{DatapathError, LEAVE_NODE_L3};
use super::{FILTERS_DIR, LINKS_DIR, QDISCS_DIR};

/// An interface's name as a bpffs entry. bpffs refuses names holding a
/// `.` (`flannel.1`, a VLAN's `eth0.100`) and no interface name holds a
/// `:` (the kernel's `dev_valid_name`), so each `.` is written `:`.
fn entry_name(interface: &str) -> String {
    interface.replace('.', ":")
}

/// The interface a bpffs entry name stands for ([`entry_name`] undone).
pub(crate) fn interface_of(entry: &str) -> String {
    entry.replace(':', ".")
}

/// `<pin_dir>/filters/<ifname>-<program>` → ifindex: a persistent netlink
/// filter netpol attached.
pub(super) fn filter_record(pin_dir: &Path, interface: &str, program: &str) -> PathBuf {
    pin_dir
        .join(FILTERS_DIR)
        .join(format!("{}-{program}", entry_name(interface)))
}

/// Points `link` at `target`, replacing what it pointed at.
pub(crate) fn write_record(link: &Path, target: &str) -> std::io::Result<()> {
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

/// `<pin_dir>/links/<ifname>-<program>` ([`entry_name`]).
pub(crate) fn link_pin(pin_dir: &Path, interface: &str, program: &str) -> PathBuf {
    pin_dir
        .join(LINKS_DIR)
        .join(format!("{}-{program}", entry_name(interface)))
}

/// The interface and program of a link pin or filter record named
/// `<interface>-<program>`. Program names hold underscores, never a `-`;
/// interface names may hold both, so the program is matched as a suffix.
fn pinned_interface(name: &str) -> Option<(String, &'static str)> {
    [
        programs::FROM_POD,
        programs::TO_POD,
        programs::LEAVE_NODE,
        LEAVE_NODE_L3,
    ]
    .into_iter()
    .find_map(|p| Some((name.strip_suffix(p)?.strip_suffix('-')?, p)))
    .filter(|(interface, _)| !interface.is_empty())
    .map(|(interface, p)| (interface_of(interface), p))
}

/// Pod interfaces (still present) that a previous agent attached to: link
/// pins and netlink filter records of `from_pod` and `to_pod` (uplinks'
/// `leave_node`s are not waited for, see `Datapath::awaiting_interfaces`).
pub(crate) fn previous_interfaces(pin_dir: &Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for dir in [LINKS_DIR, FILTERS_DIR] {
        let Ok(entries) = std::fs::read_dir(pin_dir.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((interface, program)) = pinned_interface(&name)
                && [programs::FROM_POD, programs::TO_POD].contains(&program)
                && nix::net::if_::if_nametoindex(interface.as_str()).is_ok()
            {
                out.insert(interface);
            }
        }
    }
    out
}

/// Removes link pins whose interface no longer exists (a pod deleted while
/// no agent ran): the kernel already detached them.
pub(crate) fn sweep_stale_links(pin_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(pin_dir.join(LINKS_DIR)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((interface, _)) = pinned_interface(&name)
            && nix::net::if_::if_nametoindex(interface.as_str()).is_err()
        {
            tracing::info!(interface, pin = %entry.path().display(), "removing the link pin of a gone interface");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Adds a clsact qdisc to `interface` when it has none, recording that
/// netpol added it; an error names the `programs` about to be attached.
pub(crate) fn ensure_clsact(
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
    write_record(&dir.join(entry_name(interface)), &ifindex.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_give_back_interface_and_program() {
        assert_eq!(
            pinned_interface("eth0-from_pod"),
            Some(("eth0".into(), programs::FROM_POD))
        );
        assert_eq!(
            pinned_interface("veth1-to_pod"),
            Some(("veth1".into(), programs::TO_POD))
        );
        assert_eq!(
            pinned_interface("eth0-leave_node"),
            Some(("eth0".into(), programs::LEAVE_NODE))
        );
        // Interface names may hold dashes and underscores themselves.
        assert_eq!(
            pinned_interface("flannel-v6:1-leave_node"),
            Some(("flannel-v6.1".into(), programs::LEAVE_NODE))
        );
        assert_eq!(
            pinned_interface("my_if-to-to_pod"),
            Some(("my_if-to".into(), programs::TO_POD))
        );
        assert_eq!(
            pinned_interface("wg0-leave_node_l3"),
            Some(("wg0".into(), LEAVE_NODE_L3))
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
        assert_eq!(
            pinned_interface(name),
            Some(("eth0".into(), programs::LEAVE_NODE))
        );
    }

    #[test]
    fn names_with_dots_are_pinned_without_them() {
        // bpffs refuses a `.` in a name: flannel's VXLAN devices are
        // `flannel.1` and `flannel-v6.1`.
        for interface in ["flannel.1", "flannel-v6.1", "eth0.100"] {
            for p in [
                link_pin(Path::new("/b/netpol"), interface, programs::LEAVE_NODE),
                filter_record(Path::new("/b/netpol"), interface, programs::LEAVE_NODE),
            ] {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                assert!(!name.contains('.'), "{name}");
                assert_eq!(
                    pinned_interface(name),
                    Some((interface.into(), programs::LEAVE_NODE))
                );
            }
        }
    }
}
