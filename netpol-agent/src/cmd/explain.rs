//! `netpol-agent explain SRC DST PROTO/PORT`: the verdict this node's
//! kernel gives a connection and why (`netpol_agent::inspect::explain`).
//!
//! Exit code: 0 allowed, 1 denied, 2 depends on the Service backend or
//! could not be answered. `--batch FILE` answers one query per line,
//! reading the maps once (the conformance harness and the demo use it).
use std::{
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use netpol_agent::inspect::explain::{Explainer, Explanation, Query, parse_family};
use serde::Serialize;

use super::inspect::{Common, Format, open};

/// Arguments of `netpol-agent explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The client: a pod (namespace/name) or an address.
    #[arg(required_unless_present = "batch")]
    pub src: Option<String>,
    /// The server: a pod (namespace/name) or an address (a Service
    /// frontend is reported as such).
    #[arg(required_unless_present = "batch")]
    pub dst: Option<String>,
    /// Protocol and destination port: tcp/80, udp/53, sctp/5000, icmp.
    #[arg(value_name = "PROTO/PORT", required_unless_present = "batch")]
    pub port: Option<String>,
    /// Which address of a pod to use: 4 or 6 (default: the given
    /// address's family, else IPv4 when both pods have one).
    #[arg(long, value_parser = parse_family)]
    pub family: Option<u8>,
    /// Through one of the server's Services: for a pod reaching itself,
    /// the hairpin kube-proxy sends back to it (judged when a
    /// `ClusterNetworkPolicy` applies to the pod).
    #[arg(long)]
    pub via_service: bool,
    /// The staged view's verdict: policies annotated `netpol.io/staged`
    /// in force, those annotated `netpol.io/staged-delete` gone, from the
    /// staged entries in the live maps.
    #[arg(long)]
    pub staged: bool,
    /// Answer one query per line of FILE (`-`: standard input), each
    /// `SRC DST PROTO/PORT [4|6] [via-service] [staged]`; one answer per line with `-o json`
    /// (JSON lines, each with its `query`). The exit code is 0 once every
    /// line is answered (or reported as an error).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["src", "dst", "port", "family"])]
    pub batch: Option<PathBuf>,
    #[command(flatten)]
    pub common: Common,
}

/// One JSON answer: the query as given, then the explanation or the error.
#[derive(Serialize)]
struct Answer<'a> {
    query: &'a str,
    #[serde(flatten)]
    explanation: Option<&'a Explanation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Runs `explain`; errors are printed and give exit code 2.
pub fn run(bpffs: &Path, args: &ExplainArgs) -> ExitCode {
    match explain(bpffs, args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("netpol-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn explain(bpffs: &Path, args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let (maps, state) = open(bpffs, &args.common.state_dir)?;
    let explainer = Explainer::new(&maps, state.as_ref())?;
    let json = args.common.output == Format::Json;
    if let Some(file) = &args.batch {
        let reader: Box<dyn std::io::BufRead> = if file == Path::new("-") {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
            ))
        };
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        for line in reader.lines() {
            let line = line.context("reading the queries")?;
            let query = line.trim();
            if query.is_empty() || query.starts_with('#') {
                continue;
            }
            let answer = query
                .parse::<Query>()
                .and_then(|q| explainer.explain(&q).map_err(|e| e.to_string()));
            if json {
                let a = Answer {
                    query,
                    explanation: answer.as_ref().ok(),
                    error: answer.as_ref().err().cloned(),
                };
                writeln!(out, "{}", serde_json::to_string(&a)?)?;
            } else {
                match &answer {
                    Ok(e) => write!(out, "{e}")?,
                    Err(e) => writeln!(out, "{query}: error: {e}")?,
                }
            }
        }
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let (Some(src), Some(dst), Some(port)) = (&args.src, &args.dst, &args.port) else {
        anyhow::bail!("give SRC DST PROTO/PORT, or --batch FILE");
    };
    let text = format!("{src} {dst} {port}");
    let mut q: Query = text.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    q.family = args.family;
    q.via_service = args.via_service;
    q.staged = args.staged;
    let e = explainer.explain(&q)?;
    if json {
        let a = Answer {
            query: &text,
            explanation: Some(&e),
            error: None,
        };
        println!("{}", serde_json::to_string_pretty(&a)?);
    } else {
        print!("{e}");
    }
    Ok(ExitCode::from(e.exit_code()))
}
