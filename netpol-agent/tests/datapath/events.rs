//! Deny events of the real programs (BPF_PROG_TEST_RUN): what a drop
//! reports on the ring buffer, that a pass reports nothing, and how the
//! per-endpoint rate limit and a full ring count their losses. Maps are
//! filled by the production map writer; a fresh object per test.
use aya::maps::{MapData, RingBuf};
use netpol_agent::datapath::events::{EventsLost, decode};
use netpol_common::{DenyEvent, GlobalConfig, direction, events, family, protocol, reason};
use netpol_testkit::packets::*;

/// `x/a` admits TCP 80 from `x/b` only.
const A_FROM_B_ON_80: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}]}]
"#;

/// Every event waiting on the ring.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<DenyEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(decode(&item).expect("a whole event"));
    }
    out
}

fn lost(fx: &Fixture) -> EventsLost {
    fx.dp
        .kernel_counters()
        .expect("counter maps")
        .lost()
        .expect("lost events")
}

/// An address as the event carries it (IPv4 in the first 4 bytes).
fn raw(ip: &str) -> [u8; 16] {
    match ip.parse().expect("an address") {
        std::net::IpAddr::V4(a) => {
            let mut out = [0; 16];
            out[..4].copy_from_slice(&a.octets());
            out
        }
        std::net::IpAddr::V6(a) => a.octets(),
    }
}

#[test]
fn a_drop_reports_its_tuple_reason_endpoint_and_interface_and_a_pass_nothing() {
    with_own_fixture(A_FROM_B_ON_80, |fx| {
        let mut ring = fx.dp.take_events().expect("the ring buffer");
        let (ai, be) = (Hook::Ingress("x/a"), Hook::Egress("x/b"));
        assert_eq!(fx.run(ai, &tcp_syn(B4, A4, 40000, 80)), V::Pass);
        assert_eq!(fx.run(ai, &tcp_syn(B6, A6, 40000, 80)), V::Pass);
        assert_eq!(drain(&mut ring), vec![], "passes report nothing");

        assert_eq!(fx.run(ai, &udp(B4, A4, 4000, 53)), V::Drop);
        assert_eq!(fx.run(ai, &tcp_syn(C6, A6, 40001, 22)), V::Drop);
        // A spoofed source: b's egress, at its own interface.
        assert_eq!(fx.run(be, &echo_request(C4, A4, 77)), V::Drop);
        let (a, b) = (fx.endpoint_id("x/a"), fx.endpoint_id("x/b"));
        let (ia, ib) = (fx.ifindex["x/a"], fx.ifindex["x/b"]);
        let got: Vec<DenyEvent> = drain(&mut ring)
            .into_iter()
            .map(|e| {
                assert_ne!(e.timestamp_ns, 0);
                DenyEvent {
                    timestamp_ns: 0,
                    ..e
                }
            })
            .collect();
        let ev = |endpoint, ifindex, why, dir: u32, fam: u32, proto, ports: (u16, u16), s, d| {
            DenyEvent {
                timestamp_ns: 0,
                endpoint,
                ifindex,
                reason: why,
                direction: dir as u8,
                family: fam as u8,
                protocol: proto,
                icmp_type: if proto == protocol::ICMP { 8 } else { 0 },
                sport: ports.0,
                dport: ports.1,
                src: raw(s),
                dst: raw(d),
                _pad: 0,
            }
        };
        assert_eq!(
            got,
            vec![
                ev(
                    a,
                    ia,
                    reason::DROP_POLICY,
                    direction::INGRESS,
                    family::IPV4,
                    protocol::UDP,
                    (4000, 53),
                    B4,
                    A4
                ),
                ev(
                    a,
                    ia,
                    reason::DROP_POLICY,
                    direction::INGRESS,
                    family::IPV6,
                    protocol::TCP,
                    (40001, 22),
                    C6,
                    A6
                ),
                ev(
                    b,
                    ib,
                    reason::DROP_SPOOFED,
                    direction::EGRESS,
                    family::IPV4,
                    protocol::ICMP,
                    (77, 77),
                    C4,
                    A4
                ),
            ]
        );
        assert_eq!(lost(fx), EventsLost::default());
    });
}

