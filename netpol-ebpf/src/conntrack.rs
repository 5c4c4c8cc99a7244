//! Connections each endpoint admitted. One entry per (endpoint,
//! connection), oriented from the endpoint to its peer: a packet in either
//! direction of an admitted connection finds it, which is what lets replies
//! through an isolated direction.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_ns};
use netpol_common::{CtKey, CtValue, GlobalConfig, direction, protocol, tcp_state};

use crate::{
    config,
    maps::NETPOL_CONNTRACK,
    packet::{Inner, Packet},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

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

/// The key of the connection an ICMP error is about. The embedded packet
/// travelled the other way: an error arriving at `to_pod` quotes a packet
/// the pod sent.
#[inline(always)]
pub fn inner_key(endpoint: u32, dir: u32, family: u32, inner: &Inner) -> CtKey {
    let sent = dir != direction::EGRESS;
    CtKey {
        endpoint,
        protocol: inner.protocol,
        family: family as u8,
        _pad: 0,
        local_port: if sent { inner.sport } else { inner.dport },
        peer_port: if sent { inner.dport } else { inner.sport },
        local_addr: if sent { inner.src } else { inner.dst },
        peer_addr: if sent { inner.dst } else { inner.src },
    }
}

/// Now on `CLOCK_MONOTONIC`, in ns: from jiffies when the agent measured
/// their length (a variable read; `bpf_ktime_get_ns` reads the clock
/// source, a tenth of the programs' time per connection on a VM), else
/// from the clock source. Jiffies are 1-10 ms: fine for timeouts of
/// seconds.
#[inline(always)]
fn now(cfg: Option<&GlobalConfig>) -> u64 {
    match cfg {
        Some(c) if c.clock_jiffy_ns != 0 => {
            // SAFETY: bpf_jiffies64 has no preconditions.
            let j = unsafe { bpf_jiffies64() };
            j.wrapping_mul(u64::from(c.clock_jiffy_ns))
                .wrapping_add(c.clock_offset_ns)
        }
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        _ => unsafe { bpf_ktime_get_ns() },
    }
}

/// The TCP state after a packet with `flags`.
#[inline(always)]
fn next_state(state: u32, flags: u8) -> u32 {
    if flags & (TCP_FIN | TCP_RST) != 0 {
        tcp_state::CLOSING
    } else if state == tcp_state::SYN_SENT && flags & TCP_ACK != 0 {
        tcp_state::ESTABLISHED
    } else {
        state
    }
}

/// What a packet's lookup found, in one word: only the fields the
/// verdict needs, and whether there was an entry at all. (An
/// `Option<CtValue>` is copied with its unset payload, which the verifier
/// rejects, and a wider value takes stack the deepest call chain lacks.)
#[derive(Clone, Copy)]
pub struct Hit(u64);

// Reasons and directions are kept in a byte each.
const _: () = assert!(netpol_common::reason::SLOTS <= 256 && direction::COUNT <= 256);

impl Hit {
    const MISS: Self = Self(0);
    const FOUND: u64 = 1 << 48;

    #[inline(always)]
    const fn new(origin: u32, admitted_by: u32, generation: u32) -> Self {
        Self(
            Self::FOUND
                | (origin as u64 & 0xff) << 40
                | (admitted_by as u64 & 0xff) << 32
                | generation as u64,
        )
    }

    #[inline(always)]
    pub const fn found(self) -> bool {
        self.0 & Self::FOUND != 0
    }

    /// [`CtValue::origin`].
    #[inline(always)]
    pub const fn origin(self) -> u32 {
        (self.0 >> 40) as u32 & 0xff
    }

    /// [`CtValue::admitted_by`].
    #[inline(always)]
    pub const fn admitted_by(self) -> u32 {
        (self.0 >> 32) as u32 & 0xff
    }

    /// [`CtValue::generation`].
    #[inline(always)]
    pub const fn generation(self) -> u32 {
        self.0 as u32
    }
}

/// A fresh tracked entry (not `found` when there is none or it timed
/// out). Refreshes the entry and its TCP state.
#[inline(always)]
pub fn lookup(key: &CtKey, cfg: &GlobalConfig, tcp_flags: u8) -> Hit {
    let miss = Hit::MISS;
    let Some(v) = NETPOL_CONNTRACK.get_ptr_mut(key) else {
        return miss;
    };
    let now = now(Some(cfg));
    // SAFETY: the pointer comes from a successful lookup and is valid for
    // this run; concurrent updates of these words are benign races (the
    // worst outcome is one extra policy check).
    unsafe {
        if now.saturating_sub((*v).last_seen_ns) > cfg.ct_timeout_ns(key.protocol, (*v).tcp_state) {
            return miss;
        }
        (*v).last_seen_ns = now;
        if key.protocol == protocol::TCP {
            (*v).tcp_state = next_state((*v).tcp_state, tcp_flags);
        }
        Hit::new((*v).origin, (*v).admitted_by, (*v).generation)
    }
}

/// Whether a fresh entry exists, without refreshing it (ICMP errors do
/// not keep a connection alive).
#[inline(always)]
pub fn exists(key: &CtKey, cfg: &GlobalConfig) -> bool {
    let Some(v) = NETPOL_CONNTRACK.get_ptr(key) else {
        return false;
    };
    let now = now(Some(cfg));
    // SAFETY: pointer from a successful lookup, read once.
    let v = unsafe { *v };
    now.saturating_sub(v.last_seen_ns) <= cfg.ct_timeout_ns(key.protocol, v.tcp_state)
}

/// Records that the connection was judged again under `generation`.
#[inline(always)]
pub fn set_generation(key: &CtKey, generation: u32) {
    if let Some(v) = NETPOL_CONNTRACK.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup, valid for this run.
        unsafe { (*v).generation = generation };
    }
}

/// Forgets a connection the policy no longer allows.
#[inline(always)]
pub fn remove(key: &CtKey) {
    let _ = NETPOL_CONNTRACK.remove(key);
}

/// Records an admitted connection. A full map evicts the least recently
/// used entry (LRU); a failed insert only means the next packet is judged
/// again.
#[inline(always)]
pub fn track(key: &CtKey, origin: u32, admitted_by: u32, generation: u32, tcp_flags: u8) {
    #[cfg(feature = "bench")]
    if config::bench_no_track() {
        return;
    }
    let state = if key.protocol != protocol::TCP {
        tcp_state::NONE
    } else if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        tcp_state::CLOSING
    } else if tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0 {
        tcp_state::SYN_SENT
    } else {
        // Picked up mid-flow (or a SYN-ACK): past the handshake.
        tcp_state::ESTABLISHED
    };
    let v = CtValue {
        last_seen_ns: now(config::get()),
        origin,
        admitted_by,
        generation,
        tcp_state: state,
    };
    let _ = NETPOL_CONNTRACK.insert(key, v, 0);
}
