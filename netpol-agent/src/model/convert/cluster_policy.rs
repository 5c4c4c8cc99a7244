//! `ClusterNetworkPolicy`, validated as the v0.2.0 CRD's schema and CEL
//! rules validate it (bounds, exactly one field per peer, subject,
//! protocol and port, no named port beside `networks`/`nodes` peers), and
//! `domainNames` refused: netpol does not evaluate it, and a rule that
//! silently matched more or less than written would be worse.

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;

use super::Errors;
use super::policy::selector;
use super::rules;
use crate::api;
use crate::model::{
    Action, ClusterNetworkPolicy, ClusterPeer, ClusterPort, ClusterRule, LabelSelector, ModelError,
    Protocol, Subject, Tier,
};

/// Rules per direction, peers per rule, `protocols` and `networks`
/// entries: the CRD's `maxItems`.
const MAX_ITEMS: usize = 25;
/// `name` of a rule: the CRD's `maxLength`.
const MAX_RULE_NAME: usize = 100;

fn items<T>(list: Option<&Vec<T>>, field: &str, min: usize, errs: &mut Errors) -> Vec<usize> {
    let n = list.map_or(0, Vec::len);
    if list.is_some() && n < min {
        errs.push(field, format!("must have at least {min} item"));
    }
    if n > MAX_ITEMS {
        errs.push(
            field,
            format!("must have at most {MAX_ITEMS} items, has {n}"),
        );
    }
    (0..n.min(MAX_ITEMS)).collect()
}

