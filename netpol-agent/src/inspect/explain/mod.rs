//! `netpol-agent explain`: the verdict this node's kernel gives a
//! connection, and why, computed from the live maps the way the programs
//! compute it (not from the compiler), named with the state file.
//!
//! For a connection `SRC → DST PROTO/PORT`:
//! - a local SRC pod's **egress** (`from_pod`): not programmed → the
//!   new-pods mode; not isolated → allowed; isolated → the kernel's
//!   longest-prefix match of `(selector(src, egress), dst)` in the family's
//!   trie, then the rule set's port trie with `(protocol, port)`;
//! - a local DST pod's **ingress** (`to_pod`) the same way with the source
//!   address (packets of the node's own stack pass);
//! - a pod of another node, or an address that is no pod: "not judged on
//!   this node";
//! - a DST that is a Service frontend: kube-proxy translates it after
//!   `from_pod`, so the verdict depends on the backend it picks.
//!
//! The matched entry is named with the rules the state file records for
//! it, and a denial with the policies that isolate the pod.
mod answer;
mod query;

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use netpol_common::{
    GlobalConfig, config_flags, endpoint_flags, policy_selector, reason, staged_endpoint,
};

pub use answer::{
    ExplainError, Explanation, Judgement, Location, Matched, Party, ServiceNote, Verdict,
};
pub use query::{Query, Target, parse_family, parse_port};

use super::{InspectError, LiveEndpoint, LiveEntry, Maps, PortRun, ports_text, protocol_name};
use crate::{
    compiler::{Direction, EMPTY_RULESET},
    provenance::{EndpointState, State},
};

/// Answers queries against one reading of the maps (batch mode reads the
/// tries once).
pub struct Explainer<'a> {
    maps: &'a dyn Maps,
    state: Option<&'a State>,
    endpoints: Vec<LiveEndpoint>,
    entries_v4: Vec<LiveEntry>,
    entries_v6: Vec<LiveEntry>,
    rulesets: BTreeMap<u32, Vec<PortRun>>,
    blocks: BTreeMap<u32, Vec<Block>>,
    config: GlobalConfig,
    notes: Vec<String>,
}

impl fmt::Debug for Explainer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Explainer").finish_non_exhaustive()
    }
}

/// A port-trie block of a rule set without the rule set's id (ids differ
/// between two compiles): `(protocol, first, last, allow)`, `None` for
/// every protocol.
pub type Block = (Option<u8>, u16, u16, bool);

/// What one side of a connection lets through towards a peer, as the
/// maps say: two readings of the maps judge the side alike on every
/// port exactly when their allowances are equal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowance {
    /// Not judged on this node, not isolated, unmanaged, or not
    /// programmed yet with new pods failing open.
    Everything,
    /// Not programmed yet with new pods failing closed.
    Nothing,
    /// Isolated: the blocks of the rule set the peer's entry points to
    /// (none: no entry covers the peer).
    Ports(Vec<Block>),
}

impl Allowance {
    /// The ports where the verdict may change (each block's first port
    /// and the one after its last), per protocol (`None`: every one).
    pub fn boundaries(&self) -> impl Iterator<Item = (Option<u8>, u16)> + '_ {
        let blocks = match self {
            Self::Ports(b) => b.as_slice(),
            Self::Everything | Self::Nothing => &[],
        };
        blocks.iter().flat_map(|&(p, first, last, _)| {
            std::iter::once((p, first)).chain(last.checked_add(1).map(|n| (p, n)))
        })
    }
}

/// What a side resolved to before the family is chosen.
struct Resolved<'s> {
    given: String,
    pod: Option<String>,
    addresses: Vec<IpAddr>,
    location: Location,
    live: Option<LiveEndpoint>,
    state: Option<&'s EndpointState>,
}

