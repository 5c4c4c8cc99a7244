//! What a previous agent left in the pinned maps, read back as the old
//! state of the first diff.
//!
//! A restarted agent finds the maps full and the pods judged by them. Its
//! first apply is the same [`compiler::diff`] as every other, whose order
//! keeps each interface on its old or its new rule sets at every step,
//! from an old state that is exactly what the maps hold:
//! - **endpoints**: each programmed entry, keyed by the pod now bound to
//!   its interface. An interface no pod is bound to gets a key no pod can
//!   have (an empty namespace): the diff's update of it is skipped (no
//!   binding) and the interface's entry is written after the diff, as for
//!   a pod deleted while its veth lingers;
//! - **policy entries**: the pinned ones, key for key;
//! - **rule sets**: those whose port entries are exactly a rule set's
//!   encoding. Others (a killed agent's half-written set) are left out and
//!   removed after the diff ([`leftovers`]), when nothing points at them;
//! - **frontends**: the pinned ones.
//!
//! Ids come with it ([`Resumed::old`]`.ids`, the allocation the first
//! compile starts from). A pod keeps the endpoint id its interface carries
//! when it is the pod the previous agent bound there (by name, uid and
//! interface from the state file; by address without one) and no other
//! interface carries that id; a rule set keeps the id whose entries encode
//! it. Every other id a pinned entry carries is reserved, so a changed pod
//! or set gets an id no live entry carries: a write for it cannot change
//! what an interface still on its old entry is judged by. Ids that came
//! from scratch did exactly that (a pod's new id was a live pod's old one).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use netpol_common::{EndpointInfo, PORT_KEY_PROTOCOL_BITS, SELECTOR_BITS, endpoint_flags};

use crate::compiler::{
    Compiled, Direction, EMPTY_RULESET, Endpoint, EndpointId, PolicyEntry, PolicyTarget,
    PortPrefix, PortRange, RuleSet,
};
use crate::datapath::writer::{KernelOp, Mirror};
use crate::model::{ObjectRef, Protocol};
use crate::provenance::State;

/// The pinned maps as the old state of the first diff.
#[derive(Clone, Debug, Default)]
pub struct Resumed {
    /// What the maps hold, as a compile's output (without rule sources);
    /// its `ids` are the allocation the first compile starts from.
    pub old: Compiled,
    /// Pods that keep their endpoint id.
    pub kept_endpoints: usize,
    /// Rule sets that keep their id.
    pub kept_rulesets: usize,
}

