//! `netpol-agent inspect`: the live pinned maps decoded, joined with the
//! state file for names (`netpol_agent::inspect`, `provenance`). Works
//! while the agent runs and after it died. Output shapes are in
//! docs/OPERATIONS.md.
mod conntrack;
mod counters;
mod endpoints;
mod policy;
mod staged;

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use netpol_agent::{
    Counters, datapath,
    inspect::LiveMaps,
    provenance::{self, State},
};
use serde::Serialize;

use conntrack::{conntrack, conntrack_table};
use counters::counters_doc;
pub use counters::counters_table;
use endpoints::{endpoints, endpoints_table};
use policy::{policy, policy_table};
use staged::staged_table;

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable tables.
    #[default]
    Table,
    /// JSON (one document; `explain --batch`: one per line).
    Json,
}

/// Flags every inspect and explain command takes (with the global
/// `--bpffs`).
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Folder of the state file the agent writes (`run --state-dir`): the
    /// names of pods and policy rules.
    #[arg(long, env = "NETPOL_STATE_DIR", default_value = provenance::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    pub output: Format,
}

/// Arguments of `netpol-agent inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(subcommand)]
    pub what: What,
}

/// What to inspect.
#[expect(
    clippy::doc_markdown,
    reason = "clap prints these doc comments as --help text, backticks and all"
)]
#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Every endpoint-map entry: pod, endpoint id, host interface,
    /// addresses, isolation per direction, programmed or not, mark slot.
    Endpoints(Common),
    /// A pod's live policy-trie entries, decoded (peer prefix -> rule set
    /// -> protocols and ports from the port trie), each with the
    /// NetworkPolicy rules that produced it.
    Policy(PolicyArgs),
    /// Tracked connections (the conntrack map), decoded and named.
    Conntrack(ConntrackArgs),
    /// Packet counters per direction, family and reason (as `stats`).
    Counters(Common),
    /// What the staged view (policies annotated netpol.io/staged or
    /// netpol.io/staged-delete) would change on this node: per pod pair,
    /// direction, port and family, the new connections it would deny or
    /// allow, how many, when last, and what decides them there. Summed up
    /// by the running agent in the state folder (staged.json).
    Staged(Common),
}

/// Arguments of `inspect policy`.
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    /// The pod: namespace/name (an address or an endpoint id work too).
    pub pod: String,
    /// Only its ingress entries.
    #[arg(long, conflicts_with = "egress")]
    pub ingress: bool,
    /// Only its egress entries.
    #[arg(long)]
    pub egress: bool,
    /// Only IPv4 (4) or IPv6 (6) entries.
    #[arg(long, value_parser = parse_family)]
    pub family: Option<u8>,
    #[command(flatten)]
    pub common: Common,
}

