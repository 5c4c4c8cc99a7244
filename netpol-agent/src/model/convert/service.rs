//! Services: every frontend address with its ports, as the API server
//! defaults them.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;

use super::{Errors, object_meta, object_ref, protocol, rules};
use crate::model::{ModelError, Service, ServicePort};

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
                Some(n) => {
                    let Ok(n) = u16::try_from(n) else {
                        errs.push(format!("{field}.nodePort"), "must be 1-65535");
                        continue;
                    };
                    Some(n)
                }
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
