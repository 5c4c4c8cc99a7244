//! Egress through a Service whose backend is on another node: kube-proxy
//! (iptables DNAT, in the client's node) translates the ClusterIP after
//! `from_pod`, so the client's egress is judged against the backend pod
//! by `leave_node` on the uplink, never against the ClusterIP.
//!
//! Two node namespaces joined by an uplink veth, each with its own pod
//! CIDR; the real `netpol-agent run` on node1 only (the client's node,
//! where kube-proxy translates). Both families, TCP and UDP.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use netpol_common::{direction, reason};
use netpol_testkit::{
    Netns,
    datapath::TempBpffs,
    echo::{Case, Proto, SLOW, connect, echo, exchange, expect},
    kube_proxy::{Dnat, kube_proxy},
    manifests::Manifests,
    privileged,
    process::{AgentProcess, Turn},
    topology::{Pod, Topology, calico_pod, ip, node},
    unique,
};

use crate::AGENT;

const CLUSTER_V4: &str = "10.96.0.10";
const CLUSTER_V6: &str = "fd00:96::10";
/// The Service's port and the backend's.
const PORT: u16 = 80;
const TARGET: u16 = 8080;
/// Another port the backend serves, which no Service fronts.
const OTHER: u16 = 9090;

/// Two nodes, a client pod on node1 and a server pod on node2, kube-proxy's
/// rules on node1 and the agent running there.
///
/// Fields drop in order: the agent before its bpffs and namespaces.
struct World {
    agent: Option<AgentProcess>,
    manifests: Manifests,
    bpffs: TempBpffs,
    client: Pod,
    server: Pod,
    uplink: String,
    node1: Netns,
    /// Holds the server; nothing reads it but its drop.
    _node2: Netns,
    _turn: Turn,
}

impl World {
    fn new() -> Self {
        Self::with_args(&[])
    }

    /// The world with `extra` arguments for `netpol-agent run`; waits for
    /// `leave_node` on the uplink.
    fn with_args(extra: &[&str]) -> Self {
        let turn = Turn::take("service_remote_backend");
        let node1 = node(Topology::Routed, true);
        let node2 = node(Topology::Routed, true);
        let (up1, up2) = (unique("npu"), unique("npu"));
        ip(
            &node1.name,
            &format!(
                "link add {up1} type veth peer name {up2} netns {}",
                node2.name
            ),
        );
        for (n, dev, me, other_pods, peer4, peer6) in [
            (&node1, &up1, 1, 2, "192.168.100.2", "fd00:100::2"),
            (&node2, &up2, 2, 1, "192.168.100.1", "fd00:100::1"),
        ] {
            let n = &n.name;
            ip(n, &format!("addr add 192.168.100.{me}/24 dev {dev}"));
            ip(n, &format!("addr add fd00:100::{me}/64 dev {dev} nodad"));
            ip(n, &format!("link set {dev} up"));
            ip(
                n,
                &format!("route add 10.244.{other_pods}.0/24 via {peer4} dev {dev}"),
            );
            ip(
                n,
                &format!("-6 route add fd00:{other_pods}::/64 via {peer6} dev {dev}"),
            );
        }
        let client = calico_pod(&node1, "10.244.1.2", "fd00:1::2");
        let server = calico_pod(&node2, "10.244.2.2", "fd00:2::2");
        echo(&server, TARGET);
        echo(&server, OTHER);
        let mut rules = Vec::new();
        for (frontend, backend) in [
            (CLUSTER_V4, server.v4),
            (CLUSTER_V6, server.v6.expect("IPv6")),
        ] {
            for proto in ["tcp", "udp"] {
                rules.push(Dnat {
                    frontend: frontend.parse().expect("ClusterIP"),
                    port: PORT,
                    proto,
                    backend,
                    target: TARGET,
                });
            }
        }
        kube_proxy(&node1, &rules);
        let manifests = Manifests::new();
        manifests.write("00-cluster.yaml", &cluster(&client, &server));
        let bpffs = TempBpffs::new();
        let mut w = Self {
            agent: None,
            manifests,
            bpffs,
            client,
            server,
            uplink: up1,
            node1,
            _node2: node2,
            _turn: turn,
        };
        let mut agent = AgentProcess::start(
            AGENT.as_ref(),
            &w.node1,
            w.bpffs.path(),
            &w.manifests,
            "node1",
            extra,
        );
        agent.wait_enforced(&w.manifests, &[&w.client.host_if]);
        agent.wait_leave_node(&w.uplink);
        w.agent = Some(agent);
        w
    }

