//! A node: the agent (in the test process or the `netpol-agent` binary)
//! enforcing pods of network namespaces with real traffic: Services
//! behind kube-proxy's DNAT with backends on pods, on the node and on
//! another node; DNS; deny events; `leave_node` on uplinks; `inspect`
//! and `explain` against the live maps.
mod deny_events;
mod diff;
mod inspect_explain;
mod service_dns;
mod service_node_backend;
mod service_remote_backend;
mod staged;
mod uplink_attach;

/// The agent binary cargo built for these tests.
const AGENT: &str = env!("CARGO_BIN_EXE_netpol-agent");
