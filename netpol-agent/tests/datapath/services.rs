//! Service traffic through the real programs (BPF_PROG_TEST_RUN): `from_pod`
//! marks a packet to a frontend instead of judging it, and the hook that
//! sees the backend kube-proxy chose (`to_pod`, `leave_node`) judges the
//! source pod's egress there, for both families.
use netpol_common::{direction, family, mark, reason};
use netpol_testkit::packets::*;

/// Frontends: s-a, s-b (local backends) and s-c (remote backend), port 80
/// → 8080; x/a may reach pods b and c on 8080 only, and nothing may reach
/// x/a.
const SERVICES_AND_POLICY: &str = concat!(
    service_s_a!(),
    r#"---
apiVersion: v1
kind: Service
metadata: {name: s-b, namespace: x}
spec:
  clusterIPs: [10.96.0.2, "fd00:96::2"]
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: s-c, namespace: y}
spec:
  clusterIPs: [10.96.0.3, "fd00:96::3"]
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-locked, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Ingress, Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: b}}}]
      ports: [{port: 8080}]
    - to: [{namespaceSelector: {matchLabels: {team: ops}}}]
      ports: [{port: 8080}]
"#
);

struct Fam {
    fam: u32,
    a: &'static str,
    b: &'static str,
    c: &'static str,
    node: &'static str,
    vip_a: &'static str,
    vip_b: &'static str,
    vip_c: &'static str,
}

const V4: Fam = Fam {
    fam: family::IPV4,
    a: A4,
    b: B4,
    c: C4,
    node: NODE4,
    vip_a: "10.96.0.1",
    vip_b: "10.96.0.2",
    vip_c: "10.96.0.3",
};

const V6: Fam = Fam {
    fam: family::IPV6,
    a: A6,
    b: B6,
    c: C6,
    node: "fd00:ffff::1",
    vip_a: "fd00:96::1",
    vip_b: "fd00:96::2",
    vip_c: "fd00:96::3",
};

fn slot(m: u32) -> u32 {
    mark::slot_of(m, mark::DEFAULT_MASK, mark::shift(mark::DEFAULT_MASK))
}

/// `from_pod` of x/a to a frontend: passes, marked with x/a's slot.
fn send_to_frontend(fx: &mut Fixture, frame: &[u8]) -> u32 {
    let (v, m) = fx.run_marked(Hook::Egress("x/a"), frame, 0);
    assert_eq!(v, V::Pass, "from_pod passes a packet to a frontend");
    assert_ne!(slot(m), 0, "from_pod marks a packet to a frontend: {m:#x}");
    m
}

#[test]
fn service_packet_is_marked_at_source_and_judged_against_the_local_backend() {
    with_fixture(SERVICES_AND_POLICY, |fx| {
        for f in [V4, V6] {
            let marked = send_to_frontend(fx, &tcp_syn(f.a, f.vip_b, 40000, 80));
            assert_eq!(
                fx.counter(direction::EGRESS, f.fam, reason::PASS_SERVICE),
                1
            );

            // kube-proxy chose x/b:8080, which the policy allows.
            let (v, m) = fx.run_marked(
                Hook::Ingress("x/b"),
                &tcp_syn(f.a, f.b, 40000, 8080),
                marked,
            );
            assert_eq!(v, V::Pass, "allowed backend");
            assert_eq!(m & mark::DEFAULT_MASK, 0, "judged packets lose the mark");

            // A backend port the policy does not allow: the egress drop is
            // counted as the source's.
            let before = fx.counter(direction::EGRESS, f.fam, reason::DROP_POLICY);
            let (v, _) = fx.run_marked(
                Hook::Ingress("x/b"),
                &tcp_syn(f.a, f.b, 40001, 9090),
                marked,
            );
            assert_eq!(v, V::Drop, "denied backend port");
            assert_eq!(
                fx.counter(direction::EGRESS, f.fam, reason::DROP_POLICY),
                before + 1
            );
        }
    });
}

