//! Through the agent, with the Kubernetes source (`cargo xtask bench agent`,
//! as root). The `netpol-agent run` binary runs in a node namespace and
//! watches a fake API server over TCP; the fake runs in this bench's
//! process, not the agent's.
//!
//! **Change latency**, on a cluster of 10,000 pods (110 on this node), 1,000
//! policies and 100 namespaces: from the API write (the fake bumps its
//! resource version and wakes its watches) to the first packet judged under
//! the new verdict, seen on the wire. A sender pod sends a UDP datagram to a
//! receiver pod every ~100 µs on one flow (so after a grant the flow is
//! established in conntrack, and a revocation must cut it); the receiver
//! timestamps each one. A grant is timed to the first datagram received,
//! a revocation to the last one received (the next one was dropped); each
//! change comes 15 ms or more after the last (a change within the 10 ms
//! debounce of the previous compile waits out the rest of it). Six
//! changes, each granted then revoked, 100 times:
//! - one pod's labels (the sender moves in and out of the peer selector of
//!   the receiver's policy),
//! - one policy edit (the receiver's policy names the sender's label, then
//!   another),
//! - a new pod (its veth exists, unbound and so fail-closed; the Pod object
//!   with its addresses is created, then deleted),
//! - one `ClusterNetworkPolicy` edit (an Admin rule for the sender, Accept
//!   then Deny),
//! - a staged `NetworkPolicy` promoted (its `netpol.io/staged` annotation
//!   removed), then staged again,
//! - a staged `ClusterNetworkPolicy` (the Admin Accept) promoted, then
//!   staged again.
//!
//! **Cold start**, at 10,000 pods / 1,000 policies / 100 namespaces and at
//! 100,000 / 10,000 / 1,000, 110 local pods each time, every one a real
//! veth: from the agent's first Pod list (and from its start, program
//! load included) until `/status` reports every local pod's interface
//! bound and programmed; the agent's resident memory then, and its CPU
//! over 10 idle seconds, 5 s after. The growth per
//! remote pod is the difference of the two resident sizes over the
//! difference in remote pods (policies and namespaces grow too, and are
//! charged to the pods).
//!
//! **Event loss** (`cargo bench --bench agent_api -- events`): see
//! [`event_loss`]; writes `target/netpol-bench/events.json`.
//!
//! **Pod start** (`cargo bench --bench agent_api -- pod-start`, which
//! `cargo xtask bench pod-start` runs): see [`pod_start`]; writes
//! `target/netpol-bench/pod_start.json`.
//!
//! Writes `target/netpol-bench/agent_api.json`. `cargo bench --bench
//! agent_api -- cold` (or `changes`) runs one part. The environment:
//! `NETPOL_AGENT_BIN` the agent binary (`cargo xtask bench agent` passes
//! the image's static musl build), `NETPOL_BENCH_LOG` the agent's
//! `RUST_LOG` (default `warn`), `NETPOL_BENCH_KEEP_LOG` keeps its log in
//! the temporary folder, `NETPOL_BENCH_ATTACH_MODE` the agent's
//! `--attach-mode` (`auto`, `tcx`, `netlink`; default: the agent's
//! default), which the JSON records (`cargo xtask bench agent` runs the
//! default: the figures it writes are the shipped path's).
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use netpol_testkit::{
    Netns,
    datapath::TempBpffs,
    fake_apiserver::FakeApiServer,
    process::programmed,
    topology::{Pod, Topology, calico_pod},
    unique,
};
use serde_json::{Value, json};

/// A node namespace forwarding both families, its pods routed as Calico
/// routes them.
fn node() -> Netns {
    netpol_testkit::topology::node(Topology::Routed, true)
}

fn pod(node: &Netns, v4: &str, v6: &str) -> Pod {
    calico_pod(node, v4, v6)
}

/// A dual-stack pod's IPv6 address.
fn v6(p: &Pod) -> String {
    p.v6.map(|a| a.to_string()).unwrap_or_default()
}

/// The agent binary: `NETPOL_AGENT_BIN` (`cargo xtask bench agent` passes
/// the image's static musl build, the binary a cluster runs), else this
/// build's.
fn agent_binary() -> String {
    std::env::var("NETPOL_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_netpol-agent").to_owned())
}
const LISTEN: &str = "127.0.0.1:9101";
const LOCAL: &str = "node-0";
/// Receiver port.
const PORT: u16 = 9000;
/// Grants and revocations per change.
const ROUNDS: usize = 100;

/// A generated cluster: `pods` spread over `nodes` nodes (node-0 is this
/// one), `policies` and `namespaces`.
struct Size {
    pods: usize,
    policies: usize,
    namespaces: usize,
    nodes: usize,
}

impl Size {
    /// Pods of node-0 among the generated ones.
    fn local(&self) -> usize {
        self.pods.div_ceil(self.nodes)
    }
}

const SMALL: Size = Size {
    pods: 10_000,
    policies: 1_000,
    namespaces: 100,
    nodes: 91,
};
const LARGE: Size = Size {
    pods: 100_000,
    policies: 10_000,
    namespaces: 1_000,
    nodes: 910,
};

