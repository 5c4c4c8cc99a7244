//! Pod interfaces: watching links (rtnetlink) and finding which pod a host
//! veth belongs to without waiting for its traffic.
//!
//! Binding reads the pod's side: the veth's peer lives in another network
//! namespace, named relative to ours by the link's `IFLA_LINK_NETNSID`. The
//! namespace files under `/var/run/netns` and `/proc/*/ns/net` are matched
//! against that id (`RTM_GETNSID` with the file's descriptor), and the
//! peer's addresses are read inside the one that matches. Routed CNIs'
//! host routes (`podIP dev vethX`) are the fallback when no namespace file
//! is visible.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::PathBuf,
};

use futures::{StreamExt as _, TryStreamExt as _};
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute},
    nsid::{NsidAttribute, NsidMessage},
    route::{RouteAddress, RouteAttribute},
};
use netlink_sys::AsyncSocket as _;
use rtnetlink::{Handle, IpVersion};
use tokio::sync::{mpsc, watch};

/// A link as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Interface index in the agent's namespace.
    pub ifindex: u32,
    /// Interface name.
    pub name: String,
    /// Whether it is a veth (only veths are pod interfaces).
    pub veth: bool,
    /// Its `IFLA_INFO_KIND` (`veth`, `bridge`, `vxlan`, ...); `None` for a
    /// physical device (and `lo`).
    pub kind: Option<String>,
    /// The peer's namespace, relative to the agent's (`IFLA_LINK_NETNSID`).
    pub peer_netnsid: Option<i32>,
    /// The peer's interface index in its namespace (`IFLA_LINK`).
    pub peer_ifindex: Option<u32>,
}

/// A change of the node's links.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The link exists (new, or changed).
    Present(Link),
    /// The link is gone.
    Gone {
        /// Its index.
        ifindex: u32,
        /// Its last name.
        name: String,
    },
    /// The node resolved a neighbour (or changed one): an unbound pod may
    /// now be found behind a bridge port.
    Neighbour,
}

/// Why a netlink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    /// A netlink request failed.
    #[error("netlink {op}: {source}")]
    Netlink {
        /// The request.
        op: &'static str,
        /// Why.
        source: rtnetlink::Error,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// The call and its object.
        op: String,
        /// Why.
        source: std::io::Error,
    },
    /// No namespace file has the peer's id.
    #[error("no namespace file under /var/run/netns or /proc/*/ns/net has netnsid {0}")]
    NetnsNotFound(i32),
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> InterfaceError {
    let op = op.into();
    move |source| InterfaceError::Io { op, source }
}

/// Reads a link message.
#[must_use]
pub fn parse_link(msg: &LinkMessage) -> Link {
    let mut link = Link {
        ifindex: msg.header.index,
        name: String::new(),
        veth: false,
        kind: None,
        peer_netnsid: None,
        peer_ifindex: None,
    };
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name.clone_from(n),
            LinkAttribute::NetnsId(id) if *id >= 0 => link.peer_netnsid = Some(*id),
            LinkAttribute::Link(i) => link.peer_ifindex = Some(*i),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.veth |= matches!(k, InfoKind::Veth);
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// What the agent does with a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkClass {
    /// A pod's host-side veth: `from_pod` and `to_pod`.
    Pod,
    /// Another device a packet may leave the node by (uplink, tunnel,
    /// bond, VLAN): `leave_node` on its TC egress.
    Uplink,
    /// Not netpol's: `lo`, and bridges (their ports are pod veths, which
    /// judge what the bridge forwards to them at `to_pod`).
    Ignore,
}

