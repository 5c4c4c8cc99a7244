//! `cargo xtask demo`: netpol on an example app, end to end.
//!
//! Builds the object and the agent, brings up `deploy/examples` (a shop, its
//! monitoring and the cluster DNS, dual-stack) in network namespaces behind
//! a `cni0`-style bridge with kube-proxy-style Service rules, runs the real
//! `netpol-agent run` in the node netns, and prints which pod reaches which
//! port, over IPv4 and IPv6, and which pod resolves names through the
//! kube-dns Service, before and after the example's NetworkPolicies.
//! Everything it made is removed at the end.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use anyhow::{Context as _, Result, ensure};
use serde_yaml::Value;

use crate::{
    bootstrap, build_ebpf, cargo,
    conformance::{
        self, Job,
        probe::{self, start_servers},
        scenario::{self, Family, ObjKey, PodSpec, Proto, Via},
        services,
        topology::{Kind, Topology},
    },
    root, run,
};

/// A server port as the matrix shows it: `pod:name`.
struct Target {
    label: String,
    pod: String,
    port: u16,
    proto: Proto,
}

/// The named container ports of every pod, in manifest order; DNS ports
/// are the DNS table's.
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
                let proto = match p["protocol"].as_str() {
                    Some("UDP") => Proto::Udp,
                    _ => Proto::Tcp,
                };
                if let Some(port) = port
                    && port != dns::PORT
                {
                    out.push(Target {
                        label: format!("{short}:{name}"),
                        pod: pod.clone(),
                        port,
                        proto,
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

/// Probes every client pod against every target and prints the matrix;
/// returns the cells that connected, as (client, target) indices.
/// Each pod's network namespace, by id.
type Nets = BTreeMap<String, Arc<std::fs::File>>;

fn nets(topo: &Topology) -> Nets {
    topo.pods
        .iter()
        .map(|(id, p)| (id.clone(), p.fd.clone()))
        .collect()
}

fn matrix(
    nets: &Nets,
    pods: &[PodSpec],
    targets: &[Target],
    fam: Family,
) -> Result<Vec<(usize, usize)>> {
    let mut jobs = Vec::new();
    for (ci, client) in pods.iter().enumerate() {
        for (ti, t) in targets.iter().enumerate() {
            let server = pods
                .iter()
                .find(|p| p.id == t.pod)
                .with_context(|| format!("no pod {}", t.pod))?;
            let ip = match fam {
                Family::V4 => server.v4.map(IpAddr::V4),
                Family::V6 => server.v6.map(IpAddr::V6),
            };
            let Some(ip) = ip else { continue };
            jobs.push(Job {
                via: Via::Pod,
                from: nets
                    .get(&client.id)
                    .with_context(|| format!("no namespace of {}", client.id))?
                    .clone(),
                dst: SocketAddr::new(ip, t.port),
                proto: t.proto,
                // Every cell gets its slow retry: the demo reports, it
                // does not assert.
                want: true,
                label: format!("{ci} {ti}"),
                key: String::new(),
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
    let mut allowed = Vec::new();
    for ci in 0..pods.len() {
        for ti in 0..targets.len() {
            if got.get(&format!("{ci} {ti}")) == Some(&true) {
                allowed.push((ci, ti));
            }
        }
    }
    Ok(allowed)
}

/// For each connecting cell, the policy rules behind it, from
/// `netpol-agent explain --batch` (the live maps and the agent's state
/// file).
fn why_allowed(
    run: &conformance::Run,
    topo: &Topology,
    agent: &std::path::Path,
    pods: &[PodSpec],
    targets: &[Target],
    cells: &[(usize, usize)],
) -> Result<()> {
    let queries: Vec<String> = cells
        .iter()
        .map(|&(ci, ti)| {
            let t = &targets[ti];
            format!(
                "{} {} {}/{} 4",
                pods[ci].id,
                t.pod,
                t.proto.to_string().to_lowercase(),
                t.port
            )
        })
        .collect();
    let answers = run.explain(topo, agent, &queries)?;
    let rows: Vec<(String, String)> = cells
        .iter()
        .zip(&answers)
        .map(|(&(ci, ti), a)| {
            let cell = format!("{} -> {}", pods[ci].id, targets[ti].label);
            let side = |j: &serde_json::Value| -> Option<String> {
                let of = j["of"].as_str().unwrap_or("?");
                let dir = j["direction"].as_str().unwrap_or("?");
                match j["reason"].as_str() {
                    Some("pass_policy") => {
                        let rules: Vec<&str> = j["entry"]["rules"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|r| r.as_str())
                            .collect();
                        Some(format!("{dir} of {of} by {}", rules.join(", ")))
                    }
                    Some("pass_not_isolated") => Some(format!("{dir} of {of} not isolated")),
                    _ => None,
                }
            };
            let why = if a["verdict"] != "allowed" {
                format!(
                    "explain says {}: {}",
                    a["verdict"].as_str().unwrap_or("?"),
                    conformance::why(a)
                )
            } else if a["src"]["address"] == a["dst"]["address"] {
                "a pod reaching itself (never subject to its policies)".to_owned()
            } else {
                [side(&a["egress"]), side(&a["ingress"])]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            (cell, why)
        })
        .collect();
    let w = rows.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    for (cell, why) in rows {
        println!("  {cell:w$}  {why}");
    }
    Ok(())
}

/// Where cargo puts the agent it builds (`$CARGO_TARGET_DIR`, relative to
/// the workspace, or its `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), |d| root().join(d))
}

/// One lookup through the kube-dns Service, from every pod, over both
/// transports and both ClusterIPs.
struct Lookup {
    /// The name asked for.
    name: String,
    /// kube-dns' ClusterIPs.
    servers: Vec<IpAddr>,
    /// The name's addresses (A and AAAA).
    answers: Vec<IpAddr>,
}

impl Lookup {
    fn new(objects: &BTreeMap<ObjKey, Value>, records: &dns::Records) -> Result<Self> {
        let dns = objects
            .get(&(
                "Service".to_owned(),
                "kube-system".to_owned(),
                "kube-dns".to_owned(),
            ))
            .context("deploy/examples has no kube-system/kube-dns Service")?;
        let servers = scenario::service_spec(dns)?
            .context("kube-dns is a Service")?
            .cluster_ips;
        let name = "api.shop.svc.cluster.local".to_owned();
        let answers = records
            .get(&name)
            .with_context(|| format!("deploy/examples has no Service for {name}"))?
            .clone();
        Ok(Self {
            name,
            servers,
            answers,
        })
    }

    /// Resolves from every pod and prints the table.
    fn table(&self, topo: &Topology, pods: &[PodSpec]) {
        let mut columns = Vec::new();
        for &server in &self.servers {
            for proto in [Proto::Udp, Proto::Tcp] {
                let label = format!("{} {server}", proto.to_string().to_lowercase());
                columns.push((label, proto, server));
            }
        }
        let cells: Vec<Vec<bool>> = std::thread::scope(|s| {
            let handles: Vec<Vec<_>> = pods
                .iter()
                .map(|p| {
                    let fd = topo.pods[&p.id].fd.clone();
                    columns
                        .iter()
                        .map(|&(_, proto, server)| {
                            let fd = fd.clone();
                            s.spawn(move || self.answered(&fd, proto, server))
                        })
                        .collect()
                })
                .collect();
            handles
                .into_iter()
                .map(|row| row.into_iter().map(|h| h.join().unwrap_or(false)).collect())
                .collect()
        });
        let rows = pods.iter().map(|p| p.id.len()).max().unwrap_or(4) + 2;
        let (green, red, reset) = if colour() {
            ("\x1b[32m", "\x1b[31m", "\x1b[0m")
        } else {
            ("", "", "")
        };
        print!("  {:rows$}", "pod");
        for (label, _, _) in &columns {
            print!("{:>w$}", label, w = label.len() + 2);
        }
        println!();
        for (p, row) in pods.iter().zip(cells) {
            print!("  {:rows$}", p.id);
            for ((label, _, _), ok) in columns.iter().zip(row) {
                let w = label.len() + 2;
                if ok {
                    print!("{green}{:>w$}{reset}", "X");
                } else {
                    print!("{red}{:>w$}{reset}", ".");
                }
            }
            println!();
        }
    }

    /// Whether the pod behind `fd` gets the right answer from `server`
    /// (A over IPv4, AAAA over IPv6), with one slow retry.
    fn answered(&self, fd: &Arc<std::fs::File>, proto: Proto, server: IpAddr) -> bool {
        if probe::enter(fd).is_err() {
            return false;
        }
        let want: Vec<IpAddr> = self
            .answers
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == server.is_ipv4())
            .collect();
        let dst = SocketAddr::new(server, dns::PORT);
        [FAST, SLOW].into_iter().any(|t| {
            dns::resolve(proto, dst, &self.name, server.is_ipv4(), t).is_some_and(|got| got == want)
        })
    }
}

const FAST: std::time::Duration = std::time::Duration::from_millis(150);
const SLOW: std::time::Duration = std::time::Duration::from_secs(3);

fn print_lookups(lookup: &Lookup, topo: &Topology, pods: &[PodSpec]) {
    println!(
        "DNS: {} (A over IPv4, AAAA over IPv6) through the kube-dns Service \
         (X = answered, . = blocked)\n",
        lookup.name
    );
    lookup.table(topo, pods);
    println!();
}

/// The demo's tools, the eBPF object, the agent (debug) and the example
/// cluster's folder and file.
fn prepare() -> Result<(PathBuf, PathBuf, PathBuf, String)> {
    bootstrap::demo_tools()?;
    let object = build_ebpf()?;
    println!("demo: building netpol-agent");
    run(cargo("stable").args(["build", "-p", "netpol-agent"]))?;
    let agent = target_dir().join("debug/netpol-agent");
    let examples = root().join("deploy/examples");
    let cluster = std::fs::read_to_string(examples.join("cluster.yaml"))
        .context("reading deploy/examples/cluster.yaml")?;
    Ok((object, agent, examples, cluster))
}

pub fn demo(hold: bool) -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "the demo creates network namespaces and loads BPF programs: run it as root"
    );
    let (object, agent, examples, cluster) = prepare()?;
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
    let records = dns::records(&model.objects)?;
    let mut topo = Topology::new(Kind::Bridge, model.node_v4, model.node_v6)?;
    for p in &pods {
        topo.add_pod(p)?;
        let fd = &topo.pods[&p.id].fd;
        if p.ports.contains(&(Proto::Udp, dns::PORT)) {
            // The cluster DNS: a resolver on 53, echo servers on the rest.
            let mut rest = p.clone();
            rest.ports.retain(|&(_, port)| port != dns::PORT);
            start_servers(fd, &rest)?;
            dns::serve(fd, p, &records)?;
        } else {
            start_servers(fd, p)?;
        }
    }
    println!("demo: kube-proxy-style DNAT of the Services' ClusterIPs (iptables, ip6tables)");
    let kube = services::Kube::new(&[services::KubeNode {
        name: model.node_name.clone(),
        netns: topo.node.name.clone(),
    }])?;
    kube.sync(&model.objects)?;
    let lookup = Lookup::new(&model.objects, &records)?;
    println!("demo: netpol-agent run --manifests <cluster> (in the node netns)");
    let (mut agent_run, manifests) = conformance::start_agent(&topo, &model, &agent, &object, &[])?;
    conformance::enforce(&mut agent_run, &topo, &manifests, &agent, &model.objects)?;
    let targets = targets(&model);

    println!(
        "\nBefore any NetworkPolicy: every pod reaches every port (X = connects, . = blocked)\n"
    );
    for fam in [Family::V4, Family::V6] {
        matrix(&nets(&topo), &pods, &targets, fam)?;
        println!();
    }
    print_lookups(&lookup, &topo, &pods);

    let mut objects = model.objects.clone();
    let mut allow_dns = Vec::new();
    for v in scenario::documents(&policies)? {
        let key = scenario::key_of(&v)?;
        if key.2 == "allow-dns" {
            allow_dns.push((key, v));
        } else {
            objects.insert(key, v);
        }
    }
    println!(
        "demo: applying deploy/examples/policies.yaml without allow-dns: the shop's default deny \
         blocks its DNS too (kube-proxy sends it to coredns, whose address the egress rules \
         must name)"
    );
    conformance::enforce(&mut agent_run, &topo, &manifests, &agent, &objects)?;
    println!();
    print_lookups(&lookup, &topo, &pods);

    objects.extend(allow_dns);
    println!(
        "demo: applying deploy/examples/policies.yaml (default deny in shop; frontend -> api:http; \
         api -> db:5432; monitoring -> every shop pod's metrics; every shop pod -> DNS on pods \
         k8s-app=kube-dns)"
    );
    conformance::enforce(&mut agent_run, &topo, &manifests, &agent, &objects)?;
    println!("\nAfter the policies, enforced by netpol's TC programs on each pod's veth\n");
    let mut allowed_v4 = Vec::new();
    for fam in [Family::V4, Family::V6] {
        let allowed = matrix(&nets(&topo), &pods, &targets, fam)?;
        if fam == Family::V4 {
            allowed_v4 = allowed;
        }
        println!();
    }
    println!(
        "Why each IPv4 cell connects: the rules behind it, from the live maps \
         (netpol-agent explain --batch)\n"
    );
    why_allowed(&agent_run, &topo, &agent, &pods, &targets, &allowed_v4)?;
    println!();
    print_lookups(&lookup, &topo, &pods);
    println!("demo: what the node's maps hold (netpol-agent compile -o table):\n");
    run(std::process::Command::new(&agent)
        .args(["compile", "--manifests"])
        .arg(&examples)
        .args(["-o", "table"]))?;
    if hold {
        let bpffs = agent_run.bpffs().display().to_string();
        let state = agent_run.state_dir().display().to_string();
        let cli = format!("{} --bpffs {bpffs}", agent.display());
        println!(
            "\ndemo: holding. The agent runs in the netns {node}; its maps are pinned in \
             {bpffs}/netpol, its state file is {state}/state.json. Try:\n\n  \
             {cli} inspect endpoints --state-dir {state}\n  \
             {cli} inspect policy shop/api --state-dir {state}\n  \
             {cli} explain shop/frontend shop/api tcp/8000 --state-dir {state}\n  \
             bpftool map dump pinned {bpffs}/netpol/NETPOL_POLICY_V4\n\n\
             Press Enter to tear everything down.",
            node = topo.node.name
        );
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    drop(agent_run);
    drop(kube);
    drop(topo);
    println!("\ndemo: done (namespaces, agent and bpffs removed)");
    Ok(())
}

/// The demo's cluster DNS, in the coredns pod: A and AAAA records of
/// `<service>.<namespace>.svc.cluster.local` for every Service of the
/// model, NXDOMAIN otherwise, over UDP and TCP (RFC 1035 wire format, one
/// question per message).
mod dns {
    use std::{
        collections::BTreeMap,
        io::{Read as _, Write as _},
        net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
        sync::{Arc, mpsc},
        time::Duration,
    };

    use anyhow::{Context as _, Result};
    use serde_yaml::Value;

    use crate::conformance::{
        probe,
        scenario::{self, ObjKey, PodSpec, Proto},
    };

    pub const PORT: u16 = 53;
    const TYPE_A: u16 = 1;
    const TYPE_AAAA: u16 = 28;

    /// Names and their addresses.
    pub type Records = BTreeMap<String, Vec<IpAddr>>;

    pub fn records(objects: &BTreeMap<ObjKey, Value>) -> Result<Records> {
        let mut out = Records::new();
        for ((_, ns, name), v) in objects {
            if let Some(svc) = scenario::service_spec(v)? {
                out.insert(format!("{name}.{ns}.svc.cluster.local"), svc.cluster_ips);
            }
        }
        Ok(out)
    }

    /// Starts the server on port 53 of the pod's addresses, for as long as
    /// the process runs.
    pub fn serve(fd: &Arc<std::fs::File>, pod: &PodSpec, records: &Records) -> Result<()> {
        let addrs: Vec<IpAddr> = pod
            .v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(pod.v6.map(IpAddr::V6))
            .collect();
        let (tx, rx) = mpsc::channel::<Result<()>>();
        let fd = fd.clone();
        let records = Arc::new(records.clone());
        let id = pod.id.clone();
        std::thread::spawn(move || {
            let r = (|| -> Result<()> {
                probe::enter(&fd)?;
                for addr in addrs {
                    let at = SocketAddr::new(addr, PORT);
                    let udp = UdpSocket::bind(at).with_context(|| format!("{id}: udp {at}"))?;
                    let tcp = TcpListener::bind(at).with_context(|| format!("{id}: tcp {at}"))?;
                    let r = records.clone();
                    std::thread::spawn(move || serve_udp(&udp, &r));
                    let r = records.clone();
                    std::thread::spawn(move || serve_tcp(&tcp, &r));
                }
                Ok(())
            })();
            let _ = tx.send(r);
        });
        rx.recv().context("DNS server thread")?
    }

    fn serve_udp(s: &UdpSocket, records: &Records) {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            if let Some(r) = respond(&buf[..n], records) {
                let _ = s.send_to(&r, from);
            }
        }
    }

    fn serve_tcp(l: &TcpListener, records: &Arc<Records>) {
        for s in l.incoming().flatten() {
            let records = records.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut len = [0u8; 2];
                while s.read_exact(&mut len).is_ok() {
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut q).is_err() {
                        break;
                    }
                    let Some(r) = respond(&q, &records) else {
                        break;
                    };
                    let Ok(n) = u16::try_from(r.len()) else { break };
                    if s.write_all(&n.to_be_bytes()).is_err() || s.write_all(&r).is_err() {
                        break;
                    }
                }
            });
        }
    }

    fn u16_at(m: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]))
    }

    /// The offset just past the name at `at` (labels, or a pointer).
    fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
        for _ in 0..128 {
            match *m.get(at)? {
                0 => return Some(at + 1),
                l if l & 0xc0 == 0xc0 => return Some(at + 2),
                l => at += 1 + usize::from(l),
            }
        }
        None
    }

    fn query(id: u16, name: &str, qtype: u16) -> Option<Vec<u8>> {
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
        for label in name.split('.') {
            m.push(u8::try_from(label.len()).ok()?);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes()); // IN
        Some(m)
    }

    fn respond(q: &[u8], records: &Records) -> Option<Vec<u8>> {
        if q.len() < 12 || q[2] & 0x80 != 0 || u16_at(q, 4)? != 1 {
            return None;
        }
        let end = skip_name(q, 12)?;
        let qtype = u16_at(q, end)?;
        let mut labels = Vec::new();
        let mut at = 12;
        while *q.get(at)? != 0 {
            let l = usize::from(q[at]);
            labels.push(String::from_utf8_lossy(q.get(at + 1..at + 1 + l)?).to_lowercase());
            at += 1 + l;
        }
        let found = records.get(&labels.join("."));
        let answers: Vec<Vec<u8>> = found
            .into_iter()
            .flatten()
            .filter_map(|a| match (a, qtype) {
                (IpAddr::V4(a), TYPE_A) => Some(a.octets().to_vec()),
                (IpAddr::V6(a), TYPE_AAAA) => Some(a.octets().to_vec()),
                _ => None,
            })
            .collect();
        let mut r = Vec::with_capacity(q.len() + 64);
        r.extend_from_slice(&q[..2]);
        // QR, AA, RD copied; RA; NOERROR or NXDOMAIN.
        r.push(0x84 | (q[2] & 0x01));
        r.push(if found.is_some() { 0x80 } else { 0x83 });
        r.extend_from_slice(&[0, 1]);
        r.extend_from_slice(&u16::try_from(answers.len()).ok()?.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]);
        r.extend_from_slice(q.get(12..end + 4)?);
        for data in answers {
            r.extend_from_slice(&[0xc0, 12]); // the question's name
            r.extend_from_slice(&qtype.to_be_bytes());
            r.extend_from_slice(&1u16.to_be_bytes());
            r.extend_from_slice(&30u32.to_be_bytes());
            r.extend_from_slice(&u16::try_from(data.len()).ok()?.to_be_bytes());
            r.extend_from_slice(&data);
        }
        Some(r)
    }

    /// The addresses of a successful answer to query `id`.
    fn addresses(id: u16, m: &[u8]) -> Option<Vec<IpAddr>> {
        if m.len() < 12 || u16_at(m, 0)? != id || m[2] & 0x80 == 0 || m[3] & 0x0f != 0 {
            return None;
        }
        let mut at = 12;
        for _ in 0..u16_at(m, 4)? {
            at = skip_name(m, at)? + 4;
        }
        let mut out = Vec::new();
        for _ in 0..u16_at(m, 6)? {
            at = skip_name(m, at)?;
            let (rtype, len) = (u16_at(m, at)?, usize::from(u16_at(m, at + 8)?));
            let data = m.get(at + 10..at + 10 + len)?;
            match (rtype, <[u8; 4]>::try_from(data), <[u8; 16]>::try_from(data)) {
                (TYPE_A, Ok(a), _) => out.push(IpAddr::from(a)),
                (TYPE_AAAA, _, Ok(a)) => out.push(IpAddr::from(a)),
                _ => {}
            }
            at += 10 + len;
        }
        Some(out)
    }

    /// Asks `server` for `name` (A when `v4`, else AAAA) from the calling
    /// thread's netns; `None` on a timeout or a failed answer.
    pub fn resolve(
        proto: Proto,
        server: SocketAddr,
        name: &str,
        v4: bool,
        timeout: Duration,
    ) -> Option<Vec<IpAddr>> {
        let qtype = if v4 { TYPE_A } else { TYPE_AAAA };
        let id = u16::try_from(std::process::id() & 0xfff).ok()? ^ qtype;
        let q = query(id, name, qtype)?;
        let mut buf = [0u8; 512];
        let n = match proto {
            Proto::Udp => {
                let any: SocketAddr = if server.is_ipv4() {
                    "0.0.0.0:0".parse().ok()?
                } else {
                    "[::]:0".parse().ok()?
                };
                let s = UdpSocket::bind(any).ok()?;
                s.connect(server).ok()?;
                s.set_read_timeout(Some(timeout)).ok()?;
                s.send(&q).ok()?;
                s.recv(&mut buf).ok()?
            }
            Proto::Tcp => {
                let mut s = TcpStream::connect_timeout(&server, timeout).ok()?;
                s.set_read_timeout(Some(timeout)).ok()?;
                s.write_all(&u16::try_from(q.len()).ok()?.to_be_bytes())
                    .ok()?;
                s.write_all(&q).ok()?;
                let mut len = [0u8; 2];
                s.read_exact(&mut len).ok()?;
                let n = usize::from(u16::from_be_bytes(len));
                s.read_exact(buf.get_mut(..n)?).ok()?;
                n
            }
            Proto::Sctp => return None,
        };
        addresses(id, &buf[..n])
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn answers_a_and_aaaa_of_known_names_and_nxdomain_otherwise() {
            let mut records = Records::new();
            let (v4, v6): (IpAddr, IpAddr) =
                ("10.43.0.20".parse().unwrap(), "fd43::14".parse().unwrap());
            records.insert("api.shop.svc.cluster.local".into(), vec![v4, v6]);
            for (qtype, want) in [(TYPE_A, v4), (TYPE_AAAA, v6)] {
                let q = query(9, "api.shop.svc.cluster.local", qtype).unwrap();
                let r = respond(&q, &records).unwrap();
                assert_eq!(addresses(9, &r), Some(vec![want]));
                assert_eq!(addresses(10, &r), None);
            }
            let q = query(9, "db.shop.svc.cluster.local", TYPE_A).unwrap();
            assert_eq!(addresses(9, &respond(&q, &records).unwrap()), None);
        }
    }
}

