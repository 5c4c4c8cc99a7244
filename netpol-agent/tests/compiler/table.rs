//! Table tests: one per behaviour of the compiler's specification.

use netpol_agent::compiler::{
    Changes, Compiled, Compiler, Direction, EMPTY_RULESET, IdAllocation, MapState, Op, compile,
    diff,
};
use netpol_agent::model::manifests::{LoadReport, apply_str};
use netpol_agent::model::{Kind, ObjectRef, Snapshot};
use netpol_common::endpoint_flags;
use netpol_testkit::compiler::{ICMP, simulate, simulate_connection};

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;

fn pod_yaml(ns: &str, name: &str, labels: &str, n: u8, node: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, uid: {ns}-{name}, labels: {{{labels}}}}}
spec:
  nodeName: {node}
  containers:
    - name: c
      ports:
        - {{name: http, containerPort: {http}, protocol: TCP}}
        - {{name: dns, containerPort: 53, protocol: UDP}}
        - {{name: assoc, containerPort: 9000, protocol: SCTP}}
  {extra}
status:
  phase: Running
  podIPs: [{{ip: 10.0.0.{n}}}, {{ip: "fd00::{n}"}}]
---
"#,
        http = 8000 + u16::from(n),
    )
}

/// Node `n1`; namespaces `x` (team=a) and `y` (team=b); pods x/a, x/b, y/a
/// on n1 and y/r on n2 (remote). Pod `n` has 10.0.0.n and fd00::n, and its
/// port `http` is 8000+n.
fn base() -> String {
    let mut s = String::from(
        r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.168.0.1}, {type: Hostname, address: n1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: b}}
---
"#,
    );
    s += &pod_yaml("x", "a", "app: web", 1, "n1", "");
    s += &pod_yaml("x", "b", "app: db", 2, "n1", "");
    s += &pod_yaml("y", "a", "app: web", 3, "n1", "");
    s += &pod_yaml("y", "r", "app: db", 4, "n2", "");
    s
}

fn snapshot(extra: &str) -> Snapshot {
    let mut s = Snapshot::default();
    let mut r = LoadReport::default();
    apply_str(&mut s, &base(), "base", &mut r);
    apply_str(&mut s, extra, "test", &mut r);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    s
}

fn compiled(extra: &str) -> (Snapshot, Compiled, MapState) {
    let s = snapshot(extra);
    let c = compile(&s, &IdAllocation::default());
    let m = c.map_state();
    (s, c, m)
}

fn conn(s: &Snapshot, m: &MapState, src: &str, dst: &str, v6: bool, proto: u8, port: u16) -> bool {
    let p = |r: &str| {
        let (ns, n) = r.split_once('/').unwrap();
        &s.pods[&ObjectRef::new(ns, n)]
    };
    simulate_connection(m, p(src), p(dst), v6, proto, port)
}

fn dir(m: &MapState, pod: &str, d: Direction, peer: &str, proto: u8, port: u16) -> bool {
    let (ns, n) = pod.split_once('/').unwrap();
    simulate(
        m,
        &ObjectRef::new(ns, n),
        d,
        peer.parse().unwrap(),
        proto,
        port,
    )
}

fn errors(c: &Compiled) -> Vec<String> {
    c.errors.iter().map(ToString::to_string).collect()
}

const DENY_INGRESS_X: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {}}
"#;

#[test]
fn missing_policy_types_mean_ingress_only_without_egress_rules() {
    let (_, c, _) = compiled(DENY_INGRESS_X);
    let e = &c.endpoints[&ObjectRef::new("x", "a")];
    assert!(e.ingress_isolated && !e.egress_isolated);
}

#[test]
fn missing_policy_types_add_egress_when_egress_rules_exist() {
    let (_, c, _) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, egress: [{ports: [{port: 53, protocol: UDP}]}]}
"#,
    );
    let e = &c.endpoints[&ObjectRef::new("x", "a")];
    assert!(e.ingress_isolated && e.egress_isolated);
}

