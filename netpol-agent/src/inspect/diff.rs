//! `netpol-agent diff`: what applying manifests would change on this node,
//! predicted against the live maps and conntrack.
//!
//! The cluster after the change is the current one with the manifests'
//! objects created or replaced ([`apply`]); it is compiled for this node
//! as the agent would compile it, with the pods bound to the interfaces
//! they are bound to now ([`predict`]). Both readings, the live maps and
//! the compiled prediction, are judged by the same [`Explainer`]:
//! - [`changes`]: for every ordered pair of pod addresses with a side on
//!   this node, the TCP, UDP and SCTP port ranges whose verdict differs.
//!   A pair whose sides let through the same blocks in both readings is
//!   skipped; otherwise the verdict is evaluated at every port where a
//!   block of either reading starts or ends, and is constant in between;
//! - [`cuts`]: the tracked connections the next packet would re-judge and
//!   drop (`revalidate` in the programs): those admitted by policy or by
//!   a not isolated direction, not yet expired, whose side here allows
//!   them now and would not after.
//!
//! Not covered: ICMP, addresses that are not pods' (ipBlock peers, the
//! node), a pod reaching itself, and connections through a Service at
//! the client's side (admitted as Service traffic, never re-judged: the
//! backend's side, where tracked, is).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use netpol_common::{GlobalConfig, direction, protocol, reason};
use serde::Serialize;

use super::{
    CompiledMaps, Connection,
    explain::{Allowance, ExplainError, Explainer, Query, Target, Verdict},
    protocol_name,
};
use crate::{
    compiler::{Direction, IdAllocation, compile},
    model::{ModelError, ObjectRef, Snapshot},
    provenance::{Bound, Inputs, State},
};

/// The protocols with ports `diff` covers.
const PROTOCOLS: [u8; 3] = [protocol::TCP, protocol::UDP, protocol::SCTP];

/// A range of ports of one pod pair whose verdict on this node changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The client's address.
    pub src: IpAddr,
    /// Its pod (`namespace/name`).
    pub src_pod: String,
    /// The server's address.
    pub dst: IpAddr,
    /// Its pod.
    pub dst_pod: String,
    /// 4 or 6.
    pub family: u8,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// First destination port.
    pub first: u16,
    /// Last destination port.
    pub last: u16,
    /// The verdict now (from the live maps).
    pub now: Verdict,
    /// The verdict once the manifests are applied.
    pub after: Verdict,
    /// What decides after, for each side whose judgement changes.
    pub why: Vec<String>,
}

/// A tracked connection the change would cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cut {
    /// The pod of the endpoint holding the entry.
    pub pod: String,
    /// Endpoint id (now).
    pub endpoint: u32,
    /// The pod's address.
    pub local_address: IpAddr,
    /// The pod's port.
    pub local_port: u16,
    /// The peer's address.
    pub peer_address: IpAddr,
    /// The peer's port.
    pub peer_port: u16,
    /// The peer's pod, when it is one.
    pub peer_pod: Option<String>,
    /// `TCP`, `UDP`, ...
    pub protocol: String,
    /// Who opened it, seen from the pod: `egress` (the pod) or `ingress`.
    pub origin: Direction,
    /// What decides after.
    pub why: String,
}

/// The manifests could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// An object of the manifests is invalid: the API server would reject
    /// it, and the prediction would be of something that cannot happen.
    #[error("{0}")]
    Invalid(ModelError),
}

/// The current cluster with the objects of `changes` created or replaced
/// (as `kubectl apply` would). An invalid object is an error naming it.
///
/// # Errors
/// [`DiffError::Invalid`] for the first invalid object of `changes`.
pub fn apply(current: &Snapshot, changes: &Snapshot) -> Result<Snapshot, DiffError> {
    let mut out = current.clone();
    for (id, slot) in &changes.policies {
        if let Some(e) = slot.errors.first() {
            return Err(DiffError::Invalid(e.clone()));
        }
        out.policies.insert(id.clone(), slot.clone());
    }
    for (name, slot) in &changes.cluster_policies {
        if let Some(e) = slot.errors.first() {
            return Err(DiffError::Invalid(e.clone()));
        }
        out.cluster_policies.insert(name.clone(), slot.clone());
    }
    if let Some(e) = changes.invalid.values().flatten().next() {
        return Err(DiffError::Invalid(e.clone()));
    }
    for (k, v) in &changes.nodes {
        out.nodes.insert(k.clone(), v.clone());
    }
    for (k, v) in &changes.namespaces {
        out.namespaces.insert(k.clone(), v.clone());
    }
    for (k, v) in &changes.pods {
        out.pods.insert(k.clone(), v.clone());
    }
    for (k, v) in &changes.services {
        out.services.insert(k.clone(), v.clone());
    }
    Ok(out)
}

