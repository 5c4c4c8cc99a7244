//! The seeded cluster the compiler and control benches share: 10,000
//! pods (110 on this node), 1,000 policies, 200 namespaces.
#![allow(dead_code, reason = "each bench takes a subset")]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netpol_agent::compiler::Changes;
use netpol_agent::model::{
    ContainerPort, LabelSelector, Labels, NAMESPACE_NAME_LABEL, Namespace, NetworkPolicy, Node,
    ObjectRef, Operator, Peer, Pod, PodPhase, PolicyPort, PolicySlot, PortSpec, Protocol,
    Requirement, Rule, Snapshot, Staging,
};

pub const PODS: usize = 10_000;
pub const NAMESPACES: usize = 200;
pub const POLICIES: usize = 1_000;
pub const LOCAL_PODS: usize = 110;
pub const APPS_PER_NS: usize = 10;

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

pub fn sel(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: Vec::new(),
    }
}

pub fn port(protocol: Protocol, spec: PortSpec) -> PolicyPort {
    PolicyPort {
        protocol,
        port: spec,
    }
}

pub fn ns_name(i: usize) -> String {
    format!("ns-{i:03}")
}

/// The seeded cluster.
pub fn cluster() -> Snapshot {
    let mut r = Rng(42);
    let mut s = Snapshot {
        local_node: Some("node-0".into()),
        ..Snapshot::default()
    };
    s.upsert_node(Node {
        name: "node-0".into(),
        addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1))],
        labels: netpol_agent::model::Labels::new(),
    });
    for n in 0..NAMESPACES {
        let name = ns_name(n);
        s.upsert_namespace(Namespace {
            name: name.clone(),
            labels: labels(&[
                (NAMESPACE_NAME_LABEL, name.clone()),
                ("team", format!("team-{}", n % 20)),
                ("env", if n % 3 == 0 { "prod" } else { "dev" }.to_owned()),
            ]),
        });
    }
    // Local pods spread over the cluster, as the scheduler would.
    let mut local: BTreeSet<usize> = BTreeSet::new();
    while local.len() < LOCAL_PODS {
        local.insert(r.below(PODS));
    }
    for i in 0..PODS {
        let n = i % NAMESPACES;
        let app = (i / NAMESPACES) % APPS_PER_NS;
        let idx = u32::try_from(i).unwrap_or(0);
        s.upsert_pod(Pod {
            id: ObjectRef::new(ns_name(n), format!("app-{app}-{i}")),
            uid: Some(format!("uid-{i}")),
            labels: labels(&[
                ("app", format!("app-{app}")),
                ("tier", ["web", "api", "db"][app % 3].to_owned()),
            ]),
            node_name: Some(if local.contains(&i) {
                "node-0".to_owned()
            } else {
                format!("node-{}", 1 + i % 90)
            }),
            host_network: false,
            phase: PodPhase::Running,
            ips: vec![
                IpAddr::V4(Ipv4Addr::from(0x0A40_0000 + idx)),
                IpAddr::V6(Ipv6Addr::from(
                    0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(idx),
                )),
            ],
            ports: vec![
                ContainerPort {
                    name: Some("http".into()),
                    port: 8080 + u16::try_from(app).unwrap_or(0),
                    protocol: Protocol::Tcp,
                },
                ContainerPort {
                    name: Some("metrics".into()),
                    port: 9090,
                    protocol: Protocol::Tcp,
                },
            ],
            allow_any_source: false,
        });
    }
    for p in 0..POLICIES {
        let n = p % NAMESPACES;
        let ns = ns_name(n);
        let app = (p / NAMESPACES) % APPS_PER_NS;
        let id = ObjectRef::new(ns.clone(), format!("pol-{p}"));
        let policy = match p / NAMESPACES {
            // Default deny in every namespace.
            0 => NetworkPolicy {
                id,
                pod_selector: LabelSelector::default(),
                ingress: Some(Vec::new()),
                egress: None,
                staging: Staging::Enforced,
            },
            // Per-app ingress from the app in front, on the named port.
            1 | 2 => NetworkPolicy {
                id,
                pod_selector: sel(&[("app", format!("app-{app}"))]),
                ingress: Some(vec![Rule {
                    peers: vec![Peer::Pods {
                        pod_selector: Some(sel(&[(
                            "app",
                            format!("app-{}", (app + 1) % APPS_PER_NS),
                        )])),
                        namespace_selector: None,
                    }],
                    ports: vec![port(Protocol::Tcp, PortSpec::Named("http".into()))],
                }]),
                egress: None,
                staging: Staging::Enforced,
            },
            // Monitoring from the team's namespaces (namespace selector).
            3 => NetworkPolicy {
                id,
                pod_selector: LabelSelector {
                    match_labels: Labels::new(),
                    match_expressions: vec![Requirement {
                        key: "tier".into(),
                        operator: Operator::In(["web".to_owned(), "api".to_owned()].into()),
                    }],
                },
                ingress: Some(vec![Rule {
                    peers: vec![Peer::Pods {
                        pod_selector: Some(sel(&[("app", "app-0".to_owned())])),
                        namespace_selector: Some(sel(&[("team", format!("team-{}", n % 20))])),
                    }],
                    ports: vec![
                        port(Protocol::Tcp, PortSpec::Named("metrics".into())),
                        port(
                            Protocol::Tcp,
                            PortSpec::Range {
                                first: 9100,
                                last: 9200,
                            },
                        ),
                    ],
                }]),
                egress: None,
                staging: Staging::Enforced,
            },
            // Egress: DNS, the namespace itself, and the outside minus the
            // cluster ranges.
            _ => NetworkPolicy {
                id,
                pod_selector: sel(&[("app", format!("app-{app}"))]),
                ingress: None,
                egress: Some(vec![
                    Rule {
                        peers: vec![Peer::Pods {
                            pod_selector: Some(sel(&[("app", "app-1".to_owned())])),
                            namespace_selector: Some(sel(&[(NAMESPACE_NAME_LABEL, ns_name(0))])),
                        }],
                        ports: vec![
                            port(
                                Protocol::Udp,
                                PortSpec::Range {
                                    first: 53,
                                    last: 53,
                                },
                            ),
                            port(
                                Protocol::Tcp,
                                PortSpec::Range {
                                    first: 53,
                                    last: 53,
                                },
                            ),
                        ],
                    },
                    Rule {
                        peers: vec![Peer::Pods {
                            pod_selector: Some(LabelSelector::default()),
                            namespace_selector: None,
                        }],
                        ports: vec![port(Protocol::Tcp, PortSpec::Named("http".into()))],
                    },
                    Rule {
                        peers: vec![
                            Peer::IpBlock {
                                cidr: "0.0.0.0/0".parse::<IpNet>().unwrap_or_default(),
                                except: vec![
                                    "10.0.0.0/8".parse().unwrap_or_default(),
                                    "172.16.0.0/12".parse().unwrap_or_default(),
                                ],
                            },
                            Peer::IpBlock {
                                cidr: "::/0".parse().unwrap_or_default(),
                                except: vec!["fd00::/8".parse().unwrap_or_default()],
                            },
                        ],
                        ports: vec![port(
                            Protocol::Tcp,
                            PortSpec::Range {
                                first: 443,
                                last: 443,
                            },
                        )],
                    },
                ]),
                staging: Staging::Enforced,
            },
        };
        s.policies.insert(
            policy.id.clone(),
            PolicySlot {
                in_force: Some(policy),
                errors: Vec::new(),
            },
        );
    }
    s
}

