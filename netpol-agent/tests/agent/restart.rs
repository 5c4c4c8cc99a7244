//! Restart without disruption (issue 7), on both attach paths: the
//! `netpol-agent` binary runs in a node namespace; a TCP stream between two
//! pods and a pair the policy denies are kept under test across SIGTERM +
//! restart and `kill -9` + restart. The stream is never reset, the denied
//! pair never gets through. Then `netpol-agent cleanup` leaves no trace.
//!
//! Every wait polls the agent's `/status` (or the probes' counters) with a
//! deadline, never a sleep.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use netpol_agent::Counters;
use netpol_common::{family, reason};
use netpol_testkit::{
    Netns,
    datapath::TempBpffs,
    fake_apiserver,
    manifests::{BASE, Manifests, pod_manifest},
    privileged, sh,
    topology::{Pod, Topology, node, pod},
    unique,
};

const DEADLINE: Duration = Duration::from_secs(15);
const LISTEN: &str = "127.0.0.1:9101";
const PORT: u16 = 8080;

/// `a` admits only `b`.
const ONLY_B_TO_A: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-only-from-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}]}]
"#;

/// Where an agent reads the cluster from: the manifests folder, or the
/// same objects served by a fake API server in the node's namespace
/// ([`KubeFeed`], brought up to date by [`Feed::sync`]).
#[derive(Clone, Copy)]
enum Feed<'a> {
    Files(&'a Manifests),
    Kube(&'a Manifests, &'a KubeFeed),
}

impl<'a> From<&'a Manifests> for Feed<'a> {
    fn from(m: &'a Manifests) -> Self {
        Feed::Files(m)
    }
}

impl Feed<'_> {
    /// `run`'s arguments for the source.
    fn args(&self) -> Vec<std::ffi::OsString> {
        match self {
            Feed::Files(m) => vec!["--manifests".into(), m.0.clone().into()],
            Feed::Kube(..) => vec!["--node".into(), "n1".into()],
        }
    }

    fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        match self {
            Feed::Files(_) => Vec::new(),
            Feed::Kube(_, k) => vec![("KUBECONFIG", k.kubeconfig.clone().into())],
        }
    }

    /// Serves the folder's objects (the API server's view of it).
    fn sync(&self) {
        if let Feed::Kube(m, k) = self {
            k.sync(m);
        }
    }

    /// What the agent reports once it enforces the folder.
    fn fingerprint(&self) -> String {
        match self {
            Feed::Files(m) => m.fingerprint(),
            Feed::Kube(_, k) => {
                let mut snap = netpol_agent::model::Snapshot::default();
                let mut report = netpol_agent::model::manifests::LoadReport::default();
                for obj in k.fake.objects() {
                    netpol_agent::model::manifests::apply_value(
                        &mut snap,
                        obj,
                        "fake",
                        &mut report,
                    );
                }
                netpol_agent::sources::fingerprint(&snap)
            }
        }
    }
}

/// A fake API server listening in a node's namespace, and a kubeconfig
/// naming it.
struct KubeFeed {
    fake: fake_apiserver::FakeApiServer,
    kubeconfig: PathBuf,
    /// What it serves: `(kind, namespace, name)` → the object's JSON.
    served: Mutex<std::collections::BTreeMap<(String, String, String), String>>,
    _rt: tokio::runtime::Runtime,
}

impl KubeFeed {
    fn start(node: &Netns) -> Self {
        let (rt, fake) = node
            .spawn(|| {
                let rt = tokio::runtime::Runtime::new().expect("runtime");
                let fake = rt.block_on(fake_apiserver::FakeApiServer::start());
                (rt, fake)
            })
            .join()
            .expect("starting the fake API server");
        let kubeconfig = fake.kubeconfig();
        Self {
            fake,
            kubeconfig,
            served: Mutex::default(),
            _rt: rt,
        }
    }

    /// Serves every document of the folder's files: changed objects are
    /// applied (pods with a uid of their name, so that re-serving one does
    /// not make it another pod), removed ones deleted.
    fn sync(&self, m: &Manifests) {
        use serde::Deserialize as _;
        let mut now = std::collections::BTreeMap::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&m.0)
            .expect("manifests")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).expect("manifest");
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let mut v = serde_json::Value::deserialize(doc).expect("a YAML document");
                if v.is_null() {
                    continue;
                }
                let s = |p: &str| {
                    v.pointer(p)
                        .and_then(|x| x.as_str())
                        .unwrap_or_default()
                        .to_owned()
                };
                let key = (s("/kind"), s("/metadata/namespace"), s("/metadata/name"));
                if key.0 == "Pod" && v.pointer("/metadata/uid").is_none() {
                    v["metadata"]["uid"] = serde_json::json!(format!("uid-{}-{}", key.1, key.2));
                }
                now.insert(key, v);
            }
        }
        let mut served = self.served.lock().expect("served");
        let changed: Vec<serde_json::Value> = now
            .iter()
            .filter(|(k, v)| served.get(*k) != Some(&v.to_string()))
            .map(|(_, v)| v.clone())
            .collect();
        self.fake.apply_all(changed);
        for (kind, ns, name) in served.keys() {
            if !now.contains_key(&(kind.clone(), ns.clone(), name.clone())) {
                self.fake.delete(kind, ns, name);
            }
        }
        *served = now.into_iter().map(|(k, v)| (k, v.to_string())).collect();
    }
}

