//! What a compile produces: the typed map contents ([`Compiled`]) with the
//! ids to carry to the next compile, and the types they are made of.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use netpol_common::{
    EndpointInfo, FrontendKeyV4, FrontendKeyV6, FrontendValue, PolicyKeyV4, PolicyKeyV6,
    PolicyValue, PortKey, PortValue, SELECTOR_BITS, direction, endpoint_flags, policy_selector,
};
use serde::{Deserialize, Serialize};

use super::{MapCounts, MapState, RuleSet};
use crate::model::{ModelError, ObjectRef, Tier};

/// Direction of a policy, seen from the local pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Traffic leaving the pod.
    Egress,
    /// Traffic entering the pod.
    Ingress,
}

impl Direction {
    /// The `netpol_common::direction` code.
    #[must_use]
    pub const fn raw(self) -> u32 {
        match self {
            Direction::Egress => direction::EGRESS,
            Direction::Ingress => direction::INGRESS,
        }
    }

    /// Field name in a policy spec.
    #[must_use]
    pub const fn field(self) -> &'static str {
        direction::name(self.raw())
    }
}

/// One rule of one policy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleRef {
    /// The policy (a `ClusterNetworkPolicy` has an empty namespace).
    pub policy: ObjectRef,
    /// `spec.ingress` or `spec.egress`.
    pub direction: Direction,
    /// Index in that list.
    pub index: usize,
    /// The `ClusterNetworkPolicy` tier; `None` for a `NetworkPolicy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.tier {
            None => write_rule(f, &self.policy, None, self.direction, self.index),
            Some(tier) => write_rule(
                f,
                &self.policy.name,
                Some(tier.as_str()),
                self.direction,
                self.index,
            ),
        }
    }
}

/// How a rule is named everywhere (entries, the state file, explain):
/// `ns/name: spec.ingress[0]`, or for a `ClusterNetworkPolicy`
/// `ClusterNetworkPolicy name (Admin): spec.ingress[0]`.
///
/// # Errors
/// The formatter's.
pub fn write_rule(
    f: &mut fmt::Formatter<'_>,
    policy: &dyn fmt::Display,
    tier: Option<&str>,
    direction: Direction,
    index: usize,
) -> fmt::Result {
    match tier {
        None => write!(f, "{policy}: spec.{}[{index}]", direction.field()),
        Some(tier) => write!(
            f,
            "ClusterNetworkPolicy {policy} ({tier}): spec.{}[{index}]",
            direction.field()
        ),
    }
}

/// A local endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "the endpoint flags, one field each"
)]
pub struct Endpoint {
    /// Endpoint id (never 0).
    pub id: u32,
    /// Some policy selects the pod for ingress.
    pub ingress_isolated: bool,
    /// Some policy selects the pod for egress.
    pub egress_isolated: bool,
    /// Its traffic to itself through a Service is judged against the
    /// entries of its own addresses (a `ClusterNetworkPolicy` applies to
    /// it); otherwise it passes.
    pub hairpin_judged: bool,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// The pod is annotated
    /// [`ALLOW_ANY_SOURCE_ANNOTATION`](crate::model::ALLOW_ANY_SOURCE_ANNOTATION):
    /// no anti-spoofing check.
    pub allow_any_source: bool,
    /// Policy generation of the ingress direction: a content hash of what
    /// it allows (isolation, its entries of both families, the contents of
    /// the rule sets they point at), never 0 when isolated; 0 when not.
    /// Equal content, equal generation, whatever the endpoint id.
    pub ingress_gen: u32,
    /// The same for egress.
    pub egress_gen: u32,
    /// Where the staged view ([`crate::model::Staging`]) judges the
    /// ingress differently (another isolation or generation): whether it
    /// isolates it. Its entries are keyed by
    /// [`staged_endpoint`](netpol_common::staged_endpoint)`(id)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged_ingress: Option<bool>,
    /// The same for egress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged_egress: Option<bool>,
    /// Where the staged view judges the pod's hairpin the other way:
    /// whether it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged_hairpin_judged: Option<bool>,
}

