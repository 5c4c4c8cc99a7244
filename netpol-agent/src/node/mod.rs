//! The node around the pods: its links (pod veths found and watched over
//! rtnetlink, their peers' addresses) and its uplinks (where `leave_node`
//! judges traffic that leaves the node).
pub mod links;
pub mod uplinks;
