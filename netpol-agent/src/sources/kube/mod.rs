//! The `kube` source: the Kubernetes API, watched with kube-rs.
//!
//! One watcher per kind (Pods and Services of every
//! namespace, Namespaces, `NetworkPolicies`, and this node's Node: nothing
//! netpol does not use), each trimmed with `.modify()` to the fields the compiler
//! reads, so memory grows slowly with the cluster, and each retried with
//! kube-rs' default backoff.
//!
//! Objects are converted once, in their watcher's task, with the model's
//! `TryFrom` conversions; one assembler task owns the [`Snapshot`] and
//! publishes whole [`Input`]s:
//! - nothing is published until every store has listed once (a half-listed
//!   cluster would drop the policies of the kinds not listed yet);
//! - a relist (a watch too old, `410 Gone`) is buffered and swapped in when
//!   complete, as the reflector does with its store;
//! - an invalid new version of an object keeps its last valid one, and its
//!   errors are problems of the input;
//! - while the API server is unreachable nothing is published, so what is
//!   enforced stays; [`SourceHealth::unreachable`] says why, and the agent
//!   reports itself not ready until a watch or a probe of `/version`
//!   succeeds again.
use std::{
    collections::{BTreeMap, HashSet},
    fmt::Debug,
    hash::Hash,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{core::v1 as core, networking::v1 as networking},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{mpsc, watch};

use super::{Input, InputSender};
use crate::{
    model::{
        ALLOW_ANY_SOURCE_ANNOTATION, ClusterNetworkPolicy, Kind, ModelError, Namespace,
        NetworkPolicy, Node, ObjectRef, Pod, STAGED_ANNOTATION, STAGED_DELETE_ANNOTATION, Service,
        Snapshot, rebase,
    },
    status::Metrics,
};

/// The verbs every watcher needs: `list` and `watch` (the reflector's
/// list-then-watch), and `get`, which the deploy's `ClusterRole` grants with
/// them (read-only, and what `kubectl auth can-i` users expect).
pub const WATCH_VERBS: &[&str] = &["get", "list", "watch"];

/// `(apiGroup, resource)` of a k8s-openapi type, as RBAC names it.
const fn api_of<K: k8s_openapi::Resource>() -> (&'static str, &'static str) {
    (K::GROUP, K::URL_PATH_SEGMENT)
}

/// Every `(apiGroup, resource, verbs)` the kube source reads, in the order
/// of [`StoreKind::ALL`]: the deploy's `ClusterRole` must grant exactly these
/// (a test compares). Taken from the same k8s-openapi types the watchers are
/// built over; [`spawn_store`] asserts each watcher matches its entry.
pub const WATCHED: &[(&str, &str, &[&str])] = &[
    (
        api_of::<core::Pod>().0,
        api_of::<core::Pod>().1,
        WATCH_VERBS,
    ),
    (
        api_of::<core::Namespace>().0,
        api_of::<core::Namespace>().1,
        WATCH_VERBS,
    ),
    (
        api_of::<core::Node>().0,
        api_of::<core::Node>().1,
        WATCH_VERBS,
    ),
    (
        api_of::<networking::NetworkPolicy>().0,
        api_of::<networking::NetworkPolicy>().1,
        WATCH_VERBS,
    ),
    (
        api_of::<core::Service>().0,
        api_of::<core::Service>().1,
        WATCH_VERBS,
    ),
    (
        api_of::<crate::api::ClusterNetworkPolicy>().0,
        api_of::<crate::api::ClusterNetworkPolicy>().1,
        WATCH_VERBS,
    ),
];

/// First delay between probes of an unreachable API server; doubled per
/// failure up to [`PROBE_MAX`].
const PROBE_FIRST: Duration = Duration::from_secs(1);
/// Longest delay between probes of an unreachable API server.
const PROBE_MAX: Duration = Duration::from_secs(30);
/// How long a probe of `/version` may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How the agent reaches the API server.
#[derive(Clone, Default)]
pub enum KubeConnection {
    /// In-cluster configuration, else the kubeconfig (`KUBECONFIG`,
    /// `~/.kube/config`), as `kube::Client::try_default` finds them.
    #[default]
    Infer,
    /// A client built by the caller (tests point one at a fake API server).
    Client(Client),
}

impl Debug for KubeConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Infer => f.write_str("Infer"),
            Self::Client(c) => write!(f, "Client({})", c.default_namespace()),
        }
    }
}

