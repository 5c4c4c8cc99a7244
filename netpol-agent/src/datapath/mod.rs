//! The loaded eBPF object: its pinned maps, its three TC programs and where
//! they are attached.
//!
//! Which TC hook is which policy direction: `from_pod` goes on the host-side
//! veth's TC *ingress* (what the pod sends: its egress), `to_pod` on its TC
//! *egress* (what is delivered to the pod: its ingress). `leave_node` goes
//! on the TC *egress* of the node's other devices (uplinks, tunnels): a
//! pod's Service packet, marked at `from_pod`, whose backend kube-proxy put
//! on another node is judged there against the pod's egress
//! ([`LEAVE_NODE_L3`] on devices without an Ethernet header).
mod attach;
pub mod clock;
mod config;
mod counters;
mod error;
pub mod events;
pub mod host;
pub mod lifecycle;
pub mod pins;
pub mod writer;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
    util::KernelVersion,
};
use netpol_common::{GlobalConfig, TrafficCounter, maps, mark, programs};

use crate::{bpffs, object};
use lifecycle::Held;
use writer::{KernelBackend, KernelMapWriter, MapWriter, ServiceMaps};

use attach::{Attachment, UplinkAttachment};
pub use config::{AttachMode, DatapathConfig, MapSizes, check_mark_mask};
pub use counters::{CounterEntry, Counters, direction_name, family_name};
pub use error::DatapathError;
pub use lifecycle::{Cleaned, cleanup};

/// `leave_node` for devices whose packets carry no Ethernet header at TC
/// (`WireGuard`, IPIP/SIT/GRE, `tun`: any link type but `ARPHRD_ETHER`): the
/// program parses from the IP header.
pub const LEAVE_NODE_L3: &str = netpol_common::programs::LEAVE_NODE_L3;

/// The program an uplink of link type `arphrd` (`ARPHRD_*`) gets.
#[must_use]
pub const fn uplink_program(arphrd: u16) -> &'static str {
    if arphrd == libc::ARPHRD_ETHER {
        programs::LEAVE_NODE
    } else {
        LEAVE_NODE_L3
    }
}

/// Default bpffs mount point.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Folder under the bpffs root holding netpol's pins.
pub const PIN_SUBDIR: &str = "netpol";

