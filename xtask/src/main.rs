//! `cargo xtask`: build, test and demo netpol, bootstrapping what they need.
//!
//! Every step that installs something checks first and prints one line, so
//! running it twice is cheap and a fresh machine needs nothing by hand.
use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};

mod bench;
mod bootstrap;
mod cluster;
mod conformance;
mod demo;
mod deploy;
mod deploy_test;
mod image;
mod vm;

/// The eBPF target.
const BPF_TARGET: &str = "bpfel-unknown-none";

#[derive(Parser)]
#[command(name = "cargo xtask", about = "netpol build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (nightly rust-src, bpf-linker,
    /// Debian tools, vm-test's qemu and busybox-static), skipping what is
    /// already there.
    Bootstrap,
    /// Build the eBPF object (release) to target/netpol-ebpf.o.
    BuildEbpf,
    /// Build the object, run the lints and every test of the workspace,
    /// then (unfiltered, as root) the image and `deploy-test`, `vm-test
    /// --kernel all` and the conformance run.
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run clippy on both toolchains and rustfmt.
    Lint,
    /// Run the conformance scenarios with real packets in network
    /// namespaces (as root).
    Conformance {
        /// Folder of scenario files.
        #[arg(long)]
        scenarios: Option<PathBuf>,
        /// Only scenarios whose name contains this.
        #[arg(long)]
        filter: Option<String>,
        /// How pods reach each other through the node.
        #[arg(long, value_enum, default_value_t = TopologyArg::Bridge)]
        topology: TopologyArg,
        /// Which probes.
        #[arg(long, value_enum, default_value_t = ViaArg::Pod)]
        via: ViaArg,
        /// Only N matching scenarios, spread over the set.
        #[arg(long)]
        limit: Option<usize>,
        /// Run on a cluster brought up from this file (`cargo xtask
        /// cluster`; scenarios default to ../shared/conformance/
        /// scenarios-3node), writing through its API server; taken down
        /// at the end. No cluster may be up.
        #[arg(long)]
        cluster: Option<PathBuf>,
        /// Apply each step that changes policy objects only as staged
        /// policies first (netpol.io/staged, netpol.io/staged-delete):
        /// step k-1's matrix must hold, `explain --staged` and the
        /// datapath's staged reports must give step k's; then promote it.
        /// One node, the scenarios on cluster.yaml.
        #[arg(long, conflicts_with = "cluster")]
        staged: bool,
    },
    /// Run benchmarks and record them in docs/PERFORMANCE.md.
    Bench {
        /// Which: `datapath` (per packet, root), `compiler`, `agent` (new
        /// pod to enforced, root), `pod-start` (what netpol-cni adds to a
        /// pod's CNI chain, root), `kube` (initial sync and memory against
        /// a fake API server), `control` and `throughput` (netpol against
        /// a kube-router-style iptables + ipset baseline, root), `propagation`
        /// (kubectl to every node of the three-node cluster, root), or `all`.
        #[arg(default_value = "all")]
        which: String,
    },
    /// Build the agent's OCI image (no base image) into
    /// target/image/netpol-agent-<version>.oci.tar; prints
    /// `image: sha256:<digest>` last.
    Image,
    /// Run the image under podman exactly as the rendered manifests say,
    /// against the test API server over TLS (as root).
    DeployTest,
    /// Write deploy/netpol.yaml (deploy/base in one file, for k3s's
    /// auto-deploy folder) with `kubectl kustomize`.
    RenderDeploy,
    /// Start and delete pods through the CNI chain (bridge, portmap,
    /// netpol-cni), each with a random policy, reusing addresses: every
    /// connection gets its policy's verdict from ADD on (`cargo test` runs
    /// 40 of them; this runs `--pods`, 1,000 by default; as root).
    CniChurn {
        /// How many pods.
        #[arg(long, default_value_t = 1000)]
        pods: usize,
    },
    /// Run the datapath tests on Debian kernels 5.10, 6.1 and 6.12, each
    /// booted in qemu (as root; kernels cached under target/vm).
    VmTest {
        /// Which kernel: 5.10, 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only the tests whose names contain this (libtest's filter; a
        /// quick loop on one kernel's verifier, say).
        #[arg(long)]
        only: Option<String>,
    },
    /// A k3s-like cluster on this machine (as root): node namespaces on an
    /// underlay, flannel's VXLAN between them, the test API server over
    /// TLS, an agent per node from the DaemonSet under podman, the cluster
    /// file's pods made through each node's CNI chain. Not yet: Services,
    /// host-networked pods.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Show netpol on a live pod: netns, veth, both families, counters, and
    /// the offline compile of the built-in example manifests.
    Demo {
        /// Keep the demo's namespaces and agent up at the end, print how to
        /// run `netpol-agent inspect`/`explain` on them, and tear down on
        /// Enter (or Ctrl-C).
        #[arg(long)]
        hold: bool,
        /// Spread the example app over a cluster of N nodes (`cargo xtask
        /// cluster`), policies written with kubectl; with --hold the
        /// cluster stays up.
        #[arg(long)]
        nodes: Option<usize>,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Wire the nodes and make the pods; fails when a cluster is up.
    Up {
        /// N generated nodes (node-N: 10.42.N.0/24, fd00:10:42:N::/64,
        /// InternalIPs 10.200.0.N, fd00:200::N), no pods; with
        /// `--cluster`, the file's count of Nodes.
        #[arg(long)]
        nodes: Option<usize>,
        /// The cluster file (default
        /// ../shared/conformance/cluster-3node.yaml).
        #[arg(long)]
        cluster: Option<PathBuf>,
    },
    /// Remove every namespace of the cluster and its state folder.
    Down,
    /// The nodes, their VXLAN peers and the pods with their addresses.
    Status,
    /// Up from cluster-3node.yaml, a policy written with kubectl enforced
    /// across nodes (both families, pods and nodes as clients), down.
    Test,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TopologyArg {
    Bridge,
    Routed,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ViaArg {
    Pod,
    Service,
    All,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Bootstrap => bootstrap::all(),
        Cmd::BuildEbpf => build_ebpf().map(|_| ()),
        Cmd::Test { no_lint, args } => test(no_lint, &args),
        Cmd::Lint => {
            bootstrap::ebpf_toolchain()?;
            lint()
        }
        Cmd::Demo { hold, nodes: None } => demo::demo(hold),
        Cmd::Demo {
            hold,
            nodes: Some(n),
        } => demo::demo_nodes(n, hold),
        Cmd::Cluster { action } => match action {
            ClusterAction::Up { nodes, cluster } => cluster::up(nodes, cluster.as_deref()),
            ClusterAction::Down => cluster::down(),
            ClusterAction::Status => cluster::status(),
            ClusterAction::Test => cluster::test(),
        },
        Cmd::RenderDeploy => deploy::render(),
        Cmd::Image => image::build().map(drop),
        Cmd::DeployTest => deploy_test::run(),
        Cmd::CniChurn { pods } => {
            bootstrap::debian_tools()?;
            let object = build_ebpf()?;
            run(cargo("stable")
                .args([
                    "test",
                    "-p",
                    "netpol-cni",
                    "--test",
                    "chain",
                    "pods_started_and_deleted",
                    "--",
                    "--nocapture",
                ])
                .env("NETPOL_CNI_CHURN", pods.to_string())
                .env("NETPOL_EBPF_OBJECT", &object))
        }
        Cmd::VmTest { kernel, only } => vm::test(&vm::select(&kernel)?, only.as_deref()),
        Cmd::Conformance {
            scenarios,
            filter,
            topology,
            via,
            limit,
            cluster,
            staged,
        } => {
            let topology = match topology {
                TopologyArg::Bridge => conformance::topology::Kind::Bridge,
                TopologyArg::Routed => conformance::topology::Kind::Routed,
            };
            let via = match via {
                ViaArg::Pod => conformance::ViaSel::Pod,
                ViaArg::Service => conformance::ViaSel::Service,
                ViaArg::All => conformance::ViaSel::All,
            };
            // Scenarios naming another model (`cluster:`, as every file of
            // scenarios-cnp does: several Nodes, host-networked pods) run
            // on the cluster, each on its model.
            let other_model = cluster.is_none()
                && scenarios.as_deref().is_some_and(|dir| {
                    conformance::scenario::load_dir(dir).is_ok_and(|list| {
                        list.iter()
                            .any(|s| s.cluster.as_deref().is_some_and(|m| m != "cluster.yaml"))
                    })
                });
            let all = conformance::Models::All;
            let pick = Pick {
                scenarios,
                filter,
                topology,
                via,
                limit,
            };
            let t = match cluster {
                None if staged => conformance_staged_with(&pick, &conformance_build()?)?,
                Some(file) => {
                    conformance_cluster(&file, pick.scenarios, pick.filter, via, limit, all)?
                }
                None if other_model => conformance_mixed(&pick)?,
                None => conformance_run(&pick, all)?,
            };
            ensure!(t.failed == 0, "{} conformance cells failed", t.failed);
            Ok(())
        }
        Cmd::Bench { which } => match which.as_str() {
            "datapath" => bench::datapath(),
            "compiler" => bench::compiler(),
            "agent" => bench::agent(),
            "pod-start" => bench::pod_start(),
            "kube" => bench::kube(),
            "control" => bench::control(),
            "throughput" => bench::throughput(),
            "propagation" => cluster::propagation::bench(),
            "all" => bench::compiler()
                .and_then(|()| bench::datapath())
                .and_then(|()| bench::agent())
                .and_then(|()| bench::pod_start())
                .and_then(|()| bench::kube())
                .and_then(|()| bench::control())
                .and_then(|()| bench::throughput())
                .and_then(|()| cluster::propagation::bench()),
            other => bail!(
                "unknown bench {other:?}: datapath, compiler, agent, pod-start, kube, control, \
                 throughput, propagation or all"
            ),
        },
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Where `build-ebpf` leaves the object; the agent looks here too.
fn object_path() -> PathBuf {
    root().join("target").join("netpol-ebpf.o")
}

/// A `cargo` command for the given toolchain, free of the variables the
/// outer `cargo xtask` (stable) set, which would otherwise pin the inner
/// cargo to stable.
fn cargo(toolchain: &str) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", toolchain, "cargo"]);
    for v in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTDOC",
        "CARGO",
        "RUSTC_WRAPPER",
    ] {
        c.env_remove(v);
    }
    c.current_dir(root());
    c
}

/// Runs a command, failing with its command line when it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(OsStr::to_string_lossy)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let status = cmd
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(())
}