impl KubeConnection {
    /// The client.
    ///
    /// # Errors
    /// When no configuration is found or it is not usable.
    pub async fn client(&self) -> Result<Client, KubeError> {
        match self {
            Self::Infer => Client::try_default().await.map_err(KubeError::Config),
            Self::Client(c) => Ok(c.clone()),
        }
    }
}

/// The `kube` source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No usable in-cluster configuration or kubeconfig.
    #[error("configuring the Kubernetes client (in-cluster or kubeconfig): {0}")]
    Config(#[source] kube::Error),
    /// The node name is needed to watch this node's Node.
    #[error("the kube source needs this node's name (--node or NODE_NAME)")]
    NoNode,
}

/// The stores the source keeps, one per watched kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StoreKind {
    /// v1 Pods, all namespaces.
    Pod,
    /// v1 Namespaces.
    Namespace,
    /// v1 Nodes (this node's addresses; every node's for the `nodes`
    /// peers of `ClusterNetworkPolicies`).
    Node,
    /// networking.k8s.io/v1 `NetworkPolicies`, all namespaces.
    NetworkPolicy,
    /// v1 Services, all namespaces.
    Service,
    /// policy.networking.k8s.io/v1alpha2 `ClusterNetworkPolicies`; a
    /// cluster without their CRD has none.
    ClusterNetworkPolicy,
}

impl StoreKind {
    /// Every store, in the order of [`SourceHealth::stores`].
    pub const ALL: [Self; 6] = [
        Self::Pod,
        Self::Namespace,
        Self::Node,
        Self::NetworkPolicy,
        Self::Service,
        Self::ClusterNetworkPolicy,
    ];

    /// The kind's name (the `kind` label of the metrics).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::Namespace => "Namespace",
            Self::Node => "Node",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::Service => "Service",
            Self::ClusterNetworkPolicy => "ClusterNetworkPolicy",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// One store, as [`SourceHealth`] shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreHealth {
    /// The kind.
    pub kind: String,
    /// It has listed once.
    pub ready: bool,
    /// Objects it holds.
    pub objects: usize,
    /// Its last watch error, until a watch or a probe succeeds again.
    pub error: Option<String>,
}

/// How a source is doing, apart from its objects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SourceHealth {
    /// Every store has listed once: the source has published an input.
    pub synced: bool,
    /// Why the source cannot reach the API server now; `None` when it can.
    pub unreachable: Option<String>,
    /// Its stores.
    pub stores: Vec<StoreHealth>,
}

/// The Kubernetes API as a source of [`Input`]s.
pub struct KubeSource {
    client: Client,
    node: String,
    metrics: Option<Arc<Metrics>>,
    health: watch::Sender<SourceHealth>,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("node", &self.node)
            .field("health", &*self.health.borrow())
            .finish_non_exhaustive()
    }
}

mod assembler;
mod objects;
mod slim;

use assembler::Assembler;
use objects::{
    Obj, convert_cluster_policy, convert_namespace, convert_node, convert_pod, convert_policy,
    convert_service, trim_cluster_policy, trim_namespace, trim_node, trim_policy, trim_service,
};
use slim::SlimPod;

#[derive(Debug)]
enum Change {
    Init,
    InitApply(Obj),
    InitDone,
    Apply(Obj),
    Delete(ObjectRef),
    /// The watch is too old (`410 Gone`): the watcher lists again. Not an
    /// outage.
    Expired,
    /// The API server has no such resource (`404`: the CRD of an optional
    /// kind is not installed): an empty list, retried with backoff in
    /// case it is installed later.
    Absent,
    Error {
        message: String,
        /// A list failed: its retry shows success by listing. Otherwise a
        /// watch failed to start or broke, and a retry that succeeds
        /// shows nothing until the next change (the probe tells).
        list: bool,
    },
}

#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "nearly every message is a store change; boxing it would allocate per event"
)]
enum Msg {
    Store {
        store: StoreKind,
        size: usize,
        change: Change,
    },
    Probe(Result<(), String>),
}

