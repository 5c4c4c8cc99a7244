//! Shared helpers of the compiler tests: the reference evaluator (the spec
//! written as plainly as possible), the userspace LPM simulator that answers
//! the same question from compiled map entries, and cluster builders.

use std::borrow::Cow;
use std::net::IpAddr;

use netpol_agent::compiler::{Compiled, Direction, MapState, RuleSet};
use netpol_agent::model::{
    Action, ClusterNetworkPolicy, ClusterPeer, ClusterPort, NetworkPolicy, Peer, Pod, PortSpec,
    Protocol, Rule, Snapshot, Tier,
};
use netpol_common::{PolicyKeyV4, PolicyKeyV6, PortKey, policy_selector};

pub const ICMP: u8 = 1;

/// The pod (networked, any node) owning `addr`.
pub fn pod_at(snap: &Snapshot, addr: IpAddr) -> Option<&Pod> {
    snap.pods
        .values()
        .find(|p| p.is_networked() && p.ips.contains(&addr))
}

fn rules(p: &NetworkPolicy, d: Direction) -> Option<&Vec<Rule>> {
    match d {
        Direction::Egress => p.egress.as_ref(),
        Direction::Ingress => p.ingress.as_ref(),
    }
}

/// Reference: the `NetworkPolicy` tier's verdict for `pod` in direction
/// `d` on the peer at `peer_addr` (the pod `peer`, if it is one) on
/// `proto`/`port`; `None` when no `NetworkPolicy` isolates the direction.
/// For egress `port` is the peer's, for ingress the pod's own.
fn np_verdict(
    snap: &Snapshot,
    pod: &Pod,
    d: Direction,
    peer_addr: IpAddr,
    proto: u8,
    port: u16,
) -> Option<bool> {
    let peer = pod_at(snap, peer_addr);
    let selecting = isolating(snap, pod, d);
    if selecting.is_empty() {
        return None;
    }
    // The pod whose named ports a rule names.
    let destination = match d {
        Direction::Ingress => Some(pod),
        Direction::Egress => peer,
    };
    Some(selecting.iter().any(|p| {
        rules(p, d).into_iter().flatten().any(|rule| {
            let peer_ok = rule.peers.is_empty()
                || rule.peers.iter().any(|peer_spec| match peer_spec {
                    Peer::IpBlock { cidr, except } => {
                        cidr.contains(&peer_addr) && !except.iter().any(|e| e.contains(&peer_addr))
                    }
                    Peer::Pods {
                        pod_selector,
                        namespace_selector,
                    } => peer.is_some_and(|q| {
                        let ns_ok = match namespace_selector {
                            None => q.id.namespace == p.id.namespace,
                            Some(sel) => sel.matches(&snap.namespace_labels(&q.id.namespace)),
                        };
                        ns_ok && pod_selector.as_ref().is_none_or(|s| s.matches(&q.labels))
                    }),
                });
            let port_ok = rule.ports.is_empty()
                || rule.ports.iter().any(|pp| {
                    pp.protocol.number() == proto
                        && match &pp.port {
                            PortSpec::All => true,
                            PortSpec::Range { first, last } => (*first..=*last).contains(&port),
                            PortSpec::Named(name) => destination
                                .is_some_and(|q| q.named_port(name, pp.protocol) == Some(port)),
                        }
                });
            peer_ok && port_ok
        })
    }))
}

/// Reference: does `pod`'s policy in direction `d` allow the peer at
/// `peer_addr` on `proto`/`port`? The Admin tier's first matching rule,
/// then `NetworkPolicy` if it isolates the direction, then the Baseline
/// tier's first matching rule, then allowed (CNP-SEMANTICS.md 2, 4-6).
pub fn reference_allows(
    snap: &Snapshot,
    pod: &Pod,
    d: Direction,
    peer_addr: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    match tier_verdict(snap, Tier::Admin, pod, d, peer_addr, proto, port) {
        Some(Action::Accept) => return true,
        Some(Action::Deny) => return false,
        Some(Action::Pass) | None => {}
    }
    if let Some(v) = np_verdict(snap, pod, d, peer_addr, proto, port) {
        // The pod's own address is the peer only of a hairpin through a
        // Service; when a ClusterNetworkPolicy applies to the pod that is
        // judged, and NetworkPolicy never restricts a pod's traffic to
        // itself (CNP-SEMANTICS.md 15).
        return v || (pod.ips.contains(&peer_addr) && hairpin_judged(snap, pod));
    }
    tier_verdict(snap, Tier::Baseline, pod, d, peer_addr, proto, port) != Some(Action::Deny)
}

