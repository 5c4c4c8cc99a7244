//! Deny events: the one reader of the programs' ring buffer.
//!
//! The ring also carries the staged view's reports
//! (`reason::STAGED_WOULD_DENY`, `STAGED_WOULD_ALLOW`): not drops, never
//! counted as denials, always logged (target `netpol::staged`) and handed
//! to subscribers with the view's attribution.
//!
//! The programs report each dropped packet their endpoint's rate limit
//! lets through (`netpol_common::events`). The reader resolves the event's
//! endpoint id and addresses to pods through the [`Directory`] the sync
//! loop publishes after every applied compile, counts it in
//! `netpol_denied_total`, logs it when asked (`--log-denied`) and hands it
//! to [`crate::Agent::denials`] subscribers.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, OnceLock},
};

use aya::maps::{MapData, RingBuf};
use netpol_common::{DenyEvent, family, reason, staged_endpoint};
use serde::Serialize;
use tokio::{
    io::unix::AsyncFd,
    sync::{broadcast, watch},
};

use crate::{
    compiler::{Compiled, Direction, RuleRef, Stage},
    datapath::{self, events::decode},
    model::{ObjectRef, Peer, Pod, PortSpec, Rule, Snapshot},
    status::Metrics,
};

/// Who is behind an endpoint id or an address, and which rule decided a
/// packet, as of the compile in force.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    /// The compile in force (shared with the state file's writer): the
    /// entries whose decisions name the rules.
    compiled: Arc<Compiled>,
    /// Its snapshot (a clone shares its maps, so a directory costs the
    /// loop O(local pods)): every pod of the cluster (peers live
    /// anywhere) and the policies isolating a pod.
    snapshot: Snapshot,
    /// Endpoint id → local pod.
    endpoints: BTreeMap<u32, ObjectRef>,
    /// The local pods.
    local: BTreeSet<ObjectRef>,
    /// Address → pod, of every networked pod: built by the reader on the
    /// first lookup, not by the loop on every apply.
    addresses: OnceLock<BTreeMap<IpAddr, ObjectRef>>,
    /// The policies staged or staged for deletion, by [`policy_label`].
    staged: BTreeSet<String>,
}

/// How a policy is named in `netpol_staged_reports_total`: `ns/name` for
/// a `NetworkPolicy`, `ClusterNetworkPolicy/name` (namespaces are
/// lowercase: no clash).
#[must_use]
pub fn policy_label(policy: &ObjectRef) -> String {
    if policy.namespace.is_empty() {
        format!("ClusterNetworkPolicy/{}", policy.name)
    } else {
        policy.to_string()
    }
}

impl Directory {
    /// The directory of a compiled state and the snapshot it came from.
    #[must_use]
    pub fn new(compiled: Arc<Compiled>, snapshot: &Snapshot) -> Self {
        let endpoints: BTreeMap<u32, ObjectRef> = compiled
            .endpoints
            .iter()
            .map(|(pod, ep)| (ep.id, pod.clone()))
            .collect();
        let local = endpoints.values().cloned().collect();
        let staging = crate::model::Staging::Enforced;
        let staged = snapshot
            .policies
            .values()
            .filter_map(|s| s.in_force.as_ref())
            .filter(|p| p.staging != staging)
            .map(|p| policy_label(&p.id))
            .chain(
                snapshot
                    .cluster_policies
                    .values()
                    .filter_map(|s| s.in_force.as_ref())
                    .filter(|p| p.staging != staging)
                    .map(|p| policy_label(&ObjectRef::new("", p.name.clone()))),
            )
            .collect();
        Self {
            compiled,
            snapshot: snapshot.clone(),
            endpoints,
            local,
            addresses: OnceLock::new(),
            staged,
        }
    }

    /// Whether a policy ([`policy_label`]) is staged or staged for
    /// deletion.
    #[must_use]
    pub fn is_staged(&self, label: &str) -> bool {
        self.staged.contains(label)
    }

