//! Provenance that outlives the agent: the state file.
//!
//! The pinned maps say *what* the kernel enforces (endpoint ids, selector
//! and prefix → rule set, rule set → ports); they cannot say *why*: which
//! pod an endpoint id is, which `NetworkPolicy` rules produced an entry. After
//! every successful apply the sync loop writes that here, atomically (a
//! temporary file renamed over `state.json`), next to the pinned state:
//! `/run/netpol/state.json` by default (`run --state-dir`,
//! [`crate::AgentBuilder::state_dir`]). `netpol-agent inspect` and
//! `netpol-agent explain` read the live maps for the verdicts and this file
//! for the names, while the agent runs and after it died (the maps and the
//! file were last written by the same agent; a new agent keeps the old file
//! until its first apply, as it keeps the old maps).
//!
//! # Schema (version [`STATE_VERSION`])
//! One JSON object (documented in docs/OPERATIONS.md):
//! - `version`, `layout` (`netpol_common::LAYOUT_VERSION` of the maps it
//!   describes), `pin_dir`, `node`, `node_addresses`, `generation`,
//!   `fingerprint` (as on `/status`), `written_unix_secs`;
//! - `endpoints`: each local pod → endpoint id, host `ifindex` and
//!   `interface` (absent while unbound), `addresses`, and per direction
//!   `isolated`, `generation`, the `policies` selecting it and the
//!   `cluster_policies` applying to it (in evaluation order);
//! - `policy`: each policy-trie entry → (`endpoint`, `direction`,
//!   `selector`, `prefix`) → `ruleset` and the `rules` (`policy`,
//!   `direction`, `index` in `spec.ingress`/`spec.egress`) that produced
//!   it (for an entry of rule set 1, the empty set shadowing a shorter
//!   prefix: the rules whose `except` it is); in a direction some
//!   `ClusterNetworkPolicy` applies to, its `decisions`: per set of
//!   (protocol, port), `allowed`, the deciding `stage`, the Pass rules
//!   that `passed` it on, the deciding `rules` and a `text`;
//! - `named`: the decisions (`endpoint`, `direction`, `prefix`,
//!   `decisions`) of the prefixes the maps leave out because their rule
//!   set is the shorter prefix's;
//! - `rulesets`: each rule set → `all` or its `ports` (`protocol`, `first`,
//!   `last`);
//! - `frontends`: each Service frontend (`address`, `port`, `protocol`,
//!   `kind`) → the `services` it belongs to;
//! - `remote_pods`: the other nodes' pods and their addresses, so that a
//!   peer can be named.
//!
//! Fields may be added within a version (readers ignore unknown ones); a
//! change that breaks a reader bumps [`STATE_VERSION`].
mod build;
mod file;
mod writer;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use netpol_common::frontend_kind;
use serde::{Deserialize, Serialize};

use crate::{
    compiler::{Compiled, Direction, RuleRef, Stage},
    model::{ObjectRef, Protocol, Snapshot},
};

pub(crate) use build::{isolating, isolating_policies};
pub use writer::Writer;

/// Version of the state file's schema.
pub const STATE_VERSION: u32 = 1;
/// Default folder of the state file.
pub const DEFAULT_STATE_DIR: &str = "/run/netpol";
/// File name of the state file in its folder.
pub const STATE_FILE: &str = "state.json";

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// Reading, writing or renaming failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a state document.
    #[error("{path}: not a netpol state file: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
    /// Another schema version.
    #[error("{path}: state file version {found}, this netpol-agent reads version {STATE_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
}

/// The state file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// `netpol_common::LAYOUT_VERSION` of the maps described.
    pub layout: u32,
    /// Where the maps are pinned (`<bpffs>/netpol`).
    pub pin_dir: PathBuf,
    /// The node compiled for.
    pub node: Option<String>,
    /// Its addresses (packets of the node's own stack reach its pods).
    pub node_addresses: Vec<IpAddr>,
    /// The agent's generation when written (as on `/status`).
    pub generation: u64,
    /// The input's fingerprint (as on `/status`).
    pub fingerprint: Option<String>,
    /// When written, seconds since the Unix epoch.
    pub written_unix_secs: u64,
    /// Local pods, by pod.
    pub endpoints: Vec<EndpointState>,
    /// Policy-trie entries, both families, by endpoint, direction, prefix.
    pub policy: Vec<PolicyEntryState>,
    /// Names only: the decisions of prefixes the maps leave out
    /// ([`crate::compiler::Compiled::named`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub named: Vec<NamedState>,
    /// Rule sets in use (the empty set, id 1, included).
    pub rulesets: Vec<RuleSetState>,
    /// Service frontends.
    pub frontends: Vec<FrontendState>,
    /// Networked pods of other nodes.
    pub remote_pods: Vec<RemotePod>,
}

