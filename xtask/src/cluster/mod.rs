//! `cargo xtask cluster up|down|status`: a k3s-like cluster on this
//! machine:
//!
//! 1. the network (`netpol_testkit::cluster`): a namespace per Node on an
//!    underlay bridge, flannel's VXLAN between them (`flannel.1`,
//!    `flannel-v6.1`);
//! 2. the host on the underlay too (`npc0`, [`API_V4`] and [`API_V6`]),
//!    where the test API server listens over TLS, holding the cluster
//!    file's objects; `target/cluster/kubeconfig` is kubectl's way in;
//! 3. one agent per node, started from the rendered DaemonSet
//!    (`deploy/base`) exactly as `deploy-test` starts it (podman and runc,
//!    the manifest's container specs, host network = the node's namespace,
//!    in-cluster configuration over the underlay), each node with its own
//!    root folder, bpffs and state;
//! 4. each Pod of the file made on its node through k3s's chain as the
//!    init container installed it (`bridge` on `cni0` with `host-local`,
//!    `portmap`, `netpol-cni`), with the file's addresses: its ADD
//!    returns once that node's agent enforces the pod's policy.
//!
//! 5. kube-proxy's part played on every node ([`kube_proxy`]): each
//!    Service's ClusterIPs and node ports DNATed to its backend on any
//!    node, `externalTrafficPolicy: Local` honoured.
//!
//! `cargo xtask conformance --cluster` runs the scenarios on it
//! (`conformance::cluster`). Not yet: host-networked pods, the rolling
//! upgrade.
mod outage;
pub mod propagation;
mod traffic;
mod upgrade;

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::core::v1::Container;
use netpol_testkit::{
    cluster::{self, Names, NodeSpec},
    cni::{Chain, Sandbox, result_ips},
};

use crate::deploy_test::{self as dt, pod};
use serde_json::{Value, json};

/// Every namespace of the cluster is named `npc-…`.
const PREFIX: &str = "npc";

/// The host's addresses on the underlay: the API server's.
pub const API_V4: &str = "10.200.0.254";
pub const API_V6: &str = "fd00:200::fe";
/// The host's leg on the underlay bridge.
const HOST_LEG: &str = "npc0";
/// Where each node's root folder lives (a shared mount each, as in
/// deploy-test: the init container's bpffs propagates back).
const NODE_ROOTS: &str = "/run/netpol-cluster";
/// How long an agent gets to become ready.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(90);

pub fn state_dir() -> PathBuf {
    crate::root().join("target/cluster")
}

pub fn names() -> Names {
    Names {
        prefix: PREFIX.into(),
    }
}

