//! Pure policy compiler: a [`Snapshot`] in, the exact contents of one
//! node's policy maps out ([`compile`]), and the ordered map updates from
//! one output to the next ([`diff`]). [`Compiler`] does the same
//! incrementally: told what changed ([`Changes`]), it recompiles only the
//! local pods a change reaches and diffs only those, with the same result
//! as `compile` + `diff`. The agent's loop runs `Compiler::new` at start
//! and [`Compiler::update`] on every change, with the change set
//! [`Changes::between`] finds by comparing two versions of the snapshot.
//!
//! # What is compiled
//! - Per local endpoint (networked pod on the node): an id (stable while
//!   the pod lives, from the [`IdAllocation`] passed in and returned), an
//!   isolation flag per direction, a policy generation per direction (a
//!   content hash of what the direction allows, for revoking tracked
//!   connections when it changes), and the
//!   [`ALLOW_ANY_SOURCE_ANNOTATION`](crate::model::ALLOW_ANY_SOURCE_ANNOTATION)
//!   opt-out of anti-spoofing.
//! - Per isolated endpoint and direction, per family: LPM entries
//!   `(endpoint, direction, peer prefix) → rule set`. The value at each
//!   prefix is the union of the rule sets of every rule contribution whose
//!   prefix covers it and none of whose `except`s covers it, so the longest
//!   prefix match is exact for every address. Prefixes whose value equals
//!   the one they would inherit are left out; a prefix that allows nothing
//!   but shadows a shorter one gets [`EMPTY_RULESET`].
//! - Rule sets, deduplicated by content and shared: each a set of
//!   `(protocol, port range)`s, written to the port trie.
//! - Service frontends ([`frontends`]): every cluster, external and
//!   load-balancer IP of every Service with each of its ports, and this
//!   node's addresses with each node port, keyed by (address, port,
//!   protocol) and valued with their kind. They do not depend on pods or
//!   policies, and are compiled with or without a local node (node ports
//!   need its addresses).
//!
//! # Ids
//! Endpoint and rule-set ids come from the previous [`IdAllocation`] and
//! are returned in [`Compiled::ids`]. A rule-set id always means the same
//! content, and a new id is never one the previous allocation used, so a
//! [`diff`] never changes what an existing id means. New ids go to new pods
//! in pod order and to new rule sets in content order, so the output does
//! not depend on how it was computed (full or incremental).

mod diff;
mod frontends;
mod incremental;
mod ruleset;

pub use diff::{Diff, MapState, Op, RawOp, diff};
pub use frontends::{ServiceFrontend, service_frontends};
pub use incremental::{Changes, Compiler};
pub use ruleset::{PortPrefix, PortRange, RuleSet};

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use netpol_common::{
    EndpointInfo, FrontendKeyV4, FrontendKeyV6, FrontendValue, PolicyKeyV4, PolicyKeyV6,
    PolicyValue, PortKey, PortValue, SELECTOR_BITS, direction, endpoint_flags, policy_selector,
};
use serde::{Deserialize, Serialize};

use crate::model::{
    LabelSelector, ModelError, NetworkPolicy, ObjectRef, Peer, Pod, PolicyPort, PortSpec, Protocol,
    Rule, Snapshot,
};

/// Multiply-rotate hashing for the compiler's internal tables: keys are
/// small integers, prefixes and short label strings, and SipHash was a fifth
/// of the compile time.
#[derive(Clone, Copy, Default)]
struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.hash
    }
}

type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Rule-set id of the empty set: never has port entries, so a peer prefix
/// pointing at it is denied. Used where an `except` must shadow a shorter
/// prefix.
pub const EMPTY_RULESET: u32 = 1;

/// Largest endpoint id: the selector keeps the direction in its low bit.
pub const MAX_ENDPOINT_ID: u32 = (1 << 31) - 1;

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
    /// The policy.
    pub policy: ObjectRef,
    /// `spec.ingress` or `spec.egress`.
    pub direction: Direction,
    /// Index in that list.
    pub index: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: spec.{}[{}]",
            self.policy,
            self.direction.field(),
            self.index
        )
    }
}

/// A local endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Endpoint id (never 0).
    pub id: u32,
    /// Some policy selects the pod for ingress.
    pub ingress_isolated: bool,
    /// Some policy selects the pod for egress.
    pub egress_isolated: bool,
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
    /// [`EMPTY_RULESET`] shadowing a shorter prefix: the rules whose
    /// `except` it is). Shared between the entries that have the same.
    #[serde(serialize_with = "serialize_rules")]
    pub sources: Arc<[RuleRef]>,
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
    /// Rule-set ids by content ([`EMPTY_RULESET`] is implicit).
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
    /// Rule sets in use, by id ([`EMPTY_RULESET`] not included).
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
}

