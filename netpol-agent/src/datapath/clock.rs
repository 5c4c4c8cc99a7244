//! The programs' clock. Conntrack stamps every packet's entry with the
//! time; `bpf_ktime_get_ns` reads the clock source for it, which on a VM
//! costs about a tenth of the programs' time per short connection.
//! `bpf_jiffies64` reads a variable instead; what it lacks is a unit and an
//! origin, which the agent measures here: the length of a jiffy (from the
//! kernel's `HZ`) and the `CLOCK_MONOTONIC` time of jiffy 0, so the
//! programs' timestamps stay on the clock `inspect` reads. Cilium does the
//! same (`bpf_mono_now`, its probed `KERNEL_HZ`).
//!
//! The source is `/proc/timer_list` (root only), whose `jiffies:` line is
//! read in its first few kilobytes, polled until a few jiffy boundaries
//! have been timed: `HZ` follows from where jiffies stand since the kernel
//! started ([`hz_since_boot`]) or, around 300 s of uptime where that is
//! blind, from their rate ([`hz_of`]). The origin is the tightest bound
//! the reads give: a jiffy seen by a read had begun by the read's end, so
//! every read bounds the origin from above, also when the tick runs late
//! (a busy or emulated machine), and the smallest bound is the surest.
//!
//! Jiffies follow the timekeeping clock but only as often as the tick is
//! handled, so under steal time or a stalled vCPU they lag it for a
//! while, and an origin measured in such a moment is off for good. So
//! the agent keeps [`Watch`]ing: a sample whose jiffy lies wholly after
//! the read (the programs ahead of `CLOCK_MONOTONIC`), or lags it by more
//! than a tolerance sample after sample, has the clock measured again;
//! when that fails the programs read the clock source. Without the file
//! they do from the start ([`JiffyClock::NONE`]).
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
#[expect(
    clippy::cast_precision_loss,
    reason = "a rate within 10% of a HZ choice needs far fewer than 52 bits"
)]
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

/// The kernel's jiffies now, from `/proc/timer_list` (root only): the
/// counter `bpf_jiffies64` reads.
#[must_use]
pub fn read_jiffies() -> Option<u64> {
    let f = std::fs::File::open("/proc/timer_list").ok()?;
    jiffies_in(BufReader::new(f))
}

/// One read of the jiffies between two reads of `CLOCK_MONOTONIC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// `CLOCK_MONOTONIC` just before the read.
    pub before_ns: u64,
    /// The jiffies the read saw.
    pub jiffies: u64,
    /// `CLOCK_MONOTONIC` just after the read.
    pub after_ns: u64,
}

impl Sample {
    /// Reads the jiffies now; `None` without `/proc/timer_list`.
    #[must_use]
    pub fn take() -> Option<Self> {
        let before_ns = crate::inspect::monotonic_ns();
        let jiffies = read_jiffies()?;
        let after_ns = crate::inspect::monotonic_ns();
        Some(Self {
            before_ns,
            jiffies,
            after_ns,
        })
    }
}

/// Times jiffy boundaries over [`SPAN`] and places jiffies on
/// `CLOCK_MONOTONIC`; `None` when the file is missing or the reads are
/// too slow to time them within [`LIMIT`].
#[must_use]
pub fn measure() -> Option<JiffyClock> {
    measure_from(Sample::take)
}

