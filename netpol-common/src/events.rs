//! Deny events: the programs report dropped packets on the
//! [`maps::EVENTS`] ring buffer, at most [`GlobalConfig::event_rate`] per
//! second and endpoint after a burst of [`GlobalConfig::event_burst`] (a
//! token bucket per endpoint id in [`maps::EVENT_LIMITS`]). Events the
//! limit refuses, or that find the ring full, are counted in
//! [`maps::EVENTS_LOST`]; the packet's verdict never depends on either.
//!
//! The same ring carries the staged view's reports and, when the agent
//! asks for them ([`GlobalConfig::allowed_sample`]), records of allowed new
//! connections (`reason::PASS_POLICY`), sampled and limited by a bucket of
//! their own ([`allowed_bucket`]) so that they never take a deny event's
//! place.
use core::mem::offset_of;

#[cfg(doc)]
use crate::{GlobalConfig, direction, family, maps, reason};

/// Default [`super::GlobalConfig::event_rate`].
pub const DEFAULT_RATE: u32 = 10;
/// Default [`super::GlobalConfig::event_burst`].
pub const DEFAULT_BURST: u32 = 50;
/// Highest rate honoured (events per second and endpoint).
pub const MAX_RATE: u32 = 100_000;
/// Highest burst honoured.
pub const MAX_BURST: u32 = 10_000;
/// [`super::maps::EVENTS_LOST`] slot: refused by the rate limit.
pub const LOST_RATE_LIMITED: u32 = 0;
/// [`super::maps::EVENTS_LOST`] slot: the ring buffer was full (the
/// agent reads too slowly, or is not running).
pub const LOST_RING_FULL: u32 = 1;
/// Entries of [`super::maps::EVENTS_LOST`].
pub const LOST_ENTRIES: u32 = 2;
/// Bytes of the ring buffer (a power of two, whole pages): 4096 events.
pub const RING_BYTES: u32 = 256 * 1024;
/// What one event costs in [`EventBucket::tokens`]: a bucket gains
/// `rate` units per nanosecond, so one event per `1 / rate` seconds.
pub const COST: u64 = 1_000_000_000;
/// Refill considered at most (ns): enough to fill the largest burst at
/// the lowest rate, and small enough that `elapsed * rate` fits a u64.
const MAX_REFILL_NS: u64 = MAX_BURST as u64 * COST;

/// Set in the [`maps::EVENT_LIMITS`] key of an endpoint's allowed-record
/// bucket (endpoint ids, staged ones included, stay below it).
pub const ALLOWED_BUCKET_BIT: u32 = 1 << 31;

/// The [`maps::EVENT_LIMITS`] key of `endpoint`'s allowed-record bucket.
#[inline(always)]
#[must_use]
pub const fn allowed_bucket(endpoint: u32) -> u32 {
    endpoint | ALLOWED_BUCKET_BIT
}

/// The rate in force for a configured value.
#[inline(always)]
#[must_use]
pub const fn rate(configured: u32) -> u64 {
    (match configured {
        0 => DEFAULT_RATE,
        r if r > MAX_RATE => MAX_RATE,
        r => r,
    }) as u64
}

/// The burst in force for a configured value.
#[inline(always)]
#[must_use]
pub const fn burst(configured: u32) -> u64 {
    (match configured {
        0 => DEFAULT_BURST,
        b if b > MAX_BURST => MAX_BURST,
        b => b,
    }) as u64
}

/// The bucket of an endpoint's first event at `now_ns`, that event
/// taken: a full burst minus one.
#[inline(always)]
#[must_use]
pub const fn first(now_ns: u64, burst_configured: u32) -> EventBucket {
    EventBucket {
        tokens: (burst(burst_configured) - 1) * COST,
        last_ns: now_ns,
    }
}

/// Refills `bucket` for the time since it was last used and takes one
/// event from it; whether the event may be emitted. Integer-only, no
/// division, no overflow: tokens stay ≤ `MAX_BURST * COST` (10¹³) and
/// the refill ≤ `MAX_REFILL_NS * MAX_RATE` (10¹⁸).
#[inline(always)]
pub const fn take(
    bucket: &mut EventBucket,
    now_ns: u64,
    rate_configured: u32,
    burst_configured: u32,
) -> bool {
    let cap = burst(burst_configured) * COST;
    let elapsed = now_ns.saturating_sub(bucket.last_ns);
    let elapsed = if elapsed > MAX_REFILL_NS {
        MAX_REFILL_NS
    } else {
        elapsed
    };
    let held = if bucket.tokens > cap {
        cap
    } else {
        bucket.tokens
    };
    let refilled = held + elapsed * rate(rate_configured);
    let tokens = if refilled > cap { cap } else { refilled };
    bucket.last_ns = now_ns;
    if tokens >= COST {
        bucket.tokens = tokens - COST;
        true
    } else {
        bucket.tokens = tokens;
        false
    }
}

/// Value of [`maps::EVENT_LIMITS`]: one endpoint's token bucket (see
/// [`events::take`](take)). Updated without atomics: two CPUs racing on one
/// endpoint may let an event or two more through, never fewer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBucket {
    /// Tokens held, in [`events::COST`](COST) units per event.
    pub tokens: u64,
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
}

