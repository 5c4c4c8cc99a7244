//! The pods behind the host-side interfaces: [`EndpointInfo`] by interface
//! index, each CPU's cached copies of it, and the epoch that says whether a
//! copy is current.
use core::mem::offset_of;

#[cfg(doc)]
use crate::{direction, maps, mark};

/// Flags of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    /// The pod is isolated for ingress.
    pub const INGRESS_ISOLATED: u32 = 1 << 0;
    /// The pod is isolated for egress.
    pub const EGRESS_ISOLATED: u32 = 1 << 1;
    /// The pod has an IPv4 address.
    pub const HAS_IPV4: u32 = 1 << 2;
    /// The pod has an IPv6 address.
    pub const HAS_IPV6: u32 = 1 << 3;
    /// The agent knows the interface is a pod's but has not compiled its
    /// policy yet: the datapath applies the new-pods mode.
    pub const NOT_PROGRAMMED: u32 = 1 << 4;
    /// The pod may send from addresses that are not its own (it routes
    /// other addresses: the documented `netpol.io/allow-any-source`
    /// annotation); `from_pod` skips its anti-spoofing check.
    pub const ALLOW_ANY_SOURCE: u32 = 1 << 5;
    /// The pod's traffic to itself through one of its Services (hairpin)
    /// is judged, egress and ingress, with its own address as the peer (a
    /// `ClusterNetworkPolicy` applies to it); without the flag it passes.
    pub const HAIRPIN_JUDGED: u32 = 1 << 6;
    /// The staged view (policies annotated as staged, not enforced) judges
    /// the pod's ingress differently: new connections are also judged
    /// against its entries ([`crate::staged_endpoint`]) and a difference is
    /// reported, never acted on.
    pub const STAGED_INGRESS: u32 = 1 << 7;
    /// The same for egress.
    pub const STAGED_EGRESS: u32 = 1 << 8;
    /// In the staged view the pod is isolated for ingress (meaningful with
    /// `STAGED_INGRESS`).
    pub const STAGED_INGRESS_ISOLATED: u32 = 1 << 9;
    /// The same for egress.
    pub const STAGED_EGRESS_ISOLATED: u32 = 1 << 10;
    /// The staged view judges the pod's traffic to itself through a
    /// Service the other way from [`HAIRPIN_JUDGED`] (a
    /// `ClusterNetworkPolicy` applies to the pod in one view only). The
    /// programs act on the enforced view's hairpin verdict and report a
    /// new hairpin the staged view judges otherwise; `explain --staged`
    /// reads it too.
    pub const STAGED_HAIRPIN: u32 = 1 << 11;

    /// `INGRESS_ISOLATED` or `EGRESS_ISOLATED`, for a direction.
    #[inline(always)]
    #[must_use]
    pub const fn isolated(dir: u32) -> u32 {
        if dir == crate::direction::INGRESS {
            INGRESS_ISOLATED
        } else {
            EGRESS_ISOLATED
        }
    }

    /// `STAGED_INGRESS` or `STAGED_EGRESS`, and the matching isolation
    /// flag, for a direction.
    #[inline(always)]
    #[must_use]
    pub const fn staged(dir: u32) -> (u32, u32) {
        if dir == crate::direction::INGRESS {
            (STAGED_INGRESS, STAGED_INGRESS_ISOLATED)
        } else {
            (STAGED_EGRESS, STAGED_EGRESS_ISOLATED)
        }
    }
}

/// Value of [`maps::ENDPOINTS`], keyed by the host-side interface index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Endpoint id, stable while the pod lives; never 0.
    pub id: u32,
    /// [`endpoint_flags`].
    pub flags: u32,
    /// Policy generation of the endpoint's ingress: changes whenever what
    /// its ingress allows changes. Connections record it when admitted and
    /// are re-checked against policy when it has moved (revocation).
    pub ingress_gen: u32,
    /// The same for egress.
    pub egress_gen: u32,
    /// The pod's IPv4 address (Kubernetes gives a pod at most one per
    /// family), valid when `HAS_IPV4` is set: `from_pod` drops packets
    /// sent from any other address.
    pub ipv4: [u8; 4],
    /// The pod's IPv6 address, valid when `HAS_IPV6` is set.
    pub ipv6: [u8; 16],
    /// The interface's mark slot (see [`mark`]), written by the map writer
    /// (the compiler leaves it 0); 0: none, so the pod's Service traffic
    /// cannot be marked and is judged at the frontend address.
    pub slot: u32,
}