#[test]
fn pod_not_selected_by_any_policy_is_not_isolated() {
    let (_, c, m) = compiled(DENY_INGRESS_X);
    let e = &c.endpoints[&ObjectRef::new("y", "a")];
    assert!(!e.ingress_isolated && !e.egress_isolated);
    assert!(dir(&m, "y/a", Direction::Ingress, "1.2.3.4", ICMP, 0));
}

#[test]
fn empty_ingress_list_allows_nothing() {
    let (s, _, m) = compiled(DENY_INGRESS_X);
    assert!(!conn(&s, &m, "y/a", "x/a", false, TCP, 8001));
    assert!(!conn(&s, &m, "x/b", "x/a", true, TCP, 8001));
    assert!(
        conn(&s, &m, "x/a", "x/a", false, TCP, 8001),
        "a pod always reaches itself"
    );
    assert!(conn(&s, &m, "x/a", "y/a", false, TCP, 8003));
}

#[test]
fn missing_protocol_defaults_to_tcp() {
    let (s, _, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}
"#,
    );
    assert!(conn(&s, &m, "y/a", "x/a", false, TCP, 80));
    assert!(!conn(&s, &m, "y/a", "x/a", false, UDP, 80));
}

#[test]
fn empty_from_and_ports_allow_every_peer_port_and_icmp() {
    let (_, _, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{}], egress: [{to: [], ports: []}], policyTypes: [Ingress, Egress]}
"#,
    );
    for peer in ["8.8.8.8", "2001:db8::1", "10.0.0.4"] {
        assert!(dir(&m, "x/a", Direction::Ingress, peer, ICMP, 0));
        assert!(dir(&m, "x/a", Direction::Egress, peer, SCTP, 7));
    }
}

#[test]
fn end_port_less_than_port_is_rejected_naming_object_and_field() {
    let (_, c, _) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  ingress:
    - ports: [{port: 80}]
    - ports: [{port: 90, endPort: 85}]
"#,
    );
    assert_eq!(
        errors(&c),
        vec!["x/deny-all: spec.ingress[1].ports[0].endPort: less than port"]
    );
    assert!(!c.endpoints[&ObjectRef::new("x", "a")].ingress_isolated);
}

#[test]
fn invalid_peers_and_ports_are_rejected_with_their_fields() {
    let (_, c, _) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: x}
spec:
  podSelector: {}
  egress:
    - to:
        - ipBlock: {cidr: 10.0.0.0/24, except: [10.1.0.0/28, "fd00::/120", 10.0.0.0/24]}
        - ipBlock: {cidr: 10.0.0.0/8}
          podSelector: {}
      ports: [{port: http, endPort: 90}, {endPort: 90}, {port: 80, protocol: ICMP}]
"#,
    );
    let e = errors(&c);
    for want in [
        "x/bad: spec.egress[0].to[0].ipBlock.except[0]: must be a strict subset of cidr",
        "x/bad: spec.egress[0].to[0].ipBlock.except[1]: not of the family of cidr",
        "x/bad: spec.egress[0].to[0].ipBlock.except[2]: must be a strict subset of cidr",
        "x/bad: spec.egress[0].to[1]: ipBlock may not be combined with podSelector or namespaceSelector",
        "x/bad: spec.egress[0].ports[0].endPort: may not be used with a named port",
        "x/bad: spec.egress[0].ports[1].endPort: requires a numeric port",
    ] {
        assert!(e.iter().any(|l| l == want), "missing {want:?} in {e:#?}");
    }
    assert!(
        e.iter()
            .any(|l| l.starts_with("x/bad: spec.egress[0].ports[2].protocol:"))
    );
}

#[test]
fn new_invalid_policy_is_skipped_and_the_rest_compiles() {
    let (s, c, m) = compiled(&format!(
        "{DENY_INGRESS_X}---\n{}",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: y}
spec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}
"#
    ));
    assert_eq!(c.errors.len(), 1);
    assert!(!c.endpoints[&ObjectRef::new("y", "a")].ingress_isolated);
    assert!(!conn(&s, &m, "y/a", "x/a", false, TCP, 1));
}