/// The old state and allocation for the first compile over `maps`.
///
/// `probe` is the new snapshot compiled from no allocation (for its pods'
/// addresses and uids), `bindings` its pods' interfaces, `known` the
/// previous agent's state file, if it could be read.
#[must_use]
pub fn resume(
    maps: &Mirror,
    known: Option<&State>,
    probe: &Compiled,
    bindings: &BTreeMap<ObjectRef, u32>,
) -> Resumed {
    let mut out = Resumed::default();
    let old = &mut out.old;
    let pod_at: BTreeMap<u32, &ObjectRef> = bindings.iter().map(|(p, &i)| (i, p)).collect();
    let programmed = || {
        maps.endpoints
            .iter()
            .filter(|(_, e)| e.programmed() && e.id != 0)
    };
    let mut carriers: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, e) in programmed() {
        *carriers.entry(e.id).or_default() += 1;
    }
    let mut live_endpoints: BTreeSet<u32> = carriers.keys().copied().collect();
    let mut live_rulesets: BTreeSet<u32> = BTreeSet::new();

    for (&ifindex, info) in programmed() {
        let endpoint = endpoint(info);
        let key = match pod_at.get(&ifindex) {
            Some(&pod) => {
                let uid = probe.ids.endpoints.get(pod).and_then(|e| e.uid.clone());
                let same = carriers[&info.id] == 1
                    && probe.endpoints.get(pod).is_some_and(|now| {
                        same_pod(known, pod, uid.as_deref(), ifindex, &endpoint, now)
                    });
                if same {
                    old.ids
                        .endpoints
                        .insert(pod.clone(), EndpointId { id: info.id, uid });
                    out.kept_endpoints += 1;
                }
                pod.clone()
            }
            None => ObjectRef::new("", format!("interface {ifindex}")),
        };
        old.endpoints.insert(key, endpoint);
    }

    let v4 = maps
        .policy_v4
        .iter()
        .map(|(&(len, k), v)| (len, k.selector, IpAddr::from(k.addr), v.ruleset));
    let v6 = maps
        .policy_v6
        .iter()
        .map(|(&(len, k), v)| (len, k.selector, IpAddr::from(k.addr), v.ruleset));
    for (len, selector, addr, ruleset) in v4.chain(v6) {
        let prefix = len
            .checked_sub(SELECTOR_BITS)
            .and_then(|l| IpNet::new(addr, u8::try_from(l).ok()?).ok());
        // A key with bits past its prefix is no compile's: a leftover.
        if let Some(p) = prefix.filter(|p| p.trunc() == *p) {
            insert(old, selector, p, ruleset);
        }
        live_endpoints.insert(selector >> 1);
        live_rulesets.insert(ruleset);
    }

    let mut blocks: BTreeMap<u32, BTreeSet<PortPrefix>> = BTreeMap::new();
    for (&(len, k), v) in &maps.ports {
        live_rulesets.insert(k.ruleset);
        blocks.entry(k.ruleset).or_default().insert(port_prefix(
            len,
            k.protocol,
            k.port,
            v.allow != 0,
        ));
    }
    for (id, present) in blocks {
        let Some(set) = ruleset(&present) else {
            continue;
        };
        if old.ids.rulesets.contains_key(&set) || id == EMPTY_RULESET {
            old.rulesets.insert(id, set);
            continue;
        }
        old.ids.rulesets.insert(set.clone(), id);
        old.rulesets.insert(id, set);
        out.kept_rulesets += 1;
    }

    old.frontends_v4.clone_from(&maps.frontends_v4);
    old.frontends_v6.clone_from(&maps.frontends_v6);

    let kept_endpoints: BTreeSet<u32> = old.ids.endpoints.values().map(|e| e.id).collect();
    let kept_rulesets: BTreeSet<u32> = old.ids.rulesets.values().copied().collect();
    old.ids.next_endpoint = live_endpoints.last().map_or(1, |m| m.saturating_add(1));
    old.ids.next_ruleset = live_rulesets
        .last()
        .map_or(EMPTY_RULESET + 1, |m| m.saturating_add(1));
    live_endpoints.remove(&0);
    old.ids.reserved_endpoints = live_endpoints
        .difference(&kept_endpoints)
        .copied()
        .collect();
    old.ids.reserved_rulesets = live_rulesets
        .into_iter()
        .filter(|r| *r > EMPTY_RULESET && !kept_rulesets.contains(r))
        .collect();
    out
}

/// Whether the pod bound to `ifindex` now is the one the previous agent
/// bound there: the state file's pod of the id (same name, uid and
/// interface where it says), else the same addresses.
fn same_pod(
    known: Option<&State>,
    pod: &ObjectRef,
    uid: Option<&str>,
    ifindex: u32,
    was: &Endpoint,
    now: &Endpoint,
) -> bool {
    if let Some(e) = known.and_then(|s| s.endpoint_by_id(was.id)) {
        return e.pod == pod.to_string()
            && e.ifindex.is_none_or(|i| i == ifindex)
            && match (e.uid.as_deref(), uid) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
    }
    let set = |ips: &[IpAddr]| ips.iter().copied().collect::<BTreeSet<_>>();
    set(&was.ips) == set(&now.ips)
}

/// A pinned endpoint entry as the compiled endpoint that gives it.
fn endpoint(info: &EndpointInfo) -> Endpoint {
    let has = |flag| info.flags & flag != 0;
    let mut ips = Vec::new();
    if has(endpoint_flags::HAS_IPV4) {
        ips.push(IpAddr::from(info.ipv4));
    }
    if has(endpoint_flags::HAS_IPV6) {
        ips.push(IpAddr::from(info.ipv6));
    }
    Endpoint {
        id: info.id,
        hairpin_judged: has(endpoint_flags::HAIRPIN_JUDGED),
        ingress_isolated: has(endpoint_flags::INGRESS_ISOLATED),
        egress_isolated: has(endpoint_flags::EGRESS_ISOLATED),
        ips,
        allow_any_source: has(endpoint_flags::ALLOW_ANY_SOURCE),
        ingress_gen: info.ingress_gen,
        egress_gen: info.egress_gen,
        staged_ingress: has(endpoint_flags::STAGED_INGRESS)
            .then(|| has(endpoint_flags::STAGED_INGRESS_ISOLATED)),
        staged_egress: has(endpoint_flags::STAGED_EGRESS)
            .then(|| has(endpoint_flags::STAGED_EGRESS_ISOLATED)),
        staged_hairpin_judged: has(endpoint_flags::STAGED_HAIRPIN)
            .then(|| !has(endpoint_flags::HAIRPIN_JUDGED)),
    }
}