impl Endpoint {
    /// The endpoint map value.
    #[must_use]
    pub fn info(&self) -> EndpointInfo {
        let mut flags = 0;
        if self.ingress_isolated {
            flags |= endpoint_flags::INGRESS_ISOLATED;
        }
        if self.egress_isolated {
            flags |= endpoint_flags::EGRESS_ISOLATED;
        }
        if self.ips.iter().any(IpAddr::is_ipv4) {
            flags |= endpoint_flags::HAS_IPV4;
        }
        if self.ips.iter().any(IpAddr::is_ipv6) {
            flags |= endpoint_flags::HAS_IPV6;
        }
        if self.allow_any_source {
            flags |= endpoint_flags::ALLOW_ANY_SOURCE;
        }
        if self.hairpin_judged {
            flags |= endpoint_flags::HAIRPIN_JUDGED;
        }
        if self
            .staged_hairpin_judged
            .is_some_and(|s| s != self.hairpin_judged)
        {
            flags |= endpoint_flags::STAGED_HAIRPIN;
        }
        for (d, staged) in [
            (direction::INGRESS, self.staged_ingress),
            (direction::EGRESS, self.staged_egress),
        ] {
            let (differs, isolated) = endpoint_flags::staged(d);
            match staged {
                Some(true) => flags |= differs | isolated,
                Some(false) => flags |= differs,
                None => {}
            }
        }
        let mut info = EndpointInfo {
            id: self.id,
            flags,
            ingress_gen: self.ingress_gen,
            egress_gen: self.egress_gen,
            ..EndpointInfo::default()
        };
        // A pod has at most one address per family; the first one wins if
        // a malformed status lists more.
        for ip in self.ips.iter().rev() {
            match ip {
                IpAddr::V4(a) => info.ipv4 = a.octets(),
                IpAddr::V6(a) => info.ipv6 = a.octets(),
            }
        }
        info
    }

    /// Whether the direction is enforced (isolated).
    #[must_use]
    pub fn isolated(&self, d: Direction) -> bool {
        match d {
            Direction::Egress => self.egress_isolated,
            Direction::Ingress => self.ingress_isolated,
        }
    }

    /// Where the staged view judges direction `d` differently: whether it
    /// isolates it.
    #[must_use]
    pub fn staged(&self, d: Direction) -> Option<bool> {
        match d {
            Direction::Egress => self.staged_egress,
            Direction::Ingress => self.staged_ingress,
        }
    }

    /// The policy generation of a direction.
    #[must_use]
    pub fn generation(&self, d: Direction) -> u32 {
        match d {
            Direction::Egress => self.egress_gen,
            Direction::Ingress => self.ingress_gen,
        }
    }
}

/// Key of a policy-trie entry, typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyTarget {
    /// Local endpoint id.
    pub endpoint: u32,
    /// Direction.
    pub direction: Direction,
    /// Peer prefix (truncated to its network).
    pub prefix: IpNet,
}

impl PolicyTarget {
    /// [`policy_selector`] of the endpoint and direction.
    #[must_use]
    pub fn selector(&self) -> u32 {
        policy_selector(self.endpoint, self.direction.raw())
    }

    /// LPM prefix length: selector plus peer prefix.
    #[must_use]
    pub fn prefix_len(&self) -> u32 {
        SELECTOR_BITS + u32::from(self.prefix.prefix_len())
    }

    /// Exact IPv4 key, if the prefix is IPv4.
    #[must_use]
    pub fn raw_v4(&self) -> Option<(u32, PolicyKeyV4)> {
        match self.prefix {
            IpNet::V4(n) => Some((
                self.prefix_len(),
                PolicyKeyV4 {
                    selector: self.selector(),
                    addr: n.network().octets(),
                },
            )),
            IpNet::V6(_) => None,
        }
    }

