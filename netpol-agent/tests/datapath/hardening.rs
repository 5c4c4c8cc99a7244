//! Adversarial packets through the real programs (BPF_PROG_TEST_RUN):
//! fragments, extension headers, ICMP errors, spoofed sources, stray TCP
//! segments, reused addresses and revoked rules. Each table asserts that
//! nothing a policy forbids gets through and that legitimate traffic does.
use netpol_agent::datapath::clock::{self, JiffyClock};
use netpol_common::{direction, family, reason};
use netpol_testkit::packets::*;

/// a takes TCP 80, UDP 53, SCTP 9000 and its named port from b, anything
/// from link-local peers.
const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-ingress, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: b}}}]
      ports: [{port: 80}, {protocol: UDP, port: 53}]
    - from: [{ipBlock: {cidr: "fe80::/10"}}]
"#;

const DENY_INGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-in, namespace: x}
spec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Ingress]}
"#;

fn udp_big(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let payload = [7u8; 200];
    let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    match (src.parse().expect("src"), dst.parse().expect("dst")) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => eth
            .ipv4(s.octets(), d.octets(), 64)
            .udp(sport, dport)
            .write(&mut out, &payload),
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => eth
            .ipv6(s.octets(), d.octets(), 64)
            .udp(sport, dport)
            .write(&mut out, &payload),
        _ => panic!("mixed families"),
    }
    .expect("build");
    out
}

#[test]
fn later_fragments_follow_the_verdict_of_their_first_fragment() {
    with_fixture(POLICY, |fx| {
        let a = Hook::Ingress("x/a");
        let ok4 = fragments_v4(&udp_big(B4, A4, 5000, 53), 0x11, &[64, 64]);
        let bad4 = fragments_v4(&udp_big(B4, A4, 5000, 54), 0x12, &[64, 64]);
        let ok6 = fragments_v6(&udp_big(B6, A6, 5000, 53), 0x21, &[], &[64, 64]);
        let bad6 = fragments_v6(&udp_big(B6, A6, 5000, 54), 0x22, &[], &[64, 64]);
        let mut cases: Vec<Case<'_>> = Vec::new();
        for (fam, frags, want) in [
            ("v4 allowed", &ok4, V::Pass),
            ("v4 denied", &bad4, V::Drop),
            ("v6 allowed", &ok6, V::Pass),
            ("v6 denied", &bad6, V::Drop),
        ] {
            for (i, f) in frags.iter().enumerate() {
                cases.push((
                    Box::leak(format!("{fam} fragment {i}").into_boxed_str()),
                    a,
                    f.clone(),
                    want,
                ));
            }
        }
        assert_table(fx, cases);
        assert_eq!(
            fx.counter(direction::INGRESS, family::IPV4, reason::PASS_FRAGMENT),
            2
        );
        assert_eq!(
            fx.counter(direction::INGRESS, family::IPV6, reason::DROP_FRAGMENT),
            2
        );
    });
}

#[test]
fn fragments_out_of_order_overlapping_or_without_a_first_are_dropped() {
    with_fixture(POLICY, |fx| {
        let a = Hook::Ingress("x/a");
        let v4 = udp_big(B4, A4, 5000, 53);
        let frags = fragments_v4(&v4, 0x31, &[64, 64]);
        let v6 = fragments_v6(&udp_big(B6, A6, 5000, 53), 0x41, &[], &[64, 64]);
        assert_table(
            fx,
            vec![
                (
                    "later fragment with no first (v4)",
                    a,
                    frags[1].clone(),
                    V::Drop,
                ),
                (
                    "later fragment with no first (v6)",
                    a,
                    v6[2].clone(),
                    V::Drop,
                ),
                ("first fragment (v4)", a, frags[0].clone(), V::Pass),
                ("its first fragment again", a, frags[0].clone(), V::Drop),
                ("second fragment", a, frags[1].clone(), V::Pass),
                (
                    "fragment overlapping the second",
                    a,
                    fragment_v4_at(&v4, 0x31, 64, 64, true),
                    V::Drop,
                ),
                (
                    "fragment rewriting the ports",
                    a,
                    fragment_v4_at(&v4, 0x31, 0, 8, true),
                    V::Drop,
                ),
                ("last fragment", a, frags[2].clone(), V::Pass),
            ],
        );
        assert!(
            fx.counter(
                direction::INGRESS,
                family::IPV4,
                reason::DROP_FRAGMENT_OVERLAP
            ) >= 2
        );
    });
}

