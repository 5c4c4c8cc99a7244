//! Kubernetes objects in, model objects out: trimmed of what netpol never
//! reads (managed fields, most annotations, specs and statuses but for a
//! few fields; Pods arrive slim from `slim.rs`), then converted once, at
//! the edge.

use super::*;

/// A converted object.
#[derive(Debug)]
pub(super) enum Obj {
    Pod(ObjectRef, Result<Pod, Vec<ModelError>>),
    Namespace(String, Result<Namespace, Vec<ModelError>>),
    Node(String, Result<Node, Vec<ModelError>>),
    Policy(Result<NetworkPolicy, (ObjectRef, Vec<ModelError>)>),
    Service(ObjectRef, Result<Service, Vec<ModelError>>),
    ClusterPolicy(Result<ClusterNetworkPolicy, (String, Vec<ModelError>)>),
}

pub(super) fn pod_ref(meta: &ObjectMeta) -> ObjectRef {
    ObjectRef::new(
        meta.namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        meta.name.clone().unwrap_or_default(),
    )
}

pub(super) fn convert_pod(p: &super::SlimPod) -> Obj {
    Obj::Pod(pod_ref(&p.0.metadata), Pod::try_from(&p.0))
}

pub(super) fn convert_namespace(n: &core::Namespace) -> Obj {
    Obj::Namespace(n.name_any(), Namespace::try_from(n))
}

pub(super) fn convert_node(n: &core::Node) -> Obj {
    Obj::Node(n.name_any(), Node::try_from(n))
}

pub(super) fn convert_policy(p: &networking::NetworkPolicy) -> Obj {
    Obj::Policy(NetworkPolicy::try_from(p))
}

pub(super) fn convert_cluster_policy(p: &crate::api::ClusterNetworkPolicy) -> Obj {
    Obj::ClusterPolicy(ClusterNetworkPolicy::try_from(p))
}

pub(super) fn trim_cluster_policy(p: &mut crate::api::ClusterNetworkPolicy) {
    trim_meta(&mut p.metadata, false);
    p.status = None;
}

pub(super) fn convert_service(s: &core::Service) -> Obj {
    Obj::Service(pod_ref(&s.metadata), Service::try_from(s))
}

/// The metadata the stores keep: identity, labels, and the annotations
/// the model reads.
pub(super) fn trim_meta(meta: &mut ObjectMeta, keep_labels: bool) {
    let annotations = meta.annotations.take().and_then(|mut a| {
        let kept: BTreeMap<String, String> = [
            ALLOW_ANY_SOURCE_ANNOTATION,
            STAGED_ANNOTATION,
            STAGED_DELETE_ANNOTATION,
        ]
        .into_iter()
        .filter_map(|k| Some((k.to_owned(), a.remove(k)?)))
        .collect();
        (!kept.is_empty()).then_some(kept)
    });
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        labels: if keep_labels {
            meta.labels.take()
        } else {
            None
        },
        annotations,
        ..ObjectMeta::default()
    };
}

pub(super) fn trim_namespace(n: &mut core::Namespace) {
    trim_meta(&mut n.metadata, true);
    n.spec = None;
    n.status = None;
}

pub(super) fn trim_node(n: &mut core::Node) {
    trim_meta(&mut n.metadata, true);
    n.spec = None;
    n.status = n.status.take().map(|s| core::NodeStatus {
        addresses: s.addresses,
        ..core::NodeStatus::default()
    });
}

pub(super) fn trim_policy(p: &mut networking::NetworkPolicy) {
    trim_meta(&mut p.metadata, false);
}

/// A Service keeps its frontends: cluster, external and load-balancer IPs,
/// its type (`ExternalName` has none) and its ports.
pub(super) fn trim_service(s: &mut core::Service) {
    trim_meta(&mut s.metadata, false);
    s.spec = s.spec.take().map(|spec| core::ServiceSpec {
        type_: spec.type_,
        cluster_ip: spec.cluster_ip,
        cluster_ips: spec.cluster_ips,
        external_ips: spec.external_ips,
        ports: spec.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| core::ServicePort {
                    port: p.port,
                    protocol: p.protocol,
                    node_port: p.node_port,
                    ..core::ServicePort::default()
                })
                .collect()
        }),
        ..core::ServiceSpec::default()
    });
    s.status = s.status.take().map(|status| core::ServiceStatus {
        load_balancer: status.load_balancer.map(|lb| core::LoadBalancerStatus {
            ingress: lb.ingress.map(|list| {
                list.into_iter()
                    .map(|i| core::LoadBalancerIngress {
                        ip: i.ip,
                        ip_mode: i.ip_mode,
                        ..core::LoadBalancerIngress::default()
                    })
                    .collect()
            }),
        }),
        ..core::ServiceStatus::default()
    });
}
