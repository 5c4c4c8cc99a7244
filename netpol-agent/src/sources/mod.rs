//! Sources of the desired state: they turn what they watch into the typed
//! [`model`](crate::model) once, at the edge, and publish whole
//! [`Input`]s. The sync loop is their only reader.
pub mod files;
pub mod kube;

use std::{path::PathBuf, sync::Arc};

use serde::Serialize;

use crate::model::Snapshot;

pub use self::kube::{KubeConnection, SourceHealth, StoreHealth};

/// Where the agent reads the cluster's objects from.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Source {
    /// A folder of multi-document YAML/JSON manifests, watched for changes.
    Files(PathBuf),
    /// The Kubernetes API (needs the node name).
    Kube(KubeConnection),
}

/// One consistent view of a source: the model, and what could not be read.
#[derive(Clone, Debug, Default)]
pub struct Input {
    /// The objects, converted.
    pub snapshot: Snapshot,
    /// Documents and files that were skipped, each naming its file (and
    /// document), plus the errors of the latest version of each object.
    pub problems: Vec<String>,
}

/// Latest [`Input`] of a source; `None` until its first full read.
pub type InputSender = tokio::sync::watch::Sender<Option<Arc<Input>>>;

/// The agent's view of the objects an [`Input`] holds, per kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ObjectCounts {
    /// Nodes.
    pub nodes: usize,
    /// Namespaces.
    pub namespaces: usize,
    /// Pods.
    pub pods: usize,
    /// NetworkPolicies (valid or with a version in force).
    pub policies: usize,
    /// Services.
    pub services: usize,
}

impl ObjectCounts {
    /// Counts the snapshot's objects.
    #[must_use]
    pub fn of(snapshot: &Snapshot) -> Self {
        Self {
            nodes: snapshot.nodes.len(),
            namespaces: snapshot.namespaces.len(),
            pods: snapshot.pods.len(),
            policies: snapshot.policies.len(),
            services: snapshot.services.len(),
        }
    }
}

/// Hash of the objects a state is compiled from: equal inputs give equal
/// fingerprints, whichever source or order they came in. A test that wrote
/// manifests computes it over its own [`Snapshot`] and waits for the agent
/// to report it on `/status`.
///
/// Covers Nodes, Namespaces, Pods, the policy versions in force and the
/// Services (the frontends written to the maps). Errors of rejected versions
/// do not change what is compiled, and the local node name is
/// configuration, not an object: both are left out. An input without
/// Services has the fingerprint it had before Services were covered.
#[must_use]
pub fn fingerprint(snapshot: &Snapshot) -> String {
    #[derive(Serialize)]
    struct Canonical<'a> {
        nodes: Vec<&'a crate::model::Node>,
        namespaces: Vec<&'a crate::model::Namespace>,
        pods: Vec<&'a crate::model::Pod>,
        policies: Vec<&'a crate::model::NetworkPolicy>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        services: Vec<&'a crate::model::Service>,
    }
    let canonical = Canonical {
        nodes: snapshot.nodes.values().collect(),
        namespaces: snapshot.namespaces.values().collect(),
        pods: snapshot.pods.values().collect(),
        policies: snapshot
            .policies
            .values()
            .filter_map(|s| s.in_force.as_ref())
            .collect(),
        services: snapshot.services.values().collect(),
    };
    // BTreeMaps give a stable order, so the JSON text is canonical.
    let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
    format!("{:016x}", fnv1a(&bytes))
}

/// FNV-1a, 64 bits: stable across builds and platforms (std's hashers are
/// not), and collisions only cost a test a false wait.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifests::{LoadReport, apply_str};

    fn snap(text: &str) -> Snapshot {
        let mut s = Snapshot::default();
        apply_str(&mut s, text, "t", &mut LoadReport::default());
        s
    }

    #[test]
    fn fingerprint_ignores_document_order_and_follows_content() {
        let a = "{apiVersion: v1, kind: Namespace, metadata: {name: a}}";
        let b = "{apiVersion: v1, kind: Namespace, metadata: {name: b}}";
        let ab = fingerprint(&snap(&format!("{a}\n---\n{b}")));
        let ba = fingerprint(&snap(&format!("{b}\n---\n{a}")));
        assert_eq!(ab, ba);
        assert_ne!(ab, fingerprint(&snap(a)));
        assert_eq!(ab.len(), 16);
    }

    #[test]
    fn fingerprint_follows_service_frontends() {
        let ns = "{apiVersion: v1, kind: Namespace, metadata: {name: a}}";
        let svc = |ip: &str| {
            format!(
                "{ns}\n---\n{{apiVersion: v1, kind: Service, metadata: {{name: s, namespace: a}}, \
                 spec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}}}"
            )
        };
        let base = fingerprint(&snap(ns));
        let one = fingerprint(&snap(&svc("10.43.0.1")));
        assert_ne!(base, one);
        assert_ne!(one, fingerprint(&snap(&svc("10.43.0.2"))));
        assert_eq!(one, fingerprint(&snap(&svc("10.43.0.1"))));
    }

    #[test]
    fn fingerprint_without_services_is_unchanged_by_their_support() {
        // FNV-1a of the canonical JSON as it was before Services were
        // covered: harnesses that pinned a fingerprint keep it.
        let s = snap("{apiVersion: v1, kind: Namespace, metadata: {name: a}}");
        let bytes = br#"{"nodes":[],"namespaces":[{"name":"a","labels":{"kubernetes.io/metadata.name":"a"}}],"pods":[],"policies":[]}"#;
        assert_eq!(fingerprint(&s), format!("{:016x}", fnv1a(bytes)));
    }
}