    /// What decided a packet the policy of `endpoint`'s direction `d`
    /// judged, in the enforced view or (`staged`) the staged one: where a
    /// `ClusterNetworkPolicy` applies, the decision for `peer`,
    /// `protocol` and `port` ([`Compiled::decision_at`]); else the rules
    /// allowing it, or the policies isolating the pod (none of whose rules
    /// allows it). `None` for an unknown endpoint.
    #[must_use]
    pub fn attribute(
        &self,
        endpoint: u32,
        d: Direction,
        peer: IpAddr,
        protocol: u8,
        port: u16,
        staged: bool,
    ) -> Option<Attribution> {
        let pod = self.endpoints.get(&endpoint)?;
        let ep = self.compiled.endpoints.get(pod)?;
        let (keyed, isolated) = match ep.staged(d) {
            Some(isolated) if staged => (staged_endpoint(endpoint), isolated),
            _ => (endpoint, ep.isolated(d)),
        };
        let names = |r: &[RuleRef]| r.iter().map(ToString::to_string).collect();
        let labels = |r: &[RuleRef]| {
            r.iter()
                .map(|r| policy_label(&r.policy))
                .collect::<BTreeSet<_>>()
        };
        // The rules that take this peer and port, from the policies
        // themselves: an entry's rules are those of the entry the trie
        // matched, which may be a shorter prefix standing for a longer one
        // the compiler left out as redundant (and then names rules that
        // do not take the peer, like one whose `except` holds it). Where
        // none is found, the entry's.
        let allowing = |entry_rules: &[RuleRef]| -> Vec<RuleRef> {
            let found = self.allowing(pod, d, staged, peer, protocol, port);
            if found.is_empty() {
                entry_rules.to_vec()
            } else {
                found
            }
        };
        if let Some(decision) = self.compiled.decision_at(keyed, d, peer, protocol, port) {
            let mut decision = decision.clone();
            if decision.stage == Stage::NetworkPolicy && decision.allowed {
                decision.rules = allowing(&decision.rules);
            }
            let mut named = labels(&decision.rules);
            named.extend(labels(&decision.passed));
            // Denied by NetworkPolicy after the tiers: the policies
            // isolating the pod, as where no tier applies.
            let policies = if decision.stage == Stage::NetworkPolicy && !decision.allowed {
                crate::provenance::isolating(&self.snapshot, pod, d, staged)
            } else {
                Vec::new()
            };
            named.extend(policies.iter().cloned());
            let text = if policies.is_empty() {
                decision.to_string()
            } else {
                format!("{decision} (isolated by {})", policies.join(", "))
            };
            let hits = if decision.rules.is_empty() {
                policies
                    .iter()
                    .map(|p| (p.clone(), String::new()))
                    .collect()
            } else {
                decision.rules.iter().map(hit).collect()
            };
            return Some(Attribution {
                text,
                stage: Some(decision.stage),
                rules: names(&decision.rules),
                passed: names(&decision.passed),
                policies,
                labels: named,
                hits,
            });
        }
        let plain = |text: String| Attribution {
            text,
            stage: None,
            rules: Vec::new(),
            passed: Vec::new(),
            policies: Vec::new(),
            labels: BTreeSet::new(),
            hits: Vec::new(),
        };
        if !isolated {
            return Some(plain("allowed: no policy isolates the pod".to_owned()));
        }
        if let Some(entry) = self.compiled.entry_at(keyed, d, peer)
            && self
                .compiled
                .rulesets
                .get(&entry.ruleset)
                .is_some_and(|rs| rs.allows(protocol, port))
        {
            let allowing = allowing(&entry.sources);
            let rules: Vec<String> = names(&allowing);
            return Some(Attribution {
                text: format!("allowed by {}", rules.join(", ")),
                rules,
                labels: labels(&allowing),
                hits: allowing.iter().map(hit).collect(),
                ..plain(String::new())
            });
        }
        let policies = crate::provenance::isolating(&self.snapshot, pod, d, staged);
        let text = if policies.is_empty() {
            "isolated and no rule allows it".to_owned()
        } else {
            format!("isolated by {} and no rule allows it", policies.join(", "))
        };
        Some(Attribution {
            labels: policies.iter().cloned().collect(),
            hits: policies
                .iter()
                .map(|p| (p.clone(), String::new()))
                .collect(),
            policies,
            ..plain(text)
        })
    }

