//! Deny events and metrics end to end: the real agent in a node namespace
//! reads the programs' ring buffer, names the pods on both ends of each
//! dropped packet, counts it on `/metrics` (scraped over HTTP and parsed),
//! and each pod's rate limit holds under a flood, its losses counted.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use netpol_agent::{
    AgentBuilder, datapath::events::KernelCounters, events::Denial, model::ObjectRef,
};
use netpol_common::{direction, protocol, reason};
use netpol_testkit::{
    Netns,
    agent::{DEADLINE, Running, count, http_get, interface},
    datapath::TempBpffs,
    echo::{connects, pings},
    manifests::{BASE, DENY_A, Manifests, guard_manifest, pod_manifest},
    privileged,
    topology::{Pod, Topology, node, pod},
};

use crate::AGENT;

/// A routed dual-stack node with pods `x/a` (isolated for ingress by
/// [`DENY_A`]) and `x/b`, and an agent enforcing them. Fields drop in
/// order: the agent before its bpffs and namespaces.
struct Scene {
    agent: Running,
    _m: Manifests,
    bpffs: TempBpffs,
    a: Pod,
    b: Pod,
    node: Netns,
}

impl Scene {
    fn new(configure: impl FnOnce(AgentBuilder) -> AgentBuilder) -> Self {
        let node = node(Topology::Routed, true);
        let bpffs = TempBpffs::new();
        let m = Manifests::new();
        let a = pod(&node, Topology::Routed, 2, true);
        let b = pod(&node, Topology::Routed, 3, true);
        m.write("00-base.yaml", BASE);
        m.write("a.yaml", &pod_manifest("a", &a));
        m.write("b.yaml", &pod_manifest("b", &b));
        m.write("deny-a.yaml", DENY_A);
        let mut agent =
            Running::start_with(&node, bpffs.path(), &m, |b| configure(b.state_dir(None)));
        agent.wait_enforced(&m);
        agent.wait("a and b programmed", |s| {
            [&a, &b]
                .iter()
                .all(|p| interface(s, &p.host_if).is_some_and(|i| i.programmed))
        });
        Self {
            agent,
            _m: m,
            bpffs,
            a,
            b,
            node,
        }
    }

    fn metrics(&self) -> Metrics {
        let addr = self.agent.status.get().listen.expect("listening");
        let response = http_get(&self.node, addr, "/metrics");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        Metrics::parse(body)
    }

    fn lost(&self) -> (u64, u64) {
        let l = KernelCounters::open(&self.bpffs.path().join("netpol"))
            .expect("pinned counters")
            .lost()
            .expect("lost events");
        (l.rate_limited, l.ring_full)
    }
}

/// A Prometheus text exposition, parsed: (name, labels) → value.
struct Metrics(BTreeMap<(String, BTreeMap<String, String>), f64>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let mut out = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value: f64 = value.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, labels(rest.strip_suffix('}').expect("`}`"))),
                None => (series, BTreeMap::new()),
            };
            out.insert((name.to_owned(), labels), value);
        }
        Self(out)
    }

    /// The sample of `name` with exactly `labels`; 0 when absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels = labels
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        self.0
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    fn packets(&self, dir: &str, fam: &str, verdict: &str) -> f64 {
        self.get(
            "netpol_packets_total",
            &[("direction", dir), ("family", fam), ("verdict", verdict)],
        )
    }

    fn denied(&self, ns: &str, pod: &str, dir: &str) -> f64 {
        self.get(
            "netpol_denied_total",
            &[("namespace", ns), ("pod", pod), ("direction", dir)],
        )
    }

    fn lost(&self, cause: &str) -> f64 {
        self.get("netpol_events_lost_total", &[("cause", cause)])
    }
}

/// `k="v",k2="v2"` (values with `\"`, `\\` and `\n` escapes).
fn labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, e)) => value.push(e),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').to_owned(), value);
        rest = &after[end..];
    }
    out
}