    fn agent(&mut self) -> &mut AgentProcess {
        self.agent.as_mut().expect("agent running")
    }

    /// Writes the client's policies and waits until they are enforced.
    fn policy(&mut self, egress: &str) {
        self.manifests.write(
            "10-policy.yaml",
            &format!("{CLIENT_NO_INGRESS}---\n{egress}"),
        );
        self.agent
            .as_mut()
            .expect("agent running")
            .wait_enforced(&self.manifests, &[&self.client.host_if]);
    }

    fn cluster_ips() -> [IpAddr; 2] {
        [
            CLUSTER_V4.parse().expect("ClusterIP"),
            CLUSTER_V6.parse().expect("ClusterIP"),
        ]
    }

    /// TCP and UDP from the client to both ClusterIPs on the Service port.
    fn via_service(&self, want: bool) -> Vec<Case> {
        let mut cases = Vec::new();
        for ip in Self::cluster_ips() {
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

    /// TCP and UDP from the client to both of the server's addresses.
    fn direct(&self, port: u16, want: bool) -> Vec<Case> {
        let mut cases = Vec::new();
        for ip in self.server.addresses() {
            for proto in [Proto::Tcp, Proto::Udp] {
                cases.push(Case::echo(
                    &self.client.ns,
                    proto,
                    SocketAddr::new(ip, port),
                    want,
                ));
            }
        }
        cases
    }

    /// Before any policy, everything reaches the server: the topology and
    /// kube-proxy's rules work, so a later failure is netpol's doing.
    fn everything_connects(&self) {
        let mut cases = self.via_service(true);
        cases.extend(self.direct(TARGET, true));
        cases.extend(self.direct(OTHER, true));
        expect("no policy yet", cases);
    }
}

/// The cluster node1's agent sees: both nodes, both pods (each with its
/// node), the Service and its EndpointSlices.
fn cluster(client: &Pod, server: &Pod) -> String {
    format!(
        r#"apiVersion: v1
kind: Node
metadata: {{name: node1}}
spec: {{podCIDRs: [10.244.1.0/24, "fd00:1::/64"]}}
status: {{addresses: [{{type: InternalIP, address: 192.168.100.1}}, {{type: InternalIP, address: "fd00:100::1"}}]}}
---
apiVersion: v1
kind: Node
metadata: {{name: node2}}
spec: {{podCIDRs: [10.244.2.0/24, "fd00:2::/64"]}}
status: {{addresses: [{{type: InternalIP, address: 192.168.100.2}}, {{type: InternalIP, address: "fd00:100::2"}}]}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: x, labels: {{kubernetes.io/metadata.name: x}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: y, labels: {{kubernetes.io/metadata.name: y}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: x, labels: {{app: client}}}}
spec: {{nodeName: node1, containers: [{{name: c}}]}}
status: {{phase: Running, podIPs: {client_ips}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: y, labels: {{app: server}}}}
spec:
  nodeName: node2
  containers:
    - name: c
      ports:
        - {{name: http, containerPort: {TARGET}, protocol: TCP}}
        - {{name: http-udp, containerPort: {TARGET}, protocol: UDP}}
status: {{phase: Running, podIPs: {server_ips}}}
---
apiVersion: v1
kind: Service
metadata: {{name: s-server, namespace: y}}
spec:
  type: ClusterIP
  selector: {{app: server}}
  clusterIP: {CLUSTER_V4}
  clusterIPs: [{CLUSTER_V4}, "{CLUSTER_V6}"]
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports:
    - {{name: http, protocol: TCP, port: {PORT}, targetPort: {TARGET}}}
    - {{name: http-udp, protocol: UDP, port: {PORT}, targetPort: {TARGET}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: s-server-v4, namespace: y, labels: {{kubernetes.io/service-name: s-server}}}}
addressType: IPv4
endpoints: [{{addresses: ["{server_v4}"], conditions: {{ready: true}}, nodeName: node2, targetRef: {{kind: Pod, namespace: y, name: server}}}}]
ports: [{{name: http, protocol: TCP, port: {TARGET}}}, {{name: http-udp, protocol: UDP, port: {TARGET}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: s-server-v6, namespace: y, labels: {{kubernetes.io/service-name: s-server}}}}
addressType: IPv6
endpoints: [{{addresses: ["{server_v6}"], conditions: {{ready: true}}, nodeName: node2, targetRef: {{kind: Pod, namespace: y, name: server}}}}]
ports: [{{name: http, protocol: TCP, port: {TARGET}}}, {{name: http-udp, protocol: UDP, port: {TARGET}}}]
"#,
        client_ips = client.pod_ips(),
        server_ips = server.pod_ips(),
        server_v4 = server.v4,
        server_v6 = server.v6.expect("IPv6"),
    )
}

/// The client accepts no connection: the replies of its own connections
/// (translated back to the ClusterIP by the node) pass only as tracked.
const CLIENT_NO_INGRESS: &str = r"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-no-ingress, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Ingress]
";

/// The client's egress: pods `app: server` (any namespace) on `port`.
fn egress_to_server_pods(port: u16) -> String {
    format!(
        r"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: client-egress, namespace: x}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
    - to: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: server}}}}}}]
      ports: [{{protocol: TCP, port: {port}}}, {{protocol: UDP, port: {port}}}]
