//! [`Agent`]: keeps one node's kernel in step with its desired state.
//! The binary's `run` is a thin shell over it; a bigger agent embeds it
//! the same way.
use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use netpol_common::{GlobalConfig, config_flags, events as limits, mark};
use tokio::sync::{broadcast, mpsc, watch};

use crate::{
    datapath::{AttachMode, Datapath, DatapathConfig, DatapathError, MapSizes},
    events::{Denial, Directory},
    node::links::{self, InterfaceError},
    sources::{
        Source,
        files::{FilesError, FilesSource},
        kube::{KubeError, KubeSource},
    },
    status::{Families, Metrics, Status, StatusHandle},
    sync::{SyncConfig, SyncLoop},
};

/// Default debounce of source bursts.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(10);
/// Default HTTP address of the binary.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9101";

/// What the datapath does with a pod interface the agent has not
/// programmed yet (a new veth whose pod is not bound, or whose endpoint is
/// not written yet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NewPods {
    /// Only neighbour discovery and the node's own traffic (kubelet
    /// probes) pass until the pod's policy is in force.
    #[default]
    FailClosed,
    /// Everything passes until the pod's policy is in force.
    FailOpen,
}

impl NewPods {
    /// The command-line spelling.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FailClosed => "fail-closed",
            Self::FailOpen => "fail-open",
        }
    }
}

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The builder was given no source.
    #[error("no source: give the agent a manifests folder or the Kubernetes API")]
    NoSource,
    /// `--interfaces` is not a glob.
    #[error("interface pattern {pattern:?}: {source}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// Why.
        source: glob::PatternError,
    },
    /// `--mark-mask` is no number, or no usable mask.
    #[error("mark mask {text:?}: {reason}")]
    MarkMask {
        /// The text given.
        text: String,
        /// Why it is refused.
        reason: String,
    },
    /// `--event-rate` or `--event-burst` out of range.
    #[error("{what} {value}: must be 1 to {max}")]
    EventLimit {
        /// `event rate` or `event burst`.
        what: &'static str,
        /// The value given.
        value: u32,
        /// The largest honoured.
        max: u32,
    },
    /// The datapath could not be loaded.
    #[error("loading the datapath: {0}")]
    Datapath(#[from] DatapathError),
    /// The pins are another agent's.
    #[error(transparent)]
    Lock(#[from] crate::bpffs::LockError),
    /// The bpffs could not be prepared.
    #[error(transparent)]
    Bpffs(#[from] crate::bpffs::BpffsError),
    /// The HTTP port could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The CNI plugin's socket could not be bound.
    #[error(transparent)]
    CniSocket(#[from] crate::node::cni::CniSocketError),
    /// The files source failed.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// The kube source could not start.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// Link watching failed.
    #[error("watching links: {0}")]
    Links(#[from] InterfaceError),
    /// A task of the agent panicked.
    #[error("agent task {task} failed: {message}")]
    Task {
        /// The task.
        task: &'static str,
        /// The panic.
        message: String,
    },
}

/// Builds an [`Agent`].
/// Idle timeouts of tracked connections, per state and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionTimeouts {
    /// TCP before its handshake completes.
    pub tcp_syn: Duration,
    /// Established TCP, and SCTP.
    pub tcp_established: Duration,
    /// TCP after a FIN or RST.
    pub tcp_closing: Duration,
    /// UDP.
    pub udp: Duration,
    /// ICMP echo and other protocols.
    pub other: Duration,
}

impl Default for ConnectionTimeouts {
    fn default() -> Self {
        use netpol_common::ct_defaults as d;
        Self {
            tcp_syn: Duration::from_nanos(d::TCP_SYN_NS),
            tcp_established: Duration::from_nanos(d::TCP_ESTABLISHED_NS),
            tcp_closing: Duration::from_nanos(d::TCP_CLOSING_NS),
            udp: Duration::from_nanos(d::UDP_NS),
            other: Duration::from_nanos(d::OTHER_NS),
        }
    }
}

impl ConnectionTimeouts {
    fn apply(&self, global: &mut GlobalConfig) {
        // A zero in the map means "the default": keep at least 1 ns.
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        global.ct_tcp_syn_ns = ns(self.tcp_syn);
        global.ct_tcp_established_ns = ns(self.tcp_established);
        global.ct_tcp_closing_ns = ns(self.tcp_closing);
        global.ct_udp_ns = ns(self.udp);
        global.ct_other_ns = ns(self.other);
    }
}

#[derive(Clone, Debug)]
pub struct AgentBuilder {
    source: Option<Source>,
    node: Option<String>,
    bpffs: PathBuf,
    object: Option<PathBuf>,
    attach_mode: AttachMode,
    map_sizes: MapSizes,
    timeouts: ConnectionTimeouts,
    interfaces: Option<String>,
    uplinks: Option<glob::Pattern>,
    mark_mask: u32,
    cgroup_root: PathBuf,
    new_pods: NewPods,
    listen: Option<SocketAddr>,
    cni_socket: Option<PathBuf>,
    cni_install: Option<crate::node::cni::CniInstall>,
    debounce: Duration,
    state_dir: Option<PathBuf>,
    log_denied: bool,
    event_rate: u32,
    event_burst: u32,
    record_allowed: u32,
    handover_wait: Duration,
    stuck_after: Duration,
}

/// How long a starting agent waits for the one holding the pins to exit
/// (a rolling update's handover) before it refuses to start.
pub const DEFAULT_HANDOVER_WAIT: Duration = Duration::from_secs(30);

impl Default for AgentBuilder {
    fn default() -> Self {
        Self {
            source: None,
            node: None,
            bpffs: PathBuf::from(crate::datapath::DEFAULT_BPFFS),
            object: None,
            attach_mode: AttachMode::Auto,
            map_sizes: MapSizes::default(),
            timeouts: ConnectionTimeouts::default(),
            interfaces: None,
            uplinks: None,
            mark_mask: mark::DEFAULT_MASK,
            cgroup_root: PathBuf::from(DEFAULT_CGROUP_ROOT),
            new_pods: NewPods::FailClosed,
            listen: None,
            cni_socket: None,
            cni_install: None,
            debounce: DEFAULT_DEBOUNCE,
            state_dir: Some(PathBuf::from(crate::provenance::DEFAULT_STATE_DIR)),
            log_denied: false,
            event_rate: limits::DEFAULT_RATE,
            event_burst: limits::DEFAULT_BURST,
            record_allowed: 0,
            handover_wait: DEFAULT_HANDOVER_WAIT,
            stuck_after: crate::status::STUCK_AFTER,
        }
    }
}

impl AgentBuilder {
    /// Where the objects come from (required).
    #[must_use]
    pub fn source(mut self, source: Source) -> Self {
        self.source = Some(source);
        self
    }

    /// The node whose pods are local (default: the only Node of the
    /// source; required with [`Source::Kube`]).
    #[must_use]
    pub fn node_name(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }

    /// bpffs mount point; the maps are pinned in `<bpffs>/netpol`
    /// (default `/sys/fs/bpf`).
    #[must_use]
    pub fn bpffs(mut self, path: impl Into<PathBuf>) -> Self {
        self.bpffs = path.into();
        self
    }

    /// The eBPF object (default: found by [`crate::object::locate`]).
    #[must_use]
    pub fn object(mut self, path: impl Into<PathBuf>) -> Self {
        self.object = Some(path.into());
        self
    }

    /// How programs are attached.
    #[must_use]
    pub fn attach_mode(mut self, mode: AttachMode) -> Self {
        self.attach_mode = mode;
        self
    }

    /// Sizes of maps this agent creates.
    #[must_use]
    pub fn map_sizes(mut self, sizes: MapSizes) -> Self {
        self.map_sizes = sizes;
        self
    }

    /// Idle timeouts of tracked connections.
    #[must_use]
    pub fn connection_timeouts(mut self, timeouts: ConnectionTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Only veths whose name matches this glob are pod interfaces
    /// (default: every veth).
    #[must_use]
    pub fn interfaces(mut self, glob: impl Into<String>) -> Self {
        self.interfaces = Some(glob.into());
        self
    }

    /// Links whose name matches this glob are uplinks even when they look
    /// like pod interfaces or bridges. Every other link that is not `lo`,
    /// a bridge or a pod interface is an uplink anyway: uplinks get
    /// `leave_node` on their TC egress, which judges a pod's Service
    /// traffic whose backend is on another node, and no device may let
    /// such a packet leave unjudged.
    #[must_use]
    pub fn uplinks(mut self, glob: Option<glob::Pattern>) -> Self {
        self.uplinks = glob;
        self
    }

    /// Bits of `skb->mark` netpol uses to carry a pod's Service traffic to
    /// the hook that judges it after kube-proxy's DNAT (default
    /// [`netpol_common::mark::DEFAULT_MASK`]; see [`parse_mark_mask`]).
    #[must_use]
    pub fn mark_mask(mut self, mask: u32) -> Self {
        self.mark_mask = mask;
        self
    }

    /// Where the cgroup v2 hierarchy is (default `/sys/fs/cgroup`; its
    /// `unified` folder on hybrid hosts; netpol mounts one when there is
    /// none). `to_host` is attached to its root to judge pods' Service
    /// traffic whose backend is a node address.
    #[must_use]
    pub fn cgroup_root(mut self, path: impl Into<PathBuf>) -> Self {
        self.cgroup_root = path.into();
        self
    }

    /// What unprogrammed pod interfaces do (default fail-closed).
    #[must_use]
    pub fn new_pods(mut self, mode: NewPods) -> Self {
        self.new_pods = mode;
        self
    }

    /// Serve `/healthz`, `/readyz`, `/status` and `/metrics` here (default:
    /// no HTTP; port 0 picks a free port, shown in the log).
    #[must_use]
    pub fn listen(mut self, addr: Option<SocketAddr>) -> Self {
        self.listen = addr;
        self
    }

    /// Serve the CNI plugin (`netpol-cni`) on this unix socket (default:
    /// none; the `DaemonSet` uses [`netpol_cni::DEFAULT_SOCKET`]).
    #[must_use]
    pub fn cni_socket(mut self, path: Option<PathBuf>) -> Self {
        self.cni_socket = path;
        self
    }

    /// Keep netpol-cni in the node's conflist while running
    /// ([`crate::node::cni::keep_installed`]).
    #[must_use]
    pub fn cni_install(mut self, install: Option<crate::node::cni::CniInstall>) -> Self {
        self.cni_install = install;
        self
    }

    /// How long to wait for another agent holding the pins to exit before
    /// refusing to start (default [`DEFAULT_HANDOVER_WAIT`]).
    #[must_use]
    pub fn handover_wait(mut self, wait: Duration) -> Self {
        self.handover_wait = wait;
        self
    }

    /// How long the reconcile loop or the source may show no progress
    /// (for the kube source: every watch healthy) before `/healthz` fails
    /// (default [`crate::status::STUCK_AFTER`]).
    #[must_use]
    pub fn stuck_after(mut self, after: Duration) -> Self {
        self.stuck_after = after;
        self
    }

    /// How long a burst of source changes is waited out before compiling
    /// (default 10 ms).
    #[must_use]
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Where the state file (`state.json`: which pod each endpoint id is,
    /// which rules produced each map entry; see [`crate::provenance`]) is
    /// written after every apply, for `netpol-agent inspect` and
    /// `explain` (default `/run/netpol`; `None`: no state file).
    #[must_use]
    pub fn state_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.state_dir = dir;
        self
    }

    /// Log every deny event with its pods (`--log-denied`; default off:
    /// events are counted in `netpol_denied_total` and handed to
    /// [`Agent::denials`] either way).
    #[must_use]
    pub fn log_denied(mut self, on: bool) -> Self {
        self.log_denied = on;
        self
    }

    /// Deny events each endpoint may report per second, once its burst is
    /// spent (default [`netpol_common::events::DEFAULT_RATE`]; 1 to
    /// [`netpol_common::events::MAX_RATE`]). Drops beyond it are still
    /// counted, in `netpol_events_lost_total{cause="rate_limit"}`.
    #[must_use]
    pub fn event_rate(mut self, per_second: u32) -> Self {
        self.event_rate = per_second;
        self
    }

    /// Deny events an endpoint may report at once after a quiet spell
    /// (default [`netpol_common::events::DEFAULT_BURST`]; 1 to
    /// [`netpol_common::events::MAX_BURST`]).
    #[must_use]
    pub fn event_burst(mut self, burst: u32) -> Self {
        self.event_burst = burst;
        self
    }

    /// Allowed-connection records: one in `sample` of the new connections
    /// a rule admits is reported (`netpol::allowed` log lines naming the
    /// allowing rule, `netpol_rule_hits_total`), within a per-endpoint
    /// rate limit of their own (the event rate and burst); 0 (the
    /// default): none.
    #[must_use]
    pub fn record_allowed(mut self, sample: u32) -> Self {
        self.record_allowed = sample;
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// Without a source, with an interface pattern that is no glob, a
    /// mark mask that is not one run of contiguous bits, or an event rate
    /// or burst out of range.
    pub fn build(self) -> Result<Agent, AgentError> {
        let source = self.source.clone().ok_or(AgentError::NoSource)?;
        for (what, value, max) in [
            ("event rate", self.event_rate, limits::MAX_RATE),
            ("event burst", self.event_burst, limits::MAX_BURST),
        ] {
            if value == 0 || value > max {
                return Err(AgentError::EventLimit { what, value, max });
            }
        }
        if !mark::valid(self.mark_mask) {
            return Err(AgentError::MarkMask {
                text: format!("{:#010x}", self.mark_mask),
                reason: MARK_MASK_RULE.to_owned(),
            });
        }
        if matches!(source, Source::Kube(_)) && self.node.is_none() {
            return Err(KubeError::NoNode.into());
        }
        let interfaces = self
            .interfaces
            .as_deref()
            .map(|p| {
                glob::Pattern::new(p).map_err(|source| AgentError::Pattern {
                    pattern: p.to_owned(),
                    source,
                })
            })
            .transpose()?;
        let (status_tx, _) = watch::channel(Status {
            new_pods: self.new_pods.as_str().to_owned(),
            node: self.node.clone(),
            ..Status::default()
        });
        let metrics = Metrics::new();
        metrics.set_stuck_after(self.stuck_after);
        Ok(Agent {
            source,
            interfaces,
            settings: self,
            status: status_tx,
            metrics: Arc::new(metrics),
            denials: broadcast::channel(DENIALS_QUEUE).0,
        })
    }
}

/// One node's agent.
///
/// ```no_run
/// use netpol_agent::{Agent, NewPods, sources::Source};
///
/// # async fn example() -> Result<(), netpol_agent::AgentError> {
/// let agent = Agent::builder()
///     .source(Source::Files("/etc/netpol/manifests".into()))
///     .node_name("node-1")
///     .interfaces("veth*")
///     .new_pods(NewPods::FailClosed)
///     .listen(Some("127.0.0.1:9101".parse().expect("an address")))
///     .build()?;
/// let mut status = agent.status();
/// let shutdown = async {
///     let _ = tokio::signal::ctrl_c().await;
/// };
/// let running = tokio::spawn(agent.run(shutdown));
/// // Wait until some state is enforced, without sleeping.
/// let _ = status
///     .wait_for(std::time::Duration::from_secs(10), |s| s.ready)
///     .await;
/// running.await.expect("agent task")?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Agent {
    source: Source,
    interfaces: Option<glob::Pattern>,
    settings: AgentBuilder,
    status: watch::Sender<Status>,
    metrics: Arc<Metrics>,
    denials: broadcast::Sender<Denial>,
}

/// Deny events a slow [`Agent::denials`] subscriber may fall behind by
/// before it misses some (it is told how many).
const DENIALS_QUEUE: usize = 4096;

impl Agent {
    /// A builder with the defaults.
    #[must_use]
    pub fn builder() -> AgentBuilder {
        AgentBuilder::default()
    }

    /// The agent's status, live.
    #[must_use]
    pub fn status(&self) -> StatusHandle {
        StatusHandle(self.status.subscribe())
    }

    /// Its metrics.
    #[must_use]
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The deny events read from the datapath from now on, resolved to
    /// pods (within each endpoint's rate limit: see
    /// [`AgentBuilder::event_rate`]).
    #[must_use]
    pub fn denials(&self) -> broadcast::Receiver<Denial> {
        self.denials.subscribe()
    }

    /// Loads the datapath and keeps the kernel in step with the source
    /// until `shutdown` completes. The programs stay attached and the maps
    /// pinned on return (and if the process dies): the next agent adopts
    /// them; `netpol-agent cleanup` removes them.
    ///
    /// # Errors
    /// When the datapath, the HTTP port, the source or link watching
    /// cannot start, or one of them fails later.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        let s = &self.settings;
        let families = match links::node_families().await {
            Ok((ipv4, ipv6)) => Families { ipv4, ipv6 },
            Err(e) => {
                tracing::warn!(error = %e, "reading the node's addresses; assuming both families");
                Families {
                    ipv4: true,
                    ipv6: true,
                }
            }
        };
        match (families.ipv4, families.ipv6) {
            (true, false) => tracing::info!("node has no IPv6 address: enforcing IPv4 only"),
            (false, true) => tracing::info!("node has no IPv4 address: enforcing IPv6 only"),
            (false, false) => tracing::info!(
                "node has no global address yet: both families are enforced as pods get them"
            ),
            _ => {}
        }
        let mut global = GlobalConfig::default();
        if s.new_pods == NewPods::FailOpen {
            global.flags |= config_flags::NEW_PODS_FAIL_OPEN;
        }
        s.timeouts.apply(&mut global);
        global.event_rate = s.event_rate;
        global.event_burst = s.event_burst;
        global.allowed_sample = s.record_allowed;
        // One agent per set of pins, before anything is loaded or written:
        // a second one would adopt the first one's attachments and write
        // its own state under it.
        crate::bpffs::ensure_mounted(&s.bpffs)?;
        let pins = s.bpffs.join(crate::datapath::PIN_SUBDIR);
        let wait = s.handover_wait;
        let _pin_lock = tokio::task::spawn_blocking(move || crate::bpffs::lock(&pins, wait))
            .await
            .map_err(|e| crate::bpffs::LockError::Io {
                path: s.bpffs.clone(),
                source: std::io::Error::other(e.to_string()),
            })??;
        let dp = Datapath::load(&DatapathConfig {
            bpffs: s.bpffs.clone(),
            object: s.object.clone(),
            attach_mode: s.attach_mode,
            map_sizes: s.map_sizes,
            global,
            mark_mask: s.mark_mask,
            // A restart (rolling update, crash) must not leave the pods
            // unenforced: the next agent adopts what this one attached.
            persistent: true,
        })?;
        // A datapath adopted from a previous run keeps its config map.
        let mut dp = dp;
        dp.set_global(global)?;
        let ring = dp.take_events()?;
        match dp.kernel_counters() {
            Ok(k) => self.metrics.attach_counters(k),
            Err(e) => tracing::warn!(error = %e, "packet counters not in the metrics"),
        }
        // Without it a Service backend on a node address is not judged;
        // everything else is, so the agent runs and says so.
        let host = match dp.attach_host(&s.cgroup_root) {
            Ok(dir) => dir.display().to_string(),
            Err(e) => {
                tracing::warn!(error = %e, "to_host not attached");
                format!("not attached: {e}")
            }
        };
        self.status.send_modify(|st| st.to_host = Some(host));

        let (stop_tx, stop_rx) = watch::channel(false);
        let listener = match s.listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| AgentError::Listen { addr, source })?;
                let local = l.local_addr().unwrap_or(addr);
                tracing::info!(listen = %local, "serving /healthz /readyz /status /metrics");
                self.status.send_modify(|st| st.listen = Some(local));
                Some(l)
            }
            None => None,
        };
        let http = listener.map(|l| {
            tokio::spawn(crate::status::http::serve(
                l,
                self.status(),
                self.metrics.clone(),
                stop_rx.clone(),
            ))
        });

        let (input_tx, input_rx) = watch::channel(None);
        let mut source_health = None;
        let (source_name, mut source) = match &self.source {
            Source::Files(dir) => {
                tracing::info!(dir = %dir.display(), "files source");
                let run = FilesSource::new(dir.clone())
                    .metrics(self.metrics.clone())
                    .run(input_tx, stop_rx.clone());
                (
                    "files source",
                    tokio::spawn(async move { run.await.map_err(AgentError::from) }),
                )
            }
            Source::Kube(connection) => {
                let node = s.node.clone().ok_or(KubeError::NoNode)?;
                let client = connection.client().await?;
                let kube = KubeSource::new(client, node).metrics(self.metrics.clone());
                source_health = Some(kube.health());
                let run = kube.run(input_tx, stop_rx.clone());
                (
                    "kube source",
                    tokio::spawn(async move { run.await.map_err(AgentError::from) }),
                )
            }
        };
        let (link_tx, link_rx) = mpsc::unbounded_channel();
        let mut links = tokio::spawn(links::watch_links(link_tx, stop_rx.clone()));
        let (cni_tx, cni_rx) = mpsc::unbounded_channel();
        let cni = match &s.cni_socket {
            Some(path) => {
                let l = crate::node::cni::bind(path)?;
                tracing::info!(socket = %path.display(), "serving the CNI plugin");
                Some(tokio::spawn(crate::node::cni::serve(
                    l,
                    cni_tx,
                    stop_rx.clone(),
                )))
            }
            None => None,
        };
        // Installed only once the socket is served: an entry whose agent
        // does not answer fails the node's ADDs.
        let keeper = s
            .cni_install
            .clone()
            .map(|i| tokio::spawn(crate::node::cni::keep_installed(i, stop_rx.clone())));

        let cfg = SyncConfig {
            node: s.node.clone(),
            debounce: s.debounce,
            interfaces: self.interfaces.clone(),
            uplinks: s.uplinks.clone(),
            new_pods: s.new_pods.as_str(),
            source_health,
            state_dir: s.state_dir.clone(),
        };
        let (directory_tx, directory_rx) = watch::channel(Arc::new(Directory::default()));
        let events = tokio::spawn(
            crate::events::Reader {
                ring,
                directory: directory_rx,
                metrics: self.metrics.clone(),
                log_denied: s.log_denied,
                denials: self.denials.clone(),
                staged_dir: s.state_dir.clone(),
            }
            .run(stop_rx.clone()),
        );
        let sync = SyncLoop::new(dp, cfg, families, self.status.clone(), self.metrics.clone())
            .with_directory(directory_tx)
            .run(input_rx, link_rx, cni_rx, stop_rx.clone());
        tokio::pin!(sync);
        tokio::pin!(shutdown);
        let mut sync_done = false;
        let outcome = tokio::select! {
            () = &mut shutdown => Ok(()),
            () = &mut sync => { sync_done = true; Ok(()) }
            r = &mut source => joined(source_name, r).and_then(|r| r),
            r = &mut links => joined("link watch", r).and_then(|r| r.map_err(AgentError::from)),
        };
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
        if !sync_done {
            sync.await;
        }
        let _ = events.await;
        for t in [cni, keeper].into_iter().flatten() {
            let _ = t.await;
        }
        if let Some(h) = http {
            let _ = h.await;
        }
        outcome
    }
}