    /// Exact IPv6 key, if the prefix is IPv6.
    #[must_use]
    pub fn raw_v6(&self) -> Option<(u32, PolicyKeyV6)> {
        match self.prefix {
            IpNet::V6(n) => Some((
                self.prefix_len(),
                PolicyKeyV6 {
                    selector: self.selector(),
                    addr: n.network().octets(),
                },
            )),
            IpNet::V4(_) => None,
        }
    }
}

/// Value of a policy-trie entry with where it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicyEntry {
    /// Rule-set id.
    pub ruleset: u32,
    /// The rules that produced it, sorted (for an entry of
    /// [`EMPTY_RULESET`](super::EMPTY_RULESET) shadowing a shorter prefix: the rules whose
    /// `except` it is). Shared between the entries that have the same.
    #[serde(serialize_with = "serialize_rules")]
    pub sources: Arc<[RuleRef]>,
    /// For an entry of a direction some `ClusterNetworkPolicy` applies to:
    /// how each of its `(protocol, port)`s was decided, disjoint and
    /// covering them all. Shared like `sources`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_decisions"
    )]
    pub decisions: Option<Arc<[Decision]>>,
}

#[allow(
    clippy::ref_option,
    reason = "serde's serialize_with passes the field by reference"
)]
fn serialize_decisions<S: serde::Serializer>(
    r: &Option<Arc<[Decision]>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(r.iter().flat_map(|d| d.iter()))
}

/// The stage of the tiered evaluation that decided some `(protocol,
/// port)`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// An Admin rule: Accept or Deny.
    Admin,
    /// `NetworkPolicy` isolates the direction: its rules allow them, or
    /// nothing does (or the peer is the pod itself, which `NetworkPolicy`
    /// never restricts).
    NetworkPolicy,
    /// A Baseline rule: Accept or Deny.
    Baseline,
    /// No rule decided (or the last one was a Pass): allowed.
    Default,
}

/// How some `(protocol, port)`s of the peers under a tiered entry are
/// decided: what deny events, `explain` and the state file name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Decision {
    /// The `(protocol, port)`s it covers.
    pub ports: RuleSet,
    /// Whether they are allowed.
    pub allowed: bool,
    /// What decided.
    pub stage: Stage,
    /// The Pass rules that sent them on, in evaluation order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passed: Vec<RuleRef>,
    /// The deciding rule (Admin, Baseline); for `NetworkPolicy`, its rules
    /// allowing them (none: isolated, nothing allows them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleRef>,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |rules: &[RuleRef]| {
            rules
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let verdict = if self.allowed { "allowed" } else { "denied" };
        if !self.passed.is_empty() {
            write!(f, "passed by {}; then ", list(&self.passed))?;
        }
        match (self.stage, self.rules.is_empty()) {
            (Stage::Admin | Stage::Baseline, _) => {
                let action = if self.allowed { "Accept" } else { "Deny" };
                write!(f, "{verdict} by {} ({action})", list(&self.rules))
            }
            (Stage::NetworkPolicy, false) => write!(f, "{verdict} by {}", list(&self.rules)),
            (Stage::NetworkPolicy, true) if self.allowed => {
                f.write_str("allowed: NetworkPolicy does not restrict a pod's traffic to itself")
            }
            (Stage::NetworkPolicy, true) => f.write_str(
                "denied: NetworkPolicy isolates the pod and none of its rules allows it",
            ),
            (Stage::Default, _) => f.write_str("allowed: no rule denies it"),
        }
    }
}

fn serialize_rules<S: serde::Serializer>(r: &Arc<[RuleRef]>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(r.iter())
}

/// A pod's endpoint id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointId {
    /// Id.
    pub id: u32,
    /// The pod's uid: another pod of the same name gets another id.
    pub uid: Option<String>,
}

