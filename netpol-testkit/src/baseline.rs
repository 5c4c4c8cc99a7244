//! A kube-router-style iptables + ipset rendering of a [`Snapshot`], the
//! baseline netpol is benchmarked against (`cargo xtask bench control` and
//! `throughput`) and checked beside (`tests/agent/baseline_restore.rs`).
//!
//! The shapes follow kube-router's network policy controller (`pod.go`,
//! `policy.go`), which k3s embeds:
//!
//! - per family, one `hash:ip` set of each policy's target pods
//!   (`KUBE-DST-…` for ingress, `KUBE-SRC-…` for egress), one `hash:ip` set
//!   of each rule's peer pods, one per named port resolved to a number, and
//!   one `hash:net` set of each rule's ipBlocks with the `except` ranges
//!   added as `nomatch`; IPv6 set names carry kube-router's `inet6:` prefix;
//! - `KUBE-ROUTER-{INPUT,FORWARD,OUTPUT}` jumped to from the built-in
//!   chains, jumping per local pod (`-d` its address for ingress, `-s` for
//!   egress) to the pod's `KUBE-POD-FW-<hash>` chain;
//! - the pod chain runs kube-router 2.x's common rules first (`INVALID`
//!   dropped, `RELATED,ESTABLISHED` accepted, the ICMP types every pod
//!   needs accepted: echo, unreachable, time exceeded, IPv6 neighbour
//!   discovery), then (ingress)
//!   traffic from the node itself, then jumps to the `KUBE-NWPLCY-<hash>`
//!   chain of every policy selecting the pod, then drops what no policy
//!   marked (kube-router rejects and logs with NFLOG; both cost only denied
//!   packets, which the benchmarks do not send) and clears the mark;
//! - the policy chain matches the sets and ports, sets mark 0x10000 and
//!   returns.
//!
//! Like kube-router, every policy of the cluster gets its chain and sets,
//! not only those selecting a local pod, and a sync rewrites everything:
//! `ipset restore` (fill a temporary set, swap it in) per family, then
//! `iptables-restore` / `ip6tables-restore` of the whole filter table.
//!
//! The rendering is pure: snapshot in, texts out. [`restore`] loads the
//! texts into a network namespace as kube-router does.

pub mod restore;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use netpol_agent::model::{
    NetworkPolicy, ObjectRef, Peer, Pod, PolicyPort, PortSpec, Protocol, Snapshot,
};

/// kube-router's "allowed by a policy" mark.
const MARK: &str = "0x10000/0x10000";
const FORWARD: &str = "KUBE-ROUTER-FORWARD";
const INPUT: &str = "KUBE-ROUTER-INPUT";
const OUTPUT: &str = "KUBE-ROUTER-OUTPUT";
/// Rules every pod chain runs first (kube-router 2.x).
const COMMON: &str = "KUBE-NWPLCY-COMMON";

/// The ICMP types kube-router 2.x always accepts for a pod
/// (`utils.CommonICMPRules`): echo request, destination unreachable (path
/// MTU discovery), time exceeded, and on IPv6 neighbour discovery and echo
/// reply too, without which a pod with an isolated egress cannot resolve
/// its gateway.
fn common_icmp(fam: Family) -> &'static [&'static str] {
    match fam {
        Family::V4 => &[
            "-p icmp -m icmp --icmp-type 8",
            "-p icmp -m icmp --icmp-type 3",
            "-p icmp -m icmp --icmp-type 11",
        ],
        Family::V6 => &[
            "-p ipv6-icmp -m icmp6 --icmpv6-type 128",
            "-p ipv6-icmp -m icmp6 --icmpv6-type 1",
            "-p ipv6-icmp -m icmp6 --icmpv6-type 3",
            "-p ipv6-icmp -m icmp6 --icmpv6-type 135",
            "-p ipv6-icmp -m icmp6 --icmpv6-type 136",
            "-p ipv6-icmp -m icmp6 --icmpv6-type 129",
        ],
    }
}