/// This node's maps and state file as the agent would write them for
/// `after`: compiled for `node`, the pods bound now (`live`) bound to the
/// same interfaces, `config` as the config map's entry.
#[derive(Debug)]
pub struct Prediction {
    /// Its maps.
    pub maps: CompiledMaps,
    /// Its state file.
    pub state: State,
}

/// Compiles `after` for `node` (see [`Prediction`]).
#[must_use]
pub fn predict(after: &Snapshot, node: &str, live: &State, config: GlobalConfig) -> Prediction {
    let mut snap = after.clone();
    snap.local_node = Some(node.to_owned());
    let compiled = compile(&snap, &IdAllocation::default());
    let mut bound = BTreeMap::new();
    let mut ifindex = BTreeMap::new();
    for e in &live.endpoints {
        let (Some(i), Some((ns, name))) = (e.ifindex, e.pod.split_once('/')) else {
            continue;
        };
        let pod = ObjectRef::new(ns, name);
        ifindex.insert(pod.clone(), i);
        bound.insert(
            pod,
            Bound {
                ifindex: i,
                name: e.interface.clone().unwrap_or_default(),
            },
        );
    }
    let state = State::build(&Inputs {
        compiled: &compiled,
        snapshot: &snap,
        interfaces: &bound,
        generation: live.generation,
        fingerprint: None,
        pin_dir: Path::new(""),
    });
    Prediction {
        maps: CompiledMaps::new(&compiled, &ifindex, config),
        state,
    }
}

/// The ordered address pairs `diff` judges: every networked pod of `node`
/// (in either snapshot) with every other networked pod, both ways, in each
/// family both have; and each address's pod.
#[derive(Clone, Debug, Default)]
pub struct Pairs {
    /// `(src, dst)`.
    pub pairs: Vec<(IpAddr, IpAddr)>,
    /// The pod of each address.
    pub pods: BTreeMap<IpAddr, String>,
}

impl Pairs {
    /// The pairs of `before` and `after` for `node`.
    #[must_use]
    pub fn of(before: &Snapshot, after: &Snapshot, node: &str) -> Self {
        let mut pods: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut local: BTreeSet<IpAddr> = BTreeSet::new();
        for p in before.pods.values().chain(after.pods.values()) {
            if !p.is_networked() {
                continue;
            }
            for &ip in &p.ips {
                pods.entry(ip).or_insert_with(|| p.id.to_string());
                if p.node_name.as_deref() == Some(node) {
                    local.insert(ip);
                }
            }
        }
        let mut pairs = BTreeSet::new();
        for &l in &local {
            for (&p, pod) in &pods {
                if p.is_ipv6() == l.is_ipv6() && pods.get(&l) != Some(pod) {
                    pairs.insert((l, p));
                    pairs.insert((p, l));
                }
            }
        }
        Self {
            pairs: pairs.into_iter().collect(),
            pods,
        }
    }
}

/// The enforced view's question for `src -> dst` on `protocol`/`port`,
/// the family the addresses' own.
fn query(src: IpAddr, dst: IpAddr, protocol: u8, port: u16) -> Query {
    Query {
        src: Target::Address(src),
        dst: Target::Address(dst),
        protocol,
        port,
        family: Some(if src.is_ipv6() { 6 } else { 4 }),
        via_service: false,
        staged: false,
    }
}

/// The port ranges of each pair whose verdict on this node differs
/// between `now` (the live maps) and `after` (the prediction).
///
/// # Errors
/// When a lookup fails.
pub fn changes(
    now: &Explainer<'_>,
    after: &Explainer<'_>,
    pairs: &Pairs,
) -> Result<Vec<Change>, ExplainError> {
    let mut out = Vec::new();
    for &(src, dst) in &pairs.pairs {
        let sides = |x: &Explainer<'_>| -> Result<[Allowance; 2], ExplainError> {
            Ok([
                x.allowance(src, Direction::Egress, dst)?,
                x.allowance(dst, Direction::Ingress, src)?,
            ])
        };
        let (a, b) = (sides(now)?, sides(after)?);
        if a == b {
            continue;
        }
        let cuts: BTreeSet<(Option<u8>, u16)> = a
            .iter()
            .chain(b.iter())
            .flat_map(Allowance::boundaries)
            .chain(std::iter::once((None, 0)))
            .collect();
        for proto in PROTOCOLS {
            let starts: Vec<u16> = cuts
                .iter()
                .filter(|(p, _)| p.is_none_or(|p| p == proto))
                .map(|&(_, port)| port)
                .collect::<BTreeSet<u16>>()
                .into_iter()
                .collect();
            for (i, &first) in starts.iter().enumerate() {
                let last = starts.get(i + 1).map_or(u16::MAX, |n| n - 1);
                let q = query(src, dst, proto, first);
                let (x, y) = (now.explain(&q)?, after.explain(&q)?);
                if x.verdict == y.verdict {
                    continue;
                }
                let why = [(&x.egress, &y.egress), (&x.ingress, &y.ingress)]
                    .into_iter()
                    .filter(|(j, k)| j.allowed != k.allowed)
                    .map(|(_, k)| format!("{} {}: {}", k.of, k.direction.field(), k.text))
                    .collect();
                // Adjacent ranges with the same change and reasons merge.
                if let Some(prev) = out.last_mut().filter(|c: &&mut Change| {
                    c.src == src
                        && c.dst == dst
                        && c.protocol == protocol_name(proto)
                        && u32::from(c.last) + 1 == u32::from(first)
                        && c.now == x.verdict
                        && c.after == y.verdict
                        && c.why == why
                }) {
                    prev.last = last;
                    continue;
                }
                let name = |a: IpAddr| pairs.pods.get(&a).cloned().unwrap_or_else(|| a.to_string());
                out.push(Change {
                    src,
                    src_pod: name(src),
                    dst,
                    dst_pod: name(dst),
                    family: y.family,
                    protocol: protocol_name(proto),
                    first,
                    last,
                    now: x.verdict,
                    after: y.verdict,
                    why,
                });
            }
        }
    }
    Ok(out)
}