#[test]
fn policy_that_becomes_invalid_keeps_its_last_valid_version_in_force() {
    let mut s = snapshot(DENY_INGRESS_X);
    let mut r = LoadReport::default();
    apply_str(
        &mut s,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: 80, endPort: 1}]}]}
"#,
        "update",
        &mut r,
    );
    let c = compile(&s, &IdAllocation::default());
    assert_eq!(c.errors.len(), 1);
    let m = c.map_state();
    assert!(c.endpoints[&ObjectRef::new("x", "a")].ingress_isolated);
    assert!(!conn(&s, &m, "y/a", "x/a", false, TCP, 80));
    // Deleting it drops it, valid version included.
    s.remove(Kind::NetworkPolicy, "x", "deny");
    let c = compile(&s, &IdAllocation::default());
    assert!(c.errors.is_empty());
    assert!(!c.endpoints[&ObjectRef::new("x", "a")].ingress_isolated);
}

#[test]
fn pod_selector_peer_looks_only_in_the_policy_namespace() {
    let (s, _, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]}
"#,
    );
    assert!(conn(&s, &m, "x/a", "x/b", false, TCP, 1));
    assert!(!conn(&s, &m, "y/a", "x/b", false, TCP, 1));
}

#[test]
fn namespace_selector_peer_matches_every_pod_of_matching_namespaces() {
    let (s, _, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {team: b}}}]}]}
"#,
    );
    assert!(conn(&s, &m, "y/a", "x/a", true, UDP, 5));
    assert!(!conn(&s, &m, "x/b", "x/a", true, UDP, 5));
    assert!(
        dir(&m, "x/a", Direction::Ingress, "10.0.0.4", TCP, 1),
        "remote pods are peers"
    );
}

#[test]
fn both_selectors_in_one_peer_match_matching_pods_in_matching_namespaces() {
    let (_, _, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [b]}]}, podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [web]}]}}]}]
"#,
    );
    assert!(dir(&m, "x/a", Direction::Ingress, "10.0.0.4", TCP, 1));
    assert!(!dir(&m, "x/a", Direction::Ingress, "10.0.0.3", TCP, 1));
    assert!(!dir(&m, "x/a", Direction::Ingress, "10.0.0.2", TCP, 1));
}

#[test]
fn exists_and_does_not_exist_selectors() {
    let (_, c, _) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {matchExpressions: [{key: app, operator: Exists}, {key: tier, operator: DoesNotExist}]}}
"#,
    );
    assert!(c.endpoints[&ObjectRef::new("x", "a")].ingress_isolated);
}

#[test]
fn ipblock_except_applies_to_pod_addresses_too() {
    let (s, _, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.2/32]}}, {ipBlock: {cidr: "fd00::/64"}}]}]
  policyTypes: [Egress]
"#,
    );
    assert!(!conn(&s, &m, "x/a", "x/b", false, TCP, 80));
    assert!(conn(&s, &m, "x/a", "x/b", true, TCP, 80));
    assert!(conn(&s, &m, "x/a", "y/a", false, TCP, 80));
    assert!(!dir(&m, "x/a", Direction::Egress, "10.0.1.0", TCP, 80));
}

#[test]
fn ipv4_ipblock_only_gives_no_ipv6_egress() {
    let (_, _, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}]}], policyTypes: [Egress]}
"#,
    );
    assert!(dir(&m, "x/a", Direction::Egress, "255.255.255.255", TCP, 1));
    assert!(!dir(&m, "x/a", Direction::Egress, "fd00::3", TCP, 1));
}

#[test]
fn zero_prefix_cidrs_compile_to_exact_prefix_length_zero() {
    let (_, c, _) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, egress: [{to: [{ipBlock: {cidr: 0.0.0.0/0}}, {ipBlock: {cidr: "::/0", except: ["::/1"]}}]}], policyTypes: [Egress]}