#[test]
fn the_rate_limit_lets_each_endpoint_its_burst_and_counts_the_rest_as_lost() {
    with_own_fixture(A_FROM_B_ON_80, |fx| {
        let mut ring = fx.dp.take_events().expect("the ring buffer");
        fx.dp
            .set_global(GlobalConfig {
                event_rate: 1,
                event_burst: 3,
                ..GlobalConfig::default()
            })
            .expect("limits");
        let start = std::time::Instant::now();
        for port in 0..10 {
            let denied = udp(B4, A4, 4000, 1000 + port);
            assert_eq!(fx.run(Hook::Ingress("x/a"), &denied), V::Drop);
        }
        // Another endpoint has a bucket of its own.
        assert_eq!(
            fx.run(Hook::Egress("x/b"), &echo_request(C4, A4, 1)),
            V::Drop
        );
        let took = start.elapsed().as_secs();
        let got = drain(&mut ring);
        let of_a = got
            .iter()
            .filter(|e| e.endpoint == fx.endpoint_id("x/a"))
            .count() as u64;
        let of_b = got.len() as u64 - of_a;
        // The burst, and one a second if the test was slow.
        assert!((3..=3 + took).contains(&of_a), "{of_a} events of a");
        assert_eq!(of_b, 1);
        assert_eq!(
            lost(fx),
            EventsLost {
                rate_limited: 10 - of_a,
                ring_full: 0
            }
        );
        // Events lost never change a verdict.
        assert_eq!(
            fx.counter(direction::INGRESS, family::IPV4, reason::DROP_POLICY),
            10
        );
    });
}

#[test]
fn a_full_ring_counts_the_events_it_could_not_hold() {
    with_own_fixture(A_FROM_B_ON_80, |fx| {
        let mut ring = fx.dp.take_events().expect("the ring buffer");
        fx.dp
            .set_global(GlobalConfig {
                event_rate: events::MAX_RATE,
                event_burst: events::MAX_BURST,
                ..GlobalConfig::default()
            })
            .expect("limits");
        // 72 bytes a record (8 of header): fewer than 3700 fit.
        let sent = 4000;
        let denied = udp(B4, A4, 4000, 1);
        for _ in 0..sent {
            assert_eq!(fx.run(Hook::Ingress("x/a"), &denied), V::Drop);
        }
        let held = drain(&mut ring).len() as u64;
        let l = lost(fx);
        assert!(held < sent && l.ring_full > 0, "{held} held, {l:?}");
        assert_eq!((held + l.ring_full, l.rate_limited), (sent, 0));
        // Read, the ring takes events again.
        assert_eq!(fx.run(Hook::Ingress("x/a"), &denied), V::Drop);
        assert_eq!(drain(&mut ring).len(), 1);
    });
}

/// A Service, and `x/a` may reach nothing on egress.
const A_EGRESS_LOCKED_AND_A_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: s-b, namespace: x}
spec:
  clusterIPs: [10.96.0.2]
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-locked, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
"#;

#[test]
fn a_service_packet_judged_downstream_reports_its_source_endpoint_and_backend() {
    with_own_fixture(A_EGRESS_LOCKED_AND_A_SERVICE, |fx| {
        let mut ring = fx.dp.take_events().expect("the ring buffer");
        let (v, marked) =
            fx.run_marked(Hook::Egress("x/a"), &tcp_syn(A4, "10.96.0.2", 40000, 80), 0);
        assert_eq!(v, V::Pass, "marked, judged downstream");
        assert_eq!(drain(&mut ring), vec![]);
        // kube-proxy chose x/b (local), then y/c (remote, at leave_node).
        let syn = tcp_syn(A4, B4, 40000, 8080);
        assert_eq!(fx.run_marked(Hook::Ingress("x/b"), &syn, marked).0, V::Drop);
        let syn = tcp_syn(A4, C4, 40001, 8080);
        assert_eq!(fx.run_marked(Hook::Leave, &syn, marked).0, V::Drop);
        let got = drain(&mut ring);
        let a = fx.endpoint_id("x/a");
        let seen: Vec<_> = got
            .iter()
            .map(|e| (e.endpoint, e.ifindex, e.direction, e.reason, e.dst, e.dport))
            .collect();
        let egress = direction::EGRESS as u8;
        assert_eq!(
            seen,
            vec![
                (
                    a,
                    fx.ifindex["x/b"],
                    egress,
                    reason::DROP_POLICY,
                    raw(B4),
                    8080
                ),
                (
                    a,
                    fx.ifindex["other"],
                    egress,
                    reason::DROP_POLICY,
                    raw(C4),
                    8080
                ),
            ]
        );
    });
}

/// x/a isolated both ways (its own Service s-a, 80 → 8080), and a staged
/// `ClusterNetworkPolicy` that would deny x/a's traffic to itself on
/// 8080: enforced, the hairpin is not judged (no `ClusterNetworkPolicy`
/// applies); staged, it is.
const A_LOCKED_AND_A_STAGED_SELF_DENY: &str = concat!(
    service_s_a!(),
    r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-locked, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Ingress, Egress]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata:
  name: no-self-8080
  annotations: {netpol.io/staged: "true"}
