//! The two programs on a real veth: attach, count, detach, over both
//! families and both attach paths.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use netpol_agent::{AttachMode, Counters, Datapath, DatapathConfig};
use netpol_common::{TrafficCounter, direction, family, maps};
use netpol_testkit::{
    datapath::TempBpffs,
    privileged, sh,
    topology::{NODE_V4, POD_V4, POD_V6, PodLink},
};

fn config(bpffs: &TempBpffs, mode: AttachMode) -> DatapathConfig {
    DatapathConfig {
        bpffs: bpffs.path().to_owned(),
        object: None,
        attach_mode: mode,
        ..DatapathConfig::default()
    }
}

fn ping(link: &PodLink, addr: &str, count: u32) {
    link.node.exec(
        "ping",
        &[
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "2",
            "-q",
            addr,
        ],
    );
}

/// One TCP connection from the node netns to the pod: a line out, the same
/// line back.
fn tcp_exchange(link: &PodLink, server: &str) {
    let ip: IpAddr = server.parse().expect("address");
    let listener = link
        .pod
        .run(|| TcpListener::bind(SocketAddr::new(ip, 0)).expect("bind in pod"));
    let addr = listener.local_addr().expect("local addr");
    let echo = std::thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("read");
        (&s).write_all(line.as_bytes()).expect("write");
    });
    let reply = link.node.run(|| {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        (&s).write_all(b"hello netpol\n").expect("send");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("reply");
        line
    });
    echo.join().expect("echo thread");
    assert_eq!(reply, "hello netpol\n");
}

fn total(c: &Counters, d: u32, f: u32) -> TrafficCounter {
    c.total(d, f)
}

/// Traffic both ways over both families, then the counters per direction and
/// family must have grown by at least what was sent.
fn exercise_and_check(link: &PodLink, dp: &Datapath) {
    let before = dp.counters().expect("counters");
    ping(link, POD_V4, 3);
    ping(link, POD_V6, 3);
    tcp_exchange(link, POD_V4);
    tcp_exchange(link, POD_V6);
    let after = dp.counters().expect("counters");
    for f in [family::IPV4, family::IPV6] {
        for d in [direction::EGRESS, direction::INGRESS] {
            let (b, a) = (total(&before, d, f), total(&after, d, f));
            // 3 echo requests (ingress) or replies (egress), plus at least
            // 3 TCP segments each way (handshake, data, ack).
            assert!(
                a.packets >= b.packets + 6,
                "family {f} direction {d}: {} packets before, {} after",
                b.packets,
                a.packets
            );
            assert!(
                a.bytes > b.bytes + 6 * 40,
                "family {f} direction {d}: bytes"
            );
        }
    }
}

#[test]
fn counts_both_families_in_both_directions_over_tcx() {
    if !privileged() {
        return;
    }
    let link = PodLink::new();
    let bpffs = TempBpffs::new();
    link.node.run(|| {
        let mut dp = Datapath::load(&config(&bpffs, AttachMode::Auto)).expect("load");
        dp.attach(&link.host_if).expect("attach");

        let progs = sh("bpftool", &["prog", "show"]);
        assert!(
            progs.contains("name from_pod"),
            "bpftool prog show: {progs}"
        );
        assert!(progs.contains("name to_pod"), "bpftool prog show: {progs}");

        exercise_and_check(&link, &dp);

        // The pinned map is readable by another process (netpol-agent stats)
        // and carries BTF, so bpftool prints the field names.
        let pin = bpffs.path().join("netpol").join(maps::COUNTERS);
        let dump = sh(
            "bpftool",
            &["map", "dump", "pinned", pin.to_str().expect("utf-8")],
        );
        assert!(
            dump.contains("\"packets\"") && dump.contains("\"bytes\""),
            "{dump}"
        );
        let pinned = Counters::read_pinned(&bpffs.path().join("netpol")).expect("pinned");
        assert_eq!(pinned, dp.counters().expect("counters"));

        // Detached: traffic still flows and is no longer counted.
        dp.detach(&link.host_if).expect("detach");
        let before = dp.counters().expect("counters");
        ping(&link, POD_V4, 2);
        assert_eq!(before, dp.counters().expect("counters"));
    });
}

#[test]
fn netlink_attach_adds_clsact_and_detach_keeps_it() {
    if !privileged() {
        return;
    }
    let link = PodLink::new();
    let bpffs = TempBpffs::new();
    link.node.run(|| {
        let mut dp = Datapath::load(&config(&bpffs, AttachMode::Netlink)).expect("load");
        dp.attach(&link.host_if).expect("attach");
        let qdiscs = sh("tc", &["qdisc", "show", "dev", &link.host_if]);
        assert!(qdiscs.contains("clsact"), "{qdiscs}");
        let ingress = sh("tc", &["filter", "show", "dev", &link.host_if, "ingress"]);
        assert!(ingress.contains("from_pod"), "{ingress}");
        let egress = sh("tc", &["filter", "show", "dev", &link.host_if, "egress"]);
        assert!(egress.contains("to_pod"), "{egress}");

        exercise_and_check(&link, &dp);

        dp.detach(&link.host_if).expect("detach");
        let ingress = sh("tc", &["filter", "show", "dev", &link.host_if, "ingress"]);
        assert!(!ingress.contains("from_pod"), "{ingress}");
        // netpol never deletes a qdisc.
        let qdiscs = sh("tc", &["qdisc", "show", "dev", &link.host_if]);
        assert!(qdiscs.contains("clsact"), "{qdiscs}");
    });
}

