//! The one owner of the source's snapshot: store changes in, inputs out.
//! Nothing is published until every store has listed; a relist is
//! buffered and swapped in whole; an invalid new version keeps the last
//! valid one.

use super::*;

#[derive(Debug, Default)]
pub(super) struct StoreState {
    pub(super) ready: bool,
    pub(super) size: usize,
    pub(super) error: Option<String>,
    /// The error is a failed list (see [`Change::Error`]).
    pub(super) list_error: bool,
    /// A relist in progress: the objects listed so far.
    pub(super) relist: Option<Snapshot>,
    /// Events of the list in progress, not yet counted in the metrics.
    pub(super) listed_events: u64,
}

/// Owns the model and decides what is published.
#[derive(Debug)]
pub(super) struct Assembler {
    pub(super) snapshot: Snapshot,
    pub(super) stores: [StoreState; StoreKind::ALL.len()],
    pub(super) dirty: bool,
    pub(super) synced: bool,
    pub(super) probe_result: Option<bool>,
}

impl Assembler {
    pub(super) fn new(node: String) -> Self {
        Self {
            snapshot: Snapshot {
                local_node: Some(node),
                ..Snapshot::default()
            },
            stores: Default::default(),
            dirty: true,
            synced: false,
            probe_result: None,
        }
    }

    pub(super) fn any_error(&self) -> bool {
        self.stores.iter().any(|s| s.error.is_some())
    }

