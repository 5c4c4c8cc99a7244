//! Helpers for the privileged tests: root check, RAII network namespaces and
//! bpffs mounts, running code inside a namespace, loading fixtures and
//! enforcing them, echo servers and the probes that talk to them.
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use netpol_agent::{
    Datapath, DatapathConfig,
    compiler::{self, Compiled},
    model::{
        ObjectRef, Snapshot,
        manifests::{LoadReport, apply_str},
    },
};

/// Whether privileged tests may run. Without root they fail loudly, unless
/// `NETPOL_SKIP_PRIVILEGED=1` asks to skip them (CI never sets it).
pub fn privileged() -> bool {
    if netpol_agent::privileges::is_root() {
        return true;
    }
    if std::env::var("NETPOL_SKIP_PRIVILEGED").as_deref() == Ok("1") {
        eprintln!("skipping privileged test: not root and NETPOL_SKIP_PRIVILEGED=1");
        return false;
    }
    panic!(
        "this test needs root (BPF, network namespaces); run as root or set \
         NETPOL_SKIP_PRIVILEGED=1 to skip it"
    );
}

/// A short name unique to this process and call, fit for an interface name
/// (at most 15 bytes with the prefix).
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command and panics with its output when it fails.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop (also when the test panics).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs `program args` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Moves the calling thread into the namespace for good (benches, whose
    /// harness cannot move to another thread).
    pub fn enter(&self) {
        let path = PathBuf::from("/var/run/netns").join(&self.name);
        let file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("entering {}: {e}", path.display()));
    }

    /// Runs `f` on a thread that has entered the namespace. Everything the
    /// closure creates (sockets, netlink requests, BPF attachments by
    /// interface name) happens in it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from("/var/run/netns").join(&self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path)
                    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("entering {}: {e}", path.display()));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A private bpffs in a temporary folder, unmounted and removed on drop.
pub struct TempBpffs {
    pub root: PathBuf,
}

impl TempBpffs {
    pub fn new() -> Self {
        let root = std::env::temp_dir().join(unique("netpol-bpffs-"));
        std::fs::create_dir_all(&root).expect("creating bpffs folder");
        netpol_agent::bpffs::ensure_mounted_anywhere(&root).expect("mounting bpffs");
        Self { root }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }
}

impl Drop for TempBpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The snapshot of `manifests`, every one of which must be valid: an
/// invalid fixture would otherwise test less than it claims.
pub fn snapshot(manifests: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut report = LoadReport::default();
    apply_str(&mut snap, manifests, "test", &mut report);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    snap
}

/// Loads a datapath (in the calling thread's netns), writes `compiled`
/// through the map writer with each pod bound to its host veth, and
/// attaches to every one of those veths. Returns the bindings for later
/// writes.
pub fn enforce(
    bpffs: &TempBpffs,
    compiled: &Compiled,
    pods: &[(ObjectRef, &str)],
) -> (Datapath, BTreeMap<ObjectRef, u32>) {
    let mut dp = Datapath::load(&DatapathConfig {
        bpffs: bpffs.path().to_owned(),
        ..DatapathConfig::default()
    })
    .expect("load");
    let ifaces: BTreeMap<ObjectRef, u32> = pods
        .iter()
        .map(|(pod, host_if)| {
            let index = nix::net::if_::if_nametoindex(*host_if)
                .unwrap_or_else(|e| panic!("{host_if}: {e}"));
            (pod.clone(), index)
        })
        .collect();
    let ops: Vec<_> = compiler::diff(&Compiled::default(), compiled)
        .raw()
        .collect();
    dp.writer().apply(&ops, &ifaces).expect("apply");
    for (pod, host_if) in pods {
        dp.attach(host_if)
            .unwrap_or_else(|e| panic!("attach {pod}: {e}"));
    }
    (dp, ifaces)
}

/// A node netns and a pod netns joined by a veth pair, with IPv4 and IPv6
/// (nodad) addresses on both ends.
pub struct PodLink {
    pub node: Netns,
    pub pod: Netns,
    /// Host-side interface name, in the node netns.
    pub host_if: String,
}

pub const NODE_V4: &str = "192.0.2.1";
pub const POD_V4: &str = "192.0.2.2";
pub const NODE_V6: &str = "2001:db8::1";
pub const POD_V6: &str = "2001:db8::2";

