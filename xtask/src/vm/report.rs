//! Reading what a guest's `/init` wrote (libtest output between marker
//! lines) into one verdict per kernel.
use std::fmt::Write as _;

use super::initramfs::MARK;

/// Lines of a verifier log shown per failure.
const VERIFIER_TAIL: usize = 15;

/// One failed test: `suite::test` and what it printed.
#[derive(Debug)]
pub struct Failure {
    pub name: String,
    pub output: String,
}

/// A test that stopped early and said why (`@@netpol-vm skip <test>:
/// <why>`, written by the verdict tests' fixture on a kernel that cannot
/// run part of them).
#[derive(Debug, PartialEq, Eq)]
pub struct Skip {
    /// `suite::test`.
    pub name: String,
    pub why: String,
}

/// What one guest run showed.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Tests that passed, skipped ones not included.
    pub passed: usize,
    pub failed: Vec<Failure>,
    pub skipped: Vec<Skip>,
    /// Suites that never reported, or exited without a failed test.
    pub broken: Vec<String>,
    /// Whether `/init` got to the end.
    pub finished: bool,
    /// Seconds each suite took in the guest.
    pub durations: Vec<(String, f64)>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.finished && self.failed.is_empty() && self.broken.is_empty()
    }
}

/// Parses the results port of a guest that ran `suites`.
pub fn parse(text: &str, suites: &[&str]) -> Outcome {
    let mut out = Outcome::default();
    let mut seen = Vec::new();
    // The suite running: its name, output lines and skipped tests.
    let mut current: Option<(String, Vec<&str>, Vec<Skip>)> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        // A test's mark may land after what libtest began on the line
        // (`test x ... ` when it runs one test at a time).
        let (before, mark) = match line.find(MARK) {
            Some(at) => (&line[..at], Some(&line[at + MARK.len()..])),
            None => (line, None),
        };
        if (mark.is_none() || !before.is_empty())
            && let Some((_, lines, _)) = current.as_mut()
        {
            lines.push(before);
        }
        let Some(rest) = mark else {
            continue;
        };
        let rest = rest.trim();
        if let Some(name) = rest.strip_prefix("begin ") {
            current = Some((name.to_owned(), Vec::new(), Vec::new()));
        } else if let Some(skip) = rest.strip_prefix("skip ") {
            if let Some((suite, _, skips)) = current.as_mut() {
                let (test, why) = skip.split_once(": ").unwrap_or((skip, ""));
                skips.push(Skip {
                    name: format!("{suite}::{test}"),
                    why: why.to_owned(),
                });
            }
        } else if let Some(end) = rest.strip_prefix("end ") {
            let mut words = end.split_whitespace();
            let name = words.next().unwrap_or_default().to_owned();
            let field = |key: &str| {
                end.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or_default()
                    .to_owned()
            };
            let rc = field("rc=");
            if let (Ok(a), Ok(b)) = (field("start=").parse::<f64>(), field("end=").parse::<f64>()) {
                out.durations.push((name.clone(), b - a));
            }
            let (lines, skips) = current.take().map(|(_, l, s)| (l, s)).unwrap_or_default();
            suite(&mut out, &name, &lines, &rc, skips);
            seen.push(name);
        } else if rest == "done" {
            out.finished = true;
        } else if let Some(m) = rest.strip_prefix("insmod ") {
            out.broken.push(format!("insmod {m}"));
        }
    }
    if let Some((name, _, _)) = current {
        out.broken.push(format!("{name} (did not finish)"));
        seen.push(name);
    }
    for s in suites {
        if !seen.iter().any(|n| n == s) {
            out.broken.push(format!("{s} (never ran)"));
        }
    }
    out
}

