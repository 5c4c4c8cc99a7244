//! Packet-by-packet verdicts of the real programs (BPF_PROG_TEST_RUN), with
//! maps filled by the production map writer from policies compiled by the
//! compiler. Each test loads a fresh object into its own netns and bpffs.
use std::collections::BTreeMap;

use netpol_agent::{
    Datapath, DatapathConfig, MapSizes,
    compiler::{self, Compiled, IdAllocation},
    datapath::writer::KernelOp,
    model::{self, ObjectRef, Snapshot},
};
use netpol_common::{
    EndpointInfo, GlobalConfig, config_flags, direction, endpoint_flags, family, reason,
};
use netpol_testkit::{Netns, datapath::TempBpffs, packets::*, privileged, sh};

const INGRESS_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-ingress, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: b}}}]
      ports:
        - {port: 80}
        - {protocol: UDP, port: 53}
        - {protocol: SCTP, port: 9000}
        - {port: http}
    - from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]
      ports: [{port: 8000, endPort: 8080}]
    - from: [{ipBlock: {cidr: "fe80::/10"}}]
    - from: [{namespaceSelector: {matchLabels: {team: ops}}}]
      ports: [{protocol: TCP, port: 443}]
"#;

#[test]
fn ingress_rules_decide_peer_protocol_and_port_for_both_families() {
    with_fixture(INGRESS_POLICY, |fx| {
        let a = Hook::Ingress("x/a");
        assert_table(
            fx,
            vec![
                ("b->a tcp/80 v4", a, tcp_syn(B4, A4, 40000, 80), V::Pass),
                ("b->a tcp/80 v6", a, tcp_syn(B6, A6, 40000, 80), V::Pass),
                ("b->a tcp/81 v4", a, tcp_syn(B4, A4, 40000, 81), V::Drop),
                ("b->a tcp/81 v6", a, tcp_syn(B6, A6, 40000, 81), V::Drop),
                (
                    "b->a named http=8080 v4",
                    a,
                    tcp_syn(B4, A4, 40001, 8080),
                    V::Pass,
                ),
                (
                    "b->a named http=8080 v6",
                    a,
                    tcp_syn(B6, A6, 40001, 8080),
                    V::Pass,
                ),
                ("b->a udp/53 v4", a, udp(B4, A4, 5353, 53), V::Pass),
                ("b->a udp/53 v6", a, udp(B6, A6, 5353, 53), V::Pass),
                (
                    "b->a tcp/53 v4 (rule says UDP)",
                    a,
                    tcp_syn(B4, A4, 40002, 53),
                    V::Drop,
                ),
                (
                    "b->a sctp/9000 v4",
                    a,
                    sctp_init(B4, A4, 5000, 9000),
                    V::Pass,
                ),
                (
                    "b->a sctp/9000 v6",
                    a,
                    sctp_init(B6, A6, 5000, 9000),
                    V::Pass,
                ),
                (
                    "b->a sctp/9001 v4",
                    a,
                    sctp_init(B4, A4, 5000, 9001),
                    V::Drop,
                ),
                (
                    "b->a icmp echo v4 (rule has ports)",
                    a,
                    echo_request(B4, A4, 7),
                    V::Drop,
                ),
                (
                    "b->a icmp echo v6 (rule has ports)",
                    a,
                    echo_request(B6, A6, 7),
                    V::Drop,
                ),
                (
                    "ops c->a tcp/443 v4",
                    a,
                    tcp_syn(C4, A4, 40003, 443),
                    V::Pass,
                ),
                (
                    "ops c->a tcp/443 v6",
                    a,
                    tcp_syn(C6, A6, 40003, 443),
                    V::Pass,
                ),
                ("ops c->a tcp/80 v4", a, tcp_syn(C4, A4, 40004, 80), V::Drop),
                (
                    "cidr 192.168.7.7->a tcp/8000",
                    a,
                    tcp_syn("192.168.7.7", A4, 1, 8000),
                    V::Pass,
                ),
                (
                    "cidr 192.168.7.7->a tcp/8080",
                    a,
                    tcp_syn("192.168.7.7", A4, 1, 8080),
                    V::Pass,
                ),
                (
                    "cidr 192.168.7.7->a tcp/8081",
                    a,
                    tcp_syn("192.168.7.7", A4, 1, 8081),
                    V::Drop,
                ),
                (
                    "cidr 192.168.7.7->a tcp/7999",
                    a,
                    tcp_syn("192.168.7.7", A4, 1, 7999),
                    V::Drop,
                ),
                (
                    "except 192.168.1.9->a tcp/8000",
                    a,
                    tcp_syn("192.168.1.9", A4, 1, 8000),
                    V::Drop,
                ),
                (
                    "outside 10.9.9.9->a tcp/8000",
                    a,
                    tcp_syn("10.9.9.9", A4, 1, 8000),
                    V::Drop,
                ),
                (
                    "link-local fe80::5->a any port",
                    a,
                    tcp_syn("fe80::5", A6, 1, 9999),
                    V::Pass,
                ),
                (
                    "link-local fe80::5->a icmpv6 echo",
                    a,
                    echo_request("fe80::5", A6, 9),
                    V::Pass,
                ),
                (
                    "unmanaged interface passes",
                    Hook::Unmanaged,
                    tcp_syn(C4, A4, 1, 81),
                    V::Pass,
                ),
                (
                    "b not isolated: b->c tcp/81",
                    Hook::Egress("x/b"),
                    tcp_syn(B4, C4, 2, 81),
                    V::Pass,
                ),
                (
                    "b not isolated: c->b tcp/81",
                    Hook::Ingress("x/b"),
                    tcp_syn(C4, B4, 2, 81),
                    V::Pass,
                ),
            ],
        );
        let id = fx.endpoint_id("x/a");
        assert!(id > 0);
        assert!(fx.counter(direction::INGRESS, family::IPV4, reason::DROP_POLICY) >= 7);
        assert!(fx.counter(direction::INGRESS, family::IPV6, reason::PASS_POLICY) >= 6);
    });
}

