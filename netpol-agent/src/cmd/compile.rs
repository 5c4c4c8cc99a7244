//! `netpol-agent compile`: offline compile of manifests, printing what this
//! node's maps would hold. The JSON shape is documented in
//! `docs/COMPILE_JSON.md` and kept stable.
use std::fmt::Write as _;
use std::net::IpAddr;
use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use ipnet::IpNet;
use netpol_agent::compiler::{Compiled, Direction, EMPTY_RULESET, IdAllocation, RuleSet, compile};
use netpol_agent::model::folder::Folder;
use netpol_agent::model::{ModelError, Snapshot};
use serde::Serialize;

/// Output format.
#[expect(
    clippy::doc_markdown,
    reason = "clap prints these doc comments as --help text, backticks and all"
)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    #[default]
    Table,
    /// The stable JSON document of docs/COMPILE_JSON.md.
    Json,
}

/// Arguments of `netpol-agent compile`.
#[derive(Debug, clap::Args)]
pub struct CompileArgs {
    /// Folder of multi-document YAML/JSON manifests.
    #[arg(long)]
    pub manifests: PathBuf,
    /// Node whose maps to compile (default: the only Node in the manifests).
    #[arg(long)]
    pub node: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Version of the JSON document; bumped on any incompatible change.
const JSON_VERSION: u32 = 1;

#[derive(Serialize)]
struct Document {
    version: u32,
    node: Option<String>,
    node_addresses: Vec<IpAddr>,
    endpoints: Vec<EndpointDoc>,
    rulesets: Vec<RuleSetDoc>,
    errors: Vec<ErrorDoc>,
    notes: Vec<String>,
    summary: Summary,
}

#[derive(Serialize)]
struct EndpointDoc {
    pod: String,
    id: u32,
    flags: u32,
    ips: Vec<IpAddr>,
    ingress: DirectionDoc,
    egress: DirectionDoc,
}

#[derive(Serialize)]
struct DirectionDoc {
    isolated: bool,
    generation: u32,
    ipv4: Vec<EntryDoc>,
    ipv6: Vec<EntryDoc>,
}

#[derive(Serialize)]
struct EntryDoc {
    prefix: IpNet,
    ruleset: u32,
    rules: Vec<String>,
}

#[derive(Serialize)]
struct RuleSetDoc {
    id: u32,
    all: bool,
    ports: Vec<PortsDoc>,
    /// With `all`: what a `ClusterNetworkPolicy` Deny took out.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    except: Vec<PortsDoc>,
}

#[derive(Serialize)]
struct PortsDoc {
    protocol: &'static str,
    first: u16,
    last: u16,
}

#[derive(Serialize)]
struct ErrorDoc {
    kind: String,
    object: String,
    field: String,
    message: String,
    text: String,
}

#[derive(Serialize)]
struct Summary {
    endpoints: usize,
    policy_v4_entries: usize,
    policy_v6_entries: usize,
    port_entries: usize,
    rulesets: usize,
    frontend_v4_entries: usize,
    frontend_v6_entries: usize,
    bytes: usize,
}

fn ruleset_doc(id: u32, rs: &RuleSet) -> RuleSetDoc {
    let docs = |list: &[netpol_agent::compiler::PortRange]| -> Vec<PortsDoc> {
        list.iter()
            .map(|r| PortsDoc {
                protocol: r.protocol.as_str(),
                first: r.first,
                last: r.last,
            })
            .collect()
    };
    RuleSetDoc {
        id,
        all: rs.all,
        ports: docs(&rs.ranges),
        except: docs(&rs.except),
    }
}

fn document(c: &Compiled) -> Document {
    let entries = |id: u32, d: Direction, v6: bool| -> Vec<EntryDoc> {
        let map = if v6 { &c.policy_v6 } else { &c.policy_v4 };
        map.iter()
            .filter(|(t, _)| t.endpoint == id && t.direction == d)
            .map(|(t, e)| EntryDoc {
                prefix: t.prefix,
                ruleset: e.ruleset,
                rules: c.sources(e).map(ToString::to_string).collect(),
            })
            .collect()
    };
    let endpoints = c
        .endpoints
        .iter()
        .map(|(pod, e)| EndpointDoc {
            pod: pod.to_string(),
            id: e.id,
            flags: e.info().flags,
            ips: e.ips.clone(),
            ingress: DirectionDoc {
                isolated: e.ingress_isolated,
                generation: e.ingress_gen,
                ipv4: entries(e.id, Direction::Ingress, false),
                ipv6: entries(e.id, Direction::Ingress, true),
            },
            egress: DirectionDoc {
                isolated: e.egress_isolated,
                generation: e.egress_gen,
                ipv4: entries(e.id, Direction::Egress, false),
                ipv6: entries(e.id, Direction::Egress, true),
            },
        })
        .collect();
    let mut rulesets = vec![ruleset_doc(EMPTY_RULESET, &RuleSet::default())];
    rulesets.extend(c.rulesets.iter().map(|(&id, rs)| ruleset_doc(id, rs)));
    let sizes = c.sizes();
    Document {
        version: JSON_VERSION,
        node: c.node.clone(),
        node_addresses: c.node_addresses.clone(),
        endpoints,
        rulesets,
        errors: c.errors.iter().map(error_doc).collect(),
        notes: c.notes.clone(),
        summary: Summary {
            endpoints: sizes.entries.endpoints,
            policy_v4_entries: sizes.entries.policy_v4,
            policy_v6_entries: sizes.entries.policy_v6,
            port_entries: sizes.entries.ports,
            rulesets: c.rulesets.len(),
            frontend_v4_entries: sizes.entries.frontends_v4,
            frontend_v6_entries: sizes.entries.frontends_v6,
            bytes: sizes.bytes,
        },
    }
}

fn error_doc(e: &ModelError) -> ErrorDoc {
    ErrorDoc {
        kind: e.kind.clone(),
        object: e.object.clone(),
        field: e.field.clone(),
        message: e.message.clone(),
        text: e.to_string(),
    }
}

fn ports_text(rs: &RuleSetDoc) -> String {
    let list = |ports: &[PortsDoc]| {
        ports
            .iter()
            .map(|p| match (p.first, p.last) {
                (0, u16::MAX) => format!("{} all", p.protocol),
                (a, b) if a == b => format!("{} {a}", p.protocol),
                (a, b) => format!("{} {a}-{b}", p.protocol),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if rs.all && rs.except.is_empty() {
        return "all protocols and ports".to_owned();
    }
    if rs.all {
        return format!("all protocols and ports except {}", list(&rs.except));
    }
    if rs.ports.is_empty() {
        return "nothing".to_owned();
    }
    list(&rs.ports)
}

fn table(doc: &Document) -> String {
    let mut s = String::new();
    let addrs: Vec<String> = doc.node_addresses.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        s,
        "node: {} ({})",
        doc.node.as_deref().unwrap_or("-"),
        addrs.join(", ")
    );
    let _ = writeln!(
        s,
        "\n{:<32} {:>6}  {:<9} {:<9} IPS",
        "POD", "ID", "INGRESS", "EGRESS"
    );
    let iso = |b: bool| if b { "isolated" } else { "open" };
    for e in &doc.endpoints {
        let ips: Vec<String> = e.ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            s,
            "{:<32} {:>6}  {:<9} {:<9} {}",
            e.pod,
            e.id,
            iso(e.ingress.isolated),
            iso(e.egress.isolated),
            ips.join(",")
        );
    }
    let _ = writeln!(
        s,
        "\n{:<32} {:<8} {:<44} {:>7}  RULES",
        "POD", "DIR", "PEER", "RULESET"
    );
    for e in &doc.endpoints {
        for (dir, d) in [("ingress", &e.ingress), ("egress", &e.egress)] {
            for entry in d.ipv4.iter().chain(&d.ipv6) {
                let _ = writeln!(
                    s,
                    "{:<32} {:<8} {:<44} {:>7}  {}",
                    e.pod,
                    dir,
                    entry.prefix.to_string(),
                    entry.ruleset,
                    entry.rules.join("; ")
                );
            }
        }
    }
    let _ = writeln!(s, "\n{:>7}  PORTS", "RULESET");
    for rs in &doc.rulesets {
        let _ = writeln!(s, "{:>7}  {}", rs.id, ports_text(rs));
    }
    let m = &doc.summary;
    let _ = writeln!(
        s,
        "\n{} endpoints, {} IPv4 + {} IPv6 policy entries, {} port entries ({} rule sets), \
         {} IPv4 + {} IPv6 Service frontends, {} bytes",
        m.endpoints,
        m.policy_v4_entries,
        m.policy_v6_entries,
        m.port_entries,
        m.rulesets,
        m.frontend_v4_entries,
        m.frontend_v6_entries,
        m.bytes
    );
    for n in &doc.notes {
        let _ = writeln!(s, "note: {n}");
    }
    if !doc.errors.is_empty() {
        let _ = writeln!(s, "\n{} invalid object(s):", doc.errors.len());
        for e in &doc.errors {
            let _ = writeln!(s, "  {}", e.text);
        }
    }
    s
}

/// Runs the offline compile.
///
/// # Errors
/// When the manifests folder cannot be read.
pub fn run(args: &CompileArgs) -> anyhow::Result<ExitCode> {
    // The same reading as `run --manifests`: they agree.
    let report = Folder::load(&args.manifests)
        .with_context(|| format!("reading manifests from {}", args.manifests.display()))?;
    let snap = Snapshot {
        local_node: args.node.clone(),
        ..report.snapshot.clone()
    };
    let mut compiled = compile(&snap, &IdAllocation::default());
    // The folder's problems are the model's errors, each naming its file,
    // plus the files, documents and duplicates it could not take.
    compiled.errors.clone_from(&report.problems);
    compiled.notes.extend(report.notes.iter().cloned());
    if let Some(n) = &args.node
        && !snap.nodes.contains_key(n)
    {
        compiled
            .notes
            .push(format!("node {n} has no Node object in the manifests"));
    }
    let doc = document(&compiled);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Output::Table => print!("{}", table(&doc)),
    }
    // Non-zero only when nothing could be compiled: no node to compile for,
    // or no valid object at all.
    let nothing = compiled.node.is_none() || (report.valid == 0 && !compiled.errors.is_empty());
    Ok(if nothing {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
