//! The per-endpoint prefix computation: the contributions of the rules
//! selecting an endpoint direction, turned into the minimal LPM entries
//! whose longest match gives every address its exact rule set.

use std::collections::BTreeSet;
use std::hash::BuildHasherDefault;
use std::net::IpAddr;

use ipnet::IpNet;

use super::peers::Prepared;
use super::{Direction, PortRange, RuleSet, Stage, hash::HashMap};
use crate::model::{Action, ClusterNetworkPolicy, NetworkPolicy, Pod, Rule, Tier};

/// The rule id of the contributions that make the tiered evaluation's
/// roots (`0.0.0.0/0`, `::/0`) present: no rule.
const ROOT: u32 = u32::MAX;
/// The rule id marking the pod's own address as the peer (a hairpin
/// through a Service): `NetworkPolicy` never restricts a pod's traffic to
/// itself.
const SELF: u32 = u32::MAX - 1;

/// A value's cache key: the mode and the sorted `(rule, port set)`s
/// matching an address.
pub(super) type ValueKey = (Mode, Vec<(u32, u32)>);

/// Whose rules a prepared rule is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Source {
    /// A `NetworkPolicy` (index into [`Ctx::policies`]).
    Np(usize),
    /// A `ClusterNetworkPolicy` (index into [`Ctx::cnps`]).
    Cnp(usize),
}

/// A `ClusterNetworkPolicy` rule's place in the evaluation.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tiered {
    /// Its order among every tiered rule (tier, priority, name, index).
    pub(super) rank: u32,
    pub(super) tier: Tier,
    pub(super) action: Action,
}

/// How an endpoint direction's entries are valued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Mode {
    /// `NetworkPolicy` alone: the union of the matching rules' ports.
    Union,
    /// `ClusterNetworkPolicy` rules too: Admin, then `NetworkPolicy` (when
    /// it isolates the direction: `np_isolated`), then Baseline, then
    /// allow.
    Tiered {
        /// Some `NetworkPolicy` selects the pod for the direction.
        np_isolated: bool,
    },
}

/// An entry: prefix, port set, source set, and whether it goes to the
/// maps (else it carries names only).
pub(super) type Entry = (IpNet, u32, u32, bool);

/// An entry's provenance, with rule ids: see [`super::PolicyEntry`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub(super) struct Sources {
    /// The rules it names.
    pub(super) rules: Vec<u32>,
    /// Tiered entries: how each `(protocol, port)` was decided.
    pub(super) decisions: Option<Vec<RawDecision>>,
}

/// A [`super::Decision`] with rule ids.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct RawDecision {
    pub(super) ports: RuleSet,
    pub(super) allowed: bool,
    pub(super) stage: Stage,
    pub(super) passed: Vec<u32>,
    pub(super) rules: Vec<u32>,
}

impl RawDecision {
    fn new(ports: RuleSet, allowed: bool, stage: Stage, passed: Vec<u32>, rules: Vec<u32>) -> Self {
        Self {
            ports,
            allowed,
            stage,
            passed,
            rules,
        }
    }

    /// Decisions that differ only in their ports made one, in first-seen
    /// order.
    fn merged(list: Vec<Self>) -> Vec<Self> {
        let mut out: Vec<Self> = Vec::with_capacity(list.len());
        for d in list {
            if let Some(o) = out.iter_mut().find(|o| {
                (o.allowed, o.stage, &o.passed, &o.rules)
                    == (d.allowed, d.stage, &d.passed, &d.rules)
            }) {
                o.ports = o.ports.union(&d.ports);
            } else {
                out.push(d);
            }
        }
        out
    }
}

/// The rules of `tier`, in order, over `region`: per rule matching some
/// of what the earlier ones left, its action, id and that part; and what
/// no rule matched.
fn first_matches(
    rules: &[(Tier, Action, u32, RuleSet)],
    tier: Tier,
    mut region: RuleSet,
) -> (Vec<(Action, u32, RuleSet)>, RuleSet) {
    let mut out = Vec::new();
    for (t, action, rule, set) in rules {
        if *t != tier || region.is_empty() {
            continue;
        }
        let decided = region.intersect(set);
        if decided.is_empty() {
            continue;
        }
        region = region.minus(&decided);
        out.push((*action, *rule, decided));
    }
    (out, region)
}

