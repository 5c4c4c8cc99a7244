//! Manifests: snapshots of fixtures, and the folder an agent watches.
use std::path::PathBuf;

use netpol_agent::{
    fingerprint,
    model::{
        Snapshot,
        folder::Folder,
        manifests::{LoadReport, apply_str},
    },
};

use crate::{netns::unique, topology::Pod};

/// The snapshot of `manifests`, every one of which must be valid: an
/// invalid fixture would otherwise test less than it claims.
pub fn snapshot(manifests: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut report = LoadReport::default();
    apply_str(&mut snap, manifests, "test", &mut report);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    snap
}

/// The node `n1` (10.0.0.1, fd00::1) and the namespace `x`.
pub const BASE: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}, {type: InternalIP, address: "fd00::1"}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
"#;

/// The running pod `x/<name>` (label `app: <name>`) on `n1`, with `p`'s
/// addresses.
pub fn pod_manifest(name: &str, p: &Pod) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{app: {name}}}}}\n\
         spec: {{nodeName: n1, containers: [{{name: c}}]}}\n\
         status: {{phase: Running, podIPs: {}}}\n",
        p.pod_ips()
    )
}

/// `NetworkPolicy` `x/a-only-from-nobody`: ingress of the pods labelled
/// `app: a` only from pods labelled `app: nobody` (none): every pod is
/// denied, the node's own traffic passes.
pub const DENY_A: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-only-from-nobody, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: nobody}}}]}]
"#;

/// `ClusterNetworkPolicy` `guard` (Admin, priority 1) for the ingress of
/// the pods labelled `app: <subject>`: rule 0 passes TCP `pass_port` from
/// every namespace, rule 1 denies everything from the pods labelled
/// `app: <denied>`.
pub fn guard_manifest(subject: &str, pass_port: u16, denied: &str) -> String {
    format!(
        r"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: guard}}
spec:
  tier: Admin
  priority: 1
  subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: {subject}}}}}}}}}
  ingress:
  - name: pass-{pass_port}
    action: Pass
    from: [{{namespaces: {{}}}}]
    protocols: [{{tcp: {{destinationPort: {{number: {pass_port}}}}}}}]
  - name: deny-{denied}
    action: Deny
    from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: {denied}}}}}}}}}]
"
    )
}

/// A manifests folder (the agent's `--manifests`), removed on drop.
pub struct Manifests(pub PathBuf);

impl Manifests {
    pub fn new() -> Self {
        let p = std::env::temp_dir().join(unique("netpol-manifests-"));
        std::fs::create_dir_all(&p).expect("manifests folder");
        Self(p)
    }

    /// Writes a file atomically (the agent never reads half of it).
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("writing a manifest");
        std::fs::rename(&tmp, self.0.join(name)).expect("renaming a manifest");
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.0.join(name));
    }

    /// What the agent must report once it enforces this folder.
    pub fn fingerprint(&self) -> String {
        let loaded = Folder::load(&self.0).expect("loading the manifests");
        fingerprint(&loaded.snapshot)
    }
}

impl Default for Manifests {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Manifests {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
