//! One family's rendering: the sets, the policy chains and the pod chains
//! kube-router would program for the local node.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;

use super::{COMMON, FORWARD, Family, FamilyRules, INPUT, MARK, OUTPUT, Stats, common_icmp, hash};
use crate::model::{NetworkPolicy, ObjectRef, Peer, Pod, PolicyPort, PortSpec, Protocol, Snapshot};

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
    ns_labels: BTreeMap<&'a str, crate::model::Labels>,
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

pub(super) fn family(snap: &Snapshot, node: &str, fam: Family) -> FamilyRules {
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
