//! The rolling upgrade of `cargo xtask cluster test`: every node's agent
//! replaced by a second image, one node at a time as the DaemonSet's
//! `maxUnavailable: 1` rolls it (the old pod stopped with its grace
//! period, the new one's init containers run, its agent ready before the
//! next node), while traffic crosses the nodes:
//!
//! - probers on allowed and denied pairs, both families, TCP and UDP,
//!   whose servers count what reaches them by source: a denied packet
//!   delivered is one a server saw;
//! - a long-lived connection per allowed pair and family, a line each
//!   100 ms: none may be reset;
//! - on each node, while its agent is down, a new pod made through the
//!   node's chain: its ADD waits for the new agent, and from its first
//!   packet it follows its policy.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use netpol_testkit::cluster::NodeSpec;
use serde_json::{Value, json};

use super::{
    FilePod, agent_name, kubectl, make_pod, names, objects, pod_handle, pod_node, podman_ok,
    start_agent_pod, traffic, wait_for, wait_ready,
};
use crate::deploy_test as dt;

/// The second image's version.
pub const ROLLED: &str = concat!(env!("CARGO_PKG_VERSION"), "-rolled");

/// x/b admits namespace y; x/a admits namespace z.
const POLICIES: &str = r#"{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
 "metadata": {"name": "b-from-y", "namespace": "x"},
 "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
          "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}}
---
{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
 "metadata": {"name": "a-from-z", "namespace": "x"},
 "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"],
          "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}}
"#;

/// (client, server, allowed): clients on every node, servers x/b
/// (node-2) and x/a (node-1).
const PAIRS: [(&str, &str, bool); 8] = [
    ("y/a", "x/b", true),
    ("y/b", "x/b", true),
    ("x/a", "x/b", false),
    ("x/c", "x/b", false),
    ("z/a", "x/a", true),
    ("z/b", "x/a", true),
    ("y/c", "x/a", false),
    ("x/c", "x/a", false),
];

/// The image a node's agent container runs.
fn image_of(node: &str) -> Result<String> {
    podman_ok(&["inspect", "--format", "{{.ImageName}}", &agent_name(node)])
}