fn ebpf_cargo(subcommand: &str, target_dir: &str) -> Command {
    let mut c = cargo("nightly");
    c.args([
        subcommand,
        "--release",
        "-p",
        "netpol-ebpf",
        "--target",
        BPF_TARGET,
        "-Z",
        "build-std=core",
        "--target-dir",
        target_dir,
    ]);
    // Only target artifacts get these: BTF for the maps (bpftool prints field
    // names) and the programs. bpf-linker's default in-order memcpy
    // expansion leaves every memset (zeroing a `Packet`, the tail of an
    // IPv4 address) and byte compare as a call to a byte-at-a-time loop, a
    // fifth of a packet's run time; expanded inline they are a few stores.
    // v3 (32-bit jumps and subregisters, kernel 5.1 and later) keeps the
    // stack the stores need within the verifier's 512 bytes.
    // The remapped paths keep the checkout's, cargo's and rustup's folders
    // out of the BTF and DWARF line information, which the image carries.
    let mut flags = vec![
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
        "-Clink-arg=--disable-expand-memcpy-in-order".to_owned(),
        "-Ctarget-cpu=v3".to_owned(),
    ];
    flags.extend(remap_path_prefixes());
    c.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"));
    c
}

/// `--remap-path-prefix` flags for this machine's folders that rustc
/// writes into what it builds (panic locations, debug information): the
/// checkout, cargo's home (the registry's sources) and rustup's (the
/// nightly's `rust-src`, which `build-std` compiles). Without them another
/// checkout of one commit, or another user, builds other bytes.
fn remap_path_prefixes() -> Vec<String> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let under_home =
        |var: &str, dir: &str| std::env::var_os(var).map_or_else(|| home.join(dir), PathBuf::from);
    [
        (root(), "/netpol"),
        (under_home("CARGO_HOME", ".cargo"), "/cargo"),
        (under_home("RUSTUP_HOME", ".rustup"), "/rustup"),
    ]
    .iter()
    .map(|(from, to)| format!("--remap-path-prefix={}={to}", from.display()))
    .collect()
}