#[test]
fn service_packet_leaving_the_node_is_judged_by_leave_node() {
    with_fixture(SERVICES_AND_POLICY, |fx| {
        for f in [V4, V6] {
            let marked = send_to_frontend(fx, &tcp_syn(f.a, f.vip_c, 40010, 80));
            let (v, m) = fx.run_marked(Hook::Leave, &tcp_syn(f.a, f.c, 40010, 8080), marked);
            assert_eq!(v, V::Pass, "remote backend allowed by namespace rule");
            assert_eq!(m & mark::DEFAULT_MASK, 0);
            let (v, _) = fx.run_marked(Hook::Leave, &tcp_syn(f.a, f.c, 40011, 9090), marked);
            assert_eq!(v, V::Drop, "remote backend port not allowed");
            // Traffic netpol did not mark is not leave_node's business.
            let (v, _) = fx.run_marked(Hook::Leave, &tcp_syn(f.a, f.c, 40012, 9090), 0x4000);
            assert_eq!(v, V::Pass, "unmarked packets pass leave_node");
        }
    });
}

#[test]
fn every_packet_of_a_service_connection_is_marked_not_only_the_first() {
    with_fixture(SERVICES_AND_POLICY, |fx| {
        for f in [V4, V6] {
            send_to_frontend(fx, &tcp_syn(f.a, f.vip_b, 40050, 80));
            // Conntrack knows the connection now, as Service traffic: each
            // packet may reach another backend, so each is marked again
            // for the backend's hook to judge.
            send_to_frontend(fx, &tcp_ack(f.a, f.vip_b, 40050, 80));
            send_to_frontend(fx, &tcp_ack(f.a, f.vip_b, 40050, 80));
            assert_eq!(
                fx.counter(direction::EGRESS, f.fam, reason::PASS_SERVICE),
                3
            );
        }
    });
}

#[test]
fn frontend_match_needs_address_port_and_protocol() {
    with_fixture(SERVICES_AND_POLICY, |fx| {
        for f in [V4, V6] {
            // Port 81 is not a frontend: judged as a plain destination,
            // which no rule allows.
            let (v, m) = fx.run_marked(Hook::Egress("x/a"), &tcp_syn(f.a, f.vip_b, 40020, 81), 0);
            assert_eq!((v, slot(m)), (V::Drop, 0));
            let (v, m) = fx.run_marked(Hook::Egress("x/a"), &udp(f.a, f.vip_b, 40020, 80), 0);
            assert_eq!((v, slot(m)), (V::Drop, 0), "UDP/80 is not a frontend");
        }
    });
}

#[test]
fn replies_translated_back_to_the_frontend_pass_the_isolated_source() {
    with_fixture(SERVICES_AND_POLICY, |fx| {
        for f in [V4, V6] {
            send_to_frontend(fx, &tcp_syn(f.a, f.vip_b, 40030, 80));
            // x/a's ingress allows nothing, but this is the reply.
            let v = fx.run(Hook::Ingress("x/a"), &tcp_ack(f.vip_b, f.a, 80, 40030));
            assert_eq!(v, V::Pass, "reply from the frontend");
            let v = fx.run(Hook::Ingress("x/a"), &tcp_syn(f.vip_b, f.a, 80, 40031));
            assert_eq!(v, V::Drop, "no connection: not a reply");
        }
    });
}

#[test]
fn pod_reaching_its_own_service_is_not_subject_to_its_policies() {
    with_fixture(SERVICES_AND_POLICY, |fx| {
        for f in [V4, V6] {
            let marked = send_to_frontend(fx, &tcp_syn(f.a, f.vip_a, 40040, 80));
            // kube-proxy masquerades the hairpin to a node address.
            let (v, _) = fx.run_marked(
                Hook::Ingress("x/a"),
                &tcp_syn(f.node, f.a, 40040, 8080),
                marked,
            );
            assert_eq!(v, V::Pass, "hairpin");
            assert_eq!(
                fx.counter(direction::INGRESS, f.fam, reason::PASS_HAIRPIN),
                1
            );
            // Its answer to the masqueraded address is the same connection,
            // a reply: never Service traffic, so not marked.
            let (v, m) = fx.run_marked(Hook::Egress("x/a"), &tcp_ack(f.a, f.node, 8080, 40040), 0);
            assert_eq!((v, slot(m)), (V::Pass, 0), "hairpin reply");
        }
    });
}