/// Ids handed out, carried from one compile to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdAllocation {
    /// Endpoint ids of local pods.
    pub endpoints: BTreeMap<ObjectRef, EndpointId>,
    /// Rule-set ids by content ([`EMPTY_RULESET`](super::EMPTY_RULESET) is implicit).
    pub rulesets: BTreeMap<RuleSet, u32>,
    /// Where to look for the next free endpoint id.
    pub next_endpoint: u32,
    /// Where to look for the next free rule-set id.
    pub next_ruleset: u32,
    /// Endpoint ids no pod here owns that entries in the maps still carry
    /// (a previous agent's, [`crate::resume`]): never handed out by the
    /// next compile, and not carried past it.
    pub reserved_endpoints: BTreeSet<u32>,
    /// Rule-set ids the same way.
    pub reserved_rulesets: BTreeSet<u32>,
}

/// The compiled contents of one node's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// The node compiled for.
    pub node: Option<String>,
    /// Its addresses (the frontends of node ports; the datapath recognises
    /// node traffic by origin).
    pub node_addresses: Vec<IpAddr>,
    /// Ids to pass to the next compile.
    pub ids: IdAllocation,
    /// Local endpoints.
    pub endpoints: BTreeMap<ObjectRef, Endpoint>,
    /// IPv4 policy-trie entries.
    pub policy_v4: BTreeMap<PolicyTarget, PolicyEntry>,
    /// IPv6 policy-trie entries.
    pub policy_v6: BTreeMap<PolicyTarget, PolicyEntry>,
    /// Rule sets in use, by id ([`EMPTY_RULESET`](super::EMPTY_RULESET) not included).
    pub rulesets: BTreeMap<u32, RuleSet>,
    /// IPv4 Service frontends: exact keys and values of
    /// `NETPOL_FRONTENDS_V4`.
    pub frontends_v4: BTreeMap<FrontendKeyV4, FrontendValue>,
    /// IPv6 Service frontends.
    pub frontends_v6: BTreeMap<FrontendKeyV6, FrontendValue>,
    /// Errors of the snapshot's latest objects (the rest compiled).
    pub errors: Vec<ModelError>,
    /// Remarks (no local node, ...).
    pub notes: Vec<String>,
    /// Names only, never in the maps: where a `ClusterNetworkPolicy`
    /// applies, the decisions of the prefixes whose rule set equals the
    /// shorter prefix's (so the maps leave them out) but whose decisions
    /// do not (a peer an Admin rule denies under a default deny). With the
    /// entries' own decisions they name what decides every address
    /// ([`Compiled::decision_at`]).
    pub named: BTreeMap<PolicyTarget, Arc<[Decision]>>,
}

