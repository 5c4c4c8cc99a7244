//! The cluster in network namespaces: a node netns and one netns per pod,
//! joined by veth pairs, either on a `cni0`-style bridge (k3s/flannel) or
//! with per-pod /32 and /128 routes (routed CNIs). The namespaces and
//! their wiring are netpol-testkit's (`netpol_testkit::topology`, as the
//! agent's tests build theirs); this names them after the run and its
//! pods, and keeps a handle on each. Everything is removed on drop.
use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::Arc,
};

use anyhow::Result;
use netpol_testkit::{
    Netns,
    topology::{self as kit, Subnet},
};

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
    /// Deleted (its veth with it) when the pod goes.
    _netns: Netns,
    /// An open handle on the netns, for `setns`.
    pub fd: Arc<File>,
    pub spec: PodSpec,
}

/// The namespaces and links of one run.
pub struct Topology {
    pub kind: Kind,
    /// Node netns.
    pub node: Netns,
    pub node_fd: Arc<File>,
    pub pods: BTreeMap<String, PodNet>,
    prefix: String,
    next_if: u32,
    node_v4: Ipv4Addr,
    node_v6: Ipv6Addr,
}

/// The netns `name`, after removing one a run killed half way may have
/// left behind.
fn fresh_netns(name: String) -> Result<(Netns, Arc<File>)> {
    let _ = Command::new("ip").args(["netns", "del", &name]).output();
    let ns = Netns::create(name)?;
    let fd = Arc::new(ns.open()?);
    Ok((ns, fd))
}

/// Runs `sysctl -qw` inside a netns.
fn sysctl(netns: &str, setting: &str) -> Result<()> {
    netpol_testkit::netns::run("ip", &["netns", "exec", netns, "sysctl", "-qw", setting])?;
    Ok(())
}

impl Topology {
    /// The node netns with its addresses (`node_v4`, `node_v6`: the Node's
    /// InternalIPs, also the pods' gateway on the bridge).
    pub fn new(kind: Kind, node_v4: Ipv4Addr, node_v6: Ipv6Addr) -> Result<Self> {
        let prefix = format!("npc{}", std::process::id() % 100_000);
        super::register_netns_prefix(&prefix);
        let (node, node_fd) = fresh_netns(format!("{prefix}-node"))?;
        let n = node.name.clone();
        let t = Self {
            kind,
            node,
            node_fd,
            pods: BTreeMap::new(),
            prefix,
            next_if: 0,
            node_v4,
            node_v6,
        };
        sysctl(&n, "net.ipv4.ip_forward=1")?;
        sysctl(&n, "net.ipv6.conf.all.forwarding=1")?;
        match kind {
            Kind::Bridge => {
                kit::add_bridge(&n, &format!("{node_v4}/24"), Some(&format!("{node_v6}/64")))?;
                // As k3s/flannel: bridged traffic goes through iptables.
                sysctl(&n, "net.bridge.bridge-nf-call-iptables=1")?;
                sysctl(&n, "net.bridge.bridge-nf-call-ip6tables=1")?;
            }
            Kind::Routed => {
                kit::ip_in(&n, &["addr", "add", &format!("{node_v4}/32"), "dev", "lo"])?;
                kit::ip_in(&n, &["addr", "add", &format!("{node_v6}/128"), "dev", "lo"])?;
            }
        }
        Ok(t)
    }

    /// Adds a pod: its netns, the veth pair, addresses and routes.
    pub fn add_pod(&mut self, spec: &PodSpec) -> Result<()> {
        let (netns, fd) = fresh_netns(format!("{}-{}", self.prefix, spec.id.replace('/', "-")))?;
        let pod = netns.name.clone();
        let host_if = format!("{}v{}", self.prefix, self.next_if);
        self.next_if += 1;
        // Register before configuring, so a failure below still cleans up.
        self.pods.insert(
            spec.id.clone(),
            PodNet {
                _netns: netns,
                fd,
                spec: spec.clone(),
            },
        );
        let node = &self.node.name;
        kit::veth(node, &host_if, &pod)?;
        let (v4, v6) = (spec.v4.map(IpAddr::V4), spec.v6.map(IpAddr::V6));
        match self.kind {
            Kind::Bridge => {
                let families: Vec<Subnet> = [(v4, 24, IpAddr::V4(self.node_v4))]
                    .into_iter()
                    .chain([(v6, 64, IpAddr::V6(self.node_v6))])
                    .filter_map(|(addr, len, gateway)| {
                        Some(Subnet {
                            addr: addr?,
                            len,
                            gateway,
                        })
                    })
                    .collect();
                // flannel's hairpinMode: a pod reaching its own Service
                // gets its packet back through its own port.
                kit::link_bridged(node, &pod, &host_if, true, &families)?;
            }
            // Calico's shape: the pod's gateway is a link-local address
            // the host veth owns; the node routes each pod address to its
            // veth.
            Kind::Routed => kit::link_calico(node, &pod, &host_if, v4, v6)?,
        }
        Ok(())
    }

    /// Removes one pod's netns (its veth goes with it).
    pub fn remove_pod(&mut self, id: &str) {
        self.pods.remove(id);
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The pods' namespaces first, then (as the field drops) the node's.
        self.pods.clear();
    }
}