#[test]
fn replies_of_admitted_connections_pass_the_isolated_direction() {
    let deny_ingress = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-in, namespace: x}
spec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Ingress]}
"#;
    with_fixture(deny_ingress, |fx| {
        assert_table(
            fx,
            vec![
                // a opens connections out (egress not isolated) ...
                (
                    "a->c tcp syn v4",
                    Hook::Egress("x/a"),
                    tcp_syn(A4, C4, 33000, 443),
                    V::Pass,
                ),
                (
                    "a->c tcp syn v6",
                    Hook::Egress("x/a"),
                    tcp_syn(A6, C6, 33000, 443),
                    V::Pass,
                ),
                (
                    "a->c udp v4",
                    Hook::Egress("x/a"),
                    udp(A4, C4, 33001, 53),
                    V::Pass,
                ),
                (
                    "a->c echo v6",
                    Hook::Egress("x/a"),
                    echo_request(A6, C6, 77),
                    V::Pass,
                ),
                // ... and their replies come back through denied ingress.
                (
                    "c->a reply v4",
                    Hook::Ingress("x/a"),
                    tcp_ack(C4, A4, 443, 33000),
                    V::Pass,
                ),
                (
                    "c->a reply v6",
                    Hook::Ingress("x/a"),
                    tcp_ack(C6, A6, 443, 33000),
                    V::Pass,
                ),
                (
                    "c->a udp reply v4",
                    Hook::Ingress("x/a"),
                    udp(C4, A4, 53, 33001),
                    V::Pass,
                ),
                (
                    "c->a echo reply v6",
                    Hook::Ingress("x/a"),
                    echo_request(C6, A6, 77),
                    V::Pass,
                ),
                // Other connections from c are new: denied.
                (
                    "c->a new port v4",
                    Hook::Ingress("x/a"),
                    tcp_syn(C4, A4, 443, 33999),
                    V::Drop,
                ),
                (
                    "c->a new port v6",
                    Hook::Ingress("x/a"),
                    tcp_syn(C6, A6, 443, 33999),
                    V::Drop,
                ),
                (
                    "c->a other echo id",
                    Hook::Ingress("x/a"),
                    echo_request(C6, A6, 78),
                    V::Drop,
                ),
            ],
        );
        assert!(fx.counter(direction::INGRESS, family::IPV4, reason::PASS_TRACKED) >= 2);
    });
}

