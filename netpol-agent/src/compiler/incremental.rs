//! Incremental compile: a [`Compiler`] keeps the last output with what it
//! depends on, and after a change recompiles only the local pods the change
//! can reach.
//!
//! # Usage (the sync loop's)
//! ```no_run
//! use netpol_agent::compiler::{Changes, Compiler};
//! use netpol_agent::compiler::IdAllocation;
//! use netpol_agent::model::{ObjectRef, Snapshot};
//!
//! let mut snap = Snapshot::default();
//! // Startup: a full compile (from the allocation of a previous run, if any).
//! let mut compiler = Compiler::new(&snap, &IdAllocation::default());
//! // write compiler.compiled().map_state() to the maps ...
//! // On each new version of the snapshot: what differs from the last one
//! // (the maps share structure between versions, so this costs the number
//! // of changes), then only what those changes reach.
//! let old = snap.clone();
//! snap.namespaces.remove("gone");
//! let diff = compiler.update(&snap, &Changes::between(&old, &snap));
//! // apply diff.raw() in order ...
//! ```
//!
//! # What a change reaches
//! - A pod: itself if it is (or was) local; the local pods selected by any
//!   policy in force here (selecting a local pod) whose peers selected the
//!   pod before or select it now; the local pods of policies whose egress
//!   named ports resolve on pods reached through an ipBlock or "every
//!   peer".
//! - A policy: the local pods it selected before or selects now.
//! - A Service: no pod; the frontends are recomputed whole (cheap: no
//!   selector is evaluated) and diffed.
//! - A pod or a Node, when `ClusterNetworkPolicies` apply to local pods:
//!   those pods too (their tiered entries are recomputed whole).
//! - A `ClusterNetworkPolicy`: the local pods any `ClusterNetworkPolicy`
//!   applied to, and those it applies to now.
//! - A namespace, the local node or which node is local: everything (a
//!   full compile), as for a batch of more than 512 pods and policies.
//! - Anything, while some policy is staged (before or after the change):
//!   both views compiled whole (`staged.rs`), the staged view's with what
//!   an incremental compiler keeps, so that the promotion that ends the
//!   staging (the snapshot becomes the staged view: annotations removed,
//!   staged deletes deleted) takes that compile as it is, with one diff,
//!   instead of compiling again.
//!
//! Only those pods' endpoints and entries are recomputed, spliced into the
//! kept output, and diffed. The result is equal, value for value, to
//! [`compile`](super::compile) of the same snapshot with the previous
//! allocation, and the [`Diff`] to [`diff`] of the two full outputs.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{IpNet, Ipv4Net};

use super::hash::HashMap;
use super::ids::{endpoint_ids, ruleset_ids};
use super::local::{Core, core, full, insert_entry};
use super::{
    Compiled, Direction, EMPTY_RULESET, EndpointId, PolicyTarget, diff::frontend_diff,
    frontends::frontends, staged,
};
use crate::compiler::{Diff, IdAllocation, diff};
use crate::model::{Map, ObjectRef, Peer, Pod, PolicySlot, Snapshot};
use imbl::ordmap::DiffItem;

/// Above this many changed pods and policies in one update, a full compile
/// is cheaper than following each change.
const FULL_COMPILE_ABOVE: usize = 512;

/// What changed in a [`Snapshot`] since the last compile: the objects
/// added, modified or removed. Listing an object that did not change is
/// harmless (it costs a little work); leaving out one that did leaves the
/// output stale.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Pods.
    pub pods: BTreeSet<ObjectRef>,
    /// `NetworkPolicies` (a new version in force, or removed).
    pub policies: BTreeSet<ObjectRef>,
    /// Namespaces (labels): a full compile.
    pub namespaces: BTreeSet<String>,
    /// Nodes: a full compile if the local one is among them.
    pub nodes: BTreeSet<String>,
    /// Services: their frontends.
    pub services: BTreeSet<ObjectRef>,
    /// `ClusterNetworkPolicies` by name.
    pub cluster_policies: BTreeSet<String>,
    /// Anything else (the local node setting, a resync): a full compile.
    pub everything: bool,
}

