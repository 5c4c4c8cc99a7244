//! Typed model of the cluster objects the compiler reads.
//!
//! The Kubernetes boundary is a conversion ([`convert`]): k8s-openapi types
//! stop here, defaulted and validated the way the API server would (the
//! files source gets neither), so the compiler only ever sees well-formed
//! values. [`manifests`] loads a folder of multi-document YAML/JSON into a
//! [`Snapshot`].

pub mod cluster_policy;
pub mod convert;
pub mod folder;
pub mod manifests;
pub mod strict;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

pub use cluster_policy::{
    Action, ClusterNetworkPolicy, ClusterPeer, ClusterPort, ClusterRule, Subject, Tier,
};

use ipnet::IpNet;
use serde::Serialize;

/// Labels of a pod or namespace.
pub type Labels = BTreeMap<String, String>;

/// Label every namespace carries (set by the API server; added by the
/// conversion when a manifest lacks it).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Pod annotation opting a pod out of anti-spoofing: with the value
/// `"true"` (exactly), the pod may send from addresses that are not its own
/// (it routes other addresses) and its endpoint gets
/// `netpol_common::endpoint_flags::ALLOW_ANY_SOURCE`. Any other value, or
/// no annotation, keeps the check.
pub const ALLOW_ANY_SOURCE_ANNOTATION: &str = "netpol.io/allow-any-source";

/// Policy annotation (`NetworkPolicy`, `ClusterNetworkPolicy`): with the
/// value `"true"` the policy is staged: not enforced, judged beside the
/// enforced ones (see [`Staging`]). `"false"` or no annotation: enforced;
/// any other value makes the object invalid.
pub const STAGED_ANNOTATION: &str = "netpol.io/staged";

/// Policy annotation: with `"true"` the policy stays enforced and the
/// staged view leaves it out (what deleting it would do).
pub const STAGED_DELETE_ANNOTATION: &str = "netpol.io/staged-delete";

/// Whether a policy is enforced, and in which view it counts. The
/// enforced view holds the `Enforced` and `StagedDelete` policies; the
/// staged view the `Enforced` and `Staged` ones. Removing the annotation
/// promotes the change: a staged policy becomes enforced, a staged delete
/// leaves the staged view's policies as they were, now enforced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Staging {
    /// No annotation: enforced, in both views.
    #[default]
    Enforced,
    /// [`STAGED_ANNOTATION`]: in the staged view only.
    Staged,
    /// [`STAGED_DELETE_ANNOTATION`]: in the enforced view only.
    StagedDelete,
}

impl Staging {
    /// Whether the policy counts in the enforced view.
    #[must_use]
    pub const fn enforced(self) -> bool {
        !matches!(self, Staging::Staged)
    }

    /// Whether it counts in the staged view.
    #[must_use]
    pub const fn in_staged_view(self) -> bool {
        !matches!(self, Staging::StagedDelete)
    }
}