/// Why a snapshot cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaselineError {
    /// Without a local node no pod is local: nothing would be enforced.
    #[error("the snapshot names no local node")]
    NoLocalNode,
}

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn has(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }

    fn has_net(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }

    /// ipset's `family` option.
    #[must_use]
    pub const fn ipset(self) -> &'static str {
        match self {
            Family::V4 => "inet",
            Family::V6 => "inet6",
        }
    }

    /// kube-router's set-name prefix for the family.
    const fn set_prefix(self) -> &'static str {
        match self {
            Family::V4 => "",
            Family::V6 => "inet6:",
        }
    }
}

/// The texts of one sync, per family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FamilyRules {
    /// Input for `ipset restore`.
    pub ipset: String,
    /// Input for `iptables-restore` (`ip6tables-restore` for IPv6): the
    /// whole filter table.
    pub iptables: String,
    /// Sets, set entries, chains and rules in the texts.
    pub stats: Stats,
}

/// Sizes of one family's rendering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub sets: usize,
    pub set_entries: usize,
    pub chains: usize,
    pub rules: usize,
}

/// Both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baseline {
    pub v4: FamilyRules,
    pub v6: FamilyRules,
}

impl Baseline {
    #[must_use]
    pub fn family(&self, f: Family) -> &FamilyRules {
        match f {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

/// Renders the snapshot as kube-router would program it on the local node.
///
/// # Errors
/// [`BaselineError::NoLocalNode`] when the snapshot names no local node.
pub fn generate(snap: &Snapshot) -> Result<Baseline, BaselineError> {
    let node = snap.local_node_name().ok_or(BaselineError::NoLocalNode)?;
    Ok(Baseline {
        v4: family(snap, node, Family::V4),
        v6: family(snap, node, Family::V6),
    })
}

/// kube-router names chains and sets after a hash (base32 of sha256, 16
/// characters); any stable hash gives the same shape. Two FNV-1a passes
/// make 80 bits, plenty against collisions between a cluster's names.
fn hash(parts: &[&str]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        let mut h = seed;
        for p in parts {
            for b in p.bytes().chain(std::iter::once(0)) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    };
    let (a, b) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_272e_07bb_0142));
    let bits = (u128::from(a) << 64) | u128::from(b);
    (0..16)
        .map(|i| char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]))
        .collect()
}

/// A set to create, with its entries.
struct IpSet {
    name: String,
    net: bool,
    /// Entries as ipset writes them (`10.0.0.0/8`, `10.1.0.0/16 nomatch`).
    entries: Vec<String>,
}

/// One family's rendering under way.
struct Render<'a> {
    snap: &'a Snapshot,
    fam: Family,
    /// Networked pods by namespace, and each namespace's labels: looked up
    /// once rather than per selector (kube-router's listers index them
    /// alike).
    by_ns: BTreeMap<&'a str, Vec<&'a Pod>>,
    ns_labels: BTreeMap<&'a str, netpol_agent::model::Labels>,
    sets: Vec<IpSet>,
    /// Policy chains in order, each with its rules.
    policy_chains: Vec<(String, Vec<String>)>,
}

fn quote(s: &str) -> String {
    // iptables-restore splits on spaces; a quoted comment stays one word.
    format!("\"{}\"", s.replace('"', "'"))
}

fn pod_ips(pod: &Pod, fam: Family) -> impl Iterator<Item = IpAddr> + '_ {
    pod.ips.iter().copied().filter(move |ip| fam.has(ip))
}

impl<'a> Render<'a> {
    fn networked(&self) -> impl Iterator<Item = &'a Pod> + 'a {
        self.snap.pods.values().filter(|p| p.is_networked())
    }

    fn in_ns(&self, ns: &str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.by_ns.get(ns).cloned().unwrap_or_default().into_iter()
    }

