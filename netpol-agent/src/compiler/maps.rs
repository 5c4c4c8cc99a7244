//! The maps' exact contents ([`MapContents`]) and single writes to them
//! ([`MapOp`]), with `netpol-common`'s keys and values: the one vocabulary
//! the compiler's output, the map writer and its backends share.
//!
//! # Levels
//! Updates exist at two levels, and only two. [`Op`](super::Op) is the
//! model's: a policy target, a rule-set id, a port prefix, and an insert
//! told apart from an update (the safe order of [`diff`](super::diff) is
//! stated in those). [`MapOp`] is its exact form: one write to one map.
//!
//! The exact level is generic over the key of the endpoint map, `E`, the
//! one thing the compiler cannot know: the compiler keys endpoint entries
//! by pod ([`MapState`], [`RawOp`]); the map writer and the kernel by the
//! pod's host-side interface index (`datapath::writer::{Mirror, KernelOp}`,
//! translated by `datapath::writer::kernel_ops`). `NETPOL_MARK_SOURCES`
//! is one of the maps, so the mark slots are part of the contents too; only
//! the writer hands them out, so a compiled state has none.

use std::{collections::BTreeMap, fmt};

use netpol_common::{
    EndpointInfo, FrontendKeyV4, FrontendKeyV6, FrontendValue, PolicyKeyV4, PolicyKeyV6,
    PolicyValue, PortKey, PortValue, maps,
};

use serde::Serialize;

use super::Diff;
use crate::model::ObjectRef;

/// One write to one map, with the exact `netpol-common` keys and values;
/// `u32`s before keys are LPM prefix lengths, `E` keys the endpoint map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp<E> {
    /// Insert or update an endpoint entry.
    EndpointUpsert(E, EndpointInfo),
    /// Delete an endpoint entry.
    EndpointDelete(E),
    /// Insert or update in the IPv4 policy trie.
    PolicyV4Upsert(u32, PolicyKeyV4, PolicyValue),
    /// Delete from the IPv4 policy trie.
    PolicyV4Delete(u32, PolicyKeyV4),
    /// Insert or update in the IPv6 policy trie.
    PolicyV6Upsert(u32, PolicyKeyV6, PolicyValue),
    /// Delete from the IPv6 policy trie.
    PolicyV6Delete(u32, PolicyKeyV6),
    /// Insert or update in the port trie.
    PortUpsert(u32, PortKey, PortValue),
    /// Delete from the port trie.
    PortDelete(u32, PortKey),
    /// Insert or update an IPv4 Service frontend.
    FrontendV4Upsert(FrontendKeyV4, FrontendValue),
    /// Delete an IPv4 Service frontend.
    FrontendV4Delete(FrontendKeyV4),
    /// Insert or update an IPv6 Service frontend.
    FrontendV6Upsert(FrontendKeyV6, FrontendValue),
    /// Delete an IPv6 Service frontend.
    FrontendV6Delete(FrontendKeyV6),
    /// `MARK_SOURCES[slot] = ifindex`.
    SlotSet(u32, u32),
    /// `MARK_SOURCES[slot] = 0`.
    SlotClear(u32),
}

/// A compiler's update: endpoint entries keyed by pod.
pub type RawOp = MapOp<ObjectRef>;

impl<E> MapOp<E> {
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

    /// The endpoint key, if this writes the endpoint map.
    pub const fn endpoint(&self) -> Option<&E> {
        match self {
            Self::EndpointUpsert(e, _) | Self::EndpointDelete(e) => Some(e),
            _ => None,
        }
    }

