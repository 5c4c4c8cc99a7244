//! The map writer: applies the compiler's updates to the policy maps, in the
//! compiler's order, all or nothing.
//!
//! The transactional part (a mirror of what the maps hold, rollback, entry
//! counts) is shared; a [`Backend`] performs single map operations: the
//! kernel's maps ([`KernelBackend`]) or memory ([`FakeBackend`], for unit
//! tests, with capacities to simulate full maps).
//!
//! # Mark slots
//! The writer also hands out the mark slots (`netpol_common::mark`) of the
//! pod interfaces: with [`MapWriter::set_mark_slots`]`(n)`, every
//! programmed endpoint entry gets a slot in `1..=n`, kept while its
//! interface keeps a programmed entry, the lowest free one for a new
//! interface; `NETPOL_MARK_SOURCES[slot]` names the interface. The slot is
//! written before the endpoint entry that carries it and cleared after the
//! entry that gives it up (an unprogrammed entry, a deleted one), so the
//! datapath never reads a slot whose source is not recorded. With no slot
//! free, the entry carries slot 0: its pod's Service traffic is judged at
//! the frontend address. Slots are part of the mirror, so a failed apply
//! rolls them back with the rest.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, lpm_trie::Key, lpm_trie::LpmTrie};
use netpol_common::{
    CtKey, CtValue, EndpointInfo, FrontendKeyV4, FrontendKeyV6, FrontendValue, PolicyKeyV4,
    PolicyKeyV6, PolicyValue, PortKey, PortValue, maps,
};

use crate::{compiler::RawOp, model::ObjectRef};

/// Maps pods to the host-side interface their endpoint entry is keyed by.
pub trait InterfaceResolver {
    /// The pod's host-side interface index, if it has one on this node.
    fn ifindex(&self, pod: &ObjectRef) -> Option<u32>;
}

impl InterfaceResolver for BTreeMap<ObjectRef, u32> {
    fn ifindex(&self, pod: &ObjectRef) -> Option<u32> {
        self.get(pod).copied()
    }
}

/// One operation on one map, with the kernel's keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelOp {
    EndpointUpsert(u32, EndpointInfo),
    EndpointDelete(u32),
    PolicyV4Upsert(u32, PolicyKeyV4, PolicyValue),
    PolicyV4Delete(u32, PolicyKeyV4),
    PolicyV6Upsert(u32, PolicyKeyV6, PolicyValue),
    PolicyV6Delete(u32, PolicyKeyV6),
    PortUpsert(u32, PortKey, PortValue),
    PortDelete(u32, PortKey),
    FrontendV4Upsert(FrontendKeyV4, FrontendValue),
    FrontendV4Delete(FrontendKeyV4),
    FrontendV6Upsert(FrontendKeyV6, FrontendValue),
    FrontendV6Delete(FrontendKeyV6),
    /// `MARK_SOURCES[slot] = ifindex`.
    SlotSet(u32, u32),
    /// `MARK_SOURCES[slot] = 0`.
    SlotClear(u32),
}

impl KernelOp {
    /// The map this operation writes.
    #[must_use]
    pub const fn map(&self) -> &'static str {
        match self {
            Self::EndpointUpsert(..) | Self::EndpointDelete(..) => maps::ENDPOINTS,
            Self::PolicyV4Upsert(..) | Self::PolicyV4Delete(..) => maps::POLICY_V4,
            Self::PolicyV6Upsert(..) | Self::PolicyV6Delete(..) => maps::POLICY_V6,
            Self::PortUpsert(..) | Self::PortDelete(..) => maps::PORTS,
            Self::FrontendV4Upsert(..) | Self::FrontendV4Delete(..) => maps::FRONTENDS_V4,
            Self::FrontendV6Upsert(..) | Self::FrontendV6Delete(..) => maps::FRONTENDS_V6,
            Self::SlotSet(..) | Self::SlotClear(..) => maps::MARK_SOURCES,
        }
    }
}

/// A single map operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{errno}")]
pub struct BackendError {
    /// The errno the kernel (or the fake) returned.
    pub errno: std::io::Error,
}

/// Performs single map operations.
pub trait Backend {
    /// Applies one operation. Deleting an absent key is not an error.
    ///
    /// # Errors
    /// The kernel's error, e.g. `E2BIG`/`ENOSPC` when the map is full.
    fn exec(&mut self, op: &KernelOp) -> Result<(), BackendError>;

    /// Forgets every tracked connection of an endpoint that is gone, so a
    /// pod that later gets its address (or id) inherits nothing. Returns
    /// how many were removed.
    ///
    /// # Errors
    /// When the connection map cannot be read or written.
    fn purge_connections(&mut self, endpoint: u32) -> Result<usize, BackendError>;
}

/// Entries per map, as the writer knows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapCounts {
    pub endpoints: usize,
    pub policy_v4: usize,
    pub policy_v6: usize,
    pub ports: usize,
    pub frontends_v4: usize,
    pub frontends_v6: usize,
    /// Mark slots in use (non-zero `MARK_SOURCES` entries).
    pub mark_sources: usize,
}

impl fmt::Display for MapCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "endpoints={} policy_v4={} policy_v6={} ports={} frontends_v4={} frontends_v6={} \
             mark_sources={}",
            self.endpoints,
            self.policy_v4,
            self.policy_v6,
            self.ports,
            self.frontends_v4,
            self.frontends_v6,
            self.mark_sources
        )
    }
}

/// What one apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Operations written.
    pub applied: usize,
    /// Endpoint updates skipped because the pod has no interface here yet.
    pub skipped: Vec<ObjectRef>,
    /// Entries per map afterwards.
    pub counts: MapCounts,
}

