//! `netpol-agent`: a thin shell over the `netpol_agent` library.
#![warn(clippy::pedantic)]
// Pedantic lints that do not help this code:
#![allow(
    // Subcommand modules name their argument types in full (`compile::CompileArgs`).
    clippy::module_name_repetitions,
)]
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use netpol_agent::{
    Agent, AttachMode, Counters, Datapath, DatapathConfig, NewPods, Source, agent, datapath,
    sources::KubeConnection,
    status::{self, LogFormat},
};

mod cmd;

/// The static (musl) build, which the image ships, allocates with
/// mimalloc: musl's allocator is several times slower under the agent's
/// decode of a large Pod list.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[expect(
    clippy::doc_markdown,
    reason = "clap prints these doc comments as --help text, backticks and all"
)]
#[derive(Debug, Parser)]
#[command(
    name = "netpol-agent",
    version,
    about = "Kubernetes NetworkPolicy dataplane on eBPF"
)]
struct Cli {
    /// bpffs mount point; netpol pins its maps in `<bpffs>/netpol`.
    #[arg(long, global = true, env = "NETPOL_BPFFS", default_value = datapath::DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Log format (stderr; level from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum NewPodsArg {
    /// Unprogrammed pod interfaces pass only neighbour discovery and the
    /// node's own traffic (kubelet probes).
    FailClosed,
    /// Unprogrammed pod interfaces pass everything.
    Open,
}

