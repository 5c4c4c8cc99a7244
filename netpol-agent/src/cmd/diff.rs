//! `netpol-agent diff --manifests DIR | -f FILE`: the pod pairs and ports
//! whose verdict on this node would change if the manifests were applied,
//! and the tracked connections that would be cut
//! (`netpol_agent::inspect::diff`).
//!
//! Exit code (as `kubectl diff`): 0 nothing would change, 1 something
//! would, 2 the question could not be answered.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use netpol_agent::{
    compiler::Direction,
    inspect::{
        Maps as _,
        diff::{self, Change, Cut, Pairs},
        explain::Explainer,
        programs_now_ns,
    },
    model::{
        Snapshot,
        folder::{Folder, manifest_files},
        manifests::{LoadReport, apply_str},
    },
    sources::kube::{KubeConnection, KubeSource},
};
use serde::Serialize;

use super::inspect::{Common, Format, columns, open};

/// How long the kube source may take to list the cluster.
const LIST_TIMEOUT: Duration = Duration::from_mins(1);

/// Arguments of `netpol-agent diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// Folder of manifests to apply (as `kubectl apply -f DIR` would).
    #[arg(long, value_name = "DIR", required_unless_present = "file")]
    pub manifests: Option<PathBuf>,
    /// One manifest file to apply.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        conflicts_with = "manifests"
    )]
    pub file: Option<PathBuf>,
    /// The cluster now, from the folder of manifests the agent runs on
    /// (`run --manifests`) instead of the Kubernetes API.
    #[arg(long, value_name = "DIR")]
    pub cluster: Option<PathBuf>,
    /// This node's name (default: the state file's).
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Serialize)]
struct Document<'a> {
    node: &'a str,
    changes: &'a [Change],
    cut: &'a [Cut],
}

/// Runs `diff`; errors are printed and give exit code 2.
pub fn run(bpffs: &Path, args: &DiffArgs) -> ExitCode {
    match diff(bpffs, args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("netpol-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The objects of the manifests to apply.
fn changes(args: &DiffArgs) -> anyhow::Result<Snapshot> {
    let files = match (&args.manifests, &args.file) {
        (Some(dir), _) => {
            manifest_files(dir).with_context(|| format!("reading {}", dir.display()))?
        }
        (None, Some(f)) => vec![f.clone()],
        (None, None) => anyhow::bail!("give --manifests DIR or -f FILE"),
    };
    let mut snap = Snapshot::default();
    let mut report = LoadReport::default();
    for f in &files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        apply_str(&mut snap, &text, &f.display().to_string(), &mut report);
    }
    if let Some(e) = report.errors.first() {
        anyhow::bail!("{e}");
    }
    Ok(snap)
}

/// The cluster now: the folder, or one list of the Kubernetes API through
/// the agent's own source.
fn cluster(args: &DiffArgs, node: &str) -> anyhow::Result<Snapshot> {
    if let Some(dir) = &args.cluster {
        return Ok(Folder::load(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .snapshot);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let client = KubeConnection::Infer
            .client()
            .await
            .context("connecting to the Kubernetes API")?;
        let (tx, mut rx) = tokio::sync::watch::channel(None);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(KubeSource::new(client, node).run(tx, stop_rx));
        let listed = tokio::time::timeout(LIST_TIMEOUT, async {
            loop {
                if let Some(input) = rx.borrow_and_update().clone() {
                    return Some(input);
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        let _ = stop_tx.send(true);
        task.abort();
        match listed {
            Ok(Some(input)) => Ok(input.snapshot.clone()),
            Ok(None) => anyhow::bail!("the kube source stopped before listing the cluster"),
            Err(_) => anyhow::bail!(
                "the Kubernetes API did not list the cluster within {}s",
                LIST_TIMEOUT.as_secs()
            ),
        }
    })
}

fn diff(bpffs: &Path, args: &DiffArgs) -> anyhow::Result<ExitCode> {
    let (maps, state) = open(bpffs, &args.common.state_dir)?;
    let state = state.context(
        "diff needs the agent's state file (the pods bound on this node and their interfaces)",
    )?;
    let node = args
        .node
        .clone()
        .or_else(|| state.node.clone())
        .context("no --node and no node in the state file")?;
    let changes = changes(args)?;
    let now = cluster(args, &node)?;
    let after = diff::apply(&now, &changes)?;
    let config = maps.config()?;
    let predicted = diff::predict(&after, &node, &state, config);
    let pairs = Pairs::of(&now, &after, &node);
    let live = Explainer::new(&maps, Some(&state))?;
    let future = Explainer::new(&predicted.maps, Some(&predicted.state))?;
    let found = diff::changes(&live, &future, &pairs)?;
    let cut = diff::cuts(
        &live,
        &future,
        &state,
        &maps.connections()?,
        &config,
        programs_now_ns(&config),
        &pairs,
    )?;
    if args.common.output == Format::Json {
        let doc = Document {
            node: &node,
            changes: &found,
            cut: &cut,
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", table(&node, &found, &cut));
    }
    Ok(if found.is_empty() && cut.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn table(node: &str, changes: &[Change], cut: &[Cut]) -> String {
    let mut s = String::new();
    if changes.is_empty() {
        let _ = writeln!(s, "no verdict on {node} would change");
    } else {
        let _ = writeln!(s, "verdicts on {node} that would change:");
        let mut rows = vec![[
            "SRC".to_owned(),
            "DST".to_owned(),
            "PORTS".to_owned(),
            "NOW".to_owned(),
            "AFTER".to_owned(),
            "WHY".to_owned(),
        ]];
        for c in changes {
            let ports = if c.first == c.last {
                format!("{} {}", c.protocol, c.first)
            } else {
                format!("{} {}-{}", c.protocol, c.first, c.last)
            };
            rows.push([
                format!("{} ({})", c.src_pod, c.src),
                format!("{} ({})", c.dst_pod, c.dst),
                ports,
                c.now.to_string(),
                c.after.to_string(),
                c.why.join("; "),
            ]);
        }
        s.push_str(&columns(&rows));
    }
    if cut.is_empty() {
        let _ = writeln!(s, "no tracked connection would be cut");
    } else {
        let _ = writeln!(s, "tracked connections that would be cut:");
        let mut rows = vec![[
            "POD".to_owned(),
            "CONNECTION".to_owned(),
            "OPENED".to_owned(),
            "WHY".to_owned(),
        ]];
        for c in cut {
            let peer = c
                .peer_pod
                .as_ref()
                .map_or_else(String::new, |p| format!(" ({p})"));
            rows.push([
                c.pod.clone(),
                format!(
                    "{} {} <-> {}{peer}",
                    c.protocol,
                    SocketAddr::new(c.local_address, c.local_port),
                    SocketAddr::new(c.peer_address, c.peer_port),
                ),
                if c.origin == Direction::Egress {
                    "by the pod"
                } else {
                    "by the peer"
                }
                .to_owned(),
                c.why.clone(),
            ]);
        }
        s.push_str(&columns(&rows));
    }
    s
}