#[test]
fn mid_flow_packets_without_an_entry_are_judged_as_new_flows() {
    with_fixture(INGRESS_POLICY, |fx| {
        assert_table(
            fx,
            vec![
                // An ACK of a connection created before the agent: allowed
                // port, so it is judged, allowed and tracked.
                (
                    "b->a ack tcp/80 v4",
                    Hook::Ingress("x/a"),
                    tcp_ack(B4, A4, 41000, 80),
                    V::Pass,
                ),
                (
                    "a->b reply v4",
                    Hook::Egress("x/a"),
                    tcp_ack(A4, B4, 80, 41000),
                    V::Pass,
                ),
                (
                    "b->a ack tcp/81 v4",
                    Hook::Ingress("x/a"),
                    tcp_ack(B4, A4, 41000, 81),
                    V::Drop,
                ),
            ],
        );
        assert_eq!(
            fx.counter(direction::INGRESS, family::IPV4, reason::PASS_POLICY),
            1
        );
    });
}

const DENY_ALL: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"#;

#[test]
fn neighbour_discovery_and_node_probes_pass_under_deny_all() {
    with_fixture(DENY_ALL, |fx| {
        let (ai, ae) = (Hook::Ingress("x/a"), Hook::Egress("x/a"));
        assert_table(
            fx,
            vec![
                (
                    "NS in",
                    ai,
                    icmpv6("fe80::1", "ff02::1:ff00:1", 135),
                    V::Pass,
                ),
                ("NA out", ae, icmpv6("fe80::2", "fe80::1", 136), V::Pass),
                ("RS out", ae, icmpv6("fe80::2", "ff02::2", 133), V::Pass),
                ("RA in", ai, icmpv6("fe80::1", "ff02::1", 134), V::Pass),
                (
                    "redirect in",
                    ai,
                    icmpv6("fe80::1", "fe80::2", 137),
                    V::Pass,
                ),
                (
                    "MLD query in",
                    ai,
                    icmpv6("fe80::1", "ff02::1", 130),
                    V::Pass,
                ),
                (
                    "MLDv2 report out",
                    ae,
                    icmpv6("fe80::2", "ff02::16", 143),
                    V::Pass,
                ),
                ("ARP in", ai, arp(), V::Pass),
                ("ARP out", ae, arp(), V::Pass),
                ("echo v6 in", ai, echo_request("fe80::1", A6, 1), V::Drop),
                ("echo v4 in", ai, echo_request(B4, A4, 1), V::Drop),
                ("tcp v4 out", ae, tcp_syn(A4, B4, 1, 80), V::Drop),
                ("tcp v6 out", ae, tcp_syn(A6, B6, 1, 80), V::Drop),
                // kubelet probe from the node's own stack, and the reply
                // through the isolated egress.
                (
                    "node probe v4",
                    Hook::IngressFromNode("x/a"),
                    tcp_syn(NODE4, A4, 50000, 8080),
                    V::Pass,
                ),
                (
                    "probe reply v4",
                    ae,
                    tcp_ack(A4, NODE4, 8080, 50000),
                    V::Pass,
                ),
                (
                    "node probe v6",
                    Hook::IngressFromNode("x/a"),
                    tcp_syn("fd00:ffff::1", A6, 50000, 8080),
                    V::Pass,
                ),
                (
                    "probe reply v6",
                    ae,
                    tcp_ack(A6, "fd00:ffff::1", 8080, 50000),
                    V::Pass,
                ),
                // A forwarded packet carrying the node's address is judged.
                (
                    "forwarded from node address",
                    ai,
                    tcp_syn(NODE4, A4, 50001, 8080),
                    V::Drop,
                ),
            ],
        );
        assert_eq!(
            fx.counter(direction::INGRESS, family::IPV4, reason::PASS_NODE_ORIGIN),
            1
        );
        assert!(fx.counter(direction::EGRESS, family::IPV6, reason::PASS_ICMPV6_CONTROL) >= 3);
    });
}