/// Arguments of `netpol-agent run`.
#[expect(
    clippy::doc_markdown,
    reason = "clap prints these doc comments as --help text, backticks and all"
)]
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Folder of multi-document YAML/JSON manifests (Node, Namespaces,
    /// Pods, NetworkPolicies, ...), watched for changes. Without it the
    /// Kubernetes API is watched (in-cluster config, else the kubeconfig).
    #[arg(long, env = "NETPOL_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// This node's name (required with the Kubernetes API; with
    /// --manifests, default: the only Node in the manifests).
    #[arg(long, env = "NODE_NAME", required_unless_present = "manifests")]
    node: Option<String>,
    /// Only veths whose name matches this glob are pod interfaces
    /// (default: every veth).
    #[arg(long, value_name = "GLOB")]
    interfaces: Option<String>,
    /// Links whose name matches this glob are uplinks even when they look
    /// like pod interfaces or bridges (a veth to another node, a bridge
    /// holding the NIC). Every other link that is not lo, a bridge or a
    /// pod interface is an uplink anyway (the NIC, VXLAN, Geneve,
    /// WireGuard and IPIP tunnels such as flannel.1, bonds, VLAN devices,
    /// veths --interfaces leaves out): uplinks get leave_node on their TC
    /// egress, which judges a pod's Service traffic whose backend is on
    /// another node, and no device may let such a packet leave unjudged.
    #[arg(long, value_name = "GLOB", value_parser = parse_glob)]
    uplinks: Option<glob::Pattern>,
    /// Bits of the packet mark (skb->mark) netpol uses to carry a pod's
    /// Service traffic from the pod's veth to the hook that judges it once
    /// kube-proxy has chosen the backend. Hex (0x...) or decimal; one run
    /// of contiguous bits, whose values are the pod interfaces' slots
    /// (0xff000000: 255; at most 4095 are used): the Service traffic of pod
    /// interfaces beyond that is judged at the Service's address. The
    /// default is clear of kube-proxy's 0x4000/0x8000, kube-router's
    /// 0x10000/0x20000 and Tailscale's 0xff0000; pick other free bits if
    /// something else on the node uses these (Calico's default mask is
    /// 0xffff0000).
    #[arg(long, value_name = "MASK", default_value = "0xff000000", value_parser = parse_mark_mask)]
    mark_mask: u32,
    /// Where the cgroup v2 hierarchy is mounted (its `unified` folder on
    /// hybrid hosts is found too; netpol mounts one at /run/netpol/cgroupv2
    /// when there is none). The to_host program on its root judges a pod's
    /// Service traffic whose backend is one of the node's addresses.
    #[arg(long, value_name = "PATH", default_value = netpol_agent::agent::DEFAULT_CGROUP_ROOT)]
    cgroup_root: PathBuf,
    /// What pod interfaces do until their pod's policy is written.
    #[arg(long, value_enum, default_value_t = NewPodsArg::FailClosed)]
    new_pods: NewPodsArg,
    /// HTTP address of /healthz, /readyz, /status and /metrics: ADDR:PORT,
    /// or [ADDR]:PORT for either family (the DaemonSet passes
    /// `[$(HOST_IP)]:9101`, whatever the node's primary family).
    #[arg(long, default_value = agent::DEFAULT_LISTEN, value_parser = parse_listen)]
    listen: std::net::SocketAddr,
    /// Seconds the reconcile loop or the source (for the kube source:
    /// every watch healthy, so an unreachable API server counts) may show
    /// no progress before /healthz fails.
    #[arg(long, value_name = "SECS", default_value_t = netpol_agent::status::STUCK_AFTER.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    stuck_after_secs: u64,
    /// Milliseconds a burst of manifest changes is waited out before
    /// compiling.
    #[arg(long, default_value_t = 10)]
    debounce_ms: u64,
    /// Seconds to wait for another agent holding the pins (the one a
    /// rolling update replaces) to exit before refusing to start.
    #[arg(long, default_value_t = agent::DEFAULT_HANDOVER_WAIT.as_secs())]
    handover_wait_secs: u64,
    /// The eBPF object (default: found next to the binary, in
    /// /usr/lib/netpol or in the workspace's target/).
    #[arg(long, env = "NETPOL_EBPF_OBJECT")]
    object: Option<PathBuf>,
    /// Attach path.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    attach_mode: Mode,
    /// Skip the start-up checks (kernel, BTF, bpffs, clsact, capabilities).
    #[arg(long, env = "NETPOL_SKIP_PREFLIGHT")]
    skip_preflight: bool,
    /// Log every deny event the rate limit lets through, with the pods on
    /// both ends and the reason (they are counted in netpol_denied_total
    /// either way).
    #[arg(long)]
    log_denied: bool,
    /// Deny events each pod may report per second once its burst is
    /// spent; drops beyond it are counted in netpol_events_lost_total.
    #[arg(long, value_name = "N", default_value_t = netpol_common::events::DEFAULT_RATE,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(netpol_common::events::MAX_RATE)))]
    event_rate: u32,
    /// Deny events each pod may report at once after a quiet spell.
    #[arg(long, value_name = "M", default_value_t = netpol_common::events::DEFAULT_BURST,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(netpol_common::events::MAX_BURST)))]
    event_burst: u32,
    /// Record one in N of the new connections a policy rule allows
    /// (netpol::allowed log lines naming the rule, netpol_rule_hits_total),
    /// within a per-pod rate limit of their own (--event-rate,
    /// --event-burst); 0: none.
    #[arg(long, value_name = "N", default_value_t = 0)]
    record_allowed: u32,
    /// Folder of the state file (state.json) written after every apply:
    /// which pod each endpoint id is and which policy rules produced each
    /// map entry, for `inspect` and `explain` (also after the agent died).
    #[arg(long, env = "NETPOL_STATE_DIR", value_name = "DIR", default_value = netpol_agent::provenance::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(flatten)]
    cni: CniArgs,
    #[command(flatten)]
    limits: Limits,
}

