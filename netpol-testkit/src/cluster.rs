//! Several k3s nodes on one machine, wired as flannel's VXLAN backend
//! wires them (`cargo xtask cluster`, and the tests of several nodes):
//!
//! - a namespace per node, its `eth0` a macvlan (bridge mode) of the
//!   underlay namespace's `underlay0` (a veth would be taken for a
//!   pod's), with the node's InternalIPs (`status.addresses`
//!   of its Node object; /24 and /64);
//! - `flannel.1` (IPv4) and `flannel-v6.1` (IPv6): VXLAN, VNI 1, port
//!   8472, no learning, MTU 50 and 70 below the uplink's, holding the
//!   node's pod subnet's `.0` / `::`. For every other node: a route to its
//!   pod subnet via that subnet's `.0` / `::` (onlink), a permanent
//!   neighbour entry giving the remote VTEP's MAC, and an FDB entry
//!   sending that MAC to the remote node's InternalIP, as flanneld writes
//!   them from the other nodes' leases;
//! - flannel's masquerade (`FLANNEL-POSTRTG`): none between pod subnets,
//!   `MASQUERADE` for pod traffic leaving them;
//! - pods through a CNI chain on that node ([`node_chain`]: Debian's
//!   `bridge` on `cni0` with `host-local` over the node's `podCIDRs`, then
//!   `portmap`, then `netpol-cni` when given), each with the addresses the
//!   cluster file gives it (`runtimeConfig.ips`).
//!
//! Every namespace is named `<prefix>-…`, so [`down`] finds them all,
//! also from another process than the one that made them.
use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde_json::{Value, json};

use crate::{
    cni::{Chain, DEBIAN_PLUGINS, Sandbox, netpol_cni_entry},
    netns::{Netns, run},
    topology::ip_in,
};

/// The underlay's parent device, in the underlay namespace.
const UNDERLAY: &str = "underlay0";
/// flannel's IPv4 VXLAN device.
pub const VXLAN_V4: &str = "flannel.1";
/// flannel's IPv6 VXLAN device.
pub const VXLAN_V6: &str = "flannel-v6.1";
/// flannel's VNI and UDP port (its Linux default).
const VNI: &str = "1";
const PORT: &str = "8472";
/// The uplink's MTU (a veth's default), and what VXLAN takes of it.
const UPLINK_MTU: u16 = 1500;
const VXLAN_V4_OVERHEAD: u16 = 50;
const VXLAN_V6_OVERHEAD: u16 = 70;

