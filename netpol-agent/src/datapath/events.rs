//! What the programs report besides their verdicts: deny events on the
//! `NETPOL_EVENTS` ring buffer, the packet counters and the events lost
//! (see `netpol_common::events`). Read through handles of their own, so
//! that telemetry reads them while the sync loop owns the [`Datapath`].
use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray, RingBuf};
use netpol_common::{DenyEvent, TrafficCounter, events, maps};

use super::{Counters, Datapath, DatapathError};

/// Deny events not emitted, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventsLost {
    /// Refused by the endpoint's rate limit.
    pub rate_limited: u64,
    /// The ring buffer was full.
    pub ring_full: u64,
}

/// Handles on the counter maps pinned in a folder: the packet counters
/// and the events lost.
pub struct KernelCounters {
    counters: PerCpuArray<MapData, TrafficCounter>,
    lost: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelCounters").finish_non_exhaustive()
    }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        source: Box::new(source),
    }
}

fn pinned(pin_dir: &Path, name: &'static str) -> Result<Map, DatapathError> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

impl KernelCounters {
    /// Opens the maps pinned in `pin_dir` (this agent's, another's, or
    /// those a dead agent left).
    ///
    /// # Errors
    /// When a pin is missing or not the map netpol pins there.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            counters: PerCpuArray::try_from(pinned(pin_dir, maps::COUNTERS)?)
                .map_err(map_err(maps::COUNTERS))?,
            lost: PerCpuArray::try_from(pinned(pin_dir, maps::EVENTS_LOST)?)
                .map_err(map_err(maps::EVENTS_LOST))?,
        })
    }

    /// Every non-zero packet counter.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        Counters::read(&self.counters)
    }

    /// Deny events lost so far.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn lost(&self) -> Result<EventsLost, DatapathError> {
        let sum = |slot: u32| -> Result<u64, DatapathError> {
            let per_cpu = self
                .lost
                .get(&slot, 0)
                .map_err(map_err(maps::EVENTS_LOST))?;
            Ok(per_cpu.iter().sum())
        };
        Ok(EventsLost {
            rate_limited: sum(events::LOST_RATE_LIMITED)?,
            ring_full: sum(events::LOST_RING_FULL)?,
        })
    }
}

impl Datapath {
    /// Takes the deny-event ring buffer out of the datapath, for its one
    /// reader (a ring buffer has a single consumer position).
    ///
    /// # Errors
    /// When it was taken already, or is not a ring buffer.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        super::take_map(&mut self.ebpf, maps::EVENTS)
    }

    /// Handles on this datapath's counter maps, independent of it.
    ///
    /// # Errors
    /// See [`KernelCounters::open`].
    pub fn kernel_counters(&self) -> Result<KernelCounters, DatapathError> {
        KernelCounters::open(&self.pin_dir)
    }
}

/// An event record as the ring buffer holds it; `None` when it is too
/// short to be one (another writer, a future layout).
#[must_use]
pub fn decode(record: &[u8]) -> Option<DenyEvent> {
    if record.len() < size_of::<DenyEvent>() {
        return None;
    }
    // SAFETY: the record holds at least size_of::<DenyEvent>() bytes (just
    // checked); DenyEvent is repr(C) with integer fields only, so every
    // byte pattern is a value, and read_unaligned needs no alignment.
    Some(unsafe { record.as_ptr().cast::<DenyEvent>().read_unaligned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_record_decodes_field_by_field_and_a_short_one_does_not() {
        let e = DenyEvent {
            timestamp_ns: 7,
            endpoint: 3,
            ifindex: 9,
            reason: netpol_common::reason::DROP_POLICY,
            direction: 1,
            family: 1,
            protocol: 17,
            icmp_type: 0,
            sport: 4000,
            dport: 53,
            src: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            _pad: 0,
        };
        // SAFETY: viewing a repr(C) value without padding as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(&e).cast::<u8>(), size_of::<DenyEvent>())
        };
        // Ring records start 8-byte aligned; an offset copy must decode too.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(bytes);
        assert_eq!(decode(bytes), Some(e));
        assert_eq!(decode(&shifted[1..]), Some(e));
        assert_eq!(decode(&bytes[..40]), None);
    }
}
