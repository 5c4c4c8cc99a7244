//! Pods the CNI plugin reports (see `netpol_cni`): the loop's side.
//!
//! An ADD names the pod, its host veth and its addresses before the API
//! server knows them. The loop takes the addresses as the pod's (the
//! model's `ips`, for the pod's own entry and for every policy whose peers
//! select it), binds the veth to the pod by name, no namespace entry or
//! packet needed, and answers once the pod's entry under that veth is
//! programmed: everything the pod sends after ADD returns is judged by its
//! whole policy. A DEL releases the veth (fail-closed until it is gone)
//! and forgets the pod's connections and those of its addresses at once,
//! since the next pod may get them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::Duration,
};

use netpol_cni::protocol::{Attachment, Reply, Request};
use netpol_common::EndpointInfo;
use tokio::{sync::oneshot, time::Instant};

use super::{Dataplane, SyncLoop};
use crate::{
    compiler::Compiled,
    model::{ObjectRef, Snapshot},
    node::cni::CniCall,
};

/// What an ADD reported.
#[derive(Clone, Debug)]
pub(super) struct Report {
    pub(super) pod: ObjectRef,
    pub(super) uid: Option<String>,
    pub(super) ips: Vec<IpAddr>,
    /// The host-side interfaces of the main plugin's result.
    pub(super) hosts: Vec<String>,
    /// When the ADD arrived.
    pub(super) since: Instant,
}

/// An ADD waiting for its pod to be programmed.
#[derive(Debug)]
pub(super) struct Waiter {
    attachment: Attachment,
    deadline: Instant,
    reply: oneshot::Sender<Reply>,
}

/// The loop's CNI state.
#[derive(Debug, Default)]
pub(super) struct Cni {
    pub(super) reports: BTreeMap<Attachment, Report>,
    waiters: Vec<Waiter>,
    /// Interfaces a DEL released: bound to no pod until they are gone.
    pub(super) released: BTreeSet<u32>,
    /// Answered `Ok` once this turn's compile ran (DEL, GC).
    done: Vec<oneshot::Sender<Reply>>,
}

/// An ADD is answered this long before the plugin gives up, so that the
/// plugin reports the agent's reason rather than a timeout.
const MARGIN: Duration = Duration::from_millis(200);

impl Cni {
    /// The next ADD deadline.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.waiters.iter().map(|w| w.deadline).min()
    }

    /// Forgets the reports of a veth that is gone (a DEL the agent missed).
    pub(super) fn link_gone(&mut self, ifindex: u32, name: &str) {
        self.released.remove(&ifindex);
        self.reports
            .retain(|_, r| !r.hosts.iter().any(|h| h == name));
    }
}

impl Report {
    /// Whether the API server's `pod` may be the one the runtime reported:
    /// not when both name a uid and they differ (another incarnation).
    fn same_incarnation(&self, pod: &crate::model::Pod) -> bool {
        match (&self.uid, &pod.uid) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
}

impl<D: Dataplane> SyncLoop<D> {
    /// Takes a plugin's request; returns whether the compile's input
    /// changed (the caller compiles this turn).
    pub(super) fn on_cni(&mut self, call: CniCall) -> bool {
        let CniCall {
            request,
            reply,
            received,
        } = call;
        match request {
            Request::Add {
                attachment,
                pod,
                netns,
                host_interfaces,
                ips,
                timeout_ms,
            } => {
                let now = Instant::from_std(received);
                self.last_pod_start = Some(Instant::now());
                let pod_ref = ObjectRef::new(&pod.namespace, &pod.name);
                tracing::info!(pod = %pod_ref, %netns, ?host_interfaces, ?ips, container = %attachment.container_id, "CNI ADD");
                self.cni.reports.insert(
                    attachment.clone(),
                    Report {
                        pod: pod_ref,
                        uid: pod.uid,
                        ips,
                        hosts: host_interfaces,
                        since: now,
                    },
                );
                let wait = Duration::from_millis(timeout_ms).saturating_sub(MARGIN);
                self.cni.waiters.push(Waiter {
                    attachment,
                    deadline: now + wait,
                    reply,
                });
                true
            }
            Request::Del { attachment } => {
                let Some(r) = self.cni.reports.remove(&attachment) else {
                    let _ = reply.send(Reply::Ok);
                    return false;
                };
                tracing::info!(pod = %r.pod, container = %attachment.container_id, "CNI DEL");
                if let Some(i) = self.reported_ifindex(&r) {
                    self.cni.released.insert(i);
                }
                let mut addrs = r.ips.clone();
                if let Some(ep) = self.compiled().and_then(|c| c.endpoints.get(&r.pod)) {
                    addrs.extend(ep.ips.iter().filter(|a| !r.ips.contains(a)));
                }
                match self.dp.writer().purge_peers(&addrs) {
                    Ok(n) => {
                        tracing::debug!(pod = %r.pod, removed = n, "connections to its addresses forgotten");
                    }
                    Err(e) => {
                        tracing::warn!(pod = %r.pod, error = %e, "purging connections to its addresses");
                    }
                }
                self.cni.done.push(reply);
                true
            }
            Request::Check { attachment } => {
                let endpoints = self.dp.writer().mirror().endpoints.clone();
                let answer = match self.cni.reports.get(&attachment) {
                    None => Reply::Error {
                        message: format!(
                            "attachment {}/{} unknown to the agent",
                            attachment.container_id, attachment.ifname
                        ),
                    },
                    Some(r) => match self.why_not_programmed(r, &endpoints) {
                        None => Reply::Ok,
                        Some(message) => Reply::Error { message },
                    },
                };
                let _ = reply.send(answer);
                false
            }
            Request::Gc { valid } => {
                let valid: BTreeSet<Attachment> = valid.into_iter().collect();
                let before = self.cni.reports.len();
                self.cni.reports.retain(|a, _| valid.contains(a));
                self.cni.done.push(reply);
                self.cni.reports.len() != before
            }
            Request::Status => {
                let _ = reply.send(if self.ready {
                    Reply::Ok
                } else {
                    Reply::Error {
                        message: "the agent has not applied its first state yet".into(),
                    }
                });
                false
            }
        }
    }