/// Whether some `ClusterNetworkPolicy` with rules applies to `pod`: then
/// its traffic to itself through a Service is judged.
pub fn hairpin_judged(snap: &Snapshot, pod: &Pod) -> bool {
    let ns_labels = snap.namespace_labels(&pod.id.namespace);
    snap.cluster_policies
        .values()
        .filter_map(|s| s.in_force.as_ref())
        .any(|c| {
            (!c.ingress.is_empty() || !c.egress.is_empty()) && c.selects(&ns_labels, &pod.labels)
        })
}

/// The action of the first rule of `tier` matching the connection: the
/// policies applying to `pod` by priority, then name; rules in order.
pub fn tier_verdict(
    snap: &Snapshot,
    tier: Tier,
    pod: &Pod,
    d: Direction,
    peer_addr: IpAddr,
    proto: u8,
    port: u16,
) -> Option<Action> {
    tier_rule(snap, tier, pod, d, peer_addr, proto, port).map(|(_, _, a)| a)
}

/// The first rule of `tier` matching the connection: its policy's name,
/// its index and its action.
pub fn tier_rule<'s>(
    snap: &'s Snapshot,
    tier: Tier,
    pod: &Pod,
    d: Direction,
    peer_addr: IpAddr,
    proto: u8,
    port: u16,
) -> Option<(&'s str, usize, Action)> {
    if snap.cluster_policies.is_empty() {
        return None;
    }
    let ns_labels = |ns: &str| match snap.namespaces.get(ns) {
        Some(n) => Cow::Borrowed(&n.labels),
        None => Cow::Owned(snap.namespace_labels(ns)),
    };
    let own = ns_labels(&pod.id.namespace);
    let mut policies: Vec<&ClusterNetworkPolicy> = snap
        .cluster_policies
        .values()
        .filter_map(|s| s.in_force.as_ref())
        .filter(|c| c.tier == tier && c.selects(&own, &pod.labels))
        .collect();
    if policies.is_empty() {
        return None;
    }
    policies.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    let peer = pod_at(snap, peer_addr);
    let destination = match d {
        Direction::Ingress => Some(pod),
        Direction::Egress => peer,
    };
    for c in policies {
        let rules = match d {
            Direction::Ingress => &c.ingress,
            Direction::Egress => &c.egress,
        };
        for (index, rule) in rules.iter().enumerate() {
            let peer_ok = rule.peers.iter().any(|p| match p {
                ClusterPeer::Namespaces(sel) => {
                    peer.is_some_and(|q| sel.matches(&ns_labels(&q.id.namespace)))
                }
                ClusterPeer::Pods {
                    namespace_selector,
                    pod_selector,
                } => peer.is_some_and(|q| {
                    namespace_selector.matches(&ns_labels(&q.id.namespace))
                        && pod_selector.matches(&q.labels)
                }),
                ClusterPeer::Networks(nets) => nets.iter().any(|n| n.contains(&peer_addr)),
                ClusterPeer::Nodes(sel) => snap
                    .nodes
                    .values()
                    .any(|n| sel.matches(&n.labels) && n.addresses.contains(&peer_addr)),
            });
            let port_ok = rule.ports.as_ref().is_none_or(|list| {
                list.iter().any(|p| match p {
                    ClusterPort::Ports {
                        protocol,
                        first,
                        last,
                    } => protocol.number() == proto && (*first..=*last).contains(&port),
                    ClusterPort::Named(name) => Protocol::ALL
                        .into_iter()
                        .find(|p| p.number() == proto)
                        .is_some_and(|p| {
                            destination.is_some_and(|q| q.named_port(name, p) == Some(port))
                        }),
                })
            });
            if peer_ok && port_ok {
                return Some((&c.name, index, rule.action));
            }
        }
    }
    None
}

/// The `NetworkPolicies` selecting `pod` for `d`.
fn isolating<'s>(snap: &'s Snapshot, pod: &Pod, d: Direction) -> Vec<&'s NetworkPolicy> {
    snap.policies
        .values()
        .filter_map(|s| s.in_force.as_ref())
        .filter(|p| p.id.namespace == pod.id.namespace)
        .filter(|p| p.pod_selector.matches(&pod.labels))
        .filter(|p| rules(p, d).is_some())
        .collect()
}

/// Whether NetworkPolicy isolates `pod` for `d` (some policy selects it
/// for that direction).
pub fn np_isolates(snap: &Snapshot, pod: &Pod, d: Direction) -> bool {
    !isolating(snap, pod, d).is_empty()
}

/// Reference: a whole connection from pod `src` to pod `dst`.
pub fn reference_connection(
    snap: &Snapshot,
    src: &Pod,
    dst: &Pod,
    family_v6: bool,
    proto: u8,
    port: u16,
) -> bool {
    if src.id == dst.id {
        return true;
    }
    let (Some(sa), Some(da)) = (addr_of(src, family_v6), addr_of(dst, family_v6)) else {
        return false;
    };
    reference_allows(snap, src, Direction::Egress, da, proto, port)
        && reference_allows(snap, dst, Direction::Ingress, sa, proto, port)
}

