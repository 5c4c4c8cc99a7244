//! The agent on the kube source (privileged: it loads the datapath): ready
//! once every store listed and the state is applied, not ready while the
//! API server is unreachable (the enforced state stays), ready again when
//! it returns; and not healthy once the outage outlasts the liveness
//! threshold, healthy again after.
use std::time::Duration;

use netpol_agent::{
    Agent, Status,
    model::{
        Snapshot,
        manifests::{LoadReport, apply_value},
    },
    sources::{KubeConnection, Source, fingerprint},
};
use netpol_testkit::{datapath::TempBpffs, fake_apiserver, privileged};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);
/// Above the idle beat (5 s), so a healthy idle source never trips it.
const STUCK_AFTER: Duration = Duration::from_secs(8);

/// Waits until `/healthz`'s verdict is `healthy`; returns its reason.
async fn health_until(
    metrics: &netpol_agent::status::Metrics,
    healthy: bool,
    within: Duration,
) -> Option<String> {
    let until = std::time::Instant::now() + within;
    loop {
        let why = metrics.unhealthy();
        if why.is_none() == healthy {
            return why;
        }
        assert!(
            std::time::Instant::now() < until,
            "healthz still {why:?} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn expected(fake: &fake_apiserver::FakeApiServer) -> String {
    let mut snap = Snapshot::default();
    let mut report = LoadReport::default();
    for obj in fake.objects() {
        apply_value(&mut snap, obj, "fake", &mut report);
    }
    fingerprint(&snap)
}

#[test]
fn agent_is_ready_only_while_it_follows_the_api_server() {
    if !privileged() {
        return;
    }
    let bpffs = TempBpffs::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let fake = fake_apiserver::FakeApiServer::start().await;
        fake.apply_all([
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
                   "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "a", "namespace": "x", "uid": "uid-a", "labels": {"app": "a"}},
                   "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
                   "status": {"phase": "Running", "podIP": "10.0.0.1"}}),
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "deny", "namespace": "x"},
                   "spec": {"podSelector": {}}}),
        ]);
        let url = fake.url().parse().expect("the fake's URL");
        let client = kube::Client::try_from(kube::Config::new(url)).expect("a client");
        let agent = Agent::builder()
            .state_dir(None)
            .source(Source::Kube(KubeConnection::Client(client)))
            .node_name("n1")
            .bpffs(bpffs.path())
            .stuck_after(STUCK_AFTER)
            // No interface of the test host is a pod's.
            .interfaces("npkz-none*")
            .build()
            .expect("agent settings");
        let mut status = agent.status();
        let metrics = agent.metrics();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(agent.run(async {
            let _ = stopped.await;
        }));
        let mut wait = async |what: &str, pred: &dyn Fn(&Status) -> bool| match status
            .wait_for(DEADLINE, pred)
            .await
        {
            Ok(s) => s,
            Err(last) => panic!("timed out waiting for {what}; status: {last:#?}"),
        };
        let want = expected(&fake);
        let s = wait("the first apply", &|s: &Status| {
            s.ready && s.fingerprint.as_deref() == Some(want.as_str())
        })
        .await;
        assert!(s.source.synced);
        assert_eq!(s.objects.pods, 1);
        let generation = s.generation;
        // Idle past the threshold: the source's ticks keep it healthy.
        tokio::time::sleep(STUCK_AFTER + Duration::from_secs(1)).await;
        assert_eq!(metrics.unhealthy(), None, "an idle, healthy source");

        fake.set_reachable(false);
        let s = wait("not ready during the outage", &|s: &Status| {
            !s.ready && s.source.unreachable.is_some()
        })
        .await;
        assert_eq!(s.fingerprint.as_deref(), Some(want.as_str()), "state kept");
        assert_eq!(s.generation, generation, "nothing rewritten");
        let why = health_until(&metrics, false, STUCK_AFTER + DEADLINE)
            .await
            .expect("a reason");
        assert!(why.contains("source"), "{why}");

        fake.apply(json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "b", "namespace": "x", "uid": "uid-b", "labels": {"app": "b"}},
               "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
               "status": {"phase": "Running", "podIP": "10.0.0.2"}}));
        fake.set_reachable(true);
        let want = expected(&fake);
        wait("ready again with the outage's changes", &|s: &Status| {
            s.ready && s.fingerprint.as_deref() == Some(want.as_str())
        })
        .await;
        health_until(&metrics, true, DEADLINE).await;
        let text = metrics.encode();
        for needle in [
            "netpol_watch_errors_total{kind=",
            "netpol_store_objects{kind=\"Pod\"} 2",
            "netpol_seconds_since_last_apply",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
        assert!(!text.contains("netpol_seconds_since_last_apply -1"), "{text}");
        let _ = stop.send(());
        running
            .await
            .expect("the agent task")
            .expect("the agent stops cleanly");
    });
}
