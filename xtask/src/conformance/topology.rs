//! The cluster in network namespaces: a node netns and one netns per pod,
//! joined by veth pairs, either on a `cni0`-style bridge (k3s/flannel) or
//! with per-pod /32 and /128 routes (routed CNIs). Everything is removed
//! on drop.
use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::Arc,
};

use anyhow::{Context as _, Result, bail};

use super::scenario::PodSpec;

/// How pods reach each other through the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Host veths on a bridge with br_netfilter on; pods in the node's
    /// /24 and /64 with the bridge as gateway.
    Bridge,
    /// Pods with /32 and /128 addresses, the node routing each to its veth.
    Routed,
}

/// A pod's network namespace and its host-side interface.
pub struct PodNet {
    pub netns: String,
    /// An open handle on the netns, for `setns`.
    pub fd: Arc<File>,
    pub spec: PodSpec,
}

/// The namespaces and links of one run.
pub struct Topology {
    pub kind: Kind,
    /// Node netns name.
    pub node: String,
    pub node_fd: Arc<File>,
    pub pods: BTreeMap<String, PodNet>,
    prefix: String,
    next_if: u32,
    node_v4: Ipv4Addr,
    node_v6: Ipv6Addr,
}

pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn netns_fd(name: &str) -> Result<Arc<File>> {
    let path = format!("/var/run/netns/{name}");
    Ok(Arc::new(
        File::open(&path).with_context(|| format!("opening {path}"))?,
    ))
}

/// Runs `sysctl -qw` inside a netns.
fn sysctl(netns: &str, setting: &str) -> Result<()> {
    ip(&["netns", "exec", netns, "sysctl", "-qw", setting])
}

impl Topology {
    /// The node netns with its addresses (`node_v4`, `node_v6`: the Node's
    /// InternalIPs, also the pods' gateway on the bridge).
    pub fn new(kind: Kind, node_v4: Ipv4Addr, node_v6: Ipv6Addr) -> Result<Self> {
        let prefix = format!("npc{}", std::process::id() % 100_000);
        super::register_netns_prefix(&prefix);
        let node = format!("{prefix}-node");
        // A run killed half way may have left its namespaces behind.
        let _ = Command::new("ip").args(["netns", "del", &node]).output();
        ip(&["netns", "add", &node])?;
        let node_fd = netns_fd(&node)?;
        let t = Self {
            kind,
            node: node.clone(),
            node_fd,
            pods: BTreeMap::new(),
            prefix,
            next_if: 0,
            node_v4,
            node_v6,
        };
        ip(&["-n", &node, "link", "set", "lo", "up"])?;
        sysctl(&node, "net.ipv4.ip_forward=1")?;
        sysctl(&node, "net.ipv6.conf.all.forwarding=1")?;
        match kind {
            Kind::Bridge => {
                ip(&["-n", &node, "link", "add", "cni0", "type", "bridge"])?;
                ip(&[
                    "-n",
                    &node,
                    "addr",
                    "add",
                    &format!("{node_v4}/24"),
                    "dev",
                    "cni0",
                ])?;
                ip(&[
                    "-n",
                    &node,
                    "addr",
                    "add",
                    &format!("{node_v6}/64"),
                    "dev",
                    "cni0",
                    "nodad",
                ])?;
                ip(&["-n", &node, "link", "set", "cni0", "up"])?;
                // As k3s/flannel: bridged traffic goes through iptables.
                sysctl(&node, "net.bridge.bridge-nf-call-iptables=1")?;
                sysctl(&node, "net.bridge.bridge-nf-call-ip6tables=1")?;
            }
            Kind::Routed => {
                ip(&[
                    "-n",
                    &node,
                    "addr",
                    "add",
                    &format!("{node_v4}/32"),
                    "dev",
                    "lo",
                ])?;
                ip(&[
                    "-n",
                    &node,
                    "addr",
                    "add",
                    &format!("{node_v6}/128"),
                    "dev",
                    "lo",
                ])?;
            }
        }
        Ok(t)
    }