fn pod_ref(name: &str) -> Option<ObjectRef> {
    Some(ObjectRef::new("x", name))
}

#[test]
fn metrics_text_is_parsed_with_escaped_label_values() {
    let m = Metrics::parse(
        "# TYPE netpol_denied counter\n\
         netpol_denied_total{namespace=\"x\",pod=\"a\\\"b\",direction=\"ingress\"} 3\n\
         netpol_generation 7\n# EOF\n",
    );
    assert_eq!(m.denied("x", "a\"b", "ingress"), 3.0);
    assert_eq!(m.get("netpol_generation", &[]), 7.0);
    assert_eq!(m.denied("x", "a", "ingress"), 0.0);
}

#[test]
fn denied_probe_names_both_pods_and_the_reason_and_an_allowed_one_reports_nothing() {
    if !privileged() {
        return;
    }
    let mut s = Scene::new(|b| b.log_denied(true));
    let before = s.metrics();
    let a_ifindex = interface(&s.agent.status.get(), &s.a.host_if)
        .expect("a's interface")
        .ifindex;

    // Allowed first (b is not isolated; the replies belong to a
    // connection a opened), then denied. Events arrive in order: one the
    // allowed probes had caused would come before the denials.
    // An allowed echo may be retried: a fresh namespace can lose its
    // first one to neighbour resolution. Had netpol dropped one, its deny
    // event would come first and fail the checks below.
    for dst in s.b.addresses() {
        assert!((0..3).any(|_| pings(&s.a.ns, dst)), "a → {dst} is allowed");
    }
    for dst in s.a.addresses() {
        assert!(!pings(&s.b.ns, dst), "b → {dst} is denied");
    }
    let mut seen: Vec<Denial> = Vec::new();
    while seen.len() < s.a.addresses().len() {
        let d = s
            .agent
            .next_denial(DEADLINE)
            .unwrap_or_else(|| panic!("no deny event after {seen:#?}"));
        assert_eq!(
            (d.source.clone(), d.destination.clone(), d.pod.clone()),
            (pod_ref("b"), pod_ref("a"), pod_ref("a")),
            "{d:#?}"
        );
        assert_eq!(
            (d.direction, d.reason_name(), d.reason),
            (direction::INGRESS, "drop_policy", reason::DROP_POLICY),
            "{d:#?}"
        );
        assert_eq!(d.ifindex, a_ifindex, "{d:#?}");
        assert_ne!(d.endpoint, 0, "{d:#?}");
        seen.push(d);
    }
    for (d, (src, dst)) in seen.iter().zip([
        (s.b.v4, s.a.v4),
        (s.b.v6.expect("IPv6"), s.a.v6.expect("IPv6")),
    ]) {
        assert_eq!((d.src.ip(), d.dst.ip()), (src, dst), "{d:#?}");
        let (proto, echo) = if d.src.is_ipv4() {
            (protocol::ICMP, 8)
        } else {
            (protocol::ICMPV6, 128)
        };
        assert_eq!((d.protocol, d.icmp_type), (proto, echo), "{d:#?}");
    }

    // The reader counted them before handing them over.
    let after = s.metrics();
    assert_eq!(
        after.denied("x", "a", "ingress") - before.denied("x", "a", "ingress"),
        2.0
    );
    for fam in ["ipv4", "ipv6"] {
        assert!(
            after.packets("ingress", fam, "drop") > before.packets("ingress", fam, "drop"),
            "{fam} ingress drops"
        );
        assert!(
            after.packets("ingress", fam, "pass") > before.packets("ingress", fam, "pass"),
            "{fam} ingress passes (the allowed replies)"
        );
        assert_eq!(
            after.packets("egress", fam, "drop"),
            before.packets("egress", fam, "drop"),
            "no egress isolation, no egress drop"
        );
    }
    assert!(
        after.get(
            "netpol_drops_total",
            &[
                ("direction", "ingress"),
                ("family", "ipv4"),
                ("reason", "drop_policy")
            ]
        ) >= 1.0
    );
    assert_eq!(after.lost("rate_limit") + after.lost("ring_full"), 0.0);
    assert_eq!(after.denied("x", "b", "ingress"), 0.0);
}