"#,
    );
    assert!(c.policy_v4_entries().any(|(l, _, _)| l == 32));
    assert!(c.policy_v6_entries().any(|(l, _, _)| l == 32));
    assert!(
        c.policy_v6_entries()
            .any(|(l, _, v)| l == 33 && v.ruleset == EMPTY_RULESET)
    );
    assert_eq!(c.policy_v4.len(), 2, "one /0 per endpoint, nothing split");
}

#[test]
fn named_port_resolves_per_destination_pod() {
    let (s, _, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {matchLabels: {app: web}}, egress: [{to: [{namespaceSelector: {}}], ports: [{port: http}]}], policyTypes: [Egress]}
"#,
    );
    assert!(conn(&s, &m, "x/a", "x/b", false, TCP, 8002));
    assert!(!conn(&s, &m, "x/a", "x/b", false, TCP, 8003));
    assert!(conn(&s, &m, "x/a", "y/a", true, TCP, 8003));
    assert!(dir(&m, "x/a", Direction::Egress, "fd00::4", TCP, 8004));
    assert!(!dir(&m, "x/a", Direction::Egress, "fd00::4", TCP, 8002));
}

#[test]
fn named_port_on_ingress_resolves_on_the_selected_pod() {
    let (s, _, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: http}, {port: dns, protocol: UDP}]}]}
"#,
    );
    assert!(conn(&s, &m, "y/a", "x/a", false, TCP, 8001));
    assert!(!conn(&s, &m, "y/a", "x/a", false, TCP, 8002));
    assert!(conn(&s, &m, "y/a", "x/b", false, TCP, 8002));
    assert!(conn(&s, &m, "y/a", "x/b", true, UDP, 53));
    assert!(!conn(&s, &m, "y/a", "x/b", true, TCP, 53));
}

#[test]
fn named_port_through_ipblock_resolves_on_the_pod_inside_and_never_on_unknown_addresses() {
    let (_, _, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {matchLabels: {app: web}}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.3/32]}}], ports: [{port: http}, {port: 1}]}], policyTypes: [Egress]}
"#,
    );
    assert!(dir(&m, "x/a", Direction::Egress, "10.0.0.2", TCP, 8002));
    assert!(!dir(&m, "x/a", Direction::Egress, "10.0.0.2", TCP, 8004));
    assert!(dir(&m, "x/a", Direction::Egress, "10.0.0.4", TCP, 8004));
    assert!(
        !dir(&m, "x/a", Direction::Egress, "10.0.0.3", TCP, 8003),
        "excepted"
    );
    assert!(
        !dir(&m, "x/a", Direction::Egress, "10.0.0.99", TCP, 8002),
        "not a pod"
    );
    assert!(dir(&m, "x/a", Direction::Egress, "10.0.0.99", TCP, 1));
}

#[test]
fn end_port_range_is_split_into_aligned_port_prefixes() {
    let (s, c, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: 1000, endPort: 2000}]}]}
"#,
    );
    for (port, ok) in [
        (999, false),
        (1000, true),
        (1500, true),
        (2000, true),
        (2001, false),
    ] {
        assert_eq!(
            conn(&s, &m, "y/a", "x/a", false, TCP, port),
            ok,
            "port {port}"
        );
    }
    assert!(c.port_entries().all(|(l, _, _)| (48..=64).contains(&l)));
    assert!(c.port_entries().count() > 1);
}

#[test]
fn sctp_and_udp_ports_match_only_their_protocol() {
    let (s, _, m) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: assoc, protocol: SCTP}, {protocol: UDP}]}]}
"#,
    );
    assert!(conn(&s, &m, "y/a", "x/a", true, SCTP, 9000));
    assert!(!conn(&s, &m, "y/a", "x/a", true, SCTP, 9001));
    assert!(!conn(&s, &m, "y/a", "x/a", true, TCP, 9000));
    assert!(conn(&s, &m, "y/a", "x/a", true, UDP, 65535));
}

