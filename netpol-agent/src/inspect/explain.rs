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
use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use netpol_common::{EndpointInfo, GlobalConfig, config_flags, policy_selector, protocol, reason};
use serde::Serialize;

use super::{InspectError, LiveEndpoint, LiveEntry, Maps, PortRun, ports_text, protocol_name};
use crate::{
    compiler::{Direction, EMPTY_RULESET},
    provenance::{EndpointState, State},
};

/// One side of a query: a pod by `namespace/name`, or an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `namespace/name`.
    Pod(String),
    /// An address.
    Address(IpAddr),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse() {
            return Ok(Self::Address(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::Pod(s.to_owned()))
            }
            _ => Err(format!(
                "{s:?} is neither a pod (namespace/name) nor an address"
            )),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod(p) => f.write_str(p),
            Self::Address(a) => write!(f, "{a}"),
        }
    }
}

/// One question: does `src` reach `dst` on `protocol`/`port`?
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The client.
    pub src: Target,
    /// The server.
    pub dst: Target,
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port (0 for protocols without ports).
    pub port: u16,
    /// 4 or 6: which address of a pod to use (default: the addresses'
    /// family, else IPv4 when both pods have one).
    pub family: Option<u8>,
}

/// Parses `tcp/80`, `UDP/53`, `sctp/5000`, `icmp`.
///
/// # Errors
/// A message naming what is wrong.
pub fn parse_port(s: &str) -> Result<(u8, u16), String> {
    let (p, port) = match s.split_once('/') {
        Some((p, port)) => (
            p,
            port.parse::<u16>()
                .map_err(|_| format!("{s:?}: {port:?} is not a port"))?,
        ),
        None => (s, 0),
    };
    let proto = super::parse_protocol(p).ok_or_else(|| format!("{s:?}: unknown protocol {p:?}"))?;
    let needs_port = matches!(proto, protocol::TCP | protocol::UDP | protocol::SCTP);
    if needs_port && !s.contains('/') {
        return Err(format!("{s:?}: give the port, as {p}/PORT"));
    }
    Ok((proto, port))
}

/// Parses a family: `4`, `6`, `ipv4`, `ipv6`.
///
/// # Errors
/// Anything else.
pub fn parse_family(s: &str) -> Result<u8, String> {
    match s.to_ascii_lowercase().as_str() {
        "4" | "ipv4" | "v4" => Ok(4),
        "6" | "ipv6" | "v6" => Ok(6),
        _ => Err(format!("{s:?} is not a family (4 or 6)")),
    }
}

impl FromStr for Query {
    type Err = String;

    /// `SRC DST PROTO/PORT [4|6]` (a line of `explain --batch`).
    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (src, dst, port, family) = match words.as_slice() {
            [src, dst, port] => (src, dst, port, None),
            [src, dst, port, fam] => (src, dst, port, Some(parse_family(fam)?)),
            [src, dst, port, "--family", fam] => (src, dst, port, Some(parse_family(fam)?)),
            _ => return Err(format!("{line:?}: expected SRC DST PROTO/PORT [4|6]")),
        };
        let (protocol, port) = parse_port(port)?;
        Ok(Self {
            src: src.parse()?,
            dst: dst.parse()?,
            protocol,
            port,
            family,
        })
    }
}

/// Why a query could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The maps could not be read.
    #[error(transparent)]
    Maps(#[from] InspectError),
    /// The query names something unknown or ambiguous.
    #[error("{0}")]
    Query(String),
}

/// Where a party is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Location {
    /// A pod of this node.
    Local,
    /// A pod of another node.
    Remote,
    /// One of this node's addresses.
    Node,
    /// An address that is no pod the state file knows.
    Other,
}

/// One side of the connection, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Party {
    /// As given.
    pub given: String,
    /// The address used.
    pub address: IpAddr,
    /// `namespace/name`, when known.
    pub pod: Option<String>,
    /// Where it is.
    pub location: Location,
    /// Its endpoint id (local pods with a live entry).
    pub endpoint: Option<u32>,
    /// Its host interface index.
    pub ifindex: Option<u32>,
    /// Its host interface name (state file).
    pub interface: Option<String>,
}

