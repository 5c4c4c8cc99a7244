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
//! Not yet: kube-proxy's Services, host-networked pods, `conformance
//! --cluster`, the rolling upgrade. Those are the next steps of the
//! multi-node issue.
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
    cni::{Sandbox, result_ips},
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
    let nodes = match control_plane(&names, &specs, &objects, &dir) {
        Ok(n) => n,
        Err(e) => {
            let _ = down();
            return Err(e);
        }
    };
    let mut made = Vec::new();
    for FilePod {
        namespace: ns,
        name,
        node,
        ips,
    } in &pods
    {
        let spec = specs.iter().find(|s| &s.name == node).context("node")?;
        let at = nodes.iter().find(|n| &n.name == node).context("node")?;
        let plugin = at.host_file(dt::K3S_CNI_BIN).join("netpol-cni");
        let socket = at.host_file("/run/netpol").join("cni.sock");
        let chain = cluster::node_chain(
            spec,
            &at.host_file("/var/lib/cni/networks"),
            Some((&plugin, &socket)),
        );
        let mut sandbox = Sandbox::new(ns, name);
        sandbox.ips = cluster::requested_ips(spec, ips)
            .map_err(|e| anyhow::anyhow!("Pod {ns}/{name}: {e}"))?;
        let result = match cluster::add_pod(&names, spec, &chain, &sandbox) {
            Ok(r) => r,
            Err(e) => {
                let logs = agent_logs(node);
                let _ = down();
                bail!("Pod {ns}/{name} on {node}: {e}\n{logs}");
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
        let _ = down();
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

fn agent_logs(node: &str) -> String {
    dt::logs(&format!("{PREFIX}-{node}-agent"))
}

/// The host's leg on the underlay, the API server, the image and one
/// agent per node, ready; the nodes as the agents' pods see them.
fn control_plane(
    names: &Names,
    specs: &[NodeSpec],
    objects: &[Value],
    dir: &Path,
) -> Result<Vec<pod::Node>> {
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
    let ds = dt::daemonset("base")?;
    let spec = dt::pod_spec(&ds)?.clone();
    let agent = spec
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .context("no agent container in the DaemonSet")?
        .clone();
    let mut nodes = Vec::new();
    for n in specs {
        let node = pod::Node {
            name: n.name.clone(),
            host_ip: n
                .internal_ip(true)
                .or_else(|| n.internal_ip(false))
                .context("an InternalIP")?,
            netns: netpol_testkit::Netns::path_of(&names.node(&n.name)),
            root: PathBuf::from(NODE_ROOTS).join(&n.name),
            api,
            service_account: tls.join("serviceaccount"),
        };
        dt::node_root(&node.root)?;
        // k3s's flannel conflist, as k3s writes it at start.
        let conflist = node.host_file(dt::K3S_CONFLIST);
        std::fs::create_dir_all(conflist.parent().context("conflist folder")?)?;
        std::fs::write(&conflist, dt::FLANNEL_CONFLIST)?;
        let name = |c: &Container| format!("{PREFIX}-{}-{}", node.name, c.name);
        for c in spec.init_containers.iter().flatten() {
            dt::podman_run(&spec, c, &node, &built.reference, &name(c), false)?;
        }
        dt::podman_run(&spec, &agent, &node, &built.reference, &name(&agent), true)?;
        nodes.push(node);
    }
    let path = dt::probe_path(&agent, true)?;
    for node in &nodes {
        let at = std::net::SocketAddr::new(node.host_ip, 9101);
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
        .map_err(|e| e.context(agent_logs(&node.name)))?;
        println!("cluster: {}'s agent is ready", node.name);
    }
    Ok(nodes)
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

/// The echo port of the test's server pod.
const PORT: u16 = 8080;

/// `cargo xtask cluster test`: the cluster of `cluster-3node.yaml` up,
/// then a policy written with kubectl enforced across nodes, both
/// families, then down (also when a check fails).
pub fn test() -> Result<()> {
    up(None, None)?;
    let checked = checks();
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

fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String> {
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
            (
                json!({"nodeName": "node-1", "hostNetwork": true}),
                "host-networked",
            ),
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
    }
}