spec:
  tier: Admin
  priority: 1
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}
  ingress:
    - action: Deny
      from: [{pods: {podSelector: {matchLabels: {app: a}}}}]
      protocols: [{tcp: {destinationPort: {number: 8080}}}]
"#
);

#[test]
fn a_hairpin_the_staged_view_would_deny_passes_and_is_reported_once_from_the_pod_to_itself() {
    with_own_fixture(A_LOCKED_AND_A_STAGED_SELF_DENY, |fx| {
        let mut ring = fx.dp.take_events().expect("the ring buffer");
        let a = fx.endpoint_id("x/a");
        for (own, vip, node) in [(A4, "10.96.0.1", NODE4), (A6, "fd00:96::1", "fd00:ffff::1")] {
            // x/a to its own Service; kube-proxy picks x/a:8080 and
            // masquerades the source to a node address.
            let hairpin = |fx: &mut Fixture, sport: u16, port: u16| {
                let (v, marked) =
                    fx.run_marked(Hook::Egress("x/a"), &tcp_syn(own, vip, sport, 80), 0);
                assert_eq!(v, V::Pass, "marked at the source");
                fx.run_marked(
                    Hook::Ingress("x/a"),
                    &tcp_syn(node, own, sport, port),
                    marked,
                )
                .0
            };
            assert_eq!(hairpin(fx, 40100, 8080), V::Pass, "enforced: not judged");
            let got: Vec<_> = drain(&mut ring)
                .iter()
                .map(|e| (e.endpoint, e.reason, e.direction, e.src, e.dst, e.dport))
                .collect();
            assert_eq!(
                got,
                vec![(
                    a,
                    reason::STAGED_WOULD_DENY,
                    direction::INGRESS as u8,
                    raw(own),
                    raw(own),
                    8080
                )],
                "the staged view would deny the new hairpin at x/a's ingress"
            );
            // The same connection again (tracked): nothing more.
            assert_eq!(hairpin(fx, 40100, 8080), V::Pass);
            // Another port: the staged rule does not match, and
            // NetworkPolicy never restricts a pod's traffic to itself.
            assert_eq!(hairpin(fx, 40101, 9090), V::Pass);
            assert_eq!(drain(&mut ring), vec![], "nothing else to report");
        }
    });
}

/// x/a's Service s-a (80 → 8080); x/b, isolated by nothing enforced, gets
/// a staged egress policy admitting x/a on `PORT` only.
const B_STAGED_EGRESS_TO_A: &str = concat!(
    service_s_a!(),
    r#"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: b-out
  namespace: x
  annotations: {netpol.io/staged: "true"}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: PORT}]}]
"#
);

/// A pod only the staged view isolates still has its Service traffic
/// marked, so that the staged view judges it with the backend as the peer
/// (not the frontend address, which no rule names): no report where the
/// staged policy admits the backend's port, a "would deny" naming the
/// backend where it does not.
#[test]
fn service_traffic_of_a_pod_only_the_staged_view_isolates_is_judged_at_the_backend() {
    for (port, want) in [(8080, None), (9999, Some(reason::STAGED_WOULD_DENY))] {
        let manifests = B_STAGED_EGRESS_TO_A.replace("PORT", &port.to_string());
        with_own_fixture(&manifests, |fx| {
            let mut ring = fx.dp.take_events().expect("the ring buffer");
            let b = fx.endpoint_id("x/b");
            for (from, to, vip, sport) in
                [(B4, A4, "10.96.0.1", 40200), (B6, A6, "fd00:96::1", 40201)]
            {
                let (v, marked) =
                    fx.run_marked(Hook::Egress("x/b"), &tcp_syn(from, vip, sport, 80), 0);
                assert_eq!(v, V::Pass);
                assert_ne!(marked, 0, "marked: the staged view isolates x/b's egress");
                assert_eq!(drain(&mut ring), vec![], "nothing judged at the frontend");
                let syn = tcp_syn(from, to, sport, 8080);
                assert_eq!(fx.run_marked(Hook::Ingress("x/a"), &syn, marked).0, V::Pass);
                let got: Vec<_> = drain(&mut ring)
                    .iter()
                    .map(|e| (e.endpoint, e.reason, e.direction, e.dst, e.dport))
                    .collect();
                let expected: Vec<_> = want
                    .map(|r| (b, r, direction::EGRESS as u8, raw(to), 8080))
                    .into_iter()
                    .collect();
                assert_eq!(got, expected, "staged policy on port {port}");
            }
        });
    }
}