impl Compiled {
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
            endpoints: self.endpoints.len(),
            policy_v4: self.policy_v4.len(),
            policy_v6: self.policy_v6.len(),
            ports,
            frontends_v4: self.frontends_v4.len(),
            frontends_v6: self.frontends_v6.len(),
            bytes,
        }
    }
}

/// Entries per map of a [`Compiled`] and their key+value bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sizes {
    /// `NETPOL_ENDPOINTS` (one per local pod, once bound).
    pub endpoints: usize,
    /// `NETPOL_POLICY_V4`.
    pub policy_v4: usize,
    /// `NETPOL_POLICY_V6`.
    pub policy_v6: usize,
    /// `NETPOL_PORTS`.
    pub ports: usize,
    /// `NETPOL_FRONTENDS_V4`.
    pub frontends_v4: usize,
    /// `NETPOL_FRONTENDS_V6`.
    pub frontends_v6: usize,
    /// Key and value bytes of all of them.
    pub bytes: usize,
}

/// A rule, its peers resolved to pods, ready to contribute prefixes.
struct Prepared<'a> {
    rule: u32,
    all_peers: bool,
    pods: Vec<usize>,
    blocks: Vec<(IpNet, &'a [IpNet])>,
    all_ports: bool,
    numeric: Vec<PortRange>,
    named: Vec<(Protocol, &'a str)>,
}

/// Endpoints with equal keys have equal entries: direction, selecting
/// policies, and (ingress with named ports) the pod's own named ports.
type GroupKey = (Direction, Vec<usize>, Vec<(Protocol, String, u16)>);

/// A prefix some rule allows a port set on.
struct Contribution<'a> {
    prefix: IpNet,
    except: &'a [IpNet],
    rule: u32,
    ports: u32,
}

/// Interned rule sets (port sets of contributions and unions alike).
#[derive(Default)]
struct Interner {
    sets: Vec<RuleSet>,
    index: HashMap<RuleSet, u32>,
}

impl Interner {
    fn intern(&mut self, s: RuleSet) -> u32 {
        if let Some(&i) = self.index.get(&s) {
            return i;
        }
        let i = u32::try_from(self.sets.len()).unwrap_or(u32::MAX);
        self.sets.push(s.clone());
        self.index.insert(s, i);
        i
    }
}

struct Ctx<'a> {
    peers: Vec<&'a Pod>,
    policies: Vec<&'a NetworkPolicy>,
    prepared: HashMap<(usize, Direction, usize), Prepared<'a>>,
    sets: Interner,
    /// Sorted `(rule, port set)` lists → (union port set, source set).
    values: HashMap<Vec<(u32, u32)>, (u32, u32)>,
    source_sets: Vec<Vec<u32>>,
    source_index: HashMap<Vec<u32>, u32>,
    empty: u32,
}