    /// The rules of the `NetworkPolicies` isolating `pod` in `d` (in the
    /// enforced or the staged view) that take `peer`, `protocol` and
    /// `port`.
    fn allowing(
        &self,
        pod: &ObjectRef,
        d: Direction,
        staged: bool,
        peer: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Vec<RuleRef> {
        // A named port is the destination pod's.
        let destination = match d {
            Direction::Ingress => self.snapshot.pods.get(pod),
            Direction::Egress => self.address(peer).and_then(|id| self.snapshot.pods.get(id)),
        };
        let peer_pod = self.address(peer).and_then(|id| self.snapshot.pods.get(id));
        let mut found = Vec::new();
        for np in crate::provenance::isolating_policies(&self.snapshot, pod, d, staged) {
            let rules = match d {
                Direction::Ingress => np.ingress.as_deref(),
                Direction::Egress => np.egress.as_deref(),
            };
            for (index, rule) in rules.unwrap_or_default().iter().enumerate() {
                if self.takes(
                    &np.id.namespace,
                    rule,
                    peer,
                    peer_pod,
                    protocol,
                    port,
                    destination,
                ) {
                    found.push(RuleRef {
                        policy: np.id.clone(),
                        direction: d,
                        index,
                        tier: None,
                    });
                }
            }
        }
        found
    }

    /// Whether `rule`, of a policy in `namespace`, takes `peer` (by its
    /// blocks and their `except`, or as the pod it is by its selectors),
    /// `protocol` and `port` (a named port resolved on `destination`).
    #[allow(
        clippy::too_many_arguments,
        reason = "the connection's fields, as the caller has them"
    )]
    fn takes(
        &self,
        namespace: &str,
        rule: &Rule,
        peer: IpAddr,
        peer_pod: Option<&Pod>,
        protocol: u8,
        port: u16,
        destination: Option<&Pod>,
    ) -> bool {
        let takes_peer = rule.peers.is_empty()
            || rule.peers.iter().any(|p| match p {
                Peer::IpBlock { cidr, except } => {
                    cidr.contains(&peer) && !except.iter().any(|e| e.contains(&peer))
                }
                Peer::Pods {
                    pod_selector,
                    namespace_selector,
                } => peer_pod.is_some_and(|pod| {
                    let ns = &pod.id.namespace;
                    let ns_ok = match namespace_selector {
                        None => ns == namespace,
                        Some(sel) => sel.matches(&self.snapshot.namespace_labels(ns)),
                    };
                    ns_ok && pod_selector.as_ref().is_none_or(|s| s.matches(&pod.labels))
                }),
            });
        takes_peer
            && (rule.ports.is_empty()
                || rule.ports.iter().any(|p| {
                    p.protocol.number() == protocol
                        && match &p.port {
                            PortSpec::All => true,
                            PortSpec::Range { first, last } => (*first..=*last).contains(&port),
                            PortSpec::Named(name) => {
                                destination.and_then(|pod| pod.named_port(name, p.protocol))
                                    == Some(port)
                            }
                        }
                }))
    }

    /// The local pod of an endpoint id.
    #[must_use]
    pub fn endpoint(&self, id: u32) -> Option<&ObjectRef> {
        self.endpoints.get(&id)
    }

    /// The pod owning an address.
    #[must_use]
    pub fn address(&self, ip: IpAddr) -> Option<&ObjectRef> {
        self.addresses
            .get_or_init(|| {
                let mut addresses = BTreeMap::new();
                for pod in self.snapshot.pods.values().filter(|p| p.is_networked()) {
                    for ip in &pod.ips {
                        addresses.entry(*ip).or_insert_with(|| pod.id.clone());
                    }
                }
                addresses
            })
            .get(&ip)
    }

    /// Whether a policy ([`policy_label`]) is in the snapshot (enforced
    /// or staged).
    #[must_use]
    pub fn has_policy(&self, label: &str) -> bool {
        match label.strip_prefix("ClusterNetworkPolicy/") {
            Some(name) => self.snapshot.cluster_policies.contains_key(name),
            None => label.split_once('/').is_some_and(|(ns, name)| {
                self.snapshot
                    .policies
                    .contains_key(&ObjectRef::new(ns, name))
            }),
        }
    }

    /// Whether `pod` is one of this node's endpoints.
    #[must_use]
    pub fn is_local(&self, pod: &ObjectRef) -> bool {
        self.local.contains(pod)
    }
}

/// What decided a dropped packet ([`Directory::attribute`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attribution {
    /// One sentence.
    pub text: String,
    /// Where a `ClusterNetworkPolicy` applies: the stage that decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// The deciding rule (`ClusterNetworkPolicy`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    /// The Pass rules on the way, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub passed: Vec<String>,
    /// `NetworkPolicy` isolates the pod and none of its rules allows the
    /// packet: the policies isolating it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Every policy named above, by [`policy_label`].
    #[serde(skip)]
    pub labels: BTreeSet<String>,
    /// What `netpol_rule_hits_total` counts it under: (policy label,
    /// `spec.ingress[i]`) of each deciding rule, or (policy label, "") of
    /// each policy whose isolation denied it.
    #[serde(skip)]
    pub hits: Vec<(String, String)>,
}

/// A rule's `netpol_rule_hits_total` labels.
fn hit(r: &RuleRef) -> (String, String) {
    (
        policy_label(&r.policy),
        format!("spec.{}[{}]", r.direction.field(), r.index),
    )
}

/// One dropped packet (or a staged view's report on a new connection),
/// resolved to pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Denial {
    /// When the program dropped it (`CLOCK_MONOTONIC`, ns).
    pub timestamp_ns: u64,
    /// `netpol_common::direction` of the policy that dropped it.
    pub direction: u32,
    /// `netpol_common::reason`: a drop, or `STAGED_WOULD_DENY` /
    /// `STAGED_WOULD_ALLOW` (not verdicts).
    pub reason: u32,
    /// IP protocol number.
    pub protocol: u8,
    /// ICMP/ICMPv6 type, 0 otherwise.
    pub icmp_type: u8,
    /// Source address and port (ICMP echo: the id).
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// Endpoint id whose policy dropped it (0: none known).
    pub endpoint: u32,
    /// The interface the program ran on.
    pub ifindex: u32,
    /// The local pod of `endpoint`: the destination for ingress, the
    /// source for egress.
    pub pod: Option<ObjectRef>,
    /// The pod that sent it (the endpoint's pod for egress, else found by
    /// address).
    pub source: Option<ObjectRef>,
    /// The pod it was for (the endpoint's pod for ingress, else found by
    /// address; a Service packet carries its backend's).
    pub destination: Option<ObjectRef>,
    /// For a policy drop (a new connection or a revoked one): what
    /// decided it. For a staged view's report: what decides it there.
    pub decided: Option<Attribution>,
    /// For a staged view's report: the staged (or staged-for-deletion)
    /// policies named by either view's judgement, by [`policy_label`]
    /// (what `netpol_staged_reports_total` counts it under).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub staged_policies: Vec<String>,
}