fn suite(out: &mut Outcome, name: &str, lines: &[&str], rc: &str, skips: Vec<Skip>) {
    let mut failed_here = Vec::new();
    for line in lines {
        let Some(t) = line.strip_prefix("test ") else {
            continue;
        };
        if let Some(test) = t.strip_suffix(" ... ok") {
            let full = format!("{name}::{test}");
            if !skips.iter().any(|s| s.name == full) {
                out.passed += 1;
            }
        } else if let Some(test) = t.strip_suffix(" ... FAILED") {
            failed_here.push(test.to_owned());
        }
    }
    for test in &failed_here {
        out.failed.push(Failure {
            name: format!("{name}::{test}"),
            output: section(lines, test),
        });
    }
    out.skipped.extend(skips);
    if failed_here.is_empty() && rc != "0" {
        let tail: Vec<&str> = lines.iter().rev().take(20).rev().copied().collect();
        out.broken.push(format!(
            "{name} (exit {rc}, no failed test):\n      {}",
            tail.join("\n      ")
        ));
    }
}

/// What libtest printed for `test` under `---- <test> stdout ----`.
fn section(lines: &[&str], test: &str) -> String {
    let head = format!("---- {test} stdout ----");
    let mut out = String::new();
    let mut inside = false;
    for line in lines {
        if *line == head {
            inside = true;
            continue;
        }
        if inside && (line.starts_with("---- ") || *line == "failures:") {
            break;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// How the failures read in the summary: each one's panic line, and the
/// tail of its verifier log, shown once per distinct log (a rejected
/// program fails every test that loads the object; later failures with
/// the same log name the first instead).
pub fn describe_all(failed: &[Failure]) -> String {
    let mut s = String::new();
    let mut shown: Vec<(Vec<&str>, &str)> = Vec::new();
    for f in failed {
        let panic = f
            .output
            .lines()
            .skip_while(|l| !l.contains("panicked at"))
            .nth(1)
            .or_else(|| f.output.lines().find(|l| !l.trim().is_empty()))
            .unwrap_or("(no output)");
        let Some(tail) = verifier_tail(f) else {
            let _ = writeln!(s, "    {}: {}", f.name, clip(panic, 300));
            continue;
        };
        // The same log but for the time the verifier took.
        let same: Vec<&str> = tail
            .iter()
            .copied()
            .filter(|l| !l.trim_start().starts_with("verification time"))
            .collect();
        if let Some((_, first)) = shown.iter().find(|(k, _)| *k == same) {
            let _ = writeln!(s, "    {}: the verifier log of {first}", f.name);
            continue;
        }
        let _ = writeln!(s, "    {}: {}", f.name, clip(panic, 300));
        let _ = writeln!(s, "      verifier log (last {VERIFIER_TAIL} lines):");
        for l in &tail {
            let _ = writeln!(s, "        {}", clip(l, 300));
        }
        shown.push((same, &f.name));
    }
    s
}

/// The last [`VERIFIER_TAIL`] lines of the verifier log in a failure's
/// output, if it has one.
fn verifier_tail(f: &Failure) -> Option<Vec<&str>> {
    // aya prints the log after `Verifier output:` (Display) or
    // `verifier_log:` (Debug, what `expect` shows).
    let at = ["Verifier output:", "verifier_log:"]
        .iter()
        .filter_map(|m| f.output.find(m))
        .min()?;
    let log: Vec<&str> = f.output[at..]
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("note: run with"))
        .collect();
    Some(log[log.len().saturating_sub(VERIFIER_TAIL)..].to_vec())
}

fn clip(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "@@netpol-vm kernel 5.10.0-46-amd64
@@netpol-vm begin datapath_packets

running 2 tests
test a ... ok
test b ... FAILED

failures:

---- b stdout ----

thread '<unnamed>' (114) panicked at netpol-agent/tests/packets/mod.rs:156:33:
BPF_PROG_TEST_RUN of a 54-byte frame: `bpf_prog_test_run` failed
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace


failures:
    b

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s

@@netpol-vm end datapath_packets rc=101 start=2.0 end=9.5
@@netpol-vm begin datapath_smoke

running 1 test
test s ... FAILED

failures:

---- s stdout ----

thread '<unnamed>' (7) panicked at netpol-agent/tests/datapath_smoke.rs:80:6:
load: Program { name: \"to_pod\", source: LoadError { io_error: Os { code: 13 }, verifier_log: 0: (bf) r6 = r1
1: (b7) r0 = 0
R1 invalid mem access 'scalar'
processed 1000001 insns (limit 1000000)
 } }

failures:
    s

@@netpol-vm end datapath_smoke rc=101 start=9.5 end=12
@@netpol-vm done
";

    const SKIPPING: &str = "@@netpol-vm kernel 5.10.0-46-amd64
@@netpol-vm begin datapath_packets

running 4 tests
@@netpol-vm skip fwd: a forwarded packet through to_pod needs ingress_ifindex
test egress_only ... ok
test fwd ... ok
test from_node ... ok
test fwd_alone ... @@netpol-vm skip fwd_alone: the same
ok

test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s

@@netpol-vm end datapath_packets rc=0 start=2.0 end=9.5
@@netpol-vm done
";

    const SUITES: &[&str] = &["datapath_packets", "datapath_smoke"];

    #[test]
    fn failed_tests_are_named_by_suite_and_counted_apart() {
        let o = parse(RUN, SUITES);
        assert!(o.finished && !o.ok());
        assert_eq!(o.passed, 1);
        let names: Vec<&str> = o.failed.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["datapath_packets::b", "datapath_smoke::s"]);
        assert!(o.failed[0].output.contains("`bpf_prog_test_run` failed"));
        assert_eq!(o.durations[0], ("datapath_packets".into(), 7.5));
    }

    #[test]
    fn a_failure_shows_its_panic_and_the_verifier_log_tail() {
        let o = parse(RUN, SUITES);
        let d = describe_all(&o.failed[1..]);
        assert!(d.contains("datapath_smoke::s: load: Program"), "{d}");
        assert!(d.contains("verifier log"), "{d}");
        assert!(d.contains("processed 1000001 insns"), "{d}");
    }

    #[test]
    fn a_verifier_log_repeated_by_later_failures_is_shown_once() {
        let o = parse(RUN, SUITES);
        let first = &o.failed[1];
        let again = Failure {
            name: "datapath_packets::t".into(),
            output: first
                .output
                .replace("1: (b7)", "verification time 9 usec\n1: (b7)"),
        };
        let other = Failure {
            name: "datapath_packets::u".into(),
            output: first.output.replace("insns", "instructions"),
        };
        let d = describe_all(&[
            Failure {
                name: first.name.clone(),
                output: first.output.clone(),
            },
            again,
            other,
        ]);
        assert_eq!(d.matches("verifier log (last").count(), 2, "{d}");
        assert!(
            d.contains("datapath_packets::t: the verifier log of datapath_smoke::s\n"),
            "{d}"
        );
        assert!(d.contains("datapath_packets::u: load: Program"), "{d}");
        assert!(d.contains("processed 1000001 instructions"), "{d}");
    }

    #[test]
    fn a_test_that_reports_a_skip_counts_as_skipped_not_passed() {
        let o = parse(SKIPPING, &["datapath_packets"]);
        assert!(o.ok());
        assert_eq!(o.passed, 2);
        assert_eq!(
            o.skipped,
            [
                Skip {
                    name: "datapath_packets::fwd".into(),
                    why: "a forwarded packet through to_pod needs ingress_ifindex".into(),
                },
                Skip {
                    name: "datapath_packets::fwd_alone".into(),
                    why: "the same".into(),
                }
            ]
        );
    }

    #[test]
    fn a_guest_that_stops_early_is_broken() {
        let cut = &RUN[..RUN
            .find("@@netpol-vm begin datapath_smoke")
            .expect("marker")
            + 40];
        let o = parse(cut, SUITES);
        assert!(!o.finished && !o.ok());
        assert_eq!(o.broken, vec!["datapath_smoke (did not finish)".to_owned()]);
    }
}
