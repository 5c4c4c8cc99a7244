//! The programs' reads of the TC context: packet bytes at fixed offsets
//! through the bounds-checked [`ptr_at`], at offsets that depend on the
//! packet (VLAN tag, IPv4 options, IPv6 extension headers) through
//! [`load`], which the kernel bounds-checks at run time, and the
//! `__sk_buff` fields aya has no accessor for. Every pointer into the
//! packet data is made here, and every read of a field through the raw
//! context pointer.
use aya_ebpf::programs::TcContext;

use crate::packet::ParseError;

/// A pointer to a `T` at `offset` in the linear packet data, or `Err` when
/// the packet is shorter: the only way the parsers touch packet memory
/// directly.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, ParseError> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(ParseError::Truncated);
    }
    Ok((start + offset) as *const T)
}

/// A copy of the `T` at `offset`, wherever the packet's bytes lie, or
/// `Err` when the packet is shorter.
#[inline(always)]
pub fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, ParseError> {
    ctx.load::<T>(offset).map_err(|_| ParseError::Truncated)
}

/// The index of the interface the program runs on.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is the kernel's __sk_buff for this run;
    // reading a field of it is what the verifier allows for TC programs.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The interface the packet entered the node by (0: sent by the node).
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: as in `ifindex`, a plain context field read.
    unsafe { (*ctx.skb.skb).ingress_ifindex }
}

/// The packet's `skb->mark`.
#[inline(always)]
pub fn mark(ctx: &TcContext) -> u32 {
    // SAFETY: a plain read of the context's mark field, which the verifier
    // allows for TC programs.
    unsafe { (*ctx.skb.skb).mark }
}

/// The ethertype `skb->protocol` names (host byte order): what a packet
/// without a link-layer header carries.
#[inline(always)]
pub fn protocol(ctx: &TcContext) -> u16 {
    // SAFETY: a plain read of the context's protocol field (network byte
    // order in the low 16 bits).
    let proto = unsafe { (*ctx.skb.skb).protocol };
    u16::from_be(proto as u16)
}
