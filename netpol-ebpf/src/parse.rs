//! Header parsing, one layer per function. Fixed offsets go through the
//! bounds-checked [`ptr_at`]; offsets that depend on the packet (VLAN tag,
//! IPv4 options) through `ctx.load`, which the kernel bounds-checks.
use aya_ebpf::programs::TcContext;
use netpol_common::{family, protocol};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const VLAN_HLEN: usize = 4;
const IPV6_HLEN: usize = 40;
const IP_OFFSET: u16 = 0x1fff;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// Why a packet could not be parsed.
#[derive(Clone, Copy)]
pub enum ParseError {
    /// Shorter than its headers claim.
    Truncated,
    /// Malformed header (bad IHL, version).
    Malformed,
    /// IPv6 extension headers (walked by a later stage, dropped until then
    /// for isolated endpoints).
    ExtensionHeader,
    /// A non-first fragment: no transport header to judge.
    Fragment,
}

/// An IP packet's addresses and transport identity. IPv4 addresses fill
/// the first 4 bytes of the 16. Always fully initialised before parsing:
/// the verifier rejects reads of stack slots no path wrote.
#[derive(Default)]
pub struct Packet {
    pub family: u32,
    pub protocol: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order; ICMP echo: the id; other ICMP: 0.
    pub sport: u16,
    pub dport: u16,
    /// ICMP/ICMPv6 type, 0 otherwise.
    pub icmp_type: u8,
}

/// The outcome of parsing a frame; the packet's fields are in the
/// [`Packet`] passed to [`packet`] (its `family` is set for `Bad` too).
#[derive(Clone, Copy)]
pub enum Parsed {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NonIp,
    /// An IP packet whose transport header was read.
    Ip,
    /// An IP packet that could not be parsed.
    Bad(ParseError),
}

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

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, ParseError> {
    ctx.load::<T>(offset).map_err(|_| ParseError::Truncated)
}

/// Ethernet, one optional 802.1Q tag, then IPv4 or IPv6, into `p`.
#[inline(always)]
pub fn packet(ctx: &TcContext, p: &mut Packet) -> Parsed {
    let (ethertype, l3) = match ethernet(ctx) {
        Ok(v) => v,
        Err(_) => return Parsed::NonIp,
    };
    let r = match ethertype {
        ETH_P_IP => {
            p.family = family::IPV4;
            ipv4(ctx, l3, p)
        }
        ETH_P_IPV6 => {
            p.family = family::IPV6;
            ipv6(ctx, l3, p)
        }
        _ => return Parsed::NonIp,
    };
    match r {
        Ok(()) => Parsed::Ip,
        Err(e) => Parsed::Bad(e),
    }
}

/// The ethertype and the offset of the network header.
#[inline(always)]
fn ethernet(ctx: &TcContext) -> Result<(u16, usize), ParseError> {
    let p = ptr_at::<[u8; 2]>(ctx, ETH_HLEN - 2)?;
    // SAFETY: ptr_at checked that the two ethertype bytes lie in the packet.
    let ethertype = u16::from_be_bytes(unsafe { *p });
    if ethertype != ETH_P_8021Q {
        return Ok((ethertype, ETH_HLEN));
    }
    let p = ptr_at::<[u8; 2]>(ctx, ETH_HLEN + VLAN_HLEN - 2)?;
    // SAFETY: as above, for the ethertype after the 802.1Q tag.
    Ok((u16::from_be_bytes(unsafe { *p }), ETH_HLEN + VLAN_HLEN))
}

#[inline(always)]
fn ipv4(ctx: &TcContext, l3: usize, p: &mut Packet) -> Result<(), ParseError> {
    let vihl: u8 = load(ctx, l3)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(ParseError::Malformed);
    }
    let frag: [u8; 2] = load(ctx, l3 + 6)?;
    let frag = u16::from_be_bytes(frag);
    if frag & IP_OFFSET != 0 {
        return Err(ParseError::Fragment);
    }
    p.protocol = load(ctx, l3 + 9)?;
    let src: [u8; 4] = load(ctx, l3 + 12)?;
    let dst: [u8; 4] = load(ctx, l3 + 16)?;
    p.src = [
        src[0], src[1], src[2], src[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    p.dst = [
        dst[0], dst[1], dst[2], dst[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    transport(ctx, l3 + ihl, p)
}

/// IPv6 extension headers (and ESP), whose presence this stage cannot judge.
#[inline(always)]
const fn is_extension(next: u8) -> bool {
    matches!(
        next,
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254
    )
}

#[inline(always)]
fn ipv6(ctx: &TcContext, l3: usize, p: &mut Packet) -> Result<(), ParseError> {
    let v: u8 = load(ctx, l3)?;
    if v >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let next: u8 = load(ctx, l3 + 6)?;
    if is_extension(next) {
        return Err(ParseError::ExtensionHeader);
    }
    p.protocol = next;
    p.src = load(ctx, l3 + 8)?;
    p.dst = load(ctx, l3 + 24)?;
    transport(ctx, l3 + IPV6_HLEN, p)
}

/// Ports of TCP, UDP and SCTP (all start with source and destination
/// port); type and echo id of ICMP and ICMPv6. Other protocols carry no
/// ports (0).
#[inline(always)]
fn transport(ctx: &TcContext, l4: usize, p: &mut Packet) -> Result<(), ParseError> {
    match p.protocol {
        protocol::TCP | protocol::UDP | protocol::SCTP => {
            let ports: [u8; 4] = load(ctx, l4)?;
            p.sport = u16::from_be_bytes([ports[0], ports[1]]);
            p.dport = u16::from_be_bytes([ports[2], ports[3]]);
        }
        protocol::ICMP | protocol::ICMPV6 => {
            let hdr: [u8; 8] = load(ctx, l4)?;
            p.icmp_type = hdr[0];
            let echo = matches!(
                (p.protocol, hdr[0]),
                (protocol::ICMP, ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY)
                    | (protocol::ICMPV6, ICMPV6_ECHO_REQUEST | ICMPV6_ECHO_REPLY)
            );
            if echo {
                let id = u16::from_be_bytes([hdr[4], hdr[5]]);
                p.sport = id;
                p.dport = id;
            }
        }
        _ => {}
    }
    Ok(())
}
