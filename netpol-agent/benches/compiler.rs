//! Compiler benchmark: a seeded cluster of 10,000 pods (110 on this node),
//! 1,000 policies and 200 namespaces. Measures the full compile, and the
//! update + diff after one pod's label change and after one policy edit,
//! both through the incremental [`Compiler`] (the agent's path) and as a
//! full recompile + diff for comparison. Prints map entry counts and bytes,
//! and p50/p99 of the one-change paths.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ipnet::IpNet;
use netpol_agent::compiler::{Changes, Compiled, Compiler, IdAllocation, compile, diff};
use netpol_agent::model::{
    ContainerPort, LabelSelector, Labels, NAMESPACE_NAME_LABEL, Namespace, NetworkPolicy, Node,
    ObjectRef, Operator, Peer, Pod, PodPhase, PolicyPort, PolicySlot, PortSpec, Protocol,
    Requirement, Rule, Snapshot,
};
use netpol_agent::provenance::{Inputs, State};

const PODS: usize = 10_000;
const NAMESPACES: usize = 200;
const POLICIES: usize = 1_000;
const LOCAL_PODS: usize = 110;
const APPS_PER_NS: usize = 10;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn sel(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: Vec::new(),
    }
}

fn port(protocol: Protocol, spec: PortSpec) -> PolicyPort {
    PolicyPort {
        protocol,
        port: spec,
    }
}

fn ns_name(i: usize) -> String {
    format!("ns-{i:03}")
}

