//! The `files` source: a folder of multi-document YAML/JSON manifests,
//! watched with `notify`.
//!
//! Each file is converted on its own into a fragment of the model; the
//! [`Input`] is the union of the fragments in file-name order (a later file
//! wins on a name clash). A file is re-read only when its text changed, and
//! its new fragment starts from its previous one, so that:
//! - an object whose new version is invalid keeps its last valid version
//!   (the model's own retention), while its errors are reported;
//! - an object removed from the file is removed from the model;
//! - a file that is not YAML at all is reported by name and skipped: its
//!   previous fragment stays in force until it reads again.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::Watcher as _;
use serde::Deserialize as _;

use super::{Input, InputSender};
use crate::model::{
    Snapshot,
    manifests::{LoadReport, apply_value},
};

/// The manifests folder cannot be read or watched.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// Listing the folder failed.
    #[error("reading manifests folder {path}: {source}")]
    Read {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The watch could not be set up.
    #[error("watching manifests folder {path}: {source}")]
    Watch {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: notify::Error,
    },
}

#[derive(Debug, Default)]
struct FileState {
    text: String,
    fragment: Snapshot,
    problems: Vec<String>,
}

/// The folder's files and their converted fragments.
#[derive(Debug)]
pub struct FilesSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

/// `(kind, namespace, name)` of an object a file names.
type Key = (String, String, String);

impl FilesSource {
    /// A source over `dir`; nothing is read until [`Self::rescan`].
    #[must_use]
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// The folder.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the folder again, re-converting the files whose text changed,
    /// and returns the union.
    ///
    /// # Errors
    /// When the folder itself cannot be listed; unreadable or broken files
    /// are problems of the returned [`Input`].
    pub fn rescan(&mut self) -> Result<Input, FilesError> {
        let paths = crate::model::manifests::manifest_files(&self.dir).map_err(|source| {
            FilesError::Read {
                path: self.dir.clone(),
                source,
            }
        })?;
        let present: BTreeSet<PathBuf> = paths.iter().cloned().collect();
        self.files.retain(|p, _| present.contains(p));
        for path in paths {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                // Deleted between listing and reading: the next event
                // rescans.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.files.remove(&path);
                    continue;
                }
                Err(e) => {
                    let state = self.files.entry(path.clone()).or_default();
                    state.problems = vec![format!("{}: unreadable, skipped: {e}", path.display())];
                    continue;
                }
            };
            let state = self.files.entry(path.clone()).or_default();
            if state.text == text && !state.text.is_empty() {
                continue;
            }
            convert_file(&path, &text, state);
            state.text = text;
        }
        Ok(self.merged())
    }

    fn merged(&self) -> Input {
        let mut snapshot = Snapshot::default();
        let mut problems = Vec::new();
        for state in self.files.values() {
            let f = &state.fragment;
            snapshot
                .nodes
                .extend(f.nodes.iter().map(|(k, v)| (k.clone(), v.clone())));
            snapshot
                .namespaces
                .extend(f.namespaces.iter().map(|(k, v)| (k.clone(), v.clone())));
            snapshot
                .pods
                .extend(f.pods.iter().map(|(k, v)| (k.clone(), v.clone())));
            snapshot
                .policies
                .extend(f.policies.iter().map(|(k, v)| (k.clone(), v.clone())));
            snapshot
                .services
                .extend(f.services.iter().map(|(k, v)| (k.clone(), v.clone())));
            snapshot
                .invalid
                .extend(f.invalid.iter().map(|(k, v)| (k.clone(), v.clone())));
            problems.extend(state.problems.iter().cloned());
        }
        Input { snapshot, problems }
    }

    /// Publishes the folder's [`Input`] on `tx` now and after every change
    /// until `stop` turns true. Bursts of file events are coalesced: each
    /// wake-up rescans once.
    ///
    /// # Errors
    /// When the folder cannot be read or watched at the start; later read
    /// errors are logged and retried on the next event.
    pub async fn run(
        mut self,
        tx: InputSender,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), FilesError> {
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Err(e) = &res {
                tracing::warn!(error = %e, "manifest watch error");
            }
            let _ = ev_tx.send(());
        })
        .map_err(|source| FilesError::Watch {
            path: self.dir.clone(),
            source,
        })?;
        watcher
            .watch(&self.dir, notify::RecursiveMode::Recursive)
            .map_err(|source| FilesError::Watch {
                path: self.dir.clone(),
                source,
            })?;
        let mut last = self.rescan()?;
        publish(&tx, &last, &self.dir);
        loop {
            tokio::select! {
                () = crate::sync::stopped(&mut stop) => return Ok(()),
                ev = ev_rx.recv() => if ev.is_none() { return Ok(()) },
            }
            // An editor's save is several events; one rescan covers them.
            tokio::time::sleep(Duration::from_millis(1)).await;
            while ev_rx.try_recv().is_ok() {}
            match self.rescan() {
                Ok(input) => {
                    if input.snapshot != last.snapshot || input.problems != last.problems {
                        publish(&tx, &input, &self.dir);
                        last = input;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "manifests folder unreadable, keeping the last state")
                }
            }
        }
    }
}