/// Classifies a link by its `IFLA_INFO_KIND` and name.
///
/// - `lo` is ignored;
/// - a link whose name matches `uplinks` is an uplink, whatever its kind
///   (a veth to another node, a bridge enslaving the node's NIC);
/// - a veth whose name matches `pods` (every veth without it) is a pod
///   interface;
/// - other bridges are ignored (their ports are pod veths, which judge
///   what the bridge forwards to them at `to_pod`);
/// - anything else (a device, a tunnel, a bond, a VLAN, a veth `pods`
///   does not match) is an uplink. There is no way to leave a device
///   without `leave_node`: a marked packet must never leave unjudged.
#[must_use]
pub fn classify(
    kind: Option<&str>,
    name: &str,
    pods: Option<&glob::Pattern>,
    uplinks: Option<&glob::Pattern>,
) -> LinkClass {
    if name == "lo" {
        return LinkClass::Ignore;
    }
    if uplinks.is_some_and(|g| g.matches(name)) {
        return LinkClass::Uplink;
    }
    match kind {
        Some("veth") if pods.is_none_or(|g| g.matches(name)) => LinkClass::Pod,
        Some("bridge") => LinkClass::Ignore,
        _ => LinkClass::Uplink,
    }
}

impl Link {
    /// [`classify`] of this link.
    #[must_use]
    pub fn class(
        &self,
        pods: Option<&glob::Pattern>,
        uplinks: Option<&glob::Pattern>,
    ) -> LinkClass {
        let kind = if self.veth {
            Some("veth")
        } else {
            self.kind.as_deref()
        };
        classify(kind, &self.name, pods, uplinks)
    }
}

fn connect() -> Result<Handle, InterfaceError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(io("netlink socket"))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Sends every existing link, then every change, on `tx` until `stop`.
///
/// # Errors
/// When the netlink socket cannot be opened or subscribed.
pub async fn watch_links(
    tx: mpsc::UnboundedSender<LinkEvent>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), InterfaceError> {
    let (mut conn, handle, mut messages) =
        rtnetlink::new_connection().map_err(io("netlink socket"))?;
    // Subscribed before the dump, so no link born in between is missed.
    // Neighbour events drive binding behind a bridge (see `routes`).
    conn.socket_mut()
        .socket_mut()
        .bind(&netlink_sys::SocketAddr::new(
            0,
            rtnetlink::constants::RTMGRP_LINK | rtnetlink::constants::RTMGRP_NEIGH,
        ))
        .map_err(io("subscribing to link events"))?;
    tokio::spawn(conn);
    let mut dump = handle.link().get().execute();
    while let Some(msg) = dump
        .try_next()
        .await
        .map_err(|source| InterfaceError::Netlink {
            op: "link dump",
            source,
        })?
    {
        if tx.send(LinkEvent::Present(parse_link(&msg))).is_err() {
            return Ok(());
        }
    }
    loop {
        let msg = tokio::select! {
            () = crate::shutdown::stopped(&mut stop) => return Ok(()),
            m = messages.next() => match m {
                Some((m, _)) => m,
                None => return Ok(()),
            },
        };
        let ev = match msg.payload {
            // A bridge reports its ports' state with AF_BRIDGE link
            // messages: they carry no link kind (so they look like a
            // non-veth) and a DelLink of that family only means "left the
            // bridge". Neither says anything about the veth itself.
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l),
            ) if l.header.interface_family == netlink_packet_route::AddressFamily::Bridge => {
                continue;
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                LinkEvent::Present(parse_link(&l))
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                let l = parse_link(&l);
                LinkEvent::Gone {
                    ifindex: l.ifindex,
                    name: l.name,
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(_)) => {
                LinkEvent::Neighbour
            }
            _ => continue,
        };
        if tx.send(ev).is_err() {
            return Ok(());
        }
    }
}

/// The addresses of a veth's peer, read inside the peer's namespace.
/// Blocking: it enters the namespace on a thread of its own, which ends
/// with the lookup (a pool thread must never change namespace).
///
/// # Errors
/// When no namespace file matches the id, or netlink fails.
pub fn peer_addresses(peer_netnsid: i32, peer_ifindex: u32) -> Result<Vec<IpAddr>, InterfaceError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(io("lookup runtime"))?;
            rt.block_on(async {
                let file = find_netns(peer_netnsid).await?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    InterfaceError::Io {
                        op: "entering the peer's namespace".into(),
                        source: e.into(),
                    }
                })?;
                // Opened after setns: this socket speaks to the pod's stack.
                let handle = connect()?;
                let mut out = Vec::new();
                let mut dump = handle
                    .address()
                    .get()
                    .set_link_index_filter(peer_ifindex)
                    .execute();
                while let Some(msg) =
                    dump.try_next()
                        .await
                        .map_err(|source| InterfaceError::Netlink {
                            op: "address dump in the peer's namespace",
                            source,
                        })?
                {
                    for a in msg.attributes {
                        if let AddressAttribute::Address(ip) = a
                            && !out.contains(&ip)
                        {
                            out.push(ip);
                        }
                    }
                }
                Ok(out)
            })
        })
        .join()
        .unwrap_or_else(|_| {
            Err(InterfaceError::Io {
                op: "peer address lookup".into(),
                source: std::io::Error::other("lookup thread panicked"),
            })
        })
    })
}