#[test]
fn host_network_finished_and_addressless_pods_are_neither_endpoints_nor_peers() {
    let mut extra = pod_yaml("x", "h", "app: web", 10, "n1", "hostNetwork: true");
    extra += &pod_yaml("x", "f", "app: web", 11, "n1", "").replace("Running", "Failed");
    extra += r#"
apiVersion: v1
kind: Pod
metadata: {name: n, namespace: x, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Pending}
---
"#;
    extra += r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{from: [{podSelector: {}}]}]}
"#;
    let (_, c, m) = compiled(&extra);
    assert_eq!(c.endpoints.len(), 3);
    assert!(!dir(&m, "x/a", Direction::Ingress, "10.0.0.10", TCP, 1));
    assert!(!dir(&m, "x/a", Direction::Ingress, "10.0.0.11", TCP, 1));
    assert!(dir(&m, "x/a", Direction::Ingress, "10.0.0.2", TCP, 1));
}

#[test]
fn only_pods_of_the_local_node_are_endpoints_and_node_addresses_are_exported() {
    let (_, c, _) = compiled("");
    assert_eq!(c.node.as_deref(), Some("n1"));
    assert_eq!(
        c.node_addresses,
        vec!["192.168.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(!c.endpoints.contains_key(&ObjectRef::new("y", "r")));
    assert_eq!(c.endpoints.len(), 3);
    let flags = c.endpoint_infos().map(|(_, i)| i.flags).collect::<Vec<_>>();
    assert!(
        flags.iter().all(|f| f & 0b1100 == 0b1100),
        "dual-stack flags"
    );
}

#[test]
fn rule_sets_are_deduplicated_and_shared() {
    let (_, c, _) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: y}
spec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}
"#,
    );
    assert_eq!(c.rulesets.len(), 1);
    assert_eq!(c.policy_v4.len() + c.policy_v6.len(), 6);
}

#[test]
fn entries_name_the_rules_that_produced_them() {
    let (_, c, _) = compiled(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: 80}]}, {from: [{ipBlock: {cidr: 0.0.0.0/0}}], ports: [{port: 81}]}]}
"#,
    );
    let e = c.policy_v4.values().next().unwrap();
    let names: Vec<String> = c.sources(e).map(ToString::to_string).collect();
    assert_eq!(names, vec!["x/p: spec.ingress[0]", "x/p: spec.ingress[1]"]);
}

#[test]
fn endpoint_ids_are_stable_while_the_pod_lives_and_new_for_a_recreated_pod() {
    let s = snapshot("");
    let a = compile(&s, &IdAllocation::default());
    let b = compile(&s, &a.ids);
    assert_eq!(a.endpoints, b.endpoints);
    assert!(diff(&a, &b).is_empty());
    let mut s2 = s.clone();
    let k = ObjectRef::new("x", "a");
    s2.pods.get_mut(&k).unwrap().uid = Some("other".into());
    let c = compile(&s2, &b.ids);
    assert_ne!(c.endpoints[&k].id, b.endpoints[&k].id);
    assert!(b.endpoints.values().all(|e| e.id != c.endpoints[&k].id));
    assert_eq!(
        c.endpoints[&ObjectRef::new("x", "b")].id,
        b.endpoints[&ObjectRef::new("x", "b")].id
    );
}

