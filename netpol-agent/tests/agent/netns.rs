//! `netpol-agent run` end to end, through the library: an agent inside a
//! node namespace watches a manifests folder and the node's links, in a
//! bridge topology (veths on a bridge, as flannel's `cni0`) and a routed
//! one (calico-like, each veth its own subnet). Both families.
//!
//! Each test waits on the agent's status (generation, fingerprint,
//! interface state), never on a sleep.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use netpol_common::reason;
use netpol_testkit::{
    Netns,
    agent::{Running, count, http_get, interface},
    datapath::TempBpffs,
    echo::pings,
    manifests::{BASE, DENY_A, Manifests, pod_manifest},
    privileged, sh,
    topology::{Pod, Topology, ip, node, pod},
    unique,
};

/// The whole life of a pod interface, as the issue lists it.
fn pod_interface_lifecycle(topo: Topology, dual: bool) {
    let node = node(topo, dual);
    let bpffs = TempBpffs::new();
    let m = Manifests::new();
    m.write("00-base.yaml", BASE);
    let b = pod(&node, topo, 3, dual);
    m.write("b.yaml", &pod_manifest("b", &b));
    let mut agent = Running::start(&node, bpffs.path(), &m);
    agent.wait_enforced(&m);
    let s = agent.wait("b bound and programmed", |s| {
        interface(s, &b.host_if).is_some_and(|i| i.programmed && i.pod.as_deref() == Some("x/b"))
    });
    assert!(s.ready);
    assert_eq!(
        (s.families.ipv4, s.families.ipv6),
        (true, dual),
        "families found"
    );

    // A veth appears before its pod is known: attached and fail-closed.
    let a = pod(&node, topo, 2, dual);
    let s = agent.wait("a attached, not programmed", |s| {
        interface(s, &a.host_if).is_some_and(|i| !i.programmed)
    });
    assert_eq!(interface(&s, &a.host_if).and_then(|i| i.pod.clone()), None);
    let drops = count(bpffs.path(), reason::DROP_NOT_PROGRAMMED);
    for dst in a.addresses() {
        assert!(
            !pings(&b.ns, dst),
            "{dst}: an unprogrammed pod must fail closed"
        );
        assert!(pings(&node, dst), "{dst}: the node's own traffic passes");
    }
    assert!(count(bpffs.path(), reason::DROP_NOT_PROGRAMMED) >= drops + a.addresses().len() as u64);

    // Its pod arrives: bound from its namespace, with no traffic from it.
    let written = Instant::now();
    m.write("a.yaml", &pod_manifest("a", &a));
    agent.wait_enforced(&m);
    agent.wait("a bound and programmed", |s| {
        interface(s, &a.host_if).is_some_and(|i| i.programmed && i.pod.as_deref() == Some("x/a"))
    });
    eprintln!(
        "new pod enforced {:?} after its manifest was written (debounce 10 ms)",
        written.elapsed()
    );
    for dst in a.addresses() {
        assert!(pings(&b.ns, dst), "{dst}: no policy selects a yet");
    }

    // Its policy applies once written.
    m.write("deny-a.yaml", DENY_A);
    let before = agent.status.get().generation;
    let s = agent.wait_enforced(&m);
    assert!(s.generation > before);
    let drops = count(bpffs.path(), reason::DROP_POLICY);
    for dst in a.addresses() {
        assert!(!pings(&b.ns, dst), "{dst}: a's policy denies b");
        assert!(pings(&node, dst), "{dst}: the node still reaches a");
    }
    assert!(count(bpffs.path(), reason::DROP_POLICY) >= drops + a.addresses().len() as u64);

    // The veth goes: detached, its entry deleted.
    let endpoints = s.maps.endpoints;
    sh("ip", &["-n", &node.name, "link", "del", &a.host_if]);
    let s = agent.wait("a's interface gone", |s| interface(s, &a.host_if).is_none());
    assert_eq!(s.maps.endpoints, endpoints - 1);
    assert!(interface(&s, &b.host_if).is_some_and(|i| i.programmed));
}

#[test]
fn bridge_new_veth_fails_closed_then_binds_without_traffic_and_detaches() {
    if !privileged() {
        return;
    }
    pod_interface_lifecycle(Topology::Bridge, true);
}

#[test]
fn routed_new_veth_fails_closed_then_binds_without_traffic_and_detaches() {
    if !privileged() {
        return;
    }
    pod_interface_lifecycle(Topology::Routed, true);
}

#[test]
fn ipv4_only_node_runs_for_ipv4() {
    if !privileged() {
        return;
    }
    pod_interface_lifecycle(Topology::Routed, false);
}