impl KubeSource {
    /// A source reading the cluster through `client`, with `node` as the
    /// local node.
    #[must_use]
    pub fn new(client: Client, node: impl Into<String>) -> Self {
        let (health, _) = watch::channel(SourceHealth {
            stores: StoreKind::ALL
                .iter()
                .map(|k| StoreHealth {
                    kind: k.as_str().to_owned(),
                    ..StoreHealth::default()
                })
                .collect(),
            ..SourceHealth::default()
        });
        Self {
            client,
            node: node.into(),
            metrics: None,
            health,
        }
    }

    /// Counts watch events and errors and store sizes in `metrics`.
    #[must_use]
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The source's health, live.
    #[must_use]
    pub fn health(&self) -> watch::Receiver<SourceHealth> {
        self.health.subscribe()
    }

    /// Watches the cluster and publishes on `tx` once every store has
    /// listed, then after every change, until `stop` turns true. Watch
    /// errors are retried with backoff, never returned.
    ///
    /// # Errors
    /// None today; the signature leaves room for start-up checks.
    pub async fn run(
        self,
        tx: InputSender,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), KubeError> {
        let (msg_tx, mut msg_rx) = mpsc::unbounded_channel();
        let (kick, kicked) = watch::channel(0u64);
        let links = StoreLinks {
            tx: msg_tx.clone(),
            kick: kicked,
        };
        let mut tasks = tokio::task::JoinSet::new();
        let c = &self.client;
        let all = watcher::Config::default();
        // Decoded slim: nothing to trim.
        spawn_store::<SlimPod>(
            &mut tasks,
            Api::all(c.clone()),
            all.clone(),
            StoreKind::Pod,
            |_| {},
            convert_pod,
            links.clone(),
        );
        spawn_store::<core::Namespace>(
            &mut tasks,
            Api::all(c.clone()),
            all.clone(),
            StoreKind::Namespace,
            trim_namespace,
            convert_namespace,
            links.clone(),
        );
        // Every Node: a ClusterNetworkPolicy's `nodes` peer selects any of
        // them by label.
        spawn_store::<core::Node>(
            &mut tasks,
            Api::all(c.clone()),
            all.clone(),
            StoreKind::Node,
            trim_node,
            convert_node,
            links.clone(),
        );
        spawn_store::<networking::NetworkPolicy>(
            &mut tasks,
            Api::all(c.clone()),
            all.clone(),
            StoreKind::NetworkPolicy,
            trim_policy,
            convert_policy,
            links.clone(),
        );
        spawn_store::<core::Service>(
            &mut tasks,
            Api::all(c.clone()),
            all.clone(),
            StoreKind::Service,
            trim_service,
            convert_service,
            links.clone(),
        );
        spawn_store::<crate::api::ClusterNetworkPolicy>(
            &mut tasks,
            Api::all(c.clone()),
            all.clone(),
            StoreKind::ClusterNetworkPolicy,
            trim_cluster_policy,
            convert_cluster_policy,
            links.clone(),
        );
        tracing::info!(
            node = %self.node,
            "kube source: watching Pods, Namespaces, Nodes, NetworkPolicies, Services and \
             ClusterNetworkPolicies; nothing is enforced until every store has listed"
        );
        let mut asm = Assembler::new(self.node.clone());
        // Alive while every watch is healthy: a liveness probe then fails
        // when the API server stays out of reach (the pinned state stays
        // enforced meanwhile), not only when this task hangs. It beats at
        // once, so an API server unreachable from the start counts too.
        let beat = |asm: &Assembler| {
            if let Some(m) = &self.metrics
                && !asm.any_error()
            {
                m.alive(crate::status::Task::Source);
            }
        };
        beat(&asm);
        let mut alive = tokio::time::interval(crate::status::ALIVE_EVERY);
        let mut probe_at: Option<tokio::time::Instant> = None;
        let mut probe_delay = PROBE_FIRST;
        let mut probing = false;
        loop {
            let next_probe = probe_at;
            tokio::select! {
                () = crate::shutdown::stopped(&mut stop) => return Ok(()),
                _ = alive.tick() => {}
                m = msg_rx.recv() => {
                    let Some(m) = m else { return Ok(()) };
                    asm.handle(m, self.metrics.as_deref());
                    while let Ok(m) = msg_rx.try_recv() {
                        asm.handle(m, self.metrics.as_deref());
                    }
                }
                () = async {
                    match next_probe {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {
                    probe_at = None;
                    probing = true;
                    let client = self.client.clone();
                    let tx = msg_tx.clone();
                    // Detached: it ends within its timeout.
                    tokio::spawn(async move {
                        let r = match tokio::time::timeout(PROBE_TIMEOUT, client.apiserver_version()).await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
                        };
                        let _ = tx.send(Msg::Probe(r));
                    });
                }
            }
            if let Some(probe) = asm.probe_result.take() {
                probing = false;
                if probe {
                    probe_delay = PROBE_FIRST;
                    // The API server answers again: the watchers retry
                    // now, not when their backoff ends.
                    kick.send_modify(|k| *k += 1);
                } else {
                    probe_delay = (probe_delay * 2).min(PROBE_MAX);
                }
            }
            if asm.any_error() {
                if probe_at.is_none() && !probing {
                    probe_at = Some(tokio::time::Instant::now() + probe_delay);
                }
            } else {
                probe_at = None;
                probe_delay = PROBE_FIRST;
            }
            // Health first: a loop that applies the input at once reports
            // the source synced with it.
            let input = asm.take_input();
            let health = asm.health();
            self.health.send_if_modified(|h| {
                let changed = *h != health;
                *h = health;
                changed
            });
            if let Some(input) = input {
                tx.send_replace(Some(Arc::new(input)));
            }
            beat(&asm);
        }
    }
}

/// First delay before a failed watch is retried; doubled per failure up
/// to [`WATCH_RETRY_MAX`] (kube-rs' default backoff without its jitter).
const WATCH_RETRY_FIRST: Duration = Duration::from_millis(800);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(30);

/// What a watcher task talks to: the assembler, and the kick that ends
/// its backoff once a probe finds the API server answering again (so a
/// node catches up when it reconnects, not up to 30 s later).
#[derive(Clone)]
struct StoreLinks {
    tx: mpsc::UnboundedSender<Msg>,
    kick: watch::Receiver<u64>,
}

/// What a watch poll gave, for [`Retry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Event,
    Failed,
}

