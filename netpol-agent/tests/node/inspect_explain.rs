//! `netpol-agent inspect` and `explain` against the real agent: three
//! routed pods in a node namespace (and a pod of another node in the
//! manifests), the real `netpol-agent run --state-dir`, then the commands'
//! JSON read back and checked against the policies and against real
//! connections, both families; and again once the agent is killed, since
//! the maps and the state file outlive it.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use netpol_testkit::{
    Netns,
    datapath::TempBpffs,
    echo::{Case, Proto, connect, echo, exchange, expect},
    manifests::{Manifests, guard_manifest},
    privileged,
    process::{self, AgentProcess, Turn},
    topology::{Pod, Topology, calico_pod, node},
    unique,
};
use serde_json::Value;

use crate::AGENT;

/// Ingress of b: TCP 80 from a only. Egress of c: TCP 80 to b only (which
/// b's ingress does not let in).
const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-to-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: c}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}]}]
"#;

fn cluster(pods: &[(&str, &Pod)]) -> String {
    let mut s = String::from(
        r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}, {type: InternalIP, address: "fd00::1"}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: r, namespace: x, labels: {app: r}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.244.2.2}, {ip: "fd00:2::2"}]}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: x}
spec: {clusterIPs: [10.96.0.10, "fd00:96::10"], ports: [{port: 80, protocol: TCP}]}
"#,
    );
    for (name, p) in pods {
        s.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {name}}}}}\n\
             spec: {{nodeName: n1, containers: [{{name: c}}]}}\n\
             status: {{phase: Running, podIPs: {}}}\n",
            p.pod_ips()
        ));
    }
    s
}

