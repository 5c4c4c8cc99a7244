//! The programs' clock. Conntrack stamps every packet's entry with the
//! time; `bpf_ktime_get_ns` reads the clock source for it, which on a VM
//! costs about a tenth of the programs' time per short connection.
//! `bpf_jiffies64` reads a variable instead; what it lacks is a unit and an
//! origin, which the agent measures here once per process: the length of
//! a jiffy (from the kernel's `HZ`) and the `CLOCK_MONOTONIC` time of jiffy
//! 0, so the programs' timestamps stay on the clock `inspect` reads.
//! Cilium does the same (`bpf_mono_now`, its probed `KERNEL_HZ`).
//!
//! The source is `/proc/timer_list` (root only), whose `jiffies:` line is
//! read in its first few kilobytes, polled until a few jiffy boundaries
//! have been timed: `HZ` follows from where jiffies stand since the kernel
//! started ([`hz_since_boot`]) or, around 300 s of uptime where that is
//! blind, from their rate ([`hz_of`]); the origin from the last boundary.
//! Without the file the programs keep `bpf_ktime_get_ns`
//! ([`JiffyClock::NONE`]).
use std::{
    io::{BufRead, BufReader},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// `HZ` values Linux is built with.
const HZ_CHOICES: [u64; 5] = [100, 250, 300, 1000, 1200];
/// Jiffy boundaries are timed over at least this long, this many jiffies,
/// and forty times the widest window a boundary was seen in (a slow
/// `/proc` read, an emulated machine): each boundary's time is known to
/// within its window, so the rate is known to 2.5%, well within the 17%
/// between the nearest `HZ` choices (250, 300).
const SPAN: Duration = Duration::from_millis(50);
const TICKS: u64 = 3;
/// Give up after this long (a stalled clock, or reads so slow that the
/// span they need does not fit: an emulated machine under load).
const LIMIT: Duration = Duration::from_secs(5);

/// How the programs turn jiffies into `CLOCK_MONOTONIC` ns
/// (`GlobalConfig::clock_jiffy_ns` / `clock_offset_ns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JiffyClock {
    /// 0: the programs read `bpf_ktime_get_ns`.
    pub jiffy_ns: u32,
    /// Monotonic ns at jiffy 0, wrapping.
    pub offset_ns: u64,
    /// How far off `offset_ns` may be, either way: half the window the
    /// last timed boundary was seen in.
    pub error_ns: u64,
}

impl JiffyClock {
    /// No jiffy clock: the programs read the clock source.
    pub const NONE: Self = Self {
        jiffy_ns: 0,
        offset_ns: 0,
        error_ns: 0,
    };

    /// The clock that puts jiffy `jiffies`, seen to begin at monotonic
    /// `at_ns` (± `error_ns`), on `CLOCK_MONOTONIC`, given the kernel's
    /// `hz`.
    #[must_use]
    pub fn new(hz: u64, jiffies: u64, at_ns: u64, error_ns: u64) -> Self {
        let jiffy_ns = 1_000_000_000 / hz.max(1);
        Self {
            jiffy_ns: u32::try_from(jiffy_ns).unwrap_or(0),
            offset_ns: at_ns.wrapping_sub(jiffies.wrapping_mul(jiffy_ns)),
            error_ns,
        }
    }

    /// `jiffies` in monotonic ns, as the programs compute it.
    #[must_use]
    pub const fn at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.jiffy_ns as u64)
            .wrapping_add(self.offset_ns)
    }
}

/// The `HZ` that `ticks` jiffies in `span_ns` come from, if it is one Linux
/// is built with (within 10%).
#[must_use]
pub fn hz_of(ticks: u64, span_ns: u64) -> Option<u64> {
    if ticks == 0 || span_ns == 0 {
        return None;
    }
    let measured = ticks as f64 * 1e9 / span_ns as f64;
    HZ_CHOICES
        .iter()
        .copied()
        .min_by(|a, b| {
            (*a as f64 - measured)
                .abs()
                .total_cmp(&(*b as f64 - measured).abs())
        })
        .filter(|&hz| (hz as f64 - measured).abs() <= hz as f64 * 0.1)
}

/// The `HZ` that `jiffies` at monotonic `mono_ns` come from by the kernel's
/// own start: jiffies begin at `INITIAL_JIFFIES`, 2³² − 300·`HZ` on 64-bit
/// kernels, when the monotonic clock begins at 0. Decisive unless the
/// machine has been up for about 300 s, when every `HZ` predicts 2³².
#[must_use]
pub fn hz_since_boot(jiffies: u64, mono_ns: u64) -> Option<u64> {
    let residual = |hz: u64| {
        let predicted = (1u128 << 32) - u128::from(300 * hz)
            + u128::from(mono_ns) * u128::from(hz) / 1_000_000_000;
        u128::from(jiffies).abs_diff(predicted)
    };
    let mut by_fit: Vec<(u128, u64)> = HZ_CHOICES.iter().map(|&hz| (residual(hz), hz)).collect();
    by_fit.sort_unstable();
    let ((best, hz), (second, _)) = (by_fit[0], by_fit[1]);
    // Jiffies start a little after the clock (a fraction of a second):
    // within 2 s of the prediction, and far closer than any other `HZ`.
    (best < 2 * u128::from(hz) && second > 10 * best + 10 * u128::from(hz)).then_some(hz)
}