#[test]
fn diff_writes_policy_entries_before_turning_isolation_on() {
    let s = snapshot("");
    let a = compile(&s, &IdAllocation::default());
    let s2 = snapshot(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}
"#,
    );
    let b = compile(&s2, &a.ids);
    let d = diff(&a, &b);
    let pos = |f: &dyn Fn(&Op) -> bool| d.ops.iter().position(f).unwrap();
    let first_endpoint = pos(&|o| matches!(o, Op::EndpointUpdate { .. }));
    let last_policy = d
        .ops
        .iter()
        .rposition(|o| matches!(o, Op::PolicyInsert { .. }))
        .unwrap();
    let last_port = d
        .ops
        .iter()
        .rposition(|o| matches!(o, Op::PortInsert { .. }))
        .unwrap();
    let first_policy = pos(&|o| matches!(o, Op::PolicyInsert { .. }));
    assert!(last_port < first_policy && last_policy < first_endpoint);
    // And the reverse clears isolation before deleting entries and rule sets.
    let back = diff(&b, &compile(&s, &b.ids));
    let clear = back
        .ops
        .iter()
        .position(|o| matches!(o, Op::EndpointUpdate { .. }))
        .unwrap();
    let first_delete = back
        .ops
        .iter()
        .position(|o| matches!(o, Op::PolicyDelete { .. }))
        .unwrap();
    let port_delete = back
        .ops
        .iter()
        .position(|o| matches!(o, Op::PortDelete { .. }))
        .unwrap();
    assert!(clear < first_delete && first_delete < port_delete);
}

#[test]
fn diff_never_opens_an_except_hole_while_adding_a_rule() {
    let a_snap = snapshot(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress]}
"#,
    );
    let b_snap = snapshot(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {matchLabels: {app: web}}, egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/24]}}]}], policyTypes: [Egress]}
"#,
    );
    let a = compile(&a_snap, &IdAllocation::default());
    let b = compile(&b_snap, &a.ids);
    for (from, to) in [(&a, &b), (&b, &compile(&a_snap, &b.ids))] {
        let d = diff(from, to);
        let mut m = from.map_state();
        for op in d.raw() {
            m.apply_op(&op);
            assert!(
                !dir(&m, "x/a", Direction::Egress, "10.0.0.2", TCP, 80),
                "an intermediate state allows an excepted address"
            );
        }
        assert_eq!(m, to.map_state());
    }
}

#[test]
fn namespace_deletion_removes_its_pods_and_policies() {
    let mut s = snapshot(DENY_INGRESS_X);
    s.remove(Kind::Namespace, "x", "x");
    let c = compile(&s, &IdAllocation::default());
    assert_eq!(c.endpoints.len(), 1);
    assert!(s.policies.is_empty());
}

const WEB_FROM_DB: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: db}}}], ports: [{port: 80}]}]
"#;

/// Compiles `b` from `a` both ways (full, and a [`Compiler`] update), checks
/// they agree, and returns the two outputs.
fn step(a: &Snapshot, b: &Snapshot) -> (Compiled, Compiled) {
    let ca = compile(a, &IdAllocation::default());
    let cb = compile(b, &ca.ids);
    let mut inc = Compiler::new(a, &IdAllocation::default());
    assert_eq!(inc.compiled(), &ca);
    let d = inc.update(b, &Changes::between(a, b));
    assert_eq!(
        inc.compiled(),
        &cb,
        "incremental differs from a full compile"
    );
    assert_eq!(d, diff(&ca, &cb), "incremental diff differs");
    (ca, cb)
}

fn generation(c: &Compiled, pod: &str, d: Direction) -> u32 {
    let (ns, n) = pod.split_once('/').unwrap();
    let info = c.endpoints[&ObjectRef::new(ns, n)].info();
    match d {
        Direction::Ingress => info.ingress_gen,
        Direction::Egress => info.egress_gen,
    }
}

#[test]
fn generation_is_zero_when_open_and_odd_when_isolated() {
    let (_, c, _) = compiled(WEB_FROM_DB);
    assert_eq!(generation(&c, "x/a", Direction::Egress), 0);
    assert_eq!(generation(&c, "x/b", Direction::Ingress), 0);
    assert_eq!(generation(&c, "x/a", Direction::Ingress) & 1, 1);
}