#[test]
fn tiny_first_fragments_and_transport_headers_in_the_second_are_dropped() {
    with_fixture(POLICY, |fx| {
        let a = Hook::Ingress("x/a");
        // The first fragment holds the ports but not the TCP flags.
        let tcp4 = tcp_syn(B4, A4, 40000, 80);
        let tiny4 = fragments_v4(&tcp4, 0x51, &[8]);
        let tcp6 = tcp_syn(B6, A6, 40000, 80);
        let tiny6 = fragments_v6(&tcp6, 0x52, &[], &[8]);
        // A destination-options header fills the first fragment; TCP starts
        // in the second.
        let pushed6 = fragments_v6(&tcp6, 0x53, &[0, 0, 1, 4, 0, 0, 0, 0], &[8]);
        assert_table(
            fx,
            vec![
                ("tiny first fragment v4", a, tiny4[0].clone(), V::Drop),
                ("its second fragment", a, tiny4[1].clone(), V::Drop),
                ("tiny first fragment v6", a, tiny6[0].clone(), V::Drop),
                (
                    "TCP only in the second fragment",
                    a,
                    pushed6[0].clone(),
                    V::Drop,
                ),
                ("that second fragment", a, pushed6[1].clone(), V::Drop),
            ],
        );
        assert_eq!(
            fx.counter(
                direction::INGRESS,
                family::IPV6,
                reason::DROP_FRAGMENT_SHORT
            ),
            2
        );
    });
}

#[test]
fn extension_headers_are_walked_and_past_the_bound_only_portless_rules_match() {
    with_fixture(POLICY, |fx| {
        let a = Hook::Ingress("x/a");
        let ok = tcp_syn(B6, A6, 40000, 80);
        let denied = tcp_syn(B6, A6, 40000, 81);
        let from_ll = tcp_syn("fe80::5", A6, 40000, 81);
        let nine = [60u8; 9];
        assert_table(
            fx,
            vec![
                (
                    "hop-by-hop, allowed port",
                    a,
                    with_ext_chain(&ok, &[0]),
                    V::Pass,
                ),
                (
                    "routing header, allowed port",
                    a,
                    with_ext_chain(&ok, &[43]),
                    V::Pass,
                ),
                ("AH, allowed port", a, with_ext_chain(&ok, &[51]), V::Pass),
                (
                    "8 headers, allowed port",
                    a,
                    with_ext_chain(&ok, &[0, 60, 43, 60, 51, 60, 60, 60]),
                    V::Pass,
                ),
                (
                    "8 headers, denied port",
                    a,
                    with_ext_chain(&denied, &[0, 60, 43, 60, 51, 60, 60, 60]),
                    V::Drop,
                ),
                (
                    "9 headers: ports out of reach",
                    a,
                    with_ext_chain(&ok, &nine),
                    V::Drop,
                ),
                (
                    "9 headers from a portless rule's peer",
                    a,
                    with_ext_chain(&from_ll, &nine),
                    V::Pass,
                ),
                ("ESP from b (rules have ports)", a, esp(B6, A6), V::Drop),
                (
                    "ESP from link-local (rule without ports)",
                    a,
                    esp("fe80::5", A6),
                    V::Pass,
                ),
                ("ESP over IPv4 from b", a, esp(B4, A4), V::Drop),
            ],
        );
    });
}