pub fn addr_of(p: &Pod, v6: bool) -> Option<IpAddr> {
    p.ips.iter().copied().find(|a| a.is_ipv6() == v6)
}

/// Simulator: the datapath's decision for one direction of the endpoint of
/// `pod`, from the exact map contents.
pub fn simulate(
    state: &MapState,
    pod: &netpol_agent::model::ObjectRef,
    d: Direction,
    peer_addr: IpAddr,
    proto: u8,
    port: u16,
) -> bool {
    let info = state
        .endpoints
        .get(pod)
        .unwrap_or_else(|| panic!("{pod} is not a local endpoint"));
    let flag = match d {
        Direction::Egress => netpol_common::endpoint_flags::EGRESS_ISOLATED,
        Direction::Ingress => netpol_common::endpoint_flags::INGRESS_ISOLATED,
    };
    if info.flags & flag == 0 {
        return true;
    }
    let selector = policy_selector(info.id, d.raw());
    let ruleset = match peer_addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            (0..=32u32).rev().find_map(|len| {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                let key = PolicyKeyV4 {
                    selector,
                    addr: (bits & mask).to_be_bytes(),
                };
                state.policy_v4.get(&(32 + len, key))
            })
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            (0..=128u32).rev().find_map(|len| {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                let key = PolicyKeyV6 {
                    selector,
                    addr: (bits & mask).to_be_bytes(),
                };
                state.policy_v6.get(&(32 + len, key))
            })
        }
    };
    let Some(ruleset) = ruleset else {
        return false;
    };
    port_allows(state, ruleset.ruleset, proto, port)
}

/// Simulator of the port trie.
pub fn port_allows(state: &MapState, ruleset: u32, proto: u8, port: u16) -> bool {
    for k in (0..=16u32).rev() {
        let mask = if k == 0 { 0 } else { u16::MAX << (16 - k) };
        let key = PortKey {
            ruleset,
            protocol: proto,
            _pad: 0,
            port: (port & mask).to_be_bytes(),
        };
        if let Some(v) = state.ports.get(&(48 + k, key)) {
            return v.allow != 0;
        }
    }
    let key = PortKey {
        ruleset,
        protocol: 0,
        _pad: 0,
        port: [0, 0],
    };
    state.ports.get(&(32, key)).is_some_and(|v| v.allow != 0)
}

/// Simulator: a whole connection between two local pods.
pub fn simulate_connection(
    state: &MapState,
    src: &Pod,
    dst: &Pod,
    family_v6: bool,
    proto: u8,
    port: u16,
) -> bool {
    if src.id == dst.id {
        return true;
    }
    let (Some(sa), Some(da)) = (addr_of(src, family_v6), addr_of(dst, family_v6)) else {
        return false;
    };
    simulate(state, &src.id, Direction::Egress, da, proto, port)
        && simulate(state, &dst.id, Direction::Ingress, sa, proto, port)
}

/// Endpoint directions present in both outputs whose contents (isolation,
/// entries of both families with their rule sets' contents) are the same
/// must have the same generation, and different contents a different one;
/// an open direction has generation 0. The first violation, if any.
pub fn generation_violation(a: &Compiled, b: &Compiled) -> Option<String> {
    let contents = |c: &Compiled, id: u32, isolated: bool, d: Direction| {
        let entries: Vec<(ipnet::IpNet, Option<RuleSet>)> = c
            .policy_v4
            .iter()
            .chain(c.policy_v6.iter())
            .filter(|(t, _)| t.endpoint == id && t.direction == d)
            .map(|(t, v)| (t.prefix, c.rulesets.get(&v.ruleset).cloned()))
            .collect();
        (isolated, entries)
    };
    for (pod, eb) in &b.endpoints {
        for d in [Direction::Egress, Direction::Ingress] {
            if (eb.generation(d) == 0) == eb.isolated(d) {
                return Some(format!(
                    "{pod} {d:?}: generation {} but isolated {}",
                    eb.generation(d),
                    eb.isolated(d)
                ));
            }
            let Some(ea) = a.endpoints.get(pod) else {
                continue;
            };
            let same =
                contents(a, ea.id, ea.isolated(d), d) == contents(b, eb.id, eb.isolated(d), d);
            if same != (ea.generation(d) == eb.generation(d)) {
                return Some(format!(
                    "{pod} {d:?}: contents same {same}, generations {} -> {}",
                    ea.generation(d),
                    eb.generation(d)
                ));
            }
        }
    }
    None
}