/// [`measure`] over the samples `next` takes.
fn measure_from(mut next: impl FnMut() -> Option<Sample>) -> Option<JiffyClock> {
    let start = Instant::now();
    let mut prev = next()?;
    // The first read that saw a new jiffy, and how wide the window it
    // was seen in was (from the read before it, which did not see it).
    let mut first: Option<Sample> = None;
    let mut widest = 0;
    // Every read bounds the origin from above (`after - jiffies × len`):
    // kept in jiffies' terms until `HZ` is known.
    let mut reads = vec![prev];
    loop {
        if start.elapsed() > LIMIT {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
        let s = next()?;
        reads.push(s);
        if s.jiffies == prev.jiffies {
            prev = s;
            continue;
        }
        widest = widest.max(s.after_ns.saturating_sub(prev.before_ns));
        prev = s;
        let Some(f) = first else {
            first = Some(s);
            continue;
        };
        let (ticks, span) = (
            s.jiffies.checked_sub(f.jiffies)?,
            s.after_ns.checked_sub(f.after_ns)?,
        );
        if ticks >= TICKS
            && span
                >= u64::try_from(SPAN.as_nanos())
                    .unwrap_or(u64::MAX)
                    .max(40 * widest)
        {
            // The kernel's start is the surer witness; the rate decides
            // only around 300 s of uptime.
            let hz = hz_since_boot(s.jiffies, s.after_ns).or_else(|| hz_of(ticks, span))?;
            return Some(JiffyClock::bounded(hz, &reads));
        }
    }
}

impl JiffyClock {
    /// The clock of `hz` whose origin is the tightest of the bounds
    /// `reads` give; its error is the width of the read that gave it.
    fn bounded(hz: u64, reads: &[Sample]) -> Self {
        let len = 1_000_000_000 / hz.max(1);
        let bound = |r: &Sample| r.after_ns.wrapping_sub(r.jiffies.wrapping_mul(len));
        let Some(base) = reads.first().map(bound) else {
            return Self::NONE;
        };
        // The bounds lie within a few jiffies of each other; compared as
        // signed distances from the first they never meet the wrap.
        let Some(best) = reads
            .iter()
            .min_by_key(|r| bound(r).wrapping_sub(base).cast_signed())
            .copied()
        else {
            return Self::NONE;
        };
        let width = best.after_ns.saturating_sub(best.before_ns);
        Self::new(hz, best.jiffies, best.after_ns, width)
    }

    /// How far this clock puts a sample's jiffy from when the sample was
    /// taken (see [`Skew`]); `None` for [`JiffyClock::NONE`].
    #[must_use]
    pub fn skew(&self, s: &Sample) -> Option<Skew> {
        if self.jiffy_ns == 0 {
            return None;
        }
        let begins = self.at(s.jiffies);
        let ends = begins.wrapping_add(u64::from(self.jiffy_ns));
        // Wrapping differences read as signed: both clocks are within
        // centuries of each other.
        let signed = |d: u64| d.cast_signed();
        Some(Skew {
            ahead_ns: signed(begins.wrapping_sub(s.after_ns)),
            behind_ns: signed(s.before_ns.wrapping_sub(ends)),
        })
    }
}

/// How a sample's jiffy, as a [`JiffyClock`] places it, sits against the
/// read that saw it. On a right clock both are ≤ 0 but for the origin's
/// error; `behind_ns` grows for a while whenever the tick runs late.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Skew {
    /// How long after the read ended the jiffy begins: never, on a right
    /// clock, as a jiffy is seen only once it has begun.
    pub ahead_ns: i64,
    /// How long before the read began the jiffy had ended: the tick's
    /// lateness, or an origin placed too early.
    pub behind_ns: i64,
}

/// How often the agent samples the programs' clock.
pub const WATCH_EVERY: Duration = Duration::from_secs(10);
/// Skew past which a sample counts against the clock, beyond the
/// origin's error: more than any tick runs late on a healthy machine.
pub const TOLERANCE: Duration = Duration::from_millis(50);
/// Samples in a row lagging past the tolerance before the clock is
/// measured again (a late tick is transient; a wrong origin is not).
pub const LAGGING_SAMPLES: u32 = 3;

/// Watches the programs' clock against `CLOCK_MONOTONIC`, sample by
/// sample, and says when to measure it again.
#[derive(Clone, Copy, Debug)]
pub struct Watch {
    clock: JiffyClock,
    lagging: u32,
}

/// What a [`Watch`] makes of a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within tolerance (or no jiffy clock to watch).
    InStep,
    /// Lagging past tolerance, not yet for [`LAGGING_SAMPLES`] in a row.
    Lagging(Skew),
    /// Measure again: ahead, or lagging for long.
    Remeasure(Skew),
}