    /// Pods a policy's podSelector selects (its own namespace).
    fn targets(&self, p: &NetworkPolicy) -> Vec<&'a Pod> {
        self.in_ns(&p.id.namespace)
            .filter(|pod| p.pod_selector.matches(&pod.labels))
            .collect()
    }

    /// Pods a rule's pod peers select.
    fn peer_pods(&self, policy_ns: &str, peers: &[Peer]) -> Vec<&'a Pod> {
        let mut out: BTreeMap<&ObjectRef, &Pod> = BTreeMap::new();
        for peer in peers {
            let Peer::Pods {
                pod_selector,
                namespace_selector,
            } = peer
            else {
                continue;
            };
            let namespaces: Vec<&str> = match namespace_selector {
                None => vec![policy_ns],
                Some(sel) => self
                    .ns_labels
                    .iter()
                    .filter(|(_, l)| sel.matches(l))
                    .map(|(n, _)| *n)
                    .collect(),
            };
            for ns in namespaces {
                for pod in self.in_ns(ns) {
                    if pod_selector.as_ref().is_none_or(|s| s.matches(&pod.labels)) {
                        out.insert(&pod.id, pod);
                    }
                }
            }
        }
        out.into_values().collect()
    }

    fn add_set(&mut self, name: String, net: bool, entries: Vec<String>) -> String {
        self.sets.push(IpSet {
            name: name.clone(),
            net,
            entries,
        });
        name
    }

    fn ip_set(&mut self, kind: &str, parts: &[&str], pods: &[&Pod]) -> String {
        let name = format!("{}KUBE-{kind}-{}", self.fam.set_prefix(), hash(parts));
        let entries: BTreeSet<String> = pods
            .iter()
            .flat_map(|p| pod_ips(p, self.fam))
            .map(|ip| ip.to_string())
            .collect();
        self.add_set(name, false, entries.into_iter().collect())
    }

    /// ipBlocks of the family as a `hash:net` set, excepts as `nomatch`;
    /// `None` when the rule has no ipBlock of this family.
    fn block_set(&mut self, parts: &[&str], peers: &[Peer]) -> Option<String> {
        let mut entries = Vec::new();
        for peer in peers {
            let Peer::IpBlock { cidr, except } = peer else {
                continue;
            };
            if !self.fam.has_net(cidr) {
                continue;
            }
            for c in split_zero(*cidr) {
                entries.push(c.to_string());
            }
            for e in except.iter().filter(|e| self.fam.has_net(e)) {
                for c in split_zero(*e) {
                    entries.push(format!("{c} nomatch"));
                }
            }
        }
        if entries.is_empty() {
            return None;
        }
        let name = format!("{}KUBE-SRC-{}", self.fam.set_prefix(), hash(parts));
        Some(self.add_set(name, true, entries))
    }

    /// One policy's chain and sets.
    fn policy(&mut self, p: &NetworkPolicy) -> String {
        let (ns, name) = (p.id.namespace.as_str(), p.id.name.as_str());
        let fam = format!("{:?}", self.fam);
        let chain = format!("KUBE-NWPLCY-{}", hash(&[ns, name, &fam]));
        let comment = quote(&format!(
            "rule to ACCEPT traffic selected by policy {ns}/{name}"
        ));
        let targets = self.targets(p);
        let mut rules = Vec::new();
        if let Some(ingress) = &p.ingress {
            let dst = self.ip_set("DST", &[ns, name, "ingress"], &targets);
            for (i, rule) in ingress.iter().enumerate() {
                let idx = i.to_string();
                let mut sources: Vec<Option<String>> = Vec::new();
                if rule.peers.is_empty() {
                    sources.push(None);
                } else {
                    let pods = self.peer_pods(ns, &rule.peers);
                    if rule.peers.iter().any(|x| matches!(x, Peer::Pods { .. })) && !pods.is_empty()
                    {
                        sources.push(Some(self.ip_set("SRC", &[ns, name, "in", &idx], &pods)));
                    }
                    if let Some(b) = self.block_set(&[ns, name, "in-block", &idx], &rule.peers) {
                        sources.push(Some(b));
                    }
                }
                for src in &sources {
                    self.port_rules(
                        &mut rules,
                        &comment,
                        src.as_deref(),
                        &dst,
                        &rule.ports,
                        &targets,
                        &[ns, name, "in-named", &idx],
                    );
                }
            }
        }
        if let Some(egress) = &p.egress {
            let src = self.ip_set("SRC", &[ns, name, "egress"], &targets);
            for (i, rule) in egress.iter().enumerate() {
                let idx = i.to_string();
                let mut dests: Vec<(Option<String>, Vec<&Pod>)> = Vec::new();
                if rule.peers.is_empty() {
                    dests.push((None, self.networked().collect()));
                } else {
                    let pods = self.peer_pods(ns, &rule.peers);
                    if rule.peers.iter().any(|x| matches!(x, Peer::Pods { .. })) && !pods.is_empty()
                    {
                        let set = self.ip_set("DST", &[ns, name, "out", &idx], &pods);
                        dests.push((Some(set), pods));
                    }
                    if let Some(b) = self.block_set(&[ns, name, "out-block", &idx], &rule.peers) {
                        dests.push((Some(b), Vec::new()));
                    }
                }
                for (dst, pods) in &dests {
                    self.egress_port_rules(
                        &mut rules,
                        &comment,
                        &src,
                        dst.as_deref(),
                        &rule.ports,
                        pods,
                        &[ns, name, "out-named", &idx],
                    );
                }
            }
        }
        self.policy_chains.push((chain.clone(), rules));
        chain
    }

    /// Ingress rules of one peer set: numeric ports against the target set,
    /// named ports against a set of the targets resolving the name to each
    /// number (kube-router's named-port sets).
    #[allow(clippy::too_many_arguments, reason = "one call site per direction")]
    fn port_rules(
        &mut self,
        rules: &mut Vec<String>,
        comment: &str,
        src: Option<&str>,
        dst: &str,
        ports: &[PolicyPort],
        targets: &[&Pod],
        parts: &[&str],
    ) {
        if ports.is_empty() {
            push_marked(rules, comment, src, Some(dst), None);
            return;
        }
        for (j, port) in ports.iter().enumerate() {
            match &port.port {
                PortSpec::Named(n) => {
                    for (number, pods) in by_named_port(targets, n, port.protocol) {
                        let (j, number_s) = (j.to_string(), number.to_string());
                        let mut key = parts.to_vec();
                        key.extend([j.as_str(), number_s.as_str()]);
                        let set = self.ip_set("DST", &key, &pods);
                        let m = format!("-p {p} -m {p} --dport {number}", p = proto(port.protocol));
                        push_marked(rules, comment, src, Some(&set), Some(&m));
                    }
                }
                spec => {
                    let m = port_match(port.protocol, spec);
                    push_marked(rules, comment, src, Some(dst), Some(&m));
                }
            }
        }
    }

    /// Egress rules: named ports resolve on the destination pods.
    #[allow(clippy::too_many_arguments, reason = "mirrors port_rules")]
    fn egress_port_rules(
        &mut self,
        rules: &mut Vec<String>,
        comment: &str,
        src: &str,
        dst: Option<&str>,
        ports: &[PolicyPort],
        dst_pods: &[&Pod],
        parts: &[&str],
    ) {
        if ports.is_empty() {
            push_marked(rules, comment, Some(src), dst, None);
            return;
        }
        for (j, port) in ports.iter().enumerate() {
            match &port.port {
                PortSpec::Named(n) => {
                    for (number, pods) in by_named_port(dst_pods, n, port.protocol) {
                        let (j, number_s) = (j.to_string(), number.to_string());
                        let mut key = parts.to_vec();
                        key.extend([j.as_str(), number_s.as_str()]);
                        let set = self.ip_set("DST", &key, &pods);
                        let m = format!("-p {p} -m {p} --dport {number}", p = proto(port.protocol));
                        push_marked(rules, comment, Some(src), Some(&set), Some(&m));
                    }
                }
                spec => {
                    let m = port_match(port.protocol, spec);
                    push_marked(rules, comment, Some(src), dst, Some(&m));
                }
            }
        }
    }
}

