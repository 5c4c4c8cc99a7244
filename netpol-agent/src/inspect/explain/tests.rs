use std::{collections::BTreeMap, path::Path};

use netpol_common::{GlobalConfig, protocol};

use super::*;
use crate::compiler::{IdAllocation, compile};
use crate::inspect::CompiledMaps;
use crate::provenance::{Bound, Inputs};
use crate::test_support;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.2}, {ip: "fd01::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.3}, {ip: "fd01::3"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: r, namespace: x, labels: {app: r}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.2}]}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: x}
spec: {clusterIP: 10.43.0.10, ports: [{port: 80, protocol: TCP}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: 80}]
  - from: [{ipBlock: {cidr: 10.2.0.0/16, except: [10.2.0.0/24]}}]
"#;

fn setup() -> (CompiledMaps, State) {
    let snap = test_support::snapshot(CLUSTER);
    let c = compile(&snap, &IdAllocation::default());
    let mut ifindex = BTreeMap::new();
    let mut bound = BTreeMap::new();
    for (i, pod) in c.endpoints.keys().enumerate() {
        let i = u32::try_from(i).unwrap() + 10;
        ifindex.insert(pod.clone(), i);
        bound.insert(
            pod.clone(),
            Bound {
                ifindex: i,
                name: format!("veth{i}"),
            },
        );
    }
    let state = State::build(&Inputs {
        compiled: &c,
        snapshot: &snap,
        interfaces: &bound,
        generation: 1,
        fingerprint: None,
        pin_dir: Path::new("/sys/fs/bpf/netpol"),
    });
    (
        CompiledMaps::new(&c, &ifindex, GlobalConfig::default()),
        state,
    )
}

fn ask(line: &str) -> Explanation {
    let (maps, state) = setup();
    let e = Explainer::new(&maps, Some(&state)).expect("explainer");
    e.explain(&line.parse().expect("query")).expect("explained")
}

#[test]
fn allowed_connection_names_the_rule_behind_the_entry() {
    for line in [
        "x/a x/b tcp/80",
        "x/a x/b tcp/80 6",
        "10.1.0.2 10.1.0.3 TCP/80",
    ] {
        let e = ask(line);
        assert_eq!(e.verdict, Verdict::Allowed, "{line}: {e}");
        assert_eq!(e.egress.reason, "pass_not_isolated", "{line}");
        assert_eq!(e.ingress.reason, "pass_policy", "{line}");
        assert_eq!(
            e.allowing_rules(),
            ["x/b-from-a: spec.ingress[0]"],
            "{line}"
        );
        assert_eq!(e.dst.pod.as_deref(), Some("x/b"));
        assert_eq!(e.exit_code(), 0);
    }
    assert_eq!(
        ask("x/a x/b tcp/80 6").src.address,
        "fd01::2".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn denied_connection_names_the_isolating_policies() {
    let e = ask("x/a x/b udp/80");
    assert_eq!(e.verdict, Verdict::Denied, "{e}");
    assert_eq!(e.ingress.reason, "drop_policy");
    assert_eq!(e.ingress.policies, ["x/b-from-a", "x/deny-all"]);
    assert!(
        e.ingress
            .text
            .contains("isolated by x/b-from-a, x/deny-all and no rule matches"),
        "{e}"
    );
    assert!(e.ingress.text.contains("TCP 80"), "{e}");
    assert_eq!(e.exit_code(), 1);
    let e = ask("x/b x/a tcp/80");
    assert_eq!(e.verdict, Verdict::Allowed, "a is not isolated: {e}");
}

#[test]
fn remote_peers_are_judged_only_on_this_nodes_side() {
    // 10.2.0.2 is in the except: the empty rule set shadows the block.
    let e = ask("x/r x/b tcp/80");
    assert_eq!(e.verdict, Verdict::Denied, "{e}");
    assert_eq!(e.egress.reason, "not_judged");
    let m = e.ingress.entry.as_ref().expect("the except's entry");
    assert_eq!(m.ruleset, EMPTY_RULESET);
    assert!(
        e.ingress
            .text
            .contains("an except of x/b-from-a: spec.ingress[1]"),
        "{e}"
    );
    // Past the except, the ipBlock rule allows every port.
    let e = ask("10.2.1.1 x/b udp/9");
    assert_eq!(e.verdict, Verdict::Allowed, "{e}");
    assert_eq!(e.allowing_rules(), ["x/b-from-a: spec.ingress[1]"]);
    let e = ask("x/b x/r tcp/80");
    assert_eq!(e.ingress.reason, "not_judged");
    assert_eq!(e.verdict, Verdict::Allowed);
}

#[test]
fn service_frontend_depends_on_the_backend() {
    let e = ask("x/a 10.43.0.10 tcp/80");
    assert_eq!(e.verdict, Verdict::Depends, "{e}");
    assert_eq!(
        e.service.as_ref().map(|s| s.services.clone()),
        Some(vec!["x/s".to_owned()])
    );
    assert_eq!(e.exit_code(), 2);
    assert_eq!(e.egress.reason, "pass_not_isolated");
    // An isolated pod with a mark slot: marked at from_pod, judged
    // downstream against the backend.
    let (mut maps, state) = setup();
    maps.config.mark_mask = netpol_common::mark::DEFAULT_MASK;
    for ep in &mut maps.endpoints {
        ep.info.slot = ep.info.id;
    }
    let x = Explainer::new(&maps, Some(&state)).expect("explainer");
    let e = x
        .explain(&"x/b 10.43.0.10 tcp/80".parse().expect("query"))
        .expect("explained");
    assert_eq!(
        (e.verdict, e.egress.reason.as_str()),
        (Verdict::Depends, "pass_service"),
        "{e}"
    );
}

#[test]
fn a_pod_reaching_itself_is_allowed_and_node_traffic_passes() {
    let e = ask("x/b x/b tcp/81");
    assert_eq!(e.verdict, Verdict::Allowed, "{e}");
    let e = ask("10.0.0.1 x/b tcp/81");
    assert_eq!(e.verdict, Verdict::Allowed, "{e}");
    assert_eq!(e.ingress.reason, "pass_node_origin");
}

#[test]
fn unknown_pods_and_missing_families_are_errors() {
    let (maps, state) = setup();
    let x = Explainer::new(&maps, Some(&state)).expect("explainer");
    let err = |l: &str| {
        x.explain(&l.parse().expect("query"))
            .expect_err(l)
            .to_string()
    };
    assert!(err("x/nope x/b tcp/80").contains("x/nope"));
    assert!(err("x/r x/b tcp/80 6").contains("no IPv6 address"));
    let none = Explainer::new(&maps, None).expect("explainer");
    assert!(
        none.explain(&"x/a x/b tcp/80".parse().expect("query"))
            .is_err()
    );
    let e = none
        .explain(&"10.1.0.2 10.1.0.3 tcp/80".parse().expect("query"))
        .expect("by address");
    assert_eq!(e.verdict, Verdict::Allowed);
    assert!(e.ingress.entry.as_ref().is_some_and(|m| m.stale));
}

#[test]
fn queries_parse_from_batch_lines() {
    let q: Query = "x/a 10.1.0.3 sctp/5000 6".parse().expect("query");
    assert_eq!(
        q,
        Query {
            src: Target::Pod("x/a".into()),
            dst: Target::Address("10.1.0.3".parse().unwrap()),
            protocol: protocol::SCTP,
            port: 5000,
            family: Some(6),
            via_service: false,
            staged: false,
        }
    );
    let q: Query = "x/a x/a tcp/80 4 via-service".parse().expect("query");
    assert!(q.via_service && q.family == Some(4));
    assert!("x/a x/b tcp".parse::<Query>().is_err());
    assert!("x/a x/b tcp/99999".parse::<Query>().is_err());
    assert!("x x/b tcp/80".parse::<Query>().is_err());
    assert_eq!(parse_port("icmp"), Ok((protocol::ICMP, 0)));
}
