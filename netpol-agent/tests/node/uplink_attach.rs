//! `leave_node` on the node's uplinks (issue 9): the agent attaches it to
//! the TC egress of every link that is not `lo`, a bridge or a pod veth,
//! and of nothing else; a restarted agent adopts it; `netpol-agent
//! cleanup` removes it. The `Datapath` API does the same on the netlink
//! path.
use std::collections::BTreeSet;

use aya::programs::{SchedClassifier, TcAttachType};
use netpol_agent::{AttachMode, Datapath, DatapathConfig, DatapathError, datapath};
use netpol_common::{GlobalConfig, maps, programs};
use netpol_testkit::{
    Netns,
    agent::Running,
    datapath::TempBpffs,
    manifests::{BASE, Manifests, pod_manifest},
    privileged,
    topology::{PodLink, Topology, ip, node, pod},
    unique,
};

/// Names of the TCX programs on one hook of `dev`, in the calling thread's
/// namespace (this bpftool predates TCX).
fn tcx(dev: &str, hook: TcAttachType) -> Vec<(String, u32)> {
    SchedClassifier::query_tcx(dev, hook)
        .map(|(_, progs)| progs)
        .unwrap_or_default()
        .into_iter()
        .map(|p| (p.name_as_str().unwrap_or("?").to_owned(), p.id()))
        .collect()
}

fn tcx_names(node: &Netns, dev: &str, hook: TcAttachType) -> Vec<String> {
    node.run(|| tcx(dev, hook).into_iter().map(|(n, _)| n).collect())
}

fn uplink_names(s: &netpol_agent::Status) -> BTreeSet<String> {
    s.uplinks.iter().map(|u| u.name.clone()).collect()
}

#[test]
fn agent_attaches_leave_node_to_uplinks_only_adopts_it_on_restart_and_cleanup_removes_it() {
    if !privileged() {
        return;
    }
    let node = node(Topology::Bridge, false);
    let bpffs = TempBpffs::new();
    let m = Manifests::new();
    let p = pod(&node, Topology::Bridge, 2, false);
    m.write("00-base.yaml", BASE);
    m.write("10-pod.yaml", &pod_manifest("a", &p));
    // A tunnel named as flannel names its VXLAN device (`flannel.1`: bpffs
    // refuses a `.` in a pin's name), and a veth --interfaces leaves out
    // (a kind node's eth0 is one). This kernel has no dummy devices.
    let tunnel = format!("{}.1", unique("upl"));
    ip(
        &node.name,
        &format!("link add {tunnel} type vxlan id 42 dstport 4789"),
    );
    ip(&node.name, &format!("link set {tunnel} up"));
    let outside = Netns::new("npo");
    let wan = unique("wan");
    ip(
        &node.name,
        &format!(
            "link add {wan} type veth peer name eth0 netns {}",
            outside.name
        ),
    );
    ip(&node.name, &format!("link set {wan} up"));
    // A device without an Ethernet header (as WireGuard and IPIP are).
    let l3 = unique("tun");
    ip(&node.name, &format!("tuntap add mode tun name {l3}"));
    let expected: BTreeSet<String> = [tunnel.clone(), wan.clone(), l3.clone()].into();

    let mut agent = Running::start(&node, bpffs.path(), &m);
    agent.wait_enforced(&m);
    // The pod interface's netlink filters move to TCX links once the
    // node is quiet (`--attach-mode=auto`).
    let s = agent.wait("both uplinks attached, the pod on TCX links", |s| {
        uplink_names(s) == expected
            && s.uplinks.iter().all(|u| u.state == "attached")
            && s.interfaces.iter().all(|i| !i.awaiting_tcx)
    });
    assert!(s.uplinks.iter().all(|u| u.error.is_none()), "{s:#?}");
    let kinds: Vec<Option<&str>> = s.uplinks.iter().map(|u| u.kind.as_deref()).collect();
    assert!(
        kinds.contains(&Some("vxlan")) && kinds.contains(&Some("veth")),
        "{kinds:?}"
    );

    let program = |name: &str| {
        s.uplinks
            .iter()
            .find(|u| u.name == name)
            .and_then(|u| u.program.clone())
    };
    assert_eq!(program(&tunnel).as_deref(), Some(programs::LEAVE_NODE));
    assert_eq!(program(&l3).as_deref(), Some(datapath::LEAVE_NODE_L3));
    assert_eq!(
        tcx_names(&node, &l3, TcAttachType::Egress),
        [datapath::LEAVE_NODE_L3]
    );
    assert!(tcx_names(&node, &l3, TcAttachType::Ingress).is_empty());

    // The kernel agrees: leave_node on the uplinks' egress only.
    for up in [&tunnel, &wan] {
        assert_eq!(
            tcx_names(&node, up, TcAttachType::Egress),
            [programs::LEAVE_NODE],
            "{up}"
        );
        assert!(
            tcx_names(&node, up, TcAttachType::Ingress).is_empty(),
            "{up}"
        );
        assert!(
            bpffs
                .path()
                .join("netpol/links")
                .join(format!("{}-leave_node", up.replace('.', ":")))
                .exists(),
            "{up}: link pin"
        );
    }
    for dev in ["cni0", "lo"] {
        for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
            assert!(tcx_names(&node, dev, hook).is_empty(), "{dev} {hook:?}");
        }
    }
    assert_eq!(
        tcx_names(&node, &p.host_if, TcAttachType::Ingress),
        [programs::FROM_POD]
    );
    assert_eq!(
        tcx_names(&node, &p.host_if, TcAttachType::Egress),
        [programs::TO_POD]
    );

    // Links coming and going while the agent runs.
    let late = unique("upl");
    ip(
        &node.name,
        &format!("link add {late} type vxlan id 43 dstport 4790"),
    );
    agent.wait("a new uplink attached", |s| {
        s.uplinks
            .iter()
            .any(|u| u.name == late && u.state == "attached")
    });
    assert_eq!(
        tcx_names(&node, &late, TcAttachType::Egress),
        [programs::LEAVE_NODE]
    );
    ip(&node.name, &format!("link del {late}"));
    agent.wait("a gone uplink forgotten", |s| uplink_names(s) == expected);
    assert!(
        !bpffs
            .path()
            .join("netpol/links")
            .join(format!("{late}-leave_node"))
            .exists()
    );

    let before: Vec<(String, u32)> = node.run(|| tcx(&tunnel, TcAttachType::Egress));
    drop(agent);
    // The attachment outlives the agent...
    assert_eq!(
        tcx_names(&node, &tunnel, TcAttachType::Egress),
        [programs::LEAVE_NODE]
    );

    // ...and the next one adopts it: one program on the hook (not a second
    // attachment next to the old one), its own.
    let mut agent = Running::start(&node, bpffs.path(), &m);
    agent.wait_enforced(&m);
    agent.wait("both uplinks adopted", |s| {
        uplink_names(s) == expected && s.uplinks.iter().all(|u| u.state == "attached")
    });
    let after: Vec<(String, u32)> = node.run(|| tcx(&tunnel, TcAttachType::Egress));
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].0, programs::LEAVE_NODE);
    assert_ne!(
        after[0].1, before[0].1,
        "the new agent's program swapped in"
    );
    drop(agent);

    let cleaned = node.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(datapath::cleanup(bpffs.path()))
            .expect("cleanup")
    });
    assert!(
        cleaned
            .links
            .contains(&format!("{l3}-{}", datapath::LEAVE_NODE_L3)),
        "{cleaned:?}"
    );
    assert!(tcx_names(&node, &l3, TcAttachType::Egress).is_empty());
    for up in [&tunnel, &wan] {
        assert!(
            cleaned.links.contains(&format!("{up}-leave_node")),
            "{cleaned:?}"
        );
        assert!(
            tcx_names(&node, up, TcAttachType::Egress).is_empty(),
            "{up}"
        );
    }
    assert!(tcx_names(&node, &p.host_if, TcAttachType::Egress).is_empty());
}

