//! How soon a new pod is enforced once its addresses reach the agent
//! (`cargo bench -p netpol-agent --bench agent`, as root). Goal: 50 ms.
//!
//! Each iteration does what a CNI and the API server do for one pod on a
//! bridge (flannel-like): a veth appears in the node (the agent attaches
//! it, fail-closed), then the pod's manifest with its addresses is written.
//! The time measured runs from that write until the agent reports the
//! pod's interface bound and programmed: the files source, the 10 ms
//! debounce, compile, diff, apply and the binding together.
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use netpol_testkit::{
    agent::{Running, interface},
    datapath::TempBpffs,
    manifests::{BASE, Manifests, pod_manifest},
    topology::{Topology, node, pod},
};

fn main() {
    if !netpol_agent::privileges::is_root() {
        eprintln!("the agent bench attaches BPF programs in network namespaces: run it as root");
        return;
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let topo = Topology::Bridge;
    let node = node(topo, true);
    let bpffs = TempBpffs::new();
    let m = Manifests::new();
    m.write("00-base.yaml", BASE);
    let mut agent = Running::start(&node, bpffs.path(), &m);
    agent.wait_enforced(&m);

    let mut group = c.benchmark_group("agent");
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function("new_pod_enforced", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let p = pod(&node, topo, 2, true);
                agent.wait("the new veth attached", |s| {
                    interface(s, &p.host_if).is_some_and(|i| !i.programmed)
                });
                let start = Instant::now();
                m.write("p.yaml", &pod_manifest("p", &p));
                agent.wait("the pod enforced", |s| {
                    interface(s, &p.host_if).is_some_and(|i| i.programmed)
                });
                total += start.elapsed();
                std::fs::remove_file(m.0.join("p.yaml")).expect("removing the pod");
                let gone = p.host_if.clone();
                drop(p);
                agent.wait("the pod gone", |s| {
                    s.objects.pods == 0 && interface(s, &gone).is_none()
                });
            }
            total
        });
    });
    group.finish();
    drop(agent);
    c.final_summary();
}
