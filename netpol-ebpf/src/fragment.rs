//! Fragments: the first one is judged like any packet and its verdict kept;
//! later ones (no transport header) follow it, in order and without
//! overlap.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use netpol_common::{FragKey, FragValue, ct_defaults, policy_selector, reason};

use crate::{maps::NETPOL_FRAGMENTS, packet::Packet};

#[inline(always)]
pub fn key(endpoint: u32, dir: u32, pkt: &Packet) -> FragKey {
    FragKey {
        selector: policy_selector(endpoint, dir),
        family: pkt.family as u8,
        protocol: pkt.protocol,
        _pad: 0,
        id: pkt.frag_id,
        src: pkt.src,
        dst: pkt.dst,
    }
}

/// Keeps the first fragment's verdict. A first fragment of a datagram
/// already seen overlaps it: the caller drops it.
#[inline(always)]
pub fn record(key: &FragKey, pkt: &Packet, allowed: bool) -> bool {
    if NETPOL_FRAGMENTS.get_ptr(key).is_some() {
        return false;
    }
    let v = FragValue {
        allowed: u32::from(allowed),
        next_offset: pkt.frag_end,
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        first_seen_ns: unsafe { bpf_ktime_get_ns() },
    };
    let _ = NETPOL_FRAGMENTS.insert(key, v, 0);
    true
}

/// The verdict of a later fragment: that of its first fragment, if it was
/// seen, allowed, recent, and this fragment does not overlap the ones
/// before it.
#[inline(always)]
pub fn follow(key: &FragKey, pkt: &Packet) -> u32 {
    let Some(v) = NETPOL_FRAGMENTS.get_ptr_mut(key) else {
        return reason::DROP_FRAGMENT;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: pointer from a successful lookup, valid for this run.
    unsafe {
        if (*v).allowed == 0 || now.saturating_sub((*v).first_seen_ns) > ct_defaults::FRAGMENT_NS {
            return reason::DROP_FRAGMENT;
        }
        // Fragments arrive in order on a veth; one that starts before the
        // end of what was seen rewrites bytes already judged.
        if pkt.frag_offset < (*v).next_offset {
            return reason::DROP_FRAGMENT_OVERLAP;
        }
        (*v).next_offset = pkt.frag_end;
    }
    reason::PASS_FRAGMENT
}