/// The fields set in a one-of object, by name.
fn set_fields(fields: &[(&'static str, bool)]) -> Vec<&'static str> {
    fields.iter().filter(|(_, s)| *s).map(|(n, _)| *n).collect()
}

/// Exactly one of `fields` is set (minProperties = maxProperties = 1).
fn exactly_one(fields: &[(&'static str, bool)], field: &str, errs: &mut Errors) -> bool {
    match set_fields(fields).as_slice() {
        [_] => true,
        [] => {
            let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
            errs.push(field, format!("must set one of {}", names.join(", ")));
            false
        }
        many => {
            errs.push(
                field,
                format!("must set exactly one field, has {}", many.join(", ")),
            );
            false
        }
    }
}

fn namespaced_pod(
    p: &api::NamespacedPod,
    field: &str,
    errs: &mut Errors,
) -> Option<(LabelSelector, LabelSelector)> {
    let ns = p
        .namespace_selector
        .as_ref()
        .map(|s| selector(s, &format!("{field}.namespaceSelector"), errs))
        .unwrap_or_default();
    let Some(pods) = p.pod_selector.as_ref() else {
        errs.push(format!("{field}.podSelector"), "required");
        return None;
    };
    let pods = selector(pods, &format!("{field}.podSelector"), errs);
    Some((ns, pods))
}

fn plain(sel: &meta::LabelSelector, field: &str, errs: &mut Errors) -> LabelSelector {
    selector(sel, field, errs)
}

fn action(a: Option<&str>, field: &str, errs: &mut Errors) -> Option<Action> {
    match a {
        Some("Accept") => Some(Action::Accept),
        Some("Deny") => Some(Action::Deny),
        Some("Pass") => Some(Action::Pass),
        None => {
            errs.push(field, "required");
            None
        }
        Some(other) => {
            errs.push(
                field,
                format!("unsupported action {other:?}: must be Accept, Deny or Pass"),
            );
            None
        }
    }
}

fn port_number(n: Option<i64>, field: &str, errs: &mut Errors) -> Option<u16> {
    match n {
        None => {
            errs.push(field, "required");
            None
        }
        Some(n) => match u16::try_from(n) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                errs.push(field, format!("must be 1-65535, is {n}"));
                None
            }
        },
    }
}

fn protocols(
    list: Option<&Vec<api::Protocol>>,
    field: &str,
    errs: &mut Errors,
) -> Option<Vec<ClusterPort>> {
    let list = list?;
    let mut out = Vec::new();
    for i in items(Some(list), field, 1, errs) {
        let p = &list[i];
        let f = format!("{field}[{i}]");
        let fields = [
            ("tcp", p.tcp.is_some()),
            ("udp", p.udp.is_some()),
            ("sctp", p.sctp.is_some()),
            ("destinationNamedPort", p.destination_named_port.is_some()),
        ];
        if !exactly_one(&fields, &f, errs) {
            continue;
        }
        if let Some(name) = &p.destination_named_port {
            if name.is_empty() {
                errs.push(format!("{f}.destinationNamedPort"), "must not be empty");
            } else {
                out.push(ClusterPort::Named(name.clone()));
            }
            continue;
        }
        let (proto, key, pp) = match (&p.tcp, &p.udp, &p.sctp) {
            (Some(pp), _, _) => (Protocol::Tcp, "tcp", pp),
            (_, Some(pp), _) => (Protocol::Udp, "udp", pp),
            (_, _, Some(pp)) => (Protocol::Sctp, "sctp", pp),
            _ => continue,
        };
        let f = format!("{f}.{key}");
        // minProperties 1: "any port" is written as the range 1-65535.
        let Some(port) = &pp.destination_port else {
            errs.push(format!("{f}.destinationPort"), "required");
            continue;
        };
        let f = format!("{f}.destinationPort");
        if !exactly_one(
            &[
                ("number", port.number.is_some()),
                ("range", port.range.is_some()),
            ],
            &f,
            errs,
        ) {
            continue;
        }
        if let Some(r) = &port.range {
            let first = port_number(r.start, &format!("{f}.range.start"), errs);
            let last = port_number(r.end, &format!("{f}.range.end"), errs);
            if let (Some(first), Some(last)) = (first, last) {
                if first < last {
                    out.push(ClusterPort::Ports {
                        protocol: proto,
                        first,
                        last,
                    });
                } else {
                    errs.push(
                        format!("{f}.range"),
                        "Start port must be less than End port",
                    );
                }
            }
        } else if let Some(n) = port_number(port.number, &format!("{f}.number"), errs) {
            out.push(ClusterPort::Ports {
                protocol: proto,
                first: n,
                last: n,
            });
        }
    }
    Some(out)
}

fn networks(list: &[String], field: &str, errs: &mut Errors) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = Vec::new();
    for (i, s) in list.iter().enumerate().take(MAX_ITEMS) {
        let f = format!("{field}[{i}]");
        if s.len() > 43 {
            errs.push(&f, "must be at most 43 characters");
            continue;
        }
        match s.parse::<IpNet>() {
            Ok(n) => {
                let n = n.trunc();
                // listType=set: the API server refuses a repeated value.
                if list[..i].iter().any(|o| o == s) {
                    errs.push(&f, format!("duplicate value {s:?}"));
                } else if !out.contains(&n) {
                    out.push(n);
                }
            }
            Err(_) => errs.push(&f, format!("Invalid CIDR format provided: {s:?}")),
        }
    }
    out
}

fn ingress_peer(p: &api::IngressPeer, field: &str, errs: &mut Errors) -> Option<ClusterPeer> {
    let fields = [
        ("namespaces", p.namespaces.is_some()),
        ("pods", p.pods.is_some()),
    ];
    if !exactly_one(&fields, field, errs) {
        return None;
    }
    if let Some(ns) = &p.namespaces {
        return Some(ClusterPeer::Namespaces(plain(
            ns,
            &format!("{field}.namespaces"),
            errs,
        )));
    }
    let (namespace_selector, pod_selector) =
        namespaced_pod(p.pods.as_ref()?, &format!("{field}.pods"), errs)?;
    Some(ClusterPeer::Pods {
        namespace_selector,
        pod_selector,
    })
}

fn egress_peer(p: &api::EgressPeer, field: &str, errs: &mut Errors) -> Option<ClusterPeer> {
    let fields = [
        ("namespaces", p.namespaces.is_some()),
        ("pods", p.pods.is_some()),
        ("nodes", p.nodes.is_some()),
        ("networks", p.networks.is_some()),
        ("domainNames", p.domain_names.is_some()),
    ];
    if !exactly_one(&fields, field, errs) {
        return None;
    }
    if p.domain_names.is_some() {
        errs.push(
            format!("{field}.domainNames"),
            "not supported by netpol: the policy is not enforced until the peer is removed",
        );
        return None;
    }
    if let Some(ns) = &p.namespaces {
        return Some(ClusterPeer::Namespaces(plain(
            ns,
            &format!("{field}.namespaces"),
            errs,
        )));
    }
    if let Some(nodes) = &p.nodes {
        return Some(ClusterPeer::Nodes(plain(
            nodes,
            &format!("{field}.nodes"),
            errs,
        )));
    }
    if let Some(list) = &p.networks {
        let f = format!("{field}.networks");
        items(Some(list), &f, 1, errs);
        return Some(ClusterPeer::Networks(networks(list, &f, errs)));
    }
    let (namespace_selector, pod_selector) =
        namespaced_pod(p.pods.as_ref()?, &format!("{field}.pods"), errs)?;
    Some(ClusterPeer::Pods {
        namespace_selector,
        pod_selector,
    })
}

fn rule_name(name: Option<&String>, field: &str, errs: &mut Errors) -> String {
    let name = name.cloned().unwrap_or_default();
    if name.chars().count() > MAX_RULE_NAME {
        errs.push(
            format!("{field}.name"),
            format!("must be at most {MAX_RULE_NAME} characters"),
        );
    }
    name
}

/// The fields ingress and egress rules share.
struct RuleParts<'a> {
    name: Option<&'a String>,
    action: Option<&'a str>,
    protocols: Option<&'a Vec<api::Protocol>>,
}

/// One rule at `field`: its peers (`from`/`to`, at `peer_field`) by
/// `peer`, then the fields both directions share.
fn rule<P>(
    parts: &RuleParts<'_>,
    list: Option<&Vec<P>>,
    field: &str,
    peer_field: &str,
    peer: fn(&P, &str, &mut Errors) -> Option<ClusterPeer>,
    errs: &mut Errors,
) -> Option<ClusterRule> {
    let name = rule_name(parts.name, field, errs);
    let action = action(parts.action, &format!("{field}.action"), errs);
    let Some(list) = list else {
        errs.push(format!("{field}.{peer_field}"), "required");
        return None;
    };
    let mut peers = Vec::new();
    for j in items(Some(list), &format!("{field}.{peer_field}"), 1, errs) {
        if let Some(p) = peer(&list[j], &format!("{field}.{peer_field}[{j}]"), errs) {
            peers.push(p);
        }
    }
    let ports = protocols(parts.protocols, &format!("{field}.protocols"), errs);
    Some(ClusterRule {
        name,
        action: action?,
        peers,
        ports,
    })
}

impl TryFrom<&api::ClusterNetworkPolicy> for ClusterNetworkPolicy {
    type Error = (String, Vec<ModelError>);

    fn try_from(cnp: &api::ClusterNetworkPolicy) -> Result<Self, Self::Error> {
        let name = cnp.metadata.name.clone().unwrap_or_default();
        let mut errs = Errors::new("ClusterNetworkPolicy", name.clone());
        super::object_meta(&cnp.metadata, rules::dns_subdomain, false, &mut errs);
        let staging = super::staging(&cnp.metadata, &mut errs);
        if cnp
            .metadata
            .namespace
            .as_deref()
            .is_some_and(|n| !n.is_empty())
        {
            errs.push(
                "metadata.namespace",
                "must be empty: ClusterNetworkPolicy is cluster-scoped",
            );
        }
        let Some(spec) = &cnp.spec else {
            errs.push("spec", "required");
            return Err((name, errs.list));
        };
        let tier = match spec.tier.as_deref() {
            Some("Admin") => Some(Tier::Admin),
            Some("Baseline") => Some(Tier::Baseline),
            None => {
                errs.push("spec.tier", "required");
                None
            }
            Some(other) => {
                errs.push(
                    "spec.tier",
                    format!("unsupported tier {other:?}: must be Admin or Baseline"),
                );
                None
            }
        };
        let priority = match spec.priority {
            None => {
                errs.push("spec.priority", "required");
                None
            }
            Some(p) => match u16::try_from(p) {
                Ok(p) if p <= 1000 => Some(p),
                _ => {
                    errs.push("spec.priority", format!("must be 0-1000, is {p}"));
                    None
                }
            },
        };
        let subject = match &spec.subject {
            None => {
                errs.push("spec.subject", "required");
                None
            }
            Some(s) => {
                let fields = [
                    ("namespaces", s.namespaces.is_some()),
                    ("pods", s.pods.is_some()),
                ];
                if !exactly_one(&fields, "spec.subject", &mut errs) {
                    None
                } else if let Some(ns) = &s.namespaces {
                    Some(Subject::Namespaces(plain(
                        ns,
                        "spec.subject.namespaces",
                        &mut errs,
                    )))
                } else {
                    s.pods
                        .as_ref()
                        .and_then(|p| namespaced_pod(p, "spec.subject.pods", &mut errs))
                        .map(|(namespace_selector, pod_selector)| Subject::Pods {
                            namespace_selector,
                            pod_selector,
                        })
                }
            }
        };
        let mut ingress = Vec::new();
        let list = spec.ingress.as_deref().unwrap_or_default();
        for i in items(spec.ingress.as_ref(), "spec.ingress", 0, &mut errs) {
            let r = &list[i];
            let f = format!("spec.ingress[{i}]");
            let parts = RuleParts {
                name: r.name.as_ref(),
                action: r.action.as_deref(),
                protocols: r.protocols.as_ref(),
            };
            ingress.extend(rule(
                &parts,
                r.from.as_ref(),
                &f,
                "from",
                ingress_peer,
                &mut errs,
            ));
        }
        let mut egress = Vec::new();
        let list = spec.egress.as_deref().unwrap_or_default();
        for i in items(spec.egress.as_ref(), "spec.egress", 0, &mut errs) {
            let r = &list[i];
            let f = format!("spec.egress[{i}]");
            let parts = RuleParts {
                name: r.name.as_ref(),
                action: r.action.as_deref(),
                protocols: r.protocols.as_ref(),
            };
            let named = r
                .protocols
                .iter()
                .flatten()
                .any(|p| p.destination_named_port.is_some());
            let addressed =
                r.to.iter()
                    .flatten()
                    .any(|p| p.networks.is_some() || p.nodes.is_some() || p.domain_names.is_some());
            if named && addressed {
                errs.push(
                    f.clone(),
                    "networks/nodes/domainNames peer cannot be set with namedPorts since \
                     there are no namedPorts for networks/nodes/domainNames",
                );
            }
            egress.extend(rule(
                &parts,
                r.to.as_ref(),
                &f,
                "to",
                egress_peer,
                &mut errs,
            ));
        }
        match (tier, priority, subject) {
            (Some(tier), Some(priority), Some(subject)) if errs.list.is_empty() => {
                Ok(ClusterNetworkPolicy {
                    name,
                    tier,
                    priority,
                    subject,
                    ingress,
                    egress,
                    staging,
                })
            }
            _ => Err((name, errs.list)),
        }
    }
}
