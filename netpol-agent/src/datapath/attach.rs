//! Attaching the programs: to pod interfaces (`from_pod`, `to_pod`) and to
//! uplinks (`leave_node`), and detaching them.

use aya::programs::TcAttachType;
use netpol_common::programs;

use super::lifecycle::{self, Held, Hook};
use super::{Datapath, DatapathError, classifier, uplink_program};

/// One interface's two attachments.
#[derive(Debug)]
pub(super) struct Attachment {
    pub(super) from_pod: Held,
    pub(super) to_pod: Held,
}

/// An uplink's attachment: `leave_node` or [`LEAVE_NODE_L3`].
#[derive(Debug)]
pub(super) struct UplinkAttachment {
    pub(super) program: &'static str,
    pub(super) held: Held,
}

impl Datapath {
    /// Attaches `from_pod` to `interface`'s TC ingress and `to_pod` to its TC
    /// egress. On the netlink path a clsact qdisc is added when missing (and
    /// recorded, for `cleanup`). An attachment a previous persistent
    /// datapath left on the interface (a pinned TCX link, a netlink filter at
    /// netpol's priority and handle) is adopted: its program is replaced
    /// atomically, so the hook is never empty.
    ///
    /// # Errors
    /// When the interface does not exist or the kernel refuses the attach;
    /// nothing this call attached stays attached on error.
    #[tracing::instrument(skip(self), fields(pin_dir = %self.pin_dir.display()))]
    ///
    /// An interface attached as an uplink becomes a pod interface: its
    /// `leave_node` is detached first (both use netpol's egress filter on
    /// the netlink path).
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        if self.attached.contains_key(interface) {
            return Ok(());
        }
        if self.uplinks.contains_key(interface) {
            tracing::info!(
                interface,
                "uplink became a pod interface: detaching leave_node"
            );
            self.detach_uplink(interface)?;
        }
        let tcx = self.use_tcx()?;
        if !tcx {
            lifecycle::ensure_clsact(
                interface,
                &[programs::FROM_POD, programs::TO_POD],
                &self.pin_dir,
            )?;
        }
        let (from_pod, adopted_from) =
            self.attach_hook(programs::FROM_POD, interface, TcAttachType::Ingress, tcx)?;
        let (to_pod, adopted_to) =
            match self.attach_hook(programs::TO_POD, interface, TcAttachType::Egress, tcx) {
                Ok(r) => r,
                Err(e) => {
                    // Leave no half-attached interface behind (an adopted
                    // attachment stays: it was there before).
                    if !adopted_from {
                        let _ = self.release(from_pod, programs::FROM_POD);
                    }
                    return Err(e);
                }
            };
        if matches!(from_pod, Held::Deferred) || matches!(to_pod, Held::Deferred) {
            tracing::info!(
                interface,
                "keeping the previous agent's programs until the maps of the new layout are filled"
            );
        } else if adopted_from || adopted_to {
            tracing::info!(
                interface,
                "adopted the attachments left by a previous agent"
            );
        } else {
            tracing::info!(interface, "attached");
        }
        self.attached
            .insert(interface.to_owned(), Attachment { from_pod, to_pod });
        Ok(())
    }

    pub(super) fn attach_hook(
        &mut self,
        program: &'static str,
        interface: &str,
        hook: TcAttachType,
        tcx: bool,
    ) -> Result<(Held, bool), DatapathError> {
        let h = Hook {
            program,
            interface,
            hook,
            persistent: self.persistent,
            pin_dir: &self.pin_dir,
        };
        if self.replacing.is_some() && lifecycle::previously_attached(&h, tcx) {
            // Its program and maps of the old layout keep enforcing until
            // the new maps are filled (`commit_layout`).
            return Ok((Held::Deferred, true));
        }
        let prog = classifier(&mut self.ebpf, program)?;
        let r = if tcx {
            lifecycle::attach_tcx(prog, &h)
        } else {
            lifecycle::attach_netlink(prog, &h)
        };
        if let Ok((Held::Pinned { path, .. }, _)) = &r
            && let Err(e) = self.pins.hold(path)
        {
            tracing::warn!(pin = %path.display(), error = %e, "holding a link pin (it cannot be restored if lost)");
        }
        r
    }

    /// Detaches one hook, forgetting its pin first.
    fn release(&mut self, held: Held, name: &'static str) -> Result<(), DatapathError> {
        if let Held::Pinned { path, .. } = &held {
            self.pins.forget(path);
        }
        classifier(&mut self.ebpf, name).and_then(|p| lifecycle::detach(held, p, name))
    }

    /// Detaches both programs from `interface` (and removes its link pins).
    ///
    /// # Errors
    /// When the interface was not attached by this datapath, or the kernel
    /// refuses the detach.
    pub fn detach(&mut self, interface: &str) -> Result<(), DatapathError> {
        let a = self
            .attached
            .remove(interface)
            .ok_or_else(|| DatapathError::NotAttached {
                interface: interface.to_owned(),
            })?;
        let mut result = Ok(());
        for (name, held) in [
            (programs::FROM_POD, a.from_pod),
            (programs::TO_POD, a.to_pod),
        ] {
            let r = self.release(held, name);
            if result.is_ok() {
                result = r;
            }
        }
        result?;
        tracing::info!(interface, "detached");
        Ok(())
    }

    /// Attaches `leave_node` to `interface`'s TC egress only: an uplink,
    /// tunnel, bond or VLAN device, where a pod's Service packet leaves for
    /// a backend on another node; [`LEAVE_NODE_L3`] when the device has no
    /// Ethernet header ([`uplink_program`] of its link type). The same
    /// machinery as [`Self::attach`]: TCX links pinned as
    /// `<pin_dir>/links/<ifname>-<program>` when persistent, netpol's
    /// netlink filter (and a recorded clsact qdisc) below 6.6, adoption of
    /// what a previous persistent datapath left.
    ///
    /// # Errors
    /// When the interface is attached as a pod interface
    /// ([`DatapathError::PodInterface`]), does not exist, or the kernel
    /// refuses the attach.
    #[tracing::instrument(skip(self), fields(pin_dir = %self.pin_dir.display()))]
    pub fn attach_uplink(&mut self, interface: &str) -> Result<(), DatapathError> {
        if self.uplinks.contains_key(interface) {
            return Ok(());
        }
        if self.attached.contains_key(interface) {
            return Err(DatapathError::PodInterface {
                interface: interface.to_owned(),
            });
        }
        let program = lifecycle::link_type(interface)
            .map(uplink_program)
            .map_err(|source| DatapathError::LinkType {
                interface: interface.to_owned(),
                source,
            })?;
        let tcx = self.use_tcx()?;
        if !tcx {
            lifecycle::ensure_clsact(interface, &[program], &self.pin_dir)?;
        }
        let (held, adopted) = self.attach_hook(program, interface, TcAttachType::Egress, tcx)?;
        if matches!(held, Held::Deferred) {
            tracing::info!(
                interface,
                program,
                "uplink: keeping the previous agent's program until the maps of the new layout are filled"
            );
        } else if adopted {
            tracing::info!(
                interface,
                program,
                "uplink: adopted the attachment a previous agent left"
            );
        } else {
            tracing::info!(interface, program, "uplink attached");
        }
        self.uplinks
            .insert(interface.to_owned(), UplinkAttachment { program, held });
        Ok(())
    }

    /// Detaches `leave_node` from `interface` (and removes its link pin).
    ///
    /// # Errors
    /// When the interface is not an uplink of this datapath, or the kernel
    /// refuses the detach.
    pub fn detach_uplink(&mut self, interface: &str) -> Result<(), DatapathError> {
        let UplinkAttachment { program, held } =
            self.uplinks
                .remove(interface)
                .ok_or_else(|| DatapathError::NotAttached {
                    interface: interface.to_owned(),
                })?;
        self.release(held, program)?;
        tracing::info!(interface, program, "uplink detached");
        Ok(())
    }
}
