//! Property tests: over random clusters and policies, the LPM simulator on
//! the compiled entries agrees with the reference evaluator, on boundary and
//! random addresses and ports, both families; `diff(a, b)` applied to
//! `compile(a)` gives `compile(b)`, and no intermediate state of the diff
//! gives a verdict that neither the old nor the new state gives; a
//! [`Compiler`] updated through random changes equals a full compile of
//! each new snapshot, and so do its diffs; generations move exactly when
//! an endpoint direction's contents do; and where a
//! `ClusterNetworkPolicy` applies, the entry the datapath matches names
//! the rule (and Pass chain) the reference says decided.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netpol_agent::compiler::{
    Changes, Compiled, Compiler, Direction, IdAllocation, MapState, RuleSet, compile, diff,
};
use netpol_agent::compiler::{Decision, PolicyEntry, PolicyTarget, RuleRef, Stage};
use netpol_agent::datapath::writer::{FakeBackend, KernelOp, MapWriter, Mirror};
use netpol_agent::model::{
    Action, ClusterNetworkPolicy, ClusterPeer, ClusterPort, ClusterRule, ContainerPort,
    LabelSelector, Labels, NAMESPACE_NAME_LABEL, Namespace, NetworkPolicy, Node, ObjectRef,
    Operator, Peer, Pod, PodPhase, PolicyPort, PolicySlot, PortSpec, Protocol, Requirement, Rule,
    Snapshot, Staging, Subject, Tier,
};
use netpol_agent::provenance::{Bound, Inputs, State};
use netpol_agent::resume::{leftovers, resume};
use netpol_agent::sync::unbound_entry;
use netpol_common::{STAGED_ENDPOINT_BIT, staged_endpoint};
use netpol_testkit::compiler::{
    ICMP, hairpin_judged, np_isolates, reference_allows, simulate, tier_rule,
};
use proptest::{prelude::*, test_runner::FileFailurePersistence};

/// splitmix64: the cluster is a function of one seed, so a failing case
/// prints a seed that reproduces it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const NAMESPACES: [&str; 3] = ["a", "b", "c"];
const APPS: [&str; 3] = ["web", "db", "api"];

fn v4(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}

fn v6(n: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n))
}

fn net(s: &str) -> IpNet {
    s.parse().expect("cidr")
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn random_selector(r: &mut Rng, keys: &[(&str, &[&str])]) -> LabelSelector {
    let mut s = LabelSelector::default();
    match r.below(5) {
        0 => {}
        1 | 2 => {
            let (k, vals) = r.pick(keys);
            s.match_labels
                .insert((*k).to_owned(), (*r.pick(vals)).to_owned());
        }
        _ => {
            let (k, vals) = r.pick(keys);
            let values: BTreeSet<String> = (0..1 + r.below(2))
                .map(|_| (*r.pick(vals)).to_owned())
                .collect();
            let operator = match r.below(4) {
                0 => Operator::In(values),
                1 => Operator::NotIn(values),
                2 => Operator::Exists,
                _ => Operator::DoesNotExist,
            };
            s.match_expressions.push(Requirement {
                key: (*k).to_owned(),
                operator,
            });
        }
    }
    s
}

const POD_KEYS: &[(&str, &[&str])] = &[("app", &APPS), ("tier", &["1", "2"])];
const NS_KEYS: &[(&str, &[&str])] = &[("team", &["x", "y"]), (NAMESPACE_NAME_LABEL, &NAMESPACES)];

fn random_pod(r: &mut Rng, i: usize) -> Pod {
    let n = u8::try_from(i + 1).unwrap() * 7;
    let family = r.below(4);
    let mut ips = Vec::new();
    if family != 1 {
        ips.push(v4(n));
    }
    if family != 2 {
        ips.push(v6(u16::from(n)));
    }
    let mut ports = Vec::new();
    if r.chance(70) {
        ports.push(ContainerPort {
            name: Some("http".into()),
            port: *r.pick(&[80, 8080, 1500]),
            protocol: Protocol::Tcp,
        });
    }
    if r.chance(50) {
        ports.push(ContainerPort {
            name: Some("dns".into()),
            port: *r.pick(&[53, 5353]),
            protocol: Protocol::Udp,
        });
    }
    if r.chance(30) {
        ports.push(ContainerPort {
            name: Some("dns".into()),
            port: 54,
            protocol: Protocol::Tcp,
        });
    }
    if r.chance(30) {
        ports.push(ContainerPort {
            name: Some("assoc".into()),
            port: *r.pick(&[9000, 9001]),
            protocol: Protocol::Sctp,
        });
    }
    let app = *r.pick(&APPS);
    let mut l = labels(&[("app", app)]);
    if r.chance(50) {
        l.insert("tier".into(), (*r.pick(&["1", "2"])).to_owned());
    }
    Pod {
        id: ObjectRef::new(*r.pick(&NAMESPACES), format!("p{i}")),
        uid: Some(format!("uid-{i}")),
        labels: l,
        node_name: Some(if r.chance(70) { "node-1" } else { "node-2" }.into()),
        host_network: r.chance(5),
        phase: if r.chance(5) {
            PodPhase::Failed
        } else {
            PodPhase::Running
        },
        ips,
        ports,
        allow_any_source: false,
    }
}

const CIDRS: &[(&str, &[&str])] = &[
    ("0.0.0.0/0", &[]),
    ("0.0.0.0/0", &["10.0.0.0/26"]),
    ("10.0.0.0/24", &["10.0.0.16/28", "10.0.0.35/32"]),
    ("10.0.0.0/26", &[]),
    ("10.0.0.7/32", &[]),
    ("10.0.0.0/25", &["10.0.0.64/26", "10.0.0.0/27"]),
    ("::/0", &[]),
    ("::/0", &["fd00::/120"]),
    ("fd00::/120", &["fd00::10/124"]),
    ("fd00::/64", &["fd00::23/128"]),
];

fn random_port(r: &mut Rng) -> PolicyPort {
    let (protocol, port) = match r.below(9) {
        0 => (
            Protocol::Tcp,
            PortSpec::Range {
                first: 80,
                last: 80,
            },
        ),
        1 => (
            Protocol::Udp,
            PortSpec::Range {
                first: 53,
                last: 53,
            },
        ),
        2 => (
            Protocol::Tcp,
            PortSpec::Range {
                first: 1000,
                last: 2000,
            },
        ),
        3 => (Protocol::Tcp, PortSpec::Named("http".into())),
        4 => (Protocol::Udp, PortSpec::Named("dns".into())),
        5 => (Protocol::Sctp, PortSpec::All),
        6 => (Protocol::Sctp, PortSpec::Named("assoc".into())),
        7 => (
            Protocol::Udp,
            PortSpec::Range {
                first: 1,
                last: 65535,
            },
        ),
        _ => (Protocol::Tcp, PortSpec::All),
    };
    PolicyPort { protocol, port }
}

fn random_rule(r: &mut Rng) -> Rule {
    let mut rule = Rule::default();
    for _ in 0..r.below(3) {
        rule.peers.push(match r.below(4) {
            0 => Peer::Pods {
                pod_selector: Some(random_selector(r, POD_KEYS)),
                namespace_selector: None,
            },
            1 => Peer::Pods {
                pod_selector: None,
                namespace_selector: Some(random_selector(r, NS_KEYS)),
            },
            2 => Peer::Pods {
                pod_selector: Some(random_selector(r, POD_KEYS)),
                namespace_selector: Some(random_selector(r, NS_KEYS)),
            },
            _ => {
                let (c, ex) = r.pick(CIDRS);
                Peer::IpBlock {
                    cidr: net(c),
                    except: ex.iter().map(|e| net(e)).collect(),
                }
            }
        });
    }
    for _ in 0..r.below(3) {
        rule.ports.push(random_port(r));
    }
    rule
}

fn random_policy(r: &mut Rng, i: usize) -> NetworkPolicy {
    let rules = |r: &mut Rng| -> Option<Vec<Rule>> {
        if r.chance(30) {
            return None;
        }
        Some((0..r.below(3)).map(|_| random_rule(r)).collect())
    };
    let mut ingress = rules(r);
    let egress = rules(r);
    if ingress.is_none() && egress.is_none() {
        ingress = Some(Vec::new());
    }
    NetworkPolicy {
        id: ObjectRef::new(*r.pick(&NAMESPACES), format!("np{i}")),
        pod_selector: random_selector(r, POD_KEYS),
        ingress,
        egress,
        staging: Staging::Enforced,
    }
}

fn random_cluster(seed: u64) -> Snapshot {
    let mut r = Rng(seed);
    let mut s = Snapshot {
        local_node: Some("node-1".into()),
        ..Snapshot::default()
    };
    s.upsert_node(Node {
        name: "node-1".into(),
        addresses: vec![
            IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 1)),
        ],
        labels: labels(&[("zone", "a")]),
    });
    s.upsert_node(Node {
        name: "node-2".into(),
        // Inside the pods' /24: a node address a networks peer and an
        // ipBlock both reach.
        addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 250))],
        labels: labels(&[("zone", "b")]),
    });
    for ns in NAMESPACES {
        let mut l = labels(&[(NAMESPACE_NAME_LABEL, ns)]);
        l.insert("team".into(), (*r.pick(&["x", "y"])).to_owned());
        s.upsert_namespace(Namespace {
            name: ns.into(),
            labels: l,
        });
    }
    for i in 0..3 + r.below(6) {
        s.upsert_pod(random_pod(&mut r, i));
    }
    for i in 0..1 + r.below(4) {
        put_policy(&mut s, random_policy(&mut r, i));
    }
    // Half the clusters hold ClusterNetworkPolicies too.
    if r.chance(50) {
        for i in 0..1 + r.below(3) {
            put_cluster_policy(&mut s, random_cluster_policy(&mut r, i));
        }
    }
    s
}

