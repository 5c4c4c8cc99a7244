//! Id allocation: endpoint ids kept per pod and uid, rule-set ids per
//! content, new ones never an id the previous allocation used (see the
//! compiler's documentation, "Ids").

use std::collections::{BTreeMap, BTreeSet};

use super::local::{Core, PodOut};
use super::{EMPTY_RULESET, EndpointId, MAX_ENDPOINT_ID, RuleSet};
use crate::model::ObjectRef;

/// Next id from `next` that is not `taken`, within `first..=max`.
fn next_free(next: &mut u32, first: u32, max: u32, taken: impl Fn(u32) -> bool) -> u32 {
    let mut id = (*next).clamp(first, max);
    loop {
        if !taken(id) {
            *next = if id >= max { first } else { id + 1 };
            return id;
        }
        id = if id >= max { first } else { id + 1 };
    }
}

/// Endpoint ids of `pods` (in order): kept from `prev` for the same pod
/// and uid, otherwise the next id neither `prev`, `reserved` nor this call
/// used.
pub(super) fn endpoint_ids(
    pods: &[PodOut],
    prev: &BTreeMap<ObjectRef, EndpointId>,
    reserved: &BTreeSet<u32>,
    next: &mut u32,
) -> Vec<u32> {
    let mut ids = vec![0; pods.len()];
    let mut fresh = Vec::new();
    for (k, pod) in pods.iter().enumerate() {
        match prev.get(&pod.id) {
            Some(e) if e.uid == pod.uid => ids[k] = e.id,
            _ => fresh.push(k),
        }
    }
    if !fresh.is_empty() {
        let prev_ids: BTreeSet<u32> = prev.values().map(|e| e.id).collect();
        let mut assigned: BTreeSet<u32> = BTreeSet::new();
        for k in fresh {
            let id = next_free(next, 1, MAX_ENDPOINT_ID, |id| {
                prev_ids.contains(&id) || reserved.contains(&id) || assigned.contains(&id)
            });
            assigned.insert(id);
            ids[k] = id;
        }
    }
    ids
}

/// Rule-set ids of the interned sets `core` uses (indexed by interner
/// index; [`EMPTY_RULESET`] for the empty set): the id `prev` gives the
/// same content, else (in content order) the next id neither `prev` nor
/// `reserved` holds. Returns the ids and the new `(id, set)`s.
pub(super) fn ruleset_ids(
    core: &Core<'_>,
    prev: &BTreeMap<RuleSet, u32>,
    reserved: &BTreeSet<u32>,
    next: &mut u32,
) -> (Vec<u32>, Vec<(u32, RuleSet)>) {
    let mut ids = vec![0; core.sets.len()];
    let mut used = vec![false; core.sets.len()];
    for pod in &core.pods {
        for e in pod.entries.iter().filter(|e| e.4) {
            used[e.2 as usize] = true;
        }
    }
    ids[core.empty as usize] = EMPTY_RULESET;
    let mut new_sets = Vec::new();
    for (s, set) in core.sets.iter().enumerate() {
        if !used[s] || s == core.empty as usize {
            continue;
        }
        match prev.get(set) {
            Some(&id) => ids[s] = id,
            None => new_sets.push(s),
        }
    }
    new_sets.sort_unstable_by(|&a, &b| core.sets[a].cmp(&core.sets[b]));
    let mut added = Vec::with_capacity(new_sets.len());
    if !new_sets.is_empty() {
        let prev_ids: BTreeSet<u32> = prev.values().copied().collect();
        let mut taken: BTreeSet<u32> = BTreeSet::new();
        for s in new_sets {
            let id = next_free(next, EMPTY_RULESET + 1, u32::MAX, |id| {
                prev_ids.contains(&id) || reserved.contains(&id) || taken.contains(&id)
            });
            taken.insert(id);
            ids[s] = id;
            added.push((id, core.sets[s].clone()));
        }
    }
    (ids, added)
}
