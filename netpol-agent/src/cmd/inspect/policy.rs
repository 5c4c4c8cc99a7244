//! `inspect policy`: one endpoint's policy-trie entries and their rule
//! sets, named with the state file.

use std::{fmt::Write as _, net::IpAddr};

use anyhow::Context as _;
use netpol_agent::{
    compiler::Direction,
    inspect::{LiveEndpoint, LiveEntry, LiveMaps, Maps as _, PortRun, ports_text, rulesets},
    provenance::{ClusterPolicyState, DecisionState, State},
};
use netpol_common::{SELECTOR_BITS, policy_selector};
use serde::Serialize;

use super::endpoints::interface_name;
use super::{PolicyArgs, StateRef, columns, state_ref};

#[derive(Serialize)]
pub(super) struct PolicyDoc {
    state: Option<StateRef>,
    pod: Option<String>,
    endpoint: u32,
    ifindex: u32,
    interface: Option<String>,
    directions: Vec<PolicyDirection>,
}

#[derive(Serialize)]
struct PolicyDirection {
    direction: Direction,
    isolated: bool,
    policies: Vec<String>,
    /// `ClusterNetworkPolicies` applying, in evaluation order.
    cluster_policies: Vec<ClusterPolicyState>,
    entries: Vec<PolicyRow>,
}

#[derive(Serialize)]
struct PolicyRow {
    family: u8,
    /// The key's selector (`endpoint << 1 | direction`).
    selector: u32,
    /// The key's LPM prefix length (32 + the peer prefix's).
    prefix_len: u32,
    prefix: ipnet::IpNet,
    /// Pod of the prefix when it is one address of a known pod.
    peer_pod: Option<String>,
    /// The entry's rule set; `None` for a prefix the maps leave out, whose
    /// decisions the state file names (`named`).
    ruleset: Option<u32>,
    ports: Vec<netpol_agent::inspect::PortRun>,
    ports_text: String,
    rules: Vec<String>,
    /// Where a `ClusterNetworkPolicy` applies: how each set of (protocol,
    /// port) is decided.
    decisions: Vec<DecisionRow>,
    /// The state file has no such entry (older or newer than the maps).
    stale: bool,
}

#[derive(Serialize)]
struct DecisionRow {
    ports_text: String,
    allowed: bool,
    text: String,
}

fn family_of(p: ipnet::IpNet) -> u8 {
    if p.addr().is_ipv6() { 6 } else { 4 }
}

/// The pod a host prefix is.
fn peer_pod(state: Option<&State>, prefix: ipnet::IpNet) -> Option<String> {
    let single = prefix.prefix_len() == prefix.max_prefix_len();
    state
        .filter(|_| single)
        .and_then(|s| s.pod_by_address(prefix.addr()))
        .map(str::to_owned)
}

fn decision_rows(list: &[DecisionState]) -> Vec<DecisionRow> {
    list.iter()
        .map(|d| DecisionRow {
            ports_text: decision_ports(d),
            allowed: d.allowed,
            text: d.text.clone(),
        })
        .collect()
}

/// The ports of a decision, as rule sets print ([`ports_text`]).
fn decision_ports(d: &DecisionState) -> String {
    let run = |p: &netpol_agent::provenance::PortRangeState, except| PortRun {
        protocol: p.protocol.clone(),
        first: p.first,
        last: p.last,
        except,
    };
    let runs: Vec<PortRun> = if d.all {
        let every = PortRun {
            protocol: "any".to_owned(),
            first: 0,
            last: u16::MAX,
            except: false,
        };
        std::iter::once(every)
            .chain(d.except.iter().map(|p| run(p, true)))
            .collect()
    } else {
        d.ports.iter().map(|p| run(p, false)).collect()
    };
    ports_text(&runs)
}

