//! `ClusterNetworkPolicy` (policy.networking.k8s.io/v1alpha2, bundle
//! v0.2.0), validated: the cluster-wide tiers around `NetworkPolicy`.
//!
//! Each direction of a connection is judged by the Admin tier, then
//! `NetworkPolicy` (final for a pod it isolates), then the Baseline tier,
//! then allowed. In a tier, policies go by `priority` (lower first; equal
//! priorities by name, one of the orders the API leaves open), rules in
//! written order, and the first rule matching the peer and the port
//! decides: Accept, Deny, or Pass (on to the next tier).

use std::fmt;

use ipnet::IpNet;
use serde::Serialize;

use super::{LabelSelector, Protocol};

/// Where a policy sits around `NetworkPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Tier {
    /// Before `NetworkPolicy`: cannot be overridden by namespace owners.
    Admin,
    /// After `NetworkPolicy`, for the directions it leaves unisolated.
    Baseline,
}

impl Tier {
    /// The API's spelling.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Action {
    /// Allowed: no later rule of any tier is looked at.
    Accept,
    /// Denied: no later rule of any tier is looked at.
    Deny,
    /// The rest of this tier is skipped: the next tier decides.
    Pass,
}

impl Action {
    /// The API's spelling.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        }
    }
}

/// The pods a policy applies to (host-networked pods never are).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Subject {
    /// Every pod of the namespaces the selector matches.
    Namespaces(LabelSelector),
    /// Pods matching `pod_selector` in namespaces matching
    /// `namespace_selector` (empty: every namespace).
    Pods {
        /// Namespaces to look in.
        namespace_selector: LabelSelector,
        /// Pods to match.
        pod_selector: LabelSelector,
    },
}

/// A peer of a rule. Ingress rules have only the first two.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ClusterPeer {
    /// Every (networked) pod of the matching namespaces.
    Namespaces(LabelSelector),
    /// Pods of the matching namespaces that match `pod_selector`.
    Pods {
        /// Namespaces to look in (empty: all).
        namespace_selector: LabelSelector,
        /// Pods to match.
        pod_selector: LabelSelector,
    },
    /// Destination addresses inside one of the CIDRs (host bits masked),
    /// pods' and nodes' included.
    Networks(Vec<IpNet>),
    /// The `status.addresses` of the Nodes the selector matches.
    Nodes(LabelSelector),
}

/// One `protocols` entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ClusterPort {
    /// `tcp`/`udp`/`sctp` with `destinationPort` `number` (first = last) or
    /// `range` (inclusive).
    Ports {
        /// Protocol.
        protocol: Protocol,
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// `destinationNamedPort`: a container port of the destination pod
    /// with this name and the connection's protocol.
    Named(String),
}

/// An ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ClusterRule {
    /// `name` (may be empty).
    pub name: String,
    /// `action`.
    pub action: Action,
    /// `from`/`to`: at least one.
    pub peers: Vec<ClusterPeer>,
    /// `protocols`; `None`: every protocol and port.
    pub ports: Option<Vec<ClusterPort>>,
}

/// A validated `ClusterNetworkPolicy`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ClusterNetworkPolicy {
    /// `metadata.name` (cluster-scoped).
    pub name: String,
    /// `spec.tier`.
    pub tier: Tier,
    /// `spec.priority`, 0..=1000.
    pub priority: u16,
    /// `spec.subject`.
    pub subject: Subject,
    /// `spec.ingress` (empty: ingress is not affected).
    pub ingress: Vec<ClusterRule>,
    /// `spec.egress` (empty: egress is not affected).
    pub egress: Vec<ClusterRule>,
    /// Enforced or staged ([`super::STAGED_ANNOTATION`]).
    pub staging: super::Staging,
}

impl ClusterNetworkPolicy {
    /// Whether the policy applies to a pod with these labels in a
    /// namespace with `ns_labels`.
    #[must_use]
    pub fn selects(&self, ns_labels: &super::Labels, labels: &super::Labels) -> bool {
        match &self.subject {
            Subject::Namespaces(ns) => ns.matches(ns_labels),
            Subject::Pods {
                namespace_selector,
                pod_selector,
            } => namespace_selector.matches(ns_labels) && pod_selector.matches(labels),
        }
    }

    /// The order of evaluation inside a tier: priority, then name.
    #[must_use]
    pub fn order(&self) -> (Tier, u16, &str) {
        (self.tier, self.priority, &self.name)
    }
}
