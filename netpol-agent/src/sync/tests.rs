//! The loop against the fake map writer: the order of its writes, the
//! rollback of a failed one, adoption of a previous agent's entries,
//! and a pod whose interface shows up after its compile.
use std::collections::BTreeSet;

use netpol_common::{PolicyKeyV4, endpoint_flags, maps, programs};
use serde_json::json;

use super::*;
use crate::datapath::{
    DatapathError,
    clock::JiffyClock,
    pins::RestoreError,
    writer::{FakeBackend, KernelOp, MapWriter, Mirror},
};
use crate::model::manifests::{LoadReport, apply_value};
use crate::node::links::Link;

/// Moves to TCX links, each with its time.
type Moves = Arc<std::sync::Mutex<Vec<(String, tokio::time::Instant)>>>;

struct Fake {
    writer: MapWriter<FakeBackend>,
    attached: BTreeSet<String>,
    /// Each attach asked for, with the endpoint entry its interface had
    /// in the maps at that moment.
    attaches: Vec<(String, Option<EndpointInfo>)>,
    /// Set: attaches are staged (`attach_staged` on a TCX kernel) and
    /// each move to TCX links is logged here with its time.
    moves: Option<Moves>,
    /// Interfaces waiting for their move.
    staged: BTreeSet<String>,
    /// Moves the kernel refuses before one succeeds.
    refuse_moves: usize,
}

impl crate::node::uplinks::UplinkHooks for Fake {
    fn attach_uplink(&mut self, _: &str) -> Result<&'static str, DatapathError> {
        Ok(programs::LEAVE_NODE)
    }
    fn detach_uplink(&mut self, _: &str) -> Result<(), DatapathError> {
        Ok(())
    }
}

impl Dataplane for Fake {
    type Backend = FakeBackend;
    fn writer(&mut self) -> &mut MapWriter<FakeBackend> {
        &mut self.writer
    }
    fn attach(&mut self, interface: &str) -> Result<(), DatapathError> {
        // The fake's interfaces are named `veth<ifindex>` or `gone<ifindex>`.
        let ifindex = interface
            .trim_start_matches(char::is_alphabetic)
            .parse::<u32>()
            .ok();
        let entry = ifindex.and_then(|i| self.writer.mirror().endpoints.get(&i).copied());
        self.attaches.push((interface.to_owned(), entry));
        // An interface that disappeared before its programs were attached:
        // the kernel refuses, as it does with ENODEV.
        if interface.starts_with("gone") {
            return Err(DatapathError::NotAttached {
                interface: interface.to_owned(),
            });
        }
        self.attached.insert(interface.to_owned());
        if self.moves.is_some() {
            self.staged.insert(interface.to_owned());
        }
        Ok(())
    }
    fn detach(&mut self, interface: &str) -> Result<(), DatapathError> {
        self.attached.remove(interface);
        self.staged.remove(interface);
        Ok(())
    }
    fn awaits_tcx(&self) -> bool {
        !self.staged.is_empty()
    }
    fn interface_awaits_tcx(&self, interface: &str) -> bool {
        self.staged.contains(interface)
    }
    fn upgrade_to_tcx(&mut self) -> Result<Option<String>, DatapathError> {
        if self.refuse_moves > 0 {
            self.refuse_moves -= 1;
            return Err(DatapathError::NotAttached {
                interface: "refused".into(),
            });
        }
        let Some(name) = self.staged.pop_first() else {
            return Ok(None);
        };
        if let Some(m) = &self.moves {
            m.lock()
                .expect("moves")
                .push((name.clone(), tokio::time::Instant::now()));
        }
        Ok(Some(name))
    }
    fn clock(&self) -> JiffyClock {
        JiffyClock::NONE
    }
    fn set_clock(&mut self, _: JiffyClock) -> Result<(), DatapathError> {
        Ok(())
    }
    fn restore_pins(&mut self) -> Result<Vec<PathBuf>, RestoreError> {
        Ok(Vec::new())
    }
    fn pin_dir(&self) -> &std::path::Path {
        std::path::Path::new("/nonexistent/netpol")
    }
    fn replacing_layout(&self) -> Option<u32> {
        None
    }
    fn awaiting_interfaces(&self) -> bool {
        false
    }
    fn commit_layout(&mut self) -> Result<Option<u32>, DatapathError> {
        Ok(None)
    }
}