#[test]
fn unparseable_packets_fail_closed_only_where_policy_applies() {
    with_fixture(DENY_ALL, |fx| {
        let tcp4 = tcp_syn(B4, A4, 1, 80);
        let tcp6 = tcp_syn(B6, A6, 1, 80);
        // The kernel's test run refuses frames shorter than an IP header,
        // so truncation cuts the transport header.
        let mut truncated4 = tcp4.clone();
        truncated4.truncate(14 + 20 + 2);
        let mut bad_ihl = tcp4.clone();
        bad_ihl[14] = 0x43;
        let mut truncated_l4 = tcp6.clone();
        truncated_l4.truncate(14 + 40 + 2);
        assert_table(
            fx,
            vec![
                (
                    "truncated ipv4 header",
                    Hook::Ingress("x/a"),
                    truncated4.clone(),
                    V::Drop,
                ),
                (
                    "truncated tcp header v6",
                    Hook::Ingress("x/a"),
                    truncated_l4.clone(),
                    V::Drop,
                ),
                (
                    "ipv6 hop-by-hop",
                    Hook::Ingress("x/a"),
                    with_hop_by_hop(&tcp6),
                    V::Drop,
                ),
                (
                    "ipv4 later fragment",
                    Hook::Ingress("x/a"),
                    later_fragment(&tcp4),
                    V::Drop,
                ),
                (
                    "garbage after ethertype",
                    Hook::Ingress("x/a"),
                    {
                        let mut g = tcp4[..14].to_vec();
                        g.extend_from_slice(&[0xff; 30]);
                        g
                    },
                    V::Drop,
                ),
                (
                    "truncated ipv4 unmanaged",
                    Hook::Unmanaged,
                    truncated4,
                    V::Pass,
                ),
            ],
        );
        // The hop-by-hop header is walked: the TCP packet behind it meets
        // deny-all like any other.
        assert_eq!(
            fx.counter(direction::INGRESS, family::IPV6, reason::DROP_POLICY),
            1
        );
        assert_eq!(
            fx.counter(direction::INGRESS, family::IPV4, reason::DROP_FRAGMENT),
            1
        );
        assert_eq!(
            fx.counter(direction::INGRESS, family::IPV4, reason::DROP_PARSE),
            2
        );
        assert_eq!(
            fx.counter(direction::INGRESS, family::IPV6, reason::DROP_PARSE),
            1
        );
    });
}

#[test]
fn parse_failures_pass_where_the_direction_is_not_isolated() {
    with_fixture("", |fx| {
        let tcp6 = tcp_syn(B6, A6, 1, 80);
        assert_table(
            fx,
            vec![(
                "hop-by-hop to unisolated pod",
                Hook::Ingress("x/a"),
                with_hop_by_hop(&tcp6),
                V::Pass,
            )],
        );
    });
}

#[test]
fn vlan_tags_and_ipv4_options_are_parsed_to_the_ports() {
    with_fixture(INGRESS_POLICY, |fx| {
        let a = Hook::Ingress("x/a");
        assert_table(
            fx,
            vec![
                (
                    "vlan b->a tcp/80",
                    a,
                    vlan_tagged(&tcp_syn(B4, A4, 42000, 80)),
                    V::Pass,
                ),
                (
                    "vlan b->a tcp/81",
                    a,
                    vlan_tagged(&tcp_syn(B4, A4, 42000, 81)),
                    V::Drop,
                ),
                (
                    "vlan v6 b->a tcp/80",
                    a,
                    vlan_tagged(&tcp_syn(B6, A6, 42000, 80)),
                    V::Pass,
                ),
                (
                    "options b->a tcp/80",
                    a,
                    with_ipv4_options(&tcp_syn(B4, A4, 42001, 80)),
                    V::Pass,
                ),
                (
                    "options b->a tcp/81",
                    a,
                    with_ipv4_options(&tcp_syn(B4, A4, 42001, 81)),
                    V::Drop,
                ),
            ],
        );
    });
}

#[test]
fn egress_ipblock_constrains_only_its_own_family() {
    let egress_v4_only = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: out-v4, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 0.0.0.0/0}}]
"#;
    with_fixture(egress_v4_only, |fx| {
        let ae = Hook::Egress("x/a");
        assert_table(
            fx,
            vec![
                (
                    "a->anywhere v4",
                    ae,
                    tcp_syn(A4, "203.0.113.9", 1, 443),
                    V::Pass,
                ),
                ("a->c v4", ae, udp(A4, C4, 1, 53), V::Pass),
                (
                    "a->anywhere v6",
                    ae,
                    tcp_syn(A6, "2001:db8::9", 1, 443),
                    V::Drop,
                ),
                ("a->c v6", ae, udp(A6, C6, 1, 53), V::Drop),
            ],
        );
    });
}