#[test]
fn generation_changes_when_a_rule_of_the_pods_policy_changes() {
    let a = snapshot(WEB_FROM_DB);
    let b = snapshot(&WEB_FROM_DB.replace("port: 80", "port: 81"));
    let (ca, cb) = step(&a, &b);
    assert_ne!(
        generation(&ca, "x/a", Direction::Ingress),
        generation(&cb, "x/a", Direction::Ingress)
    );
    assert_eq!(
        generation(&ca, "x/a", Direction::Egress),
        generation(&cb, "x/a", Direction::Egress)
    );
    // The new generation is written after the new entries (step 3).
    let d = diff(&ca, &cb);
    let update = d
        .ops
        .iter()
        .position(|o| matches!(o, Op::EndpointUpdate { pod, .. } if pod.name == "a"))
        .expect("an endpoint update for the new generation");
    let last_policy = d
        .ops
        .iter()
        .rposition(|o| matches!(o, Op::PolicyInsert { .. } | Op::PolicyUpdate { .. }))
        .unwrap();
    assert!(last_policy < update);
}

#[test]
fn generation_changes_when_a_peer_pods_labels_change_the_entries() {
    let a = snapshot(WEB_FROM_DB);
    let mut b = a.clone();
    // x/b (app: db) stops being a peer of x/a's ingress.
    b.pods
        .get_mut(&ObjectRef::new("x", "b"))
        .unwrap()
        .labels
        .insert("app".into(), "cache".into());
    let (ca, cb) = step(&a, &b);
    assert_ne!(
        generation(&ca, "x/a", Direction::Ingress),
        generation(&cb, "x/a", Direction::Ingress)
    );
    assert!(diff(&ca, &cb).ops.iter().any(
        |o| matches!(o, Op::EndpointUpdate { pod, info } if pod.name == "a" && pod.namespace == "x"
            && info.ingress_gen == generation(&cb, "x/a", Direction::Ingress))
    ));
}

#[test]
fn generation_stays_when_an_unrelated_pod_changes() {
    let a = snapshot(WEB_FROM_DB);
    let mut b = a.clone();
    // y/r is in another namespace: not a peer of x/web before or after.
    b.pods
        .get_mut(&ObjectRef::new("y", "r"))
        .unwrap()
        .labels
        .insert("app".into(), "web".into());
    let (ca, cb) = step(&a, &b);
    assert_eq!(ca.endpoints, cb.endpoints);
    assert!(diff(&ca, &cb).is_empty());
}

#[test]
fn allow_any_source_annotation_sets_the_flag_only_for_true() {
    let mut extra = String::new();
    extra += &pod_yaml("x", "router", "app: r", 5, "n1", "");
    extra += &pod_yaml("x", "other", "app: r", 6, "n1", "");
    extra += &pod_yaml("x", "plain", "app: r", 7, "n1", "");
    let extra = extra
        .replacen(
            "uid: x-router,",
            r#"uid: x-router, annotations: {"netpol.io/allow-any-source": "true"},"#,
            1,
        )
        .replacen(
            "uid: x-other,",
            r#"uid: x-other, annotations: {"netpol.io/allow-any-source": "yes"},"#,
            1,
        );
    let (_, c, _) = compiled(&extra);
    let flags = |n: &str| c.endpoints[&ObjectRef::new("x", n)].info().flags;
    assert_ne!(flags("router") & endpoint_flags::ALLOW_ANY_SOURCE, 0);
    assert_eq!(flags("other") & endpoint_flags::ALLOW_ANY_SOURCE, 0);
    assert_eq!(flags("plain") & endpoint_flags::ALLOW_ANY_SOURCE, 0);
}

