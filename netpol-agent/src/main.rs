//! `netpol-agent`: a thin shell over the `netpol_agent` library.
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use netpol_agent::{AttachMode, Counters, Datapath, DatapathConfig, datapath};
use netpol_common::reason;

mod cmd;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    /// Print the packet counters from the pinned maps.
    Stats,
    /// Compile manifests offline and print what this node's maps would hold.
    Compile(cmd::compile::CompileArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Auto,
    Netlink,
    Tcx,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("netpol-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Attach {
            interface,
            object,
            attach_mode,
        } => {
            anyhow::ensure!(!interface.is_empty(), "give at least one --interface");
            let config = DatapathConfig {
                bpffs: cli.bpffs,
                object,
                attach_mode: match attach_mode {
                    Mode::Auto => AttachMode::Auto,
                    Mode::Netlink => AttachMode::Netlink,
                    Mode::Tcx => AttachMode::Tcx,
                },
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
        Command::Stats => {
            let pin_dir = cli.bpffs.join(datapath::PIN_SUBDIR);
            let counters = Counters::read_pinned(&pin_dir)
                .with_context(|| format!("reading counters pinned in {}", pin_dir.display()))?;
            print_counters(&counters);
            Ok(ExitCode::SUCCESS)
        }
        Command::Compile(args) => cmd::compile::run(&args),
    }
}

fn wait_for_shutdown() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })
    .context("waiting for a signal")
}

fn print_counters(c: &Counters) {
    println!(
        "{:<8} {:<6} {:<22} {:>12} {:>14}",
        "DIR", "FAMILY", "REASON", "PACKETS", "BYTES"
    );
    for e in &c.entries {
        println!(
            "{:<8} {:<6} {:<22} {:>12} {:>14}",
            datapath::direction_name(e.direction),
            datapath::family_name(e.family),
            reason::name(e.reason),
            e.value.packets,
            e.value.bytes
        );
    }
}
