//! Services the way kube-proxy (iptables mode) writes them, in each node
//! netns: DNAT of `clusterIP:port` to the backend pod (on any node), and
//! the masquerade it adds when a pod reaches a Service backed by itself
//! (hairpin). Its chains sit beside the node's other nat rules (flannel's
//! masquerade on a cluster's nodes): only they are rewritten.
use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use anyhow::Result;
use netpol_testkit::kube_proxy::restore;
use serde_yaml::Value;

use super::scenario::{self, Family, ObjKey, Proto};

/// kube-proxy's chains: frontends (from PREROUTING and OUTPUT), node
/// ports (from the frontends' chain, for the node's own addresses), and
/// its masquerade (first in POSTROUTING, as kube-proxy inserts it).
const SERVICES: &str = "KUBE-SERVICES";
const NODEPORTS: &str = "KUBE-NODEPORTS";
const POSTROUTING: &str = "KUBE-POSTROUTING";
/// kube-proxy's masquerade mark.
const MASQ: &str = "0x4000";
const TOOLS: [(&str, bool); 2] = [("iptables-restore", true), ("ip6tables-restore", false)];

/// A node's network namespace and the node name its pods' `spec.nodeName`
/// gives.
#[derive(Clone, Debug)]
pub struct KubeNode {
    pub name: String,
    pub netns: String,
}

/// The nodes' Service rules.
pub struct Kube {
    nodes: Vec<KubeNode>,
}

/// The ClusterIP of the Service fronting pod `ns/name` (`s-<ns>-<name>`).
pub fn cluster_ip(objects: &BTreeMap<ObjKey, Value>, pod: &str, fam: Family) -> Option<IpAddr> {
    let (ns, name) = pod.split_once('/')?;
    let svc = objects.get(&(
        "Service".to_owned(),
        ns.to_owned(),
        format!("s-{ns}-{name}"),
    ))?;
    scenario::service_spec(svc)
        .ok()
        .flatten()?
        .cluster_ips
        .into_iter()
        .find(|ip| ip.is_ipv4() == (fam == Family::V4))
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Sctp => "sctp",
    }
}

impl Kube {
    /// kube-proxy's chains hooked into each node netns' nat tables (once:
    /// a second `Kube` on the same nodes finds them hooked).
    pub fn new(nodes: &[KubeNode]) -> Result<Self> {
        for node in nodes {
            for (tool, v4) in TOOLS {
                let list = if v4 { "iptables" } else { "ip6tables" };
                let hooked = std::process::Command::new("ip")
                    .args(["netns", "exec", &node.netns, list, "-w", "-t", "nat"])
                    .args(["-C", "PREROUTING", "-j", SERVICES])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if hooked {
                    continue;
                }
                let hooks = format!(
                    "*nat\n:{SERVICES} - [0:0]\n:{NODEPORTS} - [0:0]\n:{POSTROUTING} - [0:0]\n\
                     -I PREROUTING 1 -j {SERVICES}\n-I OUTPUT 1 -j {SERVICES}\n\
                     -I POSTROUTING 1 -j {POSTROUTING}\nCOMMIT\n"
                );
                restore(&node.netns, tool, &hooks, true).map_err(anyhow::Error::msg)?;
            }
        }
        Ok(Self {
            nodes: nodes.to_vec(),
        })
    }

    /// Rewrites kube-proxy's chains on every node for the current objects:
    /// each ClusterIP port to its backend (the Service's one pod, on any
    /// node); each node port to it too, masqueraded to the node's address
    /// unless `externalTrafficPolicy: Local`, which sends a node's port
    /// only to a backend on that node (the others refuse it).
    pub fn sync(&self, objects: &BTreeMap<ObjKey, Value>) -> Result<()> {
        for node in &self.nodes {
            for (tool, v4) in TOOLS {
                let r = rules(objects, &node.name, v4)?;
                restore(&node.netns, tool, &r, true).map_err(anyhow::Error::msg)?;
            }
        }
        Ok(())
    }
}

/// The backend kube-proxy sends Service `key` to, for one family, and
/// its node: the first ready endpoint of the Service's EndpointSlices
/// (label `kubernetes.io/service-name`) when it has any, else the first
/// pod its selector matches (the shared models have no slices).
fn backend(
    key: &ObjKey,
    svc: &scenario::ServiceSpec,
    objects: &BTreeMap<ObjKey, Value>,
    v4: bool,
) -> Result<Option<(IpAddr, Option<String>)>> {
    let slices: Vec<&Value> = objects
        .iter()
        .filter(|((kind, ns, _), v)| {
            kind == "EndpointSlice"
                && *ns == key.1
                && v["metadata"]["labels"]["kubernetes.io/service-name"].as_str()
                    == Some(key.2.as_str())
        })
        .map(|(_, v)| v)
        .collect();
    if !slices.is_empty() {
        let family = if v4 { "IPv4" } else { "IPv6" };
        for slice in slices
            .iter()
            .filter(|s| s["addressType"].as_str() == Some(family))
        {
            for e in slice["endpoints"].as_sequence().into_iter().flatten() {
                // An endpoint without conditions is ready (the API's default).
                if e["conditions"]["ready"].as_bool() == Some(false) {
                    continue;
                }
                if let Some(ip) = e["addresses"][0].as_str().and_then(|a| a.parse().ok()) {
                    return Ok(Some((ip, e["nodeName"].as_str().map(str::to_owned))));
                }
            }
        }
        return Ok(None);
    }
    let pods = super::backends(svc, objects);
    let Some(pod) = pods.first() else {
        return Ok(None);
    };
    let Some(spec) = scenario::pod_spec(pod)? else {
        return Ok(None);
    };
    let ip = if v4 {
        spec.v4.map(IpAddr::V4)
    } else {
        spec.v6.map(IpAddr::V6)
    };
    Ok(ip.map(|ip| (ip, pod["spec"]["nodeName"].as_str().map(str::to_owned))))
}

