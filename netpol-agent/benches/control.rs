//! Control plane, netpol against the kube-router-style baseline (`cargo
//! xtask bench control`, as root): the time from a changed snapshot to
//! enforced state, on the seeded cluster of the compiler bench (10,000
//! pods, 110 local, 1,000 policies).
//!
//! - Full apply: netpol compiles, diffs against nothing and writes every
//!   entry into real BPF maps; the baseline renders its texts and runs one
//!   kube-router sync (`iptables-save`, `ipset restore` per family,
//!   `iptables-restore` + `ip6tables-restore`) into empty tables, on the
//!   legacy and on the nft backend.
//! - One pod's labels change: netpol's incremental update plus the map
//!   writes of its diff; kube-router answers any pod event with a full
//!   sync, so the baseline renders and restores everything again, over its
//!   previous state.
//!
//! Rounds interleave the contenders, so drift of this shared machine hits
//! all of them alike. The process moves into a network namespace of its own
//! first: the host's iptables and ipsets are never touched. Results go to
//! `target/netpol-bench/control.json` for xtask's table.
mod common;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{cluster, relabelled};
use netpol_agent::{
    Datapath, DatapathConfig,
    compiler::{Compiled, Compiler, IdAllocation, diff},
    model::{ObjectRef, Snapshot},
};
use netpol_testkit::{
    baseline::{
        self,
        restore::{self, Backend},
    },
    datapath::TempBpffs,
};
use serde_json::json;

/// Full applies of each contender.
const FULL_ROUNDS: usize = 5;
/// Baseline syncs after a label change, per backend.
const LABEL_ROUNDS: usize = 7;
/// netpol updates per baseline sync (they are thousands of times shorter).
const NETPOL_PER_ROUND: usize = 30;
/// netpol label changes with no baseline running in between.
const NETPOL_ALONE: usize = 400;

/// CPU time of the calling thread (user + system, map writes included).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the
    // call; CLOCK_THREAD_CPUTIME_ID needs nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50, p99, min, max in ms.
fn summary(samples: &[Duration]) -> serde_json::Value {
    let mut s = samples.to_vec();
    s.sort();
    let p = |q: f64| ms(s[((s.len() as f64 - 1.0) * q).round() as usize]);
    json!({"n": s.len(), "p50": p(0.5), "p99": p(0.99), "min": p(0.0), "max": p(1.0)})
}

