//! Prometheus metrics (`netpol_` prefix): the agent's own counters and
//! histograms, the liveness of its tasks, and the kernel's counters read
//! at scrape time.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Instant,
};

use netpol_common::{direction, family, reason};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, text::encode},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    datapath::{self, events::KernelCounters},
    model::ObjectRef,
    status::Status,
};

/// The agent's Prometheus metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Seconds per sync (compile, diff, apply).
    pub sync_duration: Histogram,
    /// Seconds from a CNI ADD reaching the agent to its pod programmed.
    pub cni_add_seconds: Histogram,
    /// Generation in force.
    pub generation: Gauge,
    /// Objects per kind.
    pub objects: Family<Vec<(String, String)>, Gauge>,
    /// Entries per map.
    pub map_entries: Family<Vec<(String, String)>, Gauge>,
    /// Errors per stage.
    pub errors: Family<Vec<(String, String)>, Counter>,
    /// Pod interfaces by state (`bound`, `unbound`).
    pub interfaces: Family<Vec<(String, String)>, Gauge>,
    /// Watch events per kind (`kube` source).
    pub watch_events: Family<Vec<(String, String)>, Counter>,
    /// Watch errors per kind (`kube` source).
    pub watch_errors: Family<Vec<(String, String)>, Counter>,
    /// Objects per watched kind (`kube` source).
    pub store_objects: Family<Vec<(String, String)>, Gauge>,
    /// Seconds since the last successful apply (-1 before the first), set
    /// when the metrics are encoded.
    pub seconds_since_last_apply: Gauge<f64, AtomicU64>,
    last_apply: Mutex<Option<Instant>>,
    /// Times the programs' clock was measured again, having drifted from
    /// `CLOCK_MONOTONIC` (`datapath::clock::Watch`).
    pub clock_remeasured: Counter,
    /// Pins put back from the descriptors the agent holds
    /// (`datapath::pins`).
    pub pins_restored: Counter,
    /// Problems of the input in force (files, documents, objects).
    pub manifest_problems: Gauge,
    /// Seconds since each watched task (`loop`, `source`) last showed it
    /// was alive, set when the metrics are encoded.
    pub seconds_since_alive: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>>,
    liveness: Liveness,
    /// What the `/metrics` scrape reads from the kernel, and deny counts.
    datapath: Arc<DatapathMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn label(k: &str, v: &str) -> Vec<(String, String)> {
    vec![(k.to_owned(), v.to_owned())]
}