fn rules_of(p: &NetworkPolicy, d: Direction) -> &[Rule] {
    match d {
        Direction::Egress => p.egress.as_deref().unwrap_or_default(),
        Direction::Ingress => p.ingress.as_deref().unwrap_or_default(),
    }
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

fn supernet(p: &IpNet, len: u8) -> Option<IpNet> {
    IpNet::new(p.addr(), len).ok().map(|n| n.trunc())
}

impl<'a> Ctx<'a> {
    fn port_set(&mut self, prep: &Prepared<'a>, dst: Option<usize>) -> u32 {
        if prep.all_ports {
            return self.sets.intern(RuleSet::allow_all());
        }
        let mut ranges = prep.numeric.clone();
        if let Some(pod) = dst.map(|i| self.peers[i]) {
            for &(proto, name) in &prep.named {
                if let Some(n) = pod.named_port(name, proto) {
                    ranges.push(PortRange {
                        protocol: proto,
                        first: n,
                        last: n,
                    });
                }
            }
        }
        self.sets.intern(RuleSet::from_ranges(ranges))
    }

    fn contributions(
        &mut self,
        endpoint: usize,
        d: Direction,
        policies: &[usize],
    ) -> Vec<Contribution<'a>> {
        let mut out = Vec::new();
        let everything = [
            IpNet::V4(ipnet::Ipv4Net::default()),
            IpNet::V6(ipnet::Ipv6Net::default()),
        ];
        for &pi in policies {
            let policy = self.policies[pi];
            for ri in 0..rules_of(policy, d).len() {
                let Some(prep) = self.prepared.remove(&(pi, d, ri)) else {
                    continue;
                };
                let named = !prep.named.is_empty();
                match d {
                    Direction::Ingress => {
                        // Named ports name the selected pod's own ports.
                        let ports = self.port_set(&prep, Some(endpoint));
                        self.peer_prefixes(&prep, ports, &everything, &mut out, |_| ports);
                    }
                    Direction::Egress => {
                        let base = self.port_set(&prep, None);
                        let mut per_pod = Vec::new();
                        if named {
                            // Named ports name each peer pod's own ports.
                            for &p in &prep.pods {
                                per_pod.push((p, self.port_set(&prep, Some(p))));
                            }
                        }
                        let lookup: HashMap<usize, u32> = per_pod.into_iter().collect();
                        self.peer_prefixes(&prep, base, &everything, &mut out, |p| {
                            lookup.get(&p).copied().unwrap_or(base)
                        });
                        if named {
                            // A named port also resolves on a pod reached
                            // through an ipBlock or "every peer": pin such
                            // pods with a host prefix of their own.
                            let peers: Vec<usize> = if prep.all_peers {
                                (0..self.peers.len()).collect()
                            } else {
                                let mut v = Vec::new();
                                for (cidr, except) in &prep.blocks {
                                    for (i, pod) in self.peers.iter().enumerate() {
                                        if pod.ips.iter().any(|&ip| {
                                            cidr.contains(&ip)
                                                && !except.iter().any(|e| e.contains(&ip))
                                        }) {
                                            v.push(i);
                                        }
                                    }
                                }
                                v
                            };
                            for p in peers {
                                let ports = self.port_set(&prep, Some(p));
                                if ports == base {
                                    continue;
                                }
                                for &ip in &self.peers[p].ips {
                                    let prefix = host(ip);
                                    let inside = prep.all_peers
                                        || prep.blocks.iter().any(|(c, ex)| {
                                            c.contains(&ip) && !ex.iter().any(|e| e.contains(&ip))
                                        });
                                    if inside {
                                        out.push(Contribution {
                                            prefix,
                                            except: &[],
                                            rule: prep.rule,
                                            ports,
                                        });
                                    }
                                }
                            }
                        }
                    }
                }
                self.prepared.insert((pi, d, ri), prep);
            }
        }
        out
    }

    fn peer_prefixes(
        &self,
        prep: &Prepared<'a>,
        base: u32,
        everything: &[IpNet; 2],
        out: &mut Vec<Contribution<'a>>,
        pod_ports: impl Fn(usize) -> u32,
    ) {
        if prep.all_peers {
            for prefix in everything {
                out.push(Contribution {
                    prefix: *prefix,
                    except: &[],
                    rule: prep.rule,
                    ports: base,
                });
            }
            return;
        }
        for &p in &prep.pods {
            let ports = pod_ports(p);
            for &ip in &self.peers[p].ips {
                out.push(Contribution {
                    prefix: host(ip),
                    except: &[],
                    rule: prep.rule,
                    ports,
                });
            }
        }
        for &(cidr, except) in &prep.blocks {
            out.push(Contribution {
                prefix: cidr,
                except,
                rule: prep.rule,
                ports: base,
            });
        }
    }

    /// The entries of one endpoint-direction from its contributions:
    /// `(prefix, union port set, source set)`.
    fn entries(&mut self, contribs: &[Contribution<'a>]) -> Vec<(IpNet, u32, u32)> {
        let mut at: HashMap<IpNet, Vec<usize>> = HashMap::default();
        let mut present: BTreeSet<IpNet> = BTreeSet::new();
        for (i, c) in contribs.iter().enumerate() {
            at.entry(c.prefix).or_default().push(i);
            present.insert(c.prefix);
            present.extend(c.except.iter().copied());
        }
        let mut lens_v4: BTreeSet<u8> = BTreeSet::new();
        let mut lens_v6: BTreeSet<u8> = BTreeSet::new();
        for p in at.keys() {
            match p {
                IpNet::V4(_) => lens_v4.insert(p.prefix_len()),
                IpNet::V6(_) => lens_v6.insert(p.prefix_len()),
            };
        }
        let mut value_of: HashMap<IpNet, (u32, u32)> =
            HashMap::with_capacity_and_hasher(present.len(), Default::default());
        let mut key = Vec::new();
        let mut shadowed_by = Vec::new();
        for p in &present {
            key.clear();
            let lens = if p.addr().is_ipv4() {
                &lens_v4
            } else {
                &lens_v6
            };
            for &len in lens.range(..=p.prefix_len()) {
                let Some(q) = supernet(p, len) else { continue };
                let Some(list) = at.get(&q) else { continue };
                for &ci in list {
                    let c = &contribs[ci];
                    if !c.except.iter().any(|e| e.contains(p)) {
                        key.push((c.rule, c.ports));
                    } else {
                        shadowed_by.push(c.rule);
                    }
                }
            }
            key.sort_unstable();
            key.dedup();
            let mut v = match self.values.get(&key) {
                Some(&v) => v,
                None => {
                    let v = self.value(&key);
                    self.values.insert(key.clone(), v);
                    v
                }
            };
            if key.is_empty() && !shadowed_by.is_empty() {
                // Nothing allowed here: name the rules whose except it is.
                shadowed_by.sort_unstable();
                shadowed_by.dedup();
                v.1 = self.source_set(std::mem::take(&mut shadowed_by));
            }
            shadowed_by.clear();
            value_of.insert(*p, v);
        }
        // Leave out prefixes that would not change the lookup result.
        let mut all_lens_v4: Vec<u8> = Vec::new();
        let mut all_lens_v6: Vec<u8> = Vec::new();
        for p in &present {
            let v = if p.addr().is_ipv4() {
                &mut all_lens_v4
            } else {
                &mut all_lens_v6
            };
            if !v.contains(&p.prefix_len()) {
                v.push(p.prefix_len());
            }
        }
        all_lens_v4.sort_unstable();
        all_lens_v6.sort_unstable();
        let mut out = Vec::with_capacity(present.len());
        for p in &present {
            let (set, sources) = value_of[p];
            let lens = if p.addr().is_ipv4() {
                &all_lens_v4
            } else {
                &all_lens_v6
            };
            let inherited = lens
                .iter()
                .rev()
                .filter(|&&l| l < p.prefix_len())
                .find_map(|&l| supernet(p, l).and_then(|q| value_of.get(&q)))
                .map_or(self.empty, |&(s, _)| s);
            if set != inherited {
                out.push((*p, set, sources));
            }
        }
        out
    }

    fn value(&mut self, key: &[(u32, u32)]) -> (u32, u32) {
        let mut set = RuleSet::default();
        let mut last = None;
        for &(_, ports) in key {
            if last != Some(ports) {
                set = set.union(&self.sets.sets[ports as usize]);
                last = Some(ports);
            }
        }
        let set = self.sets.intern(set);
        let mut rules: Vec<u32> = key.iter().map(|&(r, _)| r).collect();
        rules.dedup();
        (set, self.source_set(rules))
    }

    fn source_set(&mut self, rules: Vec<u32>) -> u32 {
        match self.source_index.get(&rules) {
            Some(&s) => s,
            None => {
                let s = u32::try_from(self.source_sets.len()).unwrap_or(u32::MAX);
                self.source_sets.push(rules.clone());
                self.source_index.insert(rules, s);
                s
            }
        }
    }
}

/// Next id from `next` that is not `taken`, within `first..=max`.
fn next_free(next: &mut u32, first: u32, max: u32, taken: impl Fn(u32) -> bool) -> u32 {
    let mut id = (*next).clamp(first, max);
    loop {
        if !taken(id) {
            *next = if id >= max { first } else { id + 1 };
            return id;
        }
        id = if id >= max { first } else { id + 1 };
    }
}

/// One local pod's compiled direction entries, in content form (rule sets
/// as interner indices of [`Core::sets`]), before ids are handed out.
struct PodOut {
    id: ObjectRef,
    uid: Option<String>,
    ips: Vec<IpAddr>,
    allow_any_source: bool,
    egress_isolated: bool,
    ingress_isolated: bool,
    /// Policies (indices into [`Core::policies`]) whose pod selector
    /// matches the pod, whatever their directions.
    selecting: Vec<usize>,
    /// `(direction, prefix, rule set, sources)`, egress first, each
    /// direction sorted by prefix.
    entries: Vec<(Direction, IpNet, u32, Arc<[RuleRef]>)>,
}

/// The peers a policy's rules select, for the incremental compiler.
struct Members {
    policy: usize,
    /// Pods its rules' pod peers select.
    pods: Vec<ObjectRef>,
    /// Some egress rule resolves named ports on pods reached through an
    /// ipBlock or "every peer": any pod change may change its entries.
    global: bool,
}

/// A compile of some or all local pods, before ids.
struct Core<'a> {
    policies: Vec<&'a NetworkPolicy>,
    pods: Vec<PodOut>,
    sets: Vec<RuleSet>,
    empty: u32,
    members: Vec<Members>,
}