/// The namespace file whose id, relative to the caller's namespace, is
/// `nsid`.
async fn find_netns(nsid: i32) -> Result<std::fs::File, InterfaceError> {
    let mut handle = connect()?;
    let own = std::fs::metadata("/proc/self/ns/net")
        .map(|m| (m.dev(), m.ino()))
        .ok();
    let mut seen = BTreeSet::new();
    seen.extend(own);
    for path in netns_candidates() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        if nsid_of(&mut handle, &file).await == Some(nsid) {
            return Ok(file);
        }
    }
    Err(InterfaceError::NetnsNotFound(nsid))
}

fn netns_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["/var/run/netns", "/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            out.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        out.extend(entries.filter_map(|e| {
            let e = e.ok()?;
            e.file_name()
                .to_str()?
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| e.path().join("ns/net"))
        }));
    }
    out
}

/// `RTM_GETNSID` for a namespace file: its id as the caller's namespace
/// names it, if it has one.
async fn nsid_of(handle: &mut Handle, file: &std::fs::File) -> Option<i32> {
    let mut msg = NsidMessage::default();
    let fd = u32::try_from(file.as_raw_fd()).ok()?;
    msg.attributes.push(NsidAttribute::Fd(fd));
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
    req.header.flags = NLM_F_REQUEST;
    let mut resp = handle.request(req).ok()?;
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) = m.payload {
            return m.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                _ => None,
            });
        }
    }
    None
}

/// The node's routes with an output interface: `(destination, oif)`, for
/// routed CNIs whose pod routes point at the pod's veth; then, for bridged
/// CNIs, a host route per neighbour the node has resolved behind a bridge
/// port (its MAC looked up in the bridge's FDB), which leaves by that
/// port.
///
/// # Errors
/// When the route dump fails.
pub async fn routes() -> Result<Vec<(IpNet, u32)>, InterfaceError> {
    let handle = connect()?;
    let mut out: Vec<(IpNet, u32)> = kernel_routes(&handle)
        .await?
        .into_iter()
        .map(|r| (r.dst, r.oif))
        .collect();
    // Best effort: a node that never spoke to a pod has no entry for it.
    if let Ok(ports) = neighbour_ports(&handle).await {
        out.extend(ports.into_iter().map(|(ip, port)| (IpNet::from(ip), port)));
    }
    Ok(out)
}

/// A route of the node's tables.
struct Route {
    dst: IpNet,
    oif: u32,
    /// Unicast and with no gateway: its destinations are resolved on `oif`.
    on_link: bool,
}

/// Every route with a destination and an output interface, both families.
async fn kernel_routes(handle: &Handle) -> Result<Vec<Route>, InterfaceError> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        let version = if v6 { IpVersion::V6 } else { IpVersion::V4 };
        let mut dump = handle.route().get(version).execute();
        loop {
            let msg = match dump.try_next().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                // A node without IPv6 has no IPv6 routes to read.
                Err(_) if v6 => break,
                Err(source) => {
                    return Err(InterfaceError::Netlink {
                        op: "route dump",
                        source,
                    });
                }
            };
            let len = msg.header.destination_prefix_length;
            let mut dst = None;
            let mut oif = None;
            let mut gateway = false;
            for a in &msg.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                        dst = IpNet::new(IpAddr::V4(*a), len).ok();
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                        dst = IpNet::new(IpAddr::V6(*a), len).ok();
                    }
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => gateway = true,
                    _ => {}
                }
            }
            if let (Some(dst), Some(oif)) = (dst, oif) {
                let unicast = msg.header.kind == netlink_packet_route::route::RouteType::Unicast;
                out.push(Route {
                    dst,
                    oif,
                    on_link: unicast && !gateway,
                });
            }
        }
    }
    Ok(out)
}

