//! Staged policies end to end: the agent binary in a node namespace, pods
//! with real traffic. A policy annotated `netpol.io/staged: "true"` is not
//! enforced; the programs judge each new connection against the staged
//! view too and the agent logs where it differs (`staged: would deny`,
//! `staged: would allow`), naming the rule or the isolating policies.
//! Removing the annotation promotes it.
use std::time::{Duration, Instant};

use netpol_testkit::{
    Netns,
    agent::DEADLINE,
    echo::{connects, echo},
    manifests::{BASE, DENY_A, Manifests, pod_manifest},
    process::{AgentProcess, NodeBed},
};

use crate::AGENT;

/// Ingress of `a` from `b` on TCP 81 only; `staged` adds the annotation.
fn only_81(staged: bool) -> String {
    let annotations = if staged {
        "annotations: {netpol.io/staged: \"true\"}"
    } else {
        "annotations: {}"
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: a-only-81, namespace: x, {annotations}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: a}}}}\n  \
         ingress: [{{from: [{{podSelector: {{matchLabels: {{app: b}}}}}}], ports: [{{port: 81}}]}}]\n"
    )
}

/// The `netpol::staged` log lines' messages so far.
fn staged_lines(agent: &AgentProcess) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "netpol::staged")
        .filter_map(|v| v["fields"]["message"].as_str().map(str::to_owned))
        .collect()
}