impl Changes {
    /// Whether nothing is listed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        !self.everything
            && self.pods.is_empty()
            && self.policies.is_empty()
            && self.namespaces.is_empty()
            && self.nodes.is_empty()
            && self.services.is_empty()
            && self.cluster_policies.is_empty()
    }

    /// The objects that differ between two snapshots. The snapshot's maps
    /// share structure between versions, and comparing them skips what
    /// they share: between a source's consecutive versions this costs in
    /// the number of changes, not of objects.
    #[must_use]
    pub fn between(old: &Snapshot, new: &Snapshot) -> Self {
        fn keys<K: Ord + Clone, V: Clone + PartialEq>(a: &Map<K, V>, b: &Map<K, V>) -> BTreeSet<K> {
            a.diff(b)
                .map(|d| match d {
                    DiffItem::Add(k, _)
                    | DiffItem::Remove(k, _)
                    | DiffItem::Update { old: (k, _), .. } => k.clone(),
                })
                .collect()
        }
        Self {
            pods: keys(&old.pods, &new.pods),
            policies: keys(&old.policies, &new.policies),
            namespaces: keys(&old.namespaces, &new.namespaces),
            nodes: keys(&old.nodes, &new.nodes),
            services: keys(&old.services, &new.services),
            cluster_policies: keys(&old.cluster_policies, &new.cluster_policies),
            everything: old.local_node != new.local_node,
        }
    }
}

/// Whether each of `changed` is a slot `view` held no version in force
/// of and `now` no longer has (a staged delete, deleted).
fn deleted_unforced<K: Ord + Clone, P: Clone + PartialEq>(
    view: &Map<K, PolicySlot<P>>,
    now: &Map<K, PolicySlot<P>>,
    changed: &BTreeSet<K>,
) -> bool {
    changed
        .iter()
        .all(|k| view.get(k).is_none_or(|s| s.in_force.is_none()) && !now.contains_key(k))
}

/// What the kept output depends on.
#[derive(Clone, Debug, Default)]
struct Index {
    /// Local pod → the policies whose pod selector matches it.
    selecting: BTreeMap<ObjectRef, Vec<ObjectRef>>,
    /// Policy → the local pods it selects (policies selecting none are
    /// left out).
    selects: HashMap<ObjectRef, BTreeSet<ObjectRef>>,
    /// Pod → the policies (among `selects`) whose peers select it.
    member_of: HashMap<ObjectRef, BTreeSet<ObjectRef>>,
    /// Policy → the pods its peers select.
    members: HashMap<ObjectRef, Vec<ObjectRef>>,
    /// Policies that depend on every pod.
    global: BTreeSet<ObjectRef>,
    /// Rule-set id → number of entries pointing at it.
    refs: HashMap<u32, usize>,
    /// Local pods some `ClusterNetworkPolicy` with rules applies to.
    cluster_selected: BTreeSet<ObjectRef>,
}

impl Index {
    fn set_members(&mut self, policy: &ObjectRef, pods: Vec<ObjectRef>, global: bool) {
        self.clear_members(policy);
        for p in &pods {
            self.member_of
                .entry(p.clone())
                .or_default()
                .insert(policy.clone());
        }
        self.members.insert(policy.clone(), pods);
        if global {
            self.global.insert(policy.clone());
        }
    }

    fn clear_members(&mut self, policy: &ObjectRef) {
        self.global.remove(policy);
        for p in self.members.remove(policy).unwrap_or_default() {
            if let Some(set) = self.member_of.get_mut(&p) {
                set.remove(policy);
                if set.is_empty() {
                    self.member_of.remove(&p);
                }
            }
        }
    }