/// Why an apply failed; the maps hold what they held before it.
#[derive(Debug, thiserror::Error)]
pub enum MapWriteError {
    #[error(
        "map {map} is full ({entries} entries): update refused, previous state left in force; \
         raise its size"
    )]
    Full {
        map: &'static str,
        entries: usize,
        source: BackendError,
    },
    #[error("updating map {map} ({op:?}): {source}; previous state left in force")]
    Update {
        map: &'static str,
        op: KernelOp,
        source: BackendError,
    },
    #[error("updating map {map} failed ({first}) and rolling back failed too ({rollback})")]
    RollbackFailed {
        map: &'static str,
        first: BackendError,
        rollback: BackendError,
    },
}

/// What the writer believes the maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mirror {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    pub policy_v4: BTreeMap<(u32, PolicyKeyV4), PolicyValue>,
    pub policy_v6: BTreeMap<(u32, PolicyKeyV6), PolicyValue>,
    pub ports: BTreeMap<(u32, PortKey), PortValue>,
    pub frontends_v4: BTreeMap<FrontendKeyV4, FrontendValue>,
    pub frontends_v6: BTreeMap<FrontendKeyV6, FrontendValue>,
    /// Mark slot → host ifindex of its interface (slots in use only).
    pub slots: BTreeMap<u32, u32>,
}

impl Mirror {
    fn counts(&self) -> MapCounts {
        MapCounts {
            endpoints: self.endpoints.len(),
            policy_v4: self.policy_v4.len(),
            policy_v6: self.policy_v6.len(),
            ports: self.ports.len(),
            frontends_v4: self.frontends_v4.len(),
            frontends_v6: self.frontends_v6.len(),
            mark_sources: self.slots.len(),
        }
    }

    fn entries(&self, map: &str) -> usize {
        let c = self.counts();
        match map {
            maps::ENDPOINTS => c.endpoints,
            maps::POLICY_V4 => c.policy_v4,
            maps::POLICY_V6 => c.policy_v6,
            maps::FRONTENDS_V4 => c.frontends_v4,
            maps::FRONTENDS_V6 => c.frontends_v6,
            maps::MARK_SOURCES => c.mark_sources,
            _ => c.ports,
        }
    }

    /// The operation that undoes `op`, given the state before it.
    fn inverse(&self, op: &KernelOp) -> KernelOp {
        use KernelOp as K;
        match *op {
            K::EndpointUpsert(i, _) | K::EndpointDelete(i) => match self.endpoints.get(&i) {
                Some(v) => K::EndpointUpsert(i, *v),
                None => K::EndpointDelete(i),
            },
            K::PolicyV4Upsert(l, k, _) | K::PolicyV4Delete(l, k) => {
                match self.policy_v4.get(&(l, k)) {
                    Some(v) => K::PolicyV4Upsert(l, k, *v),
                    None => K::PolicyV4Delete(l, k),
                }
            }
            K::PolicyV6Upsert(l, k, _) | K::PolicyV6Delete(l, k) => {
                match self.policy_v6.get(&(l, k)) {
                    Some(v) => K::PolicyV6Upsert(l, k, *v),
                    None => K::PolicyV6Delete(l, k),
                }
            }
            K::PortUpsert(l, k, _) | K::PortDelete(l, k) => match self.ports.get(&(l, k)) {
                Some(v) => K::PortUpsert(l, k, *v),
                None => K::PortDelete(l, k),
            },
            K::FrontendV4Upsert(k, _) | K::FrontendV4Delete(k) => match self.frontends_v4.get(&k) {
                Some(v) => K::FrontendV4Upsert(k, *v),
                None => K::FrontendV4Delete(k),
            },
            K::FrontendV6Upsert(k, _) | K::FrontendV6Delete(k) => match self.frontends_v6.get(&k) {
                Some(v) => K::FrontendV6Upsert(k, *v),
                None => K::FrontendV6Delete(k),
            },
            K::SlotSet(s, _) | K::SlotClear(s) => match self.slots.get(&s) {
                Some(&i) => K::SlotSet(s, i),
                None => K::SlotClear(s),
            },
        }
    }

    /// Applies one operation to the copy, as the kernel does to the maps
    /// (tests replay a backend's log with it).
    pub fn record(&mut self, op: &KernelOp) {
        use KernelOp as K;
        match *op {
            K::EndpointUpsert(i, v) => {
                self.endpoints.insert(i, v);
            }
            K::EndpointDelete(i) => {
                self.endpoints.remove(&i);
            }
            K::PolicyV4Upsert(l, k, v) => {
                self.policy_v4.insert((l, k), v);
            }
            K::PolicyV4Delete(l, k) => {
                self.policy_v4.remove(&(l, k));
            }
            K::PolicyV6Upsert(l, k, v) => {
                self.policy_v6.insert((l, k), v);
            }
            K::PolicyV6Delete(l, k) => {
                self.policy_v6.remove(&(l, k));
            }
            K::PortUpsert(l, k, v) => {
                self.ports.insert((l, k), v);
            }
            K::PortDelete(l, k) => {
                self.ports.remove(&(l, k));
            }
            K::FrontendV4Upsert(k, v) => {
                self.frontends_v4.insert(k, v);
            }
            K::FrontendV4Delete(k) => {
                self.frontends_v4.remove(&k);
            }
            K::FrontendV6Upsert(k, v) => {
                self.frontends_v6.insert(k, v);
            }
            K::FrontendV6Delete(k) => {
                self.frontends_v6.remove(&k);
            }
            // An array entry of 0 is a free slot.
            K::SlotSet(s, 0) | K::SlotClear(s) => {
                self.slots.remove(&s);
            }
            K::SlotSet(s, i) => {
                self.slots.insert(s, i);
            }
        }
    }
}

