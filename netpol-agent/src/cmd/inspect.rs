//! `netpol-agent inspect`: the live pinned maps decoded, joined with the
//! state file for names (`netpol_agent::inspect`, `provenance`). Works
//! while the agent runs and after it died. Output shapes are in
//! docs/OPERATIONS.md.
use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use netpol_agent::{
    Counters,
    compiler::Direction,
    datapath,
    inspect::{
        Connection, LiveEndpoint, LiveEntry, LiveMaps, Maps as _, ports_text, programs_now_ns,
        protocol_name, rulesets, tcp_state_name,
    },
    provenance::{self, State},
    sync::UNBOUND_ID_BASE,
};
use netpol_common::reason;
use serde::Serialize;

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

// ---------------------------------------------------------------------
// endpoints
// ---------------------------------------------------------------------

#[derive(Serialize)]
struct EndpointsDoc {
    state: Option<StateRef>,
    endpoints: Vec<EndpointRow>,
}

#[derive(Serialize)]
struct DirectionRow {
    isolated: bool,
    generation: u32,
    policies: Vec<String>,
}

#[derive(Serialize)]
struct EndpointRow {
    /// `namespace/name`; `None` for an interface with no pod yet.
    pod: Option<String>,
    id: u32,
    /// `None`: a pod of the state file with no endpoint entry (unbound).
    ifindex: Option<u32>,
    interface: Option<String>,
    addresses: Vec<IpAddr>,
    ingress: DirectionRow,
    egress: DirectionRow,
    programmed: bool,
    /// Has an entry in `NETPOL_ENDPOINTS`.
    in_map: bool,
    slot: u32,
    flags: Vec<&'static str>,
}

fn endpoints(maps: &LiveMaps, state: Option<&State>) -> anyhow::Result<EndpointsDoc> {
    let live = maps.endpoints()?;
    let mut rows: Vec<EndpointRow> = live
        .iter()
        .map(|e| {
            let st = state.and_then(|s| s.endpoint_by_id(e.info.id));
            let dir = |d: Direction| DirectionRow {
                isolated: e.isolated(d),
                generation: match d {
                    Direction::Ingress => e.info.ingress_gen,
                    Direction::Egress => e.info.egress_gen,
                },
                policies: st
                    .map(|s| s.direction(d).policies.clone())
                    .unwrap_or_default(),
            };
            EndpointRow {
                pod: st.map(|s| s.pod.clone()),
                id: e.info.id,
                ifindex: Some(e.ifindex),
                interface: st
                    .filter(|s| s.ifindex == Some(e.ifindex))
                    .and_then(|s| s.interface.clone())
                    .or_else(|| interface_name(e.ifindex)),
                addresses: e.addresses(),
                ingress: dir(Direction::Ingress),
                egress: dir(Direction::Egress),
                programmed: e.programmed(),
                in_map: true,
                slot: e.info.slot,
                flags: e.flag_names(),
            }
        })
        .collect();
    if let Some(s) = state {
        for ep in &s.endpoints {
            if live.iter().any(|e| e.info.id == ep.id) {
                continue;
            }
            let dir = |d: &provenance::DirectionState| DirectionRow {
                isolated: d.isolated,
                generation: d.generation,
                policies: d.policies.clone(),
            };
            rows.push(EndpointRow {
                pod: Some(ep.pod.clone()),
                id: ep.id,
                ifindex: None,
                interface: None,
                addresses: ep.addresses.clone(),
                ingress: dir(&ep.ingress),
                egress: dir(&ep.egress),
                programmed: false,
                in_map: false,
                slot: 0,
                flags: Vec::new(),
            });
        }
    }
    rows.sort_by(|a, b| (a.pod.is_none(), &a.pod, a.id).cmp(&(b.pod.is_none(), &b.pod, b.id)));
    Ok(EndpointsDoc {
        state: state_ref(state),
        endpoints: rows,
    })
}

