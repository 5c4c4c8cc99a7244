use std::net::IpAddr;

use super::*;
use crate::model::{Service, ServicePort};

#[expect(
    clippy::needless_pass_by_value,
    reason = "callers pass `json!` literals"
)]
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

/// The policy of `spec` (a JSON object) through the manifests loader, as
/// the files source reads it: strict decode, then conversion.
fn cnp(name: &str, spec: &serde_json::Value) -> crate::model::Snapshot {
    let doc = serde_json::json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    });
    let mut s = crate::model::Snapshot::default();
    let mut report = crate::model::manifests::LoadReport::default();
    crate::model::manifests::apply_value(&mut s, doc, "t", &mut report);
    for e in report.errors {
        s.invalid
            .insert(("document".to_owned(), name.to_owned()), vec![e]);
    }
    s
}

#[test]
fn cluster_network_policy_converts_every_peer_and_protocol() {
    use crate::model::{Action, ClusterPeer, ClusterPort, Subject, Tier};
    let s = cnp(
        "guard",
        &serde_json::json!({
            "tier": "Admin", "priority": 7,
            "subject": {"pods": {"podSelector": {"matchLabels": {"app": "web"}}}},
            "ingress": [{"name": "mon", "action": "Accept",
                         "from": [{"namespaces": {"matchLabels": {"team": "mon"}}}],
                         "protocols": [{"tcp": {"destinationPort": {"number": 9090}}},
                                       {"destinationNamedPort": "metrics"}]}],
            "egress": [{"action": "Deny",
                        "to": [{"networks": ["169.254.169.254/32", "10.1.2.3/8"]},
                               {"nodes": {}}],
                        "protocols": [{"udp": {"destinationPort": {"range": {"start": 1, "end": 1024}}}}]},
                       {"action": "Pass", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {}}}]}]
        }),
    );
    assert!(s.errors().is_empty(), "{:?}", s.errors());
    let p = s.cluster_policies["guard"]
        .in_force
        .as_ref()
        .expect("in force");
    assert_eq!((p.tier, p.priority), (Tier::Admin, 7));
    assert!(
        matches!(&p.subject, Subject::Pods { namespace_selector, .. } if namespace_selector.is_empty())
    );
    assert_eq!(p.ingress[0].action, Action::Accept);
    assert_eq!(
        p.ingress[0].ports,
        Some(vec![
            ClusterPort::Ports {
                protocol: Protocol::Tcp,
                first: 9090,
                last: 9090
            },
            ClusterPort::Named("metrics".into())
        ])
    );
    // Host bits are masked, as the API's matching of a CIDR does.
    assert_eq!(
        p.egress[0].peers[0],
        ClusterPeer::Networks(vec![
            "169.254.169.254/32".parse().expect("cidr"),
            "10.0.0.0/8".parse().expect("cidr")
        ])
    );
    assert!(matches!(&p.egress[0].peers[1], ClusterPeer::Nodes(sel) if sel.is_empty()));
    assert_eq!(p.egress[1].ports, None);
}

