//! netpol TC programs, attached to the host side of each pod's veth.
//!
//! `from_pod` runs at the host veth's TC ingress (packets the pod sends: the
//! pod's egress); `to_pod` runs at its TC egress (packets delivered to the
//! pod: the pod's ingress). Both read like the packet: parse → endpoint →
//! conntrack → policy → verdict ([`pipeline`]). This file holds only the
//! entry points.
#![no_std]
#![no_main]

#[cfg(feature = "bench")]
mod bench;
mod config;
mod conntrack;
mod ctx;
mod endpoint;
mod events;
mod fragment;
mod maps;
mod packet;
mod parse;
mod pipeline;
mod policy;
mod service;
mod verdict;

use aya_ebpf::{
    macros::{cgroup_skb, classifier},
    programs::{SkBuffContext, TcContext},
};
use netpol_common::direction;

use crate::pipeline::{host, leave, pod};

/// The pod's egress.
#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    pod(&ctx, direction::EGRESS)
}

/// The pod's ingress (and the egress of a Service packet's source, when
/// this pod is the backend kube-proxy chose).
#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    pod(&ctx, direction::INGRESS)
}

/// TC egress of the node's other devices: a Service packet leaving for a
/// backend on another node is judged here against its source pod's
/// egress. Everything else passes uncounted (not netpol's traffic).
#[classifier]
pub fn leave_node(ctx: TcContext) -> i32 {
    leave(&ctx, false)
}

/// `leave_node` for devices without a link-layer header (WireGuard, IPIP,
/// other `none`-type tunnels).
#[classifier]
pub fn leave_node_l3(ctx: TcContext) -> i32 {
    leave(&ctx, true)
}

/// Ingress of the node's own sockets (a cgroup hook on the root cgroup): a
/// Service packet whose backend is a node address (a hostNetwork pod, the
/// API server behind `kubernetes.default`) is judged here, the one place
/// it is seen after translation.
#[cgroup_skb(ingress)]
pub fn to_host(ctx: SkBuffContext) -> i32 {
    // The same `__sk_buff`; only the helpers both program types have are
    // used through it.
    host(&TcContext::new(ctx.skb.skb))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this only satisfies the
    // no_std linker.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