/// Makes the node resolve each of `ips` on the link its longest on-link
/// route names, as `ip neigh replace IP dev DEV use nud none` does
/// (`NTF_USE`: the kernel sends ARP or a neighbour solicitation as if a
/// packet were waiting). No packet goes to the pod; its answer (never
/// judged) gives the node a neighbour entry and the bridge an FDB entry
/// for its port, which [`routes`] then reads. Addresses without an on-link
/// route are skipped. Returns how many were asked for.
///
/// # Errors
/// When the route dump fails; a refused neighbour request is skipped.
pub async fn resolve(ips: &[IpAddr]) -> Result<usize, InterfaceError> {
    use netlink_packet_route::neighbour::{NeighbourFlag, NeighbourState};
    let handle = connect()?;
    let routes = kernel_routes(&handle).await?;
    let mut asked = 0;
    for ip in ips {
        let Some(r) = routes
            .iter()
            .filter(|r| r.on_link && r.dst.contains(ip))
            .max_by_key(|r| r.dst.prefix_len())
        else {
            continue;
        };
        let sent = handle
            .neighbours()
            .add(r.oif, *ip)
            .state(NeighbourState::None)
            .flags(vec![NeighbourFlag::Use])
            .replace()
            .execute()
            .await;
        match sent {
            Ok(()) => asked += 1,
            Err(e) => {
                tracing::debug!(%ip, oif = r.oif, error = %e, "asking the node to resolve a pod");
            }
        }
    }
    Ok(asked)
}

/// `(neighbour address, bridge port)` for every IP neighbour on a bridge
/// whose MAC the bridge's FDB has learnt on a port.
async fn neighbour_ports(handle: &Handle) -> Result<Vec<(IpAddr, u32)>, rtnetlink::Error> {
    let mut ips: Vec<(IpAddr, Vec<u8>, u32)> = Vec::new();
    let mut dump = handle.neighbours().get().execute();
    while let Some(n) = dump.try_next().await? {
        let mut ip = None;
        let mut mac = None;
        for a in n.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                    ip = Some(IpAddr::V4(a));
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                    ip = Some(IpAddr::V6(a));
                }
                NeighbourAttribute::LinkLocalAddress(m) => mac = Some(m),
                _ => {}
            }
        }
        if let (Some(ip), Some(mac)) = (ip, mac) {
            ips.push((ip, mac, n.header.ifindex));
        }
    }
    let mut req = handle.neighbours().get();
    req.message_mut().header.family = netlink_packet_route::AddressFamily::Bridge;
    let mut fdb: Vec<(Vec<u8>, u32, Option<u32>)> = Vec::new();
    let mut dump = req.execute();
    while let Some(n) = dump.try_next().await? {
        let mut mac = None;
        let mut master = None;
        for a in n.attributes {
            match a {
                NeighbourAttribute::LinkLocalAddress(m) => mac = Some(m),
                NeighbourAttribute::Controller(c) => master = Some(c),
                _ => {}
            }
        }
        if let Some(mac) = mac {
            fdb.push((mac, n.header.ifindex, master));
        }
    }
    Ok(ips
        .into_iter()
        .filter_map(|(ip, mac, bridge)| {
            fdb.iter()
                .find(|(m, port, master)| {
                    *m == mac && *port != bridge && master.is_none_or(|b| b == bridge)
                })
                .map(|(_, port, _)| (ip, *port))
        })
        .collect())
}