/// The objects of the cluster file, or `nodes` Nodes in the scheme of
/// `cluster-3node.yaml` (node-N: 10.42.N.0/24, fd00:10:42:N::/64,
/// InternalIPs 10.200.0.N and fd00:200::N) and no pods.
fn objects(nodes: Option<usize>, file: Option<&Path>) -> Result<(Vec<Value>, String)> {
    let file = match (nodes, file) {
        (Some(n), None) => return generated_nodes(n),
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

/// `n` Nodes in the scheme of `cluster-3node.yaml`, and how to name them.
pub fn generated_nodes(n: usize) -> Result<(Vec<Value>, String)> {
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
    Ok((nodes, format!("{n} generated nodes")))
}

/// A pod of the file to make.
pub struct FilePod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: it lives in its node's namespace, with the
    /// node's addresses; nothing is made for it.
    pub host_network: bool,
}

/// The pods of the file to make.
pub fn pods(objects: &[Value], nodes: &[NodeSpec]) -> Result<Vec<FilePod>> {
    let mut out = Vec::new();
    for o in objects.iter().filter(|o| o["kind"] == "Pod") {
        let ns = o["metadata"]["namespace"].as_str().unwrap_or("default");
        let name = o["metadata"]["name"]
            .as_str()
            .context("a Pod without a name")?;
        let node = o["spec"]["nodeName"]
            .as_str()
            .with_context(|| format!("Pod {ns}/{name}: no spec.nodeName"))?;
        let spec = nodes
            .iter()
            .find(|n| n.name == node)
            .with_context(|| format!("Pod {ns}/{name}: node {node} is not in the file"))?;
        let host_network = o["spec"]["hostNetwork"] == true;
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
        if host_network && let Some(ip) = ips.iter().find(|ip| !spec.internal.contains(ip)) {
            bail!(
                "Pod {ns}/{name}: host-networked, but {ip} is not an address of its node \
                 {node} (its podIPs are the node's)"
            );
        }
        out.push(FilePod {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            node: node.to_owned(),
            ips,
            host_network,
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
    if let Err(e) = control_plane(&names, &specs, &objects, &dir) {
        let _ = down();
        return Err(e);
    }
    let mut made = Vec::new();
    for pod in &pods {
        if pod.host_network {
            made.push(json!({
                "namespace": pod.namespace, "name": pod.name, "node": pod.node,
                "netns": names.node(&pod.node),
                "ips": pod.ips,
                "host_network": true,
            }));
            continue;
        }
        let spec = specs.iter().find(|s| s.name == pod.node).context("node")?;
        let (sandbox, result) = match make_pod(spec, pod) {
            Ok(r) => r,
            Err(e) => {
                let logs = agent_logs(&pod.node);
                let _ = down();
                bail!("{e}\n{logs}");
            }
        };
        made.push(json!({
            "namespace": pod.namespace, "name": pod.name, "node": pod.node,
            "netns": names.pod(&pod.node, &pod.namespace, &pod.name),
            "ips": result_ips(&result),
            "result": result,
            "container_id": sandbox.container_id,
        }));
    }
    if let Err(e) = cluster::settle(PREFIX, std::time::Duration::from_secs(10))
        .map_err(anyhow::Error::msg)
        .and_then(|()| kube_proxy(&specs, &objects))
    {
        let _ = down();
        return Err(e);
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
    let agents = containers()?;
    for c in &agents {
        let _ = dt::podman().args(["rm", "--force", "--time=5", c]).output();
    }
    let pid_file = state_dir().join("apiserver.pid");
    if let Ok(pid) = std::fs::read_to_string(&pid_file) {
        let _ = Command::new("kill").args(["-TERM", pid.trim()]).output();
    }
    if let Ok(roots) = std::fs::read_dir(NODE_ROOTS) {
        for r in roots.flatten() {
            let _ = Command::new("umount").arg("-R").arg(r.path()).output();
        }
    }
    let _ = std::fs::remove_dir_all(NODE_ROOTS);
    // The host's leg goes with its peer in the underlay namespace.
    let gone = cluster::down(PREFIX).map_err(anyhow::Error::msg)?;
    let _ = std::fs::remove_dir_all(state_dir());
    println!(
        "cluster down: {} containers and {} namespaces removed",
        agents.len(),
        gone.len()
    );
    Ok(())
}

/// kube-proxy's part on every node: `objects`' Services (ClusterIPs and
/// node ports, `externalTrafficPolicy` honoured) in each node's nat
/// tables.
pub fn kube_proxy(nodes: &[NodeSpec], objects: &[Value]) -> Result<()> {
    use crate::conformance::{scenario, services};
    let mut by_key = std::collections::BTreeMap::new();
    for o in objects {
        let v = serde_yaml::to_value(o)?;
        by_key.insert(scenario::key_of(&v)?, v);
    }
    services::Kube::new(&kube_nodes(nodes))?.sync(&by_key)
}

/// The nodes as kube-proxy's part addresses them: name and namespace.
pub fn kube_nodes(nodes: &[NodeSpec]) -> Vec<crate::conformance::services::KubeNode> {
    let names = names();
    nodes
        .iter()
        .map(|n| crate::conformance::services::KubeNode {
            name: n.name.clone(),
            netns: names.node(&n.name),
        })
        .collect()
}

/// The CNI chain of `node` as its init container installed it: k3s's
/// `bridge`, `host-local` and `portmap`, then `netpol-cni` talking to
/// that node's agent.
fn chain(node: &NodeSpec) -> Chain {
    let root = PathBuf::from(NODE_ROOTS).join(&node.name);
    let file = |p: &str| pod::host_file(&root, p);
    let plugin = file(dt::K3S_CNI_BIN).join("netpol-cni");
    let socket = file("/run/netpol").join("cni.sock");
    cluster::node_chain(
        node,
        &file("/var/lib/cni/networks"),
        Some((&plugin, &socket)),
    )
}

/// `pod` made on `node` through its chain with the pod's own addresses:
/// its sandbox and the chain's result. Its ADD returns once the node's
/// agent enforces the pod's policy.
pub fn make_pod(node: &NodeSpec, pod: &FilePod) -> Result<(Sandbox, serde_json::Value)> {
    let (ns, name) = (&pod.namespace, &pod.name);
    let mut sandbox = Sandbox::new(ns, name);
    sandbox.ips = cluster::requested_ips(node, &pod.ips)
        .map_err(|e| anyhow::anyhow!("Pod {ns}/{name}: {e}"))?;
    let result = cluster::add_pod(&names(), node, &chain(node), &sandbox)
        .map_err(|e| anyhow::anyhow!("Pod {ns}/{name} on {}: {e}", node.name))?;
    Ok((sandbox, result))
}

/// The pod of `sandbox` removed from `node` as the kubelet removes one:
/// DEL through the chain with the cached ADD result, then its namespace.
pub fn remove_pod(node: &NodeSpec, sandbox: &Sandbox, result: &serde_json::Value) -> Result<()> {
    let names = names();
    let pod_ns = names.pod(&node.name, &sandbox.namespace, &sandbox.name);
    let deleted = chain(node).del(
        &netpol_testkit::Netns::existing(names.node(&node.name)),
        &netpol_testkit::Netns::existing(pod_ns.as_str()),
        sandbox,
        Some(result),
    );
    let out = Command::new("ip")
        .args(["netns", "del", &pod_ns])
        .output()
        .context("ip netns del")?;
    deleted.map_err(|e| {
        anyhow::anyhow!(
            "Pod {}/{} on {}: CNI DEL: {e}",
            sandbox.namespace,
            sandbox.name,
            node.name
        )
    })?;
    ensure!(
        out.status.success(),
        "removing {pod_ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The cluster's containers (`npc-<node>-<container>`), running or not.
fn containers() -> Result<Vec<String>> {
    let out = dt::podman()
        .args(["ps", "--all", "--format", "{{.Names}}"])
        .output()
        .context("podman ps")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .map(str::to_owned)
        .collect())
}

pub fn agent_logs(node: &str) -> String {
    dt::logs(&agent_name(node))
}

/// The name of `node`'s agent container.
fn agent_name(node: &str) -> String {
    format!("{PREFIX}-{node}-agent")
}

/// `podman ARGS`: its standard output, or an error with what it said.
fn podman_ok(args: &[&str]) -> Result<String> {
    let out = dt::podman()
        .args(args)
        .output()
        .with_context(|| format!("running podman {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "podman {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The host's leg on the underlay, the API server, the image and one
/// agent per node, ready.
fn control_plane(names: &Names, specs: &[NodeSpec], objects: &[Value], dir: &Path) -> Result<()> {
    cluster::host_leg(names, HOST_LEG, &[API_V4, API_V6]).map_err(anyhow::Error::msg)?;
    crate::bootstrap::container_tools()?;
    let apiserver = crate::apiserver_binary()?;
    let api = std::net::SocketAddr::new(API_V4.parse()?, dt::API_PORT);
    let tls = dir.join("apiserver");
    let manifests = dir.join("objects.yaml");
    let mut text = String::new();
    for o in objects {
        writeln!(text, "---\n{}", serde_json::to_string(o)?)?;
    }
    std::fs::write(&manifests, text)?;
    let ready = dir.join("apiserver.ready");
    let log = std::fs::File::create(dir.join("apiserver.log"))?;
    let child = {
        use std::os::unix::process::CommandExt as _;
        Command::new(&apiserver)
            .arg("--listen")
            .arg(api.to_string())
            .arg("--tls-dir")
            .arg(&tls)
            .arg("--manifests")
            .arg(&manifests)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Outlives `cluster up`: `cluster down` stops it.
            .process_group(0)
            .spawn()
            .context("starting the test API server")?
    };
    std::fs::write(dir.join("apiserver.pid"), child.id().to_string())?;
    wait_for(
        std::time::Duration::from_secs(20),
        "the API server is ready",
        || Ok(ready.exists().then_some(())),
    )?;
    std::fs::copy(tls.join("kubeconfig"), dir.join("kubeconfig"))?;
    println!("cluster: API server on https://{api}, kubeconfig target/cluster/kubeconfig");

    let built = crate::image::build()?;
    dt::load(&built)?;
    for n in specs {
        let node = pod_node(n)?;
        dt::node_root(&node.root)?;
        // k3s's flannel conflist, as k3s writes it at start.
        let conflist = node.host_file(dt::K3S_CONFLIST);
        std::fs::create_dir_all(conflist.parent().context("conflist folder")?)?;
        std::fs::write(&conflist, dt::FLANNEL_CONFLIST)?;
        start_agent_pod(&node, &built.reference)?;
    }
    for n in specs {
        wait_ready(&pod_node(n)?)?;
        println!("cluster: {}'s agent is ready", n.name);
    }
    Ok(())
}

/// A node as the agent's pod sees it (`cluster up` made it).
fn pod_node(n: &NodeSpec) -> Result<pod::Node> {
    let dir = state_dir();
    Ok(pod::Node {
        name: n.name.clone(),
        host_ip: n
            .internal_ip(true)
            .or_else(|| n.internal_ip(false))
            .context("an InternalIP")?,
        netns: netpol_testkit::Netns::path_of(&names().node(&n.name)),
        root: PathBuf::from(NODE_ROOTS).join(&n.name),
        api: std::net::SocketAddr::new(API_V4.parse()?, dt::API_PORT),
        service_account: dir.join("apiserver/serviceaccount"),
    })
}

/// The DaemonSet's pod on `node` from `image`, as the kubelet starts it:
/// the init containers in order, each to completion, then the agent
/// (`npc-<node>-<container>`).
fn start_agent_pod(node: &pod::Node, image: &str) -> Result<()> {
    let ds = dt::daemonset("base")?;
    let spec = dt::pod_spec(&ds)?.clone();
    let name = |c: &Container| format!("{PREFIX}-{}-{}", node.name, c.name);
    for c in spec.init_containers.iter().flatten() {
        dt::podman_run(&spec, c, node, image, &name(c), false)?;
    }
    let agent = agent_container(&spec)?;
    dt::podman_run(&spec, &agent, node, image, &name(&agent), true)?;
    Ok(())
}

fn agent_container(spec: &k8s_openapi::api::core::v1::PodSpec) -> Result<Container> {
    spec.containers
        .iter()
        .find(|c| c.name == "agent")
        .cloned()
        .context("no agent container in the DaemonSet")
}

/// Until `node`'s agent answers its readiness probe.
fn wait_ready(node: &pod::Node) -> Result<()> {
    let ds = dt::daemonset("base")?;
    let path = dt::probe_path(&agent_container(dt::pod_spec(&ds)?)?, true)?;
    let at = std::net::SocketAddr::new(node.host_ip, crate::conformance::cluster::STATUS_PORT);
    wait_for(
        READY_WITHIN,
        &format!("{}'s agent is ready", node.name),
        || {
            Ok(dt::http_get(at, &path)
                .ok()
                .filter(|(code, _)| *code == 200)
                .map(drop))
        },
    )
    .map_err(|e| e.context(agent_logs(&node.name)))
}

/// [`dt::until`], every 100 ms.
fn wait_for<T>(
    within: std::time::Duration,
    what: &str,
    f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    dt::until(within, std::time::Duration::from_millis(100), what, f)
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
        "\n{:<24} {:<8} {:<34} ADDRESSES",
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
            "{:<24} {:<8} {:<34} {}",
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

/// The echo port of the test's server pod.
const PORT: u16 = 8080;

/// `cargo xtask cluster test`: the cluster of `cluster-3node.yaml` up,
/// then a policy written with kubectl enforced across nodes, both
/// families, then down (also when a check fails).
pub fn test() -> Result<()> {
    up(None, None)?;
    let checked = checks()
        .and_then(|()| upgrade::rolling_upgrade())
        .and_then(|()| outage::kill_and_cut());
    if checked.is_err() {
        for node in ["node-1", "node-2", "node-3"] {
            eprintln!("{}", agent_logs(node));
        }
    }
    let downed = down();
    checked.and(downed)
}

/// A pod of the running cluster: its namespace's name and addresses.
fn running_pod(state: &Value, namespace: &str, name: &str) -> Result<(String, Vec<IpAddr>)> {
    let p = state["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["namespace"] == namespace && p["name"] == name)
        .with_context(|| format!("pod {namespace}/{name} in the cluster"))?;
    let ips = p["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_str()?.parse().ok())
        .collect();
    Ok((p["netns"].as_str().unwrap_or_default().to_owned(), ips))
}

/// A pod of the running cluster (`ns/name`): a handle on its namespace,
/// and its addresses.
fn pod_handle(state: &Value, id: &str) -> Result<(std::sync::Arc<std::fs::File>, Vec<IpAddr>)> {
    let (ns, name) = id.split_once('/').context("ns/name")?;
    let (netns, ips) = running_pod(state, ns, name)?;
    Ok((
        std::sync::Arc::new(netpol_testkit::Netns::existing(netns.as_str()).open()?),
        ips,
    ))
}

/// kubectl against the cluster's API server; its output, or an error
/// with what it said.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(state_dir().join("kubeconfig"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .context("kubectl's stdin")?
            .write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "kubectl {}: {said}", args.join(" "));
    Ok(said)
}

fn checks() -> Result<()> {
    use netpol_testkit::echo;
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(state_dir().join("cluster.json"))?)?;
    let (server_ns, server_ips) = running_pod(&state, "x", "b")?;
    echo::serve(
        &netpol_testkit::Netns::existing(server_ns.as_str()),
        &server_ips,
        PORT,
    );
    // x/b is on node-2; x/a and y/b on node-1, y/a on node-3.
    let clients = [
        ("x/a on node-1", running_pod(&state, "x", "a")?.0),
        ("y/a on node-3", running_pod(&state, "y", "a")?.0),
        ("y/b on node-1", running_pod(&state, "y", "b")?.0),
        ("node-1", names().node("node-1")),
        ("node-2 (x/b's own)", names().node("node-2")),
    ];
    let reaches = |from: &str, to: IpAddr| {
        echo::connects(
            &netpol_testkit::Netns::existing(from),
            to,
            PORT,
            std::time::Duration::from_millis(1500),
        )
    };
    let expect = |what: &str, want: [bool; 5]| -> Result<()> {
        for &to in &server_ips {
            // The agents apply a write within milliseconds; the first
            // probe may still precede it.
            let first = clients.iter().zip(want).next().context("a client")?;
            wait_for(std::time::Duration::from_secs(30), what, || {
                Ok((reaches(&first.0.1, to) == first.1).then_some(()))
            })?;
            for ((who, ns), want) in clients.iter().zip(want) {
                let got = reaches(ns, to);
                ensure!(
                    got == want,
                    "{what}: {who} -> x/b at {to}: {}",
                    if want {
                        "refused, yet allowed"
                    } else {
                        "allowed, yet denied"
                    }
                );
            }
        }
        println!("cluster test: {what}: as the policy says, IPv4 and IPv6");
        Ok(())
    };
    expect("no policy: every pod and node reaches x/b", [true; 5])?;
    kubectl(
        &["create", "-f", "-"],
        Some(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: b-from-y, namespace: x}\n\
             spec:\n  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Ingress]\n\
             \x20 ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: \"y\"}}}]\n",
        ),
    )?;
    expect(
        "x/b admits namespace y only (kubectl create): other pods and other nodes are denied, \
         its own node is not",
        [false, true, true, false, true],
    )?;
    kubectl(&["delete", "networkpolicy", "-n", "x", "b-from-y"], None)?;
    expect(
        "policy deleted (kubectl delete): every pod and node reaches x/b",
        [true; 5],
    )?;
    node_ports()
}

/// x/b's node port: what its policy sees of a client depends on
/// `externalTrafficPolicy`. `Local` keeps the client's address (an
/// ipBlock admits the host, another node's address is ordinary traffic
/// and denied); `Cluster` masquerades to the address of the node that
/// forwarded it: through another node, the host is denied until an
/// ipBlock admits that node. (Through x/b's own node the source is the
/// node's bridge address; Kubernetes leaves that case to the
/// implementation, and this does not test it.)
fn node_ports() -> Result<()> {
    use netpol_testkit::echo::{self, Proto};
    const NODE_PORT: u16 = 30080;
    let (objects, _) = objects(None, None)?;
    let specs = cluster::node_specs(&objects).map_err(anyhow::Error::msg)?;
    let node = |name: &str| specs.iter().find(|s| s.name == name).context("node");
    let (node_1, node_2) = (node("node-1")?, node("node-2")?);
    let service = |policy: &str| {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "np-b", "namespace": "x"},
            "spec": {
                "type": "NodePort", "externalTrafficPolicy": policy,
                "ipFamilyPolicy": "RequireDualStack",
                "clusterIPs": ["10.43.0.99", "fd00:10:43::99"],
                "selector": {"pod": "b"},
                "ports": [{"port": PORT, "targetPort": PORT, "nodePort": NODE_PORT, "protocol": "TCP"}]
            }
        })
    };
    // kubectl writes the Service; kube-proxy's part follows it.
    let write = |verb: &str, svc: Value| -> Result<()> {
        kubectl(&[verb, "-f", "-"], Some(&svc.to_string()))?;
        let mut all = objects.clone();
        all.push(svc);
        kube_proxy(&specs, &all)
    };
    write("create", service("Local"))?;
    // x/b admits these CIDRs only; written with kubectl (create, then
    // replace).
    let mut verb = "create";
    let mut policy = |cidrs: &[String]| -> Result<()> {
        let from: Vec<Value> = cidrs
            .iter()
            .map(|c| json!({"ipBlock": {"cidr": c}}))
            .collect();
        kubectl(
            &[verb, "-f", "-"],
            Some(
                &json!({
                    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": "b-from-cidrs", "namespace": "x"},
                    "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                             "policyTypes": ["Ingress"], "ingress": [{"from": from}]}
                })
                .to_string(),
            ),
        )?;
        verb = "replace";
        Ok(())
    };
    policy(&[format!("{API_V4}/32"), format!("{API_V6}/128")])?;
    let from_host = |to: IpAddr| {
        echo::echoes(
            Proto::Tcp,
            std::net::SocketAddr::new(to, NODE_PORT),
            std::time::Duration::from_millis(1500),
        )
    };
    let node_1_ns = netpol_testkit::Netns::existing(names().node("node-1"));
    for v4 in [true, false] {
        let at_2 = node_2.internal_ip(v4).context("node-2's address")?;
        wait_for(
            std::time::Duration::from_secs(30),
            "the host reaches x/b through node-2's port (externalTrafficPolicy: Local)",
            || Ok(from_host(at_2).then_some(())),
        )?;
        ensure!(
            !echo::connects(
                &node_1_ns,
                at_2,
                NODE_PORT,
                std::time::Duration::from_millis(1500)
            ),
            "node-1 -> node-2:{NODE_PORT} (externalTrafficPolicy: Local): node-1's address is \
             outside x/b's ipBlock, yet allowed"
        );
    }
    println!(
        "cluster test: node port, externalTrafficPolicy Local: the host's address reaches x/b's \
         ipBlock, another node's does not, IPv4 and IPv6"
    );
    write("replace", service("Cluster"))?;
    for v4 in [true, false] {
        let at_1 = node_1.internal_ip(v4).context("node-1's address")?;
        ensure!(
            !from_host(at_1),
            "host -> node-1:{NODE_PORT} (externalTrafficPolicy: Cluster): masqueraded to node-1, \
             yet allowed"
        );
    }
    // node-1 forwards through flannel, masqueraded to its flannel
    // addresses (its pod subnets' first): admitting those admits it.
    policy(&[
        format!("{API_V4}/32"),
        format!("{API_V6}/128"),
        node_1.pod_cidr(true).context("a v4 subnet")?.to_string(),
        node_1.pod_cidr(false).context("a v6 subnet")?.to_string(),
    ])?;
    for v4 in [true, false] {
        let at_1 = node_1.internal_ip(v4).context("node-1's address")?;
        wait_for(
            std::time::Duration::from_secs(30),
            "the host reaches x/b through node-1's port once node-1's subnet is admitted",
            || Ok(from_host(at_1).then_some(())),
        )?;
    }
    println!(
        "cluster test: node port, externalTrafficPolicy Cluster: through another node the \
         client is that node's address: denied, then admitted by an ipBlock of it"
    );
    kubectl(
        &["delete", "networkpolicy", "-n", "x", "b-from-cidrs"],
        None,
    )?;
    kubectl(&["delete", "service", "-n", "x", "np-b"], None)?;
    kube_proxy(&specs, &objects)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_nodes_follow_the_three_node_files_scheme() {
        let (generated, source) = objects(Some(12), None).expect("twelve nodes");
        assert_eq!(source, "12 generated nodes");
        let specs = cluster::node_specs(&generated).expect("they wire");
        assert_eq!(specs.len(), 12);
        let n12 = &specs[11];
        assert_eq!(n12.name, "node-12");
        assert_eq!(
            n12.pod_cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.42.12.0/24", "fd00:10:42:c::/64"]
        );
        assert_eq!(
            n12.internal,
            [
                "10.200.0.12".parse::<IpAddr>().expect("ip"),
                "fd00:200::c".parse().expect("ip")
            ]
        );
        assert!(objects(Some(0), None).is_err());
        assert!(objects(Some(201), None).is_err());
    }

    #[test]
    fn pods_name_what_cannot_be_made() {
        let nodes = cluster::node_specs(&objects(Some(1), None).expect("a node").0).expect("wires");
        let pod = |spec: Value| json!({"kind": "Pod", "metadata": {"name": "p", "namespace": "x"}, "spec": spec});
        for (spec, says) in [
            (json!({}), "no spec.nodeName"),
            (
                json!({"nodeName": "node-9"}),
                "node node-9 is not in the file",
            ),
        ] {
            let e = pods(&[pod(spec)], &nodes)
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains("x/p") && e.contains(says), "{e}");
        }
        let host = |ip: &str| {
            let mut p = pod(json!({"nodeName": "node-1", "hostNetwork": true}));
            p["status"] = json!({"podIPs": [{"ip": ip}]});
            p
        };
        let e = pods(&[host("10.42.1.5")], &nodes)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("x/p") && e.contains("not an address of its node node-1"),
            "{e}"
        );
        let ok = pods(&[host("10.200.0.1")], &nodes).expect("the node's address");
        assert!(ok[0].host_network && ok[0].ips == ["10.200.0.1".parse::<IpAddr>().expect("ip")]);
    }
}
