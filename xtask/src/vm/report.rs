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

/// What one guest run showed.
#[derive(Debug, Default)]
pub struct Outcome {
    pub passed: usize,
    pub failed: Vec<Failure>,
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
    let mut current: Option<(String, Vec<&str>)> = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        let Some(rest) = line.strip_prefix(MARK) else {
            if let Some((_, lines)) = current.as_mut() {
                lines.push(line);
            }
            continue;
        };
        let rest = rest.trim();
        if let Some(name) = rest.strip_prefix("begin ") {
            current = Some((name.to_owned(), Vec::new()));
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
            let lines = current.take().map(|(_, l)| l).unwrap_or_default();
            suite(&mut out, &name, &lines, &rc);
            seen.push(name);
        } else if rest == "done" {
            out.finished = true;
        } else if let Some(m) = rest.strip_prefix("insmod ") {
            out.broken.push(format!("insmod {m}"));
        }
    }
    if let Some((name, _)) = current {
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

fn suite(out: &mut Outcome, name: &str, lines: &[&str], rc: &str) {
    let mut failed_here = Vec::new();
    for line in lines {
        let Some(t) = line.strip_prefix("test ") else {
            continue;
        };
        if t.ends_with(" ... ok") {
            out.passed += 1;
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

/// How a failure reads in the summary: the panic's first line, and the
/// tail of the verifier log when there is one.
pub fn describe(f: &Failure) -> String {
    let mut s = String::new();
    let panic = f
        .output
        .lines()
        .skip_while(|l| !l.contains("panicked at"))
        .nth(1)
        .or_else(|| f.output.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("(no output)");
    let _ = writeln!(s, "    {}: {}", f.name, clip(panic, 300));
    // aya prints the log after `Verifier output:` (Display) or
    // `verifier_log:` (Debug, what `expect` shows).
    let start = ["Verifier output:", "verifier_log:"]
        .iter()
        .filter_map(|m| f.output.find(m))
        .min();
    if let Some(at) = start {
        let log: Vec<&str> = f.output[at..]
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("note: run with"))
            .collect();
        let _ = writeln!(s, "      verifier log (last {VERIFIER_TAIL} lines):");
        for l in log.iter().skip(log.len().saturating_sub(VERIFIER_TAIL)) {
            let _ = writeln!(s, "        {}", clip(l, 300));
        }
    }
    s
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
        let d = describe(&o.failed[1]);
        assert!(d.contains("datapath_smoke::s: load: Program"), "{d}");
        assert!(d.contains("verifier log"), "{d}");
        assert!(d.contains("processed 1000001 insns"), "{d}");
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