/// A burst of pod interfaces: all there when the agent starts (its first
/// link dump, as after a node reboot), the last of them deleted while the
/// agent works through the others, so that its attach fails. Each of the
/// rest is attached fail-closed; the gone one is reported as an attach
/// error and leaves no entry; the pod programmed beside them keeps its
/// entry and its traffic.
#[test]
fn a_burst_of_veths_fails_closed_and_one_gone_mid_attach_stays_its_own() {
    if !privileged() {
        return;
    }
    let topo = Topology::Routed;
    let node = node(topo, false);
    let bpffs = TempBpffs::new();
    let m = Manifests::new();
    m.write("00-base.yaml", BASE);
    let b = pod(&node, topo, 3, false);
    m.write("b.yaml", &pod_manifest("b", &b));
    // Veths of pods the agent is not told of. Interfaces are dumped in
    // index order: the last one is reached after the others' attaches
    // (each tens of ms of the kernel's), time enough to delete it first.
    let mut burst: Vec<Pod> = (10..40).map(|n| pod(&node, topo, n, false)).collect();
    let gone = burst.pop().expect("a burst");
    let mut agent = Running::start(&node, bpffs.path(), &m);
    // Half attached: the link dump is taken (it streams beside the first
    // attaches) and the last veth of it is still to come.
    agent.wait("the burst being attached", |s| s.interfaces.len() >= 15);
    sh("ip", &["-n", &node.name, "link", "del", &gone.host_if]);

    let fp = m.fingerprint();
    let s = agent.wait("every veth of the burst attached, not programmed", |s| {
        s.fingerprint.as_deref() == Some(fp.as_str())
            && interface(s, &b.host_if).is_some_and(|i| i.programmed)
            && interface(s, &gone.host_if).is_none()
            && burst
                .iter()
                .all(|p| interface(s, &p.host_if).is_some_and(|i| !i.programmed && i.pod.is_none()))
    });
    // b and the burst's: the gone one kept none.
    assert_eq!(s.maps.endpoints, 1 + burst.len(), "{s:#?}");
    // Reported (once per event the link watch had queued for it), maybe
    // just after the others: its event comes last.
    let addr = s.listen.expect("listening");
    let deadline = Instant::now() + Duration::from_secs(10);
    let reported = loop {
        let metrics = http_get(&node, addr, "/metrics");
        let errors = metrics
            .lines()
            .find_map(|l| l.strip_prefix("netpol_errors_total{stage=\"attach\"} "))
            .and_then(|n| n.trim().parse::<u64>().ok());
        if errors.is_some_and(|n| n >= 1) || Instant::now() > deadline {
            break errors.is_some_and(|n| n >= 1);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(reported, "the gone veth's attach is not reported");
    let s = agent.status.get();
    assert!(interface(&s, &gone.host_if).is_none());
    assert_eq!(s.maps.endpoints, 1 + burst.len(), "{s:#?}");

    // No unbound pod's packet gets through; b still takes the node's.
    let drops = count(bpffs.path(), reason::DROP_NOT_PROGRAMMED);
    let through: Vec<String> = std::thread::scope(|scope| {
        let pinging: Vec<_> = burst
            .iter()
            .map(|p| scope.spawn(|| pings(&p.ns, b.v4).then(|| p.host_if.clone())))
            .collect();
        pinging
            .into_iter()
            .filter_map(|h| h.join().expect("ping"))
            .collect()
    });
    assert!(through.is_empty(), "unbound pods got through: {through:?}");
    assert!(count(bpffs.path(), reason::DROP_NOT_PROGRAMMED) >= drops + burst.len() as u64);
    assert!(pings(&node, b.v4), "the node still reaches b");
}

#[test]
fn http_reports_readiness_status_and_metrics() {
    if !privileged() {
        return;
    }
    let node = node(Topology::Routed, true);
    let bpffs = TempBpffs::new();
    let m = Manifests::new();
    m.write("00-base.yaml", BASE);
    let mut agent = Running::start(&node, bpffs.path(), &m);
    let s = agent.wait_enforced(&m);
    let addr = s.listen.expect("listening");
    assert!(http_get(&node, addr, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(&node, addr, "/readyz").starts_with("HTTP/1.1 200"));
    let status = http_get(&node, addr, "/status");
    let body = status.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(body).expect("status is JSON");
    assert_eq!(json["generation"], s.generation);
    assert_eq!(json["fingerprint"], m.fingerprint());
    assert_eq!(json["objects"]["namespaces"], 1);
    let metrics = http_get(&node, addr, "/metrics");
    for name in [
        "netpol_sync_duration_seconds",
        "netpol_generation",
        "netpol_objects{kind=\"Namespace\"} 1",
        "netpol_map_entries{map=\"NETPOL_ENDPOINTS\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    assert!(http_get(&node, addr, "/nope").starts_with("HTTP/1.1 404"));
}

/// Bad files do not stall the agent (issue 20): a FIFO named `*.yaml` and a
/// deeply nested file are named as problems while `/healthz` answers at
/// once throughout, a policy change beside them is enforced, and the
/// problems clear with their files.
#[test]
fn a_fifo_and_a_deeply_nested_file_neither_stall_health_nor_later_changes() {
    if !privileged() {
        return;
    }
    let node = node(Topology::Routed, true);
    let bpffs = TempBpffs::new();
    let m = Manifests::new();
    m.write("00-base.yaml", BASE);
    let mut agent = Running::start(&node, bpffs.path(), &m);
    let addr = agent.wait_enforced(&m).listen.expect("listening");
    let fifo = m.0.join("fifo.yaml");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo reads a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    // 120 KB of nesting: what stalled the agent for 22 s.
    let depth = 60_000;
    m.write(
        "nested.yaml",
        &format!("a: {}{}\n", "[".repeat(depth), "]".repeat(depth)),
    );
    m.write(
        "policy.yaml",
        "{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, \
         metadata: {name: p, namespace: x}, spec: {podSelector: {}}}\n",
    );
    let s = agent.wait("both problems", |s| {
        s.problems
            .iter()
            .any(|p| p.contains("fifo.yaml") && p.contains("a FIFO"))
            && s.problems
                .iter()
                .any(|p| p.contains("nested.yaml") && p.contains("nested 60000 deep"))
    });
    assert_eq!(s.objects.policies, 1, "the policy beside them is in force");
    for _ in 0..20 {
        let started = Instant::now();
        assert!(http_get(&node, addr, "/healthz").starts_with("HTTP/1.1 200"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    std::fs::remove_file(&fifo).expect("rm fifo");
    std::fs::remove_file(m.0.join("nested.yaml")).expect("rm nested");
    agent.wait("the problems cleared", |s| s.problems.is_empty());
    let metrics = http_get(&node, addr, "/metrics");
    assert!(metrics.contains("netpol_manifest_problems 0"), "{metrics}");
}

/// A pod namespace no longer reachable by a namespace file the agent
/// scans: bind-mounted to a private path, its `/var/run/netns` name gone.
struct Hidden(PathBuf);

impl Hidden {
    fn new(ns: &Netns) -> Self {
        let path = std::env::temp_dir().join(unique("netpol-hidden-"));
        std::fs::File::create(&path).expect("mount point");
        let src = format!("/var/run/netns/{}", ns.name);
        sh("mount", &["--bind", &src, &path.display().to_string()]);
        sh("ip", &["netns", "del", &ns.name]);
        Self(path)
    }
}

impl Drop for Hidden {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A pod whose namespace is hidden before its veth exists, set up from
/// inside as a CNI plugin does (veth created in the pod, host side moved
/// to the node).
fn hidden_pod(node: &Netns, topo: Topology, n: u8) -> (Pod, Hidden) {
    let ns = Netns::new("npp");
    let hidden = Hidden::new(&ns);
    let host_if = unique("nph");
    // Outside the agent's glob until no process is left in the pod's
    // namespace: a running `nsenter` would make it visible in /proc.
    let tmp_if = unique("npt");
    let nsenter = format!("--net={}", hidden.0.display());
    let inside = |args: &str| {
        let mut full = vec![nsenter.as_str(), "ip"];
        full.extend(args.split_whitespace());
        sh("nsenter", &full);
    };
    inside(&format!(
        "link add eth0 type veth peer name {tmp_if} netns {}",
        node.name
    ));
    let (v4, v6, gw4, gw6) = match topo {
        Topology::Bridge => (
            format!("10.42.0.{n}"),
            format!("fd42::{n}"),
            "10.42.0.1".to_owned(),
            "fd42::1".to_owned(),
        ),
        Topology::Routed => (
            format!("10.1.{n}.2"),
            format!("fd01:{n}::2"),
            format!("10.1.{n}.1"),
            format!("fd01:{n}::1"),
        ),
    };
    inside(&format!("addr add {v4}/24 dev eth0"));
    inside(&format!("addr add {v6}/64 dev eth0 nodad"));
    inside("link set eth0 up");
    inside(&format!("route add default via {gw4} dev eth0 onlink"));
    inside(&format!("-6 route add default via {gw6} dev eth0 onlink"));
    let nn = &node.name;
    ip(nn, &format!("link set {tmp_if} name {host_if}"));
    match topo {
        Topology::Bridge => ip(nn, &format!("link set {host_if} master cni0")),
        Topology::Routed => {
            ip(nn, &format!("addr add {gw4}/24 dev {host_if}"));
            ip(nn, &format!("addr add {gw6}/64 dev {host_if} nodad"));
        }
    }
    ip(nn, &format!("link set {host_if} up"));
    (
        Pod {
            ns,
            host_if,
            v4: v4.parse().expect("IPv4 address"),
            v6: Some(v6.parse().expect("IPv6 address")),
        },
        hidden,
    )
}

/// Without the peer's namespace, the node's routes (routed) or its
/// neighbour and FDB entries (bridged) bind the pod, with no traffic from
/// the test: behind a bridge the agent makes the node resolve the pod's
/// addresses itself. `api_first`: the pod's addresses are known from the
/// API before its veth appears (a sandbox recreated with its address);
/// otherwise they arrive after it.
fn binds_without_its_namespace(topo: Topology, api_first: bool) {
    let node = node(topo, true);
    let bpffs = TempBpffs::new();
    let m = Manifests::new();
    m.write("00-base.yaml", BASE);
    let mut agent = Running::start(&node, bpffs.path(), &m);
    agent.wait_enforced(&m);
    // hidden_pod's addresses for pod 2.
    let ips = match topo {
        Topology::Bridge => "[{ip: 10.42.0.2}, {ip: \"fd42::2\"}]",
        Topology::Routed => "[{ip: 10.1.2.2}, {ip: \"fd01:2::2\"}]",
    };
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: x, labels: {{app: a}}}}\n\
         spec: {{nodeName: n1, containers: [{{name: c}}]}}\n\
         status: {{phase: Running, podIPs: {ips}}}\n"
    );
    if api_first {
        m.write("a.yaml", &manifest);
        agent.wait_enforced(&m);
    }
    let (a, _hidden) = hidden_pod(&node, topo, 2);
    if !api_first {
        agent.wait("a attached, not programmed", |s| {
            interface(s, &a.host_if).is_some_and(|i| !i.programmed)
        });
        m.write("a.yaml", &manifest);
        agent.wait_enforced(&m);
    }
    let s = agent.wait("a bound without its namespace", |s| {
        interface(s, &a.host_if).is_some_and(|i| i.programmed && i.pod.as_deref() == Some("x/a"))
    });
    let found: Vec<String> = interface(&s, &a.host_if)
        .map(|i| i.addresses.iter().map(ToString::to_string).collect())
        .unwrap_or_default();
    // The peer's own list would hold its link-local address too.
    let addresses: Vec<String> = a.addresses().iter().map(ToString::to_string).collect();
    assert!(
        found.iter().all(|f| addresses.contains(f)),
        "bound by the fallback, not the namespace: {found:?}"
    );
}

/// A pod whose addresses the API gave before its veth appeared, its
/// namespace visible: the lookup at link time finds no address yet (the
/// CNI addresses the peer after creating it), and the agent keeps looking
/// until it binds.
#[test]
fn a_pod_known_before_its_veth_binds_once_its_peer_is_addressed() {
    if !privileged() {
        return;
    }
    let node = node(Topology::Bridge, true);
    let bpffs = TempBpffs::new();
    let m = Manifests::new();
    m.write("00-base.yaml", BASE);
    m.write(
        "a.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {app: a}}\n\
         spec: {nodeName: n1, containers: [{name: c}]}\n\
         status: {phase: Running, podIPs: [{ip: 10.42.0.5}, {ip: \"fd42::5\"}]}\n",
    );
    let mut agent = Running::start(&node, bpffs.path(), &m);
    agent.wait_enforced(&m);
    let a = pod(&node, Topology::Bridge, 5, true);
    agent.wait("a bound after its peer got its addresses", |s| {
        interface(s, &a.host_if).is_some_and(|i| i.programmed && i.pod.as_deref() == Some("x/a"))
    });
}

#[test]
fn a_silent_bridged_pod_whose_addresses_were_known_first_binds_without_its_namespace() {
    if !privileged() {
        return;
    }
    binds_without_its_namespace(Topology::Bridge, true);
}

#[test]
fn routed_pod_binds_by_route_when_its_namespace_is_hidden() {
    if !privileged() {
        return;
    }
    binds_without_its_namespace(Topology::Routed, false);
}

#[test]
fn bridged_pod_binds_by_neighbour_and_fdb_when_its_namespace_is_hidden() {
    if !privileged() {
        return;
    }
    binds_without_its_namespace(Topology::Bridge, false);
}