/// A namespaced object's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectRef {
    /// Builds a reference.
    #[must_use]
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An invalid field of an object, as `x/deny-all: spec.ingress[1].ports[0].endPort: less than port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{object}: {}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct ModelError {
    /// Kind of the object (`NetworkPolicy`, `Pod`, ...).
    pub kind: String,
    /// `namespace/name`, or `name` for cluster-scoped objects.
    pub object: String,
    /// JSON path of the field, e.g. `spec.ingress[1].ports[0].endPort`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// Transport protocol a policy port names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
}

impl Protocol {
    /// Every protocol, in order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// IP protocol number.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    /// Kubernetes spelling.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Parses the Kubernetes spelling.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A declared container port (only named ones matter to policies, but all
/// are kept for the inspection tools).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ContainerPort {
    /// `name`, if any.
    pub name: Option<String>,
    /// `containerPort`.
    pub port: u16,
    /// `protocol` (default TCP).
    pub protocol: Protocol,
}

/// `status.phase` of a pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PodPhase {
    /// Pending (or missing).
    #[default]
    Pending,
    /// Running.
    Running,
    /// Succeeded: terminal.
    Succeeded,
    /// Failed: terminal.
    Failed,
    /// Unknown.
    Unknown,
}

/// A pod, reduced to what policies look at.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Pod {
    /// Namespace and name.
    pub id: ObjectRef,
    /// `metadata.uid`: a recreated pod of the same name is another endpoint.
    pub uid: Option<String>,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// `status.phase`.
    pub phase: PodPhase,
    /// `status.podIPs` (or `status.podIP`), deduplicated, in order.
    pub ips: Vec<IpAddr>,
    /// Every container's ports.
    pub ports: Vec<ContainerPort>,
    /// Annotated [`ALLOW_ANY_SOURCE_ANNOTATION`]` = "true"`: the only
    /// annotation the compiler reads.
    pub allow_any_source: bool,
}

impl Pod {
    /// Whether the pod takes part in pod networking: neither host-network,
    /// nor without addresses, nor finished. Only such pods are endpoints
    /// or peers.
    #[must_use]
    pub fn is_networked(&self) -> bool {
        !self.host_network
            && !self.ips.is_empty()
            && !matches!(self.phase, PodPhase::Succeeded | PodPhase::Failed)
    }

    /// The number of the container port named `name` with `protocol`.
    #[must_use]
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }
}

/// A namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels, always including [`NAMESPACE_NAME_LABEL`].
    pub labels: Labels,
}

/// A node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Node {
    /// Name.
    pub name: String,
    /// IP addresses of `status.addresses` (host names dropped).
    pub addresses: Vec<IpAddr>,
    /// `metadata.labels`: what a `ClusterNetworkPolicy`'s `nodes` peer
    /// selects.
    pub labels: Labels,
}

/// One port of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePort {
    /// `port`: the port of the cluster, external and load-balancer IPs.
    pub port: u16,
    /// `protocol` (default TCP).
    pub protocol: Protocol,
    /// `nodePort` (absent or 0: none): the port on every node address.
    pub node_port: Option<u16>,
}

/// A Service, reduced to its frontends: the addresses and ports kube-proxy
/// translates to a backend.
///
/// kube-proxy skips a Service without a cluster IP to translate: headless
/// (`clusterIP: None`) and `ExternalName` Services have no frontend at all
/// (no address, no node port). A manifest of the files source that leaves
/// `clusterIP` out (not allocated, as the API server would) keeps its other
/// frontends.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Service {
    /// Namespace and name.
    pub id: ObjectRef,
    /// `spec.clusterIPs` (or `spec.clusterIP`), deduplicated, in order.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs`, deduplicated, in order.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` of the ingress points kube-proxy
    /// translates (`ipMode` `VIP`, the default; `Proxy` ones are reached
    /// through the load balancer), deduplicated, in order.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
}

/// Operator of a label selector requirement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Operator {
    /// The label is present with one of the values.
    In(BTreeSet<String>),
    /// The label is absent or has none of the values.
    NotIn(BTreeSet<String>),
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// Operator and values.
    pub operator: Operator,
}

impl Requirement {
    /// Whether `labels` satisfy the requirement.
    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            Operator::In(values) => value.is_some_and(|v| values.contains(v)),
            Operator::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct LabelSelector {
    /// `matchLabels`.
    pub match_labels: Labels,
    /// `matchExpressions`.
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// Whether `labels` satisfy every term.
    #[must_use]
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    /// Whether the selector has no term (matches everything).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

/// A policy peer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector`.
    Pods {
        /// Pods to match (`None`: every pod of the selected namespaces).
        pod_selector: Option<LabelSelector>,
        /// Namespaces to look in (`None`: the policy's own namespace).
        namespace_selector: Option<LabelSelector>,
    },
    /// `ipBlock`.
    IpBlock {
        /// `cidr`, truncated to its network.
        cidr: IpNet,
        /// `except`, each strictly inside `cidr` and of its family.
        except: Vec<IpNet>,
    },
}