const NODE_KEYS: &[(&str, &[&str])] = &[("zone", &["a", "b"])];

fn random_cluster_port(r: &mut Rng) -> ClusterPort {
    match r.below(7) {
        0 => ClusterPort::Ports {
            protocol: Protocol::Tcp,
            first: 80,
            last: 80,
        },
        1 => ClusterPort::Ports {
            protocol: Protocol::Udp,
            first: 53,
            last: 53,
        },
        2 => ClusterPort::Ports {
            protocol: Protocol::Tcp,
            first: 1000,
            last: 2000,
        },
        3 => ClusterPort::Ports {
            protocol: Protocol::Sctp,
            first: 1,
            last: 65535,
        },
        4 => ClusterPort::Named("http".into()),
        5 => ClusterPort::Named("dns".into()),
        _ => ClusterPort::Ports {
            protocol: Protocol::Tcp,
            first: 1,
            last: 65535,
        },
    }
}

fn random_cluster_rule(r: &mut Rng, egress: bool) -> ClusterRule {
    let action = *r.pick(&[Action::Accept, Action::Deny, Action::Pass]);
    // Named ports never beside networks or nodes peers (the CRD refuses).
    let mut ports = if r.chance(40) {
        None
    } else {
        Some(
            (0..1 + r.below(2))
                .map(|_| random_cluster_port(r))
                .collect::<Vec<_>>(),
        )
    };
    let named = ports
        .iter()
        .flatten()
        .any(|p| matches!(p, ClusterPort::Named(_)));
    let mut peers = Vec::new();
    for _ in 0..1 + r.below(2) {
        let kinds = if egress && !named { 4 } else { 2 };
        peers.push(match r.below(kinds) {
            0 => ClusterPeer::Namespaces(random_selector(r, NS_KEYS)),
            1 => ClusterPeer::Pods {
                namespace_selector: random_selector(r, NS_KEYS),
                pod_selector: random_selector(r, POD_KEYS),
            },
            2 => ClusterPeer::Networks(
                (0..1 + r.below(2))
                    .map(|_| net(r.pick(CIDRS).0))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            ),
            _ => ClusterPeer::Nodes(random_selector(r, NODE_KEYS)),
        });
    }
    if peers.is_empty() {
        ports = None;
    }
    ClusterRule {
        name: String::new(),
        action,
        peers,
        ports,
    }
}

fn random_cluster_policy(r: &mut Rng, i: usize) -> ClusterNetworkPolicy {
    let subject = if r.chance(50) {
        Subject::Namespaces(random_selector(r, NS_KEYS))
    } else {
        Subject::Pods {
            namespace_selector: random_selector(r, NS_KEYS),
            pod_selector: random_selector(r, POD_KEYS),
        }
    };
    let ingress = (0..r.below(4))
        .map(|_| random_cluster_rule(r, false))
        .collect();
    let egress = (0..r.below(4))
        .map(|_| random_cluster_rule(r, true))
        .collect();
    ClusterNetworkPolicy {
        name: format!("cnp{i}"),
        tier: if r.chance(50) {
            Tier::Admin
        } else {
            Tier::Baseline
        },
        // Few priorities: equal ones are ordered by name on both sides.
        priority: u16::try_from(r.below(3)).unwrap() * 10,
        subject,
        ingress,
        egress,
        staging: Staging::Enforced,
    }
}

