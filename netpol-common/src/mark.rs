//! The `skb->mark` bits that carry a pod's Service traffic from its
//! `from_pod`, where the destination is still the Service's frontend, to
//! the hook that sees the backend kube-proxy chose.
//!
//! The field `(mark & mask) >> shift` holds the source interface's slot
//! (1..=[`mark::slots`](slots)); 0 means "not marked". The slot, not the
//! packet's source address, names the source pod, because kube-proxy
//! masquerades a pod reaching its own Service. The default mask keeps clear of
//! kube-proxy's 0x4000/0x8000, kube-router's 0x10000/0x20000, flannel's and
//! Weave's bits and Tailscale's 0xff0000.

/// Default mask: bits 24–31, 255 slots.
pub const DEFAULT_MASK: u32 = 0xff00_0000;
/// Slots the `MARK_SOURCES` array holds (slot 0 unused).
pub const MAX_SLOTS: u32 = 4095;

/// Shift of a mask: the position of its lowest set bit (0 for 0).
#[must_use]
pub const fn shift(mask: u32) -> u32 {
    if mask == 0 { 0 } else { mask.trailing_zeros() }
}

/// Slots a mask can carry, at most [`MAX_SLOTS`].
#[must_use]
pub const fn slots(mask: u32) -> u32 {
    let n = mask >> shift(mask);
    if n > MAX_SLOTS { MAX_SLOTS } else { n }
}

/// Whether `mask` is usable: non-empty, one run of contiguous bits.
#[must_use]
pub const fn valid(mask: u32) -> bool {
    if mask == 0 {
        return false;
    }
    let n = mask >> shift(mask);
    n & (n.wrapping_add(1)) == 0
}

/// The slot a mark carries (0: none).
#[inline(always)]
#[must_use]
pub const fn slot_of(mark: u32, mask: u32, shift: u32) -> u32 {
    (mark & mask) >> (shift & 31)
}

/// `mark` with its netpol bits set to `slot`.
#[inline(always)]
#[must_use]
pub const fn with_slot(mark: u32, mask: u32, shift: u32, slot: u32) -> u32 {
    (mark & !mask) | ((slot << (shift & 31)) & mask)
}

#[cfg(test)]
mod tests {
    use crate::mark;

    #[test]
    fn default_mark_mask_is_clear_of_kube_proxy_kube_router_and_tailscale() {
        for taken in [0x4000, 0x8000, 0x1_0000, 0x2_0000, 0xff_0000] {
            assert_eq!(mark::DEFAULT_MASK & taken, 0, "{taken:#x}");
        }
        assert!(mark::valid(mark::DEFAULT_MASK));
        assert_eq!(mark::shift(mark::DEFAULT_MASK), 24);
        assert_eq!(mark::slots(mark::DEFAULT_MASK), 255);
    }

    #[test]
    fn mark_slot_round_trips_and_keeps_other_bits() {
        let m = mark::with_slot(0x4000 | 0xff00_0000, 0x0ff0_0000, 20, 7);
        assert_eq!(m, 0xf070_4000);
        assert_eq!(mark::slot_of(m, 0x0ff0_0000, 20), 7);
        assert_eq!(mark::with_slot(m, 0x0ff0_0000, 20, 0), 0xf000_4000);
        assert!(!mark::valid(0x0f0f_0000));
        assert!(!mark::valid(0));
        assert_eq!(mark::slots(0xffff_0000), mark::MAX_SLOTS);
    }
}