/// Hands out mark slots over one batch of operations (see the module
/// documentation), starting from what the maps hold.
struct SlotPlan<'m> {
    mirror: &'m Mirror,
    capacity: u32,
    /// Slot → interface, as the batch leaves it so far.
    slots: BTreeMap<u32, u32>,
    /// Interface → its slots (one, unless the maps were left inconsistent).
    held: BTreeMap<u32, BTreeSet<u32>>,
    free: BTreeSet<u32>,
    /// Endpoint entries the batch writes (`None`: deleted).
    written: BTreeMap<u32, Option<EndpointInfo>>,
    out: Vec<KernelOp>,
}

impl<'m> SlotPlan<'m> {
    fn new(mirror: &'m Mirror, capacity: u32) -> Self {
        let mut held: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for (&s, &i) in &mirror.slots {
            held.entry(i).or_default().insert(s);
        }
        let free = (1..=capacity)
            .filter(|s| !mirror.slots.contains_key(s))
            .collect();
        Self {
            mirror,
            capacity,
            slots: mirror.slots.clone(),
            held,
            free,
            written: BTreeMap::new(),
            out: Vec::new(),
        }
    }

    /// The endpoint entry of `i` as the batch leaves it so far.
    fn endpoint(&self, i: u32) -> Option<EndpointInfo> {
        match self.written.get(&i) {
            Some(e) => *e,
            None => self.mirror.endpoints.get(&i).copied(),
        }
    }

    fn release(&mut self, i: u32, keep: u32) {
        let Some(slots) = self.held.remove(&i) else {
            return;
        };
        for s in slots {
            if s == keep {
                self.held.entry(i).or_default().insert(s);
                continue;
            }
            self.out.push(KernelOp::SlotClear(s));
            self.slots.remove(&s);
            if s <= self.capacity {
                self.free.insert(s);
            }
        }
    }

    /// A programmed entry for `i`: its slot (kept, or the lowest free
    /// one), set before the entry.
    fn programmed_upsert(&mut self, i: u32, mut info: EndpointInfo, retry: bool) {
        let kept = self
            .held
            .get(&i)
            .and_then(|s| s.iter().copied().find(|&s| s <= self.capacity));
        let slot = match kept {
            Some(s) => s,
            None => match self.free.pop_first() {
                Some(s) => {
                    self.out.push(KernelOp::SlotSet(s, i));
                    self.slots.insert(s, i);
                    self.held.entry(i).or_default().insert(s);
                    s
                }
                None if retry => return,
                None => {
                    if self.capacity > 0 {
                        tracing::warn!(
                            ifindex = i,
                            slots = self.capacity,
                            "no free mark slot for this pod interface: its pod's Service \
                             traffic is judged at the frontend address"
                        );
                    }
                    0
                }
            },
        };
        info.slot = slot;
        self.out.push(KernelOp::EndpointUpsert(i, info));
        self.written.insert(i, Some(info));
        self.release(i, slot);
    }

    fn push(&mut self, op: &KernelOp) {
        match *op {
            KernelOp::EndpointUpsert(i, info) if info.programmed() => {
                self.programmed_upsert(i, info, false);
            }
            KernelOp::EndpointUpsert(i, mut info) => {
                info.slot = 0;
                self.out.push(KernelOp::EndpointUpsert(i, info));
                self.written.insert(i, Some(info));
                self.release(i, 0);
            }
            KernelOp::EndpointDelete(i) => {
                self.out.push(*op);
                self.written.insert(i, None);
                self.release(i, 0);
            }
            _ => self.out.push(*op),
        }
    }

    /// The batch with its slot operations, and the repairs of what the
    /// maps hold: programmed entries the batch leaves alone whose slot is
    /// wrong (out of capacity, not recorded, or none while one is free)
    /// get theirs first, and slots no entry carries are cleared last.
    fn plan(mirror: &'m Mirror, capacity: u32, ops: &[KernelOp]) -> Vec<KernelOp> {
        let mut p = Self::new(mirror, capacity);
        let touched: BTreeSet<u32> = ops
            .iter()
            .filter_map(|op| match op {
                KernelOp::EndpointUpsert(i, _) | KernelOp::EndpointDelete(i) => Some(*i),
                _ => None,
            })
            .collect();
        for (&i, info) in &mirror.endpoints {
            if !info.programmed() || touched.contains(&i) {
                continue;
            }
            let recorded = info.slot != 0 && mirror.slots.get(&info.slot) == Some(&i);
            let ok = if info.slot == 0 {
                p.free.is_empty()
            } else {
                recorded && info.slot <= capacity
            };
            if !ok {
                p.programmed_upsert(i, *info, info.slot == 0);
            }
        }
        for op in ops {
            p.push(op);
        }
        let stale: Vec<u32> = p
            .slots
            .iter()
            .filter(|&(&s, &i)| {
                p.endpoint(i)
                    .is_none_or(|e| !e.programmed() || e.slot != s || s > capacity)
            })
            .map(|(&s, _)| s)
            .collect();
        for s in stale {
            p.out.push(KernelOp::SlotClear(s));
            p.slots.remove(&s);
        }
        p.out
    }
}

