//! Peer selection: the networked pods a compile looks at ([`Peers`]) and
//! each rule's peers resolved to them ([`prepare`]).

use std::borrow::Cow;
use std::collections::BTreeMap;

use ipnet::IpNet;

use super::PortRange;
use super::hash::HashMap;
use super::prefixes::same_family;
use crate::model::{
    ClusterPeer, ClusterPort, ClusterRule, LabelSelector, NetworkPolicy, ObjectRef, Peer, Pod,
    PolicyPort, PortSpec, Protocol, Rule, Snapshot,
};

/// A rule, its peers resolved to pods, ready to contribute prefixes.
pub(super) struct Prepared<'a> {
    pub(super) rule: u32,
    pub(super) all_peers: bool,
    pub(super) pods: Vec<usize>,
    pub(super) blocks: Vec<(IpNet, &'a [IpNet])>,
    pub(super) all_ports: bool,
    pub(super) numeric: Vec<PortRange>,
    pub(super) named: Vec<(Protocol, &'a str)>,
}

/// The networked pods a compile looks at, by namespace: all of them, or
/// (for an incremental compile) the namespaces it needs, loaded on demand.
pub(super) struct Peers<'a> {
    snap: &'a Snapshot,
    pub(super) list: Vec<&'a Pod>,
    pub(super) by_ns: BTreeMap<&'a str, Vec<usize>>,
    /// Every namespace is loaded.
    complete: bool,
}

impl<'a> Peers<'a> {
    pub(super) fn all(snap: &'a Snapshot) -> Self {
        let list: Vec<&Pod> = snap.pods.values().filter(|p| p.is_networked()).collect();
        // Pods come sorted by namespace: each namespace is one run.
        let mut by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut start = 0;
        for i in 1..=list.len() {
            if i == list.len() || list[i].id.namespace != list[start].id.namespace {
                by_ns.insert(list[start].id.namespace.as_str(), (start..i).collect());
                start = i;
            }
        }
        Self {
            snap,
            list,
            by_ns,
            complete: true,
        }
    }

    pub(super) fn lazy(snap: &'a Snapshot) -> Self {
        Self {
            snap,
            list: Vec::new(),
            by_ns: BTreeMap::new(),
            complete: false,
        }
    }

    /// Loads a namespace; its key if it has networked pods.
    pub(super) fn load(&mut self, ns: &str) -> Option<&'a str> {
        if let Some((&k, _)) = self.by_ns.get_key_value(ns) {
            return Some(k);
        }
        if self.complete {
            return None;
        }
        let from = ObjectRef::new(ns, "");
        let mut key = None;
        let mut run = Vec::new();
        for (id, p) in self.snap.pods.range(from..) {
            if id.namespace != ns {
                break;
            }
            if p.is_networked() {
                key = Some(p.id.namespace.as_str());
                run.push(self.list.len());
                self.list.push(p);
            }
        }
        let key = key?;
        self.by_ns.insert(key, run);
        Some(key)
    }

    /// Every namespace with pods, starting at each one's first pod.
    fn namespaces(&self) -> Vec<&'a str> {
        let mut out = Vec::new();
        let mut next = self.snap.pods.keys().next();
        while let Some(id) = next {
            out.push(id.namespace.as_str());
            let after = ObjectRef::new(format!("{}\0", id.namespace), String::new());
            next = self.snap.pods.range(after..).next().map(|(k, _)| k);
        }
        out
    }

    pub(super) fn load_all(&mut self) {
        if !self.complete {
            for ns in self.namespaces() {
                self.load(ns);
            }
            self.complete = true;
        }
    }

    /// Labels of every namespace a peer can be in (a superset of those
    /// with networked pods).
    pub(super) fn namespace_labels(&self) -> BTreeMap<&'a str, Cow<'a, crate::model::Labels>> {
        let mut out: BTreeMap<&'a str, Cow<'a, crate::model::Labels>> = self
            .snap
            .namespaces
            .iter()
            .map(|(n, ns)| (n.as_str(), Cow::Borrowed(&ns.labels)))
            .collect();
        let names = if self.complete {
            self.by_ns.keys().copied().collect()
        } else {
            self.namespaces()
        };
        for n in names {
            out.entry(n)
                .or_insert_with(|| Cow::Owned(self.snap.namespace_labels(n)));
        }
        out
    }
}

/// Peer selections already resolved in this compile: policies repeat the
/// same selectors (per-app rules, shared DNS and monitoring peers).
#[derive(Default)]
pub(super) struct SelectionCache<'a> {
    pub(super) namespaces: HashMap<&'a LabelSelector, Vec<&'a str>>,
    pub(super) pods: HashMap<(&'a str, Option<&'a LabelSelector>), Vec<usize>>,
}

