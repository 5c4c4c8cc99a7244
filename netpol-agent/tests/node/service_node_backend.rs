//! A Service whose backend is the node itself (as `kubernetes.default` in
//! front of an API server on the host network): kube-proxy translates the
//! ClusterIP to a node address, so the packet never reaches a pod's veth
//! nor leaves the node. The client's egress is still judged against the
//! node address, never against the ClusterIP, and never skipped.
use std::net::{IpAddr, SocketAddr};

use netpol_testkit::{
    Netns,
    datapath::TempBpffs,
    echo::{Case, Proto, expect, serve},
    kube_proxy::{Dnat, kube_proxy},
    manifests::Manifests,
    privileged,
    process::{AgentProcess, Turn},
    sh,
    topology::{Pod, Topology, calico_pod, ip, node},
};

use crate::AGENT;

const CLUSTER_V4: &str = "10.96.0.1";
const CLUSTER_V6: &str = "fd00:96::1";
const NODE_V4: &str = "192.168.100.1";
const NODE_V6: &str = "fd00:100::1";
const PORT: u16 = 443;
/// ClusterIPs of a Service without endpoints.
const EMPTY_V4: &str = "10.96.0.99";
const EMPTY_V6: &str = "fd00:96::99";
const TARGET: u16 = 6443;

/// `to_host` sits on the root cgroup, where every agent's copy sees every
/// locally delivered packet; two of these worlds alike down to their
/// interface indexes and addresses would judge each other's packets. One
/// node has one agent, so the tests of this file take turns.
static ONE_AGENT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Fields drop in order: the agent before its bpffs and namespaces, and
/// the turns last.
struct World {
    agent: AgentProcess,
    manifests: Manifests,
    _bpffs: TempBpffs,
    client: Pod,
    _node: Netns,
    _alone: std::sync::MutexGuard<'static, ()>,
    _turn: Turn,
}

impl World {
    fn new() -> Self {
        let turn = Turn::take("service_node_backend");
        let alone = ONE_AGENT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let node = node(Topology::Routed, true);
        ip(&node.name, &format!("addr add {NODE_V4}/32 dev lo"));
        ip(&node.name, &format!("addr add {NODE_V6}/128 dev lo"));
        let client = calico_pod(&node, "10.244.1.2", "fd00:1::2");
        // The "API server": the node's own sockets, on its addresses.
        let host: Vec<IpAddr> = [NODE_V4, NODE_V6]
            .iter()
            .map(|a| a.parse().expect("node address"))
            .collect();
        serve(&node, &host, TARGET);
        let mut rules = Vec::new();
        for (frontend, backend) in [(CLUSTER_V4, NODE_V4), (CLUSTER_V6, NODE_V6)] {
            for proto in ["tcp", "udp"] {
                rules.push(Dnat {
                    frontend: frontend.parse().expect("ClusterIP"),
                    port: PORT,
                    proto,
                    backend: backend.parse().expect("node address"),
                    target: TARGET,
                });
            }
        }
        kube_proxy(&node, &rules);
        // A Service without endpoints: kube-proxy rejects its frontend in
        // the filter table once routing has found a way on (a real node has
        // a default route); the node answers the pod itself (a TCP reset
        // here).
        ip(
            &node.name,
            &format!("route add {EMPTY_V4}/32 dev {}", client.host_if),
        );
        ip(
            &node.name,
            &format!("-6 route add {EMPTY_V6}/128 dev {}", client.host_if),
        );
        for (tool, vip) in [("iptables", EMPTY_V4), ("ip6tables", EMPTY_V6)] {
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &node.name,
                    tool,
                    "-w",
                    "-A",
                    "FORWARD",
                    "-d",
                    vip,
                    "-p",
                    "tcp",
                    "--dport",
                    "80",
                    "-j",
                    "REJECT",
                    "--reject-with",
                    "tcp-reset",
                ],
            );
        }
        let manifests = Manifests::new();
        manifests.write(
            "00-cluster.yaml",
            &format!(
                r#"apiVersion: v1
kind: Node
metadata: {{name: node1}}
spec: {{podCIDRs: [10.244.1.0/24, "fd00:1::/64"]}}
status: {{addresses: [{{type: InternalIP, address: {NODE_V4}}}, {{type: InternalIP, address: "{NODE_V6}"}}]}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{kubernetes.io/metadata.name: default}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: x, labels: {{kubernetes.io/metadata.name: x}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: x, labels: {{app: client}}}}
spec: {{nodeName: node1, containers: [{{name: c}}]}}
status: {{phase: Running, podIPs: {client_ips}}}
---
apiVersion: v1
kind: Service
metadata: {{name: kubernetes, namespace: default}}
spec:
  type: ClusterIP
  clusterIP: {CLUSTER_V4}
  clusterIPs: [{CLUSTER_V4}, "{CLUSTER_V6}"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
    - {{name: https, protocol: TCP, port: {PORT}, targetPort: {TARGET}}}
    - {{name: udp, protocol: UDP, port: {PORT}, targetPort: {TARGET}}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: x}}
spec:
  clusterIPs: [{EMPTY_V4}, "{EMPTY_V6}"]
  ports: [{{name: http, protocol: TCP, port: 80}}]
"#,
                client_ips = client.pod_ips()
            ),
        );
        let bpffs = TempBpffs::new();
        let mut agent = AgentProcess::start(
            AGENT.as_ref(),
            &node,
            bpffs.path(),
            &manifests,
            "node1",
            &[],
        );
        agent.wait_enforced(&manifests, &[&client.host_if]);
        let w = Self {
            agent,
            manifests,
            _bpffs: bpffs,
            client,
            _node: node,
            _alone: alone,
            _turn: turn,
        };
        expect("no policy yet", w.via_service(true));
        w
    }

    fn policy(&mut self, egress: &str) {
        self.manifests.write(
            "10-policy.yaml",
            &format!(
                r"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: client-egress, namespace: x}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Ingress, Egress]
  egress:
    - to: {egress}
"
            ),
        );
        self.agent
            .wait_enforced(&self.manifests, &[&self.client.host_if]);
    }

    fn via_service(&self, want: bool) -> Vec<Case> {
        let mut cases = Vec::new();
        for ip in [CLUSTER_V4, CLUSTER_V6] {
            let ip: IpAddr = ip.parse().expect("ClusterIP");
            for proto in [Proto::Tcp, Proto::Udp] {
                cases.push(Case::echo(
                    &self.client.ns,
                    proto,
                    SocketAddr::new(ip, PORT),
                    want,
                ));
            }
        }
        cases
    }
}