/// A watcher's pause between failed polls: [`WATCH_RETRY_FIRST`],
/// doubling to [`WATCH_RETRY_MAX`], none after an event; a kick ends it.
#[derive(Debug)]
struct Retry {
    delay: Option<Duration>,
    kick: watch::Receiver<u64>,
}

impl Retry {
    fn new(kick: watch::Receiver<u64>) -> Self {
        Self { delay: None, kick }
    }

    fn after(&mut self, outcome: Outcome) {
        self.delay = match outcome {
            Outcome::Event => None,
            Outcome::Failed => {
                // Kicks before this failure say nothing of it.
                self.kick.borrow_and_update();
                Some(
                    self.delay
                        .map_or(WATCH_RETRY_FIRST, |d| (d * 2).min(WATCH_RETRY_MAX)),
                )
            }
        };
    }

    /// Waits out the delay, or until a kick.
    async fn pause(&mut self) {
        let Some(d) = self.delay else { return };
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            changed = self.kick.changed() => {
                if changed.is_err() {
                    // The source is gone: no kick will come.
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}

/// Spawns one kind's watcher and conversion.
fn spawn_store<K>(
    tasks: &mut tokio::task::JoinSet<()>,
    api: Api<K>,
    config: watcher::Config,
    store: StoreKind,
    trim: fn(&mut K),
    convert: fn(&K) -> Obj,
    links: StoreLinks,
) where
    K: kube::Resource
        + k8s_openapi::Resource
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
    <K as kube::Resource>::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (group, resource, _) = WATCHED[store.index()];
    assert_eq!(
        (group, resource),
        api_of::<K>(),
        "WATCHED disagrees with the {} watcher",
        store.as_str()
    );
    // The assembler keeps the one copy of each object (converted); the
    // watcher task keeps only the names, for the store's size.
    tasks.spawn(async move {
        let StoreLinks { tx, kick } = links;
        // Retried by this loop, not a `StreamBackoff`: its sleep can be
        // cut short.
        let stream = watcher(api, config).modify(trim);
        let mut stream = std::pin::pin!(stream);
        let mut names: HashSet<ObjectRef> = HashSet::new();
        let mut relist: Option<HashSet<ObjectRef>> = None;
        let id = |o: &K| ObjectRef::new(o.namespace().unwrap_or_default(), o.name_any());
        let mut retry = Retry::new(kick);
        loop {
            retry.pause().await;
            let Some(item) = stream.next().await else {
                return;
            };
            retry.after(match &item {
                Ok(_) => Outcome::Event,
                // A relist cures an expired watch: at once.
                Err(watcher::Error::WatchError(s)) if s.code == 410 => Outcome::Event,
                Err(_) => Outcome::Failed,
            });
            let change = match item {
                Ok(watcher::Event::Init) => {
                    relist = Some(HashSet::new());
                    Change::Init
                }
                Ok(watcher::Event::InitApply(o)) => {
                    relist.get_or_insert_default().insert(id(&o));
                    Change::InitApply(convert(&o))
                }
                Ok(watcher::Event::InitDone) => {
                    names = relist.take().unwrap_or_default();
                    Change::InitDone
                }
                Ok(watcher::Event::Apply(o)) => {
                    names.insert(id(&o));
                    Change::Apply(convert(&o))
                }
                Ok(watcher::Event::Delete(o)) => {
                    let o = id(&o);
                    names.remove(&o);
                    Change::Delete(o)
                }
                Err(watcher::Error::WatchError(s)) if s.code == 410 => Change::Expired,
                Err(e) if not_found(&e) => {
                    names.clear();
                    Change::Absent
                }
                Err(e) => Change::Error {
                    list: matches!(e, watcher::Error::InitialListFailed(_)),
                    message: watch_error(&e, store.as_str()),
                },
            };
            let msg = Msg::Store {
                store,
                size: names.len(),
                change,
            };
            if tx.send(msg).is_err() {
                return;
            }
        }
    });
}

/// Whether the API server has no such resource (`404 Not Found` on the
/// list or the watch): the CRD of an optional kind is not installed.
fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// What a watch error says. kube's client reads a watch line that is
/// neither an event of the kind nor an error status as an empty status (no
/// code, no message): that is an object the agent cannot decode as its
/// kind, which the API server would have refused on write. Said so, as
/// `ApiError: : Status { code: 0, .. }` does not.
fn watch_error(e: &watcher::Error, kind: &str) -> String {
    match e {
        watcher::Error::WatchFailed(kube::Error::Api(s)) if s.code == 0 && s.message.is_empty() => {
            format!(
                "the watch carried a {kind} the agent cannot decode (an object outside the \
                 {kind} schema, which an API server refuses on write); the watch starts again \
                 from before it"
            )
        }
        _ => error_chain(e),
    }
}

/// `error: cause: cause`, as `{err:#}` prints an anyhow chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watcher's retry doubles to its cap, and a kick (the API server
    /// found again) ends the pause at once rather than up to 30 s later.
    #[tokio::test(start_paused = true)]
    async fn a_kick_ends_a_watchers_backoff() {
        let (kick, kicked) = watch::channel(0u64);
        let mut retry = Retry::new(kicked);
        let start = tokio::time::Instant::now();
        retry.pause().await;
        assert_eq!(start.elapsed(), Duration::ZERO, "no pause while healthy");
        let mut waited = Vec::new();
        for _ in 0..7 {
            retry.after(Outcome::Failed);
            let t = tokio::time::Instant::now();
            retry.pause().await;
            waited.push(t.elapsed().as_millis());
        }
        assert_eq!(waited, [800, 1600, 3200, 6400, 12800, 25600, 30000]);

        retry.after(Outcome::Failed);
        let kicker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            kick.send_modify(|k| *k += 1);
            kick
        });
        let t = tokio::time::Instant::now();
        retry.pause().await;
        assert_eq!(t.elapsed(), Duration::from_secs(2), "the kick ended it");
        let kick = kicker.await.expect("kicker");