/// The port part of a policy port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum PortSpec {
    /// No `port`: every port of the protocol.
    All,
    /// `port` (and `endPort`): `first..=last`.
    Range {
        /// First port.
        first: u16,
        /// Last port (= `first` without `endPort`).
        last: u16,
    },
    /// A named port, resolved against the destination pod.
    Named(String),
}

/// One `ports` entry of a rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyPort {
    /// `protocol` (default TCP).
    pub protocol: Protocol,
    /// `port`/`endPort`.
    pub port: PortSpec,
}

/// An ingress or egress rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Rule {
    /// `from`/`to`; empty matches every peer.
    pub peers: Vec<Peer>,
    /// `ports`; empty matches every port and protocol.
    pub ports: Vec<PolicyPort>,
}

/// A validated, defaulted `NetworkPolicy`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct NetworkPolicy {
    /// Namespace and name.
    pub id: ObjectRef,
    /// `spec.podSelector`.
    pub pod_selector: LabelSelector,
    /// Ingress rules if `Ingress` is among the (defaulted) policy types.
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules if `Egress` is among the (defaulted) policy types.
    pub egress: Option<Vec<Rule>>,
    /// Enforced or staged ([`STAGED_ANNOTATION`]).
    pub staging: Staging,
}

/// A policy as the compiler sees it: the version in force and the errors of
/// the latest one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicySlot<P = NetworkPolicy> {
    /// The last valid version: enforcement never drops because a policy
    /// became invalid.
    pub in_force: Option<P>,
    /// Errors of the latest version (empty when it is the one in force).
    pub errors: Vec<ModelError>,
}

/// The snapshot's ordered maps: persistent (a clone shares every node with
/// the original and costs O(1); a change copies one path), so the source,
/// the loop and the state writer each hold a version without a copy of the
/// objects.
pub type Map<K, V> = imbl::OrdMap<K, V>;

/// Keeps the entries of `map` for which `keep` holds ([`Map`] has no
/// `retain`); entries kept are not copied.
pub fn retain<K: Ord + Clone, V: Clone>(map: &mut Map<K, V>, mut keep: impl FnMut(&K, &V) -> bool) {
    let gone: Vec<K> = map
        .iter()
        .filter(|(k, v)| !keep(k, v))
        .map(|(k, _)| k.clone())
        .collect();
    for k in gone {
        map.remove(&k);
    }
}

/// `new`'s entries on `old`'s structure: an entry equal to `old`'s is
/// `old`'s, so the two versions share it and comparing them
/// ([`Map::diff`]) skips it.
#[must_use]
pub fn rebase<K: Ord + Clone, V: Clone + PartialEq>(old: &Map<K, V>, new: Map<K, V>) -> Map<K, V> {
    // The first list: nothing to share.
    if old.is_empty() {
        return new;
    }
    let mut out = old.clone();
    for k in old.keys() {
        if !new.contains_key(k) {
            out.remove(k);
        }
    }
    // By reference: consuming an imbl map clones every value; this way
    // only the entries that changed are cloned.
    for (k, v) in &new {
        if old.get(k) != Some(v) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Everything the compiler reads. A plain value: sources build it, the
/// compiler reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Name of the node whose maps are compiled (`None`: the only Node).
    pub local_node: Option<String>,
    /// Nodes by name.
    pub nodes: Map<String, Node>,
    /// Namespaces by name.
    pub namespaces: Map<String, Namespace>,
    /// Pods.
    pub pods: Map<ObjectRef, Pod>,
    /// `NetworkPolicies` with their last valid version.
    pub policies: Map<ObjectRef, PolicySlot>,
    /// Services (their frontends).
    pub services: Map<ObjectRef, Service>,
    /// `ClusterNetworkPolicies` by name, with their last valid version.
    pub cluster_policies: Map<String, PolicySlot<ClusterNetworkPolicy>>,
    /// Errors of rejected pods, namespaces, nodes and Services, by kind and
    /// name. A rejected update leaves the last valid version in the
    /// snapshot.
    pub invalid: BTreeMap<(String, String), Vec<ModelError>>,
}

/// Kind of an object the snapshot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// v1 Node.
    Node,
    /// v1 Namespace.
    Namespace,
    /// v1 Pod.
    Pod,
    /// networking.k8s.io/v1 `NetworkPolicy`.
    NetworkPolicy,
    /// v1 Service.
    Service,
    /// policy.networking.k8s.io/v1alpha2 `ClusterNetworkPolicy`
    /// (cluster-scoped).
    ClusterNetworkPolicy,
}

