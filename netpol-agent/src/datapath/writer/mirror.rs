//! The mirror: what the writer believes the maps hold, the inverse of an
//! operation against it (for rollback), and its entry counts.

use std::collections::BTreeMap;

use netpol_common::{
    EndpointInfo, FrontendKeyV4, FrontendKeyV6, FrontendValue, PolicyKeyV4, PolicyKeyV6,
    PolicyValue, PortKey, PortValue, maps,
};

use super::{KernelOp, MapCounts};

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
    pub(super) fn counts(&self) -> MapCounts {
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

    pub(super) fn entries(&self, map: &str) -> usize {
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
    pub(super) fn inverse(&self, op: &KernelOp) -> KernelOp {
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