impl<'a> Explainer<'a> {
    /// Reads the endpoint map, both policy tries, the port trie and the
    /// config once.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn new(maps: &'a dyn Maps, state: Option<&'a State>) -> Result<Self, InspectError> {
        let mut notes = Vec::new();
        if state.is_none() {
            notes
                .push("no state file: pods are named by address only, rules not at all".to_owned());
        }
        let mut blocks = maps.port_blocks()?;
        blocks.sort();
        Ok(Self {
            endpoints: maps.endpoints()?,
            entries_v4: maps.policy_entries(false)?,
            entries_v6: maps.policy_entries(true)?,
            rulesets: super::rulesets(&blocks),
            blocks: blocks.iter().fold(BTreeMap::new(), |mut m, b| {
                m.entry(b.ruleset)
                    .or_insert_with(Vec::new)
                    .push((b.protocol, b.first, b.last, b.allow));
                m
            }),
            config: maps.config()?,
            maps,
            state,
            notes,
        })
    }

    fn live_by_id(&self, id: u32) -> Option<LiveEndpoint> {
        self.endpoints.iter().find(|e| e.info.id == id).copied()
    }

    fn live_by_address(&self, ip: IpAddr) -> Option<LiveEndpoint> {
        self.endpoints
            .iter()
            .find(|e| e.programmed() && e.addresses().contains(&ip))
            .copied()
    }

    fn resolve(&self, t: &Target) -> Result<Resolved<'a>, ExplainError> {
        let state = self.state;
        match t {
            Target::Pod(name) => {
                let Some(s) = state else {
                    return Err(ExplainError::Query(format!(
                        "{name}: no state file to find pods by name in; give its address"
                    )));
                };
                if let Some(ep) = s.endpoint(name) {
                    let live = ep
                        .ifindex
                        .and_then(|i| {
                            self.endpoints
                                .iter()
                                .find(|e| e.ifindex == i && e.info.id == ep.id)
                                .copied()
                        })
                        .or_else(|| self.live_by_id(ep.id));
                    return Ok(Resolved {
                        given: name.clone(),
                        pod: Some(name.clone()),
                        addresses: ep.addresses.clone(),
                        location: Location::Local,
                        live,
                        state: Some(ep),
                    });
                }
                if let Some(p) = s.remote_pods.iter().find(|p| &p.pod == name) {
                    return Ok(Resolved {
                        given: name.clone(),
                        pod: Some(name.clone()),
                        addresses: p.addresses.clone(),
                        location: Location::Remote,
                        live: None,
                        state: None,
                    });
                }
                Err(ExplainError::Query(format!(
                    "{name}: no such networked pod in the state file (generation {})",
                    s.generation
                )))
            }
            Target::Address(ip) => {
                let given = ip.to_string();
                if let Some(live) = self.live_by_address(*ip) {
                    let ep = state.and_then(|s| s.endpoint_by_id(live.info.id));
                    return Ok(Resolved {
                        given,
                        pod: ep.map(|e| e.pod.clone()),
                        addresses: vec![*ip],
                        location: Location::Local,
                        live: Some(live),
                        state: ep,
                    });
                }
                if let Some(s) = state {
                    if let Some(ep) = s.endpoints.iter().find(|e| e.addresses.contains(ip)) {
                        return Ok(Resolved {
                            given,
                            pod: Some(ep.pod.clone()),
                            addresses: vec![*ip],
                            location: Location::Local,
                            live: self.live_by_id(ep.id),
                            state: Some(ep),
                        });
                    }
                    if let Some(p) = s.remote_pods.iter().find(|p| p.addresses.contains(ip)) {
                        return Ok(Resolved {
                            given,
                            pod: Some(p.pod.clone()),
                            addresses: vec![*ip],
                            location: Location::Remote,
                            live: None,
                            state: None,
                        });
                    }
                    if s.node_addresses.contains(ip) {
                        return Ok(Resolved {
                            given,
                            pod: None,
                            addresses: vec![*ip],
                            location: Location::Node,
                            live: None,
                            state: None,
                        });
                    }
                }
                Ok(Resolved {
                    given,
                    pod: None,
                    addresses: vec![*ip],
                    location: Location::Other,
                    live: None,
                    state: None,
                })
            }
        }
    }

    /// What the side at local address `at` lets through in direction `d`
    /// towards `peer`, read the way [`Self::explain`] judges a pod's side
    /// of a connection between two pods' addresses (the enforced view).
    ///
    /// # Errors
    /// When a lookup fails.
    pub fn allowance(
        &self,
        at: IpAddr,
        d: Direction,
        peer: IpAddr,
    ) -> Result<Allowance, ExplainError> {
        let r = self.resolve(&Target::Address(at))?;
        let Some(live) = r.live.filter(|_| r.location == Location::Local) else {
            return Ok(Allowance::Everything);
        };
        if !live.programmed() {
            return Ok(
                if self.config.flags & config_flags::NEW_PODS_FAIL_OPEN != 0 {
                    Allowance::Everything
                } else {
                    Allowance::Nothing
                },
            );
        }
        if !live.isolated(d) {
            return Ok(Allowance::Everything);
        }
        let selector = policy_selector(live.info.id, d.raw());
        Ok(Allowance::Ports(
            self.maps
                .policy_lookup(selector, peer)?
                .and_then(|rs| self.blocks.get(&rs).cloned())
                .unwrap_or_default(),
        ))
    }

    /// Answers one query.
    ///
    /// # Errors
    /// When a side is unknown, has no address of the family, or a lookup
    /// fails.
    pub fn explain(&self, q: &Query) -> Result<Explanation, ExplainError> {
        let src = self.resolve(&q.src)?;
        let dst = self.resolve(&q.dst)?;
        let has = |r: &Resolved<'_>, v6: bool| r.addresses.iter().any(|a| a.is_ipv6() == v6);
        let v6 = match q.family {
            Some(f) => f == 6,
            None => match (&q.src, &q.dst) {
                (Target::Address(a), _) | (_, Target::Address(a)) => a.is_ipv6(),
                _ => !(has(&src, false) && has(&dst, false)) && has(&src, true) && has(&dst, true),
            },
        };
        let pick = |r: &Resolved<'_>| {
            r.addresses
                .iter()
                .copied()
                .find(|a| a.is_ipv6() == v6)
                .ok_or_else(|| {
                    ExplainError::Query(format!(
                        "{} has no IPv{} address",
                        r.given,
                        if v6 { 6 } else { 4 }
                    ))
                })
        };
        let (sa, da) = (pick(&src)?, pick(&dst)?);
        let party = |r: &Resolved<'_>, address: IpAddr| Party {
            given: r.given.clone(),
            address,
            pod: r.pod.clone(),
            location: r.location,
            endpoint: r.live.map(|l| l.info.id),
            ifindex: r
                .live
                .map(|l| l.ifindex)
                .or(r.state.and_then(|s| s.ifindex)),
            interface: r.state.and_then(|s| s.interface.clone()),
        };
        let (sp, dp) = (party(&src, sa), party(&dst, da));
        let mut notes = self.notes.clone();
        let service = self
            .maps
            .frontend(da, q.port, q.protocol)?
            .map(|v| ServiceNote {
                services: self
                    .state
                    .and_then(|s| s.frontend(da, q.port, q.protocol))
                    .map(|f| f.services.clone())
                    .unwrap_or_default(),
                kind: crate::provenance::frontend_kind_name(v.kind).to_owned(),
            });
        // The staged view's judgement where it differs (`STAGED_HAIRPIN`).
        let hairpin_judged = src.live.is_some_and(|l| {
            let flags = l.info.flags;
            (flags & endpoint_flags::HAIRPIN_JUDGED != 0)
                != (q.staged && flags & endpoint_flags::STAGED_HAIRPIN != 0)
        });
        let (egress, ingress) = if sa == da && q.via_service && hairpin_judged {
            // kube-proxy sends the pod back to itself; a ClusterNetworkPolicy
            // applies to it, so `to_pod` judges both directions with the pod
            // as its own peer, from the entries of its own address.
            notes.push(
                "a pod reaching itself through its Service (hairpin) is subject to the \
                 ClusterNetworkPolicies that apply to it; NetworkPolicy allows it"
                    .to_owned(),
            );
            (
                self.side(&src, &sp, Direction::Egress, da, q, &mut notes)?,
                self.side(&dst, &dp, Direction::Ingress, sa, q, &mut notes)?,
            )
        } else if sa == da && q.via_service {
            let text = "a pod reaching itself through its Service (hairpin) is not subject to \
                        its NetworkPolicies (pass_hairpin)";
            (
                Judgement::not_judged(Direction::Egress, sp.name(), text.to_owned()),
                Judgement::not_judged(Direction::Ingress, dp.name(), text.to_owned()),
            )
        } else if sa == da {
            let text = "a pod reaching itself is not subject to its policies (the packet never \
                        leaves its network namespace)";
            (
                Judgement::not_judged(Direction::Egress, sp.name(), text.to_owned()),
                Judgement::not_judged(Direction::Ingress, dp.name(), text.to_owned()),
            )
        } else if service.is_some() {
            (
                self.service_egress(&src, &sp, da, q, &mut notes)?,
                Judgement::not_judged(
                    Direction::Ingress,
                    dp.name(),
                    "a frontend has no ingress: the backend's is judged".to_owned(),
                ),
            )
        } else {
            let egress = self.side(&src, &sp, Direction::Egress, da, q, &mut notes)?;
            let ingress = if src.location == Location::Node && dst.location == Location::Local {
                Judgement::passes(
                    Direction::Ingress,
                    dp.name(),
                    reason::PASS_NODE_ORIGIN,
                    "packets of the node's own stack reach its pods (kubelet probes); \
                     forwarded ones carrying a node address are judged"
                        .to_owned(),
                )
            } else {
                self.side(&dst, &dp, Direction::Ingress, sa, q, &mut notes)?
            };
            (egress, ingress)
        };
        let verdict = if !egress.allowed || !ingress.allowed {
            Verdict::Denied
        } else if service.is_some() {
            Verdict::Depends
        } else {
            Verdict::Allowed
        };
        Ok(Explanation {
            src: sp,
            dst: dp,
            family: if v6 { 6 } else { 4 },
            protocol: protocol_name(q.protocol),
            port: q.port,
            verdict,
            egress,
            ingress,
            service,
            notes,
            staged: q.staged,
        })
    }

    /// The source's egress towards a Service frontend at `from_pod`: a pod
    /// interface with a mark slot, programmed and isolated in some
    /// direction, marks the packet and passes it (`pass_service`): its
    /// egress is judged where the backend kube-proxy picks is seen. Any
    /// other is judged against the frontend address as it is.
    fn service_egress(
        &self,
        src: &Resolved<'_>,
        sp: &Party,
        frontend: IpAddr,
        q: &Query,
        notes: &mut Vec<String>,
    ) -> Result<Judgement, ExplainError> {
        let marked = src.location == Location::Local
            && src.live.is_some_and(|l| {
                self.config.mark_mask != 0
                    && l.info.slot != 0
                    && l.programmed()
                    && (l.isolated(Direction::Ingress) || l.isolated(Direction::Egress))
            });
        if !marked {
            let j = self.side(src, sp, Direction::Egress, frontend, q, notes)?;
            if j.isolated == Some(true) {
                notes.push(format!(
                    "{} has no mark slot: its Service traffic is judged at the frontend \
                     address, not the backend",
                    sp.name()
                ));
            }
            return Ok(j);
        }
        let policies = src
            .state
            .map(|s| s.egress.policies.clone())
            .unwrap_or_default();
        let isolated = src.live.is_some_and(|l| l.isolated(Direction::Egress));
        let mut j = Judgement::passes(
            Direction::Egress,
            sp.name(),
            reason::PASS_SERVICE,
            format!(
                "marked, not judged, at from_pod: its egress ({}) is judged against the \
                 backend kube-proxy picks, where that backend is seen",
                if isolated {
                    format!("isolated by {}", policies.join(", "))
                } else {
                    "not isolated".to_owned()
                }
            ),
        );
        j.isolated = Some(isolated);
        j.policies = policies;
        Ok(j)
    }

    /// The judgement of `r`'s direction `d` for a connection with `peer`.
    fn side(
        &self,
        r: &Resolved<'_>,
        p: &Party,
        d: Direction,
        peer: IpAddr,
        q: &Query,
        notes: &mut Vec<String>,
    ) -> Result<Judgement, ExplainError> {
        let of = p.name();
        let whose = d.field();
        match r.location {
            Location::Remote => {
                return Ok(Judgement::not_judged(
                    d,
                    of.clone(),
                    format!("{of} is not on this node: its {whose} is judged on its own node"),
                ));
            }
            Location::Node | Location::Other => {
                return Ok(Judgement::not_judged(
                    d,
                    of,
                    "not a pod of this node: nothing to judge here".to_owned(),
                ));
            }
            Location::Local => {}
        }
        let Some(live) = r.live else {
            return Ok(Judgement::passes(
                d,
                of,
                reason::PASS_UNMANAGED,
                "no entry in NETPOL_ENDPOINTS for its interface: netpol does not judge it \
                 (the agent has not bound it, or it left)"
                    .to_owned(),
            ));
        };
        if !live.programmed() {
            let open = self.config.flags & config_flags::NEW_PODS_FAIL_OPEN != 0;
            let (r, text) = if open {
                (
                    reason::PASS_NEW_POD_OPEN,
                    "its interface is not programmed yet and new pods fail open",
                )
            } else {
                (
                    reason::DROP_NOT_PROGRAMMED,
                    "its interface is not programmed yet and new pods fail closed",
                )
            };
            let mut j = Judgement::passes(d, of, r, text.to_owned());
            j.allowed = open;
            return Ok(j);
        }
        // The staged view where it differs for this direction: its
        // entries under the staged endpoint id, its isolation flag.
        let (differs, staged_isolated) = endpoint_flags::staged(d.raw());
        let in_staged = q.staged && live.info.flags & differs != 0;
        let (id, isolated) = if in_staged {
            (
                staged_endpoint(live.info.id),
                live.info.flags & staged_isolated != 0,
            )
        } else {
            (live.info.id, live.isolated(d))
        };
        let policies = r
            .state
            .map(|s| {
                let ds = s.direction(d);
                match &ds.staged {
                    Some(st) if in_staged => st.policies.clone(),
                    _ => ds.policies.clone(),
                }
            })
            .unwrap_or_default();
        if !isolated {
            let mut j = Judgement::passes(
                d,
                of,
                reason::PASS_NOT_ISOLATED,
                format!("not isolated: no policy selects it for {whose}"),
            );
            j.isolated = Some(false);
            return Ok(j);
        }
        let selector = policy_selector(id, d.raw());
        let ruleset = self.maps.policy_lookup(selector, peer)?;
        let entry = ruleset.map(|rs| self.matched(id, d, selector, peer, rs, notes));
        let allowed = match ruleset {
            Some(rs) => self.maps.port_allows(rs, q.protocol, q.port)?,
            None => false,
        };
        let isolated_by = if policies.is_empty() {
            "isolated".to_owned()
        } else {
            format!("isolated by {}", policies.join(", "))
        };
        let what = format!("{}/{}", protocol_name(q.protocol), q.port);
        // Where a ClusterNetworkPolicy applies: what decides, from the
        // state file. The maps decide; a decision that disagrees with them
        // (a state file older or newer than the maps) names nothing.
        let decision = self
            .state
            .and_then(|s| s.decision_at(id, d, peer, q.protocol, q.port))
            .filter(|x| x.allowed == allowed)
            .cloned();
        let decided = decision.as_ref().map(|x| match &entry {
            Some(m) => format!(
                "{} (entry {} -> rule set {}: {})",
                x.text, m.prefix, m.ruleset, m.ports
            ),
            None => format!("{} (no entry covers {peer})", x.text),
        });
        let text = decided.unwrap_or_else(|| match (&entry, allowed) {
            (Some(m), true) => format!(
                "allowed by {} (entry {} -> rule set {}: {})",
                if m.rules.is_empty() {
                    "a rule the state file does not name".to_owned()
                } else {
                    m.rules.join(", ")
                },
                m.prefix,
                m.ruleset,
                m.ports
            ),
            (Some(m), false) if m.ruleset == EMPTY_RULESET => format!(
                "{isolated_by} and no rule matches: {peer} falls in {}, an except of {}",
                m.prefix,
                if m.rules.is_empty() {
                    "a rule".to_owned()
                } else {
                    m.rules.join(", ")
                }
            ),
            (Some(m), false) => format!(
                "{isolated_by} and no rule matches: entry {} -> rule set {} ({}{}) does not \
                 allow {what}",
                m.prefix,
                m.ruleset,
                m.ports,
                if m.rules.is_empty() {
                    String::new()
                } else {
                    format!(", from {}", m.rules.join(", "))
                }
            ),
            (None, _) => {
                format!("{isolated_by} and no rule matches: no entry covers {peer}")
            }
        });
        Ok(Judgement {
            direction: d,
            of,
            judged: true,
            allowed,
            reason: reason::name(if allowed {
                reason::PASS_POLICY
            } else {
                reason::DROP_POLICY
            })
            .to_owned(),
            isolated: Some(true),
            policies,
            entry,
            decision,
            text,
        })
    }

    /// The entry behind the kernel's answer `ruleset`: the longest prefix
    /// of `selector` covering `peer`, named from the state file (`endpoint`:
    /// the id its entries are keyed by, the staged one for the staged view).
    fn matched(
        &self,
        endpoint: u32,
        d: Direction,
        selector: u32,
        peer: IpAddr,
        ruleset: u32,
        notes: &mut Vec<String>,
    ) -> Matched {
        let entries = if peer.is_ipv6() {
            &self.entries_v6
        } else {
            &self.entries_v4
        };
        let best = entries
            .iter()
            .filter(|e| e.selector == selector && e.prefix.contains(&peer))
            .max_by_key(|e| e.prefix_len);
        let ports = self
            .rulesets
            .get(&ruleset)
            .map_or_else(|| "nothing".to_owned(), |r| ports_text(r));
        let Some(best) = best.filter(|b| b.ruleset == ruleset) else {
            // The maps changed between the walk and the lookup.
            notes.push("the maps changed while being read: run explain again".to_owned());
            return Matched {
                selector,
                prefix: IpNet::from(peer),
                ruleset,
                ports,
                rules: Vec::new(),
                stale: true,
            };
        };
        let recorded = self
            .state
            .and_then(|s| s.entry(endpoint, d, best.prefix))
            .filter(|e| e.ruleset == ruleset);
        if self.state.is_some() && recorded.is_none() {
            notes.push(format!(
                "the state file has no entry {} for endpoint {} ({}): it is older or newer \
                 than the maps",
                best.prefix,
                endpoint,
                d.field()
            ));
        }
        Matched {
            selector,
            prefix: best.prefix,
            ruleset,
            ports,
            rules: recorded
                .map(|e| e.rules.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            stale: recorded.is_none(),
        }
    }
}
#[cfg(test)]
mod tests;