impl Compiled {
    /// What decides `(protocol, port)` from the peer `addr` for
    /// `endpoint`'s direction `d`, where a `ClusterNetworkPolicy` applies:
    /// the decision of the longest prefix covering `addr` among the
    /// entries and [`Compiled::named`]. `None` where none applies.
    #[must_use]
    pub fn decision_at(
        &self,
        endpoint: u32,
        d: Direction,
        addr: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Option<&Decision> {
        let (map, max) = match addr {
            IpAddr::V4(_) => (&self.policy_v4, 32),
            IpAddr::V6(_) => (&self.policy_v6, 128),
        };
        (0..=max).rev().find_map(|len| {
            let prefix = IpNet::new(addr, len).ok()?.trunc();
            let target = PolicyTarget {
                endpoint,
                direction: d,
                prefix,
            };
            let decisions = match self.named.get(&target) {
                Some(named) => named,
                None => map.get(&target)?.decisions.as_ref()?,
            };
            decisions.iter().find(|x| x.ports.allows(protocol, port))
        })
    }

    /// The entry of the longest prefix covering `addr` among `endpoint`'s
    /// entries for direction `d`: what the programs' lookup finds.
    #[must_use]
    pub fn entry_at(&self, endpoint: u32, d: Direction, addr: IpAddr) -> Option<&PolicyEntry> {
        let (map, max) = match addr {
            IpAddr::V4(_) => (&self.policy_v4, 32),
            IpAddr::V6(_) => (&self.policy_v6, 128),
        };
        (0..=max).rev().find_map(|len| {
            map.get(&PolicyTarget {
                endpoint,
                direction: d,
                prefix: IpNet::new(addr, len).ok()?.trunc(),
            })
        })
    }

    /// The rules that produced an entry.
    pub fn sources<'e>(&self, entry: &'e PolicyEntry) -> impl Iterator<Item = &'e RuleRef> {
        entry.sources.iter()
    }

    /// Endpoint map values per local pod (the agent keys them by ifindex).
    pub fn endpoint_infos(&self) -> impl Iterator<Item = (&ObjectRef, EndpointInfo)> {
        self.endpoints.iter().map(|(k, e)| (k, e.info()))
    }

    /// Exact IPv4 policy-trie entries: `(prefix_len, key, value)`.
    pub fn policy_v4_entries(&self) -> impl Iterator<Item = (u32, PolicyKeyV4, PolicyValue)> {
        self.policy_v4.iter().filter_map(|(t, e)| {
            t.raw_v4()
                .map(|(l, k)| (l, k, PolicyValue { ruleset: e.ruleset }))
        })
    }

    /// Exact IPv6 policy-trie entries: `(prefix_len, key, value)`.
    pub fn policy_v6_entries(&self) -> impl Iterator<Item = (u32, PolicyKeyV6, PolicyValue)> {
        self.policy_v6.iter().filter_map(|(t, e)| {
            t.raw_v6()
                .map(|(l, k)| (l, k, PolicyValue { ruleset: e.ruleset }))
        })
    }

    /// Exact port-trie entries: `(prefix_len, key, value)`.
    pub fn port_entries(&self) -> impl Iterator<Item = (u32, PortKey, PortValue)> {
        self.rulesets
            .iter()
            .flat_map(|(&id, rs)| rs.port_prefixes().into_iter().map(move |p| p.raw(id)))
    }

    /// Every map's exact contents.
    #[must_use]
    pub fn map_state(&self) -> MapState {
        MapState {
            endpoints: self.endpoint_infos().map(|(k, i)| (k.clone(), i)).collect(),
            policy_v4: self
                .policy_v4_entries()
                .map(|(l, k, v)| ((l, k), v))
                .collect(),
            policy_v6: self
                .policy_v6_entries()
                .map(|(l, k, v)| ((l, k), v))
                .collect(),
            ports: self.port_entries().map(|(l, k, v)| ((l, k), v)).collect(),
            frontends_v4: self.frontends_v4.clone(),
            frontends_v6: self.frontends_v6.clone(),
            slots: BTreeMap::new(),
        }
    }

    /// The map entry counts and their key+value bytes.
    #[must_use]
    pub fn sizes(&self) -> Sizes {
        use std::mem::size_of;
        let ports = self.port_entries().count();
        // LPM keys carry a u32 prefix length before the data.
        let bytes = self.endpoints.len() * (4 + size_of::<EndpointInfo>())
            + self.policy_v4.len() * (4 + 8 + 4)
            + self.policy_v6.len() * (4 + 20 + 4)
            + ports * (4 + 8 + 4)
            + self.frontends_v4.len() * (size_of::<FrontendKeyV4>() + size_of::<FrontendValue>())
            + self.frontends_v6.len() * (size_of::<FrontendKeyV6>() + size_of::<FrontendValue>());
        Sizes {
            entries: MapCounts {
                endpoints: self.endpoints.len(),
                policy_v4: self.policy_v4.len(),
                policy_v6: self.policy_v6.len(),
                ports,
                frontends_v4: self.frontends_v4.len(),
                frontends_v6: self.frontends_v6.len(),
                mark_sources: 0,
            },
            bytes,
        }
    }
}

/// Entries per map of a [`Compiled`] and their key+value bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sizes {
    /// Entries per map (`endpoints`: one per local pod, once bound; no
    /// mark slots, which only the writer hands out).
    #[serde(flatten)]
    pub entries: MapCounts,
    /// Key and value bytes of all of them.
    pub bytes: usize,
}