    pub(super) fn handle(&mut self, msg: Msg, metrics: Option<&Metrics>) {
        let (store, size, change) = match msg {
            Msg::Store {
                store,
                size,
                change,
            } => (store, size, change),
            Msg::Probe(r) => {
                self.probe_result = Some(r.is_ok());
                match r {
                    Ok(()) => {
                        for (kind, s) in StoreKind::ALL.iter().zip(&mut self.stores) {
                            if !s.list_error && s.error.take().is_some() {
                                tracing::info!(
                                    kind = kind.as_str(),
                                    "Kubernetes API server reachable again"
                                );
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "Kubernetes API server probe failed"),
                }
                return;
            }
        };
        let kind = store.as_str();
        let state = &mut self.stores[store.index()];
        // A list is one event per object: its metrics are written once
        // the list is done, not with two labelled lookups per object.
        let listing = matches!(change, Change::InitApply(_));
        if let Some(m) = metrics
            && (state.size != size || !listing)
        {
            m.kube_store_objects(kind, size);
        }
        state.size = size;
        if matches!(change, Change::Expired) {
            if let Some(m) = metrics {
                m.kube_watch_error(kind);
            }
            tracing::info!(kind, "watch expired (410 Gone): listing again");
            return;
        }
        if let Change::Error { message: e, list } = change {
            if let Some(m) = metrics {
                m.kube_watch_error(kind);
            }
            if state.error.is_none() {
                tracing::warn!(
                    kind,
                    error = %e,
                    "watching the Kubernetes API failed; retrying with backoff, the enforced \
                     state stays in force"
                );
            } else {
                tracing::debug!(kind, error = %e, "watch retry failed");
            }
            state.error = Some(e);
            state.list_error = list;
            return;
        }
        if listing {
            state.listed_events += 1;
        } else if let Some(m) = metrics {
            m.kube_watch_events(kind, std::mem::take(&mut state.listed_events) + 1);
        }
        // The watcher announces every list attempt with `Init`: only what
        // follows it shows the list succeeded.
        if !matches!(change, Change::Init) && state.error.take().is_some() {
            tracing::info!(kind, "watching the Kubernetes API again");
        }
        match change {
            Change::Init => state.relist = Some(Snapshot::default()),
            Change::InitApply(obj) => {
                if let Some(buf) = state.relist.as_mut() {
                    upsert(buf, Some(&self.snapshot), obj);
                }
            }
            Change::InitDone => {
                let buf = state.relist.take().unwrap_or_default();
                let first = !state.ready;
                state.ready = true;
                self.swap_in(store, buf);
                if first {
                    tracing::info!(kind, objects = size, "store listed");
                } else {
                    tracing::info!(kind, objects = size, "store relisted");
                }
            }
            Change::Apply(obj) => {
                if upsert(&mut self.snapshot, None, obj) {
                    self.dirty = true;
                }
            }
            Change::Delete(id) => {
                if remove(&mut self.snapshot, store, &id) {
                    self.dirty = true;
                }
            }
            Change::Absent => {
                state.relist = None;
                if !state.ready || state.size != 0 || !self.snapshot.cluster_policies.is_empty() {
                    tracing::info!(
                        kind,
                        "the API server does not serve this kind (its CRD is not installed): \
                         none are enforced; looking again with backoff"
                    );
                }
                state.ready = true;
                self.swap_in(store, Snapshot::default());
            }
            Change::Expired | Change::Error { .. } => {}
        }
    }

    /// Replaces the objects of `store` by a complete list of them.
    pub(super) fn swap_in(&mut self, store: StoreKind, buf: Snapshot) {
        let s = &mut self.snapshot;
        let Snapshot {
            nodes,
            namespaces,
            pods,
            policies,
            services,
            cluster_policies,
            invalid,
            ..
        } = buf;
        // What the relist did not change stays the published version's,
        // so the loop's change set is what changed (see `model::rebase`).
        let kind = match store {
            StoreKind::Pod => {
                s.pods = rebase(&s.pods, pods);
                "Pod"
            }
            StoreKind::Namespace => {
                s.namespaces = rebase(&s.namespaces, namespaces);
                "Namespace"
            }
            StoreKind::Node => {
                s.nodes = rebase(&s.nodes, nodes);
                "Node"
            }
            StoreKind::NetworkPolicy => {
                // Policies keep their invalid versions in their slots.
                s.policies = rebase(&s.policies, policies);
                self.dirty = true;
                return;
            }
            StoreKind::Service => {
                s.services = rebase(&s.services, services);
                "Service"
            }
            StoreKind::ClusterNetworkPolicy => {
                s.cluster_policies = rebase(&s.cluster_policies, cluster_policies);
                self.dirty = true;
                return;
            }
        };
        s.invalid.retain(|(k, _), _| k != kind);
        s.invalid.extend(invalid);
        self.dirty = true;
    }

    /// The input to publish, once every store is listed and when something
    /// changed since the last one.
    pub(super) fn take_input(&mut self) -> Option<Input> {
        if !self.stores.iter().all(|s| s.ready) || !self.dirty {
            return None;
        }
        if !self.synced {
            self.synced = true;
            tracing::info!(
                pods = self.snapshot.pods.len(),
                namespaces = self.snapshot.namespaces.len(),
                nodes = self.snapshot.nodes.len(),
                policies = self.snapshot.policies.len(),
                "every Kubernetes store listed: publishing the first state"
            );
        }
        self.dirty = false;
        let problems = self
            .snapshot
            .errors()
            .iter()
            .map(ToString::to_string)
            .collect();
        Some(Input {
            snapshot: self.snapshot.clone(),
            problems,
        })
    }

    pub(super) fn health(&self) -> SourceHealth {
        let unreachable = StoreKind::ALL
            .iter()
            .zip(&self.stores)
            .find_map(|(k, s)| s.error.as_ref().map(|e| format!("{}: {e}", k.as_str())));
        SourceHealth {
            synced: self.synced,
            unreachable,
            stores: StoreKind::ALL
                .iter()
                .zip(&self.stores)
                .map(|(k, s)| StoreHealth {
                    kind: k.as_str().to_owned(),
                    ready: s.ready,
                    objects: s.size,
                    error: s.error.clone(),
                })
                .collect(),
        }
    }
}

/// Whether `target` holds errors of the object: its key is built only
/// when there are errors at all (a list upserts every object).
fn was_invalid(target: &Snapshot, kind: &str, name: impl FnOnce() -> String) -> bool {
    !target.invalid.is_empty() && target.invalid.contains_key(&(kind.to_owned(), name()))
}

/// Adds or replaces one object of `target`. An invalid version keeps the
/// valid one in force: `target`'s own, or during a relist the one of
/// `previous`. Returns whether `target` changed.
pub(super) fn upsert(target: &mut Snapshot, previous: Option<&Snapshot>, obj: Obj) -> bool {
    match obj {
        Obj::Pod(id, Ok(pod)) => {
            let changed =
                target.pods.get(&id) != Some(&pod) || was_invalid(target, "Pod", || id.to_string());
            target.upsert_pod(pod);
            changed
        }
        Obj::Pod(id, Err(errors)) => {
            if let Some(old) = previous.and_then(|p| p.pods.get(&id)) {
                target.pods.insert(id.clone(), old.clone());
            }
            invalid(target, "Pod", id.to_string(), errors)
        }
        Obj::Namespace(name, Ok(ns)) => {
            let changed = target.namespaces.get(&name) != Some(&ns)
                || was_invalid(target, "Namespace", || name.clone());
            target.upsert_namespace(ns);
            changed
        }
        Obj::Namespace(name, Err(errors)) => {
            if let Some(old) = previous.and_then(|p| p.namespaces.get(&name)) {
                target.namespaces.insert(name.clone(), old.clone());
            }
            invalid(target, "Namespace", name, errors)
        }
        Obj::Node(name, Ok(node)) => {
            let key = ("Node".to_owned(), name.clone());
            let changed =
                target.nodes.get(&name) != Some(&node) || target.invalid.remove(&key).is_some();
            target.upsert_node(node);
            changed
        }
        Obj::Node(name, Err(errors)) => {
            if let Some(old) = previous.and_then(|p| p.nodes.get(&name)) {
                target.nodes.insert(name.clone(), old.clone());
            }
            invalid(target, "Node", name, errors)
        }
        Obj::Service(id, Ok(svc)) => {
            let changed = target.services.get(&id) != Some(&svc)
                || was_invalid(target, "Service", || id.to_string());
            target.upsert_service(svc);
            changed
        }
        Obj::Service(id, Err(errors)) => {
            if let Some(old) = previous.and_then(|p| p.services.get(&id)) {
                target.services.insert(id.clone(), old.clone());
            }
            invalid(target, "Service", id.to_string(), errors)
        }
        Obj::Policy(Ok(p)) => {
            let changed = target
                .policies
                .get(&p.id)
                .is_none_or(|s| s.in_force.as_ref() != Some(&p) || !s.errors.is_empty());
            target.upsert_policy(Ok(p));
            changed
        }
        Obj::ClusterPolicy(Ok(p)) => {
            let changed = target
                .cluster_policies
                .get(&p.name)
                .is_none_or(|s| s.in_force.as_ref() != Some(&p) || !s.errors.is_empty());
            target.upsert_cluster_policy(Ok(p));
            changed
        }
        Obj::ClusterPolicy(Err((name, errors))) => {
            if !target.cluster_policies.contains_key(&name)
                && let Some(old) = previous.and_then(|p| p.cluster_policies.get(&name))
            {
                target.cluster_policies.insert(name.clone(), old.clone());
            }
            let changed = target
                .cluster_policies
                .get(&name)
                .is_none_or(|s| s.errors != errors);
            target.upsert_cluster_policy(Err((name, errors)));
            changed
        }
        Obj::Policy(Err((id, errors))) => {
            if !target.policies.contains_key(&id)
                && let Some(old) = previous.and_then(|p| p.policies.get(&id))
            {
                target.policies.insert(id.clone(), old.clone());
            }
            let changed = target.policies.get(&id).is_none_or(|s| s.errors != errors);
            target.upsert_policy(Err((id, errors)));
            changed
        }
    }
}

pub(super) fn invalid(
    target: &mut Snapshot,
    kind: &str,
    name: String,
    errors: Vec<ModelError>,
) -> bool {
    let key = (kind.to_owned(), name);
    if target.invalid.get(&key) == Some(&errors) {
        return false;
    }
    target.invalid.insert(key, errors);
    true
}

/// Removes a deleted object (and the errors of its versions).
pub(super) fn remove(target: &mut Snapshot, store: StoreKind, id: &ObjectRef) -> bool {
    let (kind, model_kind, key) = match store {
        StoreKind::Pod => ("Pod", Kind::Pod, id.to_string()),
        StoreKind::Namespace => ("Namespace", Kind::Namespace, id.name.clone()),
        StoreKind::Node => ("Node", Kind::Node, id.name.clone()),
        StoreKind::NetworkPolicy => ("NetworkPolicy", Kind::NetworkPolicy, id.to_string()),
        StoreKind::Service => ("Service", Kind::Service, id.to_string()),
        StoreKind::ClusterNetworkPolicy => (
            "ClusterNetworkPolicy",
            Kind::ClusterNetworkPolicy,
            id.name.clone(),
        ),
    };
    let had_errors = target.invalid.remove(&(kind.to_owned(), key)).is_some();
    let had = match model_kind {
        Kind::Pod => target.pods.contains_key(id),
        Kind::Namespace => target.namespaces.contains_key(&id.name),
        Kind::Node => target.nodes.contains_key(&id.name),
        Kind::NetworkPolicy => target.policies.contains_key(id),
        Kind::Service => target.services.contains_key(id),
        Kind::ClusterNetworkPolicy => target.cluster_policies.contains_key(&id.name),
    };
    target.remove(model_kind, &id.namespace, &id.name);
    had || had_errors
}