impl Denial {
    /// Resolves an event against `dir`.
    #[must_use]
    pub fn resolve(e: &DenyEvent, dir: &Directory) -> Self {
        let addr = |a: [u8; 16]| -> IpAddr {
            if u32::from(e.family) == family::IPV6 {
                Ipv6Addr::from(a).into()
            } else {
                Ipv4Addr::new(a[0], a[1], a[2], a[3]).into()
            }
        };
        let (src, dst) = (addr(e.src), addr(e.dst));
        let pod = dir.endpoint(e.endpoint).cloned();
        let egress = u32::from(e.direction) == netpol_common::direction::EGRESS;
        let by_addr = |ip| dir.address(ip).cloned();
        let (source, destination) = if egress {
            (pod.clone().or_else(|| by_addr(src)), by_addr(dst))
        } else {
            (by_addr(src), pod.clone().or_else(|| by_addr(dst)))
        };
        let staged = reason::is_staged(e.reason);
        let decided = if staged
            || matches!(
                e.reason,
                reason::DROP_POLICY | reason::DROP_REVOKED | reason::PASS_POLICY
            ) {
            let (d, peer) = if egress {
                (Direction::Egress, dst)
            } else {
                (Direction::Ingress, src)
            };
            // As the programs looked it up: a protocol without ports
            // (its `dport` an echo id) matches only "every protocol".
            Some((d, peer))
        } else {
            None
        };
        let judged = |in_staged: bool| {
            decided.and_then(|(d, peer)| {
                dir.attribute(e.endpoint, d, peer, e.protocol, e.dport, in_staged)
            })
        };
        let staged_policies = if staged {
            // What makes the views differ: a staged policy the staged
            // view names, or one staged for deletion the enforced one
            // names.
            let mut labels = BTreeSet::new();
            for a in [judged(true), judged(false)].into_iter().flatten() {
                labels.extend(a.labels.into_iter().filter(|l| dir.is_staged(l)));
            }
            labels.into_iter().collect()
        } else {
            Vec::new()
        };
        let decided = judged(staged);
        Self {
            decided,
            staged_policies,
            timestamp_ns: e.timestamp_ns,
            direction: u32::from(e.direction),
            reason: e.reason,
            protocol: e.protocol,
            icmp_type: e.icmp_type,
            src: SocketAddr::new(src, e.sport),
            dst: SocketAddr::new(dst, e.dport),
            endpoint: e.endpoint,
            ifindex: e.ifindex,
            pod,
            source,
            destination,
        }
    }

    /// `ingress` or `egress`.
    #[must_use]
    pub const fn direction_name(&self) -> &'static str {
        datapath::direction_name(self.direction)
    }

    /// The reason's stable name (`drop_policy`, ...).
    #[must_use]
    pub const fn reason_name(&self) -> &'static str {
        reason::name(self.reason)
    }
}

/// A pod for a log line: `ns/name`, or `-`.
fn shown(p: Option<&ObjectRef>) -> String {
    p.map_or_else(|| "-".to_owned(), ToString::to_string)
}

/// The protocol's name in a log line.
fn protocol_name(p: u8) -> String {
    netpol_common::protocol::name(p).map_or_else(|| p.to_string(), str::to_ascii_lowercase)
}

/// The ring buffer's reader and what it feeds.
pub(crate) struct Reader {
    pub ring: RingBuf<MapData>,
    pub directory: watch::Receiver<Arc<Directory>>,
    pub metrics: Arc<Metrics>,
    pub log_denied: bool,
    pub denials: broadcast::Sender<Denial>,
    /// Where the staged view's reports are summed up
    /// ([`crate::staged::FILE`], the state folder); `None`: nowhere.
    pub staged_dir: Option<std::path::PathBuf>,
}

