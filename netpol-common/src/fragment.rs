//! IP fragments: the first fragment's verdict, which later fragments of the
//! same datagram follow, in [`maps::FRAGMENTS`].
use core::mem::offset_of;

#[cfg(doc)]
use crate::{family, maps, policy_selector};

/// Key of [`maps::FRAGMENTS`]: one datagram's fragments at one endpoint
/// and direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    /// [`policy_selector`] of the endpoint and direction.
    pub selector: u32,
    /// [`family`] code.
    pub family: u8,
    /// IP protocol of the datagram.
    pub protocol: u8,
    /// Always 0.
    pub _pad: u16,
    /// IP identification (IPv4: 16 bits; IPv6 fragment header: 32 bits).
    pub id: u32,
    /// Source address (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
}

const _: () = {
    assert!(size_of::<FragKey>() == 44);
    assert!(align_of::<FragKey>() == 4);
    assert!(offset_of!(FragKey, selector) == 0);
    assert!(offset_of!(FragKey, family) == 4);
    assert!(offset_of!(FragKey, protocol) == 5);
    assert!(offset_of!(FragKey, _pad) == 6);
    assert!(offset_of!(FragKey, id) == 8);
    assert!(offset_of!(FragKey, src) == 12);
    assert!(offset_of!(FragKey, dst) == 28);
};

/// Value of [`maps::FRAGMENTS`]: the first fragment's verdict, which the
/// later ones follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    /// Non-zero when the first fragment was allowed.
    pub allowed: u32,
    /// End (bytes into the datagram's payload) of the furthest fragment
    /// seen; a fragment starting before it overlaps and is dropped.
    pub next_offset: u32,
    /// `bpf_ktime_get_ns` of the first fragment.
    pub first_seen_ns: u64,
}

const _: () = {
    assert!(size_of::<FragValue>() == 16);
    assert!(align_of::<FragValue>() == 8);
    assert!(offset_of!(FragValue, allowed) == 0);
    assert!(offset_of!(FragValue, next_offset) == 4);
    assert!(offset_of!(FragValue, first_seen_ns) == 8);
};