#[test]
fn mark_naming_no_pod_interface_is_dropped() {
    with_fixture(SERVICES_AND_POLICY, |fx| {
        for f in [V4, V6] {
            let stale = mark::with_slot(0, mark::DEFAULT_MASK, 24, 200);
            let (v, _) =
                fx.run_marked(Hook::Ingress("x/b"), &tcp_syn(f.a, f.b, 40050, 8080), stale);
            assert_eq!(v, V::Drop);
            assert_eq!(
                fx.counter(direction::EGRESS, f.fam, reason::DROP_MARK_STALE),
                1
            );
            let (v, _) = fx.run_marked(Hook::Leave, &tcp_syn(f.a, f.c, 40050, 8080), stale);
            assert_eq!(v, V::Drop);
        }
    });
}

#[test]
fn marking_keeps_other_mark_bits_and_skips_pods_without_policy() {
    with_fixture(SERVICES_AND_POLICY, |fx| {
        for f in [V4, V6] {
            let (v, m) = fx.run_marked(
                Hook::Egress("x/a"),
                &tcp_syn(f.a, f.vip_b, 40060, 80),
                0x4000,
            );
            assert_eq!(v, V::Pass);
            assert_eq!(m & !mark::DEFAULT_MASK, 0x4000, "kube-proxy's bit kept");
            assert_ne!(slot(m), 0);
            // x/b is isolated in no direction: nothing to judge later.
            let (v, m) = fx.run_marked(Hook::Egress("x/b"), &tcp_syn(f.b, f.vip_a, 40060, 80), 0);
            assert_eq!((v, m), (V::Pass, 0));
        }
    });
}

/// A ClusterNetworkPolicy judges a pod's traffic to itself through its
/// Service (CNP-SEMANTICS.md 15): egress and ingress with the pod itself
/// as the peer, NetworkPolicy allowing it as it allows any traffic of a
/// pod to itself.
#[test]
fn a_cluster_network_policy_judges_a_pods_hairpin_through_its_service() {
    let manifests = format!(
        "{SERVICES_AND_POLICY}---\n{}",
        r"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-self-8080}
spec:
  tier: Admin
  priority: 1
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}
  ingress:
    - action: Deny
      from: [{pods: {podSelector: {matchLabels: {app: a}}}}]
      protocols: [{tcp: {destinationPort: {number: 8080}}}]
"
    );
    with_fixture(&manifests, |fx| {
        for f in [V4, V6] {
            let marked = send_to_frontend(fx, &tcp_syn(f.a, f.vip_a, 40070, 80));
            let (v, _) = fx.run_marked(
                Hook::Ingress("x/a"),
                &tcp_syn(f.node, f.a, 40070, 8080),
                marked,
            );
            assert_eq!(v, V::Drop, "the Admin tier denies the hairpin on 8080");
            assert_eq!(
                fx.counter(direction::INGRESS, f.fam, reason::DROP_POLICY),
                1
            );
            // Another port: no ClusterNetworkPolicy rule matches, and the
            // NetworkPolicy tier (which isolates x/a both ways, allowing
            // it nothing in) never restricts a pod's traffic to itself.
            let marked = send_to_frontend(fx, &tcp_syn(f.a, f.vip_a, 40071, 80));
            let (v, _) = fx.run_marked(
                Hook::Ingress("x/a"),
                &tcp_syn(f.node, f.a, 40071, 9090),
                marked,
            );
            assert_eq!(v, V::Pass, "hairpin on 9090");
            assert_eq!(
                fx.counter(direction::INGRESS, f.fam, reason::PASS_HAIRPIN),
                1
            );
        }
    });
}