pub fn rolling_upgrade() -> Result<()> {
    let state: Value = serde_json::from_str(&std::fs::read_to_string(
        super::state_dir().join("cluster.json"),
    )?)?;
    let (objs, _) = objects(None, None)?;
    let specs = netpol_testkit::cluster::node_specs(&objs).map_err(anyhow::Error::msg)?;
    let from = image_of("node-1")?;
    let rolled = crate::image::build_as(ROLLED)?;
    dt::load(&rolled)?;
    ensure!(
        from != rolled.reference,
        "the agents already run {}",
        rolled.reference
    );

    kubectl(&["create", "-f", "-"], Some(POLICIES))?;
    let mut servers = std::collections::BTreeMap::new();
    for id in ["x/a", "x/b"] {
        let (fd, ips) = pod_handle(&state, id)?;
        servers.insert(id, (traffic::serve(&fd, &ips, traffic::PORT)?, ips));
    }
    // Every pair as its policy says before the roll starts.
    for (client, server, allowed) in PAIRS {
        let (fd, _) = pod_handle(&state, client)?;
        for &ip in &servers[server].1 {
            let dst = SocketAddr::new(ip, traffic::PORT);
            wait_for(
                Duration::from_secs(30),
                &format!("{client} -> {server} at {ip} is as the policies say"),
                || {
                    let got = traffic::reaches(&fd, dst, Duration::from_millis(500));
                    Ok((got == allowed).then_some(()))
                },
            )?;
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut probers = Vec::new();
    let mut held = Vec::new();
    for (client, server, allowed) in PAIRS {
        let (fd, client_ips) = pod_handle(&state, client)?;
        for &ip in &servers[server].1 {
            let dst = SocketAddr::new(ip, traffic::PORT);
            let (counts, handle) = traffic::prober(&fd, dst, &stop);
            let source = client_ips
                .iter()
                .copied()
                .find(|c| c.is_ipv4() == ip.is_ipv4())
                .context("the client's address of the family")?;
            probers.push((client, server, ip, source, allowed, counts, handle));
            if allowed {
                held.push((client, server, ip, traffic::long_lived(&fd, dst, &stop)?));
            }
        }
    }

    let started = std::time::Instant::now();
    let mut new_pods = Vec::new();
    for (i, node) in specs.iter().enumerate() {
        let made = roll(node, i, &rolled.reference, &state, started)?;
        new_pods.push(made);
        println!(
            "cluster test: {}'s agent rolled to {} ({} of {}; {:.3}s)",
            node.name,
            rolled.reference,
            i + 1,
            specs.len(),
            started.elapsed().as_secs_f64()
        );
    }
    // A last stretch of traffic with every node on the new image.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);

    let mut problems = Vec::new();
    let mut answered = 0;
    for (client, server, ip, source, allowed, counts, handle) in probers {
        let _ = handle.join();
        let (yes, no) = (
            counts.answered.load(Ordering::Relaxed),
            counts.silent.load(Ordering::Relaxed),
        );
        let delivered = servers[server].0.from(source);
        answered += yes;
        if allowed && (no > 0 || yes == 0) {
            let when: Vec<String> = counts
                .silences
                .lock()
                .map(|v| {
                    v.iter()
                        .map(|(t, p)| format!("{p} at {:.3}s", (*t - started).as_secs_f64()))
                        .collect()
                })
                .unwrap_or_default();
            problems.push(format!(
                "{client} -> {server} at {ip} (allowed): {no} of {} probes unanswered ({})",
                yes + no,
                when.join(", ")
            ));
        }
        if !allowed && (yes > 0 || delivered > 0) {
            problems.push(format!(
                "{client} -> {server} at {ip} (denied): {yes} probes answered, {delivered} \
                 delivered"
            ));
        }
    }
    let mut lines = 0;
    for (client, server, ip, handle) in held {
        match handle.join() {
            Ok(Ok(n)) => lines += n,
            Ok(Err(e)) => problems.push(format!("{client} -> {server} at {ip} (held open): {e}")),
            Err(_) => problems.push(format!("{client} -> {server} at {ip}: thread panicked")),
        }
    }
    for n in &specs {
        let on = image_of(&n.name)?;
        if on != rolled.reference {
            problems.push(format!("{}'s agent runs {on}", n.name));
        }
    }
    if !problems.is_empty() {
        bail!("the rolling upgrade:\n  {}", problems.join("\n  "));
    }
    println!(
        "cluster test: rolling upgrade {from} -> {}, one node at a time: {answered} allowed \
         probes answered and none lost, no denied packet delivered, {} connections held open \
         ({lines} lines), {} pods made during their agent's restart followed their policy \
         from the first packet",
        rolled.reference,
        PAIRS.iter().filter(|p| p.2).count() * 2,
        new_pods.len()
    );
    kubectl(&["delete", "-f", "-"], Some(POLICIES))?;
    Ok(())
}

/// One node's turn: the old agent stopped as the kubelet stops it (SIGTERM,
/// the grace period), a pod made through the node's chain meanwhile (its
/// ADD waits for an agent), the new image's init containers and agent
/// started, ready; then the new pod's first packets. Returns its id.
fn roll(
    node: &NodeSpec,
    i: usize,
    image: &str,
    state: &Value,
    started: std::time::Instant,
) -> Result<String> {
    let name = format!("new-{}", node.name);
    let host = 201 + i;
    let ips: Vec<IpAddr> = [true, false]
        .iter()
        .map(|&v4| {
            let c = node.pod_cidr(v4).context("a pod subnet")?;
            let base = c.addr.to_string();
            let ip = if v4 {
                format!("{}.{host}", base.rsplit_once('.').context("v4")?.0)
            } else {
                format!("{}{host:x}", base.trim_end_matches("::").to_owned() + "::")
            };
            Ok(ip.parse()?)
        })
        .collect::<Result<_>>()?;
    // Scheduled to the node before its sandbox exists, as a pod is.
    kubectl(
        &["create", "-f", "-"],
        Some(
            &json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "x", "labels": {"pod": "b"}},
                "spec": {"nodeName": node.name, "containers": [{"name": "c", "image": "agnhost"}]},
                "status": {"phase": "Running", "podIPs": ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()}
            })
            .to_string(),
        ),
    )?;
    let at = pod_node(node)?;
    podman_ok(&["stop", "--time=10", &agent_name(&node.name)])?;
    println!(
        "cluster test: {}'s old agent stopped ({:.3}s)",
        node.name,
        started.elapsed().as_secs_f64()
    );
    let file_pod = FilePod {
        namespace: "x".into(),
        name: name.clone(),
        node: node.name.clone(),
        ips: ips.clone(),
        host_network: false,
    };
    let node_spec = node.clone();
    let add = std::thread::spawn(move || make_pod(&node_spec, &file_pod));
    start_agent_pod(&at, image)?;
    println!(
        "cluster test: {}'s new agent started ({:.3}s)",
        node.name,
        started.elapsed().as_secs_f64()
    );
    wait_ready(&at)?;
    add.join()
        .map_err(|_| anyhow::anyhow!("the ADD thread panicked"))?
        .with_context(|| format!("x/{name}'s ADD while {}'s agent restarted", node.name))?;
    // The pod's container starts once ADD returns: its first packets.
    let fd = Arc::new(
        netpol_testkit::Netns::existing(names().pod(&node.name, "x", &name).as_str()).open()?,
    );
    let seen = traffic::serve(&fd, &ips, traffic::PORT)?;
    for (client, allowed) in [("y/a", true), ("x/a", false)] {
        let (cfd, cips) = pod_handle(state, client)?;
        for &ip in &ips {
            let dst = SocketAddr::new(ip, traffic::PORT);
            let got = traffic::reaches(&cfd, dst, Duration::from_secs(1));
            let source = cips
                .iter()
                .copied()
                .find(|c| c.is_ipv4() == ip.is_ipv4())
                .context("address")?;
            ensure!(
                got == allowed && (allowed || seen.from(source) == 0),
                "x/{name} (made while {}'s agent restarted): {client} -> {ip}: {}",
                node.name,
                if allowed {
                    "allowed, yet refused"
                } else {
                    "denied, yet delivered"
                }
            );
        }
    }
    Ok(format!("x/{name}"))
}