/// A prefix some rule allows a port set on.
pub(super) struct Contribution<'a> {
    prefix: IpNet,
    except: &'a [IpNet],
    rule: u32,
    ports: u32,
}

/// Interned rule sets (port sets of contributions and unions alike).
#[derive(Default)]
pub(super) struct Interner {
    pub(super) sets: Vec<RuleSet>,
    index: HashMap<RuleSet, u32>,
}

impl Interner {
    pub(super) fn intern(&mut self, s: RuleSet) -> u32 {
        if let Some(&i) = self.index.get(&s) {
            return i;
        }
        let i = u32::try_from(self.sets.len()).unwrap_or(u32::MAX);
        self.sets.push(s.clone());
        self.index.insert(s, i);
        i
    }
}

pub(super) struct Ctx<'a> {
    pub(super) peers: Vec<&'a Pod>,
    pub(super) policies: Vec<&'a NetworkPolicy>,
    /// `ClusterNetworkPolicies` in force, in evaluation order.
    pub(super) cnps: Vec<&'a ClusterNetworkPolicy>,
    /// By rule id: the tiered rule's place, `None` for a `NetworkPolicy`
    /// rule.
    pub(super) tiered: Vec<Option<Tiered>>,
    pub(super) prepared: HashMap<(Source, Direction, usize), Prepared<'a>>,
    pub(super) sets: Interner,
    /// Mode and sorted `(rule, port set)` lists → (port set, source set).
    pub(super) values: HashMap<ValueKey, (u32, u32)>,
    /// Interned provenance of entries, by the index values carry.
    pub(super) source_sets: Vec<Sources>,
    pub(super) source_index: HashMap<Sources, u32>,
    pub(super) empty: u32,
}

/// `spec.ingress` or `spec.egress` of a `ClusterNetworkPolicy`.
pub(crate) fn cluster_rules_of(
    p: &ClusterNetworkPolicy,
    d: Direction,
) -> &[crate::model::ClusterRule] {
    match d {
        Direction::Egress => &p.egress,
        Direction::Ingress => &p.ingress,
    }
}