/// The example app's objects spread over `nodes` Nodes in the scheme of
/// `cluster-3node.yaml`: its Node replaced by node-1…node-N, its pods
/// placed in turn on them, each keeping its address's host part in its
/// node's subnets (10.42.0.10 on node-2 is 10.42.2.10, fd42::10 is
/// fd00:10:42:2::10).
fn spread(cluster: &str, nodes: usize) -> Result<String> {
    let (generated, _) = crate::cluster::generated_nodes(nodes)?;
    let mut out = String::new();
    for n in &generated {
        out.push_str("---\n");
        out.push_str(&serde_json::to_string(n)?);
        out.push('\n');
    }
    let mut placed = 0;
    for mut v in scenario::documents(cluster)? {
        match v["kind"].as_str() {
            Some("Node") => continue,
            Some("Pod") => {
                let node = placed % nodes + 1;
                placed += 1;
                v["spec"]["nodeName"] = Value::from(format!("node-{node}"));
                let moved = |ip: &str| -> Result<String> {
                    Ok(match ip.parse::<IpAddr>()? {
                        IpAddr::V4(a) => format!("10.42.{node}.{}", a.octets()[3]),
                        IpAddr::V6(a) => {
                            format!("fd00:10:42:{node:x}::{:x}", a.segments()[7])
                        }
                    })
                };
                let mut ips = Vec::new();
                for ip in v["status"]["podIPs"].as_sequence().into_iter().flatten() {
                    let mut m = serde_yaml::Mapping::new();
                    m.insert(
                        "ip".into(),
                        moved(ip["ip"].as_str().unwrap_or_default())?.into(),
                    );
                    ips.push(Value::Mapping(m));
                }
                if let Some(first) = ips.first() {
                    v["status"]["podIP"] = first["ip"].clone();
                }
                v["status"]["podIPs"] = Value::Sequence(ips);
            }
            _ => {}
        }
        out.push_str("---\n");
        out.push_str(&serde_json::to_string(&v)?);
        out.push('\n');
    }
    Ok(out)
}

