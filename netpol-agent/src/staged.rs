//! What the staged view would change on this node
//! (`netpol-agent inspect staged`): the event reader folds the staged
//! view's reports into one row per pod pair, direction, protocol, port,
//! family and report, and writes them beside the state file
//! ([`FILE`]), at most once a second.
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::events::Denial;

/// The file in the state folder.
pub const FILE: &str = "staged.json";

/// Rows kept: the least recently seen goes when a new one would pass it.
pub const MAX_ROWS: usize = 4096;

/// One pod pair, port and report.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key {
    /// The sending pod (`ns/name`), or its address.
    pub source: String,
    /// The receiving pod, or its address.
    pub destination: String,
    /// `ingress` or `egress`: the policy direction judged.
    pub direction: String,
    /// `tcp`, `udp`, ...
    pub protocol: String,
    /// Destination port.
    pub port: u16,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// `staged_would_deny` or `staged_would_allow`.
    pub report: String,
}

/// A row: how often, when last, and what decides it in the staged view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The pair, port and report.
    #[serde(flatten)]
    pub key: Key,
    /// Reports counted (each new connection, within the rate limit).
    pub count: u64,
    /// When the last one was read (seconds since the epoch).
    pub last_seen_unix_secs: u64,
    /// What decides it in the staged view.
    pub decided: String,
    /// The staged policies behind it.
    pub staged_policies: Vec<String>,
}

/// The rows, as the reader keeps them and the file holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// By key.
    pub rows: Vec<Row>,
}

/// The reader's fold of the reports.
#[derive(Debug, Default)]
pub(crate) struct Fold {
    rows: BTreeMap<Key, Row>,
    dirty: bool,
}

impl Fold {
    /// Counts one staged report (`d.reason` a `STAGED_WOULD_*`).
    pub(crate) fn add(&mut self, d: &Denial) {
        let named = |p: Option<&crate::model::ObjectRef>, a: std::net::SocketAddr| {
            p.map_or_else(|| a.ip().to_string(), ToString::to_string)
        };
        let key = Key {
            source: named(d.source.as_ref(), d.src),
            destination: named(d.destination.as_ref(), d.dst),
            direction: d.direction_name().to_owned(),
            protocol: netpol_common::protocol::name(d.protocol)
                .map_or_else(|| d.protocol.to_string(), str::to_ascii_lowercase),
            port: d.dst.port(),
            family: if d.dst.is_ipv6() { "ipv6" } else { "ipv4" }.to_owned(),
            report: d.reason_name().to_owned(),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        if !self.rows.contains_key(&key)
            && self.rows.len() >= MAX_ROWS
            && let Some(oldest) = self
                .rows
                .values()
                .min_by_key(|r| r.last_seen_unix_secs)
                .map(|r| r.key.clone())
        {
            self.rows.remove(&oldest);
        }
        let row = self.rows.entry(key.clone()).or_insert_with(|| Row {
            key,
            count: 0,
            last_seen_unix_secs: now,
            decided: String::new(),
            staged_policies: Vec::new(),
        });
        row.count += 1;
        row.last_seen_unix_secs = now;
        row.decided = d
            .decided
            .as_ref()
            .map(|a| a.text.clone())
            .unwrap_or_default();
        row.staged_policies.clone_from(&d.staged_policies);
        self.dirty = true;
    }

    /// Drops the rows none of whose policies `staged` says is still
    /// staged (promoted, or the annotation removed).
    pub(crate) fn retain(&mut self, staged: impl Fn(&str) -> bool) {
        let before = self.rows.len();
        self.rows
            .retain(|_, r| r.staged_policies.iter().any(|p| staged(p)));
        self.dirty |= self.rows.len() != before;
    }

    /// Writes the file if something changed since the last write.
    pub(crate) fn flush(&mut self, dir: &Path) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let summary = Summary {
            rows: self.rows.values().cloned().collect(),
        };
        let path = dir.join(FILE);
        let tmp = PathBuf::from(format!("{}.tmp", path.display()));
        std::fs::create_dir_all(dir)?;
        std::fs::write(&tmp, serde_json::to_vec_pretty(&summary)?)?;
        std::fs::rename(&tmp, &path)?;
        self.dirty = false;
        Ok(())
    }
}

/// Reads the file the agent writes in `dir` (`None`: there is none: no
/// report since the agent started, or none with a state folder).
///
/// # Errors
/// When it exists but cannot be read or parsed.
pub fn read(dir: &Path) -> io::Result<Option<Summary>> {
    match std::fs::read(dir.join(FILE)) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use netpol_common::{direction, reason};

    use super::*;
    use crate::model::ObjectRef;

    fn report(port: u16) -> Denial {
        Denial {
            timestamp_ns: 0,
            direction: direction::INGRESS,
            reason: reason::STAGED_WOULD_DENY,
            protocol: netpol_common::protocol::TCP,
            icmp_type: 0,
            src: SocketAddr::from(([10, 0, 0, 2], 40000)),
            dst: SocketAddr::from(([10, 0, 0, 1], port)),
            endpoint: 1,
            ifindex: 2,
            pod: Some(ObjectRef::new("x", "a")),
            source: None,
            destination: Some(ObjectRef::new("x", "a")),
            decided: None,
            staged_policies: vec!["x/p".to_owned()],
        }
    }

    #[test]
    fn reports_fold_per_pair_and_port_bounded_and_go_with_their_policy() {
        let dir = std::env::temp_dir().join(format!("netpol-staged-{}", std::process::id()));
        let mut f = Fold::default();
        f.add(&report(80));
        f.add(&report(80));
        f.flush(&dir).expect("write");
        let s = read(&dir).expect("read").expect("a file");
        assert_eq!(s.rows.len(), 1);
        let r = &s.rows[0];
        assert_eq!(
            (r.key.source.as_str(), r.key.destination.as_str(), r.count),
            ("10.0.0.2", "x/a", 2)
        );
        assert_eq!(
            (r.key.port, r.key.report.as_str()),
            (80, "staged_would_deny")
        );
        // Bounded: the least recently seen row makes room.
        for port in 1..=u16::try_from(MAX_ROWS).expect("fits") {
            f.add(&report(1000 + port));
        }
        assert_eq!(f.rows.len(), MAX_ROWS);
        // Rows of a policy no longer staged go.
        f.retain(|p| p != "x/p");
        f.flush(&dir).expect("write");
        assert_eq!(read(&dir).expect("read").expect("a file").rows, Vec::new());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
