//! The loop's pod interfaces: a veth found is marked "not programmed" and
//! attached, its peer's addresses (or the node's routes) bind it to a
//! compiled pod, and the endpoint entries follow the bindings.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use ipnet::IpNet;
use netpol_common::{EndpointInfo, endpoint_flags};

use super::{Dataplane, SyncLoop};
use crate::{
    compiler::Compiled,
    datapath::{
        clock::{JiffyClock, Skew},
        writer::{KernelOp, MapWriteError},
    },
    model::ObjectRef,
    node::links::{self, Link, LinkEvent},
};

/// High bit of the ids of unbound pod interfaces (see [`super`]).
pub const UNBOUND_ID_BASE: u32 = 1 << 31;

/// The endpoint entry of a pod interface with no pod yet.
#[must_use]
pub const fn unbound_entry(ifindex: u32) -> EndpointInfo {
    EndpointInfo {
        id: UNBOUND_ID_BASE | ifindex,
        flags: endpoint_flags::NOT_PROGRAMMED,
        ingress_gen: 0,
        egress_gen: 0,
        ipv4: [0; 4],
        ipv6: [0; 16],
        slot: 0,
    }
}

/// How often bindings are looked for again while a compiled pod and a pod
/// interface are both unbound (a bridge learns a pod's MAC only once the
/// pod speaks, e.g. answers the kubelet's first probe).
const REBIND: Duration = Duration::from_secs(1);

/// The bindings the previous agent's state file records, by pod: the
/// interface it was bound to, and its uid and addresses then.
#[derive(Debug, Default)]
pub(super) struct Remembered(BTreeMap<String, RememberedPod>);

#[derive(Debug)]
struct RememberedPod {
    ifindex: u32,
    interface: String,
    uid: Option<String>,
    addresses: BTreeSet<IpAddr>,
}

impl Remembered {
    /// The bindings of a state file (none without one).
    pub(super) fn of(state: Option<&crate::provenance::State>) -> Self {
        Self(
            state
                .into_iter()
                .flat_map(|s| &s.endpoints)
                .filter_map(|e| {
                    Some((
                        e.pod.clone(),
                        RememberedPod {
                            ifindex: e.ifindex?,
                            interface: e.interface.clone()?,
                            uid: e.uid.clone(),
                            addresses: e.addresses.iter().copied().collect(),
                        },
                    ))
                })
                .collect(),
        )
    }

    /// Whether the file binds a pod to interface `ifindex` named `name`.
    pub(super) fn names(&self, ifindex: u32, name: &str) -> bool {
        self.0
            .values()
            .any(|r| r.ifindex == ifindex && r.interface == name)
    }

    /// The interface the file bound `pod` to, when it is still the same
    /// pod (name, uid, addresses) and the same interface (index, name).
    fn interface_of(
        &self,
        pod: &ObjectRef,
        uid: Option<&str>,
        ips: &[IpAddr],
        ifaces: &BTreeMap<u32, Iface>,
    ) -> Option<u32> {
        let r = self.0.get(&pod.to_string())?;
        let same = match (r.uid.as_deref(), uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        } && r.addresses == ips.iter().copied().collect::<BTreeSet<_>>()
            && ifaces
                .get(&r.ifindex)
                .is_some_and(|f| f.link.name == r.interface);
        same.then_some(r.ifindex)
    }
}

/// A pod interface the loop knows.
#[derive(Debug)]
pub(super) struct Iface {
    pub(super) link: Link,
    /// Addresses of the peer, read in its namespace.
    pub(super) peer: Vec<IpAddr>,
    /// Pod addresses the node routes to this interface.
    pub(super) routed: Vec<IpAddr>,
    pub(super) lookup_pending: bool,
    /// Another lookup was asked for while one ran.
    pub(super) lookup_again: bool,
}

/// Results of the lookups the loop starts off-thread.
#[derive(Debug)]
pub(super) enum Found {
    Peer {
        ifindex: u32,
        result: Result<Vec<IpAddr>, String>,
    },
    Routes(Result<Vec<(IpNet, u32)>, String>),
    /// The programs' clock, measured again after drifting by `skew`.
    Clock {
        clock: JiffyClock,
        skew: Skew,
    },
}