impl Party {
    fn name(&self) -> String {
        self.pod.clone().unwrap_or_else(|| self.address.to_string())
    }
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.pod, self.location) {
            (Some(p), Location::Local) => {
                write!(f, "{p} ({}", self.address)?;
                if let Some(id) = self.endpoint {
                    write!(f, ", endpoint {id}")?;
                }
                match (&self.interface, self.ifindex) {
                    (Some(n), Some(i)) => write!(f, " on {n}/{i}")?,
                    (None, Some(i)) => write!(f, " on ifindex {i}")?,
                    _ => {}
                }
                f.write_str(")")
            }
            (Some(p), _) => write!(f, "{p} ({}, not on this node)", self.address),
            (None, Location::Node) => write!(f, "{} (this node)", self.address),
            (None, _) => write!(f, "{}", self.address),
        }
    }
}

/// The overall verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Both sides this node judges allow it.
    Allowed,
    /// A side this node judges drops it.
    Denied,
    /// The destination is a Service frontend: it depends on the backend.
    Depends,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allowed => "ALLOWED",
            Self::Denied => "DENIED",
            Self::Depends => "DEPENDS ON THE BACKEND",
        })
    }
}

/// The policy-trie entry the kernel matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Matched {
    /// The key's selector (`endpoint << 1 | direction`).
    pub selector: u32,
    /// Its peer prefix.
    pub prefix: IpNet,
    /// Its rule set (the kernel's answer).
    pub ruleset: u32,
    /// The rule set's ports, read from the port trie.
    pub ports: String,
    /// The NetworkPolicy rules that produced the entry (state file).
    pub rules: Vec<String>,
    /// The state file has no such entry, or another rule set for it (it
    /// is older or newer than the maps): `rules` may be missing.
    pub stale: bool,
}

/// One direction's judgement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Judgement {
    /// `egress` or `ingress`.
    pub direction: Direction,
    /// Whose: `namespace/name` or an address.
    pub of: String,
    /// This node judges it.
    pub judged: bool,
    /// It lets the connection through.
    pub allowed: bool,
    /// `netpol_common::reason` name (`pass_policy`, `drop_policy`, ...),
    /// or `not_judged`.
    pub reason: String,
    /// The direction is isolated (local pods).
    pub isolated: Option<bool>,
    /// The policies isolating it (state file).
    pub policies: Vec<String>,
    /// The entry the kernel matched, if any.
    pub entry: Option<Matched>,
    /// One sentence.
    pub text: String,
}

impl Judgement {
    fn not_judged(direction: Direction, of: String, text: String) -> Self {
        Self {
            direction,
            of,
            judged: false,
            allowed: true,
            reason: "not_judged".to_owned(),
            isolated: None,
            policies: Vec::new(),
            entry: None,
            text,
        }
    }

    fn passes(direction: Direction, of: String, r: u32, text: String) -> Self {
        Self {
            judged: true,
            reason: reason::name(r).to_owned(),
            ..Self::not_judged(direction, of, text)
        }
    }
}

/// A Service the destination is a frontend of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceNote {
    /// `namespace/name` of its Services (state file).
    pub services: Vec<String>,
    /// `cluster_ip`, `node_port`, ...
    pub kind: String,
}

/// The answer to a [`Query`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The client.
    pub src: Party,
    /// The server.
    pub dst: Party,
    /// 4 or 6.
    pub family: u8,
    /// `TCP`, `UDP`, ...
    pub protocol: String,
    /// Destination port.
    pub port: u16,
    /// The verdict.
    pub verdict: Verdict,
    /// The source's egress.
    pub egress: Judgement,
    /// The destination's ingress.
    pub ingress: Judgement,
    /// Set when the destination is a Service frontend.
    pub service: Option<ServiceNote>,
    /// Caveats (no state file, ...).
    pub notes: Vec<String>,
}

impl Explanation {
    /// The process exit code of `explain`: 0 allowed, 1 denied, 2 depends.
    #[must_use]
    pub const fn exit_code(&self) -> u8 {
        match self.verdict {
            Verdict::Allowed => 0,
            Verdict::Denied => 1,
            Verdict::Depends => 2,
        }
    }

    /// The NetworkPolicy rules that allow it (empty unless a side was
    /// allowed by a rule).
    #[must_use]
    pub fn allowing_rules(&self) -> Vec<&str> {
        [&self.egress, &self.ingress]
            .into_iter()
            .filter(|j| j.allowed && j.reason == reason::name(reason::PASS_POLICY))
            .filter_map(|j| j.entry.as_ref())
            .flat_map(|m| m.rules.iter().map(String::as_str))
            .collect()
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} -> {} {}/{} IPv{}: {}",
            self.src, self.dst, self.protocol, self.port, self.family, self.verdict
        )?;
        if let Some(s) = &self.service {
            writeln!(
                f,
                "  {} is a Service frontend ({}) of {}: kube-proxy translates it after \
                 the source's from_pod; the verdict depends on the backend it picks \
                 (explain the backend pod's address)",
                self.dst.address,
                s.kind,
                if s.services.is_empty() {
                    "a Service the state file does not name".to_owned()
                } else {
                    s.services.join(", ")
                }
            )?;
        }
        for j in [&self.egress, &self.ingress] {
            writeln!(
                f,
                "  {} of {}: {} ({})",
                j.direction.field(),
                j.of,
                j.text,
                j.reason
            )?;
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        Ok(())
    }
}

