//! `inspect endpoints`: the endpoint map, one row per pod interface.

use std::{fmt::Write as _, net::IpAddr};

use netpol_agent::{
    compiler::Direction,
    inspect::{LiveMaps, Maps as _},
    provenance::{self, State},
    sync::UNBOUND_ID_BASE,
};
use serde::Serialize;

use super::{StateRef, columns, join, state_ref};

#[derive(Serialize)]
pub(super) struct EndpointsDoc {
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

pub(super) fn endpoints(maps: &LiveMaps, state: Option<&State>) -> anyhow::Result<EndpointsDoc> {
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
pub(super) fn interface_name(ifindex: u32) -> Option<String> {
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

pub(super) fn endpoints_table(doc: &EndpointsDoc) -> String {
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