impl Reader {
    /// Reads events until `stop`. Events are not essential to enforcement:
    /// a failure is logged and ends the reader, not the agent.
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let Self {
            ring,
            mut directory,
            metrics,
            log_denied,
            denials,
            staged_dir,
        } = self;
        let mut staged = crate::staged::Fold::default();
        let mut flush = tokio::time::interval(std::time::Duration::from_secs(1));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // SAFETY: the RingBuf owns its map's descriptor, open until the
        // RingBuf is dropped (with the AsyncFd owning it), and always
        // returns that same descriptor.
        let registered =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
        let mut ring = match registered {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "polling the deny-event ring buffer; no deny events");
                return;
            }
        };
        let mut dir = directory.borrow_and_update().clone();
        loop {
            tokio::select! {
                () = crate::shutdown::stopped(&mut stop) => break,
                r = directory.changed() => {
                    if r.is_err() {
                        break;
                    }
                    dir = directory.borrow_and_update().clone();
                    // Bounded label sets: pods that left this node, and
                    // policies no longer staged, fold into the unnamed
                    // series.
                    metrics.retain_denied(|p| dir.is_local(p));
                    metrics.retain_rule_hits(|l| dir.has_policy(l));
                    metrics.retain_staged(|l| dir.is_staged(l));
                    staged.retain(|l| dir.is_staged(l));
                }
                _ = flush.tick() => {
                    if let Some(d) = &staged_dir
                        && let Err(e) = staged.flush(d)
                    {
                        tracing::warn!(error = %e, dir = %d.display(), "writing the staged view's reports");
                    }
                }
                r = ring.readable_mut() => {
                    let mut guard = match r {
                        Ok(g) => g,
                        Err(e) => {
                            tracing::error!(error = %e, "reading the deny-event ring buffer; no more deny events");
                            break;
                        }
                    };
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        let event = decode(&item);
                        drop(item);
                        let Some(event) = event else {
                            tracing::debug!("skipped a short deny-event record");
                            continue;
                        };
                        let d = Denial::resolve(&event, &dir);
                        if reason::is_staged(d.reason) {
                            // Not a drop: what a staged policy would change,
                            // logged always (only staging produces them).
                            metrics.staged(&d.staged_policies, d.reason);
                            staged.add(&d);
                            log_staged(&d);
                        } else if d.reason == reason::PASS_POLICY {
                            // Only `--record-allowed` produces them.
                            metrics.rule_hits(d.decided.as_ref(), false);
                            log_allowed(&d);
                        } else {
                            metrics.denied(d.pod.as_ref(), d.direction);
                            metrics.rule_hits(d.decided.as_ref(), true);
                            if log_denied {
                                log(&d);
                            }
                        }
                        // No subscriber is no error.
                        let _ = denials.send(d);
                    }
                    guard.clear_ready();
                }
            }
        }
        tracing::debug!("deny-event reader stopped");
    }
}

/// A staged view's report: `staged: would deny ingress tcp x/b -> x/a
/// port 80 (isolated by x/deny-all and no rule allows it)`.
fn log_staged(d: &Denial) {
    let would = if d.reason == reason::STAGED_WOULD_ALLOW {
        "would allow"
    } else {
        "would deny"
    };
    tracing::info!(
        target: "netpol::staged",
        direction = d.direction_name(),
        report = d.reason_name(),
        protocol = %protocol_name(d.protocol),
        src = %d.src,
        dst = %d.dst,
        source = %shown(d.source.as_ref()),
        destination = %shown(d.destination.as_ref()),
        endpoint = d.endpoint,
        decided = d.decided.as_ref().map_or("", |a| a.text.as_str()),
        staged_policies = %d.staged_policies.join(","),
        "staged: {would} {} {} {} -> {} port {} ({})",
        d.direction_name(),
        protocol_name(d.protocol),
        shown(d.source.as_ref()),
        shown(d.destination.as_ref()),
        d.dst.port(),
        d.decided.as_ref().map_or("", |a| a.text.as_str()),
    );
}

/// An allowed-connection record: `allowed ingress tcp x/b -> x/a port 80
/// (allowed by x/allow-80: spec.ingress[0])`.
fn log_allowed(d: &Denial) {
    tracing::info!(
        target: "netpol::allowed",
        direction = d.direction_name(),
        protocol = %protocol_name(d.protocol),
        src = %d.src,
        dst = %d.dst,
        source = %shown(d.source.as_ref()),
        destination = %shown(d.destination.as_ref()),
        endpoint = d.endpoint,
        ifindex = d.ifindex,
        decided = d.decided.as_ref().map_or("", |a| a.text.as_str()),
        rules = %d.decided.as_ref().map_or_else(String::new, |a| a.rules.join(";")),
        "allowed {} {} {} -> {} port {} ({})",
        d.direction_name(),
        protocol_name(d.protocol),
        shown(d.source.as_ref()),
        shown(d.destination.as_ref()),
        d.dst.port(),
        d.decided.as_ref().map_or("", |a| a.text.as_str()),
    );
}