    fn set_selecting(&mut self, pod: &ObjectRef, policies: Option<Vec<ObjectRef>>) {
        for q in self.selecting.remove(pod).unwrap_or_default() {
            if let Some(set) = self.selects.get_mut(&q) {
                set.remove(pod);
            }
        }
        if let Some(policies) = policies {
            for q in &policies {
                self.selects
                    .entry(q.clone())
                    .or_default()
                    .insert(pod.clone());
            }
            self.selecting.insert(pod.clone(), policies);
        }
    }

    /// Adds what `core` found (members of the policies it prepared).
    fn add_members(&mut self, core: &Core<'_>) {
        for m in &core.members {
            let id = core.policies[m.policy].id.clone();
            self.set_members(&id, m.pods.clone(), m.global);
        }
    }
}

/// The compiler for a changing snapshot: the last [`Compiled`] and what it
/// depends on. [`Compiler::update`] recompiles only what a change reaches
/// and returns the ordered map updates; the output is always equal to
/// [`compile`](super::compile) of the same snapshot from the previous
/// allocation. See the module documentation for the reconcile loop.
#[derive(Clone, Debug)]
pub struct Compiler {
    out: Compiled,
    index: Index,
    /// With staged policies: the staged view, whole; updates compile both
    /// views again, but for a promotion.
    staged: Option<Box<StagedView>>,
}

/// The staged view of the last compile with staged policies, and its own
/// incremental compile (from [`staged::view_allocation`], so its ids are
/// those a compile of the promoted snapshot gives).
#[derive(Clone, Debug)]
struct StagedView {
    snap: Snapshot,
    compiler: Compiler,
}

impl Compiler {
    /// A full compile of `snap` from the allocation `prev` (default at the
    /// first start), kept for updates.
    #[must_use]
    pub fn new(snap: &Snapshot, prev: &IdAllocation) -> Self {
        let Some(views) = snap.views() else {
            return Self::unstaged(snap, prev);
        };
        let enforced = full(&views.enforced, prev, false).0;
        let compiler = Self::unstaged(&views.staged, &staged::view_allocation(&enforced, prev));
        Self {
            out: staged::overlay_view(enforced, &compiler.out),
            index: Index::default(),
            staged: Some(Box::new(StagedView {
                snap: views.staged,
                compiler,
            })),
        }
    }

    /// [`Compiler::new`] of a snapshot without staged policies.
    fn unstaged(snap: &Snapshot, prev: &IdAllocation) -> Self {
        let (out, core) = full(snap, prev, true);
        let mut index = Index::default();
        if let Some(core) = core {
            index.add_members(&core);
            for pod in &core.pods {
                let pols = pod
                    .selecting
                    .iter()
                    .map(|&pi| core.policies[pi].id.clone())
                    .collect();
                index.set_selecting(&pod.id, Some(pols));
                if pod.cluster_selected {
                    index.cluster_selected.insert(pod.id.clone());
                }
            }
        }
        for e in out.policy_v4.values().chain(out.policy_v6.values()) {
            if e.ruleset != EMPTY_RULESET {
                *index.refs.entry(e.ruleset).or_default() += 1;
            }
        }
        Self {
            out,
            index,
            staged: None,
        }
    }

    /// The compiler of `snap` when it is the kept staged view promoted:
    /// nothing staged any more, and `snap` differs from that view at most
    /// by staged deletes now deleted (slots the view held no version of).
    fn promoted(&mut self, snap: &Snapshot) -> Option<Compiler> {
        if snap.has_staged() {
            return None;
        }
        let view = self.staged.as_ref()?;
        let ch = Changes::between(&view.snap, snap);
        let only_deletes = ch.pods.is_empty()
            && ch.namespaces.is_empty()
            && ch.nodes.is_empty()
            && ch.services.is_empty()
            && !ch.everything
            && deleted_unforced(&view.snap.policies, &snap.policies, &ch.policies)
            && deleted_unforced(
                &view.snap.cluster_policies,
                &snap.cluster_policies,
                &ch.cluster_policies,
            );
        if !only_deletes {
            return None;
        }
        let mut c = self.staged.take()?.compiler;
        // The slots gone held no version in force: they select nothing,
        // and only the errors they carried change.
        c.out.errors = snap.errors();
        Some(c)
    }