/// Compiles the local pods of `node` (those in `only`, if given). With
/// `members`, also reports what the rules of the policies involved select.
fn core<'a>(
    snap: &'a Snapshot,
    node: &str,
    only: Option<&BTreeSet<ObjectRef>>,
    members: bool,
) -> Core<'a> {
    let mut peers = match only {
        None => Peers::all(snap),
        Some(_) => Peers::lazy(snap),
    };
    let mut local: Vec<usize> = Vec::new();
    match only {
        None => {
            for (i, p) in peers.list.iter().enumerate() {
                if p.node_name.as_deref() == Some(node) {
                    local.push(i);
                }
            }
        }
        Some(only) => {
            for id in only {
                let Some(ns) = peers.load(&id.namespace) else {
                    continue;
                };
                if let Some(&i) = peers.by_ns[ns].iter().find(|&&i| peers.list[i].id == *id)
                    && peers.list[i].node_name.as_deref() == Some(node)
                {
                    local.push(i);
                }
            }
        }
    }
    let mut local_by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for &i in &local {
        local_by_ns
            .entry(peers.list[i].id.namespace.as_str())
            .or_default()
            .push(i);
    }
    let policies: Vec<&NetworkPolicy> = snap
        .policies
        .values()
        .filter_map(|s| s.in_force.as_ref())
        .collect();

    // Which policies select each local pod, per direction.
    let mut selecting: BTreeMap<(usize, Direction), Vec<usize>> = BTreeMap::new();
    let mut selected_by: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut relevant: BTreeSet<usize> = BTreeSet::new();
    for (&ns, candidates) in &local_by_ns {
        // Policies are sorted by namespace too.
        let first = policies.partition_point(|p| p.id.namespace.as_str() < ns);
        let last = policies.partition_point(|p| p.id.namespace.as_str() <= ns);
        for (pi, p) in policies.iter().enumerate().take(last).skip(first) {
            for &i in candidates {
                if !p.pod_selector.matches(&peers.list[i].labels) {
                    continue;
                }
                relevant.insert(pi);
                selected_by.entry(i).or_default().push(pi);
                if p.ingress.is_some() {
                    selecting
                        .entry((i, Direction::Ingress))
                        .or_default()
                        .push(pi);
                }
                if p.egress.is_some() {
                    selecting
                        .entry((i, Direction::Egress))
                        .or_default()
                        .push(pi);
                }
            }
        }
    }
    for list in selected_by.values_mut() {
        list.sort_unstable();
    }
    for list in selecting.values_mut() {
        list.sort_unstable();
    }

    // Resolve the peers of every rule of the policies that matter here.
    let wants_namespaces = relevant.iter().any(|&pi| {
        let p = policies[pi];
        p.ingress.iter().chain(p.egress.iter()).flatten().any(|r| {
            r.peers.iter().any(|peer| {
                matches!(
                    peer,
                    Peer::Pods {
                        namespace_selector: Some(_),
                        ..
                    }
                )
            })
        })
    });
    let ns_labels = if wants_namespaces {
        peers.namespace_labels()
    } else {
        BTreeMap::new()
    };
    if relevant.iter().any(|&pi| {
        let p = policies[pi];
        p.egress.iter().flatten().any(|r| {
            r.ports.iter().any(|p| matches!(p.port, PortSpec::Named(_)))
                && (r.peers.is_empty() || r.peers.iter().any(|p| matches!(p, Peer::IpBlock { .. })))
        })
    }) {
        // Named ports resolve on every pod such a rule reaches.
        peers.load_all();
    }
    let mut rules = Vec::new();
    let mut prepared = HashMap::default();
    let mut cache = SelectionCache::default();
    let mut member_lists = Vec::new();
    for &pi in &relevant {
        let p = policies[pi];
        let mut m = Members {
            policy: pi,
            pods: Vec::new(),
            global: false,
        };
        let mut pods: Vec<usize> = Vec::new();
        for d in [Direction::Egress, Direction::Ingress] {
            for (ri, rule) in rules_of(p, d).iter().enumerate() {
                let id = u32::try_from(rules.len()).unwrap_or(u32::MAX);
                rules.push(RuleRef {
                    policy: p.id.clone(),
                    direction: d,
                    index: ri,
                });
                let prep = prepare(id, p, rule, &mut peers, &ns_labels, &mut cache);
                if members {
                    pods.extend_from_slice(&prep.pods);
                    m.global |= d == Direction::Egress
                        && !prep.named.is_empty()
                        && (prep.all_peers || !prep.blocks.is_empty());
                }
                prepared.insert((pi, d, ri), prep);
            }
        }
        if members {
            pods.sort_unstable();
            pods.dedup();
            m.pods = pods.into_iter().map(|i| peers.list[i].id.clone()).collect();
            member_lists.push(m);
        }
    }

    let mut ctx = Ctx {
        peers: peers.list,
        policies,
        prepared,
        sets: Interner::default(),
        values: HashMap::default(),
        source_sets: Vec::new(),
        source_index: HashMap::default(),
        empty: 0,
    };
    ctx.empty = ctx.sets.intern(RuleSet::default());

    // Entries, computed once per distinct (direction, policies, own named
    // ports) and shared by the endpoints that have it.
    let mut groups: HashMap<GroupKey, Vec<(IpNet, u32, u32)>> = HashMap::default();
    let mut shared: HashMap<u32, Arc<[RuleRef]>> = HashMap::default();
    let mut pods = Vec::with_capacity(local.len());
    for &i in &local {
        let pod = ctx.peers[i];
        let mut out = PodOut {
            id: pod.id.clone(),
            uid: pod.uid.clone(),
            ips: pod.ips.clone(),
            allow_any_source: pod.allow_any_source,
            egress_isolated: false,
            ingress_isolated: false,
            selecting: selected_by.remove(&i).unwrap_or_default(),
            entries: Vec::new(),
        };
        for d in [Direction::Egress, Direction::Ingress] {
            let Some(pols) = selecting.get(&(i, d)) else {
                continue;
            };
            match d {
                Direction::Egress => out.egress_isolated = true,
                Direction::Ingress => out.ingress_isolated = true,
            }
            let own_ports: Vec<(Protocol, String, u16)> = if d == Direction::Ingress
                && pols.iter().any(|&pi| {
                    rules_of(ctx.policies[pi], d)
                        .iter()
                        .any(|r| r.ports.iter().any(|p| matches!(p.port, PortSpec::Named(_))))
                }) {
                pod.ports
                    .iter()
                    .filter_map(|p| p.name.clone().map(|n| (p.protocol, n, p.port)))
                    .collect()
            } else {
                Vec::new()
            };
            let key = (d, pols.clone(), own_ports);
            if !groups.contains_key(&key) {
                let contribs = ctx.contributions(i, d, pols);
                let e = ctx.entries(&contribs);
                groups.insert(key.clone(), e);
            }
            for &(prefix, set, sources) in &groups[&key] {
                let src = shared
                    .entry(sources)
                    .or_insert_with(|| {
                        ctx.source_sets[sources as usize]
                            .iter()
                            .map(|&r| rules[r as usize].clone())
                            .collect()
                    })
                    .clone();
                out.entries.push((d, prefix, set, src));
            }
        }
        pods.push(out);
    }
    Core {
        policies: ctx.policies,
        pods,
        sets: ctx.sets.sets,
        empty: ctx.empty,
        members: member_lists,
    }
}