/// The live endpoint of `pod`: `namespace/name` (state file), an address,
/// or an endpoint id.
fn find_endpoint(
    live: &[LiveEndpoint],
    state: Option<&State>,
    pod: &str,
) -> anyhow::Result<LiveEndpoint> {
    if let Ok(ip) = pod.parse::<IpAddr>() {
        return live
            .iter()
            .find(|e| e.addresses().contains(&ip))
            .copied()
            .with_context(|| format!("no endpoint entry has the address {ip}"));
    }
    if let Ok(id) = pod.parse::<u32>() {
        return live
            .iter()
            .find(|e| e.info.id == id)
            .copied()
            .with_context(|| format!("no endpoint entry has the id {id}"));
    }
    let s = state.with_context(|| {
        format!("no state file to find {pod} in: give its address or endpoint id")
    })?;
    let ep = s
        .endpoint(pod)
        .with_context(|| format!("{pod} is not a pod of this node in the state file"))?;
    live.iter()
        .find(|e| e.info.id == ep.id)
        .copied()
        .with_context(|| {
            format!(
                "{pod} (endpoint {}) has no entry in the endpoint map: its interface is not bound",
                ep.id
            )
        })
}

pub(super) fn policy(
    maps: &LiveMaps,
    state: Option<&State>,
    a: &PolicyArgs,
) -> anyhow::Result<PolicyDoc> {
    let live = maps.endpoints()?;
    let ep = find_endpoint(&live, state, &a.pod)?;
    let st = state.and_then(|s| s.endpoint_by_id(ep.info.id));
    let ports = rulesets(&maps.port_blocks()?);
    let mut entries: Vec<(u8, LiveEntry)> = Vec::new();
    for (fam, v6) in [(4u8, false), (6, true)] {
        if a.family.is_none_or(|f| f == fam) {
            entries.extend(
                maps.policy_entries(v6)?
                    .into_iter()
                    .filter(|e| e.endpoint == ep.info.id)
                    .map(|e| (fam, e)),
            );
        }
    }
    let dirs: Vec<Direction> = match (a.ingress, a.egress) {
        (true, _) => vec![Direction::Ingress],
        (_, true) => vec![Direction::Egress],
        _ => vec![Direction::Ingress, Direction::Egress],
    };
    let directions = dirs
        .into_iter()
        .map(|d| PolicyDirection {
            direction: d,
            isolated: ep.isolated(d),
            policies: st
                .map(|s| s.direction(d).policies.clone())
                .unwrap_or_default(),
            cluster_policies: st
                .map(|s| s.direction(d).cluster_policies.clone())
                .unwrap_or_default(),
            entries: {
                let mut rows: Vec<PolicyRow> = entries
                    .iter()
                    .filter(|(_, e)| e.direction == d)
                    .map(|&(family, e)| {
                        let recorded = state
                            .and_then(|s| s.entry(e.endpoint, d, e.prefix))
                            .filter(|r| r.ruleset == e.ruleset);
                        let runs = ports.get(&e.ruleset).cloned().unwrap_or_default();
                        PolicyRow {
                            family,
                            selector: e.selector,
                            prefix_len: e.prefix_len,
                            prefix: e.prefix,
                            peer_pod: peer_pod(state, e.prefix),
                            ruleset: Some(e.ruleset),
                            ports_text: ports_text(&runs),
                            ports: runs,
                            rules: recorded
                                .map(|r| r.rules.iter().map(ToString::to_string).collect())
                                .unwrap_or_default(),
                            decisions: recorded
                                .map(|r| decision_rows(&r.decisions))
                                .unwrap_or_default(),
                            stale: state.is_some() && recorded.is_none(),
                        }
                    })
                    .collect();
                // Prefixes the maps leave out, named in the state file.
                let named = state.iter().flat_map(|s| &s.named).filter(|n| {
                    n.endpoint == ep.info.id
                        && n.direction == d
                        && a.family.is_none_or(|f| f == family_of(n.prefix))
                });
                for n in named {
                    rows.push(PolicyRow {
                        family: family_of(n.prefix),
                        selector: policy_selector(n.endpoint, d.raw()),
                        prefix_len: SELECTOR_BITS + u32::from(n.prefix.prefix_len()),
                        prefix: n.prefix,
                        peer_pod: peer_pod(state, n.prefix),
                        ruleset: None,
                        ports: Vec::new(),
                        ports_text: "(not in the maps)".to_owned(),
                        rules: Vec::new(),
                        decisions: decision_rows(&n.decisions),
                        stale: false,
                    });
                }
                rows.sort_by_key(|r| (r.family, r.prefix));
                rows
            },
        })
        .collect();
    Ok(PolicyDoc {
        state: state_ref(state),
        pod: st.map(|s| s.pod.clone()),
        endpoint: ep.info.id,
        ifindex: ep.ifindex,
        interface: st
            .and_then(|s| s.interface.clone())
            .or_else(|| interface_name(ep.ifindex)),
        directions,
    })
}