/// The first `jiffies:` value of a `/proc/timer_list` text.
pub fn jiffies_in(text: impl BufRead) -> Option<u64> {
    text.lines().map_while(Result::ok).find_map(|l| {
        l.strip_prefix("jiffies:")
            .and_then(|v| v.trim().parse().ok())
    })
}

fn read_jiffies() -> Option<u64> {
    let f = std::fs::File::open("/proc/timer_list").ok()?;
    jiffies_in(BufReader::new(f))
}

/// A jiffy boundary: the jiffy that began, the middle of the window it
/// was seen to begin in, and half that window.
#[derive(Clone, Copy)]
struct Edge {
    jiffies: u64,
    at_ns: u64,
    error_ns: u64,
}

/// Times jiffy boundaries over [`SPAN`]: the first boundary seen and the
/// last.
fn measure() -> Option<JiffyClock> {
    let now = crate::inspect::monotonic_ns;
    let start = Instant::now();
    let mut last = read_jiffies()?;
    let mut read_before = now();
    let mut first: Option<Edge> = None;
    let mut widest = 0;
    loop {
        if start.elapsed() > LIMIT {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
        let before = now();
        let j = read_jiffies()?;
        let after = now();
        // The previous read saw the old jiffy no earlier than it began.
        let window = after.saturating_sub(read_before);
        read_before = before;
        if j == last {
            continue;
        }
        last = j;
        let edge = Edge {
            jiffies: j,
            at_ns: after - window / 2,
            error_ns: window / 2,
        };
        widest = widest.max(window);
        let Some(f) = first else {
            first = Some(edge);
            continue;
        };
        let (ticks, span) = (
            edge.jiffies.checked_sub(f.jiffies)?,
            edge.at_ns.checked_sub(f.at_ns)?,
        );
        if ticks >= TICKS && span >= (SPAN.as_nanos() as u64).max(40 * widest) {
            // The kernel's start is the surer witness; the rate decides
            // only around 300 s of uptime.
            let hz = hz_since_boot(edge.jiffies, edge.at_ns).or_else(|| hz_of(ticks, span))?;
            return Some(JiffyClock::new(hz, edge.jiffies, edge.at_ns, edge.error_ns));
        }
    }
}

/// This machine's jiffy clock, measured on first use (some 50 ms); [`JiffyClock::NONE`] when it cannot be.
pub fn jiffy_clock() -> JiffyClock {
    static CLOCK: OnceLock<JiffyClock> = OnceLock::new();
    *CLOCK.get_or_init(|| {
        let clock = measure();
        if let Some(c) = clock {
            tracing::debug!(
                jiffy_ns = c.jiffy_ns,
                error_ns = c.error_ns,
                "conntrack clock: jiffies"
            );
        }
        clock.unwrap_or_else(|| {
            tracing::info!(
                "jiffies not measurable (/proc/timer_list): conntrack reads the clock source"
            );
            JiffyClock::NONE
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hz_is_the_nearest_linux_value_within_a_tenth() {
        assert_eq!(hz_of(3, 12_000_000), Some(250));
        assert_eq!(hz_of(3, 10_100_000), Some(300));
        assert_eq!(hz_of(3, 30_000_000), Some(100));
        assert_eq!(hz_of(30, 30_500_000), Some(1000));
        assert_eq!(hz_of(3, 18_000_000), None, "167 Hz is no HZ");
        assert_eq!(hz_of(0, 1), None);
    }

    #[test]
    fn hz_follows_from_jiffies_since_the_kernel_started() {
        // Read on a HZ=250 machine, 24542 s up.
        assert_eq!(hz_since_boot(4_301_027_716, 24_541_929_369_188), Some(250));
        // 60 s up at HZ=1000 and 300.
        let at = |hz: u64, secs: u64| (1u64 << 32) - 300 * hz + secs * hz - hz / 10;
        assert_eq!(hz_since_boot(at(1000, 60), 60_000_000_000), Some(1000));
        assert_eq!(hz_since_boot(at(300, 60), 60_000_000_000), Some(300));
        // About 300 s up: every HZ fits, none is chosen.
        assert_eq!(hz_since_boot(1 << 32, 300_000_000_000), None);
    }

    #[test]
    fn jiffies_are_placed_on_the_monotonic_clock() {
        let c = JiffyClock::new(250, 4_301_027_716, 24_541_929_369_188, 0);
        assert_eq!(c.jiffy_ns, 4_000_000);
        assert_eq!(c.at(4_301_027_716), 24_541_929_369_188);
        assert_eq!(c.at(4_301_027_717), 24_541_933_369_188);
        // jiffies × 4 ms exceeds the monotonic time (jiffies start near
        // 2³²): the offset wraps and the sum comes back.
        assert!(c.offset_ns > 1 << 63);
    }

    #[test]
    fn the_first_jiffies_line_of_timer_list_is_read() {
        let text = "Timer List Version: v0.10\nnow at 24563265620297 nsecs\n\ncpu: 0\n  .idle_jiffies   : 4301033044\njiffies: 4301033049\njiffies: 4301033050\n";
        assert_eq!(jiffies_in(text.as_bytes()), Some(4_301_033_049));
        assert_eq!(jiffies_in("cpu: 0\n".as_bytes()), None);
    }
}
