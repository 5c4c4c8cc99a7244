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
//! Configurations: no filtering (twice: the second, `none-b`, is the A/A
//! control that shows how finely the bench resolves), netpol (programs on
//! both host veths; a second netpol lane, `netpol-10`, keeps 10 entries
//! throughout, so that N entries are compared with 10 inside each cycle;
//! a third, `netpol-cnp`, has the same policies plus 100
//! `ClusterNetworkPolicies` applying to both pods, and a fourth,
//! `netpol-staged`, the same policies plus staged ones that change both
//! pods' staged view, each compared with `netpol` inside each cycle),
//! and the baseline restored by `iptables-nft-restore`
//! and by `iptables-legacy-restore`. Each configuration has a topology of
//! its own (a lane: node namespace, server, client), all built alike, so
//! none is ever switched on or off: the bench alternates between lanes in
//! short runs (a cycle runs each configuration once, the order rotating
//! between cycles), and every ratio is to the same cycle's no-filter run.
//! This machine's speed drifts by tens of percent over seconds; within a
//! cycle of about a second it mostly does not. Results are medians (and
//! quartiles) over all cycles of all rounds, in
//! `target/netpol-bench/throughput.json`, with the kernel's own run time
//! of netpol's programs during one extra run per test.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use netpol_agent::{
    Datapath,
    compiler::{self, Compiled, IdAllocation},
    model::{LabelSelector, NetworkPolicy, ObjectRef, Peer, PolicySlot, Rule, Snapshot},
};
use netpol_testkit::{
    Netns,
    baseline::{
        self,
        restore::{self, Backend},
    },
    datapath::{TempBpffs, enforce},
    manifests::{BASE, pod_manifest, snapshot as of_manifests},
    topology::{Pod, Topology, node, pod},
};
use serde_json::json;

const SIZES: [usize; 3] = [10, 1_000, 10_000];
const PORT_RR: u16 = 5001;
const PORT_CRR: u16 = 5002;
const PORT_STREAM: u16 = 5003;
const TESTS: [&str; 3] = ["tcp_rr", "tcp_crr", "tcp_stream"];
/// `none` first: ratios are to it. `none-b` is a second unfiltered lane,
/// the A/A control: its ratio to `none` is the bench's own resolution.
/// `netpol-10` holds 10 entries throughout: `netpol` at N entries is
/// compared with it inside each cycle ([`OVER_10`]), not across the
/// minutes between the sizes' runs.
const CONFIGS: [&str; 8] = [
    "none",
    "none-b",
    "netpol",
    "netpol-10",
    "netpol-cnp",
    "netpol-staged",
    "iptables-nft",
    "iptables-legacy",
];
const FAMILIES: [&str; 2] = ["ipv4", "ipv6"];
/// The samples of `netpol` ÷ `netpol-10`, each from one cycle.
const OVER_10: &str = "netpol-over-10";
/// The samples of `netpol-cnp` (the same policies plus
/// [`CLUSTER_POLICIES`] `ClusterNetworkPolicies` applying to both pods) ÷
/// `netpol`, each from one cycle.
const CNP_OVER_NETPOL: &str = "netpol-cnp-over-netpol";
/// `ClusterNetworkPolicies` of the `netpol-cnp` lane.
const CLUSTER_POLICIES: usize = 100;
/// The samples of `netpol-staged` ([`with_staged_policies`]) ÷ `netpol`,
/// each from one cycle.
const STAGED_OVER_NETPOL: &str = "netpol-staged-over-netpol";