fn sync_loop(maps: Mirror) -> SyncLoop<Fake> {
    let fake = Fake {
        writer: MapWriter::new(
            FakeBackend {
                state: maps.clone(),
                ..FakeBackend::default()
            },
            maps,
        ),
        attached: BTreeSet::new(),
        attaches: Vec::new(),
        moves: None,
        staged: BTreeSet::new(),
        refuse_moves: 0,
    };
    let cfg = SyncConfig {
        node: Some("n1".into()),
        debounce: Duration::from_millis(10),
        interfaces: None,
        uplinks: None,
        new_pods: "fail-closed",
        source_health: None,
        state_dir: None,
    };
    let (status, _) = watch::channel(Status::default());
    SyncLoop::new(
        fake,
        cfg,
        Families {
            ipv4: true,
            ipv6: false,
        },
        status,
        Arc::new(Metrics::new()),
    )
}

/// Pods `a` (10.0.0.2) and `b` (10.0.0.3) on n1; `a` admits `from`.
fn cluster(from: &str) -> Arc<Input> {
    let mut snap = Snapshot::default();
    let mut report = LoadReport::default();
    let mut objs = vec![
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "a", "namespace": "x"},
               "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from}}}]}]}}),
    ];
    for (name, ip) in [("a", "10.0.0.2"), ("b", "10.0.0.3")] {
        objs.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "x", "uid": format!("uid-{name}"),
                         "labels": {"app": name}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIPs": [{"ip": ip}]}}));
    }
    for o in objs {
        apply_value(&mut snap, o, "test", &mut report);
    }
    Arc::new(Input {
        snapshot: snap,
        problems: Vec::new(),
    })
}

fn veth(l: &mut SyncLoop<Fake>, ifindex: u32, ip: &str) {
    silent_veth(l, ifindex);
    let result = Ok(vec![ip.parse().expect("address")]);
    if l.on_found(Found::Peer { ifindex, result }) {
        l.sync_endpoints_and_publish();
    }
}

fn apply(l: &mut SyncLoop<Fake>, input: Arc<Input>) {
    l.input = Some(input);
    l.sync();
}

fn log(l: &mut SyncLoop<Fake>) -> Vec<KernelOp> {
    l.dp.writer().backend().log.clone()
}

fn endpoint(l: &mut SyncLoop<Fake>, ifindex: u32) -> EndpointInfo {
    l.dp.writer().mirror().endpoints[&ifindex]
}

/// No endpoint entry names an id, isolated, before the policy entries
/// of that id written in the same batch: isolation turns on only once
/// its entries are there.
fn isolation_after_entries(ops: &[KernelOp]) {
    for (k, op) in ops.iter().enumerate() {
        let KernelOp::EndpointUpsert(i, e) = op else {
            continue;
        };
        if e.flags & endpoint_flags::INGRESS_ISOLATED == 0 {
            continue;
        }
        let selector = netpol_common::policy_selector(e.id, netpol_common::direction::INGRESS);
        let late = ops[k..].iter().any(|o| {
            matches!(o, KernelOp::PolicyV4Upsert(_, PolicyKeyV4 { selector: s, .. }, _) if *s == selector)
        });
        assert!(!late, "interface {i} isolated before its entries: {ops:#?}");
    }
}

#[tokio::test]
async fn entries_before_isolation_and_an_edit_ends_as_a_full_compile() {
    let mut l = sync_loop(Mirror::default());
    veth(&mut l, 10, "10.0.0.2");
    veth(&mut l, 11, "10.0.0.3");
    apply(&mut l, cluster("b"));
    assert!(l.last_error.is_none(), "{:?}", l.last_error);
    let first = log(&mut l);
    isolation_after_entries(&first);
    let a = endpoint(&mut l, 10);
    assert_ne!(a.flags & endpoint_flags::INGRESS_ISOLATED, 0);
    assert_eq!(a.flags & endpoint_flags::NOT_PROGRAMMED, 0);
    // An edit: the maps equal a full compile's.
    apply(&mut l, cluster("nobody"));
    assert!(l.last_error.is_none(), "{:?}", l.last_error);
    isolation_after_entries(&log(&mut l)[first.len()..]);
    let want = compiler::compile(
        &cluster("nobody").snapshot,
        &l.compiled().expect("compiled").ids,
    )
    .map_state();
    let have = l.dp.writer().mirror().clone();
    assert_eq!(have.policy_v4, want.policy_v4);
    assert_eq!(have.ports, want.ports);
}