fn put_cluster_policy(s: &mut Snapshot, p: ClusterNetworkPolicy) {
    s.cluster_policies.insert(
        p.name.clone(),
        PolicySlot {
            in_force: Some(p),
            errors: Vec::new(),
        },
    );
}

fn put_policy(s: &mut Snapshot, p: NetworkPolicy) {
    s.policies.insert(
        p.id.clone(),
        PolicySlot {
            in_force: Some(p),
            errors: Vec::new(),
        },
    );
}

/// One random change: labels of a pod or namespace, a pod added or removed,
/// a policy added, replaced or removed.
fn mutate(s: &Snapshot, seed: u64) -> Snapshot {
    let mut r = Rng(seed);
    let mut s = s.clone();
    for _ in 0..1 + r.below(3) {
        match r.below(8) {
            6 | 7 => {
                // Widen or narrow an existing policy: the case where the
                // isolation stays on and entries must change in place.
                let keys: Vec<ObjectRef> = s.policies.keys().cloned().collect();
                if !keys.is_empty() {
                    let k = &keys[r.below(keys.len())];
                    let p = s.policies.get_mut(k).unwrap().in_force.as_mut().unwrap();
                    let rules = if r.chance(50) {
                        &mut p.ingress
                    } else {
                        &mut p.egress
                    };
                    if let Some(rules) = rules {
                        if !rules.is_empty() && r.chance(30) {
                            rules.remove(r.below(rules.len()));
                        } else {
                            let (c, ex) = CIDRS[2 + r.below(CIDRS.len() - 2)];
                            let mut rule = random_rule(&mut r);
                            rule.peers.push(Peer::IpBlock {
                                cidr: net(c),
                                except: ex.iter().map(|e| net(e)).collect(),
                            });
                            rules.push(rule);
                        }
                    }
                }
            }
            0 => {
                let keys: Vec<ObjectRef> = s.pods.keys().cloned().collect();
                if let Some(k) = keys.get(r.below(keys.len().max(1))) {
                    let pod = s.pods.get_mut(k).unwrap();
                    pod.labels.insert("app".into(), (*r.pick(&APPS)).to_owned());
                }
            }
            1 if r.chance(25) => {
                // A Node's labels: what a nodes peer selects.
                let zone = (*r.pick(&["a", "b"])).to_owned();
                if let Some(n) = s.nodes.get_mut("node-2") {
                    n.labels.insert("zone".into(), zone);
                }
            }
            1 => {
                let ns = *r.pick(&NAMESPACES);
                let team = (*r.pick(&["x", "y"])).to_owned();
                s.namespaces
                    .get_mut(ns)
                    .unwrap()
                    .labels
                    .insert("team".into(), team);
            }
            2 => {
                // A pod of index i has i's addresses: one added again in
                // another namespace replaces the first, as IPAM hands an
                // address to one running pod at a time (two claiming one
                // are admitted as either: LIMITS.md).
                let i = 20 + r.below(10);
                let pod = random_pod(&mut r, i);
                let taken: Vec<ObjectRef> = s
                    .pods
                    .iter()
                    .filter(|(_, q)| q.ips.iter().any(|ip| pod.ips.contains(ip)))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in taken {
                    s.pods.remove(&k);
                }
                s.upsert_pod(pod);
            }
            3 => {
                let keys: Vec<ObjectRef> = s.pods.keys().cloned().collect();
                if !keys.is_empty() {
                    s.pods.remove(&keys[r.below(keys.len())]);
                }
            }
            4 => {
                let i = r.below(6);
                if r.chance(30) {
                    put_cluster_policy(&mut s, random_cluster_policy(&mut r, i));
                } else {
                    put_policy(&mut s, random_policy(&mut r, i));
                }
            }
            _ => {
                let keys: Vec<ObjectRef> = s.policies.keys().cloned().collect();
                let cnps: Vec<String> = s.cluster_policies.keys().cloned().collect();
                if !cnps.is_empty() && r.chance(30) {
                    s.cluster_policies.remove(&cnps[r.below(cnps.len())]);
                } else if !keys.is_empty() {
                    s.policies.remove(&keys[r.below(keys.len())]);
                }
            }
        }
    }
    s
}

/// Addresses worth probing: every pod address, and the first and last
/// address of every CIDR and except with the neighbours just outside.
fn probe_addresses(s: &Snapshot, r: &mut Rng) -> Vec<IpAddr> {
    let mut out: BTreeSet<IpAddr> = BTreeSet::new();
    for p in s.pods.values() {
        out.extend(p.ips.iter().copied());
    }
    for n in s.nodes.values() {
        out.extend(n.addresses.iter().copied());
    }
    let mut nets: Vec<IpNet> = Vec::new();
    for (c, ex) in CIDRS {
        nets.push(net(c));
        nets.extend(ex.iter().map(|e| net(e)));
    }
    for n in nets {
        match n {
            IpNet::V4(n) => {
                let lo = u32::from(n.network());
                let hi = u32::from(n.broadcast());
                for a in [lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1)] {
                    out.insert(IpAddr::V4(Ipv4Addr::from(a)));
                }
            }
            IpNet::V6(n) => {
                let lo = u128::from(n.network());
                let hi = u128::from(n.broadcast());
                for a in [lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1)] {
                    out.insert(IpAddr::V6(Ipv6Addr::from(a)));
                }
            }
        }
    }
    for _ in 0..6 {
        out.insert(IpAddr::V4(Ipv4Addr::new(10, 0, 0, r.next() as u8)));
        out.insert(IpAddr::V4(Ipv4Addr::from(r.next() as u32)));
        out.insert(IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            0,
            r.next() as u16 & 0x1ff,
        )));
        out.insert(IpAddr::V6(Ipv6Addr::from(
            u128::from(r.next()) << 64 | u128::from(r.next()),
        )));
    }
    out.into_iter().collect()
}

fn probe_ports(r: &mut Rng) -> Vec<(u8, u16)> {
    let mut out = vec![(ICMP, 0)];
    let ports = [
        0u16, 1, 52, 53, 54, 79, 80, 81, 999, 1000, 1500, 2000, 2001, 5353, 8080, 9000, 9001,
        65534, 65535,
    ];
    for proto in [6u8, 17, 132] {
        for p in ports {
            out.push((proto, p));
        }
        out.push((proto, r.next() as u16));
    }
    out
}

fn local_pods(s: &Snapshot) -> Vec<&Pod> {
    s.pods
        .values()
        .filter(|p| p.is_networked() && p.node_name.as_deref() == Some("node-1"))
        .collect()
}