#[test]
fn unprogrammed_pod_interfaces_follow_the_new_pods_mode() {
    with_fixture("", |fx| {
        let idx = fx.ifindex["x/b"];
        let id = fx.endpoint_id("x/b");
        fx.dp
            .writer()
            .apply_kernel(&[KernelOp::EndpointUpsert(
                idx,
                EndpointInfo {
                    id,
                    flags: endpoint_flags::NOT_PROGRAMMED,
                    ..EndpointInfo::default()
                },
            )])
            .expect("mark unprogrammed");
        let (bi, be) = (Hook::Ingress("x/b"), Hook::Egress("x/b"));
        assert_table(
            fx,
            vec![
                ("fail-closed: tcp in", bi, tcp_syn(A4, B4, 1, 80), V::Drop),
                ("fail-closed: tcp out", be, tcp_syn(B6, A6, 1, 80), V::Drop),
                (
                    "fail-closed: NS",
                    bi,
                    icmpv6("fe80::1", "ff02::1:ff00:2", 135),
                    V::Pass,
                ),
                (
                    "fail-closed: node probe",
                    Hook::IngressFromNode("x/b"),
                    tcp_syn(NODE4, B4, 2, 80),
                    V::Pass,
                ),
                (
                    "fail-closed: probe reply",
                    be,
                    tcp_ack(B4, NODE4, 80, 2),
                    V::Pass,
                ),
            ],
        );
        assert_eq!(
            fx.counter(
                direction::INGRESS,
                family::IPV4,
                reason::DROP_NOT_PROGRAMMED
            ),
            1
        );
        fx.dp
            .set_global(GlobalConfig {
                flags: config_flags::NEW_PODS_FAIL_OPEN,
                ..GlobalConfig::default()
            })
            .expect("fail-open");
        assert_table(
            fx,
            vec![("fail-open: tcp in", bi, tcp_syn(A4, B4, 3, 80), V::Pass)],
        );
    });
}

#[test]
fn a_full_map_refuses_the_update_names_the_map_and_keeps_enforcing() {
    if !privileged() {
        return;
    }
    let ns = Netns::new("npk");
    let bpffs = TempBpffs::new();
    sh(
        "ip",
        &[
            "-n", &ns.name, "link", "add", "d0", "type", "veth", "peer", "name", "d0p",
        ],
    );
    sh(
        "ip",
        &[
            "-n", &ns.name, "link", "add", "d1", "type", "veth", "peer", "name", "d1p",
        ],
    );
    let compile = |policies: &str| {
        let mut snap = Snapshot::default();
        let mut report = model::manifests::LoadReport::default();
        model::manifests::apply_str(&mut snap, CLUSTER, "cluster", &mut report);
        model::manifests::apply_str(&mut snap, policies, "policies", &mut report);
        compiler::compile(&snap, &IdAllocation::default())
    };
    let small = compile(DENY_ALL);
    // Three ipBlocks of a's egress: more IPv4 prefixes than the map holds.
    let big = compile(&format!(
        "{DENY_ALL}\n---\n{}",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: many, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
    - to:
        - ipBlock: {cidr: 198.51.100.0/24}
        - ipBlock: {cidr: 203.0.113.0/24}
        - ipBlock: {cidr: 192.0.2.0/24}
"#
    ));
    ns.run(|| {
        let mut dp = Datapath::load(&DatapathConfig {
            bpffs: bpffs.path().to_owned(),
            map_sizes: MapSizes {
                policy_v4: 2,
                conntrack: 64,
                ..MapSizes::default()
            },
            ..DatapathConfig::default()
        })
        .expect("load");
        let idx = |n: &str| nix::net::if_::if_nametoindex(n).expect("ifindex");
        let ifaces: BTreeMap<ObjectRef, u32> = [
            (ObjectRef::new("x", "a"), idx("d0")),
            (ObjectRef::new("x", "b"), idx("d1")),
        ]
        .into_iter()
        .collect();
        let first: Vec<_> = compiler::diff(&Compiled::default(), &small).raw().collect();
        dp.writer().apply(&first, &ifaces).expect("deny-all fits");
        let before = dp.writer().mirror().clone();

        let next: Vec<_> = compiler::diff(&small, &big).raw().collect();
        let err = dp
            .writer()
            .apply(&next, &ifaces)
            .expect_err("map too small");
        let msg = err.to_string();
        assert!(msg.contains(netpol_common::maps::POLICY_V4), "{msg}");
        assert!(msg.contains("full"), "{msg}");
        assert_eq!(dp.writer().full_errors(), 1);
        assert_eq!(dp.writer().mirror(), &before);

        // The kernel still holds deny-all: a's egress to the new range is
        // dropped, as before the failed update.
        let mut fx = Fixture {
            dp,
            ifindex: [("x/a".to_owned(), idx("d0")), ("fwd".to_owned(), idx("d1"))]
                .into_iter()
                .collect(),
            compiled: small,
            ifaces,
        };
        assert_eq!(
            fx.run(Hook::Egress("x/a"), &tcp_syn(A4, "198.51.100.7", 1, 443)),
            V::Drop
        );
    });
}

