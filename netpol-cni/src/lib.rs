//! netpol's chained CNI plugin, as a library: what the plugin and the
//! node's agent say to each other ([`protocol`]), and how the plugin is put
//! into a node's CNI configuration and taken out again ([`conflist`]).
//!
//! The plugin (`src/main.rs`) runs after the main plugin (flannel's
//! `bridge`), reports the pod's host interface and addresses to the agent
//! over a unix socket, and returns the main plugin's result only once the
//! agent has written that pod's policy to the kernel. It never touches the
//! datapath itself: the agent is the only writer of the maps.

pub mod conflist;
pub mod protocol;

/// The plugin's `type` in a conflist, and its binary's name.
pub const PLUGIN_TYPE: &str = "netpol-cni";

/// Where the agent listens for the plugin, unless configured otherwise:
/// on the state hostPath the DaemonSet already mounts.
pub const DEFAULT_SOCKET: &str = "/run/netpol/cni.sock";

/// How long ADD waits for the agent by default (connecting included: an
/// agent being upgraded is back within seconds).
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