#[tokio::test]
async fn a_pod_edit_reaches_the_policies_that_name_it() {
    let mut l = sync_loop(Mirror::default());
    veth(&mut l, 10, "10.0.0.2");
    veth(&mut l, 11, "10.0.0.3");
    let first = cluster("b");
    apply(&mut l, first.clone());
    let before = l.dp.writer().mirror().policy_v4.clone();
    // The next version, as a source makes it: b no longer matches a's
    // peer selector, and only b changed.
    let mut next = (*first).clone();
    let b = ObjectRef::new("x", "b");
    if let Some(pod) = next.snapshot.pods.get_mut(&b) {
        pod.labels.insert("app".into(), "c".into());
    }
    assert_eq!(
        Changes::between(&first.snapshot, &next.snapshot).pods,
        BTreeSet::from([b])
    );
    let next = Arc::new(next);
    apply(&mut l, next.clone());
    assert!(l.last_error.is_none(), "{:?}", l.last_error);
    let want = compiler::compile(&next.snapshot, &l.compiled().expect("compiled").ids).map_state();
    let have = l.dp.writer().mirror().clone();
    assert_ne!(have.policy_v4, before, "the edit changed a's entries");
    assert_eq!(have.policy_v4, want.policy_v4);
    assert_eq!(have.endpoints.len(), 2);
}

#[tokio::test]
async fn a_failed_write_is_rolled_back_and_the_retry_applies_it() {
    let mut l = sync_loop(Mirror::default());
    veth(&mut l, 10, "10.0.0.2");
    veth(&mut l, 11, "10.0.0.3");
    apply(&mut l, cluster("b"));
    let before = l.dp.writer().mirror().clone();
    // No room for one more policy entry.
    let full = before.policy_v4.len();
    l.dp.writer()
        .backend_mut()
        .capacity
        .insert(maps::POLICY_V4, full);
    let mut wider = (*cluster("b")).clone();
    let mut report = LoadReport::default();
    apply_value(
        &mut wider.snapshot,
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "a2", "namespace": "x"},
               "spec": {"podSelector": {"matchLabels": {"app": "a"}},
                        "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/16"}}]}]}}),
        "test",
        &mut report,
    );
    let wider = Arc::new(wider);
    apply(&mut l, wider.clone());
    assert!(
        l.last_error
            .as_deref()
            .is_some_and(|e| e.contains("NETPOL_POLICY_V4")),
        "{:?}",
        l.last_error
    );
    assert_eq!(l.dp.writer().mirror(), &before, "rolled back");
    assert_eq!(l.dp.writer().backend().state, before, "the kernel too");
    // Room again: the retry applies what the maps lack.
    l.dp.writer().backend_mut().capacity.clear();
    apply(&mut l, wider.clone());
    assert!(l.last_error.is_none(), "{:?}", l.last_error);
    let ids = &l.compiled().expect("compiled").ids;
    let want = compiler::compile(&wider.snapshot, ids).map_state();
    assert_eq!(l.dp.writer().mirror().policy_v4, want.policy_v4);
}

/// A previous agent's maps for `old`: a on interface 10, b on 11.
fn pinned_a_b(old: &Compiled) -> Mirror {
    let maps = old.map_state();
    let mut pinned = Mirror {
        policy_v4: maps.policy_v4.clone(),
        ports: maps.ports.clone(),
        ..Mirror::default()
    };
    for (ifindex, pod) in [(10, "a"), (11, "b")] {
        pinned
            .endpoints
            .insert(ifindex, maps.endpoints[&ObjectRef::new("x", pod)]);
    }
    pinned
}

#[tokio::test]
async fn a_previous_agents_entries_are_kept_and_its_ids_too() {
    // A previous agent's maps: a on interface 10, admitting b; ids 1..6
    // went to pods that came and went.
    let ids = IdAllocation {
        next_endpoint: 7,
        next_ruleset: 5,
        ..IdAllocation::default()
    };
    let old = compiler::compile(&cluster("b").snapshot, &ids);
    let a_id = old.endpoints[&ObjectRef::new("x", "a")].id;
    assert!(a_id >= 7);
    let pinned = pinned_a_b(&old);

    let mut l = sync_loop(pinned.clone());
    veth(&mut l, 10, "10.0.0.2");
    assert_eq!(
        endpoint(&mut l, 10),
        pinned.endpoints[&10],
        "kept before the first compile"
    );
    veth(&mut l, 11, "10.0.0.3");
    apply(&mut l, cluster("b"));
    assert!(l.last_error.is_none(), "{:?}", l.last_error);
    assert_eq!(endpoint(&mut l, 10).id, a_id, "a keeps its id");
    let writes_to_a: Vec<KernelOp> = log(&mut l)
        .into_iter()
        .filter(|op| matches!(op, KernelOp::EndpointUpsert(10, e) if e.id != a_id))
        .collect();
    assert!(writes_to_a.is_empty(), "{writes_to_a:?}");
    assert_eq!(l.dp.writer().mirror().policy_v4, pinned.policy_v4);
}