impl Metrics {
    /// A registry with every metric, prefixed `netpol_`.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("netpol");
        let sync_duration = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        let cni_add_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        registry.register(
            "cni_add_seconds",
            "Time from a CNI ADD reaching the agent to the pod's policy in the kernel",
            cni_add_seconds.clone(),
        );
        let generation = Gauge::default();
        let objects = Family::default();
        let map_entries = Family::default();
        let errors = Family::default();
        let interfaces = Family::default();
        registry.register(
            "sync_duration_seconds",
            "Time to compile, diff and apply one state",
            sync_duration.clone(),
        );
        registry.register("generation", "Generation in force", generation.clone());
        registry.register(
            "objects",
            "Objects of the input in force, per kind",
            objects.clone(),
        );
        registry.register("map_entries", "Entries per policy map", map_entries.clone());
        registry.register("errors", "Errors per stage", errors.clone());
        registry.register("interfaces", "Pod interfaces per state", interfaces.clone());
        let watch_events = Family::default();
        let watch_errors = Family::default();
        let store_objects = Family::default();
        let seconds_since_last_apply = Gauge::<f64, AtomicU64>::default();
        seconds_since_last_apply.set(-1.0);
        registry.register(
            "watch_events",
            "Kubernetes watch events per kind",
            watch_events.clone(),
        );
        registry.register(
            "watch_errors",
            "Kubernetes watch errors per kind",
            watch_errors.clone(),
        );
        registry.register(
            "store_objects",
            "Objects per watched Kubernetes kind",
            store_objects.clone(),
        );
        registry.register(
            "seconds_since_last_apply",
            "Seconds since the last successful apply (-1 before the first)",
            seconds_since_last_apply.clone(),
        );
        let clock_remeasured = Counter::default();
        registry.register(
            "conntrack_clock_remeasured",
            "Times the conntrack clock (jiffies) was measured again, out of step with \
             CLOCK_MONOTONIC",
            clock_remeasured.clone(),
        );
        let pins_restored = Counter::default();
        registry.register(
            "pins_restored",
            "Pins (maps, links) found missing and pinned again from the descriptors the agent \
             holds",
            pins_restored.clone(),
        );
        let manifest_problems = Gauge::default();
        registry.register(
            "manifest_problems",
            "Problems of the input in force: unreadable files and documents, rejected objects \
             (each keeps its last valid version)",
            manifest_problems.clone(),
        );
        let seconds_since_alive = Family::default();
        registry.register(
            "seconds_since_alive",
            "Seconds since the reconcile loop (task=\"loop\") or the source (task=\"source\") \
             last showed it was alive; /healthz fails past 30",
            seconds_since_alive.clone(),
        );
        let datapath = Arc::new(DatapathMetrics::default());
        registry.register_collector(Box::new(DatapathCollector(datapath.clone())));
        Self {
            registry,
            sync_duration,
            cni_add_seconds,
            generation,
            objects,
            map_entries,
            errors,
            interfaces,
            watch_events,
            watch_errors,
            store_objects,
            seconds_since_last_apply,
            last_apply: Mutex::new(None),
            clock_remeasured,
            pins_restored,
            manifest_problems,
            seconds_since_alive,
            liveness: Liveness::default(),
            datapath,
        }
    }

    /// The kernel's counters, read at each scrape from now on:
    /// `packets_total`, `drops_total`, `events_lost_total`.
    pub fn attach_counters(&self, counters: KernelCounters) {
        if let Ok(mut c) = self.datapath.counters.lock() {
            *c = Some(counters);
        }
    }

    /// Counts one deny event of `pod` (a local pod; `None`: none known) in
    /// `direction` (`netpol_common::direction`).
    pub fn denied(&self, pod: Option<&ObjectRef>, direction: u32) {
        let key = (
            pod.map(|p| p.namespace.clone()).unwrap_or_default(),
            pod.map(|p| p.name.clone()).unwrap_or_default(),
            datapath::direction_name(direction),
        );
        if let Ok(mut d) = self.datapath.denied.lock() {
            *d.entry(key).or_default() += 1;
        }
    }

    /// Counts one staged view's report (`netpol_common::reason`
    /// `STAGED_WOULD_*`) under each staged policy it names (none named:
    /// the unnamed series).
    pub fn staged(&self, policies: &[String], report: u32) {
        let Ok(mut s) = self.datapath.staged.lock() else {
            return;
        };
        let report = reason::name(report);
        if policies.is_empty() {
            *s.entry((String::new(), report)).or_default() += 1;
        }
        for p in policies {
            *s.entry((p.clone(), report)).or_default() += 1;
        }
    }

    /// Counts one attributed connection (a policy's deny event, or an
    /// allowed-connection record) under each rule, or isolating policy,
    /// that decided it. New series past [`MAX_RULE_SERIES`] count under
    /// the unnamed one (`policy=""`).
    pub fn rule_hits(&self, decided: Option<&crate::events::Attribution>, denied: bool) {
        let Some(a) = decided else {
            return;
        };
        let Ok(mut h) = self.datapath.rule_hits.lock() else {
            return;
        };
        let verdict = if denied { "deny" } else { "allow" };
        for (policy, rule) in &a.hits {
            let key = (policy.clone(), rule.clone(), verdict);
            let key = if h.contains_key(&key) || h.len() < MAX_RULE_SERIES {
                key
            } else {
                (String::new(), String::new(), verdict)
            };
            *h.entry(key).or_default() += 1;
        }
    }

    /// Keeps `rule_hits_total` series only for policies `keep` says still
    /// exist; the others fold into `policy=""`.
    pub fn retain_rule_hits(&self, keep: impl Fn(&str) -> bool) {
        let Ok(mut h) = self.datapath.rule_hits.lock() else {
            return;
        };
        fold_into_unnamed(
            &mut h,
            |(p, _, _)| !p.is_empty() && !keep(p),
            |key| (String::new(), String::new(), key.2),
        );
    }

    /// Keeps `staged_reports_total` series only for policies `keep` says
    /// are still staged; the others fold into `policy=""`.
    pub fn retain_staged(&self, keep: impl Fn(&str) -> bool) {
        let Ok(mut s) = self.datapath.staged.lock() else {
            return;
        };
        fold_into_unnamed(
            &mut s,
            |(p, _)| !p.is_empty() && !keep(p),
            |key| (String::new(), key.1),
        );
    }

    /// Keeps `denied_total` series only for pods `keep` says are local;
    /// the counts of the others move to the unnamed (`pod=""`) series, so
    /// that the label set stays bounded and every sum stays monotonic.
    pub fn retain_denied(&self, keep: impl Fn(&ObjectRef) -> bool) {
        let Ok(mut d) = self.datapath.denied.lock() else {
            return;
        };
        fold_into_unnamed(
            &mut d,
            |(ns, name, _)| !name.is_empty() && !keep(&ObjectRef::new(ns.clone(), name.clone())),
            |key| (String::new(), String::new(), key.2),
        );
    }

    /// Counts `n` watch events of `kind`.
    pub fn kube_watch_events(&self, kind: &str, n: u64) {
        self.watch_events
            .get_or_create(&label("kind", kind))
            .inc_by(n);
    }

    /// Counts one watch error of `kind`.
    pub fn kube_watch_error(&self, kind: &str) {
        self.watch_errors.get_or_create(&label("kind", kind)).inc();
    }

    /// Records the size of the store of `kind`.
    pub fn kube_store_objects(&self, kind: &str, n: usize) {
        self.store_objects
            .get_or_create(&label("kind", kind))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Records a successful apply now.
    pub fn applied(&self) {
        if let Ok(mut t) = self.last_apply.lock() {
            *t = Some(Instant::now());
        }
    }

    /// Counts one error of `stage` (`source`, `apply`, `attach`, `bind`).
    pub fn error(&self, stage: &str) {
        self.errors.get_or_create(&label("stage", stage)).inc();
    }

    /// Mirrors a status into the gauges.
    pub fn observe(&self, s: &Status) {
        self.generation
            .set(i64::try_from(s.generation).unwrap_or(i64::MAX));
        let g = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        for (kind, n) in [
            ("Node", s.objects.nodes),
            ("Namespace", s.objects.namespaces),
            ("Pod", s.objects.pods),
            ("NetworkPolicy", s.objects.policies),
            ("Service", s.objects.services),
        ] {
            self.objects.get_or_create(&label("kind", kind)).set(g(n));
        }
        for (map, n) in [
            (netpol_common::maps::ENDPOINTS, s.maps.endpoints),
            (netpol_common::maps::POLICY_V4, s.maps.policy_v4),
            (netpol_common::maps::POLICY_V6, s.maps.policy_v6),
            (netpol_common::maps::PORTS, s.maps.ports),
            (netpol_common::maps::FRONTENDS_V4, s.maps.frontends_v4),
            (netpol_common::maps::FRONTENDS_V6, s.maps.frontends_v6),
            (netpol_common::maps::MARK_SOURCES, s.maps.mark_sources),
        ] {
            self.map_entries.get_or_create(&label("map", map)).set(g(n));
        }
        let bound = s.interfaces.iter().filter(|i| i.programmed).count();
        self.interfaces
            .get_or_create(&label("state", "bound"))
            .set(g(bound));
        self.interfaces
            .get_or_create(&label("state", "unbound"))
            .set(g(s.interfaces.len() - bound));
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn encode(&self) -> String {
        if let Ok(t) = self.last_apply.lock()
            && let Some(t) = *t
        {
            self.seconds_since_last_apply.set(t.elapsed().as_secs_f64());
        }
        for task in [Task::Loop, Task::Source] {
            if let Some(age) = self.liveness.age(task) {
                self.seconds_since_alive
                    .get_or_create(&label("task", task.name()))
                    .set(age.as_secs_f64());
            }
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// A task whose progress `/healthz` watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// The reconcile loop.
    Loop,
    /// The source (the files source; the kube source reports its API
    /// connection apart, as `/readyz`).
    Source,
}

impl Task {
    /// Its `task` label.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Loop => "loop",
            Self::Source => "source",
        }
    }
}

/// How long a watched task may go without showing it is alive before
/// `/healthz` fails: far beyond any apply or rescan, each of which beats
/// when it ends, and the idle ticks of [`ALIVE_EVERY`].
pub const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(30);
/// How often an idle watched task beats.
pub const ALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// When each watched task last beat (ms since `origin`, 0: never, so not
/// watched).
#[derive(Debug)]
struct Liveness {
    origin: Instant,
    beats: [AtomicU64; 2],
    /// How long a task may stay silent (ms), [`STUCK_AFTER`] unless set.
    stuck_after_ms: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            beats: [AtomicU64::new(0), AtomicU64::new(0)],
            stuck_after_ms: AtomicU64::new(
                u64::try_from(STUCK_AFTER.as_millis()).unwrap_or(u64::MAX),
            ),
        }
    }
}

