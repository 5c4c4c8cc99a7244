//! `NetworkPolicies`: selectors, peers, ports and rules, validated as the
//! API server validates them.

use std::collections::BTreeSet;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Errors, is_port_name, labels, object_meta, object_ref, protocol, rules};
use crate::model::{
    LabelSelector, ModelError, NetworkPolicy, ObjectRef, Operator, Peer, PolicyPort, PortSpec,
    Requirement, Rule,
};

pub(super) fn selector(sel: &meta::LabelSelector, field: &str, errs: &mut Errors) -> LabelSelector {
    labels(
        sel.match_labels.as_ref(),
        &format!("{field}.matchLabels"),
        errs,
    );
    let mut out = LabelSelector {
        match_labels: sel.match_labels.clone().unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    for (i, req) in sel
        .match_expressions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let f = format!("{field}.matchExpressions[{i}]");
        let values: BTreeSet<String> = req.values.clone().unwrap_or_default().into_iter().collect();
        let operator = match req.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                errs.push(format!("{f}.values"), "must be non-empty for In and NotIn");
                continue;
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                errs.push(
                    format!("{f}.values"),
                    "must be empty for Exists and DoesNotExist",
                );
                continue;
            }
            "In" => Operator::In(values),
            "NotIn" => Operator::NotIn(values),
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                errs.push(
                    format!("{f}.operator"),
                    format!("unsupported operator {other:?}"),
                );
                continue;
            }
        };
        if req.key.is_empty() {
            errs.push(format!("{f}.key"), "required");
            continue;
        }
        if let Some(why) = rules::qualified_name(&req.key) {
            errs.push(format!("{f}.key"), why);
        }
        for (j, v) in req.values.as_deref().unwrap_or_default().iter().enumerate() {
            if let Some(why) = rules::label_value(v) {
                errs.push(format!("{f}.values[{j}]"), why);
            }
        }
        out.match_expressions.push(Requirement {
            key: req.key.clone(),
            operator,
        });
    }
    out
}

fn parse_cidr(s: &str, field: &str, errs: &mut Errors) -> Option<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        Some(n.trunc())
    } else {
        errs.push(field, format!("invalid CIDR {s:?}"));
        None
    }
}

fn peer(p: &net::NetworkPolicyPeer, field: &str, errs: &mut Errors) -> Option<Peer> {
    if let Some(block) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            errs.push(
                field.to_owned(),
                "ipBlock may not be combined with podSelector or namespaceSelector",
            );
            return None;
        }
        let cidr = parse_cidr(&block.cidr, &format!("{field}.ipBlock.cidr"), errs)?;
        let mut except = Vec::new();
        for (i, e) in block
            .except
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let f = format!("{field}.ipBlock.except[{i}]");
            let Some(e) = parse_cidr(e, &f, errs) else {
                continue;
            };
            let same_family = matches!(
                (cidr, e),
                (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
            );
            if !same_family {
                errs.push(f, "not of the family of cidr");
            } else if !cidr.contains(&e) || e.prefix_len() <= cidr.prefix_len() {
                errs.push(f, "must be a strict subset of cidr");
            } else if !except.contains(&e) {
                except.push(e);
            }
        }
        return Some(Peer::IpBlock { cidr, except });
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        errs.push(field.to_owned(), "must specify a peer");
        return None;
    }
    Some(Peer::Pods {
        pod_selector: p
            .pod_selector
            .as_ref()
            .map(|s| selector(s, &format!("{field}.podSelector"), errs)),
        namespace_selector: p
            .namespace_selector
            .as_ref()
            .map(|s| selector(s, &format!("{field}.namespaceSelector"), errs)),
    })
}