const RATE: u32 = 20;
const BURST: u32 = 30;
const FLOOD: usize = 5000;

/// Sends `FLOOD` UDP datagrams to `dst` from inside `ns`, in bursts of
/// 100 every 20 ms (about a second: long enough for the rate to show);
/// how long it took from the first to the last.
fn flood(ns: &Netns, dst: SocketAddr) -> Duration {
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("udp socket");
        s.connect(dst).expect("connect");
        let start = Instant::now();
        for i in 0..FLOOD {
            if i > 0 && i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = s.send(&(i as u32).to_be_bytes());
        }
        start.elapsed()
    })
}

#[test]
fn a_flood_of_denied_packets_gets_the_burst_then_the_rate_and_the_rest_is_counted_lost() {
    if !privileged() {
        return;
    }
    let mut s = Scene::new(|b| b.event_rate(RATE).event_burst(BURST));
    let before = s.metrics();
    let drops0 = count(s.bpffs.path(), reason::DROP_POLICY);
    let (limited0, full0) = s.lost();
    let dst = SocketAddr::new(s.a.v4, 9);
    let took = flood(&s.b.ns, dst);

    // Every drop is either an event or a lost one; wait until all are
    // accounted for.
    let mut events: Vec<Denial> = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    let (drops, limited, full) = loop {
        while let Some(d) = s.agent.next_denial(Duration::from_millis(20)) {
            events.push(d);
        }
        let drops = count(s.bpffs.path(), reason::DROP_POLICY) - drops0;
        let (limited, full) = s.lost();
        let (limited, full) = (limited - limited0, full - full0);
        if drops > 0 && events.len() as u64 + limited + full == drops {
            break (drops, limited, full);
        }
        assert!(
            Instant::now() < deadline,
            "{drops} drops, {} events, {limited} rate-limited, {full} ring-full",
            events.len()
        );
    };
    eprintln!(
        "{FLOOD} datagrams in {took:?}: {drops} dropped, {} events, {limited} rate-limited",
        events.len()
    );
    assert!(
        drops >= FLOOD as u64 / 2,
        "{drops} of {FLOOD} reached to_pod"
    );
    // The burst at once, then the rate while the flood lasts (two CPUs
    // racing on one bucket may add one or two).
    let refill = f64::from(RATE) * took.as_secs_f64();
    let (least, most) = (
        f64::from(BURST) + refill - 2.0,
        f64::from(BURST) + refill + f64::from(RATE) * 0.2 + 4.0,
    );
    let n = events.len() as f64;
    assert!(
        (least..=most).contains(&n),
        "{n} events, not in {least:.1}..={most:.1}: burst {BURST}, rate {RATE}/s over {took:?}"
    );
    assert_eq!(full, 0, "the ring never filled");
    assert_eq!(limited, drops - events.len() as u64);
    for d in &events {
        assert_eq!(
            (
                d.source.clone(),
                d.destination.clone(),
                d.reason,
                d.protocol,
                d.dst
            ),
            (
                pod_ref("b"),
                pod_ref("a"),
                reason::DROP_POLICY,
                protocol::UDP,
                dst
            ),
        );
    }

    let after = s.metrics();
    assert_eq!(
        after.denied("x", "a", "ingress") - before.denied("x", "a", "ingress"),
        events.len() as f64
    );
    assert_eq!(
        after.lost("rate_limit") - before.lost("rate_limit"),
        limited as f64
    );
    assert!(
        after.packets("ingress", "ipv4", "drop") - before.packets("ingress", "ipv4", "drop")
            >= drops as f64
    );
}