#[test]
fn clusterip_translated_to_a_node_address_is_allowed_by_an_ipblock_of_the_node() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    w.policy(&format!(
        r#"[{{ipBlock: {{cidr: {NODE_V4}/32}}}}, {{ipBlock: {{cidr: "{NODE_V6}/128"}}}}]
      ports: [{{protocol: TCP, port: {TARGET}}}, {{protocol: UDP, port: {TARGET}}}]"#
    ));
    expect(
        "egress allows the node's addresses on 6443",
        w.via_service(true),
    );
}

#[test]
fn clusterip_translated_to_a_node_address_is_judged_against_the_node_not_the_clusterip() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    w.policy(r#"[{ipBlock: {cidr: 10.96.0.0/12}}, {ipBlock: {cidr: "fd00:96::/64"}}]"#);
    expect(
        "egress allows only the ClusterIP ranges",
        w.via_service(false),
    );
}

/// What a TCP connect from the client to `dst` gets: refused at once, or
/// nothing within two seconds.
fn connect_outcome(client: &Netns, dst: SocketAddr) -> std::io::ErrorKind {
    let path = std::path::PathBuf::from("/var/run/netns").join(&client.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("client netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        match std::net::TcpStream::connect_timeout(&dst, std::time::Duration::from_secs(2)) {
            Ok(_) => panic!("{dst} has no endpoints, yet a connection opened"),
            Err(e) => e.kind(),
        }
    })
    .join()
    .expect("connect thread")
}

#[test]
fn service_without_endpoints_is_refused_as_by_kube_proxy_alone() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    let targets: Vec<SocketAddr> = [EMPTY_V4, EMPTY_V6]
        .iter()
        .map(|a| SocketAddr::new(a.parse().expect("ClusterIP"), 80))
        .collect();
    for dst in &targets {
        assert_eq!(
            connect_outcome(&w.client.ns, *dst),
            std::io::ErrorKind::ConnectionRefused,
            "{dst} without policy"
        );
    }
    // Egress isolated: the frontend is marked, never judged, and the
    // node's rejection still reaches the pod.
    w.policy(&format!(
        r#"[{{ipBlock: {{cidr: {NODE_V4}/32}}}}, {{ipBlock: {{cidr: "{NODE_V6}/128"}}}}]"#
    ));
    for dst in &targets {
        assert_eq!(
            connect_outcome(&w.client.ns, *dst),
            std::io::ErrorKind::ConnectionRefused,
            "{dst} with the client's egress isolated"
        );
    }
}