fn check_agrees(s: &Snapshot, c: &Compiled, r: &mut Rng) -> Result<(), TestCaseError> {
    let state = c.map_state();
    let addrs = probe_addresses(s, r);
    let ports = probe_ports(r);
    let locals = local_pods(s);
    prop_assert_eq!(locals.len(), state.endpoints.len());
    for pod in locals {
        for d in [Direction::Egress, Direction::Ingress] {
            for &a in &addrs {
                for &(proto, port) in &ports {
                    let want = reference_allows(s, pod, d, a, proto, port);
                    let got = simulate(&state, &pod.id, d, a, proto, port);
                    prop_assert_eq!(
                        got,
                        want,
                        "{} {:?} peer {} proto {} port {}",
                        pod.id,
                        d,
                        a,
                        proto,
                        port
                    );
                }
            }
        }
    }
    Ok(())
}

/// A rule as the reference names it: `(policy, index, tier)`.
type Named = (String, usize, Option<Tier>);

/// A tiered rule as the reference names it.
fn named(r: &RuleRef) -> Named {
    (r.policy.name.clone(), r.index, r.tier)
}

/// The decision the reference evaluator gives: (allowed, stage, Pass
/// chain, deciding tiered rule), and whether NetworkPolicy decided with
/// rules (`Some(true)`: some rule allows; `Some(false)`: none does).
fn reference_decision(
    s: &Snapshot,
    pod: &Pod,
    d: Direction,
    a: IpAddr,
    proto: u8,
    port: u16,
) -> (Stage, Vec<Named>, Vec<Named>) {
    let name = |t: Tier, (p, i, _): (&str, usize, Action)| (p.to_owned(), i, Some(t));
    let mut passed = Vec::new();
    match tier_rule(s, Tier::Admin, pod, d, a, proto, port) {
        Some(r @ (_, _, Action::Accept | Action::Deny)) => {
            return (Stage::Admin, passed, vec![name(Tier::Admin, r)]);
        }
        Some(r) => passed.push(name(Tier::Admin, r)),
        None => {}
    }
    if np_isolates(s, pod, d) {
        return (Stage::NetworkPolicy, passed, Vec::new());
    }
    match tier_rule(s, Tier::Baseline, pod, d, a, proto, port) {
        Some(r @ (_, _, Action::Accept | Action::Deny)) => {
            (Stage::Baseline, passed, vec![name(Tier::Baseline, r)])
        }
        Some(r) => {
            passed.push(name(Tier::Baseline, r));
            (Stage::Default, passed, Vec::new())
        }
        None => (Stage::Default, passed, Vec::new()),
    }
}

/// Whether some entry of `endpoint`'s direction `d` (in the maps or
/// names only) but those of `pod`'s own addresses carries decisions: a
/// `ClusterNetworkPolicy` applies to the direction.
fn tiered(c: &Compiled, pod: &Pod, endpoint: u32, d: Direction) -> bool {
    let other = |t: &netpol_agent::compiler::PolicyTarget| {
        t.endpoint == endpoint
            && t.direction == d
            && !pod.ips.iter().any(|&ip| IpNet::from(ip) == t.prefix)
    };
    c.policy_v4
        .iter()
        .chain(&c.policy_v6)
        .any(|(t, e)| other(t) && e.decisions.is_some())
        || c.named.keys().any(other)
}

/// Where a `ClusterNetworkPolicy` decides an endpoint direction, the
/// longest prefix covering a peer among its entries and its names-only
/// prefixes carries a decision for every (protocol, port),
/// with the reference's verdict, stage, Pass chain and deciding rule; a
/// `NetworkPolicy` decision names rules exactly when it allows (not for
/// the pod's own address, which it never restricts).
fn check_decisions(s: &Snapshot, c: &Compiled, r: &mut Rng) -> Result<(), TestCaseError> {
    let addrs = probe_addresses(s, r);
    let ports = probe_ports(r);
    for pod in local_pods(s) {
        let id = c.endpoints[&pod.id].id;
        for d in [Direction::Egress, Direction::Ingress] {
            for &a in &addrs {
                for &(proto, port) in &ports {
                    let (stage, passed, rules) = reference_decision(s, pod, d, a, proto, port);
                    let decision: Option<&Decision> = c.decision_at(id, d, a, proto, port);
                    let at = format!("{} {d:?} peer {a} proto {proto} port {port}", pod.id);
                    if !tiered(c, pod, id, d) {
                        // Then no ClusterNetworkPolicy rule may decide (a
                        // hairpin's own address is named all the same).
                        prop_assert!(
                            decision.is_none_or(|x| x.allowed && pod.ips.contains(&a))
                                && (stage == Stage::NetworkPolicy
                                    || (stage == Stage::Default && passed.is_empty())),
                            "{}: the reference has {:?} {:?} {:?}, the entry no decisions",
                            at,
                            stage,
                            passed,
                            rules
                        );
                        continue;
                    }
                    let Some(got) = decision else {
                        return Err(TestCaseError::fail(format!("{at}: no decision")));
                    };
                    prop_assert_eq!(
                        got.allowed,
                        reference_allows(s, pod, d, a, proto, port),
                        "{}",
                        at
                    );
                    prop_assert_eq!(got.stage, stage, "{}", at);
                    let got_passed: Vec<_> = got.passed.iter().map(named).collect();
                    prop_assert_eq!(got_passed, passed, "{}", at);
                    if stage == Stage::NetworkPolicy {
                        let own = pod.ips.contains(&a) && hairpin_judged(s, pod);
                        prop_assert_eq!(
                            !got.rules.is_empty(),
                            got.allowed && !own,
                            "{}: {}",
                            at,
                            got
                        );
                        prop_assert!(got.rules.iter().all(|r| r.tier.is_none()), "{}", at);
                    } else {
                        let got_rules: Vec<_> = got.rules.iter().map(named).collect();
                        prop_assert_eq!(got_rules, rules, "{}", at);
                    }
                }
            }
        }
    }
    Ok(())
}