/// The agent binary on `bed`'s pods x/a and x/b with `policy` (a file
/// name and its text) and `args`, once it enforces them.
fn two_pod_agent(
    bed: &netpol_testkit::process::NodeBed,
    policy: (&str, &str),
    args: &[&str],
) -> (Manifests, netpol_testkit::process::AgentProcess) {
    let [a, b] = &bed.pods[..] else {
        panic!("two pods")
    };
    let m = Manifests::new();
    m.write("00-base.yaml", BASE);
    m.write("a.yaml", &pod_manifest("a", a));
    m.write("b.yaml", &pod_manifest("b", b));
    m.write(policy.0, policy.1);
    let mut agent = netpol_testkit::process::AgentProcess::start(
        AGENT.as_ref(),
        &bed.node,
        bed.bpffs.path(),
        &m,
        "n1",
        args,
    );
    agent.wait_enforced(&m, &[&a.host_if, &b.host_if]);
    (m, agent)
}

/// The binary's `--log-denied`: each denial is a log line naming both
/// pods and the reason.
#[test]
fn log_denied_writes_each_denial_with_both_pods_to_the_agents_log() {
    use netpol_testkit::process::NodeBed;
    let Some(bed) = NodeBed::routed("deny_events", 2) else {
        return;
    };
    let [a, b] = &bed.pods[..] else {
        unreachable!()
    };
    let (m, mut agent) = two_pod_agent(
        &bed,
        ("deny-a.yaml", DENY_A),
        &[
            "--log-denied",
            "--log-format",
            "json",
            "--event-rate",
            "5",
            "--event-burst",
            "5",
        ],
    );
    assert!(!pings(&b.ns, a.v4), "b → a is denied");
    // One JSON object per line: the deny line's fields.
    let denial = || {
        agent
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["target"] == "netpol::denied")
    };
    let deadline = Instant::now() + DEADLINE;
    let line = loop {
        if let Some(v) = denial() {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no deny line in the log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let f = &line["fields"];
    assert_eq!(
        f["message"],
        "denied ingress icmp x/b -> x/a (drop_policy: isolated by x/a-only-from-nobody and no \
         rule allows it)",
        "{line:#}"
    );
    assert_eq!(
        (&f["source"], &f["destination"]),
        (&"x/b".into(), &"x/a".into())
    );
    assert_eq!(
        (&f["direction"], &f["reason"]),
        (&"ingress".into(), &"drop_policy".into())
    );
    for (field, addr) in [("src", b.v4), ("dst", a.v4)] {
        let shown = f[field].as_str().unwrap_or_default();
        assert!(shown.starts_with(&format!("{addr}:")), "{field}: {line:#}");
    }

    // With a ClusterNetworkPolicy: the line names the deciding Admin rule,
    // or the Pass that sent the packet on to NetworkPolicy.
    // Admin for a: TCP 81 passed (to NetworkPolicy, which isolates a),
    // everything from b denied.
    m.write("guard.yaml", &guard_manifest("a", 81, "b"));
    agent.wait_enforced(&m, &[&a.host_if, &b.host_if]);
    let decided = |port: u16| {
        let deadline = Instant::now() + DEADLINE;
        loop {
            assert!(
                !connects(&b.ns, a.v4, port, Duration::from_millis(200)),
                "b → a TCP {port} is denied"
            );
            let found = agent
                .log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["target"] == "netpol::denied")
                .find(|v| {
                    v["fields"]["dst"]
                        .as_str()
                        .is_some_and(|d| d == format!("{}:{port}", a.v4))
                });
            if let Some(v) = found {
                break v["fields"]["decided"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "no deny line for TCP {port} in the log:\n{}",
                agent.log()
            );
        }
    };
    assert_eq!(
        decided(80),
        "denied by ClusterNetworkPolicy guard (Admin): spec.ingress[1] (Deny)"
    );
    assert_eq!(
        decided(81),
        "passed by ClusterNetworkPolicy guard (Admin): spec.ingress[0]; then denied: \
         NetworkPolicy isolates the pod and none of its rules allows it (isolated by \
         x/a-only-from-nobody)"
    );
}

/// x/a admits x/b on TCP 80 by its first ingress rule and on TCP 81 by
/// its second, which also names TCP 80's peer: a record must name only
/// the rule whose port took the connection. x/b's egress admits TCP 80
/// and 81 to x/a by one rule.
const ALLOWED_RULES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-in, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: b}}}]
      ports: [{port: 80}]
    - from: [{podSelector: {matchLabels: {app: b}}}, {podSelector: {matchLabels: {app: c}}}]
      ports: [{port: 81}, {port: 90, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-out, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: a}}}]
      ports: [{port: 80, endPort: 81}]