fn config(bpffs: &TempBpffs, mode: AttachMode, persistent: bool) -> DatapathConfig {
    DatapathConfig {
        bpffs: bpffs.path().to_owned(),
        attach_mode: mode,
        persistent,
        ..DatapathConfig::default()
    }
}

/// The program ids in `tc filter show dev <dev> <hook>` lines naming
/// `program`.
fn filter_ids(node: &Netns, dev: &str, hook: &str, program: &str) -> Vec<String> {
    node.exec("tc", &["filter", "show", "dev", dev, hook])
        .lines()
        .filter(|l| l.contains(program))
        .map(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "id")
                .nth(1)
                .unwrap_or("?")
                .to_owned()
        })
        .collect()
}

#[test]
fn netlink_uplink_filter_is_on_egress_only_adopted_by_the_next_datapath_and_cleaned_up() {
    if !privileged() {
        return;
    }
    let node = Netns::new("npn");
    let bpffs = TempBpffs::new();
    let up = format!("{}.1", unique("upl"));
    ip(
        &node.name,
        &format!("link add {up} type vxlan id 42 dstport 4789"),
    );
    ip(&node.name, &format!("link set {up} up"));

    node.run(|| {
        let mut dp = Datapath::load(&config(&bpffs, AttachMode::Netlink, true)).expect("load");
        dp.attach_uplink(&up).expect("attach uplink");
        dp.attach_uplink(&up).expect("attaching twice is a no-op");
        assert_eq!(dp.uplinks().collect::<Vec<_>>(), [up.as_str()]);
        assert_eq!(dp.attached().count(), 0, "not a pod interface");
        // Dropped: a persistent datapath leaves its filter in place.
    });
    assert!(
        node.exec("tc", &["qdisc", "show", "dev", &up])
            .contains("clsact")
    );
    let ingress = node.exec("tc", &["filter", "show", "dev", &up, "ingress"]);
    assert!(ingress.trim().is_empty(), "nothing on ingress: {ingress}");
    let before = filter_ids(&node, &up, "egress", programs::LEAVE_NODE);
    assert_eq!(before.len(), 1, "{before:?}");

    node.run(|| {
        let mut dp = Datapath::load(&config(&bpffs, AttachMode::Netlink, true)).expect("reload");
        dp.attach_uplink(&up).expect("adopt uplink");
    });
    let after = filter_ids(&node, &up, "egress", programs::LEAVE_NODE);
    assert_eq!(after.len(), 1, "adopted in place, not added: {after:?}");
    assert_ne!(after, before, "the new program swapped in");

    // Detached on request.
    node.run(|| {
        let mut dp = Datapath::load(&config(&bpffs, AttachMode::Netlink, true)).expect("reload");
        dp.attach_uplink(&up).expect("adopt uplink");
        dp.detach_uplink(&up).expect("detach uplink");
        assert_eq!(dp.uplinks().count(), 0);
        dp.attach_uplink(&up).expect("attach again");
    });
    assert_eq!(
        filter_ids(&node, &up, "egress", programs::LEAVE_NODE).len(),
        1
    );

    let cleaned = node.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(datapath::cleanup(bpffs.path()))
            .expect("cleanup")
    });
    assert!(
        cleaned.filters.contains(&format!("{up} egress")),
        "{cleaned:?}"
    );
    assert_eq!(cleaned.qdiscs, std::slice::from_ref(&up), "{cleaned:?}");
    assert!(
        !node
            .exec("tc", &["qdisc", "show", "dev", &up])
            .contains("clsact")
    );
}