/// The first local pod moves to another app: other policies select it.
pub fn relabelled(s: &Snapshot) -> (Snapshot, Changes) {
    let mut s2 = s.clone();
    let mut changes = Changes::default();
    let first_local = s2
        .pods
        .values()
        .find(|p| p.node_name.as_deref() == Some("node-0"))
        .map(|p| p.id.clone());
    if let Some(pod) = first_local.and_then(|id| s2.pods.get_mut(&id)) {
        let next = if pod.labels.get("app").map(String::as_str) == Some("app-3") {
            "app-4"
        } else {
            "app-3"
        };
        pod.labels.insert("app".into(), next.into());
        changes.pods.insert(pod.id.clone());
    }
    (s2, changes)
}

/// `s` plus `n` ClusterNetworkPolicies of 25 rules per direction each: both
/// tiers (alternating), every action, peers of every kind (namespaces by
/// team, pods by app, networks, nodes), ports numbered, ranged and named;
/// subjects a team's namespaces (one in 20) or a tier of pods, so that
/// most local pods fall under several.
#[must_use]
pub fn with_cluster_policies(s: &Snapshot, n: usize) -> Snapshot {
    use netpol_agent::model::{
        Action, ClusterNetworkPolicy, ClusterPeer, ClusterPort, ClusterRule, PolicySlot, Staging,
        Subject, Tier,
    };
    let mut s = s.clone();
    let mut r = Rng(7);
    for i in 0..n {
        let rule = |r: &mut Rng, k: usize| {
            let action = [Action::Accept, Action::Deny, Action::Pass][k % 3];
            let peer = match r.below(4) {
                0 => ClusterPeer::Namespaces(sel(&[("team", format!("team-{}", r.below(20)))])),
                1 => ClusterPeer::Pods {
                    namespace_selector: sel(&[("env", "prod".to_owned())]),
                    pod_selector: sel(&[("app", format!("app-{}", r.below(APPS_PER_NS)))]),
                },
                2 => ClusterPeer::Networks(vec![
                    format!("10.64.{}.0/24", r.below(40)).parse().expect("cidr"),
                    format!("fd00::{:x}00/120", r.below(40))
                        .parse()
                        .expect("cidr"),
                ]),
                _ => ClusterPeer::Nodes(LabelSelector::default()),
            };
            let named = matches!(peer, ClusterPeer::Namespaces(_) | ClusterPeer::Pods { .. });
            let ports = match r.below(4) {
                0 => None,
                1 if named => Some(vec![ClusterPort::Named("http".into())]),
                2 => Some(vec![ClusterPort::Ports {
                    protocol: Protocol::Tcp,
                    first: 1000 + u16::try_from(r.below(1000)).unwrap_or(0),
                    last: 3000,
                }]),
                _ => Some(vec![
                    ClusterPort::Ports {
                        protocol: Protocol::Tcp,
                        first: 443,
                        last: 443,
                    },
                    ClusterPort::Ports {
                        protocol: Protocol::Udp,
                        first: 53,
                        last: 53,
                    },
                ]),
            };
            ClusterRule {
                name: format!("r{k}"),
                action,
                peers: vec![peer],
                ports,
            }
        };
        let subject = if i % 2 == 0 {
            Subject::Namespaces(sel(&[("team", format!("team-{}", i % 20))]))
        } else {
            Subject::Pods {
                namespace_selector: LabelSelector::default(),
                pod_selector: sel(&[("tier", ["web", "api", "db"][i % 3].to_owned())]),
            }
        };
        let p = ClusterNetworkPolicy {
            name: format!("cnp-{i}"),
            tier: if i % 2 == 0 {
                Tier::Admin
            } else {
                Tier::Baseline
            },
            priority: u16::try_from(i).unwrap_or(0),
            subject,
            ingress: (0..25).map(|k| rule(&mut r, k)).collect(),
            egress: (0..25).map(|k| rule(&mut r, k)).collect(),
            staging: Staging::Enforced,
        };
        s.cluster_policies.insert(
            p.name.clone(),
            PolicySlot {
                in_force: Some(p),
                errors: Vec::new(),
            },
        );
    }
    s
}
