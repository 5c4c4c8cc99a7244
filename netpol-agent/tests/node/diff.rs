//! `netpol-agent diff` against a running agent: the verdict changes and
//! the tracked connections it predicts for a policy not yet applied are
//! exactly what applying it then does to real connections.
use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use netpol_testkit::{
    echo::{connect, echo, exchange},
    manifests::{BASE, Manifests, pod_manifest},
    process::{AgentProcess, NodeBed},
};

use crate::AGENT;

/// Ingress of `a` from `c` on TCP 80 only.
const A_FROM_C: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-c, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: c}}}], ports: [{port: 80}]}]
"#;

#[test]
fn diff_predicts_the_verdicts_and_the_connections_applying_a_policy_changes() {
    let Some(bed) = NodeBed::routed("diff", 3) else {
        return;
    };
    let (node, bpffs, pods) = (&bed.node, &bed.bpffs, &bed.pods);
    let [a, b, c] = &pods[..] else { unreachable!() };
    echo(a, 80);
    let m = Manifests::new();
    m.write("00-base.yaml", BASE);
    for (name, p) in [("a", &a), ("b", &b), ("c", &c)] {
        m.write(&format!("{name}.yaml"), &pod_manifest(name, p));
    }
    let mut agent = AgentProcess::start(AGENT.as_ref(), node, bpffs.path(), &m, "n1", &[]);
    agent.wait_enforced(&m, &[&a.host_if, &b.host_if, &c.host_if]);

    // Open connections from b and c to a, both families: nothing
    // isolates a yet.
    let mut open: Vec<(&str, TcpStream)> = Vec::new();
    for (name, from) in [("b", &b), ("c", &c)] {
        for to in [a.v4, a.v6.expect("dual-stack")] {
            let s = connect(&from.ns, SocketAddr::new(to, 80));
            assert!(
                exchange(&s, "hi\n", Duration::from_secs(2)),
                "{name} -> {to}"
            );
            open.push((name, s));
        }
    }

    // The change, in a folder of its own, not applied.
    let changes = Manifests::new();
    let cli = agent.cli();
    changes.write("a-from-c.yaml", A_FROM_C);
    let diff = |format: &str| {
        let (cluster, manifests) = (m.0.to_string_lossy(), changes.0.to_string_lossy());
        let out = cli.run(&[
            "diff",
            "--cluster",
            &cluster,
            "--manifests",
            &manifests,
            "-o",
            format,
        ]);
        assert_eq!(out.status.code(), Some(1), "something changes: {out:?}");
        out
    };
    let table = String::from_utf8_lossy(&diff("table").stdout).into_owned();
    eprintln!("{table}");
    assert!(
        table.starts_with("verdicts on n1 that would change:\n")
            && table.contains("\ntracked connections that would be cut:\n"),
        "{table}"
    );
    let out = diff("json");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("diff -o json: {e}: {out:?}"));

    // Verdicts: b loses a entirely, c keeps TCP 80 only, in both families.
    let rows: BTreeSet<String> = doc["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .map(|r| {
            format!(
                "{} -> {} IPv{} {} {}-{}: {} -> {}",
                r["src_pod"].as_str().unwrap_or_default(),
                r["dst_pod"].as_str().unwrap_or_default(),
                r["family"],
                r["protocol"].as_str().unwrap_or_default(),
                r["first"],
                r["last"],
                r["now"].as_str().unwrap_or_default(),
                r["after"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    let mut want = BTreeSet::new();
    for family in [4, 6] {
        for (src, ports) in [
            ("x/b", "TCP 0-65535"),
            ("x/b", "UDP 0-65535"),
            ("x/b", "SCTP 0-65535"),
            ("x/c", "TCP 0-79"),
            ("x/c", "TCP 81-65535"),
            ("x/c", "UDP 0-65535"),
            ("x/c", "SCTP 0-65535"),
        ] {
            want.insert(format!(
                "{src} -> x/a IPv{family} {ports}: allowed -> denied"
            ));
        }
    }
    assert_eq!(rows, want, "{doc:#}");

    // The connections it says would be cut, by their client's socket.
    let predicted: BTreeSet<SocketAddr> = doc["cut"]
        .as_array()
        .expect("cut")
        .iter()
        .map(|r| {
            let at = |a: &str, p: &str| {
                SocketAddr::new(
                    r[a].as_str().and_then(|s| s.parse().ok()).expect("address"),
                    u16::try_from(r[p].as_u64().expect("port")).expect("port"),
                )
            };
            // Entries are oriented from the pod holding them.
            if r["origin"] == "ingress" {
                at("peer_address", "peer_port")
            } else {
                at("local_address", "local_port")
            }
        })
        .collect();
    assert_eq!(predicted.len(), 2, "{doc:#}");

    // Apply it: exactly those connections stop carrying data.
    m.write("a-from-c.yaml", A_FROM_C);
    agent.wait_enforced(&m, &[&a.host_if, &b.host_if, &c.host_if]);
    let mut cut = BTreeSet::new();
    for (name, s) in &open {
        let client = s.local_addr().expect("local address");
        let alive = exchange(s, "again\n", Duration::from_secs(2));
        assert_eq!(alive, *name == "c", "{name} ({client}) after the change");
        if !alive {
            cut.insert(client);
        }
    }
    assert_eq!(predicted, cut, "{doc:#}");
}
