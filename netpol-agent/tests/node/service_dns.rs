//! DNS through the kube-dns Service: an egress policy allowing UDP and TCP
//! 53 to pods labelled `k8s-app: kube-dns` (any namespace) lets a pod
//! resolve through the Service's ClusterIP, which kube-proxy translates to
//! the coredns pod after `from_pod`, and lets it reach nothing else.
//!
//! One node namespace with the real `netpol-agent run`, kube-proxy's DNAT,
//! a small DNS responder (both transports, both families) in the coredns
//! pod and in a decoy pod.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use netpol_testkit::{
    Netns,
    datapath::TempBpffs,
    echo::{Case, Proto, echo, expect},
    kube_proxy::{Dnat, kube_proxy},
    manifests::Manifests,
    privileged,
    process::{AgentProcess, Turn},
    topology::{Pod, Topology, calico_pod, ip, node},
};

use crate::AGENT;

const DNS_V4: &str = "10.96.0.10";
const DNS_V6: &str = "fd00:96::a";
/// coredns' metrics port: served by the pod and the Service, not DNS.
const METRICS: u16 = 9153;
/// The name the responders know, and its addresses.
const NAME: &str = "web.x.svc.cluster.local";
const WEB_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);
const WEB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 7, 7);
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

// ---------------------------------------------------------------------
// DNS wire format (RFC 1035), just enough for one question and its answer.
// ---------------------------------------------------------------------

/// A recursive query for `name`.
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.') {
        m.push(u8::try_from(label.len()).expect("label length"));
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0]);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes()); // IN
    m
}

/// The offset just past the name at `at` (labels, or a pointer).
fn skip_name(m: &[u8], mut at: usize) -> Option<usize> {
    for _ in 0..128 {
        let len = *m.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return Some(at + 2),
            l => at += 1 + usize::from(l),
        }
    }
    None
}

fn u16_at(m: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]))
}