impl EndpointInfo {
    /// Whether the agent has compiled the pod's policy into the entry (not
    /// an interface waiting for its pod: [`endpoint_flags::NOT_PROGRAMMED`]).
    #[inline(always)]
    #[must_use]
    pub const fn programmed(&self) -> bool {
        self.flags & endpoint_flags::NOT_PROGRAMMED == 0
    }

    /// Whether some policy selects the pod for `dir` ([`direction`]).
    #[inline(always)]
    #[must_use]
    pub const fn isolated(&self, dir: u32) -> bool {
        self.flags & endpoint_flags::isolated(dir) != 0
    }
}

const _: () = {
    assert!(size_of::<EndpointInfo>() == 40);
    assert!(align_of::<EndpointInfo>() == 4);
    assert!(offset_of!(EndpointInfo, id) == 0);
    assert!(offset_of!(EndpointInfo, flags) == 4);
    assert!(offset_of!(EndpointInfo, ingress_gen) == 8);
    assert!(offset_of!(EndpointInfo, egress_gen) == 12);
    assert!(offset_of!(EndpointInfo, ipv4) == 16);
    assert!(offset_of!(EndpointInfo, ipv6) == 20);
    assert!(offset_of!(EndpointInfo, slot) == 36);
};

/// Interfaces with an index below this have a slot in
/// [`maps::ENDPOINT_CACHE`]; the others are always looked up in
/// [`maps::ENDPOINTS`].
pub const ENDPOINT_CACHE_SLOTS: u32 = 4096;

/// Value of [`maps::ENDPOINT_CACHE`]: a copy of an [`EndpointInfo`] taken
/// while [`maps::ENDPOINT_EPOCH`] held `epoch`. Valid only while it still
/// does, and only with a non-zero `info.id` (an empty slot is all zeros).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCacheEntry {
    pub epoch: u64,
    pub info: EndpointInfo,
}

const _: () = {
    assert!(size_of::<EndpointCacheEntry>() == 48);
    assert!(align_of::<EndpointCacheEntry>() == 8);
    assert!(offset_of!(EndpointCacheEntry, epoch) == 0);
    assert!(offset_of!(EndpointCacheEntry, info) == 8);
};

/// The values of [`maps::ENDPOINT_EPOCH`]: the reflected Gray code of a
/// count of endpoint writes. Consecutive values differ in one bit, so a
/// program reading the word while the agent's (byte-wise, not atomic)
/// map update replaces it sees the old value or the new one, never a mix
/// that could equal an older epoch and revive a stale cached copy.
pub mod endpoint_epoch {
    /// The epoch after `epoch`.
    #[must_use]
    pub const fn next(epoch: u64) -> u64 {
        gray(count(epoch).wrapping_add(1))
    }

    /// The `n`th epoch.
    #[must_use]
    pub const fn gray(n: u64) -> u64 {
        n ^ (n >> 1)
    }

    /// How many steps from 0 `epoch` is (the inverse of [`gray`]).
    #[must_use]
    pub const fn count(epoch: u64) -> u64 {
        let mut n = epoch;
        let mut shift = 1;
        while shift < 64 {
            n ^= n >> shift;
            shift <<= 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use crate::endpoint_epoch;

    #[test]
    fn consecutive_endpoint_epochs_differ_in_exactly_one_bit() {
        let mut e = 0;
        for n in 0..5000u64 {
            assert_eq!(endpoint_epoch::count(e), n);
            let next = endpoint_epoch::next(e);
            assert_eq!((e ^ next).count_ones(), 1, "{e:#x} -> {next:#x}");
            e = next;
        }
        // Also far along the sequence, and across the top bit.
        for n in [u64::MAX / 3, (1 << 63) - 1, u64::MAX - 1] {
            let e = endpoint_epoch::gray(n);
            assert_eq!(endpoint_epoch::count(e), n);
            assert_eq!((e ^ endpoint_epoch::next(e)).count_ones(), 1);
        }
    }
}