/// Translates the compiler's updates to kernel operations; endpoint updates
/// of pods without an interface are left out (and reported).
pub fn kernel_ops(
    ops: &[RawOp],
    ifaces: &dyn InterfaceResolver,
    skipped: &mut Vec<ObjectRef>,
) -> Vec<KernelOp> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        out.push(match op {
            RawOp::PortUpsert(l, k, v) => KernelOp::PortUpsert(*l, *k, *v),
            RawOp::PortDelete(l, k) => KernelOp::PortDelete(*l, *k),
            RawOp::PolicyV4Upsert(l, k, v) => KernelOp::PolicyV4Upsert(*l, *k, *v),
            RawOp::PolicyV4Delete(l, k) => KernelOp::PolicyV4Delete(*l, *k),
            RawOp::PolicyV6Upsert(l, k, v) => KernelOp::PolicyV6Upsert(*l, *k, *v),
            RawOp::PolicyV6Delete(l, k) => KernelOp::PolicyV6Delete(*l, *k),
            RawOp::FrontendV4Upsert(k, v) => KernelOp::FrontendV4Upsert(*k, *v),
            RawOp::FrontendV4Delete(k) => KernelOp::FrontendV4Delete(*k),
            RawOp::FrontendV6Upsert(k, v) => KernelOp::FrontendV6Upsert(*k, *v),
            RawOp::FrontendV6Delete(k) => KernelOp::FrontendV6Delete(*k),
            RawOp::EndpointUpsert(pod, info) => match ifaces.ifindex(pod) {
                Some(i) => KernelOp::EndpointUpsert(i, *info),
                None => {
                    skipped.push(pod.clone());
                    continue;
                }
            },
            RawOp::EndpointDelete(pod, _) => match ifaces.ifindex(pod) {
                Some(i) => KernelOp::EndpointDelete(i),
                None => {
                    skipped.push(pod.clone());
                    continue;
                }
            },
        });
    }
    out
}

/// Applies updates through a [`Backend`], keeping a mirror of the maps.
#[derive(Debug)]
pub struct MapWriter<B> {
    backend: B,
    mirror: Mirror,
    full_errors: u64,
    mark_slots: u32,
}

impl<B: Backend> MapWriter<B> {
    /// A writer over `backend`, whose maps hold `mirror` (empty for new
    /// maps; read back from pinned maps on adoption). Marking is off
    /// ([`Self::set_mark_slots`]).
    pub fn new(backend: B, mirror: Mirror) -> Self {
        Self {
            backend,
            mirror,
            full_errors: 0,
            mark_slots: 0,
        }
    }

    /// Gives programmed pod interfaces mark slots `1..=n` from the next
    /// apply on (`netpol_common::mark::slots` of the mark mask, at most
    /// `MAX_SLOTS`); 0 (the default) turns marking off: no slot is handed
    /// out and the next apply clears those in use. See the module
    /// documentation.
    pub fn set_mark_slots(&mut self, n: u32) {
        self.mark_slots = n.min(netpol_common::mark::MAX_SLOTS);
    }

    /// The mark slots handed out, at most.
    pub fn mark_slots(&self) -> u32 {
        self.mark_slots
    }

    /// What the maps hold.
    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// Entries per map.
    pub fn counts(&self) -> MapCounts {
        self.mirror.counts()
    }

    /// How many applies a full map refused.
    pub fn full_errors(&self) -> u64 {
        self.full_errors
    }

    /// The backend (tests inspect the fake).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, to change (tests resize the fake's maps).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Applies the compiler's updates in order. On any failure the
    /// operations already applied are undone in reverse order (each
    /// intermediate state of the compiler's order is safe, so the undo
    /// passes only through safe states too) and the error names the map.
    ///
    /// # Errors
    /// [`MapWriteError`]; the maps then hold what they held before.
    pub fn apply(
        &mut self,
        ops: &[RawOp],
        ifaces: &dyn InterfaceResolver,
    ) -> Result<ApplyReport, MapWriteError> {
        let mut skipped = Vec::new();
        let kops = kernel_ops(ops, ifaces, &mut skipped);
        self.apply_kernel(&kops)?;
        Ok(ApplyReport {
            applied: kops.len(),
            skipped,
            counts: self.counts(),
        })
    }

    /// Applies kernel operations all or nothing, then forgets the tracked
    /// connections of endpoint ids that no interface carries any more.
    /// Endpoint entries get their mark slot here (the slot of an
    /// `EndpointUpsert` is the writer's, whatever the caller put in it),
    /// with the slot operations it takes.
    ///
    /// # Errors
    /// As [`Self::apply`].
    pub fn apply_kernel(&mut self, ops: &[KernelOp]) -> Result<(), MapWriteError> {
        let before: BTreeSet<u32> = self.mirror.endpoints.values().map(|e| e.id).collect();
        let ops = SlotPlan::plan(&self.mirror, self.mark_slots, ops);
        self.apply_all(&ops)?;
        let after: BTreeSet<u32> = self.mirror.endpoints.values().map(|e| e.id).collect();
        for gone in before.difference(&after) {
            match self.backend.purge_connections(*gone) {
                Ok(n) => tracing::debug!(endpoint = gone, removed = n, "connections forgotten"),
                // Connections of a gone id can match nothing new (ids are not
                // reused), so a failed purge costs memory, not correctness.
                Err(e) => tracing::warn!(endpoint = gone, error = %e, "purging connections"),
            }
        }
        Ok(())
    }

    fn apply_all(&mut self, ops: &[KernelOp]) -> Result<(), MapWriteError> {
        let mut undo: Vec<KernelOp> = Vec::new();
        for op in ops {
            let inverse = self.mirror.inverse(op);
            if let Err(source) = self.backend.exec(op) {
                let map = op.map();
                for u in undo.iter().rev() {
                    if let Err(rollback) = self.backend.exec(u) {
                        return Err(MapWriteError::RollbackFailed {
                            map,
                            first: source,
                            rollback,
                        });
                    }
                    self.mirror.record(u);
                }
                let full = matches!(
                    source.errno.raw_os_error(),
                    Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
                );
                return Err(if full {
                    self.full_errors += 1;
                    MapWriteError::Full {
                        map,
                        entries: self.mirror.entries(map),
                        source,
                    }
                } else {
                    MapWriteError::Update {
                        map,
                        op: *op,
                        source,
                    }
                });
            }
            self.mirror.record(op);
            undo.push(inverse);
        }
        Ok(())
    }
}

