//! `inspect counters`: the programs' counters, one row per slot.

use std::fmt::Write as _;

use netpol_agent::{Counters, datapath};
use netpol_common::reason;
use serde::Serialize;

#[derive(Serialize)]
pub(super) struct CounterRow {
    direction: &'static str,
    family: &'static str,
    reason: &'static str,
    packets: u64,
    bytes: u64,
}

pub(super) fn counters_doc(c: &Counters) -> Vec<CounterRow> {
    c.entries
        .iter()
        .map(|e| CounterRow {
            direction: datapath::direction_name(e.direction),
            family: datapath::family_name(e.family),
            reason: reason::name(e.reason),
            packets: e.value.packets,
            bytes: e.value.bytes,
        })
        .collect()
}

/// The counters as `netpol-agent stats` prints them.
pub fn counters_table(c: &Counters) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:<6} {:<22} {:>12} {:>14}",
        "DIR", "FAMILY", "REASON", "PACKETS", "BYTES"
    );
    for e in counters_doc(c) {
        let _ = writeln!(
            s,
            "{:<8} {:<6} {:<22} {:>12} {:>14}",
            e.direction, e.family, e.reason, e.packets, e.bytes
        );
    }
    s
}
