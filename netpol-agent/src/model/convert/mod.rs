//! Conversion from k8s-openapi objects, with the API server's defaulting and
//! validation (manifests read from files get neither).

mod cluster_policy;
mod policy;
mod service;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;

use super::{
    ContainerPort, Labels, ModelError, NAMESPACE_NAME_LABEL, Namespace, Node, ObjectRef, Pod,
    PodPhase, Protocol,
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

/// A policy's [`Staging`](super::Staging) from its annotations: each
/// `"true"` or `"false"` exactly (a typo must not enforce what was meant
/// to be staged), and not both `"true"`.
fn staging(m: &meta::ObjectMeta, errs: &mut Errors) -> super::Staging {
    use super::{STAGED_ANNOTATION, STAGED_DELETE_ANNOTATION, Staging};
    let mut set = |key: &str| match m.annotations.as_ref().and_then(|a| a.get(key)) {
        None => false,
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        Some(v) => {
            errs.push(
                format!("metadata.annotations[{key}]"),
                format!("must be \"true\" or \"false\", is {v:?}"),
            );
            false
        }
    };
    match (set(STAGED_ANNOTATION), set(STAGED_DELETE_ANNOTATION)) {
        (false, false) => Staging::Enforced,
        (true, false) => Staging::Staged,
        (false, true) => Staging::StagedDelete,
        (true, true) => {
            errs.push(
                format!("metadata.annotations[{STAGED_DELETE_ANNOTATION}]"),
                format!(
                    "a policy cannot be both {STAGED_ANNOTATION} and {STAGED_DELETE_ANNOTATION}"
                ),
            );
            Staging::Enforced
        }
    }
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
        let labels = node.metadata.labels.clone().unwrap_or_default();
        Ok(Node {
            name,
            addresses,
            labels,
        })
    }
}
