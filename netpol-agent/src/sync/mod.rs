//! The one reconcile loop: the only code that drives the kernel.
//!
//! Triggers: a new [`Input`] from the source (the first of a burst at
//! once, the rest coalesced over the debounce; compiled, diffed against
//! the state in force and applied through the map writer; the first apply
//! diffs from the pinned maps, [`crate::resume`]),
//! and link changes (a new veth is marked "pod interface, not programmed"
//! and attached; a gone one is detached and its entry deleted). Binding a
//! veth to its pod needs no traffic: its peer's addresses are read in the
//! peer's namespace (or the node's routes point at it) and matched to the
//! pods' `status.podIPs`; the pod's compiled endpoint entry is then written
//! under the veth's index (its policy entries, keyed by endpoint id, are in
//! the maps already).
//!
//! # Ids of unbound interfaces
//! A veth with no pod yet gets `EndpointInfo { id: UNBOUND_ID_BASE |
//! ifindex, flags: NOT_PROGRAMMED }`. The compiler's endpoint ids stop at
//! [`compiler::MAX_ENDPOINT_ID`] (2³⁰ − 1; the staged view's entries use
//! them with bit 30 set), so these never collide with a compiled id, need
//! no allocation state, and differ per interface. The id
//! of an unprogrammed entry never reaches a policy lookup; it only keys
//! conntrack entries of the node's own traffic (probes), which therefore
//! cannot be confused with a programmed pod's connections.
use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use netpol_common::EndpointInfo;
use tokio::sync::{mpsc, watch};

use crate::{
    compiler::{self, Changes, Compiled, Compiler, IdAllocation, RawOp},
    datapath::{Datapath, writer::MapWriteError},
    model::{ObjectRef, Snapshot},
    node::links::LinkEvent,
    provenance::{self, Bound, Inputs, State},
    resume,
    sources::{Fingerprint, Input, ObjectCounts, SourceHealth},
    status::{Families, InterfaceStatus, Metrics, Status},
};

mod cni;
mod dataplane;
mod interfaces;

pub(crate) use dataplane::Dataplane;
use interfaces::{Found, Iface};
pub use interfaces::{UNBOUND_ID_BASE, unbound_entry};

/// How long a failed apply waits before it is retried.
const RETRY: Duration = Duration::from_secs(1);

/// How long the first apply after a restart waits for the interfaces a
/// previous agent programmed to be found and bound again.
const ADOPT_WAIT: Duration = Duration::from_secs(3);
/// How often it looks while it waits.
const ADOPT_POLL: Duration = Duration::from_millis(10);

/// How long the node goes without a new pod interface or CNI call before
/// the interfaces attached with netlink filters move to TCX links (see
/// [`crate::datapath::Datapath::attach_staged`]): each move holds
/// `rtnl_lock` for two RCU grace periods, which a pod being started would
/// wait for.
pub(crate) const TCX_QUIET: Duration = Duration::from_millis(200);

/// Settings of the loop.
#[derive(Clone, Debug)]
pub(crate) struct SyncConfig {
    pub node: Option<String>,
    pub debounce: Duration,
    pub interfaces: Option<glob::Pattern>,
    /// `--uplinks`: which other links get `leave_node` (see `uplinks`).
    pub uplinks: Option<glob::Pattern>,
    pub new_pods: &'static str,
    /// The source's health (the `kube` source): the agent is not ready
    /// while it cannot reach the API server.
    pub source_health: Option<watch::Receiver<SourceHealth>>,
    /// Where the state file (`crate::provenance`) is written after every
    /// apply; `None`: nowhere.
    pub state_dir: Option<PathBuf>,
}

/// The compile the maps hold and the snapshot it was compiled from: the
/// next input's change set is what differs from that snapshot.
struct InForce {
    compiler: Compiler,
    snapshot: Snapshot,
    /// The fingerprint of `snapshot`.
    fingerprint: Fingerprint,
}

