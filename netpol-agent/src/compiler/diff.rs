//! From one [`Compiled`] to the next: the map updates, in a safe order.
//!
//! # Order
//! A reader (the datapath) runs between any two updates. The order below
//! guarantees that at every point, for every endpoint, direction and peer
//! address, the rule set in effect is the old one or the new one, never a
//! third, so no intermediate state allows what neither the old nor the new
//! state allows (per endpoint and direction; the two ends of a connection
//! are updated independently).
//!
//! 0. **Frontend upserts**: new Service frontends, and changed kinds. A
//!    frontend only says where a pod's Service traffic is judged (after
//!    kube-proxy's translation, against the same policies), so it allows
//!    nothing by itself.
//! 1. **Port inserts**: entries of new rule sets. Nothing points at them
//!    yet. Rule-set ids never change meaning ([`super::IdAllocation`]).
//! 2. **Policy inserts, then updates** (both families). For an endpoint
//!    direction that is enforced (endpoint present and isolated) in the old
//!    state, each new prefix is first inserted with the value the old state
//!    gives it by longest-prefix match (a no-op for every address), then
//!    every changed prefix is updated to its new value, and every prefix
//!    about to go is updated to the value the new state gives it. Each of
//!    these single writes flips only the addresses whose longest match is
//!    that prefix, from their old to their new rule set. For a direction not
//!    enforced in the old state, entries are inserted with their final
//!    values: they take effect only at step 3.
//! 3. **Endpoints**: inserts (new pods), updates (isolation or address
//!    flags, a new id, a new policy generation), deletes. Isolation turns on
//!    only once its entries are in place; a new generation is written only
//!    once the entries it stands for are in place, so tracked connections
//!    re-checked because of it are checked against the new entries; a
//!    deleted endpoint stops matching before its entries go.
//! 4. **Policy deletes**: by now each doomed prefix carries the value it
//!    would inherit (step 2) or belongs to an endpoint direction no longer
//!    enforced, so removing it changes no verdict.
//! 5. **Port deletes**: rule sets nothing points at any more.
//! 6. **Frontend deletes**: Services (or ports, addresses) gone.
//!
//! The order is stated, and [`Diff::ops`] holds it, at the model level
//! ([`Op`]: an insert told apart from an update); [`Diff::raw`] gives the
//! same updates, in the same order, as exact map writes
//! ([`MapOp`](super::MapOp), see [`super::maps`]).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ipnet::IpNet;
use netpol_common::{EndpointInfo, FrontendKeyV4, FrontendKeyV6, FrontendValue, PolicyValue};

use super::{
    Compiled, Direction, EMPTY_RULESET, Endpoint, PolicyEntry, PolicyTarget, PortPrefix, RawOp,
};
use crate::model::ObjectRef;

/// One typed map update, at the model level (see [`super::maps`] for its
/// exact form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Add a port-trie entry of a rule set.
    PortInsert {
        /// Rule set.
        ruleset: u32,
        /// Port prefix.
        prefix: PortPrefix,
    },
    /// Remove a port-trie entry.
    PortDelete {
        /// Rule set.
        ruleset: u32,
        /// Port prefix.
        prefix: PortPrefix,
    },
    /// Add a policy-trie entry (family from the prefix).
    PolicyInsert {
        /// Key.
        target: PolicyTarget,
        /// Rule set.
        ruleset: u32,
    },
    /// Change the rule set of a policy-trie entry.
    PolicyUpdate {
        /// Key.
        target: PolicyTarget,
        /// Rule set.
        ruleset: u32,
    },
    /// Remove a policy-trie entry.
    PolicyDelete {
        /// Key.
        target: PolicyTarget,
    },
    /// A new local endpoint.
    EndpointInsert {
        /// The pod (the agent knows its interface).
        pod: ObjectRef,
        /// Value.
        info: EndpointInfo,
    },
    /// A changed endpoint.
    EndpointUpdate {
        /// The pod.
        pod: ObjectRef,
        /// New value.
        info: EndpointInfo,
    },
    /// An endpoint gone.
    EndpointDelete {
        /// The pod.
        pod: ObjectRef,
        /// Old value.
        info: EndpointInfo,
    },
    /// Add an IPv4 Service frontend or change its kind.
    FrontendV4Upsert {
        /// Address, port and protocol.
        key: FrontendKeyV4,
        /// Kind.
        value: FrontendValue,
    },
    /// Remove an IPv4 Service frontend.
    FrontendV4Delete {
        /// Address, port and protocol.
        key: FrontendKeyV4,
    },
    /// Add an IPv6 Service frontend or change its kind.
    FrontendV6Upsert {
        /// Address, port and protocol.
        key: FrontendKeyV6,
        /// Kind.
        value: FrontendValue,
    },
    /// Remove an IPv6 Service frontend.
    FrontendV6Delete {
        /// Address, port and protocol.
        key: FrontendKeyV6,
    },
}

