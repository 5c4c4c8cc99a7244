//! The answer: an [`Explanation`], its parties and judgements, and how it
//! reads.

use std::{fmt, net::IpAddr};

use ipnet::IpNet;
use netpol_common::reason;
use serde::Serialize;

use super::super::InspectError;
use crate::compiler::Direction;
use crate::provenance::DecisionState;

/// Why a query could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The maps could not be read.
    #[error(transparent)]
    Maps(#[from] InspectError),
    /// The query names something unknown or ambiguous.
    #[error("{0}")]
    Query(String),
}

/// Where a party is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Location {
    /// A pod of this node.
    Local,
    /// A pod of another node.
    Remote,
    /// One of this node's addresses.
    Node,
    /// An address that is no pod the state file knows.
    Other,
}

/// One side of the connection, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Party {
    /// As given.
    pub given: String,
    /// The address used.
    pub address: IpAddr,
    /// `namespace/name`, when known.
    pub pod: Option<String>,
    /// Where it is.
    pub location: Location,
    /// Its endpoint id (local pods with a live entry).
    pub endpoint: Option<u32>,
    /// Its host interface index.
    pub ifindex: Option<u32>,
    /// Its host interface name (state file).
    pub interface: Option<String>,
}

impl Party {
    pub(super) fn name(&self) -> String {
        self.pod.clone().unwrap_or_else(|| self.address.to_string())
    }
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.pod, self.location) {
            (Some(p), Location::Local) => {
                write!(f, "{p} ({}", self.address)?;
                if let Some(id) = self.endpoint {
                    write!(f, ", endpoint {id}")?;
                }
                match (&self.interface, self.ifindex) {
                    (Some(n), Some(i)) => write!(f, " on {n}/{i}")?,
                    (None, Some(i)) => write!(f, " on ifindex {i}")?,
                    _ => {}
                }
                f.write_str(")")
            }
            (Some(p), _) => write!(f, "{p} ({}, not on this node)", self.address),
            (None, Location::Node) => write!(f, "{} (this node)", self.address),
            (None, _) => write!(f, "{}", self.address),
        }
    }
}

/// The overall verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Both sides this node judges allow it.
    Allowed,
    /// A side this node judges drops it.
    Denied,
    /// The destination is a Service frontend: it depends on the backend.
    Depends,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allowed => "ALLOWED",
            Self::Denied => "DENIED",
            Self::Depends => "DEPENDS ON THE BACKEND",
        })
    }
}

/// The policy-trie entry the kernel matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Matched {
    /// The key's selector (`endpoint << 1 | direction`).
    pub selector: u32,
    /// Its peer prefix.
    pub prefix: IpNet,
    /// Its rule set (the kernel's answer).
    pub ruleset: u32,
    /// The rule set's ports, read from the port trie.
    pub ports: String,
    /// The `NetworkPolicy` rules that produced the entry (state file).
    pub rules: Vec<String>,
    /// The state file has no such entry, or another rule set for it (it
    /// is older or newer than the maps): `rules` may be missing.
    pub stale: bool,
}

/// One direction's judgement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Judgement {
    /// `egress` or `ingress`.
    pub direction: Direction,
    /// Whose: `namespace/name` or an address.
    pub of: String,
    /// This node judges it.
    pub judged: bool,
    /// It lets the connection through.
    pub allowed: bool,
    /// `netpol_common::reason` name (`pass_policy`, `drop_policy`, ...),
    /// or `not_judged`.
    pub reason: String,
    /// The direction is isolated (local pods).
    pub isolated: Option<bool>,
    /// The policies isolating it (state file).
    pub policies: Vec<String>,
    /// The entry the kernel matched, if any.
    pub entry: Option<Matched>,
    /// For a direction some `ClusterNetworkPolicy` applies to: what
    /// decides the queried protocol and port (state file: the longest
    /// prefix covering the peer among the entries and the prefixes the
    /// maps leave out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionState>,
    /// One sentence.
    pub text: String,
}

impl Judgement {
    pub(super) fn not_judged(direction: Direction, of: String, text: String) -> Self {
        Self {
            direction,
            of,
            judged: false,
            allowed: true,
            reason: "not_judged".to_owned(),
            isolated: None,
            policies: Vec::new(),
            entry: None,
            decision: None,
            text,
        }
    }

    pub(super) fn passes(direction: Direction, of: String, r: u32, text: String) -> Self {
        Self {
            judged: true,
            reason: reason::name(r).to_owned(),
            ..Self::not_judged(direction, of, text)
        }
    }
}

/// A Service the destination is a frontend of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceNote {
    /// `namespace/name` of its Services (state file).
    pub services: Vec<String>,
    /// `cluster_ip`, `node_port`, ...
    pub kind: String,
}

/// The answer to a [`Query`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The client.
    pub src: Party,
    /// The server.
    pub dst: Party,
    /// 4 or 6.
    pub family: u8,
    /// `TCP`, `UDP`, ...
    pub protocol: String,
    /// Destination port.
    pub port: u16,
    /// The verdict.
    pub verdict: Verdict,
    /// The source's egress.
    pub egress: Judgement,
    /// The destination's ingress.
    pub ingress: Judgement,
    /// Set when the destination is a Service frontend.
    pub service: Option<ServiceNote>,
    /// Caveats (no state file, ...).
    pub notes: Vec<String>,
    /// The staged view's verdict ([`Query::staged`](super::Query::staged)).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub staged: bool,
}

impl Explanation {
    /// The process exit code of `explain`: 0 allowed, 1 denied, 2 depends.
    #[must_use]
    pub const fn exit_code(&self) -> u8 {
        match self.verdict {
            Verdict::Allowed => 0,
            Verdict::Denied => 1,
            Verdict::Depends => 2,
        }
    }

    /// The `NetworkPolicy` rules that allow it (empty unless a side was
    /// allowed by a rule).
    #[must_use]
    pub fn allowing_rules(&self) -> Vec<String> {
        [&self.egress, &self.ingress]
            .into_iter()
            .filter(|j| j.allowed && j.reason == reason::name(reason::PASS_POLICY))
            .flat_map(|j| match (&j.decision, &j.entry) {
                (Some(d), _) => d.rules.iter().map(ToString::to_string).collect(),
                (None, Some(m)) => m.rules.clone(),
                (None, None) => Vec::new(),
            })
            .collect()
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} -> {} {}/{} IPv{}: {}{}",
            self.src,
            self.dst,
            self.protocol,
            self.port,
            self.family,
            self.verdict,
            if self.staged { " (staged view)" } else { "" }
        )?;
        if let Some(s) = &self.service {
            writeln!(
                f,
                "  {} is a Service frontend ({}) of {}: kube-proxy translates it after \
                 the source's from_pod; the verdict depends on the backend it picks \
                 (explain the backend pod's address)",
                self.dst.address,
                s.kind,
                if s.services.is_empty() {
                    "a Service the state file does not name".to_owned()
                } else {
                    s.services.join(", ")
                }
            )?;
        }
        for j in [&self.egress, &self.ingress] {
            writeln!(
                f,
                "  {} of {}: {} ({})",
                j.direction.field(),
                j.of,
                j.text,
                j.reason
            )?;
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        Ok(())
    }
}