impl Drop for KubeFeed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// Two tests of one scenario: `$files` with the agent on the manifests
/// folder, `$kube` on the same objects served by a fake API server.
macro_rules! on_both_sources {
    ($files:ident, $kube:ident, $scenario:ident) => {
        #[test]
        fn $files() {
            if privileged() {
                $scenario(false);
            }
        }

        #[test]
        fn $kube() {
            if privileged() {
                $scenario(true);
            }
        }
    };
}

/// The agent binary, running in the node namespace.
struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    fn start<'a>(
        node: &Netns,
        bpffs: &Path,
        feed: impl Into<Feed<'a>>,
        mode: &str,
        log: &Path,
    ) -> Self {
        Self::start_with(node, bpffs, feed, mode, log, &[])
    }

    /// [`Self::start`] with more `run` arguments.
    fn start_with<'a>(
        node: &Netns,
        bpffs: &Path,
        feed: impl Into<Feed<'a>>,
        mode: &str,
        log: &Path,
        extra: &[&str],
    ) -> Self {
        let feed = feed.into();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("agent log");
        let child = Command::new("ip")
            .args(["netns", "exec", &node.name])
            .arg(env!("CARGO_BIN_EXE_netpol-agent"))
            .arg("--bpffs")
            .arg(bpffs)
            .arg("run")
            .args(feed.args())
            .envs(feed.env())
            .args([
                "--interfaces",
                "nph*",
                "--listen",
                LISTEN,
                "--attach-mode",
                mode,
                "--state-dir",
            ])
            .arg(bpffs.with_extension("state"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("starting netpol-agent");
        Self {
            child,
            log: log.to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/status` reports the folder's fingerprint and every
    /// interface bound and programmed.
    fn wait_enforced<'a>(&mut self, node: &Netns, feed: impl Into<Feed<'a>>, pods: &[&Pod]) {
        let fp = feed.into().fingerprint();
        let deadline = Instant::now() + DEADLINE;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent exited ({status}); log:\n{}", self.log());
            }
            if let Some(body) = status(node) {
                let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let programmed = |name: &str| {
                    json["interfaces"].as_array().is_some_and(|a| {
                        a.iter().any(|i| {
                            i["name"] == name && i["programmed"] == true && !i["pod"].is_null()
                        })
                    })
                };
                if json["fingerprint"] == fp.as_str()
                    && json["last_error"].is_null()
                    && pods.iter().all(|p| programmed(&p.host_if))
                {
                    return;
                }
                last = body;
            }
            std::thread::yield_now();
        }
        panic!(
            "agent not enforcing {fp} in time; status: {last}\nlog:\n{}",
            self.log()
        );
    }

    /// Sends `sig` (`TERM`, `KILL`) and waits for the exit.
    fn signal(&mut self, sig: &str) {
        sh("kill", &[&format!("-{sig}"), &self.child.id().to_string()]);
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::yield_now();
        }
        panic!("agent did not exit on {sig}; log:\n{}", self.log());
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET /status` on the agent, `None` while it does not answer.
fn status(node: &Netns) -> Option<String> {
    node.run(|| {
        let addr: SocketAddr = LISTEN.parse().ok()?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "GET /status HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.split("\r\n\r\n").nth(1).map(str::to_owned)
    })
}

/// Traffic kept under test: one TCP stream b → a exchanging a message
/// every few milliseconds, and probes c → a that must never connect.
struct Probes {
    stop: Arc<AtomicBool>,
    round_trips: Arc<AtomicU64>,
    /// The slowest round trip, in microseconds: a drop (a window in which
    /// the pair is not admitted) shows as a TCP retransmission, ≥ 200 ms.
    slowest: Arc<AtomicU64>,
    pin_dir: PathBuf,
    /// IPv4 drops when the probes started.
    ipv4_drops: u64,
    stream_error: Arc<Mutex<Option<String>>>,
    breaches: Arc<AtomicU64>,
    attempts: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Probes {
    fn start(a: &Pod, b: &Pod, c: &Pod, pin_dir: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let round_trips = Arc::new(AtomicU64::new(0));
        let slowest = Arc::new(AtomicU64::new(0));
        let stream_error = Arc::new(Mutex::new(None));
        let breaches = Arc::new(AtomicU64::new(0));
        let attempts = Arc::new(AtomicU64::new(0));
        let server = SocketAddr::new(a.v4, PORT);
        // The denied pair over IPv6, so that the stream's (IPv4) drop
        // counters say whether netpol dropped any of its segments.
        let denied = SocketAddr::new(a.v6.expect("IPv6"), PORT);
        let mut threads = Vec::new();

        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        threads.push(a.ns.spawn(move || {
            let l = TcpListener::bind(("::", PORT)).expect("listening in a");
            ready_tx.send(()).expect("ready");
            // The stream's connection; a denied probe that got through
            // would be accepted after it and is never served.
            let Ok((mut s, _)) = l.accept() else { return };
            let mut buf = [0u8; 8];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    return;
                }
            }
        }));
        ready_rx.recv().expect("server ready");

        {
            let (stop, round_trips, stream_error, slowest) = (
                stop.clone(),
                round_trips.clone(),
                stream_error.clone(),
                slowest.clone(),
            );
            threads.push(b.ns.spawn(move || {
                let fail = |e: String| {
                    *stream_error.lock().expect("lock") = Some(e);
                };
                let mut s = match TcpStream::connect_timeout(&server, Duration::from_secs(2)) {
                    Ok(s) => s,
                    Err(e) => return fail(format!("connect: {e}")),
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let msg = n.to_be_bytes();
                    let mut back = [0u8; 8];
                    let sent = Instant::now();
                    if let Err(e) = s.write_all(&msg).and_then(|()| s.read_exact(&mut back)) {
                        return fail(format!("round trip {n}: {e}"));
                    }
                    if back != msg {
                        return fail(format!("round trip {n}: echoed {back:?}"));
                    }
                    let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                    slowest.fetch_max(micros, Ordering::Relaxed);
                    round_trips.fetch_add(1, Ordering::Relaxed);
                    // Pace the stream; not a wait for state.
                    std::thread::sleep(Duration::from_millis(2));
                }
            }));
        }

        // Many short probes, so that a short window is likely to be hit.
        for _ in 0..8 {
            let (stop, breaches, attempts) = (stop.clone(), breaches.clone(), attempts.clone());
            threads.push(c.ns.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if TcpStream::connect_timeout(&denied, Duration::from_millis(20)).is_ok() {
                        breaches.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        Self {
            stop,
            round_trips,
            slowest,
            ipv4_drops: ipv4_drops(pin_dir),
            pin_dir: pin_dir.to_owned(),
            stream_error,
            breaches,
            attempts,
            threads,
        }
    }

    /// Waits until the stream made `n` more round trips and the probes `n`
    /// more attempts, failing on the first violation.
    fn progress(&self, n: u64, what: &str) {
        let (rt, at) = (
            self.round_trips.load(Ordering::Relaxed),
            self.attempts.load(Ordering::Relaxed),
        );
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.check(what);
            if self.round_trips.load(Ordering::Relaxed) >= rt + n
                && self.attempts.load(Ordering::Relaxed) >= at + n / 10
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no progress (round trips {}, attempts {})",
                self.round_trips.load(Ordering::Relaxed),
                self.attempts.load(Ordering::Relaxed)
            );
            std::thread::yield_now();
        }
    }

    /// The counters map is being replaced by a fresh one.
    fn fresh_counters(&mut self) {
        self.ipv4_drops = 0;
    }

    fn check(&self, what: &str) {
        if let Some(e) = self.stream_error.lock().expect("lock").clone() {
            panic!("{what}: the stream broke: {e}");
        }
        assert_eq!(
            self.breaches.load(Ordering::Relaxed),
            0,
            "{what}: the denied pair got through"
        );
        // Whether netpol dropped a segment of the stream: its family's
        // drop counters (a retransmission may also come from scheduling on
        // a busy node, so the stall alone says nothing).
        let drops = ipv4_drops(&self.pin_dir);
        assert_eq!(
            drops,
            self.ipv4_drops,
            "{what}: netpol dropped IPv4 packets (the stream's): {:?}",
            Counters::read_pinned(&self.pin_dir).map(|c| c.entries)
        );
    }

    fn stop(mut self, what: &str) {
        self.check(what);
        eprintln!(
            "slowest round trip: {:?}",
            Duration::from_micros(self.slowest.load(Ordering::Relaxed))
        );
        self.stop.store(true, Ordering::Relaxed);
        // The server thread ends when the stream's client closes.
        for t in self.threads.drain(..) {
            t.join().expect("probe thread");
        }
    }
}

/// Packets netpol dropped in IPv4, both directions, all reasons.
fn ipv4_drops(pin_dir: &Path) -> u64 {
    Counters::read_pinned(pin_dir)
        .map(|c| {
            c.entries
                .iter()
                .filter(|e| e.family == family::IPV4 && e.reason >= reason::FIRST_DROP)
                .map(|e| e.value.packets)
                .sum()
        })
        .unwrap_or(0)
}

/// netpol's programs on `dev`: TCX programs (queried through the kernel:
/// this bpftool predates TCX) and the clsact filters `bpftool net show`
/// lists.
fn netpol_attachments(node: &Netns, dev: &str) -> Vec<String> {
    let mut found: Vec<String> = node.run(|| {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .flat_map(|hook| {
                SchedClassifier::query_tcx(dev, hook)
                    .map(|(_, progs)| progs)
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |p| format!("tcx {hook:?} {}", p.name_as_str().unwrap_or("?")))
            })
            .collect()
    });
    found.extend(
        node.exec("bpftool", &["net", "show", "dev", dev])
            .lines()
            .map(str::to_owned),
    );
    found.retain(|l| l.contains("from_pod") || l.contains("to_pod"));
    found
}

/// `tc filter show dev` on both clsact hooks.
fn tc_filters(node: &Netns, dev: &str) -> String {
    ["ingress", "egress"]
        .iter()
        .map(|hook| node.exec("tc", &["filter", "show", "dev", dev, hook]))
        .collect()
}

/// A routed node with pods a (server), b (admitted) and c (denied), and
/// the manifests saying so.
struct Scene {
    /// The folder served by a fake API server, for agents on the kube
    /// source ([`Scene::feed`]).
    kube: Option<KubeFeed>,
    node: Netns,
    bpffs: TempBpffs,
    m: Manifests,
    a: Pod,
    b: Pod,
    c: Pod,
    log: PathBuf,
}

impl Scene {
    fn new(mode: &str) -> Self {
        Self::with_feed(mode, false)
    }

    /// With `kube`, the folder is also served by a fake API server.
    fn with_feed(mode: &str, kube: bool) -> Self {
        let node = node(Topology::Routed, true);
        let bpffs = TempBpffs::new();
        let m = Manifests::new();
        m.write("00-base.yaml", BASE);
        let a = pod(&node, Topology::Routed, 2, true);
        let b = pod(&node, Topology::Routed, 3, true);
        let c = pod(&node, Topology::Routed, 4, true);
        // A clsact netpol did not add: cleanup must leave it.
        if mode == "netlink" {
            node.exec("tc", &["qdisc", "add", "dev", &a.host_if, "clsact"]);
        }
        for (name, p) in [("a", &a), ("b", &b), ("c", &c)] {
            m.write(&format!("{name}.yaml"), &pod_manifest(name, p));
        }
        m.write("policy.yaml", ONLY_B_TO_A);
        let log = std::env::temp_dir().join(format!("{}.log", unique("netpol-restart-")));
        let kube = kube.then(|| KubeFeed::start(&node));
        let scene = Self {
            kube,
            node,
            bpffs,
            m,
            a,
            b,
            c,
            log,
        };
        scene.feed().sync();
        scene
    }

    /// Where its agents read the cluster from.
    fn feed(&self) -> Feed<'_> {
        match &self.kube {
            Some(k) => Feed::Kube(&self.m, k),
            None => Feed::Files(&self.m),
        }
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

fn restart_keeps_enforcing(mode: &str) {
    let scene = Scene::new(mode);
    let Scene {
        node,
        bpffs,
        m,
        a,
        b,
        c,
        log,
        ..
    } = &scene;
    let pods = [a, b, c];

    let mut agent = AgentProcess::start(node, bpffs.path(), m, mode, log);
    agent.wait_enforced(node, m, &pods);
    let probes = Probes::start(a, b, c, &bpffs.path().join("netpol"));
    probes.progress(50, "first agent");

    for (sig, what) in [("TERM", "SIGTERM"), ("KILL", "kill -9")] {
        agent.signal(sig);
        probes.progress(50, &format!("no agent after {what}"));
        for p in pods {
            assert_eq!(
                netpol_attachments(node, &p.host_if).len(),
                2,
                "after {what}, {} keeps both programs",
                p.host_if
            );
        }
        drop(agent);
        agent = AgentProcess::start(node, bpffs.path(), m, mode, log);
        agent.wait_enforced(node, m, &pods);
        probes.progress(50, &format!("agent restarted after {what}"));
        for p in pods {
            let found = netpol_attachments(node, &p.host_if);
            assert_eq!(
                found.len(),
                2,
                "restarted after {what}, {} carries each program once: {found:#?}",
                p.host_if
            );
        }
    }
    let text = agent.log();
    assert_eq!(
        text.matches("adopted the attachments").count(),
        2 * pods.len(),
        "each restart adopts every interface; log:\n{text}"
    );

    agent.signal("TERM");
    probes.progress(20, "before cleanup");
    probes.stop("before cleanup");

    let out = sh(
        "ip",
        &[
            "netns",
            "exec",
            &node.name,
            env!("CARGO_BIN_EXE_netpol-agent"),
            "--bpffs",
            &bpffs.path().to_string_lossy(),
            "cleanup",
        ],
    );
    eprintln!("cleanup: {out}");
    for p in pods {
        assert_eq!(
            netpol_attachments(node, &p.host_if),
            Vec::<String>::new(),
            "{} after cleanup",
            p.host_if
        );
        let filters = tc_filters(node, &p.host_if);
        assert!(
            filters.trim().is_empty(),
            "{} after cleanup: {filters}",
            p.host_if
        );
        let qdiscs = node.exec("tc", &["qdisc", "show", "dev", &p.host_if]);
        // Only the clsact netpol did not add stays.
        assert_eq!(
            qdiscs.contains("clsact"),
            mode == "netlink" && p.host_if == a.host_if,
            "{}: {qdiscs}",
            p.host_if
        );
    }
    assert!(
        !bpffs.path().join("netpol").exists(),
        "cleanup removes the pins"
    );
    // Nothing enforces any more: the denied pair connects.
    let server = SocketAddr::new(a.v4, PORT);
    let server_up =
        a.ns.spawn(|| TcpListener::bind(("0.0.0.0", PORT)).map(|l| l.accept()));
    let connected = c.ns.run(|| {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&server, Duration::from_millis(200)).is_ok() {
                return true;
            }
        }
        false
    });
    assert!(connected, "after cleanup nothing drops c → a");
    let _ = server_up.join();
}

#[test]
fn tcx_restart_after_sigterm_and_kill_keeps_stream_and_denial_then_cleanup_leaves_no_trace() {
    if !privileged() {
        return;
    }
    restart_keeps_enforcing("tcx");
}

#[test]
fn netlink_restart_after_sigterm_and_kill_keeps_stream_and_denial_then_cleanup_leaves_no_trace() {
    if !privileged() {
        return;
    }
    restart_keeps_enforcing("netlink");
}

/// Pinned maps of another layout (the record rewritten to 0 while no agent
/// runs): the new agent fills fresh maps while the old programs keep
/// enforcing, swaps its programs in, removes the old maps and says so.
fn another_layout_is_replaced_without_a_window(mode: &str) {
    let scene = Scene::new(mode);
    let (node, bpffs, m) = (&scene.node, &scene.bpffs, &scene.m);
    let pods = [&scene.a, &scene.b, &scene.c];
    let mut agent = AgentProcess::start(node, bpffs.path(), m, mode, &scene.log);
    agent.wait_enforced(node, m, &pods);
    let mut probes = Probes::start(&scene.a, &scene.b, &scene.c, &bpffs.path().join("netpol"));
    probes.progress(50, "first agent");
    agent.signal("TERM");

    let pin_dir = bpffs.path().join("netpol");
    let record = pin_dir.join("layout");
    assert_eq!(
        std::fs::read_link(&record).expect("layout record"),
        PathBuf::from(netpol_common::LAYOUT_VERSION.to_string())
    );
    std::fs::remove_file(&record).expect("removing the record");
    std::os::unix::fs::symlink("0", &record).expect("recording layout 0");
    probes.progress(20, "no agent");

    drop(agent);
    probes.fresh_counters();
    let mut agent = AgentProcess::start(node, bpffs.path(), m, mode, &scene.log);
    agent.wait_enforced(node, m, &pods);
    let said = format!(
        "replaced the pinned maps of layout 0 with layout {}",
        netpol_common::LAYOUT_VERSION
    );
    let deadline = Instant::now() + DEADLINE;
    while !agent.log().contains(&said) {
        probes.check("replacing");
        assert!(
            Instant::now() < deadline,
            "no replacement; log:\n{}",
            agent.log()
        );
        std::thread::yield_now();
    }
    probes.progress(50, "after the replacement");
    assert_eq!(
        std::fs::read_link(&record).expect("layout record"),
        PathBuf::from(netpol_common::LAYOUT_VERSION.to_string())
    );
    assert!(!pin_dir.join("layout-v0").exists(), "old maps removed");
    for p in pods {
        let found = netpol_attachments(node, &p.host_if);
        assert_eq!(found.len(), 2, "{}: {found:#?}", p.host_if);
    }
    agent.signal("TERM");
    probes.stop("after the replacement");
}

#[test]
fn tcx_agent_replaces_maps_of_another_layout_without_a_window() {
    if !privileged() {
        return;
    }
    another_layout_is_replaced_without_a_window("tcx");
}

#[test]
fn netlink_agent_replaces_maps_of_another_layout_without_a_window() {
    if !privileged() {
        return;
    }
    another_layout_is_replaced_without_a_window("netlink");
}

on_both_sources!(
    a_second_agent_refuses_the_pins_of_a_running_one_and_takes_over_once_it_exits,
    kube_a_second_agent_refuses_the_pins_of_a_running_one_and_takes_over_once_it_exits,
    second_agent
);

/// One agent per set of pins (issue 20): a second agent on the same bpffs
/// refuses to start, naming the first, and the first keeps enforcing; a
/// second agent given time takes over once the first exits (a rolling
/// update's handover), with the stream kept and the denied pair denied
/// throughout.
fn second_agent(kube: bool) {
    let scene = Scene::with_feed("netlink", kube);
    let Scene {
        node,
        bpffs,
        a,
        b,
        c,
        log,
        ..
    } = &scene;
    let pods = [a, b, c];
    let feed = scene.feed();
    let mut first = AgentProcess::start(node, bpffs.path(), feed, "netlink", log);
    first.wait_enforced(node, feed, &pods);
    let probes = Probes::start(a, b, c, &bpffs.path().join("netpol"));
    probes.progress(30, "first agent");

    // Bounded: an agent that ran instead of refusing is stopped.
    let refused = Command::new("timeout")
        .args(["30", "ip", "netns", "exec", &node.name])
        .arg(env!("CARGO_BIN_EXE_netpol-agent"))
        .arg("--bpffs")
        .arg(bpffs.path())
        .arg("run")
        .args(feed.args())
        .envs(feed.env())
        .args(["--interfaces", "nph*", "--listen", "127.0.0.1:9102"])
        .args(["--attach-mode", "netlink", "--handover-wait-secs", "1"])
        .arg("--state-dir")
        .arg(bpffs.path().with_extension("second"))
        .output()
        .expect("second agent");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the second agent ran: {err}");
    let first_pid = format!("pid {}", first.child.id());
    assert!(
        err.contains("another netpol agent holds") && err.contains(&first_pid),
        "names the holder ({first_pid}): {err}"
    );
    assert!(
        !err.contains("adopted"),
        "the second agent touched the datapath: {err}"
    );
    probes.progress(30, "after the refused second agent");
    assert!(
        matches!(first.child.try_wait(), Ok(None)),
        "the first agent still runs"
    );
    first.wait_enforced(node, feed, &pods);

    // Handover: the next agent starts while this one still runs.
    let mut next = AgentProcess::start_with(
        node,
        bpffs.path(),
        feed,
        "netlink",
        log,
        &["--handover-wait-secs", "60"],
    );
    // It waits for the first (a loaded machine may take seconds to get
    // it that far; stopping the first before would test no handover).
    let deadline = Instant::now() + DEADLINE;
    while !next.log().contains("waiting for it to exit (handover)") {
        assert!(
            Instant::now() < deadline,
            "the next agent did not wait for the first: {}",
            next.log()
        );
        probes.progress(1, "both agents up, the second starting");
    }
    probes.progress(30, "both agents up, the second waiting");
    assert!(
        matches!(first.child.try_wait(), Ok(None)),
        "the first agent still runs while the next waits"
    );
    first.signal("TERM");
    next.wait_enforced(node, feed, &pods);
    probes.progress(50, "after the handover");
    probes.stop("after the handover");
}

/// A pod without an interface (its entries are compiled all the same).
fn ghost_pod(name: &str, app: &str, n: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: n1, containers: [{{name: c}}]}}\n\
         status: {{phase: Running, podIPs: [{{ip: \"10.0.9.{n}\"}}, {{ip: \"fd00::9:{n}\"}}]}}\n"
    )
}

/// `bulk` admits `count` IPv6 hosts from `fd99:<base>::`: a first apply
/// that takes a while.
fn bulk_policy(base: u32, count: u32) -> String {
    let mut s = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: bulk, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {app: bulk}}\n  ingress:\n  - from:\n",
    );
    for i in 0..count {
        s.push_str(&format!(
            "    - ipBlock: {{cidr: \"fd99:{base:x}::{:x}:{:x}/128\"}}\n",
            i >> 16,
            i & 0xffff
        ));
    }
    s
}

/// Pods labelled `open` admit everyone.
const OPEN: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: open, namespace: x}
spec:
  podSelector: {matchLabels: {app: open}}
  ingress: [{}]
"#;

on_both_sources!(
    a_restart_whose_ids_would_shift_opens_nothing,
    kube_a_restart_whose_ids_would_shift_opens_nothing,
    restart_with_shifting_ids
);

/// Issue 20, item 1: a restart in which ids handed out from scratch would
/// differ from the running ones. The first agent gives `a` (admits only
/// `b`) an id that, counted from scratch, belongs to a pod open to
/// everyone; while it was down a bulk policy changed (a long first apply)
/// and pods came and went. The denied pair c → a never connects while the
/// second agent applies: it keeps a's id and gives new pods ids no live
/// entry carries. (Handing ids out from scratch let c through for the
/// length of the first apply.)
fn restart_with_shifting_ids(kube: bool) {
    let scene = Scene::with_feed("netlink", kube);
    let Scene {
        node,
        bpffs,
        m,
        a,
        b,
        c,
        log,
        ..
    } = &scene;
    let pods = [a, b, c];
    let feed = scene.feed();
    // History: b, bulk, c and two short-lived pods get ids 1..5; then a
    // and the open pods arrive (a: 6), and the short-lived pods go. From
    // scratch, id 6 is o2's, open to everyone.
    std::fs::remove_file(m.0.join("a.yaml")).expect("a.yaml");
    m.write("bulk.yaml", &ghost_pod("bulk", "bulk", 1));
    m.write("bulk-policy.yaml", &bulk_policy(1, 20_000));
    m.write("g1.yaml", &ghost_pod("g1", "ghost", 2));
    m.write("g2.yaml", &ghost_pod("g2", "ghost", 3));
    feed.sync();
    let mut agent = AgentProcess::start(node, bpffs.path(), feed, "netlink", log);
    agent.wait_enforced(node, feed, &[b, c]);
    m.write("a.yaml", &pod_manifest("a", a));
    m.write("open.yaml", OPEN);
    for i in 1..=8 {
        m.write(
            &format!("o{i}.yaml"),
            &ghost_pod(&format!("o{i}"), "open", 10 + i),
        );
    }
    feed.sync();
    agent.wait_enforced(node, feed, &pods);
    for g in ["g1.yaml", "g2.yaml"] {
        std::fs::remove_file(m.0.join(g)).expect("ghost");
    }
    feed.sync();
    agent.wait_enforced(node, feed, &pods);
    // The state file is written after the apply, off the loop.
    let state = bpffs.path().with_extension("state").join("state.json");
    let id_of = |pod: &str| -> Option<u64> {
        let text = std::fs::read_to_string(&state).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        let ghosts_gone = !text.contains("x/g1");
        let id = json["endpoints"]
            .as_array()?
            .iter()
            .find(|e| e["pod"] == pod)?["id"]
            .as_u64();
        id.filter(|_| ghosts_gone)
    };
    let deadline = Instant::now() + DEADLINE;
    while id_of("x/a").is_none() && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(id_of("x/a"), Some(6), "a's id before the restart");

    let probes = Probes::start(a, b, c, &bpffs.path().join("netpol"));
    probes.progress(50, "first agent");
    agent.signal("TERM");
    // While it is down: the bulk policy moves to other hosts, o1 goes and
    // o9 comes.
    m.write("bulk-policy.yaml", &bulk_policy(2, 20_000));
    std::fs::remove_file(m.0.join("o1.yaml")).expect("o1");
    m.write("o9.yaml", &ghost_pod("o9", "open", 19));
    feed.sync();
    probes.progress(20, "no agent");
    drop(agent);
    let mut agent = AgentProcess::start(node, bpffs.path(), feed, "netlink", log);
    agent.wait_enforced(node, feed, &pods);
    probes.progress(50, "second agent");
    let text = agent.log();
    assert!(
        text.contains("resuming from the pinned maps"),
        "the second agent resumes; log:\n{text}"
    );
    agent.signal("TERM");
    probes.stop("after the restart");
}

/// Issue 20, item 3: every pin removed under a running agent (maps, links,
/// records: `rm -r <bpffs>/netpol`). The agent pins them again from the
/// descriptors it holds and says so; a `kill -9` then leaves the programs
/// attached and enforcing, and the next agent adopts them with the maps.
/// (Before, the agent said nothing and the kill detached every TCX link.)
fn lost_pins_are_put_back(mode: &str, kube: bool) {
    let scene = Scene::with_feed(mode, kube);
    let Scene {
        node,
        bpffs,
        a,
        b,
        c,
        log,
        ..
    } = &scene;
    let pods = [a, b, c];
    let feed = scene.feed();
    let pin_dir = bpffs.path().join("netpol");
    let mut agent = AgentProcess::start(node, bpffs.path(), feed, mode, log);
    agent.wait_enforced(node, feed, &pods);
    let probes = Probes::start(a, b, c, &pin_dir);
    probes.progress(30, "first agent");
    let pins = |dir: &Path| -> Vec<String> {
        let mut out: Vec<String> = walk(dir)
            .into_iter()
            .filter_map(|p| p.strip_prefix(dir).ok().map(|r| r.display().to_string()))
            .filter(|p| !p.starts_with("qdiscs") && !p.starts_with("filters"))
            .collect();
        out.sort();
        out
    };
    let before = pins(&pin_dir);
    assert!(
        before.iter().any(|p| p == "NETPOL_POLICY_V4"),
        "pinned: {before:?}"
    );
    if mode == "tcx" {
        assert!(
            before.iter().any(|p| p.starts_with("links/")),
            "pinned: {before:?}"
        );
    }
    std::fs::remove_dir_all(&pin_dir).expect("removing the pins");
    // The agent pins, then says so.
    let deadline = Instant::now() + DEADLINE;
    while pins(&pin_dir) != before || !agent.log().contains("pins were missing") {
        assert!(
            Instant::now() < deadline,
            "pins not restored, or not said: {:?}, were {before:?}; log:\n{}",
            pins(&pin_dir),
            agent.log()
        );
        std::thread::yield_now();
    }
    probes.progress(30, "pins restored");

    agent.signal("KILL");
    probes.progress(50, "no agent after kill -9");
    for p in pods {
        assert_eq!(
            netpol_attachments(node, &p.host_if).len(),
            2,
            "after kill -9, {} keeps both programs",
            p.host_if
        );
    }
    drop(agent);
    let mut agent = AgentProcess::start(node, bpffs.path(), feed, mode, log);
    agent.wait_enforced(node, feed, &pods);
    probes.progress(50, "next agent");
    let text = agent.log();
    assert!(
        !text.contains("pinned maps of another layout"),
        "the layout record came back; log:\n{text}"
    );
    agent.signal("TERM");
    probes.stop("after the restart");
}

/// Every file and folder under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn tcx_lost_pins_are_put_back_and_a_kill_keeps_enforcing() {
    if !privileged() {
        return;
    }
    lost_pins_are_put_back("tcx", false);
}