pub(super) fn rules_of(p: &NetworkPolicy, d: Direction) -> &[Rule] {
    match d {
        Direction::Egress => p.egress.as_deref().unwrap_or_default(),
        Direction::Ingress => p.ingress.as_deref().unwrap_or_default(),
    }
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

pub(super) fn same_family(a: &IpNet, b: &IpNet) -> bool {
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

    /// The contributions of the rules of `policies` and `cnps` (indices)
    /// for one endpoint direction; with `cnps`, also the roots every
    /// address of the tiered evaluation falls under.
    pub(super) fn contributions(
        &mut self,
        endpoint: usize,
        d: Direction,
        policies: &[usize],
        cnps: &[usize],
    ) -> Vec<Contribution<'a>> {
        let mut out = Vec::new();
        let everything = [
            IpNet::V4(ipnet::Ipv4Net::default()),
            IpNet::V6(ipnet::Ipv6Net::default()),
        ];
        let mut keys: Vec<(Source, usize)> = Vec::new();
        for &pi in policies {
            keys.extend((0..rules_of(self.policies[pi], d).len()).map(|ri| (Source::Np(pi), ri)));
        }
        for &ci in cnps {
            let n = cluster_rules_of(self.cnps[ci], d).len();
            keys.extend((0..n).map(|ri| (Source::Cnp(ci), ri)));
        }
        if !cnps.is_empty() {
            for prefix in everything {
                out.push(Contribution {
                    prefix,
                    except: &[],
                    rule: ROOT,
                    ports: self.empty,
                });
            }
        }
        for (pi, ri) in keys {
            {
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
    /// `(prefix, port set, source set, in the maps)`; those not in the
    /// maps carry names only (see [`super::Compiled::named`]).
    pub(super) fn entries(&mut self, contribs: &[Contribution<'a>], mode: Mode) -> Vec<Entry> {
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
            HashMap::with_capacity_and_hasher(present.len(), BuildHasherDefault::default());
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
                    if c.except.iter().any(|e| e.contains(p)) {
                        shadowed_by.push(c.rule);
                    } else {
                        key.push((c.rule, c.ports));
                    }
                }
            }
            key.sort_unstable();
            key.dedup();
            let cached = (mode, std::mem::take(&mut key));
            let mut v = if let Some(&v) = self.values.get(&cached) {
                v
            } else {
                let v = match mode {
                    Mode::Union => self.value(&cached.1),
                    Mode::Tiered { np_isolated } => self.tiered_value(&cached.1, np_isolated),
                };
                self.values.insert(cached.clone(), v);
                v
            };
            key = cached.1;
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
                .find_map(|&l| supernet(p, l).and_then(|q| value_of.get(&q)));
            let in_map = inherited.map_or(self.empty, |&(s, _)| s) != set;
            // Tiered entries whose decisions differ from the shorter
            // prefix's are kept out of the maps, for the names only: a
            // denied packet is named with what denied it.
            let named = matches!(mode, Mode::Tiered { .. })
                && inherited.is_none_or(|&(_, src)| src != sources);
            if in_map || named {
                out.push((*p, set, sources, in_map));
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

    /// The tiered evaluation of the rules matching an address (`key`):
    /// per `(protocol, port)`, the first Admin rule decides; what it
    /// passes or leaves goes to `NetworkPolicy` when it isolates the
    /// direction (its rules' union), else to the first Baseline rule
    /// (Pass: allowed), else allowed.
    fn tiered_value(&mut self, key: &[(u32, u32)], np_isolated: bool) -> (u32, u32) {
        // NetworkPolicy's rules matching here, each with its ports.
        let mut np_rules: Vec<u32> = Vec::new();
        let mut np_sets: Vec<RuleSet> = Vec::new();
        let mut own = false;
        let mut tiered: Vec<(u32, Tier, Action, u32, u32)> = Vec::new();
        for &(rule, ports) in key {
            if rule == ROOT {
                continue;
            }
            if rule == SELF {
                own = true;
                continue;
            }
            match self.tiered.get(rule as usize).copied().flatten() {
                None => {
                    let set = &self.sets.sets[ports as usize];
                    // One rule's contributions are one match (named ports).
                    if np_rules.last() == Some(&rule) {
                        if let Some(last) = np_sets.last_mut() {
                            *last = last.union(set);
                        }
                    } else {
                        np_rules.push(rule);
                        np_sets.push(set.clone());
                    }
                }
                Some(t) => tiered.push((t.rank, t.tier, t.action, rule, ports)),
            }
        }
        tiered.sort_unstable();
        // One rule's contributions (a peer pod reached through two peers,
        // named ports per pod) are one match: the union of their ports.
        let mut rules: Vec<(Tier, Action, u32, RuleSet)> = Vec::new();
        let mut last_rank = None;
        for (rank, tier, action, rule, ports) in tiered {
            let set = &self.sets.sets[ports as usize];
            if last_rank == Some(rank)
                && let Some(r) = rules.last_mut()
            {
                r.3 = r.3.union(set);
                continue;
            }
            last_rank = Some(rank);
            rules.push((tier, action, rule, set.clone()));
        }
        // The rules that decided some (protocol, port) here, Pass included:
        // what the entry names; and per (protocol, port), how.
        let mut deciding: Vec<u32> = Vec::new();
        let mut decisions: Vec<RawDecision> = Vec::new();
        // What Admin left or passed, with the Pass rule that passed it.
        let (matched, undecided) = first_matches(&rules, Tier::Admin, RuleSet::allow_all());
        let mut rest: Vec<(RuleSet, Vec<u32>)> = Vec::new();
        for (action, rule, decided) in matched {
            deciding.push(rule);
            if action == Action::Pass {
                rest.push((decided, vec![rule]));
                continue;
            }
            let accept = action == Action::Accept;
            decisions.push(RawDecision::new(
                decided,
                accept,
                Stage::Admin,
                Vec::new(),
                vec![rule],
            ));
        }
        if !undecided.is_empty() {
            rest.insert(0, (undecided, Vec::new()));
        }
        if np_isolated && own {
            for (set, passed) in rest {
                decisions.push(RawDecision::new(
                    set,
                    true,
                    Stage::NetworkPolicy,
                    passed,
                    Vec::new(),
                ));
            }
        } else if np_isolated {
            if !rest.is_empty() {
                deciding.extend_from_slice(&np_rules);
            }
            let np = np_sets.iter().fold(RuleSet::default(), |a, s| a.union(s));
            for (set, passed) in rest {
                let yes = set.intersect(&np);
                let no = set.minus(&np);
                if !yes.is_empty() {
                    let by: Vec<u32> = np_rules
                        .iter()
                        .zip(&np_sets)
                        .filter(|(_, s)| !yes.intersect(s).is_empty())
                        .map(|(&r, _)| r)
                        .collect();
                    decisions.push(RawDecision::new(
                        yes,
                        true,
                        Stage::NetworkPolicy,
                        passed.clone(),
                        by,
                    ));
                }
                if !no.is_empty() {
                    decisions.push(RawDecision::new(
                        no,
                        false,
                        Stage::NetworkPolicy,
                        passed,
                        Vec::new(),
                    ));
                }
            }
        } else {
            for (set, passed) in rest {
                let (matched, set) = first_matches(&rules, Tier::Baseline, set);
                for (action, rule, decided) in matched {
                    deciding.push(rule);
                    let mut chain = passed.clone();
                    // A Baseline Pass leaves it to the default: allowed.
                    let (accept, stage, by) = match action {
                        Action::Pass => {
                            chain.push(rule);
                            (true, Stage::Default, Vec::new())
                        }
                        _ => (action == Action::Accept, Stage::Baseline, vec![rule]),
                    };
                    decisions.push(RawDecision::new(decided, accept, stage, chain, by));
                }
                if !set.is_empty() {
                    decisions.push(RawDecision::new(
                        set,
                        true,
                        Stage::Default,
                        passed,
                        Vec::new(),
                    ));
                }
            }
        }
        // What the entry allows: the allowing decisions' ports.
        let allowed = decisions
            .iter()
            .filter(|d| d.allowed)
            .fold(RuleSet::default(), |a, d| a.union(&d.ports));
        let set = self.sets.intern(allowed);
        deciding.sort_unstable();
        deciding.dedup();
        (
            set,
            self.sources(Sources {
                rules: deciding,
                decisions: Some(RawDecision::merged(decisions)),
            }),
        )
    }

    /// The value of the pod's own address `ip` as the peer of a hairpin
    /// through a Service: the rules matching it, evaluated as for any
    /// peer, except that `NetworkPolicy` allows (it never restricts a
    /// pod's traffic to itself). `NetworkPolicy` alone: everything.
    pub(super) fn own_value(
        &mut self,
        contribs: &[Contribution<'a>],
        ip: IpAddr,
        mode: Mode,
    ) -> (u32, u32) {
        let Mode::Tiered { np_isolated } = mode else {
            // Named like a tiered one: a hairpin explained from either
            // direction says why it passes.
            let all = self.sets.intern(RuleSet::allow_all());
            let decision = RawDecision::new(
                RuleSet::allow_all(),
                true,
                Stage::NetworkPolicy,
                Vec::new(),
                Vec::new(),
            );
            let sources = self.sources(Sources {
                rules: Vec::new(),
                decisions: Some(vec![decision]),
            });
            return (all, sources);
        };
        let own = host(ip);
        let mut key: Vec<(u32, u32)> = contribs
            .iter()
            .filter(|c| same_family(&c.prefix, &own) && c.prefix.contains(&own))
            .filter(|c| !c.except.iter().any(|e| e.contains(&own)))
            .map(|c| (c.rule, c.ports))
            .collect();
        key.push((SELF, self.empty));
        key.sort_unstable();
        key.dedup();
        let cached = (mode, key);
        if let Some(&v) = self.values.get(&cached) {
            return v;
        }
        let v = self.tiered_value(&cached.1, np_isolated);
        self.values.insert(cached, v);
        v
    }

    fn source_set(&mut self, rules: Vec<u32>) -> u32 {
        self.sources(Sources {
            rules,
            decisions: None,
        })
    }

    fn sources(&mut self, sources: Sources) -> u32 {
        if let Some(&s) = self.source_index.get(&sources) {
            s
        } else {
            let s = u32::try_from(self.source_sets.len()).unwrap_or(u32::MAX);
            self.source_sets.push(sources.clone());
            self.source_index.insert(sources, s);
            s
        }
    }
}