const _: () = {
    assert!(size_of::<EventBucket>() == 16);
    assert!(align_of::<EventBucket>() == 8);
    assert!(offset_of!(EventBucket, tokens) == 0);
    assert!(offset_of!(EventBucket, last_ns) == 8);
};

/// One dropped packet, as the programs report it on [`maps::EVENTS`] (or
/// a staged view's report, or an allowed-connection record: see
/// `reason`).
/// Addresses and ports are the packet's own (source → destination), not
/// oriented from the endpoint; `endpoint` is the endpoint whose policy
/// `direction` dropped it (the destination pod's for ingress, the source
/// pod's for egress, also when a Service packet is judged at the
/// backend's `to_pod` or at `leave_node`); 0 when no endpoint is known
/// (`DROP_MARK_STALE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEvent {
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`, the node's).
    pub timestamp_ns: u64,
    /// Endpoint id (see above).
    pub endpoint: u32,
    /// `skb->ifindex`: the interface the program ran on.
    pub ifindex: u32,
    /// [`reason`]: a drop, a staged view's report
    /// ([`reason::STAGED_WOULD_DENY`], [`reason::STAGED_WOULD_ALLOW`]), or
    /// [`reason::PASS_POLICY`]: an allowed-connection record.
    pub reason: u32,
    /// [`direction`] of the policy that dropped it.
    pub direction: u8,
    /// [`family`] code.
    pub family: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// ICMP/ICMPv6 type, 0 otherwise.
    pub icmp_type: u8,
    /// Source port, host byte order (ICMP echo: the id; 0 without ports).
    pub sport: u16,
    /// Destination port, host byte order.
    pub dport: u16,
    /// Source address (IPv4 in the first 4 bytes, the rest zero).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Always 0.
    pub _pad: u32,
}

const _: () = {
    assert!(size_of::<DenyEvent>() == 64);
    assert!(align_of::<DenyEvent>() == 8);
    assert!(offset_of!(DenyEvent, timestamp_ns) == 0);
    assert!(offset_of!(DenyEvent, endpoint) == 8);
    assert!(offset_of!(DenyEvent, ifindex) == 12);
    assert!(offset_of!(DenyEvent, reason) == 16);
    assert!(offset_of!(DenyEvent, direction) == 20);
    assert!(offset_of!(DenyEvent, family) == 21);
    assert!(offset_of!(DenyEvent, protocol) == 22);
    assert!(offset_of!(DenyEvent, icmp_type) == 23);
    assert!(offset_of!(DenyEvent, sport) == 24);
    assert!(offset_of!(DenyEvent, dport) == 26);
    assert!(offset_of!(DenyEvent, src) == 28);
    assert!(offset_of!(DenyEvent, dst) == 44);
    assert!(offset_of!(DenyEvent, _pad) == 60);
};

#[cfg(test)]
mod tests {
    use crate::events;

    const S: u64 = 1_000_000_000;

    /// Events `take` lets through when asked every `step_ns` for `n` asks.
    fn taken(rate: u32, burst: u32, step_ns: u64, n: u64) -> u64 {
        let mut b = events::first(0, burst);
        let mut ok = 1;
        for i in 1..n {
            if events::take(&mut b, i * step_ns, rate, burst) {
                ok += 1;
            }
        }
        ok
    }

    #[test]
    fn a_flood_gets_the_burst_then_the_rate() {
        // 10 s of one packet per millisecond at 10/s, burst 50: the burst,
        // then 10 a second.
        let got = taken(10, 50, S / 1000, 10_000);
        assert!((50 + 99..=50 + 100).contains(&got), "{got}");
        // Burst 1: exactly the rate.
        let got = taken(5, 1, S / 1000, 10_000);
        assert!((50..=51).contains(&got), "{got}");
    }

    #[test]
    fn a_quiet_endpoint_regains_its_burst_and_no_more() {
        let mut b = events::first(0, 3);
        assert!(events::take(&mut b, 0, 1, 3));
        assert!(events::take(&mut b, 0, 1, 3));
        assert!(!events::take(&mut b, 0, 1, 3), "burst of 3 spent");
        // An hour later: three again, not 3600.
        let later = 3600 * S;
        for i in 0..3 {
            assert!(events::take(&mut b, later, 1, 3), "event {i}");
        }
        assert!(!events::take(&mut b, later, 1, 3));
        // A year later, at the highest rate: no overflow, still the burst.
        let much_later = later + 365 * 24 * 3600 * S;
        let mut n = 0;
        while events::take(&mut b, much_later, u32::MAX, 3) {
            n += 1;
            assert!(n <= 3);
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn zero_means_the_defaults_and_large_values_are_capped() {
        assert_eq!(events::rate(0), u64::from(events::DEFAULT_RATE));
        assert_eq!(events::burst(0), u64::from(events::DEFAULT_BURST));
        assert_eq!(events::rate(u32::MAX), u64::from(events::MAX_RATE));
        assert_eq!(events::burst(u32::MAX), u64::from(events::MAX_BURST));
        let got = taken(0, 0, S / 100, 1000);
        assert!((50 + 99..=50 + 100).contains(&got), "defaults: {got}");
    }

    #[test]
    fn time_going_backwards_refills_nothing() {
        let mut b = events::first(10 * S, 1);
        assert!(!events::take(&mut b, 5 * S, 1, 1));
        assert!(events::take(&mut b, 6 * S, 1, 1));
    }
}
