//! Reference classifiers for `cargo xtask bench datapath` (feature `bench`
//! only): the floor (return at once) and the cost of parsing the same
//! headers plus one hash lookup, against which `from_pod`/`to_pod` are
//! measured.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

use crate::{ctx, endpoint, parse};

/// Returns at once.
#[classifier]
pub fn bench_ok(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Parses like the real programs and does one hash-map lookup.
#[classifier]
pub fn bench_lookup(ctx: TcContext) -> i32 {
    let Some(pkt) = crate::packet::fresh(netpol_common::scratch::SLOT_TC) else {
        return TC_ACT_OK;
    };
    let parsed = parse::packet(&ctx, pkt);
    // The table itself: `endpoint::lookup` would read the per-CPU copy.
    let found = endpoint::from_table(ctx::ifindex(&ctx)).is_some();
    // Use both results so that neither is optimised away.
    if matches!(parsed, parse::Parsed::Ip) && found && pkt.dport == 0 {
        return TC_ACT_OK + 1;
    }
    TC_ACT_OK
}
