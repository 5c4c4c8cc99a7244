//! `inspect conntrack`: the tracked connections.

use std::{fmt::Write as _, net::IpAddr};

use anyhow::Context as _;
use netpol_agent::{
    compiler::Direction,
    inspect::{Connection, LiveMaps, Maps as _, programs_now_ns, protocol_name, tcp_state_name},
    provenance::State,
    sync::UNBOUND_ID_BASE,
};
use netpol_common::reason;
use serde::Serialize;

use super::{StateRef, columns, state_ref};

#[derive(Serialize)]
pub(super) struct ConntrackDoc {
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
    /// connection to a `ClusterIP`, as its replies come back).
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

pub(super) fn conntrack(
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

pub(super) fn conntrack_table(doc: &ConntrackDoc) -> String {
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