/// Local pods get made-up interface indexes: map writes do not need the
/// interfaces, only their numbers.
fn interfaces(s: &Snapshot) -> BTreeMap<ObjectRef, u32> {
    s.pods
        .values()
        .filter(|p| p.node_name.as_deref() == Some("node-0"))
        .zip(1000u32..)
        .map(|(p, i)| (p.id.clone(), i))
        .collect()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` asks every bench target for its names.
        return;
    }
    assert!(
        netpol_agent::privileges::is_root(),
        "the control bench loads BPF maps and runs iptables in a private network namespace: \
         run it as root (cargo xtask bench control)"
    );
    // Still one thread here: the whole process moves, and every tool it
    // starts inherits the private namespace.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");

    let s = cluster();
    let (s_pod, ch_pod) = relabelled(&s);
    let (_, ch_back) = relabelled(&s_pod);
    let ifaces = interfaces(&s);
    let bpffs = TempBpffs::new();
    let mut dp = Datapath::load(&DatapathConfig {
        bpffs: bpffs.path().to_owned(),
        ..DatapathConfig::default()
    })
    .expect("loading the datapath (NETPOL_EBPF_OBJECT)");

    let texts = baseline::generate(&s).expect("baseline");
    for (name, f) in [("ipv4", &texts.v4), ("ipv6", &texts.v6)] {
        eprintln!(
            "baseline {name}: {} sets, {} set entries, {} chains, {} rules; ipset text {} KB, \
             iptables text {} KB",
            f.stats.sets,
            f.stats.set_entries,
            f.stats.chains,
            f.stats.rules,
            f.ipset.len() / 1024,
            f.iptables.len() / 1024
        );
    }

    // Full apply, interleaved.
    let mut netpol_full = Vec::new();
    let mut netpol_ops = 0;
    let mut base_full: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut base_steps: BTreeMap<&str, Vec<restore::SyncTimes>> = BTreeMap::new();
    let mut base_render: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut base_restore: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for round in 0..FULL_ROUNDS {
        let t = Instant::now();
        let inc = Compiler::new(&s, &IdAllocation::default());
        let ops: Vec<_> = diff(&Compiled::default(), inc.compiled()).raw().collect();
        dp.writer().apply(&ops, &ifaces).expect("full apply");
        netpol_full.push(t.elapsed());
        netpol_ops = ops.len();
        // Back to empty maps for the next round (not timed).
        let back: Vec<_> = diff(inc.compiled(), &Compiled::default()).raw().collect();
        dp.writer()
            .apply(&back, &ifaces)
            .expect("emptying the maps");

        for backend in Backend::ALL {
            restore::clear().expect("clear");
            let t = Instant::now();
            let b = baseline::generate(&s).expect("baseline");
            let render = t.elapsed();
            let steps = restore::sync(&b, backend).expect("baseline sync");
            base_full
                .entry(backend.name())
                .or_default()
                .push(t.elapsed());
            base_render.entry(backend.name()).or_default().push(render);
            base_restore
                .entry(backend.name())
                .or_default()
                .push(steps.total());
            base_steps.entry(backend.name()).or_default().push(steps);
        }
        eprintln!(
            "full apply, round {round}: netpol {:.1} ms, legacy {:.0} ms, nft {:.0} ms",
            ms(netpol_full[round]),
            ms(base_full["legacy"][round]),
            ms(base_full["nft"][round])
        );
    }

    // One pod's labels, back and forth; netpol keeps its maps, each
    // baseline its previous sync. First netpol alone, as on a node; its
    // thread's CPU time beside the wall time tells the work from the
    // preemption a shared machine adds.
    let mut inc = Compiler::new(&s, &IdAllocation::default());
    let ops: Vec<_> = diff(&Compiled::default(), inc.compiled()).raw().collect();
    dp.writer().apply(&ops, &ifaces).expect("full apply");
    let mut flip = false;
    let (mut alone, mut alone_cpu) = (Vec::new(), Vec::new());
    for _ in 0..NETPOL_ALONE {
        flip = !flip;
        let (snap, ch) = if flip {
            (&s_pod, &ch_pod)
        } else {
            (&s, &ch_back)
        };
        let (t, c) = (Instant::now(), thread_cpu());
        let d = inc.update(snap, ch);
        let ops: Vec<_> = d.raw().collect();
        dp.writer().apply(&ops, &ifaces).expect("label change");
        alone.push(t.elapsed());
        alone_cpu.push(thread_cpu().saturating_sub(c));
    }
    // Then interleaved with the baseline's syncs.
    let mut netpol_label = Vec::new();
    let mut label_ops = 0;
    let mut base_label: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for backend in Backend::ALL {
        restore::clear().expect("clear");
        restore::sync(&baseline::generate(&s).expect("baseline"), backend).expect("baseline sync");
        for _ in 0..LABEL_ROUNDS {
            for _ in 0..NETPOL_PER_ROUND {
                flip = !flip;
                let (snap, ch) = if flip {
                    (&s_pod, &ch_pod)
                } else {
                    (&s, &ch_back)
                };
                let t = Instant::now();
                let d = inc.update(snap, ch);
                let ops: Vec<_> = d.raw().collect();
                dp.writer().apply(&ops, &ifaces).expect("label change");
                netpol_label.push(t.elapsed());
                label_ops = label_ops.max(ops.len());
            }
            flip = !flip;
            let snap = if flip { &s_pod } else { &s };
            let t = Instant::now();
            let b = baseline::generate(snap).expect("baseline");
            restore::sync(&b, backend).expect("baseline sync");
            base_label
                .entry(backend.name())
                .or_default()
                .push(t.elapsed());
        }
    }
    restore::clear().expect("clear");

    let steps = |v: &[restore::SyncTimes]| {
        let f = |g: fn(&restore::SyncTimes) -> Duration| {
            summary(&v.iter().map(g).collect::<Vec<_>>())["p50"].clone()
        };
        json!({"save": f(|t| t.save), "ipset": f(|t| t.ipset), "iptables": f(|t| t.iptables)})
    };
    let stats = |f: &baseline::FamilyRules| {
        json!({"sets": f.stats.sets, "set_entries": f.stats.set_entries,
               "chains": f.stats.chains, "rules": f.stats.rules,
               "ipset_bytes": f.ipset.len(), "iptables_bytes": f.iptables.len()})
    };
    let sizes = Compiler::new(&s, &IdAllocation::default())
        .compiled()
        .sizes();
    let out = json!({
        "cluster": {"pods": s.pods.len(), "local_pods": ifaces.len(), "policies": s.policies.len(),
                    "namespaces": s.namespaces.len()},
        "netpol": {"full": summary(&netpol_full), "full_ops": netpol_ops,
                   "label": summary(&alone), "label_cpu": summary(&alone_cpu),
                   "label_interleaved": summary(&netpol_label), "label_ops": label_ops,
                   "policy_v4": sizes.entries.policy_v4, "policy_v6": sizes.entries.policy_v6},
        "baseline": {
            "ipv4": stats(&texts.v4), "ipv6": stats(&texts.v6),
            "legacy": {"full": summary(&base_full["legacy"]), "steps": steps(&base_steps["legacy"]),
                       "render": summary(&base_render["legacy"]),
                       "restore": summary(&base_restore["legacy"]),
                       "label": summary(&base_label["legacy"])},
            "nft": {"full": summary(&base_full["nft"]), "steps": steps(&base_steps["nft"]),
                    "render": summary(&base_render["nft"]),
                    "restore": summary(&base_restore["nft"]),
                    "label": summary(&base_label["nft"])},
        },
    });
    eprintln!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/netpol-bench");
    std::fs::create_dir_all(&dir).expect("creating target/netpol-bench");
    std::fs::write(dir.join("control.json"), out.to_string()).expect("writing control.json");
}
