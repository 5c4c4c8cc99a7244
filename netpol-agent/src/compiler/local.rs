//! The compile itself: the local pods of a node to their entries in
//! content form ([`core`]), then ids handed out and [`Compiled`] assembled
//! ([`compile`], and [`full`] for the incremental compiler).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::hash::{HashMap, generation};
use super::ids::{endpoint_ids, ruleset_ids};
use super::peers::{Peers, SelectionCache, prepare, prepare_cluster};
use super::prefixes::{Ctx, Entry, Interner, Mode, Source, Tiered, cluster_rules_of, rules_of};
use super::{
    Compiled, Decision, Direction, EMPTY_RULESET, Endpoint, EndpointId, IdAllocation, PolicyEntry,
    PolicyTarget, RuleRef, RuleSet, frontends,
};
use crate::model::{
    ClusterNetworkPolicy, ClusterPort, NetworkPolicy, ObjectRef, Peer, PortSpec, Protocol, Snapshot,
};

/// Endpoints with equal keys have equal entries: direction, selecting
/// policies and `ClusterNetworkPolicies`, and (ingress with named ports)
/// the pod's own named ports.
type GroupKey = (
    Direction,
    Vec<usize>,
    Vec<usize>,
    Vec<(Protocol, String, u16)>,
);

/// One local pod's compiled direction entries, in content form (rule sets
/// as interner indices of [`Core::sets`]), before ids are handed out.
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent facts of one pod"
)]
pub(super) struct PodOut {
    pub(super) id: ObjectRef,
    pub(super) uid: Option<String>,
    pub(super) ips: Vec<IpAddr>,
    pub(super) allow_any_source: bool,
    pub(super) egress_isolated: bool,
    pub(super) ingress_isolated: bool,
    /// Policies (indices into [`Core::policies`]) whose pod selector
    /// matches the pod, whatever their directions.
    pub(super) selecting: Vec<usize>,
    /// Some `ClusterNetworkPolicy` with rules applies to the pod: its
    /// entries depend on every pod and node a tiered rule may select, and
    /// its traffic to itself through a Service is judged (by the entries
    /// of its own addresses).
    pub(super) cluster_selected: bool,
    /// `(direction, prefix, rule set, provenance, in the maps)`, egress
    /// first, each direction sorted by prefix.
    pub(super) entries: Vec<(Direction, IpNet, u32, Provenance, bool)>,
}

/// An entry's rules and decisions ([`PolicyEntry`]'s), shared between
/// the entries that have the same.
#[derive(Clone, Debug)]
pub(super) struct Provenance {
    pub(super) rules: Arc<[RuleRef]>,
    pub(super) decisions: Option<Arc<[Decision]>>,
}

impl Provenance {
    /// The map value with this provenance.
    pub(super) fn entry(self, ruleset: u32) -> PolicyEntry {
        PolicyEntry {
            ruleset,
            sources: self.rules,
            decisions: self.decisions,
        }
    }
}

/// The peers a policy's rules select, for the incremental compiler.
pub(super) struct Members {
    pub(super) policy: usize,
    /// Pods its rules' pod peers select.
    pub(super) pods: Vec<ObjectRef>,
    /// Some egress rule resolves named ports on pods reached through an
    /// ipBlock or "every peer": any pod change may change its entries.
    pub(super) global: bool,
}

/// One group's entries and the contributions they came from.
struct Group<'a> {
    entries: Vec<Entry>,
    contribs: Vec<super::prefixes::Contribution<'a>>,
}

/// `entries` (sorted by prefix) with the pod's own host prefixes `own`
/// in place: replacing an entry of the same prefix, left out where the
/// longest shorter entry already gives the same rule set (and, `tiered`,
/// the same provenance: its decisions name what decides a hairpin).
fn with_own<'e>(
    entries: &'e [Entry],
    own: &[(IpNet, u32, u32)],
    empty: u32,
    tiered: bool,
) -> std::borrow::Cow<'e, [Entry]> {
    if own.is_empty() {
        return std::borrow::Cow::Borrowed(entries);
    }
    let mut out: Vec<Entry> = entries
        .iter()
        .filter(|e| !own.iter().any(|o| o.0 == e.0))
        .copied()
        .collect();
    for &(prefix, set, sources) in own {
        let inherited = out
            .iter()
            .filter(|e| super::prefixes::same_family(&e.0, &prefix) && e.0.contains(&prefix))
            .max_by_key(|e| e.0.prefix_len())
            .map_or((empty, None), |e| (e.1, Some(e.2)));
        let in_map = set != inherited.0;
        if in_map || (tiered && Some(sources) != inherited.1) {
            out.push((prefix, set, sources, in_map));
        }
    }
    out.sort_unstable_by_key(|e| e.0);
    std::borrow::Cow::Owned(out)
}