    /// The reported addresses as the pods' own, for pods the API server
    /// has not given theirs yet (or gave the addresses of an older
    /// sandbox): the sandbox that exists now is the one the node routes.
    pub(super) fn cni_overlay(&self, snapshot: &mut Snapshot) {
        for r in self.cni.reports.values() {
            let Some(pod) = snapshot.pods.get(&r.pod) else {
                continue;
            };
            if !r.same_incarnation(pod) || pod.host_network || pod.ips == r.ips || r.ips.is_empty()
            {
                continue;
            }
            let mut p = pod.clone();
            p.ips.clone_from(&r.ips);
            snapshot.pods.insert(r.pod.clone(), p);
        }
    }

    /// The veth a report names, when the loop knows it.
    fn reported_ifindex(&self, r: &Report) -> Option<u32> {
        self.ifaces
            .iter()
            .find(|(_, f)| r.hosts.contains(&f.link.name))
            .map(|(&i, _)| i)
    }

    /// Pods bound by a report: the plugin names the veth, so no address
    /// needs to match.
    pub(super) fn reported_bindings(&self, compiled: &Compiled) -> Vec<(ObjectRef, u32)> {
        self.cni
            .reports
            .values()
            .filter(|r| compiled.endpoints.contains_key(&r.pod))
            .filter_map(|r| Some((r.pod.clone(), self.reported_ifindex(r)?)))
            .filter(|(_, i)| !self.cni.released.contains(i))
            .collect()
    }

    /// `None` when the report's pod is bound to its veth and programmed;
    /// why not otherwise.
    fn why_not_programmed(
        &self,
        r: &Report,
        endpoints: &BTreeMap<u32, EndpointInfo>,
    ) -> Option<String> {
        let Some(i) = self.reported_ifindex(r) else {
            return Some(format!(
                "pod {}: none of its host interfaces {:?} is a pod interface the agent has seen",
                r.pod, r.hosts
            ));
        };
        let programmed = endpoints.get(&i).is_some_and(EndpointInfo::programmed);
        if self.bindings.get(&r.pod) == Some(&i) && programmed {
            return None;
        }
        let pod = self
            .input
            .as_ref()
            .and_then(|s| s.snapshot.pods.get(&r.pod));
        Some(match pod {
            None => format!(
                "pod {}: not in the agent's view of the API server (the watch is behind, or the \
                 pod was deleted)",
                r.pod
            ),
            Some(p) if !r.same_incarnation(p) => format!(
                "pod {}: the API server has uid {:?}, the runtime {:?}",
                r.pod, p.uid, r.uid
            ),
            Some(_) => match &self.last_error {
                Some(e) => format!("pod {}: not programmed: {e}", r.pod),
                None => format!("pod {}: not programmed yet", r.pod),
            },
        })
    }

    /// Answers the ADDs whose pods are programmed, and those past their
    /// deadline with the reason; then the DELs and GCs of this turn.
    pub(super) fn answer_cni(&mut self) {
        for r in self.cni.done.drain(..) {
            let _ = r.send(Reply::Ok);
        }
        if self.cni.waiters.is_empty() {
            return;
        }
        let endpoints = self.dp.writer().mirror().endpoints.clone();
        let now = Instant::now();
        let waiters = std::mem::take(&mut self.cni.waiters);
        for w in waiters {
            let answer = match self.cni.reports.get(&w.attachment) {
                None => Some(Reply::Error {
                    message: "deleted before it was programmed".into(),
                }),
                Some(r) => match self.why_not_programmed(r, &endpoints) {
                    None => {
                        self.metrics
                            .cni_add_seconds
                            .observe(r.since.elapsed().as_secs_f64());
                        tracing::info!(pod = %r.pod, micros = r.since.elapsed().as_micros(), "CNI ADD answered: pod programmed");
                        Some(Reply::Ok)
                    }
                    Some(why) if now >= w.deadline => {
                        self.metrics.error("cni");
                        tracing::warn!(reason = %why, "CNI ADD refused: not programmed in time");
                        Some(Reply::Error { message: why })
                    }
                    Some(_) => None,
                },
            };
            match answer {
                Some(a) => {
                    let _ = w.reply.send(a);
                }
                None => self.cni.waiters.push(w),
            }
        }
    }
}
