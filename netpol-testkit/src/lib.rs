//! netpol's test kit, shared by the agent's integration tests, its benches
//! and (the topology) xtask's conformance harness. Dev-only: nothing of
//! the agent depends on it.
//!
//! - [`netns`]: commands, unique names, network namespaces, the root check;
//! - [`topology`]: a node namespace and pod namespaces joined by veths,
//!   bridged, in a subnet each, or routed as Calico does;
//! - [`echo`]: TCP and UDP echo servers and the probes that talk to them;
//! - [`kube_proxy`]: a node's Service DNAT as kube-proxy writes it;
//! - [`cni`]: a CNI chain run as containerd runs it;
//! - [`cluster`]: several nodes wired as flannel's VXLAN backend wires them;
//! - [`manifests`]: snapshots and the manifests folder an agent watches;
//! - [`datapath`]: private bpffs mounts and a datapath enforcing a compile;
//! - [`agent`]: the agent on a thread in a node namespace;
//! - [`process`]: the `netpol-agent run` binary in a node namespace;
//! - [`packets`]: frames through the real programs (`BPF_PROG_TEST_RUN`);
//! - [`compiler`]: the reference evaluator and the LPM simulator;
//! - [`fake_apiserver`]: list and watch of a fake Kubernetes API server;
//! - [`baseline`]: the kube-router-style iptables + ipset baseline.
//!
//! Everything from [`manifests`] on needs the `agent` feature (default).

pub mod echo;
pub mod kube_proxy;
pub mod netns;
pub mod resources;
pub mod topology;

#[cfg(feature = "agent")]
pub mod agent;
#[cfg(feature = "agent")]
pub mod apiserver;
#[cfg(feature = "agent")]
pub mod baseline;
#[cfg(feature = "cni")]
pub mod cluster;
#[cfg(feature = "cni")]
pub mod cni;
#[cfg(feature = "agent")]
pub mod compiler;
#[cfg(feature = "agent")]
pub mod datapath;
#[cfg(feature = "agent")]
pub mod fake_apiserver;
#[cfg(feature = "agent")]
pub mod manifests;
#[cfg(feature = "agent")]
pub mod packets;
#[cfg(feature = "agent")]
pub mod process;

pub use netns::{Error, Netns, privileged, sh, unique};
