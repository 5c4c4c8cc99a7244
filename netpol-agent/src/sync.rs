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
//! [`compiler::MAX_ENDPOINT_ID`] (2³¹ − 1), so these never collide with a
//! compiled id, need no allocation state, and differ per interface. The id
//! of an unprogrammed entry never reaches a policy lookup; it only keys
//! conntrack entries of the node's own traffic (probes), which therefore
//! cannot be confused with a programmed pod's connections.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use netpol_common::{EndpointInfo, endpoint_flags};
use tokio::sync::{mpsc, watch};

use crate::{
    compiler::{self, Changes, Compiled, Compiler, IdAllocation, RawOp},
    datapath::{
        Datapath, DatapathError,
        clock::{JiffyClock, Skew},
        pins::RestoreError,
        writer::{Backend, KernelOp, MapWriteError, MapWriter},
    },
    model::{ObjectRef, Snapshot},
    node::links::{self, Link, LinkEvent},
    provenance::{self, Bound, Inputs, State},
    resume,
    sources::{Fingerprint, Input, ObjectCounts, SourceHealth},
    status::{Families, InterfaceStatus, Metrics, Status},
};

/// High bit of the ids of unbound pod interfaces (see the module docs).
pub const UNBOUND_ID_BASE: u32 = 1 << 31;

/// How long a failed apply waits before it is retried.
const RETRY: Duration = Duration::from_secs(1);

/// How often bindings are looked for again while a compiled pod and a pod
/// interface are both unbound (a bridge learns a pod's MAC only once the
/// pod speaks, e.g. answers the kubelet's first probe).
const REBIND: Duration = Duration::from_secs(1);
/// How long the first apply after a restart waits for the interfaces a
/// previous agent programmed to be found and bound again.
const ADOPT_WAIT: Duration = Duration::from_secs(3);
/// How often it looks while it waits.
const ADOPT_POLL: Duration = Duration::from_millis(10);

/// The endpoint entry of a pod interface with no pod yet.
#[must_use]
pub const fn unbound_entry(ifindex: u32) -> EndpointInfo {
    EndpointInfo {
        id: UNBOUND_ID_BASE | ifindex,
        flags: endpoint_flags::NOT_PROGRAMMED,
        ingress_gen: 0,
        egress_gen: 0,
        ipv4: [0; 4],
        ipv6: [0; 16],
        slot: 0,
    }
}

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

#[derive(Debug)]
struct Iface {
    link: Link,
    /// Addresses of the peer, read in its namespace.
    peer: Vec<IpAddr>,
    /// Pod addresses the node routes to this interface.
    routed: Vec<IpAddr>,
    lookup_pending: bool,
    /// Another lookup was asked for while one ran.
    lookup_again: bool,
}

/// Results of the lookups the loop starts off-thread.
#[derive(Debug)]
enum Found {
    Peer {
        ifindex: u32,
        result: Result<Vec<IpAddr>, String>,
    },
    Routes(Result<Vec<(IpNet, u32)>, String>),
    /// The programs' clock, measured again after drifting by `skew`.
    Clock {
        clock: JiffyClock,
        skew: Skew,
    },
}

/// What the loop drives: the kernel's [`Datapath`], or a fake in tests.
pub(crate) trait Dataplane: crate::node::uplinks::UplinkHooks {
    /// Where the map writer writes.
    type Backend: Backend;
    /// The policy-map writer.
    fn writer(&mut self) -> &mut MapWriter<Self::Backend>;
    /// Attaches both programs to a pod interface.
    fn attach(&mut self, interface: &str) -> Result<(), DatapathError>;
    /// Detaches them.
    fn detach(&mut self, interface: &str) -> Result<(), DatapathError>;
    /// The programs' clock in force.
    fn clock(&self) -> JiffyClock;
    /// Puts the programs on `clock`.
    fn set_clock(&mut self, clock: JiffyClock) -> Result<(), DatapathError>;
    /// Pins again what went missing.
    fn restore_pins(&mut self) -> Result<Vec<std::path::PathBuf>, RestoreError>;
    /// Where the maps are pinned.
    fn pin_dir(&self) -> &std::path::Path;
    /// The layout of the maps being replaced, if any.
    fn replacing_layout(&self) -> Option<u32>;
    /// Whether interfaces still wait for the new layout's programs.
    fn awaiting_interfaces(&self) -> bool;
    /// Swaps in the programs of the new layout.
    fn commit_layout(&mut self) -> Result<Option<u32>, DatapathError>;
}