/// What an incremental apply replaces, kept until the write is known: a
/// rolled-back write puts it back in force.
struct Before {
    /// The snapshot in force before.
    snapshot: Snapshot,
    /// The ids its compile gave (the rolled-back maps hold them).
    ids: crate::compiler::IdAllocation,
    /// Its fingerprint.
    fingerprint: Fingerprint,
    /// The new snapshot's, updated from the change set.
    next: Fingerprint,
}

pub(crate) struct SyncLoop<D: Dataplane = Datapath> {
    dp: D,
    uplinks: crate::node::uplinks::Uplinks,
    cfg: SyncConfig,
    /// The compile in force and its snapshot; `None` until the first
    /// apply (and after a write whose rollback failed: the next diffs from
    /// the maps).
    in_force: Option<InForce>,
    /// When the last compile ran: a change within `cfg.debounce` of it
    /// waits for the rest of its burst.
    last_compile: Option<tokio::time::Instant>,
    /// When a coalesced change is compiled.
    compile_at: Option<tokio::time::Instant>,
    input: Option<Arc<Input>>,
    ifaces: BTreeMap<u32, Iface>,
    bindings: BTreeMap<ObjectRef, u32>,
    generation: u64,
    fingerprint: Option<String>,
    ready: bool,
    last_error: Option<String>,
    /// Writes the state file (`cfg.state_dir`) off the loop.
    state: Option<provenance::Writer>,
    families: Families,
    routes_pending: bool,
    routes_again: bool,
    retry_at: Option<tokio::time::Instant>,
    /// The last failure to restore the pins, logged once.
    pins_error: Option<String>,
    /// Until when the first apply waits for adopted interfaces.
    adopt_until: Option<tokio::time::Instant>,
    /// The previous agent's bindings, from its state file: what binds a
    /// pod to the interface it programmed when nothing else can tell yet
    /// (without `CAP_SYS_ADMIN` a peer's addresses cannot be read, and a
    /// quiet pod has no neighbour entry).
    remembered: interfaces::Remembered,
    /// The state file as read at start, until the first apply's resume
    /// takes it.
    previous_state: Option<provenance::State>,
    rebind_at: Option<tokio::time::Instant>,
    /// The last new pod interface or CNI call: interfaces move to TCX
    /// links [`TCX_QUIET`] after it.
    last_pod_start: Option<tokio::time::Instant>,
    /// After a failed move to TCX links, when the next is tried.
    tcx_retry_at: Option<tokio::time::Instant>,
    status: watch::Sender<Status>,
    metrics: Arc<Metrics>,
    found_tx: mpsc::UnboundedSender<Found>,
    found_rx: Option<mpsc::UnboundedReceiver<Found>>,
    /// Who is behind each endpoint id and address, for the deny-event
    /// reader; sent after every applied compile.
    directory: Option<watch::Sender<Arc<crate::events::Directory>>>,
    /// Pods the CNI plugin reported, and the ADDs waiting for them.
    cni: cni::Cni,
}

impl<D: Dataplane> SyncLoop<D> {
    pub(crate) fn new(
        dp: D,
        cfg: SyncConfig,
        families: Families,
        status: watch::Sender<Status>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (found_tx, found_rx) = mpsc::unbounded_channel();
        Self {
            dp,
            uplinks: crate::node::uplinks::Uplinks::new(
                cfg.interfaces.clone(),
                cfg.uplinks.clone(),
            ),
            cfg,
            in_force: None,
            last_compile: None,
            compile_at: None,
            input: None,
            ifaces: BTreeMap::new(),
            bindings: BTreeMap::new(),
            generation: 0,
            fingerprint: None,
            ready: false,
            last_error: None,
            state: None,
            families,
            routes_pending: false,
            routes_again: false,
            retry_at: None,
            pins_error: None,
            adopt_until: None,
            remembered: interfaces::Remembered::default(),
            previous_state: None,
            rebind_at: None,
            last_pod_start: None,
            tcx_retry_at: None,
            status,
            metrics,
            found_tx,
            found_rx: Some(found_rx),
            directory: None,
            cni: cni::Cni::default(),
        }
    }