/// A pod as the API server returns it (managed fields and the like, which
/// the source trims away). Pods of node-0 get the addresses of `real` pods
/// when given, in order.
fn api_pod(size: &Size, i: usize, real: Option<&Pod>) -> Value {
    let ns = format!("ns-{}", i % size.namespaces);
    let app = format!("app-{}", i % 500);
    let ips: Vec<Value> = match real {
        Some(p) => vec![json!({"ip": p.v4.to_string()}), json!({"ip": v6(p)})],
        None => {
            vec![json!({"ip": format!("10.{}.{}.{}", i / 65_536 + 1, (i / 256) % 256, i % 256)})]
        }
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{app}-{i:06}"), "namespace": ns, "uid": format!("uid-{i}"),
            "labels": {"app": app, "pod-template-hash": "5d8f7c9b4"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": format!("{app}-5d8f7c9b4"), "uid": "rs-uid",
                                 "controller": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                               "apiVersion": "v1", "time": "2025-01-01T00:00:00Z",
                               "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}}}]
        },
        "spec": {
            "nodeName": format!("node-{}", i % size.nodes),
            "containers": [{"name": "main", "image": "registry.example.com/app:1.2.3",
                            "ports": [{"name": "http", "containerPort": 8080}]}]
        },
        "status": {"phase": "Running", "podIP": ips[0]["ip"], "podIPs": ips}
    })
}

/// A policy of the shapes the compiler bench uses: peers in the same
/// namespace by app, monitoring from one team's namespaces, DNS to one
/// namespace, the outside minus the cluster range.
fn api_policy(size: &Size, i: usize) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("policy-{i}"), "namespace": format!("ns-{}", i % size.namespaces)},
        "spec": {
            "podSelector": {"matchLabels": {"app": format!("app-{}", i % 500)}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("app-{}", (i + 1) % 500)}}},
                                  {"namespaceSelector": {"matchLabels": {"team": format!("team-{}", i % 20)}},
                                   "podSelector": {"matchLabels": {"app": "app-0"}}}],
                         "ports": [{"port": 8080}, {"port": "http"}]}],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ns-0"}},
                                "podSelector": {"matchLabels": {"app": "app-1"}}}],
                        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
                       {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}],
                        "ports": [{"port": 443}]}]
        }
    })
}

/// Every generated object; node-0's pods take the addresses of `real`.
fn cluster(size: &Size, real: &[Pod]) -> Vec<Value> {
    let mut out = Vec::new();
    for n in 0..size.namespaces {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": format!("ns-{n}"),
                                     "labels": {"team": format!("team-{}", n % 20)}}}));
    }
    for n in 0..size.nodes {
        out.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}")},
                        "status": {"addresses": [{"type": "InternalIP",
                                                  "address": format!("192.168.{}.{}", n / 250, n % 250 + 1)}]}}));
    }
    let mut local = real.iter();
    for i in 0..size.pods {
        let real = if i % size.nodes == 0 {
            local.next()
        } else {
            None
        };
        out.push(api_pod(size, i, real));
    }
    out.extend((0..size.policies).map(|i| api_policy(size, i)));
    out
}

/// The bench's own pods, in namespace `bench`.
fn bench_pod(name: &str, app: &str, p: &Pod) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "bench", "uid": format!("uid-{name}"),
                     "labels": {"app": app}},
        "spec": {"nodeName": LOCAL, "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": p.v4.to_string(),
                   "podIPs": [{"ip": p.v4.to_string()}, {"ip": v6(p)}]}
    })
}

/// The receiver's policy: UDP `PORT` from pods labelled `from`.
fn receiver_policy(from: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "r-ingress", "namespace": "bench"},
        "spec": {"podSelector": {"matchLabels": {"app": "r"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from}}}],
                              "ports": [{"port": PORT, "protocol": "UDP"}]}]}
    })
}

/// A second `NetworkPolicy` for r admitting the pods labelled `s-denied`
/// on UDP `PORT`, `staged` (annotated `netpol.io/staged: "true"`) or
/// enforced.
fn receiver_staged_grant(staged: bool) -> Value {
    let annotations = if staged {
        json!({"netpol.io/staged": "true"})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "r-from-s", "namespace": "bench", "annotations": annotations},
        "spec": {"podSelector": {"matchLabels": {"app": "r"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "s-denied"}}}],
                              "ports": [{"port": PORT, "protocol": "UDP"}]}]}
    })
}

/// Admin, for r's ingress: `action` on UDP `PORT` from the pods labelled
/// `s-denied` (which r's `NetworkPolicy` does not allow).
fn receiver_guard(action: &str) -> Value {
    json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": "r-guard"},
        "spec": {"tier": "Admin", "priority": 10,
                 "subject": {"pods": {"namespaceSelector": {},
                                      "podSelector": {"matchLabels": {"app": "r"}}}},
                 "ingress": [{"name": "s", "action": action,
                              "from": [{"pods": {"namespaceSelector": {},
                                                 "podSelector": {"matchLabels": {"app": "s-denied"}}}}],
                              "protocols": [{"udp": {"destinationPort": {"number": PORT}}}]}]}
    })
}

/// [`receiver_guard`]`("Accept")`, `staged` (annotated
/// `netpol.io/staged: "true"`) or enforced.
fn receiver_guard_staged(staged: bool) -> Value {
    let mut g = receiver_guard("Accept");
    if staged {
        g["metadata"]["annotations"] = json!({"netpol.io/staged": "true"});
    }
    g
}