#[test]
fn mld_behind_a_hop_by_hop_header_passes_under_deny_all() {
    let deny_all = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec: {podSelector: {}, policyTypes: [Ingress, Egress]}
"#;
    with_fixture(deny_all, |fx| {
        let report = with_ext_chain(&icmpv6("fe80::1", "ff02::16", 143), &[0]);
        assert_table(
            fx,
            vec![
                (
                    "MLDv2 report out",
                    Hook::Egress("x/a"),
                    report.clone(),
                    V::Pass,
                ),
                ("MLDv2 report in", Hook::Ingress("x/a"), report, V::Pass),
            ],
        );
    });
}

#[test]
fn icmp_errors_pass_only_for_connections_the_pod_has() {
    with_fixture(DENY_INGRESS, |fx| {
        let out4 = tcp_syn(A4, C4, 33000, 443);
        let out6 = tcp_syn(A6, C6, 33000, 443);
        let untracked4 = tcp_syn(A4, C4, 33001, 443);
        let untracked6 = tcp_syn(A6, C6, 33001, 443);
        assert_table(
            fx,
            vec![
                ("a->c v4", Hook::Egress("x/a"), out4.clone(), V::Pass),
                ("a->c v6", Hook::Egress("x/a"), out6.clone(), V::Pass),
                (
                    "frag needed for a's flow",
                    Hook::Ingress("x/a"),
                    icmp_error("10.0.1.254", A4, &out4),
                    V::Pass,
                ),
                (
                    "packet too big for a's flow",
                    Hook::Ingress("x/a"),
                    icmp_error("fd00:1::fe", A6, &out6),
                    V::Pass,
                ),
                (
                    "error about a flow a never had (v4)",
                    Hook::Ingress("x/a"),
                    icmp_error("10.0.1.254", A4, &untracked4),
                    V::Drop,
                ),
                (
                    "error about a flow a never had (v6)",
                    Hook::Ingress("x/a"),
                    icmp_error("fd00:1::fe", A6, &untracked6),
                    V::Drop,
                ),
            ],
        );
        assert_eq!(
            fx.counter(direction::INGRESS, family::IPV4, reason::PASS_RELATED),
            1
        );
    });
}

#[test]
fn a_pod_cannot_send_from_another_address() {
    with_fixture("", |fx| {
        let ae = Hook::Egress("x/a");
        assert_table(
            fx,
            vec![
                ("own v4", ae, tcp_syn(A4, C4, 1, 80), V::Pass),
                ("own v6", ae, tcp_syn(A6, C6, 1, 80), V::Pass),
                ("b's v4", ae, tcp_syn(B4, C4, 1, 80), V::Drop),
                ("b's v6", ae, tcp_syn(B6, C6, 1, 80), V::Drop),
                ("outside v4", ae, udp("203.0.113.5", C4, 1, 53), V::Drop),
                (
                    "link-local v6",
                    ae,
                    tcp_syn("fe80::1234", "fe80::1", 1, 80),
                    V::Pass,
                ),
                (
                    "DAD from ::",
                    ae,
                    icmpv6("::", "ff02::1:ff00:1", 135),
                    V::Pass,
                ),
                (
                    "spoofed echo v6",
                    ae,
                    echo_request("fd00:9::9", C6, 3),
                    V::Drop,
                ),
            ],
        );
        assert_eq!(
            fx.counter(direction::EGRESS, family::IPV4, reason::DROP_SPOOFED),
            2
        );
    });
}

#[test]
fn pods_annotated_to_route_other_addresses_may_send_from_them() {
    let annotated = r#"
apiVersion: v1
kind: Pod
metadata:
  name: a
  namespace: x
  labels: {app: a}
  annotations: {netpol.io/allow-any-source: "true"}
spec:
  nodeName: n1
  containers:
    - name: c
      ports: [{name: http, containerPort: 8080, protocol: TCP}]
status:
  phase: Running
  podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]