#[tokio::test]
async fn a_pod_whose_interface_comes_after_its_compile_is_bound_then() {
    let mut l = sync_loop(Mirror::default());
    veth(&mut l, 11, "10.0.0.3");
    apply(&mut l, cluster("b"));
    assert!(l.last_error.is_none(), "{:?}", l.last_error);
    l.on_link(&LinkEvent::Present(Link {
        ifindex: 10,
        name: "veth10".into(),
        veth: true,
        kind: Some("veth".into()),
        peer_netnsid: None,
        peer_ifindex: None,
    }));
    l.sync_endpoints_and_publish();
    assert_ne!(
        endpoint(&mut l, 10).flags & endpoint_flags::NOT_PROGRAMMED,
        0,
        "unprogrammed until its pod is known"
    );
    assert!(l.dp.attached.contains("veth10"));
    let result = Ok(vec!["10.0.0.2".parse().expect("address")]);
    assert!(l.on_found(Found::Peer {
        ifindex: 10,
        result
    }));
    l.sync_endpoints_and_publish();
    let want = l.compiled().expect("compiled").endpoints[&ObjectRef::new("x", "a")].info();
    let have = endpoint(&mut l, 10);
    assert_eq!(
        EndpointInfo { slot: 0, ..have },
        EndpointInfo { slot: 0, ..want }
    );
}

fn link(ifindex: u32, name: &str) -> LinkEvent {
    LinkEvent::Present(Link {
        ifindex,
        name: name.into(),
        veth: true,
        kind: Some("veth".into()),
        peer_netnsid: None,
        peer_ifindex: None,
    })
}

/// The order a new pod interface needs (whatever attaches it, one at a
/// time or many at once): its "not programmed" entry is in the maps when
/// its programs are attached, so none of its packets is judged without
/// it; and one the kernel refuses is reported, keeps no entry, and leaves
/// the interfaces around it attached and fail-closed.
#[tokio::test]
async fn a_burst_of_new_veths_each_marked_before_its_attach_and_a_failure_stays_its_own() {
    let mut l = sync_loop(Mirror::default());
    apply(&mut l, cluster("b"));
    veth(&mut l, 2, "10.0.0.2");
    let bound = endpoint(&mut l, 2);
    assert!(bound.programmed());
    l.dp.attaches.clear();

    // Everything the link watch queued at once, taken in one go.
    let burst: Vec<LinkEvent> = (10..20)
        .map(|i| {
            if i == 14 {
                link(i, &format!("gone{i}"))
            } else {
                link(i, &format!("veth{i}"))
            }
        })
        .collect();
    for ev in &burst {
        if l.on_link(ev) {
            l.sync_endpoints_and_publish();
        }
        if matches!(ev, LinkEvent::Present(Link { ifindex: 14, .. })) {
            // Its entry goes with the failure, not at the next sweep.
            assert!(!l.dp.writer().mirror().endpoints.contains_key(&14));
        }
    }

    assert_eq!(l.dp.attaches.len(), 10, "{:?}", l.dp.attaches);
    for (name, entry) in &l.dp.attaches {
        let i: u32 = name
            .trim_start_matches(char::is_alphabetic)
            .parse()
            .expect("index");
        assert_eq!(
            *entry,
            Some(interfaces::unbound_entry(i)),
            "{name}: its programs were attached before its not-programmed entry"
        );
    }
    let endpoints = l.dp.writer().mirror().endpoints.clone();
    // The refused one: no entry, not tracked, reported.
    assert!(!endpoints.contains_key(&14), "{endpoints:?}");
    assert!(!l.ifaces.contains_key(&14));
    assert!(!l.dp.attached.contains("gone14"));
    assert!(
        l.last_error
            .as_deref()
            .is_some_and(|e| e.contains("gone14")),
        "{:?}",
        l.last_error
    );
    // The others: attached, tracked, fail-closed until bound; the pod
    // bound before the burst keeps its entry.
    for i in (10..20).filter(|&i| i != 14) {
        assert_eq!(
            endpoints.get(&i),
            Some(&interfaces::unbound_entry(i)),
            "veth{i}"
        );
        assert!(l.ifaces.contains_key(&i) && l.dp.attached.contains(&format!("veth{i}")));
    }
    assert_eq!(endpoints.get(&2), Some(&bound));
    assert_eq!(endpoints.len(), 10);
}

