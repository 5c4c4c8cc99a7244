//! `cargo xtask conformance --cluster FILE`: the scenarios on the k3s-like
//! cluster of `cargo xtask cluster` (several nodes over flannel's VXLAN,
//! an agent per node under podman, the test API server over TLS).
//!
//! Unlike the one-node run, nothing reaches an agent through files: every
//! object a step applies or deletes is written with `kubectl` (`create`,
//! `replace`, `delete`), pods are made and removed on the node their
//! `spec.nodeName` names through that node's CNI chain (`bridge`,
//! `host-local`, `portmap`, `netpol-cni`), and kube-proxy's Service rules
//! are written on every node. A step is enforced when every node's agent
//! reports the fingerprint of what the API server holds, as that node sees
//! it (its own Node only), with its pods programmed.
//!
//! A host-networked pod is its node's namespace: nothing is made for it,
//! and its ports are served on the node's addresses.
//!
//! Not here: `explain` (each node's maps answer for that node's pods only;
//! the one-node run checks it).
use std::{
    collections::BTreeMap,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use netpol_testkit::{
    Netns,
    cluster::{self as net, NodeSpec},
    cni::Sandbox,
};
use serde_yaml::Value;

use super::{
    Harness, Options, Tally, ViaSel, probe,
    scenario::{self, ObjKey, PodSpec},
    services,
};
use crate::cluster as cl;

/// How long the agents may take to enforce one step.
const APPLY_DEADLINE: Duration = Duration::from_secs(30);
/// The agents' status port (the DaemonSet's).
pub const STATUS_PORT: u16 = 9101;

/// A pod on a node.
struct Pod {
    node: String,
    fd: Arc<File>,
    spec: PodSpec,
    /// Its sandbox and the chain's result; `None` for a host-networked
    /// pod, which is its node's namespace.
    made: Option<(Sandbox, serde_json::Value)>,
}

/// The cluster as the scenarios see it.
struct Cluster {
    nodes: Vec<NodeSpec>,
    pods: BTreeMap<String, Pod>,
    services: services::Kube,
    via: ViaSel,
    agent: PathBuf,
    /// Where the API server's objects are dumped for `fingerprint`.
    dir: PathBuf,
    /// Ports served in node namespaces for host-networked pods: (node,
    /// protocol, port). Their servers outlive the pod, as the process's
    /// threads do; a pod declaring one again finds it served.
    host_served: std::collections::BTreeSet<(String, super::scenario::Proto, u16)>,
}

/// `cluster down` when the run ends, however it ends.
struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        if let Err(e) = cl::down() {
            eprintln!("conformance --cluster: {e:#}");
        }
    }
}

/// The conformance run on a cluster brought up from `opts.model`, taken
/// down at the end.
pub fn run(opts: &Options) -> Result<Tally> {
    let own = opts.model.file_name().and_then(|n| n.to_str());
    let scenarios: Vec<super::Scenario> = super::select_any_model(opts)?
        .into_iter()
        .filter(|s| opts.models.takes(s, own))
        .collect();
    // Each scenario on the model it names (`cluster:`, a file of the
    // shared folder), else on `opts.model`: one cluster per model, in turn.
    let mut by_model: BTreeMap<PathBuf, Vec<super::Scenario>> = BTreeMap::new();
    for sc in scenarios {
        let model = match &sc.cluster {
            Some(name) => crate::shared_conformance()?.join(name),
            None => opts.model.clone(),
        };
        by_model.entry(model).or_default().push(sc);
    }
    let mut total = Tally::default();
    for (model, scenarios) in &by_model {
        let t = run_on(opts, model, scenarios)?;
        total.passed += t.passed;
        total.failed += t.failed;
    }
    println!(
        "conformance: {} passed, {} failed",
        total.passed, total.failed
    );
    Ok(total)
}

/// `scenarios` on a cluster brought up from `model_file`, taken down after.
fn run_on(opts: &Options, model_file: &Path, scenarios: &[super::Scenario]) -> Result<Tally> {
    let text = std::fs::read_to_string(model_file)
        .with_context(|| format!("reading {}", model_file.display()))?;
    let mut model = BTreeMap::new();
    for d in scenario::documents(&text)? {
        model.insert(scenario::key_of(&d)?, d);
    }
    cl::up(None, Some(model_file))?;
    let down = Down;
    let mut cluster = Cluster::new(&model, opts)?;
    let tally = super::scenarios_on(&mut cluster, &model, scenarios, opts.via, opts.staged);
    if tally.as_ref().map_or(true, |t| t.failed > 0) {
        for n in &cluster.nodes {
            eprintln!("{}", cl::agent_logs(&n.name));
        }
    }
    drop(cluster);
    drop(down);
    let tally = tally?;
    println!(
        "conformance on {}: {} passed, {} failed",
        model_file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?"),
        tally.passed,
        tally.failed
    );
    Ok(tally)
}

/// A pod object as `cluster` makes pods.
fn file_pod(v: &Value, nodes: &[NodeSpec]) -> Result<Option<cl::FilePod>> {
    let json = serde_json::to_value(v)?;
    let mut pods = cl::pods(std::slice::from_ref(&json), nodes)?;
    Ok(pods.pop().filter(|p| !p.ips.is_empty()))
}

