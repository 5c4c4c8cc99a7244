//! Header parsing, one layer per function. Fixed offsets go through the
//! bounds-checked [`ptr_at`]; offsets that depend on the packet (VLAN tag,
//! IPv4 options, IPv6 extension headers) through [`load`], which the
//! kernel bounds-checks at run time (both in [`crate::ctx`]).
use aya_ebpf::programs::TcContext;
use netpol_common::{family, protocol};

use crate::{
    ctx::{self, load, ptr_at},
    packet::{FRAG_FIRST, FRAG_LATER, Inner, Packet, ParseError},
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const VLAN_HLEN: usize = 4;
const IPV6_HLEN: usize = 40;
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// Extension headers walked before giving up (hop-by-hop, routing,
/// destination options, fragment, AH, in any order).
pub const MAX_EXT_HDRS: usize = 8;
/// Protocol number given to a packet whose transport header is out of
/// reach (extension chain past [`MAX_EXT_HDRS`]): reserved by IANA, never
/// named by a rule, so only rules without ports match it.
pub const PROTO_OPAQUE: u8 = 255;

/// The outcome of parsing a frame; the packet's fields are in the
/// [`Packet`] passed to [`packet`] (its `family` is set for `Bad` too).
#[derive(Clone, Copy)]
pub enum Parsed {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NonIp,
    /// An IP packet whose transport header was read (or, for a later
    /// fragment, does not exist).
    Ip,
    /// An IP packet that could not be parsed.
    Bad(ParseError),
}

impl Parsed {
    /// One byte for [`crate::pipeline::netpol_steps`]'s arguments.
    #[inline(always)]
    pub const fn code(self) -> u8 {
        match self {
            Self::NonIp => 0,
            Self::Ip => 1,
            Self::Bad(ParseError::Truncated) => 2,
            Self::Bad(ParseError::Malformed) => 3,
            Self::Bad(ParseError::FragmentShort) => 4,
        }
    }

    /// The outcome [`Parsed::code`] gave `c` of an IP packet (the steps
    /// never see another); any other code is a malformed packet (fails
    /// closed where policy applies).
    #[inline(always)]
    pub const fn from_code(c: u8) -> Self {
        match c {
            1 => Self::Ip,
            2 => Self::Bad(ParseError::Truncated),
            4 => Self::Bad(ParseError::FragmentShort),
            _ => Self::Bad(ParseError::Malformed),
        }
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Ethernet, one optional 802.1Q tag, then IPv4 or IPv6, into `p`.
///
/// A BPF-to-BPF call rather than inlined: its scratch space (header
/// copies, the extension-header walk) is freed before the policy stages
/// run, which keeps the combined stack under the verifier's 512 bytes.
#[inline(never)]
pub fn packet(ctx: &TcContext, p: &mut Packet) -> Parsed {
    if let Some(r) = common(ctx, p) {
        return r;
    }
    match ethernet(ctx) {
        Ok((ethertype, l3)) => network(ctx, ethertype, l3, p),
        Err(_) => Parsed::NonIp,
    }
}

/// The common case read in place, without a helper call per header:
/// untagged Ethernet, IPv4 without options or fragmentation or IPv6
/// without extension headers, then TCP, UDP or SCTP, all in the linear
/// packet data (as the stack builds them). `None` for anything else,
/// which the general parser takes from the start; `p` is written only
/// once the packet is known to be such.
#[inline(always)]
fn common(ctx: &TcContext, p: &mut Packet) -> Option<Parsed> {
    let eth = ptr_at::<[u8; 2]>(ctx, ETH_HLEN - 2).ok()?;
    // SAFETY: ptr_at checked that the bytes lie in the packet.
    let (fam, l4) = match be16(unsafe { *eth }) {
        ETH_P_IP => (family::IPV4, ETH_HLEN + 20),
        ETH_P_IPV6 => (family::IPV6, ETH_HLEN + IPV6_HLEN),
        _ => return None,
    };
    let (protocol, src, dst) = if fam == family::IPV4 {
        let h = ptr_at::<[u8; 20]>(ctx, ETH_HLEN).ok()?;
        // SAFETY: as above, for the 20-byte IPv4 header.
        let h = unsafe { core::ptr::read_unaligned(h) };
        // Version 4, no options; neither more fragments nor an offset.
        if h[0] != 0x45 || h[6] & 0x3f != 0 || h[7] != 0 {
            return None;
        }
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src[..4].copy_from_slice(&h[12..16]);
        dst[..4].copy_from_slice(&h[16..20]);
        (h[9], src, dst)
    } else {
        let h = ptr_at::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN).ok()?;
        // SAFETY: as above, for the fixed IPv6 header.
        let h = unsafe { core::ptr::read_unaligned(h) };
        if h[0] >> 4 != 6 {
            return None;
        }
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&h[8..24]);
        dst.copy_from_slice(&h[24..40]);
        (h[6], src, dst)
    };
    let (ports, flags) = match protocol {
        protocol::TCP => {
            let t = ptr_at::<[u8; 14]>(ctx, l4).ok()?;
            // SAFETY: as above, for the TCP ports and flags.
            let t = unsafe { core::ptr::read_unaligned(t) };
            ([t[0], t[1], t[2], t[3]], t[13])
        }
        protocol::UDP | protocol::SCTP => {
            let u = ptr_at::<[u8; 4]>(ctx, l4).ok()?;
            // SAFETY: as above, for the ports.
            (unsafe { core::ptr::read_unaligned(u) }, 0)
        }
        _ => return None,
    };
    p.family = fam;
    p.protocol = protocol;
    p.src = src;
    p.dst = dst;
    p.sport = be16([ports[0], ports[1]]);
    p.dport = be16([ports[2], ports[3]]);
    p.tcp_flags = flags;
    p.event = p.event_word(ETH_HLEN);
    Some(Parsed::Ip)
}

/// The same for a packet without a link-layer header (a device of type
/// `none`, e.g. WireGuard or IPIP, and sockets' cgroup hooks), whose
/// network header starts the data; `skb->protocol` names it.
#[inline(never)]
pub fn packet_l3(ctx: &TcContext, p: &mut Packet) -> Parsed {
    network(ctx, ctx::protocol(ctx), 0, p)
}

#[inline(always)]
fn network(ctx: &TcContext, ethertype: u16, l3: usize, p: &mut Packet) -> Parsed {
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
    p.event = p.event_word(l3);
    match r {
        Ok(()) => Parsed::Ip,
        // A first fragment that cannot hold the ports is the tiny-fragment
        // attack (RFC 1858), not an ordinary truncation.
        Err(ParseError::Truncated) if p.frag == FRAG_FIRST => {
            Parsed::Bad(ParseError::FragmentShort)
        }
        Err(e) => Parsed::Bad(e),
    }
}

/// The ethertype and the offset of the network header.
#[inline(always)]
fn ethernet(ctx: &TcContext) -> Result<(u16, usize), ParseError> {
    let p = ptr_at::<[u8; 2]>(ctx, ETH_HLEN - 2)?;
    // SAFETY: ptr_at checked that the two ethertype bytes lie in the packet.
    let ethertype = be16(unsafe { *p });
    if ethertype != ETH_P_8021Q {
        return Ok((ethertype, ETH_HLEN));
    }
    let p = ptr_at::<[u8; 2]>(ctx, ETH_HLEN + VLAN_HLEN - 2)?;
    // SAFETY: as above, for the ethertype after the 802.1Q tag.
    Ok((be16(unsafe { *p }), ETH_HLEN + VLAN_HLEN))
}

#[inline(always)]
fn ipv4(ctx: &TcContext, l3: usize, p: &mut Packet) -> Result<(), ParseError> {
    let hdr: [u8; 20] = load(ctx, l3)?;
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    if hdr[0] >> 4 != 4 || ihl < 20 {
        return Err(ParseError::Malformed);
    }
    p.protocol = hdr[9];
    p.src = [
        hdr[12], hdr[13], hdr[14], hdr[15], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    p.dst = [
        hdr[16], hdr[17], hdr[18], hdr[19], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let frag = be16([hdr[6], hdr[7]]);
    if frag & (IP_MF | IP_OFFSET) != 0 {
        let offset = u32::from(frag & IP_OFFSET) * 8;
        let total = u32::from(be16([hdr[2], hdr[3]]));
        p.frag_id = u32::from(be16([hdr[4], hdr[5]]));
        p.frag_offset = offset;
        p.frag_end = offset + total.saturating_sub(ihl as u32);
        if offset != 0 {
            p.frag = FRAG_LATER;
            return Ok(());
        }
        p.frag = FRAG_FIRST;
    }
    transport(ctx, l3 + ihl, p)
}

/// IPv6 extension headers this walk steps over.
#[inline(always)]
const fn is_extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 51 | 60)
}

#[inline(always)]
fn ipv6(ctx: &TcContext, l3: usize, p: &mut Packet) -> Result<(), ParseError> {
    let hdr: [u8; 8] = load(ctx, l3)?;
    if hdr[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let payload = u32::from(be16([hdr[4], hdr[5]]));
    p.src = load(ctx, l3 + 8)?;
    p.dst = load(ctx, l3 + 24)?;
    let mut next = hdr[6];
    let mut off = l3 + IPV6_HLEN;
    for _ in 0..MAX_EXT_HDRS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet
            // units, not counting the first.
            0 | 43 | 60 => {
                let h: [u8; 2] = load(ctx, off)?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            // AH: length in 4-octet units, minus 2.
            51 => {
                let h: [u8; 2] = load(ctx, off)?;
                next = h[0];
                off += (usize::from(h[1]) + 2) * 4;
            }
            44 => {
                let f: [u8; 8] = load(ctx, off)?;
                next = f[0];
                off += 8;
                let fo = be16([f[2], f[3]]);
                let offset = u32::from(fo & 0xfff8);
                if offset != 0 || fo & 1 != 0 {
                    p.frag_id = u32::from_be_bytes([f[4], f[5], f[6], f[7]]);
                    p.frag_offset = offset;
                    let before = (off - l3 - IPV6_HLEN) as u32;
                    p.frag_end = offset + payload.saturating_sub(before);
                    p.frag = if offset != 0 { FRAG_LATER } else { FRAG_FIRST };
                }
            }
            _ => break,
        }
    }
    if is_extension(next) {
        // Past the bound: the transport header is out of reach, so only
        // rules without ports may match.
        p.protocol = PROTO_OPAQUE;
        return Ok(());
    }
    p.protocol = next;
    if p.frag == FRAG_LATER {
        return Ok(());
    }
    transport(ctx, off, p)
}

/// Ports and flags of TCP, ports of UDP and SCTP; type, echo id and the
/// embedded flow of ICMP and ICMPv6. Other protocols carry no ports (0).
#[inline(always)]
fn transport(ctx: &TcContext, l4: usize, p: &mut Packet) -> Result<(), ParseError> {
    match p.protocol {
        protocol::TCP => {
            let h: [u8; 14] = load(ctx, l4)?;
            p.sport = be16([h[0], h[1]]);
            p.dport = be16([h[2], h[3]]);
            p.tcp_flags = h[13];
        }
        protocol::UDP | protocol::SCTP => {
            let h: [u8; 4] = load(ctx, l4)?;
            p.sport = be16([h[0], h[1]]);
            p.dport = be16([h[2], h[3]]);
        }
        protocol::ICMP => {
            let h: [u8; 8] = load(ctx, l4)?;
            p.icmp_type = h[0];
            match h[0] {
                // Echo reply, echo request.
                0 | 8 => {
                    p.sport = be16([h[4], h[5]]);
                    p.dport = p.sport;
                }
                // Unreachable, time exceeded, parameter problem.
                3 | 11 | 12 => inner_v4(ctx, l4 + 8, &mut p.inner),
                _ => {}
            }
        }
        protocol::ICMPV6 => {
            let h: [u8; 8] = load(ctx, l4)?;
            p.icmp_type = h[0];
            match h[0] {
                128 | 129 => {
                    p.sport = be16([h[4], h[5]]);
                    p.dport = p.sport;
                }
                // Unreachable, packet too big, time exceeded, parameter
                // problem.
                1..=4 => inner_v6(ctx, l4 + 8, &mut p.inner),
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}

/// Ports (or echo id) of an embedded header at `l4`.
#[inline(always)]
fn inner_ports(ctx: &TcContext, l4: usize, inner: &mut Inner) -> Result<(), ParseError> {
    match inner.protocol {
        protocol::TCP | protocol::UDP | protocol::SCTP => {
            let h: [u8; 4] = load(ctx, l4)?;
            inner.sport = be16([h[0], h[1]]);
            inner.dport = be16([h[2], h[3]]);
        }
        protocol::ICMP | protocol::ICMPV6 => {
            let h: [u8; 8] = load(ctx, l4)?;
            inner.sport = be16([h[4], h[5]]);
            inner.dport = inner.sport;
        }
        _ => {}
    }
    Ok(())
}

/// The IPv4 header and ports an ICMP error carries; left invalid when
/// they cannot be read, so the error is judged as plain ICMP.
#[inline(always)]
fn inner_v4(ctx: &TcContext, l3: usize, inner: &mut Inner) {
    let Ok(hdr) = load::<[u8; 20]>(ctx, l3) else {
        return;
    };
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    if hdr[0] >> 4 != 4 || ihl < 20 {
        return;
    }
    inner.protocol = hdr[9];
    inner.src = [
        hdr[12], hdr[13], hdr[14], hdr[15], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    inner.dst = [
        hdr[16], hdr[17], hdr[18], hdr[19], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    if inner_ports(ctx, l3 + ihl, inner).is_ok() {
        inner.valid = 1;
    }
}

/// The same for ICMPv6; an embedded header with extension headers is not
/// matched (it stays invalid).
#[inline(always)]
fn inner_v6(ctx: &TcContext, l3: usize, inner: &mut Inner) {
    let Ok(hdr) = load::<[u8; 8]>(ctx, l3) else {
        return;
    };
    if hdr[0] >> 4 != 6 || is_extension(hdr[6]) {
        return;
    }
    inner.protocol = hdr[6];
    let (Ok(src), Ok(dst)) = (load(ctx, l3 + 8), load(ctx, l3 + 24)) else {
        return;
    };
    inner.src = src;
    inner.dst = dst;
    if inner_ports(ctx, l3 + IPV6_HLEN, inner).is_ok() {
        inner.valid = 1;
    }
}
