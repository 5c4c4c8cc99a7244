//! Service frontends: every address and port kube-proxy translates, keyed
//! exactly as `NETPOL_FRONTENDS_V4`/`_V6` are.
//!
//! A Service contributes each of its cluster, external and load-balancer
//! IPs with each of its ports (`CLUSTER_IP`, `EXTERNAL_IP`,
//! `LOAD_BALANCER`), and each of this node's addresses with each of its
//! node ports (`NODE_PORT`). The same (address, port, protocol) named twice
//! (two Services sharing an external IP, a node address listed as an
//! external IP) is one entry, of the lowest kind code: what matters to the
//! datapath is that the address is translated, not by which rule.

use std::collections::BTreeMap;
use std::net::IpAddr;

use netpol_common::{FrontendKeyV4, FrontendKeyV6, FrontendValue, frontend_kind};

use crate::model::{Protocol, Service, Snapshot};

/// The frontend entries of both families.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Frontends {
    pub(super) v4: BTreeMap<FrontendKeyV4, FrontendValue>,
    pub(super) v6: BTreeMap<FrontendKeyV6, FrontendValue>,
}

impl Frontends {
    fn add(&mut self, addr: IpAddr, port: u16, protocol: Protocol, kind: u32) {
        let port = port.to_be_bytes();
        let protocol = protocol.number();
        let keep_lowest = |v: &mut FrontendValue| v.kind = v.kind.min(kind);
        match addr {
            IpAddr::V4(a) => {
                let key = FrontendKeyV4 {
                    addr: a.octets(),
                    port,
                    protocol,
                    _pad: 0,
                };
                self.v4
                    .entry(key)
                    .and_modify(keep_lowest)
                    .or_insert(FrontendValue { kind });
            }
            IpAddr::V6(a) => {
                let key = FrontendKeyV6 {
                    addr: a.octets(),
                    port,
                    protocol,
                    _pad: 0,
                };
                self.v6
                    .entry(key)
                    .and_modify(keep_lowest)
                    .or_insert(FrontendValue { kind });
            }
        }
    }

    fn add_service(&mut self, svc: &Service, node_addresses: &[IpAddr]) {
        for f in service_frontends(svc, node_addresses) {
            self.add(f.address, f.port, f.protocol, f.kind);
        }
    }
}

/// One frontend of one Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceFrontend {
    /// The address kube-proxy translates.
    pub address: IpAddr,
    /// Its port.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// `netpol_common::frontend_kind`.
    pub kind: u32,
}

/// Every frontend of `svc` on a node with `node_addresses` (the same
/// tuple may come twice, under two kinds); the provenance of
/// `NETPOL_FRONTENDS_V4/_V6` entries.
pub fn service_frontends<'a>(
    svc: &'a Service,
    node_addresses: &'a [IpAddr],
) -> impl Iterator<Item = ServiceFrontend> + 'a {
    svc.ports.iter().flat_map(move |p| {
        let translated = [
            (&svc.cluster_ips, frontend_kind::CLUSTER_IP),
            (&svc.external_ips, frontend_kind::EXTERNAL_IP),
            (&svc.load_balancer_ips, frontend_kind::LOAD_BALANCER),
        ]
        .into_iter()
        .flat_map(move |(ips, kind)| {
            ips.iter().map(move |&address| ServiceFrontend {
                address,
                port: p.port,
                protocol: p.protocol,
                kind,
            })
        });
        let node_ports = p.node_port.into_iter().flat_map(move |node_port| {
            node_addresses.iter().map(move |&address| ServiceFrontend {
                address,
                port: node_port,
                protocol: p.protocol,
                kind: frontend_kind::NODE_PORT,
            })
        });
        translated.chain(node_ports)
    })
}