/// The loaded object. Dropping it detaches the programs it attached unless
/// it is [persistent](DatapathConfig::persistent); the pinned maps stay in
/// bpffs.
pub struct Datapath {
    ebpf: Ebpf,
    writer: KernelMapWriter,
    pin_dir: PathBuf,
    attach_mode: AttachMode,
    persistent: bool,
    /// The layout of the pinned maps this load replaces, until
    /// [`Datapath::commit_layout`].
    replacing: Option<u32>,
    attached: BTreeMap<String, Attachment>,
    /// Pod interfaces [`Datapath::attach_staged`] put on netlink filters,
    /// until [`Datapath::upgrade_to_tcx`] moves them to TCX links.
    awaiting_tcx: std::collections::BTreeSet<String>,
    /// `leave_node` on the TC egress of the node's other devices.
    uplinks: BTreeMap<String, UplinkAttachment>,
    /// The cgroup v2 root `to_host` is attached to.
    host: Option<PathBuf>,
    /// The bpffs root ([`DatapathConfig::bpffs`]).
    bpffs: PathBuf,
    /// A descriptor of each pinned map and link, to pin again
    /// ([`Datapath::restore_pins`]).
    pins: pins::Pins,
    /// The lock of a pin folder [`Datapath::restore_pins`] created again.
    relock: Option<crate::bpffs::PinLock>,
    /// [`DatapathConfig::mark_mask`], kept in the config map whatever
    /// [`Datapath::set_global`] is given.
    mark_mask: u32,
    /// The programs' clock in the config map: [`clock::jiffy_clock`] at
    /// load, then what [`Datapath::set_clock`] gives.
    clock: clock::JiffyClock,
    /// The config map's entry but for the fields the datapath owns.
    global: GlobalConfig,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("attach_mode", &self.attach_mode)
            .field("persistent", &self.persistent)
            .field("attached", &self.attached)
            .field("uplinks", &self.uplinks)
            .field("mark_mask", &format_args!("{:#010x}", self.mark_mask))
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the object, pinning (or reusing) its maps under
    /// `<bpffs>/netpol`, and loads its three programs into the kernel.
    ///
    /// # Errors
    /// When the mark mask is not usable, the object is missing or invalid,
    /// bpffs cannot be prepared, or the kernel refuses a map or program.
    pub fn load(config: &DatapathConfig) -> Result<Self, DatapathError> {
        let mark_mask = check_mark_mask(config.mark_mask)?;
        let path = match &config.object {
            Some(p) => p.clone(),
            None => object::locate()?,
        };
        bpffs::ensure_mounted(&config.bpffs)?;
        let pin_dir = config.pin_dir();
        for dir in [pin_dir.clone(), pin_dir.join(lifecycle::LINKS_DIR)] {
            std::fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        if config.persistent {
            lifecycle::sweep_stale_links(&pin_dir);
        }
        let replacing = lifecycle::prepare_layout(&pin_dir)?;

        let mut loader = EbpfLoader::new();
        for name in maps::ALL {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let sizes = config.map_sizes;
        loader
            .map_max_entries(maps::ENDPOINTS, sizes.endpoints)
            .map_max_entries(maps::POLICY_V4, sizes.policy_v4)
            .map_max_entries(maps::POLICY_V6, sizes.policy_v6)
            .map_max_entries(maps::PORTS, sizes.ports)
            .map_max_entries(maps::CONNTRACK, sizes.conntrack)
            .map_max_entries(maps::FRAGMENTS, sizes.fragments);
        let mut ebpf = loader
            .load_file(&path)
            .map_err(|source| DatapathError::Load {
                path: path.clone(),
                source: Box::new(source),
            })?;
        for name in [
            programs::FROM_POD,
            programs::TO_POD,
            programs::LEAVE_NODE,
            LEAVE_NODE_L3,
        ] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program {
                    name,
                    source: Box::new(source),
                })?;
        }
        let clock = clock::jiffy_clock();
        write_global(&mut ebpf, with_owned(config.global, mark_mask, clock))?;
        let backend = KernelBackend::new(
            take_map(&mut ebpf, maps::ENDPOINTS)?,
            take_map(&mut ebpf, maps::ENDPOINT_EPOCH)?,
            take_map(&mut ebpf, maps::POLICY_V4)?,
            take_map(&mut ebpf, maps::POLICY_V6)?,
            take_map(&mut ebpf, maps::PORTS)?,
            ServiceMaps {
                frontends_v4: take_map(&mut ebpf, maps::FRONTENDS_V4)?,
                frontends_v6: take_map(&mut ebpf, maps::FRONTENDS_V6)?,
                mark_sources: take_map(&mut ebpf, maps::MARK_SOURCES)?,
            },
        )
        .with_conntrack(take_map(&mut ebpf, maps::CONNTRACK)?);
        // Pinned maps may hold a previous agent's state: start from it.
        let mirror = backend.read_back().map_err(|e| DatapathError::Map {
            name: maps::ENDPOINTS,
            source: Box::new(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_get_next_key",
                io_error: e.errno,
            })),
        })?;
        let mut writer = MapWriter::new(backend, mirror);
        writer.set_mark_slots(mark::slots(mark_mask));
        let mut pins = pins::Pins::default();
        for name in maps::ALL {
            let path = pin_dir.join(name);
            if let Err(e) = pins.hold(&path) {
                tracing::warn!(pin = %path.display(), error = %e, "holding a map pin (it cannot be restored if lost)");
            }
        }
        tracing::debug!(object = %path.display(), pin_dir = %pin_dir.display(), "datapath loaded");
        Ok(Self {
            ebpf,
            writer,
            pin_dir,
            attach_mode: config.attach_mode,
            persistent: config.persistent,
            replacing,
            attached: BTreeMap::new(),
            awaiting_tcx: std::collections::BTreeSet::new(),
            uplinks: BTreeMap::new(),
            host: None,
            bpffs: config.bpffs.clone(),
            pins,
            relock: None,
            mark_mask,
            clock,
            global: config.global,
        })
    }

    /// The policy-map writer.
    pub fn writer(&mut self) -> &mut KernelMapWriter {
        &mut self.writer
    }

    /// Replaces the new-pods mode and timeouts. The mark and clock fields
    /// stay the datapath's ([`DatapathConfig::mark_mask`],
    /// [`Datapath::clock`]), whatever `global` holds.
    ///
    /// # Errors
    /// When the config map cannot be written.
    pub fn set_global(&mut self, global: GlobalConfig) -> Result<(), DatapathError> {
        write_global(
            &mut self.ebpf,
            with_owned(global, self.mark_mask, self.clock),
        )?;
        self.global = global;
        Ok(())
    }

    /// The programs' clock in force.
    #[must_use]
    pub const fn clock(&self) -> clock::JiffyClock {
        self.clock
    }

    /// Puts the programs on `clock` (measured again, or
    /// [`clock::JiffyClock::NONE`] for the clock source), keeping the
    /// rest of the config map.
    ///
    /// # Errors
    /// When the config map cannot be written; the old clock stays.
    pub fn set_clock(&mut self, clock: clock::JiffyClock) -> Result<(), DatapathError> {
        write_global(
            &mut self.ebpf,
            with_owned(self.global, self.mark_mask, clock),
        )?;
        self.clock = clock;
        Ok(())
    }

    /// The mark mask in force ([`DatapathConfig::mark_mask`]).
    #[must_use]
    pub const fn mark_mask(&self) -> u32 {
        self.mark_mask
    }

    /// How many pod interfaces can have a mark slot at once:
    /// [`netpol_common::mark::slots`] of the mask.
    #[must_use]
    pub const fn mark_slots(&self) -> u32 {
        mark::slots(self.mark_mask)
    }

    /// One of the three programs, e.g. for `BPF_PROG_TEST_RUN`.
    ///
    /// # Errors
    /// When the object lacks it.
    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        classifier(&mut self.ebpf, name)
    }

    /// Loads another classifier of the object (the bench object's reference
    /// programs) and returns it.
    ///
    /// # Errors
    /// When the object lacks it or the kernel refuses it.
    pub fn load_extra(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, DatapathError> {
        let p = classifier(&mut self.ebpf, name)?;
        p.load().map_err(|source| DatapathError::Program {
            name,
            source: Box::new(source),
        })?;
        Ok(p)
    }

    /// The folder holding the pinned maps.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Pod interfaces this datapath has attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// Uplinks this datapath has attached `leave_node` (or
    /// [`LEAVE_NODE_L3`]) to.
    pub fn uplinks(&self) -> impl Iterator<Item = &str> {
        self.uplinks.keys().map(String::as_str)
    }

    /// The program on an uplink's egress, if it is one of this datapath's.
    #[must_use]
    pub fn uplink_program(&self, interface: &str) -> Option<&'static str> {
        self.uplinks.get(interface).map(|u| u.program)
    }

    /// Pins again every map and link pin of this datapath that is missing,
    /// from the descriptors it holds, mounting the bpffs again when it is
    /// gone; returns what was missing. Also writes the layout record back.
    ///
    /// # Errors
    /// [`pins::RestoreError`] when the bpffs is gone and cannot be mounted
    /// again, or a pin cannot be created.
    pub fn restore_pins(&mut self) -> Result<Vec<PathBuf>, pins::RestoreError> {
        if self.pins.is_empty() {
            return Ok(Vec::new());
        }
        if !bpffs::is_bpffs(&self.bpffs).unwrap_or(false) {
            bpffs::ensure_mounted(&self.bpffs).map_err(|e| pins::RestoreError::NoBpffs {
                root: self.bpffs.clone(),
                reason: e.to_string(),
            })?;
            tracing::warn!(bpffs = %self.bpffs.display(), "the bpffs was gone: mounted it again");
        }
        let recreated = !self.pin_dir.exists();
        let mut restored = self.pins.restore()?;
        if recreated {
            // A pin folder made anew is this agent's to lock, as at start.
            match bpffs::lock(&self.pin_dir, std::time::Duration::ZERO) {
                Ok(l) => self.relock = Some(l),
                Err(e) => tracing::error!(error = %e, "locking the restored pin folder"),
            }
        }
        let record = self.pin_dir.join(lifecycle::LAYOUT_RECORD);
        if self.replacing.is_none() && std::fs::symlink_metadata(&record).is_err() {
            lifecycle::write_record(&record, &netpol_common::LAYOUT_VERSION.to_string()).map_err(
                |source| pins::RestoreError::Pin {
                    path: record.clone(),
                    source,
                },
            )?;
            restored.push(record);
        }
        Ok(restored)
    }

    /// The layout of the pinned maps this load is replacing: fresh maps of
    /// the current layout were created, and interfaces a previous agent
    /// attached keep its programs (and maps) until [`Self::commit_layout`].
    #[must_use]
    pub fn replacing_layout(&self) -> Option<u32> {
        self.replacing
    }

    /// Whether a pod interface a previous agent attached to (a TCX link
    /// pin, a netlink filter record of `from_pod` or `to_pod`) still exists
    /// and is not attached by this datapath yet.
    ///
    /// Uplinks are not waited for: one this agent does not attach (other
    /// `--uplinks`) must not hold the pods on the maps of the old layout;
    /// one attached later adopts the previous agent's link then.
    #[must_use]
    pub fn awaiting_interfaces(&self) -> bool {
        lifecycle::previous_interfaces(&self.pin_dir)
            .iter()
            .any(|i| !self.attached.contains_key(i))
    }

    /// Once the new maps hold the whole state: swaps this datapath's
    /// programs in on every interface that kept a previous agent's
    /// (atomically, per hook), then removes the maps of the old layout.
    /// Returns the layout replaced, if any.
    ///
    /// # Errors
    /// When a swap or the removal of the old pins fails; what was swapped
    /// stays swapped, and a later call resumes.
    pub fn commit_layout(&mut self) -> Result<Option<u32>, DatapathError> {
        let Some(old) = self.replacing else {
            return Ok(None);
        };
        let tcx = self.use_tcx()?;
        self.replacing = None;
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for name in names {
            // An interface still on netlink filters keeps them.
            let tcx = tcx && !self.awaiting_tcx.contains(&name);
            for (program, hook) in [
                (programs::FROM_POD, TcAttachType::Ingress),
                (programs::TO_POD, TcAttachType::Egress),
            ] {
                let deferred = self.attached.get(&name).is_some_and(|a| {
                    matches!(
                        if hook == TcAttachType::Ingress {
                            &a.from_pod
                        } else {
                            &a.to_pod
                        },
                        Held::Deferred
                    )
                });
                if !deferred {
                    continue;
                }
                let (held, _) = match self.attach_hook(program, &name, hook, tcx) {
                    Ok(r) => r,
                    Err(e) => {
                        self.replacing = Some(old);
                        return Err(e);
                    }
                };
                if let Some(a) = self.attached.get_mut(&name) {
                    if hook == TcAttachType::Ingress {
                        a.from_pod = held;
                    } else {
                        a.to_pod = held;
                    }
                }
            }
        }
        let uplinks: Vec<(String, &'static str)> = self
            .uplinks
            .iter()
            .filter(|(_, u)| matches!(u.held, Held::Deferred))
            .map(|(n, u)| (n.clone(), u.program))
            .collect();
        for (name, program) in uplinks {
            let held = match self.attach_hook(program, &name, TcAttachType::Egress, tcx) {
                Ok((held, _)) => held,
                Err(e) => {
                    self.replacing = Some(old);
                    return Err(e);
                }
            };
            self.uplinks
                .insert(name, UplinkAttachment { program, held });
        }
        if let Err(e) = lifecycle::finish_layout(&self.pin_dir, old) {
            self.replacing = Some(old);
            return Err(e);
        }
        tracing::info!(
            from = old,
            to = netpol_common::LAYOUT_VERSION,
            "replaced the pinned maps of layout {old} with layout {}",
            netpol_common::LAYOUT_VERSION
        );
        Ok(Some(old))
    }

    /// Current counters, summed over CPUs.
    ///
    /// # Errors
    /// When the counter map cannot be read.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let map = self
            .ebpf
            .map(maps::COUNTERS)
            .ok_or(DatapathError::MissingMap {
                name: maps::COUNTERS,
            })?;
        let array = PerCpuArray::<_, TrafficCounter>::try_from(map).map_err(map_err)?;
        Counters::read(&array)
    }

    /// Whether [`Datapath::attach_staged`] puts pod interfaces on netlink
    /// filters first.
    fn stages_tcx(&self) -> Result<bool, DatapathError> {
        Ok(self.attach_mode == AttachMode::Auto && self.use_tcx()?)
    }

    /// Whether this datapath attaches through TCX (else netlink).
    fn use_tcx(&self) -> Result<bool, DatapathError> {
        let tcx_ok = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        Ok(match self.attach_mode {
            AttachMode::Auto | AttachMode::Tcx if tcx_ok => true,
            AttachMode::Auto | AttachMode::Netlink => false,
            AttachMode::Tcx => {
                return Err(DatapathError::TcxUnsupported(
                    KernelVersion::current().map_or_else(|_| "unknown".into(), |v| v.to_string()),
                ));
            }
        })
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DatapathError::Map {
        name,
        source: Box::new(source),
    })
}

