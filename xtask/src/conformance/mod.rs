//! `cargo xtask conformance`: the scenarios of `../shared/conformance`
//! (FORMAT.md) with real packets between network namespaces, filtered by
//! the real programs, with policies fed to the real `netpol-agent run` as
//! manifests.
pub mod attribution;
pub mod cluster;
pub mod probe;
pub mod scenario;
pub mod services;
pub mod staged;
pub mod topology;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_yaml::Value;

use scenario::{Family, ObjKey, PodSpec, Proto, Scenario, Via};
use topology::{Kind, Topology};

/// Parallel probes.
const WORKERS: usize = 256;
/// A cell that must fail waits this long; round trips here are
/// microseconds, so an allowed cell answers well within it.
const FAST: Duration = Duration::from_millis(150);
/// An expected connection that failed the fast attempt gets one slow
/// retry, so a loaded machine cannot turn an allowed cell into a failure.
const SLOW: Duration = Duration::from_secs(3);
/// How long the agent may take to enforce one step's manifests.
const APPLY_DEADLINE: Duration = Duration::from_secs(30);
const LISTEN: &str = "127.0.0.1:9101";

/// Which probes to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViaSel {
    Pod,
    Service,
    All,
}

/// What `cargo xtask conformance` was asked for.
#[derive(Clone, Debug)]
pub struct Options {
    pub scenarios: PathBuf,
    pub model: PathBuf,
    pub filter: Option<String>,
    pub topology: Kind,
    pub via: ViaSel,
    /// Run only N matching scenarios, spread over the set.
    pub limit: Option<usize>,
    /// The agent binary.
    pub agent: PathBuf,
    /// The eBPF object.
    pub object: PathBuf,
    /// Which scenarios, by the model they name.
    pub models: Models,
    /// Stage each policy step before applying it (`staged`).
    pub staged: bool,
}

/// Which scenarios a run takes, by the model (`cluster:`) they name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Models {
    /// Every scenario: the one-node run refuses one naming another model
    /// than its own; the cluster run brings up each model in turn.
    All,
    /// Only those on the run's own model (or naming none).
    Own,
    /// Only those naming another model than the run's own.
    Others,
}

impl Models {
    /// Whether `sc` is taken by a run on `model` (a file name).
    #[must_use]
    pub fn takes(self, sc: &Scenario, model: Option<&str>) -> bool {
        let own = sc.cluster.is_none() || sc.cluster.as_deref() == model;
        match self {
            Models::All => true,
            Models::Own => own,
            Models::Others => !own,
        }
    }
}

/// Cells passed and failed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
}

impl Tally {
    /// Counts `ok`; a failure adds `line()` to `lines`.
    pub fn count(&mut self, ok: bool, lines: &mut Vec<String>, line: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            lines.push(line());
        }
    }
}

/// Everything the run made outside its namespaces: the agent process, the
/// bpffs mount, the scratch folder. Removed on drop, also on failure.
pub struct Run {
    dir: PathBuf,
    bpffs: PathBuf,
    agent: Option<Child>,
}

impl Run {
    /// The agent's state file folder (`run --state-dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The run's private bpffs (the agent pins in its `netpol` folder).
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// `netpol-agent explain --batch - -o json` in the node netns, against
    /// the live maps and the agent's state file: one answer per query, in
    /// order (each a JSON object with `query` and `verdict`, or `error`).
    pub fn explain(
        &self,
        topo: &Topology,
        agent: &Path,
        queries: &[String],
    ) -> Result<Vec<serde_json::Value>> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &topo.node.name])
            .arg(agent)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(["explain", "--batch", "-", "-o", "json", "--state-dir"])
            .arg(self.state_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running netpol-agent explain --batch")?;
        let input = queries.join("\n");
        let mut stdin = child.stdin.take().context("explain's stdin")?;
        // Written from a thread: explain answers while it reads, and a full
        // pipe either way would block both processes.
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child
            .wait_with_output()
            .context("waiting for netpol-agent explain")?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("explain's writer panicked"))?
            .context("writing the queries")?;
        ensure!(
            out.status.success(),
            "netpol-agent explain --batch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answers: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .context("explain's JSON lines")?;
        ensure!(
            answers.len() == queries.len(),
            "netpol-agent explain answered {} of {} queries",
            answers.len(),
            queries.len()
        );
        Ok(answers)
    }
}