#[test]
fn kube_tcx_lost_pins_are_put_back_and_a_kill_keeps_enforcing() {
    if !privileged() {
        return;
    }
    lost_pins_are_put_back("tcx", true);
}

#[test]
fn netlink_lost_pins_are_put_back_and_a_kill_keeps_enforcing() {
    if !privileged() {
        return;
    }
    lost_pins_are_put_back("netlink", false);
}

/// Issue 20, item 3: netpol's programs attached on the pod interfaces
/// while the agent's bpffs holds no pins of them (the previous agent
/// pinned them on a bpffs since unmounted, here another one). The agent
/// finds them through the kernel (TCX query) and adopts them: each
/// interface carries each program once, and the denied pair never
/// connects. (Before, it attached a second set beside the first.)
#[test]
fn tcx_programs_attached_without_pins_are_adopted_not_doubled() {
    if !privileged() {
        return;
    }
    let scene = Scene::new("tcx");
    let Scene {
        node,
        bpffs,
        m,
        a,
        b,
        c,
        log,
        ..
    } = &scene;
    let pods = [a, b, c];
    let mut first = AgentProcess::start(node, bpffs.path(), m, "tcx", log);
    first.wait_enforced(node, m, &pods);
    let probes = Probes::start(a, b, c, &bpffs.path().join("netpol"));
    probes.progress(30, "first agent");
    first.signal("KILL");
    drop(first);

    let other = TempBpffs::new();
    let mut next = AgentProcess::start(node, other.path(), m, "tcx", log);
    next.wait_enforced(node, m, &pods);
    probes.progress(50, "agent on another bpffs");
    for p in pods {
        let found = netpol_attachments(node, &p.host_if);
        assert_eq!(
            found.len(),
            2,
            "{} carries each program once: {found:#?}\nlog:\n{}",
            p.host_if,
            next.log()
        );
    }
    let text = next.log();
    assert_eq!(
        text.matches("attached without its pin: adopting it")
            .count(),
        2 * pods.len(),
        "each hook adopted; log:\n{text}"
    );
    next.signal("TERM");
    probes.stop("after the agent on another bpffs");
}