/// The fake API server on a runtime of its own, in the node's namespace.
struct Api {
    fake: FakeApiServer,
    kubeconfig: PathBuf,
    _rt: tokio::runtime::Runtime,
}

impl Api {
    fn start(node: &Netns) -> Self {
        let (rt, fake) = node.run(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let fake = rt.block_on(FakeApiServer::start());
            (rt, fake)
        });
        let kubeconfig = fake.kubeconfig();
        Self {
            fake,
            kubeconfig,
            _rt: rt,
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// `netpol-agent run` on the Kubernetes source, in the node's namespace.
struct Agent {
    child: Child,
    node: String,
    log: PathBuf,
    state: PathBuf,
}

/// `NETPOL_BENCH_ATTACH_MODE`: the attach path the agent is told to take
/// (TCX links cost the kernel an RCU grace period each, netlink filters
/// do not: the cold start differs by seconds).
fn attach_mode() -> Option<String> {
    std::env::var("NETPOL_BENCH_ATTACH_MODE").ok()
}

impl Agent {
    fn start(node: &Netns, bpffs: &Path, api: &Api) -> Self {
        Self::start_with(node, bpffs, api, "nph*", &[], None)
    }

    /// [`Self::start`] with another pod-interface glob and more arguments.
    /// `log`: its `RUST_LOG` (default `NETPOL_BENCH_LOG`, else `warn`).
    fn start_with(
        node: &Netns,
        bpffs: &Path,
        api: &Api,
        interfaces: &str,
        extra: &[String],
        log_level: Option<&str>,
    ) -> Self {
        let log = std::env::temp_dir().join(unique("netpol-bench-agent-"));
        let state = std::env::temp_dir().join(unique("netpol-bench-state-"));
        let file = std::fs::File::create(&log).expect("agent log");
        let child = Command::new("ip")
            .args(["netns", "exec", &node.name, &agent_binary(), "--bpffs"])
            .arg(bpffs)
            .arg("run")
            .args(attach_mode().map(|m| format!("--attach-mode={m}")))
            .args([
                "--node",
                LOCAL,
                "--interfaces",
                interfaces,
                "--listen",
                LISTEN,
            ])
            .args(extra)
            .arg("--state-dir")
            .arg(&state)
            .env("KUBECONFIG", &api.kubeconfig)
            .env(
                "RUST_LOG",
                log_level.map_or_else(
                    || std::env::var("NETPOL_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
                    str::to_owned,
                ),
            )
            .stdout(Stdio::from(file.try_clone().expect("log")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("starting netpol-agent run");
        Self {
            child,
            node: node.name.clone(),
            log,
            state,
        }
    }

    fn status(&self) -> Option<Value> {
        serde_json::from_str(&netpol_testkit::process::get_in(
            &self.node, LISTEN, "/status",
        )?)
        .ok()
    }

    /// Waits until every interface in `names` is programmed; returns when.
    fn wait_programmed(&mut self, names: &[&str], within: Duration) -> Instant {
        self.wait_status(within, "interfaces not programmed", |s| {
            s["ready"] == true && names.iter().all(|n| programmed(s, n))
        })
    }

    /// Waits until no interface waits on netlink filters for its TCX
    /// links (`--attach-mode=auto` moves them once the node is quiet);
    /// returns when.
    fn wait_on_tcx(&mut self, within: Duration) -> Instant {
        self.wait_status(within, "interfaces still on netlink filters", |s| {
            s["interfaces"]
                .as_array()
                .is_some_and(|i| i.iter().all(|i| i["awaiting_tcx"] != true))
        })
    }

    /// Polls `/status` every 5 ms until `done` holds; returns when. Panics
    /// with the agent's log when it exits or `within` runs out.
    fn wait_status(
        &mut self,
        within: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("netpol-agent exited ({st}); log:\n{}", self.log());
            }
            if let Some(s) = self.status()
                && done(&s)
            {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "{what} after {within:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `(resident bytes, CPU seconds)` of the agent (`ip netns exec`
    /// execs it: the child's pid is the agent's).
    fn usage(&self) -> (u64, f64) {
        netpol_testkit::process::usage(self.child.id())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects.
        #[expect(clippy::cast_possible_wrap, reason = "pids fit i32")]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("NETPOL_BENCH_KEEP_LOG").is_none() {
            let _ = std::fs::remove_file(&self.log);
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// Arrival times of datagrams at the receiver, by sender address.
#[derive(Default)]
struct Arrivals {
    last: Mutex<Vec<(IpAddr, Instant)>>,
}

impl Arrivals {
    /// The first arrival from `from` after `t`.
    fn first_after(&self, from: IpAddr, t: Instant) -> Option<Instant> {
        let l = self.last.lock().expect("arrivals");
        l.iter()
            .filter(|(a, at)| *a == from && *at >= t)
            .map(|(_, at)| *at)
            .min()
    }

    /// The last arrival from `from`.
    fn last_from(&self, from: IpAddr) -> Option<Instant> {
        let l = self.last.lock().expect("arrivals");
        l.iter()
            .filter(|(a, _)| *a == from)
            .map(|(_, at)| *at)
            .max()
    }

    fn clear(&self) {
        self.last.lock().expect("arrivals").clear();
    }
}

/// A receiver on `PORT` of the pod's IPv4 address, recording arrivals.
fn receive(p: &Pod, arrivals: Arc<Arrivals>, stop: Arc<AtomicBool>) {
    let addr = SocketAddr::new(p.v4, PORT);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    p.ns.spawn(move || {
        let s = UdpSocket::bind(addr).expect("binding the receiver");
        s.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let _ = ready_tx.send(());
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, from)) = s.recv_from(&mut buf) {
                let now = Instant::now();
                arrivals
                    .last
                    .lock()
                    .expect("arrivals")
                    .push((from.ip(), now));
            }
        }
    });
    ready_rx.recv().expect("receiver ready");
}

/// A sender of one datagram every ~100 µs to `to`, from one source port
/// (one flow).
fn send(p: &Pod, to: IpAddr, stop: Arc<AtomicBool>) {
    let dst = SocketAddr::new(to, PORT);
    p.ns.spawn(move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("binding the sender");
        while !stop.load(Ordering::Relaxed) {
            // Dropped datagrams come back as errors on a connected
            // socket; an unconnected one just sends.
            let _ = s.send_to(b"x", dst);
            std::thread::sleep(Duration::from_micros(100));
        }
    });
}

/// New connections per second of [`event_loss`].
const EVENT_RATE: u64 = 20_000;
/// How long [`event_loss`] sends.
const EVENT_SECONDS: u64 = 5;

/// The sum of the samples of `name` in a `/metrics` text whose labels
/// include every one of `labels` (`key="value"`).
fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Deny events at [`EVENT_RATE`] new connections per second for
/// [`EVENT_SECONDS`], with the rate limit lifted (`--event-rate` 100,000
/// per pod, its most, `--event-burst` 10,000): pod s sends UDP datagrams
/// to pod r, whose ingress policy admits no one, each to the next port of
/// 10,000-59,999 (every datagram a new 5-tuple, judged and dropped at r's
/// `to_pod`). Counted from the agent's `/metrics` once its counts settle:
/// the kernel's drops at r's ingress, the deny events the agent read
/// (`netpol_denied_total` for r), and the events not emitted
/// (`netpol_events_lost_total`). Twice: the agent's default (events
/// counted) and with `--log-denied` (a log line each, to a file).
fn event_loss() -> Value {
    let node = node();
    let r = pod(&node, "10.200.0.2", "fd00:200::2");
    let s = pod(&node, "10.200.0.3", "fd00:200::3");
    let api = Api::start(&node);
    api.fake.apply_all(vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}),
        bench_pod("r", "r", &r),
        bench_pod("s", "s", &s),
        receiver_policy("nobody"),
    ]);
    let mut rows = Vec::new();
    for (mode, log) in [("default", false), ("--log-denied", true)] {
        let bpffs = TempBpffs::new();
        let mut extra: Vec<String> = ["--event-rate", "100000", "--event-burst", "10000"]
            .map(str::to_owned)
            .to_vec();
        if log {
            extra.push("--log-denied".to_owned());
        }
        let mut agent = Agent::start_with(&node, bpffs.path(), &api, "nph*", &extra, Some("info"));
        agent.wait_programmed(&[&r.host_if, &s.host_if], Duration::from_secs(60));
        let scrape = || netpol_testkit::process::get_in(&node.name, LISTEN, "/metrics");
        let counts = |text: &str| {
            (
                metric(
                    text,
                    "netpol_drops_total",
                    &["direction=\"ingress\"", "family=\"ipv4\""],
                ),
                metric(text, "netpol_denied_total", &["pod=\"r\""]),
                metric(text, "netpol_events_lost_total", &["cause=\"ring_full\""]),
                metric(text, "netpol_events_lost_total", &["cause=\"rate_limit\""]),
            )
        };
        let before = counts(&scrape().expect("metrics"));
        let to = r.v4;
        let sent = s.ns.run(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("binding the sender");
            let start = Instant::now();
            let total = EVENT_RATE * EVENT_SECONDS;
            let mut n: u64 = 0;
            while n < total {
                // Paced: as many as are due by now, then a short nap.
                let due = (start.elapsed().as_micros() as u64 * EVENT_RATE / 1_000_000).min(total);
                while n < due {
                    let port = 10_000 + (n % 50_000) as u16;
                    if sock.send_to(b"x", SocketAddr::new(to, port)).is_ok() {
                        n += 1;
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            (n, start.elapsed())
        });
        // Until the agent has read what the ring holds.
        let mut last = counts(&scrape().expect("metrics"));
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(200));
            let now = counts(&scrape().expect("metrics"));
            if now == last {
                break;
            }
            last = now;
        }
        let (drops, read, ring_full, limited) = (
            last.0 - before.0,
            last.1 - before.1,
            last.2 - before.2,
            last.3 - before.3,
        );
        let loss = 1.0 - read as f64 / drops.max(1) as f64;
        println!(
            "events ({mode}): {} datagrams in {:.2} s ({:.0}/s), {drops} dropped at r, {read} \
             events read, ring full {ring_full}, rate-limited {limited}: loss {:.4}%",
            sent.0,
            sent.1.as_secs_f64(),
            sent.0 as f64 / sent.1.as_secs_f64(),
            loss * 100.0
        );
        let (rss, cpu) = agent.usage();
        rows.push(
            json!({"mode": mode, "sent": sent.0, "seconds": sent.1.as_secs_f64(),
                         "dropped": drops, "read": read, "ring_full": ring_full,
                         "rate_limited": limited, "loss": loss,
                         "agent_resident_bytes": rss, "agent_cpu_seconds": cpu}),
        );
    }
    json!({"rate": EVENT_RATE, "seconds": EVENT_SECONDS, "runs": rows})
}

/// p50 and p99 in milliseconds.
fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "small sample counts"
        )]
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[i].as_secs_f64() * 1e3
    };
    (at(0.5), at(0.99))
}