/// In-memory maps with a capacity each, for tests without a kernel.
#[derive(Clone, Debug, Default)]
pub struct FakeBackend {
    /// The maps' contents.
    pub state: Mirror,
    /// Capacity per map name; absent: unlimited.
    pub capacity: BTreeMap<&'static str, usize>,
    /// Operations executed, in order (rollbacks included).
    pub log: Vec<KernelOp>,
    /// Endpoint ids whose connections were purged.
    pub purged: Vec<u32>,
}

impl Backend for FakeBackend {
    fn exec(&mut self, op: &KernelOp) -> Result<(), BackendError> {
        let map = op.map();
        let is_upsert = matches!(
            op,
            KernelOp::EndpointUpsert(..)
                | KernelOp::PolicyV4Upsert(..)
                | KernelOp::PolicyV6Upsert(..)
                | KernelOp::PortUpsert(..)
                | KernelOp::FrontendV4Upsert(..)
                | KernelOp::FrontendV6Upsert(..)
        ) || matches!(op, KernelOp::SlotSet(_, i) if *i != 0);
        // The inverse of an upsert is a delete exactly when the key is new.
        let grows = is_upsert
            && matches!(
                self.state.inverse(op),
                KernelOp::EndpointDelete(..)
                    | KernelOp::PolicyV4Delete(..)
                    | KernelOp::PolicyV6Delete(..)
                    | KernelOp::PortDelete(..)
                    | KernelOp::FrontendV4Delete(..)
                    | KernelOp::FrontendV6Delete(..)
                    | KernelOp::SlotClear(..)
            );
        if grows
            && let Some(&cap) = self.capacity.get(map)
            && self.state.entries(map) >= cap
        {
            return Err(BackendError {
                errno: std::io::Error::from_raw_os_error(libc::E2BIG),
            });
        }
        self.log.push(*op);
        self.state.record(op);
        Ok(())
    }

    fn purge_connections(&mut self, endpoint: u32) -> Result<usize, BackendError> {
        self.purged.push(endpoint);
        Ok(0)
    }
}

/// The kernel's maps.
pub struct KernelBackend {
    endpoints: BpfHashMap<MapData, u32, EndpointInfo>,
    endpoint_epoch: Array<MapData, u64>,
    policy_v4: LpmTrie<MapData, PolicyKeyV4, PolicyValue>,
    policy_v6: LpmTrie<MapData, PolicyKeyV6, PolicyValue>,
    ports: LpmTrie<MapData, PortKey, PortValue>,
    services: ServiceMaps,
    conntrack: Option<BpfHashMap<MapData, CtKey, CtValue>>,
}

/// The maps of Service traffic: frontends and mark sources.
pub struct ServiceMaps {
    /// `NETPOL_FRONTENDS_V4`.
    pub frontends_v4: BpfHashMap<MapData, FrontendKeyV4, FrontendValue>,
    /// `NETPOL_FRONTENDS_V6`.
    pub frontends_v6: BpfHashMap<MapData, FrontendKeyV6, FrontendValue>,
    /// `NETPOL_MARK_SOURCES`.
    pub mark_sources: Array<MapData, u32>,
}

impl fmt::Debug for KernelBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelBackend").finish_non_exhaustive()
    }
}

impl KernelBackend {
    /// Wraps the four policy maps and the Service maps. Every endpoint
    /// write moves `endpoint_epoch` (`NETPOL_EP_EPOCH`), which retires the
    /// programs' cached copies of the endpoint table.
    pub fn new(
        endpoints: BpfHashMap<MapData, u32, EndpointInfo>,
        endpoint_epoch: Array<MapData, u64>,
        policy_v4: LpmTrie<MapData, PolicyKeyV4, PolicyValue>,
        policy_v6: LpmTrie<MapData, PolicyKeyV6, PolicyValue>,
        ports: LpmTrie<MapData, PortKey, PortValue>,
        services: ServiceMaps,
    ) -> Self {
        Self {
            endpoints,
            endpoint_epoch,
            policy_v4,
            policy_v6,
            ports,
            services,
            conntrack: None,
        }
    }

    /// Retires the programs' cached endpoint entries: the next packet on
    /// each interface reads the table. One bit flips (see
    /// `netpol_common::endpoint_epoch`), so a packet reading the word
    /// mid-update sees the old or the new epoch.
    fn advance_endpoint_epoch(&mut self) -> Result<(), BackendError> {
        let now = self.endpoint_epoch.get(&0, 0).map_err(errno)?;
        self.endpoint_epoch
            .set(0, netpol_common::endpoint_epoch::next(now), 0)
            .map_err(errno)
    }

    /// Adds the connection map, so that gone endpoints' connections are
    /// purged.
    #[must_use]
    pub fn with_conntrack(mut self, conntrack: BpfHashMap<MapData, CtKey, CtValue>) -> Self {
        self.conntrack = Some(conntrack);
        self
    }