#[test]
fn invalid_cluster_network_policies_are_refused_naming_the_field() {
    let base = |extra: serde_json::Value| {
        let mut spec = serde_json::json!({
            "tier": "Baseline", "priority": 1,
            "subject": {"namespaces": {}},
        });
        spec.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        spec
    };
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            serde_json::json!({"priority": 1001}),
            "spec.priority: must be 0-1000",
        ),
        (
            serde_json::json!({"tier": "Developer"}),
            "spec.tier: unsupported tier",
        ),
        (
            serde_json::json!({"subject": {}}),
            "spec.subject: must set one of",
        ),
        (
            serde_json::json!({"subject": {"namespaces": {}, "pods": {"podSelector": {}}}}),
            "spec.subject: must set exactly one field",
        ),
        (
            serde_json::json!({"egress": [{"action": "Accept", "to": [{"domainNames": ["example.com"]}]}]}),
            "spec.egress[0].to[0].domainNames: not supported by netpol",
        ),
        (
            serde_json::json!({"egress": [{"action": "Deny", "to": [{}]}]}),
            "spec.egress[0].to[0]: must set one of",
        ),
        (
            serde_json::json!({"egress": [{"action": "Deny", "to": []}]}),
            "spec.egress[0].to: must have at least 1 item",
        ),
        (
            serde_json::json!({"ingress": [{"action": "Allow", "from": [{"namespaces": {}}]}]}),
            "spec.ingress[0].action: unsupported action \"Allow\"",
        ),
        (
            serde_json::json!({"ingress": [{"action": "Deny", "from": [{"namespaces": {}}],
                                            "protocols": [{"tcp": {}}]}]}),
            "spec.ingress[0].protocols[0].tcp.destinationPort: required",
        ),
        (
            serde_json::json!({"ingress": [{"action": "Deny", "from": [{"namespaces": {}}],
                                            "protocols": [{"sctp": {"destinationPort": {"range": {"start": 9, "end": 9}}}}]}]}),
            "spec.ingress[0].protocols[0].sctp.destinationPort.range: Start port must be less than End port",
        ),
        (
            serde_json::json!({"ingress": [{"action": "Deny", "from": [{"namespaces": {}}],
                                            "protocols": [{"udp": {"destinationPort": {"number": 0}}}]}]}),
            "spec.ingress[0].protocols[0].udp.destinationPort.number: must be 1-65535, is 0",
        ),
        (
            serde_json::json!({"egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/33"]}]}]}),
            "spec.egress[0].to[0].networks[0]: Invalid CIDR format provided",
        ),
        (
            serde_json::json!({"egress": [{"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}],
                                           "protocols": [{"destinationNamedPort": "web"}]}]}),
            "spec.egress[0]: networks/nodes/domainNames peer cannot be set with namedPorts",
        ),
        (
            serde_json::json!({"ingress": [{"action": "Deny", "form": [{"namespaces": {}}]}]}),
            "unknown field \"spec.ingress[0].form\"",
        ),
        (
            serde_json::json!({"ingress": [{"action": "Deny", "from": [{"networks": ["0.0.0.0/0"]}]}]}),
            "unknown field \"spec.ingress[0].from[0].networks\"",
        ),
    ];
    for (extra, want) in cases {
        let s = cnp("bad", &base(extra.clone()));
        let errors: Vec<String> = s.errors().iter().map(ToString::to_string).collect();
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{extra}: want {want:?}, got {errors:?}"
        );
        assert!(
            s.cluster_policies
                .get("bad")
                .is_none_or(|slot| slot.in_force.is_none()),
            "{extra}: an invalid policy is never in force"
        );
    }
}

/// A document through the manifests loader, as [`cnp`] does.
fn load(doc: serde_json::Value) -> crate::model::Snapshot {
    let mut s = crate::model::Snapshot::default();
    let mut report = crate::model::manifests::LoadReport::default();
    crate::model::manifests::apply_value(&mut s, doc, "t", &mut report);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    s
}

#[test]
fn staging_annotations_mark_policies_and_anything_but_true_or_false_is_refused() {
    use crate::model::{STAGED_ANNOTATION, STAGED_DELETE_ANNOTATION, Staging};
    let np = |annotations: serde_json::Value| {
        load(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x", "annotations": annotations},
            "spec": {"podSelector": {}},
        }))
    };
    let staging = |s: &crate::model::Snapshot| {
        let slot = &s.policies[&crate::model::ObjectRef::new("x", "p")];
        (
            slot.in_force.as_ref().map(|p| p.staging),
            slot.errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        )
    };
    for (annotations, want) in [
        (serde_json::json!({}), Staging::Enforced),
        (
            serde_json::json!({STAGED_ANNOTATION: "false"}),
            Staging::Enforced,
        ),
        (
            serde_json::json!({STAGED_ANNOTATION: "true"}),
            Staging::Staged,
        ),
        (
            serde_json::json!({STAGED_DELETE_ANNOTATION: "true"}),
            Staging::StagedDelete,
        ),
    ] {
        assert_eq!(staging(&np(annotations)), (Some(want), vec![]));
    }
    let (in_force, errors) = staging(&np(serde_json::json!({STAGED_ANNOTATION: "yes"})));
    assert_eq!(in_force, None);
    assert_eq!(
        errors,
        vec![
            "x/p: metadata.annotations[netpol.io/staged]: must be \"true\" or \
             \"false\", is \"yes\""
        ]
    );
    let (in_force, errors) = staging(&np(serde_json::json!({
        STAGED_ANNOTATION: "true", STAGED_DELETE_ANNOTATION: "true",
    })));
    assert_eq!(in_force, None);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("cannot be both"), "{errors:?}");
    // ClusterNetworkPolicy reads the same annotations.
    let s = load(serde_json::json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "guard", "annotations": {STAGED_ANNOTATION: "true"}},
        "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}},
    }));
    assert_eq!(
        s.cluster_policies["guard"]
            .in_force
            .as_ref()
            .map(|p| p.staging),
        Some(Staging::Staged)
    );
}
