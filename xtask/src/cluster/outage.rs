//! The outage of `cargo xtask cluster test`: node-3's agent killed
//! (SIGKILL) and, later, node-3's connections to the API server cut for
//! 30 s. Each time a policy changes meanwhile:
//!
//! - node-3 keeps enforcing the last state it had (probers to its pod
//!   x/c, counted at the server: the old verdicts, none lost, nothing
//!   denied delivered);
//! - node-2 converges on the change (x/b follows it);
//! - node-3 catches up: after the kill, when the kubelet restarts the
//!   agent; after the cut, when it reconnects, resuming its watches from
//!   versions the API server has compacted meanwhile (`410 Gone`, a
//!   relist). How long after reconnecting it enforces the change is
//!   printed, not asserted: a timing is a benchmark's to judge.
use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

use super::{
    API_V4, agent_name, kubectl, names, pod_handle, podman_ok, state_dir, traffic, wait_for,
};
use crate::deploy_test as dt;

/// How long node-3 stays cut from the API server.
const CUT: Duration = Duration::from_secs(30);
const VICTIM: &str = "node-3";
/// The servers' port (the rolling upgrade's are still listening on theirs).
const PORT: u16 = traffic::PORT + 1;

/// x/b (node-2) and x/c (node-3) admit namespace `from` only.
fn policy(from: &str) -> String {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "bc-from", "namespace": "x"},
        "spec": {
            "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": from}}}]}]
        }
    })
    .to_string()
}

/// The pods and servers the phases probe.
struct Probes {
    state: Value,
    /// x/b's and x/c's counting servers.
    seen: [(traffic::Seen, Vec<std::net::IpAddr>); 2],
}

