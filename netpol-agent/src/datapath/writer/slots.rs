//! Mark-slot planning: the slot operations one batch takes (see the
//! writer's documentation, "Mark slots").

use std::collections::{BTreeMap, BTreeSet};

use netpol_common::EndpointInfo;

use super::{KernelOp, Mirror};

/// Hands out mark slots over one batch of operations (see the module
/// documentation), starting from what the maps hold.
pub(super) struct SlotPlan<'m> {
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
    pub(super) fn plan(mirror: &'m Mirror, capacity: u32, ops: &[KernelOp]) -> Vec<KernelOp> {
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
