//! Deny events: a dropped packet reported to the agent on the ring buffer,
//! within its endpoint's rate limit (`netpol_common::events`). Neither the
//! limit nor a full ring changes the packet's verdict; both are counted.
//! The staged view's reports and the allowed-connection records a sampled
//! new connection gets take the same way.
//!
//! The work is one *global* BPF function, [`netpol_deny_event`], which the
//! verifier checks once, on its own: a static function (or inlined code)
//! is checked again on every path that reaches a drop, which cost each
//! program some hundred thousand verified instructions. Kernels before
//! 5.12 allow global functions the context and scalars only, so the
//! caller packs the verdict and the packet's identity into two words and
//! the function reads the addresses from the packet again.
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    programs::TcContext,
};
use netpol_common::{DenyEvent, direction, events, family};

use crate::{
    config, ctx,
    maps::{NETPOL_EVENT_LIMITS, NETPOL_EVENTS, NETPOL_EVENTS_LOST},
    policy,
};

/// Staged bits of the verdict word (its fourth byte): judge the new
/// connection against the endpoint's staged view too.
pub const STAGED_JUDGE: u8 = 1;
/// With [`STAGED_JUDGE`]: the staged view isolates the direction.
pub const STAGED_ISOLATED: u8 = 2;
/// The reason is a staged report already made (a hairpin:
/// `policy::netpol_hairpin_allows`), to send as it is with the packet's
/// destination, the pod's own address, as source and destination.
pub const STAGED_REPORT: u8 = 4;

