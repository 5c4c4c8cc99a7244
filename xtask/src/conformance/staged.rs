//! `cargo xtask conformance --staged`: every step k ≥ 2 whose changes are
//! policy objects (NetworkPolicy, ClusterNetworkPolicy) is first applied
//! *staged* on top of step k−1, then promoted:
//! - new policies carry `netpol.io/staged: "true"`; deleted ones stay,
//!   annotated `netpol.io/staged-delete: "true"`; a replaced one stays
//!   annotated for deletion beside its new version, staged, under the name
//!   `<name>-0staged` (it sorts right after the old name, so equal
//!   ClusterNetworkPolicy priorities keep their order);
//! - with the staged objects enforced, step k−1's probes must still give
//!   step k−1's matrix, and for every cell of step k: `explain --staged`
//!   must give step k's matrix (and name what decides), the probe must
//!   get what `explain` says the enforced view does, and, for the probes
//!   sent pod to pod, the datapath's staged reports (the agent's
//!   `netpol::staged` log lines) must be exactly the sides where the two
//!   views' `explain` answers differ, among the sides the packets reached;
//!   where they reached both, the staged verdict the reports give must be
//!   step k's matrix;
//! - then the step is applied as written (the promotion) and checked as
//!   in any run.
//!
//! Not covered: the reports of probes through a Service (the staged
//! verdict of those cells comes from `explain --staged` only), and the
//! scenarios on other models than the one-node harness's.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_yaml::Value;

use super::{
    Check, Harness, Tally, ViaSel, cells, check_explained, run_probes,
    scenario::{self, ObjKey, Scenario, Via},
    why,
};

const STAGED: &str = "netpol.io/staged";
const STAGED_DELETE: &str = "netpol.io/staged-delete";
/// The name suffix of a staged new version of an existing policy.
const RENAMED: &str = "-0staged";
const POLICY_KINDS: [&str; 2] = ["NetworkPolicy", "ClusterNetworkPolicy"];
/// How long the agent's log must stay the same size to count as caught
/// up with the ring.
const QUIET: Duration = Duration::from_millis(300);
/// The longest wait for it.
const SETTLE_MAX: Duration = Duration::from_secs(5);
/// How much later a step whose reports disagree is read again.
const LATE: Duration = Duration::from_millis(1500);

/// Agent flags for a staged run: every denial and every allowed new
/// connection logged, as JSON lines to read the staged reports, the
/// denials and the allowed-connection records from (`attribution`), and a
/// rate limit no probe burst reaches.
pub const AGENT_ARGS: [&str; 9] = [
    "--log-denied",
    "--record-allowed",
    "1",
    "--log-format",
    "json",
    "--event-rate",
    "100000",
    "--event-burst",
    "10000",
];

/// Whether step `step`'s changes are policy objects only (and it has some).
pub fn policy_only(step: &scenario::Step) -> Result<bool> {
    let mut any = false;
    for k in &step.delete {
        any = true;
        if !POLICY_KINDS.contains(&k.0.as_str()) {
            return Ok(false);
        }
    }
    for v in &step.apply {
        any = true;
        if !POLICY_KINDS.contains(&scenario::key_of(v)?.0.as_str()) {
            return Ok(false);
        }
    }
    Ok(any)
}

/// `v` with `metadata.annotations[key] = "true"`, named `name` when given.
fn annotated(v: &Value, key: &str, name: Option<&str>) -> Value {
    let mut v = v.clone();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_mapping_mut) {
        if let Some(name) = name {
            meta.insert("name".into(), name.into());
        }
        let annotations = meta
            .entry("annotations".into())
            .or_insert_with(|| Value::Mapping(serde_yaml::Mapping::new()));
        if !annotations.is_mapping() {
            *annotations = Value::Mapping(serde_yaml::Mapping::new());
        }
        if let Some(a) = annotations.as_mapping_mut() {
            a.insert(key.into(), "true".into());
        }
    }
    v
}