/// One sentence of an explain answer: the side that decided, or the error.
pub fn why(answer: &serde_json::Value) -> String {
    if let Some(e) = answer["error"].as_str() {
        return format!("error: {e}");
    }
    let side = |j: &serde_json::Value| {
        format!(
            "{} of {}: {} ({})",
            j["direction"].as_str().unwrap_or("?"),
            j["of"].as_str().unwrap_or("?"),
            j["text"].as_str().unwrap_or("?"),
            j["reason"].as_str().unwrap_or("?")
        )
    };
    let (e, i) = (&answer["egress"], &answer["ingress"]);
    match (e["allowed"].as_bool(), i["allowed"].as_bool()) {
        (Some(false), _) => side(e),
        (_, Some(false)) => side(i),
        _ => format!("{}; {}", side(e), side(i)),
    }
}

/// Checks `answer` (of `explain`, or of `explain --staged`: `says`)
/// against the cell `c`: no error, the kernel's verdict with a server
/// listening gives the matrix's mark, and each side names what decided.
fn check_explained(
    tally: &mut Tally,
    c: &Check,
    answer: &serde_json::Value,
    says: &str,
    lines: &mut Vec<String>,
) {
    let allowed = answer["verdict"] == "allowed";
    let named = names_decider(&answer["egress"]) && names_decider(&answer["ingress"]);
    tally.count(
        answer["error"].is_null() && (allowed && c.listens) == c.want && named,
        lines,
        || {
            format!(
                "{}, {says} says {}{}: {}",
                c.label,
                answer["verdict"].as_str().unwrap_or("nothing"),
                if named {
                    ""
                } else {
                    " and names nothing that decided"
                },
                why(answer)
            )
        },
    );
}

/// Whether a side of an explain answer that policy judged names what
/// decided it: the `ClusterNetworkPolicy` decision of its entry (agreeing
/// with the kernel), else the rules of the entry that allowed it, or the
/// policies isolating it.
fn names_decider(j: &serde_json::Value) -> bool {
    if j["reason"] != "pass_policy" && j["reason"] != "drop_policy" {
        return true;
    }
    let nonempty = |v: &serde_json::Value| v.as_array().is_some_and(|a| !a.is_empty());
    let decision = &j["decision"];
    if !decision.is_null() {
        return decision["allowed"] == j["allowed"]
            && decision["text"].as_str().is_some_and(|t| !t.is_empty());
    }
    if j["allowed"] == true {
        nonempty(&j["entry"]["rules"])
    } else {
        nonempty(&j["policies"])
    }
}

/// What an interrupted run must remove: Ctrl-C (SIGINT/SIGTERM) ends the
/// process without running destructors, so the handler removes these.
#[derive(Default)]
struct Leftovers {
    /// Prefix of every netns of the run.
    netns_prefix: Option<String>,
    agent_pid: Option<u32>,
    bpffs: Option<PathBuf>,
    dir: Option<PathBuf>,
}

static LEFTOVERS: Mutex<Leftovers> = Mutex::new(Leftovers {
    netns_prefix: None,
    agent_pid: None,
    bpffs: None,
    dir: None,
});

/// Installs the interrupt handler (once per process).
pub fn cleanup_on_interrupt() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if let Ok(l) = LEFTOVERS.lock() {
                if let Some(pid) = l.agent_pid {
                    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                }
                if let Some(prefix) = &l.netns_prefix
                    && let Ok(entries) = std::fs::read_dir("/var/run/netns")
                {
                    for e in entries.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if name.starts_with(prefix.as_str()) {
                            let _ = Command::new("ip").args(["netns", "del", &name]).status();
                        }
                    }
                }
                if let Some(b) = &l.bpffs {
                    let _ = nix::mount::umount2(b, nix::mount::MntFlags::MNT_DETACH);
                }
                if let Some(d) = &l.dir {
                    let _ = std::fs::remove_dir_all(d);
                }
            }
            eprintln!("interrupted: namespaces, agent, bpffs and files removed");
            std::process::exit(130);
        });
    });
}