/// Issue 20, item 3: `--bpffs` names a folder that is no bpffs, and the
/// agent runs in a mount namespace of its own (`ip netns exec`), whose
/// mounts nobody else sees. It refuses to mount one there, naming why,
/// instead of pinning where its pins would die with it.
#[test]
fn a_bpffs_only_this_agent_would_see_is_refused() {
    if !privileged() {
        return;
    }
    let scene = Scene::new("netlink");
    let plain = std::env::temp_dir().join(unique("netpol-not-bpffs-"));
    std::fs::create_dir_all(&plain).expect("folder");
    let out = Command::new("timeout")
        .args(["30", "ip", "netns", "exec", &scene.node.name])
        .arg(env!("CARGO_BIN_EXE_netpol-agent"))
        .arg("--bpffs")
        .arg(&plain)
        .args(["run", "--manifests"])
        .arg(&scene.m.0)
        .args(["--interfaces", "nph*", "--listen", "127.0.0.1:9103"])
        .arg("--state-dir")
        .arg(plain.with_extension("state"))
        .output()
        .expect("agent");
    let err = String::from_utf8_lossy(&out.stderr);
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .contains(&plain.display().to_string());
    let _ = std::fs::remove_dir_all(&plain);
    let _ = std::fs::remove_dir_all(plain.with_extension("state"));
    assert!(!out.status.success(), "the agent ran: {err}");
    assert!(
        err.contains("visible only in this agent's own mount namespace")
            && err.contains(&plain.display().to_string()),
        "says why, naming the folder: {err}"
    );
    assert!(!mounted, "nothing mounted");
}

