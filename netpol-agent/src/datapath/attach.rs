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
    /// egress, in the datapath's mode. On the netlink path a clsact qdisc is
    /// added when missing (and recorded, for `cleanup`). An attachment a
    /// previous persistent datapath left on the interface (a pinned TCX
    /// link, a netlink filter at netpol's priority and handle) is adopted:
    /// its program is replaced atomically, so the hook is never empty.
    ///
    /// An interface attached as an uplink becomes a pod interface: its
    /// `leave_node` is detached first (both use netpol's egress filter on
    /// the netlink path).
    ///
    /// # Errors
    /// When the interface does not exist or the kernel refuses the attach;
    /// nothing this call attached stays attached on error.
    pub fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        let tcx = self.use_tcx()?;
        self.attach_as(interface, tcx)
    }

    /// The loop's attach: whatever enforces soonest. With
    /// [`AttachMode::Auto`](super::AttachMode::Auto) on a TCX kernel, an
    /// interface with no TCX link of a previous agent to adopt gets netpol's
    /// netlink filters now and waits for its TCX links
    /// ([`Self::upgrade_to_tcx`]). Creating a TCX link waits out an RCU
    /// grace period while holding `rtnl_lock` (10–25 ms on the machines
    /// measured, two per interface), which every pod start and every
    /// interface of a cold start would otherwise wait for; a netlink filter
    /// takes a fraction of a millisecond. In other modes, [`Self::attach`].
    ///
    /// # Errors
    /// As [`Self::attach`].
    pub fn attach_staged(&mut self, interface: &str) -> Result<(), DatapathError> {
        if !self.stages_tcx()? || self.attached.contains_key(interface) {
            return self.attach(interface);
        }
        let pinned = [programs::FROM_POD, programs::TO_POD]
            .iter()
            .any(|p| lifecycle::link_pin(&self.pin_dir, interface, p).exists());
        if pinned {
            self.attach_as(interface, true)?;
            // A previous agent that stopped between creating the links and
            // deleting the filters left them behind, moot.
            lifecycle::delete_filters(interface, &self.pin_dir);
            return Ok(());
        }
        self.attach_as(interface, false)?;
        self.awaiting_tcx.insert(interface.to_owned());
        Ok(())
    }

    /// Moves one interface [`Self::attach_staged`] left on netlink filters
    /// to TCX links: both links are created first, in front of the filters
    /// (a TCX program's verdict other than `TCX_NEXT` ends the hook, and
    /// netpol's programs return `TC_ACT_OK` or `TC_ACT_SHOT`, so the
    /// filters stop seeing packets), then the filters are deleted. No
    /// packet meets neither. Returns the interface, `None` when none waits
    /// or while a layout is replaced (its interfaces move at
    /// [`Self::commit_layout`]).
    ///
    /// # Errors
    /// When the kernel refuses a link; the interface keeps its filters and
    /// is tried again by the next call.
    pub fn upgrade_to_tcx(&mut self) -> Result<Option<String>, DatapathError> {
        if self.replacing.is_some() {
            return Ok(None);
        }
        let Some(name) = self.awaiting_tcx.pop_first() else {
            return Ok(None);
        };
        if !self.attached.contains_key(&name) {
            return Ok(Some(name));
        }
        let (from_pod, _) =
            match self.attach_hook(programs::FROM_POD, &name, TcAttachType::Ingress, true) {
                Ok(r) => r,
                Err(e) => {
                    self.awaiting_tcx.insert(name);
                    return Err(e);
                }
            };
        let (to_pod, _) =
            match self.attach_hook(programs::TO_POD, &name, TcAttachType::Egress, true) {
                Ok(r) => r,
                Err(e) => {
                    let _ = self.release(from_pod, programs::FROM_POD);
                    self.awaiting_tcx.insert(name);
                    return Err(e);
                }
            };
        let old = self
            .attached
            .insert(name.clone(), Attachment { from_pod, to_pod });
        for (program, held) in old.into_iter().flat_map(|a| {
            [
                (programs::FROM_POD, a.from_pod),
                (programs::TO_POD, a.to_pod),
            ]
        }) {
            if let Err(e) = self.release(held, program) {
                tracing::warn!(interface = %name, program, error = %e, "deleting a netlink filter its TCX link made moot");
            }
        }
        tracing::info!(interface = %name, "moved from netlink filters to TCX links");
        Ok(Some(name))
    }

    /// Whether `interface` is enforced by netlink filters until
    /// [`Self::upgrade_to_tcx`] moves it.
    #[must_use]
    pub fn awaits_tcx(&self, interface: &str) -> bool {
        self.awaiting_tcx.contains(interface)
    }

    /// How many interfaces [`Self::upgrade_to_tcx`] has yet to move.
    #[must_use]
    pub fn awaiting_tcx(&self) -> usize {
        self.awaiting_tcx.len()
    }

    #[tracing::instrument(skip(self), fields(pin_dir = %self.pin_dir.display()))]
    fn attach_as(&mut self, interface: &str, tcx: bool) -> Result<(), DatapathError> {
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
        self.awaiting_tcx.remove(interface);
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
