//! The three-node cluster of `../shared/conformance/cluster-3node.yaml`
//! wired as flannel's VXLAN backend wires it, pods made through the CNI
//! chain with the file's addresses: pods on different nodes talk over
//! `flannel.1` / `flannel-v6.1` with their own addresses (no masquerade
//! between pod subnets), both families; a node's traffic to another
//! node's pod leaves from its VXLAN address.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use netpol_testkit::{
    cluster::{self, Names, NodeSpec},
    cni::{Sandbox, result_ips},
    netns::{Netns, privileged, unique},
};
use serde_json::Value;

fn cluster_file() -> Vec<Value> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/cluster-3node.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// A pod of the file: its namespace, name, node and addresses.
fn file_pod(objects: &[Value], namespace: &str, name: &str) -> (String, Vec<IpAddr>) {
    let pod = objects
        .iter()
        .find(|o| {
            o["kind"] == "Pod"
                && o["metadata"]["namespace"] == namespace
                && o["metadata"]["name"] == name
        })
        .unwrap_or_else(|| panic!("pod {namespace}/{name} in the file"));
    let ips = pod["status"]["podIPs"]
        .as_array()
        .expect("podIPs")
        .iter()
        .map(|i| i["ip"].as_str().expect("ip").parse().expect("an address"))
        .collect();
    (
        pod["spec"]["nodeName"]
            .as_str()
            .expect("nodeName")
            .to_owned(),
        ips,
    )
}

/// Removes the cluster when the test ends, also on a panic.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = cluster::down(&self.0);
    }
}

/// `tx_packets` of `dev` in namespace `ns`.
fn tx_packets(ns: &str, dev: &str) -> u64 {
    let out = netpol_testkit::netns::sh("ip", &["-n", ns, "-j", "-s", "link", "show", dev]);
    let v: Value = serde_json::from_str(&out).expect("ip -j");
    v[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .expect("tx packets")
}

/// Connects from namespace `from` to `to:port`, where [`peer_server`]
/// answers with the address it saw; that address.
fn seen_from(from: &str, to: IpAddr, port: u16) -> Option<IpAddr> {
    let ns = Netns::existing(from);
    ns.run(|| {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::new(to, port), Duration::from_secs(3)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.trim().parse().ok()
    })
}

/// A TCP server on `at` in namespace `ns` telling each client the address
/// it connected from.
fn peer_server(ns: &str, at: SocketAddr) {
    let ns = Netns::existing(ns);
    let listener = ns.run(|| TcpListener::bind(at).expect("bind"));
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            if let Ok(peer) = s.peer_addr() {
                let _ = writeln!(s, "{}", peer.ip());
            }
        }
    });
}

#[test]
fn pods_on_three_nodes_talk_over_vxlan_with_their_own_addresses() {
    if !privileged() {
        return;
    }
    let objects = cluster_file();
    let nodes = cluster::node_specs(&objects).expect("the file's nodes");
    assert_eq!(nodes.len(), 3, "three nodes in the file");
    let names = Names {
        prefix: unique("npcl"),
    };
    let _down = Down(names.prefix.clone());
    cluster::up(&names, &nodes).expect("wiring the nodes");
    let data: PathBuf = std::env::temp_dir().join(format!("{}-ipam", names.prefix));
    let node = |n: &str| -> &NodeSpec { nodes.iter().find(|s| s.name == n).expect("node") };
    // One pod per node: x/a, x/b, x/c.
    let mut pods = Vec::new();
    for name in ["a", "b", "c"] {
        let (on, ips) = file_pod(&objects, "x", name);
        let spec = node(&on);
        let chain = cluster::node_chain(spec, &data.join(&on), None);
        let mut sandbox = Sandbox::new("x", name);
        sandbox.ips = cluster::requested_ips(spec, &ips).expect("in the node's subnets");
        let result = cluster::add_pod(&names, spec, &chain, &sandbox)
            .unwrap_or_else(|e| panic!("pod x/{name} on {on}: {e}"));
        let mut got = result_ips(&result);
        got.sort();
        let mut want = ips.clone();
        want.sort();
        assert_eq!(got, want, "x/{name} has the file's addresses");
        pods.push((names.pod(&on, "x", name), on, ips));
    }
    let _ = std::fs::remove_dir_all(&data);
    cluster::settle(&names.prefix, Duration::from_secs(10)).expect("addresses settled");
    let (a_ns, a_node, a_ips) = &pods[0];
    for (ns, on, ips) in &pods[1..] {
        assert_ne!(on, a_node, "the file spreads x/a, x/b, x/c over the nodes");
        for &ip in ips {
            peer_server(ns, SocketAddr::new(ip, 80));
        }
    }
    for v4 in [true, false] {
        let dev = if v4 {
            cluster::VXLAN_V4
        } else {
            cluster::VXLAN_V6
        };
        let src = a_ips
            .iter()
            .copied()
            .find(|i| i.is_ipv4() == v4)
            .expect("a's address");
        for (_, on, ips) in &pods[1..] {
            let dst = ips
                .iter()
                .copied()
                .find(|i| i.is_ipv4() == v4)
                .expect("an address");
            let before = tx_packets(&names.node(a_node), dev);
            assert_eq!(
                seen_from(a_ns, dst, 80),
                Some(src),
                "x/a on {a_node} reaches {dst} on {on} and is seen with its own address"
            );
            assert!(
                tx_packets(&names.node(a_node), dev) > before,
                "{a_node} sent it over {dev}"
            );
        }
        // A node reaching another node's pod: through its VXLAN device,
        // from that device's address (the pod subnet's first address).
        let (_, b_node, b_ips) = &pods[1];
        let dst = b_ips
            .iter()
            .copied()
            .find(|i| i.is_ipv4() == v4)
            .expect("b's address");
        let vtep = node(a_node).pod_cidr(v4).expect("a's subnet").addr;
        assert_eq!(
            seen_from(&names.node(a_node), dst, 80),
            Some(vtep),
            "{a_node} reaches {dst} on {b_node} from its {dev} address"
        );
    }
}

#[test]
fn a_node_without_its_pod_cidr_for_a_family_is_refused_by_name() {
    let node: Value = serde_json::json!({
        "kind": "Node",
        "metadata": {"name": "node-9"},
        "spec": {"podCIDRs": ["10.42.9.0/24"]},
        "status": {"addresses": [
            {"type": "InternalIP", "address": "10.200.0.9"},
            {"type": "InternalIP", "address": "fd00:200::9"}
        ]}
    });
    let e = NodeSpec::from_object(&node).expect_err("no IPv6 pod CIDR");
    assert!(e.contains("node-9") && e.contains("IPv6"), "{e}");
}