/// Every frontend of `snap`'s Services on a node with `node_addresses`.
pub(super) fn frontends(snap: &Snapshot, node_addresses: &[IpAddr]) -> Frontends {
    let mut out = Frontends::default();
    for svc in snap.services.values() {
        out.add_service(svc, node_addresses);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use netpol_common::frontend_kind;
    use proptest::prelude::*;

    use super::frontends;
    use crate::compiler::{Changes, Compiler, IdAllocation, Op, compile, diff};
    use crate::model::{
        Kind, Labels, Node, ObjectRef, Pod, PodPhase, Protocol, Service, ServicePort, Snapshot,
    };

    /// `(address, port, protocol)` as the maps key it.
    type Tuple = (IpAddr, u16, u8);

    fn keys(snap: &Snapshot, node: &[IpAddr]) -> BTreeMap<Tuple, u32> {
        let f = frontends(snap, node);
        let mut out = BTreeMap::new();
        for (k, v) in &f.v4 {
            let t = (IpAddr::from(k.addr), u16::from_be_bytes(k.port), k.protocol);
            assert!(out.insert(t, v.kind).is_none(), "{t:?} twice");
            assert_eq!(k._pad, 0);
        }
        for (k, v) in &f.v6 {
            let t = (IpAddr::from(k.addr), u16::from_be_bytes(k.port), k.protocol);
            assert!(out.insert(t, v.kind).is_none(), "{t:?} twice");
            assert_eq!(k._pad, 0);
        }
        out
    }

    /// The spec written plainly: every tuple a Service names, with the
    /// lowest kind naming it.
    fn expected(snap: &Snapshot, node: &[IpAddr]) -> BTreeMap<Tuple, u32> {
        let mut out: BTreeMap<Tuple, u32> = BTreeMap::new();
        let mut put = |t: Tuple, kind: u32| {
            let k = out.entry(t).or_insert(kind);
            *k = (*k).min(kind);
        };
        for svc in snap.services.values() {
            for p in &svc.ports {
                let proto = p.protocol.number();
                for ip in &svc.cluster_ips {
                    put((*ip, p.port, proto), frontend_kind::CLUSTER_IP);
                }
                for ip in &svc.external_ips {
                    put((*ip, p.port, proto), frontend_kind::EXTERNAL_IP);
                }
                for ip in &svc.load_balancer_ips {
                    put((*ip, p.port, proto), frontend_kind::LOAD_BALANCER);
                }
                if let Some(np) = p.node_port {
                    for ip in node {
                        put((*ip, np, proto), frontend_kind::NODE_PORT);
                    }
                }
            }
        }
        out
    }

    fn service(name: &str, cluster: &[IpAddr], ports: Vec<ServicePort>) -> Service {
        Service {
            id: ObjectRef::new("x", name),
            cluster_ips: cluster.to_vec(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            ports,
        }
    }

    fn tcp(port: u16, node_port: Option<u16>) -> ServicePort {
        ServicePort {
            port,
            protocol: Protocol::Tcp,
            node_port,
        }
    }

    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 43, 0, 1));
    const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1));
    const NODE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1));

    #[test]
    fn dual_stack_cluster_ips_go_to_their_family_map_with_big_endian_ports() {
        let mut s = Snapshot::default();
        s.upsert_service(service("a", &[V4, V6], vec![tcp(0x1234, None)]));
        let f = frontends(&s, &[]);
        assert_eq!(f.v4.len(), 1);
        assert_eq!(f.v6.len(), 1);
        let (k, v) = f.v4.iter().next().expect("one entry");
        assert_eq!(k.addr, [10, 43, 0, 1]);
        assert_eq!(k.port, [0x12, 0x34]);
        assert_eq!(k.protocol, 6);
        assert_eq!(v.kind, frontend_kind::CLUSTER_IP);
    }

    #[test]
    fn node_ports_open_on_every_node_address_only() {
        let mut s = Snapshot::default();
        s.upsert_service(service("a", &[V4], vec![tcp(80, Some(30080))]));
        let node6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1));
        let got = keys(&s, &[NODE, node6]);
        assert_eq!(got.len(), 3);
        assert_eq!(got[&(NODE, 30080, 6)], frontend_kind::NODE_PORT);
        assert_eq!(got[&(node6, 30080, 6)], frontend_kind::NODE_PORT);
        assert!(!got.contains_key(&(V4, 30080, 6)));
    }

    #[test]
    fn shared_frontend_is_one_entry_of_the_lowest_kind() {
        let mut s = Snapshot::default();
        let mut a = service("a", &[], vec![tcp(443, None)]);
        a.load_balancer_ips = vec![NODE];
        let mut b = service("b", &[], vec![tcp(80, Some(443))]);
        b.external_ips = vec![NODE];
        s.upsert_service(a);
        s.upsert_service(b);
        let got = keys(&s, &[NODE]);
        assert_eq!(
            got,
            BTreeMap::from([
                ((NODE, 80, 6), frontend_kind::EXTERNAL_IP),
                ((NODE, 443, 6), frontend_kind::NODE_PORT),
            ])
        );
    }

    #[test]
    fn compile_writes_frontends_on_a_node_without_pods_or_without_a_node() {
        let mut s = Snapshot {
            local_node: Some("n1".into()),
            ..Snapshot::default()
        };
        s.upsert_node(Node {
            name: "n1".into(),
            addresses: vec![NODE],
            labels: Labels::new(),
        });
        s.upsert_service(service("a", &[V4], vec![tcp(80, Some(30080))]));
        let c = compile(&s, &IdAllocation::default());
        assert!(c.endpoints.is_empty());
        assert_eq!(c.frontends_v4.len(), 2);
        assert_eq!(c.map_state().frontends_v4, c.frontends_v4);
        let sizes = c.sizes();
        assert_eq!(
            (sizes.entries.frontends_v4, sizes.entries.frontends_v6),
            (2, 0)
        );

        // No local node: no node ports, the cluster IP all the same.
        s.local_node = Some("elsewhere".into());
        let c = compile(&s, &IdAllocation::default());
        assert_eq!(c.frontends_v4.len(), 1);
    }

    #[test]
    fn service_changes_diff_frontend_upserts_first_and_deletes_last_incrementally_too() {
        let mut s = Snapshot {
            local_node: Some("n1".into()),
            ..Snapshot::default()
        };
        s.upsert_node(Node {
            name: "n1".into(),
            addresses: vec![NODE],
            labels: Labels::new(),
        });
        s.upsert_service(service("a", &[V4], vec![tcp(80, None)]));
        let mut inc = Compiler::new(&s, &IdAllocation::default());
        let prev = inc.compiled().clone();
        let before = s.clone();
        let moved = IpAddr::V4(Ipv4Addr::new(10, 43, 0, 2));
        s.upsert_service(service("a", &[moved, V6], vec![tcp(80, None)]));
        s.upsert_pod(Pod {
            id: ObjectRef::new("x", "p"),
            uid: None,
            labels: Labels::new(),
            node_name: Some("n1".into()),
            host_network: false,
            phase: PodPhase::Running,
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))],
            ports: Vec::new(),
            allow_any_source: false,
        });
        let d = inc.update(&s, &Changes::between(&before, &s));
        let full = compile(&s, &prev.ids);
        assert_eq!(inc.compiled(), &full);
        assert_eq!(d, diff(&prev, &full));
        let mut state = prev.map_state();
        state.apply(&d);
        assert_eq!(state, full.map_state());
        assert!(
            matches!(
                d.ops.as_slice(),
                [
                    Op::FrontendV4Upsert { .. },
                    Op::FrontendV6Upsert { .. },
                    Op::EndpointInsert { .. },
                    Op::FrontendV4Delete { .. },
                ]
            ),
            "{:?}",
            d.ops
        );

        // A Service change alone: no pod is recompiled.
        let before = s.clone();
        s.remove(Kind::Service, "x", "a");
        let d = inc.update(&s, &Changes::between(&before, &s));
        assert_eq!(d.ops.len(), 2);
        assert!(inc.compiled().frontends_v4.is_empty() && inc.compiled().frontends_v6.is_empty());
        assert_eq!(inc.compiled(), &compile(&s, &full.ids));
    }

    fn ip_strategy() -> impl Strategy<Value = IpAddr> {
        // A small pool, so that Services and node addresses collide.
        prop_oneof![
            (0u8..4).prop_map(|i| IpAddr::V4(Ipv4Addr::new(10, 43, 0, i))),
            (0u16..3).prop_map(|i| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i))),
        ]
    }

    fn port_strategy() -> impl Strategy<Value = ServicePort> {
        (
            prop::sample::select(vec![53u16, 80, 443, 30080]),
            prop::sample::select(Protocol::ALL.to_vec()),
            prop::option::of(prop::sample::select(vec![80u16, 30080, 30443])),
        )
            .prop_map(|(port, protocol, node_port)| ServicePort {
                port,
                protocol,
                node_port,
            })
    }

    fn service_strategy()
    -> impl Strategy<Value = (Vec<IpAddr>, Vec<IpAddr>, Vec<IpAddr>, Vec<ServicePort>)> {
        (
            prop::collection::vec(ip_strategy(), 0..3),
            prop::collection::vec(ip_strategy(), 0..3),
            prop::collection::vec(ip_strategy(), 0..2),
            prop::collection::vec(port_strategy(), 0..4),
        )
    }

    proptest! {
        #[test]
        fn every_service_tuple_appears_exactly_once_and_nothing_else(
            services in prop::collection::vec(service_strategy(), 0..6),
            node in prop::collection::vec(ip_strategy(), 0..3),
        ) {
            let mut s = Snapshot::default();
            for (i, (cluster, external, lb, ports)) in services.into_iter().enumerate() {
                s.upsert_service(Service {
                    id: ObjectRef::new("x", format!("s{i}")),
                    cluster_ips: cluster,
                    external_ips: external,
                    load_balancer_ips: lb,
                    ports,
                });
            }
            let got = keys(&s, &node);
            let want = expected(&s, &node);
            prop_assert_eq!(&got, &want);
            let tuples: BTreeSet<Tuple> = want.keys().copied().collect();
            prop_assert_eq!(got.len(), tuples.len());
        }
    }
}
