//! netpol-cni in a chain run as containerd runs it: Debian's `bridge`
//! (cni0, dual-stack host-local, hairpin) and `portmap`, then netpol-cni,
//! with the CNI variables and `CNI_ARGS`; the agent in the node's
//! namespace, its pods known from the API (here a manifests folder)
//! without addresses, as a Pod is before its sandbox exists.
use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Barrier, OnceLock},
    time::{Duration, Instant},
};

use netpol_testkit::{
    Netns,
    agent::{Running, interface},
    cni::{Chain, Sandbox, result_ips},
    datapath::TempBpffs,
    echo,
    manifests::{BASE, Manifests},
    privileged, unique,
};
use serde_json::Value;

/// The client's policy: egress to `server` on 8080 only, ingress from
/// `peer` on 8080 only. `other` is neither.
const POLICY: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{podSelector: {matchLabels: {app: peer}}}], ports: [{port: 8080}]}]
  egress: [{to: [{podSelector: {matchLabels: {app: server}}}], ports: [{port: 8080}]}]
";

/// A Pod as the API server has it before its sandbox: scheduled, pending,
/// no addresses.
fn pending_pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, uid: uid-{name}, \
         labels: {{app: {name}}}}}\nspec: {{nodeName: n1, containers: [{{name: c}}]}}\n\
         status: {{phase: Pending}}\n"
    )
}

/// Shorter than the first SYN retransmission (1 s): a connection made
/// within it was answered on its first SYN.
const FIRST_SYN: Duration = Duration::from_millis(900);

struct Node {
    ns: Netns,
    bpffs: TempBpffs,
    manifests: Manifests,
    dir: PathBuf,
    chain: Chain,
}

impl Node {
    fn new(timeout_ms: u64) -> Self {
        let ns = Netns::new("npcn");
        // The node's own addresses (as a node's uplink has): its families.
        ns.exec("ip", &["addr", "add", "192.168.250.2/32", "dev", "lo"]);
        ns.exec("ip", &["addr", "add", "fd00:250::2/128", "dev", "lo"]);
        let dir = std::env::temp_dir().join(unique("netpol-cni-"));
        std::fs::create_dir_all(dir.join("ipam")).expect("test folder");
        let mut chain = Chain::flannel_like(
            Path::new(env!("CARGO_BIN_EXE_netpol-cni")),
            &dir.join("cni.sock"),
            &dir.join("ipam"),
            "10.244.7.0/24",
            "fd00:244:7::/64",
        );
        chain.conflist["plugins"][2]["timeoutMs"] = timeout_ms.into();
        let manifests = Manifests::new();
        manifests.write("00-base.yaml", BASE);
        manifests.write("10-policy.yaml", POLICY);
        for p in ["server", "other", "peer", "client"] {
            manifests.write(&format!("{p}.yaml"), &pending_pod(p));
        }
        Self {
            ns,
            bpffs: TempBpffs::new(),
            manifests,
            dir,
            chain,
        }
    }

    fn agent(&self) -> Running {
        let socket = self.dir.join("cni.sock");
        let mut agent = Running::start_with(&self.ns, self.bpffs.path(), &self.manifests, |b| {
            b.interfaces("veth*").cni_socket(Some(socket))
        });
        agent.wait("ready", |s| s.ready);
        agent
    }