"#;

/// `--record-allowed 1`: every new connection a rule admits gets a
/// `netpol::allowed` line on each isolated side, naming exactly the rules
/// whose peer and port admit it, and counts under those rules in
/// `netpol_rule_hits_total` (denials count under the isolating policy).
#[test]
fn allowed_records_name_the_rules_that_admit_each_side_and_count_rule_hits() {
    use netpol_testkit::process::NodeBed;
    let Some(bed) = NodeBed::routed("deny_events", 2) else {
        return;
    };
    let [a, b] = &bed.pods[..] else {
        unreachable!()
    };
    for port in [80, 81, 82] {
        netpol_testkit::echo::echo(a, port);
    }
    let (_m, agent) = two_pod_agent(
        &bed,
        ("rules.yaml", ALLOWED_RULES),
        &["--log-format", "json", "--record-allowed", "1"],
    );
    let wait = Duration::from_secs(2);
    let a_v6 = a.v6.expect("a's IPv6 address");
    for (to, port) in [(a.v4.to_string(), 80), (a_v6.to_string(), 81)] {
        assert!(connects(&b.ns, &to, port, wait), "b → a TCP {port}");
    }
    assert!(
        !connects(&b.ns, a.v4, 82, Duration::from_millis(300)),
        "b → a TCP 82 is denied"
    );
    // (direction, destination, rules) of every record.
    let records = || -> Vec<(String, String, String)> {
        agent
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "netpol::allowed")
            .map(|v| {
                let f = &v["fields"];
                let s = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
                (s("direction"), s("dst"), s("rules"))
            })
            .collect()
    };
    let want = |dir: &str, dst: SocketAddr, rules: &str| {
        (dir.to_owned(), dst.to_string(), rules.to_owned())
    };
    let expected = [
        want(
            "ingress",
            SocketAddr::new(a.v4, 80),
            "x/a-in: spec.ingress[0]",
        ),
        want(
            "egress",
            SocketAddr::new(a.v4, 80),
            "x/b-out: spec.egress[0]",
        ),
        want(
            "ingress",
            SocketAddr::new(a_v6, 81),
            "x/a-in: spec.ingress[1]",
        ),
        want(
            "egress",
            SocketAddr::new(a_v6, 81),
            "x/b-out: spec.egress[0]",
        ),
    ];
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = records();
        if expected.iter().all(|e| got.contains(e)) {
            // Nothing else: one record per side of each connection.
            assert_eq!(got.len(), expected.len(), "{got:#?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "allowed records {got:#?}, expected {expected:#?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = agent.get("/metrics").expect("metrics");
    let metrics = Metrics::parse(&text);
    let hits = |policy: &str, rule: &str, verdict: &str| {
        metrics.get(
            "netpol_rule_hits_total",
            &[("policy", policy), ("rule", rule), ("verdict", verdict)],
        )
    };
    assert_eq!(hits("x/a-in", "spec.ingress[0]", "allow"), 1.0, "{text}");
    assert_eq!(hits("x/a-in", "spec.ingress[1]", "allow"), 1.0, "{text}");
    assert_eq!(hits("x/b-out", "spec.egress[0]", "allow"), 2.0, "{text}");
    // TCP 82: b's egress admits it not (80-81), b's own isolation denied
    // it (and its SYN's retries).
    assert!(hits("x/b-out", "", "deny") >= 1.0, "{text}");
}
