//! Traffic counters: packets and bytes per CPU for each direction, family
//! and reason, in [`maps::COUNTERS`].
use core::mem::offset_of;

#[cfg(doc)]
use crate::maps;
use crate::{direction, family, reason};

/// Number of entries of the counter array.
pub const COUNTER_ENTRIES: u32 = direction::COUNT * family::COUNT * reason::SLOTS;

/// Index into [`maps::COUNTERS`] for a direction, family and reason.
///
/// Out-of-range inputs are clamped into the last slot of their range rather
/// than indexing outside the array: the eBPF side cannot panic.
#[inline(always)]
#[must_use]
pub const fn counter_index(direction: u32, family: u32, reason: u32) -> u32 {
    let d = if direction < direction::COUNT {
        direction
    } else {
        direction::COUNT - 1
    };
    let f = if family < family::COUNT {
        family
    } else {
        family::OTHER
    };
    let r = if reason < reason::SLOTS {
        reason
    } else {
        reason::SLOTS - 1
    };
    (d * family::COUNT + f) * reason::SLOTS + r
}

/// Packets and bytes seen, one per CPU per counter index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (`skb->len`, link layer included).
    pub bytes: u64,
}

const _: () = {
    assert!(size_of::<TrafficCounter>() == 16);
    assert!(align_of::<TrafficCounter>() == 8);
    assert!(offset_of!(TrafficCounter, packets) == 0);
    assert!(offset_of!(TrafficCounter, bytes) == 8);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_indices_are_distinct_and_in_range() {
        let mut seen = [false; COUNTER_ENTRIES as usize];
        for d in 0..direction::COUNT {
            for f in 0..family::COUNT {
                for r in 0..reason::SLOTS {
                    let i = counter_index(d, f, r);
                    assert!(i < COUNTER_ENTRIES);
                    assert!(!seen[i as usize], "index {i} reused");
                    seen[i as usize] = true;
                }
            }
        }
    }

    #[test]
    fn counter_index_clamps_out_of_range_inputs() {
        assert!(counter_index(7, 9, 999) < COUNTER_ENTRIES);
    }
}