/// `global` with the fields the datapath owns: the mark fields of `mask`
/// (already checked) and the programs' clock.
fn with_owned(global: GlobalConfig, mask: u32, clock: clock::JiffyClock) -> GlobalConfig {
    GlobalConfig {
        mark_mask: mask,
        mark_shift: mark::shift(mask),
        clock_jiffy_ns: clock.jiffy_ns,
        clock_offset_ns: clock.offset_ns,
        ..global
    }
}

fn write_global(ebpf: &mut Ebpf, global: GlobalConfig) -> Result<(), DatapathError> {
    let name = maps::CONFIG;
    let map = ebpf
        .map_mut(name)
        .ok_or(DatapathError::MissingMap { name })?;
    let mut array = aya::maps::Array::<_, GlobalConfig>::try_from(map).map_err(|source| {
        DatapathError::Map {
            name,
            source: Box::new(source),
        }
    })?;
    array
        .set(0, global, 0)
        .map_err(|source| DatapathError::Map {
            name,
            source: Box::new(source),
        })
}

fn map_err(source: aya::maps::MapError) -> DatapathError {
    DatapathError::Map {
        name: maps::COUNTERS,
        source: Box::new(source),
    }
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?;
    program.try_into().map_err(|source| DatapathError::Program {
        name,
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ethernet_devices_get_leave_node_others_its_l3_variant() {
        assert_eq!(uplink_program(libc::ARPHRD_ETHER), programs::LEAVE_NODE);
        // WireGuard and tun (none), IPIP (tunnel), SIT, GRE.
        for t in [
            libc::ARPHRD_NONE,
            libc::ARPHRD_TUNNEL,
            libc::ARPHRD_TUNNEL6,
            libc::ARPHRD_SIT,
            libc::ARPHRD_IPGRE,
        ] {
            assert_eq!(uplink_program(t), LEAVE_NODE_L3, "{t}");
        }
    }

    #[test]
    fn an_unusable_mark_mask_is_refused_by_value() {
        let e = check_mark_mask(0x0f0f_0000).expect_err("two runs");
        assert!(e.to_string().contains("0x0f0f0000"), "{e}");
        assert!(check_mark_mask(0).is_err());
        assert_eq!(
            check_mark_mask(mark::DEFAULT_MASK).ok(),
            Some(mark::DEFAULT_MASK)
        );
    }
}
