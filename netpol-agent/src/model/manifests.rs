//! Loads manifests (multi-document YAML or JSON) into a [`Snapshot`].

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use serde::Deserialize as _;

use super::{ModelError, Namespace, NetworkPolicy, Node, Pod, Service, Snapshot};

/// What loading found besides the objects it applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Objects applied to the snapshot (valid or not).
    pub objects: usize,
    /// Objects that were valid.
    pub valid: usize,
    /// Skipped documents and kinds, one line each.
    pub notes: Vec<String>,
    /// Documents that could not be read as the object they claim to be.
    pub errors: Vec<ModelError>,
}

/// A manifests folder that cannot be read at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading the folder or a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The folder or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn doc_error(origin: &str, kind: &str, message: String) -> ModelError {
    ModelError {
        kind: kind.to_owned(),
        object: origin.to_owned(),
        field: String::new(),
        message,
    }
}

/// Applies every `.yaml`, `.yml` and `.json` file of `dir` (sorted by name,
/// subfolders included) to `snapshot`.
///
/// # Errors
/// Only when the folder or a file cannot be read; bad documents and objects
/// are reported in the [`LoadReport`].
pub fn load_dir(dir: &Path, snapshot: &mut Snapshot) -> Result<LoadReport, LoadError> {
    let files = manifest_files(dir).map_err(|source| LoadError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut report = LoadReport::default();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|source| LoadError::Io {
            path: f.clone(),
            source,
        })?;
        apply_str(snapshot, &text, &f.display().to_string(), &mut report);
    }
    Ok(report)
}

/// The manifest files of `dir`: `.yaml`, `.yml` and `.json`, subfolders
/// included, sorted by path; hidden files (editors' and atomic writers'
/// temporaries) left out. The files source watches the same set.
///
/// # Errors
/// When a folder cannot be read.
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Applies every document of a YAML (or JSON, a subset) text.
pub fn apply_str(snapshot: &mut Snapshot, text: &str, origin: &str, report: &mut LoadReport) {
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = format!("{origin}#{i}");
        match serde_json::Value::deserialize(doc) {
            Ok(serde_json::Value::Null) => {}
            Ok(value) => apply_value(snapshot, value, &origin, report),
            Err(e) => {
                report.errors.push(doc_error(
                    &origin,
                    "document",
                    format!("not a YAML document: {e}"),
                ));
                // serde_yaml's document iterator repeats a syntax error
                // forever: nothing after it can be read.
                break;
            }
        }
    }
}

/// Applies one object (create or replace), dispatching on apiVersion/kind.
/// `List` objects apply their items.
pub fn apply_value(
    snapshot: &mut Snapshot,
    value: serde_json::Value,
    origin: &str,
    report: &mut LoadReport,
) {
    let api = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    macro_rules! parse {
        ($ty:ty) => {
            match serde_json::from_value::<$ty>(value) {
                Ok(o) => o,
                Err(e) => {
                    report
                        .errors
                        .push(doc_error(origin, &kind, format!("invalid {kind}: {e}")));
                    return;
                }
            }
        };
    }
    report.objects += 1;
    match (api.as_str(), kind.as_str()) {
        (_, "List")
        | (_, "PodList")
        | (_, "NetworkPolicyList")
        | (_, "NamespaceList")
        | (_, "ServiceList") => {
            report.objects -= 1;
            let items = value
                .get("items")
                .and_then(|v| v.as_array())
                .cloned()
                .unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                apply_value(snapshot, item, &format!("{origin}.items[{i}]"), report);
            }
        }
        ("v1", "Pod") => {
            let raw = parse!(core::Pod);
            match Pod::try_from(&raw) {
                Ok(p) => {
                    report.valid += 1;
                    snapshot.upsert_pod(p);
                }
                Err(errors) => {
                    // The last valid version stays: dropping the pod would
                    // unmanage its interface or forget a peer.
                    let name = errors.first().map(|e| e.object.clone()).unwrap_or_default();
                    snapshot.invalid.insert(("Pod".to_owned(), name), errors);
                }
            }
        }
        ("v1", "Namespace") => {
            let raw = parse!(core::Namespace);
            match Namespace::try_from(&raw) {
                Ok(ns) => {
                    report.valid += 1;
                    snapshot.upsert_namespace(ns);
                }
                Err(errors) => {
                    snapshot
                        .invalid
                        .insert(("Namespace".to_owned(), origin.to_owned()), errors);
                }
            }
        }
        ("v1", "Node") => {
            let raw = parse!(core::Node);
            match Node::try_from(&raw) {
                Ok(n) => {
                    report.valid += 1;
                    snapshot.upsert_node(n);
                }
                Err(errors) => {
                    snapshot
                        .invalid
                        .insert(("Node".to_owned(), origin.to_owned()), errors);
                }
            }
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let raw = parse!(net::NetworkPolicy);
            let converted = NetworkPolicy::try_from(&raw);
            if converted.is_ok() {
                report.valid += 1;
            }
            snapshot.upsert_policy(converted);
        }
        ("v1", "Service") => {
            let raw = parse!(core::Service);
            match Service::try_from(&raw) {
                Ok(s) => {
                    report.valid += 1;
                    snapshot.upsert_service(s);
                }
                Err(errors) => {
                    // The last valid version stays: its frontends are still
                    // translated by kube-proxy.
                    let name = errors.first().map(|e| e.object.clone()).unwrap_or_default();
                    snapshot
                        .invalid
                        .insert(("Service".to_owned(), name), errors);
                }
            }
        }
        ("v1", "Endpoints") | ("discovery.k8s.io/v1", "EndpointSlice") => {
            // Policies apply to pod addresses after Service translation:
            // which backends a Service has does not change the maps.
            report.objects -= 1;
        }
        _ => {
            report.objects -= 1;
            report
                .notes
                .push(format!("{origin}: skipped unsupported {api} {kind}"));
        }
    }
}