/// `cases` cases; failures are kept in `props.proptest-regressions` beside
/// this file (the default place would be `tests/proptest-regressions/`,
/// beside this binary's folder, as it holds a `main.rs`).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn simulator_on_compiled_entries_agrees_with_reference(seed in any::<u64>()) {
        let s = random_cluster(seed);
        let c = compile(&s, &IdAllocation::default());
        let mut r = Rng(seed ^ 0x5555);
        check_agrees(&s, &c, &mut r)?;
        check_decisions(&s, &c, &mut r)?;
    }

    #[test]
    fn compile_is_deterministic(seed in any::<u64>()) {
        let s = random_cluster(seed);
        let a = compile(&s, &IdAllocation::default());
        let b = compile(&s, &IdAllocation::default());
        prop_assert_eq!(a, b);
    }

}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn diff_applied_to_old_maps_gives_new_maps_and_every_step_is_safe(
        seed in any::<u64>(),
        change in any::<u64>(),
    ) {
        let a = random_cluster(seed);
        let b = mutate(&a, change);
        let ca = compile(&a, &IdAllocation::default());
        let cb = compile(&b, &ca.ids);
        let d = diff(&ca, &cb);
        let mut state = ca.map_state();
        let (old_state, new_state) = (ca.map_state(), cb.map_state());

        // Pods enforced with the same id before and after: every
        // intermediate verdict is the old or the new one.
        let mut r = Rng(change);
        let addrs = probe_addresses(&b, &mut r);
        let ports: Vec<(u8, u16)> = probe_ports(&mut r).into_iter().step_by(5).collect();
        let stable: Vec<ObjectRef> = old_state
            .endpoints
            .iter()
            .filter(|(k, v)| new_state.endpoints.get(*k).is_some_and(|n| n.id == v.id))
            .map(|(k, _)| k.clone())
            .collect();
        let verdicts = |st: &MapState| -> BTreeMap<(usize, u8, usize, usize), bool> {
            let mut m = BTreeMap::new();
            for (pi, pod) in stable.iter().enumerate() {
                for (di, dir) in [Direction::Egress, Direction::Ingress].into_iter().enumerate() {
                    for (ai, &a) in addrs.iter().enumerate() {
                        for (qi, &(proto, port)) in ports.iter().enumerate() {
                            m.insert((pi, di as u8, ai, qi), simulate(st, pod, dir, a, proto, port));
                        }
                    }
                }
            }
            m
        };
        let (before, after) = (verdicts(&old_state), verdicts(&new_state));
        for (i, op) in d.raw().enumerate() {
            state.apply_op(&op);
            let now = verdicts(&state);
            for (k, v) in &now {
                prop_assert!(
                    *v == before[k] || *v == after[k],
                    "op {} of {}: verdict {:?} = {} is neither old nor new", i, d.ops.len(), k, v
                );
            }
        }
        prop_assert_eq!(state, new_state);
        let mut r = Rng(change ^ 0xaaaa);
        check_agrees(&b, &cb, &mut r)?;
    }
}

/// What an endpoint direction allows, by content: isolation and its
/// entries with their rule sets' contents.
type Contents = (bool, Vec<(IpNet, Option<RuleSet>)>);

fn contents(c: &Compiled, pod: &ObjectRef, d: Direction) -> Contents {
    let e = &c.endpoints[pod];
    let entries = c
        .policy_v4
        .iter()
        .chain(c.policy_v6.iter())
        .filter(|(t, _)| t.endpoint == e.id && t.direction == d)
        .map(|(t, v)| (t.prefix, c.rulesets.get(&v.ruleset).cloned()))
        .collect();
    (e.isolated(d), entries)
}

