//! The kinds the fake API server serves and their REST paths: no
//! dependency, so xtask's deploy test (which builds the kit without its
//! `agent` feature) writes through the same paths.

/// A kind served.
#[derive(Debug)]
pub(crate) struct Resource {
    /// The path segment (`pods`).
    pub(crate) plural: &'static str,
    /// kubectl's name for one (discovery; served with the `agent` feature).
    #[cfg_attr(not(feature = "agent"), expect(dead_code))]
    pub(crate) singular: &'static str,
    /// `v1` for the core group, `group/version` otherwise.
    pub(crate) api_version: &'static str,
    pub(crate) kind: &'static str,
    /// Whether objects live in a namespace (paths `.../namespaces/NS/...`).
    pub(crate) namespaced: bool,
    /// kubectl's abbreviations (`netpol`).
    #[cfg_attr(not(feature = "agent"), expect(dead_code))]
    pub(crate) short_names: &'static [&'static str],
}

impl Resource {
    /// `/api/v1` or `/apis/GROUP/VERSION`.
    pub(crate) fn prefix(&self) -> String {
        if self.api_version.contains('/') {
            format!("/apis/{}", self.api_version)
        } else {
            format!("/api/{}", self.api_version)
        }
    }

    /// The collection's path, in `namespace` when given.
    pub(crate) fn collection(&self, namespace: &str) -> String {
        if self.namespaced && !namespace.is_empty() {
            format!("{}/namespaces/{namespace}/{}", self.prefix(), self.plural)
        } else {
            format!("{}/{}", self.prefix(), self.plural)
        }
    }
}

/// The kinds served.
pub(crate) const RESOURCES: [Resource; 7] = [
    Resource {
        plural: "pods",
        singular: "pod",
        api_version: "v1",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
    },
    Resource {
        plural: "namespaces",
        singular: "namespace",
        api_version: "v1",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
    },
    Resource {
        plural: "nodes",
        singular: "node",
        api_version: "v1",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
    },
    Resource {
        plural: "services",
        singular: "service",
        api_version: "v1",
        kind: "Service",
        namespaced: true,
        short_names: &["svc"],
    },
    Resource {
        plural: "networkpolicies",
        singular: "networkpolicy",
        api_version: "networking.k8s.io/v1",
        kind: "NetworkPolicy",
        namespaced: true,
        short_names: &["netpol"],
    },
    Resource {
        plural: "clusternetworkpolicies",
        singular: "clusternetworkpolicy",
        api_version: "policy.networking.k8s.io/v1alpha2",
        kind: "ClusterNetworkPolicy",
        namespaced: false,
        short_names: &["cnp"],
    },
    Resource {
        plural: "endpointslices",
        singular: "endpointslice",
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        namespaced: true,
        short_names: &[],
    },
];

/// The path of `kind`'s collection (in `namespace` for a namespaced kind;
/// every namespace's when empty), where a create POSTs.
///
/// # Panics
/// When the fake does not serve `kind`.
#[must_use]
pub fn collection_path(kind: &str, namespace: &str) -> String {
    RESOURCES[resource_of_kind(kind)].collection(namespace)
}

/// Whether the fake serves `kind` (`Pod`, `NetworkPolicy`, ...).
#[must_use]
pub fn serves(kind: &str) -> bool {
    RESOURCES.iter().any(|r| r.kind == kind)
}

/// The path of one object, where a replace PUTs and a delete DELETEs.
///
/// # Panics
/// When the fake does not serve `kind`.
#[must_use]
pub fn object_path(kind: &str, namespace: &str, name: &str) -> String {
    format!("{}/{name}", collection_path(kind, namespace))
}

/// The index of `kind` in [`RESOURCES`].
///
/// # Panics
/// When the fake does not serve `kind`.
pub(crate) fn resource_of_kind(kind: &str) -> usize {
    RESOURCES
        .iter()
        .position(|r| r.kind == kind)
        .unwrap_or_else(|| panic!("the fake API server does not serve {kind}"))
}
