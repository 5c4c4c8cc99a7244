//! Conversion from k8s-openapi objects, with the API server's defaulting and
//! validation (manifests read from files get neither).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    ContainerPort, LabelSelector, Labels, ModelError, NAMESPACE_NAME_LABEL, Namespace,
    NetworkPolicy, Node, ObjectRef, Operator, Peer, Pod, PodPhase, PolicyPort, PortSpec, Protocol,
    Requirement, Rule, Service, ServicePort,
};

/// Collects the errors of one object.
struct Errors {
    kind: &'static str,
    object: String,
    list: Vec<ModelError>,
}

impl Errors {
    fn new(kind: &'static str, object: String) -> Self {
        Self {
            kind,
            object,
            list: Vec::new(),
        }
    }

    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(ModelError {
            kind: self.kind.to_owned(),
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        });
    }
}

fn object_ref(meta: &meta::ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        meta.name.clone().unwrap_or_default(),
    )
}

fn protocol(value: Option<&str>, field: &str, errs: &mut Errors) -> Protocol {
    match value {
        None => Protocol::Tcp,
        Some(s) => Protocol::parse(s).unwrap_or_else(|| {
            errs.push(
                field,
                format!("unsupported protocol {s:?}: must be TCP, UDP or SCTP"),
            );
            Protocol::Tcp
        }),
    }
}

/// Whether `s` is an IANA service name, the only form a named port may take.
fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

/// The API server's rules for names and labels (apimachinery's
/// `validation` package), each giving what is wrong, if anything.
mod rules {
    fn alnum(b: u8) -> bool {
        b.is_ascii_lowercase() || b.is_ascii_digit()
    }

    /// RFC 1123 label: namespaces, metadata.namespace.
    pub(super) fn dns_label(s: &str) -> Option<String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| alnum(b) || b == b'-')
            && s.bytes().next().is_some_and(alnum)
            && s.bytes().last().is_some_and(alnum);
        (!ok).then(|| {
            "must be a lowercase RFC 1123 label (at most 63 of a-z, 0-9 and '-', starting and \
             ending with a-z or 0-9)"
                .to_owned()
        })
    }

    /// RFC 1035 label: Services (a letter first).
    pub(super) fn dns1035_label(s: &str) -> Option<String> {
        dns_label(s).or_else(|| {
            (!s.bytes().next().is_some_and(|b| b.is_ascii_lowercase()))
                .then(|| "must be an RFC 1035 label (starting with a-z)".to_owned())
        })
    }

    /// RFC 1123 subdomain: pods, policies, nodes, label key prefixes.
    pub(super) fn dns_subdomain(s: &str) -> Option<String> {
        let ok =
            !s.is_empty() && s.len() <= 253 && s.split('.').all(|part| dns_label(part).is_none());
        (!ok).then(|| {
            "must be a lowercase RFC 1123 subdomain (dot-separated labels of a-z, 0-9 and '-', \
             at most 253 characters)"
                .to_owned()
        })
    }

    /// At most 63 of A-Z, a-z, 0-9, '-', '_', '.', starting and ending
    /// with an alphanumeric (empty allowed where `empty_ok`).
    fn name_part(s: &str, empty_ok: bool) -> bool {
        if s.is_empty() {
            return empty_ok;
        }
        s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    }

    /// A label key: `[prefix/]name`.
    pub(super) fn qualified_name(s: &str) -> Option<String> {
        let (prefix, name) = match s.split_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, s),
        };
        if let Some(p) = prefix
            && let Some(why) = dns_subdomain(p)
        {
            return Some(format!("invalid label key {s:?}: its prefix {why}"));
        }
        (!name_part(name, false)).then(|| {
            format!(
                "invalid label key {s:?}: the name must be at most 63 of A-Z, a-z, 0-9, '-', \
                 '_' and '.', starting and ending with an alphanumeric, after an optional \
                 DNS subdomain prefix and '/'"
            )
        })
    }

    /// A label value (also a selector's value).
    pub(super) fn label_value(s: &str) -> Option<String> {
        (!name_part(s, true)).then(|| {
            format!(
                "invalid label value {s:?}: at most 63 of A-Z, a-z, 0-9, '-', '_' and '.', \
                 starting and ending with an alphanumeric, or empty"
            )
        })
    }
}