/// The interface's name in this process's network namespace (right when
/// run in the node's).
fn interface_name(ifindex: u32) -> Option<String> {
    nix::net::if_::if_indextoname(ifindex)
        .ok()
        .map(|n| n.to_string_lossy().into_owned())
}

fn isolation(d: &DirectionRow) -> String {
    match (d.isolated, d.policies.is_empty()) {
        (false, _) => "open".to_owned(),
        (true, true) => "isolated".to_owned(),
        (true, false) => format!("isolated ({})", d.policies.join(", ")),
    }
}

fn endpoints_table(doc: &EndpointsDoc) -> String {
    let mut rows = vec![[
        "POD".to_owned(),
        "ID".to_owned(),
        "IFINDEX".to_owned(),
        "INTERFACE".to_owned(),
        "ADDRESSES".to_owned(),
        "INGRESS".to_owned(),
        "EGRESS".to_owned(),
        "PROGRAMMED".to_owned(),
        "SLOT".to_owned(),
    ]];
    for e in &doc.endpoints {
        let id = if e.id & UNBOUND_ID_BASE != 0 {
            format!("unbound:{}", e.id & !UNBOUND_ID_BASE)
        } else {
            e.id.to_string()
        };
        rows.push([
            e.pod.clone().unwrap_or_else(|| "-".to_owned()),
            id,
            e.ifindex.map_or_else(|| "-".to_owned(), |i| i.to_string()),
            e.interface.clone().unwrap_or_else(|| "-".to_owned()),
            join(&e.addresses),
            isolation(&e.ingress),
            isolation(&e.egress),
            match (e.in_map, e.programmed) {
                (false, _) => "no entry (unbound)".to_owned(),
                (true, true) => "yes".to_owned(),
                (true, false) => "no".to_owned(),
            },
            if e.slot == 0 {
                "-".to_owned()
            } else {
                e.slot.to_string()
            },
        ]);
    }
    let mut s = columns(&rows);
    if let Some(st) = &doc.state {
        let _ = writeln!(
            s,
            "\nnames from the state file of generation {} (fingerprint {})",
            st.generation,
            st.fingerprint.as_deref().unwrap_or("-")
        );
    }
    s
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
fn columns<const N: usize>(rows: &[[String; N]]) -> String {
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

// ---------------------------------------------------------------------
// policy
// ---------------------------------------------------------------------

#[derive(Serialize)]
struct PolicyDoc {
    state: Option<StateRef>,
    pod: Option<String>,
    endpoint: u32,
    ifindex: u32,
    interface: Option<String>,
    directions: Vec<PolicyDirection>,
}

#[derive(Serialize)]
struct PolicyDirection {
    direction: Direction,
    isolated: bool,
    policies: Vec<String>,
    entries: Vec<PolicyRow>,
}

#[derive(Serialize)]
struct PolicyRow {
    family: u8,
    /// The key's selector (`endpoint << 1 | direction`).
    selector: u32,
    /// The key's LPM prefix length (32 + the peer prefix's).
    prefix_len: u32,
    prefix: ipnet::IpNet,
    /// Pod of the prefix when it is one address of a known pod.
    peer_pod: Option<String>,
    ruleset: u32,
    ports: Vec<netpol_agent::inspect::PortRun>,
    ports_text: String,
    rules: Vec<String>,
    /// The state file has no such entry (older or newer than the maps).
    stale: bool,
}

/// The live endpoint of `pod`: `namespace/name` (state file), an address,
/// or an endpoint id.
fn find_endpoint(
    live: &[LiveEndpoint],
    state: Option<&State>,
    pod: &str,
) -> anyhow::Result<LiveEndpoint> {
    if let Ok(ip) = pod.parse::<IpAddr>() {
        return live
            .iter()
            .find(|e| e.addresses().contains(&ip))
            .copied()
            .with_context(|| format!("no endpoint entry has the address {ip}"));
    }
    if let Ok(id) = pod.parse::<u32>() {
        return live
            .iter()
            .find(|e| e.info.id == id)
            .copied()
            .with_context(|| format!("no endpoint entry has the id {id}"));
    }
    let s = state.with_context(|| {
        format!("no state file to find {pod} in: give its address or endpoint id")
    })?;
    let ep = s
        .endpoint(pod)
        .with_context(|| format!("{pod} is not a pod of this node in the state file"))?;
    live.iter()
        .find(|e| e.info.id == ep.id)
        .copied()
        .with_context(|| {
            format!(
                "{pod} (endpoint {}) has no entry in the endpoint map: its interface is not bound",
                ep.id
            )
        })
}

fn policy(maps: &LiveMaps, state: Option<&State>, a: &PolicyArgs) -> anyhow::Result<PolicyDoc> {
    let live = maps.endpoints()?;
    let ep = find_endpoint(&live, state, &a.pod)?;
    let st = state.and_then(|s| s.endpoint_by_id(ep.info.id));
    let ports = rulesets(&maps.port_blocks()?);
    let mut entries: Vec<(u8, LiveEntry)> = Vec::new();
    for (fam, v6) in [(4u8, false), (6, true)] {
        if a.family.is_none_or(|f| f == fam) {
            entries.extend(
                maps.policy_entries(v6)?
                    .into_iter()
                    .filter(|e| e.endpoint == ep.info.id)
                    .map(|e| (fam, e)),
            );
        }
    }
    let dirs: Vec<Direction> = match (a.ingress, a.egress) {
        (true, _) => vec![Direction::Ingress],
        (_, true) => vec![Direction::Egress],
        _ => vec![Direction::Ingress, Direction::Egress],
    };
    let directions = dirs
        .into_iter()
        .map(|d| PolicyDirection {
            direction: d,
            isolated: ep.isolated(d),
            policies: st
                .map(|s| s.direction(d).policies.clone())
                .unwrap_or_default(),
            entries: entries
                .iter()
                .filter(|(_, e)| e.direction == d)
                .map(|&(family, e)| {
                    let recorded = state
                        .and_then(|s| s.entry(e.endpoint, d, e.prefix))
                        .filter(|r| r.ruleset == e.ruleset);
                    let runs = ports.get(&e.ruleset).cloned().unwrap_or_default();
                    let single = e.prefix.prefix_len() == e.prefix.max_prefix_len();
                    PolicyRow {
                        family,
                        selector: e.selector,
                        prefix_len: e.prefix_len,
                        prefix: e.prefix,
                        peer_pod: state
                            .filter(|_| single)
                            .and_then(|s| s.pod_by_address(e.prefix.addr()))
                            .map(str::to_owned),
                        ruleset: e.ruleset,
                        ports_text: ports_text(&runs),
                        ports: runs,
                        rules: recorded
                            .map(|r| r.rules.iter().map(ToString::to_string).collect())
                            .unwrap_or_default(),
                        stale: state.is_some() && recorded.is_none(),
                    }
                })
                .collect(),
        })
        .collect();
    Ok(PolicyDoc {
        state: state_ref(state),
        pod: st.map(|s| s.pod.clone()),
        endpoint: ep.info.id,
        ifindex: ep.ifindex,
        interface: st
            .and_then(|s| s.interface.clone())
            .or_else(|| interface_name(ep.ifindex)),
        directions,
    })
}

fn policy_table(doc: &PolicyDoc) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: endpoint {} on {} (ifindex {})",
        doc.pod.as_deref().unwrap_or("(unnamed pod)"),
        doc.endpoint,
        doc.interface.as_deref().unwrap_or("?"),
        doc.ifindex
    );
    for d in &doc.directions {
        let field = d.direction.field();
        if !d.isolated {
            let _ = writeln!(
                s,
                "\n{field}: not isolated (no policy selects the pod): every peer and port"
            );
            continue;
        }
        let _ = writeln!(
            s,
            "\n{field}: isolated by {}",
            if d.policies.is_empty() {
                "policies the state file does not name".to_owned()
            } else {
                d.policies.join(", ")
            }
        );
        if d.entries.is_empty() {
            let _ = writeln!(s, "  no entry: every peer is denied");
            continue;
        }
        let mut rows = vec![[
            "  PEER".to_owned(),
            "RULESET".to_owned(),
            "PORTS".to_owned(),
            "RULES".to_owned(),
        ]];
        for e in &d.entries {
            let peer = match &e.peer_pod {
                Some(p) => format!("  {} ({p})", e.prefix),
                None => format!("  {}", e.prefix),
            };
            let rules = if e.rules.is_empty() {
                if e.stale {
                    "? (not in the state file)"
                } else {
                    "-"
                }
                .to_owned()
            } else if e.ruleset == netpol_agent::compiler::EMPTY_RULESET {
                format!("except of {}", e.rules.join("; "))
            } else {
                e.rules.join("; ")
            };
            rows.push([peer, e.ruleset.to_string(), e.ports_text.clone(), rules]);
        }
        s.push_str(&columns(&rows));
    }
    s
}