impl Watch {
    /// Watches `clock`.
    #[must_use]
    pub const fn new(clock: JiffyClock) -> Self {
        Self { clock, lagging: 0 }
    }

    /// The clock watched.
    #[must_use]
    pub const fn clock(&self) -> JiffyClock {
        self.clock
    }

    /// Judges one sample.
    pub fn observe(&mut self, s: &Sample) -> Verdict {
        let Some(skew) = self.clock.skew(s) else {
            return Verdict::InStep;
        };
        // The sample's own width and the origin's error are what the
        // clock cannot tell apart from skew.
        let slack = i64::try_from(
            u64::try_from(TOLERANCE.as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_add(self.clock.error_ns)
                .saturating_add(s.after_ns.saturating_sub(s.before_ns)),
        )
        .unwrap_or(i64::MAX);
        if skew.ahead_ns > slack {
            self.lagging = 0;
            return Verdict::Remeasure(skew);
        }
        if skew.behind_ns > slack {
            self.lagging += 1;
            if self.lagging >= LAGGING_SAMPLES {
                self.lagging = 0;
                return Verdict::Remeasure(skew);
            }
            return Verdict::Lagging(skew);
        }
        self.lagging = 0;
        Verdict::InStep
    }
}

/// Samples the programs' clock every [`WATCH_EVERY`], off the async
/// runtime's threads, and hands `remeasured` the clock measured again
/// whenever the [`Watch`] asks ([`JiffyClock::NONE`] when measuring
/// fails: the programs then read the clock source, and there is nothing
/// left to watch). Ends when `remeasured` returns false.
pub async fn watch(initial: JiffyClock, mut remeasured: impl FnMut(JiffyClock, Skew) -> bool) {
    let mut w = Watch::new(initial);
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once; the clock was just measured.
    tick.tick().await;
    while w.clock().jiffy_ns != 0 {
        tick.tick().await;
        let Ok(Some(sample)) = tokio::task::spawn_blocking(Sample::take).await else {
            continue;
        };
        match w.observe(&sample) {
            Verdict::InStep => {}
            Verdict::Lagging(skew) => {
                tracing::debug!(
                    behind_ns = skew.behind_ns,
                    "conntrack clock: jiffies lag CLOCK_MONOTONIC"
                );
            }
            Verdict::Remeasure(skew) => {
                let new = tokio::task::spawn_blocking(measure)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(JiffyClock::NONE);
                w = Watch::new(new);
                if !remeasured(new, skew) {
                    return;
                }
            }
        }
    }
}

/// This machine's jiffy clock, measured on first use in this process
/// (some 50 ms); [`JiffyClock::NONE`] when it cannot be. A datapath
/// starts from it and keeps its own when it measures again.
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

    /// Reads of a HZ=250 clock whose origin is `origin`: each sees the
    /// jiffy `late_ns` after it began (a late tick), and takes `width_ns`.
    fn reads(origin: u64, at: &[(u64, u64)], width_ns: u64) -> Vec<Sample> {
        at.iter()
            .map(|&(before_ns, late_ns)| {
                let seen = before_ns - late_ns;
                Sample {
                    before_ns,
                    jiffies: (seen - origin) / 4_000_000,
                    after_ns: before_ns + width_ns,
                }
            })
            .collect()
    }

    #[test]
    fn the_origin_is_the_tightest_bound_late_ticks_included() {
        let origin = 1_000_000;
        // The prompt read, just after a boundary, wins over late ones.
        let r = reads(
            origin,
            &[
                (50_000_000, 3_000_000),
                (61_000_100, 0),
                (70_000_000, 9_000_000),
            ],
            50,
        );
        let c = JiffyClock::bounded(250, &r);
        assert_eq!(c.jiffy_ns, 4_000_000);
        assert!(
            c.offset_ns >= origin && c.offset_ns <= origin + 150,
            "{}",
            c.offset_ns
        );
        assert_eq!(c.error_ns, 50);
        // Only late reads: the origin errs late, never early.
        let r = reads(
            origin,
            &[(50_000_000, 2_500_000), (70_000_000, 2_200_000)],
            50,
        );
        let late = JiffyClock::bounded(250, &r);
        assert!(late.offset_ns > origin);
        assert_eq!(JiffyClock::bounded(250, &[]), JiffyClock::NONE);
    }

