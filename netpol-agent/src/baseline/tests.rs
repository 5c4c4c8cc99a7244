use super::*;

const CASE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.1.1.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIPs: [{ip: 10.1.1.2}, {ip: "fd01::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.2.2}, {ip: "fd02::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: r, namespace: x, labels: {app: b}}
spec: {nodeName: other, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.9.0.2}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-in, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: b}}}]
      ports: [{port: 80}, {port: http}]
    - from: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-out, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80, endPort: 90}]}]
"#;

fn snap() -> Snapshot {
    crate::test_support::snapshot(CASE)
}

fn set_of<'a>(ipset: &'a str, name: &str) -> Vec<&'a str> {
    // Entries are added to the temporary set just before it is swapped
    // with `name`.
    let lines: Vec<&str> = ipset.lines().collect();
    let swap = lines
        .iter()
        .position(|l| l.starts_with("swap ") && l.ends_with(&format!(" {name}")))
        .unwrap_or_else(|| panic!("no swap into {name}"));
    let flush = lines[..swap]
        .iter()
        .rposition(|l| l.starts_with("flush "))
        .unwrap_or(0);
    lines[flush + 1..swap]
        .iter()
        .filter_map(|l| l.strip_prefix("add "))
        .map(|l| l.split_once(' ').map_or(l, |(_, e)| e))
        .collect()
}

#[test]
fn shapes_follow_kube_router() {
    let b = generate(&snap()).expect("generate");
    let t = &b.v4.iptables;
    assert!(t.starts_with("*filter\n") && t.ends_with("COMMIT\n"), "{t}");
    for builtin in ["INPUT", "FORWARD", "OUTPUT"] {
        assert!(
            t.lines().any(|l| l.starts_with(&format!("-A {builtin} "))
                && l.ends_with(&format!("-j KUBE-ROUTER-{builtin}"))),
            "{builtin} jumps to kube-router's chain"
        );
    }
    // Two local pods, both isolated: one pod chain each, jumped from
    // the forward chain by destination (a, ingress) and source (b,
    // egress). The remote pod gets none.
    let pod_chains: Vec<&str> = t
        .lines()
        .filter_map(|l| l.strip_prefix(":KUBE-POD-FW-"))
        .collect();
    assert_eq!(pod_chains.len(), 2, "{t}");
    assert!(
        t.lines().any(|l| l.starts_with("-A KUBE-ROUTER-FORWARD ")
            && l.contains(" -d 10.1.1.2 -j KUBE-POD-FW-"))
    );
    assert!(
        t.lines().any(|l| l.starts_with("-A KUBE-ROUTER-FORWARD ")
            && l.contains(" -s 10.1.2.2 -j KUBE-POD-FW-"))
    );
    assert!(!t.contains("10.9.0.2 -j"), "the remote pod has no chain");
    // In each pod chain: the common rules (established, ICMP) first,
    // drop of the unmarked last but the mark reset.
    for c in &pod_chains {
        let name = format!("KUBE-POD-FW-{}", c.trim_end_matches(" - [0:0]"));
        let rules: Vec<&str> = t
            .lines()
            .filter(|l| l.starts_with(&format!("-A {name} ")))
            .collect();
        assert!(rules[0].ends_with("-j KUBE-NWPLCY-COMMON"), "{rules:?}");
        assert!(
            rules.iter().any(|r| r.contains("-j KUBE-NWPLCY-")),
            "{rules:?}"
        );
        let n = rules.len();
        assert!(
            rules[n - 2].ends_with("-m mark ! --mark 0x10000/0x10000 -j DROP"),
            "{rules:?}"
        );
        assert!(
            rules[n - 1].ends_with("-j MARK --set-mark 0/0x10000"),
            "{rules:?}"
        );
    }
    // Policy chains mark then return, matching sets and ports.
    assert!(t.contains(" -m set --match-set KUBE-SRC-"));
    assert!(t.contains("-p tcp -m tcp --dport 80 -j MARK --set-xmark 0x10000/0x10000"));
    assert!(
        t.contains("-p tcp -m tcp --dport 8080 -j MARK"),
        "named port resolved"
    );
    assert!(
        t.contains("-p tcp -m tcp --dport 80:90 -j MARK"),
        "port range"
    );
    assert!(t.contains("-m mark --mark 0x10000/0x10000 -j RETURN"));
    // Every referenced set is created by the ipset text.
    for l in b.v4.iptables.lines() {
        for w in l.split(" --match-set ").skip(1) {
            let set = w.split(' ').next().unwrap_or_default();
            assert!(
                b.v4.ipset.contains(&format!("create {set} ")),
                "{set} not created"
            );
        }
    }
    let common: Vec<&str> = t
        .lines()
        .filter(|l| l.starts_with("-A KUBE-NWPLCY-COMMON "))
        .collect();
    assert!(
        common[0].ends_with("--ctstate INVALID -j DROP"),
        "{common:?}"
    );
    assert!(
        common[1].ends_with("--ctstate RELATED,ESTABLISHED -j ACCEPT"),
        "{common:?}"
    );
    assert!(
        b.v6.iptables
            .contains("-p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT"),
        "IPv6 neighbour solicitations pass"
    );
    assert_eq!(b.v4.stats.chains, 4 + 2 + 2);
}

