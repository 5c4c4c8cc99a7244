//! Per-packet cost on real connections, netpol against the kube-router-style
//! baseline (`cargo xtask bench throughput`, as root).
//!
//! Two pod namespaces routed through a node namespace (the topology of the
//! privileged tests); a server pod and a client pod, both isolated: the
//! server's ingress and the client's egress each carry N policy entries
//! per family (N/10 policies of ten /32 or /128 ipBlocks each, none
//! matching the pair) before the policy that allows the pair. In-process
//! load generators, netperf's shapes:
//!
//! - `tcp_rr`: one connection, one byte each way per transaction;
//! - `tcp_crr`: a new connection per transaction (connect, one byte each
//!   way, close);
//! - `tcp_stream`: one connection, 64 KiB writes, bytes per second.
//!
//! Configurations: no filtering, netpol (programs on both host veths),
//! and the baseline restored by `iptables-nft-restore` and by
//! `iptables-legacy-restore`. Within a round every configuration runs
//! every test at a size, one after the other (their order rotating between
//! rounds); ratios are to the same round's no-filter figure, and the
//! results are medians over rounds. Results go to
//! `target/netpol-bench/throughput.json`.
#[path = "../tests/common_baseline/mod.rs"]
mod common_baseline;
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use common_baseline::Backend;
use ipnet::IpNet;
use netpol_agent::{
    Datapath, DatapathConfig, baseline,
    compiler::{self, Compiled},
    model::{self, LabelSelector, NetworkPolicy, ObjectRef, Peer, PolicySlot, Rule, Snapshot},
};
use serde_json::json;
use support::{
    TempBpffs,
    agent::{PodNet, Topology, node, pod, pod_manifest},
};

const SIZES: [usize; 3] = [10, 1_000, 10_000];
const PORT_RR: u16 = 5001;
const PORT_CRR: u16 = 5002;
const PORT_STREAM: u16 = 5003;
const TESTS: [&str; 3] = ["tcp_rr", "tcp_crr", "tcp_stream"];
const CONFIGS: [&str; 4] = ["none", "netpol", "iptables-nft", "iptables-legacy"];
const FAMILIES: [&str; 2] = ["ipv4", "ipv6"];

fn rounds() -> usize {
    std::env::var("NETPOL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9)
}

fn duration() -> Duration {
    let ms = std::env::var("NETPOL_BENCH_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    Duration::from_millis(ms)
}

/// Pins the calling thread to the machine's last CPU. Client, servers and
/// (following them) the softirq work of the veths share one CPU, as
/// netperf runs are pinned: left free, the scheduler puts them on one CPU
/// in some runs and on two in others, and request/response rates jump
/// between two modes 3-4x apart.
fn pin() {
    let last = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) - 1;
    let mut set = nix::sched::CpuSet::new();
    if set.set(last).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

fn selector(app: &str) -> LabelSelector {
    LabelSelector {
        match_labels: [("app".to_owned(), app.to_owned())].into(),
        match_expressions: Vec::new(),
    }
}

/// Ten /32 and ten /128 ipBlocks of policy `k`, all outside the pods'
/// addresses.
fn blocks(k: usize) -> Vec<Peer> {
    (0..10u32)
        .flat_map(|j| {
            let i = u32::try_from(k).unwrap_or(0) * 10 + j;
            let v4 = IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0ac8_0000 + i)), 32);
            let v6 = IpNet::new(
                IpAddr::V6(Ipv6Addr::from((0xfd99_u128 << 112) + u128::from(i))),
                128,
            );
            [v4, v6]
        })
        .filter_map(Result::ok)
        .map(|cidr| Peer::IpBlock {
            cidr,
            except: Vec::new(),
        })
        .collect()
}

fn insert(s: &mut Snapshot, p: NetworkPolicy) {
    s.policies.insert(
        p.id.clone(),
        PolicySlot {
            in_force: Some(p),
            errors: Vec::new(),
        },
    );
}