fn build_ebpf() -> Result<PathBuf> {
    bootstrap::ebpf_toolchain()?;
    println!("xtask: building the eBPF object (nightly, {BPF_TARGET})");
    run(&mut ebpf_cargo("build", "target/ebpf"))?;
    let built = root()
        .join("target/ebpf")
        .join(BPF_TARGET)
        .join("release/netpol-ebpf");
    let dest = object_path();
    std::fs::copy(&built, &dest)
        .with_context(|| format!("copying {} to {}", built.display(), dest.display()))?;
    println!("xtask: eBPF object at {}", dest.display());
    Ok(dest)
}

fn lint() -> Result<()> {
    println!("xtask: cargo fmt --check");
    run(cargo("stable").args(["fmt", "--all", "--check"]))?;
    println!("xtask: clippy (userspace, stable)");
    run(cargo("stable").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    println!("xtask: clippy (netpol-ebpf, nightly, {BPF_TARGET})");
    run(ebpf_cargo("clippy", "target/ebpf").args(["--", "-D", "warnings"]))?;
    Ok(())
}

/// Prints how long each phase of `cargo xtask test` took.
struct Phases {
    started: std::time::Instant,
    last: std::time::Instant,
}

impl Phases {
    fn new() -> Self {
        let now = std::time::Instant::now();
        Self {
            started: now,
            last: now,
        }
    }

    fn done(&mut self, phase: &str) {
        let now = std::time::Instant::now();
        println!(
            "xtask: {phase}: {} s ({} s since the start)",
            (now - self.last).as_secs(),
            (now - self.started).as_secs()
        );
        self.last = now;
    }
}

fn test(no_lint: bool, args: &[String]) -> Result<()> {
    let mut phases = Phases::new();
    bootstrap::all()?;
    let object = build_ebpf()?;
    phases.done("bootstrap and eBPF object");
    if !no_lint {
        lint()?;
        phases.done("lint");
    }
    if !netpol_is_root() && std::env::var_os("NETPOL_SKIP_PRIVILEGED").is_none() {
        bail!(
            "the privileged tests need root (BPF, netns); run as root, or set \
             NETPOL_SKIP_PRIVILEGED=1 to skip them"
        );
    }
    println!("xtask: cargo test (userspace crates, unit + privileged integration tests)");
    run(cargo("stable")
        .arg("test")
        .args(args)
        .env("NETPOL_EBPF_OBJECT", &object))?;
    phases.done("cargo test");
    if !args.is_empty() || !netpol_is_root() {
        // A filtered run, or one without the privileges the harness needs.
        return Ok(());
    }
    println!("xtask: deploy-test (the image under podman, as the rendered manifests say)");
    deploy_test::run()?;
    println!("xtask: cluster test (three nodes over flannel's VXLAN, an agent each under podman)");
    cluster::test()?;
    println!(
        "xtask: conformance on the cluster (every scenario of scenarios-3node and netpol's own, \
         via pod and service, written through the API server)"
    );
    let shared = shared_conformance()?;
    // The shared scenarios, then netpol's own for the cluster (host-
    // networked pods).
    for scenarios in [None, Some(root().join("xtask/scenarios"))] {
        let on_cluster = conformance_cluster(
            &shared.join("cluster-3node.yaml"),
            scenarios,
            None,
            conformance::ViaSel::All,
            None,
            conformance::Models::All,
        )?;
        ensure!(
            on_cluster.failed == 0,
            "{} conformance cells failed on the cluster",
            on_cluster.failed
        );
    }
    println!(
        "xtask: ClusterNetworkPolicy conformance on the cluster (every scenario of \
         scenarios-cnp, each on the model it names, via pod and service)"
    );
    let cnp = conformance_cluster(
        &shared.join("cluster.yaml"),
        Some(shared.join("scenarios-cnp")),
        None,
        conformance::ViaSel::All,
        None,
        conformance::Models::Others,
    )?;
    ensure!(
        cnp.failed == 0,
        "{} ClusterNetworkPolicy conformance cells failed on the cluster",
        cnp.failed
    );
    // vm-test's guests take the cores the host has to spare (one on a
    // 2-core machine); the conformance run takes the rest meanwhile.
    // Everything both run is built first, so neither builds beside the
    // other.
    let suites = vm::suites(&object)?;
    conformance_build()?;
    phases.done(
        "image, deploy-test, cluster test and conformance, and builds for vm-test and conformance",
    );
    println!(
        "xtask: vm-test (the datapath suites on every kernel of the matrix, qemu) beside the \
         conformance run"
    );
    let series = vm::select("all")?;
    let (vm_result, conformance) = std::thread::scope(|s| {
        let vm = s.spawn(|| vm::boot_all(&series, &object, &suites, None));
        let conformance = conformance_both(&object);
        let vm_result = vm
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("vm-test panicked")));
        (vm_result, conformance)
    });
    phases.done("vm-test beside conformance");
    vm_result?;
    let (passed, failed) = conformance?;
    println!("conformance: {passed} passed, {failed} failed");
    // The summary stays the last line: it is the run's closing line.
    ensure!(failed == 0, "{failed} conformance cells failed");
    Ok(())
}