/// Policy generation of one endpoint direction: a content hash of its
/// entries (prefixes and the contents of their rule sets); never 0.
fn generation<'s>(entries: impl Iterator<Item = (IpNet, &'s RuleSet)>) -> u32 {
    let mut h = FxHasher {
        hash: 0x6e65_7470_6f6c_6765,
    };
    for (prefix, set) in entries {
        match prefix {
            IpNet::V4(n) => {
                h.add(4);
                h.add(u64::from(u32::from(n.network())));
            }
            IpNet::V6(n) => {
                let a = u128::from(n.network());
                h.add(6);
                h.add((a >> 64) as u64);
                h.add(a as u64);
            }
        }
        h.add(u64::from(prefix.prefix_len()));
        h.add(u64::from(set.all));
        h.add(set.ranges.len() as u64);
        for r in &set.ranges {
            h.add(
                u64::from(r.protocol.number()) << 32 | u64::from(r.first) << 16 | u64::from(r.last),
            );
        }
    }
    let x = h.finish();
    (x ^ (x >> 32)) as u32 | 1
}

impl PodOut {
    /// The endpoint value with its generations.
    fn endpoint(&self, id: u32, sets: &[RuleSet]) -> Endpoint {
        let gen_of = |d: Direction, isolated: bool| {
            if !isolated {
                return 0;
            }
            generation(
                self.entries
                    .iter()
                    .filter(|e| e.0 == d)
                    .map(|e| (e.1, &sets[e.2 as usize])),
            )
        };
        Endpoint {
            id,
            ingress_isolated: self.ingress_isolated,
            egress_isolated: self.egress_isolated,
            ips: self.ips.clone(),
            allow_any_source: self.allow_any_source,
            ingress_gen: gen_of(Direction::Ingress, self.ingress_isolated),
            egress_gen: gen_of(Direction::Egress, self.egress_isolated),
        }
    }
}

