//! Enforcement with real sockets: two pod netns routed through a node netns,
//! programs on both host veths, policies compiled and written by the
//! production path. Both families.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use netpol_agent::{
    Datapath,
    compiler::{self, Compiled, IdAllocation},
    model::ObjectRef,
};
use netpol_testkit::{
    Netns,
    datapath::TempBpffs,
    echo::{self, exchange},
    privileged, sh,
    topology::{self, Topology},
};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status:
  addresses:
    - {type: InternalIP, address: 10.1.1.1}
    - {type: InternalIP, address: "fd01::1"}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.1.2}, {ip: "fd01::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.2.2}, {ip: "fd02::2"}]}
---
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
  egress: [{to: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80}]}]
"#;

struct Pod {
    ns: Netns,
    host_if: String,
    v4: &'static str,
    v6: &'static str,
}

/// A pod netns behind its own veth, routed by the node: the node side gets
/// `.1` / `::1` of the pod's subnet, the pod a default route through it.
fn pod(node: &Netns, subnet: u8, v4: &'static str, v6: &'static str) -> Pod {
    let p = topology::subnet_pod(
        node,
        (&format!("10.1.{subnet}.1"), v4),
        Some((&format!("fd0{subnet}::1"), v6)),
    );
    Pod {
        ns: p.ns,
        host_if: p.host_if,
        v4,
        v6,
    }
}

/// A forwarding node netns with pods a (10.1.1.2, fd01::2) and b
/// (10.1.2.2, fd02::2) routed through it.
fn routed_pair() -> (Netns, Pod, Pod) {
    let node = topology::node(Topology::Routed, true);
    let a = pod(&node, 1, "10.1.1.2", "fd01::2");
    let b = pod(&node, 2, "10.1.2.2", "fd02::2");
    (node, a, b)
}

/// How long a probe waits for its handshake. A blocked SYN is dropped, so
/// a failure is this timeout; an allowed one may first wait for neighbour
/// discovery (about a second on a fresh link).
const CONNECT: Duration = Duration::from_millis(2500);

/// Whether a TCP connection from `from` to `to:port` exchanges a line.
fn connects(from: &Netns, to: &str, port: u16) -> bool {
    echo::connects(from, to, port, CONNECT)
}

