//! `cargo xtask cluster up|down|status`: a k3s-like cluster on this
//! machine, wired by `netpol_testkit::cluster`: a namespace per Node on an
//! underlay bridge, flannel's VXLAN between them (`flannel.1`,
//! `flannel-v6.1`), and each Pod of the cluster file made through its
//! node's CNI chain (`bridge` on `cni0` with `host-local`, `portmap`) with
//! the file's addresses.
//!
//! Not yet: the API server, the agents (so no `netpol-cni` in the chain
//! and no policy), kube-proxy's Services, host-networked pods. Those are
//! the next steps of the multi-node issue.
use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail, ensure};
use netpol_testkit::{
    cluster::{self, Names, NodeSpec},
    cni::{Sandbox, result_ips},
};
use serde_json::{Value, json};

/// Every namespace of the cluster is named `npc-…`.
const PREFIX: &str = "npc";

fn state_dir() -> PathBuf {
    crate::root().join("target/cluster")
}

fn names() -> Names {
    Names {
        prefix: PREFIX.into(),
    }
}

/// The objects of the cluster file, or `nodes` Nodes in the scheme of
/// `cluster-3node.yaml` (node-N: 10.42.N.0/24, fd00:10:42:N::/64,
/// InternalIPs 10.200.0.N and fd00:200::N) and no pods.
fn objects(nodes: Option<usize>, file: Option<&Path>) -> Result<(Vec<Value>, String)> {
    let file = match (nodes, file) {
        (Some(n), None) => {
            ensure!((1..=200).contains(&n), "--nodes {n}: from 1 to 200");
            let nodes = (1..=n)
                .map(|i| {
                    json!({
                        "apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": format!("node-{i}"),
                                     "labels": {"kubernetes.io/hostname": format!("node-{i}")}},
                        "spec": {"podCIDRs": [format!("10.42.{i}.0/24"),
                                              format!("fd00:10:42:{i:x}::/64")]},
                        "status": {"addresses": [
                            {"type": "InternalIP", "address": format!("10.200.0.{i}")},
                            {"type": "InternalIP", "address": format!("fd00:200::{i:x}")}
                        ]}
                    })
                })
                .collect();
            return Ok((nodes, format!("{n} generated nodes")));
        }
        (_, Some(f)) => f.to_owned(),
        (None, None) => crate::shared_conformance()?.join("cluster-3node.yaml"),
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let objects = crate::conformance::scenario::documents(&text)?
        .into_iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(n) = nodes {
        let have = objects.iter().filter(|o| o["kind"] == "Node").count();
        ensure!(
            have == n,
            "--nodes {n}, but {} has {have} Nodes",
            file.display()
        );
    }
    let shown = file.strip_prefix(crate::root()).unwrap_or(&file);
    Ok((objects, shown.display().to_string()))
}

/// A pod of the file to make.
struct FilePod {
    namespace: String,
    name: String,
    node: String,
    ips: Vec<IpAddr>,
}