    /// The current output.
    #[must_use]
    pub fn compiled(&self) -> &Compiled {
        &self.out
    }

    /// The current output, by value.
    #[must_use]
    pub fn into_compiled(self) -> Compiled {
        self.out
    }

    /// Brings the output to `snap`, which differs from the snapshot of the
    /// last compile or update by (at most) `changes`, and returns the
    /// ordered map updates from the previous output to the new one (the
    /// same as [`diff`] of the two).
    pub fn update(&mut self, snap: &Snapshot, changes: &Changes) -> Diff {
        if let Some(new) = self.promoted(snap) {
            let d = diff(&self.out, &new.out);
            *self = new;
            return d;
        }
        let node = snap.local_node_name();
        // With staged policies (before or now) both views are compiled
        // whole.
        if self.staged.is_some()
            || snap.has_staged()
            || changes.everything
            || changes.pods.len() + changes.policies.len() > FULL_COMPILE_ABOVE
            || !changes.namespaces.is_empty()
            || node.is_none()
            || node != self.out.node.as_deref()
            || node.is_some_and(|n| changes.nodes.contains(n))
        {
            let new = Compiler::new(snap, &self.out.ids);
            let d = diff(&self.out, &new.out);
            *self = new;
            return d;
        }
        let node = node.unwrap_or_default().to_owned();
        self.out.errors = snap.errors();
        let (frontend_upserts, frontend_deletes) = if changes.services.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            let f = frontends(snap, &self.out.node_addresses);
            let old = Compiled {
                frontends_v4: std::mem::replace(&mut self.out.frontends_v4, f.v4),
                frontends_v6: std::mem::replace(&mut self.out.frontends_v6, f.v6),
                ..Compiled::default()
            };
            frontend_diff(&old, &self.out)
        };
        let affected = self.affected(snap, &node, changes);
        let mut d = if affected.is_empty() {
            Diff::default()
        } else {
            let core = core(snap, &node, Some(&affected), true);
            self.splice(&affected, core)
        };
        if !frontend_upserts.is_empty() || !frontend_deletes.is_empty() {
            // The order of a full diff: frontend upserts first, deletes last.
            let rest = std::mem::take(&mut d.ops);
            d.ops = frontend_upserts;
            d.ops.extend(rest);
            d.ops.extend(frontend_deletes);
        }
        d
    }

    /// The local pods (before or after) a change can reach.
    fn affected(&self, snap: &Snapshot, node: &str, changes: &Changes) -> BTreeSet<ObjectRef> {
        let mut out: BTreeSet<ObjectRef> = BTreeSet::new();
        let reach = |q: &ObjectRef, out: &mut BTreeSet<ObjectRef>| {
            if let Some(set) = self.index.selects.get(q) {
                out.extend(set.iter().cloned());
            }
        };
        for q in &changes.policies {
            reach(q, &mut out);
            let Some(p) = snap.policies.get(q).and_then(|s| s.in_force.as_ref()) else {
                continue;
            };
            let from = ObjectRef::new(q.namespace.clone(), String::new());
            for (id, _) in self.out.endpoints.range(from..) {
                if id.namespace != q.namespace {
                    break;
                }
                if snap
                    .pods
                    .get(id)
                    .is_some_and(|pod| p.pod_selector.matches(&pod.labels))
                {
                    out.insert(id.clone());
                }
            }
        }
        if !changes.pods.is_empty()
            || !changes.nodes.is_empty()
            || !changes.cluster_policies.is_empty()
        {
            // Tiered entries depend on every pod and Node their rules'
            // peers may select, and on every ClusterNetworkPolicy that
            // applies (their order decides): the pods some applied to.
            out.extend(self.index.cluster_selected.iter().cloned());
        }
        // Namespace labels, looked up once per namespace.
        let mut ns_labels: BTreeMap<&str, crate::model::Labels> = BTreeMap::new();
        // And the pods a changed ClusterNetworkPolicy applies to now.
        for name in &changes.cluster_policies {
            let Some(c) = snap
                .cluster_policies
                .get(name)
                .and_then(|s| s.in_force.as_ref())
            else {
                continue;
            };
            for id in self.out.endpoints.keys() {
                let Some(pod) = snap.pods.get(id) else {
                    continue;
                };
                let labels = ns_labels
                    .entry(id.namespace.as_str())
                    .or_insert_with(|| snap.namespace_labels(&id.namespace));
                if c.selects(labels, &pod.labels) {
                    out.insert(id.clone());
                }
            }
        }
        if changes.pods.is_empty() {
            return out;
        }
        for q in &self.index.global {
            reach(q, &mut out);
        }
        for id in &changes.pods {
            if self.out.endpoints.contains_key(id) {
                out.insert(id.clone());
            }
            if let Some(set) = self.index.member_of.get(id) {
                for q in set {
                    reach(q, &mut out);
                }
            }
            let Some(pod) = snap.pods.get(id).filter(|p| p.is_networked()) else {
                continue;
            };
            if pod.node_name.as_deref() == Some(node) {
                out.insert(id.clone());
            }
            let labels = ns_labels
                .entry(id.namespace.as_str())
                .or_insert_with(|| snap.namespace_labels(&id.namespace));
            for q in self.index.selects.keys() {
                if let Some(p) = snap.policies.get(q).and_then(|s| s.in_force.as_ref())
                    && peers_select(p, pod, labels)
                {
                    reach(q, &mut out);
                }
            }
        }
        out
    }

    /// Replaces the endpoints and entries of `affected` with `core`'s.
    fn splice(&mut self, affected: &BTreeSet<ObjectRef>, mut core: Core<'_>) -> Diff {
        let mut old = Compiled::default();
        let mut new = Compiled::default();
        let mut dropped: Vec<u32> = Vec::new();

        // Take out the old endpoints and their entries.
        for pod in affected {
            let Some(e) = self.out.endpoints.remove(pod) else {
                continue;
            };
            for map in [&mut self.out.policy_v4, &mut self.out.policy_v6] {
                for (t, entry) in take_endpoint(map, e.id) {
                    if let Some(n) = self.index.refs.get_mut(&entry.ruleset) {
                        *n -= 1;
                        if *n == 0 {
                            dropped.push(entry.ruleset);
                        }
                    }
                    insert_entry(&mut old, t, entry);
                }
            }
            take_endpoint(&mut self.out.named, e.id);
            old.endpoints.insert(pod.clone(), e);
        }

        // Ids: the same rules as a full compile from the previous
        // allocation (every other pod and rule set keeps its id).
        let ids = endpoint_ids(
            &core.pods,
            &self.out.ids.endpoints,
            &self.out.ids.reserved_endpoints,
            &mut self.out.ids.next_endpoint,
        );
        let (set_ids, added) = ruleset_ids(
            &core,
            &self.out.ids.rulesets,
            &self.out.ids.reserved_rulesets,
            &mut self.out.ids.next_ruleset,
        );
        for (id, set) in added {
            self.out.ids.rulesets.insert(set.clone(), id);
            self.out.rulesets.insert(id, set.clone());
            new.rulesets.insert(id, set);
        }
        for pod in affected {
            self.out.ids.endpoints.remove(pod);
        }

        // Put in the new ones.
        for (pod, &id) in core.pods.iter_mut().zip(&ids) {
            self.out.ids.endpoints.insert(
                pod.id.clone(),
                EndpointId {
                    id,
                    uid: pod.uid.clone(),
                },
            );
            let e = pod.endpoint(id, &core.sets);
            self.out.endpoints.insert(pod.id.clone(), e.clone());
            new.endpoints.insert(pod.id.clone(), e);
            for (direction, prefix, set, sources, in_map) in std::mem::take(&mut pod.entries) {
                let target = PolicyTarget {
                    endpoint: id,
                    direction,
                    prefix,
                };
                if !in_map {
                    if let Some(d) = sources.decisions {
                        self.out.named.insert(target, d);
                    }
                    continue;
                }
                let ruleset = set_ids[set as usize];
                if ruleset != EMPTY_RULESET {
                    *self.index.refs.entry(ruleset).or_default() += 1;
                }
                let entry = sources.entry(ruleset);
                insert_entry(&mut new, target, entry.clone());
                insert_entry(&mut self.out, target, entry);
            }
        }

        // Rule sets nothing points at any more.
        for id in dropped {
            if self.index.refs.get(&id) == Some(&0) {
                self.index.refs.remove(&id);
                if let Some(set) = self.out.rulesets.remove(&id) {
                    self.out.ids.rulesets.remove(&set);
                    old.rulesets.insert(id, set);
                }
            }
        }

        // What the new output depends on.
        let mut selecting: BTreeMap<&ObjectRef, Vec<ObjectRef>> = BTreeMap::new();
        for pod in &core.pods {
            selecting.insert(
                &pod.id,
                pod.selecting
                    .iter()
                    .map(|&pi| core.policies[pi].id.clone())
                    .collect(),
            );
        }
        for pod in affected {
            let pols = selecting.remove(pod);
            self.index.set_selecting(pod, pols);
            self.index.cluster_selected.remove(pod);
        }
        for pod in core.pods.iter().filter(|p| p.cluster_selected) {
            self.index.cluster_selected.insert(pod.id.clone());
        }
        let unused: Vec<ObjectRef> = self
            .index
            .selects
            .iter()
            .filter(|(_, s)| s.is_empty())
            .map(|(q, _)| q.clone())
            .collect();
        for q in unused {
            self.index.selects.remove(&q);
            self.index.clear_members(&q);
        }
        self.index.add_members(&core);

        diff(&old, &new)
    }
}