/// Endpoint directions present in both outputs keep their generation
/// exactly when their contents stay.
fn check_generations(a: &Compiled, b: &Compiled) -> Result<(), TestCaseError> {
    for (pod, eb) in &b.endpoints {
        let Some(ea) = a.endpoints.get(pod) else {
            continue;
        };
        for d in [Direction::Egress, Direction::Ingress] {
            let same = contents(a, pod, d) == contents(b, pod, d);
            prop_assert_eq!(
                same,
                ea.generation(d) == eb.generation(d),
                "{} {:?}: contents same {}, generations {} {}",
                pod,
                d,
                same,
                ea.generation(d),
                eb.generation(d)
            );
            prop_assert_eq!(eb.generation(d) == 0, !eb.isolated(d));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn compiler_updates_equal_full_compiles_and_their_diffs(
        seed in any::<u64>(),
        change in any::<u64>(),
    ) {
        let mut s = random_cluster(seed);
        let mut inc = Compiler::new(&s, &IdAllocation::default());
        let mut full = compile(&s, &IdAllocation::default());
        prop_assert_eq!(inc.compiled(), &full);
        for step in 0..4u64 {
            let next_snap = mutate(&s, change.wrapping_add(step.wrapping_mul(0x9E37_79B9)));
            let changes = Changes::between(&s, &next_snap);
            let next = compile(&next_snap, &full.ids);
            let d = inc.update(&next_snap, &changes);
            prop_assert_eq!(inc.compiled(), &next, "step {}: {:?}", step, changes);
            prop_assert_eq!(&d, &diff(&full, &next), "step {}: diff", step);
            check_generations(&full, &next)?;
            full = next;
            s = next_snap;
        }
    }
}

/// The interfaces of a cluster's local pods: the same pod (name and uid)
/// keeps its interface across `history`, a new one gets the next index.
fn interfaces(
    c: &Compiled,
    history: &mut BTreeMap<(ObjectRef, Option<String>), u32>,
) -> BTreeMap<ObjectRef, u32> {
    c.endpoints
        .keys()
        .map(|pod| {
            let uid = c.ids.endpoints[pod].uid.clone();
            let next = 10 + u32::try_from(history.len()).unwrap();
            (
                pod.clone(),
                *history.entry((pod.clone(), uid)).or_insert(next),
            )
        })
        .collect()
}

/// The pinned maps a previous agent leaves: `c` with its pods' entries
/// at their interfaces.
fn pinned(c: &Compiled, at: &BTreeMap<ObjectRef, u32>) -> Mirror {
    let s = c.map_state();
    Mirror {
        endpoints: s.endpoints.iter().map(|(p, &e)| (at[p], e)).collect(),
        policy_v4: s.policy_v4,
        policy_v6: s.policy_v6,
        ports: s.ports,
        frontends_v4: s.frontends_v4,
        frontends_v6: s.frontends_v6,
        slots: BTreeMap::new(),
    }
}

/// The datapath's verdicts at interfaces from the exact maps: no entry
/// is no judgement (open), an unprogrammed one is dropped (new pods fail
/// closed).
struct Judge {
    state: MapState,
}

impl Judge {
    fn new(m: &Mirror) -> Self {
        Self {
            state: MapState {
                endpoints: m
                    .endpoints
                    .iter()
                    .map(|(i, e)| (ObjectRef::new("if", i.to_string()), *e))
                    .collect(),
                policy_v4: m.policy_v4.clone(),
                policy_v6: m.policy_v6.clone(),
                ports: m.ports.clone(),
                ..MapState::default()
            },
        }
    }

    fn allows(&self, ifindex: u32, d: Direction, peer: IpAddr, proto: u8, port: u16) -> bool {
        let pod = ObjectRef::new("if", ifindex.to_string());
        let Some(info) = self.state.endpoints.get(&pod) else {
            return true;
        };
        if info.flags & netpol_common::endpoint_flags::NOT_PROGRAMMED != 0 {
            return false;
        }
        simulate(&self.state, &pod, d, peer, proto, port)
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// A restart: a previous agent compiled `a` after a history of pods
    /// that came and went (its ids are not a fresh compile's), left its
    /// maps and (fresh, stale or no) state file; a new agent starts on
    /// `b`. Its first apply runs as `SyncLoop::sync` runs it (resume,
    /// compile, diff through the writer, interface entries, leftovers), and
    /// after every single kernel operation, whatever an interface allows
    /// its pod's old or new state allows.
    #[test]
    fn a_restart_is_safe_at_every_kernel_operation(
        seed in any::<u64>(),
        history in any::<u64>(),
        change in any::<u64>(),
        state_file in 0u8..3,
    ) {
        let a = random_cluster(seed);
        let earlier = mutate(&a, history);
        // While the agent was down, pods came and went: one local pod
        // gone (its veth may linger) and one new, whose id may be the
        // gone one's.
        let mut b = mutate(&a, change);
        let mut churn = Rng(change.rotate_left(17));
        let locals: Vec<ObjectRef> = local_pods(&b).iter().map(|p| p.id.clone()).collect();
        if !locals.is_empty() {
            b.pods.remove(&locals[churn.below(locals.len())]);
        }
        let n = 30 + churn.below(6);
        let mut pod = random_pod(&mut churn, n);
        pod.node_name = Some("node-1".into());
        b.upsert_pod(pod);
        let c0 = compile(&earlier, &IdAllocation::default());
        let ca = compile(&a, &c0.ids);
        let mut ifaces = BTreeMap::new();
        let at0 = interfaces(&c0, &mut ifaces);
        let at_a = interfaces(&ca, &mut ifaces);
        let probe = compile(&b, &IdAllocation::default());
        let at_b = interfaces(&probe, &mut ifaces);

        // New pods' interfaces exist before the first apply, unprogrammed.
        let mut maps = pinned(&ca, &at_a);
        for &i in at_b.values() {
            maps.endpoints.entry(i).or_insert_with(|| unbound_entry(i));
        }
        let bound = |c: &Compiled, at: &BTreeMap<ObjectRef, u32>| -> BTreeMap<ObjectRef, Bound> {
            at.iter()
                .filter(|(p, _)| c.endpoints.contains_key(*p))
                .map(|(p, &i)| (p.clone(), Bound { ifindex: i, name: format!("veth{i}") }))
                .collect()
        };
        let state = |c: &Compiled, s: &Snapshot, at| State::build(&Inputs {
            compiled: c,
            snapshot: s,
            interfaces: &bound(c, at),
            generation: 1,
            fingerprint: None,
            pin_dir: std::path::Path::new("/sys/fs/bpf/netpol"),
        });
        let known = match state_file {
            0 => None,
            1 => Some(state(&ca, &a, &at_a)),
            _ => Some(state(&c0, &earlier, &at0)),
        };

        let mut writer = MapWriter::new(
            FakeBackend { state: maps.clone(), ..FakeBackend::default() },
            maps.clone(),
        );
        let resumed = resume(writer.mirror(), known.as_ref(), &probe, &at_b);
        let new = compile(&b, &resumed.old.ids);
        let ops: Vec<_> = diff(&resumed.old, &new).raw().collect();
        writer.apply(&ops, &at_b).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Interfaces of pods gone while the agent was down: some linger
        // (their entry turns unprogrammed), the rest are gone (no packet
        // crosses them; their entry is deleted).
        let mut r = Rng(change ^ history);
        let lingering: BTreeSet<u32> = maps
            .endpoints
            .keys()
            .filter(|i| !at_b.values().any(|j| j == *i) && r.chance(50))
            .copied()
            .collect();
        let mut endpoints = Vec::new();
        for (&i, e) in &writer.mirror().endpoints.clone() {
            match at_b.iter().find(|&(_, &j)| j == i) {
                Some((pod, _)) if *e != new.endpoints[pod].info() => {
                    endpoints.push(KernelOp::EndpointUpsert(i, new.endpoints[pod].info()));
                }
                Some(_) => {}
                None if lingering.contains(&i) => {
                    endpoints.push(KernelOp::EndpointUpsert(i, unbound_entry(i)));
                }
                None => endpoints.push(KernelOp::EndpointDelete(i)),
            }
        }
        writer.apply_kernel(&endpoints).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let sweep = leftovers(writer.mirror(), &new);
        writer.apply_kernel(&sweep).map_err(|e| TestCaseError::fail(e.to_string()))?;

        let end = writer.mirror().clone();
        let want = new.map_state();
        prop_assert_eq!(&end.policy_v4, &want.policy_v4);
        prop_assert_eq!(&end.policy_v6, &want.policy_v6);
        prop_assert_eq!(&end.ports, &want.ports);
        prop_assert_eq!(&end.frontends_v4, &want.frontends_v4);
        for (pod, &i) in &at_b {
            prop_assert_eq!(end.endpoints.get(&i).copied(), Some(new.endpoints[pod].info()));
        }

        let mut addrs = probe_addresses(&b, &mut r);
        addrs.extend(probe_addresses(&a, &mut r));
        let ports: Vec<(u8, u16)> = probe_ports(&mut r).into_iter().step_by(5).collect();
        let judged: Vec<u32> = maps.endpoints.keys().copied().collect();
        let pod_gone = |i: u32| !at_b.values().any(|&j| j == i);
        let verdicts = |m: &Mirror, after: bool| {
            let judge = Judge::new(m);
            let mut v = BTreeMap::new();
            for &i in &judged {
                // A deleted interface carries nothing.
                if !m.endpoints.contains_key(&i) && pod_gone(i) && !lingering.contains(&i) {
                    continue;
                }
                for d in [Direction::Egress, Direction::Ingress] {
                    for &peer in &addrs {
                        for &(proto, port) in &ports {
                            // A gone pod allows nothing new.
                            let allowed =
                                !(after && pod_gone(i)) && judge.allows(i, d, peer, proto, port);
                            v.insert((i, d, peer, proto, port), allowed);
                        }
                    }
                }
            }
            v
        };
        let (before, after) = (verdicts(&maps, false), verdicts(&end, true));
        let mut now = maps.clone();
        let log = &writer.backend().log;
        for (n, op) in log.iter().enumerate() {
            now.apply_op(op);
            for (k, allowed) in verdicts(&now, false) {
                prop_assert!(
                    !allowed || before[&k] || after.get(&k) == Some(&true),
                    "after operation {} of {} ({:?}): interface {} allows {:?} \
                     which neither its old nor its new pod allows",
                    n + 1, log.len(), op, k.0, k
                );
            }
        }
    }
}

/// `s` with some policies staged and some staged for deletion (`seed`
/// picks; about a third of the seeds stage nothing).
fn stage(mut s: Snapshot, seed: u64) -> Snapshot {
    let mut r = Rng(seed);
    if r.chance(33) {
        return s;
    }
    let pick = |r: &mut Rng| match r.below(10) {
        0..=2 => Staging::Staged,
        3 => Staging::StagedDelete,
        _ => Staging::Enforced,
    };
    let ids: Vec<ObjectRef> = s.policies.keys().cloned().collect();
    for id in ids {
        let staging = pick(&mut r);
        if let Some(p) = s.policies.get_mut(&id).and_then(|x| x.in_force.as_mut()) {
            p.staging = staging;
        }
    }
    let names: Vec<String> = s.cluster_policies.keys().cloned().collect();
    for name in names {
        let staging = pick(&mut r);
        if let Some(p) = s
            .cluster_policies
            .get_mut(&name)
            .and_then(|x| x.in_force.as_mut())
        {
            p.staging = staging;
        }
    }
    s
}

/// `s` with every staged change promoted: staged policies enforced, those
/// staged for deletion deleted (the staged view, as the API server holds
/// it once the annotations are acted on).
fn promote(s: &Snapshot) -> Snapshot {
    let mut p = s.clone();
    promote_slots(&mut p.policies, |x| &mut x.staging);
    promote_slots(&mut p.cluster_policies, |x| &mut x.staging);
    p
}

/// [`promote`] of one kind of policy.
fn promote_slots<K: Ord + Clone, P: Clone>(
    slots: &mut netpol_agent::model::Map<K, PolicySlot<P>>,
    staging: impl Fn(&mut P) -> &mut Staging,
) {
    let keys: Vec<K> = slots.keys().cloned().collect();
    for k in keys {
        let Some(p) = slots.get_mut(&k).and_then(|x| x.in_force.as_mut()) else {
            continue;
        };
        match *staging(p) {
            Staging::StagedDelete => {
                slots.remove(&k);
            }
            Staging::Staged => *staging(p) = Staging::Enforced,
            Staging::Enforced => {}
        }
    }
}

/// An endpoint direction's entries by content: prefix → rule set (`None`:
/// the empty set that shadows a shorter prefix).
fn entry_contents(c: &Compiled, endpoint: u32, d: Direction) -> BTreeMap<IpNet, Option<RuleSet>> {
    c.policy_v4
        .iter()
        .chain(&c.policy_v6)
        .filter(|(t, _)| t.endpoint == endpoint && t.direction == d)
        .map(|(t, e)| (t.prefix, c.rulesets.get(&e.ruleset).cloned()))
        .collect()
}

proptest! {
    #![proptest_config(config(96))]

    /// With staged policies the maps hold the enforced view exactly as
    /// its own compile does, and each endpoint direction the staged view
    /// judges differently (and only those) is flagged, with entries under
    /// its staged id whose contents are the staged view's own compile's.
    /// (Each view's compile is checked against the reference evaluator by
    /// the tests above: views are random clusters too.)
    #[test]
    fn staged_views_are_overlaid_where_they_differ_and_only_there(
        seed in any::<u64>(),
        staging in any::<u64>(),
    ) {
        let s = stage(random_cluster(seed), staging);
        let c = compile(&s, &IdAllocation::default());
        let Some(views) = s.views() else {
            prop_assert_eq!(&c, &compile(&s, &IdAllocation::default()));
            return Ok(());
        };
        let enforced = compile(&views.enforced, &IdAllocation::default());
        let staged = compile(&views.staged, &IdAllocation::default());
        let below = |m: &BTreeMap<PolicyTarget, PolicyEntry>| -> BTreeMap<PolicyTarget, PolicyEntry> {
            m.iter()
                .filter(|(t, _)| t.endpoint & STAGED_ENDPOINT_BIT == 0)
                .map(|(t, e)| (*t, e.clone()))
                .collect()
        };
        prop_assert_eq!(below(&c.policy_v4), enforced.policy_v4.clone());
        prop_assert_eq!(below(&c.policy_v6), enforced.policy_v6.clone());
        for (pod, ep) in &c.endpoints {
            let mut plain = ep.clone();
            plain.staged_ingress = None;
            plain.staged_egress = None;
            plain.staged_hairpin_judged = None;
            prop_assert_eq!(&plain, &enforced.endpoints[pod]);
            let st = &staged.endpoints[pod];
            // A hairpin the staged view judges the other way is flagged.
            prop_assert_eq!(
                ep.staged_hairpin_judged,
                (st.hairpin_judged != ep.hairpin_judged).then_some(st.hairpin_judged)
            );
            for d in [Direction::Ingress, Direction::Egress] {
                let now = entry_contents(&c, ep.id, d);
                let would = entry_contents(&staged, st.id, d);
                let differs = ep.isolated(d) != st.isolated(d) || now != would;
                match ep.staged(d) {
                    None => prop_assert!(!differs, "{} {:?}: the views differ, no flag", pod, d),
                    Some(isolated) => {
                        prop_assert!(differs, "{} {:?}: flagged, the views agree", pod, d);
                        prop_assert_eq!(isolated, st.isolated(d));
                        prop_assert_eq!(entry_contents(&c, staged_endpoint(ep.id), d), would);
                    }
                }
                if ep.staged(d).is_none() {
                    prop_assert!(entry_contents(&c, staged_endpoint(ep.id), d).is_empty());
                }
            }
        }
    }

    /// Every staged change promoted at once (annotations removed, staged
    /// deletes deleted): the incremental compiler takes the staged view it
    /// kept instead of compiling again, with the same output and diff as
    /// a full compile; the change after it goes on incrementally from
    /// there, equal too.
    #[test]
    fn a_promotion_takes_the_kept_staged_view_and_equals_a_full_compile(
        seed in any::<u64>(),
        staging in any::<u64>(),
    ) {
        let s = stage(random_cluster(seed), staging);
        prop_assume!(s.has_staged());
        let mut inc = Compiler::new(&s, &IdAllocation::default());
        let full = compile(&s, &IdAllocation::default());
        let promoted = promote(&s);
        prop_assert!(!promoted.has_staged());
        let next = compile(&promoted, &full.ids);
        let d = inc.update(&promoted, &Changes::between(&s, &promoted));
        prop_assert_eq!(inc.compiled(), &next, "promotion");
        prop_assert_eq!(&d, &diff(&full, &next), "promotion: diff");
        let after = mutate(&promoted, staging.rotate_left(13));
        let then = compile(&after, &next.ids);
        let d = inc.update(&after, &Changes::between(&promoted, &after));
        prop_assert_eq!(inc.compiled(), &then, "the change after");
        prop_assert_eq!(&d, &diff(&next, &then), "the change after: diff");
    }

    /// The incremental compiler with policies staged, promoted and
    /// unstaged between steps: the same output and diff as full compiles.
    #[test]
    fn compiler_updates_equal_full_compiles_through_staging(
        seed in any::<u64>(),
        change in any::<u64>(),
    ) {
        let mut s = stage(random_cluster(seed), change);
        let mut inc = Compiler::new(&s, &IdAllocation::default());
        let mut full = compile(&s, &IdAllocation::default());
        prop_assert_eq!(inc.compiled(), &full);
        for step in 0..4u64 {
            let k = change.wrapping_add(step.wrapping_mul(0x9E37_79B9));
            let next_snap = stage(mutate(&s, k), k.rotate_left(9));
            let changes = Changes::between(&s, &next_snap);
            let next = compile(&next_snap, &full.ids);
            let d = inc.update(&next_snap, &changes);
            prop_assert_eq!(inc.compiled(), &next, "step {}: {:?}", step, changes);
            prop_assert_eq!(&d, &diff(&full, &next), "step {}: diff", step);
            full = next;
            s = next_snap;
        }
    }
}

/// The verdict node-1 gives `src -> dst` in `s` by the reference: the
/// egress of a source and the ingress of a destination that are local
/// pods bound to an interface (`bound`); a side of another node, or not
/// bound, is not judged here.
fn node_verdict(
    s: &Snapshot,
    bound: &BTreeSet<ObjectRef>,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    let local = |a: IpAddr| {
        local_pods(s)
            .into_iter()
            .find(|p| bound.contains(&p.id) && p.ips.contains(&a))
    };
    local(src).is_none_or(|p| reference_allows(s, p, Direction::Egress, dst, proto, port))
        && local(dst).is_none_or(|p| reference_allows(s, p, Direction::Ingress, src, proto, port))
}

/// The objects of `b` that are new or changed against `a`, as manifests
/// to apply would hold them; `None` when `b` lost an object.
fn upserts(a: &Snapshot, b: &Snapshot) -> Option<Snapshot> {
    fn changed<K: Ord + Clone, V: Clone + PartialEq>(
        a: &netpol_agent::model::Map<K, V>,
        b: &netpol_agent::model::Map<K, V>,
    ) -> Option<netpol_agent::model::Map<K, V>> {
        if a.keys().any(|k| !b.contains_key(k)) {
            return None;
        }
        Some(
            b.iter()
                .filter(|(k, v)| a.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
    Some(Snapshot {
        nodes: changed(&a.nodes, &b.nodes)?,
        namespaces: changed(&a.namespaces, &b.namespaces)?,
        pods: changed(&a.pods, &b.pods)?,
        policies: changed(&a.policies, &b.policies)?,
        services: changed(&a.services, &b.services)?,
        cluster_policies: changed(&a.cluster_policies, &b.cluster_policies)?,
        ..Snapshot::default()
    })
}

proptest! {
    #![proptest_config(config(1000))]

    /// `netpol-agent diff`'s prediction: node-1's live maps (a compile of
    /// `a` with its pods bound) against `b` compiled the way `diff` does
    /// report exactly the probed pod pairs, protocols and ports whose
    /// verdict on node-1 the reference says changes, with both verdicts.
    #[test]
    fn diff_predicts_exactly_the_verdicts_a_change_changes(
        seed in any::<u64>(),
        change in any::<u64>(),
    ) {
        use netpol_agent::inspect::{CompiledMaps, diff as predict, explain::{Explainer, Verdict}};
        let a = random_cluster(seed);
        let b = mutate(&a, change);
        if let Some(u) = upserts(&a, &b) {
            prop_assert_eq!(predict::apply(&a, &u).expect("valid"), b.clone());
        }
        let ca = compile(&a, &IdAllocation::default());
        let at = interfaces(&ca, &mut BTreeMap::new());
        let bound: BTreeMap<ObjectRef, Bound> = at
            .iter()
            .map(|(p, &i)| (p.clone(), Bound { ifindex: i, name: format!("veth{i}") }))
            .collect();
        let live_state = State::build(&Inputs {
            compiled: &ca,
            snapshot: &a,
            interfaces: &bound,
            generation: 1,
            fingerprint: None,
            pin_dir: std::path::Path::new("/sys/fs/bpf/netpol"),
        });
        let config = netpol_common::GlobalConfig::default();
        let live = CompiledMaps::new(&ca, &at, config);
        let future = predict::predict(&b, "node-1", &live_state, config);
        let pairs = predict::Pairs::of(&a, &b, "node-1");
        let now_x = Explainer::new(&live, Some(&live_state)).expect("explainer");
        let after_x = Explainer::new(&future.maps, Some(&future.state)).expect("explainer");
        let found = predict::changes(&now_x, &after_x, &pairs).expect("changes");
        let names: BTreeSet<ObjectRef> = at.keys().cloned().collect();
        let verdict = |v: bool| if v { Verdict::Allowed } else { Verdict::Denied };
        // Every reported range is a change at both ends.
        for c in &found {
            let proto = netpol_agent::inspect::parse_protocol(&c.protocol).expect("protocol");
            for port in [c.first, c.last] {
                prop_assert_eq!(
                    (verdict(node_verdict(&a, &names, c.src, c.dst, proto, port)),
                     verdict(node_verdict(&b, &names, c.src, c.dst, proto, port))),
                    (c.now, c.after),
                    "{:?} at {}", c, port
                );
            }
        }
        // Every probed change is reported, and nothing else.
        let mut r = Rng(seed ^ change);
        let ports: Vec<(u8, u16)> =
            probe_ports(&mut r).into_iter().filter(|&(p, _)| p != ICMP).collect();
        for &(src, dst) in &pairs.pairs {
            for &(proto, port) in &ports {
                let want = (
                    node_verdict(&a, &names, src, dst, proto, port),
                    node_verdict(&b, &names, src, dst, proto, port),
                );
                let row = found.iter().find(|c| {
                    c.src == src
                        && c.dst == dst
                        && c.protocol == netpol_agent::inspect::protocol_name(proto)
                        && (c.first..=c.last).contains(&port)
                });
                if want.0 == want.1 {
                    prop_assert!(row.is_none(), "{src} -> {dst} {proto}/{port}: reported {row:?}");
                } else {
                    let row = row.ok_or_else(|| {
                        TestCaseError::fail(format!(
                            "{src} -> {dst} {proto}/{port}: {want:?} not reported"
                        ))
                    })?;
                    prop_assert_eq!((row.now, row.after), (verdict(want.0), verdict(want.1)));
                }
            }
        }
    }
}