impl Dataplane for Datapath {
    type Backend = crate::datapath::writer::KernelBackend;
    fn writer(&mut self) -> &mut MapWriter<Self::Backend> {
        Datapath::writer(self)
    }
    fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        Datapath::attach(self, interface)
    }
    fn detach(&mut self, interface: &str) -> Result<(), DatapathError> {
        Datapath::detach(self, interface)
    }
    fn clock(&self) -> JiffyClock {
        Datapath::clock(self)
    }
    fn set_clock(&mut self, clock: JiffyClock) -> Result<(), DatapathError> {
        Datapath::set_clock(self, clock)
    }
    fn restore_pins(&mut self) -> Result<Vec<std::path::PathBuf>, RestoreError> {
        Datapath::restore_pins(self)
    }
    fn pin_dir(&self) -> &std::path::Path {
        Datapath::pin_dir(self)
    }
    fn replacing_layout(&self) -> Option<u32> {
        Datapath::replacing_layout(self)
    }
    fn awaiting_interfaces(&self) -> bool {
        Datapath::awaiting_interfaces(self)
    }
    fn commit_layout(&mut self) -> Result<Option<u32>, DatapathError> {
        Datapath::commit_layout(self)
    }
}

/// The compile the maps hold and the snapshot it was compiled from: the
/// next input's change set is what differs from that snapshot.
struct InForce {
    compiler: Compiler,
    snapshot: Snapshot,
    /// The fingerprint of `snapshot`.
    fingerprint: Fingerprint,
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
    rebind_at: Option<tokio::time::Instant>,
    status: watch::Sender<Status>,
    metrics: Arc<Metrics>,
    found_tx: mpsc::UnboundedSender<Found>,
    found_rx: Option<mpsc::UnboundedReceiver<Found>>,
    /// Who is behind each endpoint id and address, for the deny-event
    /// reader; sent after every applied compile.
    directory: Option<watch::Sender<Arc<crate::events::Directory>>>,
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
            rebind_at: None,
            status,
            metrics,
            found_tx,
            found_rx: Some(found_rx),
            directory: None,
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
                Some(ev) = links.recv() => endpoints = self.on_link(ev),
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
        }
        clock_watch.abort();
        tracing::info!("sync loop stopped");
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

    /// Pod interfaces first, uplinks second: a link changing class is
    /// detached from its old role before it takes the new one.
    fn on_link(&mut self, ev: LinkEvent) -> bool {
        let pods = self.on_pod_link(ev.clone());
        let uplinks = self.uplinks.on_link(&mut self.dp, &ev);
        pods || uplinks
    }

    fn on_pod_link(&mut self, ev: LinkEvent) -> bool {
        match ev {
            LinkEvent::Present(link) => {
                let wanted = link.class(self.cfg.interfaces.as_ref(), self.cfg.uplinks.as_ref())
                    == links::LinkClass::Pod;
                if let Some(known) = self.ifaces.get_mut(&link.ifindex) {
                    if known.link.name != link.name || !wanted {
                        // Renamed or no longer wanted: start over.
                        let name = known.link.name.clone();
                        self.gone(link.ifindex, &name);
                        return if wanted { self.add(link) } else { true };
                    }
                    if known.link.peer_netnsid != link.peer_netnsid
                        || known.link.peer_ifindex != link.peer_ifindex
                    {
                        known.link = link.clone();
                        known.peer.clear();
                        self.lookup_peer(link.ifindex);
                    }
                    return false;
                }
                wanted && self.add(link)
            }
            LinkEvent::Gone { ifindex, name } => {
                if self.ifaces.contains_key(&ifindex) {
                    self.gone(ifindex, &name);
                    true
                } else {
                    false
                }
            }
        }
    }

    /// A new pod interface: its "not programmed" entry first, then the
    /// programs, so the new-pods mode applies from its first packet.
    fn add(&mut self, link: Link) -> bool {
        let ifindex = link.ifindex;
        let name = link.name.clone();
        let adopted = self.in_force.is_none()
            && self
                .dp
                .writer()
                .mirror()
                .endpoints
                .get(&ifindex)
                .is_some_and(|e| e.programmed());
        let entry: &[KernelOp] = if adopted {
            &[]
        } else {
            &[KernelOp::EndpointUpsert(ifindex, unbound_entry(ifindex))]
        };
        if let Err(e) = self.dp.writer().apply_kernel(entry) {
            self.fail("attach", format!("marking {name} as a pod interface: {e}"));
            return false;
        }
        if let Err(e) = self.dp.attach(&name) {
            let _ = self
                .dp
                .writer()
                .apply_kernel(&[KernelOp::EndpointDelete(ifindex)]);
            self.fail("attach", format!("{e}"));
            return false;
        }
        tracing::info!(interface = %name, ifindex, "pod interface attached, not programmed yet");
        self.ifaces.insert(
            ifindex,
            Iface {
                link,
                peer: Vec::new(),
                routed: Vec::new(),
                lookup_pending: false,
                lookup_again: false,
            },
        );
        self.lookup_peer(ifindex);
        true
    }

    fn gone(&mut self, ifindex: u32, name: &str) {
        self.ifaces.remove(&ifindex);
        // The kernel released the programs with the device; the detach
        // only drops our handles, so its error says nothing.
        if let Err(e) = self.dp.detach(name) {
            tracing::debug!(interface = %name, error = %e, "detach after link removal");
        }
        tracing::info!(interface = %name, ifindex, "pod interface gone, detached");
    }

    fn lookup_peer(&mut self, ifindex: u32) {
        let Some(iface) = self.ifaces.get_mut(&ifindex) else {
            return;
        };
        let (Some(nsid), Some(peer)) = (iface.link.peer_netnsid, iface.link.peer_ifindex) else {
            return;
        };
        if iface.lookup_pending {
            // Its answer may predate what we are looking for now.
            iface.lookup_again = true;
            return;
        }
        iface.lookup_pending = true;
        let tx = self.found_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = links::peer_addresses(nsid, peer).map_err(|e| e.to_string());
            let _ = tx.send(Found::Peer { ifindex, result });
        });
    }

    fn lookup_routes(&mut self) {
        if self.routes_pending {
            self.routes_again = true;
            return;
        }
        self.routes_pending = true;
        let tx = self.found_tx.clone();
        tokio::spawn(async move {
            let result = links::routes().await.map_err(|e| e.to_string());
            let _ = tx.send(Found::Routes(result));
        });
    }

    fn on_found(&mut self, f: Found) -> bool {
        match f {
            Found::Peer { ifindex, result } => {
                let Some(iface) = self.ifaces.get_mut(&ifindex) else {
                    return false;
                };
                iface.lookup_pending = false;
                let again = std::mem::take(&mut iface.lookup_again);
                let changed = match result {
                    Ok(addrs) => {
                        tracing::debug!(interface = %iface.link.name, ?addrs, "peer addresses");
                        let changed = iface.peer != addrs;
                        iface.peer = addrs;
                        changed
                    }
                    Err(e) => {
                        tracing::debug!(
                            interface = %iface.link.name,
                            error = %e,
                            "peer lookup failed; trying routes"
                        );
                        self.lookup_routes();
                        false
                    }
                };
                if again {
                    self.lookup_peer(ifindex);
                }
                changed
            }
            Found::Routes(result) => {
                self.routes_pending = false;
                if std::mem::take(&mut self.routes_again) {
                    self.lookup_routes();
                }
                match result {
                    Ok(routes) => self.apply_routes(&routes),
                    Err(e) => {
                        self.metrics.error("bind");
                        tracing::warn!(error = %e, "reading routes");
                        false
                    }
                }
            }
            Found::Clock { clock, skew } => {
                self.set_clock(clock, skew);
                false
            }
        }
    }

    /// Puts the programs on a clock measured again. Entries keep their
    /// stamps: their idle times shift by the correction, a few ms.
    fn set_clock(&mut self, clock: JiffyClock, skew: Skew) {
        self.metrics.clock_remeasured.inc();
        let fallback = clock.jiffy_ns == 0;
        match self.dp.set_clock(clock) {
            Ok(()) if fallback => tracing::warn!(
                ahead_ns = skew.ahead_ns,
                behind_ns = skew.behind_ns,
                "conntrack clock: jiffies out of step with CLOCK_MONOTONIC and not measurable \
                 again; the programs read the clock source"
            ),
            Ok(()) => tracing::warn!(
                ahead_ns = skew.ahead_ns,
                behind_ns = skew.behind_ns,
                error_ns = clock.error_ns,
                "conntrack clock: jiffies out of step with CLOCK_MONOTONIC; measured again"
            ),
            Err(e) => {
                self.metrics.error("clock");
                tracing::warn!(error = %e, "conntrack clock: writing the config map");
            }
        }
    }

    /// Gives each unbound pod address to the interface its longest route
    /// leaves by, when that is a pod interface. Routed addresses stay with
    /// their interface until it goes or another interface takes them: a
    /// neighbour entry that ages out must not unbind a pod.
    fn apply_routes(&mut self, routes: &[(IpNet, u32)]) -> bool {
        let Some(compiled) = self.compiled() else {
            return false;
        };
        let mut found: Vec<(IpAddr, u32)> = Vec::new();
        for (pod, ep) in &compiled.endpoints {
            if self.bindings.contains_key(pod) {
                continue;
            }
            for ip in &ep.ips {
                let best = routes
                    .iter()
                    .filter(|(net, oif)| net.contains(ip) && self.ifaces.contains_key(oif))
                    .max_by_key(|(net, _)| net.prefix_len());
                if let Some((_, oif)) = best {
                    found.push((*ip, *oif));
                }
            }
        }
        let mut changed = false;
        for (ip, oif) in found {
            for (ifindex, iface) in &mut self.ifaces {
                let has = iface.routed.contains(&ip);
                if *ifindex == oif && !has {
                    iface.routed.push(ip);
                    changed = true;
                } else if *ifindex != oif && has {
                    iface.routed.retain(|a| *a != ip);
                    changed = true;
                }
            }
        }
        changed
    }

    /// Pods of `compiled` matched to pod interfaces by address: the peer's
    /// own addresses first, routes second.
    fn bind(&self, compiled: &Compiled) -> BTreeMap<ObjectRef, u32> {
        let mut by_peer: BTreeMap<IpAddr, u32> = BTreeMap::new();
        let mut by_route: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for (ifindex, iface) in &self.ifaces {
            for ip in &iface.peer {
                by_peer.entry(*ip).or_insert(*ifindex);
            }
            for ip in &iface.routed {
                by_route.entry(*ip).or_insert(*ifindex);
            }
        }
        let mut out = BTreeMap::new();
        let mut taken = BTreeSet::new();
        for (pod, ep) in &compiled.endpoints {
            let found = ep
                .ips
                .iter()
                .find_map(|ip| by_peer.get(ip))
                .or_else(|| ep.ips.iter().find_map(|ip| by_route.get(ip)));
            if let Some(&i) = found {
                if taken.insert(i) {
                    out.insert(pod.clone(), i);
                } else {
                    tracing::warn!(%pod, ifindex = i, "interface claimed by two pods; left unbound");
                }
            }
        }
        out
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
        // The first apply (and the one after a write whose rollback failed
        // too) diffs from what the pinned maps hold: a previous agent's
        // state, or nothing, read back with the ids to keep.
        let (compiler, ops, before) = match self.in_force.take() {
            Some(InForce {
                mut compiler,
                snapshot: old,
                fingerprint,
            }) => {
                let ids = compiler.compiled().ids.clone();
                let changes = Changes::between(&old, &snapshot);
                let ops: Vec<RawOp> = compiler.update(&snapshot, &changes).raw().collect();
                let mut fp = fingerprint;
                fp.update(&old, &snapshot, &changes);
                (compiler, ops, Some((old, ids, fingerprint, fp)))
            }
            None => {
                let old = self.resume(&snapshot);
                let compiler = Compiler::new(&snapshot, &old.ids);
                let ops: Vec<RawOp> = compiler::diff(&old, compiler.compiled()).raw().collect();
                (compiler, ops, None)
            }
        };
        let resuming = before.is_none();
        let bindings = self.bind(compiler.compiled());
        let result = self.dp.writer().apply(&ops, &bindings).map(|r| r.applied);
        match result {
            Ok(mut applied) => {
                let fingerprint = match &before {
                    Some((_, _, _, fp)) => *fp,
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
                if let (Some(tx), Some(f)) = (&self.directory, &self.in_force) {
                    tx.send_replace(Arc::new(crate::events::Directory::new(
                        f.compiler.compiled(),
                        &f.snapshot,
                    )));
                }
                self.last_error = None;
                self.retry_at = None;
                let elapsed = start.elapsed();
                self.metrics.sync_duration.observe(elapsed.as_secs_f64());
                self.write_state();
                tracing::info!(
                    generation,
                    fingerprint = self.fingerprint.as_deref().unwrap_or_default(),
                    applied,
                    counts = %self.dp.writer().counts(),
                    micros = elapsed.as_micros(),
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
                if let Some((old, ids, fingerprint, _)) = before
                    && !matches!(e, MapWriteError::RollbackFailed { .. })
                {
                    self.in_force = Some(InForce {
                        compiler: Compiler::new(&old, &ids),
                        snapshot: old,
                        fingerprint,
                    });
                }
                self.fail("apply", format!("{e}"));
                self.retry_at = Some(tokio::time::Instant::now() + RETRY);
            }
        }
        self.publish();
    }

    /// Pods compiled but not bound: their interface may have got its
    /// address after we looked (CNIs address the peer after creating it),
    /// so look again; routes cover peers we cannot see.
    ///
    /// Repeated every [`REBIND`] while a compiled pod and a pod interface
    /// are both unbound.
    fn unbound_pods_lookup(&mut self) {
        self.rebind_at = None;
        let Some(compiled) = self.compiled() else {
            return;
        };
        if compiled
            .endpoints
            .keys()
            .all(|p| self.bindings.contains_key(p))
        {
            return;
        }
        let bound: BTreeSet<u32> = self.bindings.values().copied().collect();
        let unbound: Vec<u32> = self
            .ifaces
            .keys()
            .filter(|i| !bound.contains(i))
            .copied()
            .collect();
        if unbound.is_empty() {
            return;
        }
        self.rebind_at = Some(tokio::time::Instant::now() + REBIND);
        for i in unbound {
            self.lookup_peer(i);
        }
        self.lookup_routes();
    }

    /// The pinned maps as the old state of the first diff
    /// ([`resume::resume`]), with the previous agent's state file naming
    /// the pods behind their ids.
    fn resume(&mut self, snapshot: &Snapshot) -> Compiled {
        let probe = compiler::compile(snapshot, &IdAllocation::default());
        let bindings = self.bind(&probe);
        let known = self.cfg.state_dir.as_deref().and_then(|dir| {
            provenance::State::read(dir)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "reading the previous state file; pods keep their ids by address");
                })
                .ok()
                .flatten()
        });
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

    /// Endpoint entries the interfaces should have, against what the map
    /// has: a bound pod's compiled entry, the unbound entry otherwise; any
    /// other index (a gone veth, a previous agent's) is deleted.
    ///
    /// With `adopt` (nothing compiled yet), a programmed entry a previous
    /// agent left in the pinned map stays until the first compile: a
    /// restart must not put running pods in the new-pods mode.
    fn endpoint_ops(
        &mut self,
        compiled: &Compiled,
        bindings: &BTreeMap<ObjectRef, u32>,
        adopt: bool,
    ) -> Vec<KernelOp> {
        let have = &self.dp.writer().mirror().endpoints;
        let mut want: BTreeMap<u32, EndpointInfo> = self
            .ifaces
            .keys()
            .map(|&i| match have.get(&i) {
                Some(e) if adopt && e.programmed() => (i, *e),
                _ => (i, unbound_entry(i)),
            })
            .collect();
        for (pod, &i) in bindings {
            if let (Some(ep), Some(slot)) = (compiled.endpoints.get(pod), want.get_mut(&i)) {
                *slot = ep.info();
            }
        }
        // The mark slot is the map writer's: compare the rest.
        let unslotted = |e: &EndpointInfo| EndpointInfo { slot: 0, ..*e };
        let mut ops: Vec<KernelOp> = want
            .iter()
            .filter(|(i, v)| have.get(i).map(unslotted) != Some(unslotted(v)))
            .map(|(&i, &v)| KernelOp::EndpointUpsert(i, v))
            .collect();
        // Before the first compile, an index not reported yet may be a pod
        // interface a previous agent programmed whose link event is still
        // on its way: its entry stays while the interface exists.
        ops.extend(
            have.keys()
                .filter(|&&i| {
                    let kept = adopt && nix::net::if_::if_indextoname(i).is_ok();
                    !want.contains_key(&i) && !kept
                })
                .map(|&i| KernelOp::EndpointDelete(i)),
        );
        ops
    }

    /// Brings the endpoint entries in line with the interfaces and the
    /// compiled state in force; returns whether anything was written.
    fn sync_endpoints(&mut self) -> Result<bool, MapWriteError> {
        let empty = Compiled::default();
        let in_force = self.in_force.take();
        let c = in_force.as_ref().map_or(&empty, |f| f.compiler.compiled());
        let bindings = self.bind(c);
        for (pod, i) in &bindings {
            if self.bindings.get(pod) != Some(i) {
                let name = self
                    .ifaces
                    .get(i)
                    .map(|f| f.link.name.clone())
                    .unwrap_or_default();
                tracing::info!(%pod, interface = %name, "pod bound to its interface");
            }
        }
        let ops = self.endpoint_ops(c, &bindings, in_force.is_none());
        self.in_force = in_force;
        self.bindings = bindings;
        self.dp.writer().apply_kernel(&ops)?;
        Ok(!ops.is_empty())
    }

    fn sync_endpoints_and_publish(&mut self) {
        match self.sync_endpoints() {
            Ok(true) => {
                self.generation += 1;
                tracing::debug!(generation = self.generation, "interfaces applied");
                self.write_state();
            }
            Ok(false) => {}
            Err(e) => self.fail("apply", format!("{e}")),
        }
        self.publish();
    }

    /// Hands the state file (the provenance of what the maps now hold:
    /// pods of the endpoint ids, rules of the entries) to its writer
    /// thread. A failure is logged (once until it changes) and counted,
    /// never fatal: enforcement does not depend on it.
    fn write_state(&mut self) {
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
        let compiled = in_force.compiler.compiled().clone();
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
        let until = *self.adopt_until.get_or_insert(now + ADOPT_WAIT);
        if now >= until || self.routes_pending {
            return now >= until;
        }
        self.dp
            .writer()
            .mirror()
            .endpoints
            .iter()
            .filter(|(_, e)| e.programmed())
            .all(|(&i, _)| match self.ifaces.get(&i) {
                Some(f) => {
                    let found = !f.peer.is_empty() || !f.routed.is_empty();
                    !f.lookup_pending && found
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
                .all(|i| endpoints.get(i).is_some_and(|e| e.programmed()));
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
                let programmed = endpoints.get(&ifindex).is_some_and(|e| e.programmed());
                InterfaceStatus {
                    name: f.link.name.clone(),
                    ifindex,
                    pod,
                    addresses,
                    programmed,
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
            maps: counts.into(),
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
mod tests {
    //! The loop against the fake map writer: the order of its writes, the
    //! rollback of a failed one, adoption of a previous agent's entries,
    //! and a pod whose interface shows up after its compile.
    use netpol_common::{PolicyKeyV4, maps, programs};
    use serde_json::json;

    use super::*;
    use crate::datapath::writer::{FakeBackend, Mirror};
    use crate::model::manifests::{LoadReport, apply_value};

    struct Fake {
        writer: MapWriter<FakeBackend>,
        attached: BTreeSet<String>,
    }

    impl crate::node::uplinks::UplinkHooks for Fake {
        fn attach_uplink(&mut self, _: &str) -> Result<&'static str, DatapathError> {
            Ok(programs::LEAVE_NODE)
        }
        fn detach_uplink(&mut self, _: &str) -> Result<(), DatapathError> {
            Ok(())
        }
    }

    impl Dataplane for Fake {
        type Backend = FakeBackend;
        fn writer(&mut self) -> &mut MapWriter<FakeBackend> {
            &mut self.writer
        }
        fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
            self.attached.insert(interface.to_owned());
            Ok(())
        }
        fn detach(&mut self, interface: &str) -> Result<(), DatapathError> {
            self.attached.remove(interface);
            Ok(())
        }
        fn clock(&self) -> JiffyClock {
            JiffyClock::NONE
        }
        fn set_clock(&mut self, _: JiffyClock) -> Result<(), DatapathError> {
            Ok(())
        }
        fn restore_pins(&mut self) -> Result<Vec<PathBuf>, RestoreError> {
            Ok(Vec::new())
        }
        fn pin_dir(&self) -> &std::path::Path {
            std::path::Path::new("/nonexistent/netpol")
        }
        fn replacing_layout(&self) -> Option<u32> {
            None
        }
        fn awaiting_interfaces(&self) -> bool {
            false
        }
        fn commit_layout(&mut self) -> Result<Option<u32>, DatapathError> {
            Ok(None)
        }
    }

    fn sync_loop(maps: Mirror) -> SyncLoop<Fake> {
        let fake = Fake {
            writer: MapWriter::new(
                FakeBackend {
                    state: maps.clone(),
                    ..FakeBackend::default()
                },
                maps,
            ),
            attached: BTreeSet::new(),
        };
        let cfg = SyncConfig {
            node: Some("n1".into()),
            debounce: Duration::from_millis(10),
            interfaces: None,
            uplinks: None,
            new_pods: "fail-closed",
            source_health: None,
            state_dir: None,
        };
        let (status, _) = watch::channel(Status::default());
        SyncLoop::new(
            fake,
            cfg,
            Families {
                ipv4: true,
                ipv6: false,
            },
            status,
            Arc::new(Metrics::new()),
        )
    }

    /// Pods `a` (10.0.0.2) and `b` (10.0.0.3) on n1; `a` admits `from`.
    fn cluster(from: &str) -> Arc<Input> {
        let mut snap = Snapshot::default();
        let mut report = LoadReport::default();
        let mut objs = vec![
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}),
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "a", "namespace": "x"},
                   "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from}}}]}]}}),
        ];
        for (name, ip) in [("a", "10.0.0.2"), ("b", "10.0.0.3")] {
            objs.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "x", "uid": format!("uid-{name}"),
                             "labels": {"app": name}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIPs": [{"ip": ip}]}}));
        }
        for o in objs {
            apply_value(&mut snap, o, "test", &mut report);
        }
        Arc::new(Input {
            snapshot: snap,
            problems: Vec::new(),
        })
    }

    fn veth(l: &mut SyncLoop<Fake>, ifindex: u32, ip: &str) {
        l.on_link(LinkEvent::Present(Link {
            ifindex,
            name: format!("veth{ifindex}"),
            veth: true,
            kind: Some("veth".into()),
            peer_netnsid: None,
            peer_ifindex: None,
        }));
        let result = Ok(vec![ip.parse().expect("address")]);
        if l.on_found(Found::Peer { ifindex, result }) {
            l.sync_endpoints_and_publish();
        }
    }

    fn apply(l: &mut SyncLoop<Fake>, input: Arc<Input>) {
        l.input = Some(input);
        l.sync();
    }

    fn log(l: &mut SyncLoop<Fake>) -> Vec<KernelOp> {
        l.dp.writer().backend().log.clone()
    }

    fn endpoint(l: &mut SyncLoop<Fake>, ifindex: u32) -> EndpointInfo {
        l.dp.writer().mirror().endpoints[&ifindex]
    }

    /// No endpoint entry names an id, isolated, before the policy entries
    /// of that id written in the same batch: isolation turns on only once
    /// its entries are there.
    fn isolation_after_entries(ops: &[KernelOp]) {
        for (k, op) in ops.iter().enumerate() {
            let KernelOp::EndpointUpsert(i, e) = op else {
                continue;
            };
            if e.flags & endpoint_flags::INGRESS_ISOLATED == 0 {
                continue;
            }
            let selector = netpol_common::policy_selector(e.id, netpol_common::direction::INGRESS);
            let late = ops[k..].iter().any(|o| {
                matches!(o, KernelOp::PolicyV4Upsert(_, PolicyKeyV4 { selector: s, .. }, _) if *s == selector)
            });
            assert!(!late, "interface {i} isolated before its entries: {ops:#?}");
        }
    }

    #[tokio::test]
    async fn entries_before_isolation_and_an_edit_ends_as_a_full_compile() {
        let mut l = sync_loop(Mirror::default());
        veth(&mut l, 10, "10.0.0.2");
        veth(&mut l, 11, "10.0.0.3");
        apply(&mut l, cluster("b"));
        assert!(l.last_error.is_none(), "{:?}", l.last_error);
        let first = log(&mut l);
        isolation_after_entries(&first);
        let a = endpoint(&mut l, 10);
        assert_ne!(a.flags & endpoint_flags::INGRESS_ISOLATED, 0);
        assert_eq!(a.flags & endpoint_flags::NOT_PROGRAMMED, 0);
        // An edit: the maps equal a full compile's.
        apply(&mut l, cluster("nobody"));
        assert!(l.last_error.is_none(), "{:?}", l.last_error);
        isolation_after_entries(&log(&mut l)[first.len()..]);
        let want = compiler::compile(
            &cluster("nobody").snapshot,
            &l.compiled().expect("compiled").ids,
        )
        .map_state();
        let have = l.dp.writer().mirror().clone();
        assert_eq!(have.policy_v4, want.policy_v4);
        assert_eq!(have.ports, want.ports);
    }

    #[tokio::test]
    async fn a_pod_edit_reaches_the_policies_that_name_it() {
        let mut l = sync_loop(Mirror::default());
        veth(&mut l, 10, "10.0.0.2");
        veth(&mut l, 11, "10.0.0.3");
        let first = cluster("b");
        apply(&mut l, first.clone());
        let before = l.dp.writer().mirror().policy_v4.clone();
        // The next version, as a source makes it: b no longer matches a's
        // peer selector, and only b changed.
        let mut next = (*first).clone();
        let b = ObjectRef::new("x", "b");
        if let Some(pod) = next.snapshot.pods.get_mut(&b) {
            pod.labels.insert("app".into(), "c".into());
        }
        assert_eq!(
            Changes::between(&first.snapshot, &next.snapshot).pods,
            BTreeSet::from([b])
        );
        let next = Arc::new(next);
        apply(&mut l, next.clone());
        assert!(l.last_error.is_none(), "{:?}", l.last_error);
        let want =
            compiler::compile(&next.snapshot, &l.compiled().expect("compiled").ids).map_state();
        let have = l.dp.writer().mirror().clone();
        assert_ne!(have.policy_v4, before, "the edit changed a's entries");
        assert_eq!(have.policy_v4, want.policy_v4);
        assert_eq!(have.endpoints.len(), 2);
    }

    #[tokio::test]
    async fn a_failed_write_is_rolled_back_and_the_retry_applies_it() {
        let mut l = sync_loop(Mirror::default());
        veth(&mut l, 10, "10.0.0.2");
        veth(&mut l, 11, "10.0.0.3");
        apply(&mut l, cluster("b"));
        let before = l.dp.writer().mirror().clone();
        // No room for one more policy entry.
        let full = before.policy_v4.len();
        l.dp.writer()
            .backend_mut()
            .capacity
            .insert(maps::POLICY_V4, full);
        let mut wider = (*cluster("b")).clone();
        let mut report = LoadReport::default();
        apply_value(
            &mut wider.snapshot,
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "a2", "namespace": "x"},
                   "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                            "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/16"}}]}]}}),
            "test",
            &mut report,
        );
        let wider = Arc::new(wider);
        apply(&mut l, wider.clone());
        assert!(
            l.last_error
                .as_deref()
                .is_some_and(|e| e.contains("NETPOL_POLICY_V4")),
            "{:?}",
            l.last_error
        );
        assert_eq!(l.dp.writer().mirror(), &before, "rolled back");
        assert_eq!(l.dp.writer().backend().state, before, "the kernel too");
        // Room again: the retry applies what the maps lack.
        l.dp.writer().backend_mut().capacity.clear();
        apply(&mut l, wider.clone());
        assert!(l.last_error.is_none(), "{:?}", l.last_error);
        let ids = &l.compiled().expect("compiled").ids;
        let want = compiler::compile(&wider.snapshot, ids).map_state();
        assert_eq!(l.dp.writer().mirror().policy_v4, want.policy_v4);
    }

    #[tokio::test]
    async fn a_previous_agents_entries_are_kept_and_its_ids_too() {
        // A previous agent's maps: a on interface 10, admitting b; ids 1..6
        // went to pods that came and went.
        let ids = IdAllocation {
            next_endpoint: 7,
            next_ruleset: 5,
            ..IdAllocation::default()
        };
        let old = compiler::compile(&cluster("b").snapshot, &ids);
        let a_id = old.endpoints[&ObjectRef::new("x", "a")].id;
        assert!(a_id >= 7);
        let mut maps = old.map_state();
        let mut pinned = Mirror {
            policy_v4: std::mem::take(&mut maps.policy_v4),
            ports: std::mem::take(&mut maps.ports),
            ..Mirror::default()
        };
        pinned
            .endpoints
            .insert(10, maps.endpoints[&ObjectRef::new("x", "a")]);
        pinned
            .endpoints
            .insert(11, maps.endpoints[&ObjectRef::new("x", "b")]);

        let mut l = sync_loop(pinned.clone());
        veth(&mut l, 10, "10.0.0.2");
        assert_eq!(
            endpoint(&mut l, 10),
            pinned.endpoints[&10],
            "kept before the first compile"
        );
        veth(&mut l, 11, "10.0.0.3");
        apply(&mut l, cluster("b"));
        assert!(l.last_error.is_none(), "{:?}", l.last_error);
        assert_eq!(endpoint(&mut l, 10).id, a_id, "a keeps its id");
        let writes_to_a: Vec<KernelOp> = log(&mut l)
            .into_iter()
            .filter(|op| matches!(op, KernelOp::EndpointUpsert(10, e) if e.id != a_id))
            .collect();
        assert!(writes_to_a.is_empty(), "{writes_to_a:?}");
        assert_eq!(l.dp.writer().mirror().policy_v4, pinned.policy_v4);
    }

    #[tokio::test]
    async fn a_pod_whose_interface_comes_after_its_compile_is_bound_then() {
        let mut l = sync_loop(Mirror::default());
        veth(&mut l, 11, "10.0.0.3");
        apply(&mut l, cluster("b"));
        assert!(l.last_error.is_none(), "{:?}", l.last_error);
        l.on_link(LinkEvent::Present(Link {
            ifindex: 10,
            name: "veth10".into(),
            veth: true,
            kind: Some("veth".into()),
            peer_netnsid: None,
            peer_ifindex: None,
        }));
        l.sync_endpoints_and_publish();
        assert_ne!(
            endpoint(&mut l, 10).flags & endpoint_flags::NOT_PROGRAMMED,
            0,
            "unprogrammed until its pod is known"
        );
        assert!(l.dp.attached.contains("veth10"));
        let result = Ok(vec!["10.0.0.2".parse().expect("address")]);
        assert!(l.on_found(Found::Peer {
            ifindex: 10,
            result
        }));
        l.sync_endpoints_and_publish();
        let want = l.compiled().expect("compiled").endpoints[&ObjectRef::new("x", "a")].info();
        let have = endpoint(&mut l, 10);
        assert_eq!(
            EndpointInfo { slot: 0, ..have },
            EndpointInfo { slot: 0, ..want }
        );
    }
}
