//! Loads manifests (multi-document YAML or JSON) into a [`Snapshot`].

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;

use super::{
    ClusterNetworkPolicy, ModelError, Namespace, NetworkPolicy, Node, Pod, Service, Snapshot,
    strict,
};

/// `value` as a `T`, refusing fields `T` does not have
/// ([`strict::unknown_fields`]), as the API server's strict field
/// validation does.
fn decode<T: serde::de::DeserializeOwned + serde::Serialize>(
    value: &serde_json::Value,
) -> Result<T, String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let unknown = strict::unknown_fields(value, &back);
    if unknown.is_empty() {
        return Ok(typed);
    }
    let fields: Vec<String> = unknown.iter().map(|f| format!("{f:?}")).collect();
    Err(format!("unknown field {}", fields.join(", ")))
}

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

fn doc_error(origin: &str, kind: &str, message: String) -> ModelError {
    ModelError {
        kind: kind.to_owned(),
        object: origin.to_owned(),
        field: String::new(),
        message,
    }
}

/// `origin` naming the object a document claims to be: `file#0
/// (NetworkPolicy x/p)`.
fn named(origin: &str, kind: &str, value: &serde_json::Value) -> String {
    let meta = value.get("metadata");
    let s = |k: &str| meta.and_then(|m| m.get(k)).and_then(|v| v.as_str());
    match (s("namespace"), s("name")) {
        (_, None) => format!("{origin} ({kind})"),
        (Some(ns), Some(name)) => format!("{origin} ({kind} {ns}/{name})"),
        (None, Some(name)) => format!("{origin} ({kind} {name})"),
    }
}

/// The kinds netpol reads, by apiVersion (and their lists); a manifests
/// folder's other objects are skipped with a note.
pub const KINDS: &[(&str, &str)] = &[
    ("v1", "Pod"),
    ("v1", "Namespace"),
    ("v1", "Node"),
    ("v1", "Service"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    (crate::api::API_VERSION, crate::api::KIND),
    ("v1", "Endpoints"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
];

/// The documents of a YAML (or JSON, a subset) text, each an object,
/// decoded strictly ([`strict::document`]: no repeated key, nested at
/// most [`strict::MAX_DEPTH`] deep); empty documents left out, a UTF-8
/// byte order mark accepted (kubectl accepts it). Indexed as in the text.
///
/// # Errors
/// The first document that cannot be read, and why: nothing after it can
/// be (the YAML parser stops at a syntax error), so a caller takes the
/// text whole or not at all.
pub fn documents(text: &str) -> Result<Vec<(usize, serde_json::Value)>, (usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let depth = strict::flow_depth(text);
    if depth > strict::MAX_DEPTH {
        return Err((
            0,
            format!("nested {depth} deep, more than {}", strict::MAX_DEPTH),
        ));
    }
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match strict::document(doc) {
            Ok(serde_json::Value::Null) => {}
            Ok(v @ serde_json::Value::Object(_)) => docs.push((i, v)),
            Ok(serde_json::Value::Array(_)) => {
                return Err((
                    i,
                    "a list, not an object (write `kind: List` with the objects under `items`)"
                        .to_owned(),
                ));
            }
            Ok(other) => return Err((i, format!("not an object: {other}"))),
            Err(e) => return Err((i, format!("not a YAML document: {e}"))),
        }
    }
    Ok(docs)
}

/// Applies every document of a YAML (or JSON, a subset) text; a text with
/// a document that cannot be read applies nothing.
pub fn apply_str(snapshot: &mut Snapshot, text: &str, origin: &str, report: &mut LoadReport) {
    match documents(text) {
        Ok(docs) => {
            for (i, value) in docs {
                apply_value(snapshot, value, &format!("{origin}#{i}"), report);
            }
        }
        Err((i, why)) => {
            report
                .errors
                .push(doc_error(&format!("{origin}#{i}"), "document", why));
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
        ($ty:ty) => {{
            let object = named(origin, &kind, &value);
            match decode::<$ty>(&value) {
                Ok(o) => o,
                Err(e) => {
                    report
                        .errors
                        .push(doc_error(&object, &kind, format!("invalid {kind}: {e}")));
                    return;
                }
            }
        }};
    }
    report.objects += 1;
    match (api.as_str(), kind.as_str()) {
        (
            _,
            "List"
            | "PodList"
            | "NetworkPolicyList"
            | "NamespaceList"
            | "ServiceList"
            | "ClusterNetworkPolicyList",
        ) => {
            report.objects -= 1;
            let items = match value {
                serde_json::Value::Object(mut object) => object.remove("items"),
                _ => None,
            };
            let items = match items {
                Some(serde_json::Value::Array(items)) => items,
                _ => Vec::new(),
            };
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
        (crate::api::API_VERSION, crate::api::KIND) => {
            let raw = parse!(crate::api::ClusterNetworkPolicy);
            let converted = ClusterNetworkPolicy::try_from(&raw);
            if converted.is_ok() {
                report.valid += 1;
            }
            snapshot.upsert_cluster_policy(converted);
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