/// Whether some pod peer of `p`'s rules selects `pod` (whose namespace has
/// `ns_labels`).
fn peers_select(
    p: &crate::model::NetworkPolicy,
    pod: &Pod,
    ns_labels: &crate::model::Labels,
) -> bool {
    let rules = p.ingress.iter().chain(p.egress.iter()).flatten();
    rules.flat_map(|r| r.peers.iter()).any(|peer| match peer {
        Peer::IpBlock { .. } => false,
        Peer::Pods {
            pod_selector,
            namespace_selector,
        } => {
            let ns_ok = match namespace_selector {
                None => pod.id.namespace == p.id.namespace,
                Some(sel) => sel.matches(ns_labels),
            };
            ns_ok && pod_selector.as_ref().is_none_or(|s| s.matches(&pod.labels))
        }
    })
}

/// Takes `endpoint`'s entries out of `map`: its keys are one range.
fn take_endpoint<V>(map: &mut BTreeMap<PolicyTarget, V>, endpoint: u32) -> Vec<(PolicyTarget, V)> {
    let from = PolicyTarget {
        endpoint,
        direction: Direction::Egress,
        prefix: IpNet::V4(Ipv4Net::default()),
    };
    let keys: Vec<PolicyTarget> = map
        .range(from..)
        .take_while(|(t, _)| t.endpoint == endpoint)
        .map(|(t, _)| *t)
        .collect();
    keys.into_iter()
        .filter_map(|t| map.remove(&t).map(|v| (t, v)))
        .collect()
}