impl Snapshot {
    /// This snapshot sharing with `old` every object they have in common
    /// (see [`rebase`]): for a source that builds a version from scratch.
    #[must_use]
    pub fn rebased_on(self, old: &Snapshot) -> Snapshot {
        Snapshot {
            local_node: self.local_node,
            nodes: rebase(&old.nodes, self.nodes),
            namespaces: rebase(&old.namespaces, self.namespaces),
            pods: rebase(&old.pods, self.pods),
            policies: rebase(&old.policies, self.policies),
            services: rebase(&old.services, self.services),
            cluster_policies: rebase(&old.cluster_policies, self.cluster_policies),
            invalid: self.invalid,
        }
    }

    /// The node whose pods are local: [`Snapshot::local_node`], or the only
    /// Node.
    #[must_use]
    pub fn local_node_name(&self) -> Option<&str> {
        match &self.local_node {
            Some(n) => Some(n),
            None if self.nodes.len() == 1 => self.nodes.keys().next().map(String::as_str),
            None => None,
        }
    }

    /// Adds or replaces a policy. An invalid new version keeps the last
    /// valid one in force and records its errors.
    pub fn upsert_policy(&mut self, policy: Result<NetworkPolicy, (ObjectRef, Vec<ModelError>)>) {
        match policy {
            Ok(p) => {
                self.policies.insert(
                    p.id.clone(),
                    PolicySlot {
                        in_force: Some(p),
                        errors: Vec::new(),
                    },
                );
            }
            Err((id, errors)) => {
                let slot = self.policies.entry(id).or_insert(PolicySlot {
                    in_force: None,
                    errors: Vec::new(),
                });
                slot.errors = errors;
            }
        }
    }

    /// Adds or replaces a `ClusterNetworkPolicy`, as
    /// [`Snapshot::upsert_policy`] does a `NetworkPolicy`.
    pub fn upsert_cluster_policy(
        &mut self,
        policy: Result<ClusterNetworkPolicy, (String, Vec<ModelError>)>,
    ) {
        match policy {
            Ok(p) => {
                self.cluster_policies.insert(
                    p.name.clone(),
                    PolicySlot {
                        in_force: Some(p),
                        errors: Vec::new(),
                    },
                );
            }
            Err((name, errors)) => {
                let slot = self.cluster_policies.entry(name).or_insert(PolicySlot {
                    in_force: None,
                    errors: Vec::new(),
                });
                slot.errors = errors;
            }
        }
    }

    /// Adds or replaces a pod.
    pub fn upsert_pod(&mut self, pod: Pod) {
        self.invalid.remove(&("Pod".to_owned(), pod.id.to_string()));
        self.pods.insert(pod.id.clone(), pod);
    }

    /// Adds or replaces a namespace.
    pub fn upsert_namespace(&mut self, ns: Namespace) {
        self.invalid
            .remove(&("Namespace".to_owned(), ns.name.clone()));
        self.namespaces.insert(ns.name.clone(), ns);
    }

    /// Adds or replaces a Service.
    pub fn upsert_service(&mut self, service: Service) {
        self.invalid
            .remove(&("Service".to_owned(), service.id.to_string()));
        self.services.insert(service.id.clone(), service);
    }