/// The pair with `n` entries per family on the server's ingress and on the
/// client's egress, then the policies allowing the pair (named to sort
/// last, so the baseline's chains see them last).
fn snapshot(server: &PodNet, client: &PodNet, n: usize) -> Snapshot {
    let text = format!(
        "{}---\n{}---\n{}",
        support::agent::BASE,
        pod_manifest("srv", server),
        pod_manifest("cli", client)
    );
    let mut s = Snapshot::default();
    let mut report = model::manifests::LoadReport::default();
    model::manifests::apply_str(&mut s, &text, "bench", &mut report);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    for k in 0..n.div_ceil(10) {
        insert(
            &mut s,
            NetworkPolicy {
                id: ObjectRef::new("x", format!("entries-in-{k:05}")),
                pod_selector: selector("srv"),
                ingress: Some(vec![Rule {
                    peers: blocks(k),
                    ports: Vec::new(),
                }]),
                egress: None,
            },
        );
        insert(
            &mut s,
            NetworkPolicy {
                id: ObjectRef::new("x", format!("entries-out-{k:05}")),
                pod_selector: selector("cli"),
                ingress: None,
                egress: Some(vec![Rule {
                    peers: blocks(k),
                    ports: Vec::new(),
                }]),
            },
        );
    }
    let pods = |app: &str| Peer::Pods {
        pod_selector: Some(selector(app)),
        namespace_selector: None,
    };
    insert(
        &mut s,
        NetworkPolicy {
            id: ObjectRef::new("x", "zz-allow-in"),
            pod_selector: selector("srv"),
            ingress: Some(vec![Rule {
                peers: vec![pods("cli")],
                ports: Vec::new(),
            }]),
            egress: None,
        },
    );
    insert(
        &mut s,
        NetworkPolicy {
            id: ObjectRef::new("x", "zz-allow-out"),
            pod_selector: selector("cli"),
            ingress: None,
            egress: Some(vec![Rule {
                peers: vec![pods("srv")],
                ports: Vec::new(),
            }]),
        },
    );
    s
}

