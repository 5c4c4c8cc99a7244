//! The node around the pods: its links (pod veths found and watched over
//! rtnetlink, their peers' addresses) and its uplinks (where `leave_node`
//! judges traffic that leaves the node), and the CNI plugin's socket
//! (pods reported by the runtime as their sandbox is made).
pub mod cni;
pub mod links;
pub mod uplinks;