/// Which families the node's own stack has: a global (not loopback, not
/// link-local) address of each.
///
/// # Errors
/// When the address dump fails.
pub async fn node_families() -> Result<(bool, bool), InterfaceError> {
    let handle = connect()?;
    let mut dump = handle.address().get().execute();
    let (mut v4, mut v6) = (false, false);
    while let Some(msg) = dump
        .try_next()
        .await
        .map_err(|source| InterfaceError::Netlink {
            op: "address dump",
            source,
        })?
    {
        for a in msg.attributes {
            if let AddressAttribute::Address(ip) = a {
                match ip {
                    IpAddr::V4(a) if !a.is_loopback() && !a.is_link_local() => v4 = true,
                    IpAddr::V6(a) if !a.is_loopback() && !a.is_unicast_link_local() => v6 = true,
                    _ => {}
                }
            }
        }
    }
    Ok((v4, v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(p: &str) -> glob::Pattern {
        glob::Pattern::new(p).expect("a glob")
    }

    #[test]
    fn every_veth_is_a_pod_interface_by_default() {
        assert_eq!(
            classify(Some("veth"), "veth1234", None, None),
            LinkClass::Pod
        );
        assert_eq!(classify(Some("veth"), "eth0", None, None), LinkClass::Pod);
    }

    #[test]
    fn veths_the_pod_glob_leaves_out_are_uplinks() {
        let pods = glob("cali*");
        assert_eq!(
            classify(Some("veth"), "cali12ab", Some(&pods), None),
            LinkClass::Pod
        );
        // A kind node's eth0 is a veth.
        assert_eq!(
            classify(Some("veth"), "eth0", Some(&pods), None),
            LinkClass::Uplink
        );
    }

    #[test]
    fn devices_tunnels_bonds_and_vlans_are_uplinks() {
        for (kind, name) in [
            (None, "eth0"),
            (None, "ens5"),
            (Some("vxlan"), "flannel.1"),
            (Some("vxlan"), "flannel-v6.1"),
            (Some("geneve"), "genev_sys_6081"),
            (Some("wireguard"), "wg0"),
            (Some("ipip"), "tunl0"),
            (Some("bond"), "bond0"),
            (Some("vlan"), "eth0.100"),
        ] {
            assert_eq!(
                classify(kind, name, None, None),
                LinkClass::Uplink,
                "{name}"
            );
        }
    }

    #[test]
    fn loopback_and_unnamed_bridges_are_ignored() {
        assert_eq!(classify(None, "lo", None, None), LinkClass::Ignore);
        assert_eq!(
            classify(Some("bridge"), "cni0", None, None),
            LinkClass::Ignore
        );
        assert_eq!(
            classify(Some("bridge"), "cni0", None, Some(&glob("eth*"))),
            LinkClass::Ignore
        );
        assert_eq!(
            classify(None, "lo", None, Some(&glob("*"))),
            LinkClass::Ignore
        );
    }

    #[test]
    fn the_uplink_glob_names_uplinks_and_never_leaves_a_device_unjudged() {
        let uplinks = glob("ul*");
        // A veth to another node is an uplink when named so.
        assert_eq!(
            classify(Some("veth"), "ul0", None, Some(&uplinks)),
            LinkClass::Uplink
        );
        // So is a bridge enslaving the node's NIC.
        assert_eq!(
            classify(Some("bridge"), "ulbr", None, Some(&uplinks)),
            LinkClass::Uplink
        );
        // Devices it does not name stay uplinks: a Service packet must not
        // leave unjudged.
        assert_eq!(
            classify(Some("vxlan"), "flannel.1", None, Some(&uplinks)),
            LinkClass::Uplink
        );
        assert_eq!(
            classify(None, "eth0", None, Some(&uplinks)),
            LinkClass::Uplink
        );
        // Pods are not narrowed by it.
        assert_eq!(
            classify(Some("veth"), "veth1", None, Some(&uplinks)),
            LinkClass::Pod
        );
        // A veth --interfaces leaves out is an uplink too.
        assert_eq!(
            classify(Some("veth"), "veth1", Some(&glob("cali*")), Some(&uplinks)),
            LinkClass::Uplink
        );
    }

    #[test]
    fn a_links_class_uses_its_kind() {
        let link = |name: &str, veth: bool, kind: Option<&str>| Link {
            ifindex: 2,
            name: name.to_owned(),
            veth,
            kind: kind.map(str::to_owned),
            peer_netnsid: None,
            peer_ifindex: None,
        };
        assert_eq!(
            link("veth9", true, Some("veth")).class(None, None),
            LinkClass::Pod
        );
        assert_eq!(
            link("cni0", false, Some("bridge")).class(None, None),
            LinkClass::Ignore
        );
        assert_eq!(
            link("eth0", false, None).class(None, None),
            LinkClass::Uplink
        );
    }
}
