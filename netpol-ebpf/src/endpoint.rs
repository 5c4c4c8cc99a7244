//! Which pod this interface belongs to.
use aya_ebpf::programs::TcContext;
use netpol_common::{EndpointInfo, direction, endpoint_flags, family};

use crate::{
    ctx,
    maps::{NETPOL_ENDPOINTS, NETPOL_EP_CACHE, NETPOL_EP_EPOCH},
    packet::Packet,
};

/// The endpoint behind the interface the packet is on. Identity comes from
/// the interface, never from the packet's own addresses.
///
/// Read from this CPU's copy while the agent has not written the table
/// since it was taken: a hash lookup is a tenth of a packet's cost, an
/// array slot a few instructions. (The table itself cannot be an array:
/// an update copies a value in place, and a packet could read half an
/// old entry and half a new one.)
#[inline(always)]
pub fn lookup(ctx: &TcContext) -> Option<EndpointInfo> {
    let ifindex = ctx::ifindex(ctx);
    let (Some(epoch), Some(slot)) = (NETPOL_EP_EPOCH.get(0), NETPOL_EP_CACHE.get_ptr_mut(ifindex))
    else {
        // Beyond the cached interfaces.
        return from_table(ifindex);
    };
    // Read before the table: a copy is only as new as the epoch it is
    // filed under. The map lookup below is a call the compiler cannot
    // move this load past.
    // SAFETY: a pointer from a successful array lookup, valid for this run.
    let epoch = unsafe { core::ptr::read_volatile(epoch) };
    // SAFETY: this CPU's slot, from a successful per-CPU array lookup,
    // valid for this run; only programs on this CPU touch it.
    unsafe {
        if (*slot).epoch == epoch && (*slot).info.id != 0 {
            return Some((*slot).info);
        }
    }
    let info = from_table(ifindex);
    if let Some(info) = info {
        // The epoch last (volatile writes keep their order), so that a run
        // reading the slot between the two writes, possible only where
        // programs are preemptible (PREEMPT_RT), finds an epoch that does
        // not match.
        // SAFETY: as above.
        unsafe {
            core::ptr::write_volatile(&raw mut (*slot).info, info);
            core::ptr::write_volatile(&raw mut (*slot).epoch, epoch);
        }
    }
    info
}

/// The entry in the table, by interface index.
#[inline(always)]
pub fn from_table(ifindex: u32) -> Option<EndpointInfo> {
    NETPOL_ENDPOINTS.get_ptr(ifindex).map(|p| {
        // SAFETY: a successful lookup returns a pointer to a value the size
        // of EndpointInfo, valid for this run; it is copied out at once.
        unsafe { *p }
    })
}

/// Whether `pkt`'s source is the endpoint's own address.
#[inline(always)]
pub fn sent_by(ep: &EndpointInfo, pkt: &Packet) -> bool {
    if pkt.family == family::IPV4 {
        ep.flags & endpoint_flags::HAS_IPV4 != 0
            && pkt.src[0] == ep.ipv4[0]
            && pkt.src[1] == ep.ipv4[1]
            && pkt.src[2] == ep.ipv4[2]
            && pkt.src[3] == ep.ipv4[3]
    } else {
        ep.flags & endpoint_flags::HAS_IPV6 != 0 && pkt.src == ep.ipv6
    }
}

/// Whether the packet was sent by the node itself (at `to_pod`): locally
/// generated packets have no ingress interface, forwarded ones do, also
/// when masqueraded to a node address.
#[inline(always)]
pub fn from_node(ctx: &TcContext) -> bool {
    ctx::ingress_ifindex(ctx) == 0
}

/// The endpoint's policy generation for `dir`.
#[inline(always)]
pub const fn generation(ep: &EndpointInfo, dir: u32) -> u32 {
    if dir == direction::INGRESS {
        ep.ingress_gen
    } else {
        ep.egress_gen
    }
}

/// Whether a packet the pod sends claims a source that is not the pod's:
/// identity comes from the interface, so a pod must not borrow another's
/// address. `::` and link-local IPv6 stay allowed (DAD, ND, MLD), and pods
/// annotated to route other addresses are exempt.
#[inline(always)]
pub fn spoofed(ep: &EndpointInfo, pkt: &Packet) -> bool {
    if ep.flags & endpoint_flags::ALLOW_ANY_SOURCE != 0 {
        return false;
    }
    if pkt.family == family::IPV4 {
        let own = ep.flags & endpoint_flags::HAS_IPV4 != 0
            && pkt.src[0] == ep.ipv4[0]
            && pkt.src[1] == ep.ipv4[1]
            && pkt.src[2] == ep.ipv4[2]
            && pkt.src[3] == ep.ipv4[3];
        return !own;
    }
    let unspecified = pkt.src == [0; 16];
    let link_local = pkt.src[0] == 0xfe && pkt.src[1] & 0xc0 == 0x80;
    let own = ep.flags & endpoint_flags::HAS_IPV6 != 0 && pkt.src == ep.ipv6;
    !(own || unspecified || link_local)
}