/// Every scenario on the bridge and the routed topology, via pod and
/// service: (passed, failed) cells. The caller built what it runs.
fn conformance_both(object: &Path) -> Result<(usize, usize)> {
    let mut tally = (0, 0);
    for (name, topology) in [
        ("bridge", conformance::topology::Kind::Bridge),
        ("routed", conformance::topology::Kind::Routed),
    ] {
        println!("xtask: conformance, {name} topology, every scenario (via pod and service)");
        let t = conformance_with(
            &Pick::every(None, topology),
            object,
            conformance::Models::All,
        )?;
        tally.0 += t.passed;
        tally.1 += t.failed;
    }
    // The ClusterNetworkPolicy scenarios on this model (the others run on
    // the cluster, before).
    println!(
        "xtask: conformance, bridge topology, the scenarios of scenarios-cnp on cluster.yaml \
         (via pod and service)"
    );
    let t = conformance_with(
        &Pick::every(
            Some(shared_conformance()?.join("scenarios-cnp")),
            conformance::topology::Kind::Bridge,
        ),
        object,
        conformance::Models::Own,
    )?;
    tally.0 += t.passed;
    tally.1 += t.failed;
    // Every policy step staged first, then promoted (#26), both sets.
    for set in ["scenarios", "scenarios-cnp"] {
        println!(
            "xtask: conformance --staged, bridge topology, the scenarios of {set} on cluster.yaml \
             (via pod and service)"
        );
        let t = conformance_staged_with(
            &Pick::every(
                Some(shared_conformance()?.join(set)),
                conformance::topology::Kind::Bridge,
            ),
            object,
        )?;
        tally.0 += t.passed;
        tally.1 += t.failed;
    }
    Ok(tally)
}

