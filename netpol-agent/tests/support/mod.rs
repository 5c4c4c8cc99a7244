//! Helpers for the privileged tests: root check, RAII network namespaces and
//! bpffs mounts, running code inside a namespace.
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
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
        netpol_agent::bpffs::ensure_mounted(&root).expect("mounting bpffs");
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
        Agent, AgentError, Counters, Source, Status, StatusHandle, fingerprint,
        model::{Snapshot, manifests::load_dir},
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
            let mut s = Snapshot::default();
            load_dir(&self.0, &mut s).expect("loading the manifests");
            fingerprint(&s)
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
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<Result<(), AgentError>>>,
        rt: tokio::runtime::Runtime,
    }

    impl Running {
        pub fn start(node: &Netns, bpffs: &Path, manifests: &Manifests) -> Self {
            let agent = Agent::builder()
                .source(Source::Files(manifests.0.clone()))
                .node_name("n1")
                .bpffs(bpffs)
                .interfaces("nph*")
                .listen(Some("127.0.0.1:0".parse().expect("address")))
                .build()
                .expect("agent settings");
            let status = agent.status();
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
                stop: Some(tx),
                thread: Some(thread),
                rt,
            }
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
    ) -> Option<&'a netpol_agent::telemetry::InterfaceStatus> {
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