/// Runs `netpol-agent --bpffs <bpffs> <args> --state-dir <dir>`: its exit
/// code and standard output.
fn netpol(bpffs: &Path, state: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(AGENT)
        .arg("--bpffs")
        .arg(bpffs)
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("running netpol-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("warning"),
        "netpol-agent {args:?} warned: {stderr}"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn json(bpffs: &Path, state: &Path, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.extend(["-o", "json"]);
    let (code, out) = netpol(bpffs, state, &full);
    assert_eq!(code, 0, "netpol-agent {args:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// `explain SRC DST PORT --family F -o json`: the exit code and answer.
fn explain(bpffs: &Path, state: &Path, src: &str, dst: &str, port: &str, fam: u8) -> (i32, Value) {
    let f = fam.to_string();
    let (code, out) = netpol(
        bpffs,
        state,
        &["explain", src, dst, port, "--family", &f, "-o", "json"],
    );
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("explain: {e}: {out}"));
    (code, v)
}

struct World {
    agent: AgentProcess,
    state: StateDir,
    bpffs: TempBpffs,
    _manifests: Manifests,
    a: Pod,
    b: Pod,
    c: Pod,
    _node: Netns,
    _turn: Turn,
}

/// A state folder, removed on drop.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl World {
    fn new() -> Self {
        let turn = Turn::take("inspect_explain");
        let node = node(Topology::Routed, true);
        let a = calico_pod(&node, "10.244.1.2", "fd00:1::2");
        let b = calico_pod(&node, "10.244.1.3", "fd00:1::3");
        let c = calico_pod(&node, "10.244.1.4", "fd00:1::4");
        for (p, port) in [(&a, 80), (&b, 80), (&b, 81)] {
            echo(p, port);
        }
        let manifests = Manifests::new();
        manifests.write(
            "00-cluster.yaml",
            &cluster(&[("a", &a), ("b", &b), ("c", &c)]),
        );
        manifests.write("10-policies.yaml", POLICIES);
        let bpffs = TempBpffs::new();
        let state = StateDir(std::env::temp_dir().join(unique("netpol-state-")));
        let dir = state.0.display().to_string();
        let mut agent = AgentProcess::start(
            AGENT.as_ref(),
            &node,
            bpffs.path(),
            &manifests,
            "n1",
            &["--state-dir", &dir],
        );
        agent.wait_enforced(&manifests, &[&a.host_if, &b.host_if, &c.host_if]);
        wait_state(&state.0, &agent.fingerprint(&manifests), 3);
        Self {
            agent,
            state,
            bpffs,
            _manifests: manifests,
            a,
            b,
            c,
            _node: node,
            _turn: turn,
        }
    }

    fn json(&self, args: &[&str]) -> Value {
        json(self.bpffs.path(), &self.state.0, args)
    }

    fn explain(&self, src: &str, dst: &str, port: &str, fam: u8) -> (i32, Value) {
        explain(self.bpffs.path(), &self.state.0, src, dst, port, fam)
    }
}

/// Waits until the state file (written off the agent's sync loop) holds
/// `fingerprint` with `pods` pods bound to their interfaces.
fn wait_state(dir: &Path, fingerprint: &str, pods: usize) {
    let deadline = std::time::Instant::now() + process::DEADLINE;
    let mut last = Value::Null;
    while std::time::Instant::now() < deadline {
        if let Some(v) = std::fs::read(dir.join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
        {
            let bound = v["endpoints"].as_array().map_or(0, |e| {
                e.iter().filter(|e| e["interface"].is_string()).count()
            });
            if v["fingerprint"] == fingerprint && bound == pods {
                return;
            }
            last = v;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("the state file never described fingerprint {fingerprint}: {last:#}");
}

fn endpoint<'v>(doc: &'v Value, pod: &str) -> &'v Value {
    doc["endpoints"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["pod"] == pod))
        .unwrap_or_else(|| panic!("{pod} missing from {doc:#}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|l| {
            l.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Every check that holds while the agent runs and after it died.
fn check_inspect_and_explain(w: &World, open_conn: bool) {
    // Endpoints: pod <-> id <-> interface <-> addresses <-> isolation.
    let doc = w.json(&["inspect", "endpoints"]);
    for (name, p) in [("x/a", &w.a), ("x/b", &w.b), ("x/c", &w.c)] {
        let e = endpoint(&doc, name);
        assert_eq!(e["interface"], p.host_if, "{e:#}");
        assert!(e["ifindex"].as_u64().is_some_and(|i| i > 0), "{e:#}");
        assert_eq!(e["programmed"], true, "{e:#}");
        assert!(e["slot"].as_u64().is_some_and(|s| s > 0), "{e:#}");
        let want: Vec<String> = p.addresses().iter().map(ToString::to_string).collect();
        assert_eq!(strings(&e["addresses"]), want, "{e:#}");
    }
    let b = endpoint(&doc, "x/b");
    assert_eq!(b["ingress"]["isolated"], true);
    assert_eq!(strings(&b["ingress"]["policies"]), ["x/b-from-a"]);
    assert_eq!(b["egress"]["isolated"], false);
    let c = endpoint(&doc, "x/c");
    assert_eq!(strings(&c["egress"]["policies"]), ["x/c-to-b"]);
    assert_eq!(endpoint(&doc, "x/a")["ingress"]["isolated"], false);

    // b's ingress entries: a's two addresses, TCP 80, named by their rule.
    let doc = w.json(&["inspect", "policy", "x/b", "--ingress"]);
    assert_eq!(doc["pod"], "x/b");
    assert_eq!(doc["interface"], w.b.host_if);
    let dirs = doc["directions"].as_array().expect("directions");
    assert_eq!(dirs.len(), 1, "--ingress only: {doc:#}");
    let entries = dirs[0]["entries"].as_array().expect("entries");
    let mut prefixes: Vec<String> = entries
        .iter()
        .map(|e| e["prefix"].as_str().unwrap_or_default().to_owned())
        .collect();
    prefixes.sort();
    assert_eq!(prefixes, ["10.244.1.2/32", "fd00:1::2/128"], "{doc:#}");
    for e in entries {
        assert_eq!(e["peer_pod"], "x/a", "{e:#}");
        assert_eq!(e["ports_text"], "TCP 80", "{e:#}");
        assert_eq!(
            strings(&e["rules"]),
            ["x/b-from-a: spec.ingress[0]"],
            "{e:#}"
        );
        assert_eq!(e["stale"], false);
        let sel = e["selector"].as_u64().expect("selector");
        assert_eq!(sel & 1, 1, "ingress selectors are odd");
    }
    let doc = w.json(&["inspect", "policy", "x/c", "--family", "6"]);
    let egress = &doc["directions"][1];
    assert_eq!(egress["direction"], "egress");
    let entries = egress["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{doc:#}");
    assert_eq!(entries[0]["prefix"], "fd00:1::3/128");
    assert_eq!(strings(&entries[0]["rules"]), ["x/c-to-b: spec.egress[0]"]);

    // Explain, both families.
    for fam in [4, 6] {
        let (code, e) = w.explain("x/a", "x/b", "tcp/80", fam);
        assert_eq!((code, &e["verdict"]), (0, &Value::from("allowed")), "{e:#}");
        assert_eq!(e["egress"]["reason"], "pass_not_isolated");
        assert_eq!(e["ingress"]["reason"], "pass_policy");
        assert_eq!(
            strings(&e["ingress"]["entry"]["rules"]),
            ["x/b-from-a: spec.ingress[0]"]
        );
        assert_eq!(e["family"], fam);

        let (code, e) = w.explain("x/a", "x/b", "tcp/81", fam);
        assert_eq!((code, &e["verdict"]), (1, &Value::from("denied")), "{e:#}");
        assert_eq!(e["ingress"]["reason"], "drop_policy");
        assert_eq!(strings(&e["ingress"]["policies"]), ["x/b-from-a"]);
        assert!(
            e["ingress"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("isolated by x/b-from-a and no rule matches")),
            "{e:#}"
        );

        // c's egress lets it out; b's ingress does not let it in.
        let (code, e) = w.explain("x/c", "x/b", "tcp/80", fam);
        assert_eq!(code, 1, "{e:#}");
        assert_eq!(e["egress"]["reason"], "pass_policy");
        assert_eq!(
            strings(&e["egress"]["entry"]["rules"]),
            ["x/c-to-b: spec.egress[0]"]
        );
        assert_eq!(e["ingress"]["reason"], "drop_policy");
        assert!(e["ingress"]["entry"].is_null(), "no entry covers c: {e:#}");

        let (code, e) = w.explain("x/c", "x/a", "tcp/80", fam);
        assert_eq!(code, 1, "{e:#}");
        assert_eq!(e["egress"]["reason"], "drop_policy");
        assert_eq!(strings(&e["egress"]["policies"]), ["x/c-to-b"]);

        let (code, e) = w.explain("x/b", "x/a", "udp/80", fam);
        assert_eq!(code, 0, "{e:#}");
        assert_eq!(e["ingress"]["reason"], "pass_not_isolated");

        // A pod of another node: only this node's side is judged.
        let (code, e) = w.explain("x/r", "x/b", "tcp/80", fam);
        assert_eq!(code, 1, "{e:#}");
        assert_eq!(e["egress"]["reason"], "not_judged");
        assert_eq!(e["src"]["location"], "remote");
        let (code, e) = w.explain("x/a", "x/r", "tcp/80", fam);
        assert_eq!(code, 0, "{e:#}");
        assert_eq!(e["ingress"]["reason"], "not_judged");
    }
    // By address, and a Service frontend.
    let (code, out) = netpol(
        w.bpffs.path(),
        &w.state.0,
        &[
            "explain",
            "10.244.1.2",
            "fd00:1::3",
            "tcp/80",
            "--family",
            "6",
        ],
    );
    assert_eq!((code, out.as_str()), (2, ""), "mixed families are an error");
    let (_, e) = w.explain("fd00:1::2", "fd00:1::3", "tcp/80", 6);
    assert_eq!(
        (&e["src"]["pod"], &e["verdict"]),
        (&Value::from("x/a"), &Value::from("allowed"))
    );
    let (code, e) = w.explain("x/a", "10.96.0.10", "tcp/80", 4);
    assert_eq!(code, 2, "{e:#}");
    assert_eq!(e["verdict"], "depends");
    assert_eq!(strings(&e["service"]["services"]), ["x/s"]);

    // Batch: one JSON line per query, in order, errors included.
    let batch = std::env::temp_dir().join(unique("netpol-batch-"));
    std::fs::write(
        &batch,
        "# comment\nx/a x/b tcp/80 4\nx/a x/b tcp/81 6\nx/nope x/b tcp/80\n",
    )
    .expect("batch file");
    let (code, out) = netpol(
        w.bpffs.path(),
        &w.state.0,
        &[
            "explain",
            "--batch",
            &batch.display().to_string(),
            "-o",
            "json",
        ],
    );
    let _ = std::fs::remove_file(&batch);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        (&lines[0]["query"], &lines[0]["verdict"]),
        (&Value::from("x/a x/b tcp/80 4"), &Value::from("allowed"))
    );
    assert_eq!(lines[1]["verdict"], "denied");
    assert!(
        lines[2]["error"]
            .as_str()
            .is_some_and(|e| e.contains("x/nope")),
        "{out}"
    );

    // The connection a opened to b, at both ends.
    if open_conn {
        let doc = w.json(&["inspect", "conntrack", "--pod", "x/b"]);
        let conns = doc["connections"].as_array().expect("connections");
        let at_b = conns
            .iter()
            .find(|c| {
                c["peer_pod"] == "x/a"
                    && c["local_port"] == 80
                    && c["protocol"] == "TCP"
                    && c["tcp_state"] == "established"
            })
            .unwrap_or_else(|| panic!("a's open connection missing at b: {doc:#}"));
        assert_eq!(at_b["pod"], "x/b");
        assert_eq!(at_b["origin"], "ingress");
        assert_eq!(at_b["admitted_by"], "pass_policy");
        assert_eq!(at_b["expired"], false);
        assert!(
            conns.iter().all(|c| c["pod"] == "x/b"),
            "--pod filters: {doc:#}"
        );
        let doc = w.json(&["inspect", "conntrack", "--pod", "x/a"]);
        let at_a = doc["connections"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|c| c["peer_pod"] == "x/b" && c["peer_port"] == 80)
                    .cloned()
            })
            .unwrap_or_else(|| panic!("a's connection missing at a: {doc:#}"));
        assert_eq!(at_a["origin"], "egress");
        assert_eq!(at_a["admitted_by"], "pass_not_isolated");
    }

    // Counters: the denied probes and the allowed ones were counted.
    let doc = w.json(&["inspect", "counters"]);
    let count = |dir: &str, reason: &str| {
        doc.as_array()
            .map(|l| {
                l.iter()
                    .filter(|c| c["direction"] == dir && c["reason"] == reason)
                    .filter_map(|c| c["packets"].as_u64())
                    .sum::<u64>()
            })
            .unwrap_or_default()
    };
    assert!(count("ingress", "pass_policy") > 0, "{doc:#}");
    assert!(count("ingress", "drop_policy") > 0, "{doc:#}");
    assert!(count("egress", "drop_policy") > 0, "{doc:#}");
}

#[test]
fn inspect_and_explain_name_pods_and_rules_from_live_maps_and_outlive_the_agent() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    // The kernel agrees with explain's verdicts.
    let mut cases = Vec::new();
    for fam in [0usize, 1] {
        let (a, b) = (w.a.addresses()[fam], w.b.addresses()[fam]);
        let at = |ip: IpAddr, port| SocketAddr::new(ip, port);
        cases.push(Case::echo(&w.a.ns, Proto::Tcp, at(b, 80), true));
        cases.push(Case::echo(&w.a.ns, Proto::Tcp, at(b, 81), false));
        cases.push(Case::echo(&w.c.ns, Proto::Tcp, at(b, 80), false));
        cases.push(Case::echo(&w.c.ns, Proto::Tcp, at(a, 80), false));
        cases.push(Case::echo(&w.b.ns, Proto::Udp, at(a, 80), true));
    }
    expect("probes", cases);
    let conn = connect(&w.a.ns, SocketAddr::new(w.b.v4, 80));
    assert!(exchange(
        &conn,
        "hello\n",
        std::time::Duration::from_secs(3)
    ));

    check_inspect_and_explain(&w, true);

    // A table is printed by default.
    let (code, out) = netpol(
        w.bpffs.path(),
        &w.state.0,
        &["explain", "x/a", "x/b", "tcp/80"],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("ALLOWED") && out.contains("x/b-from-a: spec.ingress[0]"),
        "{out}"
    );
    let (_, out) = netpol(w.bpffs.path(), &w.state.0, &["inspect", "endpoints"]);
    assert!(
        out.contains("isolated (x/b-from-a)") && out.contains(&w.b.host_if),
        "{out}"
    );

    // Killed: the programs, maps and state file stay, and so do the answers.
    w.agent.kill();
    assert!(w.state.0.join("state.json").exists());
    check_inspect_and_explain(&w, true);
    drop(conn);
}

#[test]
fn a_cluster_network_policy_is_shown_in_tiers_and_explain_names_its_decisions() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    // Admin for b: TCP 81 passed (to x/b-from-a, which allows only TCP
    // 80), everything from c denied.
    w._manifests
        .write("20-guard.yaml", &guard_manifest("b", 81, "c"));
    w.agent
        .wait_enforced(&w._manifests, &[&w.a.host_if, &w.b.host_if, &w.c.host_if]);
    wait_state(&w.state.0, &w.agent.fingerprint(&w._manifests), 3);
    let mut cases = Vec::new();
    for fam in [0usize, 1] {
        let b = w.b.addresses()[fam];
        let at = |port| SocketAddr::new(b, port);
        cases.push(Case::echo(&w.a.ns, Proto::Tcp, at(80), true));
        cases.push(Case::echo(&w.a.ns, Proto::Tcp, at(81), false));
        cases.push(Case::echo(&w.c.ns, Proto::Tcp, at(80), false));
    }
    expect("probes", cases);

    for fam in [4, 6] {
        let (code, e) = w.explain("x/c", "x/b", "tcp/80", fam);
        assert_eq!(code, 1, "{e:#}");
        let ing = &e["ingress"];
        assert_eq!(ing["decision"]["stage"], "admin", "{e:#}");
        assert!(
            ing["text"].as_str().is_some_and(|t| t.starts_with(
                "denied by ClusterNetworkPolicy guard (Admin): spec.ingress[1] (Deny)"
            )),
            "{e:#}"
        );
        let (code, e) = w.explain("x/a", "x/b", "tcp/81", fam);
        assert_eq!(code, 1, "{e:#}");
        assert!(
            e["ingress"]["text"].as_str().is_some_and(|t| t.starts_with(
                "passed by ClusterNetworkPolicy guard (Admin): spec.ingress[0]; then denied: \
                 NetworkPolicy isolates the pod"
            )),
            "{e:#}"
        );
        let (code, e) = w.explain("x/a", "x/b", "tcp/80", fam);
        assert_eq!(code, 0, "{e:#}");
        assert_eq!(e["ingress"]["decision"]["stage"], "network_policy");
        assert!(
            e["ingress"]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("allowed by x/b-from-a: spec.ingress[0]")),
            "{e:#}"
        );
    }

    let doc = w.json(&["inspect", "policy", "x/b", "--ingress"]);
    let dir = &doc["directions"][0];
    assert_eq!(dir["cluster_policies"][0]["name"], "guard", "{doc:#}");
    assert_eq!(dir["cluster_policies"][0]["tier"], "Admin", "{doc:#}");
    let (code, out) = netpol(
        w.bpffs.path(),
        &w.state.0,
        &["inspect", "policy", "x/b", "--ingress"],
    );
    assert_eq!(code, 0, "{out}");
    for want in [
        "ingress: judged in tiers",
        "Admin: ClusterNetworkPolicy guard (priority 1)",
        "NetworkPolicy: x/b-from-a",
        "Baseline: -",
        "denied by ClusterNetworkPolicy guard (Admin): spec.ingress[1] (Deny)",
        "passed by ClusterNetworkPolicy guard (Admin): spec.ingress[0]; then denied: \
         NetworkPolicy isolates the pod",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    // Only a NetworkPolicy except makes an entry of rule set 1 an except.
    assert!(!out.contains("except of"), "{out}");
    w.agent.kill();
}