/// Waits up to 2 s for a datagram from `from` after `t`.
fn granted(arrivals: &Arrivals, from: IpAddr, t: Instant) -> Duration {
    let deadline = t + Duration::from_secs(2);
    loop {
        if let Some(at) = arrivals.first_after(from, t) {
            return at - t;
        }
        assert!(
            Instant::now() < deadline,
            "no datagram from {from} 2 s after a grant"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Waits until no datagram from `from` came for 100 ms; the last one
/// before the gap marks the revocation.
fn revoked(arrivals: &Arrivals, from: IpAddr, t: Instant) -> Duration {
    let deadline = t + Duration::from_secs(2);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let last = arrivals.last_from(from).unwrap_or(t);
        if last.elapsed() >= Duration::from_millis(100) {
            arrivals.clear();
            return last.saturating_duration_since(t);
        }
        assert!(
            Instant::now() < deadline,
            "datagrams from {from} 2 s after a revocation"
        );
    }
}

struct Change {
    name: &'static str,
    grant: Vec<Duration>,
    revoke: Vec<Duration>,
}

fn changes() -> (Vec<Change>, Value) {
    let size = &SMALL;
    let node = node();
    let bpffs = TempBpffs::new();
    let r = pod(&node, "10.200.0.2", "fd00:200::2");
    let s = pod(&node, "10.200.0.3", "fd00:200::3");
    let n = pod(&node, "10.200.0.4", "fd00:200::4");
    let api = Api::start(&node);
    let mut objects = cluster(size, &[]);
    objects.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}));
    objects.push(bench_pod("r", "r", &r));
    objects.push(bench_pod("s", "s-denied", &s));
    objects.push(receiver_policy("s-allowed"));
    api.fake.apply_all(objects);
    let mut agent = Agent::start(&node, bpffs.path(), &api);
    agent.wait_programmed(&[&r.host_if, &s.host_if], Duration::from_secs(60));
    // Changes are measured once the start's moves to TCX links are done.
    agent.wait_on_tcx(Duration::from_secs(60));
    let (rss, _) = agent.usage();

    let stop = Arc::new(AtomicBool::new(false));
    let arrivals = Arc::new(Arrivals::default());
    receive(&r, arrivals.clone(), stop.clone());
    send(&s, r.v4, stop.clone());
    send(&n, r.v4, stop.clone());
    // Nothing allowed yet.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        arrivals.last_from(s.v4).is_none() && arrivals.last_from(n.v4).is_none(),
        "datagrams got through before any grant"
    );

    let mut out = Vec::new();
    let mut run = |name: &'static str, from: IpAddr, grant: &dyn Fn(), revoke: &dyn Fn()| {
        let mut c = Change {
            name,
            grant: Vec::new(),
            revoke: Vec::new(),
        };
        for _ in 0..ROUNDS {
            arrivals.clear();
            let t = Instant::now();
            grant();
            c.grant.push(granted(&arrivals, from, t));
            // Established: more datagrams on the flow. Past the debounce
            // too: a change within 10 ms of the last compile waits for
            // the rest of its burst, which this does not measure.
            std::thread::sleep(Duration::from_millis(15));
            let t = Instant::now();
            revoke();
            c.revoke.push(revoked(&arrivals, from, t));
        }
        out.push(c);
    };
    run(
        "one pod's labels",
        s.v4,
        &|| api.fake.apply(bench_pod("s", "s-allowed", &s)),
        &|| api.fake.apply(bench_pod("s", "s-denied", &s)),
    );
    run(
        "one policy edit",
        s.v4,
        &|| api.fake.apply(receiver_policy("s-denied")),
        &|| api.fake.apply(receiver_policy("s-allowed")),
    );
    run(
        "a new pod",
        n.v4,
        &|| api.fake.apply(bench_pod("n", "s-allowed", &n)),
        &|| {
            api.fake.delete("Pod", "bench", "n");
        },
    );
    // s is labelled s-denied again: an Admin Accept lets it in, a Deny
    // (the same object edited) shuts it out.
    run(
        "one ClusterNetworkPolicy edit",
        s.v4,
        &|| api.fake.apply(receiver_guard("Accept")),
        &|| api.fake.apply(receiver_guard("Deny")),
    );
    // Without the guard, s (s-denied) is shut out by r's NetworkPolicy;
    // a second one admitting it waits staged: removing the annotation
    // promotes it (the grant), putting it back stages it again (the
    // revocation).
    api.fake.delete("ClusterNetworkPolicy", "", "r-guard");
    api.fake.apply(receiver_staged_grant(true));
    std::thread::sleep(Duration::from_millis(300));
    arrivals.clear();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        arrivals.last_from(s.v4).is_none(),
        "datagrams from s got through a staged policy"
    );
    run(
        "a staged policy promoted, then staged again",
        s.v4,
        &|| api.fake.apply(receiver_staged_grant(false)),
        &|| api.fake.apply(receiver_staged_grant(true)),
    );
    // The same with the Admin Accept for s staged: r's NetworkPolicy
    // alone (s-denied shut out) is enforced meanwhile.
    api.fake.delete("NetworkPolicy", "bench", "r-from-s");
    api.fake.apply(receiver_guard_staged(true));
    std::thread::sleep(Duration::from_millis(300));
    arrivals.clear();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        arrivals.last_from(s.v4).is_none(),
        "datagrams from s got through a staged ClusterNetworkPolicy"
    );
    run(
        "a staged ClusterNetworkPolicy promoted, then staged again",
        s.v4,
        &|| api.fake.apply(receiver_guard_staged(false)),
        &|| api.fake.apply(receiver_guard_staged(true)),
    );
    stop.store(true, Ordering::Relaxed);
    let summary = json!({"pods": size.pods, "policies": size.policies,
                         "namespaces": size.namespaces, "local_pods": size.local(),
                         "resident_bytes": rss});
    (out, summary)
}