/// Records what the interrupt handler must remove.
pub fn register_netns_prefix(prefix: &str) {
    cleanup_on_interrupt();
    if let Ok(mut l) = LEFTOVERS.lock() {
        l.netns_prefix = Some(prefix.to_owned());
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = Command::new("kill").arg(a.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && a.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
        // The agent's log outlives the run, for post-mortems.
        let _ = std::fs::copy(
            self.dir.join("agent.log"),
            crate::root().join("target/conformance-agent.log"),
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cluster model: objects by key, in file order.
pub struct Model {
    pub objects: BTreeMap<ObjKey, Value>,
    pub node_v4: Ipv4Addr,
    pub node_v6: Ipv6Addr,
    pub node_name: String,
}

fn load_model(path: &Path) -> Result<Model> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading the conformance model {} (the shared folder must sit beside the repository)",
            path.display()
        )
    })?;
    model_from_text(&text)
}

/// A model from multi-document YAML: a Node, Namespaces, Pods, Services.
pub fn model_from_text(text: &str) -> Result<Model> {
    let docs = scenario::documents(text)?;
    let mut objects = BTreeMap::new();
    let (mut v4, mut v6, mut name) = (None, None, None);
    for d in docs {
        let key = scenario::key_of(&d)?;
        if key.0 == "Node" {
            name = Some(key.2.clone());
            for a in d["status"]["addresses"].as_sequence().into_iter().flatten() {
                match a["address"].as_str().map(str::parse::<IpAddr>) {
                    Some(Ok(IpAddr::V4(x))) => v4 = Some(x),
                    Some(Ok(IpAddr::V6(x))) => v6 = Some(x),
                    _ => {}
                }
            }
        }
        objects.insert(key, d);
    }
    Ok(Model {
        objects,
        node_v4: v4.context("the model's Node has no IPv4 address")?,
        node_v6: v6.context("the model's Node has no IPv6 address")?,
        node_name: name.context("the model has no Node")?,
    })
}

pub fn write_manifests(dir: &Path, objects: &BTreeMap<ObjKey, Value>) -> Result<()> {
    let mut text = String::new();
    for v in objects.values() {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(v)?);
    }
    // Write then rename: the agent's watcher never reads half a file.
    let tmp = dir.join(".cluster.yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("cluster.yaml"))?;
    Ok(())
}