const EGRESS_DENY_ALL: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
"#;

fn endpoint_epoch(fx: &Fixture) -> u64 {
    let epoch: aya::maps::Array<_, u64> = fx.pinned(netpol_common::maps::ENDPOINT_EPOCH);
    epoch.get(&0, 0).expect("epoch")
}

/// What `pod` sending UDP to the other local pod gets, both families
/// (a fresh source port per call: drops are not tracked, passes are).
fn sends(fx: &mut Fixture, pod: &str, sport: u16) -> [V; 2] {
    let pairs = if pod == "x/a" {
        [(A4, B4), (A6, B6)]
    } else {
        [(B4, A4), (B6, A6)]
    };
    pairs.map(|(src, dst)| fx.run(Hook::Egress(pod), &udp(src, dst, sport, 53)))
}

#[test]
fn a_cached_endpoint_is_read_again_once_the_writer_moves_the_epoch() {
    with_fixture(EGRESS_DENY_ALL, |fx| {
        // One CPU, so that every run below meets the same per-CPU cache.
        let cpu = nix::sched::sched_getcpu().expect("current CPU");
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).expect("cpu set");
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pin");

        let (ia, ib) = (fx.ifindex["x/a"], fx.ifindex["x/b"]);
        // Written behind the map writer's back below.
        let mut table: aya::maps::HashMap<_, u32, EndpointInfo> =
            fx.pinned(netpol_common::maps::ENDPOINTS);
        let isolated_a = table.get(&ia, 0).expect("x/a's entry");
        let isolated_b = table.get(&ib, 0).expect("x/b's entry");
        let open = |e: EndpointInfo| EndpointInfo {
            flags: e.flags & !endpoint_flags::EGRESS_ISOLATED,
            ..e
        };
        assert_eq!(sends(fx, "x/a", 5000), [V::Drop; 2]);
        assert_eq!(sends(fx, "x/b", 5000), [V::Drop; 2]);

        // Behind the writer's back the epoch stays: x/a's packets keep the
        // copy taken above; x/b, past the cache, reads the table each time.
        table.insert(ia, open(isolated_a), 0).expect("write x/a");
        table.insert(ib, open(isolated_b), 0).expect("write x/b");
        assert_eq!(sends(fx, "x/a", 5001), [V::Drop; 2], "x/a's cached copy");
        assert_eq!(sends(fx, "x/b", 5001), [V::Pass; 2], "x/b from the table");

        // Through the writer: the epoch moves by one bit and the next
        // packet reads the new entry; and back, as a policy change would.
        for (info, want, sport) in [
            (open(isolated_a), V::Pass, 5002),
            (isolated_a, V::Drop, 5003),
        ] {
            let before = endpoint_epoch(fx);
            fx.dp
                .writer()
                .apply_kernel(&[KernelOp::EndpointUpsert(ia, info)])
                .expect("upsert x/a");
            let after = endpoint_epoch(fx);
            assert_eq!(
                (before ^ after).count_ones(),
                1,
                "{before:#x} -> {after:#x}"
            );
            assert_eq!(sends(fx, "x/a", sport), [want; 2], "x/a after the writer");
        }
        // A deleted endpoint is unmanaged from the next packet on.
        fx.dp
            .writer()
            .apply_kernel(&[KernelOp::EndpointDelete(ia)])
            .expect("delete x/a");
        assert_eq!(sends(fx, "x/a", 5004), [V::Pass; 2]);
        for fam in [family::IPV4, family::IPV6] {
            assert_eq!(
                fx.counter(direction::EGRESS, fam, reason::PASS_UNMANAGED),
                1
            );
        }
    });
}