/// `cluster(from)` plus pod `c` (label `app: b`, so `a`'s policy admits it
/// when it admits `b`), scheduled and pending: no addresses yet, as a
/// Pod is when its sandbox is made. With `ip`, the API server has it.
fn with_pending_c(from: &str, ip: Option<&str>) -> Arc<Input> {
    let mut input = (*cluster(from)).clone();
    let mut report = LoadReport::default();
    let status = match ip {
        Some(ip) => json!({"phase": "Running", "podIPs": [{"ip": ip}]}),
        None => json!({"phase": "Pending"}),
    };
    apply_value(
        &mut input.snapshot,
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "c", "namespace": "x", "uid": "uid-c", "labels": {"app": "b"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": status}),
        "test",
        &mut report,
    );
    Arc::new(input)
}

/// A veth the loop sees with nothing to read of its peer (no
/// `CAP_SYS_ADMIN`, a bridge, a pod that has not spoken).
fn silent_veth(l: &mut SyncLoop<Fake>, ifindex: u32) {
    if l.on_link(&LinkEvent::Present(Link {
        ifindex,
        name: format!("veth{ifindex}"),
        veth: true,
        kind: Some("veth".into()),
        peer_netnsid: None,
        peer_ifindex: None,
    })) {
        l.sync_endpoints_and_publish();
    }
}

fn attachment(pod: &str) -> netpol_cni::protocol::Attachment {
    netpol_cni::protocol::Attachment {
        container_id: format!("ctr-{pod}"),
        ifname: "eth0".into(),
    }
}

/// One request as the socket hands it over, then the rest of the loop's
/// turn (a compile when it asks for one, then the answers).
fn cni(
    l: &mut SyncLoop<Fake>,
    request: netpol_cni::protocol::Request,
) -> tokio::sync::oneshot::Receiver<netpol_cni::protocol::Reply> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    if l.on_cni(crate::node::cni::CniCall {
        request,
        reply,
        received: std::time::Instant::now(),
    }) {
        l.sync();
    }
    l.answer_cni();
    rx
}

fn add(
    pod: &str,
    uid: &str,
    hosts: &[&str],
    ips: &[&str],
    timeout_ms: u64,
) -> netpol_cni::protocol::Request {
    netpol_cni::protocol::Request::Add {
        attachment: attachment(pod),
        pod: netpol_cni::protocol::PodRef {
            namespace: "x".into(),
            name: pod.into(),
            uid: Some(uid.into()),
        },
        netns: format!("/var/run/netns/{pod}"),
        host_interfaces: hosts.iter().map(|h| (*h).to_owned()).collect(),
        ips: ips.iter().map(|i| i.parse().expect("address")).collect(),
        timeout_ms,
    }
}

fn peer_in_policy(l: &mut SyncLoop<Fake>, ip: [u8; 4]) -> bool {
    l.dp.writer()
        .mirror()
        .policy_v4
        .keys()
        .any(|(_, k)| k.addr == ip)
}

#[tokio::test]
async fn a_reported_pod_is_bound_by_its_veth_with_its_reported_addresses_then_answered() {
    use netpol_cni::protocol::Reply;
    let mut l = sync_loop(Mirror::default());
    veth(&mut l, 10, "10.0.0.2");
    veth(&mut l, 11, "10.0.0.3");
    apply(&mut l, with_pending_c("b", None));
    silent_veth(&mut l, 12);
    assert!(!endpoint(&mut l, 12).programmed());
    assert!(!peer_in_policy(&mut l, [10, 0, 0, 4]));
    let mut rx = cni(
        &mut l,
        add("c", "uid-c", &["cni0", "veth12"], &["10.0.0.4"], 5_000),
    );
    assert_eq!(rx.try_recv(), Ok(Reply::Ok));
    let e = endpoint(&mut l, 12);
    assert!(e.programmed(), "bound by name, no address read");
    assert_eq!(e.ipv4, [10, 0, 0, 4], "the reported address is the pod's");
    assert_eq!(l.bindings.get(&ObjectRef::new("x", "c")), Some(&12));
    assert!(
        peer_in_policy(&mut l, [10, 0, 0, 4]),
        "a's policy admits c's reported address before the API server has it"
    );
}

