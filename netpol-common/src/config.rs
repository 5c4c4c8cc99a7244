//! The agent's settings: the one [`GlobalConfig`] in [`maps::CONFIG`] and its
//! flags.
use core::mem::offset_of;

use crate::{ct_defaults, protocol, tcp_state};
#[cfg(doc)]
use crate::{events, maps, mark};

/// Flags of [`GlobalConfig::flags`].
pub mod config_flags {
    /// Pod interfaces the agent has not programmed yet pass everything
    /// (otherwise only neighbour discovery and node traffic pass).
    pub const NEW_PODS_FAIL_OPEN: u32 = 1 << 0;
    /// Benchmarks only: do not record admitted connections, so that every
    /// repeat of a packet takes the new-flow path. Honoured only by the
    /// object built with the `bench` feature; the production object has no
    /// code reading it.
    pub const BENCH_NO_TRACK: u32 = 1 << 31;
}

/// The one entry of [`maps::CONFIG`], written by the agent at start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// [`config_flags`].
    pub flags: u32,
    /// Nanoseconds per jiffy (10⁹ / the kernel's `HZ`), measured by the
    /// agent: the programs' clock is then `bpf_jiffies64` scaled to
    /// `CLOCK_MONOTONIC` with [`GlobalConfig::clock_offset_ns`], a read of
    /// a variable where `bpf_ktime_get_ns` reads the clock source (a tenth
    /// of a connection's run time on a VM). 0: `bpf_ktime_get_ns`.
    pub clock_jiffy_ns: u32,
    /// Half-open TCP; 0: [`ct_defaults::TCP_SYN_NS`].
    pub ct_tcp_syn_ns: u64,
    /// Established TCP and SCTP; 0: [`ct_defaults::TCP_ESTABLISHED_NS`].
    pub ct_tcp_established_ns: u64,
    /// Closing TCP; 0: [`ct_defaults::TCP_CLOSING_NS`].
    pub ct_tcp_closing_ns: u64,
    /// UDP; 0: [`ct_defaults::UDP_NS`].
    pub ct_udp_ns: u64,
    /// Anything else; 0: [`ct_defaults::OTHER_NS`].
    pub ct_other_ns: u64,
    /// Bits of `skb->mark` netpol owns (see [`mark`]); 0: Service traffic
    /// is not marked, frontends are judged as plain destinations.
    pub mark_mask: u32,
    /// Position of the lowest bit of `mark_mask`.
    pub mark_shift: u32,
    /// Deny events per second each endpoint may emit; 0:
    /// [`events::DEFAULT_RATE`], above [`events::MAX_RATE`]: that.
    pub event_rate: u32,
    /// Deny events an endpoint may emit at once after a quiet spell; 0:
    /// [`events::DEFAULT_BURST`], above [`events::MAX_BURST`]: that.
    pub event_burst: u32,
    /// `CLOCK_MONOTONIC` ns at jiffy 0 (wrapping): the programs' clock is
    /// `jiffies × clock_jiffy_ns + clock_offset_ns`, mod 2⁶⁴.
    pub clock_offset_ns: u64,
    /// Allowed-connection records: one new connection in this many that a
    /// rule admits (`reason::PASS_POLICY`) is reported on the events ring,
    /// within the endpoint's own allowed-record rate limit
    /// ([`events::allowed_bucket`]); 0: none (the default).
    pub allowed_sample: u32,
    /// Always 0.
    pub _pad: u32,
}

impl GlobalConfig {
    /// The idle timeout of a tracked connection of `protocol` in
    /// `tcp_state` (a [`tcp_state`] value): the set field, else its
    /// [`ct_defaults`] value. The programs expire entries by it and
    /// `inspect` shows it.
    #[inline(always)]
    #[must_use]
    pub const fn ct_timeout_ns(&self, protocol: u8, tcp_state: u32) -> u64 {
        const fn pick(set: u64, default: u64) -> u64 {
            if set == 0 { default } else { set }
        }
        match (protocol, tcp_state) {
            (protocol::TCP, tcp_state::SYN_SENT) => {
                pick(self.ct_tcp_syn_ns, ct_defaults::TCP_SYN_NS)
            }
            (protocol::TCP, tcp_state::CLOSING) => {
                pick(self.ct_tcp_closing_ns, ct_defaults::TCP_CLOSING_NS)
            }
            (protocol::TCP | protocol::SCTP, _) => {
                pick(self.ct_tcp_established_ns, ct_defaults::TCP_ESTABLISHED_NS)
            }
            (protocol::UDP, _) => pick(self.ct_udp_ns, ct_defaults::UDP_NS),
            _ => pick(self.ct_other_ns, ct_defaults::OTHER_NS),
        }
    }
}

const _: () = {
    assert!(size_of::<GlobalConfig>() == 80);
    assert!(align_of::<GlobalConfig>() == 8);
    assert!(offset_of!(GlobalConfig, flags) == 0);
    assert!(offset_of!(GlobalConfig, clock_jiffy_ns) == 4);
    assert!(offset_of!(GlobalConfig, ct_tcp_syn_ns) == 8);
    assert!(offset_of!(GlobalConfig, ct_tcp_established_ns) == 16);
    assert!(offset_of!(GlobalConfig, ct_tcp_closing_ns) == 24);
    assert!(offset_of!(GlobalConfig, ct_udp_ns) == 32);
    assert!(offset_of!(GlobalConfig, ct_other_ns) == 40);
    assert!(offset_of!(GlobalConfig, mark_mask) == 48);
    assert!(offset_of!(GlobalConfig, mark_shift) == 52);
    assert!(offset_of!(GlobalConfig, event_rate) == 56);
    assert!(offset_of!(GlobalConfig, event_burst) == 60);
    assert!(offset_of!(GlobalConfig, clock_offset_ns) == 64);
    assert!(offset_of!(GlobalConfig, allowed_sample) == 72);
    assert!(offset_of!(GlobalConfig, _pad) == 76);
};