fn publish(tx: &InputSender, input: &Input, dir: &Path) {
    for p in &input.problems {
        tracing::warn!(dir = %dir.display(), problem = %p, "manifest problem");
    }
    tracing::debug!(
        dir = %dir.display(),
        pods = input.snapshot.pods.len(),
        policies = input.snapshot.policies.len(),
        services = input.snapshot.services.len(),
        "manifests read"
    );
    tx.send_replace(Some(Arc::new(input.clone())));
}

/// Converts one file's new text into its fragment, starting from the
/// previous fragment so that rejected versions keep the last valid one.
fn convert_file(path: &Path, text: &str, state: &mut FileState) {
    let origin = path.display().to_string();
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => {}
            Ok(v) => docs.push((i, v)),
            Err(e) => {
                tracing::warn!(file = %origin, document = i, error = %e, "broken manifest file skipped");
                state.problems = vec![format!(
                    "{origin}: document {i} is not YAML ({e}); file skipped, its previous \
                     contents stay in force"
                )];
                return;
            }
        }
    }
    let mut fragment = std::mem::take(&mut state.fragment);
    // Errors are those of this version only.
    fragment.invalid.clear();
    for slot in fragment.policies.values_mut() {
        slot.errors.clear();
    }
    let mut seen = BTreeSet::new();
    let mut report = LoadReport::default();
    for (i, value) in docs {
        keys(&value, &mut seen);
        apply_value(&mut fragment, value, &format!("{origin}#{i}"), &mut report);
    }
    let has = |kind: &str, ns: &str, name: &str| {
        seen.contains(&(kind.to_owned(), ns.to_owned(), name.to_owned()))
    };
    fragment.nodes.retain(|n, _| has("Node", "", n));
    fragment.namespaces.retain(|n, _| has("Namespace", "", n));
    fragment
        .pods
        .retain(|id, _| has("Pod", &id.namespace, &id.name));
    fragment
        .policies
        .retain(|id, _| has("NetworkPolicy", &id.namespace, &id.name));
    fragment
        .services
        .retain(|id, _| has("Service", &id.namespace, &id.name));
    let mut problems: Vec<String> = report
        .errors
        .iter()
        .map(|e| format!("{origin}: {e}"))
        .collect();
    problems.extend(fragment.errors().iter().map(|e| format!("{origin}: {e}")));
    for note in &report.notes {
        tracing::debug!(file = %origin, note, "manifest note");
    }
    state.fragment = fragment;
    state.problems = problems;
}