/// An address and prefix length (`10.42.1.0/24`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: not ADDRESS/LENGTH"))?;
        let addr: IpAddr = a.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let len: u8 = l.parse().map_err(|e| format!("{s:?}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("{s:?}: prefix longer than {max}"));
        }
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Cidr {
    /// Whether `ip` is inside.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A node of the cluster file: its name, InternalIPs and pod subnets.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    /// `status.addresses` of type InternalIP, at most one per family.
    pub internal: Vec<IpAddr>,
    /// `spec.podCIDRs`, at most one per family.
    pub pod_cidrs: Vec<Cidr>,
}

impl NodeSpec {
    /// The node of a Node object.
    ///
    /// # Errors
    /// What the object lacks, naming it.
    pub fn from_object(node: &Value) -> Result<Self, String> {
        let name = node["metadata"]["name"]
            .as_str()
            .ok_or("a Node without metadata.name")?
            .to_owned();
        let internal: Vec<IpAddr> = node["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["type"] == "InternalIP")
            .filter_map(|a| a["address"].as_str())
            .map(|a| {
                a.parse()
                    .map_err(|e| format!("Node {name}: InternalIP {a:?}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let pod_cidrs: Vec<Cidr> = node["spec"]["podCIDRs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|c| c.parse().map_err(|e| format!("Node {name}: podCIDRs: {e}")))
            .collect::<Result<_, _>>()?;
        let spec = Self {
            name,
            internal,
            pod_cidrs,
        };
        for v4 in [true, false] {
            let (a, c) = (spec.internal_ip(v4), spec.pod_cidr(v4));
            if a.is_some() != c.is_some() {
                return Err(format!(
                    "Node {}: an {} InternalIP and pod CIDR go together",
                    spec.name,
                    if v4 { "IPv4" } else { "IPv6" }
                ));
            }
        }
        if spec.internal_ip(true).is_none() && spec.internal_ip(false).is_none() {
            return Err(format!("Node {}: no InternalIP", spec.name));
        }
        Ok(spec)
    }

    /// The InternalIP of one family.
    #[must_use]
    pub fn internal_ip(&self, v4: bool) -> Option<IpAddr> {
        self.internal.iter().copied().find(|a| a.is_ipv4() == v4)
    }

    /// The pod subnet of one family.
    #[must_use]
    pub fn pod_cidr(&self, v4: bool) -> Option<Cidr> {
        self.pod_cidrs
            .iter()
            .copied()
            .find(|c| c.addr.is_ipv4() == v4)
    }
}

/// The Nodes among `objects`, in order.
///
/// # Errors
/// The first Node that cannot be wired.
pub fn node_specs(objects: &[Value]) -> Result<Vec<NodeSpec>, String> {
    objects
        .iter()
        .filter(|o| o["kind"] == "Node")
        .map(NodeSpec::from_object)
        .collect()
}

/// The namespaces of a cluster, all named `<prefix>-…`.
#[derive(Clone, Debug)]
pub struct Names {
    pub prefix: String,
}

impl Names {
    /// The namespace holding the underlay's parent device.
    #[must_use]
    pub fn underlay(&self) -> String {
        format!("{}-underlay", self.prefix)
    }

    /// A node's namespace.
    #[must_use]
    pub fn node(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// A pod's namespace.
    #[must_use]
    pub fn pod(&self, node: &str, namespace: &str, name: &str) -> String {
        format!("{}-{node}-{namespace}-{name}", self.prefix)
    }
}

/// Wires the nodes (see the module's documentation); on failure, removes
/// what it made.
///
/// # Errors
/// The first command that failed.
pub fn up(names: &Names, nodes: &[NodeSpec]) -> Result<(), String> {
    let r = wire(names, nodes);
    if r.is_err() {
        let _ = down(&names.prefix);
    }
    r
}

fn wire(names: &Names, nodes: &[NodeSpec]) -> Result<(), String> {
    let e = |e: crate::netns::Error| e.to_string();
    let underlay = names.underlay();
    create(&underlay)?;
    // The underlay is macvlans (bridge mode) of one parent, a bridge with
    // no port (this kernel has no dummy devices): a node's uplink must not
    // be a veth, which the agent takes for a pod's.
    ip_in(&underlay, &["link", "add", UNDERLAY, "type", "bridge"]).map_err(e)?;
    ip_in(&underlay, &["link", "set", UNDERLAY, "up"]).map_err(e)?;
    let mut macs = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let ns = names.node(&n.name);
        create(&ns)?;
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            run("ip", &["netns", "exec", &ns, "sysctl", "-qw", sysctl]).map_err(e)?;
        }
        uplink(&underlay, &format!("u{i}"), &ns, "eth0")?;
        let mut mac = [None, None];
        for (f, v4) in [true, false].into_iter().enumerate() {
            let (Some(addr), Some(cidr)) = (n.internal_ip(v4), n.pod_cidr(v4)) else {
                continue;
            };
            let uplink = format!("{addr}/{}", if v4 { 24 } else { 64 });
            let mut args = vec!["addr", "add", &uplink, "dev", "eth0"];
            if !v4 {
                args.push("nodad");
            }
            ip_in(&ns, &args).map_err(e)?;
            let (dev, overhead) = if v4 {
                (VXLAN_V4, VXLAN_V4_OVERHEAD)
            } else {
                (VXLAN_V6, VXLAN_V6_OVERHEAD)
            };
            let local = addr.to_string();
            let mtu = (UPLINK_MTU - overhead).to_string();
            ip_in(
                &ns,
                &[
                    "link",
                    "add",
                    dev,
                    "mtu",
                    &mtu,
                    "type",
                    "vxlan",
                    "id",
                    VNI,
                    "local",
                    &local,
                    "dev",
                    "eth0",
                    "dstport",
                    PORT,
                    "nolearning",
                ],
            )
            .map_err(e)?;
            let own = format!("{}/{}", cidr.addr, if v4 { 32 } else { 128 });
            let mut args = vec!["addr", "add", &own, "dev", dev];
            if !v4 {
                args.push("nodad");
            }
            ip_in(&ns, &args).map_err(e)?;
            ip_in(&ns, &["link", "set", dev, "up"]).map_err(e)?;
            mac[f] = Some(link_mac(&ns, dev)?);
        }
        macs.push(mac);
        masquerade(&ns, n, nodes)?;
    }
    // What flanneld writes from each other node's lease.
    for (i, n) in nodes.iter().enumerate() {
        let ns = names.node(&n.name);
        for (j, remote) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            for (f, v4) in [true, false].into_iter().enumerate() {
                let (Some(dst), Some(cidr), Some(mac)) =
                    (remote.internal_ip(v4), remote.pod_cidr(v4), &macs[j][f])
                else {
                    continue;
                };
                let dev = if v4 { VXLAN_V4 } else { VXLAN_V6 };
                let (gw, subnet, dst) = (cidr.addr.to_string(), cidr.to_string(), dst.to_string());
                let family = if v4 { "-4" } else { "-6" };
                ip_in(
                    &ns,
                    &[
                        family,
                        "neigh",
                        "replace",
                        &gw,
                        "lladdr",
                        mac,
                        "dev",
                        dev,
                        "nud",
                        "permanent",
                    ],
                )
                .map_err(e)?;
                run(
                    "bridge",
                    &[
                        "-n",
                        &ns,
                        "fdb",
                        "replace",
                        mac,
                        "dev",
                        dev,
                        "dst",
                        &dst,
                        "self",
                        "permanent",
                    ],
                )
                .map_err(e)?;
                ip_in(
                    &ns,
                    &[
                        family, "route", "replace", &subnet, "via", &gw, "dev", dev, "onlink",
                    ],
                )
                .map_err(e)?;
            }
        }
    }
    Ok(())
}

/// The calling process's namespace on the underlay too: a macvlan `dev`
/// here holding `addrs` (/24 and /64). It goes when the underlay
/// namespace does (with its parent).
///
/// # Errors
/// The command that failed.
pub fn host_leg(names: &Names, dev: &str, addrs: &[&str]) -> Result<(), String> {
    let e = |e: crate::netns::Error| e.to_string();
    // Moved to this process's namespace (`ip` runs in the underlay's).
    uplink(
        &names.underlay(),
        "host",
        &std::process::id().to_string(),
        dev,
    )?;
    for a in addrs {
        let v4 = a
            .parse::<IpAddr>()
            .map_err(|x| format!("{a}: {x}"))?
            .is_ipv4();
        let cidr = format!("{a}/{}", if v4 { 24 } else { 64 });
        let mut args = vec!["addr", "add", cidr.as_str(), "dev", dev];
        if !v4 {
            args.push("nodad");
        }
        run("ip", &args).map_err(e)?;
    }
    Ok(())
}

/// A macvlan of the underlay's parent, moved into `ns` (a name, or a
/// process's id) as `dev`, up.
fn uplink(underlay: &str, tmp: &str, ns: &str, dev: &str) -> Result<(), String> {
    let e = |e: crate::netns::Error| e.to_string();
    ip_in(
        underlay,
        &[
            "link", "add", tmp, "link", UNDERLAY, "type", "macvlan", "mode", "bridge",
        ],
    )
    .map_err(e)?;
    ip_in(underlay, &["link", "set", tmp, "netns", ns, "name", dev]).map_err(e)?;
    if ns.parse::<u32>().is_ok() {
        run("ip", &["link", "set", dev, "up"]).map_err(e)?;
    } else {
        ip_in(ns, &["link", "set", dev, "up"]).map_err(e)?;
    }
    Ok(())
}

/// A namespace that outlives this process, loopback up.
fn create(name: &str) -> Result<(), String> {
    let ns = Netns::create(name).map_err(|e| e.to_string())?;
    std::mem::forget(ns);
    Ok(())
}

/// The MAC address of `dev` in `ns`.
fn link_mac(ns: &str, dev: &str) -> Result<String, String> {
    let out = run("ip", &["-n", ns, "-j", "link", "show", dev]).map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&out).map_err(|e| format!("ip -j link: {e}"))?;
    v[0]["address"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{dev} in {ns}: no MAC address"))
}

/// flannel's `FLANNEL-POSTRTG`: pod traffic to any node's pod subnet keeps
/// its source; pod traffic leaving them is masqueraded (not multicast).
fn masquerade(ns: &str, node: &NodeSpec, nodes: &[NodeSpec]) -> Result<(), String> {
    for (tool, v4, multicast) in [
        ("iptables-restore", true, "224.0.0.0/4"),
        ("ip6tables-restore", false, "ff00::/8"),
    ] {
        let Some(local) = node.pod_cidr(v4) else {
            continue;
        };
        let mut rules = String::from(
            "*nat\n:FLANNEL-POSTRTG - [0:0]\n\
             -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n",
        );
        for cidr in nodes.iter().filter_map(|n| n.pod_cidr(v4)) {
            rules.push_str(&format!(
                "-A FLANNEL-POSTRTG -s {local} -d {cidr} -m comment --comment \"flanneld masq\" -j RETURN\n"
            ));
        }
        rules.push_str(&format!(
            "-A FLANNEL-POSTRTG -s {local} ! -d {multicast} -m comment --comment \"flanneld masq\" \
             -j MASQUERADE --random-fully\nCOMMIT\n"
        ));
        crate::kube_proxy::restore(ns, tool, &rules, true)?;
    }
    Ok(())
}

/// Waits until no address in the cluster's namespaces is tentative (IPv6
/// duplicate address detection: `cni0`'s gateway address takes a second
/// or two after the first pod of a node, and routes nothing meanwhile).
///
/// # Errors
/// Addresses still tentative after `timeout`, named.
pub fn settle(prefix: &str, timeout: std::time::Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut tentative = Vec::new();
        for ns in namespaces(prefix)? {
            let out = run("ip", &["-n", &ns, "-6", "-o", "addr", "show", "tentative"])
                .map_err(|e| e.to_string())?;
            tentative.extend(out.lines().map(|l| format!("{ns}: {}", l.trim())));
        }
        if tentative.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "addresses still tentative after {timeout:?}: {}",
                tentative.join("; ")
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Removes every namespace named `<prefix>-…` (pods first, the underlay
/// last); the names removed.
///
/// # Errors
/// `ip netns` failing to list or delete.
pub fn down(prefix: &str) -> Result<Vec<String>, String> {
    let mut gone = namespaces(prefix)?;
    let underlay = Names {
        prefix: prefix.into(),
    }
    .underlay();
    // Pods (the longest names) before their nodes, the underlay last.
    gone.sort_by_key(|n| (n == &underlay, std::cmp::Reverse(n.len())));
    for n in &gone {
        run("ip", &["netns", "del", n]).map_err(|e| e.to_string())?;
    }
    Ok(gone)
}

/// The namespaces named `<prefix>-…`.
///
/// # Errors
/// `ip netns` failing.
pub fn namespaces(prefix: &str) -> Result<Vec<String>, String> {
    let out = run("ip", &["netns", "list"]).map_err(|e| e.to_string())?;
    let start = format!("{prefix}-");
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&start))
        .map(str::to_owned)
        .collect())
}

/// The CNI chain of a node, as flannel's CNI delegates it under k3s's
/// conflist: `bridge` on `cni0` (default gateway, hairpin, no masquerade
/// of its own, the VXLAN MTU, `host-local` over the node's
/// pod subnets with leases in `data_dir`, addresses a pod asks for
/// honoured), `portmap`, then `netpol-cni` (`netpol`: the plugin and the
/// agent's socket) when given.
#[must_use]
pub fn node_chain(node: &NodeSpec, data_dir: &Path, netpol: Option<(&Path, &Path)>) -> Chain {
    let ranges: Vec<Value> = node
        .pod_cidrs
        .iter()
        .map(|c| json!([{ "subnet": c.to_string() }]))
        .collect();
    let mtu = UPLINK_MTU
        - if node.pod_cidr(false).is_some() {
            VXLAN_V6_OVERHEAD
        } else {
            VXLAN_V4_OVERHEAD
        };
    let mut plugins = vec![
        json!({
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "isDefaultGateway": true,
            "forceAddress": true,
            "hairpinMode": true,
            "ipMasq": false,
            "mtu": mtu,
            "ipam": { "type": "host-local", "dataDir": data_dir, "ranges": ranges },
            "capabilities": { "ips": true },
        }),
        json!({ "type": "portmap", "capabilities": { "portMappings": true } }),
    ];
    let mut path = vec![PathBuf::from(DEBIAN_PLUGINS)];
    if let Some((plugin, socket)) = netpol {
        plugins.push(netpol_cni_entry(socket));
        path.insert(0, plugin.parent().unwrap_or(Path::new("/")).to_owned());
    }
    Chain {
        conflist: json!({ "cniVersion": "1.0.0", "name": "cbr0", "plugins": plugins }),
        path,
        direct: false,
    }
}

/// A pod made through `chain` on `node`: its namespace (kept after this
/// process, named by [`Names::pod`]) and the chain's result.
///
/// # Errors
/// The namespace or the chain failing; the namespace is removed again.
pub fn add_pod(
    names: &Names,
    node: &NodeSpec,
    chain: &Chain,
    sandbox: &Sandbox,
) -> Result<Value, String> {
    let pod_ns = names.pod(&node.name, &sandbox.namespace, &sandbox.name);
    let pod = Netns::create(&pod_ns).map_err(|e| e.to_string())?;
    let node_ns = Netns::existing(names.node(&node.name));
    let result = chain.add(&node_ns, &pod, sandbox)?;
    std::mem::forget(pod);
    Ok(result)
}

/// The addresses a pod asks for, in CIDR form with its node's prefix
/// lengths (as `runtimeConfig.ips` carries them).
///
/// # Errors
/// An address outside the node's pod subnets.
pub fn requested_ips(node: &NodeSpec, ips: &[IpAddr]) -> Result<Vec<String>, String> {
    ips.iter()
        .map(|ip| {
            node.pod_cidrs
                .iter()
                .find(|c| c.contains(*ip))
                .map(|c| format!("{ip}/{}", c.len))
                .ok_or_else(|| format!("{ip} is outside node {}'s pod CIDRs", node.name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(cidrs: &[&str]) -> NodeSpec {
        NodeSpec {
            name: "node-1".into(),
            internal: vec!["10.200.0.1".parse().expect("ip")],
            pod_cidrs: cidrs.iter().map(|c| c.parse().expect("cidr")).collect(),
        }
    }

    #[test]
    fn cidrs_parse_and_contain_their_family_only() {
        let c: Cidr = "10.42.1.0/24".parse().expect("cidr");
        assert!(c.contains("10.42.1.255".parse().expect("ip")));
        assert!(!c.contains("10.42.2.0".parse().expect("ip")));
        assert!(!c.contains("fd00::1".parse().expect("ip")));
        let c6: Cidr = "fd00:10:42:1::/64".parse().expect("cidr");
        assert!(c6.contains("fd00:10:42:1::11".parse().expect("ip")));
        assert!(!c6.contains("fd00:10:42:2::11".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains("192.0.2.1".parse().expect("ip")));
        for bad in ["10.42.1.0", "10.42.1.0/33", "fd00::/129", "x/8"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn requested_addresses_take_their_subnets_length_or_are_refused_by_name() {
        let n = node(&["10.42.1.0/24", "fd00:10:42:1::/64"]);
        let ips: Vec<IpAddr> = vec![
            "10.42.1.11".parse().expect("ip"),
            "fd00:10:42:1::11".parse().expect("ip"),
        ];
        assert_eq!(
            requested_ips(&n, &ips).expect("inside"),
            ["10.42.1.11/24", "fd00:10:42:1::11/64"]
        );
        let e = requested_ips(&n, &["10.42.2.11".parse().expect("ip")]).expect_err("outside");
        assert!(e.contains("10.42.2.11") && e.contains("node-1"), "{e}");
    }

    #[test]
    fn a_node_chain_has_netpol_cni_last_only_when_given() {
        let n = node(&["10.42.1.0/24", "fd00:10:42:1::/64"]);
        let types = |c: &Chain| -> Vec<String> {
            c.conflist["plugins"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["type"].as_str().map(str::to_owned))
                .collect()
        };
        let plain = node_chain(&n, Path::new("/ipam"), None);
        assert_eq!(types(&plain), ["bridge", "portmap"]);
        let bridge = &plain.conflist["plugins"][0];
        assert_eq!(bridge["mtu"], 1430, "the IPv6 VXLAN device's MTU");
        assert_eq!(bridge["capabilities"]["ips"], true);
        let with = node_chain(
            &n,
            Path::new("/ipam"),
            Some((Path::new("/bin/netpol-cni"), Path::new("/run/cni.sock"))),
        );
        assert_eq!(types(&with), ["bridge", "portmap", "netpol-cni"]);
        assert_eq!(with.path[0], Path::new("/bin"));
    }
}
