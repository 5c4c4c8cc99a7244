//! The map writer: applies the compiler's updates to the policy maps, in the
//! compiler's order, all or nothing.
//!
//! The transactional part (a mirror of what the maps hold, rollback, entry
//! counts) is shared; a [`Backend`] performs single map operations: the
//! kernel's maps ([`KernelBackend`]) or memory ([`FakeBackend`], for unit
//! tests, with capacities to simulate full maps).
use std::{collections::BTreeMap, fmt};

use aya::maps::{HashMap as BpfHashMap, MapData, lpm_trie::Key, lpm_trie::LpmTrie};
use netpol_common::{
    CtKey, CtValue, EndpointInfo, PolicyKeyV4, PolicyKeyV6, PolicyValue, PortKey, PortValue, maps,
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
}

impl fmt::Display for MapCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "endpoints={} policy_v4={} policy_v6={} ports={}",
            self.endpoints, self.policy_v4, self.policy_v6, self.ports
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
}

impl Mirror {
    fn counts(&self) -> MapCounts {
        MapCounts {
            endpoints: self.endpoints.len(),
            policy_v4: self.policy_v4.len(),
            policy_v6: self.policy_v6.len(),
            ports: self.ports.len(),
        }
    }

    fn entries(&self, map: &str) -> usize {
        let c = self.counts();
        match map {
            maps::ENDPOINTS => c.endpoints,
            maps::POLICY_V4 => c.policy_v4,
            maps::POLICY_V6 => c.policy_v6,
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
        }
    }

    fn record(&mut self, op: &KernelOp) {
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
        }
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
}

impl<B: Backend> MapWriter<B> {
    /// A writer over `backend`, whose maps hold `mirror` (empty for new
    /// maps; read back from pinned maps on adoption).
    pub fn new(backend: B, mirror: Mirror) -> Self {
        Self {
            backend,
            mirror,
            full_errors: 0,
        }
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
    ///
    /// # Errors
    /// As [`Self::apply`].
    pub fn apply_kernel(&mut self, ops: &[KernelOp]) -> Result<(), MapWriteError> {
        let before: std::collections::BTreeSet<u32> =
            self.mirror.endpoints.values().map(|e| e.id).collect();
        self.apply_all(ops)?;
        let after: std::collections::BTreeSet<u32> =
            self.mirror.endpoints.values().map(|e| e.id).collect();
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
        );
        // The inverse of an upsert is a delete exactly when the key is new.
        let grows = is_upsert
            && matches!(
                self.state.inverse(op),
                KernelOp::EndpointDelete(..)
                    | KernelOp::PolicyV4Delete(..)
                    | KernelOp::PolicyV6Delete(..)
                    | KernelOp::PortDelete(..)
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
    policy_v4: LpmTrie<MapData, PolicyKeyV4, PolicyValue>,
    policy_v6: LpmTrie<MapData, PolicyKeyV6, PolicyValue>,
    ports: LpmTrie<MapData, PortKey, PortValue>,
    conntrack: Option<BpfHashMap<MapData, CtKey, CtValue>>,
}

impl fmt::Debug for KernelBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelBackend").finish_non_exhaustive()
    }
}

impl KernelBackend {
    /// Wraps the four policy maps.
    pub fn new(
        endpoints: BpfHashMap<MapData, u32, EndpointInfo>,
        policy_v4: LpmTrie<MapData, PolicyKeyV4, PolicyValue>,
        policy_v6: LpmTrie<MapData, PolicyKeyV6, PolicyValue>,
        ports: LpmTrie<MapData, PortKey, PortValue>,
    ) -> Self {
        Self {
            endpoints,
            policy_v4,
            policy_v6,
            ports,
            conntrack: None,
        }
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
            KernelOp::EndpointUpsert(i, v) => self.endpoints.insert(i, v, 0).map_err(errno),
            KernelOp::EndpointDelete(i) => tolerate_absent(self.endpoints.remove(&i)),
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