/// hash:net refuses /0: kube-router splits it into two halves.
fn split_zero(net: IpNet) -> Vec<IpNet> {
    if net.prefix_len() != 0 {
        return vec![net];
    }
    net.subnets(1).map(Iterator::collect).unwrap_or_default()
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn port_match(p: Protocol, spec: &PortSpec) -> String {
    let p = proto(p);
    match spec {
        PortSpec::Range { first, last } if first == last => {
            format!("-p {p} -m {p} --dport {first}")
        }
        PortSpec::Range { first, last } => format!("-p {p} -m {p} --dport {first}:{last}"),
        _ => format!("-p {p}"),
    }
}

/// The pods resolving `name` (for `protocol`), grouped by port number.
fn by_named_port<'a>(
    pods: &[&'a Pod],
    name: &str,
    protocol: Protocol,
) -> BTreeMap<u16, Vec<&'a Pod>> {
    let mut out: BTreeMap<u16, Vec<&Pod>> = BTreeMap::new();
    for pod in pods {
        if let Some(n) = pod.named_port(name, protocol) {
            out.entry(n).or_default().push(pod);
        }
    }
    out
}

/// kube-router's pair: mark the packet, then return once it is marked.
fn push_marked(
    rules: &mut Vec<String>,
    comment: &str,
    src: Option<&str>,
    dst: Option<&str>,
    ports: Option<&str>,
) {
    let mut m = String::new();
    if let Some(s) = src {
        let _ = write!(m, " -m set --match-set {s} src");
    }
    if let Some(d) = dst {
        let _ = write!(m, " -m set --match-set {d} dst");
    }
    if let Some(p) = ports {
        let _ = write!(m, " {p}");
    }
    rules.push(format!(
        "-m comment --comment {comment}{m} -j MARK --set-xmark {MARK}"
    ));
    rules.push(format!(
        "-m comment --comment {comment}{m} -m mark --mark {MARK} -j RETURN"
    ));
}