/// The pods of the file to make.
fn pods(objects: &[Value], nodes: &[NodeSpec]) -> Result<Vec<FilePod>> {
    let mut out = Vec::new();
    for o in objects.iter().filter(|o| o["kind"] == "Pod") {
        let ns = o["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = o["metadata"]["name"]
            .as_str()
            .context("a Pod without a name")?;
        if o["spec"]["hostNetwork"] == true {
            bail!("Pod {ns}/{name}: host-networked pods are not made yet");
        }
        let node = o["spec"]["nodeName"]
            .as_str()
            .with_context(|| format!("Pod {ns}/{name}: no spec.nodeName"))?;
        ensure!(
            nodes.iter().any(|n| n.name == node),
            "Pod {ns}/{name}: node {node} is not in the file"
        );
        let ips = o["status"]["podIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| {
                i["ip"]
                    .as_str()
                    .unwrap_or_default()
                    .parse::<IpAddr>()
                    .with_context(|| format!("Pod {ns}/{name}: podIPs"))
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(FilePod {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            node: node.to_owned(),
            ips,
        });
    }
    Ok(out)
}

pub fn up(nodes: Option<usize>, file: Option<&Path>) -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "cluster up makes network namespaces: run it as root"
    );
    crate::bootstrap::debian_tools()?;
    let existing = cluster::namespaces(PREFIX).map_err(anyhow::Error::msg)?;
    ensure!(
        existing.is_empty(),
        "a cluster is up ({} namespaces named {PREFIX}-…): `cargo xtask cluster down` first",
        existing.len()
    );
    let (objects, source) = objects(nodes, file)?;
    let specs = cluster::node_specs(&objects).map_err(anyhow::Error::msg)?;
    ensure!(!specs.is_empty(), "{source}: no Node");
    let pods = pods(&objects, &specs)?;
    let dir = state_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let names = names();
    cluster::up(&names, &specs).map_err(anyhow::Error::msg)?;
    let mut made = Vec::new();
    for FilePod {
        namespace: ns,
        name,
        node,
        ips,
    } in &pods
    {
        let spec = specs.iter().find(|s| &s.name == node).context("node")?;
        let chain = cluster::node_chain(spec, &dir.join("ipam").join(node), None);
        let mut sandbox = Sandbox::new(ns, name);
        sandbox.ips = cluster::requested_ips(spec, ips)
            .map_err(|e| anyhow::anyhow!("Pod {ns}/{name}: {e}"))?;
        let result = match cluster::add_pod(&names, spec, &chain, &sandbox) {
            Ok(r) => r,
            Err(e) => {
                let _ = cluster::down(PREFIX);
                bail!("Pod {ns}/{name} on {node}: {e}");
            }
        };
        made.push(json!({
            "namespace": ns, "name": name, "node": node,
            "netns": names.pod(node, ns, name),
            "ips": result_ips(&result),
            "result": result,
            "container_id": sandbox.container_id,
        }));
    }
    if let Err(e) = cluster::settle(PREFIX, std::time::Duration::from_secs(10)) {
        let _ = cluster::down(PREFIX);
        bail!("{e}");
    }
    let state = json!({
        "source": source,
        "nodes": specs.iter().map(|s| json!({
            "name": s.name, "netns": names.node(&s.name),
            "internal": s.internal, "podCIDRs": s.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "pods": made,
    });
    let path = dir.join("cluster.json");
    std::fs::write(&path, serde_json::to_string_pretty(&state)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "cluster up from {source}: {} nodes, {} pods",
        specs.len(),
        pods.len()
    );
    status()
}

pub fn down() -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "cluster down removes network namespaces: run it as root"
    );
    let gone = cluster::down(PREFIX).map_err(anyhow::Error::msg)?;
    let _ = std::fs::remove_dir_all(state_dir());
    println!("cluster down: {} namespaces removed", gone.len());
    Ok(())
}

pub fn status() -> Result<()> {
    let path = state_dir().join("cluster.json");
    let present = cluster::namespaces(PREFIX).map_err(anyhow::Error::msg)?;
    let Ok(text) = std::fs::read_to_string(&path) else {
        println!("no cluster ({} namespaces named {PREFIX}-…)", present.len());
        return Ok(());
    };
    let state: Value = serde_json::from_str(&text)?;
    let mut out = String::new();
    writeln!(out, "from {}", state["source"].as_str().unwrap_or("?"))?;
    writeln!(
        out,
        "{:<10} {:<14} {:<32} {:<10} VXLAN PEERS (v4/v6)",
        "NODE", "NAMESPACE", "POD CIDRS", "UP"
    )?;
    for n in state["nodes"].as_array().into_iter().flatten() {
        let netns = n["netns"].as_str().unwrap_or_default();
        let up = present.iter().any(|p| p == netns);
        let peers = |dev: &str| {
            std::process::Command::new("bridge")
                .args(["-n", netns, "fdb", "show", "dev", dev])
                .output()
                .map_or(0, |o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter(|l| l.contains(" dst "))
                        .count()
                })
        };
        let cidrs: Vec<&str> = n["podCIDRs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        writeln!(
            out,
            "{:<10} {:<14} {:<32} {:<10} {}/{}",
            n["name"].as_str().unwrap_or("?"),
            netns,
            cidrs.join(","),
            if up { "yes" } else { "MISSING" },
            if up { peers(cluster::VXLAN_V4) } else { 0 },
            if up { peers(cluster::VXLAN_V6) } else { 0 },
        )?;
    }
    writeln!(
        out,
        "\n{:<12} {:<8} {:<28} ADDRESSES",
        "POD", "NODE", "NAMESPACE"
    )?;
    for p in state["pods"].as_array().into_iter().flatten() {
        let netns = p["netns"].as_str().unwrap_or_default();
        let ips: Vec<String> = if present.iter().any(|n| n == netns) {
            p["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        } else {
            vec!["MISSING".into()]
        };
        writeln!(
            out,
            "{:<12} {:<8} {:<28} {}",
            format!(
                "{}/{}",
                p["namespace"].as_str().unwrap_or("?"),
                p["name"].as_str().unwrap_or("?")
            ),
            p["node"].as_str().unwrap_or("?"),
            netns,
            ips.join(" ")
        )?;
    }
    print!("{out}");
    Ok(())
}