impl PodLink {
    pub fn new() -> Self {
        let node = Netns::new("npn");
        let pod = Netns::new("npp");
        let host_if = unique("nph");
        sh(
            "ip",
            &[
                "-n", &node.name, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
                "netns", &pod.name,
            ],
        );
        for (ns, dev, v4, v6) in [
            (&node, host_if.as_str(), NODE_V4, NODE_V6),
            (&pod, "eth0", POD_V4, POD_V6),
        ] {
            sh(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{v4}/24"),
                    "dev",
                    dev,
                ],
            );
            sh(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ],
            );
            sh("ip", &["-n", &ns.name, "link", "set", dev, "up"]);
        }
        Self { node, pod, host_if }
    }
}

/// Line-echo TCP servers and the probes that talk to them. A policy that
/// denies drops the SYN, so a denial shows as a timeout, never a refusal.
pub mod echo {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        net::{IpAddr, SocketAddr, TcpListener, TcpStream},
        time::Duration,
    };

    use super::Netns;

    /// Echoes every line of every connection to `port` of each of
    /// `addresses` in `ns`, for as long as the test runs.
    pub fn serve(ns: &Netns, addresses: &[&str], port: u16) {
        for addr in addresses {
            let ip: IpAddr = addr.parse().expect("address");
            let l = ns.run(|| TcpListener::bind(SocketAddr::new(ip, port)).expect("bind"));
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    std::thread::spawn(move || lines(&s));
                }
            });
        }
    }

    /// Sends back each line read from `s` until the peer closes it, a read
    /// times out or a write fails.
    pub fn lines(s: &TcpStream) {
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            if (&*s).write_all(line.as_bytes()).is_err() {
                break;
            }
            line.clear();
        }
    }

    /// Whether a connection from `from` to `to:port` exchanges a line. A
    /// denied connection waits out `connect_timeout`: the caller picks it
    /// long enough for an allowed one to resolve its neighbour first.
    pub fn connects(from: &Netns, to: &str, port: u16, connect_timeout: Duration) -> bool {
        let ip: IpAddr = to.parse().expect("address");
        from.run(|| {
            TcpStream::connect_timeout(&SocketAddr::new(ip, port), connect_timeout)
                .is_ok_and(|s| exchange(&s, "hi\n", Duration::from_secs(2)))
        })
    }

    /// One line out and the same line back on an open connection, within
    /// `timeout`.
    pub fn exchange(s: &TcpStream, line: &str, timeout: Duration) -> bool {
        let _ = s.set_read_timeout(Some(timeout));
        if (&*s).write_all(line.as_bytes()).is_err() {
            return false;
        }
        let mut back = String::new();
        BufReader::new(s).read_line(&mut back).is_ok() && back == line
    }
}

// ---------------------------------------------------------------------
// Agent helpers (tests/agent_*.rs, benches/agent.rs): an agent running in
// a node namespace, manifests it watches, bridge and routed pod topologies.
// ---------------------------------------------------------------------
pub mod agent {
    use std::{
        net::SocketAddr,
        path::{Path, PathBuf},
        process::Command,
        time::Duration,
    };

    use netpol_agent::{
        Agent, AgentBuilder, AgentError, Counters, Source, Status, StatusHandle, events::Denial,
        fingerprint, model::folder::Folder,
    };

    use super::{Netns, sh, unique};

    pub const DEADLINE: Duration = Duration::from_secs(10);

    /// The manifests folder the agent watches.
    pub struct Manifests(pub PathBuf);

    impl Manifests {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(unique("netpol-manifests-"));
            std::fs::create_dir_all(&p).expect("manifests folder");
            Self(p)
        }

