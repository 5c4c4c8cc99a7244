//! Building a [`State`] from what the agent applied: the compiled state,
//! the snapshot it came from and the bound interfaces.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::{
    ClusterPolicyState, DecisionState, DirectionState, EndpointState, FrontendState, Inputs,
    NamedState, PolicyEntryState, PortRangeState, RemotePod, RuleSetState, RuleState,
    STATE_VERSION, StagedDirectionState, State, frontend_kind_name,
};
use crate::{
    compiler::{Decision, Direction, EMPTY_RULESET, RuleSet, cluster_rules_of, service_frontends},
    model::{ObjectRef, Protocol, Snapshot},
};

fn port_ranges(list: &[crate::compiler::PortRange]) -> Vec<PortRangeState> {
    list.iter()
        .map(|r| PortRangeState {
            protocol: r.protocol.as_str().to_owned(),
            first: r.first,
            last: r.last,
        })
        .collect()
}

fn ruleset_state(id: u32, rs: &RuleSet) -> RuleSetState {
    RuleSetState {
        id,
        all: rs.all,
        ports: port_ranges(&rs.ranges),
        except: port_ranges(&rs.except),
    }
}

fn decision_state(d: &Decision) -> DecisionState {
    DecisionState {
        all: d.ports.all,
        ports: port_ranges(&d.ports.ranges),
        except: port_ranges(&d.ports.except),
        allowed: d.allowed,
        stage: d.stage,
        passed: d.passed.iter().map(RuleState::from).collect(),
        rules: d.rules.iter().map(RuleState::from).collect(),
        text: d.to_string(),
    }
}

/// The `ClusterNetworkPolicies` with rules for `d` applying to `pod`, in
/// evaluation order.
fn cluster_applying(snap: &Snapshot, pod: &ObjectRef, d: Direction) -> Vec<ClusterPolicyState> {
    let Some(p) = snap.pods.get(pod) else {
        return Vec::new();
    };
    let ns_labels = snap.namespace_labels(&pod.namespace);
    let mut applying: Vec<_> = snap
        .cluster_policies
        .values()
        .filter_map(|slot| slot.in_force.as_ref())
        .filter(|c| c.staging.enforced())
        .filter(|c| !cluster_rules_of(c, d).is_empty())
        .filter(|c| c.selects(&ns_labels, &p.labels))
        .collect();
    applying.sort_by(|a, b| a.order().cmp(&b.order()));
    applying
        .into_iter()
        .map(|c| ClusterPolicyState {
            name: c.name.clone(),
            tier: c.tier.as_str().to_owned(),
            priority: c.priority,
        })
        .collect()
}

/// `namespace/name` of the policies selecting `pod` for `d`: the enforced
/// ones, or with `staged` those of the staged view.
pub(crate) fn isolating(
    snap: &Snapshot,
    pod: &ObjectRef,
    d: Direction,
    staged: bool,
) -> Vec<String> {
    isolating_policies(snap, pod, d, staged)
        .map(|np| np.id.to_string())
        .collect()
}

/// The `NetworkPolicies` of the enforced (or `staged`) view that select
/// `pod` and have rules for `d`.
pub(crate) fn isolating_policies<'s>(
    snap: &'s Snapshot,
    pod: &'s ObjectRef,
    d: Direction,
    staged: bool,
) -> impl Iterator<Item = &'s crate::model::NetworkPolicy> {
    let labels = snap.pods.get(pod).map(|p| &p.labels);
    snap.policies
        .values()
        .filter_map(|slot| slot.in_force.as_ref())
        .filter(move |np| {
            if staged {
                np.staging.in_staged_view()
            } else {
                np.staging.enforced()
            }
        })
        .filter(move |np| {
            np.id.namespace == pod.namespace && labels.is_some_and(|l| np.pod_selector.matches(l))
        })
        .filter(move |np| match d {
            Direction::Ingress => np.ingress.is_some(),
            Direction::Egress => np.egress.is_some(),
        })
}