/// CPU time (user + system, clock ticks) of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 here.
    n(11) + n(12)
}

/// Issue 20, item 6: the agent out of descriptors. Its fd limit is
/// lowered (prlimit) to a few above what it uses, and 200 idle
/// connections are opened to its HTTP port: accepting fails with EMFILE.
/// The accept loop backs off (little CPU, at most a couple of log lines),
/// enforcement holds, and once the connections go it answers and applies
/// a change. (Before, it spun at 100% writing a line per failed accept.)
#[test]
fn out_of_descriptors_the_agent_backs_off_and_recovers() {
    if !privileged() {
        return;
    }
    let scene = Scene::new("netlink");
    let Scene {
        node,
        bpffs,
        m,
        a,
        b,
        c,
        log,
        ..
    } = &scene;
    let pods = [a, b, c];
    let mut agent = AgentProcess::start(node, bpffs.path(), m, "netlink", log);
    agent.wait_enforced(node, m, &pods);
    let probes = Probes::start(a, b, c, &bpffs.path().join("netpol"));
    probes.progress(30, "before");
    let pid = agent.child.id();
    let used = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the agent's descriptors")
        .count();
    let limit = used + 8;
    sh(
        "prlimit",
        &[
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ],
    );
    let warned = |text: &str| text.matches("accepting HTTP connections").count();
    let before = warned(&agent.log());
    let out_since = Instant::now();
    let addr: SocketAddr = LISTEN.parse().expect("address");
    let idle: Vec<TcpStream> = node.run(|| {
        (0..200)
            .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok())
            .collect()
    });
    assert!(idle.len() > limit, "{} idle connections", idle.len());
    let ticks = cpu_ticks(pid);
    let started = Instant::now();
    probes.progress(100, "out of descriptors");
    while started.elapsed() < Duration::from_secs(3) {
        probes.progress(10, "out of descriptors");
    }
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let busy = (cpu_ticks(pid) - ticks) as f64 / hz as f64 / started.elapsed().as_secs_f64();
    let text = agent.log();
    assert!(
        text.contains("Too many open files") || text.contains("os error 24"),
        "the agent ran out of descriptors; log:\n{text}"
    );
    assert!(
        busy < 0.5,
        "the agent used {busy:.2} of a CPU while out of descriptors"
    );
    // One line per 10 s at most, counted from the first failed accept
    // (opening the connections may itself take seconds on a busy host).
    let out_for = out_since.elapsed();
    let allowed = 1 + out_for.as_secs() / 10;
    let lines = warned(&text) - before;
    assert!(
        lines as u64 <= allowed,
        "{lines} log lines about failed accepts in {out_for:?} (at most {allowed})"
    );
    drop(idle);
    // A change while it recovers: a pod more.
    m.write("d.yaml", &ghost_pod("d", "d", 4));
    let deadline = Instant::now() + DEADLINE;
    let fp = m.fingerprint();
    while status(node).is_none_or(|s| !s.contains(&fp)) {
        assert!(
            Instant::now() < deadline,
            "the agent did not recover; log:\n{}",
            agent.log()
        );
        std::thread::yield_now();
    }
    probes.stop("after recovering");
}
