//! The packet as the programs know it once parsed: addresses, transport
//! identity, fragment position, and the flow an ICMP error is about.
//! Parsing fills it ([`crate::parse`]); every later step reads it.
//! Also why a packet could not be parsed ([`ParseError`]), which reading
//! past its end ([`crate::ctx`]) already tells.
//!
//! The packet lives in a per-CPU map slot ([`scratch`]), not on the stack:
//! the steps after parsing run as one global BPF function
//! (`pipeline::netpol_steps`), which kernels before 5.12 give only the
//! context and scalars, so it reads the packet from there. It also keeps
//! what the verifier knows of the packet out of the programs' states: a
//! field the parser set to a constant on one path (a family, a protocol)
//! would otherwise keep that path's states apart from every other's to the
//! end of the program, which on 6.1 (coarser precision tracking) cost
//! `leave_node` two thirds of its 673,149 verified instructions.
use netpol_common::PacketScratch;

use crate::maps::NETPOL_PACKET;

/// The first fragment (offset 0, more to come): carries the ports.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment: no transport header.
pub const FRAG_LATER: u8 = 2;

/// Why a packet could not be parsed.
#[derive(Clone, Copy)]
pub enum ParseError {
    /// Shorter than its headers claim.
    Truncated,
    /// Malformed header (bad IHL, version).
    Malformed,
    /// A first fragment too short to hold the transport ports and flags.
    FragmentShort,
}

/// The flow an ICMP error is about (its embedded header), as sent.
#[repr(C)]
#[derive(Default)]
pub struct Inner {
    /// Non-zero when the embedded header was read.
    pub valid: u8,
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// An IP packet's addresses and transport identity. IPv4 addresses fill
/// the first 4 bytes of the 16. Always fully initialised before parsing:
/// the verifier rejects reads of stack slots no path wrote.
#[repr(C)]
#[derive(Default)]
pub struct Packet {
    pub family: u32,
    pub protocol: u8,
    /// TCP flags byte, 0 otherwise.
    pub tcp_flags: u8,
    /// ICMP/ICMPv6 type, 0 otherwise.
    pub icmp_type: u8,
    /// [`FRAG_NONE`], [`FRAG_FIRST`] or [`FRAG_LATER`].
    pub frag: u8,
    /// Host byte order; ICMP echo: the id; other ICMP: 0.
    pub sport: u16,
    pub dport: u16,
    /// IP identification of a fragment.
    pub frag_id: u32,
    /// Where the fragment starts and ends in the datagram's payload.
    pub frag_offset: u32,
    pub frag_end: u32,
    /// What a deny event needs of the packet besides its addresses, packed
    /// once parsed (see `events::deny`): protocol, ICMP type, network
    /// header offset, source and destination port.
    pub event: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// For ICMP errors: the flow they are about.
    pub inner: Inner,
}

impl Packet {
    /// [`Packet::event`]: protocol, ICMP type (a byte each from the
    /// lowest), the network header's offset, source port, destination port
    /// (16 bits each). Computed once per packet, where parsing ends, so
    /// that a drop path only loads it.
    #[inline(always)]
    pub fn event_word(&self, l3: usize) -> u64 {
        u64::from(self.protocol)
            | u64::from(self.icmp_type) << 8
            | (l3 as u64 & 0xffff) << 16
            | u64::from(self.sport) << 32
            | u64::from(self.dport) << 48
    }
}

const _: () = {
    assert!(size_of::<Packet>() <= size_of::<PacketScratch>());
    assert!(align_of::<Packet>() <= align_of::<PacketScratch>());
};

/// This CPU's packet in `slot` (`netpol_common::scratch`), reset, for the
/// parser; `None` never happens (an array's entries always exist) but the
/// verifier wants the path.
#[inline(always)]
pub fn fresh(slot: u32) -> Option<&'static mut Packet> {
    let p = NETPOL_PACKET.get_ptr_mut(slot)?.cast::<Packet>();
    // SAFETY: the slot is this CPU's, for this program's run (a program
    // runs to the end on its CPU; `to_host`, which a TC program may
    // interrupt, has its own slot), and holds a `Packet` (size and
    // alignment asserted above). The caller only reads it once parsed.
    unsafe {
        p.write(Packet::default());
        Some(&mut *p)
    }
}

/// The packet the parser left in `slot`, for the steps.
#[inline(always)]
pub fn parsed(slot: u32) -> Option<&'static Packet> {
    let p = NETPOL_PACKET.get_ptr(slot)?.cast::<Packet>();
    // SAFETY: as in `fresh`; the caller wrote it in this run and holds only
    // shared references to it while the steps read it.
    Some(unsafe { &*p })
}