/// Answers queries against one reading of the maps (batch mode reads the
/// tries once).
pub struct Explainer<'a> {
    maps: &'a dyn Maps,
    state: Option<&'a State>,
    endpoints: Vec<LiveEndpoint>,
    entries_v4: Vec<LiveEntry>,
    entries_v6: Vec<LiveEntry>,
    rulesets: BTreeMap<u32, Vec<PortRun>>,
    config: GlobalConfig,
    notes: Vec<String>,
}

impl fmt::Debug for Explainer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Explainer").finish_non_exhaustive()
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
        Ok(Self {
            endpoints: maps.endpoints()?,
            entries_v4: maps.policy_entries(false)?,
            entries_v6: maps.policy_entries(true)?,
            rulesets: super::rulesets(&maps.port_blocks()?),
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
        let (egress, ingress) = if sa == da {
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
        let policies = r
            .state
            .map(|s| s.direction(d).policies.clone())
            .unwrap_or_default();
        if !live.isolated(d) {
            let mut j = Judgement::passes(
                d,
                of,
                reason::PASS_NOT_ISOLATED,
                format!("not isolated: no policy selects it for {whose}"),
            );
            j.isolated = Some(false);
            return Ok(j);
        }
        let selector = policy_selector(live.info.id, d.raw());
        let ruleset = self.maps.policy_lookup(selector, peer)?;
        let entry = ruleset.map(|rs| self.matched(live.info, d, selector, peer, rs, notes));
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
        let text = match (&entry, allowed) {
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
        };
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
            text,
        })
    }

    /// The entry behind the kernel's answer `ruleset`: the longest prefix
    /// of `selector` covering `peer`, named from the state file.
    fn matched(
        &self,
        info: EndpointInfo,
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
            .and_then(|s| s.entry(info.id, d, best.prefix))
            .filter(|e| e.ruleset == ruleset);
        if self.state.is_some() && recorded.is_none() {
            notes.push(format!(
                "the state file has no entry {} for endpoint {} ({}): it is older or newer \
                 than the maps",
                best.prefix,
                info.id,
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
mod tests {
    use std::{collections::BTreeMap, path::Path};

    use netpol_common::FrontendValue;

    use super::*;
    use crate::compiler::{Compiled, IdAllocation, compile};
    use crate::inspect::{PortBlock, decode_policy_v4, decode_policy_v6, decode_port};
    use crate::model::ObjectRef;
    use crate::provenance::{Bound, Inputs};
    use crate::test_support;

    /// The maps as the map writer fills them, in memory: lookups are the
    /// longest prefix match over the entries.
    struct Fake {
        endpoints: Vec<LiveEndpoint>,
        v4: Vec<LiveEntry>,
        v6: Vec<LiveEntry>,
        ports: Vec<PortBlock>,
        frontends: BTreeMap<(IpAddr, u16, u8), FrontendValue>,
        config: GlobalConfig,
    }

    impl Fake {
        fn of(c: &Compiled, ifindex: &BTreeMap<ObjectRef, u32>) -> Self {
            let mut frontends = BTreeMap::new();
            for (k, v) in &c.frontends_v4 {
                frontends.insert(
                    (IpAddr::from(k.addr), u16::from_be_bytes(k.port), k.protocol),
                    *v,
                );
            }
            for (k, v) in &c.frontends_v6 {
                frontends.insert(
                    (IpAddr::from(k.addr), u16::from_be_bytes(k.port), k.protocol),
                    *v,
                );
            }
            Self {
                endpoints: c
                    .endpoint_infos()
                    .filter_map(|(p, info)| {
                        ifindex.get(p).map(|&i| LiveEndpoint { ifindex: i, info })
                    })
                    .collect(),
                v4: c
                    .policy_v4_entries()
                    .map(|(l, k, v)| decode_policy_v4(l, &k, v))
                    .collect(),
                v6: c
                    .policy_v6_entries()
                    .map(|(l, k, v)| decode_policy_v6(l, &k, v))
                    .collect(),
                ports: c
                    .port_entries()
                    .map(|(l, k, v)| decode_port(l, &k, v))
                    .collect(),
                frontends,
                config: GlobalConfig::default(),
            }
        }
    }

    impl Maps for Fake {
        fn endpoints(&self) -> Result<Vec<LiveEndpoint>, InspectError> {
            Ok(self.endpoints.clone())
        }
        fn policy_entries(&self, v6: bool) -> Result<Vec<LiveEntry>, InspectError> {
            Ok(if v6 { self.v6.clone() } else { self.v4.clone() })
        }
        fn policy_lookup(&self, selector: u32, peer: IpAddr) -> Result<Option<u32>, InspectError> {
            let list = if peer.is_ipv6() { &self.v6 } else { &self.v4 };
            Ok(list
                .iter()
                .filter(|e| e.selector == selector && e.prefix.contains(&peer))
                .max_by_key(|e| e.prefix_len)
                .map(|e| e.ruleset))
        }
        fn port_blocks(&self) -> Result<Vec<PortBlock>, InspectError> {
            Ok(self.ports.clone())
        }
        fn port_allows(&self, ruleset: u32, proto: u8, port: u16) -> Result<bool, InspectError> {
            Ok(self.ports.iter().any(|b| {
                b.ruleset == ruleset
                    && b.allow
                    && b.protocol.is_none_or(|p| p == proto)
                    && (b.first..=b.last).contains(&port)
            }))
        }
        fn frontend(
            &self,
            a: IpAddr,
            port: u16,
            proto: u8,
        ) -> Result<Option<FrontendValue>, InspectError> {
            Ok(self.frontends.get(&(a, port, proto)).copied())
        }
        fn config(&self) -> Result<GlobalConfig, InspectError> {
            Ok(self.config)
        }
    }

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.2}, {ip: "fd01::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.3}, {ip: "fd01::3"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: r, namespace: x, labels: {app: r}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.2}]}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: x}
spec: {clusterIP: 10.43.0.10, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: 80}]
  - from: [{ipBlock: {cidr: 10.2.0.0/16, except: [10.2.0.0/24]}}]
"#;

    fn setup() -> (Fake, State) {
        let snap = test_support::snapshot(CLUSTER);
        let c = compile(&snap, &IdAllocation::default());
        let mut ifindex = BTreeMap::new();
        let mut bound = BTreeMap::new();
        for (i, pod) in c.endpoints.keys().enumerate() {
            let i = u32::try_from(i).unwrap() + 10;
            ifindex.insert(pod.clone(), i);
            bound.insert(
                pod.clone(),
                Bound {
                    ifindex: i,
                    name: format!("veth{i}"),
                },
            );
        }
        let state = State::build(&Inputs {
            compiled: &c,
            snapshot: &snap,
            interfaces: &bound,
            generation: 1,
            fingerprint: None,
            pin_dir: Path::new("/sys/fs/bpf/netpol"),
        });
        (Fake::of(&c, &ifindex), state)
    }

    fn ask(line: &str) -> Explanation {
        let (maps, state) = setup();
        let e = Explainer::new(&maps, Some(&state)).expect("explainer");
        e.explain(&line.parse().expect("query")).expect("explained")
    }

    #[test]
    fn allowed_connection_names_the_rule_behind_the_entry() {
        for line in [
            "x/a x/b tcp/80",
            "x/a x/b tcp/80 6",
            "10.1.0.2 10.1.0.3 TCP/80",
        ] {
            let e = ask(line);
            assert_eq!(e.verdict, Verdict::Allowed, "{line}: {e}");
            assert_eq!(e.egress.reason, "pass_not_isolated", "{line}");
            assert_eq!(e.ingress.reason, "pass_policy", "{line}");
            assert_eq!(
                e.allowing_rules(),
                ["x/b-from-a: spec.ingress[0]"],
                "{line}"
            );
            assert_eq!(e.dst.pod.as_deref(), Some("x/b"));
            assert_eq!(e.exit_code(), 0);
        }
        assert_eq!(
            ask("x/a x/b tcp/80 6").src.address,
            "fd01::2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn denied_connection_names_the_isolating_policies() {
        let e = ask("x/a x/b udp/80");
        assert_eq!(e.verdict, Verdict::Denied, "{e}");
        assert_eq!(e.ingress.reason, "drop_policy");
        assert_eq!(e.ingress.policies, ["x/b-from-a", "x/deny-all"]);
        assert!(
            e.ingress
                .text
                .contains("isolated by x/b-from-a, x/deny-all and no rule matches"),
            "{e}"
        );
        assert!(e.ingress.text.contains("TCP 80"), "{e}");
        assert_eq!(e.exit_code(), 1);
        let e = ask("x/b x/a tcp/80");
        assert_eq!(e.verdict, Verdict::Allowed, "a is not isolated: {e}");
    }

    #[test]
    fn remote_peers_are_judged_only_on_this_nodes_side() {
        // 10.2.0.2 is in the except: the empty rule set shadows the block.
        let e = ask("x/r x/b tcp/80");
        assert_eq!(e.verdict, Verdict::Denied, "{e}");
        assert_eq!(e.egress.reason, "not_judged");
        let m = e.ingress.entry.as_ref().expect("the except's entry");
        assert_eq!(m.ruleset, EMPTY_RULESET);
        assert!(
            e.ingress
                .text
                .contains("an except of x/b-from-a: spec.ingress[1]"),
            "{e}"
        );
        // Past the except, the ipBlock rule allows every port.
        let e = ask("10.2.1.1 x/b udp/9");
        assert_eq!(e.verdict, Verdict::Allowed, "{e}");
        assert_eq!(e.allowing_rules(), ["x/b-from-a: spec.ingress[1]"]);
        let e = ask("x/b x/r tcp/80");
        assert_eq!(e.ingress.reason, "not_judged");
        assert_eq!(e.verdict, Verdict::Allowed);
    }

    #[test]
    fn service_frontend_depends_on_the_backend() {
        let e = ask("x/a 10.43.0.10 tcp/80");
        assert_eq!(e.verdict, Verdict::Depends, "{e}");
        assert_eq!(
            e.service.as_ref().map(|s| s.services.clone()),
            Some(vec!["x/s".to_owned()])
        );
        assert_eq!(e.exit_code(), 2);
        assert_eq!(e.egress.reason, "pass_not_isolated");
        // An isolated pod with a mark slot: marked at from_pod, judged
        // downstream against the backend.
        let (mut maps, state) = setup();
        maps.config.mark_mask = netpol_common::mark::DEFAULT_MASK;
        for ep in &mut maps.endpoints {
            ep.info.slot = ep.info.id;
        }
        let x = Explainer::new(&maps, Some(&state)).expect("explainer");
        let e = x
            .explain(&"x/b 10.43.0.10 tcp/80".parse().expect("query"))
            .expect("explained");
        assert_eq!(
            (e.verdict, e.egress.reason.as_str()),
            (Verdict::Depends, "pass_service"),
            "{e}"
        );
    }

    #[test]
    fn a_pod_reaching_itself_is_allowed_and_node_traffic_passes() {
        let e = ask("x/b x/b tcp/81");
        assert_eq!(e.verdict, Verdict::Allowed, "{e}");
        let e = ask("10.0.0.1 x/b tcp/81");
        assert_eq!(e.verdict, Verdict::Allowed, "{e}");
        assert_eq!(e.ingress.reason, "pass_node_origin");
    }

    #[test]
    fn unknown_pods_and_missing_families_are_errors() {
        let (maps, state) = setup();
        let x = Explainer::new(&maps, Some(&state)).expect("explainer");
        let err = |l: &str| {
            x.explain(&l.parse().expect("query"))
                .expect_err(l)
                .to_string()
        };
        assert!(err("x/nope x/b tcp/80").contains("x/nope"));
        assert!(err("x/r x/b tcp/80 6").contains("no IPv6 address"));
        let none = Explainer::new(&maps, None).expect("explainer");
        assert!(
            none.explain(&"x/a x/b tcp/80".parse().expect("query"))
                .is_err()
        );
        let e = none
            .explain(&"10.1.0.2 10.1.0.3 tcp/80".parse().expect("query"))
            .expect("by address");
        assert_eq!(e.verdict, Verdict::Allowed);
        assert!(e.ingress.entry.as_ref().is_some_and(|m| m.stale));
    }

    #[test]
    fn queries_parse_from_batch_lines() {
        let q: Query = "x/a 10.1.0.3 sctp/5000 6".parse().expect("query");
        assert_eq!(
            q,
            Query {
                src: Target::Pod("x/a".into()),
                dst: Target::Address("10.1.0.3".parse().unwrap()),
                protocol: protocol::SCTP,
                port: 5000,
                family: Some(6),
            }
        );
        assert!("x/a x/b tcp".parse::<Query>().is_err());
        assert!("x/a x/b tcp/99999".parse::<Query>().is_err());
        assert!("x x/b tcp/80".parse::<Query>().is_err());
        assert_eq!(parse_port("icmp"), Ok((protocol::ICMP, 0)));
    }
}
