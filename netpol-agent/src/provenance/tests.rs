use super::*;
use crate::compiler::{EMPTY_RULESET, IdAllocation, compile};
use crate::test_support;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {kubernetes.io/metadata.name: x}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.1.0.2}, {ip: "fd01::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {phase: Running, podIPs: [{ip: 10.2.0.2}]}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: x}
spec: {clusterIP: 10.43.0.10, ports: [{port: 80, protocol: TCP, nodePort: 30080}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-b, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 80}]}]
"#;

fn state() -> State {
    let snap = test_support::snapshot(CLUSTER);
    let c = compile(&snap, &IdAllocation::default());
    let mut ifaces = BTreeMap::new();
    ifaces.insert(
        ObjectRef::new("x", "a"),
        Bound {
            ifindex: 7,
            name: "veth7".into(),
        },
    );
    State::build(&Inputs {
        compiled: &c,
        snapshot: &snap,
        interfaces: &ifaces,
        generation: 3,
        fingerprint: Some("f00"),
        pin_dir: Path::new("/sys/fs/bpf/netpol"),
    })
}

#[test]
fn state_names_pods_rules_rulesets_and_services() {
    let s = state();
    let a = s.endpoint("x/a").expect("local pod a");
    assert_eq!(
        (a.ifindex, a.interface.as_deref()),
        (Some(7), Some("veth7"))
    );
    assert!(a.ingress.isolated && !a.egress.isolated);
    assert_eq!(a.ingress.policies, ["x/a-from-b"]);
    assert!(s.endpoint("x/b").is_none(), "b runs on n2");
    assert_eq!(s.remote_pods.len(), 1);
    assert_eq!(s.pod_by_address("10.2.0.2".parse().unwrap()), Some("x/b"));
    let prefix: IpNet = "10.2.0.2/32".parse().unwrap();
    let e = s
        .entry(a.id, Direction::Ingress, prefix)
        .expect("b's entry at a's ingress");
    assert_eq!(e.selector, netpol_common::policy_selector(a.id, 1));
    assert_eq!(e.rules.len(), 1);
    assert_eq!(e.rules[0].to_string(), "x/a-from-b: spec.ingress[0]");
    let rs = s.ruleset(e.ruleset).expect("its rule set");
    assert_eq!(
        rs.ports,
        [PortRangeState {
            protocol: "TCP".into(),
            first: 80,
            last: 80
        }]
    );
    assert!(s.ruleset(EMPTY_RULESET).is_some_and(|r| r.ports.is_empty()));
    let f = s
        .frontend("10.43.0.10".parse().unwrap(), 80, 6)
        .expect("cluster IP");
    assert_eq!(
        (f.kind.as_str(), f.services.as_slice()),
        ("cluster_ip", &["x/s".to_owned()][..])
    );
    let np = s
        .frontend("10.0.0.1".parse().unwrap(), 30080, 6)
        .expect("node port");
    assert_eq!(np.kind, "node_port");
}

#[test]
fn state_file_round_trips_and_is_replaced_atomically() {
    let dir = std::env::temp_dir().join(format!("netpol-state-test-{}", std::process::id()));
    let s = state();
    let path = s.write(&dir).expect("write");
    assert_eq!(State::read(&dir).expect("read"), Some(s.clone()));
    let mut next = s.clone();
    next.generation += 1;
    next.write(&dir).expect("rewrite");
    assert_eq!(
        State::read(&dir).expect("read").map(|s| s.generation),
        Some(4)
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        [std::ffi::OsString::from(STATE_FILE)],
        "no temporary left"
    );
    assert!(path.ends_with(STATE_FILE));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn writer_writes_the_newest_state_and_flushes_on_drop() {
    let dir = std::env::temp_dir().join(format!("netpol-state-writer-{}", std::process::id()));
    let (tx, rx) = std::sync::mpsc::channel();
    let w = Writer::start(
        dir.clone(),
        Box::new(move |_, r| {
            let _ = tx.send(r.map_err(|e| e.to_string()));
        }),
    )
    .expect("writer");
    for generation in 1..=50 {
        w.submit(move || State {
            version: STATE_VERSION,
            generation,
            ..State::default()
        });
    }
    drop(w);
    let written: Vec<_> = rx.try_iter().collect();
    assert!(
        !written.is_empty() && written.iter().all(Result::is_ok),
        "{written:?}"
    );
    assert!(written.len() <= 50);
    let s = State::read(&dir).expect("read").expect("a state file");
    assert_eq!(s.generation, 50, "the last one submitted is on disk");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_state_file_is_none_and_other_versions_are_refused() {
    let dir = std::env::temp_dir().join(format!("netpol-state-none-{}", std::process::id()));
    assert!(State::read(&dir).expect("absent").is_none());
    let e = State::parse(Path::new("s.json"), br#"{"version": 99}"#).expect_err("v99");
    assert!(e.to_string().contains("version 99"), "{e}");
    let e = State::parse(Path::new("s.json"), b"[]").expect_err("not an object");
    assert!(e.to_string().contains("not a netpol state file"), "{e}");
}

#[test]
fn unknown_fields_of_a_newer_writer_are_ignored() {
    let mut v = serde_json::to_value(state()).expect("json");
    v["added_later"] = serde_json::json!({"x": 1});
    let text = serde_json::to_vec(&v).expect("json");
    assert_eq!(
        State::parse(Path::new("s"), &text).expect("parse"),
        state_without_time(&text)
    );
}

fn state_without_time(text: &[u8]) -> State {
    let mut s = state();
    let v: serde_json::Value = serde_json::from_slice(text).expect("json");
    s.written_unix_secs = v["written_unix_secs"].as_u64().unwrap_or_default();
    s
}