    /// Adds or replaces a node.
    pub fn upsert_node(&mut self, node: Node) {
        self.nodes.insert(node.name.clone(), node);
    }

    /// Removes an object. Removing a namespace removes its pods, policies
    /// and Services, as the API server's namespace deletion does.
    pub fn remove(&mut self, kind: Kind, namespace: &str, name: &str) {
        let id = ObjectRef::new(namespace, name);
        match kind {
            Kind::Node => {
                self.nodes.remove(name);
            }
            Kind::Namespace => {
                self.namespaces.remove(name);
                retain(&mut self.pods, |k, _| k.namespace != name);
                retain(&mut self.policies, |k, _| k.namespace != name);
                retain(&mut self.services, |k, _| k.namespace != name);
            }
            Kind::Pod => {
                self.pods.remove(&id);
            }
            Kind::NetworkPolicy => {
                self.policies.remove(&id);
            }
            Kind::Service => {
                self.services.remove(&id);
            }
            Kind::ClusterNetworkPolicy => {
                self.cluster_policies.remove(name);
            }
        }
    }

    /// Labels of a namespace; a namespace without an object still has its
    /// name label, as the API server guarantees.
    #[must_use]
    pub fn namespace_labels(&self, name: &str) -> Labels {
        match self.namespaces.get(name) {
            Some(ns) => ns.labels.clone(),
            None => Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned())]),
        }
    }

    /// Every error of the latest objects: rejected pods, namespaces, nodes,
    /// Services and policies.
    #[must_use]
    pub fn errors(&self) -> Vec<ModelError> {
        let mut out: Vec<ModelError> = self.invalid.values().flatten().cloned().collect();
        out.extend(
            self.policies
                .values()
                .flat_map(|s| s.errors.iter().cloned()),
        );
        out.extend(
            self.cluster_policies
                .values()
                .flat_map(|s| s.errors.iter().cloned()),
        );
        out
    }

    /// Whether some policy in force is staged or staged for deletion
    /// ([`Staging`]).
    #[must_use]
    pub fn has_staged(&self) -> bool {
        let staged = |s: Staging| s != Staging::Enforced;
        self.policies
            .values()
            .filter_map(|s| s.in_force.as_ref())
            .any(|p| staged(p.staging))
            || self
                .cluster_policies
                .values()
                .filter_map(|s| s.in_force.as_ref())
                .any(|p| staged(p.staging))
    }

    /// The enforced and the staged view ([`Staging`]), when some policy is
    /// staged; `None` when both would be this snapshot. A policy a view
    /// leaves out keeps its slot there without a version in force, so
    /// both views report the same errors.
    #[must_use]
    pub fn views(&self) -> Option<Views> {
        if !self.has_staged() {
            return None;
        }
        // Each view is a snapshot without staging: its policies enforced,
        // the others without a version in force.
        let view = |keep: fn(Staging) -> bool| {
            let mut v = self.clone();
            restage(&mut v.policies, keep);
            restage(&mut v.cluster_policies, keep);
            v
        };
        Some(Views {
            enforced: view(Staging::enforced),
            staged: view(Staging::in_staged_view),
        })
    }
}

/// A policy that can be staged.
trait Staged {
    fn staging_mut(&mut self) -> &mut Staging;
    fn staging(&self) -> Staging;
}

impl Staged for NetworkPolicy {
    fn staging_mut(&mut self) -> &mut Staging {
        &mut self.staging
    }
    fn staging(&self) -> Staging {
        self.staging
    }
}

impl Staged for ClusterNetworkPolicy {
    fn staging_mut(&mut self) -> &mut Staging {
        &mut self.staging
    }
    fn staging(&self) -> Staging {
        self.staging
    }
}