#[tokio::test]
async fn an_add_waits_for_its_veth_and_one_never_programmed_is_refused_with_the_reason() {
    use netpol_cni::protocol::Reply;
    let mut l = sync_loop(Mirror::default());
    veth(&mut l, 10, "10.0.0.2");
    apply(&mut l, with_pending_c("b", None));
    // ADD before the link event: it waits.
    let mut rx = cni(&mut l, add("c", "uid-c", &["veth13"], &["10.0.0.4"], 5_000));
    assert!(
        rx.try_recv().is_err(),
        "answered before its veth was programmed"
    );
    silent_veth(&mut l, 13);
    l.answer_cni();
    assert_eq!(rx.try_recv(), Ok(Reply::Ok));
    // A pod the API view lacks, and another incarnation of c: refused
    // at their deadline, naming why; neither takes c's addresses.
    for (pod, uid, why) in [
        ("zz", "uid-zz", "not in the agent's view"),
        ("c", "uid-other", "the API server has uid"),
    ] {
        silent_veth(&mut l, 14);
        let mut rx = cni(&mut l, add(pod, uid, &["veth14"], &["10.0.0.9"], 0));
        match rx.try_recv() {
            Ok(Reply::Error { message }) => {
                assert!(
                    message.contains(&format!("x/{pod}")) && message.contains(why),
                    "{message}"
                );
            }
            other => panic!("{pod}: {other:?}"),
        }
        assert!(!endpoint(&mut l, 14).programmed());
        assert!(!peer_in_policy(&mut l, [10, 0, 0, 9]));
        l.on_link(&LinkEvent::Gone {
            ifindex: 14,
            name: "veth14".into(),
        });
    }
}

#[tokio::test]
async fn del_releases_the_veth_fail_closed_and_forgets_its_connections() {
    use netpol_cni::protocol::{Reply, Request};
    let mut l = sync_loop(Mirror::default());
    veth(&mut l, 10, "10.0.0.2");
    // The API server has c's address by now, and its veth's peer shows
    // it: without the release, the address would bind it again.
    apply(&mut l, with_pending_c("b", Some("10.0.0.4")));
    veth(&mut l, 12, "10.0.0.4");
    let mut rx = cni(&mut l, add("c", "uid-c", &["veth12"], &["10.0.0.4"], 5_000));
    assert_eq!(rx.try_recv(), Ok(Reply::Ok));
    let id = endpoint(&mut l, 12).id;
    let mut rx = cni(
        &mut l,
        Request::Del {
            attachment: attachment("c"),
        },
    );
    assert_eq!(rx.try_recv(), Ok(Reply::Ok));
    let e = endpoint(&mut l, 12);
    assert!(
        !e.programmed(),
        "released: fail-closed until the veth is gone"
    );
    assert!(
        l.dp.writer().backend().purged.contains(&id),
        "its connections"
    );
    assert!(
        l.dp.writer()
            .backend()
            .purged_peers
            .contains(&"10.0.0.4".parse().unwrap()),
        "connections to its address, which the next pod may get"
    );
    // The veth gone, its index may carry a new pod.
    l.on_link(&LinkEvent::Gone {
        ifindex: 12,
        name: "veth12".into(),
    });
    assert!(l.cni.released.is_empty());
    // GC forgets what is not listed.
    let _waiting = cni(&mut l, add("c", "uid-c", &["veth15"], &["10.0.0.4"], 5_000));
    let mut rx = cni(&mut l, Request::Gc { valid: Vec::new() });
    assert_eq!(rx.try_recv(), Ok(Reply::Ok));
    assert!(l.cni.reports.is_empty());
}