/// Endpoint ids of `pods` (in order): kept from `prev` for the same pod
/// and uid, otherwise the next id neither `prev`, `reserved` nor this call
/// used.
fn endpoint_ids(
    pods: &[PodOut],
    prev: &BTreeMap<ObjectRef, EndpointId>,
    reserved: &BTreeSet<u32>,
    next: &mut u32,
) -> Vec<u32> {
    let mut ids = vec![0; pods.len()];
    let mut fresh = Vec::new();
    for (k, pod) in pods.iter().enumerate() {
        match prev.get(&pod.id) {
            Some(e) if e.uid == pod.uid => ids[k] = e.id,
            _ => fresh.push(k),
        }
    }
    if !fresh.is_empty() {
        let prev_ids: BTreeSet<u32> = prev.values().map(|e| e.id).collect();
        let mut assigned: BTreeSet<u32> = BTreeSet::new();
        for k in fresh {
            let id = next_free(next, 1, MAX_ENDPOINT_ID, |id| {
                prev_ids.contains(&id) || reserved.contains(&id) || assigned.contains(&id)
            });
            assigned.insert(id);
            ids[k] = id;
        }
    }
    ids
}

/// Rule-set ids of the interned sets `core` uses (indexed by interner
/// index; [`EMPTY_RULESET`] for the empty set): the id `prev` gives the
/// same content, else (in content order) the next id neither `prev` nor
/// `reserved` holds. Returns the ids and the new `(id, set)`s.
fn ruleset_ids(
    core: &Core<'_>,
    prev: &BTreeMap<RuleSet, u32>,
    reserved: &BTreeSet<u32>,
    next: &mut u32,
) -> (Vec<u32>, Vec<(u32, RuleSet)>) {
    let mut ids = vec![0; core.sets.len()];
    let mut used = vec![false; core.sets.len()];
    for pod in &core.pods {
        for e in &pod.entries {
            used[e.2 as usize] = true;
        }
    }
    ids[core.empty as usize] = EMPTY_RULESET;
    let mut new_sets = Vec::new();
    for (s, set) in core.sets.iter().enumerate() {
        if !used[s] || s == core.empty as usize {
            continue;
        }
        match prev.get(set) {
            Some(&id) => ids[s] = id,
            None => new_sets.push(s),
        }
    }
    new_sets.sort_unstable_by(|&a, &b| core.sets[a].cmp(&core.sets[b]));
    let mut added = Vec::with_capacity(new_sets.len());
    if !new_sets.is_empty() {
        let prev_ids: BTreeSet<u32> = prev.values().copied().collect();
        let mut taken: BTreeSet<u32> = BTreeSet::new();
        for s in new_sets {
            let id = next_free(next, EMPTY_RULESET + 1, u32::MAX, |id| {
                prev_ids.contains(&id) || reserved.contains(&id) || taken.contains(&id)
            });
            taken.insert(id);
            ids[s] = id;
            added.push((id, core.sets[s].clone()));
        }
    }
    (ids, added)
}