/// In one view ([`Snapshot::views`]): the staged policies `keep` keeps
/// become enforced, the others lose their version in force.
fn restage<K: Ord + Clone, P: Clone + Staged>(
    slots: &mut Map<K, PolicySlot<P>>,
    keep: fn(Staging) -> bool,
) {
    let marked: Vec<K> = slots
        .iter()
        .filter(|(_, s)| {
            s.in_force
                .as_ref()
                .is_some_and(|p| p.staging() != Staging::Enforced)
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in marked {
        if let Some(slot) = slots.get_mut(&k) {
            match slot.in_force.as_mut().map(Staged::staging_mut) {
                Some(s) if keep(*s) => *s = Staging::Enforced,
                _ => slot.in_force = None,
            }
        }
    }
}

/// A snapshot's two views when some policy is staged
/// ([`Snapshot::views`]).
#[derive(Clone, Debug)]
pub struct Views {
    /// What the datapath enforces.
    pub enforced: Snapshot,
    /// What it would enforce with every staged change promoted.
    pub staged: Snapshot,
}

#[cfg(test)]
mod tests {
    use super::manifests::{LoadReport, apply_str};
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn req(key: &str, operator: Operator) -> LabelSelector {
        LabelSelector {
            match_labels: Labels::new(),
            match_expressions: vec![Requirement {
                key: key.to_owned(),
                operator,
            }],
        }
    }

    #[test]
    fn a_rebased_map_equals_the_new_one() {
        let old: Map<u32, &str> = (0u32..200).map(|i| (i, "a")).collect();
        let mut new: Map<u32, &str> = (1u32..201).map(|i| (i, "a")).collect();
        new.insert(7, "b");
        let rebased = rebase(&old, new.clone());
        assert_eq!(rebased, new);
        let changed: Vec<u32> = old
            .diff(&rebased)
            .map(|d| match d {
                imbl::ordmap::DiffItem::Add(k, _)
                | imbl::ordmap::DiffItem::Remove(k, _)
                | imbl::ordmap::DiffItem::Update { old: (k, _), .. } => *k,
            })
            .collect();
        assert_eq!(changed, vec![0, 7, 200]);
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::default().matches(&Labels::new()));
    }

    #[test]
    fn not_in_matches_pods_without_the_label() {
        let s = req("app", Operator::NotIn(["web".to_owned()].into()));
        assert!(s.matches(&Labels::new()));
        assert!(s.matches(&l(&[("app", "db")])));
        assert!(!s.matches(&l(&[("app", "web")])));
    }

    #[test]
    fn in_exists_and_does_not_exist_follow_the_label() {
        let s = req("app", Operator::In(["web".to_owned()].into()));
        assert!(s.matches(&l(&[("app", "web")])) && !s.matches(&Labels::new()));
        assert!(req("app", Operator::Exists).matches(&l(&[("app", "")])));
        assert!(!req("app", Operator::DoesNotExist).matches(&l(&[("app", "")])));
    }

    #[test]
    fn broken_yaml_is_reported_once_and_ends_the_file() {
        let mut s = Snapshot::default();
        let mut r = LoadReport::default();
        // A separator indented into a mapping: serde_yaml's iterator would
        // repeat this error forever.
        apply_str(
            &mut s,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n    ---\nkind: [\n",
            "t",
            &mut r,
        );
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    }

    #[test]
    fn loader_reads_lists_skips_unknown_kinds_and_reports_bad_documents() {
        let mut s = Snapshot::default();
        let mut r = LoadReport::default();
        apply_str(
            &mut s,
            r#"
apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Namespace, metadata: {name: x}}
  - {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: x}, status: {podIP: 10.0.0.1}}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x}
status: {podIPs: [{ip: not-an-ip}]}
---
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "x"}}
"#,
            "t",
            &mut r,
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.notes.len(), 1);
        assert_eq!(s.namespaces["x"].labels[NAMESPACE_NAME_LABEL], "x");
        assert_eq!(s.pods.len(), 1, "an invalid new pod is left out");
        let errs = s.errors();
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].to_string(),
            "x/b: status.podIPs[0].ip: invalid IP address \"not-an-ip\""
        );
    }
}