#[test]
fn a_pod_interface_is_never_an_uplink_and_takes_over_one() {
    if !privileged() {
        return;
    }
    let link = PodLink::new();
    let bpffs = TempBpffs::new();
    link.node.run(|| {
        let mut dp = Datapath::load(&config(&bpffs, AttachMode::Auto, false)).expect("load");
        dp.attach_uplink(&link.host_if).expect("as an uplink");
        assert_eq!(
            tcx(&link.host_if, TcAttachType::Egress)
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>(),
            [programs::LEAVE_NODE]
        );
        // It turns out to be a pod's: leave_node makes way for to_pod.
        dp.attach(&link.host_if).expect("as a pod interface");
        assert_eq!(dp.uplinks().count(), 0);
        assert_eq!(
            tcx(&link.host_if, TcAttachType::Egress)
                .into_iter()
                .map(|(n, _)| n)
                .collect::<Vec<_>>(),
            [programs::TO_POD]
        );
        let err = dp
            .attach_uplink(&link.host_if)
            .expect_err("a pod interface is not an uplink");
        assert!(matches!(err, DatapathError::PodInterface { .. }), "{err}");
        assert!(err.to_string().contains(&link.host_if), "{err}");
    });
}

#[test]
fn the_mark_mask_reaches_the_config_map_and_stays_there() {
    if !privileged() {
        return;
    }
    let node = Netns::new("npn");
    let bpffs = TempBpffs::new();
    node.run(|| {
        let mut dp = Datapath::load(&DatapathConfig {
            mark_mask: 0x00f0_0000,
            ..config(&bpffs, AttachMode::Auto, false)
        })
        .expect("load");
        assert_eq!(dp.mark_slots(), 15);
        let read = || {
            let pin = bpffs.path().join("netpol").join(maps::CONFIG);
            let data = aya::maps::MapData::from_pin(&pin).expect("config pin");
            let map = aya::maps::Map::from_map_data(data).expect("config map");
            let array = aya::maps::Array::<_, GlobalConfig>::try_from(map).expect("config array");
            array.get(&0, 0).expect("config entry")
        };
        let g = read();
        assert_eq!((g.mark_mask, g.mark_shift), (0x00f0_0000, 20));
        // The agent's later set_global carries no mark: the datapath's stays.
        dp.set_global(GlobalConfig {
            ct_udp_ns: 5,
            ..GlobalConfig::default()
        })
        .expect("set_global");
        let g = read();
        assert_eq!(
            (g.mark_mask, g.mark_shift, g.ct_udp_ns),
            (0x00f0_0000, 20, 5)
        );
    });
}

#[test]
fn an_unusable_mark_mask_is_refused_before_loading_anything() {
    let err = Datapath::load(&DatapathConfig {
        mark_mask: 0x0f0f_0000,
        bpffs: "/nonexistent".into(),
        ..DatapathConfig::default()
    })
    .expect_err("not contiguous");
    assert!(matches!(err, DatapathError::MarkMask { mask: 0x0f0f_0000 }));
    assert!(err.to_string().contains("0x0f0f0000"), "{err}");
}
