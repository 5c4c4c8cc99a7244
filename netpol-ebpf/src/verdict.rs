//! The one place a decision becomes a TC action, and is counted (and, for
//! a drop, reported: [`crate::events`]).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use netpol_common::{EndpointInfo, counter_index, endpoint_flags, reason};

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
    /// A new connection the policy judged ([`JUDGED`]): known on each
    /// path, so the verifier does not split on it.
    pub judged: bool,
    /// The staged bits ([`Verdict::staged_for`]), read from the flags.
    pub staged: u32,
}

/// Set above the reason in a step's result (`pipeline::steps`): the
/// policy judged a new connection, which the endpoint's staged view may
/// judge too ([`Verdict::staged_for`]).
pub const JUDGED: u32 = 1 << 8;

/// The reason of a step's result, without [`JUDGED`].
#[inline(always)]
pub const fn reason_of(r: u32) -> u32 {
    r & 0xff
}

impl Verdict {
    /// `reason`: a reason, or a step's result.
    #[inline(always)]
    pub const fn new(direction: u32, family: u32, reason: u32, endpoint: u32) -> Self {
        Self {
            direction,
            family,
            reason: reason_of(reason),
            endpoint,
            judged: reason & JUDGED != 0,
            staged: 0,
        }
    }

    /// Whether `ep`'s (the verdict's endpoint's) staged view judges the
    /// direction differently and isolates it: the staged bits of the
    /// event's verdict word ([`events::STAGED_JUDGE`],
    /// [`events::STAGED_ISOLATED`]), used where [`Verdict::judged`]. Read
    /// from the endpoint here, where the verdict is made, not carried
    /// through the steps: a value the verifier cannot know, carried that
    /// far, splits its states on every later branch (it cost `to_pod`
    /// 100,000 verified instructions).
    #[inline(always)]
    pub const fn staged_for(mut self, ep: &EndpointInfo) -> Self {
        let (differs, isolated) = endpoint_flags::staged(self.direction);
        // Arithmetic, not branches: one path to verify, whatever the flags.
        let d = (ep.flags >> differs.trailing_zeros()) & 1;
        let i = (ep.flags >> isolated.trailing_zeros()) & 1;
        const _: () = assert!(events::STAGED_JUDGE == 1 && events::STAGED_ISOLATED == 2);
        self.staged = d * (1 | i << 1);
        self
    }
}

/// Reports a verdict's staged bits where the packet is not dropped (a
/// Service packet's source egress that passed, before its ingress is
/// judged); a drop's are reported with it by [`to_tc_action`].
#[inline(always)]
pub fn report_staged(ctx: &TcContext, v: &Verdict, pkt: &Packet) {
    if v.judged {
        report(ctx, v, pkt);
    }
}

/// Reports what the staged view would do with a new hairpin, from the
/// result `r` of `policy::netpol_hairpin_allows` (its report in bits
/// 8-15, the direction in 16-23; none: nothing to report), as a ready
/// report ([`events::STAGED_REPORT`]) whose source and destination are
/// the pod's own address.
#[inline(always)]
pub fn report_hairpin(ctx: &TcContext, endpoint: u32, r: i32, pkt: &Packet) {
    let report = (r >> 8) as u8;
    if report == 0 {
        return;
    }
    let verdict = u64::from(report)
        | u64::from((r >> 16) as u8) << 8
        | u64::from(pkt.family as u8) << 16
        | u64::from(events::STAGED_REPORT) << 24;
    events::netpol_deny_event(ctx.skb.skb, endpoint, verdict, pkt.event);
}

/// Counts the packet under its direction, family and reason, reports it
/// when dropped (and what the staged view says of a new connection), and
/// maps the verdict to a TC action.
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
    let drop = reason::is_drop(v.reason);
    // Every new connection the policy judged goes to the global function
    // (a call per connection where the views agree, which returns at
    // once), rather than a branch on the flags here, which the verifier
    // would follow to the end of every program.
    if drop || v.judged {
        report(ctx, v, pkt);
    }
    if drop { TC_ACT_SHOT } else { TC_ACT_OK }
}

/// Reports a drop and the staged view's judgement: the verdict, its
/// staged bits and the packet's identity packed into two words for the
/// one global function ([`events::netpol_deny_event`]).
#[inline(always)]
fn report(ctx: &TcContext, v: &Verdict, pkt: &Packet) {
    let verdict = u64::from(v.reason as u8)
        | u64::from(v.direction as u8) << 8
        | u64::from(v.family as u8) << 16
        | u64::from(v.staged as u8) << 24;
    events::netpol_deny_event(ctx.skb.skb, v.endpoint, verdict, pkt.event);
}
