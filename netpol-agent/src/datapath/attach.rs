//! Attaching the programs: to pod interfaces (`from_pod`, `to_pod`) and to
//! uplinks (`leave_node`), and detaching them.

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::programs::TcAttachType;
use netpol_common::programs;

use super::lifecycle::{self, Held, Hook};
use super::{Datapath, DatapathError, classifier, uplink_program};

/// Threads creating TCX links at once ([`Datapath::attach_many`]): the
/// kernel's waits for RCU grace periods overlap; more threads gain little
/// once each waits on the same grace period.
const ATTACH_THREADS: usize = 16;

/// An interface [`Datapath::attach_many`] attaches on its parallel path.
struct Fresh {
    interface: String,
    ifindex: u32,
    from_pod: PathBuf,
    to_pod: PathBuf,
}

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

    /// [`Self::attach`] for many pod interfaces at once, one result each
    /// in order. Creating a TCX link waits out an RCU grace period in the
    /// kernel (10–20 ms); links made on several threads share those waits,
    /// which is most of an agent's start on a node of 100 pods. Only new
    /// interfaces of a persistent TCX datapath take that path (nothing to
    /// adopt or replace, no pin of theirs yet); the rest are attached one
    /// by one as [`Self::attach`] does.
    pub fn attach_many(&mut self, interfaces: &[String]) -> Vec<Result<(), DatapathError>> {
        let parallel = interfaces.len() > 1
            && self.persistent
            && self.replacing.is_none()
            && matches!(self.use_tcx(), Ok(true));
        if !parallel {
            return interfaces.iter().map(|i| self.attach(i)).collect();
        }
        let mut results: Vec<Option<Result<(), DatapathError>>> =
            interfaces.iter().map(|_| None).collect();
        let mut fresh = Vec::new();
        for (i, name) in interfaces.iter().enumerate() {
            if let Some(f) = self.fresh_interface(name) {
                fresh.push((i, f));
            }
        }
        match self.create_links(&fresh.iter().map(|(_, f)| f).collect::<Vec<_>>()) {
            Ok(created) => {
                for ((i, f), r) in fresh.iter().zip(created) {
                    results[*i] = Some(r.map(|()| self.hold_fresh(f)));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "parallel attach unavailable: one by one");
            }
        }
        interfaces
            .iter()
            .zip(results)
            .map(|(name, r)| r.unwrap_or_else(|| self.attach(name)))
            .collect()
    }

    /// `interface` when it takes [`Self::attach_many`]'s parallel path: not
    /// attached in any role, known to the kernel, and no pin of either
    /// hook (a link left unpinned there is pinned first, then adopted by
    /// [`Self::attach`]).
    fn fresh_interface(&self, interface: &str) -> Option<Fresh> {
        if self.attached.contains_key(interface) || self.uplinks.contains_key(interface) {
            return None;
        }
        let ifindex = nix::net::if_::if_nametoindex(interface).ok()?;
        let mut paths = Vec::new();
        for (program, hook) in [
            (programs::FROM_POD, TcAttachType::Ingress),
            (programs::TO_POD, TcAttachType::Egress),
        ] {
            let h = Hook {
                program,
                interface,
                hook,
                persistent: true,
                pin_dir: &self.pin_dir,
            };
            let path = lifecycle::link_pin(&self.pin_dir, interface, program);
            if !path.exists() {
                lifecycle::pin_unpinned_link(&h, &path);
            }
            if path.exists() {
                return None;
            }
            paths.push(path);
        }
        let [from_pod, to_pod] = <[PathBuf; 2]>::try_from(paths).ok()?;
        Some(Fresh {
            interface: interface.to_owned(),
            ifindex,
            from_pod,
            to_pod,
        })
    }

    /// Creates and pins both links of each interface, on up to
    /// [`ATTACH_THREADS`] threads (each inherits this thread's network
    /// namespace, where the indexes were read). An interface whose second
    /// link fails loses its first.
    fn create_links(
        &mut self,
        fresh: &[&Fresh],
    ) -> Result<Vec<Result<(), DatapathError>>, DatapathError> {
        let fd_of = |ebpf: &mut aya::Ebpf,
                     name: &'static str|
         -> Result<std::os::fd::OwnedFd, DatapathError> {
            let prog = super::classifier(ebpf, name)?;
            let fd = prog.fd().map_err(|source| DatapathError::Program {
                name,
                source: Box::new(source),
            })?;
            fd.as_fd()
                .try_clone_to_owned()
                .map_err(|source| DatapathError::Io {
                    what: format!("duplicating the descriptor of {name}"),
                    source,
                })
        };
        let from_fd = fd_of(&mut self.ebpf, programs::FROM_POD)?;
        let to_fd = fd_of(&mut self.ebpf, programs::TO_POD)?;
        let one = |f: &Fresh| -> Result<(), DatapathError> {
            let link = |prog: &std::os::fd::OwnedFd, attach, path: &Path, program| {
                let err = |source: std::io::Error| DatapathError::LinkCreate {
                    program,
                    interface: f.interface.clone(),
                    source,
                };
                let fd =
                    lifecycle::bpf_link_create_tcx(prog.as_fd(), f.ifindex, attach).map_err(err)?;
                // The pin holds the link; this descriptor closes.
                lifecycle::bpf_obj_pin(fd.as_fd(), path).map_err(|source| {
                    DatapathError::PinLinkFd {
                        path: path.to_owned(),
                        source,
                    }
                })
            };
            link(
                &from_fd,
                lifecycle::BPF_TCX_INGRESS,
                &f.from_pod,
                programs::FROM_POD,
            )?;
            if let Err(e) = link(
                &to_fd,
                lifecycle::BPF_TCX_EGRESS,
                &f.to_pod,
                programs::TO_POD,
            ) {
                // No half-attached interface: the unpinned link detaches.
                let _ = std::fs::remove_file(&f.from_pod);
                return Err(e);
            }
            Ok(())
        };
        let threads = ATTACH_THREADS.min(fresh.len()).max(1);
        let per = fresh.len().div_ceil(threads);
        Ok(std::thread::scope(|s| {
            let handles: Vec<_> = fresh
                .chunks(per.max(1))
                .map(|chunk| s.spawn(|| chunk.iter().map(|f| one(f)).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        }))
    }

    /// Records a [`Fresh`] interface whose links [`Self::create_links`]
    /// pinned.
    fn hold_fresh(&mut self, f: &Fresh) {
        for path in [&f.from_pod, &f.to_pod] {
            if let Err(e) = self.pins.hold(path) {
                tracing::warn!(pin = %path.display(), error = %e, "holding a link pin (it cannot be restored if lost)");
            }
        }
        tracing::info!(interface = %f.interface, "attached");
        self.attached.insert(
            f.interface.clone(),
            Attachment {
                from_pod: Held::Pinned {
                    path: f.from_pod.clone(),
                },
                to_pod: Held::Pinned {
                    path: f.to_pod.clone(),
                },
            },
        );
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
