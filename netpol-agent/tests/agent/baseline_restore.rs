//! The kube-router-style baseline the benchmarks compare against: its texts
//! restore with the real tools (legacy and nft iptables, ipset) and give
//! the same verdicts as netpol on real connections between two routed pod
//! namespaces, both families.
use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use netpol_agent::{
    compiler::{self, IdAllocation},
    model::{ObjectRef, Snapshot},
};
use netpol_testkit::{
    Netns,
    baseline::{
        self,
        restore::{self, Backend},
    },
    datapath::{TempBpffs, enforce},
    echo,
    manifests::{BASE, pod_manifest},
    privileged, sh,
    topology::{Pod, Topology, node, pod},
};

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-b-80, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-to-a-80, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80}, {port: 82}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-outside-82, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.1.2.0/24]}}, {ipBlock: {cidr: "::/0"}}], ports: [{port: 82}]}]
"#;

fn snapshot(a: &Pod, b: &Pod) -> Snapshot {
    let text = format!(
        "{}---\n{}---\n{}---\n{POLICIES}",
        BASE,
        pod_manifest("a", a),
        pod_manifest("b", b)
    );
    netpol_testkit::manifests::snapshot(&text)
}

/// A denied probe waits this long before it counts as a denial.
const CONNECT: Duration = Duration::from_millis(1500);

/// Every case, probed in parallel: (label, verdict).
fn verdicts(node: &Netns, a: &Pod, b: &Pod) -> BTreeMap<String, bool> {
    let mut cases: Vec<(String, &Netns, IpAddr, u16)> = Vec::new();
    for fam in 0..2 {
        let (av, bv) = (a.addresses()[fam], b.addresses()[fam]);
        for port in [80, 81, 82] {
            cases.push((format!("b->a:{port} {av}"), &b.ns, av, port));
            cases.push((format!("a->b:{port} {bv}"), &a.ns, bv, port));
            cases.push((format!("node->a:{port} {av}"), node, av, port));
        }
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(label, from, to, port)| {
                s.spawn(move || (label.clone(), echo::connects(from, to, *port, CONNECT)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    })
}

#[test]
fn baseline_restores_on_both_backends_and_agrees_with_netpol() {
    if !privileged() {
        return;
    }
    let node = node(Topology::Routed, true);
    let a = pod(&node, Topology::Routed, 1, true);
    let b = pod(&node, Topology::Routed, 2, true);
    for p in [&a, &b] {
        for port in [80, 81, 82] {
            echo::serve(&p.ns, &p.addresses(), port);
        }
    }
    let snap = snapshot(&a, &b);
    let open = verdicts(&node, &a, &b);
    assert!(open.values().all(|v| *v), "no policy yet: {open:?}");

    // netpol, through the production compiler and map writer.
    let compiled = compiler::compile(&snap, &IdAllocation::default());
    let bpffs = TempBpffs::new();
    let with_netpol = node.run(|| {
        let (dp, _) = enforce(
            &bpffs,
            &compiled,
            &[
                (ObjectRef::new("x", "a"), &a.host_if),
                (ObjectRef::new("x", "b"), &b.host_if),
            ],
        );
        let v = verdicts(&node, &a, &b);
        // Dropping the datapath detaches its programs.
        drop(dp);
        v
    });
    // The expected table, spelled out: what the policies say (b's IPv4
    // address is excepted from a's port 82 ipBlock, its IPv6 one is not).
    for (label, got) in &with_netpol {
        let want = label.starts_with("b->a:80")
            || label.starts_with("node->a:")
            || label.starts_with("b->a:82 fd");
        assert_eq!(*got, want, "netpol: {label}");
    }

    let rules = baseline::generate(&snap).expect("generate");
    for backend in Backend::ALL {
        node.run(|| restore::sync(&rules, backend))
            .unwrap_or_else(|e| panic!("{}: {e}", backend.name()));
        // A second sync over the first, as every later kube-router sync.
        node.run(|| restore::sync(&rules, backend))
            .unwrap_or_else(|e| panic!("{} resync: {e}", backend.name()));
        let listed = node.exec("ipset", &["list", "-n"]);
        assert!(
            listed.lines().any(|l| l.starts_with("KUBE-DST-")),
            "{listed}"
        );
        assert!(
            listed.lines().any(|l| l.starts_with("inet6:KUBE-SRC-")),
            "{listed}"
        );
        let saved = node.exec(&format!("iptables-{}-save", backend.name()), &[]);
        assert!(saved.contains("-j KUBE-ROUTER-FORWARD"), "{saved}");
        let got = verdicts(&node, &a, &b);
        assert_eq!(
            got,
            with_netpol,
            "{} baseline differs from netpol",
            backend.name()
        );
        node.run(restore::clear).expect("clear");
        let saved = node.exec(&format!("iptables-{}-save", backend.name()), &[]);
        assert!(!saved.contains("KUBE-"), "{saved}");
        assert_eq!(
            sh("ip", &["netns", "exec", &node.name, "ipset", "list", "-n"]),
            ""
        );
    }
}