impl Cluster {
    /// The pods `cluster up` made, serving their ports; kube-proxy's
    /// chains on every node.
    fn new(model: &BTreeMap<ObjKey, Value>, opts: &Options) -> Result<Self> {
        let names = cl::names();
        let objects: Vec<serde_json::Value> = model
            .values()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()?;
        let nodes = net::node_specs(&objects).map_err(anyhow::Error::msg)?;
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(cl::state_dir().join("cluster.json"))
                .context("the cluster's state file")?,
        )?;
        let mut pods = BTreeMap::new();
        let mut host = Vec::new();
        for p in state["pods"].as_array().into_iter().flatten() {
            let (ns, name, node) = (
                p["namespace"].as_str().unwrap_or_default(),
                p["name"].as_str().unwrap_or_default(),
                p["node"].as_str().unwrap_or_default(),
            );
            let key = ("Pod".to_owned(), ns.to_owned(), name.to_owned());
            let spec = scenario::pod_spec(model.get(&key).context("a made pod in the model")?)?
                .context("a made pod without addresses")?;
            if p["host_network"] == true {
                host.push((node.to_owned(), spec));
                continue;
            }
            let mut sandbox = Sandbox::new(ns, name);
            sandbox.container_id = p["container_id"].as_str().unwrap_or_default().to_owned();
            let fd = Arc::new(Netns::existing(names.pod(node, ns, name)).open()?);
            probe::start_servers(&fd, &spec)?;
            pods.insert(
                spec.id.clone(),
                Pod {
                    node: node.to_owned(),
                    fd,
                    spec,
                    made: Some((sandbox, p["result"].clone())),
                },
            );
        }
        let services = services::Kube::new(&cl::kube_nodes(&nodes))?;
        let dir = cl::state_dir().join("conformance");
        std::fs::create_dir_all(&dir)?;
        let mut cluster = Self {
            nodes,
            pods,
            services,
            via: opts.via,
            agent: opts.agent.clone(),
            dir,
            host_served: std::collections::BTreeSet::new(),
        };
        for (node, spec) in host {
            cluster.host(&node, spec)?;
        }
        if cluster.via != ViaSel::Pod {
            cluster.services.sync(model)?;
        }
        cluster.wait_enforced()?;
        Ok(cluster)
    }

    fn node(&self, name: &str) -> Result<&NodeSpec> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// The node and pod an object makes, if it is a pod with addresses.
    fn placed(&self, v: &Value) -> Result<Option<(cl::FilePod, PodSpec)>> {
        Ok(match (file_pod(v, &self.nodes)?, scenario::pod_spec(v)?) {
            (Some(f), Some(s)) => Some((f, s)),
            _ => None,
        })
    }

    fn remove(&mut self, id: &str) -> Result<()> {
        if let Some(p) = self.pods.remove(id)
            && let Some((sandbox, result)) = &p.made
        {
            cl::remove_pod(self.node(&p.node)?, sandbox, result)?;
        }
        Ok(())
    }

    /// A host-networked pod: its node's namespace, serving its ports on
    /// the node's addresses (those not served already).
    fn host(&mut self, node: &str, spec: PodSpec) -> Result<()> {
        let fd = Arc::new(Netns::existing(cl::names().node(node)).open()?);
        let mut new = spec.clone();
        new.ports
            .retain(|&(proto, port)| self.host_served.insert((node.to_owned(), proto, port)));
        if !new.ports.is_empty() {
            probe::start_servers(&fd, &new)?;
        }
        self.pods.insert(
            spec.id.clone(),
            Pod {
                node: node.to_owned(),
                fd,
                spec,
                made: None,
            },
        );
        Ok(())
    }

    fn make(&mut self, pod: &cl::FilePod, spec: PodSpec) -> Result<()> {
        if pod.host_network {
            return self.host(&pod.node, spec);
        }
        let node = self.node(&pod.node)?.clone();
        let (sandbox, result) = cl::make_pod(&node, pod)?;
        let netns = cl::names().pod(&pod.node, &pod.namespace, &pod.name);
        let fd = Arc::new(Netns::existing(netns.as_str()).open()?);
        probe::start_servers(&fd, &spec)?;
        self.pods.insert(
            spec.id.clone(),
            Pod {
                node: pod.node.clone(),
                fd,
                spec,
                made: Some((sandbox, result)),
            },
        );
        Ok(())
    }

    fn wait_enforced(&self) -> Result<()> {
        wait_enforced(&self.nodes, &self.agent, &self.dir, |node| {
            self.pods
                .values()
                .filter(|p| p.node == node && p.made.is_some())
                .count()
        })
    }
}