    /// Adds a pod: its netns, the veth pair, addresses and routes.
    pub fn add_pod(&mut self, spec: &PodSpec) -> Result<()> {
        let netns = format!("{}-{}", self.prefix, spec.id.replace('/', "-"));
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        ip(&["netns", "add", &netns])?;
        let fd = netns_fd(&netns)?;
        let host_if = format!("{}v{}", self.prefix, self.next_if);
        self.next_if += 1;
        // Register before configuring, so a failure below still cleans up.
        self.pods.insert(
            spec.id.clone(),
            PodNet {
                netns: netns.clone(),
                fd,
                spec: spec.clone(),
            },
        );
        let node = self.node.clone();
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &node, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ])?;
        let (v4_len, v6_len) = match self.kind {
            Kind::Bridge => (24, 64),
            Kind::Routed => (32, 128),
        };
        if let Some(a) = spec.v4 {
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{a}/{v4_len}"),
                "dev",
                "eth0",
            ])?;
        }
        if let Some(a) = spec.v6 {
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{a}/{v6_len}"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        match self.kind {
            Kind::Bridge => {
                ip(&["-n", &node, "link", "set", &host_if, "master", "cni0"])?;
                // flannel's hairpinMode: a pod reaching its own Service
                // gets its packet back through its own port.
                ip(&[
                    "-n",
                    &node,
                    "link",
                    "set",
                    &host_if,
                    "type",
                    "bridge_slave",
                    "hairpin",
                    "on",
                ])?;
                ip(&["-n", &node, "link", "set", &host_if, "up"])?;
                if spec.v4.is_some() {
                    ip(&[
                        "-n",
                        &netns,
                        "route",
                        "add",
                        "default",
                        "via",
                        &self.node_v4.to_string(),
                    ])?;
                }
                if spec.v6.is_some() {
                    ip(&[
                        "-n",
                        &netns,
                        "-6",
                        "route",
                        "add",
                        "default",
                        "via",
                        &self.node_v6.to_string(),
                    ])?;
                }
            }
            Kind::Routed => {
                // Calico's shape: the pod's gateway is a link-local address
                // the host veth owns; the node routes each pod address to
                // its veth.
                ip(&[
                    "-n",
                    &node,
                    "addr",
                    "add",
                    "169.254.1.1/32",
                    "dev",
                    &host_if,
                ])?;
                ip(&[
                    "-n",
                    &node,
                    "addr",
                    "add",
                    "fe80::1/64",
                    "dev",
                    &host_if,
                    "nodad",
                ])?;
                ip(&["-n", &node, "link", "set", &host_if, "up"])?;
                if let Some(a) = spec.v4 {
                    ip(&[
                        "-n",
                        &netns,
                        "route",
                        "add",
                        "169.254.1.1",
                        "dev",
                        "eth0",
                        "scope",
                        "link",
                    ])?;
                    ip(&[
                        "-n",
                        &netns,
                        "route",
                        "add",
                        "default",
                        "via",
                        "169.254.1.1",
                        "dev",
                        "eth0",
                    ])?;
                    ip(&[
                        "-n",
                        &node,
                        "route",
                        "add",
                        &format!("{a}/32"),
                        "dev",
                        &host_if,
                    ])?;
                }
                if let Some(a) = spec.v6 {
                    ip(&[
                        "-n", &netns, "-6", "route", "add", "default", "via", "fe80::1", "dev",
                        "eth0",
                    ])?;
                    ip(&[
                        "-n",
                        &node,
                        "-6",
                        "route",
                        "add",
                        &format!("{a}/128"),
                        "dev",
                        &host_if,
                    ])?;
                }
            }
        }
        Ok(())
    }

    /// Removes one pod's netns (its veth goes with it).
    pub fn remove_pod(&mut self, id: &str) {
        if let Some(p) = self.pods.remove(id) {
            let _ = Command::new("ip").args(["netns", "del", &p.netns]).output();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let ids: Vec<String> = self.pods.keys().cloned().collect();
        for id in ids {
            self.remove_pod(&id);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.node])
            .output();
    }
}