/// Step k−1's `objects` with step k's policy changes staged.
fn staged_objects(
    objects: &BTreeMap<ObjKey, Value>,
    step: &scenario::Step,
) -> Result<BTreeMap<ObjKey, Value>> {
    let mut out = objects.clone();
    for k in &step.delete {
        if let Some(v) = objects.get(k) {
            out.insert(k.clone(), annotated(v, STAGED_DELETE, None));
        }
    }
    for v in &step.apply {
        let k = scenario::key_of(v)?;
        match objects.get(&k) {
            None => {
                out.insert(k, annotated(v, STAGED, None));
            }
            Some(old) => {
                out.insert(k.clone(), annotated(old, STAGED_DELETE, None));
                let name = format!("{}{RENAMED}", k.2);
                let new = annotated(v, STAGED, Some(&name));
                out.insert((k.0, k.1, name), new);
            }
        }
    }
    Ok(out)
}

/// One `netpol::staged` log line.
#[derive(Debug)]
struct Report {
    src: IpAddr,
    dst: SocketAddr,
    protocol: String,
    direction: String,
    report: String,
}

/// The log's size, once it has stopped growing (the reader has caught up
/// with the reports of the probes just sent).
pub fn settled_len(log: &Path) -> u64 {
    let len = || std::fs::metadata(log).map_or(0, |m| m.len());
    let started = Instant::now();
    let mut last = len();
    let mut since = Instant::now();
    while started.elapsed() < SETTLE_MAX {
        std::thread::sleep(Duration::from_millis(50));
        let now = len();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= QUIET {
            break;
        }
    }
    last
}

/// The `fields` and source and destination of each JSON log line of
/// `target` from byte `from` on (lines without both addresses left out).
pub fn log_lines(
    log: &Path,
    from: u64,
    target: &str,
) -> Result<Vec<(serde_json::Value, SocketAddr, SocketAddr)>> {
    let text = std::fs::read(log).with_context(|| format!("reading {}", log.display()))?;
    let start = usize::try_from(from).unwrap_or(usize::MAX).min(text.len());
    let mut out = Vec::new();
    for line in String::from_utf8_lossy(&text[start..]).lines() {
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["target"] != target {
            continue;
        }
        let f = v["fields"].take();
        let addr = |k: &str| f[k].as_str().and_then(|s| s.parse::<SocketAddr>().ok());
        if let (Some(src), Some(dst)) = (addr("src"), addr("dst")) {
            out.push((f, src, dst));
        }
    }
    Ok(out)
}

/// The staged reports logged from byte `from` on.
fn reports(log: &Path, from: u64) -> Result<Vec<Report>> {
    Ok(log_lines(log, from, "netpol::staged")?
        .into_iter()
        .map(|(f, src, dst)| Report {
            src: src.ip(),
            dst,
            protocol: f["protocol"].as_str().unwrap_or_default().to_lowercase(),
            direction: f["direction"].as_str().unwrap_or_default().to_owned(),
            report: f["report"].as_str().unwrap_or_default().to_owned(),
        })
        .collect())
}

/// What one staged phase found.
#[derive(Default)]
pub struct Found {
    /// Step k−1's cells probed with step k staged.
    pub enforced: Tally,
    /// `explain --staged` against step k's matrix, and the probes against
    /// `explain`.
    pub explained: Tally,
    /// The datapath's reports against the two views' answers, and the
    /// staged verdict they give where the probe reached both sides.
    pub reported: Tally,
    /// Reports read from the agent's log.
    pub reports: usize,
    /// Sides where the views differ and a report was due.
    pub due: usize,
    /// Hairpins sent (a pod to itself through its Service) whose reports
    /// were checked.
    pub hairpins: usize,
}

impl Found {
    fn add(&mut self, o: &Found) {
        for (a, b) in [
            (&mut self.enforced, &o.enforced),
            (&mut self.explained, &o.explained),
            (&mut self.reported, &o.reported),
        ] {
            a.passed += b.passed;
            a.failed += b.failed;
        }
        self.reports += o.reports;
        self.due += o.due;
        self.hairpins += o.hairpins;
    }
}