fn insert(old: &mut Compiled, selector: u32, prefix: IpNet, ruleset: u32) {
    let direction = if selector & 1 == Direction::Ingress.raw() & 1 {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let target = PolicyTarget {
        endpoint: selector >> 1,
        direction,
        prefix,
    };
    let entry = PolicyEntry {
        ruleset,
        sources: Arc::from([]),
        decisions: None,
    };
    match prefix {
        IpNet::V4(_) => old.policy_v4.insert(target, entry),
        IpNet::V6(_) => old.policy_v6.insert(target, entry),
    };
}

/// The port-trie entry `(len, protocol, port)` as a prefix; one no rule
/// set encodes (an unknown protocol) makes its set inexact.
fn port_prefix(len: u32, protocol: u8, port: [u8; 2], allow: bool) -> PortPrefix {
    let protocol = Protocol::ALL.into_iter().find(|p| p.number() == protocol);
    match protocol {
        Some(p) if len >= PORT_KEY_PROTOCOL_BITS => PortPrefix {
            protocol: Some(p),
            port: u16::from_be_bytes(port),
            port_bits: u8::try_from(len - PORT_KEY_PROTOCOL_BITS).unwrap_or(u8::MAX),
            allow,
        },
        _ => PortPrefix {
            protocol: None,
            port: u16::from_be_bytes(port),
            port_bits: u8::try_from(len.saturating_sub(SELECTOR_BITS)).unwrap_or(u8::MAX),
            allow,
        },
    }
}

/// The rule set whose encoding is exactly `present`, if there is one.
fn ruleset(present: &BTreeSet<PortPrefix>) -> Option<RuleSet> {
    let all = PortPrefix {
        protocol: None,
        port: 0,
        port_bits: 0,
        allow: true,
    };
    let every = present.contains(&all);
    let mut ranges = Vec::with_capacity(present.len());
    for p in present.iter().filter(|&&p| p != all) {
        let protocol = p.protocol?;
        // Blocks not allowed only make sense under the entry for all.
        if p.port_bits > 16 || p.allow == every {
            return None;
        }
        let size = 1u32 << (16 - u32::from(p.port_bits));
        let first = u32::from(p.port);
        ranges.push(PortRange {
            protocol,
            first: p.port,
            last: u16::try_from(first + size - 1).ok()?,
        });
    }
    let set = if every {
        RuleSet::all_but(ranges)
    } else {
        RuleSet::from_ranges(ranges)
    };
    let encoded: BTreeSet<PortPrefix> = set.port_prefixes().into_iter().collect();
    (encoded == *present).then_some(set)
}

/// Deletes of the policy, port and frontend entries in `maps` that `new`
/// does not have: after the first diff, the entries [`resume`] could not
/// read as a compile's (a half-written rule set, a malformed key). Nothing
/// points at them by then; shorter policy prefixes go first, so no delete
/// uncovers a shorter entry.
#[must_use]
pub fn leftovers(maps: &Mirror, new: &Compiled) -> Vec<KernelOp> {
    let want = new.map_state();
    let mut ops = Vec::new();
    ops.extend(
        maps.policy_v4
            .keys()
            .filter(|k| !want.policy_v4.contains_key(k))
            .map(|&(l, k)| KernelOp::PolicyV4Delete(l, k)),
    );
    ops.extend(
        maps.policy_v6
            .keys()
            .filter(|k| !want.policy_v6.contains_key(k))
            .map(|&(l, k)| KernelOp::PolicyV6Delete(l, k)),
    );
    ops.extend(
        maps.ports
            .keys()
            .filter(|k| !want.ports.contains_key(k))
            .map(|&(l, k)| KernelOp::PortDelete(l, k)),
    );
    ops.extend(
        maps.frontends_v4
            .keys()
            .filter(|k| !want.frontends_v4.contains_key(k))
            .map(|&k| KernelOp::FrontendV4Delete(k)),
    );
    ops.extend(
        maps.frontends_v6
            .keys()
            .filter(|k| !want.frontends_v6.contains_key(k))
            .map(|&k| KernelOp::FrontendV6Delete(k)),
    );
    ops
}