    /// A pod's sandbox: its namespace and the chain's ADD.
    fn pod(&self, name: &str) -> (Netns, Sandbox, Result<Value, String>) {
        let pod = Netns::new(&format!("npc{}", &name[..2]));
        let sandbox = Sandbox::new("x", name);
        let r = self.chain.add(&self.ns, &pod, &sandbox);
        (pod, sandbox, r)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn addr(ips: &[IpAddr], v6: bool, port: u16) -> SocketAddr {
    let ip = ips
        .iter()
        .find(|i| i.is_ipv6() == v6)
        .unwrap_or_else(|| panic!("no {} address in {ips:?}", if v6 { "IPv6" } else { "IPv4" }));
    SocketAddr::new(*ip, port)
}

/// Threads inside `ns`, each connecting to one destination the moment the
/// barrier opens; each returns whether it connected within `timeout`.
fn armed(
    ns: &Netns,
    dsts: Vec<SocketAddr>,
    timeout: Duration,
    go: &Arc<Barrier>,
) -> Vec<std::thread::JoinHandle<(SocketAddr, bool)>> {
    dsts.into_iter()
        .map(|dst| {
            let go = go.clone();
            ns.spawn(move || {
                go.wait();
                (dst, TcpStream::connect_timeout(&dst, timeout).is_ok())
            })
        })
        .collect()
}

/// [`armed`] for the pod whose addresses ADD gives: each thread connects
/// to port 8080 of one of its families, read once the barrier opens.
fn armed_to(
    ns: &Netns,
    known: &Arc<OnceLock<Vec<IpAddr>>>,
    timeout: Duration,
    go: &Arc<Barrier>,
) -> Vec<std::thread::JoinHandle<(SocketAddr, bool)>> {
    [false, true]
        .into_iter()
        .map(|v6| {
            let (go, known) = (go.clone(), known.clone());
            ns.spawn(move || {
                go.wait();
                let dst = addr(
                    known.get().expect("addresses set before the barrier"),
                    v6,
                    8080,
                );
                (dst, TcpStream::connect_timeout(&dst, timeout).is_ok())
            })
        })
        .collect()
}

fn joined(hs: Vec<std::thread::JoinHandle<(SocketAddr, bool)>>) -> Vec<(SocketAddr, bool)> {
    hs.into_iter()
        .map(|h| h.join().expect("connect thread"))
        .collect()
}

/// The pod's first packets, both ways and both families, are judged by its
/// whole policy: allowed connections are answered on their first SYN,
/// made the moment ADD returns; denied ones never get through.
#[test]
fn a_new_pod_is_enforced_from_the_moment_add_returns() {
    if !privileged() {
        return;
    }
    let node = Node::new(5_000);
    let mut agent = node.agent();
    let mut ips = std::collections::BTreeMap::new();
    let mut pods = Vec::new();
    for name in ["server", "other", "peer"] {
        let (ns, _, r) = node.pod(name);
        let result = r.unwrap_or_else(|e| panic!("ADD {name}: {e}"));
        let a = result_ips(&result);
        assert_eq!(a.len(), 2, "{name}: dual-stack addresses in {result}");
        echo::serve(&ns, &a, 8080);
        ips.insert(name, a);
        pods.push(ns);
    }
    // The client's sandbox exists before ADD; its server listens from the
    // start, as a container started right after ADD would.
    let client = Netns::new("npccl");
    echo::serve(&client, &["::"], 8080);
    let sandbox = Sandbox::new("x", "client");
    let server = &ips["server"];
    let other = &ips["other"];
    let go = Arc::new(Barrier::new(1 + 4));
    let outbound_allowed = armed(
        &client,
        vec![addr(server, false, 8080), addr(server, true, 8080)],
        FIRST_SYN,
        &go,
    );
    let outbound_denied = armed(
        &client,
        vec![addr(other, false, 8080), addr(other, true, 8080)],
        Duration::from_millis(1500),
        &go,
    );
    // Inbound needs the client's addresses, known from ADD's result: its
    // threads wait in their pods' namespaces for them.
    let known: Arc<OnceLock<Vec<IpAddr>>> = Arc::new(OnceLock::new());
    let go_in = Arc::new(Barrier::new(1 + 4));
    let in_allowed = armed_to(&pods[2], &known, FIRST_SYN, &go_in);
    let in_denied = armed_to(&pods[1], &known, Duration::from_millis(1500), &go_in);
    let start = Instant::now();
    let result = node
        .chain
        .add(&node.ns, &client, &sandbox)
        .unwrap_or_else(|e| panic!("ADD client: {e}"));
    let took = start.elapsed();
    let client_ips = result_ips(&result);
    known.set(client_ips.clone()).expect("set once");
    // Released at once: every thread already waits in its namespace.
    go.wait();
    go_in.wait();
    let (out_allowed, out_denied) = (joined(outbound_allowed), joined(outbound_denied));
    let (in_allowed, in_denied) = (joined(in_allowed), joined(in_denied));
    for (dst, ok) in out_allowed.iter().chain(&in_allowed) {
        assert!(
            ok,
            "{dst}: allowed, must be answered on its first SYN (ADD took {took:?})"
        );
    }
    for (dst, ok) in out_denied.iter().chain(&in_denied) {
        assert!(
            !ok,
            "{dst}: denied by the client's policy, yet it connected"
        );
    }
    // The result is the main plugin's, unchanged.
    assert_eq!(
        result["interfaces"].as_array().map(Vec::len),
        Some(3),
        "{result}"
    );
    let s = agent.wait("client bound", |s| {
        s.interfaces
            .iter()
            .any(|i| i.pod.as_deref() == Some("x/client") && i.programmed)
    });
    let host = &s
        .interfaces
        .iter()
        .find(|i| i.pod.as_deref() == Some("x/client"))
        .expect("client interface")
        .name;
    assert_eq!(
        result["interfaces"][1]["name"].as_str(),
        Some(host.as_str()),
        "bound to the veth the bridge plugin made"
    );

    // CHECK agrees; DEL releases the veth at once: fail-closed while it
    // still exists, and the established connection's next packet dropped.
    let netpol = node.chain.conflist["plugins"][2].clone();
    node.chain
        .exec(&node.ns, &client, &sandbox, "CHECK", &netpol, Some(&result))
        .unwrap_or_else(|e| panic!("CHECK: {e}"));
    let open = echo::connect(&client, addr(server, false, 8080));
    assert!(echo::exchange(&open, "before\n", Duration::from_secs(2)));
    node.chain
        .exec(&node.ns, &client, &sandbox, "DEL", &netpol, Some(&result))
        .unwrap_or_else(|e| panic!("DEL: {e}"));
    let s = agent.wait("client released", |s| {
        interface(s, host).is_some_and(|i| !i.programmed && i.pod.is_none())
    });
    assert!(interface(&s, host).is_some(), "the veth still exists");
    assert!(
        !echo::exchange(&open, "after\n", Duration::from_millis(800)),
        "a released pod interface must fail closed"
    );
    let e = node
        .chain
        .exec(&node.ns, &client, &sandbox, "CHECK", &netpol, Some(&result))
        .expect_err("CHECK after DEL");
    assert!(e.contains("unknown to the agent"), "{e}");
    node.chain
        .del(&node.ns, &client, &sandbox, Some(&result))
        .unwrap_or_else(|e| panic!("DEL chain: {e}"));
}

/// No agent: ADD fails (the runtime retries) with the pod's name and the
/// reason, and leaves the veth down, so nothing passes; once an agent
/// runs, the retried ADD succeeds and the pod is enforced.
#[test]
fn without_an_agent_add_fails_closed_and_the_retry_succeeds() {
    if !privileged() {
        return;
    }
    let node = Node::new(1_500);
    let (client, sandbox, r) = node.pod("client");
    let e = r.expect_err("ADD without an agent");
    assert!(
        e.contains("x/client") && e.contains("no agent listening") && e.contains("\"code\":11"),
        "{e}"
    );
    let veths = node.ns.exec("ip", &["-o", "link", "show", "type", "veth"]);
    assert!(
        !veths.is_empty() && !veths.contains(",UP"),
        "the pod's veth must be down after a failed ADD: {veths}"
    );
    // containerd tears the sandbox down, then retries.
    node.chain
        .del(&node.ns, &client, &sandbox, None)
        .unwrap_or_else(|e| panic!("DEL after a failed ADD: {e}"));
    let _agent = node.agent();
    let (server_ns, _, r) = node.pod("server");
    let server = result_ips(&r.unwrap_or_else(|e| panic!("ADD server: {e}")));
    echo::serve(&server_ns, &server, 8080);
    let result = node
        .chain
        .add(&node.ns, &client, &sandbox)
        .unwrap_or_else(|e| panic!("retried ADD: {e}"));
    assert_eq!(result_ips(&result).len(), 2);
    for v6 in [false, true] {
        let dst = addr(&server, v6, 8080);
        assert!(
            client.run(|| TcpStream::connect_timeout(&dst, FIRST_SYN).is_ok()),
            "{dst}: allowed after the retried ADD"
        );
    }
}

/// An agent that stops while an ADD waits (its pod unknown to it) fails
/// the ADD; the pod is never left programmed as anything else.
#[test]
fn an_agent_stopping_during_add_fails_it() {
    if !privileged() {
        return;
    }
    // A timeout far beyond the stop: failing at it would show.
    let node = Node::new(30_000);
    node.manifests.remove("client.yaml");
    let agent = node.agent();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(agent);
    });
    let start = Instant::now();
    let (_client, _, r) = node.pod("client");
    let e = r.expect_err("ADD while the agent stops");
    stopper.join().expect("stopper");
    assert!(e.contains("x/client"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "failed when the agent stopped, not at the timeout: {:?} ({e})",
        start.elapsed()
    );
}

/// A churned pod's policy: pods labelled `role: egress-<to>` reach only
/// `to` on 8080 (`open` pods are selected by none).
fn churn_policy(to: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: egress-{to}, namespace: x}}\n\
         spec: {{podSelector: {{matchLabels: {{role: egress-{to}}}}}, policyTypes: [Egress],\n  \
         egress: [{{to: [{{podSelector: {{matchLabels: {{app: {to}}}}}}}], ports: [{{port: 8080}}]}}]}}\n"
    )
}
/// How many pods `churn` starts and deletes: `NETPOL_CNI_CHURN`, else 40
/// (`cargo xtask cni-churn` runs 1,000).
fn churn_count() -> usize {
    std::env::var("NETPOL_CNI_CHURN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

/// Pods started and deleted one after another, each with a policy drawn
/// at random, on an address range of eight so that addresses are reused
/// at once: from the moment its ADD returns, each pod's connections get
/// exactly its policy's verdict, both families, and allowed ones are
/// answered on their first SYN. A reused address inherits nothing.
#[test]
fn pods_started_and_deleted_with_reused_addresses_get_exactly_their_policy() {
    if !privileged() {
        return;
    }
    let mut node = Node::new(5_000);
    // A small range: the next pod gets the address the last one freed.
    let ipam = &mut node.chain.conflist["plugins"][0]["ipam"]["ranges"];
    ipam[0][0]["rangeStart"] = "10.244.7.10".into();
    ipam[0][0]["rangeEnd"] = "10.244.7.17".into();
    ipam[1][0]["rangeStart"] = "fd00:244:7::10".into();
    ipam[1][0]["rangeEnd"] = "fd00:244:7::17".into();
    for to in ["server", "other"] {
        node.manifests
            .write(&format!("20-churn-{to}.yaml"), &churn_policy(to));
    }
    let mut agent = node.agent();
    let mut ips = std::collections::BTreeMap::new();
    let mut keep = Vec::new();
    for name in ["server", "other"] {
        let (ns, _, r) = node.pod(name);
        let a = result_ips(&r.unwrap_or_else(|e| panic!("ADD {name}: {e}")));
        echo::serve(&ns, &a, 8080);
        ips.insert(name, a);
        keep.push(ns);
    }
    // The churn policies compiled (the fingerprint is of the state
    // compiled, reported addresses included, so not the folder's).
    agent.wait("the churn policies", |s| {
        s.objects.policies == 3 && s.last_error.is_none()
    });
    // A fixed seed: a failure names the pod that shows it.
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut draw = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % 3
    };
    let mut wrong = Vec::new();
    let mut addresses = std::collections::BTreeSet::new();
    let n = churn_count();
    for i in 0..n {
        let role = ["egress-server", "egress-other", "open"][usize::try_from(draw()).unwrap()];
        let name = format!("churn-{i}");
        node.manifests.write(
            &format!("{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, uid: uid-{name}, \
                 labels: {{role: {role}}}}}\nspec: {{nodeName: n1, containers: [{{name: c}}]}}\n\
                 status: {{phase: Pending}}\n"
            ),
        );
        let pod = Netns::new("npcch");
        let sandbox = Sandbox::new("x", &name);
        let result = node
            .chain
            .add(&node.ns, &pod, &sandbox)
            .unwrap_or_else(|e| panic!("ADD {name}: {e}"));
        addresses.extend(result_ips(&result));
        let want = |to: &str| match role {
            "open" => true,
            r => r == format!("egress-{to}"),
        };
        let go = Arc::new(Barrier::new(1 + 4));
        let mut checks = Vec::new();
        for to in ["server", "other"] {
            // An allowed connection completes in well under a millisecond
            // here; a denied one is given a third of a second.
            let timeout = if want(to) {
                FIRST_SYN
            } else {
                Duration::from_millis(300)
            };
            let dsts = vec![addr(&ips[to], false, 8080), addr(&ips[to], true, 8080)];
            for h in armed(&pod, dsts, timeout, &go) {
                checks.push((to, h));
            }
        }
        go.wait();
        for (to, h) in checks {
            let (dst, ok) = h.join().expect("connect thread");
            if ok != want(to) {
                wrong.push(format!("{name} ({role}) -> {to} {dst}: connected {ok}"));
            }
        }
        node.chain
            .del(&node.ns, &pod, &sandbox, Some(&result))
            .unwrap_or_else(|e| panic!("DEL {name}: {e}"));
        node.manifests.remove(&format!("{name}.yaml"));
    }
    assert!(
        wrong.is_empty(),
        "{} of {n} pods:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(
        addresses.len() <= 16 && n > 16,
        "addresses were reused: {addresses:?}"
    );
}
