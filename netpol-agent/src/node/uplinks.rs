//! Uplinks: the node's devices other than pod interfaces (the physical
//! uplink, flannel's and other VXLAN/Geneve/WireGuard/IPIP tunnels, bonds,
//! VLAN devices), each with `leave_node` on its TC egress. A pod's Service
//! packet whose backend kube-proxy put on another node leaves by one of
//! them, and is judged there against its source pod's egress (issue 9).
//!
//! Which links are uplinks is [`crate::node::links::classify`]; this module keeps
//! the set attached in step with the link events the sync loop receives:
//! attached when one appears (or at start, from the initial dump), detached
//! when it goes, renamed or is no longer an uplink. A failed attach is
//! shown on `/status` and retried on the link's next event.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    datapath::{Datapath, DatapathError},
    node::links::{LinkClass, LinkEvent},
};

/// One uplink, as `/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UplinkStatus {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
    /// Its `IFLA_INFO_KIND` (`vxlan`, `bond`, ...); `None` for a device.
    pub kind: Option<String>,
    /// `leave_node`, or `leave_node_l3` on a device without an Ethernet
    /// header (`WireGuard`, IPIP, `tun`); `None` when the attach failed.
    pub program: Option<String>,
    /// `attached` (`leave_node` on its TC egress) or `failed`.
    pub state: String,
    /// Why the last attach failed.
    pub error: Option<String>,
}

/// Attaching and detaching `leave_node`; [`Datapath`] in the agent, a fake
/// in tests.
pub(crate) trait UplinkHooks {
    /// Attaches; returns the program attached.
    fn attach_uplink(&mut self, interface: &str) -> Result<&'static str, DatapathError>;
    fn detach_uplink(&mut self, interface: &str) -> Result<(), DatapathError>;
}

impl UplinkHooks for Datapath {
    fn attach_uplink(&mut self, interface: &str) -> Result<&'static str, DatapathError> {
        Datapath::attach_uplink(self, interface)?;
        Ok(self
            .uplink_program(interface)
            .unwrap_or(netpol_common::programs::LEAVE_NODE))
    }

    fn detach_uplink(&mut self, interface: &str) -> Result<(), DatapathError> {
        Datapath::detach_uplink(self, interface)
    }
}

#[derive(Debug)]
struct Known {
    name: String,
    kind: Option<String>,
    /// The program attached, or why the attach failed.
    attached: Result<&'static str, String>,
}

/// The uplinks the agent has seen, by index.
#[derive(Debug, Default)]
pub(crate) struct Uplinks {
    pods: Option<glob::Pattern>,
    uplinks: Option<glob::Pattern>,
    known: BTreeMap<u32, Known>,
}

impl Uplinks {
    /// `pods`: the `--interfaces` glob (veths it leaves out may be
    /// uplinks); `uplinks`: the `--uplinks` glob.
    pub(crate) fn new(pods: Option<glob::Pattern>, uplinks: Option<glob::Pattern>) -> Self {
        Self {
            pods,
            uplinks,
            known: BTreeMap::new(),
        }
    }

    /// Follows one link event; returns whether the uplinks changed (to be
    /// published). Call it after the pod interfaces have seen the event, so
    /// that a pod interface becoming an uplink is detached first.
    pub(crate) fn on_link(&mut self, hooks: &mut impl UplinkHooks, ev: &LinkEvent) -> bool {
        match ev {
            LinkEvent::Present(link) => {
                let uplink =
                    link.class(self.pods.as_ref(), self.uplinks.as_ref()) == LinkClass::Uplink;
                let mut changed = false;
                if let Some(known) = self.known.get(&link.ifindex) {
                    if known.name == link.name && uplink {
                        if known.attached.is_ok() {
                            return false;
                        }
                        // Retry a failed attach on the link's next event
                        // (it came up, got its master, ...).
                    } else {
                        // Renamed (its pin names the old name) or no
                        // longer an uplink.
                        let name = known.name.clone();
                        self.forget(hooks, link.ifindex, &name);
                        changed = true;
                    }
                }
                if !uplink {
                    return changed;
                }
                let attached = hooks.attach_uplink(&link.name).map_err(|e| {
                    tracing::error!(interface = %link.name, error = %e, "attaching leave_node to an uplink");
                    e.to_string()
                });
                self.known.insert(
                    link.ifindex,
                    Known {
                        name: link.name.clone(),
                        kind: link.kind.clone(),
                        attached,
                    },
                );
                true
            }
            LinkEvent::Gone { ifindex, .. } => match self.known.get(ifindex) {
                Some(known) => {
                    let name = known.name.clone();
                    self.forget(hooks, *ifindex, &name);
                    true
                }
                None => false,
            },
            LinkEvent::Neighbour => false,
        }
    }

    fn forget(&mut self, hooks: &mut impl UplinkHooks, ifindex: u32, name: &str) {
        let Some(known) = self.known.remove(&ifindex) else {
            return;
        };
        if known.attached.is_err() {
            return;
        }
        // A gone device took its programs with it, and a pod interface
        // attach displaces `leave_node` itself: the detach only drops our
        // handles then, so its error says nothing.
        match hooks.detach_uplink(name) {
            Ok(()) => tracing::info!(interface = %name, ifindex, "uplink gone or no longer one"),
            Err(e) => {
                tracing::debug!(interface = %name, error = %e, "uplink detach");
            }
        }
    }