#[test]
fn policy_is_enforced_on_real_connections_over_both_families() {
    if !privileged() {
        return;
    }
    let (node, a, b) = routed_pair();
    for p in [&a, &b] {
        echo::serve(&p.ns, &[p.v4, p.v6], 80);
        echo::serve(&p.ns, &[p.v4, p.v6], 81);
    }
    // Before any policy, everything connects (the topology works).
    for (from, to) in [(&b.ns, a.v4), (&b.ns, a.v6), (&a.ns, b.v4), (&a.ns, b.v6)] {
        assert!(connects(from, to, 81), "no policy yet: {to}:81 unreachable");
    }

    let compiled = compile(MANIFESTS, &IdAllocation::default());

    let bpffs = TempBpffs::new();
    node.run(|| {
        let (dp, _) = enforce(&bpffs, &a, &b, &compiled);
        // Forget every neighbour so that IPv6 must resolve them again
        // through the programs, under deny-all.
        for p in [&a, &b] {
            sh("ip", &["neigh", "flush", "dev", &p.host_if]);
            p.ns.exec("ip", &["neigh", "flush", "dev", "eth0"]);
        }

        let cases = [
            (
                "b->a:80 v6 (allowed both ends, ND under deny-all)",
                &b.ns,
                a.v6,
                80,
                true,
            ),
            ("b->a:80 v4 (allowed both ends)", &b.ns, a.v4, 80, true),
            ("b->a:81 v4 (port not allowed)", &b.ns, a.v4, 81, false),
            ("b->a:81 v6 (port not allowed)", &b.ns, a.v6, 81, false),
            ("a->b:80 v4 (a's egress denies)", &a.ns, b.v4, 80, false),
            ("a->b:80 v6 (a's egress denies)", &a.ns, b.v6, 80, false),
            ("node->a:81 v4 (kubelet probe)", &node, a.v4, 81, true),
            ("node->a:81 v6 (kubelet probe)", &node, a.v6, 81, true),
            ("node->b:80 v6 (kubelet probe)", &node, b.v6, 80, true),
        ];
        // Probes run in parallel: each blocked one waits out its timeout.
        let table: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = cases
                .iter()
                .map(|&(what, from, to, port, want)| {
                    s.spawn(move || {
                        let got = connects(from, to, port);
                        (got != want).then(|| format!("{what}: expected {want}, got {got}"))
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().expect("probe thread"))
                .collect()
        });
        assert!(
            table.is_empty(),
            "connections differ:\n{}",
            table.join("\n")
        );

        // Neighbour discovery went through both programs of a's veth.
        let neigh = sh("ip", &["-6", "neigh", "show", "dev", &a.host_if]);
        assert!(
            neigh.contains("fd01::2") && neigh.contains("lladdr"),
            "{neigh}"
        );
        let c = dp.counters().expect("counters");
        let control = c
            .entries
            .iter()
            .filter(|e| e.reason == netpol_common::reason::PASS_ICMPV6_CONTROL)
            .map(|e| e.value.packets)
            .sum::<u64>();
        assert!(control >= 2, "ND packets counted: {control}");
        let dropped = c
            .entries
            .iter()
            .filter(|e| e.reason == netpol_common::reason::DROP_POLICY)
            .map(|e| e.value.packets)
            .sum::<u64>();
        assert!(dropped >= 4, "policy drops counted: {dropped}");
    });
}

/// [`netpol_testkit::datapath::enforce`] for pods a and b, bound to their host veths.
fn enforce(
    bpffs: &TempBpffs,
    a: &Pod,
    b: &Pod,
    compiled: &Compiled,
) -> (Datapath, BTreeMap<ObjectRef, u32>) {
    netpol_testkit::datapath::enforce(
        bpffs,
        compiled,
        &[
            (ObjectRef::new("x", "a"), &a.host_if),
            (ObjectRef::new("x", "b"), &b.host_if),
        ],
    )
}

fn compile(manifests: &str, ids: &IdAllocation) -> Compiled {
    compiler::compile(&netpol_testkit::manifests::snapshot(manifests), ids)
}

#[test]
fn removing_the_allowing_policy_cuts_established_connections_within_a_second() {
    if !privileged() {
        return;
    }
    let (node, a, b) = routed_pair();
    echo::serve(&a.ns, &[a.v4, a.v6], 80);
    let before = compile(MANIFESTS, &IdAllocation::default());
    // a's rule now admits b on port 81 only.
    let ingress_80 =
        "ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}]}]";
    assert!(MANIFESTS.contains(ingress_80));
    let without_rule = MANIFESTS.replace(ingress_80, &ingress_80.replace("80", "81"));
    let after = compile(&without_rule, &before.ids);
    assert_ne!(
        before.endpoints[&ObjectRef::new("x", "a")]
            .info()
            .ingress_gen,
        after.endpoints[&ObjectRef::new("x", "a")]
            .info()
            .ingress_gen,
        "a's ingress generation moves with its policy"
    );

    let bpffs = TempBpffs::new();
    node.run(|| {
        let (mut dp, ifaces) = enforce(&bpffs, &a, &b, &before);

        let conns: Vec<TcpStream> = [a.v4, a.v6]
            .iter()
            .map(|to| {
                let ip: IpAddr = to.parse().expect("address");
                b.ns.run(|| {
                    TcpStream::connect_timeout(&SocketAddr::new(ip, 80), Duration::from_secs(3))
                        .expect("b connects to a:80 while allowed")
                })
            })
            .collect();
        for c in &conns {
            assert!(exchange(c, "before\n", Duration::from_secs(3)));
        }

        let ops: Vec<_> = compiler::diff(&before, &after).raw().collect();
        dp.writer().apply(&ops, &ifaces).expect("apply the removal");
        for (c, fam) in conns.iter().zip(["ipv4", "ipv6"]) {
            assert!(
                !exchange(c, "after\n", Duration::from_secs(1)),
                "{fam}: the connection still carries data after its rule went"
            );
        }
        let revoked: u64 = dp
            .counters()
            .expect("counters")
            .entries
            .iter()
            .filter(|e| e.reason == netpol_common::reason::DROP_REVOKED)
            .map(|e| e.value.packets)
            .sum();
        assert!(revoked >= 2, "revoked drops counted: {revoked}");
    });
}