/// Every node's agent reports the fingerprint of the API server's objects
/// as that node sees them (`agent fingerprint --node`, over a dump in
/// `dir`), with `pods_on(node)` pod interfaces programmed.
pub fn wait_enforced(
    nodes: &[NodeSpec],
    agent: &Path,
    dir: &Path,
    pods_on: impl Fn(&str) -> usize,
) -> Result<()> {
    let dump = cl::kubectl(
        &[
            "get",
            "nodes,namespaces,pods,services,networkpolicies,clusternetworkpolicies",
            "--all-namespaces",
            "-o",
            "yaml",
        ],
        None,
    )?;
    std::fs::write(dir.join("objects.yaml"), dump)?;
    let deadline = Instant::now() + APPLY_DEADLINE;
    for node in nodes {
        let want = super::expected_fingerprint(agent, dir, Some(&node.name))?;
        let pods = pods_on(&node.name);
        let ip = node
            .internal_ip(true)
            .or_else(|| node.internal_ip(false))
            .context("an InternalIP")?;
        let at = SocketAddr::new(ip, STATUS_PORT);
        let mut last = serde_json::Value::Null;
        loop {
            if let Ok((200, body)) = crate::deploy_test::http_get(at, "/status")
                && let Ok(s) = serde_json::from_str::<serde_json::Value>(&body)
            {
                let programmed = s["interfaces"]
                    .as_array()
                    .map_or(0, |i| i.iter().filter(|i| i["programmed"] == true).count());
                if s["fingerprint"].as_str() == Some(want.as_str()) && programmed >= pods {
                    break;
                }
                last = s;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}'s agent did not enforce fingerprint {want} ({pods} pods) within \
                     {APPLY_DEADLINE:?}; last status: {last}",
                    node.name
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

/// Objects as kubectl reads them from standard input: JSON documents,
/// since kubectl's YAML 1.1 would read a namespace `y` as a boolean.
fn documents<'a>(objects: impl Iterator<Item = &'a Value>) -> Result<String> {
    let mut text = String::new();
    for v in objects {
        text.push_str("---\n");
        text.push_str(&serde_json::to_string(v)?);
        text.push('\n');
    }
    Ok(text)
}

/// What `kubectl delete -f` needs of an object: its kind and name.
fn reference(key: &ObjKey, v: &Value) -> Value {
    let mut metadata = serde_yaml::Mapping::new();
    metadata.insert("name".into(), key.2.clone().into());
    if !key.1.is_empty() {
        metadata.insert("namespace".into(), key.1.clone().into());
    }
    let mut r = serde_yaml::Mapping::new();
    r.insert("apiVersion".into(), v["apiVersion"].clone());
    r.insert("kind".into(), key.0.clone().into());
    r.insert("metadata".into(), metadata.into());
    r.into()
}

impl Harness for Cluster {
    fn apply(
        &mut self,
        before: &BTreeMap<ObjKey, Value>,
        after: &BTreeMap<ObjKey, Value>,
    ) -> Result<()> {
        let gone: Vec<(&ObjKey, &Value)> = before
            .iter()
            .filter(|(k, _)| !after.contains_key(k))
            .collect();
        // Namespaces first: their objects are created after them.
        let mut created: Vec<(&ObjKey, &Value)> = after
            .iter()
            .filter(|(k, _)| !before.contains_key(k))
            .collect();
        created.sort_by_key(|(k, _)| k.0 != "Namespace");
        let replaced: Vec<(&ObjKey, &Value)> = after
            .iter()
            .filter(|(k, v)| before.get(k).is_some_and(|old| old != *v))
            .collect();
        // A pod whose node, addresses or ports change is a new pod.
        let mut remade = Vec::new();
        for (k, v) in &replaced {
            if k.0 == "Pod" {
                let (old, new) = (self.placed(&before[k])?, self.placed(v)?);
                let same = match (&old, &new) {
                    (Some((of, os)), Some((nf, ns))) => {
                        of.node == nf.node && of.host_network == nf.host_network && os == ns
                    }
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    remade.push((*k, *v));
                }
            }
        }

        if !gone.is_empty() {
            let refs: Vec<Value> = gone.iter().map(|(k, v)| reference(k, v)).collect();
            cl::kubectl(
                &["delete", "--wait=false", "-f", "-"],
                Some(&documents(refs.iter())?),
            )?;
        }
        for (k, _) in gone.iter().chain(&remade) {
            if k.0 == "Pod" {
                self.remove(&format!("{}/{}", k.1, k.2))?;
            }
        }
        if !created.is_empty() {
            cl::kubectl(
                &["create", "-f", "-"],
                Some(&documents(created.iter().map(|(_, v)| *v))?),
            )?;
        }
        if !replaced.is_empty() {
            cl::kubectl(
                &["replace", "-f", "-"],
                Some(&documents(replaced.iter().map(|(_, v)| *v))?),
            )?;
        }
        for (k, v) in created.iter().chain(&remade) {
            if k.0 == "Pod"
                && let Some((pod, spec)) = self.placed(v)?
            {
                self.make(&pod, spec)?;
            }
        }
        if self.via != ViaSel::Pod {
            self.services.sync(after)?;
        }
        self.wait_enforced()
    }

    fn pod(&self, id: &str) -> Option<(&Arc<File>, &PodSpec)> {
        self.pods.get(id).map(|p| (&p.fd, &p.spec))
    }

    fn explain(&self, _queries: &[String]) -> Result<Option<Vec<serde_json::Value>>> {
        Ok(None)
    }
}