/// Labels as the API server validates them: keys qualified names, values
/// label values.
fn labels(map: Option<&Labels>, field: &str, errs: &mut Errors) {
    for (k, v) in map.into_iter().flatten() {
        if let Some(why) = rules::qualified_name(k) {
            errs.push(field, why);
        }
        if let Some(why) = rules::label_value(v) {
            errs.push(format!("{field}[{k}]"), why);
        }
    }
}

/// metadata.name (by `rule`), metadata.namespace where `namespaced`, and
/// metadata.labels.
fn object_meta(
    m: &meta::ObjectMeta,
    rule: fn(&str) -> Option<String>,
    namespaced: bool,
    errs: &mut Errors,
) {
    match m.name.as_deref() {
        None | Some("") => errs.push("metadata.name", "required"),
        Some(n) => {
            if let Some(why) = rule(n) {
                errs.push("metadata.name", why);
            }
        }
    }
    if namespaced
        && let Some(ns) = m.namespace.as_deref()
        && let Some(why) = rules::dns_label(ns)
    {
        errs.push("metadata.namespace", why);
    }
    labels(m.labels.as_ref(), "metadata.labels", errs);
}

impl TryFrom<&core::Pod> for Pod {
    type Error = Vec<ModelError>;

    fn try_from(pod: &core::Pod) -> Result<Self, Self::Error> {
        let id = object_ref(&pod.metadata);
        let mut errs = Errors::new("Pod", id.to_string());
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = Vec::new();
        let mut add_ip = |s: &str, field: String, errs: &mut Errors| match s.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => errs.push(field, format!("invalid IP address {s:?}")),
        };
        if let Some(list) = status.and_then(|s| s.pod_ips.as_ref()) {
            for (i, p) in list.iter().enumerate() {
                add_ip(&p.ip, format!("status.podIPs[{i}].ip"), &mut errs);
            }
        }
        if let Some(ip) = status.and_then(|s| s.pod_ip.as_deref()) {
            add_ip(ip, "status.podIP".to_owned(), &mut errs);
        }
        let mut ports = Vec::new();
        for (ci, c) in spec
            .map(|s| s.containers.as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            for (pi, p) in c.ports.as_deref().unwrap_or_default().iter().enumerate() {
                let field = format!("spec.containers[{ci}].ports[{pi}]");
                let proto = protocol(
                    p.protocol.as_deref(),
                    &format!("{field}.protocol"),
                    &mut errs,
                );
                match u16::try_from(p.container_port) {
                    Ok(n) if n > 0 => ports.push(ContainerPort {
                        name: p.name.clone(),
                        port: n,
                        protocol: proto,
                    }),
                    _ => errs.push(format!("{field}.containerPort"), "must be 1-65535"),
                }
            }
        }
        let phase = match status.and_then(|s| s.phase.as_deref()) {
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            Some("Unknown") => PodPhase::Unknown,
            _ => PodPhase::Pending,
        };
        object_meta(&pod.metadata, rules::dns_subdomain, true, &mut errs);
        if !errs.list.is_empty() {
            return Err(errs.list);
        }
        Ok(Pod {
            id,
            uid: pod.metadata.uid.clone(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            node_name: spec.and_then(|s| s.node_name.clone()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            phase,
            ips,
            ports,
            allow_any_source: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(super::ALLOW_ANY_SOURCE_ANNOTATION))
                .is_some_and(|v| v == "true"),
        })
    }
}

impl TryFrom<&core::Namespace> for Namespace {
    type Error = Vec<ModelError>;

    fn try_from(ns: &core::Namespace) -> Result<Self, Self::Error> {
        let name = ns.metadata.name.clone().unwrap_or_default();
        let mut errs = Errors::new("Namespace", name.clone());
        object_meta(&ns.metadata, rules::dns_label, false, &mut errs);
        if !errs.list.is_empty() {
            return Err(errs.list);
        }
        let mut labels: Labels = ns.metadata.labels.clone().unwrap_or_default();
        labels
            .entry(NAMESPACE_NAME_LABEL.to_owned())
            .or_insert_with(|| name.clone());
        Ok(Namespace { name, labels })
    }
}

impl TryFrom<&core::Node> for Node {
    type Error = Vec<ModelError>;

    fn try_from(node: &core::Node) -> Result<Self, Self::Error> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut errs = Errors::new("Node", name.clone());
        object_meta(&node.metadata, rules::dns_subdomain, false, &mut errs);
        if !errs.list.is_empty() {
            return Err(errs.list);
        }
        let mut addresses = Vec::new();
        for a in node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_deref())
            .unwrap_or_default()
        {
            // Hostname entries are names, not addresses.
            if let Ok(ip) = a.address.parse::<IpAddr>()
                && !addresses.contains(&ip)
            {
                addresses.push(ip);
            }
        }
        Ok(Node { name, addresses })
    }
}

