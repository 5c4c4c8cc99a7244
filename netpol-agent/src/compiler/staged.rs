//! The staged view ([`Staging`](crate::model::Staging)) beside the
//! enforced one: where it judges an endpoint direction differently, its
//! entries go into the same maps under
//! [`staged_endpoint`]`(id)`, and the endpoint's flags tell the programs to
//! judge new connections against them too (and only report what differs).
//!
//! The staged view is compiled whole, as a second full compile, from the
//! enforced compile's ids: the same pods get the same endpoint ids, the
//! same rule sets the same rule-set ids. A direction whose isolation and
//! generation (a content hash of what it allows) are the same in both
//! views gets no entry and no flag: its endpoints pay nothing.

use std::collections::BTreeSet;

use netpol_common::staged_endpoint;

use super::local::full;
use super::{Compiled, Direction, EMPTY_RULESET, IdAllocation, PolicyTarget};
use crate::model::Snapshot;

/// `enforced` (the enforced view's compile, from `prev`) with the staged
/// view `staged` overlaid.
pub(super) fn overlay(enforced: Compiled, staged: &Snapshot, prev: &IdAllocation) -> Compiled {
    let from = view_allocation(&enforced, prev);
    let view = full(staged, &from, false).0;
    overlay_view(enforced, &view)
}

/// The allocation the staged view is compiled from: the enforced
/// compile's (same pods, same ids) with every rule set `prev` named.
pub(super) fn view_allocation(enforced: &Compiled, prev: &IdAllocation) -> IdAllocation {
    // Rule sets keep the ids the previous compile gave them, its staged
    // ones included, so no id changes meaning from one compile to the
    // next; the enforced compile already avoided every id `prev` used.
    let mut rulesets = enforced.ids.rulesets.clone();
    for (set, &id) in &prev.rulesets {
        rulesets.entry(set.clone()).or_insert(id);
    }
    IdAllocation {
        endpoints: enforced.ids.endpoints.clone(),
        rulesets,
        next_endpoint: enforced.ids.next_endpoint,
        next_ruleset: enforced.ids.next_ruleset,
        reserved_endpoints: prev.reserved_endpoints.clone(),
        reserved_rulesets: prev.reserved_rulesets.clone(),
    }
}

/// `enforced` with the staged view's compile `view` (from
/// [`view_allocation`]) overlaid where it judges an endpoint direction
/// differently.
pub(super) fn overlay_view(mut enforced: Compiled, view: &Compiled) -> Compiled {
    let mut differs: BTreeSet<(u32, Direction)> = BTreeSet::new();
    for (pod, ep) in &mut enforced.endpoints {
        let Some(st) = view.endpoints.get(pod) else {
            continue;
        };
        debug_assert_eq!(st.id, ep.id, "the staged view keeps the endpoint ids");
        if st.hairpin_judged != ep.hairpin_judged {
            ep.staged_hairpin_judged = Some(st.hairpin_judged);
        }
        for d in [Direction::Ingress, Direction::Egress] {
            if st.isolated(d) == ep.isolated(d) && st.generation(d) == ep.generation(d) {
                continue;
            }
            differs.insert((ep.id, d));
            match d {
                Direction::Ingress => ep.staged_ingress = Some(st.isolated(d)),
                Direction::Egress => ep.staged_egress = Some(st.isolated(d)),
            }
        }
    }
    let staged_target = |t: &PolicyTarget| {
        differs
            .contains(&(t.endpoint, t.direction))
            .then(|| PolicyTarget {
                endpoint: staged_endpoint(t.endpoint),
                ..*t
            })
    };
    for (map, from) in [
        (&mut enforced.policy_v4, &view.policy_v4),
        (&mut enforced.policy_v6, &view.policy_v6),
    ] {
        for (t, e) in from {
            let Some(target) = staged_target(t) else {
                continue;
            };
            if e.ruleset != EMPTY_RULESET
                && let Some(set) = view.rulesets.get(&e.ruleset)
            {
                enforced.rulesets.insert(e.ruleset, set.clone());
                enforced.ids.rulesets.insert(set.clone(), e.ruleset);
            }
            map.insert(target, e.clone());
        }
    }
    for (t, d) in &view.named {
        if let Some(target) = staged_target(t) {
            enforced.named.insert(target, d.clone());
        }
    }
    enforced.ids.next_ruleset = view.ids.next_ruleset;
    enforced
}
