//! The map writer: applies the compiler's updates to the policy maps, in the
//! compiler's order, all or nothing.
//!
//! The transactional part (a mirror of what the maps hold, rollback, entry
//! counts) is shared; a [`Backend`] performs single map operations: the
//! kernel's maps ([`KernelBackend`]) or memory ([`FakeBackend`], for unit
//! tests, with capacities to simulate full maps).
//!
//! The writer speaks the compiler's exact vocabulary
//! ([`MapOp`](crate::compiler::MapOp), [`MapContents`]), keyed by host
//! interface index rather than by pod: [`KernelOp`], [`Mirror`].
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
mod fake;
mod kernel;
mod slots;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

pub use fake::FakeBackend;
pub use kernel::{KernelBackend, ServiceMaps};
use slots::SlotPlan;

pub use crate::compiler::MapCounts;
use crate::{
    compiler::{MapContents, MapOp, RawOp},
    model::ObjectRef,
};

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

/// One operation on one map, with the kernel's keys: endpoint entries
/// keyed by host interface index.
pub type KernelOp = MapOp<u32>;

/// What the writer believes the maps hold, endpoint entries keyed by host
/// interface index.
pub type Mirror = MapContents<u32>;

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

    /// Forgets every tracked connection, of any endpoint, whose peer is one
    /// of `peers`: a pod gone from the node leaves its address free for
    /// the next pod, which must not find its connections open. Returns how
    /// many were removed.
    ///
    /// # Errors
    /// When the connection map cannot be read or written.
    fn purge_peers(&mut self, peers: &[std::net::IpAddr]) -> Result<usize, BackendError>;
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

/// Translates the compiler's updates to kernel operations; endpoint updates
/// of pods without an interface are left out (and reported).
pub fn kernel_ops(
    ops: &[RawOp],
    ifaces: &dyn InterfaceResolver,
    skipped: &mut Vec<ObjectRef>,
) -> Vec<KernelOp> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        match op.rekeyed(|pod| ifaces.ifindex(pod)) {
            Some(k) => out.push(k),
            None => skipped.extend(op.endpoint().cloned()),
        }
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

    /// Forgets the connections whose peer is one of `peers` (see
    /// [`Backend::purge_peers`]); returns how many.
    ///
    /// # Errors
    /// The backend's.
    pub fn purge_peers(&mut self, peers: &[std::net::IpAddr]) -> Result<usize, BackendError> {
        if peers.is_empty() {
            return Ok(0);
        }
        self.backend.purge_peers(peers)
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
                    self.mirror.apply_op(u);
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
            self.mirror.apply_op(op);
            undo.push(inverse);
        }
        Ok(())
    }
}

/// The production writer.
pub type KernelMapWriter = MapWriter<KernelBackend>;
/// The in-memory writer for unit tests.
pub type FakeMapWriter = MapWriter<FakeBackend>;