        pub fn write(&self, name: &str, text: &str) {
            let tmp = self.0.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).expect("writing a manifest");
            std::fs::rename(&tmp, self.0.join(name)).expect("renaming a manifest");
        }

        /// What the agent must report once it enforces this folder.
        pub fn fingerprint(&self) -> String {
            let loaded = Folder::load(&self.0).expect("loading the manifests");
            fingerprint(&loaded.snapshot)
        }
    }

    impl Drop for Manifests {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An agent running on its own thread inside the node namespace.
    pub struct Running {
        pub status: StatusHandle,
        /// Its deny events, from its start.
        pub denials: tokio::sync::broadcast::Receiver<Denial>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<Result<(), AgentError>>>,
        rt: tokio::runtime::Runtime,
    }

    impl Running {
        pub fn start(node: &Netns, bpffs: &Path, manifests: &Manifests) -> Self {
            Self::start_with(node, bpffs, manifests, |b| b)
        }

        /// [`Self::start`] with more settings.
        pub fn start_with(
            node: &Netns,
            bpffs: &Path,
            manifests: &Manifests,
            configure: impl FnOnce(AgentBuilder) -> AgentBuilder,
        ) -> Self {
            let agent = configure(
                Agent::builder()
                    .source(Source::Files(manifests.0.clone()))
                    .node_name("n1")
                    .bpffs(bpffs)
                    .interfaces("nph*")
                    // Tests that read the state file give their own folder.
                    .state_dir(None)
                    .listen(Some("127.0.0.1:0".parse().expect("address"))),
            )
            .build()
            .expect("agent settings");
            let status = agent.status();
            let denials = agent.denials();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let ns = PathBuf::from("/var/run/netns").join(&node.name);
            let thread = std::thread::spawn(move || {
                let f = std::fs::File::open(&ns).expect("node namespace");
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("entering the node");
                // Built after setns: every runtime thread is in the node.
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("agent runtime");
                rt.block_on(agent.run(async {
                    let _ = rx.await;
                }))
            });
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("test runtime");
            Self {
                status,
                denials,
                stop: Some(tx),
                thread: Some(thread),
                rt,
            }
        }

        /// The next deny event within `timeout`.
        pub fn next_denial(&mut self, timeout: Duration) -> Option<Denial> {
            use tokio::sync::broadcast::error::RecvError;
            let denials = &mut self.denials;
            self.rt.block_on(async {
                tokio::time::timeout(timeout, async {
                    match denials.recv().await {
                        Ok(d) => Some(d),
                        Err(RecvError::Lagged(n)) => panic!("missed {n} deny events"),
                        Err(RecvError::Closed) => None,
                    }
                })
                .await
                .ok()
                .flatten()
            })
        }

        pub fn wait(&mut self, what: &str, pred: impl FnMut(&Status) -> bool) -> Status {
            match self.rt.block_on(self.status.wait_for(DEADLINE, pred)) {
                Ok(s) => s,
                Err(last) => panic!("timed out waiting for {what}; status: {last:#?}"),
            }
        }

        /// Waits until the agent enforces exactly what the folder holds.
        pub fn wait_enforced(&mut self, m: &Manifests) -> Status {
            let fp = m.fingerprint();
            self.wait(&format!("fingerprint {fp}"), |s| {
                s.fingerprint.as_deref() == Some(fp.as_str()) && s.last_error.is_none()
            })
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
            if let Some(t) = self.thread.take() {
                match t.join() {
                    Ok(r) => {
                        if !std::thread::panicking() {
                            r.expect("agent result");
                        }
                    }
                    Err(p) if !std::thread::panicking() => std::panic::resume_unwind(p),
                    Err(_) => {}
                }
            }
        }
    }

    pub fn interface<'a>(
        s: &'a Status,
        name: &str,
    ) -> Option<&'a netpol_agent::status::InterfaceStatus> {
        s.interfaces.iter().find(|i| i.name == name)
    }

    /// One echo request and its reply within two seconds.
    pub fn pings(from: &Netns, to: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &from.name, "ping", "-c1", "-W2", to])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    pub fn count(bpffs: &Path, r: u32) -> u64 {
        let c = Counters::read_pinned(&bpffs.join("netpol")).expect("counters");
        c.entries
            .iter()
            .filter(|e| e.reason == r)
            .map(|e| e.value.packets)
            .sum()
    }

    pub fn http_get(node: &Netns, addr: SocketAddr, path: &str) -> String {
        use std::io::{Read as _, Write as _};
        node.run(|| {
            let mut s = std::net::TcpStream::connect(addr).expect("connecting to the agent");
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
            )
            .expect("request");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("response");
            out
        })
    }

    #[derive(Clone, Copy)]
    pub enum Topology {
        /// Veths enslaved to one bridge, one subnet.
        Bridge,
        /// Each veth routed by the node, one subnet each.
        Routed,
    }

    pub struct PodNet {
        pub ns: Netns,
        pub host_if: String,
        pub v4: String,
        pub v6: String,
    }

    /// `ip -n <ns> <args>`, the arguments split on spaces.
    pub fn ip(ns: &str, args: &str) {
        let mut full = vec!["-n", ns];
        full.extend(args.split_whitespace());
        sh("ip", &full);
    }

    /// The node namespace with its bridge (for [`Topology::Bridge`]).
    pub fn node(topo: Topology, dual: bool) -> Netns {
        let node = Netns::new("npn");
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        if dual {
            node.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        } else {
            node.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
            node.exec("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        }
        if matches!(topo, Topology::Bridge) {
            let n = &node.name;
            ip(n, "link add cni0 type bridge");
            ip(n, "addr add 10.42.0.1/24 dev cni0");
            if dual {
                ip(n, "addr add fd42::1/64 dev cni0 nodad");
            }
            ip(n, "link set cni0 up");
        }
        node
    }

    /// A pod's namespace and veth, addressed as a CNI does: the host side
    /// appears first, the peer gets its addresses after. IPv4 only unless
    /// `dual`.
    pub fn pod(node: &Netns, topo: Topology, n: u8, dual: bool) -> PodNet {
        let ns = Netns::new("npp");
        let host_if = unique("nph");
        let (nn, pn) = (&node.name, &ns.name);
        ip(
            nn,
            &format!("link add {host_if} type veth peer name eth0 netns {pn}"),
        );
        let (v4, v6, gw4, gw6) = match topo {
            Topology::Bridge => {
                ip(nn, &format!("link set {host_if} master cni0"));
                (
                    format!("10.42.0.{n}"),
                    format!("fd42::{n}"),
                    "10.42.0.1".to_owned(),
                    "fd42::1".to_owned(),
                )
            }
            Topology::Routed => {
                let (gw4, gw6) = (format!("10.1.{n}.1"), format!("fd01:{n}::1"));
                ip(nn, &format!("addr add {gw4}/24 dev {host_if}"));
                if dual {
                    ip(nn, &format!("addr add {gw6}/64 dev {host_if} nodad"));
                }
                (format!("10.1.{n}.2"), format!("fd01:{n}::2"), gw4, gw6)
            }
        };
        ip(nn, &format!("link set {host_if} up"));
        ip(pn, &format!("addr add {v4}/24 dev eth0"));
        if dual {
            ip(pn, &format!("addr add {v6}/64 dev eth0 nodad"));
        }
        ip(pn, "link set eth0 up");
        ip(pn, &format!("route add default via {gw4}"));
        if dual {
            ip(pn, &format!("-6 route add default via {gw6}"));
        }
        PodNet {
            ns,
            host_if,
            v4,
            v6: if dual { v6 } else { String::new() },
        }
    }

    impl PodNet {
        pub fn addresses(&self) -> Vec<&str> {
            [self.v4.as_str(), self.v6.as_str()]
                .into_iter()
                .filter(|a| !a.is_empty())
                .collect()
        }
    }

    pub const BASE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}, {type: InternalIP, address: "fd00::1"}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
"#;

    pub fn pod_manifest(name: &str, p: &PodNet) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {name}}}}}\n\
             spec: {{nodeName: n1, containers: [{{name: c}}]}}\n\
             status: {{phase: Running, podIPs: [{}]}}\n",
            p.addresses()
                .iter()
                .map(|a| format!("{{ip: \"{a}\"}}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

// ---------------------------------------------------------------------
// Service helpers (tests/service_*.rs): the real `netpol-agent run` binary
// in a node namespace, calico-style routed pods with chosen addresses,
// kube-proxy's DNAT, echo servers and the probes that test them.
// ---------------------------------------------------------------------
pub mod services {
    use std::{
        io::{BufRead as _, BufReader, Read as _, Write as _},
        net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use super::{Netns, sh, unique};

    /// The agent binary cargo built for these tests.
    pub const AGENT: &str = env!("CARGO_BIN_EXE_netpol-agent");
    /// Where the agent listens, inside its node namespace.
    pub const LISTEN: &str = "127.0.0.1:9101";
    /// How long the agent may take to start and enforce a folder.
    pub const DEADLINE: Duration = Duration::from_secs(30);
    /// A probe that must fail waits this long.
    pub const FAST: Duration = Duration::from_millis(1500);
    /// A probe that must succeed gets a retry this long (neighbour
    /// discovery on fresh links, a loaded machine).
    pub const SLOW: Duration = Duration::from_secs(3);

    /// A manifests folder, removed on drop.
    pub struct Folder(pub PathBuf);

    impl Folder {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(unique("netpol-svc-manifests-"));
            std::fs::create_dir_all(&p).expect("manifests folder");
            Self(p)
        }

        /// Writes a file atomically (the agent never reads half of it).
        pub fn write(&self, name: &str, text: &str) {
            let tmp = self.0.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).expect("writing a manifest");
            std::fs::rename(&tmp, self.0.join(name)).expect("renaming a manifest");
        }

        pub fn remove(&self, name: &str) {
            let _ = std::fs::remove_file(self.0.join(name));
        }

        /// `netpol-agent fingerprint --manifests <folder>`: what `/status`
        /// reports once the agent enforces the folder.
        pub fn fingerprint(&self) -> String {
            let out = Command::new(AGENT)
                .args(["fingerprint", "--manifests"])
                .arg(&self.0)
                .output()
                .expect("running netpol-agent fingerprint");
            assert!(
                out.status.success(),
                "netpol-agent fingerprint: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
    }

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `netpol-agent run --manifests` inside a node namespace; SIGTERM on
    /// drop (SIGKILL if it does not stop within five seconds).
    pub struct AgentProcess {
        child: Child,
        node: String,
        pub bpffs: PathBuf,
        pub log: PathBuf,
    }

    impl AgentProcess {
        /// Starts the agent for `node_name` with pod interfaces `nph*`;
        /// `extra` goes after `run`'s own arguments.
        pub fn start(
            node: &Netns,
            bpffs: &Path,
            manifests: &Folder,
            node_name: &str,
            extra: &[&str],
        ) -> Self {
            let log = std::env::temp_dir().join(unique("netpol-svc-agent-"));
            let file = std::fs::File::create(&log).expect("agent log");
            // `ip netns exec` gives the agent a mount namespace of its own,
            // a copy of ours: the bpffs is mounted before.
            let child = Command::new("ip")
                .args(["netns", "exec", &node.name, AGENT, "--bpffs"])
                .arg(bpffs)
                .args(["run", "--manifests"])
                .arg(&manifests.0)
                .args(["--node", node_name, "--interfaces", "nph*"])
                .args(["--listen", LISTEN])
                // Each agent its own state file, not the node's /run/netpol.
                .args(if extra.contains(&"--state-dir") {
                    Vec::new()
                } else {
                    vec![
                        "--state-dir".to_owned(),
                        std::env::temp_dir()
                            .join(unique("netpol-state-"))
                            .display()
                            .to_string(),
                    ]
                })
                .args(extra)
                .env("RUST_LOG", "info")
                .stdout(Stdio::from(file.try_clone().expect("log")))
                .stderr(Stdio::from(file))
                .spawn()
                .expect("starting netpol-agent run");
            Self {
                child,
                node: node.name.clone(),
                bpffs: bpffs.to_owned(),
                log,
            }
        }

        /// The agent's log so far.
        pub fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        /// One HTTP GET on the agent's port; `None` while it does not
        /// answer.
        pub fn get(&self, path: &str) -> Option<String> {
            let ns = PathBuf::from("/var/run/netns").join(&self.node);
            let path = path.to_owned();
            std::thread::spawn(move || {
                let f = std::fs::File::open(&ns).ok()?;
                nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
                let addr: SocketAddr = LISTEN.parse().ok()?;
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
                )
                .ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                Some(out.split_once("\r\n\r\n")?.1.to_owned())
            })
            .join()
            .ok()
            .flatten()
        }

        pub fn status(&self) -> Option<serde_json::Value> {
            serde_json::from_str(&self.get("/status")?).ok()
        }

        /// Waits until the agent enforces exactly what `manifests` holds,
        /// with each of `interfaces` bound and programmed.
        pub fn wait_enforced(
            &mut self,
            manifests: &Folder,
            interfaces: &[&str],
        ) -> serde_json::Value {
            let fp = manifests.fingerprint();
            let deadline = Instant::now() + DEADLINE;
            let mut last = serde_json::Value::Null;
            while Instant::now() < deadline {
                if let Ok(Some(st)) = self.child.try_wait() {
                    panic!("netpol-agent exited ({st}); its log:\n{}", self.log());
                }
                if let Some(s) = self.status() {
                    let programmed = |name: &str| {
                        s["interfaces"].as_array().is_some_and(|l| {
                            l.iter()
                                .any(|i| i["name"] == name && i["programmed"] == true)
                        })
                    };
                    if s["fingerprint"].as_str() == Some(fp.as_str())
                        && s["last_error"].is_null()
                        && interfaces.iter().all(|i| programmed(i))
                    {
                        return s;
                    }
                    last = s;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!(
                "netpol-agent did not enforce fingerprint {fp} with {interfaces:?} programmed \
                 within {DEADLINE:?}; last status: {last:#}\nlog:\n{}",
                self.log()
            );
        }

        /// Waits until `/status` reports `leave_node` attached to `dev`
        /// (TC egress of an uplink).
        pub fn wait_leave_node(&mut self, dev: &str) {
            let deadline = Instant::now() + DEADLINE;
            let mut last = serde_json::Value::Null;
            while Instant::now() < deadline {
                if let Ok(Some(st)) = self.child.try_wait() {
                    panic!("netpol-agent exited ({st}); its log:\n{}", self.log());
                }
                if let Some(s) = self.status() {
                    let attached = s["uplinks"].as_array().is_some_and(|l| {
                        l.iter()
                            .any(|u| u["name"] == dev && u["state"] == "attached")
                    });
                    if attached {
                        return;
                    }
                    last = s;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!(
                "leave_node not attached to {dev} within {DEADLINE:?}; last status: {last:#}\n\
                 log:\n{}",
                self.log()
            );
        }

        /// `netpol-agent stats` on the agent's bpffs.
        pub fn stats(&self) -> String {
            let out = Command::new(AGENT)
                .arg("--bpffs")
                .arg(&self.bpffs)
                .arg("stats")
                .output()
                .expect("running netpol-agent stats");
            assert!(
                out.status.success(),
                "netpol-agent stats: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        /// Kills the agent (SIGKILL, as a crash or the OOM killer would)
        /// and reaps it: its attachments and pinned maps stay.
        pub fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }

        /// Packets counted with `reason` in `direction` (both families).
        pub fn count(&self, direction: u32, reason: u32) -> u64 {
            let c =
                netpol_agent::Counters::read_pinned(&self.bpffs.join("netpol")).expect("counters");
            c.entries
                .iter()
                .filter(|e| e.reason == reason && e.direction == direction)
                .map(|e| e.value.packets)
                .sum()
        }
    }

    impl Drop for AgentProcess {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!("netpol-agent log:\n{}", self.log());
            }
            let running = matches!(self.child.try_wait(), Ok(None));
            if running && let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: kill(2) on the pid of our own child, which has not
                // been reaped yet (so the pid cannot have been reused).
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    let _ = std::fs::remove_file(&self.log);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_file(&self.log);
        }
    }

    /// A node namespace forwarding both families.
    pub fn node() -> Netns {
        let node = Netns::new("npn");
        node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        node.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        node
    }

    /// `ip -n <ns> <args>`, the arguments split on spaces.
    pub fn ip(ns: &str, args: &str) {
        let mut full = vec!["-n", ns];
        full.extend(args.split_whitespace());
        sh("ip", &full);
    }

    /// A pod namespace and its host veth (`nph…`).
    pub struct Pod {
        pub ns: Netns,
        pub host_if: String,
        pub v4: IpAddr,
        pub v6: IpAddr,
    }

    impl Pod {
        pub fn addresses(&self) -> [IpAddr; 2] {
            [self.v4, self.v6]
        }

        /// `{ip: …}` entries of its `status.podIPs`.
        pub fn pod_ips(&self) -> String {
            format!("[{{ip: \"{}\"}}, {{ip: \"{}\"}}]", self.v4, self.v6)
        }
    }

    /// A pod as Calico routes it: /32 and /128 addresses, a link-local
    /// gateway owned by the host veth, a route per pod address on the node.
    pub fn pod(node: &Netns, v4: &str, v6: &str) -> Pod {
        let ns = Netns::new("npp");
        let host_if = unique("nph");
        let (nn, pn) = (&node.name, &ns.name);
        ip(
            nn,
            &format!("link add {host_if} type veth peer name eth0 netns {pn}"),
        );
        ip(nn, &format!("addr add 169.254.1.1/32 dev {host_if}"));
        ip(nn, &format!("addr add fe80::1/64 dev {host_if} nodad"));
        ip(nn, &format!("link set {host_if} up"));
        ip(pn, &format!("addr add {v4}/32 dev eth0"));
        ip(pn, &format!("addr add {v6}/128 dev eth0 nodad"));
        ip(pn, "link set eth0 up");
        ip(pn, "route add 169.254.1.1 dev eth0 scope link");
        ip(pn, "route add default via 169.254.1.1 dev eth0");
        ip(pn, "-6 route add default via fe80::1 dev eth0");
        ip(nn, &format!("route add {v4}/32 dev {host_if}"));
        ip(nn, &format!("-6 route add {v6}/128 dev {host_if}"));
        Pod {
            ns,
            host_if,
            v4: v4.parse().expect("pod IPv4 address"),
            v6: v6.parse().expect("pod IPv6 address"),
        }
    }

    /// One kube-proxy (iptables mode) Service rule: `frontend:port` of
    /// `proto` ("tcp", "udp") translated to `backend:target`.
    #[derive(Clone, Debug)]
    pub struct Dnat {
        pub frontend: IpAddr,
        pub port: u16,
        pub proto: &'static str,
        pub backend: IpAddr,
        pub target: u16,
    }

    /// Writes the node's nat tables as kube-proxy does: a services chain
    /// jumped to from PREROUTING (pods) and OUTPUT (the node), one DNAT
    /// per frontend, and the hairpin masquerade of each backend.
    pub fn kube_proxy(node: &Netns, rules: &[Dnat]) {
        for (tool, v4) in [("iptables-restore", true), ("ip6tables-restore", false)] {
            let mut r = String::from(
                "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                 :POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
                 -A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n",
            );
            let mut backends = Vec::new();
            for d in rules.iter().filter(|d| d.frontend.is_ipv4() == v4) {
                let to = SocketAddr::new(d.backend, d.target);
                r.push_str(&format!(
                    "-A KUBE-SERVICES -d {f} -p {p} -m {p} --dport {port} -j DNAT \
                     --to-destination {to}\n",
                    f = d.frontend,
                    p = d.proto,
                    port = d.port,
                ));
                if !backends.contains(&d.backend) {
                    backends.push(d.backend);
                }
            }
            let len = if v4 { 32 } else { 128 };
            for b in backends {
                r.push_str(&format!(
                    "-A POSTROUTING -s {b}/{len} -d {b}/{len} -j MASQUERADE\n"
                ));
            }
            r.push_str("COMMIT\n");
            let mut child = Command::new("ip")
                .args(["netns", "exec", &node.name, tool, "-w"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("running {tool}: {e}"));
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(r.as_bytes())
                .expect("writing rules");
            let out = child.wait_with_output().expect("waiting for the rules");
            assert!(
                out.status.success(),
                "{tool} failed: {}\n{r}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Runs `f` on a thread inside `ns` (which the caller may keep using).
    fn inside<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from("/var/run/netns").join(&ns.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path)
                .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("entering {}: {e}", path.display()));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// TCP (every line of a connection) and UDP echo servers on `port` of
    /// every address of the pod, for as long as the test runs.
    pub fn echo(pod: &Pod, port: u16) {
        echo_at(&pod.ns, &pod.addresses(), port);
    }

    /// [`echo`] on chosen addresses of a namespace (a node's own sockets).
    pub fn echo_at(ns: &Netns, addresses: &[IpAddr], port: u16) {
        for &ip in addresses {
            let (tcp, udp) = inside(ns, move || {
                let at = SocketAddr::new(ip, port);
                (
                    TcpListener::bind(at).expect("tcp bind"),
                    UdpSocket::bind(at).expect("udp bind"),
                )
            });
            std::thread::spawn(move || {
                for s in tcp.incoming().flatten() {
                    std::thread::spawn(move || {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                        super::echo::lines(&s);
                    });
                }
            });
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(&buf[..n], from);
                }
            });
        }
    }

    /// Transport of a probe.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Proto {
        Tcp,
        Udp,
    }

    /// One exchange with an echo server from the calling thread's netns.
    pub fn echoes(proto: Proto, dst: SocketAddr, timeout: Duration) -> bool {
        const LINE: &[u8] = b"netpol-probe\n";
        match proto {
            Proto::Tcp => {
                let Ok(s) = TcpStream::connect_timeout(&dst, timeout) else {
                    return false;
                };
                let _ = s.set_read_timeout(Some(timeout));
                if (&s).write_all(LINE).is_err() {
                    return false;
                }
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).is_ok() && line.as_bytes() == LINE
            }
            Proto::Udp => {
                let any: SocketAddr = if dst.is_ipv4() {
                    "0.0.0.0:0".parse().expect("literal")
                } else {
                    "[::]:0".parse().expect("literal")
                };
                let Ok(s) = UdpSocket::bind(any) else {
                    return false;
                };
                if s.connect(dst).is_err()
                    || s.set_read_timeout(Some(timeout)).is_err()
                    || s.send(LINE).is_err()
                {
                    return false;
                }
                let mut buf = [0u8; 64];
                matches!(s.recv(&mut buf), Ok(n) if &buf[..n] == LINE)
            }
        }
    }

    /// A probe: what it tries (from the thread's netns, with a timeout),
    /// whether it must succeed, and how to name it.
    pub struct Case {
        pub what: String,
        pub from: String,
        pub want: bool,
        pub run: Box<dyn Fn(Duration) -> bool + Send + Sync>,
    }

    impl Case {
        pub fn new(
            what: impl Into<String>,
            from: &Netns,
            want: bool,
            run: impl Fn(Duration) -> bool + Send + Sync + 'static,
        ) -> Self {
            Self {
                what: what.into(),
                from: from.name.clone(),
                want,
                run: Box::new(run),
            }
        }

        /// An echo exchange from `from` with `dst`.
        pub fn echo(from: &Netns, proto: Proto, dst: SocketAddr, want: bool) -> Self {
            Self::new(format!("{proto:?} {dst}"), from, want, move |t| {
                echoes(proto, dst, t)
            })
        }
    }

    /// Runs every case in parallel, each inside its client's netns; a case
    /// that must fail gets [`FAST`], one that must succeed a retry of
    /// [`SLOW`]. Returns one line per case that differs.
    pub fn differing(cases: Vec<Case>) -> Vec<String> {
        let handles: Vec<_> = cases
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let path = PathBuf::from("/var/run/netns").join(&c.from);
                    let entered = std::fs::File::open(&path).is_ok_and(|f| {
                        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).is_ok()
                    });
                    let got = entered && ((c.run)(FAST) || (c.want && (c.run)(SLOW)));
                    (got != c.want).then(|| {
                        format!(
                            "{}: expected {}, got {}",
                            c.what,
                            if c.want { "success" } else { "failure" },
                            if got { "success" } else { "failure" }
                        )
                    })
                })
            })
            .collect();
        let mut out: Vec<String> = handles
            .into_iter()
            .filter_map(|h| h.join().expect("probe thread"))
            .collect();
        out.sort();
        out
    }

    /// Asserts that every case behaves as wanted, naming those that do not.
    pub fn expect(step: &str, cases: Vec<Case>) {
        let bad = differing(cases);
        assert!(bad.is_empty(), "{step}:\n  {}", bad.join("\n  "));
    }

    /// A TCP connection opened from inside `from`.
    pub fn connect(from: &Netns, dst: SocketAddr) -> TcpStream {
        inside(from, move || {
            TcpStream::connect_timeout(&dst, SLOW)
                .unwrap_or_else(|e| panic!("connecting to {dst}: {e}"))
        })
    }
}