impl Liveness {
    fn slot(&self, task: Task) -> &AtomicU64 {
        &self.beats[match task {
            Task::Loop => 0,
            Task::Source => 1,
        }]
    }

    fn beat(&self, task: Task) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.slot(task)
            .store(ms.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    fn age(&self, task: Task) -> Option<std::time::Duration> {
        match self.slot(task).load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(std::time::Duration::from_millis(ms)),
            ),
        }
    }
}

impl Metrics {
    /// `task` is alive (it beats after each piece of work and every
    /// [`ALIVE_EVERY`] while idle).
    pub fn alive(&self, task: Task) {
        self.liveness.beat(task);
    }

    /// Sets how long a watched task may stay silent before `/healthz`
    /// fails (`--stuck-after-secs`).
    pub fn set_stuck_after(&self, after: std::time::Duration) {
        self.liveness.stuck_after_ms.store(
            u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// What `/healthz` says is wrong: a watched task silent for longer
    /// than its threshold ([`Metrics::set_stuck_after`]).
    #[must_use]
    pub fn unhealthy(&self) -> Option<String> {
        let ms = self
            .liveness
            .stuck_after_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        self.stuck(std::time::Duration::from_millis(ms))
    }

    /// What `/healthz` says is wrong: a watched task silent for longer than
    /// `after`.
    #[must_use]
    pub fn stuck(&self, after: std::time::Duration) -> Option<String> {
        [Task::Loop, Task::Source].into_iter().find_map(|task| {
            let age = self.liveness.age(task)?;
            (age > after).then(|| {
                format!(
                    "the {} has shown no progress for {} s",
                    match task {
                        Task::Loop => "reconcile loop",
                        // The kube source beats only while every watch is
                        // healthy, so silence is an API server it cannot
                        // reach as well as a hung task.
                        Task::Source => "source (API server or manifests)",
                    },
                    age.as_secs()
                )
            })
        })
    }
}

/// Deny counts by (namespace, pod, direction); `("", "")`: pods that are
/// not (or no longer) local, and drops no endpoint is known for.
type DeniedCounts = BTreeMap<(String, String, &'static str), u64>;

/// Moves the counts of the series `gone` picks onto their `unnamed`
/// series, so that label sets stay bounded and every sum stays monotonic.
fn fold_into_unnamed<K: Ord + Clone>(
    counts: &mut BTreeMap<K, u64>,
    gone: impl Fn(&K) -> bool,
    unnamed: impl Fn(&K) -> K,
) {
    let keys: Vec<K> = counts.keys().filter(|k| gone(k)).cloned().collect();
    for key in keys {
        let n = counts.remove(&key).unwrap_or_default();
        *counts.entry(unnamed(&key)).or_default() += n;
    }
}

/// Most `rule_hits_total` series kept (policy, rule, verdict); later
/// ones count under the unnamed series.
pub const MAX_RULE_SERIES: usize = 4096;

/// The metrics read from the kernel at scrape time, and the deny counts
/// the event reader keeps.
#[derive(Debug, Default)]
struct DatapathMetrics {
    counters: Mutex<Option<KernelCounters>>,
    denied: Mutex<DeniedCounts>,
    /// Staged views' reports by (policy, report).
    staged: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Attributed connections by (policy, rule, verdict).
    rule_hits: Mutex<BTreeMap<(String, String, &'static str), u64>>,
}

/// Encodes [`DatapathMetrics`] at each scrape.
#[derive(Debug)]
struct DatapathCollector(Arc<DatapathMetrics>);

const DIRECTIONS: [u32; 2] = [direction::EGRESS, direction::INGRESS];
const FAMILIES: [u32; 3] = [family::IPV4, family::IPV6, family::OTHER];

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let kernel = self.0.counters.lock().ok().and_then(|k| {
            let k = k.as_ref()?;
            let counters = k
                .counters()
                .map_err(|e| tracing::warn!(error = %e, "reading the packet counters"))
                .ok()?;
            let lost = k
                .lost()
                .map_err(|e| tracing::warn!(error = %e, "reading the lost-event counters"))
                .ok()?;
            Some((counters, lost))
        });
        if let Some((counters, lost)) = kernel {
            let mut m = encoder.encode_descriptor(
                "packets",
                "Packets judged by the programs, per policy direction, family and verdict",
                None,
                MetricType::Counter,
            )?;
            for d in DIRECTIONS {
                for f in FAMILIES {
                    for (verdict, drop) in [("pass", false), ("drop", true)] {
                        let n: u64 = counters
                            .entries
                            .iter()
                            .filter(|e| e.direction == d && e.family == f)
                            .filter(|e| reason::is_drop(e.reason) == drop)
                            .map(|e| e.value.packets)
                            .sum();
                        let labels = [
                            ("direction", datapath::direction_name(d)),
                            ("family", datapath::family_name(f)),
                            ("verdict", verdict),
                        ];
                        ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                    }
                }
            }
            let mut m = encoder.encode_descriptor(
                "drops",
                "Packets dropped, per policy direction, family and reason",
                None,
                MetricType::Counter,
            )?;
            for e in counters
                .entries
                .iter()
                .filter(|e| reason::is_drop(e.reason))
            {
                let labels = [
                    ("direction", datapath::direction_name(e.direction)),
                    ("family", datapath::family_name(e.family)),
                    ("reason", reason::name(e.reason)),
                ];
                ConstCounter::new(e.value.packets).encode(m.encode_family(&labels)?)?;
            }
            let mut m = encoder.encode_descriptor(
                "events_lost",
                "Deny events not emitted: refused by the per-endpoint rate limit, or the ring buffer was full",
                None,
                MetricType::Counter,
            )?;
            for (cause, n) in [
                ("rate_limit", lost.rate_limited),
                ("ring_full", lost.ring_full),
            ] {
                ConstCounter::new(n).encode(m.encode_family(&[("cause", cause)])?)?;
            }
        }
        let denied = self.0.denied.lock().map(|d| d.clone()).unwrap_or_default();
        let mut m = encoder.encode_descriptor(
            "denied",
            "Deny events, per local pod whose policy dropped the packet (pod=\"\": other pods) and direction",
            None,
            MetricType::Counter,
        )?;
        for ((ns, pod, dir), n) in &denied {
            let labels = [
                ("namespace", ns.as_str()),
                ("pod", pod.as_str()),
                ("direction", dir),
            ];
            ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
        }
        let staged = self.0.staged.lock().map(|s| s.clone()).unwrap_or_default();
        let mut m = encoder.encode_descriptor(
            "staged_reports",
            "New connections a staged policy would judge otherwise, per staged policy (policy=\"\": \
             none named, or no longer staged) and report (staged_would_deny, staged_would_allow)",
            None,
            MetricType::Counter,
        )?;
        for ((policy, report), n) in &staged {
            let labels = [("policy", policy.as_str()), ("report", report)];
            ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
        }
        let hits = self
            .0
            .rule_hits
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default();
        let mut m = encoder.encode_descriptor(
            "rule_hits",
            "Connections the agent attributed, per deciding rule (rule=\"\": the policy's \
             isolation, a default deny; policy=\"\": gone or past the series limit) and verdict: \
             deny events of policy drops and allowed-connection records (--record-allowed), so \
             within their sampling and rate limits",
            None,
            MetricType::Counter,
        )?;
        for ((policy, rule, verdict), n) in &hits {
            let labels = [
                ("policy", policy.as_str()),
                ("rule", rule.as_str()),
                ("verdict", verdict),
            ];
            ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_series_of_pods_gone_fold_into_the_unnamed_one() {
        let m = Metrics::new();
        let (a, b) = (ObjectRef::new("x", "a"), ObjectRef::new("x", "b"));
        m.denied(Some(&a), direction::INGRESS);
        m.denied(Some(&b), direction::INGRESS);
        m.denied(Some(&b), direction::EGRESS);
        m.denied(None, direction::INGRESS);
        m.retain_denied(|p| p == &a);
        let text = m.encode();
        for line in [
            "netpol_denied_total{namespace=\"x\",pod=\"a\",direction=\"ingress\"} 1",
            "netpol_denied_total{namespace=\"\",pod=\"\",direction=\"ingress\"} 2",
            "netpol_denied_total{namespace=\"\",pod=\"\",direction=\"egress\"} 1",
            "# TYPE netpol_denied counter",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("pod=\"b\""), "{text}");
        // No datapath attached: no kernel counters to show.
        assert!(!text.contains("netpol_packets_total"), "{text}");
    }

    #[test]
    fn staged_reports_count_per_staged_policy_and_fold_when_it_is_no_longer_staged() {
        let m = Metrics::new();
        let (p, q) = ("x/p".to_owned(), "ClusterNetworkPolicy/q".to_owned());
        m.staged(std::slice::from_ref(&p), reason::STAGED_WOULD_DENY);
        m.staged(&[p.clone(), q.clone()], reason::STAGED_WOULD_DENY);
        m.staged(std::slice::from_ref(&q), reason::STAGED_WOULD_ALLOW);
        m.staged(&[], reason::STAGED_WOULD_ALLOW);
        m.retain_staged(|l| l == p);
        let text = m.encode();
        for line in [
            "netpol_staged_reports_total{policy=\"x/p\",report=\"staged_would_deny\"} 2",
            "netpol_staged_reports_total{policy=\"\",report=\"staged_would_deny\"} 1",
            "netpol_staged_reports_total{policy=\"\",report=\"staged_would_allow\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            !text.contains("policy=\"ClusterNetworkPolicy/q\""),
            "{text}"
        );
    }

    /// An attribution counting under `hits`.
    fn attributed(hits: &[(&str, &str)]) -> crate::events::Attribution {
        crate::events::Attribution {
            text: String::new(),
            stage: None,
            rules: Vec::new(),
            passed: Vec::new(),
            policies: Vec::new(),
            labels: std::collections::BTreeSet::new(),
            hits: hits
                .iter()
                .map(|(p, r)| ((*p).to_owned(), (*r).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn rule_hits_count_per_rule_and_verdict_fold_gone_policies_and_stop_growing_at_the_cap() {
        let m = Metrics::new();
        let both = attributed(&[("x/a", "spec.ingress[0]"), ("x/b", "")]);
        m.rule_hits(Some(&both), true);
        m.rule_hits(Some(&both), true);
        m.rule_hits(Some(&attributed(&[("x/a", "spec.ingress[0]")])), false);
        m.rule_hits(None, true);
        m.retain_rule_hits(|p| p == "x/a");
        let text = m.encode();
        for line in [
            "netpol_rule_hits_total{policy=\"x/a\",rule=\"spec.ingress[0]\",verdict=\"deny\"} 2",
            "netpol_rule_hits_total{policy=\"x/a\",rule=\"spec.ingress[0]\",verdict=\"allow\"} 1",
            "netpol_rule_hits_total{policy=\"\",rule=\"\",verdict=\"deny\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("policy=\"x/b\""), "{text}");

        // Past the cap, new series count under the unnamed one; those
        // already kept go on counting under their own.
        let m = Metrics::new();
        for i in 0..MAX_RULE_SERIES {
            m.rule_hits(Some(&attributed(&[(&format!("x/p{i}"), "")])), true);
        }
        m.rule_hits(Some(&attributed(&[("x/late", "spec.egress[1]")])), true);
        m.rule_hits(Some(&attributed(&[("x/p0", "")])), true);
        let text = m.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("netpol_rule_hits_total{"))
            .count();
        assert_eq!(
            series,
            MAX_RULE_SERIES + 1,
            "the cap and the unnamed series"
        );
        for line in [
            "netpol_rule_hits_total{policy=\"\",rule=\"\",verdict=\"deny\"} 1",
            "netpol_rule_hits_total{policy=\"x/p0\",rule=\"\",verdict=\"deny\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing");
        }
        assert!(!text.contains("x/late"), "a series past the cap");
    }
}