pub(super) fn prepare<'a>(
    id: u32,
    policy: &'a NetworkPolicy,
    rule: &'a Rule,
    peers: &mut Peers<'a>,
    ns_labels: &BTreeMap<&'a str, Cow<'a, crate::model::Labels>>,
    cache: &mut SelectionCache<'a>,
) -> Prepared<'a> {
    let mut prep = Prepared {
        rule: id,
        all_peers: rule.peers.is_empty(),
        pods: Vec::new(),
        blocks: Vec::new(),
        all_ports: rule.ports.is_empty(),
        numeric: Vec::new(),
        named: Vec::new(),
    };
    for peer in &rule.peers {
        match peer {
            Peer::IpBlock { cidr, except } => {
                let except: &'a [IpNet] = except.as_slice();
                debug_assert!(except.iter().all(|e| same_family(cidr, e)));
                prep.blocks.push((*cidr, except));
            }
            Peer::Pods {
                pod_selector,
                namespace_selector,
            } => {
                let namespaces: Vec<&'a str> = match namespace_selector {
                    None => vec![policy.id.namespace.as_str()],
                    Some(sel) => namespaces_of(sel, ns_labels, cache),
                };
                pods_of(
                    &namespaces,
                    pod_selector.as_ref(),
                    peers,
                    cache,
                    &mut prep.pods,
                );
            }
        }
    }
    prep.pods.sort_unstable();
    prep.pods.dedup();
    for PolicyPort { protocol, port } in &rule.ports {
        match port {
            PortSpec::All => prep.numeric.push(PortRange {
                protocol: *protocol,
                first: 0,
                last: u16::MAX,
            }),
            PortSpec::Range { first, last } => prep.numeric.push(PortRange {
                protocol: *protocol,
                first: *first,
                last: *last,
            }),
            PortSpec::Named(name) => prep.named.push((*protocol, name.as_str())),
        }
    }
    prep
}

/// The namespaces `sel` matches (cached: policies repeat selectors).
fn namespaces_of<'a>(
    sel: &'a LabelSelector,
    ns_labels: &BTreeMap<&'a str, Cow<'a, crate::model::Labels>>,
    cache: &mut SelectionCache<'a>,
) -> Vec<&'a str> {
    cache
        .namespaces
        .entry(sel)
        .or_insert_with(|| {
            ns_labels
                .iter()
                .filter(|(_, l)| sel.matches(l))
                .map(|(&n, _)| n)
                .collect()
        })
        .clone()
}

/// Adds to `out` the networked pods of `namespaces` that `pod_sel`
/// (`None`: every pod) matches.
fn pods_of<'a>(
    namespaces: &[&'a str],
    pod_sel: Option<&'a LabelSelector>,
    peers: &mut Peers<'a>,
    cache: &mut SelectionCache<'a>,
    out: &mut Vec<usize>,
) {
    for ns in namespaces {
        let Some(ns_key) = peers.load(ns) else {
            continue;
        };
        let (list, in_ns) = (&peers.list, &peers.by_ns[ns_key]);
        let selected = cache.pods.entry((ns_key, pod_sel)).or_insert_with(|| {
            in_ns
                .iter()
                .copied()
                .filter(|&i| pod_sel.is_none_or(|s| s.matches(&list[i].labels)))
                .collect()
        });
        out.extend_from_slice(selected);
    }
}

/// A `ClusterNetworkPolicy` rule prepared as [`prepare`] does a
/// `NetworkPolicy` rule: its pod peers resolved to pods, `networks` and
/// the addresses of the `nodes` it selects as blocks (without except),
/// `protocols` as ranges and named ports (a named port matches a
/// container port of that name with the connection's protocol: all three
/// protocols are looked up).
pub(super) fn prepare_cluster<'a>(
    id: u32,
    rule: &'a ClusterRule,
    peers: &mut Peers<'a>,
    ns_labels: &BTreeMap<&'a str, Cow<'a, crate::model::Labels>>,
    cache: &mut SelectionCache<'a>,
) -> Prepared<'a> {
    let mut prep = Prepared {
        rule: id,
        all_peers: false,
        pods: Vec::new(),
        blocks: Vec::new(),
        all_ports: rule.ports.is_none(),
        numeric: Vec::new(),
        named: Vec::new(),
    };
    let snap = peers.snap;
    for peer in &rule.peers {
        let (ns_sel, pod_sel) = match peer {
            ClusterPeer::Networks(list) => {
                prep.blocks.extend(list.iter().map(|n| (*n, &[][..])));
                continue;
            }
            ClusterPeer::Nodes(sel) => {
                for node in snap.nodes.values().filter(|n| sel.matches(&n.labels)) {
                    prep.blocks
                        .extend(node.addresses.iter().map(|&a| (IpNet::from(a), &[][..])));
                }
                continue;
            }
            ClusterPeer::Namespaces(ns) => (ns, None),
            ClusterPeer::Pods {
                namespace_selector,
                pod_selector,
            } => (namespace_selector, Some(pod_selector)),
        };
        let namespaces = namespaces_of(ns_sel, ns_labels, cache);
        pods_of(&namespaces, pod_sel, peers, cache, &mut prep.pods);
    }
    prep.pods.sort_unstable();
    prep.pods.dedup();
    prep.blocks.sort_unstable_by_key(|b| b.0);
    prep.blocks.dedup_by_key(|b| b.0);
    for port in rule.ports.iter().flatten() {
        match port {
            ClusterPort::Ports {
                protocol,
                first,
                last,
            } => prep.numeric.push(PortRange {
                protocol: *protocol,
                first: *first,
                last: *last,
            }),
            ClusterPort::Named(name) => {
                for protocol in Protocol::ALL {
                    prep.named.push((protocol, name.as_str()));
                }
            }
        }
    }
    prep
}