/// The responder's answer to one query: `NAME`'s A or AAAA record,
/// NXDOMAIN for any other name.
fn respond(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16_at(q, 4)? != 1 {
        return None;
    }
    let end = skip_name(q, 12)?;
    let qtype = u16_at(q, end)?;
    let question = q.get(12..end + 4)?;
    let mut labels = Vec::new();
    let mut at = 12;
    while q[at] != 0 {
        let l = usize::from(q[at]);
        labels.push(String::from_utf8_lossy(q.get(at + 1..at + 1 + l)?).to_lowercase());
        at += 1 + l;
    }
    let known = labels.join(".") == NAME;
    let rdata: Option<Vec<u8>> = match qtype {
        TYPE_A if known => Some(WEB_V4.octets().to_vec()),
        TYPE_AAAA if known => Some(WEB_V6.octets().to_vec()),
        _ => None,
    };
    let mut r = Vec::with_capacity(q.len() + 32);
    r.extend_from_slice(&q[..2]);
    // QR, AA, RD copied; RA; NOERROR or NXDOMAIN.
    r.push(0x84 | (q[2] & 0x01));
    r.push(if known { 0x80 } else { 0x83 });
    r.extend_from_slice(&[0, 1, 0, u8::from(rdata.is_some()), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if let Some(rdata) = rdata {
        r.extend_from_slice(&[0xc0, 12]); // the question's name
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&30u32.to_be_bytes());
        r.extend_from_slice(&u16::try_from(rdata.len()).ok()?.to_be_bytes());
        r.extend_from_slice(&rdata);
    }
    Some(r)
}

/// The addresses an answer to query `id` carries; `None` when it is not
/// a successful answer to it.
fn addresses(id: u16, m: &[u8]) -> Option<Vec<IpAddr>> {
    if m.len() < 12 || u16_at(m, 0)? != id || m[2] & 0x80 == 0 || m[3] & 0x0f != 0 {
        return None;
    }
    let mut at = 12;
    for _ in 0..u16_at(m, 4)? {
        at = skip_name(m, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..u16_at(m, 6)? {
        at = skip_name(m, at)?;
        let (rtype, len) = (u16_at(m, at)?, usize::from(u16_at(m, at + 8)?));
        let data = m.get(at + 10..at + 10 + len)?;
        match (rtype, <[u8; 4]>::try_from(data), <[u8; 16]>::try_from(data)) {
            (TYPE_A, Ok(a), _) => out.push(IpAddr::from(a)),
            (TYPE_AAAA, _, Ok(a)) => out.push(IpAddr::from(a)),
            _ => {}
        }
        at += 10 + len;
    }
    Some(out)
}

/// A DNS server on port 53 of every address of the pod, UDP and TCP.
fn serve_dns(p: &Pod) {
    for addr in p.addresses() {
        let at = SocketAddr::new(addr, 53);
        let (udp, tcp) = p.ns.run(|| {
            (
                UdpSocket::bind(at).expect("udp/53"),
                TcpListener::bind(at).expect("tcp/53"),
            )
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                if let Some(r) = respond(&buf[..n]) {
                    let _ = udp.send_to(&r, from);
                }
            }
        });
        std::thread::spawn(move || {
            for s in tcp.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut len = [0u8; 2];
                    while s.read_exact(&mut len).is_ok() {
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if s.read_exact(&mut q).is_err() {
                            break;
                        }
                        let Some(r) = respond(&q) else { break };
                        let Ok(rlen) = u16::try_from(r.len()) else {
                            break;
                        };
                        if s.write_all(&rlen.to_be_bytes()).is_err() || s.write_all(&r).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
}

/// Asks `server` for `NAME` from the calling thread's netns; the answer's
/// addresses, or `None` on a timeout or a bad answer.
fn resolve(proto: Proto, server: SocketAddr, qtype: u16, timeout: Duration) -> Option<Vec<IpAddr>> {
    let id = u16::try_from(std::process::id() % 0xffff).ok()? ^ qtype;
    let q = query(id, NAME, qtype);
    let mut buf = [0u8; 512];
    match proto {
        Proto::Udp => {
            let any: SocketAddr = if server.is_ipv4() {
                "0.0.0.0:0".parse().ok()?
            } else {
                "[::]:0".parse().ok()?
            };
            let s = UdpSocket::bind(any).ok()?;
            s.connect(server).ok()?;
            s.set_read_timeout(Some(timeout)).ok()?;
            s.send(&q).ok()?;
            let n = s.recv(&mut buf).ok()?;
            addresses(id, &buf[..n])
        }
        Proto::Tcp => {
            let mut s = TcpStream::connect_timeout(&server, timeout).ok()?;
            s.set_read_timeout(Some(timeout)).ok()?;
            s.write_all(&u16::try_from(q.len()).ok()?.to_be_bytes())
                .ok()?;
            s.write_all(&q).ok()?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len).ok()?;
            let n = usize::from(u16::from_be_bytes(len));
            s.read_exact(buf.get_mut(..n)?).ok()?;
            addresses(id, &buf[..n])
        }
    }
}

#[test]
fn the_dns_wire_format_round_trips() {
    for (qtype, want) in [
        (TYPE_A, IpAddr::V4(WEB_V4)),
        (TYPE_AAAA, IpAddr::V6(WEB_V6)),
    ] {
        let q = query(7, NAME, qtype);
        let r = respond(&q).expect("an answer");
        assert_eq!(addresses(7, &r), Some(vec![want]));
        assert_eq!(addresses(8, &r), None, "another query's answer");
    }
    let r = respond(&query(7, "nope.cluster.local", TYPE_A)).expect("an answer");
    assert_eq!(addresses(7, &r), None, "NXDOMAIN");
}

// ---------------------------------------------------------------------
// The node.
// ---------------------------------------------------------------------

/// Fields drop in order: the agent before its bpffs and namespaces.
struct World {
    agent: AgentProcess,
    manifests: Manifests,
    _bpffs: TempBpffs,
    coredns: Pod,
    client: Pod,
    other: Pod,
    _node: Netns,
    _turn: Turn,
}

fn cluster(coredns: &Pod, client: &Pod, other: &Pod) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node1}}
spec: {{podCIDRs: [10.244.1.0/24, "fd00:1::/64"]}}
status: {{addresses: [{{type: InternalIP, address: 192.168.100.1}}, {{type: InternalIP, address: "fd00:100::1"}}]}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: kube-system, labels: {{kubernetes.io/metadata.name: kube-system}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: x, labels: {{kubernetes.io/metadata.name: x}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: coredns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  nodeName: node1
  containers:
    - name: coredns
      ports:
        - {{name: dns, containerPort: 53, protocol: UDP}}
        - {{name: dns-tcp, containerPort: 53, protocol: TCP}}
        - {{name: metrics, containerPort: {METRICS}, protocol: TCP}}
status: {{phase: Running, podIPs: {coredns_ips}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: x, labels: {{app: client}}}}
spec: {{nodeName: node1, containers: [{{name: c}}]}}
status: {{phase: Running, podIPs: {client_ips}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: other, namespace: x, labels: {{app: other}}}}
spec: {{nodeName: node1, containers: [{{name: c}}]}}
status: {{phase: Running, podIPs: {other_ips}}}
---
apiVersion: v1
kind: Service
metadata: {{name: kube-dns, namespace: kube-system, labels: {{k8s-app: kube-dns}}}}
spec:
  type: ClusterIP
  selector: {{k8s-app: kube-dns}}
  clusterIP: {DNS_V4}
  clusterIPs: [{DNS_V4}, "{DNS_V6}"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
    - {{name: dns, protocol: UDP, port: 53, targetPort: 53}}
    - {{name: dns-tcp, protocol: TCP, port: 53, targetPort: 53}}
    - {{name: metrics, protocol: TCP, port: {METRICS}, targetPort: {METRICS}}}
"#,
        coredns_ips = coredns.pod_ips(),
        client_ips = client.pod_ips(),
        other_ips = other.pod_ips(),
    )
}

/// Default deny of x's egress, DNS allowed to kube-dns pods anywhere; the
/// client accepts no connection (its DNS replies pass as tracked).
const POLICIES: &str = r"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-egress, namespace: x}
spec: {podSelector: {}, policyTypes: [Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-dns, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
    - to: [{namespaceSelector: {}, podSelector: {matchLabels: {k8s-app: kube-dns}}}]
      ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-no-ingress, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Ingress]
";

impl World {
    fn new() -> Self {
        let turn = Turn::take("service_dns");
        let node = node(Topology::Routed, true);
        // The node's own addresses (its families), as a routed CNI's node.
        ip(&node.name, "addr add 192.168.100.1/32 dev lo");
        ip(&node.name, "addr add fd00:100::1/128 dev lo");
        let coredns = calico_pod(&node, "10.244.1.10", "fd00:1::10");
        let client = calico_pod(&node, "10.244.1.2", "fd00:1::2");
        let other = calico_pod(&node, "10.244.1.3", "fd00:1::3");
        serve_dns(&coredns);
        echo(&coredns, METRICS);
        serve_dns(&other);
        echo(&other, 80);
        let mut rules = Vec::new();
        for (frontend, backend) in [(DNS_V4, coredns.v4), (DNS_V6, coredns.v6.expect("IPv6"))] {
            for (proto, port) in [("udp", 53), ("tcp", 53), ("tcp", METRICS)] {
                rules.push(Dnat {
                    frontend: frontend.parse().expect("ClusterIP"),
                    port,
                    proto,
                    backend,
                    target: port,
                });
            }
        }
        kube_proxy(&node, &rules);
        let manifests = Manifests::new();
        manifests.write("00-cluster.yaml", &cluster(&coredns, &client, &other));
        let bpffs = TempBpffs::new();
        let mut agent = AgentProcess::start(
            AGENT.as_ref(),
            &node,
            bpffs.path(),
            &manifests,
            "node1",
            &[],
        );
        agent.wait_enforced(
            &manifests,
            &[&coredns.host_if, &client.host_if, &other.host_if],
        );
        let w = Self {
            agent,
            manifests,
            _bpffs: bpffs,
            coredns,
            client,
            other,
            _node: node,
            _turn: turn,
        };
        // Before any policy: DNS through the Service and everything else
        // works, so a later failure is netpol's doing.
        let mut cases = w.via_service(true);
        cases.extend(w.to_pod(&w.coredns, true));
        cases.extend(w.to_pod(&w.other, true));
        cases.extend(w.others(true));
        expect("no policy yet", cases);
        w
    }

    fn enforce_policies(&mut self) {
        self.manifests.write("10-policies.yaml", POLICIES);
        let interfaces = [
            self.coredns.host_if.as_str(),
            self.client.host_if.as_str(),
            self.other.host_if.as_str(),
        ];
        self.agent.wait_enforced(&self.manifests, &interfaces);
    }

    /// A lookup of `NAME` (A and AAAA) from the client through `server`.
    fn lookups(&self, server: IpAddr, want: bool) -> Vec<Case> {
        let mut cases = Vec::new();
        for proto in [Proto::Udp, Proto::Tcp] {
            for (qtype, answer) in [
                (TYPE_A, IpAddr::V4(WEB_V4)),
                (TYPE_AAAA, IpAddr::V6(WEB_V6)),
            ] {
                let dst = SocketAddr::new(server, 53);
                let kind = if qtype == TYPE_A { "A" } else { "AAAA" };
                cases.push(Case::new(
                    format!("{kind} {NAME} over {proto:?} via {dst}"),
                    &self.client.ns,
                    want,
                    move |t| resolve(proto, dst, qtype, t) == Some(vec![answer]),
                ));
            }
        }
        cases
    }

    /// Lookups through both ClusterIPs of kube-dns.
    fn via_service(&self, want: bool) -> Vec<Case> {
        let mut cases = Vec::new();
        for ip in [DNS_V4, DNS_V6] {
            cases.extend(self.lookups(ip.parse().expect("ClusterIP"), want));
        }
        cases
    }

    /// Lookups sent to a pod's own addresses.
    fn to_pod(&self, p: &Pod, want: bool) -> Vec<Case> {
        let mut cases = Vec::new();
        for ip in p.addresses() {
            cases.extend(self.lookups(ip, want));
        }
        cases
    }

    /// What is not DNS: other's port 80, coredns' metrics, directly and
    /// through the Service.
    fn others(&self, want: bool) -> Vec<Case> {
        let mut cases = Vec::new();
        for ip in self.other.addresses() {
            for proto in [Proto::Tcp, Proto::Udp] {
                cases.push(Case::echo(
                    &self.client.ns,
                    proto,
                    SocketAddr::new(ip, 80),
                    want,
                ));
            }
        }
        let cluster_ips = [DNS_V4, DNS_V6].map(|a| a.parse::<IpAddr>().expect("ClusterIP"));
        for ip in self.coredns.addresses().into_iter().chain(cluster_ips) {
            cases.push(Case::echo(
                &self.client.ns,
                Proto::Tcp,
                SocketAddr::new(ip, METRICS),
                want,
            ));
        }
        cases
    }
}

#[test]
fn dns_resolves_through_the_kube_dns_clusterip_over_udp_and_tcp_in_both_families() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    w.enforce_policies();
    expect("egress allows DNS to k8s-app=kube-dns", w.via_service(true));
}

#[test]
fn egress_allowing_dns_reaches_the_dns_pods_directly_and_nothing_else() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    w.enforce_policies();
    let mut cases = w.to_pod(&w.coredns, true);
    cases.extend(w.to_pod(&w.other, false));
    cases.extend(w.others(false));
    expect("egress allows DNS to k8s-app=kube-dns", cases);
}