/// A local pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    /// `namespace/name`.
    pub pod: String,
    /// Endpoint id (the `NETPOL_ENDPOINTS` value's `id`).
    pub id: u32,
    /// The pod's uid: a restarted agent keeps the id only for the same
    /// pod ([`crate::resume`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Host-side interface index (the `NETPOL_ENDPOINTS` key), once bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifindex: Option<u32>,
    /// Host-side interface name, once bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The pod's addresses.
    pub addresses: Vec<IpAddr>,
    /// Ingress.
    pub ingress: DirectionState,
    /// Egress.
    pub egress: DirectionState,
}

impl EndpointState {
    /// One direction.
    #[must_use]
    pub fn direction(&self, d: Direction) -> &DirectionState {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// One direction of a local pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionState {
    /// Some policy selects the pod for this direction.
    pub isolated: bool,
    /// Policy generation (the `EndpointInfo` field).
    pub generation: u32,
    /// `namespace/name` of the policies selecting the pod for it.
    pub policies: Vec<String>,
    /// The `ClusterNetworkPolicies` with rules for it that apply to the
    /// pod, in evaluation order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_policies: Vec<ClusterPolicyState>,
    /// Where the staged view judges this direction differently (its
    /// entries are keyed by the staged endpoint id): whether it isolates
    /// it, and the policies selecting the pod there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged: Option<StagedDirectionState>,
}

/// The staged view of an endpoint direction ([`DirectionState::staged`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedDirectionState {
    /// Some policy of the staged view selects the pod for it.
    pub isolated: bool,
    /// `namespace/name` of those policies.
    pub policies: Vec<String>,
}

/// A `ClusterNetworkPolicy` applying to a pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPolicyState {
    /// Its name.
    pub name: String,
    /// `Admin` or `Baseline`.
    pub tier: String,
    /// Its priority (lower first).
    pub priority: u16,
}

impl std::fmt::Display for ClusterPolicyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (priority {})", self.name, self.priority)
    }
}

/// One policy-trie entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEntryState {
    /// Local endpoint id.
    pub endpoint: u32,
    /// Direction.
    pub direction: Direction,
    /// `netpol_common::policy_selector(endpoint, direction)`: the key's
    /// first field.
    pub selector: u32,
    /// Peer prefix (the key's prefix length is 32 more).
    pub prefix: IpNet,
    /// Rule set (the value).
    pub ruleset: u32,
    /// The rules that produced it.
    pub rules: Vec<RuleState>,
    /// Entries of a direction some `ClusterNetworkPolicy` applies to: how
    /// each `(protocol, port)` is decided (disjoint, covering them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<DecisionState>,
}

/// The decisions of a prefix the maps leave out (its rule set is the
/// shorter prefix's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedState {
    /// Local endpoint id.
    pub endpoint: u32,
    /// Direction.
    pub direction: Direction,
    /// Peer prefix.
    pub prefix: IpNet,
    /// How each `(protocol, port)` is decided.
    pub decisions: Vec<DecisionState>,
}

/// How some `(protocol, port)`s of a tiered entry are decided
/// ([`crate::compiler::Decision`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionState {
    /// Every protocol and port (but `except`).
    pub all: bool,
    /// Otherwise these ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRangeState>,
    /// With `all`: the ranges it does not cover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<PortRangeState>,
    /// Whether they are allowed.
    pub allowed: bool,
    /// `admin`, `network_policy`, `baseline` or `default`.
    pub stage: Stage,
    /// The Pass rules that sent them on, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed: Vec<RuleState>,
    /// The deciding rule, or the `NetworkPolicy` rules allowing them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleState>,
    /// One sentence.
    pub text: String,
}

impl DecisionState {
    /// Whether it covers `protocol` (number) and `port`.
    #[must_use]
    pub fn covers(&self, protocol: u8, port: u16) -> bool {
        let listed = |list: &[PortRangeState]| {
            list.iter().any(|r| {
                netpol_common::protocol::name(protocol) == Some(r.protocol.as_str())
                    && (r.first..=r.last).contains(&port)
            })
        };
        if self.all {
            !listed(&self.except)
        } else {
            listed(&self.ports)
        }
    }
}

/// One rule of one `NetworkPolicy`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleState {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// `spec.ingress` or `spec.egress`.
    pub direction: Direction,
    /// Index in that list.
    pub index: usize,
    /// `Admin` or `Baseline` for a `ClusterNetworkPolicy` rule (whose
    /// `policy` is its name); absent for a `NetworkPolicy` rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

impl std::fmt::Display for RuleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        crate::compiler::write_rule(
            f,
            &self.policy,
            self.tier.as_deref(),
            self.direction,
            self.index,
        )
    }
}

impl From<&RuleRef> for RuleState {
    fn from(r: &RuleRef) -> Self {
        Self {
            policy: match r.tier {
                None => r.policy.to_string(),
                Some(_) => r.policy.name.clone(),
            },
            direction: r.direction,
            index: r.index,
            tier: r.tier.map(|t| t.as_str().to_owned()),
        }
    }
}