/// The chained CNI plugin (`netpol-cni`): where the agent serves it and
/// where it is installed.
#[derive(clap::Args, Debug, Clone)]
struct CniArgs {
    /// Serve netpol-cni on this unix socket: a new pod's veth is bound
    /// from the plugin's report, and ADD returns once the pod's policy is
    /// in the kernel.
    #[arg(long = "cni-socket", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Install netpol-cni from this binary (the image's
    /// /usr/lib/netpol/netpol-cni): copied into --cni-bin-dir and put last
    /// in the node's conflist; `run` keeps it there (k3s rewrites its
    /// conflist at every start). Needs --cni-socket.
    #[arg(long = "cni-plugin", value_name = "FILE", requires = "socket")]
    plugin: Option<PathBuf>,
    /// The node's CNI binaries (k3s: /var/lib/rancher/k3s/data/cni).
    #[arg(
        long = "cni-bin-dir",
        value_name = "DIR",
        default_value = "/opt/cni/bin"
    )]
    bin_dir: PathBuf,
    /// The node's CNI configurations (k3s:
    /// /var/lib/rancher/k3s/agent/etc/cni/net.d).
    #[arg(
        long = "cni-conf-dir",
        value_name = "DIR",
        default_value = "/etc/cni/net.d"
    )]
    conf_dir: PathBuf,
    /// The conflist to edit (default: the first *.conflist of
    /// --cni-conf-dir, the one the runtime loads).
    #[arg(long = "cni-conflist", value_name = "FILE")]
    conflist: Option<PathBuf>,
    /// How long ADD waits for the agent before it fails (the runtime
    /// retries; the pod's containers do not start meanwhile).
    #[arg(long = "cni-timeout-ms", value_name = "MS", default_value_t = netpol_cni::DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
}

impl CniArgs {
    fn install(&self) -> Option<netpol_agent::node::cni::CniInstall> {
        Some(netpol_agent::node::cni::CniInstall {
            plugin: self.plugin.clone()?,
            bin_dir: self.bin_dir.clone(),
            conf_dir: self.conf_dir.clone(),
            conflist: self.conflist.clone(),
            socket: self.socket.clone()?,
            timeout_ms: self.timeout_ms,
        })
    }
}