/// A compile of some or all local pods, before ids.
pub(super) struct Core<'a> {
    pub(super) policies: Vec<&'a NetworkPolicy>,
    pub(super) pods: Vec<PodOut>,
    pub(super) sets: Vec<RuleSet>,
    pub(super) empty: u32,
    pub(super) members: Vec<Members>,
}

/// Compiles the local pods of `node` (those in `only`, if given). With
/// `members`, also reports what the rules of the policies involved select.
pub(super) fn core<'a>(
    snap: &'a Snapshot,
    node: &str,
    only: Option<&BTreeSet<ObjectRef>>,
    members: bool,
) -> Core<'a> {
    let mut peers = match only {
        None => Peers::all(snap),
        Some(_) => Peers::lazy(snap),
    };
    let mut local: Vec<usize> = Vec::new();
    match only {
        None => {
            for (i, p) in peers.list.iter().enumerate() {
                if p.node_name.as_deref() == Some(node) {
                    local.push(i);
                }
            }
        }
        Some(only) => {
            for id in only {
                let Some(ns) = peers.load(&id.namespace) else {
                    continue;
                };
                if let Some(&i) = peers.by_ns[ns].iter().find(|&&i| peers.list[i].id == *id)
                    && peers.list[i].node_name.as_deref() == Some(node)
                {
                    local.push(i);
                }
            }
        }
    }
    let mut local_by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for &i in &local {
        local_by_ns
            .entry(peers.list[i].id.namespace.as_str())
            .or_default()
            .push(i);
    }
    let policies: Vec<&NetworkPolicy> = snap
        .policies
        .values()
        .filter_map(|s| s.in_force.as_ref())
        .collect();
    let mut cnps: Vec<&ClusterNetworkPolicy> = snap
        .cluster_policies
        .values()
        .filter_map(|s| s.in_force.as_ref())
        .collect();
    cnps.sort_by(|a, b| a.order().cmp(&b.order()));

    // Which ClusterNetworkPolicies apply to each local pod, per direction,
    // in evaluation order.
    let mut cluster_selecting: BTreeMap<(usize, Direction), Vec<usize>> = BTreeMap::new();
    let mut relevant_cnps: BTreeSet<usize> = BTreeSet::new();
    if !cnps.is_empty() {
        for (&ns, candidates) in &local_by_ns {
            let ns_labels = snap.namespace_labels(ns);
            for (ci, c) in cnps.iter().enumerate() {
                for &i in candidates {
                    if !c.selects(&ns_labels, &peers.list[i].labels) {
                        continue;
                    }
                    for (d, rules) in [
                        (Direction::Ingress, &c.ingress),
                        (Direction::Egress, &c.egress),
                    ] {
                        if !rules.is_empty() {
                            relevant_cnps.insert(ci);
                            cluster_selecting.entry((i, d)).or_default().push(ci);
                        }
                    }
                }
            }
        }
    }

    // Which policies select each local pod, per direction.
    let mut selecting: BTreeMap<(usize, Direction), Vec<usize>> = BTreeMap::new();
    let mut selected_by: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut relevant: BTreeSet<usize> = BTreeSet::new();
    for (&ns, candidates) in &local_by_ns {
        // Policies are sorted by namespace too.
        let first = policies.partition_point(|p| p.id.namespace.as_str() < ns);
        let last = policies.partition_point(|p| p.id.namespace.as_str() <= ns);
        for (pi, p) in policies.iter().enumerate().take(last).skip(first) {
            for &i in candidates {
                if !p.pod_selector.matches(&peers.list[i].labels) {
                    continue;
                }
                relevant.insert(pi);
                selected_by.entry(i).or_default().push(pi);
                if p.ingress.is_some() {
                    selecting
                        .entry((i, Direction::Ingress))
                        .or_default()
                        .push(pi);
                }
                if p.egress.is_some() {
                    selecting
                        .entry((i, Direction::Egress))
                        .or_default()
                        .push(pi);
                }
            }
        }
    }
    for list in selected_by.values_mut() {
        list.sort_unstable();
    }
    for list in selecting.values_mut() {
        list.sort_unstable();
    }

    // Resolve the peers of every rule of the policies that matter here.
    let wants_namespaces = relevant.iter().any(|&pi| {
        let p = policies[pi];
        p.ingress.iter().chain(p.egress.iter()).flatten().any(|r| {
            r.peers.iter().any(|peer| {
                matches!(
                    peer,
                    Peer::Pods {
                        namespace_selector: Some(_),
                        ..
                    }
                )
            })
        })
    });
    let ns_labels = if wants_namespaces || !relevant_cnps.is_empty() {
        peers.namespace_labels()
    } else {
        BTreeMap::new()
    };
    if relevant.iter().any(|&pi| {
        let p = policies[pi];
        p.egress.iter().flatten().any(|r| {
            r.ports.iter().any(|p| matches!(p.port, PortSpec::Named(_)))
                && (r.peers.is_empty() || r.peers.iter().any(|p| matches!(p, Peer::IpBlock { .. })))
        })
    }) {
        // Named ports resolve on every pod such a rule reaches.
        peers.load_all();
    }
    let mut rules = Vec::new();
    let mut prepared = HashMap::default();
    let mut cache = SelectionCache::default();
    let mut member_lists = Vec::new();
    for &pi in &relevant {
        let p = policies[pi];
        let mut m = Members {
            policy: pi,
            pods: Vec::new(),
            global: false,
        };
        let mut pods: Vec<usize> = Vec::new();
        for d in [Direction::Egress, Direction::Ingress] {
            for (ri, rule) in rules_of(p, d).iter().enumerate() {
                let id = u32::try_from(rules.len()).unwrap_or(u32::MAX);
                rules.push(RuleRef {
                    policy: p.id.clone(),
                    direction: d,
                    index: ri,
                    tier: None,
                });
                let prep = prepare(id, p, rule, &mut peers, &ns_labels, &mut cache);
                if members {
                    pods.extend_from_slice(&prep.pods);
                    m.global |= d == Direction::Egress
                        && !prep.named.is_empty()
                        && (prep.all_peers || !prep.blocks.is_empty());
                }
                prepared.insert((Source::Np(pi), d, ri), prep);
            }
        }
        if members {
            pods.sort_unstable();
            pods.dedup();
            m.pods = pods.into_iter().map(|i| peers.list[i].id.clone()).collect();
            member_lists.push(m);
        }
    }

    let mut tiered: Vec<Option<Tiered>> = vec![None; rules.len()];
    for &ci in &relevant_cnps {
        let c = cnps[ci];
        for d in [Direction::Egress, Direction::Ingress] {
            for (ri, rule) in cluster_rules_of(c, d).iter().enumerate() {
                let id = u32::try_from(rules.len()).unwrap_or(u32::MAX);
                rules.push(RuleRef {
                    policy: ObjectRef::new("", c.name.clone()),
                    direction: d,
                    index: ri,
                    tier: Some(c.tier),
                });
                // At most 25 rules per direction: the index fits in 5 bits.
                let rank = u32::try_from(ci * 32 + ri).unwrap_or(u32::MAX);
                tiered.push(Some(Tiered {
                    rank,
                    tier: c.tier,
                    action: rule.action,
                }));
                let prep = prepare_cluster(id, rule, &mut peers, &ns_labels, &mut cache);
                prepared.insert((Source::Cnp(ci), d, ri), prep);
            }
        }
    }

    let mut ctx = Ctx {
        peers: peers.list,
        policies,
        cnps,
        tiered,
        prepared,
        sets: Interner::default(),
        values: HashMap::default(),
        source_sets: Vec::new(),
        source_index: HashMap::default(),
        empty: 0,
    };
    ctx.empty = ctx.sets.intern(RuleSet::default());

    // Entries, computed once per distinct (direction, policies, own named
    // ports) and shared by the endpoints that have it (with the
    // contributions, for the pods' own addresses).
    let mut groups: HashMap<GroupKey, Group<'a>> = HashMap::default();
    let mut shared: HashMap<u32, Provenance> = HashMap::default();
    let mut pods = Vec::with_capacity(local.len());
    for &i in &local {
        let pod = ctx.peers[i];
        let mut out = PodOut {
            id: pod.id.clone(),
            uid: pod.uid.clone(),
            ips: pod.ips.clone(),
            allow_any_source: pod.allow_any_source,
            egress_isolated: false,
            ingress_isolated: false,
            selecting: selected_by.remove(&i).unwrap_or_default(),
            cluster_selected: false,
            entries: Vec::new(),
        };
        // A ClusterNetworkPolicy judges the pod's traffic to itself through
        // a Service (hairpin): its own addresses get entries of their own.
        let hairpin = [Direction::Egress, Direction::Ingress]
            .iter()
            .any(|&d| cluster_selecting.contains_key(&(i, d)));
        out.cluster_selected = hairpin;
        for d in [Direction::Egress, Direction::Ingress] {
            let none = Vec::new();
            let cluster = cluster_selecting.get(&(i, d)).unwrap_or(&none);
            let np = selecting.get(&(i, d));
            if np.is_none() && cluster.is_empty() {
                continue;
            }
            let pols = np.unwrap_or(&none);
            match d {
                Direction::Egress => out.egress_isolated = true,
                Direction::Ingress => out.ingress_isolated = true,
            }
            let own_ports: Vec<(Protocol, String, u16)> = if d == Direction::Ingress
                && (pols.iter().any(|&pi| {
                    rules_of(ctx.policies[pi], d)
                        .iter()
                        .any(|r| r.ports.iter().any(|p| matches!(p.port, PortSpec::Named(_))))
                }) || cluster.iter().any(|&ci| {
                    cluster_rules_of(ctx.cnps[ci], d).iter().any(|r| {
                        r.ports
                            .iter()
                            .flatten()
                            .any(|p| matches!(p, ClusterPort::Named(_)))
                    })
                })) {
                pod.ports
                    .iter()
                    .filter_map(|p| p.name.clone().map(|n| (p.protocol, n, p.port)))
                    .collect()
            } else {
                Vec::new()
            };
            let key = (d, pols.clone(), cluster.clone(), own_ports);
            let mode = if cluster.is_empty() {
                Mode::Union
            } else {
                Mode::Tiered {
                    np_isolated: np.is_some(),
                }
            };
            if !groups.contains_key(&key) {
                let contribs = ctx.contributions(i, d, pols, cluster);
                let entries = ctx.entries(&contribs, mode);
                // Kept for the own addresses of tiered directions only.
                let contribs = if cluster.is_empty() {
                    Vec::new()
                } else {
                    contribs
                };
                groups.insert(key.clone(), Group { entries, contribs });
            }
            let group = &groups[&key];
            let own: Vec<(IpNet, u32, u32)> = if hairpin {
                pod.ips
                    .iter()
                    .map(|&ip| {
                        let (set, sources) = ctx.own_value(&group.contribs, ip, mode);
                        (IpNet::from(ip), set, sources)
                    })
                    .collect()
            } else {
                Vec::new()
            };
            for &(prefix, set, sources, in_map) in with_own(
                &group.entries,
                &own,
                ctx.empty,
                matches!(mode, Mode::Tiered { .. }),
            )
            .iter()
            {
                let src = shared
                    .entry(sources)
                    .or_insert_with(|| {
                        let s = &ctx.source_sets[sources as usize];
                        let name = |list: &[u32]| -> Vec<RuleRef> {
                            list.iter().map(|&r| rules[r as usize].clone()).collect()
                        };
                        Provenance {
                            rules: name(&s.rules).into(),
                            decisions: s.decisions.as_ref().map(|list| {
                                list.iter()
                                    .map(|d| Decision {
                                        ports: d.ports.clone(),
                                        allowed: d.allowed,
                                        stage: d.stage,
                                        passed: name(&d.passed),
                                        rules: name(&d.rules),
                                    })
                                    .collect()
                            }),
                        }
                    })
                    .clone();
                out.entries.push((d, prefix, set, src, in_map));
            }
        }
        pods.push(out);
    }
    Core {
        policies: ctx.policies,
        pods,
        sets: ctx.sets.sets,
        empty: ctx.empty,
        members: member_lists,
    }
}