/// The fingerprint the agent will report once it enforces `dir`; with
/// `node`, that node's agent when `dir` holds several Nodes (it sees its
/// own only).
pub fn expected_fingerprint(agent: &Path, dir: &Path, node: Option<&str>) -> Result<String> {
    let out = Command::new(agent)
        .args(["fingerprint", "--manifests"])
        .arg(dir)
        .args(node.map(|n| ["--node", n]).into_iter().flatten())
        .output()
        .context("running netpol-agent fingerprint")?;
    ensure!(
        out.status.success(),
        "netpol-agent fingerprint failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// GET /status from inside the node netns.
fn status(node_fd: &Arc<File>) -> Result<serde_json::Value> {
    let fd = node_fd.clone();
    std::thread::scope(|s| {
        s.spawn(move || -> Result<serde_json::Value> {
            probe::enter(&fd)?;
            let addr: SocketAddr = LISTEN.parse()?;
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            c.set_read_timeout(Some(Duration::from_secs(2)))?;
            c.write_all(b"GET /status HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut body = String::new();
            c.read_to_string(&mut body)?;
            let json = body.split("\r\n\r\n").nth(1).context("no HTTP body")?;
            Ok(serde_json::from_str(json)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("status thread panicked"))?
    })
}

/// Whether the agent's state file (written off its sync loop, just after
/// the apply) describes `fingerprint` with `pods` interfaces bound: what
/// `explain` names rules with.
fn state_written(dir: &Path, fingerprint: &str, pods: usize) -> bool {
    let Ok(text) = std::fs::read(dir.join("state.json")) else {
        return false;
    };
    let Ok(state) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return false;
    };
    let bound = state["endpoints"]
        .as_array()
        .map_or(0, |e| e.iter().filter(|e| e["ifindex"].is_u64()).count());
    state["fingerprint"].as_str() == Some(fingerprint) && bound >= pods
}

/// Waits until the agent enforces `fingerprint` with every pod interface
/// bound and programmed, and has written its state file.
pub fn wait_applied(
    run: &mut Run,
    node_fd: &Arc<File>,
    fingerprint: &str,
    pods: usize,
) -> Result<()> {
    let deadline = Instant::now() + APPLY_DEADLINE;
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline {
        if let Some(a) = run.agent.as_mut()
            && let Some(st) = a.try_wait()?
        {
            bail!(
                "netpol-agent exited ({st}); its log: {}",
                run.dir.join("agent.log").display()
            );
        }
        if let Ok(s) = status(node_fd) {
            let programmed = s["interfaces"]
                .as_array()
                .map_or(0, |i| i.iter().filter(|i| i["programmed"] == true).count());
            if s["fingerprint"].as_str() == Some(fingerprint)
                && programmed >= pods
                && state_written(&run.state_dir(), fingerprint, pods)
            {
                return Ok(());
            }
            last = s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!(
        "netpol-agent did not enforce fingerprint {fingerprint} within {APPLY_DEADLINE:?}; last status: {last}"
    )
}

pub struct Job {
    pub via: Via,
    pub from: Arc<File>,
    pub dst: SocketAddr,
    pub proto: Proto,
    pub want: bool,
    pub label: String,
    /// The cell (its `explain` line; empty where none).
    pub key: String,
}

/// Runs probes on a pool of threads, each entering the client's netns.
pub fn run_probes(jobs: Vec<Job>) -> Vec<(Job, bool)> {
    let n = jobs.len();
    let queue = Arc::new(Mutex::new(jobs));
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(n.max(1)) {
            let queue = queue.clone();
            let tx = tx.clone();
            s.spawn(move || {
                loop {
                    let job = queue.lock().ok().and_then(|mut q| q.pop());
                    let Some(job) = job else { break };
                    let got = probe::enter(&job.from).is_ok() && {
                        let first = probe::probe(job.proto, job.dst, FAST);
                        first || (job.want && probe::probe(job.proto, job.dst, SLOW))
                    };
                    let _ = tx.send((job, got));
                }
            });
        }
    });
    drop(tx);
    rx.into_iter().collect()
}

/// The pods a Service selects (by namespace and labels).
fn backends<'a>(
    svc: &scenario::ServiceSpec,
    objects: &'a BTreeMap<ObjKey, Value>,
) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|((kind, ns, _), v)| {
            kind == "Pod" && *ns == svc.namespace && {
                let l = scenario::labels(v);
                svc.selector.iter().all(|(k, val)| l.get(k) == Some(val))
            }
        })
        .map(|(_, v)| v)
        .collect()
}

/// Mounts a private bpffs, writes the model's manifests and starts the
/// real `netpol-agent run` inside the node netns. The returned [`Run`]
/// stops the agent and removes the mount and files when dropped.
pub fn start_agent(
    topo: &Topology,
    model: &Model,
    agent: &Path,
    object: &Path,
    extra: &[&str],
) -> Result<(Run, PathBuf)> {
    let dir = std::env::temp_dir().join(format!("netpol-conformance-{}", std::process::id()));
    let manifests = dir.join("manifests");
    let bpffs = dir.join("bpffs");
    std::fs::create_dir_all(&manifests)?;
    std::fs::create_dir_all(&bpffs)?;
    let mut run = Run {
        dir: dir.clone(),
        bpffs: bpffs.clone(),
        agent: None,
    };
    // Mounted here, not by the agent: `ip netns exec` gives it a mount
    // namespace of its own, whose new mounts the harness could not see.
    nix::mount::mount(
        Some("bpffs"),
        &bpffs,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting a private bpffs")?;
    write_manifests(&manifests, &model.objects)?;
    let log = File::create(dir.join("agent.log"))?;
    let state = run.state_dir();
    let child = Command::new("ip")
        .args(["netns", "exec", &topo.node.name])
        .arg(agent)
        .arg("--bpffs")
        .arg(&bpffs)
        .args(["run", "--manifests"])
        .arg(&manifests)
        .args(["--node", &model.node_name, "--listen", LISTEN])
        .arg("--state-dir")
        .arg(&state)
        .args(extra)
        .env("NETPOL_EBPF_OBJECT", object)
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting netpol-agent run")?;
    if let Ok(mut l) = LEFTOVERS.lock() {
        l.agent_pid = Some(child.id());
        l.bpffs = Some(bpffs.clone());
        l.dir = Some(dir.clone());
    }
    run.agent = Some(child);
    Ok((run, manifests))
}

/// Writes `objects` and waits until the agent enforces them.
pub fn enforce(
    run: &mut Run,
    topo: &Topology,
    manifests: &Path,
    agent: &Path,
    objects: &BTreeMap<ObjKey, Value>,
) -> Result<()> {
    write_manifests(manifests, objects)?;
    let fp = expected_fingerprint(agent, manifests, None)?;
    wait_applied(run, &topo.node_fd, &fp, topo.pods.len())
}

/// Where scenarios run: the cluster's state brought about, pods to probe
/// from and to, and (where the harness has them) the live maps to ask.
pub trait Harness {
    /// Makes `after` the cluster's objects (it holds `before`) and returns
    /// once every agent enforces them.
    fn apply(
        &mut self,
        before: &BTreeMap<ObjKey, Value>,
        after: &BTreeMap<ObjKey, Value>,
    ) -> Result<()>;
    /// A pod's network namespace and what it serves.
    fn pod(&self, id: &str) -> Option<(&Arc<File>, &PodSpec)>;
    /// `netpol-agent explain` answers for the queries, in order; `None`
    /// where the harness cannot ask the node that would answer.
    fn explain(&self, queries: &[String]) -> Result<Option<Vec<serde_json::Value>>>;
    /// The agent's log file, where the harness has one to read.
    fn agent_log(&self) -> Option<PathBuf> {
        None
    }
}

/// One node netns with its pods and the real agent reading manifests.
struct OneNode {
    topo: Topology,
    run: Run,
    manifests: PathBuf,
    agent: PathBuf,
    services: services::Kube,
    via: ViaSel,
}

impl Harness for OneNode {
    fn apply(
        &mut self,
        before: &BTreeMap<ObjKey, Value>,
        after: &BTreeMap<ObjKey, Value>,
    ) -> Result<()> {
        // Pods that went, or whose addresses or ports changed, lose their
        // netns; new or changed ones get one, with their servers. A
        // relabelled pod keeps its netns.
        for (k, v) in before {
            if k.0 != "Pod" {
                continue;
            }
            let now = after.get(k).map(scenario::pod_spec).transpose()?.flatten();
            if now != scenario::pod_spec(v)? {
                self.topo.remove_pod(&format!("{}/{}", k.1, k.2));
            }
        }
        for v in after.values() {
            if let Some(p) = scenario::pod_spec(v)?
                && self.topo.pods.get(&p.id).is_none_or(|have| have.spec != p)
            {
                self.topo.remove_pod(&p.id);
                self.topo.add_pod(&p)?;
                probe::start_servers(&self.topo.pods[&p.id].fd, &p)?;
            }
        }
        enforce(
            &mut self.run,
            &self.topo,
            &self.manifests,
            &self.agent,
            after,
        )?;
        if self.via != ViaSel::Pod {
            self.services.sync(after)?;
        }
        Ok(())
    }

    fn pod(&self, id: &str) -> Option<(&Arc<File>, &PodSpec)> {
        self.topo.pods.get(id).map(|p| (&p.fd, &p.spec))
    }

    fn explain(&self, queries: &[String]) -> Result<Option<Vec<serde_json::Value>>> {
        self.run.explain(&self.topo, &self.agent, queries).map(Some)
    }

    fn agent_log(&self) -> Option<PathBuf> {
        Some(self.run.dir.join("agent.log"))
    }
}

/// The scenarios `opts` selects (name filter, then `limit` spread over
/// the set), each of which runs on `opts.model`.
pub fn select(opts: &Options) -> Result<Vec<Scenario>> {
    let model = opts.model.file_name().and_then(|n| n.to_str());
    let scenarios: Vec<Scenario> = select_any_model(opts)?
        .into_iter()
        .filter(|s| opts.models.takes(s, model))
        .collect();
    if let Some(sc) = scenarios
        .iter()
        .find(|s| s.cluster.is_some() && s.cluster.as_deref() != model)
    {
        bail!(
            "scenario {} runs on the model {}, not {}: run it with that model (`--cluster`)",
            sc.name,
            sc.cluster.as_deref().unwrap_or_default(),
            opts.model.display()
        );
    }
    Ok(scenarios)
}

/// [`select`], whatever model each names.
pub fn select_any_model(opts: &Options) -> Result<Vec<Scenario>> {
    let mut scenarios: Vec<Scenario> = scenario::load_dir(&opts.scenarios)?
        .into_iter()
        .filter(|s| {
            opts.filter
                .as_ref()
                .is_none_or(|f| s.name.contains(f.as_str()))
        })
        .collect();
    if let Some(n) = opts.limit
        && n > 0
        && n < scenarios.len()
    {
        // Spread over the set rather than its alphabetical head.
        let step = scenarios.len() / n;
        scenarios = scenarios.into_iter().step_by(step).take(n).collect();
    }
    ensure!(!scenarios.is_empty(), "no scenario matches");
    Ok(scenarios)
}

/// A cell's `explain` question and what it must answer.
#[derive(Clone, Debug)]
pub struct Check {
    /// The `explain --batch` line (also the cell's [`Job::key`]).
    pub query: String,
    /// The matrix's mark.
    pub want: bool,
    /// Whether the server listens on the port (an allowed cell without a
    /// listener fails the probe).
    pub listens: bool,
    /// How a failure is reported.
    pub label: String,
}

/// The probes of one step (number `step`, for labels) as jobs to send
/// and, where the server is a pod, the `explain` checks of the same
/// cells.
fn cells(
    harness: &dyn Harness,
    sc: &Scenario,
    step: usize,
    probes: &[scenario::Probe],
    objects: &BTreeMap<ObjKey, Value>,
    via: ViaSel,
) -> Result<(Vec<Job>, Vec<Check>)> {
    let mut jobs = Vec::new();
    let mut checks: Vec<Check> = Vec::new();
    for probe in probes {
        let wanted = matches!(
            (via, probe.via),
            (ViaSel::All, _) | (ViaSel::Pod, Via::Pod) | (ViaSel::Service, Via::Service)
        );
        if !wanted {
            continue;
        }
        for fam in &probe.families {
            for (from, to, want) in &probe.cells {
                let Some((client, _)) = harness.pod(from) else {
                    bail!("{}: step {step}: unknown client pod {from}", sc.name);
                };
                let dst = match probe.via {
                    Via::Pod => {
                        let (_, server) = harness
                            .pod(to)
                            .with_context(|| format!("{}: unknown server pod {to}", sc.name))?;
                        match fam {
                            Family::V4 => server.v4.map(IpAddr::V4),
                            Family::V6 => server.v6.map(IpAddr::V6),
                        }
                        .map(|ip| SocketAddr::new(ip, probe.port))
                    }
                    Via::Service => services::cluster_ip(objects, to, *fam)
                        .map(|ip| SocketAddr::new(ip, probe.port)),
                };
                let Some(dst) = dst else { continue };
                let mark = |b: bool| if b { "X" } else { "." };
                let fam_n = match fam {
                    Family::V4 => 4,
                    Family::V6 => 6,
                };
                // A pod reaching itself through its Service is a hairpin,
                // not a packet in its netns.
                let hairpin = if probe.via == Via::Service && from == to {
                    " via-service"
                } else {
                    ""
                };
                let key = format!(
                    "{from} {to} {}/{} {fam_n}{hairpin}",
                    probe.proto.to_string().to_lowercase(),
                    probe.port
                );
                // A Service cell is judged against the backend kube-proxy
                // picks: the Service's one pod.
                if let Some((_, server)) = harness.pod(to) {
                    checks.push(Check {
                        query: key.clone(),
                        want: *want,
                        listens: server.ports.contains(&(probe.proto, probe.port)),
                        label: format!(
                            "step {step} {}/{} {fam} {} explain: {from} -> {to} expected {}",
                            probe.port,
                            probe.proto,
                            probe.via,
                            mark(*want),
                        ),
                    });
                }
                jobs.push(Job {
                    via: probe.via,
                    from: client.clone(),
                    dst,
                    proto: probe.proto,
                    want: *want,
                    label: format!(
                        "step {step} {}/{} {fam} {}: {from} -> {to} expected {} got {}",
                        probe.port,
                        probe.proto,
                        probe.via,
                        mark(*want),
                        mark(!*want)
                    ),
                    key,
                });
            }
        }
    }
    Ok((jobs, checks))
}

/// The conformance run on one node. Prints every differing cell and the
/// summaries; returns the tally over all cells.
pub fn run(opts: &Options) -> Result<Tally> {
    let model = load_model(&opts.model)?;
    let scenarios = select(opts)?;
    let topo = Topology::new(opts.topology, model.node_v4, model.node_v6)?;
    let services = services::Kube::new(&[services::KubeNode {
        name: model.node_name.clone(),
        netns: topo.node.name.clone(),
    }])?;
    let extra: &[&str] = if opts.staged {
        &staged::AGENT_ARGS
    } else {
        &[]
    };
    let (run, manifests) = start_agent(&topo, &model, &opts.agent, &opts.object, extra)?;
    let mut node = OneNode {
        topo,
        run,
        manifests,
        agent: opts.agent.clone(),
        services,
        via: opts.via,
    };
    node.apply(&BTreeMap::new(), &model.objects)?;
    let tally = scenarios_on(&mut node, &model.objects, &scenarios, opts.via, opts.staged)?;
    drop(node);
    println!(
        "conformance: {} passed, {} failed",
        tally.passed, tally.failed
    );
    Ok(tally)
}

/// The scenarios on `harness`, each from `model`'s objects and back.
/// Prints every differing cell and the summaries; returns the tally over
/// all cells.
pub fn scenarios_on(
    harness: &mut dyn Harness,
    model: &BTreeMap<ObjKey, Value>,
    scenarios: &[Scenario],
    via: ViaSel,
    stage: bool,
) -> Result<Tally> {
    let mut total: BTreeMap<Via, Tally> = BTreeMap::new();
    let mut staged_found = staged::Found::default();
    // Denied cells whose deny events name what the scenario says.
    let mut attributed = Tally::default();
    // Sides of allowed cells whose records name rules that take them.
    let mut attributed_allowed = attribution::AllowedTally::default();
    // `explain` against every cell's expected result.
    let mut explained = Tally::default();
    for sc in scenarios {
        let started = Instant::now();
        let mut waited = Duration::ZERO;
        let mut objects = model.clone();
        let mut lines = Vec::new();
        for (i, step) in sc.steps.iter().enumerate() {
            let mut next = objects.clone();
            for k in &step.delete {
                next.remove(k);
            }
            for v in &step.apply {
                next.insert(scenario::key_of(v)?, v.clone());
            }
            if stage && i > 0 && staged::policy_only(step)? {
                objects =
                    staged::phase(harness, sc, i, &objects, via, &mut staged_found, &mut lines)?;
            }
            let t0 = Instant::now();
            harness
                .apply(&objects, &next)
                .with_context(|| format!("{}: step {}", sc.name, i + 1))?;
            waited += t0.elapsed();
            objects = next;

            let (jobs, checks) = cells(harness, sc, i + 1, &step.probes, &objects, via)?;
            // With the agent logging denials (a staged run), each denied
            // cell's events are checked against the scenario too.
            let denials = harness
                .agent_log()
                .filter(|_| stage)
                .map(|log| (staged::settled_len(&log), log));
            let mut denied_pod_to_pod = BTreeSet::new();
            let mut allowed_pod_to_pod = BTreeSet::new();
            for (job, got) in run_probes(jobs) {
                if !got && !job.want && job.via == Via::Pod {
                    denied_pod_to_pod.insert(job.key.clone());
                }
                if got && job.want && job.via == Via::Pod {
                    allowed_pod_to_pod.insert(job.key.clone());
                }
                total
                    .entry(job.via)
                    .or_default()
                    .count(got == job.want, &mut lines, || job.label);
            }
            let queries: Vec<String> = checks.iter().map(|c| c.query.clone()).collect();
            if !checks.is_empty()
                && let Some(answers) = harness.explain(&queries)?
            {
                if let Some((mark, log)) = &denials {
                    staged::settled_len(log);
                    let events = attribution::denied(log, *mark)?;
                    let records = attribution::allowed(log, *mark)?;
                    for (c, a) in checks.iter().zip(&answers) {
                        if denied_pod_to_pod.contains(&c.query) {
                            attribution::check(
                                a,
                                &objects,
                                &events,
                                &mut attributed,
                                &mut lines,
                                &c.label,
                            );
                        }
                        if allowed_pod_to_pod.contains(&c.query) {
                            attribution::check_allowed(
                                a,
                                &objects,
                                &records,
                                &mut attributed_allowed,
                                &mut lines,
                                &c.label,
                            );
                        }
                    }
                }
                for (c, a) in checks.iter().zip(&answers) {
                    // The kernel's verdict, and a server to answer.
                    check_explained(&mut explained, c, a, "explain", &mut lines);
                }
            }
        }
        lines.sort();
        let took = format!(
            "{:.1}s, {:.1}s waiting for the agent",
            started.elapsed().as_secs_f64(),
            waited.as_secs_f64()
        );
        if lines.is_empty() {
            println!("conformance: {}: ok ({took})", sc.name);
        } else {
            println!(
                "conformance: {}: {} cells differ ({took})",
                sc.name,
                lines.len()
            );
            for l in &lines {
                println!("  {l}");
            }
        }
        // Back to the model for the next scenario.
        harness
            .apply(&objects, model)
            .with_context(|| format!("{}: back to the model", sc.name))?;
    }
    let mut all = Tally::default();
    for (via, t) in &total {
        println!(
            "conformance via {via}: {} passed, {} failed",
            t.passed, t.failed
        );
        all.passed += t.passed;
        all.failed += t.failed;
    }
    if stage {
        let f = &staged_found;
        println!(
            "conformance staged: step k-1's cells with step k staged: {} passed, {} failed; \
             explain --staged against step k and the probes against explain: {} agree, {} \
             disagree; the datapath's staged reports ({} read, {} sides where the views \
             differ, {} hairpins among the cells): {} agree, {} disagree",
            f.enforced.passed,
            f.enforced.failed,
            f.explained.passed,
            f.explained.failed,
            f.reports,
            f.due,
            f.hairpins,
            f.reported.passed,
            f.reported.failed
        );
        println!(
            "conformance attribution: the deny events of {} denied cells name what decided, {} \
             do not",
            attributed.passed, attributed.failed
        );
        let a = &attributed_allowed;
        println!(
            "conformance attribution: the allowed-connection records of {} sides a rule \
             admitted name rules that take the peer and the port, {} do not; {} sides without a \
             record (a tracked 5-tuple)",
            a.named.passed, a.named.failed, a.unrecorded
        );
        all.failed += attributed.failed + a.named.failed;
        // Records that never come are no attribution: at most one side in
        // a hundred may lack one.
        ensure!(
            a.unrecorded * 100 <= a.named.passed + a.named.failed + a.unrecorded,
            "--staged: {} of {} sides a rule admitted have no allowed-connection record",
            a.unrecorded,
            a.named.passed + a.named.failed + a.unrecorded
        );
        ensure!(
            f.enforced.passed + f.explained.passed > 0,
            "--staged: no step of the scenarios changes policy objects only"
        );
        all.failed += f.enforced.failed + f.explained.failed + f.reported.failed;
    }
    if explained.passed + explained.failed > 0 {
        // Its agreements are the same cells again; its disagreements fail
        // the run.
        println!(
            "conformance explain (every cell; a Service's against its backend): {} cells agree \
             with the expected result, {} disagree",
            explained.passed, explained.failed
        );
        all.failed += explained.failed;
    }
    Ok(all)
}