"#;
    with_fixture(annotated, |fx| {
        assert_table(
            fx,
            vec![
                (
                    "a routes v4",
                    Hook::Egress("x/a"),
                    udp("203.0.113.5", C4, 1, 53),
                    V::Pass,
                ),
                (
                    "a routes v6",
                    Hook::Egress("x/a"),
                    udp("2001:db8::5", C6, 1, 53),
                    V::Pass,
                ),
                (
                    "b does not",
                    Hook::Egress("x/b"),
                    udp("203.0.113.5", C4, 1, 53),
                    V::Drop,
                ),
            ],
        );
    });
}

#[test]
fn stray_ack_and_rst_segments_are_judged_like_new_connections() {
    with_fixture(POLICY, |fx| {
        let a = Hook::Ingress("x/a");
        assert_table(
            fx,
            vec![
                ("ACK from c to a:80", a, tcp_ack(C4, A4, 1, 80), V::Drop),
                ("RST from c to a:80", a, tcp_rst(C4, A4, 1, 80), V::Drop),
                ("RST from b to a:81", a, tcp_rst(B6, A6, 1, 81), V::Drop),
                (
                    "ACK from b to a:80 (picked up)",
                    a,
                    tcp_ack(B4, A4, 2, 80),
                    V::Pass,
                ),
            ],
        );
    });
}

#[test]
fn a_new_pod_reusing_an_address_inherits_no_connections() {
    with_fixture(POLICY, |fx| {
        let a = Hook::Ingress("x/a");
        assert_table(
            fx,
            vec![("b->a:80", a, tcp_syn(B4, A4, 45000, 80), V::Pass)],
        );
        let old = fx.endpoint_id("x/a");
        assert!(fx.connections().iter().any(|k| k.endpoint == old));

        // a is deleted and a new pod gets its name, address and interface,
        // under deny-all.
        let replaced = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, uid: second-life, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-in, namespace: x}
spec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Ingress]}
"#;
        fx.update(replaced);
        let new = fx.endpoint_id("x/a");
        assert_ne!(old, new, "a new pod gets a new endpoint id");
        assert!(
            !fx.connections().iter().any(|k| k.endpoint == old),
            "the old pod's connections are gone"
        );
        assert_table(
            fx,
            vec![
                (
                    "old connection's next segment",
                    a,
                    tcp_ack(B4, A4, 45000, 80),
                    V::Drop,
                ),
                (
                    "old connection's reply",
                    Hook::Egress("x/a"),
                    tcp_ack(A4, B4, 80, 45000),
                    V::Pass,
                ),
            ],
        );
    });
}

#[test]
fn removing_the_rule_that_admitted_a_connection_cuts_it() {
    with_fixture(POLICY, |fx| {
        let (ai, ae) = (Hook::Ingress("x/a"), Hook::Egress("x/a"));
        assert_table(
            fx,
            vec![
                ("b->a:80 v4 opens", ai, tcp_syn(B4, A4, 46000, 80), V::Pass),
                ("b->a:80 v6 opens", ai, tcp_syn(B6, A6, 46000, 80), V::Pass),
                ("b->a:53 udp opens", ai, udp(B4, A4, 46001, 53), V::Pass),
            ],
        );
        // An unrelated change leaves a's generation, and its connections,
        // alone.
        fx.update(&format!(
            "{POLICY}\n---\n{}",
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-only, namespace: x}
spec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Ingress]}
"#
        ));
        assert_table(
            fx,
            vec![("unrelated change", ai, tcp_ack(B4, A4, 46000, 80), V::Pass)],
        );

        // Now only UDP 53 stays allowed from b.
        fx.update(
            r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-ingress, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: b}}}]
      ports: [{protocol: UDP, port: 53}]
"#,
        );
        assert_table(
            fx,
            vec![
                (
                    "revoked v4 segment",
                    ai,
                    tcp_ack(B4, A4, 46000, 80),
                    V::Drop,
                ),
                ("revoked v6 reply", ae, tcp_ack(A6, B6, 80, 46000), V::Drop),
                ("still-allowed udp", ai, udp(B4, A4, 46001, 53), V::Pass),
                // The entry is gone: b's next segment is a new connection
                // to a port a no longer accepts.
                (
                    "revoked v4 stays cut",
                    ai,
                    tcp_ack(B4, A4, 46000, 80),
                    V::Drop,
                ),
            ],
        );
        assert!(fx.counter(direction::INGRESS, family::IPV4, reason::DROP_REVOKED) >= 1);
        assert!(fx.counter(direction::EGRESS, family::IPV6, reason::DROP_REVOKED) >= 1);
    });
}

