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
pub mod clock;
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
    maps::{Map, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType, tc::TcError},
    util::KernelVersion,
};
use netpol_common::{
    COUNTER_ENTRIES, GlobalConfig, TrafficCounter, direction, family, maps, mark, programs, reason,
};

use crate::{bpffs, object};
use lifecycle::{Held, Hook};
use writer::{KernelBackend, KernelMapWriter, MapWriter, ServiceMaps};

pub use lifecycle::{Cleaned, cleanup};

/// `leave_node` for devices whose packets carry no Ethernet header at TC
/// (WireGuard, IPIP/SIT/GRE, `tun`: any link type but `ARPHRD_ETHER`): the
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

/// How the programs are attached to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links on kernels ≥ 6.6, netlink clsact filters below.
    #[default]
    Auto,
    /// Netlink clsact filters (the only path before 6.6).
    Netlink,
    /// TCX links (6.6 and later).
    Tcx,
}

/// What to load and where to pin it.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// bpffs mount point; mounted when it is not a bpffs yet.
    pub bpffs: PathBuf,
    /// The object; `None` finds it with [`object::locate`].
    pub object: Option<PathBuf>,
    /// How programs are attached.
    pub attach_mode: AttachMode,
    /// Map sizes for maps created by this load (pinned maps that already
    /// exist keep theirs).
    pub map_sizes: MapSizes,
    /// New-pods mode and connection timeouts, written at load. Its mark
    /// fields are ignored: [`Self::mark_mask`] sets them.
    pub global: GlobalConfig,
    /// Bits of `skb->mark` that carry a pod's Service traffic from
    /// `from_pod` to the hook that judges it after kube-proxy's DNAT
    /// (`to_pod`, `leave_node`): one run of contiguous bits
    /// ([`netpol_common::mark::valid`]). Default
    /// [`netpol_common::mark::DEFAULT_MASK`], clear of kube-proxy's
    /// 0x4000/0x8000, kube-router's 0x10000/0x20000 and Tailscale's
    /// 0xff0000.
    pub mark_mask: u32,
    /// Attachments outlive the datapath and its process (the agent): TCX
    /// links are pinned, netlink filters left in place, and a later load
    /// adopts them, swapping its programs in atomically. Off (the default),
    /// dropping the datapath detaches what it attached.
    pub persistent: bool,
}

/// Maximum entries of the maps whose size depends on the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Local pod interfaces.
    pub endpoints: u32,
    /// IPv4 policy prefixes, all endpoints and directions together.
    pub policy_v4: u32,
    /// IPv6 policy prefixes.
    pub policy_v6: u32,
    /// Port-trie entries of all rule sets.
    pub ports: u32,
    /// Tracked connections.
    pub conntrack: u32,
    /// Datagrams being reassembled (first-fragment verdicts).
    pub fragments: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            endpoints: 4096,
            policy_v4: 262_144,
            policy_v6: 262_144,
            ports: 65_536,
            conntrack: 262_144,
            fragments: 8192,
        }
    }
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            bpffs: PathBuf::from(DEFAULT_BPFFS),
            object: None,
            attach_mode: AttachMode::Auto,
            map_sizes: MapSizes::default(),
            global: GlobalConfig::default(),
            mark_mask: mark::DEFAULT_MASK,
            persistent: false,
        }
    }
}

impl DatapathConfig {
    /// The folder the maps are pinned in: `<bpffs>/netpol`.
    #[must_use]
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.join(PIN_SUBDIR)
    }
}

/// Errors of the datapath, each naming the operation and its object.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    ObjectNotFound(#[from] object::ObjectNotFound),
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    #[error("creating pin folder {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading eBPF object {path}: {source}")]
    Load {
        path: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<aya::programs::ProgramError>,
    },
    /// The netlink path's clsact qdisc, which the programs need before
    /// they can attach (a missing interface fails here).
    #[error("attaching {programs} to {interface}: adding its clsact qdisc: {source}")]
    Clsact {
        /// The programs, joined with "and".
        programs: String,
        interface: String,
        source: Box<TcError>,
    },
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{interface} is not attached by this agent")]
    NotAttached { interface: String },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<aya::maps::MapError>,
    },
    #[error("TCX attach needs kernel 6.6 or later (this is {0})")]
    TcxUnsupported(String),
    #[error("link of {program} on {interface}: {source}")]
    Link {
        program: &'static str,
        interface: String,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("pinning a link at {path}: {source}")]
    PinLink {
        path: PathBuf,
        source: Box<aya::pin::PinError>,
    },
    #[error("removing {path}: {source}")]
    Unpin {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listing interfaces: {source}")]
    Interfaces { source: std::io::Error },
    #[error("deleting the clsact qdisc of {interface}: {message}")]
    QdiscDelete { interface: String, message: String },
    #[error(
        "mark mask {mask:#010x} is not usable: it must be one run of contiguous bits (e.g. {:#010x}), not 0",
        mark::DEFAULT_MASK
    )]
    MarkMask { mask: u32 },
    #[error(
        "no cgroup v2 hierarchy at or under {path} ({source}): Service backends on node \
         addresses cannot be judged"
    )]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{interface} is attached as a pod interface, not as an uplink")]
    PodInterface { interface: String },
    #[error("reading the link type of {interface}: {source}")]
    LinkType {
        interface: String,
        source: std::io::Error,
    },
}