impl State {
    /// The state of what `inputs` describe, written now.
    #[must_use]
    pub fn build(inputs: &Inputs<'_>) -> Self {
        let c = inputs.compiled;
        let snap = inputs.snapshot;
        let endpoints = c
            .endpoints
            .iter()
            .map(|(pod, e)| {
                let bound = inputs.interfaces.get(pod);
                let dir = |d: Direction| DirectionState {
                    isolated: e.isolated(d),
                    generation: e.generation(d),
                    policies: isolating(snap, pod, d, false),
                    cluster_policies: cluster_applying(snap, pod, d),
                    staged: e.staged(d).map(|isolated| StagedDirectionState {
                        isolated,
                        policies: isolating(snap, pod, d, true),
                    }),
                };
                EndpointState {
                    pod: pod.to_string(),
                    id: e.id,
                    uid: c.ids.endpoints.get(pod).and_then(|i| i.uid.clone()),
                    ifindex: bound.map(|b| b.ifindex),
                    interface: bound.map(|b| b.name.clone()),
                    addresses: e.ips.clone(),
                    ingress: dir(Direction::Ingress),
                    egress: dir(Direction::Egress),
                }
            })
            .collect();
        let policy = c
            .policy_v4
            .iter()
            .chain(&c.policy_v6)
            .map(|(t, e)| PolicyEntryState {
                endpoint: t.endpoint,
                direction: t.direction,
                selector: t.selector(),
                prefix: t.prefix,
                ruleset: e.ruleset,
                rules: c.sources(e).map(RuleState::from).collect(),
                decisions: e
                    .decisions
                    .iter()
                    .flat_map(|d| d.iter())
                    .map(decision_state)
                    .collect(),
            })
            .collect();
        let mut rulesets = vec![ruleset_state(EMPTY_RULESET, &RuleSet::default())];
        rulesets.extend(c.rulesets.iter().map(|(&id, rs)| ruleset_state(id, rs)));
        // (address, port, protocol) → (lowest kind, services), as the
        // compiler keys the frontend maps.
        let mut fronts: BTreeMap<(IpAddr, u16, Protocol), (u32, BTreeSet<String>)> =
            BTreeMap::new();
        for svc in snap.services.values() {
            for f in service_frontends(svc, &c.node_addresses) {
                let e = fronts
                    .entry((f.address, f.port, f.protocol))
                    .or_insert((f.kind, BTreeSet::new()));
                e.0 = e.0.min(f.kind);
                e.1.insert(svc.id.to_string());
            }
        }
        let frontends = fronts
            .into_iter()
            .map(
                |((address, port, protocol), (kind, services))| FrontendState {
                    address,
                    port,
                    protocol: protocol.as_str().to_owned(),
                    kind: frontend_kind_name(kind).to_owned(),
                    services: services.into_iter().collect(),
                },
            )
            .collect();
        let remote_pods = snap
            .pods
            .values()
            .filter(|p| p.is_networked() && !c.endpoints.contains_key(&p.id))
            .map(|p| RemotePod {
                pod: p.id.to_string(),
                node: p.node_name.clone(),
                addresses: p.ips.clone(),
            })
            .collect();
        Self {
            version: STATE_VERSION,
            layout: netpol_common::LAYOUT_VERSION,
            pin_dir: inputs.pin_dir.to_owned(),
            node: c.node.clone(),
            node_addresses: c.node_addresses.clone(),
            generation: inputs.generation,
            fingerprint: inputs.fingerprint.map(str::to_owned),
            written_unix_secs: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            endpoints,
            policy,
            named: c
                .named
                .iter()
                .map(|(t, d)| NamedState {
                    endpoint: t.endpoint,
                    direction: t.direction,
                    prefix: t.prefix,
                    decisions: d.iter().map(decision_state).collect(),
                })
                .collect(),
            rulesets,
            frontends,
            remote_pods,
        }
    }
}