/// The config map's clock fields, as the programs read them.
fn config_clock(fx: &Fixture) -> JiffyClock {
    let config: aya::maps::Array<_, netpol_common::GlobalConfig> =
        fx.pinned(netpol_common::maps::CONFIG);
    let c = config.get(&0, 0).expect("the config entry");
    JiffyClock {
        jiffy_ns: c.clock_jiffy_ns,
        offset_ns: c.clock_offset_ns,
        error_ns: 0,
    }
}

/// Sends a SYN from x/a on `port` and returns the stamp of its entry,
/// with the jiffies read just before and just after.
fn stamp(fx: &mut Fixture, port: u16) -> (u64, u64, u64) {
    let j0 = clock::read_jiffies().expect("/proc/timer_list (root)");
    assert_eq!(
        fx.run(Hook::Egress("x/a"), &tcp_syn(A4, C4, port, 443)),
        V::Pass
    );
    let j1 = clock::read_jiffies().expect("/proc/timer_list (root)");
    let (_, entry) = fx
        .tracked()
        .into_iter()
        .find(|(k, _)| k.local_port == port)
        .expect("the SYN is tracked");
    (j0, entry.last_seen_ns, j1)
}

/// Whether `stamp` is the start of one of the jiffies `j0..=j1` on `c`:
/// exact, whatever the machine's load, as the programs and this test read
/// the same counter.
fn on_lattice(c: &JiffyClock, stamp: u64, j0: u64, j1: u64) -> bool {
    (j0..=j1).any(|j| c.at(j) == stamp)
}

#[test]
fn conntrack_stamps_entries_on_the_clock_in_the_config_map_and_inspect_reads_it() {
    with_fixture(DENY_INGRESS, |fx| {
        let measured = fx.dp.clock();
        let c = config_clock(fx);
        assert_eq!(
            (c.jiffy_ns, c.offset_ns),
            (measured.jiffy_ns, measured.offset_ns),
            "the config map holds the clock the agent measured"
        );
        if c.jiffy_ns == 0 {
            // Under `cargo xtask vm-test` an emulated guest sharing the
            // host's CPUs may read /proc too slowly to time jiffies within
            // the limit: the programs then read the clock source, checked
            // by the next test. Anywhere else the clock must be measured.
            assert!(
                std::env::var_os("NETPOL_VM_GUEST").is_some(),
                "/proc/timer_list is readable here: the jiffy clock must be measured"
            );
            return;
        }
        let (j0, stamped, j1) = stamp(fx, 47001);
        assert!(
            on_lattice(&c, stamped, j0, j1),
            "{stamped} is not the start of a jiffy in {j0}..={j1} on {c:?}"
        );
        // inspect's now is the programs' now: between the starts of the
        // jiffies read around it, and never before the stamp.
        let cfg = fx.pinned::<aya::maps::Array<_, netpol_common::GlobalConfig>>(
            netpol_common::maps::CONFIG,
        );
        let cfg = cfg.get(&0, 0).expect("the config entry");
        let n0 = clock::read_jiffies().expect("jiffies");
        let now = netpol_agent::inspect::programs_now_ns(&cfg);
        let n1 = clock::read_jiffies().expect("jiffies");
        assert!(
            on_lattice(&c, now, n0, n1) && now >= stamped,
            "inspect's now {now} is not the start of a jiffy in {n0}..={n1} after {stamped}"
        );
    });
}