/// A cold start at `size`: seconds to every local pod enforced, resident
/// bytes, CPU share over 5 idle seconds.
fn cold_start(size: &Size) -> Value {
    let node = node();
    let bpffs = TempBpffs::new();
    let local = size.local();
    eprintln!("cold start: {local} local pods…");
    let pods: Vec<Pod> = (0..local)
        .map(|i| {
            pod(
                &node,
                &format!("10.210.{}.{}", i / 250, i % 250 + 1),
                &format!("fd00:210::{:x}", i + 1),
            )
        })
        .collect();
    let api = Api::start(&node);
    eprintln!("cold start: serving {} pods…", size.pods);
    api.fake.apply_all(cluster(size, &pods));
    let names: Vec<&str> = pods.iter().map(|p| p.host_if.as_str()).collect();
    let started = Instant::now();
    let mut agent = Agent::start(&node, bpffs.path(), &api);
    // When the agent first asks for the Pods: the list starts.
    let listed = Mutex::new(None);
    let done = AtomicBool::new(false);
    let enforced = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if api.fake.lists("Pod") > 0 {
                    *listed.lock().expect("list time") = Some(Instant::now());
                    return;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        let at = agent.wait_programmed(&names, Duration::from_secs(300));
        done.store(true, Ordering::Relaxed);
        at
    });
    let listed = listed.into_inner().expect("list time").unwrap_or(started);
    let from_start = enforced - started;
    let from_list = enforced - listed;
    // With `--attach-mode=auto`, enforced by netlink filters first: when
    // every interface is on its TCX links.
    let on_tcx = agent.wait_on_tcx(Duration::from_secs(300)) - listed;
    let (rss, _) = agent.usage();
    // Idle: after the trailing work of the start (the state file) is done.
    std::thread::sleep(Duration::from_secs(5));
    let (_, cpu0) = agent.usage();
    std::thread::sleep(Duration::from_secs(10));
    let (_, cpu1) = agent.usage();
    let idle = (cpu1 - cpu0) / 10.0;
    #[expect(clippy::cast_precision_loss, reason = "byte counts")]
    let mib = rss as f64 / 1_048_576.0;
    eprintln!(
        "cold start at {} pods: enforced {:.2} s after the start, {:.2} s after the first \
         Pod list, every interface on TCX links {:.2} s after it; resident {mib:.1} MiB, idle \
         CPU {idle:.4}",
        size.pods,
        from_start.as_secs_f64(),
        from_list.as_secs_f64(),
        on_tcx.as_secs_f64(),
    );
    json!({"pods": size.pods, "policies": size.policies, "namespaces": size.namespaces,
           "local_pods": local, "enforced_after_start_s": from_start.as_secs_f64(),
           "enforced_after_list_s": from_list.as_secs_f64(),
           "on_tcx_after_list_s": on_tcx.as_secs_f64(),
           "resident_bytes": rss, "idle_cpu": idle})
}

