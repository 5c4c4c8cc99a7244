//! The programs' counters, summed over CPUs, and the names of their
//! directions and families.

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray};
use netpol_common::{COUNTER_ENTRIES, TrafficCounter, direction, family, maps, reason};

use super::{DatapathError, map_err};

/// One counter slot, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterEntry {
    /// `netpol_common::direction`.
    pub direction: u32,
    /// `netpol_common::family`.
    pub family: u32,
    /// `netpol_common::reason`.
    pub reason: u32,
    /// Packets and bytes.
    pub value: TrafficCounter,
}

/// Every non-zero counter slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Non-zero slots, ordered by direction, family, reason.
    pub entries: Vec<CounterEntry>,
}

impl Counters {
    /// Reads the counters from the map pinned in `pin_dir` (another agent's
    /// or this one's), e.g. for `netpol-agent stats`.
    ///
    /// # Errors
    /// When the pin is missing or not netpol's counter map.
    pub fn read_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let data = MapData::from_pin(pin_dir.join(maps::COUNTERS)).map_err(map_err)?;
        let map = Map::from_map_data(data).map_err(map_err)?;
        let array = PerCpuArray::<_, TrafficCounter>::try_from(map).map_err(map_err)?;
        Self::read(&array)
    }

    pub(crate) fn read<T: std::borrow::Borrow<MapData>>(
        array: &PerCpuArray<T, TrafficCounter>,
    ) -> Result<Self, DatapathError> {
        let mut entries = Vec::new();
        for d in 0..direction::COUNT {
            for f in 0..family::COUNT {
                for r in 0..reason::SLOTS {
                    let index = netpol_common::counter_index(d, f, r);
                    debug_assert!(index < COUNTER_ENTRIES);
                    let per_cpu = array.get(&index, 0).map_err(map_err)?;
                    let mut sum = TrafficCounter::default();
                    for v in per_cpu.iter() {
                        sum.packets += v.packets;
                        sum.bytes += v.bytes;
                    }
                    if sum != TrafficCounter::default() {
                        entries.push(CounterEntry {
                            direction: d,
                            family: f,
                            reason: r,
                            value: sum,
                        });
                    }
                }
            }
        }
        Ok(Self { entries })
    }

    /// Sum over reasons of one direction and family.
    #[must_use]
    pub fn total(&self, direction: u32, family: u32) -> TrafficCounter {
        self.entries
            .iter()
            .filter(|e| e.direction == direction && e.family == family)
            .fold(TrafficCounter::default(), |mut acc, e| {
                acc.packets += e.value.packets;
                acc.bytes += e.value.bytes;
                acc
            })
    }
}

/// Human name of a direction.
#[must_use]
pub const fn direction_name(d: u32) -> &'static str {
    direction::name(d)
}

/// Human name of a family.
#[must_use]
pub const fn family_name(f: u32) -> &'static str {
    family::name(f)
}