/// A rule set: what a matched peer may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSetState {
    /// Id (the port trie's first key field).
    pub id: u32,
    /// Every protocol and port.
    pub all: bool,
    /// Otherwise these ranges (empty: nothing, rule set 1).
    pub ports: Vec<PortRangeState>,
    /// With `all`: the ranges not allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<PortRangeState>,
}

/// Ports `first..=last` of a protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRangeState {
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

/// A Service frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendState {
    /// Address kube-proxy translates.
    pub address: IpAddr,
    /// Port.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// `cluster_ip`, `external_ip`, `node_port` or `load_balancer` (the
    /// map value's kind).
    pub kind: String,
    /// `namespace/name` of the Services it belongs to.
    pub services: Vec<String>,
}

/// A pod of another node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemotePod {
    /// `namespace/name`.
    pub pod: String,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
}

/// Name of a `netpol_common::frontend_kind`.
#[must_use]
pub const fn frontend_kind_name(kind: u32) -> &'static str {
    match kind {
        frontend_kind::CLUSTER_IP => "cluster_ip",
        frontend_kind::EXTERNAL_IP => "external_ip",
        frontend_kind::NODE_PORT => "node_port",
        frontend_kind::LOAD_BALANCER => "load_balancer",
        _ => "unknown",
    }
}

/// A bound pod's host interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    /// Index.
    pub ifindex: u32,
    /// Name.
    pub name: String,
}

/// What a state file is made of.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The compiled state in force.
    pub compiled: &'a Compiled,
    /// The snapshot it was compiled from.
    pub snapshot: &'a Snapshot,
    /// The bound pods' interfaces.
    pub interfaces: &'a BTreeMap<ObjectRef, Bound>,
    /// The agent's generation.
    pub generation: u64,
    /// The input's fingerprint.
    pub fingerprint: Option<&'a str>,
    /// Where the maps are pinned.
    pub pin_dir: &'a Path,
}

impl State {
    /// The local pod `namespace/name`.
    #[must_use]
    pub fn endpoint(&self, pod: &str) -> Option<&EndpointState> {
        self.endpoints.iter().find(|e| e.pod == pod)
    }

    /// The local pod of endpoint `id`.
    #[must_use]
    pub fn endpoint_by_id(&self, id: u32) -> Option<&EndpointState> {
        self.endpoints.iter().find(|e| e.id == id)
    }

    /// The pod (local or remote) with address `ip`.
    #[must_use]
    pub fn pod_by_address(&self, ip: IpAddr) -> Option<&str> {
        self.endpoints
            .iter()
            .find(|e| e.addresses.contains(&ip))
            .map(|e| e.pod.as_str())
            .or_else(|| {
                self.remote_pods
                    .iter()
                    .find(|p| p.addresses.contains(&ip))
                    .map(|p| p.pod.as_str())
            })
    }

    /// The entry `(endpoint, direction, prefix)`.
    #[must_use]
    pub fn entry(&self, endpoint: u32, d: Direction, prefix: IpNet) -> Option<&PolicyEntryState> {
        self.policy
            .iter()
            .find(|e| e.endpoint == endpoint && e.direction == d && e.prefix == prefix)
    }

    /// What decides `(protocol, port)` from `peer` for `endpoint`'s
    /// direction `d` where a `ClusterNetworkPolicy` applies: the decision
    /// of the longest prefix covering `peer` among the entries and the
    /// names-only prefixes (as [`crate::compiler::Compiled::decision_at`]).
    #[must_use]
    pub fn decision_at(
        &self,
        endpoint: u32,
        d: Direction,
        peer: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Option<&DecisionState> {
        let entries = self
            .policy
            .iter()
            .filter(|e| !e.decisions.is_empty())
            .map(|e| (e.endpoint, e.direction, e.prefix, &e.decisions));
        let named = self
            .named
            .iter()
            .map(|e| (e.endpoint, e.direction, e.prefix, &e.decisions));
        entries
            .chain(named)
            .filter(|e| e.0 == endpoint && e.1 == d && e.2.contains(&peer))
            .max_by_key(|e| e.2.prefix_len())?
            .3
            .iter()
            .find(|x| x.covers(protocol, port))
    }

    /// Rule set `id`.
    #[must_use]
    pub fn ruleset(&self, id: u32) -> Option<&RuleSetState> {
        self.rulesets.iter().find(|r| r.id == id)
    }

    /// The Services of frontend `(address, port, protocol number)`.
    #[must_use]
    pub fn frontend(&self, address: IpAddr, port: u16, protocol: u8) -> Option<&FrontendState> {
        self.frontends.iter().find(|f| {
            f.address == address
                && f.port == port
                && Protocol::parse(&f.protocol).map(Protocol::number) == Some(protocol)
        })
    }
}

#[cfg(test)]
mod tests;
