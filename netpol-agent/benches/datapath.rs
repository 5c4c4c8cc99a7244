//! Per-packet cost of the TC programs through BPF_PROG_TEST_RUN (`cargo
//! xtask bench datapath`, as root).
//!
//! For each family and policy size (10, 1,000, 100,000 LPM entries of the
//! endpoint's ingress), three paths of `to_pod`: an established flow (the
//! conntrack entry exists), a new flow that is denied, and a new flow that
//! is allowed (the bench object's switch keeps it from being tracked, so
//! every repeat takes the policy path); beside them two references built
//! into the bench object: `bench_ok` (returns at once) and `bench_lookup`
//! (parses the same headers, one hash lookup). The kernel times `repeat`
//! runs itself, so criterion gets the program's own time.
use std::{net::Ipv6Addr, path::PathBuf, time::Duration};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use criterion::Criterion;
use etherparse::PacketBuilder;
use netpol_agent::{Datapath, DatapathConfig, MapSizes, datapath::writer::KernelOp};
use netpol_common::{
    EndpointInfo, GlobalConfig, PolicyKeyV4, PolicyKeyV6, PolicyValue, PortKey, PortValue,
    SELECTOR_BITS, config_flags, direction, endpoint_flags, policy_selector, programs,
};
use netpol_testkit::{Netns, datapath::TempBpffs, sh};

const ENDPOINT: u32 = 1;
const RULESET: u32 = 2;
const SIZES: [usize; 3] = [10, 1_000, 100_000];

/// A small deterministic generator (xorshift): the same prefixes every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const fn name(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }
}

/// The policy entries: `n - 1` random prefixes (/16 to /32 or /128 in the
/// family's range) plus the allowed peer's /32 (/128); the denied peer is
/// outside every prefix.
fn policy_ops(family: Family, n: usize) -> Vec<KernelOp> {
    let selector = policy_selector(ENDPOINT, direction::INGRESS);
    let value = PolicyValue { ruleset: RULESET };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut ops = Vec::with_capacity(n);
    for i in 0..n {
        match family {
            Family::V4 => {
                let (len, addr) = if i == 0 {
                    (32, [10, 0, 0, 2])
                } else {
                    let len = 16 + (rng.next() % 17) as u32;
                    let r = rng.next() as u32;
                    let a = (0x0a00_0000 | (r & 0x00ff_ffff)) & (u32::MAX << (32 - len));
                    (len, a.to_be_bytes())
                };
                ops.push(KernelOp::PolicyV4Upsert(
                    SELECTOR_BITS + len,
                    PolicyKeyV4 { selector, addr },
                    value,
                ));
            }
            Family::V6 => {
                let (len, addr) = if i == 0 {
                    (128, "fd00::2".parse::<Ipv6Addr>().expect("addr").octets())
                } else {
                    let len = 16 + (rng.next() % 113) as u32;
                    let r = (u128::from(rng.next()) << 64) | u128::from(rng.next());
                    let a = (0xfd00_u128 << 112 | (r >> 16)) & (u128::MAX << (128 - len));
                    (len, a.to_be_bytes())
                };
                ops.push(KernelOp::PolicyV6Upsert(
                    SELECTOR_BITS + len,
                    PolicyKeyV6 { selector, addr },
                    value,
                ));
            }
        }
    }
    ops
}

fn frame(family: Family, allowed: bool) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = match family {
        // 11.x is outside 10/8: no generated prefix covers it.
        Family::V4 => eth.ipv4(
            if allowed {
                [10, 0, 0, 2]
            } else {
                [11, 0, 0, 2]
            },
            [10, 0, 0, 1],
            64,
        ),
        Family::V6 => {
            let src: Ipv6Addr = if allowed { "fd00::2" } else { "fe00::2" }
                .parse()
                .expect("addr");
            eth.ipv6(
                src.octets(),
                "fd00::1".parse::<Ipv6Addr>().expect("addr").octets(),
                64,
            )
        }
    };
    let mut out = Vec::new();
    ip.tcp(40000, 80, 1, 1024)
        .ack(1)
        .write(&mut out, &[])
        .expect("frame");
    out
}