impl Op {
    /// The exact map update.
    #[must_use]
    pub fn raw(&self) -> RawOp {
        let policy = |t: &PolicyTarget, ruleset: Option<u32>| match (t.prefix, ruleset) {
            (IpNet::V4(_), Some(r)) => {
                let (l, k) = t.raw_v4().unwrap_or_default();
                RawOp::PolicyV4Upsert(l, k, PolicyValue { ruleset: r })
            }
            (IpNet::V4(_), None) => {
                let (l, k) = t.raw_v4().unwrap_or_default();
                RawOp::PolicyV4Delete(l, k)
            }
            (IpNet::V6(_), Some(r)) => {
                let (l, k) = t.raw_v6().unwrap_or_default();
                RawOp::PolicyV6Upsert(l, k, PolicyValue { ruleset: r })
            }
            (IpNet::V6(_), None) => {
                let (l, k) = t.raw_v6().unwrap_or_default();
                RawOp::PolicyV6Delete(l, k)
            }
        };
        match self {
            Op::PortInsert { ruleset, prefix } => {
                let (l, k, v) = prefix.raw(*ruleset);
                RawOp::PortUpsert(l, k, v)
            }
            Op::PortDelete { ruleset, prefix } => {
                let (l, k, _) = prefix.raw(*ruleset);
                RawOp::PortDelete(l, k)
            }
            Op::PolicyInsert { target, ruleset } | Op::PolicyUpdate { target, ruleset } => {
                policy(target, Some(*ruleset))
            }
            Op::PolicyDelete { target } => policy(target, None),
            Op::EndpointInsert { pod, info } | Op::EndpointUpdate { pod, info } => {
                RawOp::EndpointUpsert(pod.clone(), *info)
            }
            Op::EndpointDelete { pod, .. } => RawOp::EndpointDelete(pod.clone()),
            Op::FrontendV4Upsert { key, value } => RawOp::FrontendV4Upsert(*key, *value),
            Op::FrontendV4Delete { key } => RawOp::FrontendV4Delete(*key),
            Op::FrontendV6Upsert { key, value } => RawOp::FrontendV6Upsert(*key, *value),
            Op::FrontendV6Delete { key } => RawOp::FrontendV6Delete(*key),
        }
    }
}

/// The ordered updates from one compile to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Apply in this order (see the module documentation).
    pub ops: Vec<Op>,
}

impl Diff {
    /// Whether nothing changes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The exact updates, in order.
    pub fn raw(&self) -> impl Iterator<Item = RawOp> + '_ {
        self.ops.iter().map(Op::raw)
    }
}

/// The rule set the longest entry strictly shorter than `t` gives it in
/// `map` ([`EMPTY_RULESET`] when none covers it).
fn inherited(map: &BTreeMap<PolicyTarget, PolicyEntry>, t: &PolicyTarget) -> u32 {
    (0..t.prefix.prefix_len())
        .rev()
        .find_map(|len| {
            let prefix = IpNet::new(t.prefix.addr(), len).ok()?.trunc();
            map.get(&PolicyTarget { prefix, ..*t })
        })
        .map_or(EMPTY_RULESET, |e| e.ruleset)
}

fn port_diff(
    from: &BTreeMap<u32, super::RuleSet>,
    to: &BTreeMap<u32, super::RuleSet>,
    insert: bool,
    ops: &mut Vec<Op>,
) {
    for (&id, set) in from {
        let other: BTreeSet<PortPrefix> = match to.get(&id) {
            Some(o) if o == set => continue,
            Some(o) => o.port_prefixes().into_iter().collect(),
            None => BTreeSet::new(),
        };
        for prefix in set.port_prefixes() {
            if !other.contains(&prefix) {
                ops.push(if insert {
                    Op::PortInsert {
                        ruleset: id,
                        prefix,
                    }
                } else {
                    Op::PortDelete {
                        ruleset: id,
                        prefix,
                    }
                });
            }
        }
    }
}

