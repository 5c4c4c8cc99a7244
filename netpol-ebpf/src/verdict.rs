//! The one place a decision becomes a TC action, and is counted (and, for
//! a drop, reported: [`crate::events`]).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use netpol_common::{counter_index, reason};

use crate::{events, maps::NETPOL_COUNTERS, packet::Packet};

/// What to do with a packet, and why: drops are exactly the reasons at or
/// above `reason::FIRST_DROP`.
pub struct Verdict {
    /// The policy direction the reason belongs to (a Service packet's
    /// egress is judged at the backend's `to_pod`).
    pub direction: u32,
    pub family: u32,
    pub reason: u32,
    /// The endpoint whose policy (in `direction`) gave the verdict: the
    /// Service packet's source when its egress is judged downstream; 0
    /// when none is known.
    pub endpoint: u32,
}

impl Verdict {
    #[inline(always)]
    pub const fn new(direction: u32, family: u32, reason: u32, endpoint: u32) -> Self {
        Self {
            direction,
            family,
            reason,
            endpoint,
        }
    }
}

/// Counts the packet under its direction, family and reason, reports it
/// when dropped, and maps the verdict to a TC action.
#[inline(always)]
pub fn to_tc_action(ctx: &TcContext, v: &Verdict, pkt: &Packet) -> i32 {
    let index = counter_index(v.direction, v.family, v.reason);
    if let Some(c) = NETPOL_COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup,
        // is valid for the program's run and only this CPU writes its slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
        }
    }
    if reason::is_drop(v.reason) {
        deny(ctx, v, pkt);
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// Reports a drop: the verdict and the packet's identity packed into two
/// words for the global function ([`events::netpol_deny_event`]).
#[inline(always)]
fn deny(ctx: &TcContext, v: &Verdict, pkt: &Packet) {
    let verdict = u64::from(v.reason as u8)
        | u64::from(v.direction as u8) << 8
        | u64::from(v.family as u8) << 16;
    events::netpol_deny_event(ctx.skb.skb, v.endpoint, verdict, pkt.event);
}