/// Default [`AgentBuilder::cgroup_root`].
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Reads a `--mark-mask`: hexadecimal with `0x` (`0xff000000`) or
/// decimal, one run of contiguous bits ([`netpol_common::mark::valid`]).
///
/// # Errors
/// [`AgentError::MarkMask`], naming the text and why.
pub fn parse_mark_mask(text: &str) -> Result<u32, AgentError> {
    let err = |reason: String| AgentError::MarkMask {
        text: text.to_owned(),
        reason,
    };
    let t = text.trim().replace('_', "");
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => t.parse::<u32>(),
    };
    let mask = parsed.map_err(|e| err(format!("not a 32-bit number ({e})")))?;
    if mark::valid(mask) {
        Ok(mask)
    } else {
        Err(err(MARK_MASK_RULE.to_owned()))
    }
}

const MARK_MASK_RULE: &str =
    "must be one run of contiguous bits, not 0 (the default is 0xff000000)";

fn joined<T>(task: &'static str, r: Result<T, tokio::task::JoinError>) -> Result<T, AgentError> {
    r.map_err(|e| AgentError::Task {
        task,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod timeout_tests {
    use super::*;

    #[test]
    fn connection_timeouts_reach_the_datapath_config() {
        let mut g = GlobalConfig::default();
        ConnectionTimeouts {
            tcp_syn: Duration::from_secs(5),
            udp: Duration::from_millis(1500),
            ..ConnectionTimeouts::default()
        }
        .apply(&mut g);
        assert_eq!(g.ct_tcp_syn_ns, 5_000_000_000);
        assert_eq!(g.ct_udp_ns, 1_500_000_000);
        assert_eq!(
            g.ct_tcp_established_ns,
            netpol_common::ct_defaults::TCP_ESTABLISHED_NS
        );
    }

    #[test]
    fn a_zero_timeout_is_not_mistaken_for_the_default() {
        let mut g = GlobalConfig::default();
        ConnectionTimeouts {
            other: Duration::ZERO,
            ..ConnectionTimeouts::default()
        }
        .apply(&mut g);
        assert_ne!(g.ct_other_ns, 0);
    }
}

#[cfg(test)]
mod mark_mask_tests {
    use super::*;

    #[test]
    fn mark_masks_are_read_in_hex_or_decimal() {
        assert_eq!(parse_mark_mask("0xff000000").ok(), Some(0xff00_0000));
        assert_eq!(parse_mark_mask("0XFF000000").ok(), Some(0xff00_0000));
        assert_eq!(parse_mark_mask("0x0ff0_0000").ok(), Some(0x0ff0_0000));
        assert_eq!(parse_mark_mask("16711680").ok(), Some(0x00ff_0000));
        assert_eq!(parse_mark_mask(" 0x1 ").ok(), Some(1));
    }

    #[test]
    fn unusable_mark_masks_are_refused_by_name() {
        for (text, why) in [
            ("0x0f0f0000", "contiguous"),
            ("0", "contiguous"),
            ("0x", "number"),
            ("ff000000", "number"),
            ("0x1ffffffff", "number"),
            ("-1", "number"),
        ] {
            let e = parse_mark_mask(text).expect_err(text).to_string();
            assert!(e.contains(text.trim()), "{e}");
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn the_builder_refuses_an_unusable_mark_mask() {
        let e = Agent::builder()
            .source(Source::Files("/nonexistent".into()))
            .mark_mask(0x0f0f_0000)
            .build()
            .expect_err("a broken mask");
        assert!(e.to_string().contains("0x0f0f0000"), "{e}");
    }

    #[test]
    fn the_builder_refuses_event_limits_out_of_range_by_name() {
        let builder = || Agent::builder().source(Source::Files("/nonexistent".into()));
        for (b, what) in [
            (builder().event_rate(0), "event rate 0"),
            (builder().event_burst(0), "event burst 0"),
            (builder().event_rate(limits::MAX_RATE + 1), "event rate"),
            (builder().event_burst(limits::MAX_BURST + 1), "event burst"),
        ] {
            let e = b.build().expect_err(what).to_string();
            assert!(e.starts_with(what), "{e}");
        }
        let ok = builder().event_rate(1).event_burst(limits::MAX_BURST);
        assert!(ok.log_denied(true).build().is_ok());
    }

    #[test]
    fn the_default_mark_mask_is_the_common_one() {
        assert_eq!(AgentBuilder::default().mark_mask, mark::DEFAULT_MASK);
        assert!(MARK_MASK_RULE.contains(&format!("{:#010x}", mark::DEFAULT_MASK)));
    }
}
