//! Everything the agent tells the outside: its [`Status`] (served on
//! `/status`, watched by tests through a [`StatusHandle`]), Prometheus
//! [`Metrics`] (`netpol_` prefix, [`metrics`]), the one HTTP port
//! ([`http`]) and the `tracing` subscriber of the binary ([`logging`]).
pub(crate) mod http;
pub mod logging;
pub mod metrics;

use std::{net::IpAddr, time::Duration};

use serde::Serialize;
use tokio::sync::watch;

use crate::{
    datapath::writer::MapCounts,
    sources::{ObjectCounts, SourceHealth},
};

pub use logging::{LogFormat, init_logging};
pub use metrics::{ALIVE_EVERY, Metrics, STUCK_AFTER, Task};

/// One pod interface.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InterfaceStatus {
    /// Host-side name.
    pub name: String,
    /// Host-side index.
    pub ifindex: u32,
    /// The pod it is bound to (`namespace/name`), if any.
    pub pod: Option<String>,
    /// The addresses found for it (the peer's, or routed to it).
    pub addresses: Vec<IpAddr>,
    /// Its endpoint entry holds the pod's compiled state (otherwise the
    /// new-pods mode applies to it).
    pub programmed: bool,
    /// Its programs are netpol's netlink filters until the node is quiet
    /// and they move to TCX links (`--attach-mode=auto` on kernels ≥ 6.6).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub awaiting_tcx: bool,
}

/// Families the node's own stack has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Families {
    /// IPv4.
    pub ipv4: bool,
    /// IPv6.
    pub ipv6: bool,
}

/// What the agent has enforced, as `/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The first apply succeeded.
    pub ready: bool,
    /// Bumped by every change written to the kernel (a compiled state, or
    /// interfaces bound, added or gone); 0 before the first.
    pub generation: u64,
    /// [`crate::sources::fingerprint`] of the input of the compiled state
    /// in force.
    pub fingerprint: Option<String>,
    /// The node whose pods are local.
    pub node: Option<String>,
    /// The HTTP address, once bound.
    pub listen: Option<std::net::SocketAddr>,
    /// The node's families; the agent runs for those it has.
    pub families: Families,
    /// `fail-closed` or `fail-open`.
    pub new_pods: String,
    /// Objects of the input in force.
    pub objects: ObjectCounts,
    /// Entries per map.
    pub maps: MapCounts,
    /// Pod interfaces, by index.
    pub interfaces: Vec<InterfaceStatus>,
    /// Uplinks (the node's other devices) with `leave_node` on their TC
    /// egress, by index, with their state.
    pub uplinks: Vec<crate::node::uplinks::UplinkStatus>,
    /// The cgroup v2 root `to_host` is attached to, or why it is not.
    pub to_host: Option<String>,
    /// Skipped files and documents, rejected objects.
    pub problems: Vec<String>,
    /// The last failed sync, if the one after it has not succeeded yet.
    pub last_error: Option<String>,
    /// The source's stores and whether it reaches what it watches (the
    /// `kube` source; the files source leaves it at its default).
    pub source: SourceHealth,
}

/// Read side of the agent's status.
#[derive(Clone, Debug)]
pub struct StatusHandle(pub(crate) watch::Receiver<Status>);

impl StatusHandle {
    /// The status now.
    #[must_use]
    pub fn get(&self) -> Status {
        self.0.borrow().clone()
    }

    /// Waits until `pred` holds, at most `timeout`.
    ///
    /// # Errors
    /// The last status seen, when the deadline passed or the agent stopped.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl FnMut(&Status) -> bool,
    ) -> Result<Status, Box<Status>> {
        let found = match tokio::time::timeout(timeout, self.0.wait_for(pred)).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        };
        found.ok_or_else(|| Box::new(self.get()))
    }
}