fn log(d: &Denial) {
    tracing::info!(
        target: "netpol::denied",
        direction = d.direction_name(),
        reason = d.reason_name(),
        protocol = %protocol_name(d.protocol),
        src = %d.src,
        dst = %d.dst,
        source = %shown(d.source.as_ref()),
        destination = %shown(d.destination.as_ref()),
        endpoint = d.endpoint,
        ifindex = d.ifindex,
        decided = d.decided.as_ref().map_or("", |a| a.text.as_str()),
        policies = %d.decided.as_ref().map_or_else(String::new, |a| a.policies.join(";")),
        rules = %d.decided.as_ref().map_or_else(String::new, |a| a.rules.join(";")),
        "denied {} {} {} -> {} ({}{})",
        d.direction_name(),
        protocol_name(d.protocol),
        shown(d.source.as_ref()),
        shown(d.destination.as_ref()),
        d.reason_name(),
        d.decided
            .as_ref()
            .map_or_else(String::new, |a| format!(": {}", a.text)),
    );
}

#[cfg(test)]
mod tests {
    use netpol_common::direction;

    use super::*;

    #[test]
    fn a_directory_names_local_pods_by_id_and_every_pod_by_address() {
        let snap = crate::test_support::snapshot(
            r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.2}, {ip: "fd01::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x}
spec: {nodeName: n2, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.2}]}
"#,
        );
        let compiled = crate::compiler::compile(&snap, &crate::compiler::IdAllocation::default());
        let d = Directory::new(Arc::new(compiled.clone()), &snap);
        let (a, b) = (ObjectRef::new("x", "a"), ObjectRef::new("x", "b"));
        let id = compiled.endpoints[&a].id;
        assert_eq!(d.endpoint(id), Some(&a));
        assert!(d.is_local(&a) && !d.is_local(&b));
        assert_eq!(d.address("fd01::2".parse().expect("ip")), Some(&a));
        assert_eq!(d.address("10.2.0.2".parse().expect("ip")), Some(&b));
        assert_eq!(d.address("10.2.0.3".parse().expect("ip")), None);
    }

    fn dir() -> Directory {
        let a = ObjectRef::new("x", "a");
        let b = ObjectRef::new("y", "b");
        Directory {
            compiled: Arc::default(),
            snapshot: Snapshot::default(),
            endpoints: BTreeMap::from([(5, a.clone())]),
            local: BTreeSet::from([a.clone()]),
            addresses: OnceLock::from(BTreeMap::from([
                ("10.0.0.5".parse().expect("ip"), a),
                ("10.0.0.9".parse().expect("ip"), b.clone()),
                ("fd00::9".parse().expect("ip"), b),
            ])),
            staged: BTreeSet::new(),
        }
    }

    fn event(dir: u32, fam: u32, src: [u8; 16], dst: [u8; 16]) -> DenyEvent {
        DenyEvent {
            endpoint: 5,
            reason: reason::DROP_POLICY,
            direction: u8::try_from(dir).expect("a direction code"),
            family: u8::try_from(fam).expect("a family code"),
            protocol: netpol_common::protocol::UDP,
            sport: 4000,
            dport: 53,
            src,
            dst,
            ..DenyEvent::default()
        }
    }

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0; 16];
        out[..4].copy_from_slice(&a);
        out
    }

    #[test]
    fn an_ingress_denial_names_the_endpoint_as_destination_and_the_peer_by_address() {
        let e = event(
            direction::INGRESS,
            family::IPV4,
            v4([10, 0, 0, 9]),
            v4([10, 0, 0, 5]),
        );
        let d = Denial::resolve(&e, &dir());
        assert_eq!(d.pod, Some(ObjectRef::new("x", "a")));
        assert_eq!(d.destination, Some(ObjectRef::new("x", "a")));
        assert_eq!(d.source, Some(ObjectRef::new("y", "b")));
        assert_eq!(d.src, "10.0.0.9:4000".parse().expect("addr"));
        assert_eq!(
            (d.direction_name(), d.reason_name()),
            ("ingress", "drop_policy")
        );
    }

    #[test]
    fn an_egress_denial_names_the_endpoint_as_source_even_from_another_address() {
        let dst: Ipv6Addr = "fd00::9".parse().expect("ip");
        let e = event(
            direction::EGRESS,
            family::IPV6,
            "fd00::77".parse::<Ipv6Addr>().expect("ip").octets(),
            dst.octets(),
        );
        let d = Denial::resolve(&e, &dir());
        assert_eq!(d.source, Some(ObjectRef::new("x", "a")));
        assert_eq!(d.destination, Some(ObjectRef::new("y", "b")));
        assert_eq!(d.dst, SocketAddr::new(dst.into(), 53));
    }

    /// Pod `x/a` on n1, `y/b` (TCP 80) and `y/c` on n2; `NetworkPolicy`
    /// `x/np` isolates `a` for ingress allowing TCP 8080 from `y`.
    const TIERED: &str = r"
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {kubernetes.io/metadata.name: y}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: y, labels: {app: b}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: y}
spec: {nodeName: n2, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.3}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]
    ports: [{port: 8080}]
";

    /// Admin: `pass-b` passes TCP 80 from `y/b`, `deny-y` denies TCP 80
    /// from `y`.
    const ADMIN: &str = r"
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: guard}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: x}}}
  ingress:
  - name: pass-b
    action: Pass
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: b}}}}]
    protocols: [{tcp: {destinationPort: {number: 80}}}]
  - name: deny-y
    action: Deny
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: y}}}]
    protocols: [{tcp: {destinationPort: {number: 80}}}]