/// The shared conformance folder beside the repository.
fn shared_conformance() -> Result<PathBuf> {
    let dir = root().join("../shared/conformance");
    ensure!(
        dir.join("FORMAT.md").is_file(),
        "{} is missing: the conformance model and scenarios live in the shared folder beside \
         the repository",
        dir.display()
    );
    Ok(dir)
}

/// What a conformance run needs: its tools and the agent (debug).
fn conformance_build() -> Result<PathBuf> {
    ensure!(
        netpol_is_root(),
        "the conformance harness creates network namespaces and loads BPF programs: run it as root"
    );
    bootstrap::demo_tools()?;
    let object = build_ebpf()?;
    println!("xtask: building netpol-agent");
    run(cargo("stable").args(["build", "-p", "netpol-agent"]))?;
    Ok(object)
}

/// Which scenarios a conformance run on one node takes, and how.
#[derive(Clone, Debug)]
struct Pick {
    scenarios: Option<PathBuf>,
    filter: Option<String>,
    topology: conformance::topology::Kind,
    via: conformance::ViaSel,
    limit: Option<usize>,
}

impl Pick {
    /// Every scenario of `scenarios` (default: the shared `scenarios`),
    /// via pod and service.
    fn every(scenarios: Option<PathBuf>, topology: conformance::topology::Kind) -> Self {
        Self {
            scenarios,
            filter: None,
            topology,
            via: conformance::ViaSel::All,
            limit: None,
        }
    }

    fn options(
        &self,
        object: &Path,
        models: conformance::Models,
        staged: bool,
    ) -> Result<conformance::Options> {
        let shared = shared_conformance()?;
        Ok(conformance::Options {
            scenarios: self
                .scenarios
                .clone()
                .unwrap_or_else(|| shared.join("scenarios")),
            model: shared.join("cluster.yaml"),
            filter: self.filter.clone(),
            topology: self.topology,
            via: self.via,
            limit: self.limit,
            agent: demo::target_dir().join("debug/netpol-agent"),
            object: object.to_owned(),
            models,
            staged,
        })
    }
}