/// One node's nat rules for one family (`iptables-restore --noflush`
/// input).
fn rules(objects: &BTreeMap<ObjKey, Value>, node: &str, v4: bool) -> Result<String> {
    let mut r = String::new();
    writeln!(r, "*nat")?;
    // Declaring a chain under --noflush empties it.
    writeln!(r, ":{SERVICES} - [0:0]")?;
    writeln!(r, ":{NODEPORTS} - [0:0]")?;
    writeln!(r, ":{POSTROUTING} - [0:0]")?;
    let mut hairpin = Vec::new();
    for (key, v) in objects {
        let Some(svc) = scenario::service_spec(v)? else {
            continue;
        };
        let Some((backend, backend_node)) = backend(key, &svc, objects, v4)? else {
            continue;
        };
        for ip in svc.cluster_ips.iter().filter(|ip| ip.is_ipv4() == v4) {
            for (proto, port, target) in &svc.ports {
                let to = std::net::SocketAddr::new(backend, *target);
                writeln!(
                    r,
                    "-A {SERVICES} -d {ip} -p {p} -m {p} --dport {port} -j DNAT --to-destination {to}",
                    p = proto_name(*proto)
                )?;
            }
        }
        let local = backend_node.as_deref() == Some(node);
        for (proto, node_port, target) in &svc.node_ports {
            let head = format!(
                "-A {NODEPORTS} -p {p} -m {p} --dport {node_port}",
                p = proto_name(*proto)
            );
            if svc.local_traffic && !local {
                // No local backend: no translation, so the node refuses it
                // (kube-proxy rejects it in the filter table).
                continue;
            }
            if !svc.local_traffic {
                writeln!(r, "{head} -j MARK --or-mark {MASQ}")?;
            }
            let to = std::net::SocketAddr::new(backend, *target);
            writeln!(r, "{head} -j DNAT --to-destination {to}")?;
        }
        hairpin.push(backend);
    }
    writeln!(
        r,
        "-A {SERVICES} -m addrtype --dst-type LOCAL -j {NODEPORTS}"
    )?;
    writeln!(
        r,
        "-A {POSTROUTING} -m mark --mark {MASQ}/{MASQ} -j MASQUERADE"
    )?;
    let len = if v4 { 32 } else { 128 };
    for b in hairpin {
        writeln!(
            r,
            "-A {POSTROUTING} -s {b}/{len} -d {b}/{len} -j MASQUERADE"
        )?;
    }
    writeln!(r, "COMMIT")?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(policy: &str) -> BTreeMap<ObjKey, Value> {
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: b, namespace: x, labels: {{pod: b}}}}\n\
             spec: {{nodeName: node-2, containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]}}\n\
             status: {{podIPs: [{{ip: 10.42.2.12}}]}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: np-b, namespace: x}}\n\
             spec: {{type: NodePort, externalTrafficPolicy: {policy}, clusterIPs: [10.43.0.99], \
             selector: {{pod: b}}, ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]}}\n"
        );
        scenario::documents(&text)
            .expect("yaml")
            .into_iter()
            .map(|d| (scenario::key_of(&d).expect("key"), d))
            .collect()
    }

    #[test]
    fn endpoint_slices_pick_the_backend_when_a_service_has_them() {
        let mut objs = objects("Local");
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                     metadata: {name: np-b-1, namespace: x, labels: {kubernetes.io/service-name: np-b}}\n\
                     addressType: IPv4\n\
                     endpoints: [{addresses: [10.42.3.7], conditions: {ready: false}, nodeName: node-3},\n\
                     {addresses: [10.42.1.9], nodeName: node-1}]\n";
        for d in scenario::documents(slice).expect("yaml") {
            objs.insert(scenario::key_of(&d).expect("key"), d);
        }
        let on_1 = rules(&objs, "node-1", true).expect("rules");
        let on_2 = rules(&objs, "node-2", true).expect("rules");
        // The ready endpoint on node-1, not the selector's pod on node-2.
        assert!(
            on_1.contains("--dport 30080 -j DNAT --to-destination 10.42.1.9:8080"),
            "{on_1}"
        );
        assert!(!on_2.contains("--dport 30080"), "{on_2}");
        assert!(
            !on_1.contains("10.42.3.7") && !on_1.contains("10.42.2.12"),
            "{on_1}"
        );
        // Slices of one family only: none for the other.
        assert!(
            !rules(&objs, "node-1", false)
                .expect("rules")
                .contains("DNAT")
        );
    }

    #[test]
    fn node_ports_follow_the_external_traffic_policy() {
        let dnat = "--dport 30080 -j DNAT --to-destination 10.42.2.12:8080";
        let mark = "--dport 30080 -j MARK --or-mark 0x4000";
        let local = objects("Local");
        let on_2 = rules(&local, "node-2", true).expect("rules");
        let on_1 = rules(&local, "node-1", true).expect("rules");
        assert!(on_2.contains(dnat) && !on_2.contains(mark), "{on_2}");
        assert!(!on_1.contains("--dport 30080"), "{on_1}");
        let cluster = objects("Cluster");
        for node in ["node-1", "node-2"] {
            let r = rules(&cluster, node, true).expect("rules");
            assert!(r.contains(dnat) && r.contains(mark), "{r}");
        }
        // The ClusterIP is the same everywhere.
        assert!(on_1.contains("-d 10.43.0.99 -p tcp -m tcp --dport 80 -j DNAT"));
        // No IPv6 backend: no IPv6 rules for it.
        assert!(
            !rules(&local, "node-2", false)
                .expect("rules")
                .contains("30080")
        );
    }
}
