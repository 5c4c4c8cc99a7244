//! Deny-event attribution against the scenario (part of `--staged`
//! runs, whose agent logs every denial as a JSON line): for every cell
//! probed pod to pod that policy denies, the agent's `netpol::denied`
//! events of that connection, at the side that dropped it, must name
//! - where NetworkPolicy decided: exactly the policies that isolate the
//!   pod in that direction, computed here from the scenario's objects
//!   (pod selector, namespace, policy types), and no rule;
//! - where a ClusterNetworkPolicy decided (`explain` says which): the one
//!   rule that decided.
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

/// One `netpol::denied` log line.
#[derive(Debug)]
pub struct Denied {
    src: IpAddr,
    dst: SocketAddr,
    protocol: String,
    direction: String,
    policies: BTreeSet<String>,
    rules: Vec<String>,
}

/// The denials logged from byte `from` on.
pub fn denied(log: &Path, from: u64) -> Result<Vec<Denied>> {
    Ok(log_lines(log, from, "netpol::denied")?
        .into_iter()
        .map(|(f, src, dst)| {
            let list = |k: &str| -> Vec<String> {
                f[k].as_str()
                    .unwrap_or_default()
                    .split(';')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            };
            Denied {
                src: src.ip(),
                dst,
                protocol: f["protocol"].as_str().unwrap_or_default().to_lowercase(),
                direction: f["direction"].as_str().unwrap_or_default().to_owned(),
                policies: list("policies").into_iter().collect(),
                rules: list("rules"),
            }
        })
        .collect())
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
    let (Some(src), Some(dst), Some(port)) = (
        answer["src"]["address"]
            .as_str()
            .and_then(|a| a.parse::<IpAddr>().ok()),
        answer["dst"]["address"]
            .as_str()
            .and_then(|a| a.parse::<IpAddr>().ok()),
        answer["port"].as_u64().and_then(|p| u16::try_from(p).ok()),
    ) else {
        return;
    };
    let protocol = answer["protocol"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
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