/// Whether the side at `at` allows `peer` on `proto`/`port` in `d`, by
/// [`Explainer::explain`]'s judgement of that side.
fn side_allows(
    x: &Explainer<'_>,
    at: IpAddr,
    d: Direction,
    peer: IpAddr,
    proto: u8,
    port: u16,
) -> Result<(bool, String), ExplainError> {
    let (src, dst) = match d {
        Direction::Egress => (at, peer),
        Direction::Ingress => (peer, at),
    };
    let e = x.explain(&query(src, dst, proto, port))?;
    let j = match d {
        Direction::Egress => e.egress,
        Direction::Ingress => e.ingress,
    };
    Ok((j.allowed, j.text))
}

/// The tracked connections of `connections` (live conntrack, `now_ns` on
/// the programs' clock) that the next packet would drop once `after` is
/// written, when `now` lets them through.
///
/// # Errors
/// When a lookup fails.
pub fn cuts(
    now: &Explainer<'_>,
    after: &Explainer<'_>,
    live: &State,
    connections: &[Connection],
    config: &GlobalConfig,
    now_ns: u64,
    pairs: &Pairs,
) -> Result<Vec<Cut>, ExplainError> {
    let mut out = Vec::new();
    for c in connections {
        // Re-judged when the generation moves: not node, Service or
        // hairpin traffic; expired entries are judged as new anyway.
        if matches!(
            c.value.admitted_by,
            reason::PASS_NODE_ORIGIN | reason::PASS_SERVICE | reason::PASS_HAIRPIN
        ) || now_ns.saturating_sub(c.value.last_seen_ns) > c.timeout_ns(config)
        {
            continue;
        }
        let Some(ep) = live.endpoint_by_id(c.key.endpoint) else {
            continue;
        };
        let (local, peer) = c.addresses();
        let (origin, port) = if c.value.origin == direction::EGRESS {
            (Direction::Egress, c.key.peer_port)
        } else {
            (Direction::Ingress, c.key.local_port)
        };
        let proto = c.key.protocol;
        let (before, _) = side_allows(now, local, origin, peer, proto, port)?;
        let (allowed, why) = side_allows(after, local, origin, peer, proto, port)?;
        if before && !allowed {
            out.push(Cut {
                pod: ep.pod.clone(),
                endpoint: c.key.endpoint,
                local_address: local,
                local_port: c.key.local_port,
                peer_address: peer,
                peer_port: c.key.peer_port,
                peer_pod: pairs.pods.get(&peer).cloned(),
                protocol: protocol_name(proto),
                origin,
                why,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support;

    const NOW: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
";

    #[test]
    fn apply_creates_and_replaces_and_refuses_invalid_objects() {
        let now = test_support::snapshot(NOW);
        let changes = test_support::snapshot(
            r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, policyTypes: [Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: q, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress]}
",
        );
        let after = apply(&now, &changes).expect("valid");
        assert_eq!(after.policies.len(), 2);
        assert_eq!(
            after.policies[&ObjectRef::new("x", "p")],
            changes.policies[&ObjectRef::new("x", "p")]
        );
        let mut bad = Snapshot::default();
        let mut report = crate::model::manifests::LoadReport::default();
        crate::model::manifests::apply_str(
            &mut bad,
            r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: typo, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: 80, protocol: TPC}]}]}
",
            "change.yaml",
            &mut report,
        );
        let err = apply(&now, &bad).expect_err("invalid").to_string();
        assert!(err.contains("x/typo") && err.contains("TPC"), "{err}");
    }
}