"
    )
}

/// The client's egress: the ClusterIP ranges, every port.
const EGRESS_TO_CLUSTER_IP_RANGE: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress, namespace: x}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 10.96.0.0/12}}, {ipBlock: {cidr: "fd00:96::/64"}}]
"#;

#[test]
fn clusterip_reaches_remote_backend_when_egress_allows_the_backend_pod() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    w.everything_connects();
    w.policy(&egress_to_server_pods(TARGET));
    let mut cases = w.via_service(true);
    cases.extend(w.direct(TARGET, true));
    cases.extend(w.direct(OTHER, false));
    expect("egress allows app=server:8080", cases);
}

#[test]
fn clusterip_to_remote_backend_is_dropped_when_egress_allows_another_port() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    w.everything_connects();
    w.policy(&egress_to_server_pods(OTHER));
    let before = w.agent().count(direction::EGRESS, reason::DROP_POLICY);
    expect(
        "egress allows app=server:9090 only, via the Service",
        w.via_service(false),
    );
    let dropped = w.agent().count(direction::EGRESS, reason::DROP_POLICY) - before;
    assert!(
        dropped >= 4,
        "every blocked Service flow is counted as an egress policy drop: {dropped}\n{}",
        w.agent().stats()
    );
    let stats = w.agent().stats();
    assert!(
        stats.lines().any(|l| l.starts_with("egress")
            && l.contains(reason::name(reason::DROP_POLICY))
            && l.split_whitespace().nth(3).is_some_and(|n| n != "0")),
        "netpol-agent stats shows the egress policy drops:\n{stats}"
    );
    let mut cases = w.direct(TARGET, false);
    cases.extend(w.direct(OTHER, true));
    expect("egress allows app=server:9090 only, direct", cases);
}

#[test]
fn egress_to_the_clusterip_range_does_not_allow_the_backend_behind_it() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    w.everything_connects();
    w.policy(EGRESS_TO_CLUSTER_IP_RANGE);
    let mut cases = w.via_service(false);
    cases.extend(w.direct(TARGET, false));
    expect("egress allows only the ClusterIP ranges", cases);
}

#[test]
fn established_clusterip_connection_to_remote_backend_is_cut_when_its_rule_goes() {
    if !privileged() {
        return;
    }
    let mut w = World::new();
    w.policy(&egress_to_server_pods(TARGET));
    let conns: Vec<_> = World::cluster_ips()
        .into_iter()
        .map(|ip| connect(&w.client.ns, SocketAddr::new(ip, PORT)))
        .collect();
    for (c, ip) in conns.iter().zip(World::cluster_ips()) {
        assert!(
            exchange(c, "before\n", SLOW),
            "{ip}: the allowed connection carries data"
        );
    }
    w.policy(&egress_to_server_pods(OTHER));
    for (c, ip) in conns.iter().zip(World::cluster_ips()) {
        assert!(
            !exchange(c, "after\n", Duration::from_secs(2)),
            "{ip}: the connection through the Service still carries data after its rule went"
        );
    }
}

#[test]
fn clusterip_flow_is_judged_on_a_device_the_uplinks_glob_does_not_name() {
    if !privileged() {
        return;
    }
    // --uplinks names extra uplinks; it cannot take leave_node off a
    // device, or the Service packet would leave unjudged.
    let mut w = World::with_args(&["--uplinks", "nomatch*"]);
    let s = w.agent().status().expect("status");
    let uplinks = s["uplinks"].as_array().cloned().unwrap_or_default();
    assert!(
        uplinks.iter().any(|u| u["name"] == w.uplink.as_str()),
        "the uplink keeps leave_node: {s:#}"
    );
    w.everything_connects();
    w.policy(&egress_to_server_pods(OTHER));
    expect(
        "egress allows app=server:9090 only, --uplinks naming nothing",
        w.via_service(false),
    );
}