/// The servers, on both of the pod's addresses, for the whole run.
fn serve(p: &PodNet) {
    for addr in p.addresses() {
        let ip: IpAddr = addr.parse().expect("address");
        let listen = |port| {
            p.ns.run(|| TcpListener::bind(SocketAddr::new(ip, port)).expect("bind"))
        };
        let rr = listen(PORT_RR);
        std::thread::spawn(move || {
            pin();
            for s in rr.incoming().flatten() {
                std::thread::spawn(move || {
                    pin();
                    let _ = s.set_nodelay(true);
                    let mut b = [0u8; 1];
                    while (&s).read_exact(&mut b).is_ok() {
                        if (&s).write_all(&b).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        // One connection at a time, like netserver: accept, answer, close
        // (the server closes first, so TIME_WAIT stays on its side).
        let crr = listen(PORT_CRR);
        std::thread::spawn(move || {
            pin();
            for s in crr.incoming().flatten() {
                let _ = s.set_nodelay(true);
                let mut b = [0u8; 1];
                if (&s).read_exact(&mut b).is_ok() {
                    let _ = (&s).write_all(&b);
                }
            }
        });
        let stream = listen(PORT_STREAM);
        std::thread::spawn(move || {
            pin();
            for s in stream.incoming().flatten() {
                std::thread::spawn(move || {
                    pin();
                    let mut buf = vec![0u8; 1 << 16];
                    let mut total: u64 = 0;
                    while let Ok(n) = (&s).read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                    let _ = (&s).write_all(&total.to_le_bytes());
                });
            }
        });
    }
}

/// One measurement from the client's namespace: transactions per second
/// (rr, crr) or bytes per second (stream). 0 when nothing got through.
fn measure(client: &PodNet, server: IpAddr, test: &str, d: Duration) -> f64 {
    client.ns.run(|| {
        pin();
        let connect = |port| {
            let s =
                TcpStream::connect_timeout(&SocketAddr::new(server, port), Duration::from_secs(2))
                    .ok()?;
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            Some(s)
        };
        match test {
            "tcp_rr" => {
                let Some(s) = connect(PORT_RR) else {
                    return 0.0;
                };
                let mut b = [1u8; 1];
                let start = Instant::now();
                let mut n: u64 = 0;
                while !n.is_multiple_of(64) || start.elapsed() < d {
                    if (&s).write_all(&b).is_err() || (&s).read_exact(&mut b).is_err() {
                        return 0.0;
                    }
                    n += 1;
                }
                n as f64 / start.elapsed().as_secs_f64()
            }
            "tcp_crr" => {
                let start = Instant::now();
                let mut n: u64 = 0;
                while start.elapsed() < d {
                    let Some(s) = connect(PORT_CRR) else {
                        return 0.0;
                    };
                    let mut b = [1u8; 1];
                    if (&s).write_all(&b).is_err() || (&s).read_exact(&mut b).is_err() {
                        return 0.0;
                    }
                    // Until the server's FIN: it closes first.
                    let _ = (&s).read(&mut b);
                    n += 1;
                }
                n as f64 / start.elapsed().as_secs_f64()
            }
            _ => {
                let Some(s) = connect(PORT_STREAM) else {
                    return 0.0;
                };
                let buf = vec![7u8; 1 << 16];
                let start = Instant::now();
                while start.elapsed() < d {
                    if (&s).write_all(&buf).is_err() {
                        return 0.0;
                    }
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut total = [0u8; 8];
                if (&s).read_exact(&mut total).is_err() {
                    return 0.0;
                }
                u64::from_le_bytes(total) as f64 / start.elapsed().as_secs_f64()
            }
        }
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    assert!(
        netpol_agent::privileges::is_root(),
        "the throughput bench builds network namespaces, loads BPF programs and runs iptables: \
         run it as root (cargo xtask bench throughput)"
    );
    let (rounds, d) = (rounds(), duration());
    let node = node(Topology::Routed, true);
    let server = pod(&node, Topology::Routed, 1, true);
    let client = pod(&node, Topology::Routed, 2, true);
    serve(&server);
    let addrs: Vec<IpAddr> = server
        .addresses()
        .iter()
        .map(|a| a.parse().expect("address"))
        .collect();
    let bpffs = TempBpffs::new();
    let snaps: Vec<Snapshot> = SIZES
        .iter()
        .map(|&n| snapshot(&server, &client, n))
        .collect();

    // samples[(size, family, test, config)] = one value per round.
    let mut samples: BTreeMap<(usize, &str, &str, &str), Vec<f64>> = BTreeMap::new();
    node.run(|| {
        // TIME_WAIT entries of the crr runs would fill the node's
        // conntrack table under the baseline; netpol tracks in its own map.
        let _ = std::fs::write(
            "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait",
            "1",
        );
        let mut dp = Datapath::load(&DatapathConfig {
            bpffs: bpffs.path().to_owned(),
            ..DatapathConfig::default()
        })
        .expect("loading the datapath (NETPOL_EBPF_OBJECT)");
        let index = |n: &str| nix::net::if_::if_nametoindex(n).expect("ifindex");
        let ifaces: BTreeMap<ObjectRef, u32> = [
            (ObjectRef::new("x", "srv"), index(&server.host_if)),
            (ObjectRef::new("x", "cli"), index(&client.host_if)),
        ]
        .into_iter()
        .collect();
        let mut written = Compiled::default();
        let mut attached = false;
        for round in 0..rounds {
            for (si, &size) in SIZES.iter().enumerate() {
                let snap = &snaps[si];
                let compiled = compiler::compile(snap, &written.ids);
                let ops: Vec<_> = compiler::diff(&written, &compiled).raw().collect();
                dp.writer().apply(&ops, &ifaces).expect("map writes");
                written = compiled;
                let rules = baseline::generate(snap).expect("baseline");
                // Rotate the order: no configuration always runs first.
                for c in 0..CONFIGS.len() {
                    let config = CONFIGS[(c + round) % CONFIGS.len()];
                    common_baseline::clear().expect("clearing the baseline");
                    let want_attached = config == "netpol";
                    if want_attached != attached {
                        for h in [&server.host_if, &client.host_if] {
                            if want_attached {
                                dp.attach(h).expect("attach");
                            } else {
                                dp.detach(h).expect("detach");
                            }
                        }
                        attached = want_attached;
                    }
                    match config {
                        "iptables-nft" => {
                            common_baseline::sync(&rules, Backend::Nft).expect("nft sync");
                        }
                        "iptables-legacy" => {
                            common_baseline::sync(&rules, Backend::Legacy).expect("legacy sync");
                        }
                        _ => {}
                    }
                    for (fi, family) in FAMILIES.iter().enumerate() {
                        for test in TESTS {
                            // A run this shared machine stalls past the
                            // timeouts gets two more tries; a policy that
                            // denies the pair fails all three.
                            let v = (0..3)
                                .map(|_| measure(&client, addrs[fi], test, d))
                                .find(|v| *v > 0.0)
                                .unwrap_or(0.0);
                            assert!(
                                v > 0.0,
                                "{config}, {size} entries, {family} {test}: no traffic got \
                                 through (the allowing policy must admit the pair)"
                            );
                            samples
                                .entry((size, family, test, config))
                                .or_default()
                                .push(v);
                        }
                    }
                }
                eprintln!("round {round}, {size} entries: done");
            }
        }
        common_baseline::clear().expect("clearing the baseline");
    });

    let mut results = Vec::new();
    for &size in &SIZES {
        for family in FAMILIES {
            for test in TESTS {
                let none = &samples[&(size, family, test, "none")];
                for config in CONFIGS {
                    let v = &samples[&(size, family, test, config)];
                    let mut ratios: Vec<f64> = v.iter().zip(none).map(|(x, n)| x / n).collect();
                    let mut abs = v.clone();
                    results.push(json!({
                        "size": size, "family": family, "test": test, "config": config,
                        "median": median(&mut abs), "ratio": median(&mut ratios),
                        "samples": v,
                    }));
                }
            }
        }
    }
    let out = json!({"rounds": rounds, "ms_per_run": d.as_millis() as u64, "results": results});
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/netpol-bench");
    std::fs::create_dir_all(&dir).expect("creating target/netpol-bench");
    std::fs::write(dir.join("throughput.json"), out.to_string()).expect("writing throughput.json");
    eprintln!("throughput: {} results written", results.len());
}
