//! Connections each endpoint admitted. One entry per (endpoint,
//! connection), oriented from the endpoint to its peer: a packet in either
//! direction of an admitted connection finds it, which is what lets replies
//! through an isolated direction.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use netpol_common::{CtKey, CtValue, GlobalConfig, ct_defaults, direction, protocol};

use crate::{maps::NETPOL_CONNTRACK, parse::Packet};

/// The key of `pkt` at `endpoint`, seen in direction `dir`.
#[inline(always)]
pub fn key(endpoint: u32, dir: u32, pkt: &Packet) -> CtKey {
    let egress = dir == direction::EGRESS;
    CtKey {
        endpoint,
        protocol: pkt.protocol,
        family: pkt.family as u8,
        _pad: 0,
        local_port: if egress { pkt.sport } else { pkt.dport },
        peer_port: if egress { pkt.dport } else { pkt.sport },
        local_addr: if egress { pkt.src } else { pkt.dst },
        peer_addr: if egress { pkt.dst } else { pkt.src },
    }
}

#[inline(always)]
fn timeout(cfg: &GlobalConfig, proto: u8) -> u64 {
    let (set, default) = match proto {
        protocol::TCP | protocol::SCTP => (cfg.ct_timeout_tcp_ns, ct_defaults::TCP_NS),
        protocol::UDP => (cfg.ct_timeout_udp_ns, ct_defaults::UDP_NS),
        _ => (cfg.ct_timeout_other_ns, ct_defaults::OTHER_NS),
    };
    if set == 0 { default } else { set }
}

/// Whether the connection is tracked and fresh; refreshes it when it is.
#[inline(always)]
pub fn lookup(key: &CtKey, cfg: &GlobalConfig) -> bool {
    let Some(v) = NETPOL_CONNTRACK.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the pointer comes from a successful lookup and is valid for
    // this run; a concurrent update of the timestamp is a benign race.
    unsafe {
        if now.saturating_sub((*v).last_seen_ns) > timeout(cfg, key.protocol) {
            return false;
        }
        (*v).last_seen_ns = now;
    }
    true
}

/// Records an admitted connection. A full map evicts the least recently
/// used entry (LRU); a failed insert only means the next packet is judged
/// again.
#[inline(always)]
pub fn track(key: &CtKey, origin: u32, admitted_by: u32) {
    #[cfg(feature = "bench")]
    if crate::endpoint::config().flags & netpol_common::config_flags::BENCH_NO_TRACK != 0 {
        return;
    }
    let v = CtValue {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
        origin,
        admitted_by,
    };
    let _ = NETPOL_CONNTRACK.insert(key, v, 0);
}
