//! Deny-event attribution against the scenario (part of `--staged`
//! runs, whose agent logs every denial as a JSON line): for every cell
//! probed pod to pod that policy denies, the agent's `netpol::denied`
//! events of that connection, at the side that dropped it, must name
//! - where NetworkPolicy decided: exactly the policies that isolate the
//!   pod in that direction, computed here from the scenario's objects
//!   (pod selector, namespace, policy types), and no rule;
//! - where a ClusterNetworkPolicy decided (`explain` says which): the one
//!   rule that decided.
//!
//! And (the agent runs with `--record-allowed 1`) for every cell probed
//! pod to pod that policy allows, at each side a rule admitted, the
//! `netpol::allowed` records of that connection must name rules that take
//! the peer and the port by the scenario's objects (NetworkPolicy), or the
//! one rule `explain` says decided (ClusterNetworkPolicy).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::Result;
use serde_yaml::Value;

use super::{
    Tally,
    scenario::{self, ObjKey},
    staged::log_lines,
};

/// One `netpol::denied` or `netpol::allowed` log line: the connection,
/// the side, and what it names.
#[derive(Debug)]
pub struct Logged {
    src: IpAddr,
    dst: SocketAddr,
    protocol: String,
    direction: String,
    policies: BTreeSet<String>,
    rules: Vec<String>,
}

/// A deny event's line.
pub type Denied = Logged;
/// An allowed-connection record's line.
pub type Allowed = Logged;

/// The lines of `target` logged from byte `from` on.
fn logged(log: &Path, from: u64, target: &str) -> Result<Vec<Logged>> {
    Ok(log_lines(log, from, target)?
        .into_iter()
        .map(|(f, src, dst)| Logged {
            src: src.ip(),
            dst,
            protocol: f["protocol"].as_str().unwrap_or_default().to_lowercase(),
            direction: f["direction"].as_str().unwrap_or_default().to_owned(),
            policies: list(&f, "policies").into_iter().collect(),
            rules: list(&f, "rules"),
        })
        .collect())
}

/// The denials logged from byte `from` on.
pub fn denied(log: &Path, from: u64) -> Result<Vec<Denied>> {
    logged(log, from, "netpol::denied")
}

/// The allowed-connection records logged from byte `from` on.
pub fn allowed(log: &Path, from: u64) -> Result<Vec<Allowed>> {
    logged(log, from, "netpol::allowed")
}