/// `snap` plus two staged `NetworkPolicies`: the server's ingress and the
/// client's egress also admit 192.0.2.0/24 and 2001:db8:ffff::/48 (no
/// address of the pair). Each changes what its direction allows, so both
/// pods' staged views differ from the enforced ones and every new
/// connection of the pair is judged against the staged entries as well;
/// both views allow the pair, so nothing is reported. Every endpoint of
/// the lane is touched: an upper bound for #26's "staged policies on 10%
/// of the endpoints", whose other endpoints pay nothing.
fn with_staged_policies(snap: &Snapshot) -> Snapshot {
    let mut s = snap.clone();
    let peers = || {
        ["192.0.2.0/24", "2001:db8:ffff::/48"]
            .iter()
            .map(|c| Peer::IpBlock {
                cidr: c.parse().expect("cidr"),
                except: Vec::new(),
            })
            .collect::<Vec<_>>()
    };
    insert(
        &mut s,
        NetworkPolicy {
            id: ObjectRef::new("x", "staged-in"),
            pod_selector: selector("srv"),
            ingress: Some(vec![Rule {
                peers: peers(),
                ports: Vec::new(),
            }]),
            egress: None,
            staging: netpol_agent::model::Staging::Staged,
        },
    );
    insert(
        &mut s,
        NetworkPolicy {
            id: ObjectRef::new("x", "staged-out"),
            pod_selector: selector("cli"),
            ingress: None,
            egress: Some(vec![Rule {
                peers: peers(),
                ports: Vec::new(),
            }]),
            staging: netpol_agent::model::Staging::Staged,
        },
    );
    s
}