// ---------------------------------------------------------------------
// conntrack
// ---------------------------------------------------------------------

#[derive(Serialize)]
struct ConntrackDoc {
    state: Option<StateRef>,
    connections: Vec<ConnectionRow>,
}

#[derive(Serialize)]
struct ConnectionRow {
    endpoint: u32,
    /// The endpoint's pod; `None` for an unbound interface (the node's own
    /// traffic to it) or an unknown id.
    pod: Option<String>,
    protocol: String,
    family: u8,
    local_address: IpAddr,
    local_port: u16,
    peer_address: IpAddr,
    peer_port: u16,
    peer_pod: Option<String>,
    /// The Services the peer address and port are a frontend of (a pod's
    /// connection to a ClusterIP, as its replies come back).
    peer_services: Vec<String>,
    /// Who opened it, seen from the endpoint: `egress` (the pod) or
    /// `ingress` (the peer).
    origin: Direction,
    /// `netpol_common::reason` name that admitted the first packet.
    admitted_by: &'static str,
    generation: u32,
    tcp_state: &'static str,
    idle_secs: f64,
    timeout_secs: f64,
    /// Idle past its timeout: the next packet re-judges it (the LRU map
    /// keeps it until reused or evicted).
    expired: bool,
}

fn conntrack(
    maps: &LiveMaps,
    state: Option<&State>,
    pod: Option<&str>,
) -> anyhow::Result<ConntrackDoc> {
    let only = match pod {
        Some(p) => {
            let s = state.with_context(|| format!("no state file to find {p} in"))?;
            Some(
                s.endpoint(p)
                    .with_context(|| format!("{p} is not a pod of this node in the state file"))?
                    .id,
            )
        }
        None => None,
    };
    let cfg = maps.config()?;
    let now = programs_now_ns(&cfg);
    let secs = |ns: u64| {
        // Seconds with millisecond precision.
        f64::from(u32::try_from(ns / 1_000_000).unwrap_or(u32::MAX)) / 1000.0
    };
    let connections = maps
        .connections()?
        .into_iter()
        .filter(|c| only.is_none_or(|id| c.key.endpoint == id))
        .map(|c: Connection| {
            let (local, peer) = c.addresses();
            let idle = now.saturating_sub(c.value.last_seen_ns);
            let timeout = c.timeout_ns(&cfg);
            ConnectionRow {
                endpoint: c.key.endpoint,
                pod: state
                    .and_then(|s| s.endpoint_by_id(c.key.endpoint))
                    .map(|e| e.pod.clone()),
                protocol: protocol_name(c.key.protocol),
                family: if local.is_ipv4() { 4 } else { 6 },
                local_address: local,
                local_port: c.key.local_port,
                peer_address: peer,
                peer_port: c.key.peer_port,
                peer_pod: state
                    .and_then(|s| s.pod_by_address(peer))
                    .map(str::to_owned),
                peer_services: state
                    .and_then(|s| s.frontend(peer, c.key.peer_port, c.key.protocol))
                    .map(|f| f.services.clone())
                    .unwrap_or_default(),
                origin: netpol_agent::inspect::direction_of(c.value.origin),
                admitted_by: reason::name(c.value.admitted_by),
                generation: c.value.generation,
                tcp_state: tcp_state_name(c.value.tcp_state),
                idle_secs: secs(idle),
                timeout_secs: secs(timeout),
                expired: idle > timeout,
            }
        })
        .collect();
    Ok(ConntrackDoc {
        state: state_ref(state),
        connections,
    })
}