fn family(snap: &Snapshot, node: &str, fam: Family) -> FamilyRules {
    let mut by_ns: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    for pod in snap.pods.values().filter(|p| p.is_networked()) {
        by_ns
            .entry(pod.id.namespace.as_str())
            .or_default()
            .push(pod);
    }
    // Namespaces with pods, known or not (a pod's namespace object may lag).
    let ns_labels = snap
        .namespaces
        .keys()
        .map(String::as_str)
        .chain(by_ns.keys().copied())
        .map(|n| (n, snap.namespace_labels(n)))
        .collect();
    let mut r = Render {
        snap,
        fam,
        by_ns,
        ns_labels,
        sets: Vec::new(),
        policy_chains: Vec::new(),
    };
    // Every policy of the cluster, as kube-router renders them all.
    let mut policy_chain: BTreeMap<&ObjectRef, (String, bool, bool)> = BTreeMap::new();
    for slot in snap.policies.values() {
        let Some(p) = &slot.in_force else { continue };
        let chain = r.policy(p);
        policy_chain.insert(&p.id, (chain, p.ingress.is_some(), p.egress.is_some()));
    }

    let mut pod_chains: Vec<(String, Vec<String>)> = Vec::new();
    let (mut fwd, mut input, mut output) = (Vec::new(), Vec::new(), Vec::new());
    let policies: Vec<&NetworkPolicy> = snap
        .policies
        .values()
        .filter_map(|s| s.in_force.as_ref())
        .collect();
    for pod in r.networked() {
        if pod.node_name.as_deref() != Some(node) {
            continue;
        }
        let Some(ip) = pod_ips(pod, fam).next() else {
            continue;
        };
        let selecting: Vec<&NetworkPolicy> = policies
            .iter()
            .copied()
            .filter(|p| p.id.namespace == pod.id.namespace && p.pod_selector.matches(&pod.labels))
            .collect();
        // (110 local pods × the policies: cheap next to the sets.)
        let ingress = selecting.iter().any(|p| p.ingress.is_some());
        let egress = selecting.iter().any(|p| p.egress.is_some());
        if !ingress && !egress {
            continue;
        }
        let (ns, name) = (pod.id.namespace.as_str(), pod.id.name.as_str());
        let chain = format!("KUBE-POD-FW-{}", hash(&[ns, name]));
        let mut rules = vec![format!(
            "-m comment --comment {} -j {COMMON}",
            quote("rule to run the common rules for pods")
        )];
        if ingress {
            rules.push(format!(
                "-m comment --comment {} -m addrtype --src-type LOCAL -d {ip} -j ACCEPT",
                quote("rule to permit the traffic to pods when source is the pod's local node")
            ));
        }
        for p in &selecting {
            if let Some((c, _, _)) = policy_chain.get(&p.id) {
                rules.push(format!(
                    "-m comment --comment {} -j {c}",
                    quote(&format!("run through nw policy {}", p.id.name))
                ));
            }
        }
        rules.push(format!(
            "-m comment --comment {} -m mark ! --mark {MARK} -j DROP",
            quote(&format!(
                "rule to drop traffic of POD name:{name} namespace: {ns}"
            ))
        ));
        rules.push(format!(
            "-j MARK --set-mark 0/{}",
            &MARK[MARK.find('/').map_or(0, |i| i + 1)..]
        ));
        if ingress {
            let c = quote(&format!(
                "rule to jump traffic destined to POD name:{name} namespace: {ns} to chain {chain}"
            ));
            fwd.push(format!("-m comment --comment {c} -d {ip} -j {chain}"));
            fwd.push(format!(
                "-m physdev --physdev-is-bridged -m comment --comment {c} -d {ip} -j {chain}"
            ));
            output.push(format!("-m comment --comment {c} -d {ip} -j {chain}"));
        }
        if egress {
            let c = quote(&format!(
                "rule to jump traffic from POD name:{name} namespace: {ns} to chain {chain}"
            ));
            for v in [&mut input, &mut fwd, &mut output] {
                v.push(format!("-m comment --comment {c} -s {ip} -j {chain}"));
            }
            fwd.push(format!(
                "-m physdev --physdev-is-bridged -m comment --comment {c} -s {ip} -j {chain}"
            ));
        }
        pod_chains.push((chain, rules));
    }

    let mut stats = Stats::default();
    let mut ipt =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    let chains = [INPUT, FORWARD, OUTPUT, COMMON]
        .into_iter()
        .map(str::to_owned)
        .chain(pod_chains.iter().map(|(c, _)| c.clone()))
        .chain(r.policy_chains.iter().map(|(c, _)| c.clone()));
    for c in chains {
        let _ = writeln!(ipt, ":{c} - [0:0]");
        stats.chains += 1;
    }
    let mut rule = |ipt: &mut String, chain: &str, text: &str| {
        let _ = writeln!(ipt, "-A {chain} {text}");
        stats.rules += 1;
    };
    for (builtin, ours) in [("INPUT", INPUT), ("FORWARD", FORWARD), ("OUTPUT", OUTPUT)] {
        rule(
            &mut ipt,
            builtin,
            &format!(
                "-m comment --comment {} -j {ours}",
                quote("kube-router netpol - run the network policy chains")
            ),
        );
    }
    for (chain, rules) in [(INPUT, &input), (FORWARD, &fwd), (OUTPUT, &output)] {
        for t in rules {
            rule(&mut ipt, chain, t);
        }
    }
    // Invalid packets dropped, replies accepted, then the ICMP every pod
    // needs: the order of kube-router's common chain.
    rule(
        &mut ipt,
        COMMON,
        &format!(
            "-m comment --comment {} -m conntrack --ctstate INVALID -j DROP",
            quote("rule to drop invalid state for pod")
        ),
    );
    rule(
        &mut ipt,
        COMMON,
        &format!(
            "-m comment --comment {} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            quote("rule for stateful firewall for pod")
        ),
    );
    for icmp in common_icmp(fam) {
        rule(
            &mut ipt,
            COMMON,
            &format!(
                "-m comment --comment {} {icmp} -j ACCEPT",
                quote("allow icmp messages pods need")
            ),
        );
    }
    for (chain, rules) in pod_chains.iter().chain(r.policy_chains.iter()) {
        for t in rules {
            rule(&mut ipt, chain, t);
        }
    }
    ipt.push_str("COMMIT\n");

    // kube-router's restore: fill a temporary set of the same type, swap
    // it with the live one (created if missing), flush the temporary.
    let mut ips = String::new();
    let opts = format!("family {} hashsize 1024 maxelem 65536", fam.ipset());
    let tmp = |net: bool| {
        format!(
            "{}TMP-{}",
            fam.set_prefix(),
            if net { "HASHNET" } else { "HASHIP" }
        )
    };
    for net in [false, true] {
        let kind = if net { "hash:net" } else { "hash:ip" };
        let _ = writeln!(ips, "create {} {kind} {opts} -exist", tmp(net));
    }
    for s in &r.sets {
        let kind = if s.net { "hash:net" } else { "hash:ip" };
        let t = tmp(s.net);
        let _ = writeln!(ips, "create {} {kind} {opts} -exist", s.name);
        let _ = writeln!(ips, "flush {t}");
        for e in &s.entries {
            let _ = writeln!(ips, "add {t} {e}");
        }
        let _ = writeln!(ips, "swap {t} {}", s.name);
        let _ = writeln!(ips, "flush {t}");
        stats.sets += 1;
        stats.set_entries += s.entries.len();
    }
    for net in [false, true] {
        let _ = writeln!(ips, "destroy {}", tmp(net));
    }
    FamilyRules {
        ipset: ips,
        iptables: ipt,
        stats,
    }
}

