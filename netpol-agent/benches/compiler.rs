//! Compiler benchmark: a seeded cluster of 10,000 pods (110 on this node),
//! 1,000 policies and 200 namespaces. Measures the full compile, and the
//! update + diff after one pod's label change and after one policy edit,
//! both through the incremental [`Compiler`] (the agent's path) and as a
//! full recompile + diff for comparison. Prints map entry counts and bytes,
//! and p50/p99 of the one-change paths.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{cluster, port, relabelled};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use netpol_agent::compiler::{Changes, Compiled, Compiler, IdAllocation, compile, diff};
use netpol_agent::model::{PortSpec, Protocol, Snapshot};
use netpol_agent::provenance::{Inputs, State};

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
        sizes.entries.endpoints,
        sizes.entries.policy_v4,
        sizes.entries.policy_v6,
        sizes.entries.ports,
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
    // Staging: the edited policy waits staged (`s_staged`), then is
    // promoted (`s_pol`) or staged again.
    let mut s_staged = s_pol.clone();
    for id in &ch_pol.policies {
        if let Some(p) = s_staged
            .policies
            .get_mut(id)
            .and_then(|slot| slot.in_force.as_mut())
        {
            p.staging = netpol_agent::model::Staging::Staged;
        }
    }
    let staged = Compiler::new(&s_staged, &c_pol.ids);
    let ch_promote = Changes::between(&s_staged, &s_pol);
    {
        let mut i = staged.clone();
        i.update(&s_pol, &ch_promote);
        assert_eq!(
            i.compiled(),
            &compile(&s_pol, &staged.compiled().ids),
            "promotion != full"
        );
    }
    percentiles_with(
        "a staged policy promoted: Compiler::update (the kept staged view + diff)",
        || staged.clone(),
        |mut i| {
            black_box(i.update(&s_pol, &ch_promote));
            i
        },
    );
    let promoted = {
        let mut i = staged.clone();
        i.update(&s_pol, &ch_promote);
        i
    };
    let ch_stage = Changes::between(&s_pol, &s_staged);
    percentiles_with(
        "the policy staged again: Compiler::update (both views compiled whole + diff)",
        || promoted.clone(),
        |mut i| {
            black_box(i.update(&s_staged, &ch_stage));
            i
        },
    );
    // What the reconcile loop adds before `update`: the objects that
    // changed between the applied input and the new one.
    percentiles(
        "one pod's labels: Changes::between (the loop's change set)",
        || {
            black_box(Changes::between(&s, &s_pod));
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

    // ClusterNetworkPolicy: 100 of 25 rules per direction on the same
    // cluster; the NetworkPolicy-only compile again, in the same run, as
    // the baseline of the ratio.
    let s_cnp = common::with_cluster_policies(&s, 100);
    let c_cnp = compile(&s_cnp, &IdAllocation::default());
    let sizes = c_cnp.sizes();
    eprintln!(
        "with 100 ClusterNetworkPolicies: {} IPv4 + {} IPv6 policy entries, {} port entries \
         ({} rule sets), {} of {} local pods under one",
        sizes.entries.policy_v4,
        sizes.entries.policy_v6,
        sizes.entries.ports,
        c_cnp.rulesets.len(),
        c_cnp
            .endpoints
            .values()
            .filter(|e| e.hairpin_judged)
            .count(),
        c_cnp.endpoints.len()
    );
    let median = |f: &mut dyn FnMut()| {
        let mut v: Vec<Duration> = (0..11)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        v.sort();
        v[v.len() / 2]
    };
    let np_only = median(&mut || {
        black_box(compile(&s, &base.ids));
    });
    let tiered = median(&mut || {
        black_box(compile(&s_cnp, &c_cnp.ids));
    });
    eprintln!(
        "full compile, NetworkPolicy only: p50 {np_only:?}; with 100 ClusterNetworkPolicies: \
         p50 {tiered:?}; ratio {:.2} (goal <= 2)",
        tiered.as_secs_f64() / np_only.as_secs_f64()
    );
    let inc_cnp = Compiler::new(&s_cnp, &c_cnp.ids);
    let mut s_cnp2 = s_cnp.clone();
    if let Some(p) = s_cnp2
        .cluster_policies
        .get_mut("cnp-0")
        .and_then(|slot| slot.in_force.as_mut())
    {
        p.ingress[0].ports = Some(vec![netpol_agent::model::ClusterPort::Ports {
            protocol: Protocol::Tcp,
            first: 7000,
            last: 7010,
        }]);
    }
    let ch_cnp = Changes::between(&s_cnp, &s_cnp2);
    // A full compile each: a few samples, not 200.
    let mut edits: Vec<Duration> = (0..5)
        .map(|_| {
            let mut i = inc_cnp.clone();
            let t = Instant::now();
            black_box(i.update(&s_cnp2, &ch_cnp));
            t.elapsed()
        })
        .collect();
    edits.sort();
    eprintln!(
        "one ClusterNetworkPolicy edit: Compiler::update (every local pod some ClusterNetworkPolicy \
         applies to) + diff: median of 5 {:?}",
        edits[2]
    );

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
