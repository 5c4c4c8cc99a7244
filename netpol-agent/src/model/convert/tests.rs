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
