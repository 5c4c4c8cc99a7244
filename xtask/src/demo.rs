//! `cargo xtask demo`: netpol on an example app, end to end.
//!
//! Builds the object and the agent, brings up `deploy/examples` (a shop and
//! its monitoring, dual-stack) in network namespaces behind a `cni0`-style
//! bridge, runs the real `netpol-agent run` in the node netns, and prints
//! which pod reaches which port, over IPv4 and IPv6, before and after the
//! example's NetworkPolicies. Everything it made is removed at the end.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    bootstrap, build_ebpf, cargo,
    conformance::{
        self, Job,
        probe::start_servers,
        scenario::{self, Family, PodSpec, Proto, Via},
        topology::{Kind, Topology},
    },
    root, run,
};

/// A server port as the matrix shows it: `pod:name`.
struct Target {
    label: String,
    pod: String,
    port: u16,
}

/// The named container ports of every pod, in manifest order.
fn targets(model: &conformance::Model) -> Vec<Target> {
    let mut out = Vec::new();
    for v in model.objects.values() {
        if v["kind"].as_str() != Some("Pod") {
            continue;
        }
        let pod = format!(
            "{}/{}",
            v["metadata"]["namespace"].as_str().unwrap_or(""),
            v["metadata"]["name"].as_str().unwrap_or("")
        );
        let short = v["metadata"]["name"].as_str().unwrap_or("").to_owned();
        for c in v["spec"]["containers"].as_sequence().into_iter().flatten() {
            for p in c["ports"].as_sequence().into_iter().flatten() {
                let port = p["containerPort"]
                    .as_u64()
                    .and_then(|x| u16::try_from(x).ok());
                let name = p["name"].as_str().unwrap_or("");
                if let Some(port) = port {
                    out.push(Target {
                        label: format!("{short}:{name}"),
                        pod: pod.clone(),
                        port,
                    });
                }
            }
        }
    }
    out
}

fn colour() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(1) == 1 }
}

/// Probes every client pod against every target and prints the matrix.
fn matrix(topo: &Topology, pods: &[PodSpec], targets: &[Target], fam: Family) -> Result<()> {
    let mut jobs = Vec::new();
    for (ci, client) in pods.iter().enumerate() {
        for (ti, t) in targets.iter().enumerate() {
            let server = &topo.pods[&t.pod].spec;
            let ip = match fam {
                Family::V4 => server.v4.map(IpAddr::V4),
                Family::V6 => server.v6.map(IpAddr::V6),
            };
            let Some(ip) = ip else { continue };
            jobs.push(Job {
                via: Via::Pod,
                from: topo.pods[&client.id].fd.clone(),
                dst: SocketAddr::new(ip, t.port),
                proto: Proto::Tcp,
                // Every cell gets its slow retry: the demo reports, it
                // does not assert.
                want: true,
                label: format!("{ci} {ti}"),
            });
        }
    }
    let mut got = BTreeMap::new();
    for (job, ok) in conformance::run_probes(jobs) {
        got.insert(job.label, ok);
    }
    // Each column as wide as its label.
    let widths: Vec<usize> = targets.iter().map(|t| t.label.len() + 2).collect();
    let rows = pods.iter().map(|p| p.id.len()).max().unwrap_or(4) + 2;
    print!("  {:rows$}", format!("{fam}"));
    for (t, w) in targets.iter().zip(&widths) {
        print!("{:>w$}", t.label);
    }
    println!();
    let (green, red, reset) = if colour() {
        ("\x1b[32m", "\x1b[31m", "\x1b[0m")
    } else {
        ("", "", "")
    };
    for (ci, client) in pods.iter().enumerate() {
        print!("  {:rows$}", client.id);
        for (ti, w) in widths.iter().enumerate() {
            let cell = match got.get(&format!("{ci} {ti}")) {
                Some(true) => format!("{green}{:>w$}{reset}", "X"),
                Some(false) => format!("{red}{:>w$}{reset}", "."),
                None => format!("{:>w$}", "-"),
            };
            print!("{cell}");
        }
        println!();
    }
    Ok(())
}

pub fn demo() -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "the demo creates network namespaces and loads BPF programs: run it as root"
    );
    bootstrap::all()?;
    let object = build_ebpf()?;
    println!("demo: building netpol-agent");
    run(cargo("stable").args(["build", "-p", "netpol-agent"]))?;
    let agent = root().join("target/debug/netpol-agent");
    let examples = root().join("deploy/examples");
    let cluster = std::fs::read_to_string(examples.join("cluster.yaml"))
        .context("reading deploy/examples/cluster.yaml")?;
    let policies = std::fs::read_to_string(examples.join("policies.yaml"))
        .context("reading deploy/examples/policies.yaml")?;
    let model = conformance::model_from_text(&cluster)?;

    let pods: Vec<PodSpec> = model
        .objects
        .values()
        .filter_map(|v| scenario::pod_spec(v).ok().flatten())
        .collect();
    println!(
        "demo: {} pods in network namespaces behind a bridge, node {} ({}, {})",
        pods.len(),
        model.node_name,
        model.node_v4,
        model.node_v6
    );
    let mut topo = Topology::new(Kind::Bridge, model.node_v4, model.node_v6)?;
    for p in &pods {
        topo.add_pod(p)?;
        start_servers(&topo.pods[&p.id].fd, p)?;
    }
    println!("demo: netpol-agent run --manifests <cluster> (in the node netns)");
    let (mut agent_run, manifests) = conformance::start_agent(&topo, &model, &agent, &object)?;
    conformance::enforce(&mut agent_run, &topo, &manifests, &agent, &model.objects)?;
    let targets = targets(&model);

    println!(
        "\nBefore any NetworkPolicy: every pod reaches every port (X = connects, . = blocked)\n"
    );
    for fam in [Family::V4, Family::V6] {
        matrix(&topo, &pods, &targets, fam)?;
        println!();
    }

    let mut objects = model.objects.clone();
    for v in scenario::documents(&policies)? {
        objects.insert(scenario::key_of(&v)?, v);
    }
    println!(
        "demo: applying deploy/examples/policies.yaml (default deny in shop; frontend -> api:http; \
         api -> db:5432; monitoring -> every shop pod's metrics)"
    );
    conformance::enforce(&mut agent_run, &topo, &manifests, &agent, &objects)?;
    println!("\nAfter the policies, enforced by netpol's TC programs on each pod's veth\n");
    for fam in [Family::V4, Family::V6] {
        matrix(&topo, &pods, &targets, fam)?;
        println!();
    }
    println!("demo: what the node's maps hold (netpol-agent compile -o table):\n");
    run(std::process::Command::new(&agent)
        .args(["compile", "--manifests"])
        .arg(&examples)
        .args(["-o", "table"]))?;
    drop(agent_run);
    drop(topo);
    println!("\ndemo: done (namespaces, agent and bpffs removed)");
    Ok(())
}