";

    fn tcp_ingress(dir: &Directory, id: u32, from: [u8; 4], port: u16) -> Denial {
        let mut e = event(
            direction::INGRESS,
            family::IPV4,
            v4(from),
            v4([10, 1, 0, 2]),
        );
        e.endpoint = id;
        e.protocol = netpol_common::protocol::TCP;
        e.dport = port;
        Denial::resolve(&e, dir)
    }

    /// An allowed-connection record (or a `NetworkPolicy` allow) names the
    /// rules that take the peer and the port, found from the policies: x/a
    /// admits y/b by `x/wide`'s second rule (y's pods) but not its first
    /// (y/b's address is its block's `except`); the compiler leaves y/b's
    /// host prefix out (its rule set equals the block's), so the entry the
    /// trie matches is the block's, which names only the first rule.
    #[test]
    fn an_allowed_record_names_the_rules_that_take_the_peer_not_the_entrys() {
        const WIDE: &str = r"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: wide, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from: [{ipBlock: {cidr: 10.2.0.0/16, except: [10.2.0.2/32]}}]
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]
";
        let (dir, id) = directory_of(&format!("{TIERED}{WIDE}"));
        let allowed = |port: u16| {
            let mut e = event(
                direction::INGRESS,
                family::IPV4,
                v4([10, 2, 0, 2]),
                v4([10, 1, 0, 2]),
            );
            e.endpoint = id;
            e.reason = reason::PASS_POLICY;
            e.protocol = netpol_common::protocol::TCP;
            e.dport = port;
            Denial::resolve(&e, &dir).decided.expect("attributed")
        };
        let d = allowed(80);
        assert_eq!(d.rules, ["x/wide: spec.ingress[1]"], "{}", d.text);
        assert_eq!(d.text, "allowed by x/wide: spec.ingress[1]");
        assert_eq!(
            d.hits,
            [("x/wide".to_owned(), "spec.ingress[1]".to_owned())]
        );
        // TCP 8080: x/np's rule takes it too.
        assert_eq!(
            allowed(8080).rules,
            ["x/np: spec.ingress[0]", "x/wide: spec.ingress[1]"]
        );
    }

    /// The directory of `yaml`'s compile and `x/a`'s endpoint id.
    fn directory_of(yaml: &str) -> (Directory, u32) {
        let snap = crate::test_support::snapshot(yaml);
        let compiled = crate::compiler::compile(&snap, &crate::compiler::IdAllocation::default());
        let id = compiled.endpoints[&ObjectRef::new("x", "a")].id;
        (Directory::new(Arc::new(compiled), &snap), id)
    }

    #[test]
    fn a_policy_denial_names_the_tier_rule_the_pass_chain_or_the_isolating_policies() {
        let (dir, id) = directory_of(&format!("{TIERED}{ADMIN}"));

        // y/c on TCP 80: the Admin Deny.
        let d = tcp_ingress(&dir, id, [10, 2, 0, 3], 80)
            .decided
            .expect("attributed");
        assert_eq!(d.stage, Some(Stage::Admin));
        assert_eq!(
            d.rules,
            ["ClusterNetworkPolicy guard (Admin): spec.ingress[1]"]
        );
        assert!(d.passed.is_empty() && d.policies.is_empty());
        assert_eq!(
            d.text,
            "denied by ClusterNetworkPolicy guard (Admin): spec.ingress[1] (Deny)"
        );

        // y/b on TCP 80: passed to NetworkPolicy, which allows only 8080.
        let d = tcp_ingress(&dir, id, [10, 2, 0, 2], 80)
            .decided
            .expect("attributed");
        assert_eq!(d.stage, Some(Stage::NetworkPolicy));
        assert_eq!(
            d.passed,
            ["ClusterNetworkPolicy guard (Admin): spec.ingress[0]"]
        );
        assert!(d.rules.is_empty());
        // Denied there: the policies isolating the pod are named too.
        assert_eq!(d.policies, ["x/np"]);
        assert!(d.text.ends_with(" (isolated by x/np)"), "{}", d.text);

        // y/c on TCP 81: no Admin rule; NetworkPolicy denies.
        let d = tcp_ingress(&dir, id, [10, 2, 0, 3], 81)
            .decided
            .expect("attributed");
        assert_eq!((d.stage, d.passed.len()), (Some(Stage::NetworkPolicy), 0));
        assert_eq!(d.policies, ["x/np"]);

        // Without the ClusterNetworkPolicy: the isolating policy.
        let (dir, id) = directory_of(TIERED);
        let d = tcp_ingress(&dir, id, [10, 2, 0, 3], 80)
            .decided
            .expect("attributed");
        assert_eq!((d.stage, d.policies), (None, vec!["x/np".to_owned()]));
        assert_eq!(d.text, "isolated by x/np and no rule allows it");

        // Not a policy drop: nothing to attribute.
        let mut e = event(
            direction::INGRESS,
            family::IPV4,
            v4([10, 2, 0, 3]),
            v4([10, 1, 0, 2]),
        );
        e.endpoint = id;
        e.reason = reason::DROP_SPOOFED;
        assert_eq!(Denial::resolve(&e, &dir).decided, None);
    }

    /// A staged view's report from `y/c` on TCP `port` to `x/a`.
    fn staged_report(dir: &Directory, id: u32, report: u32, port: u16) -> Denial {
        let mut e = event(
            direction::INGRESS,
            family::IPV4,
            v4([10, 2, 0, 3]),
            v4([10, 1, 0, 2]),
        );
        e.endpoint = id;
        e.reason = report;
        e.protocol = netpol_common::protocol::TCP;
        e.dport = port;
        Denial::resolve(&e, dir)
    }

    #[test]
    fn a_staged_report_names_the_staged_views_decision_and_the_staged_policies_behind_it() {
        // x/np staged: the staged view isolates a, the enforced one does
        // not.
        let staged_np = TIERED.replace(
            "metadata: {name: np, namespace: x}",
            "metadata: {name: np, namespace: x, annotations: {netpol.io/staged: \"true\"}}",
        );
        let (dir, id) = directory_of(&staged_np);
        let d = staged_report(&dir, id, reason::STAGED_WOULD_DENY, 80);
        let a = d.decided.expect("attributed");
        assert_eq!(a.text, "isolated by x/np and no rule allows it");
        assert_eq!(d.staged_policies, ["x/np"]);
        let d = staged_report(&dir, id, reason::STAGED_WOULD_DENY, 8080);
        assert_eq!(
            d.decided.expect("attributed").text,
            "allowed by x/np: spec.ingress[0]"
        );

        // x/np staged for deletion: the enforced view names it.
        let (dir, id) = directory_of(&TIERED.replace(
            "metadata: {name: np, namespace: x}",
            "metadata: {name: np, namespace: x, annotations: {netpol.io/staged-delete: \"true\"}}",
        ));
        let d = staged_report(&dir, id, reason::STAGED_WOULD_ALLOW, 80);
        assert_eq!(
            d.decided.expect("attributed").text,
            "allowed: no policy isolates the pod"
        );
        assert_eq!(d.staged_policies, ["x/np"]);

        // A staged ClusterNetworkPolicy over the enforced x/np: its Deny
        // decides in the staged view.
        let (dir, id) = directory_of(&format!(
            "{TIERED}{}",
            ADMIN.replace(
                "metadata: {name: guard}",
                "metadata: {name: guard, annotations: {netpol.io/staged: \"true\"}}",
            )
        ));
        let d = staged_report(&dir, id, reason::STAGED_WOULD_DENY, 80);
        assert_eq!(
            d.decided.expect("attributed").text,
            "denied by ClusterNetworkPolicy guard (Admin): spec.ingress[1] (Deny)"
        );
        assert_eq!(d.staged_policies, ["ClusterNetworkPolicy/guard"]);
    }

    /// The report the programs send for a hairpin the staged view judges
    /// otherwise (`policy::netpol_hairpin_allows`): from x/a to itself.
    #[test]
    fn a_staged_hairpin_report_names_the_pod_on_both_ends_and_the_staged_rule() {
        let self_deny = r#"
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-self, annotations: {netpol.io/staged: "true"}}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: x}}}
  ingress:
  - name: self
    action: Deny
    from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: x}}}]
    protocols: [{tcp: {destinationPort: {number: 8080}}}]
"#;
        let (dir, id) = directory_of(&format!("{TIERED}{self_deny}"));
        let own = v4([10, 1, 0, 2]);
        let mut e = event(direction::INGRESS, family::IPV4, own, own);
        e.endpoint = id;
        e.reason = reason::STAGED_WOULD_DENY;
        e.protocol = netpol_common::protocol::TCP;
        e.dport = 8080;
        let d = Denial::resolve(&e, &dir);
        assert_eq!(d.staged_policies, ["ClusterNetworkPolicy/no-self"]);
        assert_eq!(
            d.decided.expect("attributed").text,
            "denied by ClusterNetworkPolicy no-self (Admin): spec.ingress[0] (Deny)"
        );
        let a = ObjectRef::new("x", "a");
        assert_eq!((d.source, d.destination), (Some(a.clone()), Some(a)));
    }

    #[test]
    fn unknown_endpoints_and_addresses_stay_unnamed() {
        let mut e = event(
            direction::INGRESS,
            family::IPV4,
            v4([192, 0, 2, 1]),
            v4([192, 0, 2, 2]),
        );
        e.endpoint = 77;
        let d = Denial::resolve(&e, &dir());
        assert_eq!((d.pod, d.source, d.destination), (None, None, None));
    }
}