impl Probes {
    /// Until `server` (x/b or x/c) admits namespace `from` (y or z) and
    /// refuses the other, both families: y/a (node-3), z/a (node-2).
    fn until(&self, server: usize, from: &str, within: Duration) -> Result<()> {
        let name = ["x/b", "x/c"][server];
        for (client, allowed) in [("y/a", from == "y"), ("z/a", from == "z")] {
            let (fd, _) = pod_handle(&self.state, client)?;
            for &ip in &self.seen[server].1 {
                let dst = SocketAddr::new(ip, PORT);
                wait_for(
                    within,
                    &format!(
                        "{client} -> {name} at {ip} is {}",
                        if allowed { "allowed" } else { "denied" }
                    ),
                    || {
                        Ok(
                            (traffic::reaches(&fd, dst, Duration::from_millis(500)) == allowed)
                                .then_some(()),
                        )
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Probers to x/c while node-3 is out: from y/a and z/a, both
    /// families, until `stop`; `from` is the namespace x/c admits.
    fn hold(&self, from: &str, stop: &Arc<AtomicBool>) -> Result<Held> {
        let mut probers = Vec::new();
        for client in ["y/a", "z/a"] {
            let (fd, ips) = pod_handle(&self.state, client)?;
            for &ip in &self.seen[1].1 {
                let source = ips
                    .iter()
                    .copied()
                    .find(|c| c.is_ipv4() == ip.is_ipv4())
                    .context("a client address")?;
                let (counts, handle) = traffic::prober(&fd, SocketAddr::new(ip, PORT), stop);
                let allowed = client.starts_with(from);
                // What reached x/c before counts for an earlier phase.
                let before = self.seen[1].0.from(source);
                probers.push((client, ip, source, before, allowed, counts, handle));
            }
        }
        Ok(Held { probers })
    }
}

type Prober = (
    &'static str,
    std::net::IpAddr,
    std::net::IpAddr,
    u64,
    bool,
    Arc<traffic::Counts>,
    std::thread::JoinHandle<()>,
);

/// Probers holding x/c to a state.
struct Held {
    probers: Vec<Prober>,
}

impl Held {
    /// Joins the probers (stopped by the caller) and says what broke the
    /// held state.
    fn judge(self, seen: &traffic::Seen, what: &str) -> Result<u64> {
        let mut problems = Vec::new();
        let mut answered = 0;
        for (client, ip, source, before, allowed, counts, handle) in self.probers {
            let _ = handle.join();
            let yes = counts.answered.load(Ordering::Relaxed);
            let no = counts.silent.load(Ordering::Relaxed);
            answered += yes;
            if allowed && (no > 0 || yes == 0) {
                problems.push(format!(
                    "{client} -> x/c at {ip} (allowed): {no} of {} unanswered",
                    yes + no
                ));
            }
            let delivered = seen.from(source) - before;
            if !allowed && (yes > 0 || delivered > 0) {
                problems.push(format!(
                    "{client} -> x/c at {ip} (denied): {yes} answered, {delivered} delivered"
                ));
            }
        }
        if !problems.is_empty() {
            bail!(
                "{what}: node-3 did not hold its state:\n  {}",
                problems.join("\n  ")
            );
        }
        Ok(answered)
    }
}

/// `ip netns exec <node-3> iptables|ip6tables …`.
fn in_victim(tool: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", &names().node(VICTIM), tool])
        .args(args)
        .output()
        .with_context(|| format!("running {tool}"))?;
    ensure!(
        out.status.success(),
        "{tool} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Cuts (or restores) node-3's connections to the API server: new ones
/// refused, replies dropped, open ones aborted as a failed link aborts
/// them.
fn cut(on: bool) -> Result<()> {
    let op = if on { "-I" } else { "-D" };
    let port = dt::API_PORT.to_string();
    in_victim(
        "iptables",
        &[
            "-w",
            op,
            "OUTPUT",
            "-d",
            API_V4,
            "-p",
            "tcp",
            "--dport",
            &port,
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ],
    )?;
    in_victim(
        "iptables",
        &[
            "-w", op, "INPUT", "-s", API_V4, "-p", "tcp", "--sport", &port, "-j", "DROP",
        ],
    )?;
    if on {
        in_victim("ss", &["-K", "dst", API_V4, "dport", "=", &port]).or_else(|e| {
            if e.to_string().contains("Invalid argument") {
                Ok(())
            } else {
                Err(e)
            }
        })?;
    }
    Ok(())
}

/// node-3's agent's `/status`, on its node's address `at`.
fn victim_status(at: SocketAddr) -> Option<Value> {
    let (_, body) = dt::http_get(at, "/status").ok()?;
    serde_json::from_str(&body).ok()
}

/// How often node-3's agent has logged a watch expired (410 Gone).
fn expiries(agent: &str) -> Result<usize> {
    let out = dt::podman()
        .args(["logs", agent])
        .output()
        .context("podman logs")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text.matches("watch expired (410 Gone)").count())
}

/// The API server's compaction (SIGUSR1).
fn compact() -> Result<()> {
    let pid = std::fs::read_to_string(state_dir().join("apiserver.pid"))?;
    let out = Command::new("kill")
        .args(["-USR1", pid.trim()])
        .output()
        .context("kill -USR1")?;
    ensure!(out.status.success(), "signalling the API server");
    Ok(())
}

pub fn kill_and_cut() -> Result<()> {
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(state_dir().join("cluster.json"))?)?;
    let (objects, _) = super::objects(None, None)?;
    let victim = netpol_testkit::cluster::node_specs(&objects)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .find(|n| n.name == VICTIM)
        .with_context(|| format!("{VICTIM} in the cluster file"))?;
    let status_at = SocketAddr::new(
        victim.internal_ip(true).context("node-3's IPv4 address")?,
        crate::conformance::cluster::STATUS_PORT,
    );
    let mut seen = Vec::new();
    for id in ["x/b", "x/c"] {
        let (fd, ips) = pod_handle(&state, id)?;
        seen.push((traffic::serve(&fd, &ips, PORT)?, ips));
    }
    let seen: [(traffic::Seen, Vec<std::net::IpAddr>); 2] = seen
        .try_into()
        .map_err(|_| anyhow::anyhow!("two servers"))?;
    let probes = Probes { state, seen };
    kubectl(&["create", "-f", "-"], Some(&policy("y")))?;
    probes.until(0, "y", Duration::from_secs(30))?;
    probes.until(1, "y", Duration::from_secs(30))?;

    // The agent killed; the policy changes while it is dead.
    let agent = agent_name(VICTIM);
    let stop = Arc::new(AtomicBool::new(false));
    let held = probes.hold("y", &stop)?;
    podman_ok(&["kill", "--signal", "KILL", &agent])?;
    kubectl(&["replace", "-f", "-"], Some(&policy("z")))?;
    probes.until(0, "z", Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let answered = held.judge(&probes.seen[1].0, "while node-3's agent was dead")?;
    // The kubelet restarts it; it catches up.
    podman_ok(&["start", &agent])?;
    probes.until(1, "z", Duration::from_secs(60))?;
    println!(
        "cluster test: node-3's agent killed (SIGKILL): node-3 held its last state ({answered} \
         allowed probes answered, nothing denied delivered) while node-2 followed a policy \
         change; restarted, it enforced the change"
    );

    // The API out of node-3's reach for 30 s; the policy changes and the
    // API server compacts its history meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let held = probes.hold("z", &stop)?;
    let expired_before = expiries(&agent)?;
    cut(true)?;
    let cut_at = Instant::now();
    let result = (|| -> Result<(u64, Duration, Duration)> {
        kubectl(&["replace", "-f", "-"], Some(&policy("y")))?;
        probes.until(0, "y", CUT)?;
        compact()?;
        let mut unreachable = None;
        while cut_at.elapsed() < CUT {
            if let Some(s) = victim_status(status_at)
                && let Some(why) = s["source"]["unreachable"].as_str()
            {
                unreachable = Some(why.to_owned());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
        let answered = held.judge(
            &probes.seen[1].0,
            "while node-3 was cut from the API server",
        )?;
        ensure!(
            unreachable.is_some(),
            "node-3's agent never reported the API server unreachable"
        );
        cut(false)?;
        let uncut = Instant::now();
        wait_for(
            Duration::from_secs(90),
            "node-3's agent reaches the API server again",
            || {
                Ok(victim_status(status_at)
                    .filter(|s| {
                        s["source"]["unreachable"].is_null() && s["source"]["synced"] == true
                    })
                    .map(drop))
            },
        )?;
        let reconnected = uncut.elapsed();
        // The first cell the change flips: y/a -> x/c, now allowed.
        let (fd, _) = pod_handle(&probes.state, "y/a")?;
        let dst = SocketAddr::new(probes.seen[1].1[0], PORT);
        dt::until(
            Duration::from_secs(30),
            Duration::from_millis(5),
            "y/a reaches x/c again",
            || Ok(traffic::reaches(&fd, dst, Duration::from_millis(100)).then_some(())),
        )?;
        let caught_up = uncut.elapsed();
        probes.until(1, "y", Duration::from_secs(30))?;
        ensure!(
            expiries(&agent)? > expired_before,
            "node-3's agent caught up without a watch expiring (410 Gone)"
        );
        Ok((answered, reconnected, caught_up))
    })();
    if result.is_err() {
        let _ = cut(false);
    }
    let (answered, reconnected, caught_up) = result?;
    println!(
        "cluster test: node-3 cut from the API server for {}s: it held its last state \
         ({answered} allowed probes answered, nothing denied delivered) while node-2 followed a \
         policy change and the history was compacted; after the cut ended, its status said \
         reachable and synced within {} ms and x/c followed the change within {} ms (a relist \
         after 410 Gone)",
        CUT.as_secs(),
        reconnected.as_millis(),
        caught_up.as_millis()
    );
    kubectl(&["delete", "networkpolicy", "-n", "x", "bc-from"], None)?;
    Ok(())
}