/// Builds what a conformance run needs and runs it.
fn conformance_run(pick: &Pick, models: conformance::Models) -> Result<conformance::Tally> {
    let object = conformance_build()?;
    conformance_with(pick, &object, models)
}

/// A folder whose scenarios name several models: those on cluster.yaml
/// on one node (its Node's address is the pods' gateway, which a cluster's
/// underlay cannot be), the others each on a cluster of its model.
fn conformance_mixed(pick: &Pick) -> Result<conformance::Tally> {
    let shared = shared_conformance()?;
    let dir = pick
        .scenarios
        .clone()
        .unwrap_or_else(|| shared.join("scenarios"));
    let named: Vec<conformance::scenario::Scenario> = conformance::scenario::load_dir(&dir)?
        .into_iter()
        .filter(|s| {
            pick.filter
                .as_ref()
                .is_none_or(|f| s.name.contains(f.as_str()))
        })
        .collect();
    let has = |m: conformance::Models| named.iter().any(|s| m.takes(s, Some("cluster.yaml")));
    let mut total = conformance::Tally::default();
    for (models, on_cluster) in [
        (conformance::Models::Own, false),
        (conformance::Models::Others, true),
    ] {
        if !has(models) {
            continue;
        }
        let t = if on_cluster {
            conformance_cluster(
                &shared.join("cluster.yaml"),
                pick.scenarios.clone(),
                pick.filter.clone(),
                pick.via,
                pick.limit,
                models,
            )?
        } else {
            conformance_run(pick, models)?
        };
        total.passed += t.passed;
        total.failed += t.failed;
    }
    Ok(total)
}

/// Runs the conformance scenarios with what [`conformance_build`] built.
fn conformance_with(
    pick: &Pick,
    object: &Path,
    models: conformance::Models,
) -> Result<conformance::Tally> {
    conformance::run(&pick.options(object, models, false)?)
}

/// `conformance --staged`: the scenarios on cluster.yaml on one node,
/// each step that changes policy objects only staged first, then
/// promoted (`conformance::staged`), with what [`conformance_build`]
/// built.
fn conformance_staged_with(pick: &Pick, object: &Path) -> Result<conformance::Tally> {
    let opts = pick.options(object, conformance::Models::Own, true)?;
    let others = conformance::scenario::load_dir(&opts.scenarios)?
        .iter()
        .filter(|s| {
            pick.filter
                .as_ref()
                .is_none_or(|f| s.name.contains(f.as_str()))
        })
        .filter(|s| conformance::Models::Others.takes(s, Some("cluster.yaml")))
        .count();
    if others > 0 {
        println!(
            "xtask: conformance --staged: {others} scenarios on other models than cluster.yaml \
             left out (the staged run reads the agent's log and live maps on one node)"
        );
    }
    conformance::run(&opts)
}

/// The scenarios on a cluster brought up from `file`.
fn conformance_cluster(
    file: &Path,
    scenarios: Option<PathBuf>,
    filter: Option<String>,
    via: conformance::ViaSel,
    limit: Option<usize>,
    models: conformance::Models,
) -> Result<conformance::Tally> {
    let object = conformance_build()?;
    let shared = shared_conformance()?;
    conformance::cluster::run(&conformance::Options {
        scenarios: scenarios.unwrap_or_else(|| shared.join("scenarios-3node")),
        model: file.to_owned(),
        filter,
        topology: conformance::topology::Kind::Bridge,
        via,
        limit,
        agent: demo::target_dir().join("debug/netpol-agent"),
        object,
        models,
        staged: false,
    })
}

/// The test API server (netpol-testkit's `netpol-apiserver`), built.
fn apiserver_binary() -> Result<PathBuf> {
    println!("xtask: cargo build -p netpol-testkit --bin netpol-apiserver");
    run(cargo("stable").current_dir(root()).args([
        "build",
        "--locked",
        "-p",
        "netpol-testkit",
        "--bin",
        "netpol-apiserver",
        "--target-dir",
        "target",
    ]))?;
    Ok(root().join("target/debug/netpol-apiserver"))
}

fn netpol_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