impl PodOut {
    /// The endpoint value with its generations.
    pub(super) fn endpoint(&self, id: u32, sets: &[RuleSet]) -> Endpoint {
        let gen_of = |d: Direction, isolated: bool| {
            if !isolated {
                return 0;
            }
            generation(
                self.entries
                    .iter()
                    .filter(|e| e.0 == d && e.4)
                    .map(|e| (e.1, &sets[e.2 as usize])),
            )
        };
        Endpoint {
            id,
            hairpin_judged: self.cluster_selected,
            ingress_isolated: self.ingress_isolated,
            egress_isolated: self.egress_isolated,
            ips: self.ips.clone(),
            allow_any_source: self.allow_any_source,
            ingress_gen: gen_of(Direction::Ingress, self.ingress_isolated),
            egress_gen: gen_of(Direction::Egress, self.egress_isolated),
            staged_ingress: None,
            staged_egress: None,
            staged_hairpin_judged: None,
        }
    }
}

pub(super) fn insert_entry(out: &mut Compiled, target: PolicyTarget, entry: PolicyEntry) {
    match target.prefix {
        IpNet::V4(_) => out.policy_v4.insert(target, entry),
        IpNet::V6(_) => out.policy_v6.insert(target, entry),
    };
}

/// Compiles a snapshot into the node's map contents.
///
/// Pure and deterministic: the same snapshot and allocation give the same
/// output. `prev` is the allocation of the previous compile (default for
/// the first); the new one is in [`Compiled::ids`]. To follow a changing
/// snapshot cheaply, use a [`Compiler`]: its output after any sequence of
/// updates equals this function's on the same snapshot and allocation.
#[must_use]
pub fn compile(snap: &Snapshot, prev: &IdAllocation) -> Compiled {
    match snap.views() {
        None => full(snap, prev, false).0,
        Some(v) => super::staged::overlay(full(&v.enforced, prev, false).0, &v.staged, prev),
    }
}