    /// Reads what the maps hold (adoption after a restart, inspection).
    ///
    /// # Errors
    /// When a map cannot be iterated.
    pub fn read_back(&self) -> Result<Mirror, BackendError> {
        let mut m = Mirror::default();
        for kv in self.endpoints.iter() {
            let (k, v) = kv.map_err(errno)?;
            m.endpoints.insert(k, v);
        }
        for kv in self.policy_v4.iter() {
            let (k, v) = kv.map_err(errno)?;
            m.policy_v4.insert((k.prefix_len(), k.data()), v);
        }
        for kv in self.policy_v6.iter() {
            let (k, v) = kv.map_err(errno)?;
            m.policy_v6.insert((k.prefix_len(), k.data()), v);
        }
        for kv in self.ports.iter() {
            let (k, v) = kv.map_err(errno)?;
            m.ports.insert((k.prefix_len(), k.data()), v);
        }
        for kv in self.services.frontends_v4.iter() {
            let (k, v) = kv.map_err(errno)?;
            m.frontends_v4.insert(k, v);
        }
        for kv in self.services.frontends_v6.iter() {
            let (k, v) = kv.map_err(errno)?;
            m.frontends_v6.insert(k, v);
        }
        // Slot 0 is never handed out; past MAX_SLOTS is not netpol's.
        let last = self
            .services
            .mark_sources
            .len()
            .min(netpol_common::mark::MAX_SLOTS + 1);
        for slot in 1..last {
            let ifindex = self.services.mark_sources.get(&slot, 0).map_err(errno)?;
            if ifindex != 0 {
                m.slots.insert(slot, ifindex);
            }
        }
        Ok(m)
    }
}

fn errno(e: aya::maps::MapError) -> BackendError {
    let io = match e {
        aya::maps::MapError::SyscallError(s) => s.io_error,
        other => std::io::Error::other(other.to_string()),
    };
    BackendError { errno: io }
}

/// Deleting an absent key is not an error: the goal state holds.
fn tolerate_absent(r: Result<(), aya::maps::MapError>) -> Result<(), BackendError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(s))
            if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other.map_err(errno),
    }
}

impl Backend for KernelBackend {
    fn exec(&mut self, op: &KernelOp) -> Result<(), BackendError> {
        match *op {
            // A failed write changed nothing; a failed advance fails the
            // write, which the writer then rolls back.
            KernelOp::EndpointUpsert(i, v) => {
                self.endpoints.insert(i, v, 0).map_err(errno)?;
                self.advance_endpoint_epoch()
            }
            KernelOp::EndpointDelete(i) => {
                tolerate_absent(self.endpoints.remove(&i))?;
                self.advance_endpoint_epoch()
            }
            KernelOp::PolicyV4Upsert(l, k, v) => {
                self.policy_v4.insert(&Key::new(l, k), v, 0).map_err(errno)
            }
            KernelOp::PolicyV4Delete(l, k) => {
                tolerate_absent(self.policy_v4.remove(&Key::new(l, k)))
            }
            KernelOp::PolicyV6Upsert(l, k, v) => {
                self.policy_v6.insert(&Key::new(l, k), v, 0).map_err(errno)
            }
            KernelOp::PolicyV6Delete(l, k) => {
                tolerate_absent(self.policy_v6.remove(&Key::new(l, k)))
            }
            KernelOp::PortUpsert(l, k, v) => {
                self.ports.insert(&Key::new(l, k), v, 0).map_err(errno)
            }
            KernelOp::PortDelete(l, k) => tolerate_absent(self.ports.remove(&Key::new(l, k))),
            KernelOp::FrontendV4Upsert(k, v) => {
                self.services.frontends_v4.insert(k, v, 0).map_err(errno)
            }
            KernelOp::FrontendV4Delete(k) => tolerate_absent(self.services.frontends_v4.remove(&k)),
            KernelOp::FrontendV6Upsert(k, v) => {
                self.services.frontends_v6.insert(k, v, 0).map_err(errno)
            }
            KernelOp::FrontendV6Delete(k) => tolerate_absent(self.services.frontends_v6.remove(&k)),
            KernelOp::SlotSet(s, i) => self.services.mark_sources.set(s, i, 0).map_err(errno),
            KernelOp::SlotClear(s) => self.services.mark_sources.set(s, 0, 0).map_err(errno),
        }
    }

    fn purge_connections(&mut self, endpoint: u32) -> Result<usize, BackendError> {
        let Some(ct) = self.conntrack.as_mut() else {
            return Ok(0);
        };
        // Collect first: deleting while iterating restarts the kernel's
        // key walk.
        let keys: Vec<CtKey> = ct
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.endpoint == endpoint)
            .collect();
        for k in &keys {
            tolerate_absent(ct.remove(k))?;
        }
        Ok(keys.len())
    }
}