/// Parses `s` into `list` unless it is there already.
fn push_ip(list: &mut Vec<IpAddr>, s: &str, field: String, errs: &mut Errors) {
    match s.parse::<IpAddr>() {
        Ok(ip) if !list.contains(&ip) => list.push(ip),
        Ok(_) => {}
        Err(_) => errs.push(field, format!("invalid IP address {s:?}")),
    }
}

impl TryFrom<&core::Service> for Service {
    type Error = Vec<ModelError>;

    fn try_from(svc: &core::Service) -> Result<Self, Self::Error> {
        let id = object_ref(&svc.metadata);
        let mut errs = Errors::new("Service", id.to_string());
        object_meta(&svc.metadata, rules::dns1035_label, true, &mut errs);
        let default_spec = core::ServiceSpec::default();
        let spec = svc.spec.as_ref().unwrap_or(&default_spec);
        let mut ports = Vec::new();
        for (i, p) in spec.ports.as_deref().unwrap_or_default().iter().enumerate() {
            let field = format!("spec.ports[{i}]");
            let protocol = protocol(
                p.protocol.as_deref(),
                &format!("{field}.protocol"),
                &mut errs,
            );
            let Some(port) = u16::try_from(p.port).ok().filter(|&n| n > 0) else {
                errs.push(format!("{field}.port"), "must be 1-65535");
                continue;
            };
            let node_port = match p.node_port {
                None | Some(0) => None,
                Some(n) => match u16::try_from(n) {
                    Ok(n) => Some(n),
                    Err(_) => {
                        errs.push(format!("{field}.nodePort"), "must be 1-65535");
                        continue;
                    }
                },
            };
            ports.push(ServicePort {
                port,
                protocol,
                node_port,
            });
        }
        let mut cluster_ips = Vec::new();
        match (spec.cluster_ips.as_deref(), spec.cluster_ip.as_deref()) {
            (Some(list), _) if !list.is_empty() => {
                for (i, ip) in list.iter().enumerate() {
                    if ip != "None" && !ip.is_empty() {
                        push_ip(
                            &mut cluster_ips,
                            ip,
                            format!("spec.clusterIPs[{i}]"),
                            &mut errs,
                        );
                    }
                }
            }
            (_, Some(ip)) if ip != "None" && !ip.is_empty() => {
                push_ip(&mut cluster_ips, ip, "spec.clusterIP".to_owned(), &mut errs);
            }
            _ => {}
        }
        let mut external_ips = Vec::new();
        for (i, ip) in spec
            .external_ips
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            push_ip(
                &mut external_ips,
                ip,
                format!("spec.externalIPs[{i}]"),
                &mut errs,
            );
        }
        let mut load_balancer_ips = Vec::new();
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default();
        for (i, ing) in ingress.iter().enumerate() {
            // A `Proxy` ingress point is reached through the load balancer,
            // which kube-proxy does not short-circuit.
            let vip = ing.ip_mode.as_deref().is_none_or(|m| m == "VIP");
            if let Some(ip) = ing.ip.as_deref().filter(|ip| !ip.is_empty() && vip) {
                push_ip(
                    &mut load_balancer_ips,
                    ip,
                    format!("status.loadBalancer.ingress[{i}].ip"),
                    &mut errs,
                );
            }
        }
        if !errs.list.is_empty() {
            return Err(errs.list);
        }
        let headless = spec.cluster_ip.as_deref() == Some("None")
            || spec
                .cluster_ips
                .as_deref()
                .is_some_and(|l| l.first().is_some_and(|ip| ip == "None"));
        if headless || spec.type_.as_deref() == Some("ExternalName") {
            // kube-proxy skips the Service: nothing to translate.
            return Ok(Service {
                id,
                cluster_ips: Vec::new(),
                external_ips: Vec::new(),
                load_balancer_ips: Vec::new(),
                ports: ports
                    .into_iter()
                    .map(|p| ServicePort {
                        node_port: None,
                        ..p
                    })
                    .collect(),
            });
        }
        Ok(Service {
            id,
            cluster_ips,
            external_ips,
            load_balancer_ips,
            ports,
        })
    }
}