/// Connects from `b` to `to` until the log has a staged line containing
/// `want`; asserts each connection's outcome is `connected`.
fn until_reported(
    agent: &AgentProcess,
    b: &Netns,
    to: std::net::IpAddr,
    port: u16,
    connected: bool,
    want: &str,
) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert_eq!(
            connects(b, to, port, Duration::from_millis(300)),
            connected,
            "b -> {to} TCP {port}"
        );
        if staged_lines(agent).iter().any(|l| l == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no staged line {want:?} in the log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_staged_policy_is_reported_not_enforced_and_promoted_by_removing_its_annotation() {
    let Some(bed) = NodeBed::routed("staged", 2) else {
        return;
    };
    let (node, bpffs, pods) = (&bed.node, &bed.bpffs, &bed.pods);
    let [a, b] = &pods[..] else { unreachable!() };
    echo(a, 80);
    echo(a, 81);
    let m = Manifests::new();
    m.write("00-base.yaml", BASE);
    m.write("a.yaml", &pod_manifest("a", a));
    m.write("b.yaml", &pod_manifest("b", b));
    m.write("only-81.yaml", &only_81(true));
    let mut agent = AgentProcess::start(
        AGENT.as_ref(),
        node,
        bpffs.path(),
        &m,
        "n1",
        &["--log-format", "json", "--event-burst", "100"],
    );
    let cli = agent.cli();
    let netpol = |args: &[&str]| cli.run(args);
    // `explain` from the live maps: its exit code (0 allowed, 1 denied)
    // and the ingress judgement's text.
    let explain = |port: &str, staged: bool| {
        let mut args = vec!["explain", "x/b", "x/a", port, "-o", "json"];
        if staged {
            args.push("--staged");
        }
        let out = netpol(&args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("explain {args:?}: {e}: {out:?}"));
        (
            out.status.code().unwrap_or(-1),
            v["ingress"]["text"].as_str().unwrap_or_default().to_owned(),
        )
    };
    agent.wait_enforced(&m, &[&a.host_if, &b.host_if]);
    let (v4, v6): (std::net::IpAddr, std::net::IpAddr) = (a.v4, a.v6.expect("dual-stack"));

    // Staged: nothing isolates a, so everything connects; the staged view
    // would cut port 80, in both families, and agrees on port 81.
    until_reported(
        &agent,
        &b.ns,
        v4,
        80,
        true,
        "staged: would deny ingress tcp x/b -> x/a port 80 (isolated by x/a-only-81 and no rule \
         allows it)",
    );
    until_reported(
        &agent,
        &b.ns,
        v6,
        80,
        true,
        "staged: would deny ingress tcp x/b -> x/a port 80 (isolated by x/a-only-81 and no rule \
         allows it)",
    );
    assert!(connects(&b.ns, a.v4, 81, Duration::from_secs(2)));
    assert!(
        !staged_lines(&agent).iter().any(|l| l.contains("port 81")),
        "the views agree on port 81:\n{}",
        agent.log()
    );
    // inspect endpoints names a's staged flags.
    let out = netpol(&["inspect", "endpoints", "-o", "json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let flags = |pod: &str| {
        rows["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["pod"] == pod)
            .map(|r| r["flags"].clone())
            .unwrap_or_else(|| panic!("no row for {pod}: {rows}"))
    };
    assert_eq!(
        flags("x/a"),
        serde_json::json!([
            "has_ipv4",
            "has_ipv6",
            "staged_ingress",
            "staged_ingress_isolated"
        ])
    );
    assert_eq!(flags("x/b"), serde_json::json!(["has_ipv4", "has_ipv6"]));
    // explain: the enforced verdict, and with --staged the staged one.
    assert_eq!(explain("tcp/80", false).0, 0);
    assert_eq!(
        explain("tcp/80", true),
        (
            1,
            "isolated by x/a-only-81 and no rule matches: entry 10.244.1.3/32 -> rule set 2 (TCP \
             81, from x/a-only-81: spec.ingress[0]) does not allow TCP/80"
                .to_owned()
        )
    );
    let (code, text) = explain("tcp/81", true);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with("allowed by x/a-only-81: spec.ingress[0]"),
        "{text}"
    );
    // inspect staged: the reader's summary, written within a second.
    let summary = || {
        let out = netpol(&["inspect", "staged", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("inspect staged: {e}: {out:?}"));
        v["rows"].as_array().cloned().unwrap_or_default()
    };
    let deadline = Instant::now() + DEADLINE;
    let rows = loop {
        let rows = summary();
        if rows.len() == 2 {
            break rows;
        }
        assert!(Instant::now() < deadline, "inspect staged: {rows:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for (row, family) in rows.iter().zip(["ipv4", "ipv6"]) {
        let mut row = row.clone();
        assert!(row["count"].as_u64().is_some_and(|n| n >= 1), "{row}");
        assert!(
            row["last_seen_unix_secs"].as_u64().is_some_and(|t| t > 0),
            "{row}"
        );
        let o = row.as_object_mut().expect("object");
        o.remove("count");
        o.remove("last_seen_unix_secs");
        assert_eq!(
            row,
            serde_json::json!({
                "source": "x/b", "destination": "x/a", "direction": "ingress",
                "protocol": "tcp", "port": 80, "family": family,
                "report": "staged_would_deny",
                "decided": "isolated by x/a-only-81 and no rule allows it",
                "staged_policies": ["x/a-only-81"],
            })
        );
    }
    // Counted under the staged policy.
    let metrics = agent.get("/metrics").expect("metrics");
    let series =
        "netpol_staged_reports_total{policy=\"x/a-only-81\",report=\"staged_would_deny\"} ";
    let n: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"));
    assert!(n >= 2, "{n} reports counted");

    // An enforced default deny: both ports are denied; the staged view
    // (the same plus the staged policy) would allow port 81.
    m.write("deny-a.yaml", DENY_A);
    agent.wait_enforced(&m, &[&a.host_if, &b.host_if]);
    until_reported(
        &agent,
        &b.ns,
        v4,
        81,
        false,
        "staged: would allow ingress tcp x/b -> x/a port 81 (allowed by x/a-only-81: \
         spec.ingress[0])",
    );
    assert!(!connects(&b.ns, a.v4, 80, Duration::from_millis(300)));
    assert_eq!(explain("tcp/81", false).0, 1);
    assert_eq!(explain("tcp/81", true).0, 0);

    // Promoted: the annotation removed, the enforced default deny
    // deleted. Port 81 connects, port 80 is denied, and the views agree.
    m.write("only-81.yaml", &only_81(false));
    m.remove("deny-a.yaml");
    agent.wait_enforced(&m, &[&a.host_if, &b.host_if]);
    let before = staged_lines(&agent).len();
    for ip in [v4, v6] {
        assert!(connects(&b.ns, ip, 81, Duration::from_secs(2)), "{ip} 81");
        assert!(
            !connects(&b.ns, ip, 80, Duration::from_millis(300)),
            "{ip} 80"
        );
    }
    // Promoted, the views agree: --staged answers as the enforced view.
    assert_eq!(explain("tcp/80", true).0, 1);
    assert_eq!(explain("tcp/81", true).0, 0);
    // The promoted policy's rows are gone from the summary.
    let deadline = Instant::now() + DEADLINE;
    while !summary().is_empty() {
        assert!(Instant::now() < deadline, "inspect staged: {:?}", summary());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Time for the reader to log a report, were there one.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        staged_lines(&agent).len(),
        before,
        "no staged report once promoted:\n{}",
        agent.log()
    );
    drop(agent);
}