pub(super) fn policy_table(doc: &PolicyDoc) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: endpoint {} on {} (ifindex {})",
        doc.pod.as_deref().unwrap_or("(unnamed pod)"),
        doc.endpoint,
        doc.interface.as_deref().unwrap_or("?"),
        doc.ifindex
    );
    for d in &doc.directions {
        let field = d.direction.field();
        if !d.isolated {
            let _ = writeln!(
                s,
                "\n{field}: not isolated (no policy selects the pod): every peer and port"
            );
            continue;
        }
        let isolating = if d.policies.is_empty() {
            "policies the state file does not name".to_owned()
        } else {
            d.policies.join(", ")
        };
        if d.cluster_policies.is_empty() {
            let _ = writeln!(s, "\n{field}: isolated by {isolating}");
        } else {
            // The tiers in evaluation order, NetworkPolicy between them.
            let tier = |t: &str| {
                d.cluster_policies
                    .iter()
                    .filter(|c| c.tier == t)
                    .map(|c| format!("ClusterNetworkPolicy {c}"))
                    .collect::<Vec<_>>()
            };
            let _ = writeln!(s, "\n{field}: judged in tiers");
            for (name, list) in [
                ("Admin", tier("Admin")),
                (
                    "NetworkPolicy",
                    if d.policies.is_empty() {
                        Vec::new()
                    } else {
                        d.policies.clone()
                    },
                ),
                ("Baseline", tier("Baseline")),
            ] {
                let _ = writeln!(
                    s,
                    "  {name}: {}",
                    if list.is_empty() {
                        "-".to_owned()
                    } else {
                        list.join(", ")
                    }
                );
            }
        }
        if d.entries.is_empty() {
            let _ = writeln!(s, "  no entry: every peer is denied");
            continue;
        }
        let mut rows = vec![[
            "  PEER".to_owned(),
            "RULESET".to_owned(),
            "PORTS".to_owned(),
            "RULES".to_owned(),
        ]];
        for e in &d.entries {
            let peer = match &e.peer_pod {
                Some(p) => format!("  {} ({p})", e.prefix),
                None => format!("  {}", e.prefix),
            };
            let rules = if e.rules.is_empty() {
                if e.stale {
                    "? (not in the state file)"
                } else {
                    "-"
                }
                .to_owned()
            } else if e.ruleset == Some(netpol_agent::compiler::EMPTY_RULESET)
                && e.decisions.is_empty()
            {
                format!("except of {}", e.rules.join("; "))
            } else {
                e.rules.join("; ")
            };
            let ruleset = e.ruleset.map_or_else(|| "-".to_owned(), |r| r.to_string());
            rows.push([peer, ruleset, e.ports_text.clone(), rules]);
            for dec in &e.decisions {
                rows.push([
                    String::new(),
                    String::new(),
                    format!("  {}", dec.ports_text),
                    dec.text.clone(),
                ]);
            }
        }
        s.push_str(&columns(&rows));
    }
    s
}