/// A restarted agent that cannot read its pods' addresses (no
/// `CAP_SYS_ADMIN`, quiet pods: no neighbour entries) binds them by the
/// previous agent's state file: its first apply comes at once and never
/// marks a programmed interface unprogrammed, which would drop the pod's
/// packets until a neighbour entry bound it again.
#[tokio::test]
async fn a_restart_that_cannot_read_peers_binds_by_the_state_file() {
    let snapshot = cluster("b").snapshot.clone();
    let old = compiler::compile(&snapshot, &IdAllocation::default());
    let pinned = pinned_a_b(&old);
    let dir = std::env::temp_dir().join(format!("netpol-remembered-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("state dir");
    let interfaces: BTreeMap<ObjectRef, crate::provenance::Bound> = [("a", 10), ("b", 11)]
        .into_iter()
        .map(|(pod, ifindex)| {
            (
                ObjectRef::new("x", pod),
                crate::provenance::Bound {
                    ifindex,
                    name: format!("veth{ifindex}"),
                },
            )
        })
        .collect();
    crate::provenance::State::build(&crate::provenance::Inputs {
        compiled: &old,
        snapshot: &snapshot,
        interfaces: &interfaces,
        generation: 1,
        fingerprint: None,
        pin_dir: std::path::Path::new("/sys/fs/bpf/netpol"),
    })
    .write(&dir)
    .expect("state file");

    let mut l = sync_loop(pinned.clone());
    l.cfg.state_dir = Some(dir.clone());
    silent_veth(&mut l, 10);
    silent_veth(&mut l, 11);
    apply(&mut l, cluster("b"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(l.in_force.is_some(), "the first apply waited for lookups");
    assert!(l.last_error.is_none(), "{:?}", l.last_error);
    let unprogrammed: Vec<KernelOp> = log(&mut l)
        .into_iter()
        .filter(|op| {
            matches!(op, KernelOp::EndpointUpsert(_, e) if e.flags & endpoint_flags::NOT_PROGRAMMED != 0)
        })
        .collect();
    assert!(unprogrammed.is_empty(), "{unprogrammed:?}");
    for (ifindex, pod) in [(10, "a"), (11, "b")] {
        assert_eq!(l.bindings.get(&ObjectRef::new("x", pod)), Some(&ifindex));
        assert_eq!(
            endpoint(&mut l, ifindex),
            pinned.endpoints[&ifindex],
            "{pod} kept"
        );
    }
}

/// Staged attaches (netlink filters first) move to TCX links only once the
/// first apply is done and no pod interface has come for [`TCX_QUIET`],
/// one per turn of the loop; a refused move is tried again after
/// [`RETRY`]. Runs the loop itself, on paused time.
#[tokio::test(start_paused = true)]
async fn interfaces_move_to_tcx_links_once_enforced_and_quiet() {
    use tokio::time::{Instant, sleep};
    let mut l = sync_loop(Mirror::default());
    let moves = Arc::new(std::sync::Mutex::new(Vec::new()));
    l.dp.moves = Some(moves.clone());
    l.dp.refuse_moves = 1;
    let (input_tx, inputs) = watch::channel(None);
    let (link_tx, links) = mpsc::unbounded_channel();
    let (_cni_tx, cni) = mpsc::unbounded_channel();
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(l.run(inputs, links, cni, stop));
    let moved = || moves.lock().expect("moves").clone();

    link_tx.send(link(10, "veth10")).expect("send");
    sleep(Duration::from_secs(1)).await;
    assert!(moved().is_empty(), "not before the first apply");

    input_tx.send(Some(cluster("b"))).expect("send");
    let applied = Instant::now();
    sleep(Duration::from_millis(500)).await;
    // The first move is refused at once, and tried again a second later.
    assert!(moved().is_empty(), "{:?}", moved());
    sleep(Duration::from_secs(1)).await;
    let m = moved();
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0].0, "veth10");
    assert!(m[0].1 >= applied + RETRY, "{:?}", m[0].1 - applied);

    // Two pod interfaces 100 ms apart: both wait for quiet after the last.
    link_tx.send(link(11, "veth11")).expect("send");
    sleep(Duration::from_millis(100)).await;
    link_tx.send(link(12, "veth12")).expect("send");
    let last = Instant::now();
    sleep(Duration::from_millis(150)).await;
    assert_eq!(moved().len(), 1, "not while pods start");
    sleep(Duration::from_secs(1)).await;
    let m = moved();
    assert_eq!(
        m.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["veth10", "veth11", "veth12"]
    );
    for (name, at) in &m[1..] {
        assert!(*at >= last + TCX_QUIET, "{name}: {:?}", *at - last);
        assert!(*at < last + TCX_QUIET + Duration::from_millis(50), "{name}");
    }
    stop_tx.send(true).expect("stop");
    task.await.expect("loop");
}