/// Records the objects a document names, valid or not: an object that is
/// still named keeps its last valid version, one that is not is gone.
fn keys(value: &serde_json::Value, out: &mut BTreeSet<Key>) {
    let s =
        |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let kind = s(value.get("kind"));
    if let Some(items) = value.get("items").and_then(|v| v.as_array())
        && kind.ends_with("List")
    {
        for item in items {
            keys(item, out);
        }
        return;
    }
    let meta = value.get("metadata");
    let name = s(meta.and_then(|m| m.get("name")));
    let namespace = match kind.as_str() {
        "Node" | "Namespace" => String::new(),
        _ => meta
            .and_then(|m| m.get("namespace"))
            .and_then(|v| v.as_str())
            .unwrap_or("default")
            .to_owned(),
    };
    out.insert((kind, namespace, name));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectRef;

    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("netpol-files-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("temp dir");
            Self(p)
        }
        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).expect("write");
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const POLICY_80: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
spec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}
";

    #[test]
    fn removed_objects_and_files_leave_the_model() {
        let d = Dir::new("remove");
        d.write(
            "a.yaml",
            "{apiVersion: v1, kind: Namespace, metadata: {name: x}}\n---\n\
             {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: x}, status: {podIP: 10.0.0.1}}",
        );
        d.write("b.yaml", POLICY_80);
        let mut src = FilesSource::new(&d.0);
        let input = src.rescan().expect("rescan");
        assert_eq!(input.snapshot.pods.len(), 1);
        assert_eq!(input.snapshot.policies.len(), 1);
        d.write(
            "a.yaml",
            "{apiVersion: v1, kind: Namespace, metadata: {name: x}}",
        );
        std::fs::remove_file(d.0.join("b.yaml")).expect("rm");
        let input = src.rescan().expect("rescan");
        assert!(input.snapshot.pods.is_empty());
        assert!(input.snapshot.policies.is_empty());
        assert!(input.snapshot.namespaces.contains_key("x"));
    }

    #[test]
    fn broken_file_is_named_and_its_last_contents_stay() {
        let d = Dir::new("broken");
        d.write("p.yaml", POLICY_80);
        let mut src = FilesSource::new(&d.0);
        assert!(src.rescan().expect("rescan").problems.is_empty());
        d.write("p.yaml", "kind: [unclosed\n");
        let input = src.rescan().expect("rescan");
        assert_eq!(input.problems.len(), 1, "{:?}", input.problems);
        assert!(input.problems[0].contains("p.yaml"), "{:?}", input.problems);
        assert!(
            input
                .snapshot
                .policies
                .contains_key(&ObjectRef::new("x", "p"))
        );
    }

    const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: s, namespace: x}
spec: {clusterIP: 10.43.0.1, ports: [{port: 80}]}
";

    #[test]
    fn services_load_keep_their_last_valid_version_and_leave_with_their_file() {
        let d = Dir::new("service");
        d.write("s.yaml", SERVICE);
        let mut src = FilesSource::new(&d.0);
        let id = ObjectRef::new("x", "s");
        let input = src.rescan().expect("rescan");
        let valid = input.snapshot.services[&id].clone();
        assert_eq!(
            valid.cluster_ips,
            vec!["10.43.0.1".parse::<std::net::IpAddr>().expect("ip")]
        );
        d.write("s.yaml", &SERVICE.replace("port: 80", "port: 0"));
        let input = src.rescan().expect("rescan");
        assert_eq!(input.snapshot.services[&id], valid);
        assert!(
            input
                .problems
                .iter()
                .any(|p| p.contains("s.yaml") && p.contains("spec.ports[0].port")),
            "{:?}",
            input.problems
        );
        std::fs::remove_file(d.0.join("s.yaml")).expect("rm");
        let input = src.rescan().expect("rescan");
        assert!(input.snapshot.services.is_empty());
        assert!(input.problems.is_empty(), "{:?}", input.problems);
    }

    #[test]
    fn invalid_policy_keeps_its_last_valid_version() {
        let d = Dir::new("invalid");
        d.write("p.yaml", POLICY_80);
        let mut src = FilesSource::new(&d.0);
        let before = src.rescan().expect("rescan").snapshot.policies[&ObjectRef::new("x", "p")]
            .in_force
            .clone();
        d.write(
            "p.yaml",
            &POLICY_80.replace("port: 80", "port: 80, protocol: ICMP"),
        );
        let input = src.rescan().expect("rescan");
        let slot = &input.snapshot.policies[&ObjectRef::new("x", "p")];
        assert_eq!(slot.in_force, before);
        assert!(!slot.errors.is_empty());
        assert!(
            input
                .problems
                .iter()
                .any(|p| p.contains("p.yaml") && p.contains("ICMP")),
            "{:?}",
            input.problems
        );
    }
}