impl<D: Dataplane> SyncLoop<D> {
    /// Pod interfaces first, uplinks second: a link changing class is
    /// detached from its old role before it takes the new one.
    pub(super) fn on_link(&mut self, ev: &LinkEvent) -> bool {
        let pods = self.on_pod_link(ev.clone());
        let uplinks = self.uplinks.on_link(&mut self.dp, ev);
        pods || uplinks
    }

    pub(super) fn on_pod_link(&mut self, ev: LinkEvent) -> bool {
        match ev {
            LinkEvent::Present(link) => {
                let wanted = link.class(self.cfg.interfaces.as_ref(), self.cfg.uplinks.as_ref())
                    == links::LinkClass::Pod;
                if let Some(known) = self.ifaces.get_mut(&link.ifindex) {
                    if known.link.name != link.name || !wanted {
                        // Renamed or no longer wanted: start over.
                        let name = known.link.name.clone();
                        self.gone(link.ifindex, &name);
                        return if wanted { self.add(link) } else { true };
                    }
                    if known.link.peer_netnsid != link.peer_netnsid
                        || known.link.peer_ifindex != link.peer_ifindex
                    {
                        known.link = link.clone();
                        known.peer.clear();
                        self.lookup_peer(link.ifindex);
                    }
                    return false;
                }
                let added = wanted && self.add(link);
                // A pod the API gave first may be waiting for this veth:
                // start looking for it (and keep looking).
                if added && self.rebind_at.is_none() {
                    self.unbound_pods_lookup();
                }
                added
            }
            LinkEvent::Gone { ifindex, name } => {
                if self.ifaces.contains_key(&ifindex) {
                    self.gone(ifindex, &name);
                    true
                } else {
                    false
                }
            }
            // Bindings come from the routes' answer, not from here.
            LinkEvent::Neighbour => {
                if self.unbound_pods_and_ifaces() {
                    self.lookup_routes();
                }
                false
            }
        }
    }

    /// A new pod interface: its "not programmed" entry first, then the
    /// programs, so the new-pods mode applies from its first packet.
    pub(super) fn add(&mut self, link: Link) -> bool {
        let ifindex = link.ifindex;
        let name = link.name.clone();
        let adopted = self.in_force.is_none()
            && self
                .dp
                .writer()
                .mirror()
                .endpoints
                .get(&ifindex)
                .is_some_and(EndpointInfo::programmed);
        let entry: &[KernelOp] = if adopted {
            &[]
        } else {
            &[KernelOp::EndpointUpsert(ifindex, unbound_entry(ifindex))]
        };
        if let Err(e) = self.dp.writer().apply_kernel(entry) {
            self.fail("attach", format!("marking {name} as a pod interface: {e}"));
            return false;
        }
        if let Err(e) = self.dp.attach(&name) {
            let _ = self
                .dp
                .writer()
                .apply_kernel(&[KernelOp::EndpointDelete(ifindex)]);
            self.fail("attach", format!("{e}"));
            return false;
        }
        self.last_pod_start = Some(tokio::time::Instant::now());
        tracing::info!(interface = %name, ifindex, "pod interface attached, not programmed yet");
        self.ifaces.insert(
            ifindex,
            Iface {
                link,
                peer: Vec::new(),
                routed: Vec::new(),
                lookup_pending: false,
                lookup_again: false,
            },
        );
        self.lookup_peer(ifindex);
        true
    }

    pub(super) fn gone(&mut self, ifindex: u32, name: &str) {
        self.ifaces.remove(&ifindex);
        self.cni.link_gone(ifindex, name);
        // The kernel released the programs with the device; the detach
        // only drops our handles, so its error says nothing.
        if let Err(e) = self.dp.detach(name) {
            tracing::debug!(interface = %name, error = %e, "detach after link removal");
        }
        tracing::info!(interface = %name, ifindex, "pod interface gone, detached");
    }

