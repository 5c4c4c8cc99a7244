//! Header parsing, one layer per function, through bounds-checked pointers.
use aya_ebpf::programs::TcContext;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const VLAN_HLEN: usize = 4;

/// The network layer of a frame.
pub enum L3 {
    Ipv4,
    Ipv6,
    Other,
}

/// A pointer to a `T` at `offset` in the packet, or `Err` when the packet is
/// shorter: the only way the parsers touch packet memory.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

/// Reads a big-endian u16 at `offset`.
#[inline(always)]
fn be16_at(ctx: &TcContext, offset: usize) -> Result<u16, ()> {
    let p = ptr_at::<[u8; 2]>(ctx, offset)?;
    // SAFETY: ptr_at checked that two bytes at `offset` lie within the packet.
    let b = unsafe { *p };
    Ok(u16::from_be_bytes(b))
}

/// Ethernet (with at most one 802.1Q tag) to the network layer.
#[inline(always)]
pub fn l3(ctx: &TcContext) -> Result<L3, ()> {
    let mut ethertype = be16_at(ctx, ETH_HLEN - 2)?;
    if ethertype == ETH_P_8021Q {
        ethertype = be16_at(ctx, ETH_HLEN + VLAN_HLEN - 2)?;
    }
    Ok(match ethertype {
        ETH_P_IP => L3::Ipv4,
        ETH_P_IPV6 => L3::Ipv6,
        _ => L3::Other,
    })
}