/// The seeded cluster.
fn cluster() -> Snapshot {
    let mut r = Rng(42);
    let mut s = Snapshot {
        local_node: Some("node-0".into()),
        ..Snapshot::default()
    };
    s.upsert_node(Node {
        name: "node-0".into(),
        addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1))],
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
fn relabelled(s: &Snapshot) -> (Snapshot, Changes) {
    let mut s2 = s.clone();
    let mut changes = Changes::default();
    if let Some(pod) = s2
        .pods
        .values_mut()
        .find(|p| p.node_name.as_deref() == Some("node-0"))
    {
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

/// A policy selecting local pods gets another port.
fn policy_edited(s: &Snapshot, base: &Compiled) -> (Snapshot, Changes) {
    let mut s2 = s.clone();
    let mut changes = Changes::default();
    let target = base
        .policy_v4
        .values()
        .flat_map(|e| base.sources(e))
        .find(|r| {
            r.policy.name.starts_with("pol-")
                && r.direction == netpol_agent::compiler::Direction::Ingress
        })
        .map(|r| r.policy.clone());
    if let Some(id) = target.clone()
        && let Some(p) = s2
            .policies
            .get_mut(&id)
            .and_then(|slot| slot.in_force.as_mut())
        && let Some(rules) = p.ingress.as_mut()
        && let Some(rule) = rules.first_mut()
    {
        rule.ports.push(port(
            Protocol::Tcp,
            PortSpec::Range {
                first: 7000,
                last: 7010,
            },
        ));
        changes.policies.insert(id);
    }
    (s2, changes)
}

fn percentiles(name: &str, mut f: impl FnMut()) {
    percentiles_with(name, || (), |()| f());
}

/// p50/p99 of `f`, each run on a fresh `setup()`; neither the setup nor
/// dropping what `f` returns is timed.
fn percentiles_with<T, R>(name: &str, mut setup: impl FnMut() -> T, mut f: impl FnMut(T) -> R) {
    let mut samples: Vec<Duration> = (0..200)
        .map(|_| {
            let input = setup();
            let t = Instant::now();
            let out = f(input);
            let elapsed = t.elapsed();
            drop(out);
            elapsed
        })
        .collect();
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    eprintln!(
        "{name}: p50 {:?}, p99 {:?}, max {:?}",
        p(0.5),
        p(0.99),
        p(1.0)
    );
}

fn bench(c: &mut Criterion) {
    let s = cluster();
    let base = compile(&s, &IdAllocation::default());
    let sizes = base.sizes();
    let (endpoints, v4, v6, ports, bytes) = (
        sizes.endpoints,
        sizes.policy_v4,
        sizes.policy_v6,
        sizes.ports,
        sizes.bytes,
    );
    eprintln!(
        "cluster: {} pods, {} namespaces, {} policies; node maps: {endpoints} endpoints, \
         {v4} IPv4 + {v6} IPv6 policy entries, {ports} port entries ({} rule sets), {bytes} bytes",
        s.pods.len(),
        s.namespaces.len(),
        s.policies.len(),
        base.rulesets.len()
    );
    let (s_pod, ch_pod) = relabelled(&s);
    let (s_pol, ch_pol) = policy_edited(&s, &base);
    let inc = Compiler::new(&s, &IdAllocation::default());
    assert_eq!(inc.compiled(), &base);
    {
        let mut i = inc.clone();
        i.update(&s_pod, &ch_pod);
        assert_eq!(
            i.compiled(),
            &compile(&s_pod, &base.ids),
            "incremental != full"
        );
        let mut i = inc.clone();
        i.update(&s_pol, &ch_pol);
        assert_eq!(
            i.compiled(),
            &compile(&s_pol, &base.ids),
            "incremental != full"
        );
    }
    let c_pod = compile(&s_pod, &base.ids);
    let c_pol = compile(&s_pol, &base.ids);
    eprintln!(
        "one pod's labels: {} map updates; one policy edit: {} map updates",
        diff(&base, &c_pod).ops.len(),
        diff(&base, &c_pol).ops.len()
    );
    percentiles("full compile", || {
        black_box(compile(&s, &base.ids));
    });
    // What the sync loop adds to every apply: a copy of the compiled state
    // for the state file's writer thread, which builds and writes it.
    percentiles("state file: Compiled clone (on the sync loop)", || {
        black_box(base.clone());
    });
    let dir = std::env::temp_dir().join(format!("netpol-bench-state-{}", std::process::id()));
    let bound = std::collections::BTreeMap::new();
    percentiles("state file (provenance::State::build + write)", || {
        let state = State::build(&Inputs {
            compiled: &base,
            snapshot: &s,
            interfaces: &bound,
            generation: 1,
            fingerprint: None,
            pin_dir: std::path::Path::new("/sys/fs/bpf/netpol"),
        });
        black_box(state.write(&dir).expect("writing the state file"));
    });
    eprintln!(
        "state file: {} bytes",
        std::fs::metadata(dir.join(netpol_agent::provenance::STATE_FILE)).map_or(0, |m| m.len())
    );
    let _ = std::fs::remove_dir_all(&dir);
    percentiles("Compiler::new (full compile + index)", || {
        black_box(Compiler::new(&s, &base.ids));
    });
    percentiles_with(
        "one pod's labels: Compiler::update (incremental + diff)",
        || inc.clone(),
        |mut i| {
            black_box(i.update(&s_pod, &ch_pod));
            i
        },
    );
    percentiles_with(
        "one policy edit: Compiler::update (incremental + diff)",
        || inc.clone(),
        |mut i| {
            black_box(i.update(&s_pol, &ch_pol));
            i
        },
    );
    percentiles("one pod's labels: recompile + diff", || {
        let c2 = compile(&s_pod, &base.ids);
        black_box(diff(&base, &c2));
    });
    percentiles("one pod's labels: diff only", || {
        black_box(diff(&base, &c_pod));
    });
    percentiles("one policy edit: recompile + diff", || {
        let c2 = compile(&s_pol, &base.ids);
        black_box(diff(&base, &c2));
    });

    let mut g = c.benchmark_group("compiler");
    g.sample_size(20);
    g.bench_function("full_compile", |b| {
        b.iter(|| compile(black_box(&s), &base.ids))
    });
    g.bench_function("one_pod_label_change_update", |b| {
        b.iter_batched(
            || inc.clone(),
            |mut i| {
                let d = i.update(black_box(&s_pod), &ch_pod);
                (i, d)
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("one_policy_edit_update", |b| {
        b.iter_batched(
            || inc.clone(),
            |mut i| {
                let d = i.update(black_box(&s_pol), &ch_pol);
                (i, d)
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("one_pod_label_change_recompile_and_diff", |b| {
        b.iter(|| diff(&base, &compile(black_box(&s_pod), &base.ids)))
    });
    g.bench_function("one_pod_label_change_diff_only", |b| {
        b.iter(|| diff(black_box(&base), black_box(&c_pod)))
    });
    g.bench_function("one_policy_edit_recompile_and_diff", |b| {
        b.iter(|| diff(&base, &compile(black_box(&s_pol), &base.ids)))
    });
    g.bench_function("one_policy_edit_diff_only", |b| {
        b.iter(|| diff(black_box(&base), black_box(&c_pol)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