#[test]
fn compiler_updates_equal_full_compiles_through_a_sequence_of_changes() {
    let mut s = snapshot(WEB_FROM_DB);
    let mut inc = Compiler::new(&s, &IdAllocation::default());
    let mut full = compile(&s, &IdAllocation::default());
    type Edit = Box<dyn Fn(&mut Snapshot)>;
    let edits: Vec<Edit> = vec![
        Box::new(|s| {
            s.pods
                .get_mut(&ObjectRef::new("x", "b"))
                .unwrap()
                .labels
                .insert("app".into(), "web".into());
        }),
        Box::new(|s| {
            s.pods.get_mut(&ObjectRef::new("x", "a")).unwrap().uid = Some("new".into());
        }),
        Box::new(|s| s.remove(Kind::NetworkPolicy, "x", "web")),
        Box::new(|s| {
            let mut r = LoadReport::default();
            apply_str(s, DENY_INGRESS_X, "t", &mut r);
        }),
        Box::new(|s| s.remove(Kind::Pod, "x", "a")),
        Box::new(|s| {
            s.namespaces
                .get_mut("y")
                .unwrap()
                .labels
                .insert("team".into(), "a".into());
        }),
    ];
    for edit in edits {
        let before = s.clone();
        edit(&mut s);
        let next = compile(&s, &full.ids);
        let d = inc.update(&s, &Changes::between(&before, &s));
        assert_eq!(inc.compiled(), &next);
        assert_eq!(d, diff(&full, &next));
        full = next;
    }
}

/// A tiered entry names the rules that decided some (protocol, port) of
/// its addresses (by rule id: NetworkPolicy rules first), and not the ones
/// shadowed by them: an Admin Deny on 80 before a Pass on 80 and 81, the
/// NetworkPolicy that decides what the Pass handed on, and not a later
/// Deny on 81 that the Pass took first.
#[test]
fn tiered_entries_name_the_rules_that_decided() {
    let (_, c, m) = compiled(
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: guard}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {team: a}}}
  ingress:
    - {action: Deny, from: [{namespaces: {matchLabels: {team: b}}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}
    - {action: Pass, from: [{namespaces: {matchLabels: {team: b}}}], protocols: [{tcp: {destinationPort: {range: {start: 80, end: 81}}}}]}
    - {action: Accept, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 99}}}]}
    - {action: Deny, from: [{namespaces: {matchLabels: {team: b}}}], protocols: [{tcp: {destinationPort: {number: 81}}}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: 81}, {port: 82}]}]}
"#,
    );
    let xa = c.endpoints[&ObjectRef::new("x", "a")].id;
    // y/a is 10.0.0.3: Deny 80, Pass 81 to NetworkPolicy (allows 81),
    // Accept 99; NetworkPolicy decides the rest (82 allowed).
    let (t, e) = c
        .policy_v4
        .iter()
        .find(|(t, _)| {
            t.endpoint == xa
                && t.direction == Direction::Ingress
                && t.prefix == "10.0.0.3/32".parse::<ipnet::IpNet>().unwrap()
        })
        .expect("an entry for y/a");
    let names: Vec<String> = c.sources(e).map(ToString::to_string).collect();
    assert_eq!(
        names,
        vec![
            "x/p: spec.ingress[0]",
            "ClusterNetworkPolicy guard (Admin): spec.ingress[0]",
            "ClusterNetworkPolicy guard (Admin): spec.ingress[1]",
            "ClusterNetworkPolicy guard (Admin): spec.ingress[2]",
        ],
        "{t:?}"
    );
    for (port, want) in [(80, false), (81, true), (82, true), (99, true), (83, false)] {
        assert_eq!(
            dir(&m, "x/a", Direction::Ingress, "10.0.0.3", 6, port),
            want,
            "tcp/{port} from y/a"
        );
    }
    // From x/b (team a): no tiered rule but the Accept on 99 matches it.
    let (_, e) = c
        .policy_v4
        .iter()
        .find(|(t, _)| {
            t.endpoint == xa
                && t.direction == Direction::Ingress
                && t.prefix == "10.0.0.2/32".parse::<ipnet::IpNet>().unwrap()
        })
        .expect("an entry for x/b");
    let names: Vec<String> = c.sources(e).map(ToString::to_string).collect();
    assert_eq!(
        names,
        vec![
            "x/p: spec.ingress[0]",
            "ClusterNetworkPolicy guard (Admin): spec.ingress[2]"
        ]
    );
}