fn insert_entry(out: &mut Compiled, target: PolicyTarget, entry: PolicyEntry) {
    match target.prefix {
        IpNet::V4(_) => out.policy_v4.insert(target, entry),
        IpNet::V6(_) => out.policy_v6.insert(target, entry),
    };
}

/// Compiles a snapshot into the node's map contents.
///
/// Pure and deterministic: the same snapshot and allocation give the same
/// output. `prev` is the allocation of the previous compile (default for
/// the first); the new one is in [`Compiled::ids`]. To follow a changing
/// snapshot cheaply, use a [`Compiler`]: its output after any sequence of
/// updates equals this function's on the same snapshot and allocation.
#[must_use]
pub fn compile(snap: &Snapshot, prev: &IdAllocation) -> Compiled {
    full(snap, prev, false).0
}

/// A full compile; with `members`, also what [`Compiler`] keeps.
fn full<'a>(
    snap: &'a Snapshot,
    prev: &IdAllocation,
    members: bool,
) -> (Compiled, Option<Core<'a>>) {
    let mut out = Compiled {
        node: snap.local_node_name().map(str::to_owned),
        errors: snap.errors(),
        ..Compiled::default()
    };
    if let Some(node) = out.node.as_ref().and_then(|n| snap.nodes.get(n)) {
        out.node_addresses.clone_from(&node.addresses);
    }
    // Frontends need no local pod, nor a local node (only its node ports).
    let f = frontends::frontends(snap, &out.node_addresses);
    out.frontends_v4 = f.v4;
    out.frontends_v6 = f.v6;
    out.ids = IdAllocation {
        next_endpoint: prev.next_endpoint,
        next_ruleset: prev.next_ruleset,
        ..IdAllocation::default()
    };
    let Some(node) = out.node.clone() else {
        out.notes.push(
            "no local node: pass --node or give exactly one Node; no pod is local".to_owned(),
        );
        return (out, None);
    };
    let mut core = core(snap, &node, None, members);
    let endpoint_ids = endpoint_ids(
        &core.pods,
        &prev.endpoints,
        &prev.reserved_endpoints,
        &mut out.ids.next_endpoint,
    );
    let (set_ids, added) = ruleset_ids(
        &core,
        &prev.rulesets,
        &prev.reserved_rulesets,
        &mut out.ids.next_ruleset,
    );
    for (s, &id) in set_ids.iter().enumerate() {
        if id > EMPTY_RULESET {
            out.ids.rulesets.insert(core.sets[s].clone(), id);
            out.rulesets.insert(id, core.sets[s].clone());
        }
    }
    debug_assert!(added.iter().all(|(id, _)| out.rulesets.contains_key(id)));
    for (pod, &id) in core.pods.iter_mut().zip(&endpoint_ids) {
        out.ids.endpoints.insert(
            pod.id.clone(),
            EndpointId {
                id,
                uid: pod.uid.clone(),
            },
        );
        out.endpoints
            .insert(pod.id.clone(), pod.endpoint(id, &core.sets));
        for (direction, prefix, set, sources) in std::mem::take(&mut pod.entries) {
            let target = PolicyTarget {
                endpoint: id,
                direction,
                prefix,
            };
            let ruleset = set_ids[set as usize];
            insert_entry(&mut out, target, PolicyEntry { ruleset, sources });
        }
    }
    (out, members.then_some(core))
}

