//! Sources of the desired state: they turn what they watch into the typed
//! [`model`](crate::model) once, at the edge, and publish whole
//! [`Input`]s. The sync loop is their only reader.
pub mod files;
pub mod kube;

use std::{
    hash::{Hash, Hasher},
    path::PathBuf,
    sync::Arc,
};

use serde::Serialize;

use crate::{compiler::Changes, model::Snapshot};

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
    /// `NetworkPolicies` (valid or with a version in force).
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
/// configuration, not an object: both are left out.
#[must_use]
pub fn fingerprint(snapshot: &Snapshot) -> String {
    Fingerprint::of(snapshot).to_string()
}

/// [`fingerprint`] as a value the sync loop keeps up to date: the sum of
/// one hash per object, so a change costs the hashes of the objects it
/// touched, not of all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fingerprint(u64);

impl Fingerprint {
    /// The fingerprint of every object of `snapshot`.
    #[must_use]
    pub fn of(snapshot: &Snapshot) -> Self {
        let mut sum = 0u64;
        let mut add = |h: Option<u64>| sum = sum.wrapping_add(h.unwrap_or(0));
        for n in snapshot.nodes.values() {
            add(object_hash(b'N', Some(n)));
        }
        for n in snapshot.namespaces.values() {
            add(object_hash(b'S', Some(n)));
        }
        for p in snapshot.pods.values() {
            add(object_hash(b'P', Some(p)));
        }
        for slot in snapshot.policies.values() {
            add(object_hash(b'Q', slot.in_force.as_ref()));
        }
        for s in snapshot.services.values() {
            add(object_hash(b'V', Some(s)));
        }
        for slot in snapshot.cluster_policies.values() {
            add(object_hash(b'C', slot.in_force.as_ref()));
        }
        Self(sum)
    }

    /// From the fingerprint of `old` to that of `new`, which differs from
    /// it by (at most) `changes`.
    pub fn update(&mut self, old: &Snapshot, new: &Snapshot, changes: &Changes) {
        let mut sum = self.0;
        let mut swap = |before: Option<u64>, after: Option<u64>| {
            sum = sum
                .wrapping_sub(before.unwrap_or(0))
                .wrapping_add(after.unwrap_or(0));
        };
        for k in &changes.nodes {
            swap(
                object_hash(b'N', old.nodes.get(k)),
                object_hash(b'N', new.nodes.get(k)),
            );
        }
        for k in &changes.namespaces {
            swap(
                object_hash(b'S', old.namespaces.get(k)),
                object_hash(b'S', new.namespaces.get(k)),
            );
        }
        for k in &changes.pods {
            swap(
                object_hash(b'P', old.pods.get(k)),
                object_hash(b'P', new.pods.get(k)),
            );
        }
        for k in &changes.policies {
            swap(
                object_hash(b'Q', old.policies.get(k).and_then(|s| s.in_force.as_ref())),
                object_hash(b'Q', new.policies.get(k).and_then(|s| s.in_force.as_ref())),
            );
        }
        for k in &changes.services {
            swap(
                object_hash(b'V', old.services.get(k)),
                object_hash(b'V', new.services.get(k)),
            );
        }
        for k in &changes.cluster_policies {
            let in_force = |s: &Snapshot| {
                object_hash(
                    b'C',
                    s.cluster_policies.get(k).and_then(|s| s.in_force.as_ref()),
                )
            };
            swap(in_force(old), in_force(new));
        }
        self.0 = sum;
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One object's share of a [`Fingerprint`]: its kind and its content, as
/// the model's derived `Hash` feeds it (ordered maps, so equal objects
/// hash equally whatever order they were built in).
fn object_hash<T: Hash>(kind: u8, object: Option<&T>) -> Option<u64> {
    let mut h = Fnv1a::default();
    h.write_u8(kind);
    object?.hash(&mut h);
    Some(h.finish())
}

/// FNV-1a, 64 bits: the same for every process of one build (std's
/// hashers are seeded per process), which is all a fingerprint compares;
/// collisions only cost a test a false wait. Fed by `Hash`, not by the
/// objects' JSON: no keys or quotes, nothing written out (at 100,000 pods
/// the JSON took 0.13 s of the first apply).
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
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
    fn fingerprint_updated_by_a_change_set_equals_the_full_one() {
        let ns = |n: &str, l: &str| {
            format!(
                "{{apiVersion: v1, kind: Namespace, metadata: {{name: {n}, labels: {{x: {l}}}}}}}"
            )
        };
        let pol = |n: &str| {
            format!(
                "{{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {{name: {n}, \
                 namespace: a}}, spec: {{podSelector: {{}}}}}}"
            )
        };
        let old = snap(&[ns("a", "1"), ns("b", "1"), pol("p"), pol("q")].join("\n---\n"));
        // Derived from `old` (as a source's next version is): one namespace
        // relabelled, one gone, one new; one policy gone, one new.
        let mut new = old.clone();
        apply_str(
            &mut new,
            &[ns("a", "2"), ns("c", "1"), pol("r")].join("\n---\n"),
            "t",
            &mut LoadReport::default(),
        );
        new.namespaces.remove("b");
        new.policies.remove(&crate::model::ObjectRef::new("a", "q"));
        let changes = Changes::between(&old, &new);
        let mut fp = Fingerprint::of(&old);
        fp.update(&old, &new, &changes);
        assert_eq!(fp, Fingerprint::of(&new));
        assert_ne!(fp, Fingerprint::of(&old));
    }
}