/// The production writer.
pub type KernelMapWriter = MapWriter<KernelBackend>;
/// The in-memory writer for unit tests.
pub type FakeMapWriter = MapWriter<FakeBackend>;

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> ObjectRef {
        ObjectRef {
            namespace: "x".into(),
            name: name.into(),
        }
    }

    fn port(ruleset: u32, p: u16) -> RawOp {
        RawOp::PortUpsert(
            64,
            PortKey {
                ruleset,
                protocol: 6,
                _pad: 0,
                port: p.to_be_bytes(),
            },
            PortValue { allow: 1 },
        )
    }

    #[test]
    fn full_map_refuses_the_whole_apply_and_keeps_the_previous_state() {
        let mut fake = FakeBackend::default();
        fake.capacity.insert(maps::PORTS, 2);
        let mut w = MapWriter::new(fake, Mirror::default());
        let ifaces = BTreeMap::new();
        w.apply(&[port(2, 80)], &ifaces).expect("fits");
        let before = w.mirror().clone();

        let err = w
            .apply(&[port(3, 81), port(3, 82), port(3, 83)], &ifaces)
            .expect_err("third entry does not fit");
        assert!(
            matches!(
                err,
                MapWriteError::Full {
                    map: maps::PORTS,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(maps::PORTS), "{err}");
        assert_eq!(w.mirror(), &before);
        assert_eq!(w.backend().state, before);
        assert_eq!(w.full_errors(), 1);
    }

    #[test]
    fn connections_of_a_deleted_endpoint_are_purged() {
        let mut w = MapWriter::new(FakeBackend::default(), Mirror::default());
        let ifaces: BTreeMap<ObjectRef, u32> = [(pod("a"), 7), (pod("b"), 8)].into_iter().collect();
        let info = |id| EndpointInfo {
            id,
            ..EndpointInfo::default()
        };
        w.apply(
            &[
                RawOp::EndpointUpsert(pod("a"), info(3)),
                RawOp::EndpointUpsert(pod("b"), info(4)),
            ],
            &ifaces,
        )
        .expect("apply");
        // b's interface now carries a new pod (new id); a is deleted.
        w.apply(
            &[
                RawOp::EndpointUpsert(pod("b"), info(5)),
                RawOp::EndpointDelete(pod("a"), info(3)),
            ],
            &ifaces,
        )
        .expect("apply");
        assert_eq!(w.backend().purged, vec![3, 4]);
    }

    #[test]
    fn endpoint_updates_are_keyed_by_interface_and_skipped_without_one() {
        let mut w = MapWriter::new(FakeBackend::default(), Mirror::default());
        let ifaces: BTreeMap<ObjectRef, u32> = [(pod("a"), 7)].into_iter().collect();
        let info = EndpointInfo {
            id: 3,
            flags: 1,
            ..EndpointInfo::default()
        };
        let r = w
            .apply(
                &[
                    RawOp::EndpointUpsert(pod("a"), info),
                    RawOp::EndpointUpsert(pod("b"), info),
                ],
                &ifaces,
            )
            .expect("apply");
        assert_eq!(r.skipped, vec![pod("b")]);
        assert_eq!(w.backend().state.endpoints.get(&7), Some(&info));
        assert_eq!(r.counts.endpoints, 1);
    }

    fn programmed(id: u32) -> EndpointInfo {
        EndpointInfo {
            id,
            flags: netpol_common::endpoint_flags::HAS_IPV4,
            ..EndpointInfo::default()
        }
    }

    fn unprogrammed(id: u32) -> EndpointInfo {
        EndpointInfo {
            id,
            flags: netpol_common::endpoint_flags::NOT_PROGRAMMED,
            ..EndpointInfo::default()
        }
    }

    fn slotted(slots: u32) -> FakeMapWriter {
        let mut w = MapWriter::new(FakeBackend::default(), Mirror::default());
        w.set_mark_slots(slots);
        w
    }

    fn slot_of(w: &FakeMapWriter, ifindex: u32) -> u32 {
        let slot = w.mirror().endpoints[&ifindex].slot;
        if slot != 0 {
            assert_eq!(w.mirror().slots.get(&slot), Some(&ifindex));
        }
        assert_eq!(w.backend().state, *w.mirror());
        slot
    }

    fn frontend(last: u8) -> KernelOp {
        KernelOp::FrontendV4Upsert(
            FrontendKeyV4 {
                addr: [10, 43, 0, last],
                port: 80u16.to_be_bytes(),
                protocol: 6,
                _pad: 0,
            },
            FrontendValue {
                kind: netpol_common::frontend_kind::CLUSTER_IP,
            },
        )
    }

    #[test]
    fn slots_are_the_lowest_free_set_before_their_entry_and_stable_across_updates() {
        let mut w = slotted(4);
        w.apply_kernel(&[
            KernelOp::EndpointUpsert(7, programmed(3)),
            KernelOp::EndpointUpsert(8, programmed(4)),
        ])
        .expect("apply");
        assert_eq!((slot_of(&w, 7), slot_of(&w, 8)), (1, 2));
        let mut with_slot = programmed(3);
        with_slot.slot = 1;
        assert_eq!(
            w.backend().log[..2],
            [
                KernelOp::SlotSet(1, 7),
                KernelOp::EndpointUpsert(7, with_slot)
            ]
        );
        // A new policy generation, a caller's slot: the slot stays.
        let logged = w.backend().log.len();
        let mut next = programmed(3);
        next.egress_gen = 9;
        next.slot = 4;
        w.apply_kernel(&[KernelOp::EndpointUpsert(7, next)])
            .expect("apply");
        assert_eq!(slot_of(&w, 7), 1);
        assert_eq!(w.backend().log.len(), logged + 1, "{:?}", w.backend().log);
        assert_eq!(w.counts().mark_sources, 2);
    }

    #[test]
    fn released_slots_are_cleared_after_their_entry_and_reused() {
        let mut w = slotted(4);
        w.apply_kernel(&[
            KernelOp::EndpointUpsert(7, programmed(3)),
            KernelOp::EndpointUpsert(8, programmed(4)),
        ])
        .expect("apply");
        w.apply_kernel(&[KernelOp::EndpointDelete(7)])
            .expect("apply");
        assert_eq!(
            w.backend().log[w.backend().log.len() - 2..],
            [KernelOp::EndpointDelete(7), KernelOp::SlotClear(1)]
        );
        w.apply_kernel(&[KernelOp::EndpointUpsert(8, unprogrammed(8))])
            .expect("apply");
        assert_eq!(slot_of(&w, 8), 0);
        assert_eq!(
            w.backend().log[w.backend().log.len() - 2..],
            [
                KernelOp::EndpointUpsert(8, unprogrammed(8)),
                KernelOp::SlotClear(2)
            ]
        );
        assert!(w.mirror().slots.is_empty());
        w.apply_kernel(&[
            KernelOp::EndpointUpsert(9, programmed(5)),
            KernelOp::EndpointUpsert(8, programmed(4)),
        ])
        .expect("apply");
        assert_eq!((slot_of(&w, 9), slot_of(&w, 8)), (1, 2));
    }

    #[test]
    fn exhausted_slots_give_slot_zero_without_error_until_one_frees() {
        let mut w = slotted(1);
        w.apply_kernel(&[
            KernelOp::EndpointUpsert(7, programmed(3)),
            KernelOp::EndpointUpsert(8, programmed(4)),
        ])
        .expect("no free slot is no error");
        assert_eq!((slot_of(&w, 7), slot_of(&w, 8)), (1, 0));
        // Once 7 is gone, the next apply gives 8 the freed slot.
        w.apply_kernel(&[KernelOp::EndpointDelete(7)])
            .expect("apply");
        w.apply_kernel(&[]).expect("apply");
        assert_eq!(slot_of(&w, 8), 1);
    }

    #[test]
    fn marking_off_hands_out_no_slot_and_clears_those_in_use() {
        let mut w = slotted(0);
        w.apply_kernel(&[KernelOp::EndpointUpsert(7, programmed(3))])
            .expect("apply");
        assert_eq!(slot_of(&w, 7), 0);
        assert!(
            w.backend()
                .log
                .iter()
                .all(|op| !matches!(op, KernelOp::SlotSet(..)))
        );
        w.set_mark_slots(2);
        w.apply_kernel(&[]).expect("apply");
        assert_eq!(slot_of(&w, 7), 1);
        w.set_mark_slots(0);
        w.apply_kernel(&[]).expect("apply");
        assert_eq!(slot_of(&w, 7), 0);
        assert!(w.mirror().slots.is_empty());
    }

    #[test]
    fn slots_read_back_from_pinned_maps_are_kept_and_stale_ones_cleared() {
        let mut adopted = Mirror::default();
        let mut info = programmed(3);
        info.slot = 2;
        adopted.endpoints.insert(7, info);
        adopted.slots.insert(2, 7);
        // A slot whose interface has no entry (a crash between writes).
        adopted.slots.insert(5, 9);
        let fake = FakeBackend {
            state: adopted.clone(),
            ..FakeBackend::default()
        };
        let mut w = MapWriter::new(fake, adopted);
        w.set_mark_slots(8);
        w.apply_kernel(&[KernelOp::EndpointUpsert(8, programmed(4))])
            .expect("apply");
        assert_eq!((slot_of(&w, 7), slot_of(&w, 8)), (2, 1));
        assert_eq!(
            w.mirror().slots,
            BTreeMap::from([(1, 8), (2, 7)]),
            "slot 5 cleared"
        );
    }

    #[test]
    fn rollback_after_a_full_map_restores_slots_and_frontends() {
        let mut w = slotted(4);
        w.apply_kernel(&[frontend(1), KernelOp::EndpointUpsert(7, programmed(3))])
            .expect("apply");
        let before = w.mirror().clone();
        let mut fake = w.backend().clone();
        fake.capacity.insert(maps::PORTS, 0);
        let mut w = MapWriter::new(fake, before.clone());
        w.set_mark_slots(4);
        let err = w
            .apply(
                &[
                    RawOp::FrontendV4Upsert(
                        FrontendKeyV4 {
                            addr: [10, 43, 0, 2],
                            ..FrontendKeyV4::default()
                        },
                        FrontendValue { kind: 1 },
                    ),
                    RawOp::EndpointUpsert(pod("b"), programmed(4)),
                    RawOp::EndpointDelete(pod("a"), programmed(3)),
                    port(2, 80),
                ],
                &BTreeMap::from([(pod("a"), 7), (pod("b"), 8)]),
            )
            .expect_err("ports full");
        assert!(
            matches!(
                err,
                MapWriteError::Full {
                    map: maps::PORTS,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(w.mirror(), &before);
        assert_eq!(w.backend().state, before);
        assert_eq!(w.mirror().slots, BTreeMap::from([(1, 7)]));
        assert_eq!(w.mirror().frontends_v4.len(), 1);
    }

    #[test]
    fn full_frontend_map_names_it() {
        let mut fake = FakeBackend::default();
        fake.capacity.insert(maps::FRONTENDS_V4, 1);
        let mut w = MapWriter::new(fake, Mirror::default());
        let err = w
            .apply_kernel(&[frontend(1), frontend(2)])
            .expect_err("second frontend does not fit");
        assert!(err.to_string().contains(maps::FRONTENDS_V4), "{err}");
        assert!(w.mirror().frontends_v4.is_empty());
    }

    #[test]
    fn rollback_restores_updated_values_not_just_inserts() {
        let mut w = MapWriter::new(FakeBackend::default(), Mirror::default());
        let ifaces: BTreeMap<ObjectRef, u32> = [(pod("a"), 7)].into_iter().collect();
        let old = EndpointInfo {
            id: 3,
            flags: 0,
            ..EndpointInfo::default()
        };
        w.apply(&[RawOp::EndpointUpsert(pod("a"), old)], &ifaces)
            .expect("apply");
        let mut fake = w.backend().clone();
        fake.capacity.insert(maps::PORTS, 0);
        let mut w = MapWriter::new(fake, w.mirror().clone());
        let new = EndpointInfo {
            id: 3,
            flags: 3,
            ..EndpointInfo::default()
        };
        w.apply(
            &[RawOp::EndpointUpsert(pod("a"), new), port(2, 80)],
            &ifaces,
        )
        .expect_err("ports full");
        assert_eq!(w.backend().state.endpoints.get(&7), Some(&old));
    }
}