    /// The compile in force.
    fn compiled(&self) -> Option<&Compiled> {
        self.in_force.as_ref().map(|f| f.compiler.compiled())
    }

    /// Publishes a [`crate::events::Directory`] on `tx` after every
    /// applied compile.
    pub(crate) fn with_directory(
        mut self,
        tx: watch::Sender<Arc<crate::events::Directory>>,
    ) -> Self {
        self.directory = Some(tx);
        self
    }

    /// Runs until `stop`; the datapath is dropped on return, its
    /// (persistent) attachments left in place for the next agent.
    pub(crate) async fn run(
        mut self,
        mut inputs: watch::Receiver<Option<Arc<Input>>>,
        mut links: mpsc::UnboundedReceiver<LinkEvent>,
        mut cni: mpsc::UnboundedReceiver<crate::node::cni::CniCall>,
        mut stop: watch::Receiver<bool>,
    ) {
        let Some(mut found) = self.found_rx.take() else {
            return;
        };
        self.publish();
        let clock_tx = self.found_tx.clone();
        let clock_watch = tokio::spawn(crate::datapath::clock::watch(
            self.dp.clock(),
            move |clock, skew| clock_tx.send(Found::Clock { clock, skew }).is_ok(),
        ));
        let mut health = self.cfg.source_health.clone();
        let mut alive = tokio::time::interval(crate::status::ALIVE_EVERY);
        let mut pins = tokio::time::interval(crate::datapath::pins::CHECK_EVERY);
        pins.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Every turn of the loop, each apply included, ends here.
            self.metrics.alive(crate::status::Task::Loop);
            let retry = self.retry_at;
            let rebind = self.rebind_at;
            let compile_at = self.compile_at;
            let cni_deadline = self.cni.deadline();
            let upgrade_at = self.upgrade_at();
            let mut compile = false;
            let mut endpoints = false;
            tokio::select! {
                () = crate::shutdown::stopped(&mut stop) => break,
                _ = alive.tick() => {}
                _ = pins.tick() => self.restore_pins(),
                r = inputs.changed() => {
                    if r.is_err() {
                        break;
                    }
                    // The first change of a burst is compiled at once; the
                    // rest of it (a folder written file by file) waits
                    // out the debounce and becomes one compile.
                    let now = tokio::time::Instant::now();
                    match self.last_compile {
                        Some(t) if now < t + self.cfg.debounce => {
                            self.compile_at.get_or_insert(t + self.cfg.debounce);
                        }
                        _ => compile = true,
                    }
                }
                () = async {
                    match compile_at {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => compile = true,
                Some(ev) = links.recv() => endpoints = self.on_link(&ev),
                // An ADD is compiled at once, debounce or not: a pod waits.
                Some(call) = cni.recv() => compile = self.on_cni(call),
                () = async {
                    match cni_deadline {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {}
                Some(f) = found.recv() => endpoints = self.on_found(f),
                Some(()) = async {
                    match health.as_mut() {
                        Some(h) => h.changed().await.ok(),
                        None => std::future::pending().await,
                    }
                } => self.publish(),
                () = async {
                    match retry {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => compile = true,
                () = async {
                    match rebind {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.rebind_at = None;
                    self.unbound_pods_lookup();
                }
                () = async {
                    match upgrade_at {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => self.upgrade_one(),
            }
            if compile {
                self.compile_at = None;
                self.last_compile = Some(tokio::time::Instant::now());
                let latest = inputs.borrow_and_update().clone();
                if let Some(input) = latest {
                    self.input = Some(input);
                    self.sync();
                }
            } else if endpoints {
                self.sync_endpoints_and_publish();
            }
            self.answer_cni();
        }
        clock_watch.abort();
        tracing::info!("sync loop stopped");
    }

    /// When the next interface on netlink filters moves to TCX links: once
    /// the first apply is done (enforcement first), [`TCX_QUIET`] after the
    /// last pod start, and not before a failed move's retry.
    fn upgrade_at(&self) -> Option<tokio::time::Instant> {
        if self.in_force.is_none() || !self.dp.awaits_tcx() {
            return None;
        }
        let quiet = self.last_pod_start.map(|t| t + TCX_QUIET);
        Some(
            quiet
                .max(self.tcx_retry_at)
                .unwrap_or_else(tokio::time::Instant::now),
        )
    }

    /// Moves one interface to TCX links (one per turn of the loop, so a
    /// change or a pod start waits for one move at most).
    fn upgrade_one(&mut self) {
        match self.dp.upgrade_to_tcx() {
            Ok(moved) => {
                self.tcx_retry_at = None;
                if moved.is_some() {
                    self.publish();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "moving a pod interface to TCX links (its netlink filters keep enforcing; tried again in {RETRY:?})");
                self.tcx_retry_at = Some(tokio::time::Instant::now() + RETRY);
            }
        }
    }

    /// Puts back the pins that went missing (see `datapath::pins`),
    /// saying so; a failure is logged once until it changes.
    fn restore_pins(&mut self) {
        match self.dp.restore_pins() {
            Ok(restored) if restored.is_empty() => {
                if self.pins_error.take().is_some() {
                    tracing::info!("pins restored");
                }
            }
            Ok(restored) => {
                self.metrics.pins_restored.inc_by(restored.len() as u64);
                tracing::warn!(
                    count = restored.len(),
                    first = %restored[0].display(),
                    "pins were missing: pinned them again from the descriptors this agent holds \
                     (something removed them; without them the programs would be detached when \
                     the agent exits)"
                );
            }
            Err(e) => {
                self.metrics.error("pins");
                let e = e.to_string();
                if self.pins_error.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "restoring pins");
                    self.pins_error = Some(e);
                }
            }
        }
    }

    /// Compiles the latest input and applies the difference.
    ///
    /// The change set is what differs between the snapshot in force and
    /// the input's: the snapshot's maps share structure between versions,
    /// so finding it costs in the number of changes (µs), and
    /// [`Compiler::update`] recompiles only the local pods they reach.
    fn sync(&mut self) {
        let Some(input) = self.input.clone() else {
            return;
        };
        if self.in_force.is_none() && !self.adoption_settled() {
            self.retry_at = Some(tokio::time::Instant::now() + ADOPT_POLL);
            return;
        }
        let generation = self.generation + 1;
        let span = tracing::info_span!("sync", generation);
        let _enter = span.enter();
        let start = Instant::now();
        // A clone of a snapshot shares its maps: O(1).
        let mut snapshot = input.snapshot.clone();
        if let Some(n) = &self.cfg.node {
            snapshot.local_node = Some(n.clone());
        }
        self.cni_overlay(&mut snapshot);
        // The first apply (and the one after a write whose rollback failed
        // too) diffs from what the pinned maps hold: a previous agent's
        // state, or nothing, read back with the ids to keep.
        let (compiler, ops, before) = if let Some(InForce {
            mut compiler,
            snapshot: old,
            fingerprint,
        }) = self.in_force.take()
        {
            let ids = compiler.compiled().ids.clone();
            let changes = Changes::between(&old, &snapshot);
            let ops: Vec<RawOp> = compiler.update(&snapshot, &changes).raw().collect();
            let mut next = fingerprint;
            next.update(&old, &snapshot, &changes);
            let before = Before {
                snapshot: old,
                ids,
                fingerprint,
                next,
            };
            (compiler, ops, Some(before))
        } else {
            let old = self.resume(&snapshot);
            let compiler = Compiler::new(&snapshot, &old.ids);
            let ops: Vec<RawOp> = compiler::diff(&old, compiler.compiled()).raw().collect();
            (compiler, ops, None)
        };
        let resuming = before.is_none();
        let bindings = self.bind(compiler.compiled());
        let compiled = start.elapsed();
        let result = self.dp.writer().apply(&ops, &bindings).map(|r| r.applied);
        let written = start.elapsed();
        match result {
            Ok(mut applied) => {
                let fingerprint = match &before {
                    Some(b) => b.next,
                    None => Fingerprint::of(&snapshot),
                };
                self.in_force = Some(InForce {
                    compiler,
                    snapshot,
                    fingerprint,
                });
                if let Err(e) = self.sync_endpoints() {
                    self.fail("apply", format!("{e}"));
                    self.publish();
                    return;
                }
                if resuming && let Some(f) = &self.in_force {
                    let sweep = resume::leftovers(self.dp.writer().mirror(), f.compiler.compiled());
                    if let Err(e) = self.dp.writer().apply_kernel(&sweep) {
                        // Entries nothing points at: they cost room, not
                        // enforcement.
                        tracing::warn!(error = %e, "removing entries the previous agent left");
                    } else {
                        applied += sweep.len();
                    }
                }
                self.generation = generation;
                self.fingerprint = Some(fingerprint.to_string());
                self.ready = true;
                self.metrics.applied();
                // One copy of the compile in force, for the deny events'
                // directory and the state file's writer.
                let shared = self
                    .in_force
                    .as_ref()
                    .filter(|_| self.directory.is_some() || self.cfg.state_dir.is_some())
                    .map(|f| Arc::new(f.compiler.compiled().clone()));
                if let (Some(tx), Some(f), Some(c)) = (&self.directory, &self.in_force, &shared) {
                    tx.send_replace(Arc::new(crate::events::Directory::new(
                        c.clone(),
                        &f.snapshot,
                    )));
                }
                self.last_error = None;
                self.retry_at = None;
                let elapsed = start.elapsed();
                self.metrics.sync_duration.observe(elapsed.as_secs_f64());
                self.write_state(shared);
                tracing::info!(
                    generation,
                    fingerprint = self.fingerprint.as_deref().unwrap_or_default(),
                    applied,
                    counts = %self.dp.writer().counts(),
                    micros = elapsed.as_micros(),
                    compile_micros = compiled.as_micros(),
                    write_micros = written.saturating_sub(compiled).as_micros(),
                    "state applied"
                );
                self.unbound_pods_lookup();
            }
            Err(e) => {
                // Rolled back, the maps hold the compile of the old
                // snapshot again: compiled anew from it with the ids it
                // gave, the same entries (rare: a full compile, instead
                // of a copy of the compiler on every change). When the
                // rollback failed too, only the maps say what they hold,
                // and a first apply starts from them anyway.
                if let Some(b) = before
                    && !matches!(e, MapWriteError::RollbackFailed { .. })
                {
                    self.in_force = Some(InForce {
                        compiler: Compiler::new(&b.snapshot, &b.ids),
                        snapshot: b.snapshot,
                        fingerprint: b.fingerprint,
                    });
                }
                self.fail("apply", format!("{e}"));
                self.retry_at = Some(tokio::time::Instant::now() + RETRY);
            }
        }
        self.publish();
    }

    /// The pinned maps as the old state of the first diff
    /// ([`resume::resume`]), with the previous agent's state file naming
    /// the pods behind their ids.
    fn resume(&mut self, snapshot: &Snapshot) -> Compiled {
        // The probe names the pods behind programmed entries; with none
        // (a fresh node) the first apply compiles once, not twice.
        let (probe, bindings) = if self
            .dp
            .writer()
            .mirror()
            .endpoints
            .values()
            .any(EndpointInfo::programmed)
        {
            let probe = compiler::compile(snapshot, &IdAllocation::default());
            let bindings = self.bind(&probe);
            (probe, bindings)
        } else {
            (Compiled::default(), BTreeMap::new())
        };
        // Read once at start (for the bindings); read again after a
        // failed rollback, when this agent has written it since.
        let known = self
            .previous_state
            .take()
            .or_else(|| self.read_previous_state());
        let r = resume::resume(self.dp.writer().mirror(), known.as_ref(), &probe, &bindings);
        tracing::info!(
            endpoints = r.old.endpoints.len(),
            kept_endpoint_ids = r.kept_endpoints,
            kept_ruleset_ids = r.kept_rulesets,
            reserved_endpoint_ids = r.old.ids.reserved_endpoints.len(),
            reserved_ruleset_ids = r.old.ids.reserved_rulesets.len(),
            state_file = known.is_some(),
            "resuming from the pinned maps"
        );
        r.old
    }

    /// The state file in the state folder, if any.
    fn read_previous_state(&self) -> Option<provenance::State> {
        self.cfg.state_dir.as_deref().and_then(|dir| {
            provenance::State::read(dir)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "reading the previous state file; pods keep their ids by address");
                })
                .ok()
                .flatten()
        })
    }

    /// Hands the state file (the provenance of what the maps now hold:
    /// pods of the endpoint ids, rules of the entries) to its writer
    /// thread. A failure is logged (once until it changes) and counted,
    /// never fatal: enforcement does not depend on it.
    fn write_state(&mut self, compiled: Option<Arc<Compiled>>) {
        let (Some(dir), Some(in_force)) = (self.cfg.state_dir.as_ref(), self.in_force.as_ref())
        else {
            return;
        };
        if self.state.is_none() {
            let metrics = self.metrics.clone();
            let mut last_error: Option<String> = None;
            let report =
                move |dir: &std::path::Path, r: Result<_, provenance::ProvenanceError>| match r {
                    Ok(_) => {
                        if last_error.take().is_some() {
                            tracing::info!(dir = %dir.display(), "state file written again");
                        }
                    }
                    Err(e) => {
                        metrics.error("state");
                        let e = e.to_string();
                        if last_error.as_ref() != Some(&e) {
                            tracing::warn!(
                                error = %e,
                                "writing the state file (inspect and explain cannot name pods \
                                 and rules)"
                            );
                            last_error = Some(e);
                        }
                    }
                };
            match provenance::Writer::start(dir.clone(), Box::new(report)) {
                Ok(w) => self.state = Some(w),
                Err(e) => {
                    self.metrics.error("state");
                    tracing::warn!(error = %e, "starting the state file writer");
                    return;
                }
            }
        }
        let interfaces: BTreeMap<ObjectRef, Bound> = self
            .bindings
            .iter()
            .filter_map(|(pod, &ifindex)| {
                let name = self.ifaces.get(&ifindex)?.link.name.clone();
                Some((pod.clone(), Bound { ifindex, name }))
            })
            .collect();
        // Cheap next to building and serializing the state: entries share
        // their rule lists, a snapshot clone shares its maps.
        let compiled = compiled.unwrap_or_else(|| Arc::new(in_force.compiler.compiled().clone()));
        let snapshot = in_force.snapshot.clone();
        let generation = self.generation;
        let fingerprint = self.fingerprint.clone();
        let pin_dir = self.dp.pin_dir().to_owned();
        if let Some(w) = &self.state {
            w.submit(move || {
                State::build(&Inputs {
                    compiled: &compiled,
                    snapshot: &snapshot,
                    interfaces: &interfaces,
                    generation,
                    fingerprint: fingerprint.as_deref(),
                    pin_dir: &pin_dir,
                })
            });
        }
    }

    fn fail(&mut self, stage: &str, message: String) {
        self.metrics.error(stage);
        tracing::error!(stage, error = %message, "sync failed");
        self.last_error = Some(message);
    }

    /// Whether the first apply may run: every interface a previous agent
    /// left programmed (and that still exists) is known and looked up, so
    /// that the apply rewrites its entry with the same pod's rather than
    /// deleting it (fail-open) or marking it unprogrammed (fail-closed).
    /// Waits [`ADOPT_WAIT`] at most.
    fn adoption_settled(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if self.adopt_until.is_none() {
            self.previous_state = self.read_previous_state();
            self.remembered = interfaces::Remembered::of(self.previous_state.as_ref());
        }
        let until = *self.adopt_until.get_or_insert(now + ADOPT_WAIT);
        if now >= until {
            return true;
        }
        self.dp
            .writer()
            .mirror()
            .endpoints
            .iter()
            .filter(|(_, e)| e.programmed())
            .all(|(&i, _)| match self.ifaces.get(&i) {
                Some(f) => {
                    // The state file names it: bound whatever the lookups
                    // say.
                    self.remembered.names(i, &f.link.name)
                        || (!f.lookup_pending
                            && (!f.peer.is_empty()
                                || (!self.routes_pending && !f.routed.is_empty())))
                }
                // Gone: its entry goes.
                None => nix::net::if_::if_indextoname(i).is_err(),
            })
    }

    /// Pinned maps of another layout are being replaced: once the new
    /// ones hold the whole state (every pod interface programmed), the
    /// datapath swaps its programs in and drops the old maps.
    fn commit_layout_when_filled(&mut self) {
        if self.dp.replacing_layout().is_none() || !self.ready {
            return;
        }
        let awaiting = self.dp.awaiting_interfaces();
        let endpoints = &self.dp.writer().mirror().endpoints;
        let filled = !awaiting
            && self
                .ifaces
                .keys()
                .all(|i| endpoints.get(i).is_some_and(EndpointInfo::programmed));
        if filled && let Err(e) = self.dp.commit_layout() {
            self.fail("layout", format!("{e}"));
        }
    }

    fn publish(&mut self) {
        self.commit_layout_when_filled();
        let endpoints = self.dp.writer().mirror().endpoints.clone();
        let counts = self.dp.writer().counts();
        let interfaces = self
            .ifaces
            .iter()
            .map(|(&ifindex, f)| {
                let pod = self
                    .bindings
                    .iter()
                    .find(|&(_, &i)| i == ifindex)
                    .map(|(p, _)| p.to_string());
                let mut addresses = f.peer.clone();
                addresses.extend(f.routed.iter().filter(|a| !f.peer.contains(a)));
                let programmed = endpoints
                    .get(&ifindex)
                    .is_some_and(EndpointInfo::programmed);
                InterfaceStatus {
                    name: f.link.name.clone(),
                    ifindex,
                    pod,
                    addresses,
                    programmed,
                    awaiting_tcx: self.dp.interface_awaits_tcx(&f.link.name),
                }
            })
            .collect();
        let input = self.input.as_deref();
        self.metrics.manifest_problems.set(
            input
                .map_or(0, |i| i.problems.len())
                .try_into()
                .unwrap_or(i64::MAX),
        );
        let source = self
            .cfg
            .source_health
            .as_ref()
            .map(|h| h.borrow().clone())
            .unwrap_or_default();
        let status = Status {
            listen: self.status.borrow().listen,
            to_host: self.status.borrow().to_host.clone(),
            // An unreachable API server: what is enforced stays, but this
            // node no longer follows the cluster.
            ready: self.ready && source.unreachable.is_none(),
            source,
            generation: self.generation,
            fingerprint: self.fingerprint.clone(),
            node: self
                .cfg
                .node
                .clone()
                .or_else(|| self.compiled().and_then(|c| c.node.clone())),
            families: self.families,
            new_pods: self.cfg.new_pods.to_owned(),
            objects: input
                .map(|i| ObjectCounts::of(&i.snapshot))
                .unwrap_or_default(),
            maps: counts,
            interfaces,
            uplinks: self.uplinks.status(),
            problems: input.map(|i| i.problems.clone()).unwrap_or_default(),
            last_error: self.last_error.clone(),
        };
        self.metrics.observe(&status);
        self.status.send_replace(status);
    }
}

#[cfg(test)]
mod tests;
