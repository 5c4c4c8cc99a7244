//! Provenance that outlives the agent: the state file.
//!
//! The pinned maps say *what* the kernel enforces (endpoint ids, selector
//! and prefix → rule set, rule set → ports); they cannot say *why*: which
//! pod an endpoint id is, which NetworkPolicy rules produced an entry. After
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
//!   `isolated`, `generation` and the `policies` selecting it;
//! - `policy`: each policy-trie entry → (`endpoint`, `direction`,
//!   `selector`, `prefix`) → `ruleset` and the `rules` (`policy`,
//!   `direction`, `index` in `spec.ingress`/`spec.egress`) that produced
//!   it (for an entry of rule set 1, the empty set shadowing a shorter
//!   prefix: the rules whose `except` it is);
//! - `rulesets`: each rule set → `all` or its `ports` (`protocol`, `first`,
//!   `last`);
//! - `frontends`: each Service frontend (`address`, `port`, `protocol`,
//!   `kind`) → the `services` it belongs to;
//! - `remote_pods`: the other nodes' pods and their addresses, so that a
//!   peer can be named.
//!
//! Fields may be added within a version (readers ignore unknown ones); a
//! change that breaks a reader bumps [`STATE_VERSION`].
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    thread::JoinHandle,
};

use ipnet::IpNet;
use netpol_common::frontend_kind;
use serde::{Deserialize, Serialize};

use crate::{
    compiler::{Compiled, Direction, EMPTY_RULESET, RuleRef, RuleSet, service_frontends},
    model::{ObjectRef, Protocol, Snapshot},
};

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
}

/// One rule of one NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleState {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// `spec.ingress` or `spec.egress`.
    pub direction: Direction,
    /// Index in that list.
    pub index: usize,
}

impl std::fmt::Display for RuleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: spec.{}[{}]",
            self.policy,
            self.direction.field(),
            self.index
        )
    }
}