    /// The uplinks, by index.
    pub(crate) fn status(&self) -> Vec<UplinkStatus> {
        self.known
            .iter()
            .map(|(&ifindex, k)| UplinkStatus {
                name: k.name.clone(),
                ifindex,
                kind: k.kind.clone(),
                program: k.attached.as_ref().ok().map(|p| (*p).to_owned()),
                state: if k.attached.is_ok() {
                    "attached"
                } else {
                    "failed"
                }
                .to_owned(),
                error: k.attached.as_ref().err().cloned(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::links::Link;

    /// Records attachments like the datapath does: by name.
    #[derive(Default)]
    struct Fake {
        attached: std::collections::BTreeSet<String>,
        refuse: Option<String>,
        calls: Vec<String>,
    }

    impl UplinkHooks for Fake {
        fn attach_uplink(&mut self, interface: &str) -> Result<&'static str, DatapathError> {
            self.calls.push(format!("attach {interface}"));
            if self.refuse.as_deref() == Some(interface) {
                return Err(DatapathError::PodInterface {
                    interface: interface.to_owned(),
                });
            }
            self.attached.insert(interface.to_owned());
            Ok(netpol_common::programs::LEAVE_NODE)
        }

        fn detach_uplink(&mut self, interface: &str) -> Result<(), DatapathError> {
            self.calls.push(format!("detach {interface}"));
            if self.attached.remove(interface) {
                Ok(())
            } else {
                Err(DatapathError::NotAttached {
                    interface: interface.to_owned(),
                })
            }
        }
    }

    fn present(ifindex: u32, name: &str, kind: Option<&str>) -> LinkEvent {
        LinkEvent::Present(Link {
            ifindex,
            name: name.to_owned(),
            veth: kind == Some("veth"),
            kind: kind.map(str::to_owned),
            peer_netnsid: None,
            peer_ifindex: None,
        })
    }

    #[expect(
        clippy::unnecessary_wraps,
        reason = "the shape of the `Uplinks::new` argument it fills"
    )]
    fn glob(p: &str) -> Option<glob::Pattern> {
        Some(glob::Pattern::new(p).expect("a glob"))
    }

    #[test]
    fn only_uplinks_get_leave_node() {
        let mut u = Uplinks::new(glob("nph*"), None);
        let mut dp = Fake::default();
        for ev in [
            present(1, "lo", None),
            present(2, "eth0", None),
            present(3, "cni0", Some("bridge")),
            present(4, "nph1", Some("veth")),
            present(5, "flannel.1", Some("vxlan")),
        ] {
            u.on_link(&mut dp, &ev);
        }
        assert_eq!(
            dp.attached.iter().map(String::as_str).collect::<Vec<_>>(),
            ["eth0", "flannel.1"]
        );
        let st = u.status();
        assert_eq!(st.len(), 2);
        assert_eq!(st[0].name, "eth0");
        assert_eq!(st[0].state, "attached");
        assert_eq!(st[1].kind.as_deref(), Some("vxlan"));
    }

    #[test]
    fn a_repeated_event_attaches_once() {
        let mut u = Uplinks::new(None, None);
        let mut dp = Fake::default();
        assert!(u.on_link(&mut dp, &present(2, "eth0", None)));
        assert!(!u.on_link(&mut dp, &present(2, "eth0", None)));
        assert_eq!(dp.calls, ["attach eth0"]);
    }

    #[test]
    fn a_gone_uplink_is_detached_and_forgotten() {
        let mut u = Uplinks::new(None, None);
        let mut dp = Fake::default();
        u.on_link(&mut dp, &present(7, "vxlan0", Some("vxlan")));
        assert!(u.on_link(
            &mut dp,
            &LinkEvent::Gone {
                ifindex: 7,
                name: "vxlan0".into()
            }
        ));
        assert!(dp.attached.is_empty());
        assert!(u.status().is_empty());
        // Not an uplink of ours: nothing to do.
        assert!(!u.on_link(
            &mut dp,
            &LinkEvent::Gone {
                ifindex: 8,
                name: "nph1".into()
            }
        ));
    }

    #[test]
    fn a_renamed_uplink_moves_to_its_new_name() {
        let mut u = Uplinks::new(None, None);
        let mut dp = Fake::default();
        u.on_link(&mut dp, &present(2, "eth0", None));
        u.on_link(&mut dp, &present(2, "ens5", None));
        assert_eq!(dp.calls, ["attach eth0", "detach eth0", "attach ens5"]);
        assert_eq!(u.status()[0].name, "ens5");
    }

    #[test]
    fn a_veth_renamed_out_of_the_uplink_glob_into_the_pods_is_detached() {
        let mut u = Uplinks::new(glob("nph*"), glob("ul*"));
        let mut dp = Fake::default();
        u.on_link(&mut dp, &present(2, "ul0", Some("veth")));
        assert_eq!(u.status().len(), 1, "a veth the uplink glob names");
        assert!(u.on_link(&mut dp, &present(2, "nph0", Some("veth"))));
        assert!(dp.attached.is_empty());
        assert!(u.status().is_empty());
    }

    #[test]
    fn a_failed_attach_is_shown_and_retried_on_the_next_event() {
        let mut u = Uplinks::new(None, None);
        let mut dp = Fake {
            refuse: Some("eth0".into()),
            ..Fake::default()
        };
        u.on_link(&mut dp, &present(2, "eth0", None));
        let st = u.status();
        assert_eq!(st[0].state, "failed");
        assert!(st[0].error.as_deref().is_some_and(|e| e.contains("eth0")));
        dp.refuse = None;
        assert!(u.on_link(&mut dp, &present(2, "eth0", None)));
        assert_eq!(u.status()[0].state, "attached");
        assert_eq!(u.status()[0].error, None);
        assert_eq!(u.status()[0].program.as_deref(), Some("leave_node"));
    }
}