    #[test]
    fn measuring_times_several_boundaries() {
        // A clock ticking at HZ=250, read every 1 ms; 5 s past jiffies'
        // start at the kernel's: `hz_since_boot` decides.
        let start = (1u64 << 32) - 300 * 250;
        let origin = 0u64.wrapping_sub(start.wrapping_mul(4_000_000));
        let mut now = 5_000_000_000u64;
        let c = measure_from(|| {
            now += 1_000_000;
            Some(Sample {
                before_ns: now,
                jiffies: now.wrapping_sub(origin) / 4_000_000,
                after_ns: now + 10_000,
            })
        })
        .expect("measured");
        assert_eq!(c.jiffy_ns, 4_000_000);
        // Read 1 ms apart, the best read is at most 1 ms past a boundary.
        let off = c.offset_ns.wrapping_sub(origin).cast_signed();
        assert!((0..=1_010_000).contains(&off), "{off}");
        // No file: no clock.
        assert_eq!(measure_from(|| None), None);
    }

    #[test]
    fn the_watch_remeasures_a_clock_ahead_at_once_and_one_lagging_for_long() {
        let c = JiffyClock::new(250, 1000, 4_000_000_000, 0);
        // A sample inside its jiffy: in step.
        let at = |j: u64, now: u64| Sample {
            before_ns: now,
            jiffies: j,
            after_ns: now + 1000,
        };
        let mut w = Watch::new(c);
        assert_eq!(w.observe(&at(1000, 4_001_000_000)), Verdict::InStep);
        // A late tick for a moment (jiffy 1000 seen 30 ms after it ended):
        // within tolerance.
        assert_eq!(w.observe(&at(1000, 4_034_000_000)), Verdict::InStep);
        // The jiffy lies a second after the read: ahead, measure now.
        let v = w.observe(&at(1250, 4_000_000_000));
        assert!(
            matches!(v, Verdict::Remeasure(s) if s.ahead_ns > 900_000_000),
            "{v:?}"
        );
        // Lagging a second, three samples in a row; a sample in step
        // between starts the count again.
        let lag = |w: &mut Watch, j: u64| w.observe(&at(j, (j - 1000) * 4_000_000 + 5_000_000_000));
        assert!(matches!(lag(&mut w, 2000), Verdict::Lagging(_)));
        assert!(matches!(lag(&mut w, 2001), Verdict::Lagging(_)));
        assert_eq!(w.observe(&at(3000, 12_001_000_000)), Verdict::InStep);
        assert!(matches!(lag(&mut w, 3001), Verdict::Lagging(_)));
        assert!(matches!(lag(&mut w, 3002), Verdict::Lagging(_)));
        let v = lag(&mut w, 3003);
        assert!(
            matches!(v, Verdict::Remeasure(s) if s.behind_ns > 900_000_000),
            "{v:?}"
        );
        // Nothing to watch without a jiffy clock.
        assert_eq!(
            Watch::new(JiffyClock::NONE).observe(&at(1, 1)),
            Verdict::InStep
        );
    }

    #[test]
    fn the_first_jiffies_line_of_timer_list_is_read() {
        let text = "Timer List Version: v0.10\nnow at 24563265620297 nsecs\n\ncpu: 0\n  .idle_jiffies   : 4301033044\njiffies: 4301033049\njiffies: 4301033050\n";
        assert_eq!(jiffies_in(text.as_bytes()), Some(4_301_033_049));
        assert_eq!(jiffies_in("cpu: 0\n".as_bytes()), None);
    }
}