/// `line` without its terminal colour sequences (`ESC [ ... m`).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How many pods `pod_start` starts.
const POD_STARTS: usize = 200;

/// **Pod start**, on the 10,000-pod cluster: each pod's Pod object is
/// created (pending, no addresses, in `ns-1` with `app: app-1`, which the
/// cluster's policies select both ways), then its sandbox through the CNI
/// chain as the runtime runs it (Debian's `bridge` with host-local,
/// `portmap`, then `netpol-cni`, each plugin a process forked in the
/// node's namespace); the next pod comes 0–300 ms later ([`gap`]), and the
/// pods are deleted when the series ends. Four configurations in one run:
/// the chain alone (no agent, no `netpol-cni`: the baseline), then the
/// agent's default, `--attach-mode=auto` (netlink filters at once, TCX
/// links once the node has been quiet for 200 ms: some pods start while
/// another's interface moves), `tcx` (TCX links at once) and `netlink`
/// (clsact filters only); kernels before 6.6 run the baseline and
/// `netlink`. For each: the `netpol-cni` step (process start, the agent's
/// compile and apply, its answer), the agent's own part of it, the
/// `bridge` step (the agent attaches to the new veth while `bridge` runs,
/// and both take `rtnl_lock`), and the whole chain, whose difference from
/// the baseline is what netpol adds to a pod's start. Right after each
/// ADD, `/status` must show the pod's veth bound and programmed (its full
/// policy in force before any container runs); the count of those that
/// were not is reported and must be 0. Leaves out: the kubelet and
/// containerd, image pulls, and the API server's latency (the Pod object
/// exists before the sandbox, as in a cluster).
fn pod_start() -> Value {
    let size = &SMALL;
    let node = node();
    let api = Api::start(&node);
    api.fake.apply_all(cluster(size, &[]));
    // The chain's own time on this machine, in the same run: what each
    // configuration adds is measured against it.
    let baseline = pod_starts(&node, &api, None);
    // The default (staged), TCX at once where the kernel has it, and
    // netlink clsact filters everywhere.
    let tcx = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
    let modes: Vec<Value> = ["auto", "tcx", "netlink"]
        .into_iter()
        .filter(|m| tcx || *m == "netlink")
        .map(|mode| {
            let r = pod_starts(&node, &api, Some(mode));
            let (n50, n99) = percentiles(r.netpol.clone());
            let (a50, a99) = percentiles(r.answered.clone());
            let (b50, b99) = percentiles(r.bridge.clone());
            let (c50, c99) = percentiles(r.chain.clone());
            println!(
                "pod start, {mode} attach: netpol-cni p50 {n50:.2} ms, p99 {n99:.2} ms (the \
                 agent's part p50 {a50:.2} ms, p99 {a99:.2} ms); bridge p50 {b50:.2} ms, p99 \
                 {b99:.2} ms; whole chain p50 {c50:.2} ms, p99 {c99:.2} ms; not programmed when \
                 ADD returned: {} of {POD_STARTS}",
                r.late
            );
            json!({"mode": mode, "netpol_cni_p50_ms": n50, "netpol_cni_p99_ms": n99,
                   "agent_p50_ms": a50, "agent_p99_ms": a99,
                   "bridge_p50_ms": b50, "bridge_p99_ms": b99,
                   "chain_p50_ms": c50, "chain_p99_ms": c99,
                   "not_programmed_at_add": r.late})
        })
        .collect();
    let (b50, b99) = percentiles(baseline.bridge);
    let (c50, c99) = percentiles(baseline.chain);
    println!(
        "pod start, no agent and no netpol-cni: bridge p50 {b50:.2} ms, p99 {b99:.2} ms; whole \
         chain p50 {c50:.2} ms, p99 {c99:.2} ms"
    );
    json!({"pods": POD_STARTS, "cluster_pods": size.pods,
           "baseline": {"bridge_p50_ms": b50, "bridge_p99_ms": b99,
                        "chain_p50_ms": c50, "chain_p99_ms": c99},
           "modes": modes})
}