/// The networked pods a compile looks at, by namespace: all of them, or
/// (for an incremental compile) the namespaces it needs, loaded on demand.
struct Peers<'a> {
    snap: &'a Snapshot,
    list: Vec<&'a Pod>,
    by_ns: BTreeMap<&'a str, Vec<usize>>,
    /// Every namespace is loaded.
    complete: bool,
}

impl<'a> Peers<'a> {
    fn all(snap: &'a Snapshot) -> Self {
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

    fn lazy(snap: &'a Snapshot) -> Self {
        Self {
            snap,
            list: Vec::new(),
            by_ns: BTreeMap::new(),
            complete: false,
        }
    }

    /// Loads a namespace; its key if it has networked pods.
    fn load(&mut self, ns: &str) -> Option<&'a str> {
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

    fn load_all(&mut self) {
        if !self.complete {
            for ns in self.namespaces() {
                self.load(ns);
            }
            self.complete = true;
        }
    }

    /// Labels of every namespace a peer can be in (a superset of those
    /// with networked pods).
    fn namespace_labels(&self) -> BTreeMap<&'a str, Cow<'a, crate::model::Labels>> {
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
struct SelectionCache<'a> {
    namespaces: HashMap<&'a LabelSelector, Vec<&'a str>>,
    pods: HashMap<(&'a str, Option<&'a LabelSelector>), Vec<usize>>,
}

fn prepare<'a>(
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
                    Some(sel) => cache
                        .namespaces
                        .entry(sel)
                        .or_insert_with(|| {
                            ns_labels
                                .iter()
                                .filter(|(_, l)| sel.matches(l))
                                .map(|(&n, _)| n)
                                .collect()
                        })
                        .clone(),
                };
                for ns in namespaces {
                    let Some(ns_key) = peers.load(ns) else {
                        continue;
                    };
                    let (list, in_ns) = (&peers.list, &peers.by_ns[ns_key]);
                    let selected = cache
                        .pods
                        .entry((ns_key, pod_selector.as_ref()))
                        .or_insert_with(|| {
                            in_ns
                                .iter()
                                .copied()
                                .filter(|&i| {
                                    pod_selector
                                        .as_ref()
                                        .is_none_or(|s| s.matches(&list[i].labels))
                                })
                                .collect()
                        });
                    prep.pods.extend_from_slice(selected);
                }
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