/// What removes a baseline from a network namespace: an empty filter table
/// (for `iptables-restore`), then the sets (for `ipset restore`, after the
/// rules referencing them are gone).
#[must_use]
pub fn empty_filter_table() -> &'static str {
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    const CASE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.1.1.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIPs: [{ip: 10.1.1.2}, {ip: "fd01::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.2.2}, {ip: "fd02::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: r, namespace: x, labels: {app: b}}
spec: {nodeName: other, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.9.0.2}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-in, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: b}}}]
      ports: [{port: 80}, {port: http}]
    - from: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-out, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80, endPort: 90}]}]
"#;

    fn snap() -> Snapshot {
        crate::manifests::snapshot(CASE)
    }

    fn set_of<'a>(ipset: &'a str, name: &str) -> Vec<&'a str> {
        // Entries are added to the temporary set just before it is swapped
        // with `name`.
        let lines: Vec<&str> = ipset.lines().collect();
        let swap = lines
            .iter()
            .position(|l| l.starts_with("swap ") && l.ends_with(&format!(" {name}")))
            .unwrap_or_else(|| panic!("no swap into {name}"));
        let flush = lines[..swap]
            .iter()
            .rposition(|l| l.starts_with("flush "))
            .unwrap_or(0);
        lines[flush + 1..swap]
            .iter()
            .filter_map(|l| l.strip_prefix("add "))
            .map(|l| l.split_once(' ').map_or(l, |(_, e)| e))
            .collect()
    }

    #[test]
    fn shapes_follow_kube_router() {
        let b = generate(&snap()).expect("generate");
        let t = &b.v4.iptables;
        assert!(t.starts_with("*filter\n") && t.ends_with("COMMIT\n"), "{t}");
        for builtin in ["INPUT", "FORWARD", "OUTPUT"] {
            assert!(
                t.lines().any(|l| l.starts_with(&format!("-A {builtin} "))
                    && l.ends_with(&format!("-j KUBE-ROUTER-{builtin}"))),
                "{builtin} jumps to kube-router's chain"
            );
        }
        // Two local pods, both isolated: one pod chain each, jumped from
        // the forward chain by destination (a, ingress) and source (b,
        // egress). The remote pod gets none.
        let pod_chains: Vec<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix(":KUBE-POD-FW-"))
            .collect();
        assert_eq!(pod_chains.len(), 2, "{t}");
        assert!(t.lines().any(|l| l.starts_with("-A KUBE-ROUTER-FORWARD ")
            && l.contains(" -d 10.1.1.2 -j KUBE-POD-FW-")));
        assert!(t.lines().any(|l| l.starts_with("-A KUBE-ROUTER-FORWARD ")
            && l.contains(" -s 10.1.2.2 -j KUBE-POD-FW-")));
        assert!(!t.contains("10.9.0.2 -j"), "the remote pod has no chain");
        // In each pod chain: the common rules (established, ICMP) first,
        // drop of the unmarked last but the mark reset.
        for c in &pod_chains {
            let name = format!("KUBE-POD-FW-{}", c.trim_end_matches(" - [0:0]"));
            let rules: Vec<&str> = t
                .lines()
                .filter(|l| l.starts_with(&format!("-A {name} ")))
                .collect();
            assert!(rules[0].ends_with("-j KUBE-NWPLCY-COMMON"), "{rules:?}");
            assert!(
                rules.iter().any(|r| r.contains("-j KUBE-NWPLCY-")),
                "{rules:?}"
            );
            let n = rules.len();
            assert!(
                rules[n - 2].ends_with("-m mark ! --mark 0x10000/0x10000 -j DROP"),
                "{rules:?}"
            );
            assert!(
                rules[n - 1].ends_with("-j MARK --set-mark 0/0x10000"),
                "{rules:?}"
            );
        }
        // Policy chains mark then return, matching sets and ports.
        assert!(t.contains(" -m set --match-set KUBE-SRC-"));
        assert!(t.contains("-p tcp -m tcp --dport 80 -j MARK --set-xmark 0x10000/0x10000"));
        assert!(
            t.contains("-p tcp -m tcp --dport 8080 -j MARK"),
            "named port resolved"
        );
        assert!(
            t.contains("-p tcp -m tcp --dport 80:90 -j MARK"),
            "port range"
        );
        assert!(t.contains("-m mark --mark 0x10000/0x10000 -j RETURN"));
        // Every referenced set is created by the ipset text.
        for l in b.v4.iptables.lines() {
            for w in l.split(" --match-set ").skip(1) {
                let set = w.split(' ').next().unwrap_or_default();
                assert!(
                    b.v4.ipset.contains(&format!("create {set} ")),
                    "{set} not created"
                );
            }
        }
        let common: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with("-A KUBE-NWPLCY-COMMON "))
            .collect();
        assert!(
            common[0].ends_with("--ctstate INVALID -j DROP"),
            "{common:?}"
        );
        assert!(
            common[1].ends_with("--ctstate RELATED,ESTABLISHED -j ACCEPT"),
            "{common:?}"
        );
        assert!(
            b.v6.iptables
                .contains("-p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT"),
            "IPv6 neighbour solicitations pass"
        );
        assert_eq!(b.v4.stats.chains, 4 + 2 + 2);
    }

    #[test]
    fn sets_hold_pods_and_blocks_per_family() {
        let b = generate(&snap()).expect("generate");
        let ip4 = &b.v4.ipset;
        let dst = format!("KUBE-DST-{}", hash(&["x", "a-in", "ingress"]));
        assert_eq!(set_of(ip4, &dst), ["10.1.1.2"]);
        // Peers: b on this node and r elsewhere, both.
        let src = format!("KUBE-SRC-{}", hash(&["x", "a-in", "in", "0"]));
        assert_eq!(set_of(ip4, &src), ["10.1.2.2", "10.9.0.2"]);
        // 0.0.0.0/0 split in halves (hash:net refuses /0), the except as
        // nomatch.
        let block = format!("KUBE-SRC-{}", hash(&["x", "a-in", "in-block", "1"]));
        assert_eq!(
            set_of(ip4, &block),
            ["0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8 nomatch"]
        );
        assert!(ip4.contains(&format!("create {block} hash:net family inet ")));
        assert!(
            ip4.lines().all(|l| !l.contains("fd0")),
            "no IPv6 in the IPv4 sets"
        );
        // IPv6: kube-router's prefix, the family's addresses, the IPv4-only
        // ipBlock absent.
        let ip6 = &b.v6.ipset;
        let src6 = format!("inet6:KUBE-SRC-{}", hash(&["x", "a-in", "in", "0"]));
        assert_eq!(set_of(ip6, &src6), ["fd02::2"]);
        assert!(ip6.contains(&format!("create {src6} hash:ip family inet6 ")));
        assert!(!ip6.contains(&hash(&["x", "a-in", "in-block", "1"])));
        assert!(b.v6.iptables.contains("-d fd01::2 -j KUBE-POD-FW-"));
        // Names fit ipset (31) and iptables (28) limits.
        for l in ip6.lines().filter(|l| l.starts_with("create ")) {
            let name = l.split(' ').nth(1).unwrap_or_default();
            assert!(name.len() <= 31, "{name}");
        }
        for l in b.v6.iptables.lines().filter_map(|l| l.strip_prefix(':')) {
            let name = l.split(' ').next().unwrap_or_default();
            assert!(name.len() <= 28, "{name}");
        }
    }

    #[test]
    fn unisolated_pods_get_no_chain_and_no_local_node_is_an_error() {
        let mut s = snap();
        s.policies.clear();
        let b = generate(&s).expect("generate");
        assert!(!b.v4.iptables.contains("KUBE-POD-FW-"));
        assert_eq!(b.v4.stats.sets, 0);
        s.local_node = None;
        s.nodes.insert(
            "n2".into(),
            netpol_agent::model::Node {
                name: "n2".into(),
                addresses: Vec::new(),
                labels: netpol_agent::model::Labels::new(),
            },
        );
        assert_eq!(generate(&s), Err(BaselineError::NoLocalNode));
    }

    #[test]
    fn rendering_is_deterministic() {
        assert_eq!(generate(&snap()), generate(&snap()));
    }
}