/// `mask` when it is a usable mark mask ([`netpol_common::mark::valid`]).
///
/// # Errors
/// [`DatapathError::MarkMask`], naming the value, otherwise.
pub const fn check_mark_mask(mask: u32) -> Result<u32, DatapathError> {
    if mark::valid(mask) {
        Ok(mask)
    } else {
        Err(DatapathError::MarkMask { mask })
    }
}

/// One interface's two attachments.
#[derive(Debug)]
struct Attachment {
    from_pod: Held,
    to_pod: Held,
}

/// An uplink's attachment: `leave_node` or [`LEAVE_NODE_L3`].
#[derive(Debug)]
struct UplinkAttachment {
    program: &'static str,
    held: Held,
}

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

    fn attach_hook(
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

    /// Whether this datapath attaches through TCX (else netlink).
    fn use_tcx(&self) -> Result<bool, DatapathError> {
        let tcx_ok = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        Ok(match self.attach_mode {
            AttachMode::Auto | AttachMode::Tcx if tcx_ok => true,
            AttachMode::Auto | AttachMode::Netlink => false,
            AttachMode::Tcx => {
                return Err(DatapathError::TcxUnsupported(
                    KernelVersion::current()
                        .map(|v| v.to_string())
                        .unwrap_or_else(|_| "unknown".into()),
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

/// One counter slot, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterEntry {
    /// `netpol_common::direction`.
    pub direction: u32,
    /// `netpol_common::family`.
    pub family: u32,
    /// `netpol_common::reason`.
    pub reason: u32,
    /// Packets and bytes.
    pub value: TrafficCounter,
}

/// Every non-zero counter slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Non-zero slots, ordered by direction, family, reason.
    pub entries: Vec<CounterEntry>,
}

impl Counters {
    /// Reads the counters from the map pinned in `pin_dir` (another agent's
    /// or this one's), e.g. for `netpol-agent stats`.
    ///
    /// # Errors
    /// When the pin is missing or not netpol's counter map.
    pub fn read_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let data = MapData::from_pin(pin_dir.join(maps::COUNTERS)).map_err(map_err)?;
        let map = Map::from_map_data(data).map_err(map_err)?;
        let array = PerCpuArray::<_, TrafficCounter>::try_from(map).map_err(map_err)?;
        Self::read(&array)
    }

    pub(crate) fn read<T: std::borrow::Borrow<MapData>>(
        array: &PerCpuArray<T, TrafficCounter>,
    ) -> Result<Self, DatapathError> {
        let mut entries = Vec::new();
        for d in 0..direction::COUNT {
            for f in 0..family::COUNT {
                for r in 0..reason::SLOTS {
                    let index = netpol_common::counter_index(d, f, r);
                    debug_assert!(index < COUNTER_ENTRIES);
                    let per_cpu = array.get(&index, 0).map_err(map_err)?;
                    let mut sum = TrafficCounter::default();
                    for v in per_cpu.iter() {
                        sum.packets += v.packets;
                        sum.bytes += v.bytes;
                    }
                    if sum != TrafficCounter::default() {
                        entries.push(CounterEntry {
                            direction: d,
                            family: f,
                            reason: r,
                            value: sum,
                        });
                    }
                }
            }
        }
        Ok(Self { entries })
    }

    /// Sum over reasons of one direction and family.
    #[must_use]
    pub fn total(&self, direction: u32, family: u32) -> TrafficCounter {
        self.entries
            .iter()
            .filter(|e| e.direction == direction && e.family == family)
            .fold(TrafficCounter::default(), |mut acc, e| {
                acc.packets += e.value.packets;
                acc.bytes += e.value.bytes;
                acc
            })
    }
}

/// Human name of a direction.
#[must_use]
pub const fn direction_name(d: u32) -> &'static str {
    direction::name(d)
}

/// Human name of a family.
#[must_use]
pub const fn family_name(f: u32) -> &'static str {
    family::name(f)
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