    /// The same write with the endpoint key `key` gives; `None` when it
    /// gives none. Writes to other maps are kept as they are.
    pub fn rekeyed<K>(&self, key: impl FnOnce(&E) -> Option<K>) -> Option<MapOp<K>> {
        Some(match *self {
            Self::EndpointUpsert(ref e, v) => MapOp::EndpointUpsert(key(e)?, v),
            Self::EndpointDelete(ref e) => MapOp::EndpointDelete(key(e)?),
            Self::PolicyV4Upsert(l, k, v) => MapOp::PolicyV4Upsert(l, k, v),
            Self::PolicyV4Delete(l, k) => MapOp::PolicyV4Delete(l, k),
            Self::PolicyV6Upsert(l, k, v) => MapOp::PolicyV6Upsert(l, k, v),
            Self::PolicyV6Delete(l, k) => MapOp::PolicyV6Delete(l, k),
            Self::PortUpsert(l, k, v) => MapOp::PortUpsert(l, k, v),
            Self::PortDelete(l, k) => MapOp::PortDelete(l, k),
            Self::FrontendV4Upsert(k, v) => MapOp::FrontendV4Upsert(k, v),
            Self::FrontendV4Delete(k) => MapOp::FrontendV4Delete(k),
            Self::FrontendV6Upsert(k, v) => MapOp::FrontendV6Upsert(k, v),
            Self::FrontendV6Delete(k) => MapOp::FrontendV6Delete(k),
            Self::SlotSet(s, i) => MapOp::SlotSet(s, i),
            Self::SlotClear(s) => MapOp::SlotClear(s),
        })
    }
}

/// The exact contents of every map (a userspace copy: a compile's output
/// for full resyncs, tests and the simulator; the writer's mirror).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapContents<E> {
    /// Endpoint values by `E`.
    pub endpoints: BTreeMap<E, EndpointInfo>,
    /// IPv4 policy trie: `(prefix_len, key) → value`.
    pub policy_v4: BTreeMap<(u32, PolicyKeyV4), PolicyValue>,
    /// IPv6 policy trie.
    pub policy_v6: BTreeMap<(u32, PolicyKeyV6), PolicyValue>,
    /// Port trie.
    pub ports: BTreeMap<(u32, PortKey), PortValue>,
    /// IPv4 Service frontends.
    pub frontends_v4: BTreeMap<FrontendKeyV4, FrontendValue>,
    /// IPv6 Service frontends.
    pub frontends_v6: BTreeMap<FrontendKeyV6, FrontendValue>,
    /// Mark slot → host ifindex of its interface (slots in use only).
    pub slots: BTreeMap<u32, u32>,
}

/// A compile's maps: endpoint entries keyed by pod.
pub type MapState = MapContents<ObjectRef>;

// Not derived: the derive would ask `E: Default` of the endpoint key.
impl<E> Default for MapContents<E> {
    fn default() -> Self {
        Self {
            endpoints: BTreeMap::new(),
            policy_v4: BTreeMap::new(),
            policy_v6: BTreeMap::new(),
            ports: BTreeMap::new(),
            frontends_v4: BTreeMap::new(),
            frontends_v6: BTreeMap::new(),
            slots: BTreeMap::new(),
        }
    }
}

impl<E: Ord + Clone> MapContents<E> {
    /// Entries per map.
    #[must_use]
    pub fn counts(&self) -> MapCounts {
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

    /// Entries of the map named `map`.
    pub(crate) fn entries(&self, map: &str) -> usize {
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
    pub(crate) fn inverse(&self, op: &MapOp<E>) -> MapOp<E> {
        use MapOp as K;
        match *op {
            K::EndpointUpsert(ref i, _) | K::EndpointDelete(ref i) => match self.endpoints.get(i) {
                Some(v) => K::EndpointUpsert(i.clone(), *v),
                None => K::EndpointDelete(i.clone()),
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
    pub fn apply_op(&mut self, op: &MapOp<E>) {
        use MapOp as K;
        match *op {
            K::EndpointUpsert(ref i, v) => {
                self.endpoints.insert(i.clone(), v);
            }
            K::EndpointDelete(ref i) => {
                self.endpoints.remove(i);
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

impl MapState {
    /// Applies every update of a diff, in order.
    pub fn apply(&mut self, diff: &Diff) {
        for op in diff.raw() {
            self.apply_op(&op);
        }
    }
}

/// Entries per map: of a [`MapContents`], of a compile ([`Sizes`](super::Sizes)),
/// of the maps as the writer holds them (and `/status` shows them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MapCounts {
    /// `NETPOL_ENDPOINTS`.
    pub endpoints: usize,
    /// `NETPOL_POLICY_V4`.
    pub policy_v4: usize,
    /// `NETPOL_POLICY_V6`.
    pub policy_v6: usize,
    /// `NETPOL_PORTS`.
    pub ports: usize,
    /// `NETPOL_FRONTENDS_V4`.
    pub frontends_v4: usize,
    /// `NETPOL_FRONTENDS_V6`.
    pub frontends_v6: usize,
    /// `NETPOL_MARK_SOURCES`: mark slots in use.
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