#[test]
fn netlink_attach_reuses_an_existing_clsact() {
    if !privileged() {
        return;
    }
    let link = PodLink::new();
    let bpffs = TempBpffs::new();
    link.node
        .exec("tc", &["qdisc", "add", "dev", &link.host_if, "clsact"]);
    link.node.run(|| {
        let mut dp = Datapath::load(&config(&bpffs, AttachMode::Netlink)).expect("load");
        dp.attach(&link.host_if)
            .expect("attach onto an existing clsact");
        ping(&link, POD_V4, 1);
        let c = dp.counters().expect("counters");
        assert!(c.total(direction::INGRESS, family::IPV4).packets >= 1);
    });
}

#[test]
fn dropping_the_datapath_detaches_but_keeps_pinned_maps() {
    if !privileged() {
        return;
    }
    let link = PodLink::new();
    let bpffs = TempBpffs::new();
    link.node.run(|| {
        let mut dp = Datapath::load(&config(&bpffs, AttachMode::Auto)).expect("load");
        dp.attach(&link.host_if).expect("attach");
        ping(&link, NODE_V4.replace(".1", ".2").as_str(), 2);
        let counted = dp.counters().expect("counters");
        drop(dp);

        let pin_dir = bpffs.path().join("netpol");
        let after = Counters::read_pinned(&pin_dir).expect("pinned map outlives the agent");
        // The pings' counts outlive the agent. Only IPv4 is compared: the
        // link's own IPv6 neighbour and MLD packets may land between the
        // two reads (they did on a slow VM).
        for d in [direction::INGRESS, direction::EGRESS] {
            assert_eq!(
                after.total(d, family::IPV4),
                counted.total(d, family::IPV4),
                "direction {d}"
            );
        }
        // Detached: nothing counts any more.
        ping(&link, POD_V4, 2);
        assert_eq!(Counters::read_pinned(&pin_dir).expect("pinned"), after);

        // A new datapath reuses the pinned map: counting resumes from there.
        let mut dp = Datapath::load(&config(&bpffs, AttachMode::Auto)).expect("reload");
        dp.attach(&link.host_if).expect("attach");
        ping(&link, POD_V4, 1);
        let resumed = dp.counters().expect("counters");
        assert!(
            resumed.total(direction::INGRESS, family::IPV4).packets
                > counted.total(direction::INGRESS, family::IPV4).packets
        );
    });
}

/// On the netlink path (where the clsact qdisc comes first) and on this
/// kernel's own path (TCX from 6.6), the error names the interface, the
/// program and the reason.
#[test]
fn attaching_to_a_missing_interface_names_it_the_program_and_why() {
    if !privileged() {
        return;
    }
    let link = PodLink::new();
    for mode in [AttachMode::Netlink, AttachMode::Auto] {
        let bpffs = TempBpffs::new();
        link.node.run(|| {
            let mut dp = Datapath::load(&config(&bpffs, mode)).expect("load");
            let err = dp.attach("nosuchif0").expect_err("must fail");
            let msg = err.to_string();
            assert!(
                msg.contains("nosuchif0")
                    && msg.contains("from_pod")
                    && msg.contains("No such device"),
                "{mode:?}: {msg}"
            );
            assert_eq!(dp.attached().count(), 0, "{mode:?}");
        });
    }
}

fn tcx_kernel() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

fn persistent(bpffs: &TempBpffs, mode: AttachMode) -> DatapathConfig {
    DatapathConfig {
        persistent: true,
        ..config(bpffs, mode)
    }
}

/// netpol's netlink filters on `dev` (ingress `from_pod`, egress
/// `to_pod`), as `tc` lists them, and its TCX links there.
fn hooks(dev: &str) -> (usize, usize) {
    let filters = ["ingress", "egress"]
        .iter()
        .map(|h| sh("tc", &["filter", "show", "dev", dev, h]))
        .map(|out| {
            // One line per filter: `… bpf chain 0 handle 0x4e50 from_pod
            // direct-action … name from_pod tag …`.
            out.lines()
                .filter(|l| {
                    l.contains("handle 0x4e50") && (l.contains("from_pod") || l.contains("to_pod"))
                })
                .count()
        })
        .sum();
    // Debian's bpftool does not list TCX links.
    let tcx = [
        aya::programs::TcAttachType::Ingress,
        aya::programs::TcAttachType::Egress,
    ]
    .into_iter()
    .flat_map(|hook| {
        aya::programs::SchedClassifier::query_tcx(dev, hook)
            .map(|(_, progs)| progs)
            .unwrap_or_default()
    })
    .filter(|p| matches!(p.name_as_str(), Some("from_pod" | "to_pod")))
    .count();
    (filters, tcx)
}