/// `cargo xtask demo --nodes N`: the example app spread over a cluster of
/// N nodes (`cargo xtask cluster`: flannel's VXLAN, an agent per node
/// from the image, the policies written with kubectl), which pod reaches
/// which port across nodes before and after the example's policies. Not
/// here: the DNS lookups and `explain` of the one-node demo.
pub fn demo_nodes(nodes: usize, hold: bool) -> Result<()> {
    ensure!(
        crate::netpol_is_root(),
        "the demo brings up a cluster of network namespaces: run it as root"
    );
    ensure!((2..=9).contains(&nodes), "--nodes {nodes}: from 2 to 9");
    let (_, agent, examples, cluster) = prepare()?;
    let text = spread(&cluster, nodes)?;
    let file = root().join("target/demo-cluster.yaml");
    std::fs::write(&file, &text)?;
    crate::cluster::up(None, Some(&file))?;
    let shown = (|| -> Result<()> {
        let model = conformance::model_from_text(&text)?;
        let pods: Vec<PodSpec> = model
            .objects
            .values()
            .filter_map(|v| scenario::pod_spec(v).ok().flatten())
            .collect();
        let names = crate::cluster::names();
        let mut nets = Nets::new();
        let mut on = BTreeMap::new();
        for p in &pods {
            let (ns, name) = p.id.split_once('/').context("ns/name")?;
            let key = ("Pod".to_owned(), ns.to_owned(), name.to_owned());
            let node = model.objects[&key]["spec"]["nodeName"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let fd = Arc::new(netpol_testkit::Netns::existing(names.pod(&node, ns, name)).open()?);
            start_servers(&fd, p)?;
            nets.insert(p.id.clone(), fd);
            on.insert(p.id.clone(), node);
        }
        println!("\ndemo: the example app on {nodes} nodes:");
        for p in &pods {
            println!(
                "  {:<24} {:<8} {}",
                p.id,
                on[&p.id],
                [p.v4.map(IpAddr::V4), p.v6.map(IpAddr::V6)]
                    .iter()
                    .flatten()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        let targets = targets(&model);
        println!(
            "\nBefore any NetworkPolicy: every pod reaches every port, across nodes (X = \
             connects, . = blocked)\n"
        );
        for fam in [Family::V4, Family::V6] {
            matrix(&nets, &pods, &targets, fam)?;
            println!();
        }
        println!(
            "demo: kubectl create -f deploy/examples/policies.yaml (against the cluster's API \
             server; every node's agent watches it)"
        );
        crate::cluster::kubectl(
            &[
                "create",
                "-f",
                &examples.join("policies.yaml").display().to_string(),
            ],
            None,
        )?;
        let specs = netpol_testkit::cluster::node_specs(
            &scenario::documents(&text)?
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<Vec<_>, _>>()?,
        )
        .map_err(anyhow::Error::msg)?;
        let dir = crate::cluster::state_dir().join("demo");
        std::fs::create_dir_all(&dir)?;
        conformance::cluster::wait_enforced(&specs, &agent, &dir, |node| {
            on.values().filter(|n| *n == node).count()
        })?;
        println!(
            "\nAfter the policies, each node enforcing its own pods' (X = connects, . = blocked)\n"
        );
        for fam in [Family::V4, Family::V6] {
            matrix(&nets, &pods, &targets, fam)?;
            println!();
        }
        Ok(())
    })();
    if hold && shown.is_ok() {
        println!(
            "demo: holding the cluster. `kubectl --kubeconfig target/cluster/kubeconfig get \
             networkpolicies -A`, `cargo xtask cluster status`; `cargo xtask cluster down` \
             removes it."
        );
        return Ok(());
    }
    let downed = crate::cluster::down();
    shown.and(downed)
}
