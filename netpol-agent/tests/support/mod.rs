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