#[test]
fn a_clock_measured_again_or_the_clock_source_takes_over_at_once() {
    with_fixture(DENY_INGRESS, |fx| {
        let measured = fx.dp.clock();
        if measured.jiffy_ns != 0 {
            // A clock 1000 s ahead of CLOCK_MONOTONIC, as an origin timed
            // in a stalled moment could be (far more, so that no load
            // blurs it): the watch says measure again at its first sample,
            // and the programs stamp on the clock the datapath is given.
            let ahead = JiffyClock {
                offset_ns: measured.offset_ns.wrapping_add(1_000_000_000_000),
                ..measured
            };
            fx.dp.set_clock(ahead).expect("set clock");
            assert_eq!(config_clock(fx).offset_ns, ahead.offset_ns);
            let (j0, stamped, j1) = stamp(fx, 47002);
            assert!(
                on_lattice(&ahead, stamped, j0, j1),
                "stamped on the clock set"
            );
            let sample = clock::Sample::take().expect("sample");
            let verdict = clock::Watch::new(ahead).observe(&sample);
            assert!(
                matches!(verdict, clock::Verdict::Remeasure(s) if s.ahead_ns > 900_000_000_000),
                "{verdict:?}"
            );
            // Measured again, the clock is back within seconds.
            if let Some(again) = clock::measure() {
                let skew = again.skew(&clock::Sample::take().expect("sample"));
                assert!(skew.is_some_and(|s| s.ahead_ns < 1_000_000_000), "{skew:?}");
            }
        }
        // The fallback: the clock source, stamped within the packet's run.
        fx.dp.set_clock(JiffyClock::NONE).expect("set clock");
        assert_eq!(config_clock(fx).jiffy_ns, 0);
        let before = netpol_agent::inspect::monotonic_ns();
        let (_, stamped, _) = stamp(fx, 47003);
        let after = netpol_agent::inspect::monotonic_ns();
        assert!(
            (before..=after).contains(&stamped),
            "stamped by bpf_ktime_get_ns within [{before}, {after}]: {stamped}"
        );
    });
}

#[test]
fn tcp_connections_expire_by_state_with_configured_timeouts() {
    with_fixture(DENY_INGRESS, |fx| {
        let ms = 1_000_000;
        fx.dp
            .set_global(netpol_common::GlobalConfig {
                ct_tcp_syn_ns: 50 * ms,
                ct_tcp_closing_ns: 50 * ms,
                ct_tcp_established_ns: 60_000 * ms,
                ..netpol_common::GlobalConfig::default()
            })
            .expect("timeouts");
        let (ai, ae) = (Hook::Ingress("x/a"), Hook::Egress("x/a"));
        let pause = || std::thread::sleep(std::time::Duration::from_millis(150));
        let synack = |src: &str, dst: &str, sport, dport| {
            let mut f = tcp_syn(src, dst, sport, dport);
            // SYN+ACK: the flags byte of an option-less TCP header.
            let at = if src.contains(':') {
                14 + 40 + 13
            } else {
                14 + 20 + 13
            };
            f[at] = 0x12;
            f
        };
        assert_table(
            fx,
            vec![(
                "half-open: SYN out",
                ae,
                tcp_syn(A4, C4, 34000, 443),
                V::Pass,
            )],
        );
        pause();
        assert_table(
            fx,
            vec![(
                "half-open expired: SYN-ACK in",
                ai,
                synack(C4, A4, 443, 34000),
                V::Drop,
            )],
        );
        assert_table(
            fx,
            vec![
                ("SYN out", ae, tcp_syn(A6, C6, 34001, 443), V::Pass),
                ("SYN-ACK in", ai, synack(C6, A6, 443, 34001), V::Pass),
            ],
        );
        pause();
        assert_table(
            fx,
            vec![
                (
                    "established outlives the half-open timeout",
                    ai,
                    tcp_ack(C6, A6, 443, 34001),
                    V::Pass,
                ),
                ("RST out", ae, tcp_rst(A6, C6, 34001, 443), V::Pass),
            ],
        );
        pause();
        assert_table(
            fx,
            vec![(
                "closing expired: ACK in",
                ai,
                tcp_ack(C6, A6, 443, 34001),
                V::Drop,
            )],
        );
    });
}