/// `snap` plus [`CLUSTER_POLICIES`] `ClusterNetworkPolicies` of 25 rules
/// per direction applying to every pod, both tiers, Accept/Deny/Pass in
/// turn, their peers networks of 198.18.0.0/15 and 2001:db8::/32 (none
/// the pair's), their ports none, TCP 443 + UDP 53, or a TCP range: every
/// connection of the pair goes through both tiers to `NetworkPolicy`.
fn with_cluster_policies(snap: &Snapshot) -> Snapshot {
    use netpol_agent::model::{
        Action, ClusterNetworkPolicy, ClusterPeer, ClusterPort, ClusterRule, Protocol, Subject,
        Tier,
    };
    let mut s = snap.clone();
    for i in 0..CLUSTER_POLICIES {
        let rule = |k: usize| {
            let n = i * 50 + k;
            let ports = match n % 3 {
                0 => None,
                1 => Some(vec![
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
                _ => Some(vec![ClusterPort::Ports {
                    protocol: Protocol::Tcp,
                    first: 1000,
                    last: 3000,
                }]),
            };
            ClusterRule {
                name: format!("r{k}"),
                action: [Action::Accept, Action::Deny, Action::Pass][n % 3],
                peers: vec![ClusterPeer::Networks(vec![
                    format!("198.18.{}.{}/32", n / 256 % 256, n % 256)
                        .parse()
                        .expect("cidr"),
                    format!("2001:db8::{n:x}/128").parse().expect("cidr"),
                ])],
                ports,
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
            subject: Subject::Namespaces(LabelSelector::default()),
            ingress: (0..25).map(rule).collect(),
            egress: (25..50).map(rule).collect(),
            staging: netpol_agent::model::Staging::Enforced,
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

fn rounds() -> usize {
    std::env::var("NETPOL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// Runs of every configuration per test, round and size, interleaved.
fn slices() -> usize {
    std::env::var("NETPOL_BENCH_SLICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

fn duration() -> Duration {
    let ms = std::env::var("NETPOL_BENCH_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
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
fn snapshot(server: &Pod, client: &Pod, n: usize) -> Snapshot {
    let text = format!(
        "{}---\n{}---\n{}",
        BASE,
        pod_manifest("srv", server),
        pod_manifest("cli", client)
    );
    let mut s = of_manifests(&text);
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
                staging: netpol_agent::model::Staging::Enforced,
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
                staging: netpol_agent::model::Staging::Enforced,
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
            staging: netpol_agent::model::Staging::Enforced,
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
            staging: netpol_agent::model::Staging::Enforced,
        },
    );
    s
}

/// The servers, on both of the pod's addresses, for the whole run.
fn serve(p: &Pod) {
    for ip in p.addresses() {
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

/// What one run moved: transactions (rr, crr) or bytes (stream), and the
/// seconds it took.
struct Run {
    count: f64,
    secs: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.count / self.secs
    }
}

/// One run from the client's namespace; `None` when nothing got through.
fn measure(client: &Pod, server: IpAddr, test: &str, d: Duration) -> Option<Run> {
    client
        .ns
        .run(|| {
            pin();
            let connect = |port| {
                let s = TcpStream::connect_timeout(
                    &SocketAddr::new(server, port),
                    Duration::from_secs(2),
                )
                .ok()?;
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                Some(s)
            };
            let (count, start) = match test {
                "tcp_rr" => {
                    let s = connect(PORT_RR)?;
                    let mut b = [1u8; 1];
                    let start = Instant::now();
                    let mut n: u64 = 0;
                    while !n.is_multiple_of(64) || start.elapsed() < d {
                        (&s).write_all(&b).ok()?;
                        (&s).read_exact(&mut b).ok()?;
                        n += 1;
                    }
                    (n, start)
                }
                "tcp_crr" => {
                    let start = Instant::now();
                    let mut n: u64 = 0;
                    while start.elapsed() < d {
                        let s = connect(PORT_CRR)?;
                        let mut b = [1u8; 1];
                        (&s).write_all(&b).ok()?;
                        (&s).read_exact(&mut b).ok()?;
                        // Until the server's FIN: it closes first.
                        let _ = (&s).read(&mut b);
                        n += 1;
                    }
                    (n, start)
                }
                _ => {
                    let s = connect(PORT_STREAM)?;
                    let buf = vec![7u8; 1 << 16];
                    let start = Instant::now();
                    while start.elapsed() < d {
                        (&s).write_all(&buf).ok()?;
                    }
                    let _ = s.shutdown(std::net::Shutdown::Write);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut total = [0u8; 8];
                    (&s).read_exact(&mut total).ok()?;
                    (u64::from_le_bytes(total), start)
                }
            };
            Some(Run {
                count: count as f64,
                secs: start.elapsed().as_secs_f64(),
            })
        })
        .filter(|r| r.count > 0.0)
}

/// A run this shared machine stalls past the timeouts gets two more
/// tries; a policy that denies the pair fails all three.
fn measure_retrying(lane: &Lane, family: usize, test: &str, d: Duration, what: &str) -> Run {
    (0..3)
        .find_map(|_| measure(&lane.client, lane.addrs[family], test, d))
        .unwrap_or_else(|| {
            panic!(
                "{what}, {} {test}: no traffic got through (the allowing policy must admit the \
                 pair)",
                FAMILIES[family]
            )
        })
}

fn median(v: &mut [f64]) -> f64 {
    quantile(v, 0.5)
}

/// The `q` quantile, interpolated between the samples around it.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// One configuration's own topology: a node namespace with a server pod
/// and a client pod, routed. Every lane has the same addresses, so one
/// snapshot (and one baseline rendering) describes them all.
struct Lane {
    config: &'static str,
    node: Netns,
    server: Pod,
    client: Pod,
    addrs: Vec<IpAddr>,
}

impl Lane {
    /// Loads netpol in the lane's node namespace, enforcing `compiled` on
    /// its two pods' host interfaces.
    fn enforce(
        &self,
        bpffs: &TempBpffs,
        compiled: &Compiled,
    ) -> (Datapath, BTreeMap<ObjectRef, u32>) {
        self.node.run(|| {
            enforce(
                bpffs,
                compiled,
                &[
                    (ObjectRef::new("x", "srv"), self.server.host_if.as_str()),
                    (ObjectRef::new("x", "cli"), self.client.host_if.as_str()),
                ],
            )
        })
    }

    fn new(config: &'static str) -> Self {
        let node = node(Topology::Routed, true);
        let server = pod(&node, Topology::Routed, 1, true);
        let client = pod(&node, Topology::Routed, 2, true);
        serve(&server);
        // TIME_WAIT entries of the crr runs would fill the node's
        // conntrack table under the baseline; netpol tracks in its own map.
        node.run(|| {
            let _ = std::fs::write(
                "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait",
                "1",
            );
        });
        let addrs = server.addresses();
        Self {
            config,
            node,
            server,
            client,
            addrs,
        }
    }
}

/// Entries, family, test.
type Case = (usize, &'static str, &'static str);

/// netpol's programs during the stats runs of a case, summed over rounds.
#[derive(Default)]
struct Attribution {
    /// Kernel-measured run time of `from_pod` and `to_pod`.
    program_secs: f64,
    program_runs: f64,
    /// Transactions (rr, crr) or bytes (stream) those runs moved, and the
    /// wall time they took.
    count: f64,
    secs: f64,
}

/// Run time and count of netpol's two pod programs.
fn program_stats(dp: &mut Datapath) -> (Duration, u64) {
    ["from_pod", "to_pod"]
        .iter()
        .fold((Duration::ZERO, 0), |(time, count), name| {
            let info = dp
                .program(name)
                .expect("program")
                .info()
                .expect("program info");
            (time + info.run_time(), count + info.run_count())
        })
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
    // Stats left on for every program would charge their clock reads to
    // the netpol lane's ratios, not only to the stats runs.
    if std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() != "0")
    {
        eprintln!(
            "warning: kernel.bpf_stats_enabled is on: netpol's ratios include its cost \
             (sysctl -w kernel.bpf_stats_enabled=0)"
        );
    }
    let (rounds, slices, d) = (rounds(), slices(), duration());
    let lanes: Vec<Lane> = CONFIGS.iter().map(|&c| Lane::new(c)).collect();
    let lane = |config: &str| {
        lanes
            .iter()
            .find(|l| l.config == config)
            .expect("a lane per configuration")
    };
    let netpol = lane("netpol");
    let reference = lane("netpol-10");
    let tiered = lane("netpol-cnp");
    let staged = lane("netpol-staged");
    let bpffs = TempBpffs::new();
    let bpffs_10 = TempBpffs::new();
    let bpffs_cnp = TempBpffs::new();
    let bpffs_staged = TempBpffs::new();
    let snaps: Vec<Snapshot> = SIZES
        .iter()
        .map(|&n| snapshot(&netpol.server, &netpol.client, n))
        .collect();
    let snaps_cnp: Vec<Snapshot> = snaps.iter().map(with_cluster_policies).collect();
    // Attached from the start, policies written per size below (the same
    // addresses in every lane: one snapshot describes them all).
    let (mut dp_cnp, ifaces_cnp) = tiered.enforce(&bpffs_cnp, &Compiled::default());
    let mut written_cnp = Compiled::default();
    let snaps_staged: Vec<Snapshot> = snaps.iter().map(with_staged_policies).collect();
    let (mut dp_staged, ifaces_staged) = staged.enforce(&bpffs_staged, &Compiled::default());
    let mut written_staged = Compiled::default();

    // samples[(size, family, test, config)]: one (rate, ratio to the same
    // cycle's no-filter run) per cycle.
    let mut samples: BTreeMap<(Case, &str), Vec<(f64, f64)>> = BTreeMap::new();
    let mut attribution: BTreeMap<Case, Attribution> = BTreeMap::new();
    let _reference = reference.enforce(
        &bpffs_10,
        &compiler::compile(
            &snapshot(&reference.server, &reference.client, SIZES[0]),
            &IdAllocation::default(),
        ),
    );
    // Where the per-cycle ratio netpol ÷ netpol-10 reads its rates.
    let at = |name| {
        CONFIGS
            .iter()
            .position(|c| *c == name)
            .expect("a configuration")
    };
    let (at_netpol, at_reference, at_cnp, at_staged) = (
        at("netpol"),
        at("netpol-10"),
        at("netpol-cnp"),
        at("netpol-staged"),
    );
    netpol.node.run(|| {
        // Attached from the start, policies written per size below.
        let (mut dp, ifaces) = netpol.enforce(&bpffs, &Compiled::default());
        let mut written = Compiled::default();
        let mut cycle = 0usize;
        for round in 0..rounds {
            for (si, &size) in SIZES.iter().enumerate() {
                let snap = &snaps[si];
                let compiled = compiler::compile(snap, &written.ids);
                let ops: Vec<_> = compiler::diff(&written, &compiled).raw().collect();
                dp.writer().apply(&ops, &ifaces).expect("map writes");
                written = compiled;
                let compiled = compiler::compile(&snaps_cnp[si], &written_cnp.ids);
                assert!(
                    compiled.endpoints.values().all(|e| e.hairpin_judged),
                    "the ClusterNetworkPolicies apply to both pods"
                );
                let ops: Vec<_> = compiler::diff(&written_cnp, &compiled).raw().collect();
                dp_cnp
                    .writer()
                    .apply(&ops, &ifaces_cnp)
                    .expect("map writes (ClusterNetworkPolicies)");
                written_cnp = compiled;
                let compiled = compiler::compile(&snaps_staged[si], &written_staged.ids);
                let judged = |pod: &str, d: fn(&compiler::Endpoint) -> Option<bool>| {
                    compiled
                        .endpoints
                        .get(&ObjectRef::new("x", pod))
                        .and_then(d)
                        .is_some()
                };
                assert!(
                    judged("srv", |e| e.staged_ingress) && judged("cli", |e| e.staged_egress),
                    "the staged policies change both pods' staged views"
                );
                let ops: Vec<_> = compiler::diff(&written_staged, &compiled).raw().collect();
                dp_staged
                    .writer()
                    .apply(&ops, &ifaces_staged)
                    .expect("map writes (staged policies)");
                written_staged = compiled;
                let rules = baseline::generate(snap).expect("baseline");
                for (config, backend) in [
                    ("iptables-nft", Backend::Nft),
                    ("iptables-legacy", Backend::Legacy),
                ] {
                    lane(config)
                        .node
                        .run(|| restore::sync(&rules, backend))
                        .unwrap_or_else(|e| panic!("{config} sync: {e}"));
                }
                for (fi, family) in FAMILIES.iter().enumerate() {
                    for test in TESTS {
                        for _ in 0..slices {
                            // Rotate the order: no configuration always
                            // runs first, or right after another.
                            let mut rates = [0.0; CONFIGS.len()];
                            for c in 0..CONFIGS.len() {
                                let ci = (c + cycle) % CONFIGS.len();
                                let what = format!("{}, {size} entries", CONFIGS[ci]);
                                rates[ci] = measure_retrying(&lanes[ci], fi, test, d, &what).rate();
                            }
                            cycle += 1;
                            for (ci, config) in CONFIGS.iter().enumerate() {
                                samples
                                    .entry(((size, family, test), config))
                                    .or_default()
                                    .push((rates[ci], rates[ci] / rates[0]));
                            }
                            for (name, lane, to) in [
                                (OVER_10, at_netpol, at_reference),
                                (CNP_OVER_NETPOL, at_cnp, at_netpol),
                                (STAGED_OVER_NETPOL, at_staged, at_netpol),
                            ] {
                                let over = rates[lane] / rates[to];
                                samples
                                    .entry(((size, family, test), name))
                                    .or_default()
                                    .push((over, over));
                            }
                        }
                        // Where netpol's time goes: the kernel's run time of
                        // its programs (BPF_ENABLE_STATS, on for this run
                        // only, as it costs two clock reads per run).
                        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
                            .expect("BPF_ENABLE_STATS (kernel 5.8 and later)");
                        let before = program_stats(&mut dp);
                        let run = measure_retrying(netpol, fi, test, d, "netpol (stats)");
                        let after = program_stats(&mut dp);
                        drop(stats);
                        let a = attribution.entry((size, family, test)).or_default();
                        a.program_secs += (after.0 - before.0).as_secs_f64();
                        a.program_runs += (after.1 - before.1) as f64;
                        a.count += run.count;
                        a.secs += run.secs;
                    }
                }
                eprintln!("round {round}, {size} entries: done");
            }
        }
    });

    let mut results = Vec::new();
    for &size in &SIZES {
        for family in FAMILIES {
            for test in TESTS {
                for config in
                    CONFIGS
                        .iter()
                        .chain([&OVER_10, &CNP_OVER_NETPOL, &STAGED_OVER_NETPOL])
                {
                    let v = &samples[&((size, family, test), *config)];
                    let mut abs: Vec<f64> = v.iter().map(|s| s.0).collect();
                    let mut ratios: Vec<f64> = v.iter().map(|s| s.1).collect();
                    results.push(json!({
                        "size": size, "family": family, "test": test, "config": config,
                        "median": median(&mut abs), "ratio": median(&mut ratios),
                        "ratio_q1": quantile(&mut ratios, 0.25),
                        "ratio_q3": quantile(&mut ratios, 0.75),
                        "samples": abs,
                    }));
                }
                let a = &attribution[&(size, family, test)];
                results.push(json!({
                    "size": size, "family": family, "test": test, "config": "netpol-programs",
                    "program_secs": a.program_secs, "program_runs": a.program_runs,
                    "count": a.count, "secs": a.secs,
                }));
            }
        }
    }
    let out = json!({
        "rounds": rounds, "slices": slices, "ms_per_run": d.as_millis() as u64,
        "results": results,
    });
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/netpol-bench");
    std::fs::create_dir_all(&dir).expect("creating target/netpol-bench");
    std::fs::write(dir.join("throughput.json"), out.to_string()).expect("writing throughput.json");
    eprintln!("throughput: {} results written", results.len());
}