fn ctx(ifindex: u32, ingress_ifindex: u32) -> [u8; 192] {
    let mut c = [0u8; 192];
    c[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    c[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

/// Total time of `iters` runs, measured by the kernel.
fn run(p: &SchedClassifier, frame: &[u8], ctx: &[u8], iters: u64) -> Duration {
    let mut left = iters;
    let mut total = Duration::ZERO;
    while left > 0 {
        let repeat = u32::try_from(left.min(1_000_000)).expect("fits");
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(ctx),
                repeat,
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        total += r.duration * repeat;
        left -= u64::from(repeat);
    }
    total
}

fn main() {
    assert!(
        netpol_agent::privileges::is_root(),
        "the datapath bench loads BPF programs: run it as root (cargo xtask bench datapath)"
    );
    let object = std::env::var_os("NETPOL_EBPF_BENCH_OBJECT")
        .map(PathBuf::from)
        .expect(
            "NETPOL_EBPF_BENCH_OBJECT is not set: run `cargo xtask bench datapath`, which builds \
         the bench object",
        );
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    let ns = Netns::new("npb");
    sh(
        "ip",
        &[
            "-n", &ns.name, "link", "add", "b0", "type", "veth", "peer", "name", "b1",
        ],
    );
    let mut insns = Vec::new();
    ns.enter();
    {
        let ifindex = nix::net::if_::if_nametoindex("b0").expect("b0");
        let fwd = nix::net::if_::if_nametoindex("b1").expect("b1");
        let ctx = ctx(ifindex, fwd);
        let mut group = c.benchmark_group("datapath");
        for family in [Family::V4, Family::V6] {
            for n in SIZES {
                let bpffs = TempBpffs::new();
                let mut dp = Datapath::load(&DatapathConfig {
                    bpffs: bpffs.path().to_owned(),
                    object: Some(object.clone()),
                    map_sizes: MapSizes {
                        policy_v4: 2 * 100_000,
                        policy_v6: 2 * 100_000,
                        conntrack: 65_536,
                        ..MapSizes::default()
                    },
                    ..DatapathConfig::default()
                })
                .expect("load the bench object");
                let mut ops = vec![
                    KernelOp::EndpointUpsert(
                        ifindex,
                        EndpointInfo {
                            id: ENDPOINT,
                            flags: endpoint_flags::INGRESS_ISOLATED,
                            ..EndpointInfo::default()
                        },
                    ),
                    KernelOp::PortUpsert(
                        64,
                        PortKey {
                            ruleset: RULESET,
                            protocol: 6,
                            _pad: 0,
                            port: 80u16.to_be_bytes(),
                        },
                        PortValue { allow: 1 },
                    ),
                ];
                ops.extend(policy_ops(family, n));
                dp.writer().apply_kernel(&ops).expect("fill maps");
                let (allowed, denied) = (frame(family, true), frame(family, false));
                let fam = family.name();

                dp.set_global(GlobalConfig::default()).expect("config");
                let to_pod = dp.program(programs::TO_POD).expect("to_pod");
                // The first run admits and tracks the flow.
                run(to_pod, &allowed, &ctx, 1);
                group.bench_function(format!("established/{fam}/{n}"), |b| {
                    b.iter_custom(|iters| run(to_pod, &allowed, &ctx, iters));
                });
                group.bench_function(format!("new_denied/{fam}/{n}"), |b| {
                    b.iter_custom(|iters| run(to_pod, &denied, &ctx, iters));
                });
                dp.set_global(GlobalConfig {
                    flags: config_flags::BENCH_NO_TRACK,
                    ..GlobalConfig::default()
                })
                .expect("config");
                let to_pod = dp.program(programs::TO_POD).expect("to_pod");
                // A fresh flow (another source port) that is never tracked.
                let mut fresh = allowed.clone();
                let sport_at = if family == Family::V4 { 34 } else { 54 };
                fresh[sport_at..sport_at + 2].copy_from_slice(&40001u16.to_be_bytes());
                group.bench_function(format!("new_allowed/{fam}/{n}"), |b| {
                    b.iter_custom(|iters| run(to_pod, &fresh, &ctx, iters));
                });

                if n == SIZES[0] {
                    for name in ["bench_ok", "bench_lookup"] {
                        let p = dp.load_extra(name).expect("reference program");
                        group.bench_function(format!("{name}/{fam}"), |b| {
                            b.iter_custom(|iters| run(p, &allowed, &ctx, iters));
                        });
                    }
                }
                if family == Family::V4 && n == SIZES[0] {
                    for name in [
                        programs::FROM_POD,
                        programs::TO_POD,
                        programs::LEAVE_NODE,
                        programs::LEAVE_NODE_L3,
                    ] {
                        let count = dp
                            .program(name)
                            .expect("program")
                            .info()
                            .ok()
                            .and_then(|i| i.verified_instruction_count());
                        insns.push(format!("\"{name}\": {}", count.unwrap_or(0)));
                    }
                }
            }
        }
        group.finish();
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/netpol-bench");
    std::fs::create_dir_all(&out).expect("output folder");
    std::fs::write(
        out.join("verified_insns.json"),
        format!("{{{}}}\n", insns.join(", ")),
    )
    .expect("write verified_insns.json");
    c.final_summary();
}
