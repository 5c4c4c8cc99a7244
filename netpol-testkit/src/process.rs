//! The `netpol-agent` binary: `run --manifests` inside a node namespace,
//! read through its HTTP port and its pinned counters; and the turns that
//! keep agents of different tests from judging each other's packets.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Condvar, Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::{
    manifests::Manifests,
    netns::{Netns, setns, unique},
};

/// Where the agent listens, inside its node namespace.
pub const LISTEN: &str = "127.0.0.1:9101";
/// How long the agent may take to start and enforce a folder.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// One HTTP GET of `path` on `listen` inside the namespace `node`;
/// `None` while nothing answers.
pub fn get_in(node: &str, listen: &str, path: &str) -> Option<String> {
    let ns = Netns::path_of(node);
    let (listen, path) = (listen.to_owned(), path.to_owned());
    std::thread::spawn(move || {
        setns(&ns).ok()?;
        let addr: SocketAddr = listen.parse().ok()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
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

/// Whether `/status` (`status`) reports the pod interface `name` bound
/// and programmed.
#[must_use]
pub fn programmed(status: &serde_json::Value, name: &str) -> bool {
    status["interfaces"].as_array().is_some_and(|l| {
        l.iter()
            .any(|i| i["name"] == name && i["programmed"] == true)
    })
}

/// `(resident bytes, CPU seconds)` of process `pid`, from `/proc`.
#[must_use]
pub fn usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 14th and 15th of the line, the 12th and 13th after `) `.
    let after = stat.rsplit_once(") ").map(|(_, s)| s).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    #[expect(clippy::cast_precision_loss, reason = "tick counts are small")]
    let cpu = (ticks(11) + ticks(12)) as f64 / hz as f64;
    (rss_kib * 1024, cpu)
}

/// `netpol-agent run --manifests` inside a node namespace; SIGTERM on
/// drop (SIGKILL if it does not stop within five seconds).
pub struct AgentProcess {
    child: Child,
    /// The binary (`env!("CARGO_BIN_EXE_netpol-agent")` in the agent's
    /// tests).
    binary: PathBuf,
    node: String,
    pub bpffs: PathBuf,
    pub log: PathBuf,
    /// Its state folder (`run --state-dir`): the one `extra` names, else
    /// a fresh one, removed with the process.
    pub state_dir: PathBuf,
}

impl AgentProcess {
    /// Starts the agent `binary` for `node_name` with pod interfaces
    /// `nph*`; `extra` goes after `run`'s own arguments.
    pub fn start(
        binary: &Path,
        node: &Netns,
        bpffs: &Path,
        manifests: &Manifests,
        node_name: &str,
        extra: &[&str],
    ) -> Self {
        let log = std::env::temp_dir().join(unique("netpol-svc-agent-"));
        let file = std::fs::File::create(&log).expect("agent log");
        // Each agent its own state file, not the node's /run/netpol.
        let given = extra
            .iter()
            .position(|a| *a == "--state-dir")
            .and_then(|i| extra.get(i + 1));
        let state_dir = given.map_or_else(
            || std::env::temp_dir().join(unique("netpol-state-")),
            PathBuf::from,
        );
        // `ip netns exec` gives the agent a mount namespace of its own,
        // a copy of ours: the bpffs is mounted before.
        let child = Command::new("ip")
            .args(["netns", "exec", &node.name])
            .arg(binary)
            .arg("--bpffs")
            .arg(bpffs)
            .args(["run", "--manifests"])
            .arg(&manifests.0)
            .args(["--node", node_name, "--interfaces", "nph*"])
            .args(["--listen", LISTEN])
            .args(if given.is_some() {
                Vec::new()
            } else {
                vec!["--state-dir".to_owned(), state_dir.display().to_string()]
            })
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(file.try_clone().expect("log")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("starting netpol-agent run");
        Self {
            child,
            binary: binary.to_owned(),
            node: node.name.clone(),
            bpffs: bpffs.to_owned(),
            log,
            state_dir,
        }
    }

    /// The command line tools on this agent's maps and state folder.
    pub fn cli(&self) -> Cli {
        Cli {
            binary: self.binary.clone(),
            bpffs: self.bpffs.clone(),
            state_dir: self.state_dir.clone(),
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One HTTP GET on the agent's port; `None` while it does not
    /// answer.
    pub fn get(&self, path: &str) -> Option<String> {
        get_in(&self.node, LISTEN, path)
    }

    /// `/status`, parsed; `None` while the agent does not answer.
    pub fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.get("/status")?).ok()
    }

    /// `netpol-agent fingerprint --manifests <folder>`: what `/status`
    /// reports once the agent enforces the folder.
    pub fn fingerprint(&self, manifests: &Manifests) -> String {
        let out = Command::new(&self.binary)
            .args(["fingerprint", "--manifests"])
            .arg(&manifests.0)
            .output()
            .expect("running netpol-agent fingerprint");
        assert!(
            out.status.success(),
            "netpol-agent fingerprint: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until the agent enforces exactly what `manifests` holds,
    /// with each of `interfaces` bound and programmed.
    pub fn wait_enforced(
        &mut self,
        manifests: &Manifests,
        interfaces: &[&str],
    ) -> serde_json::Value {
        let fp = self.fingerprint(manifests);
        let deadline = Instant::now() + DEADLINE;
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("netpol-agent exited ({st}); its log:\n{}", self.log());
            }
            if let Some(s) = self.status() {
                if s["fingerprint"].as_str() == Some(fp.as_str())
                    && s["last_error"].is_null()
                    && interfaces.iter().all(|i| programmed(&s, i))
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
        let out = Command::new(&self.binary)
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
        let c = netpol_agent::Counters::read_pinned(&self.bpffs.join("netpol")).expect("counters");
        c.entries
            .iter()
            .filter(|e| e.reason == reason && e.direction == direction)
            .map(|e| e.value.packets)
            .sum()
    }
}

/// `netpol-agent` run on an agent's maps and state folder (`inspect`,
/// `explain`, `diff`), apart from the process (which waits take `&mut`).
pub struct Cli {
    binary: PathBuf,
    bpffs: PathBuf,
    state_dir: PathBuf,
}

impl Cli {
    /// `netpol-agent --bpffs <bpffs> ARGS --state-dir <state folder>`.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.binary)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .unwrap_or_else(|e| panic!("netpol-agent {args:?}: {e}"))
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
                let _ = std::fs::remove_dir_all(&self.state_dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Turns of the tests of one binary that run agents with Services.
/// `to_host` sits on the root cgroup, where every agent's copy sees every
/// locally delivered packet, and judges a marked one when the packet
/// came in through an interface of its own pods with one of their
/// addresses as source: two worlds alike down to their interface indexes
/// and pod addresses judge each other's Service packets. The worlds of
/// one group (one file of tests, built alike or for that) may run side by
/// side; groups take turns, as when each file was a test binary of its
/// own.
pub struct Turn {
    group: &'static str,
}

/// The group holding the turn, and how many of its tests hold it.
static TURN: Mutex<(Option<&'static str>, usize)> = Mutex::new((None, 0));
static TURN_FREED: Condvar = Condvar::new();

impl Turn {
    /// Waits until no test of another group holds the turn.
    pub fn take(group: &'static str) -> Self {
        let mut t = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        while t.0.is_some_and(|g| g != group) {
            t = TURN_FREED.wait(t).unwrap_or_else(PoisonError::into_inner);
        }
        *t = (Some(group), t.1 + 1);
        Self { group }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut t = TURN.lock().unwrap_or_else(PoisonError::into_inner);
        debug_assert_eq!(t.0, Some(self.group));
        t.1 -= 1;
        if t.1 == 0 {
            t.0 = None;
            TURN_FREED.notify_all();
        }
    }
}

/// What a node test of the agent binary starts from: its turn, a routed
/// dual-stack node namespace, a private bpffs, and dual-stack calico-style
/// pods at 10.244.1.2, .3, ... and fd00:1::2, ::3, ...
pub struct NodeBed {
    /// Held for the test's length.
    pub turn: Turn,
    pub node: Netns,
    pub bpffs: crate::datapath::TempBpffs,
    pub pods: Vec<crate::topology::Pod>,
}

impl NodeBed {
    /// `pods` pods for a test of `group`; `None` (nothing to run) when
    /// privileged tests are skipped.
    pub fn routed(group: &'static str, pods: u8) -> Option<Self> {
        use crate::topology::{Topology, calico_pod, node};
        if !crate::privileged() {
            return None;
        }
        let turn = Turn::take(group);
        let node = node(Topology::Routed, true);
        let bpffs = crate::datapath::TempBpffs::new();
        let pods = (2..2 + pods)
            .map(|i| calico_pod(&node, &format!("10.244.1.{i}"), &format!("fd00:1::{i}")))
            .collect();
        Some(Self {
            turn,
            node,
            bpffs,
            pods,
        })
    }
}
