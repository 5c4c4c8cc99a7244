//! Names of the programs in the eBPF object.

/// Host-side veth TC ingress: packets leaving the pod, i.e. the pod's egress.
pub const FROM_POD: &str = "from_pod";
/// Host-side veth TC egress: packets entering the pod, i.e. the pod's ingress.
pub const TO_POD: &str = "to_pod";
/// TC egress of the node's other devices (uplink, tunnels): judges the
/// pods' Service traffic whose backend is on another node.
pub const LEAVE_NODE: &str = "leave_node";
/// [`LEAVE_NODE`] for devices without an Ethernet header (`WireGuard`,
/// IPIP).
pub const LEAVE_NODE_L3: &str = "leave_node_l3";
/// cgroup-skb ingress of the root cgroup v2: judges a pod's Service
/// traffic whose backend is one of the node's own addresses.
pub const TO_HOST: &str = "to_host";
