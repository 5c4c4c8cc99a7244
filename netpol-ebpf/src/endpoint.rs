//! Which pod this interface belongs to, and the agent's settings.
use aya_ebpf::programs::TcContext;
use netpol_common::{EndpointInfo, GlobalConfig, direction, endpoint_flags};

use crate::maps::{NETPOL_CONFIG, NETPOL_ENDPOINTS};

/// The endpoint behind the interface the packet is on. Identity comes from
/// the interface, never from the packet's own addresses.
#[inline(always)]
pub fn lookup(ctx: &TcContext) -> Option<EndpointInfo> {
    // SAFETY: the context pointer is the kernel's __sk_buff for this run;
    // reading a field of it is what the verifier allows for TC programs.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    NETPOL_ENDPOINTS.get_ptr(ifindex).map(|p| {
        // SAFETY: a successful lookup returns a pointer to a value the size
        // of EndpointInfo, valid for this run; it is copied out at once.
        unsafe { *p }
    })
}

/// Whether the endpoint is isolated in `dir`.
#[inline(always)]
pub const fn isolated(ep: &EndpointInfo, dir: u32) -> bool {
    let bit = if dir == direction::INGRESS {
        endpoint_flags::INGRESS_ISOLATED
    } else {
        endpoint_flags::EGRESS_ISOLATED
    };
    ep.flags & bit != 0
}

/// Whether the agent has marked the interface as a pod's but not compiled
/// its policy yet.
#[inline(always)]
pub const fn programmed(ep: &EndpointInfo) -> bool {
    ep.flags & endpoint_flags::NOT_PROGRAMMED == 0
}

/// The agent's settings; all-zero (the defaults) until it writes them.
#[inline(always)]
pub fn config() -> GlobalConfig {
    match NETPOL_CONFIG.get(0) {
        Some(c) => *c,
        None => GlobalConfig::default(),
    }
}

/// Whether the packet was sent by the node itself (at `to_pod`): locally
/// generated packets have no ingress interface, forwarded ones do, also
/// when masqueraded to a node address.
#[inline(always)]
pub fn from_node(ctx: &TcContext) -> bool {
    // SAFETY: as in `lookup`, a plain context field read.
    unsafe { (*ctx.skb.skb).ingress_ifindex == 0 }
}
