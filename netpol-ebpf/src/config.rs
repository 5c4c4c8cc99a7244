//! The agent's settings: the one [`GlobalConfig`] in `NETPOL_CONFIG`,
//! read in place, and the flags the programs act on.
use netpol_common::{GlobalConfig, config_flags};

use crate::maps::NETPOL_CONFIG;

/// The agent's settings, in place; all-zero (the defaults) until it
/// writes them. Always `Some` (an array's entries always exist); the
/// verifier wants the check.
#[inline(always)]
pub fn get() -> Option<&'static GlobalConfig> {
    NETPOL_CONFIG.get(0)
}

/// Whether pod interfaces the agent has not programmed yet pass
/// everything (the new-pods mode).
#[inline(always)]
pub const fn new_pods_fail_open(cfg: &GlobalConfig) -> bool {
    cfg.flags & config_flags::NEW_PODS_FAIL_OPEN != 0
}

/// Benchmarks only: whether admitted connections go unrecorded
/// ([`config_flags::BENCH_NO_TRACK`]).
#[cfg(feature = "bench")]
#[inline(always)]
pub fn bench_no_track() -> bool {
    get().is_some_and(|c| c.flags & config_flags::BENCH_NO_TRACK != 0)
}