/// IPv4 packets the programs counted, per direction.
fn v4(dp: &Datapath) -> (u64, u64) {
    let c = dp.counters().expect("counters");
    (
        c.total(direction::EGRESS, family::IPV4).packets,
        c.total(direction::INGRESS, family::IPV4).packets,
    )
}

/// The agent's attach (`attach_staged`): netlink filters at once, then
/// TCX links in front of them and the filters deleted. A ping flood runs
/// through the move: every request and every reply is judged by exactly
/// one program (a gap would count fewer, both hooks running would count
/// more).
#[test]
fn staged_attach_enforces_at_once_then_moves_to_tcx_without_a_gap() {
    if !privileged() {
        return;
    }
    let link = PodLink::new();
    let bpffs = TempBpffs::new();
    let tcx = tcx_kernel();
    link.node.run(|| {
        let mut dp = Datapath::load(&persistent(&bpffs, AttachMode::Auto)).expect("load");
        dp.attach_staged(&link.host_if).expect("attach");
        assert_eq!(hooks(&link.host_if), (2, 0), "netlink filters first");
        assert_eq!(dp.awaits_tcx(&link.host_if), tcx);
        if !tcx {
            // Below 6.6 netlink filters are the attachment.
            assert_eq!(dp.upgrade_to_tcx().expect("nothing to move"), None);
            return;
        }
        let before = v4(&dp);
        let node = netpol_testkit::netns::Netns::existing(link.node.name.clone());
        let flood = std::thread::spawn(move || {
            node.exec(
                "ping",
                &["-c", "400", "-i", "0.002", "-W", "2", "-q", POD_V4],
            );
        });
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            dp.upgrade_to_tcx().expect("move"),
            Some(link.host_if.clone())
        );
        flood.join().expect("ping flood");
        let after = v4(&dp);
        assert_eq!(hooks(&link.host_if), (0, 2), "TCX links only");
        assert!(!dp.awaits_tcx(&link.host_if));
        assert_eq!(dp.awaiting_tcx(), 0);
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (400, 400),
            "requests (to_pod, the pod's ingress) and replies (from_pod) judged once each"
        );
        for p in ["from_pod", "to_pod"] {
            let pin = bpffs
                .path()
                .join("netpol/links")
                .join(format!("{}-{p}", link.host_if));
            assert!(pin.exists(), "{}", pin.display());
        }
        assert_eq!(dp.upgrade_to_tcx().expect("none left"), None);
    });
}

/// A restart in each state of the move: the next agent adopts the netlink
/// filters (still waiting for TCX), or the TCX links; and filters a crash
/// left behind TCX links are deleted.
#[test]
fn staged_attachments_are_adopted_in_either_state() {
    if !privileged() || !tcx_kernel() {
        return;
    }
    let link = PodLink::new();
    let bpffs = TempBpffs::new();
    link.node.run(|| {
        let dev = link.host_if.as_str();
        let mut dp = Datapath::load(&persistent(&bpffs, AttachMode::Auto)).expect("load");
        dp.attach_staged(dev).expect("attach");
        drop(dp);
        assert_eq!(hooks(dev), (2, 0), "the filters outlive the agent");

        let mut dp = Datapath::load(&persistent(&bpffs, AttachMode::Auto)).expect("reload");
        dp.attach_staged(dev).expect("adopt the filters");
        assert_eq!(hooks(dev), (2, 0), "adopted, not added beside");
        assert!(dp.awaits_tcx(dev));
        let before = v4(&dp);
        ping(&link, POD_V4, 2);
        assert_eq!(v4(&dp).1 - before.1, 2, "the adopted filters judge");
        dp.upgrade_to_tcx().expect("move");
        drop(dp);
        assert_eq!(hooks(dev), (0, 2), "the links outlive the agent");

        let mut dp = Datapath::load(&persistent(&bpffs, AttachMode::Auto)).expect("reload");
        dp.attach_staged(dev).expect("adopt the links");
        assert_eq!(hooks(dev), (0, 2));
        assert!(!dp.awaits_tcx(dev));
        drop(dp);

        // An agent stopped between creating the links and deleting the
        // filters: the next one deletes them.
        let mut nl = Datapath::load(&persistent(&bpffs, AttachMode::Netlink)).expect("netlink");
        nl.attach(dev).expect("filters");
        drop(nl);
        assert_eq!(hooks(dev), (2, 2));
        let mut dp = Datapath::load(&persistent(&bpffs, AttachMode::Auto)).expect("reload");
        dp.attach_staged(dev).expect("adopt");
        assert_eq!(hooks(dev), (0, 2), "moot filters deleted");
        let before = v4(&dp);
        ping(&link, POD_V4, 2);
        assert_eq!(v4(&dp).1 - before.1, 2);
    });
}