        // A kick before a failure does not shorten the pause after it.
        kick.send_modify(|k| *k += 1);
        retry.after(Outcome::Failed);
        let t = tokio::time::Instant::now();
        retry.pause().await;
        assert_eq!(t.elapsed(), WATCH_RETRY_MAX);

        retry.after(Outcome::Event);
        let t = tokio::time::Instant::now();
        retry.pause().await;
        assert_eq!(t.elapsed(), Duration::ZERO, "an event resets it");
    }

    /// A Pod as the API serves it, with much netpol never reads.
    #[expect(
        clippy::needless_pass_by_value,
        reason = "callers pass `json!` literals"
    )]
    fn pod_value(name: &str, ip: &str, port: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "x", "labels": {"app": name},
                         "uid": "u-1", "resourceVersion": "7",
                         "annotations": {"big": "x".repeat(1000), ALLOW_ANY_SOURCE_ANNOTATION: "true",
                                         "nested\\\"key": "v"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "rs", "uid": "rs-uid", "controller": true}],
                         "managedFields": [{"manager": "kubectl", "time": "2025-01-01T00:00:00Z",
                                            "fieldsType": "FieldsV1",
                                            "fieldsV1": {"f:metadata": {"f:labels": {}}}}]},
            "spec": {"nodeName": "n1", "hostNetwork": false,
                     "containers": [{"name": "c", "image": "busybox", "env": [{"name": "A", "value": "1"}],
                                     "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}]},
                                    {"name": "d", "ports": null}],
                     "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}, {"ip": "fd00::1"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        })
    }

    fn pod_json(name: &str, ip: &str, port: serde_json::Value) -> SlimPod {
        serde_json::from_value(pod_value(name, ip, port)).expect("a pod")
    }

    #[test]
    fn watched_lists_every_store_once() {
        assert_eq!(WATCHED.len(), StoreKind::ALL.len());
        let expect = [
            ("", "pods"),
            ("", "namespaces"),
            ("", "nodes"),
            ("networking.k8s.io", "networkpolicies"),
            ("", "services"),
            ("policy.networking.k8s.io", "clusternetworkpolicies"),
        ];
        assert_eq!(WATCHED.len(), expect.len());
        for (w, e) in WATCHED.iter().zip(expect) {
            assert_eq!((w.0, w.1), e);
        }
    }

    #[test]
    fn slim_pod_converts_as_the_full_one() {
        for (text, port) in [
            (
                pod_value("a", "10.0.0.1", serde_json::json!(80)).to_string(),
                80,
            ),
            // null and absent fields, as k8s-openapi takes them
            (
                r#"{"metadata": {"name": "b", "namespace": "x", "annotations": null,
                    "labels": null}, "spec": {"containers": null}, "status": null}"#
                    .to_owned(),
                0,
            ),
        ] {
            let full: core::Pod = serde_json::from_str(&text).expect("full decode");
            let slim: SlimPod = serde_json::from_str(&text).expect("slim decode");
            assert_eq!(Pod::try_from(&slim.0), Pod::try_from(&full), "{text}");
            assert_eq!(slim.0.metadata.uid, full.metadata.uid);
            assert_eq!(
                slim.0.metadata.resource_version,
                full.metadata.resource_version
            );
            assert!(slim.0.metadata.managed_fields.is_none());
            assert!(slim.0.metadata.owner_references.is_none());
            if port != 0 {
                let pod = Pod::try_from(&slim.0).expect("valid");
                assert!(pod.allow_any_source);
                assert_eq!(pod.ips.len(), 2);
                assert_eq!(pod.ports[0].port, 80);
                let annotations = slim.0.metadata.annotations.as_ref().expect("kept");
                assert_eq!(annotations.len(), 1, "only the annotation the model reads");
                let status = slim.0.status.as_ref().expect("status");
                assert!(status.conditions.is_none());
                assert!(slim.0.spec.as_ref().expect("spec").volumes.is_none());
            }
        }
        // A watch event decodes it too (kube's `WatchEvent` wraps it).
        let event = format!(
            r#"{{"type": "ADDED", "object": {}}}"#,
            pod_value("c", "10.0.0.3", serde_json::json!(81))
        );
        let e: kube::core::WatchEvent<SlimPod> = serde_json::from_str(&event).expect("event");
        let kube::core::WatchEvent::Added(p) = e else {
            panic!("not an ADDED event")
        };
        assert_eq!(p.0.metadata.name.as_deref(), Some("c"));
        // A kept field of the wrong type is refused, as the full decode
        // refuses it.
        let bad = r#"{"metadata": {"name": "d", "labels": {"a": 1}}}"#;
        assert!(serde_json::from_str::<core::Pod>(bad).is_err());
        assert!(serde_json::from_str::<SlimPod>(bad).is_err());
    }

    #[test]
    fn a_list_counts_every_event_once_it_is_done() {
        let metrics = Metrics::new();
        let mut asm = Assembler::new("n1".into());
        let msg = |size, change| Msg::Store {
            store: StoreKind::Pod,
            size,
            change,
        };
        let count = |m: &Metrics| {
            let text = m.encode();
            text.lines()
                .find_map(|l| l.strip_prefix("netpol_watch_events_total{kind=\"Pod\"} "))
                .map(str::to_owned)
                .unwrap_or_default()
        };
        asm.handle(msg(0, Change::Init), Some(&metrics));
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            let pod = pod_json(name, &format!("10.0.0.{}", i + 1), serde_json::json!(80));
            asm.handle(msg(0, Change::InitApply(convert_pod(&pod))), Some(&metrics));
        }
        assert_eq!(count(&metrics), "1", "the list's objects wait for its end");
        asm.handle(msg(3, Change::InitDone), Some(&metrics));
        assert_eq!(count(&metrics), "5", "Init, three objects, InitDone");
        assert!(
            metrics
                .encode()
                .contains("netpol_store_objects{kind=\"Pod\"} 3")
        );
        let pod = pod_json("d", "10.0.0.4", serde_json::json!(80));
        asm.handle(msg(4, Change::Apply(convert_pod(&pod))), Some(&metrics));
        assert_eq!(count(&metrics), "6");
        assert!(
            metrics
                .encode()
                .contains("netpol_store_objects{kind=\"Pod\"} 4")
        );
    }

    #[test]
    fn invalid_pod_update_keeps_the_valid_version_and_a_relist_too() {
        let mut asm = Assembler::new("n1".into());
        let msg = |change| Msg::Store {
            store: StoreKind::Pod,
            size: 1,
            change,
        };
        let good = pod_json("a", "10.0.0.1", serde_json::json!(80));
        let bad = pod_json("a", "10.0.0.1", serde_json::json!(0));
        asm.handle(msg(Change::Init), None);
        asm.handle(msg(Change::InitApply(convert_pod(&good))), None);
        asm.handle(msg(Change::InitDone), None);
        let id = ObjectRef::new("x", "a");
        let valid = asm.snapshot.pods[&id].clone();
        asm.handle(msg(Change::Apply(convert_pod(&bad))), None);
        assert_eq!(asm.snapshot.pods[&id], valid);
        assert_eq!(asm.snapshot.errors().len(), 1);
        asm.handle(msg(Change::Init), None);
        asm.handle(msg(Change::InitApply(convert_pod(&bad))), None);
        asm.handle(msg(Change::InitDone), None);
        assert_eq!(asm.snapshot.pods[&id], valid);
        assert_eq!(asm.snapshot.errors().len(), 1);
    }

    fn service_json(port: i32) -> core::Service {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s", "namespace": "x", "labels": {"app": "s"},
                         "annotations": {"big": "x".repeat(1000)},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.43.0.1",
                     "clusterIPs": ["10.43.0.1", "fd00::1"], "externalIPs": ["192.0.2.1"],
                     "selector": {"app": "a"}, "sessionAffinity": "None",
                     "ports": [{"name": "http", "port": port, "targetPort": 8080,
                                "nodePort": 30080, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1", "hostname": "lb",
                                                      "ports": [{"port": 80, "protocol": "TCP"}]}]}}
        }))
        .expect("a Service")
    }

    #[test]
    fn trimmed_service_converts_as_the_full_one() {
        let full = service_json(80);
        let mut trimmed = full.clone();
        trim_service(&mut trimmed);
        let converted = Service::try_from(&trimmed).expect("valid");
        assert_eq!(Ok(converted.clone()), Service::try_from(&full));
        assert_eq!(converted.cluster_ips.len(), 2);
        assert_eq!(converted.load_balancer_ips.len(), 1);
        assert!(trimmed.metadata.managed_fields.is_none());
        assert!(trimmed.metadata.annotations.is_none());
        let spec = trimmed.spec.expect("spec");
        assert!(spec.selector.is_none());
        assert!(spec.ports.expect("ports")[0].target_port.is_none());
    }

    #[test]
    fn trimmed_policies_keep_their_staging_annotations() {
        let mut np: networking::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x",
                         "annotations": {"big": "x".repeat(1000), STAGED_ANNOTATION: "true"}},
            "spec": {"podSelector": {}}
        }))
        .expect("a NetworkPolicy");
        trim_policy(&mut np);
        assert_eq!(
            np.metadata
                .annotations
                .as_ref()
                .map(|a| a.keys().collect::<Vec<_>>()),
            Some(vec![&STAGED_ANNOTATION.to_owned()])
        );
        let p = NetworkPolicy::try_from(&np).expect("valid");
        assert_eq!(p.staging, crate::model::Staging::Staged);
        let mut cnp: crate::api::ClusterNetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "guard", "annotations": {STAGED_DELETE_ANNOTATION: "true"}},
            "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}}
        }))
        .expect("a ClusterNetworkPolicy");
        trim_cluster_policy(&mut cnp);
        let p = ClusterNetworkPolicy::try_from(&cnp).expect("valid");
        assert_eq!(p.staging, crate::model::Staging::StagedDelete);
    }

    #[test]
    fn services_reach_the_snapshot_and_an_invalid_update_keeps_the_valid_one() {
        let mut asm = Assembler::new("n1".into());
        let msg = |change| Msg::Store {
            store: StoreKind::Service,
            size: 1,
            change,
        };
        asm.handle(msg(Change::Init), None);
        asm.handle(
            msg(Change::InitApply(convert_service(&service_json(80)))),
            None,
        );
        asm.handle(msg(Change::InitDone), None);
        let id = ObjectRef::new("x", "s");
        let valid = asm.snapshot.services[&id].clone();
        asm.handle(msg(Change::Apply(convert_service(&service_json(0)))), None);
        assert_eq!(asm.snapshot.services[&id], valid);
        assert_eq!(asm.snapshot.errors().len(), 1);
        asm.handle(msg(Change::Init), None);
        asm.handle(
            msg(Change::InitApply(convert_service(&service_json(0)))),
            None,
        );
        asm.handle(msg(Change::InitDone), None);
        assert_eq!(asm.snapshot.services[&id], valid, "kept across a relist");
        assert_eq!(asm.snapshot.errors().len(), 1);
        asm.dirty = false;
        asm.handle(msg(Change::Delete(id.clone())), None);
        assert!(asm.snapshot.services.is_empty());
        assert!(asm.snapshot.errors().is_empty());
        assert!(asm.dirty);
    }

    #[test]
    fn an_undecodable_watch_event_is_named_as_such() {
        let empty = watcher::Error::WatchFailed(kube::Error::Api(Box::default()));
        let said = watch_error(&empty, "NetworkPolicy");
        assert!(
            said.contains("cannot decode") && said.contains("NetworkPolicy"),
            "{said}"
        );
        let gone = kube::core::Status {
            code: 403,
            message: "forbidden".into(),
            ..Default::default()
        };
        let said = watch_error(
            &watcher::Error::WatchFailed(kube::Error::Api(Box::new(gone))),
            "Pod",
        );
        assert!(said.contains("forbidden"), "{said}");
    }

    #[test]
    fn nothing_is_published_until_every_store_listed() {
        let mut asm = Assembler::new("n1".into());
        for store in StoreKind::ALL {
            assert!(
                asm.take_input().is_none(),
                "published before {store:?} listed"
            );
            for change in [Change::Init, Change::InitDone] {
                asm.handle(
                    Msg::Store {
                        store,
                        size: 0,
                        change,
                    },
                    None,
                );
            }
        }
        assert!(asm.take_input().is_some());
        assert!(asm.take_input().is_none(), "nothing changed");
    }

    /// A relist (after a 410 Gone or an outage) may carry what the watch
    /// missed: every kind's is published, `NetworkPolicies`' included (they
    /// were not).
    #[test]
    fn a_relist_of_any_store_is_published() {
        let mut asm = Assembler::new("n1".into());
        let list = |asm: &mut Assembler, store| {
            for change in [Change::Init, Change::InitDone] {
                let msg = Msg::Store {
                    store,
                    size: 0,
                    change,
                };
                asm.handle(msg, None);
            }
        };
        for store in StoreKind::ALL {
            list(&mut asm, store);
        }
        assert!(asm.take_input().is_some());
        for store in StoreKind::ALL {
            list(&mut asm, store);
            assert!(asm.take_input().is_some(), "{store:?} relisted");
        }
    }
}