/// Connection timeouts and map sizes (defaults suit a node of a few
/// hundred pods and large policy sets).
#[derive(Debug, clap::Args)]
struct Limits {
    /// Seconds a half-open TCP connection stays tracked.
    #[arg(long, default_value_t = netpol_common::ct_defaults::TCP_SYN_NS / 1_000_000_000)]
    ct_tcp_syn_secs: u64,
    /// Seconds an idle established TCP (or SCTP) connection stays tracked.
    #[arg(long, default_value_t = netpol_common::ct_defaults::TCP_ESTABLISHED_NS / 1_000_000_000)]
    ct_tcp_established_secs: u64,
    /// Seconds a closing TCP connection stays tracked.
    #[arg(long, default_value_t = netpol_common::ct_defaults::TCP_CLOSING_NS / 1_000_000_000)]
    ct_tcp_closing_secs: u64,
    /// Seconds an idle UDP flow stays tracked.
    #[arg(long, default_value_t = netpol_common::ct_defaults::UDP_NS / 1_000_000_000)]
    ct_udp_secs: u64,
    /// Seconds an idle ICMP echo (or other protocol) flow stays tracked.
    #[arg(long, default_value_t = netpol_common::ct_defaults::OTHER_NS / 1_000_000_000)]
    ct_other_secs: u64,
    /// Pod interfaces the endpoint map holds.
    #[arg(long, default_value_t = netpol_agent::MapSizes::default().endpoints)]
    max_endpoints: u32,
    /// IPv4 policy prefixes, all pods and directions together.
    #[arg(long, default_value_t = netpol_agent::MapSizes::default().policy_v4)]
    max_policy_v4: u32,
    /// IPv6 policy prefixes.
    #[arg(long, default_value_t = netpol_agent::MapSizes::default().policy_v6)]
    max_policy_v6: u32,
    /// Port-trie entries of all rule sets.
    #[arg(long, default_value_t = netpol_agent::MapSizes::default().ports)]
    max_ports: u32,
    /// Tracked connections (least recently used ones are evicted).
    #[arg(long, default_value_t = netpol_agent::MapSizes::default().conntrack)]
    max_connections: u32,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Keep this node's kernel in step with the cluster (the Kubernetes API,
    /// or --manifests): compile, apply, attach to pod veths as they appear,
    /// until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Load the programs, attach them to an interface and hold them until
    /// SIGINT/SIGTERM.
    Attach {
        /// Host-side interface (a pod's veth).
        #[arg(long, short)]
        interface: Vec<String>,
        /// The eBPF object (default: found next to the binary, in
        /// /usr/lib/netpol or in the workspace's target/).
        #[arg(long, env = "NETPOL_EBPF_OBJECT")]
        object: Option<PathBuf>,
        /// Attach path.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        attach_mode: Mode,
    },
    /// Prepare the node for `run` (the init container of the agent's pod):
    /// mount bpffs at --bpffs where the host sees it, so the pins outlive
    /// the agent's pod and `run` needs no `CAP_SYS_ADMIN`. Does nothing when
    /// one is mounted there already. With --cni-plugin, also install
    /// netpol-cni (see `run --help`).
    Init {
        #[command(flatten)]
        cni: CniArgs,
    },
    /// Print the packet counters from the pinned maps.
    Stats,
    /// Remove everything netpol attached or pinned on this node (pinned
    /// TCX links, its netlink filters, the clsact qdiscs it added, its pins
    /// in `<bpffs>/netpol`, its state file) and nothing else. Stop the
    /// agent first.
    Cleanup {
        /// Folder of the state file to remove.
        #[arg(long, env = "NETPOL_STATE_DIR", value_name = "DIR", default_value = netpol_agent::provenance::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Also take netpol-cni out of every conflist of --cni-conf-dir
        /// (and --cni-conflist) and remove its binary from --cni-bin-dir.
        #[command(flatten)]
        cni: CniArgs,
    },
    /// Compile manifests offline and print what this node's maps would hold.
    Compile(cmd::compile::CompileArgs),
    /// Read the live pinned maps back, decoded and named with the state
    /// file: endpoints, a pod's policy entries, tracked connections,
    /// counters. Works while the agent runs and after it died.
    Inspect(cmd::inspect::InspectArgs),
    /// The verdict this node's kernel gives a connection, and the policy
    /// rule that allows it or the policies that isolate the pod, from the
    /// live maps. Exit code 0 allowed, 1 denied, 2 depends on a Service's
    /// backend (or could not be answered).
    Explain(cmd::explain::ExplainArgs),
    /// What applying manifests would change on this node, predicted
    /// against the live maps and conntrack: the pod pairs and ports whose
    /// verdict would change, and the tracked connections that would be
    /// cut. Exit code 0 nothing would change, 1 something would, 2 could
    /// not be answered.
    Diff(cmd::diff::DiffArgs),
    /// Print the input fingerprint `run` will report on /status once it
    /// enforces this folder of manifests (tests wait on it).
    Fingerprint {
        /// Folder of manifests.
        #[arg(long)]
        manifests: PathBuf,
        /// The node whose agent reports it (it must be in the folder; the
        /// fingerprint covers every Node, as the agent watches them all).
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// Kernels ≥ 6.6: a new pod interface gets netlink clsact filters at
    /// once and moves to TCX links once no pod has started for 200 ms;
    /// uplinks get TCX links. Older kernels: netlink filters.
    Auto,
    /// Netlink clsact filters only.
    Netlink,
    /// TCX links only, created at once (kernels ≥ 6.6; each costs two RCU
    /// grace periods under `rtnl_lock` per pod start).
    Tcx,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    status::init_logging(match cli.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    });
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("netpol-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run_agent(cli.bpffs, *args),
        Command::Attach {
            interface,
            object,
            attach_mode,
        } => {
            anyhow::ensure!(!interface.is_empty(), "give at least one --interface");
            let config = DatapathConfig {
                bpffs: cli.bpffs,
                object,
                attach_mode: attach_mode.into(),
                ..DatapathConfig::default()
            };
            let mut dp = Datapath::load(&config).context("loading the datapath")?;
            for i in &interface {
                dp.attach(i).with_context(|| format!("attaching to {i}"))?;
            }
            eprintln!(
                "netpol-agent: attached to {}; maps pinned in {}; waiting for SIGINT/SIGTERM",
                interface.join(", "),
                dp.pin_dir().display()
            );
            wait_for_shutdown()?;
            drop(dp);
            Ok(ExitCode::SUCCESS)
        }
        Command::Init { cni } => {
            let mounted = netpol_agent::bpffs::ensure_mounted(&cli.bpffs)
                .with_context(|| format!("preparing {}", cli.bpffs.display()))?;
            if let Some(install) = cni.install() {
                let done = install.ensure().context("installing netpol-cni")?;
                println!(
                    "netpol-cni: {} {}, entry {} in {}",
                    if done.binary {
                        "copied to"
                    } else {
                        "already in"
                    },
                    install.bin_dir.display(),
                    if done.entry { "added" } else { "already" },
                    done.conflist.display()
                );
            }
            println!(
                "{} bpffs at {}",
                if mounted {
                    "mounted"
                } else {
                    "already mounted:"
                },
                cli.bpffs.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats => {
            let pin_dir = cli.bpffs.join(datapath::PIN_SUBDIR);
            let counters = Counters::read_pinned(&pin_dir)
                .with_context(|| format!("reading counters pinned in {}", pin_dir.display()))?;
            print!("{}", cmd::inspect::counters_table(&counters));
            Ok(ExitCode::SUCCESS)
        }
        Command::Cleanup { state_dir, cni } => cleanup(&cli.bpffs, &state_dir, &cni),
        Command::Compile(args) => cmd::compile::run(&args),
        Command::Inspect(args) => cmd::inspect::run(&cli.bpffs, &args),
        Command::Explain(args) => Ok(cmd::explain::run(&cli.bpffs, &args)),
        Command::Diff(args) => Ok(cmd::diff::run(&cli.bpffs, &args)),
        Command::Fingerprint { manifests, node } => {
            let mut loaded = netpol_agent::model::folder::Folder::load(&manifests)
                .with_context(|| format!("reading {}", manifests.display()))?;
            // The agent watches every Node (a ClusterNetworkPolicy's nodes
            // peer may select any): `--node` only names the local one.
            if let Some(node) = node {
                anyhow::ensure!(
                    loaded.snapshot.nodes.contains_key(&node),
                    "no Node {node} in {}",
                    manifests.display()
                );
                loaded.snapshot.local_node = Some(node);
            }
            println!("{}", netpol_agent::fingerprint(&loaded.snapshot));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `netpol-agent cleanup`.
fn cleanup(bpffs: &Path, state_dir: &Path, cni: &CniArgs) -> anyhow::Result<ExitCode> {
    let cni_removed = netpol_agent::node::cni::CniInstall::remove(
        &cni.conf_dir,
        cni.conflist.as_deref(),
        &cni.bin_dir,
    )
    .context("removing netpol-cni")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let cleaned = rt
        .block_on(datapath::cleanup(bpffs))
        .context("cleaning up")?;
    let remove = |name: &str| -> anyhow::Result<bool> {
        let path = state_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
    };
    let state_removed = remove(netpol_agent::provenance::STATE_FILE)?;
    // The staged view's reports: not reported on their own.
    remove(netpol_agent::staged::FILE)?;
    println!(
        "removed {} pinned links ({}), {} netlink filters ({}), {} clsact qdiscs ({}); pins {}; state file {}; netpol-cni {}",
        cleaned.links.len(),
        cleaned.links.join(", "),
        cleaned.filters.len(),
        cleaned.filters.join(", "),
        cleaned.qdiscs.len(),
        cleaned.qdiscs.join(", "),
        if cleaned.pins { "removed" } else { "absent" },
        if state_removed { "removed" } else { "absent" },
        if cni_removed.is_empty() {
            "absent".to_owned()
        } else {
            format!(
                "removed from {}",
                cni_removed
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    );
    Ok(ExitCode::SUCCESS)
}

impl From<Mode> for AttachMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => AttachMode::Auto,
            Mode::Netlink => AttachMode::Netlink,
            Mode::Tcx => AttachMode::Tcx,
        }
    }
}

fn run_agent(bpffs: PathBuf, args: RunArgs) -> anyhow::Result<ExitCode> {
    if !args.skip_preflight {
        netpol_agent::preflight::require(&bpffs)?;
    }
    let mut builder = Agent::builder()
        .source(match args.manifests {
            Some(dir) => Source::Files(dir),
            None => Source::Kube(KubeConnection::Infer),
        })
        .bpffs(bpffs)
        .attach_mode(args.attach_mode.into())
        .uplinks(args.uplinks)
        .mark_mask(args.mark_mask)
        .cgroup_root(args.cgroup_root)
        .new_pods(match args.new_pods {
            NewPodsArg::FailClosed => NewPods::FailClosed,
            NewPodsArg::Open => NewPods::FailOpen,
        })
        .listen(Some(args.listen))
        .cni_install(args.cni.install())
        .cni_socket(args.cni.socket.clone())
        .state_dir(Some(args.state_dir))
        .debounce(std::time::Duration::from_millis(args.debounce_ms))
        .stuck_after(std::time::Duration::from_secs(args.stuck_after_secs))
        .handover_wait(std::time::Duration::from_secs(args.handover_wait_secs))
        .log_denied(args.log_denied)
        .event_rate(args.event_rate)
        .event_burst(args.event_burst)
        .record_allowed(args.record_allowed)
        .connection_timeouts(netpol_agent::ConnectionTimeouts {
            tcp_syn: std::time::Duration::from_secs(args.limits.ct_tcp_syn_secs),
            tcp_established: std::time::Duration::from_secs(args.limits.ct_tcp_established_secs),
            tcp_closing: std::time::Duration::from_secs(args.limits.ct_tcp_closing_secs),
            udp: std::time::Duration::from_secs(args.limits.ct_udp_secs),
            other: std::time::Duration::from_secs(args.limits.ct_other_secs),
        })
        .map_sizes(netpol_agent::MapSizes {
            endpoints: args.limits.max_endpoints,
            policy_v4: args.limits.max_policy_v4,
            policy_v6: args.limits.max_policy_v6,
            ports: args.limits.max_ports,
            conntrack: args.limits.max_connections,
            ..netpol_agent::MapSizes::default()
        });
    if let Some(n) = args.node {
        builder = builder.node_name(n);
    }
    if let Some(g) = args.interfaces {
        builder = builder.interfaces(g);
    }
    if let Some(o) = args.object {
        builder = builder.object(o);
    }
    let agent = builder.build().context("configuring the agent")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let outcome = rt.block_on(agent.run(async {
        if let Err(e) = signal().await {
            tracing::error!(error = %e, "waiting for a signal");
        }
    }));
    // Dropping the runtime would wait for every blocking task, however
    // long: a peer namespace's address dump or a rescan still running must
    // not keep a stopping agent past its termination grace. What it
    // enforces is in the kernel already.
    rt.shutdown_timeout(SHUTDOWN_WAIT);
    outcome.context("running the agent")?;
    Ok(ExitCode::SUCCESS)
}

/// How long a stopping agent waits for its blocking tasks (lookups,
/// rescans) before it exits without them; well inside the agent pod's
/// 10 s termination grace.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn parse_glob(text: &str) -> Result<glob::Pattern, String> {
    glob::Pattern::new(text).map_err(|e| format!("not a glob: {e}"))
}

/// `ADDR:PORT`, `[V6]:PORT` or `[V4]:PORT`: brackets let a manifest
/// write one form for a node address of either family.
fn parse_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(a) = text.parse() {
        return Ok(a);
    }
    let bad = || format!("{text:?} is not ADDR:PORT or [ADDR]:PORT");
    let (host, port) = text
        .strip_prefix('[')
        .and_then(|t| t.split_once("]:"))
        .ok_or_else(bad)?;
    let ip: std::net::IpAddr = host.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(std::net::SocketAddr::new(ip, port))
}

fn parse_mark_mask(text: &str) -> Result<u32, String> {
    agent::parse_mark_mask(text).map_err(|e| e.to_string())
}

async fn signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

fn wait_for_shutdown() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(signal()).context("waiting for a signal")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec!["netpol-agent", "run", "--manifests", "/m"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Run(a) => Ok(*a),
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn listen_takes_either_family_in_brackets_and_names_a_bad_one() {
        for (text, want) in [
            ("127.0.0.1:9101", "127.0.0.1:9101"),
            ("[10.0.0.7]:9101", "10.0.0.7:9101"),
            ("[fd00::7]:9101", "[fd00::7]:9101"),
        ] {
            let a = run_args(&["--listen", text]).expect(text);
            assert_eq!(a.listen.to_string(), want);
        }
        for bad in ["[]:9101", "10.0.0.7", "[10.0.0.7]", "[x]:1", "[::1]:99999"] {
            let e = run_args(&["--listen", bad]).expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn stuck_after_defaults_to_the_status_threshold_and_refuses_zero() {
        let a = run_args(&[]).expect("defaults");
        assert_eq!(
            a.stuck_after_secs,
            netpol_agent::status::STUCK_AFTER.as_secs()
        );
        assert!(run_args(&["--stuck-after-secs", "0"]).is_err());
    }

    #[test]
    fn mark_mask_defaults_to_the_common_mask() {
        let a = run_args(&[]).expect("defaults");
        assert_eq!(a.mark_mask, netpol_common::mark::DEFAULT_MASK);
        assert!(a.uplinks.is_none());
    }

    #[test]
    fn mark_mask_and_uplinks_are_read() {
        let a = run_args(&["--mark-mask", "0x00f00000", "--uplinks", "eth*"]).expect("flags");
        assert_eq!(a.mark_mask, 0x00f0_0000);
        assert!(
            a.uplinks
                .is_some_and(|g| g.matches("eth0") && !g.matches("wg0"))
        );
    }

    #[test]
    fn a_broken_mark_mask_is_refused_by_name() {
        let e = run_args(&["--mark-mask", "0x0f0f0000"]).expect_err("not contiguous");
        assert!(e.to_string().contains("0x0f0f0000"), "{e}");
        assert!(e.to_string().contains("contiguous"), "{e}");
    }

    #[test]
    fn deny_events_are_counted_not_logged_by_default_and_limits_are_bounded() {
        let a = run_args(&[]).expect("defaults");
        assert!(!a.log_denied);
        assert_eq!(
            (a.event_rate, a.event_burst),
            (
                netpol_common::events::DEFAULT_RATE,
                netpol_common::events::DEFAULT_BURST
            )
        );
        let a = run_args(&["--log-denied", "--event-rate", "100", "--event-burst", "7"])
            .expect("flags");
        assert!(a.log_denied);
        assert_eq!((a.event_rate, a.event_burst), (100, 7));
        for bad in [["--event-rate", "0"], ["--event-burst", "10001"]] {
            assert!(run_args(&bad).is_err(), "{bad:?}");
        }
    }
    #[test]
    fn state_dir_defaults_next_to_the_pinned_state_and_is_read_by_inspect_and_explain() {
        let a = run_args(&[]).expect("defaults");
        assert_eq!(a.state_dir, PathBuf::from("/run/netpol"));
        let cli = Cli::try_parse_from([
            "netpol-agent",
            "explain",
            "x/a",
            "x/b",
            "tcp/80",
            "--family",
            "6",
            "-o",
            "json",
            "--state-dir",
            "/tmp/s",
        ])
        .expect("explain");
        let Command::Explain(e) = cli.command else {
            panic!("not explain")
        };
        assert_eq!(
            (e.family, e.common.state_dir),
            (Some(6), PathBuf::from("/tmp/s"))
        );
        let cli = Cli::try_parse_from([
            "netpol-agent",
            "--bpffs",
            "/b",
            "inspect",
            "policy",
            "x/b",
            "--ingress",
            "--family",
            "4",
        ])
        .expect("inspect policy");
        assert_eq!(cli.bpffs, PathBuf::from("/b"));
        assert!(matches!(
            cli.command,
            Command::Inspect(cmd::inspect::InspectArgs {
                what: cmd::inspect::What::Policy(cmd::inspect::PolicyArgs {
                    ingress: true,
                    family: Some(4),
                    ..
                })
            })
        ));
        assert!(
            Cli::try_parse_from(["netpol-agent", "explain", "--batch", "-", "x/a"]).is_err(),
            "--batch takes no query on the command line"
        );
    }
}
