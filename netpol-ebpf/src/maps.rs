//! The maps of the object. Key and value types live in `netpol-common`.
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use netpol_common::{COUNTER_ENTRIES, TrafficCounter};

/// Packets and bytes by direction, family and reason (`counter_index`).
#[btf_map]
pub static NETPOL_COUNTERS: PerCpuArray<TrafficCounter, { COUNTER_ENTRIES as usize }> =
    PerCpuArray::new();