/// The pause after pod `i`'s start: 0–300 ms, spread by a fixed
/// sequence (Knuth's multiplicative hash), the same in every
/// configuration.
fn gap(i: usize) -> Duration {
    let h = u64::try_from(i).unwrap_or(0).wrapping_mul(2_654_435_761) % 300;
    Duration::from_millis(h)
}

/// The times of one configuration of [`pod_start`].
struct PodStarts {
    /// Every plugin of the chain, one pod each.
    chain: Vec<Duration>,
    /// The `bridge` step.
    bridge: Vec<Duration>,
    /// The `netpol-cni` step (empty without the agent).
    netpol: Vec<Duration>,
    /// The agent's own time on each ADD, from its log.
    answered: Vec<Duration>,
    /// Pods not programmed when their ADD returned.
    late: usize,
}

/// [`POD_STARTS`] pods through the chain: with an agent attaching in
/// `mode` and `netpol-cni` last, or (`None`) neither.
fn pod_starts(node: &Netns, api: &Api, mode: Option<&str>) -> PodStarts {
    let plugin = PathBuf::from(
        std::env::var("NETPOL_CNI_BIN").expect("NETPOL_CNI_BIN: the netpol-cni binary"),
    );
    let bpffs = TempBpffs::new();
    let dir = std::env::temp_dir().join(unique("netpol-bench-cni-"));
    std::fs::create_dir_all(dir.join("ipam")).expect("bench folder");
    let socket = dir.join("cni.sock");
    let mut chain = netpol_testkit::cni::Chain::flannel_like(
        &plugin,
        &socket,
        &dir.join("ipam"),
        "10.201.0.0/24",
        "fd00:201::/64",
    );
    // As containerd runs them: timed without `ip netns exec`'s own cost.
    chain.direct = true;
    let agent = mode.map(|mode| {
        let mut agent = Agent::start_with(
            node,
            bpffs.path(),
            api,
            "veth*",
            &[
                format!("--cni-socket={}", socket.display()),
                format!("--attach-mode={mode}"),
            ],
            // Its own timing of each ADD, read back from the log.
            Some("warn,netpol_agent::sync::cni=info"),
        );
        agent.wait_programmed(&[], Duration::from_secs(60));
        agent
    });
    let plugins: Vec<Value> = chain.conflist["plugins"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| agent.is_some() || p["type"] != "netpol-cni")
        .collect();
    let mut started = Vec::new();
    let mut r = PodStarts {
        chain: Vec::new(),
        bridge: Vec::new(),
        netpol: Vec::new(),
        answered: Vec::new(),
        late: 0,
    };
    for i in 0..POD_STARTS {
        let name = format!("start-{i}");
        api.fake.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns-1", "uid": format!("uid-{name}"),
                         "labels": {"app": "app-1"}},
            "spec": {"nodeName": LOCAL, "containers": [{"name": "c"}]},
            "status": {"phase": "Pending"}
        }));
        let pod = Netns::new("npbs");
        let sandbox = netpol_testkit::cni::Sandbox::new("ns-1", &name);
        let mut prev: Option<Value> = None;
        let mut total = Duration::ZERO;
        for p in &plugins {
            let t = Instant::now();
            let out = chain
                .exec(node, &pod, &sandbox, "ADD", p, prev.as_ref())
                .unwrap_or_else(|e| {
                    let log = agent.as_ref().map(Agent::log).unwrap_or_default();
                    panic!("ADD {name}: {e}; agent log:\n{log}")
                });
            let took = t.elapsed();
            total += took;
            match p["type"].as_str() {
                Some("bridge") => r.bridge.push(took),
                Some("netpol-cni") => r.netpol.push(took),
                _ => {}
            }
            prev = Some(out);
        }
        r.chain.push(total);
        let result = prev.expect("a result");
        let veth = result["interfaces"][1]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Some(agent) = &agent
            && !agent.status().is_some_and(|s| programmed(&s, &veth))
        {
            r.late += 1;
        }
        // Pods stay until the series ends, and the next one comes after a
        // gap of 0–300 ms (the same for every configuration): with
        // `--attach-mode=auto` the interfaces move to TCX links once the
        // node has been quiet for 200 ms, and some pods start while one
        // moves.
        std::thread::sleep(gap(i));
        started.push((pod, sandbox, result));
    }
    for (pod, sandbox, result) in started {
        chain
            .del(node, &pod, &sandbox, Some(&result))
            .unwrap_or_else(|e| panic!("DEL {}: {e}", sandbox.name));
    }
    for i in 0..POD_STARTS {
        api.fake.delete("Pod", "ns-1", &format!("start-{i}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let Some(agent) = agent else {
        return r;
    };
    // The agent's part: from the request read off its socket to its
    // answer (the `micros` of "CNI ADD answered"), without the plugin's
    // process.
    r.answered = agent
        .log()
        .lines()
        .filter(|l| l.contains("CNI ADD answered"))
        .map(plain)
        .filter_map(|l| {
            let at = l.find("micros=")?;
            let digits: String = l[at..]
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok().map(Duration::from_micros)
        })
        .collect();
    assert_eq!(
        r.answered.len(),
        POD_STARTS,
        "the agent's log names every ADD"
    );
    r
}

fn main() {
    if !netpol_agent::privileges::is_root() {
        eprintln!(
            "the agent API bench runs the agent on veths in network namespaces: run it as root"
        );
        return;
    }
    // `cargo bench` passes `--bench`; a filter picks the parts.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |part: &str| filter.as_deref().is_none_or(|f| part.contains(f));
    let mut report = serde_json::Map::new();
    if wants("changes") {
        let (changes, cluster) = changes();
        let mut rows = Vec::new();
        for c in changes {
            let (g50, g99) = percentiles(c.grant);
            let (r50, r99) = percentiles(c.revoke);
            println!(
                "{}: grant p50 {g50:.2} ms, p99 {g99:.2} ms; revoke p50 {r50:.2} ms, p99 {r99:.2} ms",
                c.name
            );
            rows.push(
                json!({"change": c.name, "grant_p50_ms": g50, "grant_p99_ms": g99,
                             "revoke_p50_ms": r50, "revoke_p99_ms": r99}),
            );
        }
        report.insert("cluster".into(), cluster);
        report.insert("changes".into(), Value::Array(rows));
    }
    // Only when asked for: its own file.
    if filter.as_deref() == Some("events") {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/netpol-bench");
        std::fs::create_dir_all(&dir).expect("bench output folder");
        std::fs::write(
            dir.join("events.json"),
            serde_json::to_string_pretty(&event_loss()).expect("json"),
        )
        .expect("writing the bench result");
        return;
    }
    // Only when asked for (`cargo xtask bench pod-start`): it needs the
    // plugin's binary.
    if filter.as_deref() == Some("pod-start") {
        report.insert("pod_start".into(), pod_start());
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/netpol-bench");
        std::fs::create_dir_all(&dir).expect("bench output folder");
        std::fs::write(
            dir.join("pod_start.json"),
            serde_json::to_string_pretty(&Value::Object(report)).expect("json"),
        )
        .expect("writing the bench result");
        return;
    }
    if wants("cold") {
        let small = cold_start(&SMALL);
        let large = cold_start(&LARGE);
        let remote =
            |v: &Value| v["pods"].as_f64().unwrap_or(0.0) - v["local_pods"].as_f64().unwrap_or(0.0);
        let per_pod = (large["resident_bytes"].as_f64().unwrap_or(0.0)
            - small["resident_bytes"].as_f64().unwrap_or(0.0))
            / (remote(&large) - remote(&small));
        println!(
            "resident growth per remote pod: {:.2} KiB",
            per_pod / 1024.0
        );
        report.insert(
            "cold_start".into(),
            json!({"small": small, "large": large, "per_remote_pod_bytes": per_pod,
                   "attach_mode": attach_mode().unwrap_or_else(|| "default".into())}),
        );
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/netpol-bench");
    std::fs::create_dir_all(&dir).expect("bench output folder");
    let path = dir.join("agent_api.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(report)).expect("json"),
    )
    .expect("writing the bench result");
    println!("written {}", path.display());
}