/// Stages step `i` (0-based, ≥ 1) of `sc` on top of `objects` (step
/// i−1's), checks it (module docs), and returns the staged objects: the
/// caller then applies the step as written, which promotes it.
pub fn phase(
    harness: &mut dyn Harness,
    sc: &Scenario,
    i: usize,
    objects: &BTreeMap<ObjKey, Value>,
    via: ViaSel,
    found: &mut Found,
    lines: &mut Vec<String>,
) -> Result<BTreeMap<ObjKey, Value>> {
    let step = &sc.steps[i];
    let k = i + 1;
    let staged = staged_objects(objects, step)?;
    harness
        .apply(objects, &staged)
        .with_context(|| format!("{}: step {k} staged", sc.name))?;
    let log = harness
        .agent_log()
        .context("--staged needs the agent's log (the one-node harness)")?;
    let mark = settled_len(&log);
    let prefix = format!("step {k} staged:");

    // The enforced view is step k−1's.
    let (jobs, _) = cells(&*harness, sc, i, &sc.steps[i - 1].probes, &staged, via)?;
    for (job, got) in run_probes(jobs) {
        found
            .enforced
            .count(got == job.want, lines, || format!("{prefix} {}", job.label));
    }

    // Step k's cells: sent, and asked both ways.
    let (jobs, checks) = cells(&*harness, sc, k, &step.probes, &staged, via)?;
    let pod_to_pod: BTreeSet<String> = jobs
        .iter()
        .filter(|j| j.via == Via::Pod)
        .map(|j| j.key.clone())
        .collect();
    let got: BTreeMap<String, bool> = run_probes(jobs)
        .into_iter()
        .map(|(j, got)| (j.key, got))
        .collect();
    if checks.is_empty() {
        return Ok(staged);
    }
    let queries: Vec<String> = checks.iter().map(|c| c.query.clone()).collect();
    let staged_queries: Vec<String> = queries.iter().map(|q| format!("{q} staged")).collect();
    let (Some(now), Some(then)) = (
        harness.explain(&queries)?,
        harness.explain(&staged_queries)?,
    ) else {
        anyhow::bail!("--staged needs explain against the live maps (the one-node harness)");
    };
    // A report the reader has not logged yet reads as missing: a step
    // whose reports disagree is read once more, a while later.
    let mut attempt = 0;
    let (step_found, step_lines) = loop {
        let reports = reports(&log, mark)?;
        let mut f = Found {
            reports: reports.len(),
            ..Found::default()
        };
        let mut l = Vec::new();
        for ((c, e), s) in checks.iter().zip(&now).zip(&then) {
            let cell = Cell {
                check: c,
                enforced: e,
                staged: s,
                got: got.get(&c.query).copied(),
                pod_to_pod: pod_to_pod.contains(&c.query),
            };
            cell.check(&reports, &mut f, &prefix, &mut l);
        }
        attempt += 1;
        if f.reported.failed == 0 || attempt == 2 {
            break (f, l);
        }
        std::thread::sleep(LATE);
    };
    found.add(&step_found);
    lines.extend(step_lines);
    Ok(staged)
}

/// The reports due where the enforced view says `now` and the staged one
/// `then` (allowed or not): none where they agree.
fn due(now: bool, then: bool) -> BTreeSet<&'static str> {
    match (now, then) {
        (false, true) => BTreeSet::from(["staged_would_allow"]),
        (true, false) => BTreeSet::from(["staged_would_deny"]),
        _ => BTreeSet::new(),
    }
}

/// The connection an `explain` answer is about, as reports name it.
struct Connection {
    src: IpAddr,
    dst: SocketAddr,
    /// Lower case, as the agent logs it.
    protocol: String,
}

impl Connection {
    fn of(answer: &serde_json::Value) -> Option<Self> {
        let address = |side: &str| {
            answer[side]["address"]
                .as_str()
                .and_then(|a| a.parse::<IpAddr>().ok())
        };
        let port = answer["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())?;
        Some(Self {
            src: address("src")?,
            dst: SocketAddr::new(address("dst")?, port),
            protocol: answer["protocol"]
                .as_str()
                .unwrap_or_default()
                .to_lowercase(),
        })
    }

    /// The reports of this connection (at `direction`, or at either).
    fn reported<'r>(&self, reports: &'r [Report], direction: Option<&str>) -> BTreeSet<&'r str> {
        reports
            .iter()
            .filter(|r| {
                r.src == self.src
                    && r.dst == self.dst
                    && r.protocol == self.protocol
                    && direction.is_none_or(|d| r.direction == d)
            })
            .map(|r| r.report.as_str())
            .collect()
    }
}