/// The frontend updates from `old` to `new`: `(upserts, deletes)`, the
/// first to go before every other update, the second after.
pub(super) fn frontend_diff(old: &Compiled, new: &Compiled) -> (Vec<Op>, Vec<Op>) {
    let mut upserts = Vec::new();
    let mut deletes = Vec::new();
    for (k, v) in &new.frontends_v4 {
        if old.frontends_v4.get(k) != Some(v) {
            upserts.push(Op::FrontendV4Upsert { key: *k, value: *v });
        }
    }
    for (k, v) in &new.frontends_v6 {
        if old.frontends_v6.get(k) != Some(v) {
            upserts.push(Op::FrontendV6Upsert { key: *k, value: *v });
        }
    }
    for k in old.frontends_v4.keys() {
        if !new.frontends_v4.contains_key(k) {
            deletes.push(Op::FrontendV4Delete { key: *k });
        }
    }
    for k in old.frontends_v6.keys() {
        if !new.frontends_v6.contains_key(k) {
            deletes.push(Op::FrontendV6Delete { key: *k });
        }
    }
    (upserts, deletes)
}

/// The ordered map updates turning `old`'s maps into `new`'s.
///
/// `new` must have been compiled with `old.ids` as the previous allocation
/// (ids then never change meaning); see the module documentation for the
/// order.
#[must_use]
pub fn diff(old: &Compiled, new: &Compiled) -> Diff {
    let enforced = |c: &Compiled| -> HashSet<(u32, Direction)> {
        c.endpoints
            .values()
            .flat_map(|e: &Endpoint| {
                [Direction::Egress, Direction::Ingress]
                    .into_iter()
                    .filter(|&d| e.isolated(d))
                    .map(|d| (e.id, d))
            })
            .collect()
    };
    let (old_enf, new_enf) = (enforced(old), enforced(new));
    let (frontend_upserts, frontend_deletes) = frontend_diff(old, new);
    let mut ops = frontend_upserts;
    port_diff(&new.rulesets, &old.rulesets, true, &mut ops);

    let mut inserts = Vec::new();
    let mut updates = Vec::new();
    let mut deletes = Vec::new();
    for (o, n) in [
        (&old.policy_v4, &new.policy_v4),
        (&old.policy_v6, &new.policy_v6),
    ] {
        for (t, ne) in n {
            let g = (t.endpoint, t.direction);
            match o.get(t) {
                Some(oe) if oe.ruleset == ne.ruleset => {}
                Some(_) => updates.push(Op::PolicyUpdate {
                    target: *t,
                    ruleset: ne.ruleset,
                }),
                None if old_enf.contains(&g) => {
                    let placeholder = inherited(o, t);
                    inserts.push(Op::PolicyInsert {
                        target: *t,
                        ruleset: placeholder,
                    });
                    if placeholder != ne.ruleset {
                        updates.push(Op::PolicyUpdate {
                            target: *t,
                            ruleset: ne.ruleset,
                        });
                    }
                }
                None => inserts.push(Op::PolicyInsert {
                    target: *t,
                    ruleset: ne.ruleset,
                }),
            }
        }
        for (t, oe) in o {
            if n.contains_key(t) {
                continue;
            }
            let g = (t.endpoint, t.direction);
            if old_enf.contains(&g) && new_enf.contains(&g) {
                let placeholder = inherited(n, t);
                if placeholder != oe.ruleset {
                    updates.push(Op::PolicyUpdate {
                        target: *t,
                        ruleset: placeholder,
                    });
                }
            }
            deletes.push(Op::PolicyDelete { target: *t });
        }
    }
    ops.extend(inserts);
    ops.extend(updates);

    for (pod, e) in &new.endpoints {
        let info = e.info();
        match old.endpoints.get(pod) {
            None => ops.push(Op::EndpointInsert {
                pod: pod.clone(),
                info,
            }),
            Some(o) if o.info() != info => ops.push(Op::EndpointUpdate {
                pod: pod.clone(),
                info,
            }),
            Some(_) => {}
        }
    }
    for (pod, o) in &old.endpoints {
        if !new.endpoints.contains_key(pod) {
            ops.push(Op::EndpointDelete {
                pod: pod.clone(),
                info: o.info(),
            });
        }
    }

    ops.extend(deletes);
    port_diff(&old.rulesets, &new.rulesets, false, &mut ops);
    ops.extend(frontend_deletes);
    Diff { ops }
}
