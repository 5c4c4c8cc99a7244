//! Everything the agent tells the outside: its [`Status`] (served on
//! `/status`, watched by tests through a [`StatusHandle`]), Prometheus
//! [`Metrics`] (`netpol_` prefix) and the `tracing` subscriber of the
//! binary.
use std::{
    net::IpAddr,
    sync::{Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    datapath::writer::MapCounts,
    sources::{ObjectCounts, SourceHealth},
};

/// One pod interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InterfaceStatus {
    /// Host-side name.
    pub name: String,
    /// Host-side index.
    pub ifindex: u32,
    /// The pod it is bound to (`namespace/name`), if any.
    pub pod: Option<String>,
    /// The addresses found for it (the peer's, or routed to it).
    pub addresses: Vec<IpAddr>,
    /// Its endpoint entry holds the pod's compiled state (otherwise the
    /// new-pods mode applies to it).
    pub programmed: bool,
}

/// Entries per policy map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MapEntries {
    /// `NETPOL_ENDPOINTS`.
    pub endpoints: usize,
    /// `NETPOL_POLICY_V4`.
    pub policy_v4: usize,
    /// `NETPOL_POLICY_V6`.
    pub policy_v6: usize,
    /// `NETPOL_PORTS`.
    pub ports: usize,
    /// `NETPOL_FRONTENDS_V4`.
    pub frontends_v4: usize,
    /// `NETPOL_FRONTENDS_V6`.
    pub frontends_v6: usize,
    /// `NETPOL_MARK_SOURCES`: mark slots in use.
    pub mark_sources: usize,
}

impl From<MapCounts> for MapEntries {
    fn from(c: MapCounts) -> Self {
        Self {
            endpoints: c.endpoints,
            policy_v4: c.policy_v4,
            policy_v6: c.policy_v6,
            ports: c.ports,
            frontends_v4: c.frontends_v4,
            frontends_v6: c.frontends_v6,
            mark_sources: c.mark_sources,
        }
    }
}

/// Families the node's own stack has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Families {
    /// IPv4.
    pub ipv4: bool,
    /// IPv6.
    pub ipv6: bool,
}

/// What the agent has enforced, as `/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The first apply succeeded.
    pub ready: bool,
    /// Bumped by every change written to the kernel (a compiled state, or
    /// interfaces bound, added or gone); 0 before the first.
    pub generation: u64,
    /// [`crate::sources::fingerprint`] of the input of the compiled state
    /// in force.
    pub fingerprint: Option<String>,
    /// The node whose pods are local.
    pub node: Option<String>,
    /// The HTTP address, once bound.
    pub listen: Option<std::net::SocketAddr>,
    /// The node's families; the agent runs for those it has.
    pub families: Families,
    /// `fail-closed` or `fail-open`.
    pub new_pods: String,
    /// Objects of the input in force.
    pub objects: ObjectCounts,
    /// Entries per map.
    pub maps: MapEntries,
    /// Pod interfaces, by index.
    pub interfaces: Vec<InterfaceStatus>,
    /// Uplinks (the node's other devices) with `leave_node` on their TC
    /// egress, by index, with their state.
    pub uplinks: Vec<crate::uplinks::UplinkStatus>,
    /// The cgroup v2 root `to_host` is attached to, or why it is not.
    pub to_host: Option<String>,
    /// Skipped files and documents, rejected objects.
    pub problems: Vec<String>,
    /// The last failed sync, if the one after it has not succeeded yet.
    pub last_error: Option<String>,
    /// The source's stores and whether it reaches what it watches (the
    /// `kube` source; the files source leaves it at its default).
    pub source: SourceHealth,
}

/// Read side of the agent's status.
#[derive(Clone, Debug)]
pub struct StatusHandle(pub(crate) watch::Receiver<Status>);

impl StatusHandle {
    /// The status now.
    #[must_use]
    pub fn get(&self) -> Status {
        self.0.borrow().clone()
    }

    /// Waits until `pred` holds, at most `timeout`.
    ///
    /// # Errors
    /// The last status seen, when the deadline passed or the agent stopped.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl FnMut(&Status) -> bool,
    ) -> Result<Status, Box<Status>> {
        let found = match tokio::time::timeout(timeout, self.0.wait_for(pred)).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        };
        found.ok_or_else(|| Box::new(self.get()))
    }
}

/// The agent's Prometheus metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Seconds per sync (compile, diff, apply).
    pub sync_duration: Histogram,
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
    /// Objects per reflector store (`kube` source).
    pub store_objects: Family<Vec<(String, String)>, Gauge>,
    /// Seconds since the last successful apply (-1 before the first), set
    /// when the metrics are encoded.
    pub seconds_since_last_apply: Gauge<f64, AtomicU64>,
    last_apply: Mutex<Option<Instant>>,
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
            "Objects per Kubernetes reflector store",
            store_objects.clone(),
        );
        registry.register(
            "seconds_since_last_apply",
            "Seconds since the last successful apply (-1 before the first)",
            seconds_since_last_apply.clone(),
        );
        Self {
            registry,
            sync_duration,
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
        }
    }

    /// Counts one watch event of `kind`.
    pub fn kube_watch_event(&self, kind: &str) {
        self.watch_events.get_or_create(&label("kind", kind)).inc();
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
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Log output of the binary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// Installs the global `tracing` subscriber (stderr, `RUST_LOG` or
/// `info`). Does nothing when one is installed already.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // netlink-packet-route warns about every kernel attribute newer
        // than itself, on every link message.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