#[test]
fn sets_hold_pods_and_blocks_per_family() {
    let b = generate(&snap()).expect("generate");
    let ip4 = &b.v4.ipset;
    let dst = format!("KUBE-DST-{}", hash(&["x", "a-in", "ingress"]));
    assert_eq!(set_of(ip4, &dst), ["10.1.1.2"]);
    // Peers: b on this node and r elsewhere, both.
    let src = format!("KUBE-SRC-{}", hash(&["x", "a-in", "in", "0"]));
    assert_eq!(set_of(ip4, &src), ["10.1.2.2", "10.9.0.2"]);
    // 0.0.0.0/0 split in halves (hash:net refuses /0), the except as
    // nomatch.
    let block = format!("KUBE-SRC-{}", hash(&["x", "a-in", "in-block", "1"]));
    assert_eq!(
        set_of(ip4, &block),
        ["0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8 nomatch"]
    );
    assert!(ip4.contains(&format!("create {block} hash:net family inet ")));
    assert!(
        ip4.lines().all(|l| !l.contains("fd0")),
        "no IPv6 in the IPv4 sets"
    );
    // IPv6: kube-router's prefix, the family's addresses, the IPv4-only
    // ipBlock absent.
    let ip6 = &b.v6.ipset;
    let src6 = format!("inet6:KUBE-SRC-{}", hash(&["x", "a-in", "in", "0"]));
    assert_eq!(set_of(ip6, &src6), ["fd02::2"]);
    assert!(ip6.contains(&format!("create {src6} hash:ip family inet6 ")));
    assert!(!ip6.contains(&hash(&["x", "a-in", "in-block", "1"])));
    assert!(b.v6.iptables.contains("-d fd01::2 -j KUBE-POD-FW-"));
    // Names fit ipset (31) and iptables (28) limits.
    for l in ip6.lines().filter(|l| l.starts_with("create ")) {
        let name = l.split(' ').nth(1).unwrap_or_default();
        assert!(name.len() <= 31, "{name}");
    }
    for l in b.v6.iptables.lines().filter_map(|l| l.strip_prefix(':')) {
        let name = l.split(' ').next().unwrap_or_default();
        assert!(name.len() <= 28, "{name}");
    }
}

#[test]
fn unisolated_pods_get_no_chain_and_no_local_node_is_an_error() {
    let mut s = snap();
    s.policies.clear();
    let b = generate(&s).expect("generate");
    assert!(!b.v4.iptables.contains("KUBE-POD-FW-"));
    assert_eq!(b.v4.stats.sets, 0);
    s.local_node = None;
    s.nodes.insert(
        "n2".into(),
        crate::model::Node {
            name: "n2".into(),
            addresses: Vec::new(),
        },
    );
    assert_eq!(generate(&s), Err(BaselineError::NoLocalNode));
}

#[test]
fn rendering_is_deterministic() {
    assert_eq!(generate(&snap()), generate(&snap()));
}