impl From<&RuleRef> for RuleState {
    fn from(r: &RuleRef) -> Self {
        Self {
            policy: r.policy.to_string(),
            direction: r.direction,
            index: r.index,
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

fn ruleset_state(id: u32, rs: &RuleSet) -> RuleSetState {
    RuleSetState {
        id,
        all: rs.all,
        ports: rs
            .ranges
            .iter()
            .map(|r| PortRangeState {
                protocol: r.protocol.as_str().to_owned(),
                first: r.first,
                last: r.last,
            })
            .collect(),
    }
}

/// `namespace/name` of the policies selecting `pod` for `d`.
fn isolating(snap: &Snapshot, pod: &ObjectRef, d: Direction) -> Vec<String> {
    let Some(p) = snap.pods.get(pod) else {
        return Vec::new();
    };
    snap.policies
        .values()
        .filter_map(|slot| slot.in_force.as_ref())
        .filter(|np| np.id.namespace == pod.namespace && np.pod_selector.matches(&p.labels))
        .filter(|np| match d {
            Direction::Ingress => np.ingress.is_some(),
            Direction::Egress => np.egress.is_some(),
        })
        .map(|np| np.id.to_string())
        .collect()
}

impl State {
    /// The state of what `inputs` describe, written now.
    #[must_use]
    pub fn build(inputs: &Inputs<'_>) -> Self {
        let c = inputs.compiled;
        let snap = inputs.snapshot;
        let endpoints = c
            .endpoints
            .iter()
            .map(|(pod, e)| {
                let bound = inputs.interfaces.get(pod);
                let dir = |d: Direction| DirectionState {
                    isolated: e.isolated(d),
                    generation: e.generation(d),
                    policies: isolating(snap, pod, d),
                };
                EndpointState {
                    pod: pod.to_string(),
                    id: e.id,
                    uid: c.ids.endpoints.get(pod).and_then(|i| i.uid.clone()),
                    ifindex: bound.map(|b| b.ifindex),
                    interface: bound.map(|b| b.name.clone()),
                    addresses: e.ips.clone(),
                    ingress: dir(Direction::Ingress),
                    egress: dir(Direction::Egress),
                }
            })
            .collect();
        let policy = c
            .policy_v4
            .iter()
            .chain(&c.policy_v6)
            .map(|(t, e)| PolicyEntryState {
                endpoint: t.endpoint,
                direction: t.direction,
                selector: t.selector(),
                prefix: t.prefix,
                ruleset: e.ruleset,
                rules: c.sources(e).map(RuleState::from).collect(),
            })
            .collect();
        let mut rulesets = vec![ruleset_state(EMPTY_RULESET, &RuleSet::default())];
        rulesets.extend(c.rulesets.iter().map(|(&id, rs)| ruleset_state(id, rs)));
        // (address, port, protocol) → (lowest kind, services), as the
        // compiler keys the frontend maps.
        let mut fronts: BTreeMap<(IpAddr, u16, Protocol), (u32, BTreeSet<String>)> =
            BTreeMap::new();
        for svc in snap.services.values() {
            for f in service_frontends(svc, &c.node_addresses) {
                let e = fronts
                    .entry((f.address, f.port, f.protocol))
                    .or_insert((f.kind, BTreeSet::new()));
                e.0 = e.0.min(f.kind);
                e.1.insert(svc.id.to_string());
            }
        }
        let frontends = fronts
            .into_iter()
            .map(
                |((address, port, protocol), (kind, services))| FrontendState {
                    address,
                    port,
                    protocol: protocol.as_str().to_owned(),
                    kind: frontend_kind_name(kind).to_owned(),
                    services: services.into_iter().collect(),
                },
            )
            .collect();
        let remote_pods = snap
            .pods
            .values()
            .filter(|p| p.is_networked() && !c.endpoints.contains_key(&p.id))
            .map(|p| RemotePod {
                pod: p.id.to_string(),
                node: p.node_name.clone(),
                addresses: p.ips.clone(),
            })
            .collect();
        Self {
            version: STATE_VERSION,
            layout: netpol_common::LAYOUT_VERSION,
            pin_dir: inputs.pin_dir.to_owned(),
            node: c.node.clone(),
            node_addresses: c.node_addresses.clone(),
            generation: inputs.generation,
            fingerprint: inputs.fingerprint.map(str::to_owned),
            written_unix_secs: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            endpoints,
            policy,
            rulesets,
            frontends,
            remote_pods,
        }
    }

    /// The state file in `dir`.
    #[must_use]
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Writes `dir/state.json` atomically (a temporary file in `dir`,
    /// renamed over it), creating `dir`.
    ///
    /// # Errors
    /// [`ProvenanceError::Io`].
    pub fn write(&self, dir: &Path) -> Result<PathBuf, ProvenanceError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| ProvenanceError::Io { op, path, source }
        };
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let path = Self::path(dir);
        let tmp = dir.join(format!(
            ".{STATE_FILE}.{}.{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let text = serde_json::to_vec(self).map_err(|e| ProvenanceError::Io {
            op: "serializing",
            path: path.clone(),
            source: e.into(),
        })?;
        if let Err(e) = std::fs::write(&tmp, text).map_err(io("writing", &tmp)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        if let Err(e) = std::fs::rename(&tmp, &path).map_err(io("renaming", &tmp)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(path)
    }

    /// Reads `dir/state.json`; `None` when there is none.
    ///
    /// # Errors
    /// When it cannot be read, is not a state file or of another version.
    pub fn read(dir: &Path) -> Result<Option<Self>, ProvenanceError> {
        let path = Self::path(dir);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ProvenanceError::Io {
                    op: "reading",
                    path,
                    source,
                });
            }
        };
        Self::parse(&path, &text).map(Some)
    }

    /// Parses a state document (`path` names it in errors).
    ///
    /// # Errors
    /// When it is not a state document or of another version.
    pub fn parse(path: &Path, text: &[u8]) -> Result<Self, ProvenanceError> {
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let parse = |source| ProvenanceError::Parse {
            path: path.to_owned(),
            source,
        };
        let v: Versioned = serde_json::from_slice(text).map_err(parse)?;
        if v.version != STATE_VERSION {
            return Err(ProvenanceError::Version {
                path: path.to_owned(),
                found: v.version,
            });
        }
        serde_json::from_slice(text).map_err(parse)
    }

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

/// A state file to build and write.
type Job = Box<dyn FnOnce() -> State + Send>;
/// What the writer reports after each write.
type Report = Box<dyn FnMut(&Path, Result<PathBuf, ProvenanceError>) + Send>;

#[derive(Default)]
struct Slot {
    next: Option<Job>,
    closed: bool,
}

/// Builds and writes state files on a thread of its own, so that the sync
/// loop never waits on serialization or the file system (a 10,000-pod
/// cluster's file takes about three times its compile). Newest wins: a
/// state superseded before the thread got to it is never written. The
/// file therefore lags the maps by one write at most; readers treat an
/// entry the file does not describe as stale. Dropping the writer writes
/// what is pending, then stops the thread.
pub struct Writer {
    shared: Arc<(Mutex<Slot>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts the thread writing to `dir`; `report` is called on it after
    /// every write.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(dir: PathBuf, mut report: Report) -> std::io::Result<Self> {
        let shared: Arc<(Mutex<Slot>, Condvar)> = Arc::default();
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("netpol-state".into())
            .spawn(move || {
                let (slot, cv) = &*theirs;
                loop {
                    let job = {
                        let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
                        while s.next.is_none() && !s.closed {
                            s = cv.wait(s).unwrap_or_else(PoisonError::into_inner);
                        }
                        match s.next.take() {
                            Some(job) => job,
                            None => return,
                        }
                    };
                    let result = job().write(&dir);
                    report(&dir, result);
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands over the next state (replacing one not written yet).
    pub fn submit(&self, build: impl FnOnce() -> State + Send + 'static) {
        let (slot, cv) = &*self.shared;
        slot.lock().unwrap_or_else(PoisonError::into_inner).next = Some(Box::new(build));
        cv.notify_one();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let (slot, cv) = &*self.shared;
        slot.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiler::{IdAllocation, compile};
    use crate::test_support;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.2}, {ip: "fd01::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.2}]}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: x}
spec: {clusterIP: 10.43.0.10, ports: [{port: 80, protocol: TCP, nodePort: 30080}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}]}]
"#;

    fn state() -> State {
        let snap = test_support::snapshot(CLUSTER);
        let c = compile(&snap, &IdAllocation::default());
        let mut ifaces = BTreeMap::new();
        ifaces.insert(
            ObjectRef::new("x", "a"),
            Bound {
                ifindex: 7,
                name: "veth7".into(),
            },
        );
        State::build(&Inputs {
            compiled: &c,
            snapshot: &snap,
            interfaces: &ifaces,
            generation: 3,
            fingerprint: Some("f00"),
            pin_dir: Path::new("/sys/fs/bpf/netpol"),
        })
    }

    #[test]
    fn state_names_pods_rules_rulesets_and_services() {
        let s = state();
        let a = s.endpoint("x/a").expect("local pod a");
        assert_eq!(
            (a.ifindex, a.interface.as_deref()),
            (Some(7), Some("veth7"))
        );
        assert!(a.ingress.isolated && !a.egress.isolated);
        assert_eq!(a.ingress.policies, ["x/a-from-b"]);
        assert!(s.endpoint("x/b").is_none(), "b runs on n2");
        assert_eq!(s.remote_pods.len(), 1);
        assert_eq!(s.pod_by_address("10.2.0.2".parse().unwrap()), Some("x/b"));
        let prefix: IpNet = "10.2.0.2/32".parse().unwrap();
        let e = s
            .entry(a.id, Direction::Ingress, prefix)
            .expect("b's entry at a's ingress");
        assert_eq!(e.selector, netpol_common::policy_selector(a.id, 1));
        assert_eq!(e.rules.len(), 1);
        assert_eq!(e.rules[0].to_string(), "x/a-from-b: spec.ingress[0]");
        let rs = s.ruleset(e.ruleset).expect("its rule set");
        assert_eq!(
            rs.ports,
            [PortRangeState {
                protocol: "TCP".into(),
                first: 80,
                last: 80
            }]
        );
        assert!(s.ruleset(EMPTY_RULESET).is_some_and(|r| r.ports.is_empty()));
        let f = s
            .frontend("10.43.0.10".parse().unwrap(), 80, 6)
            .expect("cluster IP");
        assert_eq!(
            (f.kind.as_str(), f.services.as_slice()),
            ("cluster_ip", &["x/s".to_owned()][..])
        );
        let np = s
            .frontend("10.0.0.1".parse().unwrap(), 30080, 6)
            .expect("node port");
        assert_eq!(np.kind, "node_port");
    }

    #[test]
    fn state_file_round_trips_and_is_replaced_atomically() {
        let dir = std::env::temp_dir().join(format!("netpol-state-test-{}", std::process::id()));
        let s = state();
        let path = s.write(&dir).expect("write");
        assert_eq!(State::read(&dir).expect("read"), Some(s.clone()));
        let mut next = s.clone();
        next.generation += 1;
        next.write(&dir).expect("rewrite");
        assert_eq!(
            State::read(&dir).expect("read").map(|s| s.generation),
            Some(4)
        );
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            [std::ffi::OsString::from(STATE_FILE)],
            "no temporary left"
        );
        assert!(path.ends_with(STATE_FILE));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn writer_writes_the_newest_state_and_flushes_on_drop() {
        let dir = std::env::temp_dir().join(format!("netpol-state-writer-{}", std::process::id()));
        let (tx, rx) = std::sync::mpsc::channel();
        let w = Writer::start(
            dir.clone(),
            Box::new(move |_, r| {
                let _ = tx.send(r.map_err(|e| e.to_string()));
            }),
        )
        .expect("writer");
        for generation in 1..=50 {
            w.submit(move || State {
                version: STATE_VERSION,
                generation,
                ..State::default()
            });
        }
        drop(w);
        let written: Vec<_> = rx.try_iter().collect();
        assert!(
            !written.is_empty() && written.iter().all(Result::is_ok),
            "{written:?}"
        );
        assert!(written.len() <= 50);
        let s = State::read(&dir).expect("read").expect("a state file");
        assert_eq!(s.generation, 50, "the last one submitted is on disk");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_state_file_is_none_and_other_versions_are_refused() {
        let dir = std::env::temp_dir().join(format!("netpol-state-none-{}", std::process::id()));
        assert!(State::read(&dir).expect("absent").is_none());
        let e = State::parse(Path::new("s.json"), br#"{"version": 99}"#).expect_err("v99");
        assert!(e.to_string().contains("version 99"), "{e}");
        let e = State::parse(Path::new("s.json"), b"[]").expect_err("not an object");
        assert!(e.to_string().contains("not a netpol state file"), "{e}");
    }

    #[test]
    fn unknown_fields_of_a_newer_writer_are_ignored() {
        let mut v = serde_json::to_value(state()).expect("json");
        v["added_later"] = serde_json::json!({"x": 1});
        let text = serde_json::to_vec(&v).expect("json");
        assert_eq!(
            State::parse(Path::new("s"), &text).expect("parse"),
            state_without_time(&text)
        );
    }

    fn state_without_time(text: &[u8]) -> State {
        let mut s = state();
        let v: serde_json::Value = serde_json::from_slice(text).expect("json");
        s.written_unix_secs = v["written_unix_secs"].as_u64().unwrap_or_default();
        s
    }
}
