//! The policy tries: (endpoint and direction, peer prefix) → rule set, and
//! (rule set, protocol, port prefix) → allowed. Each key documents what its
//! LPM prefix length covers.
use core::mem::offset_of;

/// The 32-bit selector that starts every policy key: an endpoint and a
/// direction. Always matched in full (every prefix length ≥ 32), so its byte
/// order does not matter to the trie; it is stored native-endian.
#[inline(always)]
#[must_use]
pub const fn policy_selector(endpoint_id: u32, direction: u32) -> u32 {
    (endpoint_id << 1) | (direction & 1)
}

/// Set in the endpoint id of a staged view's entries: the policy keys of
/// endpoint `id`'s staged view use `policy_selector(staged_endpoint(id),
/// dir)`. Compiled endpoint ids stay below it.
pub const STAGED_ENDPOINT_BIT: u32 = 1 << 30;

/// The endpoint id that keys `endpoint`'s staged-view entries.
#[inline(always)]
#[must_use]
pub const fn staged_endpoint(endpoint: u32) -> u32 {
    endpoint | STAGED_ENDPOINT_BIT
}

/// Bits of the selector at the start of every policy and port key.
pub const SELECTOR_BITS: u32 = 32;

/// Data of an IPv4 policy LPM key. The trie's prefix length covers the
/// selector (always all 32 bits) then the first bits of `addr`, so
/// `prefix_len = 32 + peer prefix length` (32..=64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKeyV4 {
    /// [`policy_selector`] of the local endpoint and direction.
    pub selector: u32,
    /// Peer address, network byte order.
    pub addr: [u8; 4],
}

const _: () = {
    assert!(size_of::<PolicyKeyV4>() == 8);
    assert!(align_of::<PolicyKeyV4>() == 4);
    assert!(offset_of!(PolicyKeyV4, selector) == 0);
    assert!(offset_of!(PolicyKeyV4, addr) == 4);
};

/// Data of an IPv6 policy LPM key: selector then peer address;
/// `prefix_len = 32 + peer prefix length` (32..=160).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKeyV6 {
    /// [`policy_selector`] of the local endpoint and direction.
    pub selector: u32,
    /// Peer address, network byte order.
    pub addr: [u8; 16],
}

const _: () = {
    assert!(size_of::<PolicyKeyV6>() == 20);
    assert!(align_of::<PolicyKeyV6>() == 4);
    assert!(offset_of!(PolicyKeyV6, selector) == 0);
    assert!(offset_of!(PolicyKeyV6, addr) == 4);
};

/// Value of both policy tries: the rule set (protocols and ports) that the
/// matched peer prefix may use.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// Rule-set id, the selector of [`PortKey`]; never 0.
    pub ruleset: u32,
}

const _: () = {
    assert!(size_of::<PolicyValue>() == 4);
    assert!(align_of::<PolicyValue>() == 4);
    assert!(offset_of!(PolicyValue, ruleset) == 0);
};

/// Data of a port LPM key. The prefix covers `ruleset` (32 bits, always),
/// then optionally `protocol` and `_pad` (16 bits: the rule names a
/// protocol), then the first bits of `port`:
/// - `prefix_len = 32`: every protocol and port (a rule without ports);
/// - `prefix_len = 48`: every port of `protocol`;
/// - `prefix_len = 48 + k`: ports sharing the first `k` bits with `port`.
///
/// Lookups use the packet's protocol and destination port (0 for protocols
/// without ports), with `_pad` zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    /// Rule-set id from [`PolicyValue`]; native-endian, always matched in full.
    pub ruleset: u32,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub protocol: u8,
    /// Always 0; matched with the protocol so that the port starts on a
    /// byte boundary.
    pub _pad: u8,
    /// Destination port, network byte order.
    pub port: [u8; 2],
}

/// Bits of [`PortKey`] before `port`.
pub const PORT_KEY_PROTOCOL_BITS: u32 = 48;

const _: () = {
    assert!(size_of::<PortKey>() == 8);
    assert!(align_of::<PortKey>() == 4);
    assert!(offset_of!(PortKey, ruleset) == 0);
    assert!(offset_of!(PortKey, protocol) == 4);
    assert!(offset_of!(PortKey, _pad) == 5);
    assert!(offset_of!(PortKey, port) == 6);
    // The port starts where the prefix's protocol part ends.
    assert!(offset_of!(PortKey, port) * 8 == PORT_KEY_PROTOCOL_BITS as usize);
};

/// Value of the port trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortValue {
    /// Non-zero: allowed. Kept as a word so that later versions can carry a
    /// rule reference without changing the value size.
    pub allow: u32,
}

const _: () = {
    assert!(size_of::<PortValue>() == 4);
    assert!(align_of::<PortValue>() == 4);
    assert!(offset_of!(PortValue, allow) == 0);
};

#[cfg(test)]
mod tests {
    use super::policy_selector;
    use crate::direction;

    #[test]
    fn selector_keeps_direction_in_low_bit() {
        assert_eq!(policy_selector(5, direction::INGRESS), 11);
        assert_eq!(policy_selector(5, direction::EGRESS), 10);
    }
}
