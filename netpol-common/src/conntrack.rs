//! Connection tracking: the [`CtKey`] → [`CtValue`] entries of
//! [`maps::CONNTRACK`], their TCP states and default idle timeouts.
use core::mem::offset_of;

#[cfg(doc)]
use crate::{GlobalConfig, direction, family, maps, reason};

/// Default connection timeouts, used when [`GlobalConfig`] holds 0.
pub mod ct_defaults {
    const S: u64 = 1_000_000_000;
    /// TCP before the handshake completes (half-open).
    pub const TCP_SYN_NS: u64 = 30 * S;
    /// TCP established, and SCTP.
    pub const TCP_ESTABLISHED_NS: u64 = 3_600 * S;
    /// TCP after a FIN or RST.
    pub const TCP_CLOSING_NS: u64 = 10 * S;
    /// UDP.
    pub const UDP_NS: u64 = 120 * S;
    /// ICMP echo and any other protocol.
    pub const OTHER_NS: u64 = 30 * S;
    /// Fragments of one datagram.
    pub const FRAGMENT_NS: u64 = 10 * S;
}

/// TCP states kept in [`CtValue::tcp_state`].
pub mod tcp_state {
    /// Not TCP.
    pub const NONE: u32 = 0;
    /// A SYN was seen, the handshake is not complete.
    pub const SYN_SENT: u32 = 1;
    /// Past the handshake (or picked up mid-flow).
    pub const ESTABLISHED: u32 = 2;
    /// A FIN or RST was seen.
    pub const CLOSING: u32 = 3;
}

/// Key of [`maps::CONNTRACK`]: one entry per endpoint and connection,
/// oriented from the endpoint (`local`) to its peer, so that a connection's
/// packets in both directions find the same entry at the same endpoint.
/// Ports are in host byte order; for ICMP echo both hold the echo id.
/// IPv4 addresses fill the first 4 bytes of the 16, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Endpoint id.
    pub endpoint: u32,
    /// IP protocol number.
    pub protocol: u8,
    /// [`family`] code.
    pub family: u8,
    /// Always 0.
    pub _pad: u16,
    /// The endpoint's port.
    pub local_port: u16,
    /// The peer's port.
    pub peer_port: u16,
    /// The endpoint's address.
    pub local_addr: [u8; 16],
    /// The peer's address.
    pub peer_addr: [u8; 16],
}

const _: () = {
    assert!(size_of::<CtKey>() == 44);
    assert!(align_of::<CtKey>() == 4);
    assert!(offset_of!(CtKey, endpoint) == 0);
    assert!(offset_of!(CtKey, protocol) == 4);
    assert!(offset_of!(CtKey, family) == 5);
    assert!(offset_of!(CtKey, _pad) == 6);
    assert!(offset_of!(CtKey, local_port) == 8);
    assert!(offset_of!(CtKey, peer_port) == 10);
    assert!(offset_of!(CtKey, local_addr) == 12);
    assert!(offset_of!(CtKey, peer_addr) == 28);
};

/// Value of [`maps::CONNTRACK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_ns` of the last packet.
    pub last_seen_ns: u64,
    /// [`direction`] of the packet that opened the entry: `EGRESS` when the
    /// endpoint initiated the connection.
    pub origin: u32,
    /// The [`reason`] that admitted the first packet.
    pub admitted_by: u32,
    /// The endpoint's policy generation for `origin` when the connection
    /// was last judged; a different current generation makes the next
    /// packet re-check the connection (revocation).
    pub generation: u32,
    /// [`tcp_state`].
    pub tcp_state: u32,
}

const _: () = {
    assert!(size_of::<CtValue>() == 24);
    assert!(align_of::<CtValue>() == 8);
    assert!(offset_of!(CtValue, last_seen_ns) == 0);
    assert!(offset_of!(CtValue, origin) == 8);
    assert!(offset_of!(CtValue, admitted_by) == 12);
    assert!(offset_of!(CtValue, generation) == 16);
    assert!(offset_of!(CtValue, tcp_state) == 20);
};