/// Arguments of `inspect conntrack`.
#[derive(Debug, clap::Args)]
pub struct ConntrackArgs {
    /// Only the connections of this pod (namespace/name).
    #[arg(long)]
    pub pod: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

fn parse_family(s: &str) -> Result<u8, String> {
    netpol_agent::inspect::explain::parse_family(s)
}

/// The pin folder and the state file (a warning on stderr when it cannot
/// be used).
pub fn open(bpffs: &Path, state_dir: &Path) -> anyhow::Result<(LiveMaps, Option<State>)> {
    let pin_dir = bpffs.join(datapath::PIN_SUBDIR);
    let maps = LiveMaps::open(&pin_dir)?;
    let state = match State::read(state_dir) {
        Ok(Some(s)) => {
            if s.pin_dir != pin_dir {
                eprintln!(
                    "netpol-agent: warning: the state file in {} describes the maps pinned in {}, \
                     not {}: names may be wrong",
                    state_dir.display(),
                    s.pin_dir.display(),
                    pin_dir.display()
                );
            }
            Some(s)
        }
        Ok(None) => {
            eprintln!(
                "netpol-agent: warning: no state file in {} (--state-dir): pods and rules are \
                 not named",
                state_dir.display()
            );
            None
        }
        Err(e) => {
            eprintln!("netpol-agent: warning: {e}: pods and rules are not named");
            None
        }
    };
    Ok((maps, state))
}

/// Runs `inspect`.
///
/// # Errors
/// When the pinned maps cannot be read, or the pod is unknown.
pub fn run(bpffs: &Path, args: &InspectArgs) -> anyhow::Result<ExitCode> {
    match &args.what {
        What::Endpoints(c) => {
            let (maps, state) = open(bpffs, &c.state_dir)?;
            let doc = endpoints(&maps, state.as_ref())?;
            emit(c.output, &doc, endpoints_table)?;
        }
        What::Policy(a) => {
            let (maps, state) = open(bpffs, &a.common.state_dir)?;
            let doc = policy(&maps, state.as_ref(), a)?;
            emit(a.common.output, &doc, policy_table)?;
        }
        What::Conntrack(a) => {
            let (maps, state) = open(bpffs, &a.common.state_dir)?;
            let doc = conntrack(&maps, state.as_ref(), a.pod.as_deref())?;
            emit(a.common.output, &doc, conntrack_table)?;
        }
        What::Staged(c) => {
            let doc = netpol_agent::staged::read(&c.state_dir)
                .with_context(|| format!("reading {}", c.state_dir.display()))?
                .unwrap_or_default();
            emit(c.output, &doc, staged_table)?;
        }
        What::Counters(c) => {
            let pin_dir = bpffs.join(datapath::PIN_SUBDIR);
            let counters = Counters::read_pinned(&pin_dir)
                .with_context(|| format!("reading counters pinned in {}", pin_dir.display()))?;
            match c.output {
                Format::Table => print!("{}", counters_table(&counters)),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&counters_doc(&counters))?
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn emit<T: Serialize>(format: Format, doc: &T, table: fn(&T) -> String) -> anyhow::Result<()> {
    match format {
        Format::Table => print!("{}", table(doc)),
        Format::Json => println!("{}", serde_json::to_string_pretty(doc)?),
    }
    Ok(())
}

/// What the state file says about itself, in every document.
#[derive(Serialize)]
struct StateRef {
    generation: u64,
    fingerprint: Option<String>,
    written_unix_secs: u64,
    node: Option<String>,
}

fn state_ref(s: Option<&State>) -> Option<StateRef> {
    s.map(|s| StateRef {
        generation: s.generation,
        fingerprint: s.fingerprint.clone(),
        written_unix_secs: s.written_unix_secs,
        node: s.node.clone(),
    })
}

fn join(a: &[IpAddr]) -> String {
    if a.is_empty() {
        return "-".to_owned();
    }
    a.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Rows as left-aligned columns, two spaces apart.
pub(crate) fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, (w, c)) in widths.iter().zip(r).enumerate() {
            if i + 1 == N {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ");
            }
        }
        let _ = writeln!(s, "{}", line.trim_end());
    }
    s
}

#[cfg(test)]
mod tests {
    use netpol_common::reason;

    use super::*;

    #[test]
    fn columns_align_and_trim() {
        let t = columns(&[
            ["A".to_owned(), "BB".to_owned(), "C".to_owned()],
            ["long".to_owned(), "x".to_owned(), String::new()],
        ]);
        assert_eq!(t, "A     BB  C\nlong  x\n");
    }

    #[test]
    fn counters_table_has_one_line_per_slot() {
        let c = Counters {
            entries: vec![datapath::CounterEntry {
                direction: netpol_common::direction::INGRESS,
                family: netpol_common::family::IPV4,
                reason: reason::DROP_POLICY,
                value: netpol_common::TrafficCounter {
                    packets: 3,
                    bytes: 180,
                },
            }],
        };
        let t = counters_table(&c);
        assert_eq!(t.lines().count(), 2);
        assert!(t.contains("ingress  ipv4   drop_policy"), "{t}");
    }
}