/// Emits one deny event for a dropped packet, for a new connection the
/// staged view judges otherwise ([`STAGED_JUDGE`]) a "would deny" or
/// "would allow" report, each if the endpoint's rate limit admits it, and
/// for a sampled new connection a rule admitted an allowed-connection
/// record (within the endpoint's allowed-record bucket).
/// `verdict`: reason, direction, family, staged bits (a byte each from
/// the lowest); `packet`:
/// [`Packet::event_word`](crate::packet::Packet::event_word). Returns how
/// many events were emitted. `no_mangle` and `extern "C"`: rustc exports
/// it to bpf-linker, so it keeps global linkage in the object and its
/// BTF. The staged view's lookups live here, not in the programs: the
/// verifier checks them once, and the programs pay one flag test where
/// the views agree.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn netpol_deny_event(
    skb: *mut __sk_buff,
    endpoint: u32,
    verdict: u64,
    packet: u64,
) -> i32 {
    let reason = u32::from(verdict as u8);
    let staged = (verdict >> 24) as u8;
    let drop = netpol_common::reason::is_drop(reason);
    let judge = staged & (STAGED_JUDGE | STAGED_REPORT) != 0;
    let record = reason == netpol_common::reason::PASS_POLICY && sampled();
    // A new connection whose endpoint's views agree, not recorded: nothing
    // to do.
    if !drop && !judge && !record {
        return 0;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // A plain drop (what a flood sends) asks the rate limit before
    // reading anything.
    if !judge && !admitted(endpoint, now) {
        return 0;
    }
    let ctx = TcContext::new(skb);
    let fam = (verdict >> 16) as u8;
    let l3 = (packet >> 16) as u16 as usize;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    // Read again from the packet (unchanged since it was parsed); a read
    // that fails leaves zeros, the event is still worth sending.
    if u32::from(fam) == family::IPV4 {
        if let Ok(a) = ctx.load::<[u8; 8]>(l3 + 12) {
            src[..4].copy_from_slice(&a[..4]);
            dst[..4].copy_from_slice(&a[4..]);
        }
    } else if u32::from(fam) == family::IPV6 {
        if let Ok(a) = ctx.load::<[u8; 16]>(l3 + 8) {
            src = a;
        }
        if let Ok(a) = ctx.load::<[u8; 16]>(l3 + 24) {
            dst = a;
        }
    }
    if staged & STAGED_REPORT != 0 {
        if !admitted(endpoint, now) {
            return 0;
        }
        return emit(&ctx, now, endpoint, reason, verdict, packet, &dst, &dst);
    }
    let dir = u32::from((verdict >> 8) as u8);
    let mut sent = 0;
    if judge {
        let peer = if dir == direction::EGRESS { &dst } else { &src };
        let report = policy::staged_report(
            endpoint,
            dir,
            u32::from(fam),
            staged & STAGED_ISOLATED != 0,
            packet,
            peer,
            !drop,
        );
        if report != 0 && admitted(endpoint, now) {
            sent += emit(&ctx, now, endpoint, report, verdict, packet, &src, &dst);
        }
        if drop && !admitted(endpoint, now) {
            return sent;
        }
    }
    if drop {
        sent += emit(&ctx, now, endpoint, reason, verdict, packet, &src, &dst);
    }
    if record && admitted(events::allowed_bucket(endpoint), now) {
        sent += emit(&ctx, now, endpoint, reason, verdict, packet, &src, &dst);
    }
    sent
}

/// Whether this allowed new connection is one the agent asked to have
/// recorded: one in [`GlobalConfig::allowed_sample`](netpol_common::GlobalConfig), at random.
#[inline(always)]
fn sampled() -> bool {
    let n = match config::get() {
        Some(c) => c.allowed_sample,
        None => 0,
    };
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    n == 1 || (n > 1 && unsafe { bpf_get_prandom_u32() } % n == 0)
}

/// Whether the endpoint's rate limit admits one more event at `now`
/// (a refusal is counted).
#[inline(always)]
fn admitted(endpoint: u32, now: u64) -> bool {
    if within_limit(endpoint, now) {
        return true;
    }
    lost(events::LOST_RATE_LIMITED);
    false
}

/// One event on the ring (the rate limit already asked).
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "the event's fields, unpacked once"
)]
fn emit(
    ctx: &TcContext,
    now: u64,
    endpoint: u32,
    reason: u32,
    verdict: u64,
    packet: u64,
    src: &[u8; 16],
    dst: &[u8; 16],
) -> i32 {
    let Some(mut entry) = NETPOL_EVENTS.reserve(0) else {
        lost(events::LOST_RING_FULL);
        return 0;
    };
    entry.write(DenyEvent {
        timestamp_ns: now,
        endpoint,
        ifindex: ctx::ifindex(ctx),
        reason,
        direction: (verdict >> 8) as u8,
        family: (verdict >> 16) as u8,
        protocol: packet as u8,
        icmp_type: (packet >> 8) as u8,
        sport: (packet >> 32) as u16,
        dport: (packet >> 48) as u16,
        src: *src,
        dst: *dst,
        _pad: 0,
    });
    entry.submit(0);
    1
}

/// Takes one event from the endpoint's token bucket (a new endpoint starts
/// with a full burst).
#[inline(always)]
fn within_limit(endpoint: u32, now: u64) -> bool {
    let (rate, burst) = match config::get() {
        Some(c) => (c.event_rate, c.event_burst),
        None => (0, 0),
    };
    match NETPOL_EVENT_LIMITS.get_ptr_mut(endpoint) {
        // SAFETY: the pointer comes from a successful lookup and is valid
        // for this run; another CPU may update the same bucket meanwhile,
        // which at worst lets an extra event through (see EventBucket).
        Some(b) => events::take(unsafe { &mut *b }, now, rate, burst),
        None => {
            // A full LRU evicts the least recent bucket; a failed insert
            // only means the next event starts a fresh burst.
            let _ = NETPOL_EVENT_LIMITS.insert(endpoint, events::first(now, burst), 0);
            true
        }
    }
}

#[inline(always)]
fn lost(cause: u32) {
    if let Some(c) = NETPOL_EVENTS_LOST.get_ptr_mut(cause) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup,
        // is valid for the program's run and only this CPU writes its slot.
        unsafe {
            *c += 1;
        }
    }
}