/// One cell of step k: its check, the enforced and staged `explain`
/// answers, the probe's outcome, and whether it was sent pod to pod.
struct Cell<'a> {
    check: &'a Check,
    enforced: &'a serde_json::Value,
    staged: &'a serde_json::Value,
    got: Option<bool>,
    pod_to_pod: bool,
}

impl Cell<'_> {
    /// A hairpin sent (a pod to itself through its Service, `conn`): where
    /// the views' verdicts differ, the datapath reports the new connection
    /// from the pod to itself, on the backend's port (the scenarios'
    /// Services keep the port).
    fn check_hairpin(
        &self,
        conn: &Connection,
        reports: &[Report],
        found: &mut Found,
        prefix: &str,
        lines: &mut Vec<String>,
    ) {
        let (c, e, s) = (self.check, self.enforced, self.staged);
        let want = due(e["verdict"] == "allowed", s["verdict"] == "allowed");
        let seen = conn.reported(reports, None);
        found.due += want.len();
        found.hairpins += 1;
        found.reported.count(seen == want, lines, || {
            format!(
                "{prefix} {}: the datapath reported {seen:?} for the hairpin, the views' explain \
                 answers give {want:?}",
                c.label
            )
        });
    }

    /// The cell's checks (module docs).
    fn check(&self, reports: &[Report], found: &mut Found, prefix: &str, lines: &mut Vec<String>) {
        let (c, e, s, got) = (self.check, self.enforced, self.staged, self.got);
        let mark = |b: bool| if b { "X" } else { "." };
        let allowed = |a: &serde_json::Value| a["verdict"] == "allowed";
        let labelled = Check {
            label: format!("{prefix} {}", c.label),
            ..c.clone()
        };
        check_explained(
            &mut found.explained,
            &labelled,
            s,
            "explain --staged",
            lines,
        );
        if let Some(got) = got {
            let enforced = allowed(e) && c.listens;
            found.explained.count( got == enforced, lines, || {
                format!(
                    "{prefix} {}: the probe got {} where explain says the enforced view gives {}: {}",
                    c.label,
                    mark(got),
                    mark(enforced),
                    why(e)
                )
            });
        }
        if !e["error"].is_null() || !s["error"].is_null() {
            return;
        }
        let Some(conn) = Connection::of(e) else {
            return;
        };
        let same_pod = conn.src == conn.dst.ip();
        if same_pod && c.query.ends_with(" via-service") && got.is_some() {
            self.check_hairpin(&conn, reports, found, prefix, lines);
            return;
        }
        if !self.pod_to_pod || same_pod {
            return;
        }
        // The packets reach the egress, and the ingress where the enforced
        // egress lets them through.
        let reached_ingress = e["egress"]["allowed"] == true;
        let mut staged_verdict = true;
        for d in ["egress", "ingress"] {
            if d == "ingress" && !reached_ingress {
                continue;
            }
            let (now, then) = (e[d]["allowed"] == true, s[d]["allowed"] == true);
            let want = due(now, then);
            let seen = conn.reported(reports, Some(d));
            found.due += want.len();
            found.reported.count(seen == want, lines, || {
                format!(
                    "{prefix} {}: the datapath reported {seen:?} at the {d}, the views' explain \
                 answers give {want:?}",
                    c.label
                )
            });
            // A report flips the enforced side's verdict.
            let flipped = !seen.is_empty();
            staged_verdict &= now != flipped;
        }
        if reached_ingress {
            found
                .reported
                .count((staged_verdict && c.listens) == c.want, lines, || {
                    format!(
                        "{prefix} {}: the datapath's reports give the staged view {}",
                        c.label,
                        mark(staged_verdict && c.listens)
                    )
                });
        }
    }
}