fn conntrack_table(doc: &ConntrackDoc) -> String {
    let mut rows = vec![[
        "POD".to_owned(),
        "PROTO".to_owned(),
        "LOCAL".to_owned(),
        "PEER".to_owned(),
        "PEER NAME".to_owned(),
        "OPENED BY".to_owned(),
        "ADMITTED BY".to_owned(),
        "TCP".to_owned(),
        "IDLE".to_owned(),
    ]];
    let sock = |a: IpAddr, p: u16| match a {
        IpAddr::V4(_) => format!("{a}:{p}"),
        IpAddr::V6(_) => format!("[{a}]:{p}"),
    };
    for c in &doc.connections {
        let pod = match &c.pod {
            Some(p) => p.clone(),
            None if c.endpoint & UNBOUND_ID_BASE != 0 => {
                format!("(unbound ifindex {})", c.endpoint & !UNBOUND_ID_BASE)
            }
            None => format!("(endpoint {})", c.endpoint),
        };
        rows.push([
            pod,
            c.protocol.clone(),
            sock(c.local_address, c.local_port),
            sock(c.peer_address, c.peer_port),
            match (&c.peer_pod, c.peer_services.is_empty()) {
                (Some(p), _) => p.clone(),
                (None, false) => format!("service {}", c.peer_services.join(",")),
                (None, true) => "-".to_owned(),
            },
            match c.origin {
                Direction::Egress => "pod".to_owned(),
                Direction::Ingress => "peer".to_owned(),
            },
            c.admitted_by.to_owned(),
            c.tcp_state.to_owned(),
            format!(
                "{:.1}s{}",
                c.idle_secs,
                if c.expired { " (expired)" } else { "" }
            ),
        ]);
    }
    let mut s = columns(&rows);
    let _ = writeln!(s, "\n{} connections", doc.connections.len());
    s
}

// ---------------------------------------------------------------------
// counters
// ---------------------------------------------------------------------

#[derive(Serialize)]
struct CounterRow {
    direction: &'static str,
    family: &'static str,
    reason: &'static str,
    packets: u64,
    bytes: u64,
}

fn counters_doc(c: &Counters) -> Vec<CounterRow> {
    c.entries
        .iter()
        .map(|e| CounterRow {
            direction: datapath::direction_name(e.direction),
            family: datapath::family_name(e.family),
            reason: reason::name(e.reason),
            packets: e.value.packets,
            bytes: e.value.bytes,
        })
        .collect()
}

/// The counters as `netpol-agent stats` prints them.
pub fn counters_table(c: &Counters) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<8} {:<6} {:<22} {:>12} {:>14}",
        "DIR", "FAMILY", "REASON", "PACKETS", "BYTES"
    );
    for e in counters_doc(c) {
        let _ = writeln!(
            s,
            "{:<8} {:<6} {:<22} {:>12} {:>14}",
            e.direction, e.family, e.reason, e.packets, e.bytes
        );
    }
    s
}

#[cfg(test)]
mod tests {
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
