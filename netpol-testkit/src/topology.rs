//! A node namespace and pod namespaces joined by veth pairs (`eth0` in the
//! pod), in the shapes CNIs give them:
//!
//! - bridged ([`link_bridged`]): host veths on the node's `cni0` bridge,
//!   the pods in its subnet with the bridge as gateway (flannel, k3s);
//! - a subnet each ([`link_subnet`]): the host veth holds the gateway of
//!   the pod's own subnet;
//! - routed as Calico does ([`link_calico`]): /32 and /128 pod addresses,
//!   a link-local gateway the host veth owns, a route per pod address on
//!   the node.
//!
//! The `link_*` functions and [`add_bridge`] return errors (xtask's
//! conformance harness builds its cluster with them); [`node`], [`pod`],
//! [`calico_pod`] and [`PodLink`] are the tests' shorthands, which panic.
use std::net::IpAddr;

use crate::netns::{Netns, Result, run, sh, unique};

/// `ip -n <ns> <args>`, the arguments split on spaces; panics when it
/// fails.
pub fn ip(ns: &str, args: &str) {
    let mut full = vec!["-n", ns];
    full.extend(args.split_whitespace());
    sh("ip", &full);
}

/// `ip -n <ns> <args>`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full).map(drop)
}

/// `ip -n <ns> addr add <addr>/<len> dev <dev>` (`nodad` for IPv6: the
/// address is usable at once).
fn add_address(ns: &str, addr: IpAddr, len: u8, dev: &str) -> Result<()> {
    let cidr = format!("{addr}/{len}");
    let mut args = vec!["addr", "add", &cidr, "dev", dev];
    if addr.is_ipv6() {
        args.push("nodad");
    }
    ip_in(ns, &args)
}

/// `ip -n <ns> [-6] route add default via <gateway> [dev <dev>]`.
fn default_route(ns: &str, gateway: IpAddr, dev: Option<&str>) -> Result<()> {
    let gw = gateway.to_string();
    let mut args = Vec::new();
    if gateway.is_ipv6() {
        args.push("-6");
    }
    args.extend(["route", "add", "default", "via", &gw]);
    if let Some(dev) = dev {
        args.extend(["dev", dev]);
    }
    ip_in(ns, &args)
}

/// The bridge `cni0` in `node`, with `v4` (and `v6`) as its addresses
/// (CIDR notation), up.
pub fn add_bridge(node: &str, v4: &str, v6: Option<&str>) -> Result<()> {
    ip_in(node, &["link", "add", "cni0", "type", "bridge"])?;
    ip_in(node, &["addr", "add", v4, "dev", "cni0"])?;
    if let Some(v6) = v6 {
        ip_in(node, &["addr", "add", v6, "dev", "cni0", "nodad"])?;
    }
    ip_in(node, &["link", "set", "cni0", "up"])
}

/// A veth pair: `host_if` in `node`, its peer `eth0` in `pod`.
pub fn veth(node: &str, host_if: &str, pod: &str) -> Result<()> {
    ip_in(
        node,
        &[
            "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod,
        ],
    )
}

/// One family of a pod behind a gateway: its address and prefix length,
/// and the gateway's address.
#[derive(Clone, Copy, Debug)]
pub struct Subnet {
    pub addr: IpAddr,
    pub len: u8,
    pub gateway: IpAddr,
}

/// Wires the veth `host_if` (made by [`veth`]) as a bridge port: enslaved
/// to `cni0` (in hairpin mode if `hairpin`: flannel's, so that a pod
/// reaching its own Service gets its packet back through its own port),
/// each of `families` on the pod's `eth0` with a default route through
/// its gateway (the bridge's address).
pub fn link_bridged(
    node: &str,
    pod: &str,
    host_if: &str,
    hairpin: bool,
    families: &[Subnet],
) -> Result<()> {
    ip_in(node, &["link", "set", host_if, "master", "cni0"])?;
    if hairpin {
        ip_in(
            node,
            &[
                "link",
                "set",
                host_if,
                "type",
                "bridge_slave",
                "hairpin",
                "on",
            ],
        )?;
    }
    ip_in(node, &["link", "set", host_if, "up"])?;
    for f in families {
        add_address(pod, f.addr, f.len, "eth0")?;
    }
    ip_in(pod, &["link", "set", "eth0", "up"])?;
    for f in families {
        default_route(pod, f.gateway, None)?;
    }
    Ok(())
}

