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