/// Whether `selector` (a LabelSelector) selects `labels`.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    if let Some(m) = selector.get("matchLabels").and_then(Value::as_mapping) {
        for (k, v) in m {
            if labels
                .get(k.as_str().unwrap_or_default())
                .map(String::as_str)
                != v.as_str()
            {
                return false;
            }
        }
    }
    for e in selector
        .get("matchExpressions")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = e["values"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let have = labels.get(key).map(String::as_str);
        let ok = match e["operator"].as_str().unwrap_or_default() {
            "In" => have.is_some_and(|h| values.contains(&h)),
            "NotIn" => have.is_none_or(|h| !values.contains(&h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// The NetworkPolicies of `objects` that isolate pod `ns/name` for
/// `direction` (`ingress` or `egress`), as `namespace/name`.
pub fn isolating(
    objects: &BTreeMap<ObjKey, Value>,
    pod: &str,
    direction: &str,
) -> BTreeSet<String> {
    let Some((ns, name)) = pod.split_once('/') else {
        return BTreeSet::new();
    };
    let Some(p) = objects.get(&("Pod".to_owned(), ns.to_owned(), name.to_owned())) else {
        return BTreeSet::new();
    };
    let labels = scenario::labels(p);
    objects
        .iter()
        .filter(|(k, _)| k.0 == "NetworkPolicy" && k.1 == ns)
        .filter(|(_, v)| selects(&v["spec"]["podSelector"], &labels))
        .filter(|(_, v)| {
            let spec = &v["spec"];
            match spec["policyTypes"].as_sequence() {
                Some(types) => types.iter().any(|t| {
                    t.as_str()
                        .is_some_and(|t| t.eq_ignore_ascii_case(direction))
                }),
                // Ingress always; Egress where egress rules are written.
                None => direction == "ingress" || !spec["egress"].is_null(),
            }
        })
        .map(|(k, _)| format!("{}/{}", k.1, k.2))
        .collect()
}

/// The connection an `explain` answer is about: source and destination
/// address, port, protocol (lowercase).
fn connection(answer: &serde_json::Value) -> Option<(IpAddr, IpAddr, u16, String)> {
    let address = |party: &str| answer[party]["address"].as_str()?.parse::<IpAddr>().ok();
    Some((
        address("src")?,
        address("dst")?,
        u16::try_from(answer["port"].as_u64()?).ok()?,
        answer["protocol"].as_str()?.to_lowercase(),
    ))
}

/// A `;`-separated list field of a log line.
fn list(fields: &serde_json::Value, key: &str) -> Vec<String> {
    fields[key]
        .as_str()
        .unwrap_or_default()
        .split(';')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Checks the denials of one denied cell: `answer` is its `explain`
/// answer, `objects` the scenario's state. `None`: not a cell this
/// checks (not dropped by policy on this node).
pub fn check(
    answer: &serde_json::Value,
    objects: &BTreeMap<ObjKey, Value>,
    events: &[Denied],
    tally: &mut Tally,
    lines: &mut Vec<String>,
    label: &str,
) {
    let side = ["egress", "ingress"]
        .into_iter()
        .find(|d| answer[d]["allowed"] == false);
    let Some(d) = side.filter(|d| answer[d]["reason"] == "drop_policy") else {
        return;
    };
    let j = &answer[d];
    let Some((src, dst, port, protocol)) = connection(answer) else {
        return;
    };
    let pod = j["of"].as_str().unwrap_or_default();
    let seen: Vec<&Denied> = events
        .iter()
        .filter(|e| {
            e.src == src
                && e.dst == SocketAddr::new(dst, port)
                && e.protocol == protocol
                && e.direction == d
        })
        .collect();
    let cnp = j["decision"]["stage"]
        .as_str()
        .is_some_and(|s| s == "admin" || s == "baseline");
    let want = isolating(objects, pod, d);
    let ok = !seen.is_empty()
        && seen.iter().all(|e| {
            if cnp {
                e.rules.len() == 1
            } else {
                e.rules.is_empty() && e.policies == want
            }
        });
    tally.count(ok, lines, || {
        format!(
            "{label}: the {d} deny events of {pod} ({}) do not name {}: {seen:?}",
            seen.len(),
            if cnp {
                "the ClusterNetworkPolicy rule that decided".to_owned()
            } else {
                format!("exactly the policies isolating it, {want:?}")
            }
        )
    });
}

/// Whether `ip` is in `cidr` (`a.b.c.d/n` or IPv6).
fn contains(cidr: &str, ip: IpAddr) -> bool {
    let Some((net, len)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else {
        return false;
    };
    let bits = |a: IpAddr| -> (u128, u32) {
        match a {
            IpAddr::V4(a) => (u128::from(u32::from(a)) << 96, 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    };
    let ((n, width), (a, w2)) = (bits(net), bits(ip));
    if width != w2 || len > width {
        return false;
    }
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    n & mask == a & mask
}

/// A pod of the scenario: (namespace, labels, object).
fn pod<'a>(
    objects: &'a BTreeMap<ObjKey, Value>,
    id: &str,
) -> Option<(&'a str, BTreeMap<String, String>, &'a Value)> {
    let (ns, name) = id.split_once('/')?;
    let (k, v) = objects.get_key_value(&("Pod".to_owned(), ns.to_owned(), name.to_owned()))?;
    Some((k.1.as_str(), scenario::labels(v), v))
}

/// A namespace's labels, with the one Kubernetes sets on every namespace.
fn namespace_labels(objects: &BTreeMap<ObjKey, Value>, ns: &str) -> BTreeMap<String, String> {
    let mut labels = objects
        .get(&("Namespace".to_owned(), String::new(), ns.to_owned()))
        .map(scenario::labels)
        .unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".to_owned(), ns.to_owned());
    labels
}

/// Whether a `from`/`to` entry of a NetworkPolicy in `policy_ns` takes
/// the peer (`peer`: its pod id, if a pod; `ip`: its address).
fn peer_matches(
    objects: &BTreeMap<ObjKey, Value>,
    entry: &Value,
    policy_ns: &str,
    peer: Option<&str>,
    ip: IpAddr,
) -> bool {
    if let Some(block) = entry.get("ipBlock") {
        let except = block["except"].as_sequence().into_iter().flatten();
        return contains(block["cidr"].as_str().unwrap_or_default(), ip)
            && !except
                .filter_map(Value::as_str)
                .any(|cidr| contains(cidr, ip));
    }
    let Some((ns, labels, _)) = peer.and_then(|p| pod(objects, p)) else {
        return false;
    };
    let ns_ok = match entry.get("namespaceSelector") {
        Some(sel) => selects(sel, &namespace_labels(objects, ns)),
        None => ns == policy_ns,
    };
    ns_ok
        && entry
            .get("podSelector")
            .is_none_or(|sel| selects(sel, &labels))
}

/// Whether a `ports` entry takes `protocol`/`port` (a named port is the
/// destination pod's).
fn port_matches(entry: &Value, protocol: &str, port: u16, dst: Option<&Value>) -> bool {
    if !entry["protocol"]
        .as_str()
        .unwrap_or("TCP")
        .eq_ignore_ascii_case(protocol)
    {
        return false;
    }
    match &entry["port"] {
        Value::Null => true,
        Value::Number(n) => {
            let first = n.as_u64().unwrap_or_default();
            let last = entry["endPort"].as_u64().unwrap_or(first);
            (first..=last).contains(&u64::from(port))
        }
        Value::String(name) => dst.is_some_and(|pod| {
            pod["spec"]["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|c| c["ports"].as_sequence().into_iter().flatten())
                .any(|p| {
                    p["name"].as_str() == Some(name.as_str())
                        && p["protocol"]
                            .as_str()
                            .unwrap_or("TCP")
                            .eq_ignore_ascii_case(protocol)
                        && p["containerPort"].as_u64() == Some(u64::from(port))
                })
        }),
        _ => false,
    }
}

/// Whether the NetworkPolicy rule the agent names `rule` (`ns/name:
/// spec.ingress[i]`) takes a connection `src` → `dst` on
/// `protocol`/`port`, by the scenario's objects: its peers (pod and
/// namespace selectors, ipBlock with except) and its ports (numbers,
/// ranges, named ports of the destination pod).
fn np_rule_matches(
    objects: &BTreeMap<ObjKey, Value>,
    rule: &str,
    src: (Option<&str>, IpAddr),
    dst: (Option<&str>, IpAddr),
    protocol: &str,
    port: u16,
) -> bool {
    let Some((policy, path)) = rule.split_once(": spec.") else {
        return false;
    };
    let Some((ns, name)) = policy.split_once('/') else {
        return false;
    };
    let Some((list, index)) = path
        .strip_suffix(']')
        .and_then(|p| p.split_once('['))
        .and_then(|(l, i)| Some((l, i.parse::<usize>().ok()?)))
    else {
        return false;
    };
    let Some(np) = objects.get(&("NetworkPolicy".to_owned(), ns.to_owned(), name.to_owned()))
    else {
        return false;
    };
    let Some(r) = np["spec"][list].as_sequence().and_then(|l| l.get(index)) else {
        return false;
    };
    let (peer, field) = if list == "ingress" {
        (src, "from")
    } else {
        (dst, "to")
    };
    let peers = r[field]
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let ports = r["ports"]
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let dst_pod = dst.0.and_then(|p| pod(objects, p)).map(|(_, _, v)| v);
    (peers.is_empty()
        || peers
            .iter()
            .any(|e| peer_matches(objects, e, ns, peer.0, peer.1)))
        && (ports.is_empty()
            || ports
                .iter()
                .any(|e| port_matches(e, protocol, port, dst_pod)))
}

/// What [`check_allowed`] found.
#[derive(Default)]
pub struct AllowedTally {
    /// Sides whose records name what the scenario says, or not.
    pub named: Tally,
    /// Sides a rule admitted without a record.
    pub unrecorded: usize,
}

/// Checks the allowed-connection records of one allowed cell probed pod
/// to pod: at each side a rule admitted (`pass_policy` in `answer`, its
/// `explain`), the records of that connection must exist, and name
/// - where NetworkPolicy decided: rules each of which takes the peer and
///   the port by the scenario's objects ([`np_rule_matches`]);
/// - where a ClusterNetworkPolicy decided: the one rule `explain` names;
/// - where one applies but no rule of any tier matched (the default
///   allows): no rule.
pub fn check_allowed(
    answer: &serde_json::Value,
    objects: &BTreeMap<ObjKey, Value>,
    records: &[Allowed],
    tally: &mut AllowedTally,
    lines: &mut Vec<String>,
    label: &str,
) {
    let Some((src, dst, port, protocol)) = connection(answer) else {
        return;
    };
    let src_pod = answer["src"]["pod"].as_str();
    let dst_pod = answer["dst"]["pod"].as_str();
    for d in ["egress", "ingress"] {
        let j = &answer[d];
        if j["allowed"] != true || j["reason"] != "pass_policy" {
            continue;
        }
        let seen: Vec<&Allowed> = records
            .iter()
            .filter(|e| {
                e.src == src
                    && e.dst == SocketAddr::new(dst, port)
                    && e.protocol == protocol
                    && e.direction == d
            })
            .collect();
        let stage = j["decision"]["stage"].as_str();
        let cnp = stage.is_some_and(|s| s == "admin" || s == "baseline");
        // A ClusterNetworkPolicy applies, no rule of any tier matched.
        let default = stage == Some("default");
        let decided = &j["decision"]["rules"][0];
        let cnp_rule = format!(
            "ClusterNetworkPolicy {} ({}): spec.{}[{}]",
            decided["policy"].as_str().unwrap_or_default(),
            decided["tier"].as_str().unwrap_or_default(),
            d,
            decided["index"].as_u64().unwrap_or_default()
        );
        if seen.is_empty() {
            // A probe whose 5-tuple a recent connection had is tracked,
            // not judged, and has no record: counted, not failed.
            tally.unrecorded += 1;
            continue;
        }
        let ok = seen.iter().all(|e| {
            if default {
                e.rules.is_empty()
            } else if cnp {
                e.rules == [cnp_rule.clone()]
            } else {
                !e.rules.is_empty()
                    && e.rules.iter().all(|r| {
                        np_rule_matches(objects, r, (src_pod, src), (dst_pod, dst), &protocol, port)
                    })
            }
        });
        tally.named.count(ok, lines, || {
            format!(
                "{label}: the {d} allowed-connection records ({}) do not name {}: {seen:?}",
                seen.len(),
                if default {
                    "no rule (no tier's rule matched: the default)".to_owned()
                } else if cnp {
                    format!("the ClusterNetworkPolicy rule that decided, {cnp_rule}")
                } else {
                    "rules that take the peer and the port".to_owned()
                }
            )
        });
    }
}