fn selector(sel: &meta::LabelSelector, field: &str, errs: &mut Errors) -> LabelSelector {
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
    match s.parse::<IpNet>() {
        Ok(n) => Some(n.trunc()),
        Err(_) => {
            errs.push(field, format!("invalid CIDR {s:?}"));
            None
        }
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
                Some(e) => match u16::try_from(e) {
                    Ok(e) => e,
                    Err(_) => {
                        errs.push(format!("{field}.endPort"), "must be at most 65535");
                        return None;
                    }
                },
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
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn svc(json: serde_json::Value) -> core::Service {
        let mut v = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s", "namespace": "x"},
        });
        if let (Some(o), Some(extra)) = (v.as_object_mut(), json.as_object()) {
            o.extend(extra.clone());
        }
        serde_json::from_value(v).expect("a Service")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn service_keeps_every_frontend_with_tcp_by_default() {
        let s = Service::try_from(&svc(serde_json::json!({
            "spec": {"type": "LoadBalancer", "clusterIP": "10.43.0.1",
                     "clusterIPs": ["10.43.0.1", "fd00::1"], "externalIPs": ["192.0.2.1"],
                     "ports": [{"port": 80, "nodePort": 30080}, {"port": 53, "protocol": "UDP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"hostname": "lb"},
                                                     {"ip": "198.51.100.2", "ipMode": "Proxy"}]}}
        })))
        .expect("valid");
        assert_eq!(s.id, ObjectRef::new("x", "s"));
        assert_eq!(s.cluster_ips, vec![ip("10.43.0.1"), ip("fd00::1")]);
        assert_eq!(s.external_ips, vec![ip("192.0.2.1")]);
        assert_eq!(s.load_balancer_ips, vec![ip("198.51.100.1")]);
        assert_eq!(
            s.ports,
            vec![
                ServicePort {
                    port: 80,
                    protocol: Protocol::Tcp,
                    node_port: Some(30080)
                },
                ServicePort {
                    port: 53,
                    protocol: Protocol::Udp,
                    node_port: None
                },
            ]
        );
    }

    #[test]
    fn service_falls_back_to_the_single_cluster_ip() {
        let s = Service::try_from(&svc(serde_json::json!({
            "spec": {"clusterIP": "10.43.0.7", "ports": [{"port": 80}]}
        })))
        .expect("valid");
        assert_eq!(s.cluster_ips, vec![ip("10.43.0.7")]);
    }

    #[test]
    fn headless_and_external_name_services_have_no_frontends() {
        for spec in [
            serde_json::json!({"clusterIP": "None", "externalIPs": ["192.0.2.1"],
                               "ports": [{"port": 80, "nodePort": 30080}]}),
            serde_json::json!({"clusterIPs": ["None"], "ports": [{"port": 80}]}),
            serde_json::json!({"type": "ExternalName", "externalName": "example.com",
                               "clusterIP": "10.43.0.9", "ports": [{"port": 80, "nodePort": 30080}]}),
        ] {
            let s = Service::try_from(&svc(serde_json::json!({ "spec": spec }))).expect("valid");
            assert!(s.cluster_ips.is_empty(), "{s:?}");
            assert!(s.external_ips.is_empty(), "{s:?}");
            assert!(s.ports.iter().all(|p| p.node_port.is_none()), "{s:?}");
        }
    }

    #[test]
    fn invalid_service_fields_are_named() {
        let errs = Service::try_from(&svc(serde_json::json!({
            "spec": {"clusterIPs": ["10.43.0.300"], "externalIPs": ["nope"],
                     "ports": [{"port": 0}, {"port": 80, "protocol": "ICMP"},
                               {"port": 81, "nodePort": 70000}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "x"}]}}
        })))
        .expect_err("invalid");
        let fields: Vec<String> = errs.iter().map(|e| e.field.clone()).collect();
        assert_eq!(
            fields,
            [
                "spec.ports[0].port",
                "spec.ports[1].protocol",
                "spec.ports[2].nodePort",
                "spec.clusterIPs[0]",
                "spec.externalIPs[0]",
                "status.loadBalancer.ingress[0].ip",
            ]
        );
        assert!(
            errs.iter()
                .all(|e| e.kind == "Service" && e.object == "x/s")
        );
        assert_eq!(
            errs[3].to_string(),
            "x/s: spec.clusterIPs[0]: invalid IP address \"10.43.0.300\""
        );
    }
}