/// A full compile; with `members`, also what [`Compiler`] keeps.
pub(super) fn full<'a>(
    snap: &'a Snapshot,
    prev: &IdAllocation,
    members: bool,
) -> (Compiled, Option<Core<'a>>) {
    let mut out = Compiled {
        node: snap.local_node_name().map(str::to_owned),
        errors: snap.errors(),
        ..Compiled::default()
    };
    if let Some(node) = out.node.as_ref().and_then(|n| snap.nodes.get(n)) {
        out.node_addresses.clone_from(&node.addresses);
    }
    // Frontends need no local pod, nor a local node (only its node ports).
    let f = frontends::frontends(snap, &out.node_addresses);
    out.frontends_v4 = f.v4;
    out.frontends_v6 = f.v6;
    out.ids = IdAllocation {
        next_endpoint: prev.next_endpoint,
        next_ruleset: prev.next_ruleset,
        ..IdAllocation::default()
    };
    let Some(node) = out.node.clone() else {
        out.notes.push(
            "no local node: pass --node or give exactly one Node; no pod is local".to_owned(),
        );
        return (out, None);
    };
    let mut core = core(snap, &node, None, members);
    let endpoint_ids = endpoint_ids(
        &core.pods,
        &prev.endpoints,
        &prev.reserved_endpoints,
        &mut out.ids.next_endpoint,
    );
    let (set_ids, added) = ruleset_ids(
        &core,
        &prev.rulesets,
        &prev.reserved_rulesets,
        &mut out.ids.next_ruleset,
    );
    for (s, &id) in set_ids.iter().enumerate() {
        if id > EMPTY_RULESET {
            out.ids.rulesets.insert(core.sets[s].clone(), id);
            out.rulesets.insert(id, core.sets[s].clone());
        }
    }
    debug_assert!(added.iter().all(|(id, _)| out.rulesets.contains_key(id)));
    for (pod, &id) in core.pods.iter_mut().zip(&endpoint_ids) {
        out.ids.endpoints.insert(
            pod.id.clone(),
            EndpointId {
                id,
                uid: pod.uid.clone(),
            },
        );
        out.endpoints
            .insert(pod.id.clone(), pod.endpoint(id, &core.sets));
        for (direction, prefix, set, sources, in_map) in std::mem::take(&mut pod.entries) {
            let target = PolicyTarget {
                endpoint: id,
                direction,
                prefix,
            };
            if in_map {
                insert_entry(&mut out, target, sources.entry(set_ids[set as usize]));
            } else if let Some(d) = sources.decisions {
                out.named.insert(target, d);
            }
        }
    }
    (out, members.then_some(core))
}