/// Wires the veth `host_if` (made by [`veth`]) as the pod's own subnet
/// per family: the gateway on `host_if`, the address on the pod's `eth0`
/// with a default route through the gateway.
pub fn link_subnet(node: &str, pod: &str, host_if: &str, families: &[Subnet]) -> Result<()> {
    for f in families {
        add_address(node, f.gateway, f.len, host_if)?;
    }
    ip_in(node, &["link", "set", host_if, "up"])?;
    for f in families {
        add_address(pod, f.addr, f.len, "eth0")?;
    }
    ip_in(pod, &["link", "set", "eth0", "up"])?;
    for f in families {
        default_route(pod, f.gateway, None)?;
    }
    Ok(())
}

/// Wires the veth `host_if` (made by [`veth`]) as Calico does: /32 and
/// /128 addresses on the pod's `eth0`, a link-local gateway
/// (169.254.1.1, fe80::1) owned by `host_if`, a route per pod address on
/// the node.
pub fn link_calico(
    node: &str,
    pod: &str,
    host_if: &str,
    v4: Option<IpAddr>,
    v6: Option<IpAddr>,
) -> Result<()> {
    ip_in(node, &["addr", "add", "169.254.1.1/32", "dev", host_if])?;
    ip_in(
        node,
        &["addr", "add", "fe80::1/64", "dev", host_if, "nodad"],
    )?;
    ip_in(node, &["link", "set", host_if, "up"])?;
    if let Some(a) = v4 {
        add_address(pod, a, 32, "eth0")?;
    }
    if let Some(a) = v6 {
        add_address(pod, a, 128, "eth0")?;
    }
    ip_in(pod, &["link", "set", "eth0", "up"])?;
    if let Some(a) = v4 {
        ip_in(
            pod,
            &[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        )?;
        default_route(pod, "169.254.1.1".parse().expect("literal"), Some("eth0"))?;
        ip_in(node, &["route", "add", &format!("{a}/32"), "dev", host_if])?;
    }
    if let Some(a) = v6 {
        default_route(pod, "fe80::1".parse().expect("literal"), Some("eth0"))?;
        ip_in(
            node,
            &["-6", "route", "add", &format!("{a}/128"), "dev", host_if],
        )?;
    }
    Ok(())
}

/// How the tests' node joins its pods ([`node`], [`pod`]).
#[derive(Clone, Copy, Debug)]
pub enum Topology {
    /// Veths enslaved to one bridge, one subnet (10.42.0.0/24, fd42::/64).
    Bridge,
    /// Each veth routed by the node, one subnet each (10.1.n.0/24,
    /// fd01:n::/64).
    Routed,
}

/// A node namespace forwarding IPv4, and IPv6 if `dual` (IPv6 is off
/// otherwise), with the bridge `cni0` for [`Topology::Bridge`].
pub fn node(topo: Topology, dual: bool) -> Netns {
    let node = Netns::new("npn");
    node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    if dual {
        node.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    } else {
        node.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        node.exec("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
    }
    if matches!(topo, Topology::Bridge) {
        add_bridge(&node.name, "10.42.0.1/24", dual.then_some("fd42::1/64"))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    node
}

/// A pod namespace, its host veth (`nph…`) and addresses.
pub struct Pod {
    pub ns: Netns,
    pub host_if: String,
    pub v4: IpAddr,
    pub v6: Option<IpAddr>,
}

impl Pod {
    /// A pod namespace and its veth pair, not yet addressed.
    fn unwired(node: &Netns, v4: IpAddr, v6: Option<IpAddr>) -> Self {
        let ns = Netns::new("npp");
        let host_if = unique("nph");
        veth(&node.name, &host_if, &ns.name).unwrap_or_else(|e| panic!("{e}"));
        Self {
            ns,
            host_if,
            v4,
            v6,
        }
    }

    /// Its addresses, IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        std::iter::once(self.v4).chain(self.v6).collect()
    }

    /// Its `status.podIPs`: `[{ip: …}, …]`.
    pub fn pod_ips(&self) -> String {
        let ips: Vec<String> = self
            .addresses()
            .iter()
            .map(|a| format!("{{ip: \"{a}\"}}"))
            .collect();
        format!("[{}]", ips.join(", "))
    }
}

fn addr(a: &str) -> IpAddr {
    a.parse().unwrap_or_else(|e| panic!("address {a:?}: {e}"))
}

/// Pod `n` of a [`node`] of the same `topo`, addressed as a CNI does: the
/// host side appears first, the peer gets its addresses after. IPv4 only
/// unless `dual`.
pub fn pod(node: &Netns, topo: Topology, n: u8, dual: bool) -> Pod {
    match topo {
        Topology::Bridge => {
            let v4 = Subnet {
                addr: addr(&format!("10.42.0.{n}")),
                len: 24,
                gateway: addr("10.42.0.1"),
            };
            let v6 = Subnet {
                addr: addr(&format!("fd42::{n}")),
                len: 64,
                gateway: addr("fd42::1"),
            };
            let families = if dual { vec![v4, v6] } else { vec![v4] };
            let p = Pod::unwired(node, v4.addr, dual.then_some(v6.addr));
            link_bridged(&node.name, &p.ns.name, &p.host_if, false, &families)
                .unwrap_or_else(|e| panic!("{e}"));
            p
        }
        Topology::Routed => subnet_pod(
            node,
            (&format!("10.1.{n}.1"), &format!("10.1.{n}.2")),
            dual.then_some((&format!("fd01:{n}::1"), &format!("fd01:{n}::2"))),
        ),
    }
}

/// A pod in a subnet of its own ([`link_subnet`]): `v4` and `v6` are
/// (gateway, pod address) in a /24 and a /64.
pub fn subnet_pod(node: &Netns, v4: (&str, &str), v6: Option<(&str, &str)>) -> Pod {
    let subnet = |(gateway, a): (&str, &str), len| Subnet {
        addr: addr(a),
        len,
        gateway: addr(gateway),
    };
    let mut families = vec![subnet(v4, 24)];
    families.extend(v6.map(|v6| subnet(v6, 64)));
    let p = Pod::unwired(node, families[0].addr, families.get(1).map(|f| f.addr));
    link_subnet(&node.name, &p.ns.name, &p.host_if, &families).unwrap_or_else(|e| panic!("{e}"));
    p
}

/// A pod as Calico routes it ([`link_calico`]), with both families.
pub fn calico_pod(node: &Netns, v4: &str, v6: &str) -> Pod {
    let p = Pod::unwired(node, addr(v4), Some(addr(v6)));
    link_calico(&node.name, &p.ns.name, &p.host_if, Some(p.v4), p.v6)
        .unwrap_or_else(|e| panic!("{e}"));
    p
}

/// A node netns and a pod netns joined by a veth pair, with IPv4 and IPv6
/// (nodad) addresses on both ends.
pub struct PodLink {
    pub node: Netns,
    pub pod: Netns,
    /// Host-side interface name, in the node netns.
    pub host_if: String,
}

pub const NODE_V4: &str = "192.0.2.1";
pub const POD_V4: &str = "192.0.2.2";
pub const NODE_V6: &str = "2001:db8::1";
pub const POD_V6: &str = "2001:db8::2";

impl PodLink {
    pub fn new() -> Self {
        let node = Netns::new("npn");
        let pod = Netns::new("npp");
        let host_if = unique("nph");
        veth(&node.name, &host_if, &pod.name).unwrap_or_else(|e| panic!("{e}"));
        for (ns, dev, v4, v6) in [
            (&node, host_if.as_str(), NODE_V4, NODE_V6),
            (&pod, "eth0", POD_V4, POD_V6),
        ] {
            add_address(&ns.name, addr(v4), 24, dev)
                .and_then(|()| add_address(&ns.name, addr(v6), 64, dev))
                .and_then(|()| ip_in(&ns.name, &["link", "set", dev, "up"]))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        Self { node, pod, host_if }
    }
}

impl Default for PodLink {
    fn default() -> Self {
        Self::new()
    }
}