fn port(p: &net::NetworkPolicyPort, field: &str, errs: &mut Errors) -> Option<PolicyPort> {
    let proto = protocol(p.protocol.as_deref(), &format!("{field}.protocol"), errs);
    let spec = match (&p.port, p.end_port) {
        (None, None) => PortSpec::All,
        (None, Some(_)) => {
            errs.push(format!("{field}.endPort"), "requires a numeric port");
            return None;
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                errs.push(
                    format!("{field}.endPort"),
                    "may not be used with a named port",
                );
                return None;
            }
            if !is_port_name(name) {
                errs.push(
                    format!("{field}.port"),
                    format!("invalid port name {name:?}"),
                );
                return None;
            }
            PortSpec::Named(name.clone())
        }
        (Some(IntOrString::Int(n)), end) => {
            let Some(first) = u16::try_from(*n).ok().filter(|&n| n > 0) else {
                errs.push(format!("{field}.port"), "must be 1-65535");
                return None;
            };
            let last = match end {
                None => first,
                Some(e) if e < i32::from(first) => {
                    errs.push(format!("{field}.endPort"), "less than port");
                    return None;
                }
                Some(e) => {
                    let Ok(e) = u16::try_from(e) else {
                        errs.push(format!("{field}.endPort"), "must be at most 65535");
                        return None;
                    };
                    e
                }
            };
            PortSpec::Range { first, last }
        }
    };
    Some(PolicyPort {
        protocol: proto,
        port: spec,
    })
}

fn rules<'a>(
    list: impl Iterator<
        Item = (
            Option<&'a Vec<net::NetworkPolicyPeer>>,
            Option<&'a Vec<net::NetworkPolicyPort>>,
        ),
    >,
    field: &str,
    peer_field: &str,
    errs: &mut Errors,
) -> Vec<Rule> {
    let mut out = Vec::new();
    for (i, (peers, ports)) in list.enumerate() {
        let f = format!("spec.{field}[{i}]");
        let peers = peers
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(j, p)| peer(p, &format!("{f}.{peer_field}[{j}]"), errs))
            .collect();
        let ports = ports
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .enumerate()
            .filter_map(|(j, p)| port(p, &format!("{f}.ports[{j}]"), errs))
            .collect();
        out.push(Rule { peers, ports });
    }
    out
}

impl TryFrom<&net::NetworkPolicy> for NetworkPolicy {
    type Error = (ObjectRef, Vec<ModelError>);

    fn try_from(np: &net::NetworkPolicy) -> Result<Self, Self::Error> {
        let id = object_ref(&np.metadata);
        let mut errs = Errors::new("NetworkPolicy", id.to_string());
        object_meta(&np.metadata, rules::dns_subdomain, true, &mut errs);
        let staging = super::staging(&np.metadata, &mut errs);
        let default_spec = net::NetworkPolicySpec::default();
        let spec = np.spec.as_ref().unwrap_or(&default_spec);
        let pod_selector = spec
            .pod_selector
            .as_ref()
            .map(|s| selector(s, "spec.podSelector", &mut errs))
            .unwrap_or_default();
        let ingress_rules = rules(
            spec.ingress
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|r| (r.from.as_ref(), r.ports.as_ref())),
            "ingress",
            "from",
            &mut errs,
        );
        let egress_rules = rules(
            spec.egress
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|r| (r.to.as_ref(), r.ports.as_ref())),
            "egress",
            "to",
            &mut errs,
        );
        let (mut has_ingress, mut has_egress) = (false, false);
        match spec.policy_types.as_deref() {
            None | Some([]) => {
                // The API server's default: Ingress always, Egress iff there
                // is an egress rule.
                has_ingress = true;
                has_egress = !egress_rules.is_empty();
            }
            Some(types) => {
                if types.len() > 2 {
                    errs.push(
                        "spec.policyTypes",
                        "may not specify more than two policyTypes",
                    );
                }
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => has_ingress = true,
                        "Egress" => has_egress = true,
                        other => errs.push(
                            format!("spec.policyTypes[{i}]"),
                            format!("unsupported policy type {other:?}"),
                        ),
                    }
                }
            }
        }
        if !errs.list.is_empty() {
            return Err((id, errs.list));
        }
        Ok(NetworkPolicy {
            id,
            pod_selector,
            ingress: has_ingress.then_some(ingress_rules),
            egress: has_egress.then_some(egress_rules),
            staging,
        })
    }
}