    pub(super) fn lookup_peer(&mut self, ifindex: u32) {
        let Some(iface) = self.ifaces.get_mut(&ifindex) else {
            return;
        };
        let (Some(nsid), Some(peer)) = (iface.link.peer_netnsid, iface.link.peer_ifindex) else {
            return;
        };
        if iface.lookup_pending {
            // Its answer may predate what we are looking for now.
            iface.lookup_again = true;
            return;
        }
        iface.lookup_pending = true;
        let tx = self.found_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = links::peer_addresses(nsid, peer).map_err(|e| e.to_string());
            let _ = tx.send(Found::Peer { ifindex, result });
        });
    }

    pub(super) fn lookup_routes(&mut self) {
        if self.routes_pending {
            self.routes_again = true;
            return;
        }
        self.routes_pending = true;
        let tx = self.found_tx.clone();
        tokio::spawn(async move {
            let result = links::routes().await.map_err(|e| e.to_string());
            let _ = tx.send(Found::Routes(result));
        });
    }

    pub(super) fn on_found(&mut self, f: Found) -> bool {
        match f {
            Found::Peer { ifindex, result } => {
                let Some(iface) = self.ifaces.get_mut(&ifindex) else {
                    return false;
                };
                iface.lookup_pending = false;
                let again = std::mem::take(&mut iface.lookup_again);
                let changed = match result {
                    Ok(addrs) => {
                        tracing::debug!(interface = %iface.link.name, ?addrs, "peer addresses");
                        let changed = iface.peer != addrs;
                        iface.peer = addrs;
                        changed
                    }
                    Err(e) => {
                        tracing::debug!(
                            interface = %iface.link.name,
                            error = %e,
                            "peer lookup failed; trying routes"
                        );
                        self.lookup_routes();
                        false
                    }
                };
                if again {
                    self.lookup_peer(ifindex);
                }
                changed
            }
            Found::Routes(result) => {
                self.routes_pending = false;
                if std::mem::take(&mut self.routes_again) {
                    self.lookup_routes();
                }
                match result {
                    Ok(routes) => self.apply_routes(&routes),
                    Err(e) => {
                        self.metrics.error("bind");
                        tracing::warn!(error = %e, "reading routes");
                        false
                    }
                }
            }
            Found::Clock { clock, skew } => {
                self.set_clock(clock, skew);
                false
            }
        }
    }

    /// Puts the programs on a clock measured again. Entries keep their
    /// stamps: their idle times shift by the correction, a few ms.
    pub(super) fn set_clock(&mut self, clock: JiffyClock, skew: Skew) {
        self.metrics.clock_remeasured.inc();
        let fallback = clock.jiffy_ns == 0;
        match self.dp.set_clock(clock) {
            Ok(()) if fallback => tracing::warn!(
                ahead_ns = skew.ahead_ns,
                behind_ns = skew.behind_ns,
                "conntrack clock: jiffies out of step with CLOCK_MONOTONIC and not measurable \
                 again; the programs read the clock source"
            ),
            Ok(()) => tracing::warn!(
                ahead_ns = skew.ahead_ns,
                behind_ns = skew.behind_ns,
                error_ns = clock.error_ns,
                "conntrack clock: jiffies out of step with CLOCK_MONOTONIC; measured again"
            ),
            Err(e) => {
                self.metrics.error("clock");
                tracing::warn!(error = %e, "conntrack clock: writing the config map");
            }
        }
    }

    /// Gives each unbound pod address to the interface its longest route
    /// leaves by, when that is a pod interface. Routed addresses stay with
    /// their interface until it goes or another interface takes them: a
    /// neighbour entry that ages out must not unbind a pod.
    pub(super) fn apply_routes(&mut self, routes: &[(IpNet, u32)]) -> bool {
        let Some(compiled) = self.compiled() else {
            return false;
        };
        let mut found: Vec<(IpAddr, u32)> = Vec::new();
        for (pod, ep) in &compiled.endpoints {
            if self.bindings.contains_key(pod) {
                continue;
            }
            for ip in &ep.ips {
                let best = routes
                    .iter()
                    .filter(|(net, oif)| net.contains(ip) && self.ifaces.contains_key(oif))
                    .max_by_key(|(net, _)| net.prefix_len());
                if let Some((_, oif)) = best {
                    found.push((*ip, *oif));
                }
            }
        }
        let mut changed = false;
        for (ip, oif) in found {
            for (ifindex, iface) in &mut self.ifaces {
                let has = iface.routed.contains(&ip);
                if *ifindex == oif && !has {
                    iface.routed.push(ip);
                    changed = true;
                } else if *ifindex != oif && has {
                    iface.routed.retain(|a| *a != ip);
                    changed = true;
                }
            }
        }
        changed
    }

    /// Pods of `compiled` matched to pod interfaces: those the CNI plugin
    /// reported by their veth first, then by address, the peer's own
    /// addresses before routes. An interface a DEL released is bound to
    /// nothing.
    pub(super) fn bind(&self, compiled: &Compiled) -> BTreeMap<ObjectRef, u32> {
        let mut out = BTreeMap::new();
        let mut taken = self.cni.released.clone();
        for (pod, i) in self.reported_bindings(compiled) {
            if taken.insert(i) {
                out.insert(pod, i);
            } else {
                tracing::warn!(%pod, ifindex = i, "interface reported for two pods; left unbound");
            }
        }
        let mut by_peer: BTreeMap<IpAddr, u32> = BTreeMap::new();
        let mut by_route: BTreeMap<IpAddr, u32> = BTreeMap::new();
        for (ifindex, iface) in &self.ifaces {
            for ip in &iface.peer {
                by_peer.entry(*ip).or_insert(*ifindex);
            }
            for ip in &iface.routed {
                by_route.entry(*ip).or_insert(*ifindex);
            }
        }
        for (pod, ep) in &compiled.endpoints {
            if out.contains_key(pod) {
                continue;
            }
            let uid = compiled
                .ids
                .endpoints
                .get(pod)
                .and_then(|e| e.uid.as_deref());
            let remembered = self
                .remembered
                .interface_of(pod, uid, &ep.ips, &self.ifaces);
            let found = remembered
                .as_ref()
                .or_else(|| ep.ips.iter().find_map(|ip| by_peer.get(ip)))
                .or_else(|| ep.ips.iter().find_map(|ip| by_route.get(ip)));
            if let Some(&i) = found {
                if taken.insert(i) {
                    out.insert(pod.clone(), i);
                } else if !self.cni.released.contains(&i) {
                    tracing::warn!(%pod, ifindex = i, "interface claimed by two pods; left unbound");
                }
            }
        }
        out
    }

    /// Pods compiled but not bound: their interface may have got its
    /// address after we looked (CNIs address the peer after creating it),
    /// so look again; routes cover peers we cannot see.
    ///
    /// Repeated every [`REBIND`] while a compiled pod and a pod interface
    /// are both unbound.
    pub(super) fn unbound_pods_lookup(&mut self) {
        self.rebind_at = None;
        if !self.unbound_pods() {
            return;
        }
        let unbound = self.unbound_ifaces();
        if unbound.is_empty() {
            return;
        }
        self.rebind_at = Some(tokio::time::Instant::now() + REBIND);
        for i in unbound {
            self.lookup_peer(i);
        }
        self.solicit();
        self.lookup_routes();
    }

    /// Whether a compiled pod and a pod interface are both unbound.
    fn unbound_pods_and_ifaces(&self) -> bool {
        self.unbound_pods() && !self.unbound_ifaces().is_empty()
    }

    /// Whether a compiled pod has no interface.
    fn unbound_pods(&self) -> bool {
        self.compiled()
            .is_some_and(|c| c.endpoints.keys().any(|p| !self.bindings.contains_key(p)))
    }

    /// Pod interfaces bound to no pod, those a DEL released left out.
    fn unbound_ifaces(&self) -> Vec<u32> {
        let bound: BTreeSet<u32> = self.bindings.values().copied().collect();
        self.ifaces
            .keys()
            .filter(|i| !bound.contains(i) && !self.cni.released.contains(i))
            .copied()
            .collect()
    }

    /// Makes the node resolve the addresses of the unbound pods
    /// ([`links::resolve`]: ARP or neighbour solicitation, no packet to
    /// the pod): the node's neighbour entry and the bridge's FDB entry then
    /// name the veth, for a pod that never sent a packet, without entering
    /// its namespace. A neighbour event follows, which reads them.
    fn solicit(&self) {
        let Some(compiled) = self.compiled() else {
            return;
        };
        let targets: Vec<IpAddr> = compiled
            .endpoints
            .iter()
            .filter(|(p, _)| !self.bindings.contains_key(*p))
            .flat_map(|(_, ep)| ep.ips.iter().copied())
            .collect();
        if targets.is_empty() {
            return;
        }
        tokio::spawn(async move {
            if let Err(e) = links::resolve(&targets).await {
                tracing::debug!(error = %e, "asking the node to resolve unbound pods");
            }
        });
    }

    /// Endpoint entries the interfaces should have, against what the map
    /// has: a bound pod's compiled entry, the unbound entry otherwise; any
    /// other index (a gone veth, a previous agent's) is deleted.
    ///
    /// With `adopt` (nothing compiled yet), a programmed entry a previous
    /// agent left in the pinned map stays until the first compile: a
    /// restart must not put running pods in the new-pods mode.
    pub(super) fn endpoint_ops(
        &mut self,
        compiled: &Compiled,
        bindings: &BTreeMap<ObjectRef, u32>,
        adopt: bool,
    ) -> Vec<KernelOp> {
        let have = &self.dp.writer().mirror().endpoints;
        let mut want: BTreeMap<u32, EndpointInfo> = self
            .ifaces
            .keys()
            .map(|&i| match have.get(&i) {
                Some(e) if adopt && e.programmed() => (i, *e),
                _ => (i, unbound_entry(i)),
            })
            .collect();
        for (pod, &i) in bindings {
            if let (Some(ep), Some(slot)) = (compiled.endpoints.get(pod), want.get_mut(&i)) {
                *slot = ep.info();
            }
        }
        // The mark slot is the map writer's: compare the rest.
        let unslotted = |e: &EndpointInfo| EndpointInfo { slot: 0, ..*e };
        let mut ops: Vec<KernelOp> = want
            .iter()
            .filter(|(i, v)| have.get(i).map(unslotted) != Some(unslotted(v)))
            .map(|(&i, &v)| KernelOp::EndpointUpsert(i, v))
            .collect();
        // Before the first compile, an index not reported yet may be a pod
        // interface a previous agent programmed whose link event is still
        // on its way: its entry stays while the interface exists.
        ops.extend(
            have.keys()
                .filter(|&&i| {
                    let kept = adopt && nix::net::if_::if_indextoname(i).is_ok();
                    !want.contains_key(&i) && !kept
                })
                .map(|&i| KernelOp::EndpointDelete(i)),
        );
        ops
    }

    /// Brings the endpoint entries in line with the interfaces and the
    /// compiled state in force; returns whether anything was written.
    pub(super) fn sync_endpoints(&mut self) -> Result<bool, MapWriteError> {
        let empty = Compiled::default();
        let in_force = self.in_force.take();
        let c = in_force.as_ref().map_or(&empty, |f| f.compiler.compiled());
        let bindings = self.bind(c);
        for (pod, i) in &bindings {
            if self.bindings.get(pod) != Some(i) {
                let name = self
                    .ifaces
                    .get(i)
                    .map(|f| f.link.name.clone())
                    .unwrap_or_default();
                tracing::info!(%pod, interface = %name, "pod bound to its interface");
            }
        }
        let ops = self.endpoint_ops(c, &bindings, in_force.is_none());
        self.in_force = in_force;
        self.bindings = bindings;
        self.dp.writer().apply_kernel(&ops)?;
        Ok(!ops.is_empty())
    }

    pub(super) fn sync_endpoints_and_publish(&mut self) {
        match self.sync_endpoints() {
            Ok(true) => {
                self.generation += 1;
                tracing::debug!(generation = self.generation, "interfaces applied");
                self.write_state(None);
            }
            Ok(false) => {}
            Err(e) => self.fail("apply", format!("{e}")),
        }
        self.publish();
    }
}
